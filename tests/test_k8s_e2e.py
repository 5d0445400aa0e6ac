"""End to end on the simulated GPU: a pod's claim (DRA) or its vgpu.io units
(device plugin) reach a CUDA process in a cgroup shaped like the pod's
container, through a real vgpud: its allocations stop at the claim's memory,
it sees that memory as its GPU, and its slice carries the claim's cores.

The kubelet's cgroup tree is made under the test's private cgroup subtree
(the plugins' --cgroup-root); the process gets the environment and files
of the CDI spec (container paths mapped to the host paths they mount).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from _e2e import (
    Cgroups,
    VgpudProc,
    built_fixture,
    find_process,
    spawn,
    vgpud_fixture,
)
from _e2e import walk as _walk
from _k8s import FakeApiServer, FakeDeviceKubelet, MiB, claim, pod, result

from vgpu_cgroup.k8s import (
    DevicePlugin,
    DevicePluginOptions,
    DraDriver,
    DraOptions,
    DraPlugin,
    HookFiles,
    SliceFiles,
    Vgpud,
    pod_cgroup,
)
from vgpu_cgroup.k8s._gen import dra_v1_pb2 as dra
from vgpu_cgroup.k8s._gen import dra_v1_pb2_grpc as dra_grpc
from vgpu_cgroup.k8s._main import HOOK_LIB

pytestmark = pytest.mark.e2e
NODE = "node-1"
CAP = 512 * MiB


built = built_fixture("client_basic")
vgpud = vgpud_fixture(sim_mem="8G", ctx_overhead=16 * MiB)


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    srv = FakeApiServer()
    yield srv
    srv.close()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="k8s-e2e-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _container_env(vgpud: VgpudProc, env: list[str], mounts: dict[str, str]) -> dict[str, str]:
    """The CDI env with container paths as the host paths mounted there (the
    runtime's bind mounts, without a mount namespace)."""
    out = vgpud.client_env()
    for kv in env:
        k, v = kv.split("=", 1)
        out[k] = mounts.get(v, v)
    # No /etc/vgpu/hook.conf on this machine: the socket comes from the env.
    assert not os.path.exists("/etc/vgpu/hook.conf")
    return out


def _run_in_pod(vgpud: VgpudProc, cgroups: Cgroups, built: Path, pod_slice: str,
                env: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """client_basic in the pod's container cgroup: (the JSON line of a run
    that allocates past the cap, the `vgpuctl tree` node of a second run
    that holds its memory until it has been seen there)."""
    rel = pod_slice.split("/", 1)[1]  # below the test's base
    container = cgroups.make(f"{rel}/cri-containerd-{uuid.uuid4().hex}.scope")
    assert container.startswith(pod_slice + "/")
    exe = str(built / "client_basic")
    p = spawn([exe, "1", "1000", str(200 * MiB), str(200 * MiB), str(200 * MiB)], env,
              container, cgroups, stdout=subprocess.PIPE)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    holder = spawn([exe, "1", "1000", str(200 * MiB)], dict(env, CLIENT_HOLD_MS="60000"),
                   container, cgroups, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        seen = None
        while seen is None or seen[1]["mem_bytes"] < 200 * MiB:
            assert holder.poll() is None, "the holding process exited"
            assert time.monotonic() < deadline, "the process never showed in vgpuctl tree"
            seen = find_process(vgpud.ctl("tree"), holder.pid)
    finally:
        holder.kill()
        holder.wait(10)
    return json.loads(out.splitlines()[-1]), seen[0]


def _check(vgpud: VgpudProc, r: dict[str, Any], node_: dict[str, Any], pod_slice: str,
           source: str) -> None:
    # Context (16 MiB) + module + two 200 MiB buffers fit in 512 MiB, the
    # third is CUDA_ERROR_OUT_OF_MEMORY (2); the process sees 512 MiB.
    assert r["alloc_rc"] == [0, 0, 2]
    assert r["mem_total"] == CAP
    assert node_["slice"].startswith(pod_slice + "/")
    shown = vgpud.ctl("show", pod_slice)
    assert shown["knobs"]["gpu.memory.max"] == {"value": str(CAP), "source": source}
    assert shown["knobs"]["gpu.cores.max"] == {"value": "30", "source": source}
    assert shown["knobs"]["gpu.cores.min"] == {"value": "30", "source": source}
    assert shown["gpu.memory.events"]["max"] >= 1


def test_a_claim_caps_a_process_in_the_pods_cgroup(
        vgpud: VgpudProc, cgroups: Cgroups, built: Path, api: FakeApiServer, sockdir: Path,
        tmp_path: Path) -> None:
    p = pod("cuda-job", qos="Burstable")
    c = claim("cuda-job-gpu", p, results=[result("gpu-0", cores="30", memory="512Mi")])
    api.claims[("default", "cuda-job-gpu")] = c
    api.pods[("default", "cuda-job")] = p
    slices_dir = str(tmp_path / "run" / "slices")
    opts = DraOptions(node=NODE, plugin_socket=str(sockdir / "dra.sock"),
                      registrar_socket=str(sockdir / "reg.sock"), cdi_dir=str(tmp_path / "cdi"),
                      slices_dir=slices_dir, cgroup_root=cgroups.base,
                      hook=HookFiles(state_dir=str(tmp_path / "state"),
                                     socket_dir=str(tmp_path)))
    opts.hook.install(HOOK_LIB)
    link = Vgpud(vgpud.socket)
    plugin = DraPlugin(DraDriver(opts, api.client(), SliceFiles(slices_dir, link), link.gpus()))
    plugin.start()
    try:
        uid = c["metadata"]["uid"]
        with grpc.insecure_channel(f"unix://{opts.plugin_socket}") as ch:
            resp = dra_grpc.DRAPluginStub(ch).NodePrepareResources(
                dra.NodePrepareResourcesRequest(claims=[dra.Claim(
                    namespace="default", name="cuda-job-gpu", uid=uid)]), timeout=20)
        assert resp.claims[uid].error == ""
        spec = json.loads(Path(opts.cdi_dir, f"vgpu.io-slice_{uid}.json").read_text())
        edits = spec["devices"][0]["containerEdits"]
        mounts = {m["containerPath"]: m["hostPath"] for m in edits["mounts"]}
        env = _container_env(vgpud, edits["env"], mounts)
        assert env["LD_PRELOAD"] == opts.hook.lib  # the installed copy, not the build tree's
        pod_slice = pod_cgroup(p["metadata"]["uid"], "Burstable", root=cgroups.base)
        r, where = _run_in_pod(vgpud, cgroups, built, pod_slice, env)
        _check(vgpud, r, where, pod_slice,
               os.path.join(slices_dir, f"k8s-claim-{uid}.conf"))
        with grpc.insecure_channel(f"unix://{opts.plugin_socket}") as ch:
            dra_grpc.DRAPluginStub(ch).NodeUnprepareResources(
                dra.NodeUnprepareResourcesRequest(claims=[dra.Claim(
                    namespace="default", name="cuda-job-gpu", uid=uid)]), timeout=20)
        # Unprepared and its processes gone (vgpud drops a closed connection
        # within a tick): the pod's slice is gone from vgpud.
        deadline = time.monotonic() + 10
        while pod_slice in [n["slice"] for n in _walk(vgpud.ctl("tree"))]:
            assert time.monotonic() < deadline, "the pod's slice outlived its claim"
            time.sleep(0.05)
    finally:
        plugin.stop()


def test_device_plugin_units_cap_a_process_in_the_pods_cgroup(
        vgpud: VgpudProc, cgroups: Cgroups, built: Path, api: FakeApiServer, sockdir: Path,
        tmp_path: Path) -> None:
    p = pod("vcuda-job", qos="Guaranteed")
    api.pods[("default", "vcuda-job")] = p
    kubelet = FakeDeviceKubelet(str(sockdir / "dp"), str(sockdir / "pr.sock"))
    slices_dir = str(tmp_path / "run" / "slices")
    opts = DevicePluginOptions(node=NODE, plugin_dir=str(sockdir / "dp"),
                               pod_resources_socket=str(sockdir / "pr.sock"),
                               slices_dir=slices_dir, cgroup_root=cgroups.base,
                               hook=HookFiles(state_dir=str(tmp_path / "state"),
                                              socket_dir=str(tmp_path)))
    opts.hook.install(HOOK_LIB)
    link = Vgpud(vgpud.socket)
    plugin = DevicePlugin(opts, api.client(), SliceFiles(slices_dir, link), link.gpus())
    plugin.start()
    try:
        plugin.register()
        # vcuda-core=30, vcuda-memory=2 (2 x 256 MiB), as the kubelet allocated them.
        cores = plugin.units.ids["cores"][:30]
        mem = plugin.units.ids["memory"][:2]
        kubelet.give("default", "vcuda-job", {"main": {"vgpu.io/cores": cores,
                                                       "vgpu.io/memory": mem}})
        from vgpu_cgroup.k8s._gen import deviceplugin_v1beta1_pb2 as dp
        from vgpu_cgroup.k8s._gen import deviceplugin_v1beta1_pb2_grpc as dp_grpc

        with grpc.insecure_channel(f"unix://{plugin.socket('cores')}") as ch:
            stub = dp_grpc.DevicePluginStub(ch)
            alloc = stub.Allocate(dp.AllocateRequest(container_requests=[
                dp.ContainerAllocateRequest(devices_ids=cores)]), timeout=10)
            stub.PreStartContainer(dp.PreStartContainerRequest(devices_ids=cores), timeout=10)
        c = alloc.container_responses[0]
        mounts = {m.container_path: m.host_path for m in c.mounts}
        env = _container_env(vgpud, [f"{k}={v}" for k, v in c.envs.items()], mounts)
        pod_slice = pod_cgroup(p["metadata"]["uid"], "Guaranteed", root=cgroups.base)
        r, where = _run_in_pod(vgpud, cgroups, built, pod_slice, env)
        _check(vgpud, r, where, pod_slice,
               os.path.join(slices_dir, f"k8s-pod-{p['metadata']['uid']}.conf"))
    finally:
        plugin.stop()
        kubelet.close()
