"""Compute isolation end to end on the simulated GPU: GPU-time shares held
by launch tokens, measured by the simulated device's own busy time per
process (not by anything vgpu reports about itself)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from _e2e import Cgroups, VgpudProc, build, build_c, spawn

pytestmark = pytest.mark.e2e
TOL = 0.02
KERNEL_NS = 500_000
SECONDS = 6.0


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    build()
    out = tmp_path_factory.mktemp("bin")
    build_c("spin_client", out)
    return out



@pytest.fixture
def vgpud(tmp_path: Path, built: Path) -> Iterator[VgpudProc]:
    d = VgpudProc(tmp_path)
    d.start()
    try:
        yield d
    finally:
        d.cleanup()


def run_together(vgpud: VgpudProc, cgroups: Cgroups, built: Path,
                 slices: Sequence[str]) -> list[float]:
    """One spin_client per slice, measuring the same window; their shares."""
    start_at = time.time() + 1.5
    procs = [
        spawn([str(built / "spin_client"), str(KERNEL_NS), str(SECONDS), f"{start_at:.3f}"],
              vgpud.client_env(), s, cgroups, stdout=subprocess.PIPE)
        for s in slices
    ]
    shares = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0, out
        shares.append(json.loads(out.splitlines()[-1])["share"])
    return shares


def shares_near(vgpud: VgpudProc, cgroups: Cgroups, built: Path, slices: Sequence[str],
                targets: Sequence[float]) -> list[float]:
    """run_together, measured a second time if the first window missed a
    target by more than TOL. The simulated device's time comes from sleeps on
    a shared 2-core machine, so one window in a few is disturbed by whatever
    else runs (seen: one tenant 0.03 short once in about four full runs);
    the assertion is on the second measurement, never on a mix."""
    got = run_together(vgpud, cgroups, built, slices)
    if all(abs(g - t) <= TOL for g, t in zip(got, targets, strict=True)):
        return got
    return run_together(vgpud, cgroups, built, slices)


def configure(vgpud: VgpudProc, cgroups: Cgroups, name: str, *knobs: str) -> str:
    rel = cgroups.make(name)
    if knobs:
        vgpud.ctl("set", rel, *knobs)
    return rel


@pytest.mark.parametrize("cap", [30, 60])
def test_solo_cap(vgpud: VgpudProc, cgroups: Cgroups, built: Path, cap: int) -> None:
    s = configure(vgpud, cgroups, "solo", f"gpu.cores.max={cap}")
    (share,) = shares_near(vgpud, cgroups, built, [s], [cap / 100])
    assert share == pytest.approx(cap / 100, abs=TOL)


def test_hard_pair_30_70(vgpud: VgpudProc, cgroups: Cgroups, built: Path) -> None:
    a = configure(vgpud, cgroups, "a", "gpu.cores.min=30", "gpu.cores.max=30")
    b = configure(vgpud, cgroups, "b", "gpu.cores.min=70", "gpu.cores.max=70")
    sa, sb = shares_near(vgpud, cgroups, built, [a, b], [0.30, 0.70])
    assert sa == pytest.approx(0.30, abs=TOL)
    assert sb == pytest.approx(0.70, abs=TOL)


def test_soft_pair_and_soft_alone(vgpud: VgpudProc, cgroups: Cgroups, built: Path) -> None:
    n1 = configure(vgpud, cgroups, "n1")
    n2 = configure(vgpud, cgroups, "n2")
    native = sum(run_together(vgpud, cgroups, built, [n1, n2]))
    a = configure(vgpud, cgroups, "a", "gpu.cores.min=30", "gpu.cores.max=100")
    b = configure(vgpud, cgroups, "b", "gpu.cores.min=70", "gpu.cores.max=100")
    sa, sb = run_together(vgpud, cgroups, built, [a, b])
    assert (sa + sb) / native >= 0.95
    assert sa / (sa + sb) == pytest.approx(0.30, abs=TOL)
    (alone,) = run_together(vgpud, cgroups, built, [a])
    assert alone >= 0.95


def test_nested_parent_max_children_weighted(vgpud: VgpudProc, cgroups: Cgroups,
                                             built: Path) -> None:
    configure(vgpud, cgroups, "parent", "gpu.cores.max=50")
    a = configure(vgpud, cgroups, "parent/a", "gpu.cores.weight=100")
    b = configure(vgpud, cgroups, "parent/b", "gpu.cores.weight=300")
    sa, sb = shares_near(vgpud, cgroups, built, [a, b], [0.125, 0.375])
    assert sa == pytest.approx(0.125, abs=TOL)
    assert sb == pytest.approx(0.375, abs=TOL)


def test_live_change_reaches_new_share_within_a_second(vgpud: VgpudProc, cgroups: Cgroups,
                                                       built: Path) -> None:
    s = configure(vgpud, cgroups, "live", "gpu.cores.max=30")
    p = spawn([str(built / "spin_client"), str(KERNEL_NS), "-1"], vgpud.client_env(), s,
              cgroups, stdout=subprocess.PIPE, stdin=subprocess.PIPE)
    assert p.stdout is not None
    assert p.stdin is not None
    samples: list[tuple[float, float]] = []
    try:
        t_end = time.time() + 3
        while time.time() < t_end:
            r = json.loads(p.stdout.readline())
            samples.append((r["t"], r["share"]))
        t_set = time.time()
        vgpud.ctl("set", s, "gpu.cores.max=60")
        t_end = time.time() + 3
        while time.time() < t_end:
            r = json.loads(p.stdout.readline())
            samples.append((r["t"], r["share"]))
    finally:
        p.stdin.close()
        p.wait(10)
    before = [v for t, v in samples if t_set - 2 < t < t_set]
    assert sum(before) / len(before) == pytest.approx(0.30, abs=TOL)
    # Reached: from 1 s after the set on, every half second holds the new
    # share. (Half seconds, not the 100 ms samples: a budget may bank up to
    # five ticks of GPU time, 30 ms at 60 %, which is 0.3 of a 100 ms window
    # but 0.06 of a half second.)
    after = [v for t, v in samples if t > t_set + 1.0]
    assert len(after) >= 10
    halves = [sum(after[i:i + 5]) / 5 for i in range(0, len(after) - 4, 5)]
    assert all(abs(v - 0.60) <= 0.07 for v in halves), (halves, after)
    assert sum(after) / len(after) == pytest.approx(0.60, abs=TOL)


def test_top_agrees_with_nvml_per_process_utilization(vgpud: VgpudProc, cgroups: Cgroups,
                                                      built: Path) -> None:
    """vgpu's measured GPU time and the driver's per-process utilization
    (NVML) tell the same story for a capped tenant."""
    s = configure(vgpud, cgroups, "xcheck", "gpu.cores.max=40")
    p = spawn([str(built / "spin_client"), str(KERNEL_NS), "4"], vgpud.client_env(), s,
              cgroups, stdout=subprocess.PIPE)
    try:
        time.sleep(3.0)
        top = vgpud.ctl("top")["slices"][s]
    finally:
        p.communicate(timeout=30)
    (ours,) = top["gpu_percent"].values()
    (nvml,) = top["nvml_percent"].values()
    assert ours == pytest.approx(40, abs=5)
    assert nvml == pytest.approx(ours, abs=8)


def test_cuda_graphs_capture_cleanly_and_replays_are_capped(vgpud: VgpudProc, cgroups: Cgroups,
                                                           tmp_path: Path) -> None:
    """Capturing a graph under the hook works (the hook neither gates nor
    measures the captured launches) and replays of the graph are held to the
    cap. The simulated driver does not enforce CUDA's rule that other threads
    stay quiet during a global-mode capture; the H200 graph run checks that."""
    exe = build_c("graph_client", tmp_path)
    s = configure(vgpud, cgroups, "graphs", "gpu.cores.max=30")
    p = spawn([str(exe), str(KERNEL_NS), "10", "3"], vgpud.client_env(), s, cgroups,
              stdout=subprocess.PIPE)
    out, _ = p.communicate(timeout=60)
    r = json.loads(out.splitlines()[-1])
    assert (r["begin_rc"], r["launch_rc"], r["end_rc"], r["instantiate_rc"]) == (0, 0, 0, 0)
    assert r["replays"] > 0
    assert r["share"] == pytest.approx(0.30, abs=0.03)
