"""Shares: water-filling properties and the rates the tree gives busy groups.

The rates are what each group with work is owed while that set of groups
stays as it is; the arbiter (tests/test_arbiter.py) turns them into device
ownership.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vgpu_cgroup._core._share import ShareModel, _Unit, water_fill
from vgpu_cgroup._core._tree import SliceTree


def model(**slices: Mapping[str, object]) -> tuple[SliceTree, ShareModel]:
    tree = SliceTree()
    for i, (path, knobs) in enumerate(slices.items()):
        path = path.replace("__", "/")
        if knobs:
            tree.set_knobs(path, {f"gpu.cores.{k}": v for k, v in knobs.items()}, "t")
        tree.attach(i, path, 100 + i, "x")
    return tree, ShareModel(tree)


def rates(m: ShareModel, *busy: str) -> dict[str, float]:
    return {k: round(v, 6) for k, v in m.rates(frozenset(busy)).items()}


def test_solo_cap_and_uncapped() -> None:
    _, m = model(a={"max": 30}, b={})
    assert rates(m, "a") == {"a": 0.3}
    assert rates(m, "b") == {"b": 1.0}


def test_hard_pair_and_four_caps() -> None:
    _, m = model(a={"min": 30, "max": 30}, b={"min": 70, "max": 70})
    assert rates(m, "a", "b") == {"a": 0.3, "b": 0.7}
    _, m = model(**{f"t{c}": {"min": c, "max": c} for c in (10, 20, 30, 40)})
    assert rates(m, "t10", "t20", "t30", "t40") == {"t10": 0.1, "t20": 0.2, "t30": 0.3,
                                                    "t40": 0.4}


def test_caps_below_100_leave_the_rest_to_an_uncapped_neighbour() -> None:
    _, m = model(a={"max": 10}, b={"max": 20}, c={"max": 30}, free={})
    assert rates(m, "a", "b", "c", "free") == {"a": 0.1, "b": 0.2, "c": 0.3, "free": 0.4}


def test_soft_pair_splits_by_min_and_alone_takes_its_max() -> None:
    _, m = model(a={"min": 30, "max": 100}, b={"min": 70, "max": 100})
    assert rates(m, "a", "b") == {"a": 0.3, "b": 0.7}
    assert rates(m, "a") == {"a": 1.0}


def test_nested_parent_max_and_weights() -> None:
    _, m = model(parent={"max": 50}, parent__a={"weight": 100}, parent__b={"weight": 300})
    assert rates(m, "parent/a", "parent/b") == {"parent/a": 0.125, "parent/b": 0.375}


def test_idle_child_runs_only_on_what_non_idle_siblings_leave() -> None:
    _, m = model(train={"idle": 1}, infer={})
    assert rates(m, "train", "infer") == {"train": 0.0, "infer": 1.0}
    assert rates(m, "train") == {"train": 1.0}
    _, m = model(train={"idle": 1}, infer={"max": 40})
    assert rates(m, "train", "infer") == {"train": 0.6, "infer": 0.4}


def test_idle_is_relative_to_siblings_not_cousins() -> None:
    # An idle slice under parent p yields to its sibling, not to q's children.
    _, m = model(p={"weight": 100}, p__train={"idle": 1}, q={"weight": 100}, q__infer={})
    r = rates(m, "p/train", "q/infer")
    assert r == {"p/train": 0.5, "q/infer": 0.5}


def test_limited_says_whether_any_knob_asks_for_control() -> None:
    _, m = model(a={}, b={})
    assert not m.limited(["a", "b"])
    _, m = model(a={"weight": 200}, b={})
    assert m.limited(["a", "b"])
    _, m = model(a={"idle": 1}, b={})
    assert m.limited(["a"])


def test_live_change_is_seen_by_the_cache() -> None:
    tree, m = model(live={"max": 30})
    assert rates(m, "live") == {"live": 0.3}
    tree.set_knobs("live", {"gpu.cores.max": 60}, "t")
    assert rates(m, "live") == {"live": 0.6}


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
    us = [_Unit(None, lo, hi, w, False, min(d, hi)) for lo, hi, w, d in spec]
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


@settings(max_examples=100, deadline=None)
@given(
    caps=st.lists(st.one_of(st.none(), st.integers(5, 100)), min_size=1, max_size=5),
    idle=st.lists(st.booleans(), min_size=5, max_size=5),
    busy=st.lists(st.booleans(), min_size=5, max_size=5),
)
def test_rates_never_exceed_caps_or_one_gpu_and_use_what_they_can(
        caps: list[int | None], idle: list[bool], busy: list[bool]) -> None:
    tree = SliceTree()
    for i, cap in enumerate(caps):
        knobs: dict[str, object] = {"gpu.cores.idle": int(idle[i])}
        if cap is not None:
            knobs["gpu.cores.max"] = cap
        tree.set_knobs(f"s{i}", knobs, "t")
        tree.attach(i, f"s{i}", i, "x")
    m = ShareModel(tree)
    groups = frozenset(f"s{i}" for i in range(len(caps)) if busy[i])
    r = m.rates(groups)
    assert set(r) == set(groups)
    assert sum(r.values()) <= 1.0 + 1e-9
    for g, v in r.items():
        cap = caps[int(g[1:])]
        assert v <= (1.0 if cap is None else cap / 100) + 1e-9
    # work-conserving: what the busy groups' caps allow is handed out
    room = min(1.0, sum(1.0 if (c := caps[int(g[1:])]) is None else c / 100 for g in groups))
    assert sum(r.values()) == pytest.approx(room, abs=1e-6)


def test_caps_per_device() -> None:
    """Each GPU's model reads the knobs' values on that GPU: a cap on GPU 1
    only leaves GPU 0 ungated (no knob there asks for control)."""
    from vgpu_cgroup._core._knobs import DeviceRef

    tree, _ = model(a={"max": "1=30"}, b={})
    on0, on1 = ShareModel(tree, DeviceRef("GPU-0", 0)), ShareModel(tree, DeviceRef("GPU-1", 1))
    assert rates(on1, "a", "b") == {"a": 0.3, "b": 0.7}
    assert rates(on0, "a", "b") == {"a": 0.5, "b": 0.5}
    assert on1.ceiling("a") == pytest.approx(0.3)
    assert on0.ceiling("a") == 1.0
    assert on1.limited({"a", "b"})
    assert not on0.limited({"a", "b"})
