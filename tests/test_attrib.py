"""Busy-time attribution: 1/k time-slicing, unions, watermarks, bounds."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from vgpu_cgroup._core._attrib import MAX_INTERVAL_NS, Attributor


def test_alone_is_charged_its_union() -> None:
    a = Attributor(0)
    a.add(1, 10, 50)
    a.add(1, 30, 80)  # overlaps: union 10..80
    a.add(1, 90, 100)
    assert a.advance(1000) == {1: 80}


def test_two_identical_clients_get_half() -> None:
    a = Attributor(0)
    for c in (1, 2):
        a.add(c, 0, 100)
    assert a.advance(100) == {1: 50, 2: 50}


def test_partial_overlap_split() -> None:
    a = Attributor(0)
    a.add(1, 0, 100)
    a.add(2, 50, 150)
    a.add(3, 50, 80)
    # 0-50: 1 alone; 50-80: 3 busy; 80-100: 2 busy; 100-150: 2 alone
    assert a.advance(200) == {1: 50 + 10 + 10, 2: 10 + 10 + 50, 3: 10}


def test_window_boundaries_and_carry_over() -> None:
    a = Attributor(0)
    a.add(1, 50, 150)
    a.add(2, 100, 120)
    assert a.advance(100) == {1: 50}
    # interval reported before the watermark moved past it: still merged
    a.add(2, 130, 150)
    assert a.advance(200) == {1: 10 + 10 + 10, 2: 10 + 10}
    assert a.pending() == 0


def test_late_interval_charged_alone() -> None:
    a = Attributor(0)
    a.add(1, 0, 100)
    assert a.advance(100) == {1: 100}
    a.add(2, 50, 150)  # 50..100 is already split: charged to 2 alone
    assert a.advance(200) == {2: 50 + 50}


def test_empty_negative_and_absurd() -> None:
    a = Attributor(0)
    a.add(1, 10, 10)
    a.add(1, 20, 5)
    assert a.advance(100) == {}
    a.add(1, 100, 100 + 10 * MAX_INTERVAL_NS)
    assert a.advance(100 + 10 * MAX_INTERVAL_NS) == {1: MAX_INTERVAL_NS}


def test_first_advance_without_watermark_and_forget() -> None:
    a = Attributor()
    a.add(1, 1_000, 2_000)
    a.add(2, 1_500, 3_000)
    a.forget(2)
    assert a.advance(5_000) == {1: 1_000}
    assert a.advance(4_000) == {}  # going backwards charges nothing


def test_memory_bounded_and_fast() -> None:
    """64 clients x 1000 intervals/s, advanced every 10 ms, for 2 s of time."""
    a = Attributor(0)
    ms = 1_000_000
    total: dict[int, int] = {}
    t0 = time.perf_counter()
    for tick in range(200):
        base = tick * 10 * ms
        for c in range(64):
            for k in range(10):
                s = base + k * ms + (c * 7919) % ms
                a.add(c, s, s + ms // 2)
        for c, v in a.advance(base + 10 * ms - 30 * ms).items():
            total[c] = total.get(c, 0) + v
        assert a.pending() <= 64 * 10 * 5
    elapsed = time.perf_counter() - t0
    assert sum(total.values()) <= 200 * 10 * ms
    assert elapsed < 5.0  # ~2 s of simulated load must take well under that


intervals = st.lists(
    st.tuples(st.integers(0, 4), st.integers(0, 1000), st.integers(0, 300)),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ivs=intervals, cuts=st.lists(st.integers(0, 1400), max_size=5))
def test_total_never_exceeds_wall_time(
    ivs: list[tuple[int, int, int]], cuts: list[int]
) -> None:
    a = Attributor(0)
    for c, s, length in ivs:
        a.add(c, s, s + length)
    prev = 0
    for w in [*sorted(cuts), 1400]:
        got = a.advance(w)
        assert sum(got.values()) <= max(0, w - prev)
        assert all(v > 0 for v in got.values())
        prev = max(prev, w)


@settings(max_examples=300, deadline=None)
@given(ivs=st.lists(st.tuples(st.integers(0, 1000), st.integers(1, 300)), max_size=30))
def test_single_client_exact_union(ivs: list[tuple[int, int]]) -> None:
    a = Attributor(0)
    covered: set[int] = set()
    for s, length in ivs:
        a.add(7, s, s + length)
        covered.update(range(s, s + length))
    got = a.advance(700)
    got2 = a.advance(2000)
    assert got.get(7, 0) == len([x for x in covered if x < 700])
    assert got.get(7, 0) + got2.get(7, 0) == len(covered)


@settings(max_examples=200, deadline=None)
@given(ivs=st.lists(st.tuples(st.integers(0, 1000), st.integers(1, 300)), max_size=20))
def test_identical_clients_split_evenly(ivs: list[tuple[int, int]]) -> None:
    a = Attributor(0)
    for s, length in ivs:
        a.add(1, s, s + length)
        a.add(2, s, s + length)
    got = a.advance(2000)
    assert abs(got.get(1, 0) - got.get(2, 0)) <= 1


def test_last_busy_is_the_unsplit_union() -> None:
    a = Attributor(0)
    a.add(1, 0, 100)
    a.add(1, 50, 100)
    a.add(2, 0, 100)
    assert a.advance(100) == {1: 50, 2: 50}
    assert a.last_busy() == {1: 100, 2: 100}
    assert a.advance(200) == {}
    assert a.last_busy() == {}
