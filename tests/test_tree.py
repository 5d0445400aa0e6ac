"""Slice tree: exact hierarchical admission, accounting, events, views."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vgpu_cgroup._core._config import ConfigError, SliceSetting
from vgpu_cgroup._core._knobs import KnobError, parse_knob
from vgpu_cgroup._core._tree import Denial, Grant, SliceTree

D = "GPU-0"
ALICE = "tenants.slice/tenants-alice.slice"


def setting(slice: str, knob: str, raw: object, src: str = "/etc/x.conf") -> SliceSetting:
    return SliceSetting(slice, knob, raw, parse_knob(knob, raw), src)


def test_attach_creates_implicit_path_and_detach_prunes() -> None:
    t = SliceTree()
    assert t.attach(1, "/tenants.slice/tenants-alice.slice/job1", 42, "python") == ALICE + "/job1"
    assert set(t.slices()) == {"", "tenants.slice", ALICE, ALICE + "/job1"}
    assert t.show(ALICE + "/job1")["processes"] == [{"pid": 42, "comm": "python", "client": 1}]
    t.detach(1)
    assert t.slices() == [""]
    t.detach(1)  # idempotent


def test_configured_slices_survive_without_processes() -> None:
    t = SliceTree()
    t.apply_settings([setting(ALICE, "gpu.memory.max", "1G")])
    t.attach(1, ALICE + "/job", 1, "x")
    t.detach(1)
    assert ALICE in t.slices()
    assert ALICE + "/job" not in t.slices()
    t.apply_settings([])
    assert t.slices() == [""]


def test_attach_literal_path_and_duplicate() -> None:
    t = SliceTree()
    assert t.attach(1, "my-job.slice", 1, "x") == "my-job.slice"  # no unit expansion
    with pytest.raises(ValueError, match="already attached"):
        t.attach(1, "", 1, "x")
    with pytest.raises(ValueError, match="slice"):
        t.attach(2, "a/../b", 1, "x")


def test_reserve_hierarchical_max_and_events() -> None:
    t = SliceTree()
    t.set_knobs("tenants.slice", {"gpu.memory.max": 1000}, "vgpuctl")
    t.set_knobs(ALICE, {"gpu.memory.max": 600, "gpu.memory.high": 400}, "vgpuctl")
    t.attach(1, ALICE, 1, "a")
    t.attach(2, "tenants.slice/tenants-bob.slice", 2, "b")
    assert t.reserve(1, D, 500) == Grant(500)
    assert t.show(ALICE)["gpu.memory.events"] == {"high": 1, "max": 0, "oom": 0}
    assert t.reserve(1, D, 200) == Denial(ALICE, 600, 500)
    assert t.reserve(2, D, 600) == Denial("tenants.slice", 1000, 500)
    assert t.reserve(2, D, 500) == Grant(500)
    assert t.show("tenants.slice")["gpu.memory.current"] == {"total": 1000, "devices": {D: 1000}}
    ev_a = t.show(ALICE)["gpu.memory.events"]
    assert ev_a == {"high": 1, "max": 1, "oom": 1}
    # hierarchical, as cgroup v2: the parent counts its own refusal of bob
    # and alice's; the local file only its own
    assert t.show("tenants.slice")["gpu.memory.events"] == {"high": 1, "max": 2, "oom": 2}
    assert t.show("tenants.slice")["gpu.memory.events.local"] == {"high": 0, "max": 1, "oom": 0}
    assert t.show("tenants-bob.slice")["gpu.memory.events"] == {"high": 0, "max": 0, "oom": 1}
    assert t.show("tenants-bob.slice")["gpu.memory.events.local"]["oom"] == 1
    # other devices are accounted separately
    assert t.reserve(1, "GPU-1", 600) == Grant(600)
    assert t.held(1) == {D: 500, "GPU-1": 600}
    assert t.mem_view(1, D) == (1000, 1000)  # the parent is full: least headroom
    assert t.mem_view(2, D) == (1000, 1000)
    t.release(2, D, 400)
    assert t.mem_view(1, D) == (600, 500)
    t.release(1, D, 100)
    assert t.reserve(2, D, 350) == Grant(350)
    assert t.mem_view(1, D) == (1000, 850)  # alice has 200 left, the parent 150
    with pytest.raises(ValueError, match="holds 400"):
        t.release(1, D, 401)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="positive integer"):
            t.reserve(1, D, bad)  # type: ignore[arg-type]
    t.detach(1)
    assert t.show("tenants.slice")["gpu.memory.current"]["total"] == 450
    assert t.show("tenants.slice")["gpu.memory.peak"]["devices"][D] == 1000


def test_adopt_books_over_the_limit_without_events() -> None:
    t = SliceTree()
    t.set_knobs("a", {"gpu.memory.max": 100}, "v")
    t.attach(1, "a/j", 1, "x")
    assert t.adopt(1, D, 80) is None
    assert t.adopt(1, D, 50) == Denial("a", 100, 80)
    assert t.held(1) == {D: 130}
    assert t.show("a")["gpu.memory.current"]["total"] == 130
    assert t.show("a")["gpu.memory.events"] == {"high": 0, "max": 0, "oom": 0}
    assert isinstance(t.reserve(1, D, 1), Denial)
    t.release(1, D, 40)
    assert t.reserve(1, D, 10) == Grant(10)
    t.detach(1)
    assert t.show("a")["gpu.memory.current"]["total"] == 0


def test_admit_is_reserve_and_mem_view_in_one_walk() -> None:
    """admit() books exactly what reserve() would and returns mem_view()'s
    answer after it; near a limit it books and counts nothing."""
    a, b = SliceTree(), SliceTree()
    for t in (a, b):
        t.set_knobs("p", {"gpu.memory.max": 1000, "gpu.memory.high": 300}, "v")
        t.set_knobs("p/leaf", {"gpu.memory.max": 700}, "v")
        t.attach(1, "p/leaf", 1, "x")
        t.attach(2, "p", 2, "y")
    for client, n in ((1, 200), (2, 250), (1, 100), (2, 100)):
        assert a.admit(client, D, n, guard=50) is not None
        assert b.reserve(client, D, n) == Grant(n)
        assert a.mem_view(client, D) == b.mem_view(client, D)
        for slc in ("p", "p/leaf"):
            assert a.show(slc) == b.show(slc)
    assert a.mem_view(1, D) == (1000, 650)  # the parent has less headroom now
    # 1000 - 650 - 320 = 30 would be left on the parent: under the guard.
    assert a.admit(1, D, 320, guard=50) is None
    assert a.show("p") == b.show("p")
    assert a.held(1) == b.held(1)
    assert a.admit(1, D, 300, guard=50) == (1000, 950)  # exactly the guard left
    t = SliceTree()
    t.attach(1, "a/b", 1, "x")
    assert t.admit(1, D, 10, guard=1 << 30) == (None, 10)  # no limit: never near one
    with pytest.raises(ValueError, match="positive integer"):
        t.admit(1, D, 0, guard=0)


def test_mem_view_no_limit() -> None:
    t = SliceTree()
    t.attach(1, "a/b", 1, "x")
    t.reserve(1, D, 10)
    assert t.mem_view(1, D) == (None, 10)


def test_set_knobs_validates_all_first() -> None:
    t = SliceTree()
    t.set_knobs("a", {"gpu.cores.max": 50}, "vgpuctl")
    with pytest.raises(KnobError):
        t.set_knobs("a", {"gpu.cores.max": 20, "gpu.memory.max": "lots"}, "vgpuctl")
    assert t.show("a")["knobs"]["gpu.cores.max"] == {"value": "50", "source": "vgpuctl"}
    with pytest.raises(KnobError):
        t.set_knobs("a", {"gpu.nope": 1}, "vgpuctl")


def test_apply_settings_later_wins_and_sources() -> None:
    t = SliceTree()
    t.apply_settings(
        [
            setting(ALICE, "gpu.cores.max", 30, "/etc/vgpu/slices/a.conf"),
            setting(ALICE, "gpu.cores.max", 60, "/run/vgpu/slices/a.conf"),
            setting("tenants.slice", "gpu.cores.max", 50, "/etc/vgpu/slices/t.conf"),
        ]
    )
    s = t.show("tenants-alice.slice")
    assert s["slice"] == ALICE
    assert s["knobs"]["gpu.cores.max"] == {"value": "60", "source": "/run/vgpu/slices/a.conf"}
    assert s["knobs"]["gpu.memory.max"] == {"value": "max", "source": "default"}
    assert s["effective"]["gpu.cores.max"] == "50"
    lim = t.effective_limits(ALICE)
    assert lim.cores_max == 50
    assert lim.mem_max is None
    assert lim.weight == 100


def test_effective_limits_and_devices() -> None:
    t = SliceTree()
    t.set_knobs("a", {"gpu.devices": "0,1,GPU-x", "gpu.memory.max": "2G"}, "v")
    t.set_knobs("a/b", {"gpu.devices": "1,GPU-x", "gpu.memory.max": "4G", "gpu.cores.min": 80}, "v")
    t.set_knobs("a/b/c", {"gpu.cores.max": 40}, "v")
    assert t.effective_limits("a/b").devices == ("1", "GPU-x")
    assert t.effective_limits("a/b").mem_max == 2 * 1024**3
    assert t.effective_limits("a/b/c").cores_max == 40
    t.attach(1, "a/b/c", 1, "x")
    assert t.device_allowed(1, "GPU-x", 7)
    assert t.device_allowed(1, "GPU-y", 1)
    assert not t.device_allowed(1, "GPU-y", 0)  # a allows 0 but b does not
    assert not t.device_allowed(1, "GPU-z", 3)
    node = [("GPU-w", 0), ("GPU-y", 1), ("GPU-x", 2), ("GPU-z", 3)]
    assert t.allowed_devices(1, node) == ["GPU-y", "GPU-x"]  # in the order given
    t.set_knobs("a/b", {"gpu.devices": "all"}, "v")
    assert t.allowed_devices(1, node) == ["GPU-w", "GPU-y", "GPU-x"]  # a's still hold
    with pytest.raises(KeyError):
        t.effective_limits("nope")
    with pytest.raises(KeyError):
        t.show("nope")
    with pytest.raises(KeyError):
        t.show("a/../b")


def test_core_usage_hierarchical_and_snapshot() -> None:
    t = SliceTree()
    t.attach(1, "a/b", 10, "x")
    t.attach(2, "a", 11, "y")
    t.attach_device(1, D)
    t.add_core_usage(1, D, 5_000_000, 1_000_000, 3)
    t.add_core_usage(2, D, 2_000_000, 0, 0)
    assert t.show("a")["gpu.cores.stat"] == {
        "usage_usec": 7000,
        "throttled_usec": 1000,
        "nr_throttled": 3,
    }
    assert t.show("a/b")["gpu.cores.stat"]["usage_usec"] == 5000
    snap = t.snapshot()
    assert snap["slice"] == ""
    (a,) = snap["children"]
    assert a["slice"] == "a"
    assert a["processes"] == [{"pid": 11, "comm": "y", "client": 2}]
    assert a["children"][0]["processes"][0]["pid"] == 10
    assert t.clients_on_device(D) == [1]
    with pytest.raises(ValueError, match="backwards"):
        t.add_core_usage(1, D, -1, 0, 0)


@settings(max_examples=200, deadline=None)
@given(
    limits=st.tuples(
        st.one_of(st.none(), st.integers(0, 3000)),
        st.one_of(st.none(), st.integers(0, 2000)),
        st.one_of(st.none(), st.integers(0, 2000)),
    ),
    ops=st.lists(
        st.tuples(st.integers(0, 3), st.booleans(), st.integers(1, 700)),
        max_size=60,
    ),
)
def test_admission_never_exceeds_any_max(
    limits: tuple[int | None, int | None, int | None], ops: list[tuple[int, bool, int]]
) -> None:
    """No sequence of reserve/release/detach pushes any slice past its max,
    and every slice's current equals the sum of what clients below it hold."""
    t = SliceTree()
    paths = {"p": limits[0], "p/x": limits[1], "p/y": limits[2]}
    for p, lim in paths.items():
        if lim is not None:
            t.set_knobs(p, {"gpu.memory.max": lim}, "t")
    where = {0: "p/x", 1: "p/x", 2: "p/y", 3: "p"}
    for c, p in where.items():
        t.attach(c, p, c, "x")
    for c, is_reserve, n in ops:
        if is_reserve:
            before = t.held(c).get(D, 0)
            r = t.reserve(c, D, n)
            assert t.held(c).get(D, 0) == before + (n if isinstance(r, Grant) else 0)
            if isinstance(r, Denial):
                assert r.current + n > r.limit
        elif t.held(c).get(D, 0) >= n:
            t.release(c, D, n)
        else:
            t.detach(c)
            t.attach(c, where[c], c, "x")
        for p, lim in paths.items():
            cur = t.show(p)["gpu.memory.current"]["total"]
            below = sum(t.held(k).get(D, 0) for k, w in where.items() if w.startswith(p))
            assert cur == below
            if lim is not None:
                assert cur <= lim


# ---- cgroup v2 semantics: hierarchical events, a read-only root (issue 16) ----


def test_events_are_hierarchical_and_local_is_the_slices_own() -> None:
    # a/b/c with a max on a and a high on b and c: every event counts where
    # it happened (events.local) and at each ancestor (events), so a slice's
    # events include its descendants' as its usage does.
    t = SliceTree()
    t.set_knobs("a", {"gpu.memory.max": "100"}, "v")
    t.set_knobs("a/b", {"gpu.memory.high": "50"}, "v")
    t.set_knobs("a/b/c", {"gpu.memory.high": "30"}, "v")
    t.attach(1, "a/b/c", 1, "x")
    t.attach(2, "a/d", 2, "y")
    assert t.reserve(1, D, 40) == Grant(40)  # c over its high (b is not)
    assert t.reserve(1, D, 20) == Grant(20)  # c and b over theirs
    assert isinstance(t.reserve(1, D, 50), Denial)  # a's max; oom at c
    assert isinstance(t.reserve(2, D, 50), Denial)  # a's max; oom at d

    def ev(slc: str, local: bool = False) -> dict[str, int]:
        return dict(t.show(slc)["gpu.memory.events.local" if local else "gpu.memory.events"])

    assert ev("a/b/c", local=True) == {"high": 2, "max": 0, "oom": 1}
    assert ev("a/b/c") == {"high": 2, "max": 0, "oom": 1}
    assert ev("a/b", local=True) == {"high": 1, "max": 0, "oom": 0}
    assert ev("a/b") == {"high": 3, "max": 0, "oom": 1}
    assert ev("a/d", local=True) == ev("a/d") == {"high": 0, "max": 0, "oom": 1}
    assert ev("a", local=True) == {"high": 0, "max": 2, "oom": 0}
    assert ev("a") == {"high": 3, "max": 2, "oom": 2}
    assert ev("", local=True) == {"high": 0, "max": 0, "oom": 0}
    assert ev("") == {"high": 3, "max": 2, "oom": 2}
    # An ancestor keeps what its descendants counted after they are gone.
    t.detach(2)
    assert "a/d" not in t.slices()
    assert ev("a") == {"high": 3, "max": 2, "oom": 2}


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 60)), max_size=40))
@settings(max_examples=60, deadline=None)
def test_hierarchical_events_are_sums_of_local_ones(ops: list[tuple[int, int]]) -> None:
    # For any sequence of reservations in a small tree, each slice's events
    # are its own plus those of every slice below it.
    t = SliceTree()
    t.set_knobs("p", {"gpu.memory.max": "150", "gpu.memory.high": "90"}, "v")
    t.set_knobs("p/q", {"gpu.memory.max": "100", "gpu.memory.high": "40"}, "v")
    t.set_knobs("r", {"gpu.memory.max": "70"}, "v")
    leaves = ["p/q/x", "p/q", "p/y", "r/z"]
    for i, leaf in enumerate(leaves):
        t.attach(i, leaf, i, "c")
    for who, n in ops:
        t.reserve(who, D, n)
    for slc in t.slices():
        below = [s for s in t.slices() if slc == "" or s == slc or s.startswith(slc + "/")]
        total = {k: sum(t.show(s)["gpu.memory.events.local"][k] for s in below)
                 for k in ("high", "max", "oom")}
        assert t.show(slc)["gpu.memory.events"] == total, slc


def test_root_takes_no_knobs_but_has_statistics() -> None:
    from vgpu_cgroup._core._config import ConfigError

    t = SliceTree()
    for name in ("", "-.slice", "/"):
        with pytest.raises(ConfigError, match="root slice"):
            t.set_knobs(name, {"gpu.memory.max": "1G"}, "vgpuctl")
        with pytest.raises(ConfigError, match="root slice"):
            t.check_knobs(name, {"gpu.cores.max": "50"})
    with pytest.raises(ConfigError, match="root slice"):
        t.apply_settings([setting("", "gpu.cores.max", 50, "/etc/vgpu/slices/-.slice.conf")])
    assert t.show("")["knobs"]["gpu.memory.max"] == {"value": "max", "source": "default"}
    assert t.check_knobs("a.slice", {"gpu.cores.max": "50"}) == ("a.slice", {"gpu.cores.max": 50.0})
    # the root's statistics are the node's
    t.set_knobs("a.slice", {"gpu.memory.max": "10"}, "v")
    t.attach(1, "a.slice", 1, "x")
    t.attach(2, "", 2, "y")  # a process in the root cgroup
    assert t.reserve(1, D, 8) == Grant(8)
    assert t.reserve(2, D, 5) == Grant(5)
    assert isinstance(t.reserve(1, D, 5), Denial)
    root = t.show("")
    assert root["gpu.memory.current"] == {"total": 13, "devices": {D: 13}}
    assert root["gpu.memory.events"] == {"high": 0, "max": 1, "oom": 1}
    assert root["processes"] == [{"pid": 2, "comm": "y", "client": 2}]


def test_clients_max_chain_show_and_root() -> None:
    t = SliceTree()
    t.set_knobs("ten.slice", {"gpu.clients.max": "10"}, "test")
    t.set_knobs("ten.slice/ten-a.slice", {"gpu.clients.max": "50"}, "test")
    assert t.clients_max_chain("ten.slice/ten-a.slice/job") == [
        ("ten.slice", 10), ("ten.slice/ten-a.slice", 50)]
    assert t.clients_max_chain("other.slice") == []
    assert t.clients_max_chain("") == []
    shown = t.show("ten.slice/ten-a.slice")
    assert shown["knobs"]["gpu.clients.max"] == {"value": "50", "source": "test"}
    assert shown["effective"]["gpu.clients.max"] == "10"
    assert t.show("")["effective"]["gpu.clients.max"] == "max"
    with pytest.raises(ConfigError, match="root slice"):
        t.set_knobs("-.slice", {"gpu.clients.max": "5"}, "test")
    with pytest.raises(ConfigError, match="root slice"):
        t.apply_settings([SliceSetting("", "gpu.clients.max", 5, 5, "f.conf")])


def test_show_missing_ok_views_a_slice_the_tree_does_not_have() -> None:
    t = SliceTree()
    t.set_knobs("ten.slice", {"gpu.clients.max": "10", "gpu.memory.max": "1G"}, "test")
    with pytest.raises(KeyError):
        t.show("ten.slice/ghost.scope/x")
    shown = t.show("ten.slice/ghost.scope/x", missing_ok=True)
    assert shown["slice"] == "ten.slice/ghost.scope/x"
    assert shown["effective"]["gpu.clients.max"] == "10"
    assert shown["effective"]["gpu.memory.max"] == str(1 << 30)
    assert "ten.slice/ghost.scope/x" not in t.slices()  # the view added nothing


def test_memory_limits_per_device() -> None:
    """gpu.memory.max on one GPU only: admission, the memory view and the
    effective limits on that GPU, none on the other; an ancestor's value for
    every GPU still holds on both."""
    from vgpu_cgroup._core._knobs import DeviceRef

    g0, g1 = "GPU-aa", "GPU-bb"
    t = SliceTree()
    t.set_devices([DeviceRef(g0, 0), DeviceRef(g1, 1)])
    t.set_knobs("p", {"gpu.memory.max": "3M"}, "v")
    t.set_knobs("p/c", {"gpu.memory.max": "1=1M", "gpu.cores.max": "max GPU-bb=30"}, "v")
    t.attach(1, "p/c", 10, "x")
    assert t.reserve(1, g1, 1 << 20) == Grant(1 << 20)
    assert t.reserve(1, g1, 1) == Denial("p/c", 1 << 20, 1 << 20)
    assert t.reserve(1, g0, 2 << 20) == Grant(2 << 20)  # p's 3M holds here
    assert t.admit(1, g0, 2 << 20, 0) is None
    assert t.mem_view(1, g1) == (1 << 20, 1 << 20)
    assert t.mem_view(1, g0) == (3 << 20, 2 << 20)
    assert t.effective_limits("p/c", g1).mem_max == 1 << 20
    assert t.effective_limits("p/c", g1).cores_max == 30
    assert t.effective_limits("p/c", g0).cores_max is None
    assert t.effective_limits("p/c").mem_max == 3 << 20  # on a GPU no entry names
    show = t.show("p/c")
    assert show["knobs"]["gpu.memory.max"]["value"] == f"max 1={1 << 20}"
    assert show["effective.devices"][g1]["gpu.memory.max"] == str(1 << 20)
    assert show["effective.devices"][g0]["gpu.memory.max"] == str(3 << 20)
    assert show["effective.devices"][g1]["gpu.cores.max"] == "30"
    assert t.show("p")["effective.devices"] == {}  # nothing per device on its path
    t.release(1, g1, 1 << 20)
    t.set_knobs("p/c", {"gpu.memory.max": "2M"}, "v")  # a live change, on every GPU
    assert t.reserve(1, g1, 2 << 20) == Grant(2 << 20)
