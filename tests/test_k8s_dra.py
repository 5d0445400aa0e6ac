"""The DRA kubelet plugin, driven the way the kubelet drives it: gRPC on its
Unix sockets (registration, NodePrepareResources, NodeUnprepareResources),
with claims and pods served by a small API server, against a running vgpud
whose live knobs are read back with ``vgpuctl show``."""

from __future__ import annotations

import contextlib
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
from _k8s import FakeApiServer, GiB, claim, config, pod, result
from conftest import RunningDaemon, wait_for

from vgpu_cgroup._cli import _ctl
from vgpu_cgroup._core._knobs import KNOBS
from vgpu_cgroup.k8s import (
    DraDriver,
    DraOptions,
    DraPlugin,
    HookFiles,
    SliceFiles,
    Vgpud,
    main,
    pod_cgroup,
    publish,
)
from vgpu_cgroup.k8s._gen import dra_v1_pb2 as dra
from vgpu_cgroup.k8s._gen import dra_v1_pb2_grpc as dra_grpc
from vgpu_cgroup.k8s._gen import pluginregistration_pb2 as reg
from vgpu_cgroup.k8s._gen import pluginregistration_pb2_grpc as reg_grpc
from vgpu_cgroup.k8s._main import HOOK_LIB

NODE = "node-1"
pytestmark = pytest.mark.skipif(not os.path.exists(HOOK_LIB),
                                reason="hook library not built (make -C libhook)")


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    srv = FakeApiServer()
    srv.nodes[NODE] = {"metadata": {"name": NODE, "uid": "node-uid-1"}}
    yield srv
    srv.close()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Short: a Unix socket path has at most 107 bytes.
    d = Path(tempfile.mkdtemp(prefix="k8s-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Node:
    """A node's plugin side: the DRA plugin beside vgpud, and the kubelet's
    gRPC view of it."""

    def __init__(self, rd: RunningDaemon, api: FakeApiServer, sockdir: Path,
                 tmp: Path) -> None:
        self.rd = rd
        self.api = api
        self.slices_dir = os.path.join(rd.runtime_dir, "slices")
        self.opts = DraOptions(
            node=NODE, plugin_socket=str(sockdir / "plugins" / "dra.sock"),
            registrar_socket=str(sockdir / "registry" / "vgpu.io-reg.sock"),
            cdi_dir=str(tmp / "cdi"), slices_dir=self.slices_dir,
            hook=HookFiles(state_dir=str(tmp / "state"), socket_dir=str(tmp / "run")))
        self.opts.hook.install(HOOK_LIB)
        self.plugin: DraPlugin | None = None
        self.start()

    def start(self) -> None:
        vgpud = Vgpud(self.rd.socket)
        driver = DraDriver(self.opts, self.api.client(), SliceFiles(self.slices_dir, vgpud),
                           vgpud.gpus())
        self.plugin = DraPlugin(driver)
        self.plugin.start()

    def stop(self) -> None:
        if self.plugin is not None:
            self.plugin.stop()
            self.plugin = None

    @contextlib.contextmanager
    def kubelet(self) -> Iterator[dra_grpc.DRAPluginStub]:
        with grpc.insecure_channel(f"unix://{self.opts.plugin_socket}") as ch:
            yield dra_grpc.DRAPluginStub(ch)

    def prepare(self, *claims: dict[str, Any]) -> dra.NodePrepareResourcesResponse:
        req = dra.NodePrepareResourcesRequest(claims=[
            dra.Claim(namespace=c["metadata"]["namespace"], name=c["metadata"]["name"],
                      uid=c["metadata"]["uid"]) for c in claims])
        with self.kubelet() as stub:
            resp: dra.NodePrepareResourcesResponse = stub.NodePrepareResources(req, timeout=20)
            return resp

    def unprepare(self, *claims: dict[str, Any]) -> dra.NodeUnprepareResourcesResponse:
        req = dra.NodeUnprepareResourcesRequest(claims=[
            dra.Claim(namespace=c["metadata"]["namespace"], name=c["metadata"]["name"],
                      uid=c["metadata"]["uid"]) for c in claims])
        with self.kubelet() as stub:
            resp: dra.NodeUnprepareResourcesResponse = stub.NodeUnprepareResources(
                req, timeout=20)
            return resp

    def add(self, c: dict[str, Any], p: dict[str, Any]) -> None:
        with self.api.lock:
            self.api.claims[(c["metadata"]["namespace"], c["metadata"]["name"])] = c
            self.api.pods[(p["metadata"]["namespace"], p["metadata"]["name"])] = p

    def files(self) -> list[str]:
        out = []
        for d in (self.slices_dir, self.opts.cdi_dir):
            with contextlib.suppress(FileNotFoundError):
                out += [os.path.join(d, n) for n in os.listdir(d)]
        return sorted(out)


@pytest.fixture
def node(vgpud: RunningDaemon, api: FakeApiServer, sockdir: Path,
         tmp_path: Path) -> Iterator[Node]:
    n = Node(vgpud, api, sockdir, tmp_path)
    yield n
    n.stop()


def show(rd: RunningDaemon, capsys: pytest.CaptureFixture[str], slc: str) -> dict[str, Any]:
    """``vgpuctl --json show SLICE``."""
    capsys.readouterr()
    rc = _ctl.main(["--socket", rd.socket, "--json", "show", slc])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)  # type: ignore[no-any-return]


def slice_of(p: dict[str, Any]) -> str:
    return pod_cgroup(p["metadata"]["uid"], p["status"]["qosClass"])


def test_registers_with_the_kubelet_as_a_dra_plugin(node: Node) -> None:
    with grpc.insecure_channel(f"unix://{node.opts.registrar_socket}") as ch:
        stub = reg_grpc.RegistrationStub(ch)
        info = stub.GetInfo(reg.InfoRequest(), timeout=5)
        assert info.type == "DRAPlugin"
        assert info.name == "vgpu.io"
        assert info.endpoint == node.opts.plugin_socket
        assert list(info.supported_versions) == ["v1.DRAPlugin"]
        stub.NotifyRegistrationStatus(reg.RegistrationStatus(plugin_registered=True),
                                      timeout=5)
    assert node.plugin is not None
    assert node.plugin.registration.registered.is_set()
    assert oct(os.stat(node.opts.plugin_socket).st_mode & 0o777) == "0o600"


def test_prepare_writes_the_claims_knobs_and_vgpud_applies_them_live(
        node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    p = pod("trainer", qos="Burstable")
    c = claim("trainer-gpu", p, results=[result("gpu-1", cores="30", memory="8Gi")],
              configs=[config({"cores": {"max": 60}, "memory": {"max": "6Gi"}})])
    node.add(c, p)
    uid = c["metadata"]["uid"]
    resp = node.prepare(c)
    entry = resp.claims[uid]
    assert entry.error == ""
    [dev] = entry.devices
    assert (dev.pool_name, dev.device_name, list(dev.request_names)) == (NODE, "gpu-1", ["gpu"])
    assert list(dev.cdi_device_ids) == [f"vgpu.io/slice={uid}"]
    assert dev.share_id == c["status"]["allocation"]["devices"]["results"][0]["shareID"]
    # The pod's slice file, in vgpud's runtime layer, named by the claim.
    path = os.path.join(node.slices_dir, f"k8s-claim-{uid}.conf")
    text = Path(path).read_text()
    slc = slice_of(p)
    assert f'slice = "{slc}"' in text
    # vgpud took it live: the guarantee is the scheduled 30 cores, the
    # tenant's config raised the ceiling to 60 and lowered memory to 6 GiB.
    d = show(node.rd, capsys, slc)
    uuid1 = "GPU-11111111-1111-1111-1111-111111111111"
    assert d["knobs"]["gpu.cores.min"] == {"value": "30", "source": path}
    assert d["knobs"]["gpu.cores.max"] == {"value": "60", "source": path}
    assert d["knobs"]["gpu.memory.max"] == {"value": str(6 * GiB), "source": path}
    assert d["knobs"]["gpu.devices"] == {"value": uuid1, "source": path}
    # The CDI spec puts the hook, the socket and hook.conf into the containers.
    spec = json.loads(Path(node.opts.cdi_dir, f"vgpu.io-slice_{uid}.json").read_text())
    assert spec["kind"] == "vgpu.io/slice"
    [cdev] = spec["devices"]
    assert cdev["name"] == uid
    edits = cdev["containerEdits"]
    assert edits["env"] == ["LD_PRELOAD=/usr/local/vgpu/lib/libvgpu-hook.so"]
    mounts = {m["containerPath"]: m for m in edits["mounts"]}
    assert mounts["/usr/local/vgpu/lib/libvgpu-hook.so"]["hostPath"] == node.opts.hook.lib
    assert mounts["/etc/vgpu/hook.conf"]["hostPath"] == node.opts.hook.hook_conf
    assert mounts["/run/vgpu"]["hostPath"] == node.opts.hook.socket_dir
    assert all("ro" in m["options"] for m in edits["mounts"])
    assert os.path.getsize(node.opts.hook.lib) == os.path.getsize(HOOK_LIB)
    assert "socket=/run/vgpu/vgpud.sock\n" in Path(node.opts.hook.hook_conf).read_text()


def test_unprepare_removes_the_slice_file_and_the_cdi_spec(
        node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    p = pod("job")
    c = claim("job-gpu", p)
    node.add(c, p)
    assert node.prepare(c).claims[c["metadata"]["uid"]].error == ""
    assert show(node.rd, capsys, slice_of(p))["knobs"]["gpu.cores.max"]["value"] == "30"
    assert len(node.files()) == 2
    resp = node.unprepare(c)
    assert resp.claims[c["metadata"]["uid"]].error == ""
    assert node.files() == []
    # The slice had knobs and no process: with its file gone, it is gone.
    assert slice_of(p) not in node.rd.call(node.rd.daemon.tree.slices)
    # Unprepare again (the kubelet retries): nothing left to do, no error.
    assert node.unprepare(c).claims[c["metadata"]["uid"]].error == ""


def test_whole_devices_and_two_gpu_claims(node: Node, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    # Without DRAConsumableCapacity the API server records no consumed
    # capacity: the claim holds the GPU whole.
    p1 = pod("whole")
    c1 = claim("whole-gpu", p1, results=[result("gpu-0", cores=None, memory=None)])
    # Two GPUs with the same share each: one knob set covers both.
    p2 = pod("wide", qos="Guaranteed")
    c2 = claim("wide-gpu", p2, results=[result("gpu-0", cores="50", memory="4Gi"),
                                        result("gpu-1", cores="50", memory="4Gi")])
    node.add(c1, p1)
    node.add(c2, p2)
    resp = node.prepare(c1, c2)
    assert resp.claims[c1["metadata"]["uid"]].error == ""
    d = show(node.rd, capsys, slice_of(p1))
    assert d["knobs"]["gpu.cores.max"]["value"] == "100"
    assert d["knobs"]["gpu.memory.max"]["value"] == str(16 * GiB)
    entry = resp.claims[c2["metadata"]["uid"]]
    assert [dev.device_name for dev in entry.devices] == ["gpu-0", "gpu-1"]
    d = show(node.rd, capsys, slice_of(p2))
    assert slice_of(p2).startswith("kubepods.slice/kubepods-pod")
    assert d["knobs"]["gpu.cores.max"]["value"] == "50"
    assert d["knobs"]["gpu.memory.max"]["value"] == str(4 * GiB)
    assert d["knobs"]["gpu.devices"]["value"] == (
        "GPU-00000000-0000-0000-0000-000000000000,GPU-11111111-1111-1111-1111-111111111111")


BAD_CONFIGS = [
    ({"cores": {"max": 150}}, "cores.max: 150 is out of range"),
    ({"cores": {"min": 40}}, "cores.min 40 is more than the 30 cores the scheduler reserved"),
    ({"memory": {"max": "9Gi"}}, "memory.max 9663676416 bytes is more than the"),
    ({"memory": {"max": "eight"}}, "memory.max: 'eight' is not a quantity"),
    ({"cores": {"weight": 2}}, "unknown key 'cores.weight'"),
    ({"idle": "sometimes"}, "idle: expected true or false"),
    ({"cores": {"max": 50}, "pad": "x" * 12000}, "bytes, more than 10240"),
]


@pytest.mark.parametrize(("params", "words"), BAD_CONFIGS)
def test_a_bad_claim_config_is_a_grpc_error_and_nothing_is_written(
        node: Node, params: Any, words: str) -> None:
    good_pod, bad_pod = pod("good"), pod("bad")
    good = claim("good-gpu", good_pod)
    bad = claim("bad-gpu", bad_pod, configs=[config(params)])
    node.add(good, good_pod)
    node.add(bad, bad_pod)
    with pytest.raises(grpc.RpcError) as ei:
        node.prepare(good, bad)
    err: Any = ei.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(f"claim default/bad-gpu ({bad['metadata']['uid']}): ")
    assert words in err.details()
    # Planned whole, refused whole: not even the good claim's files.
    assert node.files() == []
    assert node.rd.call(lambda: node.rd.daemon.config_error) is None


def test_claims_the_driver_cannot_serve_are_refused_with_their_reason(node: Node) -> None:
    p = pod("a")
    unallocated = claim("unallocated", p)
    del unallocated["status"]["allocation"]
    node.add(unallocated, p)
    shared = claim("shared", p)
    shared["status"]["reservedFor"].append({"resource": "pods", "name": "b", "uid": "b-uid"})
    node.add(shared, p)
    elsewhere = claim("elsewhere", p, node="node-2")
    node.add(elsewhere, p)
    for c, code, words in [
        (unallocated, grpc.StatusCode.UNAVAILABLE, "not allocated yet"),
        (shared, grpc.StatusCode.FAILED_PRECONDITION, "reserved for 2 consumers"),
        (elsewhere, grpc.StatusCode.FAILED_PRECONDITION, "is not on node node-1"),
    ]:
        with pytest.raises(grpc.RpcError) as ei:
            node.prepare(c)
        err: Any = ei.value
        assert err.code() == code, err.details()
        assert words in err.details()
    missing = claim("missing", p)
    with pytest.raises(grpc.RpcError) as ei:
        node.prepare(missing)
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    assert node.files() == []


def test_a_second_claim_for_the_same_pod_is_refused(node: Node) -> None:
    p = pod("two")
    first, second = claim("one", p), claim("other", p)
    node.add(first, p)
    node.add(second, p)
    assert node.prepare(first).claims[first["metadata"]["uid"]].error == ""
    with pytest.raises(grpc.RpcError) as ei:
        node.prepare(second)
    assert "already has vgpu claim" in str(ei.value.details())


def test_prepare_repeated_after_a_plugin_restart_is_idempotent(
        node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    p = pod("steady")
    c = claim("steady-gpu", p, configs=[config({"cores": {"max": 45}})])
    node.add(c, p)
    uid = c["metadata"]["uid"]
    first = node.prepare(c).claims[uid]
    before = {f: Path(f).read_bytes() for f in node.files()}
    node.stop()
    node.start()  # a new process: nothing remembered but the files
    again = node.prepare(c).claims[uid]
    assert again == first
    assert {f: Path(f).read_bytes() for f in node.files()} == before
    assert show(node.rd, capsys, slice_of(p))["knobs"]["gpu.cores.max"]["value"] == "45"
    node.stop()
    node.start()
    assert node.unprepare(c).claims[uid].error == ""
    assert node.files() == []


def test_vgpud_down_is_a_per_claim_error_and_the_file_waits_for_it(
        node: Node, tmp_path: Path) -> None:
    p = pod("early")
    c = claim("early-gpu", p)
    node.add(c, p)
    uid = c["metadata"]["uid"]
    real = node.rd.socket
    node.plugin.driver.slices.vgpud = Vgpud(str(tmp_path / "nothing.sock"))  # type: ignore[union-attr]
    try:
        entry = node.prepare(c).claims[uid]
    finally:
        node.plugin.driver.slices.vgpud = Vgpud(real)  # type: ignore[union-attr]
    assert entry.error.startswith("UNAVAILABLE: vgpud at ")
    assert "vgpud will read it when it starts" in entry.error
    assert list(entry.devices) == []
    # The file is in place; a retry once vgpud answers applies it.
    assert os.path.exists(os.path.join(node.slices_dir, f"k8s-claim-{uid}.conf"))
    assert node.prepare(c).claims[uid].error == ""


def test_idle_is_written_and_vgpud_decides(node: Node, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    p = pod("batch")
    c = claim("batch-gpu", p, configs=[config({"idle": True})])
    node.add(c, p)
    uid = c["metadata"]["uid"]
    entry = node.prepare(c).claims[uid]
    path = os.path.join(node.slices_dir, f"k8s-claim-{uid}.conf")
    if "gpu.cores.idle" in KNOBS:
        assert entry.error == ""
        d = show(node.rd, capsys, slice_of(p))
        assert d["knobs"]["gpu.cores.idle"]["value"] == "1"
        assert d["knobs"]["gpu.cores.min"]["value"] == "0"
    else:
        # This vgpud does not know the knob yet: the file is taken back, so
        # vgpud is not left on a configuration it cannot load.
        assert entry.error.startswith("FAILED_PRECONDITION: vgpud refused the slice file")
        assert "gpu.cores.idle" in entry.error
        assert not os.path.exists(path)
        assert node.rd.call(lambda: node.rd.daemon.config_error) is None


def test_the_node_resource_slice_is_published_and_kept(node: Node, api: FakeApiServer) -> None:
    client = api.client()
    gpus = Vgpud(node.rd.socket).gpus()
    api.slices["stale"] = {"metadata": {"name": "stale", "resourceVersion": "1"},
                           "spec": {"nodeName": NODE, "driver": "vgpu.io"}}
    assert publish(client, NODE, "vgpu.io", gpus) == "created"
    assert "stale" not in api.slices
    [s] = api.slices.values()
    assert s["metadata"]["name"] == "node-1-vgpu.io"
    assert s["metadata"]["ownerReferences"][0]["uid"] == "node-uid-1"
    assert [d["name"] for d in s["spec"]["devices"]] == ["gpu-0", "gpu-1"]
    assert s["spec"]["devices"][1]["capacity"]["memory"]["value"] == str(16 * GiB)
    # The API server writes quantities back canonically: still unchanged.
    s["spec"]["devices"][0]["capacity"]["memory"]["value"] = "16Gi"
    assert publish(client, NODE, "vgpu.io", gpus) == "unchanged"
    assert publish(client, NODE, "vgpu.io", gpus[:1]) == "updated"
    [s] = api.slices.values()
    assert s["spec"]["pool"]["generation"] == 2
    assert len(s["spec"]["devices"]) == 1


def test_main_runs_the_plugin_until_stopped(vgpud: RunningDaemon, api: FakeApiServer,
                                            sockdir: Path, tmp_path: Path) -> None:
    stop = threading.Event()
    argv = ["--log-format", "json", "dra", "--node-name", NODE, "--vgpud-socket", vgpud.socket,
            "--slices-dir", os.path.join(vgpud.runtime_dir, "slices"),
            "--state-dir", str(tmp_path / "state"), "--plugin-dir", str(sockdir / "p"),
            "--registry-dir", str(sockdir / "r"), "--cdi-dir", str(tmp_path / "cdi")]
    rc: list[int] = []
    th = threading.Thread(target=lambda: rc.append(main(argv, stop=stop, api=api.client())))
    th.start()
    try:
        wait_for(lambda: os.path.exists(sockdir / "r" / "vgpu.io-reg.sock") and
                 bool(api.slices), 10)
        with grpc.insecure_channel(f"unix://{sockdir / 'r' / 'vgpu.io-reg.sock'}") as ch:
            info = reg_grpc.RegistrationStub(ch).GetInfo(reg.InfoRequest(), timeout=5)
        assert info.endpoint == str(sockdir / "p" / "vgpu.io" / "dra.sock")
        assert os.path.exists(tmp_path / "state" / "lib" / "libvgpu-hook.so")
    finally:
        stop.set()
        th.join(15)
    assert rc == [0]
    assert not os.path.exists(sockdir / "r" / "vgpu.io-reg.sock")
    assert main(["dra"], stop=stop) == 1  # no node name
    assert main(["dra", "--node-name", NODE, "--gpu-cdi-device", "nvidia.com/gpu={id}"],
                stop=stop) == 1
    assert main([], stop=stop) == 1
