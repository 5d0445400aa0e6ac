"""Compute isolation end to end on the simulated GPU, measured by the
simulated device's own busy time per process (never by anything vgpu
reports about itself).

The tenants are shaped like real ones rather than one steady loop: queues of
different depths (the hardware time-slices by who has work queued, so a
shallow queue gets less than its share of the time it looks busy), CPU gaps
between a training step's kernels, a light request-driven neighbour, and a
latency-sensitive one beside a best-effort trainer. Each of these broke the
first design (1/n attribution of measured busy intervals with launch
budgets); with device ownership their shares are exact by construction, so
every assertion here is made on one measurement, with no re-measuring.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from _e2e import Cgroups, VgpudProc, built_fixture, spawn, vgpud_fixture

pytestmark = pytest.mark.e2e
#: Shares hold to within this. 0.02 held on this project's 2-core machine
#: when nothing else ran, but not run after run with the ownership design's
#: hand-overs (each a wake-up of a few hundred µs on the simulated GPU,
#: which a busy CPU stretches): 0.3649 for a cap of 40, 0.1476 for 0.125,
#: 0.3205 for 0.30 in quiet full-suite runs. The failure modes these tests
#: were shaped on miss by far more (0.043 for 0.10, 0.366 for 0.30, 0.395
#: for 0.67), so 0.03 still tells the designs apart.
TOL = 0.03
SECONDS = 5.0
KERNEL_NS = 500_000
STEADY = ["kernel_ns=500000", "sync=64"]
#: a request every 5 ms served by two 0.5 ms kernels: 20 % of the GPU
REQUESTS = ["mode=requests", "period_ns=5000000", "kernels=2", "kernel_ns=500000"]


built = built_fixture("spin_client", "tenant", "graph_client", "capture_client")
vgpud = vgpud_fixture()


def run(vgpud: VgpudProc, cgroups: Cgroups, built: Path,
        tenants: Sequence[tuple[str | None, Sequence[str]]],
        seconds: float = SECONDS) -> list[dict[str, Any]]:
    """Run tenants (slice, args) together over the same window; a slice of
    None runs natively (no hook). Their result lines, in order."""
    start_at = time.time() + 1.5
    procs = []
    for slc, args in tenants:
        env = vgpud.client_env()
        if slc is None:
            env.pop("LD_PRELOAD")
        procs.append(spawn([str(built / "tenant"), *args, f"seconds={seconds}",
                            f"start_at={start_at:.3f}"], env, slc, cgroups,
                           stdout=subprocess.PIPE))
    out = []
    for p in procs:
        o, _ = p.communicate(timeout=120)
        assert p.returncode == 0, o
        out.append(json.loads(o.splitlines()[-1]))
    return out


def native(vgpud: VgpudProc, cgroups: Cgroups, built: Path,
           *tenants: Sequence[str]) -> list[dict[str, Any]]:
    """Each tenant alone and natively, one after the other."""
    return [run(vgpud, cgroups, built, [(None, t)])[0] for t in tenants]


def configure(vgpud: VgpudProc, cgroups: Cgroups, name: str, *knobs: str) -> str:
    rel = cgroups.make(name)
    if knobs:
        vgpud.ctl("set", rel, *knobs)
    return rel


def hard(vgpud: VgpudProc, cgroups: Cgroups, name: str, cap: int) -> str:
    return configure(vgpud, cgroups, name, f"gpu.cores.min={cap}", f"gpu.cores.max={cap}")


@pytest.mark.parametrize("cap", [30, 60])
def test_solo_cap(vgpud: VgpudProc, cgroups: Cgroups, built: Path, cap: int) -> None:
    s = configure(vgpud, cgroups, "solo", f"gpu.cores.max={cap}")
    (got,) = run(vgpud, cgroups, built, [(s, STEADY)])
    assert got["share"] == pytest.approx(cap / 100, abs=TOL)


def test_hard_pair_30_70(vgpud: VgpudProc, cgroups: Cgroups, built: Path) -> None:
    a, b = hard(vgpud, cgroups, "a", 30), hard(vgpud, cgroups, "b", 70)
    ra, rb = run(vgpud, cgroups, built, [(a, STEADY), (b, STEADY)])
    assert ra["share"] == pytest.approx(0.30, abs=TOL)
    assert rb["share"] == pytest.approx(0.70, abs=TOL)


def test_four_tenants_with_different_queue_depths(vgpud: VgpudProc, cgroups: Cgroups,
                                                  built: Path) -> None:
    """Hard caps 10/20/30/40 over tenants whose kernels take 0.1, 0.5, 2 and
    0.2 ms and whose queues hold 3.2, 32, 8 and 12.8 ms of them: time-slicing
    serves contexts by what they have queued, and 1/n attribution of their
    busy intervals gave shares of 0.04/0.20/0.33/0.36. Each tenant's
    throughput against its own, alone and native.

    What the arbiter guarantees is the split: each tenant's part of what the
    four did together is its cap's part of 100 (the old design: 0.04 for the
    10 % tenant). How much of the GPU the four use together also depends on
    how busy the machine's CPUs are (each hand-over is a wake-up): on a
    loaded 2-core machine they used 0.79 to 0.91 of it, so that is bounded
    apart, loosely."""
    shapes = [["kernel_ns=100000", "sync=32"], ["kernel_ns=500000", "sync=64"],
              ["kernel_ns=2000000", "sync=4"], ["kernel_ns=200000", "sync=64"]]
    caps = (10, 20, 30, 40)
    alone = native(vgpud, cgroups, built, *shapes)
    slices = [hard(vgpud, cgroups, f"t{c}", c) for c in caps]
    got = run(vgpud, cgroups, built, list(zip(slices, shapes, strict=True)))
    ratios = [g["rate"] / a["rate"] for g, a in zip(got, alone, strict=True)]
    total = sum(ratios)
    assert total >= 0.7, (ratios, got, alone)
    for cap, r in zip(caps, ratios, strict=True):
        assert r / total == pytest.approx(cap / 100, abs=TOL), (cap, ratios, got, alone)


def test_caps_below_100_beside_an_uncapped_neighbour(vgpud: VgpudProc, cgroups: Cgroups,
                                                     built: Path) -> None:
    caps = (10, 20, 30)
    slices = [configure(vgpud, cgroups, f"c{c}", f"gpu.cores.max={c}") for c in caps]
    free = configure(vgpud, cgroups, "free")
    got = run(vgpud, cgroups, built, [(s, STEADY) for s in [*slices, free]])
    for cap, r in zip(caps, got[:3], strict=True):
        assert r["share"] == pytest.approx(cap / 100, abs=TOL), (cap, got)
    # The uncapped one gets the rest, less what hand-overs cost the device.
    assert got[3]["share"] >= 0.40 - 0.05, got


def test_cpu_gaps_inside_a_window_are_the_owners(vgpud: VgpudProc, cgroups: Cgroups,
                                                 built: Path) -> None:
    """A training-step shape: two 0.3 ms kernels, then 0.6 ms on the CPU.
    Capped at 30 it does 0.30 of what it does alone, alone and beside an
    uncapped neighbour (its gaps are its own, within its windows, as they
    are natively; 1/n attribution of busy intervals gave it 0.36 beside the
    neighbour, and an H200 trainer 0.43)."""
    shape = ["kernel_ns=300000", "sync=2", "gap_ns=600000"]
    # The shape's rate alone depends on how fast its CPU side runs, which a
    # busy machine changes from one run to the next: the reference is taken
    # right before each capped run and right after it, and their mean used.
    s = configure(vgpud, cgroups, "train", "gpu.cores.max=30")
    free = configure(vgpud, cgroups, "free")

    def ratio(tenants: list[tuple[str | None, list[str]]]) -> tuple[float, Any]:
        (before,) = native(vgpud, cgroups, built, shape)
        got = run(vgpud, cgroups, built, tenants)
        (after,) = native(vgpud, cgroups, built, shape)
        return 2 * got[0]["rate"] / (before["rate"] + after["rate"]), got

    r, solo = ratio([(s, shape)])
    assert r == pytest.approx(0.30, abs=TOL), solo
    r, (got, other) = ratio([(s, shape), (free, STEADY)])
    assert r == pytest.approx(0.30, abs=TOL), got
    assert other["share"] >= 0.60, other


def test_two_processes_in_one_slice_share_its_cap(vgpud: VgpudProc, cgroups: Cgroups,
                                                  built: Path) -> None:
    s = configure(vgpud, cgroups, "pair", "gpu.cores.max=40")
    other = configure(vgpud, cgroups, "other", "gpu.cores.max=50")
    a, b, c = run(vgpud, cgroups, built, [(s, STEADY), (s, STEADY), (other, STEADY)])
    assert a["share"] + b["share"] == pytest.approx(0.40, abs=TOL), (a, b, c)
    assert c["share"] == pytest.approx(0.50, abs=TOL)


def test_soft_pair_and_soft_alone(vgpud: VgpudProc, cgroups: Cgroups, built: Path) -> None:
    n1, n2 = configure(vgpud, cgroups, "n1"), configure(vgpud, cgroups, "n2")
    total = sum(r["share"] for r in run(vgpud, cgroups, built, [(n1, STEADY), (n2, STEADY)]))
    a = configure(vgpud, cgroups, "a", "gpu.cores.min=30", "gpu.cores.max=100")
    b = configure(vgpud, cgroups, "b", "gpu.cores.min=70", "gpu.cores.max=100")
    ra, rb = run(vgpud, cgroups, built, [(a, STEADY), (b, STEADY)])
    assert (ra["share"] + rb["share"]) / total >= 0.95
    assert ra["share"] / (ra["share"] + rb["share"]) == pytest.approx(0.30, abs=TOL)
    (alone,) = run(vgpud, cgroups, built, [(a, STEADY)])
    assert alone["share"] >= 0.95


def test_light_neighbour_leaves_the_rest_to_a_soft_tenant(vgpud: VgpudProc, cgroups: Cgroups,
                                                          built: Path) -> None:
    """min 70 for a tenant that uses 20 % (eight 0.5 ms kernels every 20 ms):
    the other (min 30, max 100) gets at least 0.9 of what it leaves. (1/n
    attribution gave it 0.35 of 0.8.)"""
    n1, n2 = configure(vgpud, cgroups, "n1"), configure(vgpud, cgroups, "n2")
    capacity = sum(r["share"] for r in run(vgpud, cgroups, built, [(n1, STEADY),
                                                                   (n2, STEADY)]))
    light = configure(vgpud, cgroups, "light", "gpu.cores.min=70")
    heavy = configure(vgpud, cgroups, "heavy", "gpu.cores.min=30", "gpu.cores.max=100")
    requests = ["mode=requests", "period_ns=20000000", "kernels=8", "kernel_ns=500000"]
    rl, rh = run(vgpud, cgroups, built, [(light, requests), (heavy, STEADY)])
    assert rl["served"] >= 0.95 * SECONDS / 0.020  # the light one is never starved
    assert rh["share"] >= 0.9 * (capacity - rl["share"]), (rl, rh, capacity)


def test_best_effort_trainer_beside_a_latency_tenant(vgpud: VgpudProc, cgroups: Cgroups,
                                                     built: Path) -> None:
    """gpu.cores.idle=1 on a trainer: the request-driven tenant beside it
    waits for at most the trainer's last queued work (its in-flight bound,
    small for a best-effort owner), far less than under the hardware's own
    time-slicing, and the trainer still takes what the requests leave."""
    (solo,) = native(vgpud, cgroups, built, REQUESTS)
    nat_req, _nat_train = run(vgpud, cgroups, built, [(None, REQUESTS), (None, STEADY)])
    infer = configure(vgpud, cgroups, "infer")
    train = configure(vgpud, cgroups, "train", "gpu.cores.idle=1")
    req, tr = run(vgpud, cgroups, built, [(infer, REQUESTS), (train, STEADY)])
    assert req["served"] >= 0.95 * SECONDS / 0.005
    # A request waits behind at most the trainer's tail (two of its kernels):
    # well under time-slicing's wait for a deep queue's slices.
    # Its p50 may wait for the trainer's queued work, at most its in-flight
    # bound (2 ms, four of its kernels) and a wake-up: 2334 µs against a solo
    # 1319 µs in one quiet run; native time-slicing's p50 is bounded below.
    assert req["p50_us"] <= solo["p50_us"] + 3 * KERNEL_NS / 1000, (req, solo)
    assert req["p50_us"] < nat_req["p50_us"], (req, nat_req)
    assert tr["share"] >= 0.8 * (1.0 - req["share"]) * 0.9, (req, tr)


def test_nested_parent_max_children_weighted(vgpud: VgpudProc, cgroups: Cgroups,
                                             built: Path) -> None:
    configure(vgpud, cgroups, "parent", "gpu.cores.max=50")
    a = configure(vgpud, cgroups, "parent/a", "gpu.cores.weight=100")
    b = configure(vgpud, cgroups, "parent/b", "gpu.cores.weight=300")
    ra, rb = run(vgpud, cgroups, built, [(a, STEADY), (b, STEADY)])
    assert ra["share"] == pytest.approx(0.125, abs=TOL)
    assert rb["share"] == pytest.approx(0.375, abs=TOL)


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
    # share (half seconds, not the 100 ms samples: a capped slice may bank
    # a few windows of GPU time, which is a large part of 100 ms).
    after = [v for t, v in samples if t > t_set + 1.0]
    assert len(after) >= 10
    halves = [sum(after[i:i + 5]) / 5 for i in range(0, len(after) - 4, 5)]
    assert all(abs(v - 0.60) <= 0.07 for v in halves), (halves, after)
    assert sum(after) / len(after) == pytest.approx(0.60, abs=TOL)


def test_top_agrees_with_nvml_per_process_utilization(vgpud: VgpudProc, cgroups: Cgroups,
                                                      built: Path) -> None:
    """vgpu's charged GPU time and the driver's per-process utilization
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
                                                           built: Path) -> None:
    """Capturing a graph under the hook works (the hook neither gates nor
    measures the captured launches) and replays of the graph are held to the
    cap."""
    s = configure(vgpud, cgroups, "graphs", "gpu.cores.max=30")
    p = spawn([str(built / "graph_client"), str(KERNEL_NS), "10", "3"], vgpud.client_env(), s,
              cgroups, stdout=subprocess.PIPE)
    out, _ = p.communicate(timeout=60)
    r = json.loads(out.splitlines()[-1])
    assert (r["begin_rc"], r["launch_rc"], r["end_rc"], r["instantiate_rc"]) == (0, 0, 0, 0)
    assert r["replays"] > 0
    assert r["share"] == pytest.approx(0.30, abs=0.03)


@pytest.mark.parametrize("kind", ["nonblocking", "shared", "blocking"])
def test_global_mode_captures_beside_busy_threads_are_never_invalidated(
        vgpud: VgpudProc, cgroups: Cgroups, built: Path, kind: str) -> None:
    """torch.cuda.graph captures in global mode, where CUDA forbids every other
    thread not in relaxed mode the calls the hook's accountant makes (event
    queries, its anchor's wait), and any thread work on the legacy stream
    while a blocking stream captures: either invalidates the capture (seen on
    the H200 as PyTorch's assert that the capture is active, right after
    beginning it). The simulated driver enforces both rules. Two threads keep
    the capped slice busy, so batches are open and being timed, while the
    main thread captures 40 times for 20 ms each, and once for longer than
    the old hook paused measurement for a capture (5 s), each time with a
    batch of the hook's open on the stream it captures: the capturing
    thread's, or (shared) another thread's, which the hook must not end with
    a record into the capture; or (blocking, where the legacy stream may not
    be touched during the capture) another thread's on the legacy stream."""
    s = configure(vgpud, cgroups, "capture", "gpu.cores.max=50")
    p = spawn([str(built / "capture_client"), str(KERNEL_NS), "40", "20", "5500", "2", kind],
              vgpud.client_env(), s, cgroups, stdout=subprocess.PIPE)
    out, _ = p.communicate(timeout=90)
    assert p.returncode == 0, out
    r = json.loads(out.splitlines()[-1])
    assert r["ok"] == r["captures"] == 41, r
    assert r["launch_rc"] == 0, r
    assert r["launched"] > 0, r
