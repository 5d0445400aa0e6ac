"""End to end on the simulated GPU: a real vgpud, real cgroups, real CUDA
programs (C linking libcuda, and Python through ctypes + cuGetProcAddress as
the CUDA runtime does) running under libvgpu-hook.so."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from _e2e import (
    ROOT,
    Cgroups,
    VgpudProc,
    built_fixture,
    find_process,
    sim_stats,
    spawn,
    vgpud_fixture,
)

pytestmark = pytest.mark.e2e
MiB = 1 << 20


built = built_fixture("client_basic")
vgpud = vgpud_fixture()


def _wait_for(pred: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_two_processes_two_slices_exact_counts(vgpud: VgpudProc, cgroups: Cgroups,
                                               built: Path) -> None:
    """The issue's acceptance test: each process appears under its own slice
    with its launch and allocation counts exact."""
    a = cgroups.make("tenant-a")
    b = cgroups.make("tenant-b")
    env = vgpud.client_env(CLIENT_HOLD_MS="4000")
    pa = spawn([str(built / "client_basic"), "37", "20000", str(MiB), str(3 * MiB),
                str(5 * MiB)], env, a, cgroups, stdout=subprocess.PIPE)
    pb = spawn([sys.executable, str(ROOT / "tests" / "programs" / "ctypes_client.py"), "23",
                "20000", str(2 * MiB), str(7 * MiB)], env, b, cgroups, stdout=subprocess.PIPE)

    def both() -> tuple[Any, Any] | None:
        tree = vgpud.ctl("tree")
        fa, fb = find_process(tree, pa.pid), find_process(tree, pb.pid)
        if fa and fb and fa[1].get("launches") == 37 and fb[1].get("launches") == 23:
            return fa, fb
        return None

    (na, proc_a), (nb, proc_b) = _wait_for(both)
    assert na["slice"] == a
    assert nb["slice"] == b
    assert proc_a["allocs"] == 3
    assert proc_b["allocs"] == 2
    # Memory: what each process reserved plus the context and module memory
    # the driver took on its own, reconciled from NVML: exactly what the
    # device itself says the process holds.
    def books_equal_device(pid: int) -> bool:
        found = find_process(vgpud.ctl("tree"), pid)
        return found is not None and found[1]["mem_bytes"] == sim_stats(vgpud.shm, pid)[1]

    for proc in (proc_a, proc_b):
        _wait_for(lambda p=proc: books_equal_device(p["pid"]))
    assert sim_stats(vgpud.shm, pa.pid)[1] > 9 * MiB
    show_a = vgpud.ctl("show", a)
    assert show_a["gpu.memory.current"]["total"] >= 9 * MiB
    out_a, _ = pa.communicate(timeout=30)
    out_b, _ = pb.communicate(timeout=30)
    ra, rb = json.loads(out_a.splitlines()[-1]), json.loads(out_b.splitlines()[-1])
    assert (ra["launched"], rb["launched"]) == (37, 23)
    # Everything given back when the processes are gone; their slices,
    # which only existed because they lived there, go with them.
    _wait_for(lambda: vgpud.ctl("show")["gpu.memory.current"]["total"] == 0)
    tree = vgpud.ctl("tree")
    assert find_process(tree, pa.pid) is None
    assert find_process(tree, pb.pid) is None
