"""Share algorithm: water-filling properties and a fluid simulation of the GPU.

The simulation is a small model, not a mock of the daemon: each tick, every
client may run while its budget is positive (it runs at most its budget and
its appetite), the GPU's capacity of one tick is time-sliced equally among
clients that can run, and what each got is charged back to the scheduler.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vgpu_cgroup._share import Budget, ClientDemand, ShareScheduler, _Unit, water_fill
from vgpu_cgroup._tree import SliceTree

DEV = "GPU-0"
T = 10_000_000


class FluidGPU:
    """One GPU shared by clients with an appetite (fraction of a GPU)."""

    def __init__(self, tree: SliceTree, sched: ShareScheduler) -> None:
        self.tree = tree
        self.sched = sched
        self.appetite: dict[int, float] = {}
        self.budgets: dict[tuple[int, str], Budget] = sched.tick([])
        self.used: dict[int, list[float]] = {}

    def add(self, client: int, path: str, appetite: float) -> None:
        self.tree.attach(client, path, 1000 + client, f"c{client}")
        self.tree.attach_device(client, DEV)
        self.appetite[client] = appetite
        self.budgets = self.sched.tick([])

    def step(self) -> dict[int, float]:
        caps: dict[int, float] = {}
        throttled: dict[int, bool] = {}
        for c, a in self.appetite.items():
            b = self.budgets[(c, DEV)]
            allowed = float("inf") if b.unlimited else max(0.0, float(b.tokens_ns))
            want = a * T
            caps[c] = min(want, allowed)
            throttled[c] = allowed < want
        # equal time-slicing of the GPU among runnable clients, water-filled
        got = {c: 0.0 for c in caps}
        runnable = [c for c in caps if caps[c] > 0]
        rest = float(T)
        while runnable and rest > 1e-6:
            share = rest / len(runnable)
            done = [c for c in runnable if caps[c] - got[c] <= share]
            if not done:
                for c in runnable:
                    got[c] += share
                rest = 0.0
                break
            for c in done:
                rest -= caps[c] - got[c]
                got[c] = caps[c]
            runnable = [c for c in runnable if c not in done]
        demands = [
            ClientDemand(c, DEV, round(got[c]), throttled[c])
            for c, a in self.appetite.items()
            if a > 0
        ]
        self.budgets = self.sched.tick(demands)
        for c, g in got.items():
            self.used.setdefault(c, []).append(g / T)
        return {c: g / T for c, g in got.items()}

    def run(self, ticks: int) -> None:
        for _ in range(ticks):
            self.step()

    def mean(self, client: int, last: int = 500) -> float:
        xs = self.used[client][-last:]
        return sum(xs) / len(xs)


def make(knobs: Mapping[str, Mapping[str, object]]) -> tuple[SliceTree, FluidGPU]:
    tree = SliceTree()
    for path, ks in knobs.items():
        tree.set_knobs(path, ks, "test")
    sched = ShareScheduler(tree, tick_ns=T)
    return tree, FluidGPU(tree, sched)


@pytest.mark.parametrize("cap", [30, 60])
def test_solo_cap(cap: int) -> None:
    _, gpu = make({"a": {"gpu.cores.max": cap}})
    gpu.add(1, "a", 1.0)
    gpu.run(1000)
    assert gpu.mean(1) == pytest.approx(cap / 100, abs=0.02)


def test_uncapped_solo_is_unlimited_and_full() -> None:
    _, gpu = make({})
    gpu.add(1, "a", 1.0)
    gpu.run(200)
    assert gpu.budgets[(1, DEV)].unlimited
    assert gpu.mean(1, 100) == pytest.approx(1.0, abs=0.01)


def test_two_uncapped_share_equally_unlimited() -> None:
    _, gpu = make({})
    gpu.add(1, "a", 1.0)
    gpu.add(2, "b", 1.0)
    gpu.run(200)
    assert gpu.budgets[(1, DEV)].unlimited
    assert gpu.budgets[(2, DEV)].unlimited
    assert gpu.mean(1, 100) == pytest.approx(0.5, abs=0.02)


def test_hard_pair_30_70() -> None:
    _, gpu = make(
        {
            "a": {"gpu.cores.min": 30, "gpu.cores.max": 30},
            "b": {"gpu.cores.min": 70, "gpu.cores.max": 70},
        }
    )
    gpu.add(1, "a", 1.0)
    gpu.add(2, "b", 1.0)
    gpu.run(1000)
    assert gpu.mean(1) == pytest.approx(0.30, abs=0.02)
    assert gpu.mean(2) == pytest.approx(0.70, abs=0.02)
    assert not gpu.budgets[(1, DEV)].unlimited


def test_capped_pair_30_70_max_only() -> None:
    _, gpu = make({"a": {"gpu.cores.max": 30}, "b": {"gpu.cores.max": 70}})
    gpu.add(1, "a", 1.0)
    gpu.add(2, "b", 1.0)
    gpu.run(1000)
    assert gpu.mean(1) == pytest.approx(0.30, abs=0.02)
    assert gpu.mean(2) == pytest.approx(0.70, abs=0.02)


def test_soft_pair_split_and_total() -> None:
    _, gpu = make(
        {
            "a": {"gpu.cores.min": 30, "gpu.cores.max": 100},
            "b": {"gpu.cores.min": 70, "gpu.cores.max": 100},
        }
    )
    gpu.add(1, "a", 1.0)
    gpu.add(2, "b", 1.0)
    gpu.run(1000)
    a, b = gpu.mean(1), gpu.mean(2)
    assert a + b >= 0.95
    assert a / (a + b) == pytest.approx(0.30, abs=0.02)
    assert b / (a + b) == pytest.approx(0.70, abs=0.02)


def test_soft_alone_gets_whole_gpu() -> None:
    _, gpu = make({"a": {"gpu.cores.min": 30, "gpu.cores.max": 100}})
    gpu.add(1, "a", 1.0)
    gpu.run(1000)
    assert gpu.mean(1) >= 0.95


def test_nested_parent_cap_and_weights() -> None:
    _, gpu = make(
        {
            "p": {"gpu.cores.max": 50},
            "p/x": {"gpu.cores.weight": 1},
            "p/y": {"gpu.cores.weight": 3},
        }
    )
    gpu.add(1, "p/x", 1.0)
    gpu.add(2, "p/y", 1.0)
    gpu.run(1000)
    assert gpu.mean(1) == pytest.approx(0.125, abs=0.02)
    assert gpu.mean(2) == pytest.approx(0.375, abs=0.02)


def test_processes_directly_in_slice_share_equally() -> None:
    _, gpu = make({"p": {"gpu.cores.max": 60}})
    gpu.add(1, "p", 1.0)
    gpu.add(2, "p", 1.0)
    gpu.run(1000)
    assert gpu.mean(1) == pytest.approx(0.30, abs=0.02)
    assert gpu.mean(2) == pytest.approx(0.30, abs=0.02)


def test_live_change_reaches_new_share_within_one_second() -> None:
    tree, gpu = make({"a": {"gpu.cores.max": 30}})
    gpu.add(1, "a", 1.0)
    gpu.run(500)
    assert gpu.mean(1, 200) == pytest.approx(0.30, abs=0.02)
    tree.set_knobs("a", {"gpu.cores.max": "60"}, "vgpuctl")
    gpu.run(100)  # 1 s of simulated time
    assert gpu.mean(1, 20) == pytest.approx(0.60, abs=0.02)
    gpu.run(400)
    assert gpu.mean(1, 400) == pytest.approx(0.60, abs=0.02)


def test_idle_sibling_share_flows_only_up_to_max() -> None:
    _, gpu = make(
        {
            "a": {"gpu.cores.min": 20, "gpu.cores.max": 40},
            "b": {"gpu.cores.min": 60, "gpu.cores.max": 100},
        }
    )
    gpu.add(1, "a", 1.0)
    gpu.add(2, "b", 0.0)  # attached, idle
    gpu.run(1000)
    assert gpu.mean(1) == pytest.approx(0.40, abs=0.02)
    # when b wakes up: mins 20/60, the remaining 20 split by equal weights
    gpu.appetite[2] = 1.0
    gpu.run(500)
    assert gpu.mean(1, 300) == pytest.approx(0.30, abs=0.02)
    assert gpu.mean(2, 300) == pytest.approx(0.70, abs=0.02)


def test_light_client_is_not_throttled_and_neighbour_gets_rest() -> None:
    _, gpu = make({"a": {"gpu.cores.min": 50}, "b": {"gpu.cores.min": 50}})
    gpu.add(1, "a", 0.1)
    gpu.add(2, "b", 1.0)
    gpu.run(1000)
    assert gpu.mean(1) == pytest.approx(0.10, abs=0.02)
    assert gpu.mean(2) >= 0.85


def test_budget_bounds_and_detach() -> None:
    tree, gpu = make({"a": {"gpu.cores.max": 30}})
    gpu.add(1, "a", 1.0)
    sched = gpu.sched
    # a client that overshoots a lot is clamped at the debt cap: what it
    # repays in debt_ticks at its rate
    b = sched.tick([ClientDemand(1, DEV, 10**12, True)])
    assert b[(1, DEV)].tokens_ns == -sched.debt_ticks * T * 0.3
    assert b[(1, DEV)].rate_ppm == 300_000
    # an idle client pays its debt back at its ceiling rate (it counts as
    # held back while in debt), then banks no more than its burst
    for _ in range(sched.debt_ticks + 5):
        b = sched.tick([ClientDemand(1, DEV, 0, False)])
    assert 0 < b[(1, DEV)].tokens_ns <= sched.burst_ticks * T * 0.3
    # a light one banks at most its burst at its ceiling: whatever its rate
    # this tick, credit up to the burst is never thrown away
    for _ in range(20):
        b = sched.tick([ClientDemand(1, DEV, 1, False)])
    assert 0.3 * T < b[(1, DEV)].tokens_ns <= sched.burst_ticks * T * 0.3
    # a busy one at most its burst
    for _ in range(20):
        b = sched.tick([ClientDemand(1, DEV, T // 4, False)])
    assert 0.3 * T < b[(1, DEV)].tokens_ns <= sched.burst_ticks * T * 0.3
    tree.detach(1)
    assert sched.tick([ClientDemand(1, DEV, 5, True)]) == {}


def test_demands_for_unknown_pairs_are_ignored() -> None:
    _tree, gpu = make({})
    gpu.add(1, "a", 1.0)
    out = gpu.sched.tick([ClientDemand(99, DEV, 5, True), ClientDemand(1, "GPU-x", 5, True)])
    assert set(out) == {(1, DEV)}


units = st.lists(
    st.tuples(
        st.floats(0, 1),  # lo
        st.floats(0, 1),  # hi
        st.integers(1, 10000),  # weight
        st.one_of(st.floats(0, 1), st.just(float("inf"))),  # demand
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(total=st.floats(0, 1), spec=units)
def test_water_fill_properties(total: float, spec: list[tuple[float, float, int, float]]) -> None:
    us = [_Unit(None, i, lo, hi, w, min(d, hi)) for i, (lo, hi, w, d) in enumerate(spec)]
    water_fill(total, us)
    allocs = [u.alloc for u in us]
    assert sum(allocs) <= total + 1e-9
    for u in us:
        assert -1e-12 <= u.alloc <= u.want + 1e-9
    # work-conserving: if anyone is left wanting, the total is used up
    if any(u.alloc < u.want - 1e-6 for u in us):
        assert sum(allocs) == pytest.approx(total, abs=1e-6)
    # mins are honoured when they fit
    if sum(min(u.lo, u.want) for u in us) <= total:
        for u in us:
            assert u.alloc >= min(u.lo, u.want) - 1e-9


@settings(max_examples=60, deadline=None)
@given(
    caps=st.lists(st.one_of(st.none(), st.integers(5, 100)), min_size=1, max_size=5),
    busy=st.lists(st.booleans(), min_size=5, max_size=5),
)
def test_rates_never_exceed_caps_or_one_gpu(caps: list[int | None], busy: list[bool]) -> None:
    tree = SliceTree()
    for i, cap in enumerate(caps):
        if cap is not None:
            tree.set_knobs(f"s{i}", {"gpu.cores.max": cap}, "t")
        tree.attach(i, f"s{i}", i, "x")
        tree.attach_device(i, DEV)
    sched = ShareScheduler(tree, tick_ns=T)
    demands = [ClientDemand(i, DEV, T // 2, busy[i]) for i in range(len(caps))]
    for _ in range(3):
        sched.tick(demands)
    rates = sched.rates()
    assert sum(rates.values()) <= 1.0 + 1e-9
    for (c, _), r in rates.items():
        cap = caps[c]
        assert r <= (1.0 if cap is None else cap / 100) + 1e-9


class LaggedGPU(FluidGPU):
    """The daemon's real conditions: an overshooting gate and late charges.

    A client with positive tokens runs for the whole tick (the hook's gate
    only checks the sign), and its charge and busy time reach the scheduler
    ``lag`` ticks later (the attribution watermark), while the throttled flag
    is current.
    """

    lag = 3

    def __init__(self, tree: SliceTree, sched: ShareScheduler) -> None:
        super().__init__(tree, sched)
        self.queue: list[tuple[dict[int, float], dict[int, float]]] = []

    def step(self) -> dict[int, float]:
        caps: dict[int, float] = {}
        throttled: dict[int, bool] = {}
        for c, a in self.appetite.items():
            b = self.budgets[(c, DEV)]
            can_run = b.unlimited or b.tokens_ns > 0
            caps[c] = a * T if can_run else 0.0
            throttled[c] = not can_run and a > 0
        runnable = [c for c in caps if caps[c] > 0]
        got = {c: 0.0 for c in caps}
        rest = float(T)
        while runnable and rest > 1e-6:
            share = rest / len(runnable)
            done = [c for c in runnable if caps[c] - got[c] <= share]
            if not done:
                for c in runnable:
                    got[c] += share
                break
            for c in done:
                rest -= caps[c] - got[c]
                got[c] = caps[c]
            runnable = [c for c in runnable if c not in done]
        k = sum(1 for g in got.values() if g > 0)
        self.queue.append((dict(got), {c: min(float(T), g * k) for c, g in got.items()}))
        zero = {c: 0.0 for c in got}
        charged, busy = self.queue.pop(0) if len(self.queue) > self.lag else (zero, zero)
        demands = [
            ClientDemand(c, DEV, round(charged.get(c, 0)), throttled[c], round(busy.get(c, 0)))
            for c, a in self.appetite.items()
            if a > 0
        ]
        self.budgets = self.sched.tick(demands)
        for c, g in got.items():
            self.used.setdefault(c, []).append(g / T)
        return {c: g / T for c, g in got.items()}


HARD = {
    "a": {"gpu.cores.min": 30, "gpu.cores.max": 30},
    "b": {"gpu.cores.min": 70, "gpu.cores.max": 70},
}
SOFT = {
    "a": {"gpu.cores.min": 30, "gpu.cores.max": 100},
    "b": {"gpu.cores.min": 70, "gpu.cores.max": 100},
}
NESTED = {
    "p": {"gpu.cores.max": 50},
    "p/x": {"gpu.cores.weight": 1},
    "p/y": {"gpu.cores.weight": 3},
}


@pytest.mark.parametrize(
    ("knobs", "where", "expected"),
    [
        ({"a": {"gpu.cores.max": 30}}, ["a"], [0.30]),
        ({"a": {"gpu.cores.max": 60}}, ["a"], [0.60]),
        (HARD, ["a", "b"], [0.30, 0.70]),
        (SOFT, ["a", "b"], [0.30, 0.70]),
        ({"a": {"gpu.cores.min": 30, "gpu.cores.max": 100}}, ["a"], [1.0]),
        (NESTED, ["p/x", "p/y"], [0.125, 0.375]),
    ],
)
def test_shares_with_lagged_charges(
    knobs: Mapping[str, Mapping[str, object]], where: list[str], expected: list[float]
) -> None:
    tree = SliceTree()
    for path, ks in knobs.items():
        tree.set_knobs(path, ks, "test")
    gpu = LaggedGPU(tree, ShareScheduler(tree, tick_ns=T))
    for i, path in enumerate(where):
        gpu.add(i + 1, path, 1.0)
    gpu.run(2000)
    for i, want in enumerate(expected):
        assert gpu.mean(i + 1, 1000) == pytest.approx(want, abs=0.02)


def test_idle_node_settles_and_a_change_is_seen_at_once() -> None:
    """Once every pair is idle and settled a tick returns the same budgets
    without recomputing them; a knob change, a new client or a charge ends
    that at the very next tick."""
    tree = SliceTree()
    sched = ShareScheduler(tree, T)
    tree.set_knobs("a.slice", {"gpu.cores.max": "30"}, "test")
    tree.attach(1, "a.slice", 1001, "c1")
    tree.attach_device(1, DEV)
    tree.attach(2, "b.slice", 1002, "c2")
    tree.attach_device(2, DEV)
    for _ in range(10):
        settled = sched.tick([])
    assert sched.tick([]) is settled
    assert settled[(1, DEV)].rate_ppm == 300_000
    assert settled[(1, DEV)].tokens_ns == int(0.3 * T)
    # a knob change
    tree.set_knobs("a.slice", {"gpu.cores.max": "60"}, "test")
    changed = sched.tick([])
    assert changed is not settled
    assert changed[(1, DEV)].rate_ppm == 600_000
    assert changed[(2, DEV)] == settled[(2, DEV)]  # untouched pairs keep their budget
    for _ in range(10):
        settled = sched.tick([])
    # a newcomer
    tree.attach(3, "b.slice", 1003, "c3")
    tree.attach_device(3, DEV)
    assert (3, DEV) in sched.tick([])
    for _ in range(10):
        settled = sched.tick([])
    # work: the pair becomes active and is charged
    busy = sched.tick([ClientDemand(1, DEV, T // 2, False, T // 2)])
    assert busy is not settled
    assert busy[(1, DEV)].tokens_ns == settled[(1, DEV)].tokens_ns + int(0.6 * T) - T // 2
    assert sched.rates()[(1, DEV)] == pytest.approx(0.6)
