"""The device plugin, driven the way the kubelet drives it: Register on the
kubelet's socket, then ListAndWatch, GetPreferredAllocation, Allocate and
PreStartContainer on the plugin's sockets, with the kubelet's PodResources
API saying which pod holds which units; the pod's slice file must follow
from that alone, and vgpud must apply it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from _k8s import FakeApiServer, FakeDeviceKubelet, GiB, pod
from conftest import RunningDaemon, wait_for

from vgpu_cgroup._cli import _ctl
from vgpu_cgroup.k8s import (
    DevicePlugin,
    DevicePluginOptions,
    HookFiles,
    SliceFiles,
    Vgpud,
    main,
    pod_cgroup,
)
from vgpu_cgroup.k8s._gen import deviceplugin_v1beta1_pb2 as dp
from vgpu_cgroup.k8s._gen import deviceplugin_v1beta1_pb2_grpc as dp_grpc
from vgpu_cgroup.k8s._main import HOOK_LIB

NODE = "node-1"
UUID0 = "GPU-00000000-0000-0000-0000-000000000000"
UUID1 = "GPU-11111111-1111-1111-1111-111111111111"
CORES, MEMORY = "vgpu.io/cores", "vgpu.io/memory"
pytestmark = pytest.mark.skipif(not os.path.exists(HOOK_LIB),
                                reason="hook library not built (make -C libhook)")


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    srv = FakeApiServer()
    yield srv
    srv.close()


@pytest.fixture
def kdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="k8s-dp-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Node:
    def __init__(self, rd: RunningDaemon, api: FakeApiServer, kdir: Path, tmp: Path) -> None:
        self.rd = rd
        self.api = api
        self.slices_dir = os.path.join(rd.runtime_dir, "slices")
        self.kubelet = FakeDeviceKubelet(str(kdir / "device-plugins"), str(kdir / "pr.sock"))
        self.opts = DevicePluginOptions(
            node=NODE, plugin_dir=str(kdir / "device-plugins"),
            pod_resources_socket=str(kdir / "pr.sock"), slices_dir=self.slices_dir,
            gpu_cdi_device="nvidia.com/gpu={index}",
            hook=HookFiles(state_dir=str(tmp / "state"), socket_dir=str(tmp / "run")))
        self.opts.hook.install(HOOK_LIB)
        vgpud = Vgpud(rd.socket)
        self.plugin = DevicePlugin(self.opts, api.client(), SliceFiles(self.slices_dir, vgpud),
                                   vgpud.gpus())
        self.plugin.start()
        self.plugin.register()

    def stub(self, kind: str) -> tuple[grpc.Channel, dp_grpc.DevicePluginStub]:
        ch = grpc.insecure_channel(f"unix://{self.plugin.socket(kind)}")
        return ch, dp_grpc.DevicePluginStub(ch)

    def call(self, kind: str, method: str, req: Any) -> Any:
        ch, stub = self.stub(kind)
        with ch:
            return getattr(stub, method)(req, timeout=10)

    def ids(self, kind: str, gpu: str, n: int, start: int = 0) -> list[str]:
        return [d for d in self.plugin.units.ids[kind] if d.startswith(gpu)][start:start + n]

    def pod(self, name: str, **kw: Any) -> dict[str, Any]:
        p = pod(name, **kw)
        with self.api.lock:
            self.api.pods[(p["metadata"]["namespace"], name)] = p
        return p

    def close(self) -> None:
        self.plugin.stop()
        self.kubelet.close()


@pytest.fixture
def node(vgpud: RunningDaemon, api: FakeApiServer, kdir: Path, tmp_path: Path
         ) -> Iterator[Node]:
    n = Node(vgpud, api, kdir, tmp_path)
    yield n
    n.close()


def show(rd: RunningDaemon, capsys: pytest.CaptureFixture[str], slc: str) -> dict[str, Any]:
    capsys.readouterr()
    assert _ctl.main(["--socket", rd.socket, "--json", "show", slc]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_registers_both_resources_and_lists_their_units(node: Node) -> None:
    reqs = {r.resource_name: r for r in node.kubelet.registered}
    assert set(reqs) == {CORES, MEMORY}
    assert reqs[CORES].version == "v1beta1"
    assert reqs[CORES].endpoint == "vgpu-cores.sock"
    assert reqs[MEMORY].endpoint == "vgpu-memory.sock"
    assert reqs[CORES].options.pre_start_required
    assert reqs[CORES].options.get_preferred_allocation_available
    opts = node.call("cores", "GetDevicePluginOptions", dp.Empty())
    assert opts.pre_start_required
    ch, stub = node.stub("cores")
    with ch:
        stream: Any = stub.ListAndWatch(dp.Empty(), timeout=10)
        devs = next(stream).devices
        stream.cancel()
    assert len(devs) == 200  # 100 per GPU
    assert {d.health for d in devs} == {"Healthy"}
    ch, stub = node.stub("memory")
    with ch:
        stream = stub.ListAndWatch(dp.Empty(), timeout=10)
        assert len(next(stream).devices) == 2 * 64  # 16 GiB each, 256 MiB units
        stream.cancel()


def test_preferred_allocation_keeps_a_container_on_one_gpu(node: Node) -> None:
    cores = node.plugin.units.ids["cores"]
    req = dp.PreferredAllocationRequest(container_requests=[
        dp.ContainerPreferredAllocationRequest(available_deviceIDs=cores[50:],
                                               allocation_size=30)])
    got = list(node.call("cores", "GetPreferredAllocation", req).container_responses[0]
               .deviceIDs)
    assert len(got) == 30
    assert {node.plugin.units.owner[d][1] for d in got} == {UUID0}  # the fuller GPU
    # The same container's memory follows its cores, though GPU 1 is emptier.
    mem = node.plugin.units.ids["memory"]
    req = dp.PreferredAllocationRequest(container_requests=[
        dp.ContainerPreferredAllocationRequest(available_deviceIDs=mem, allocation_size=8)])
    got = list(node.call("memory", "GetPreferredAllocation", req).container_responses[0]
               .deviceIDs)
    assert {node.plugin.units.owner[d][1] for d in got} == {UUID0}


def test_allocate_puts_the_hook_in_place(node: Node) -> None:
    ids = node.ids("cores", UUID1, 30)
    resp = node.call("cores", "Allocate", dp.AllocateRequest(
        container_requests=[dp.ContainerAllocateRequest(devices_ids=ids)]))
    [c] = resp.container_responses
    assert dict(c.envs) == {"LD_PRELOAD": "/usr/local/vgpu/lib/libvgpu-hook.so"}
    mounts = {m.container_path: (m.host_path, m.read_only) for m in c.mounts}
    hook = node.opts.hook
    assert mounts == {"/usr/local/vgpu/lib/libvgpu-hook.so": (hook.lib, True),
                      "/run/vgpu": (hook.socket_dir, True),
                      "/etc/vgpu/hook.conf": (hook.hook_conf, True)}
    assert [d.name for d in c.cdi_devices] == ["nvidia.com/gpu=1"]
    with pytest.raises(grpc.RpcError) as ei:
        node.call("cores", "Allocate", dp.AllocateRequest(container_requests=[
            dp.ContainerAllocateRequest(devices_ids=["GPU-forged-c0001"])]))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_prestart_writes_the_pod_slice_from_the_kubelets_record(
        node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    p = node.pod("infer", qos="Burstable")
    uid = p["metadata"]["uid"]
    # Two containers: 20 + 10 cores and 4 + 4 GiB; an init container's units
    # are handed on to "main" and count once.
    init_cores = node.ids("cores", UUID0, 20)
    node.kubelet.give("default", "infer", {
        "main": {CORES: init_cores, MEMORY: node.ids("memory", UUID0, 16)},
        "side": {CORES: node.ids("cores", UUID0, 10, 20),
                 MEMORY: node.ids("memory", UUID0, 16, 16)},
        "init": {CORES: init_cores}})
    node.call("cores", "PreStartContainer",
              dp.PreStartContainerRequest(devices_ids=node.ids("cores", UUID0, 10, 20)))
    path = os.path.join(node.slices_dir, f"k8s-pod-{uid}.conf")
    assert os.path.exists(path)
    d = show(node.rd, capsys, pod_cgroup(uid, "Burstable"))
    assert d["knobs"]["gpu.cores.min"] == {"value": "30", "source": path}
    assert d["knobs"]["gpu.cores.max"] == {"value": "30", "source": path}
    assert d["knobs"]["gpu.memory.max"] == {"value": str(8 * GiB), "source": path}
    assert d["knobs"]["gpu.devices"]["value"] == UUID0
    # The memory plugin's PreStart for the same pod writes the same file.
    before = Path(path).read_bytes()
    node.call("memory", "PreStartContainer",
              dp.PreStartContainerRequest(devices_ids=node.ids("memory", UUID0, 16)))
    assert Path(path).read_bytes() == before
    # The kubelet forgets the pod: the cleanup pass removes its file.
    node.kubelet.forget("default", "infer")
    assert node.plugin.pods.collect() == [path]
    assert not os.path.exists(path)
    assert pod_cgroup(uid, "Burstable") not in node.rd.call(node.rd.daemon.tree.slices)


def test_prestart_refuses_what_a_slice_cannot_express(node: Node) -> None:
    node.pod("split")
    node.kubelet.give("default", "split", {"main": {
        CORES: node.ids("cores", UUID0, 30), MEMORY: node.ids("memory", UUID1, 8)}})
    with pytest.raises(grpc.RpcError) as ei:
        node.call("cores", "PreStartContainer",
                  dp.PreStartContainerRequest(devices_ids=node.ids("cores", UUID0, 30)))
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cores and memory on different GPUs" in str(ei.value.details())
    node.pod("coresonly")
    node.kubelet.give("default", "coresonly", {"main": {CORES: node.ids("cores", UUID1, 10)}})
    with pytest.raises(grpc.RpcError) as ei:
        node.call("cores", "PreStartContainer",
                  dp.PreStartContainerRequest(devices_ids=node.ids("cores", UUID1, 10)))
    assert "needs both vgpu.io/cores and vgpu.io/memory" in str(ei.value.details())
    # Units no pod holds (the kubelet's record is what counts, not the caller).
    with pytest.raises(grpc.RpcError) as ei:
        node.call("cores", "PreStartContainer",
                  dp.PreStartContainerRequest(devices_ids=node.ids("cores", UUID1, 5, 50)))
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not os.path.isdir(node.slices_dir) or os.listdir(node.slices_dir) == []


def test_a_pod_recreated_under_its_name_replaces_the_old_file(node: Node) -> None:
    units = {"main": {CORES: node.ids("cores", UUID0, 10), MEMORY: node.ids("memory", UUID0, 4)}}
    old = node.pod("web-0")
    node.kubelet.give("default", "web-0", units)
    node.plugin.pods.on_prestart("cores", units["main"][CORES])
    new = node.pod("web-0")
    node.plugin.pods.on_prestart("cores", units["main"][CORES])
    files = sorted(os.listdir(node.slices_dir))
    assert files == [f"k8s-pod-{new['metadata']['uid']}.conf"]
    assert old["metadata"]["uid"] != new["metadata"]["uid"]


def test_the_plugin_registers_again_after_a_kubelet_restart(node: Node) -> None:
    stop = threading.Event()
    th = threading.Thread(target=node.plugin.run, args=(stop,))
    th.start()
    try:
        assert len(node.kubelet.registered) == 2
        # A starting kubelet wipes the device-plugins directory.
        for kind in ("cores", "memory"):
            os.unlink(node.plugin.socket(kind))
        wait_for(lambda: len(node.kubelet.registered) == 4, 10)
        assert os.path.exists(node.plugin.socket("cores"))
        assert node.call("cores", "GetDevicePluginOptions", dp.Empty()).pre_start_required
    finally:
        stop.set()
        th.join(10)


def test_main_runs_the_device_plugin(vgpud: RunningDaemon, api: FakeApiServer, kdir: Path,
                                     tmp_path: Path) -> None:
    kubelet = FakeDeviceKubelet(str(kdir / "dp"), str(kdir / "pr.sock"))
    stop = threading.Event()
    argv = ["--log-format", "json", "device-plugin", "--node-name", NODE,
            "--vgpud-socket", vgpud.socket,
            "--slices-dir", os.path.join(vgpud.runtime_dir, "slices"),
            "--state-dir", str(tmp_path / "state"), "--device-plugin-dir", str(kdir / "dp"),
            "--pod-resources-socket", str(kdir / "pr.sock"), "--soft"]
    rc: list[int] = []
    th = threading.Thread(target=lambda: rc.append(main(argv, stop=stop, api=api.client())))
    th.start()
    try:
        wait_for(lambda: len(kubelet.registered) == 2, 10)
    finally:
        stop.set()
        th.join(15)
        kubelet.close()
    assert rc == [0]
    assert not os.path.exists(kdir / "dp" / "vgpu-cores.sock")
