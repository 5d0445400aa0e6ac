"""Several GPUs end to end on the simulated GPU (three devices): a slice
that ``gpu.devices`` restricts sees only its devices, in CUDA and in NVML,
numbered alike; CUDA_VISIBLE_DEVICES inside it picks among them; devices
outside it cannot be reached."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from _e2e import (
    Cgroups,
    JsonLines,
    VgpudProc,
    built_fixture,
    find_process,
    spawn,
    vgpud_fixture,
)

pytestmark = pytest.mark.e2e
MiB = 1 << 20
CTX = 16 * MiB
CUDA_ERROR_NO_DEVICE = 100
CUDA_ERROR_INVALID_DEVICE = 101
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_FOUND = 6

built = built_fixture("devices")
vgpud = vgpud_fixture(sim_mem="4G", ctx_overhead=CTX, sim_devices=3)


def physical(vgpud: VgpudProc) -> list[str]:
    """The node's GPUs, as vgpud (NVML) numbers them."""
    devs = sorted(vgpud.ctl("status")["devices"], key=lambda d: d["index"])
    return [d["uuid"] for d in devs]


def devices(vgpud: VgpudProc, cgroups: Cgroups, built: Path, slc: str, *args: str,
            **env: str) -> tuple[dict[str, Any], str]:
    """Run tests/c/devices in slice ``slc``: its JSON line and its stderr."""
    e = vgpud.client_env(VGPU_TEST_UUIDS=",".join(physical(vgpud)), **env)
    p = spawn([str(built / "devices"), *args], e, slc, cgroups, stdout=subprocess.PIPE,
              stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    return json.loads(out.splitlines()[-1]), err


def test_a_slice_sees_only_its_devices(vgpud: VgpudProc, cgroups: Cgroups, built: Path) -> None:
    """gpu.devices=1: CUDA and NVML show one GPU, the node's second, as
    device 0; the others are not there for it (out-of-range ordinals, NVML
    handles by UUID); its context and memory are on the node's GPU 1, and
    the daemon books them there."""
    phys = physical(vgpud)
    slc = cgroups.make("one")
    vgpud.ctl("set", slc, "gpu.devices=1")
    e = vgpud.client_env(VGPU_TEST_UUIDS=",".join(phys))
    p = spawn([str(built / "devices"), "ctx=0,1", f"alloc={64 * MiB}", "hold=1"], e, slc,
              cgroups, stdout=subprocess.PIPE, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = JsonLines(p)
    try:
        r = lines.next(30)
        show = vgpud.ctl("show", slc)
        lines.say()
        assert p.wait(30) == 0
    finally:
        p.kill()
        p.wait()
    assert r["init"] == 0
    assert r["count"] == 1
    assert r["uuids"] == [phys[1]]
    assert r["past_end"] == CUDA_ERROR_INVALID_DEVICE
    assert r["cvd"] is None  # the program's environment is as it was
    nv = r["nvml"]
    assert (nv["count"], nv["count_v1"]) == (1, 1)
    assert nv["devices"] == [{"uuid": phys[1], "index_rc": 0, "index": 0, "v1_same": True}]
    assert nv["past_end"] == NVML_ERROR_INVALID_ARGUMENT
    assert nv["by_uuid"] == [NVML_ERROR_NOT_FOUND, 0, NVML_ERROR_NOT_FOUND]
    ok, beyond = r["ctx"]
    assert (ok["retain"], ok["create"], ok["alloc"]) == (0, 0, 0)
    assert (beyond["retain"], beyond["create"]) == (CUDA_ERROR_INVALID_DEVICE,) * 2
    held = 64 * MiB + CTX
    assert [mem for _busy, mem in r["sim"]] == [0, held, 0]  # on the node's GPU 1
    assert show["gpu.memory.current"]["devices"] == {phys[1]: held}


def _view(vgpud: VgpudProc, cgroups: Cgroups, built: Path, slc: str,
          **env: str) -> tuple[dict[str, Any], str]:
    return devices(vgpud, cgroups, built, slc, **env)


def test_cuda_visible_devices_picks_among_the_slice_devices(vgpud: VgpudProc, cgroups: Cgroups,
                                                            built: Path) -> None:
    """Inside a slice with GPUs 1 and 2, CUDA_VISIBLE_DEVICES reads as on a
    node with just those: indices are positions in the slice's list (NVML's
    numbering inside it), UUIDs (or prefixes) must be the slice's, and the
    list ends at the first that is neither. NVML ignores it, as NVIDIA's
    does. Where gpu.devices allows every GPU, nothing is changed."""
    phys = physical(vgpud)
    slc = cgroups.make("pair")
    vgpud.ctl("set", slc, "gpu.devices=2,1")

    def cuda(**env: str) -> list[str] | int:
        r, _ = _view(vgpud, cgroups, built, slc, **env)
        assert [d["uuid"] for d in r["nvml"]["devices"]] == [phys[1], phys[2]]
        assert r["cvd"] == env.get("CUDA_VISIBLE_DEVICES")
        return r["uuids"] if r["init"] == 0 else int(r["init"])

    assert cuda() == [phys[1], phys[2]]  # the node's order, whatever the knob's
    assert cuda(CUDA_VISIBLE_DEVICES="1") == [phys[2]]
    assert cuda(CUDA_VISIBLE_DEVICES="1,0") == [phys[2], phys[1]]
    assert cuda(CUDA_VISIBLE_DEVICES=f" {phys[2][:12]} ") == [phys[2]]
    assert cuda(CUDA_VISIBLE_DEVICES="0,2,1") == [phys[1]]  # ends at 2: not in the slice
    assert cuda(CUDA_VISIBLE_DEVICES=phys[0]) == CUDA_ERROR_NO_DEVICE  # the node's, not the slice's
    every = cgroups.make("every")
    r, _ = _view(vgpud, cgroups, built, every, CUDA_VISIBLE_DEVICES="2")
    assert r["uuids"] == [phys[2]]  # the driver's own reading
    assert [d["uuid"] for d in r["nvml"]["devices"]] == phys


def test_a_slice_without_devices_gets_no_device(vgpud: VgpudProc, cgroups: Cgroups,
                                                built: Path) -> None:
    slc = cgroups.make("none")
    vgpud.ctl("set", slc, "gpu.devices=7")  # no such GPU on this node
    r, err = devices(vgpud, cgroups, built, slc, "ctx=0")
    assert r["init"] == CUDA_ERROR_NO_DEVICE
    assert r["nvml"]["count"] == 0
    assert r["ctx"][0]["retain"] != 0
    assert "no GPU for this process: its slice may use 0 devices" in err


def test_devices_taken_away_later_fail_at_context_creation(vgpud: VgpudProc, cgroups: Cgroups,
                                                           built: Path) -> None:
    """A process's devices are numbered once, when it starts: a gpu.devices
    set later does not renumber them, but a device it no longer may use
    fails with CUDA_ERROR_INVALID_DEVICE when it makes a context there, and
    the others keep working."""
    phys = physical(vgpud)
    slc = cgroups.make("later")
    e = vgpud.client_env(VGPU_TEST_UUIDS=",".join(phys))
    p = spawn([str(built / "devices"), "ctx=0,1", f"alloc={MiB}", "wait=1"], e, slc, cgroups,
              stdout=subprocess.PIPE, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while find_process(vgpud.ctl("tree"), p.pid) is None:  # registered: its view is made
            assert time.monotonic() < deadline, "the program did not register"
            time.sleep(0.02)
        vgpud.ctl("set", slc, "gpu.devices=1")
        out, err = p.communicate("go\n", timeout=60)
    finally:
        p.kill()
        p.wait()
    r = json.loads(out.splitlines()[-1])
    assert r["count"] == 3
    first, second = r["ctx"]
    assert first["retain"] == CUDA_ERROR_INVALID_DEVICE, err
    assert (second["retain"], second["alloc"]) == (0, 0)


def _until(pred: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_a_process_on_two_devices_is_charged_on_each(vgpud: VgpudProc, cgroups: Cgroups,
                                                     built: Path) -> None:
    """One process with contexts on GPUs 0 and 2: its slice's memory and
    GPU time are booked on each device, equal to what each simulated device
    counted for it (show, top), and nothing on GPU 1."""
    phys = physical(vgpud)
    slc = cgroups.make("both")
    e = vgpud.client_env(VGPU_TEST_UUIDS=",".join(phys))
    p = spawn([str(built / "devices"), "ctx=0,2", f"alloc={32 * MiB}", "kernels=300",
               "kernel_ns=1000000", "hold=1"], e, slc, cgroups, stdout=subprocess.PIPE,
              stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = JsonLines(p)
    try:
        r = lines.next(60)
        assert [x["launch"] for x in r["run"]] == [0, 0]
        (busy0, mem0), (busy1, mem1), (busy2, mem2) = r["sim"]
        assert min(busy0, busy2) >= 0.3e9
        assert busy1 == mem1 == 0
        want_mem = {phys[0]: mem0, phys[2]: mem2}

        def booked() -> bool:
            s = vgpud.ctl("show", slc)
            return bool(s["gpu.memory.current"]["devices"] == want_mem and
                        all(s["gpu.cores.stat.devices"].get(u, {}).get("usage_usec", 0) * 1000
                            >= 0.95 * b for u, b in ((phys[0], busy0), (phys[2], busy2))))

        _until(booked)  # the context's and module's memory is reconciled within 200 ms
        show = vgpud.ctl("show", slc)
        top = vgpud.ctl("top")["slices"][slc]
        lines.say()
        assert p.wait(30) == 0
    finally:
        p.kill()
        p.wait()
    per = show["gpu.cores.stat.devices"]
    assert set(per) == {phys[0], phys[2]}
    for uuid, busy in ((phys[0], busy0), (phys[2], busy2)):
        assert per[uuid]["usage_usec"] * 1000 == pytest.approx(busy, rel=0.05), (per, r["sim"])
    total = sum(x["usage_usec"] for x in per.values())
    assert 0 <= show["gpu.cores.stat"]["usage_usec"] - total <= len(per)  # each rounded down
    assert top["memory_devices"] == want_mem
    assert show["gpu.memory.current"]["total"] == mem0 + mem2


def test_a_cap_holds_on_each_device(vgpud: VgpudProc, cgroups: Cgroups, built: Path) -> None:
    """gpu.cores.max=30 is 30 % of each GPU the slice uses: a process busy on
    two GPUs gets 0.30 of each (not 0.15 of each, as a cap shared between
    them would give), by the simulated devices' own busy time."""
    slc = cgroups.make("capped")
    vgpud.ctl("set", slc, "gpu.cores.max=30")
    r, err = devices(vgpud, cgroups, built, slc, "ctx=0,1", "kernels=600",
                     "kernel_ns=1000000")
    assert [x["launch"] for x in r["run"]] == [0, 0], err
    for dev, run in enumerate(r["run"]):
        share = r["sim"][dev][0] / 1e9 / run["seconds"]
        assert share == pytest.approx(0.30, abs=0.05), r


def test_limits_on_one_device_only(vgpud: VgpudProc, cgroups: Cgroups, built: Path) -> None:
    """A slice allowed every GPU, capped on GPU 1 only (values per device:
    ``1=...``): its process is held to 64 MiB and 30 % of the GPU there,
    while on GPU 0 it allocates 96 MiB, sees the whole device and runs
    unthrottled. vgpuctl show has the effective limits per GPU."""
    phys = physical(vgpud)
    slc = cgroups.make("lopsided")
    vgpud.ctl("set", slc, "gpu.memory.max=1=64M", "gpu.cores.max=1=30")
    r, err = devices(vgpud, cgroups, built, slc, "ctx=0,1", f"alloc={96 * MiB}",
                     "kernels=600", "kernel_ns=1000000")
    free0, capped = r["ctx"]
    assert (free0["retain"], free0["alloc"], free0["total"]) == (0, 0, 4 << 30), err
    assert capped["retain"] == 0, err
    assert capped["alloc"] == 2  # CUDA_ERROR_OUT_OF_MEMORY: over 64 MiB on GPU 1
    assert capped["total"] == 64 * MiB  # cuMemGetInfo: the slice's limit there
    share = [r["sim"][d][0] / 1e9 / r["run"][d]["seconds"] for d in (0, 1)]
    assert share[0] >= 0.9, r  # GPU 0: nothing asks for control there
    assert share[1] == pytest.approx(0.30, abs=0.05), r
    eff = vgpud.ctl("show", slc)["effective.devices"]
    assert eff[phys[1]]["gpu.memory.max"] == str(64 * MiB)
    assert eff[phys[1]]["gpu.cores.max"] == "30"
    assert eff[phys[0]]["gpu.memory.max"] == eff[phys[2]]["gpu.memory.max"] == "max"
