"""The arbiter: device ownership, stride shares, caps, best-effort yielding, tails.

A small discrete-event model of one device drives it: processes that
always have work, or that get a request every period and need some GPU time
to serve it; only the owner's processes make progress. This is the
arbiter's own contract (owned time, waits), not a model of the hardware:
the end-to-end tests measure the simulated GPU, and bench/ the H200.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from vgpu_cgroup._core._arbiter import HOLD, RUN, TAKE, WAIT, Arbiter, ArbiterParams
from vgpu_cgroup._core._share import ShareModel
from vgpu_cgroup._core._tree import SliceTree

MS = 1_000_000


class Device:
    """One GPU under an Arbiter; ``run`` advances time event by event."""

    def __init__(self, tree: SliceTree, params: ArbiterParams | None = None) -> None:
        self.tree = tree
        self.arb = Arbiter(ShareModel(tree), params)
        self.t = 0
        self.always: set[int] = set()
        #: client -> [period, work per request, next arrival, work left, arrival of current or -1]
        self.periodic: dict[int, list[int]] = {}
        self.owned: dict[str, int] = {}
        self.latencies: dict[int, list[int]] = {}

    def add(self, client: int, path: str, *, always: bool = True) -> None:
        self.tree.attach(client, path, 1000 + client, f"c{client}")
        self.arb.attach(client, self.tree.client_slice(client))
        if always:
            self.always.add(client)
            self.arb.want(client, self.t)
            self._drain()

    def add_requests(self, client: int, path: str, period: int, work: int) -> None:
        self.add(client, path, always=False)
        self.periodic[client] = [period, work, self.t, 0, -1]
        self.latencies[client] = []

    def _owner_clients(self) -> list[int]:
        st = self.arb.states()
        return [c for c, s in st.items() if s in (RUN, HOLD)]

    def run(self, duration: int) -> None:
        end = self.t + duration
        while self.t < end:
            cands = [end]
            dl = self.arb.deadline()
            if dl is not None and dl > self.t:
                cands.append(dl)
            for _per, _w, nxt, left, _arr in self.periodic.values():
                if left == 0:
                    cands.append(max(nxt, self.t))
            running = [c for c in self._owner_clients() if c in self.periodic
                       and self.periodic[c][3] > 0]
            for c in running:
                cands.append(self.t + self.periodic[c][3] // max(1, len(running)))
            nxt_t = max(min(cands), self.t + 1)
            dt = nxt_t - self.t
            owner = self.arb.owner
            if owner is not None:
                self.owned[owner] = self.owned.get(owner, 0) + dt
                for c in running:
                    self.periodic[c][3] = max(0, self.periodic[c][3] - dt // len(running))
            self.t = nxt_t
            for c, st in self.periodic.items():
                if st[3] == 0 and st[4] >= 0 and c in running:
                    self.latencies[c].append(self.t - st[4])
                    st[4] = -1
                    self.arb.idle(c, self.t)
                if st[3] == 0 and st[4] < 0 and self.t >= st[2]:
                    st[3], st[4] = st[1], st[2]
                    st[2] += st[0]
                    self.arb.want(c, self.t)
            self.arb.advance(self.t)
            self._drain()

    def _drain(self) -> None:
        """Nothing is queued in this model: a revoked owner drains at once."""
        while self.arb._drain:
            self.arb.drained(next(iter(self.arb._drain)), self.t)

    def shares(self, duration: int) -> dict[str, float]:
        before = dict(self.owned)
        self.run(duration)
        return {k: (v - before.get(k, 0)) / duration for k, v in self.owned.items()}


def knobs(tree: SliceTree, path: str, **kv: object) -> None:
    tree.set_knobs(path, {f"gpu.cores.{k}": v for k, v in kv.items()}, "test")


def close(got: Mapping[str, float], want: Mapping[str, float], tol: float = 0.005) -> None:
    for k, v in want.items():
        assert got.get(k, 0.0) == pytest.approx(v, abs=tol), (k, got)


def test_four_hard_caps_summing_to_100_are_exact() -> None:
    tree = SliceTree()
    dev = Device(tree)
    for i, cap in enumerate((10, 20, 30, 40)):
        knobs(tree, f"t{i}", min=cap, max=cap)
        dev.add(i, f"t{i}")
    dev.run(200 * MS)
    # Stride scheduling is exact to within a window (20 ms) per measurement.
    close(dev.shares(10_000 * MS), {"t0": 0.10, "t1": 0.20, "t2": 0.30, "t3": 0.40})


def test_solo_cap_leaves_the_rest_idle() -> None:
    tree = SliceTree()
    dev = Device(tree)
    knobs(tree, "solo", max=30)
    dev.add(1, "solo")
    dev.run(100 * MS)
    got = dev.shares(2000 * MS)
    close(got, {"solo": 0.30})


def test_caps_below_100_beside_an_uncapped_neighbour() -> None:
    tree = SliceTree()
    dev = Device(tree)
    for i, cap in enumerate((10, 20, 30)):
        knobs(tree, f"t{i}", max=cap)
        dev.add(i, f"t{i}")
    dev.add(9, "free")
    dev.run(100 * MS)
    close(dev.shares(2000 * MS), {"t0": 0.10, "t1": 0.20, "t2": 0.30, "free": 0.40})


def test_soft_pair_splits_by_min_and_one_alone_takes_all() -> None:
    tree = SliceTree()
    dev = Device(tree)
    knobs(tree, "a", min=30, max=100)
    knobs(tree, "b", min=70, max=100)
    dev.add(1, "a")
    dev.add(2, "b")
    dev.run(100 * MS)
    close(dev.shares(2000 * MS), {"a": 0.30, "b": 0.70})
    dev.arb.idle(2, dev.t)
    dev.always.discard(2)
    close(dev.shares(1000 * MS), {"a": 1.0})


def test_nested_parent_max_and_weights() -> None:
    tree = SliceTree()
    dev = Device(tree)
    knobs(tree, "parent", max=50)
    knobs(tree, "parent/a", weight=100)
    knobs(tree, "parent/b", weight=300)
    dev.add(1, "parent/a")
    dev.add(2, "parent/b")
    dev.run(100 * MS)
    close(dev.shares(4000 * MS), {"parent/a": 0.125, "parent/b": 0.375})


def test_two_processes_of_one_slice_own_together() -> None:
    tree = SliceTree()
    dev = Device(tree)
    knobs(tree, "pair", max=40)
    dev.add(1, "pair")
    dev.add(2, "pair")
    dev.add(3, "other")
    st = dev.arb.states()
    assert st[1] == st[2]
    dev.run(100 * MS)
    close(dev.shares(2000 * MS), {"pair": 0.40, "other": 0.60})


def test_best_effort_slice_yields_at_once_and_takes_the_rest() -> None:
    tree = SliceTree()
    dev = Device(tree)
    knobs(tree, "train", idle=1)
    dev.add(1, "train")
    dev.add_requests(2, "infer", period=5 * MS, work=1 * MS + MS // 2)
    dev.run(100 * MS)
    dev.latencies[2].clear()
    got = dev.shares(1000 * MS)
    # The inference is served the moment it asks: latency is its own work.
    assert max(dev.latencies[2]) == 1 * MS + MS // 2
    close(got, {"infer": 0.30, "train": 0.70})


def test_idle_process_is_pre_approved_to_take_a_best_effort_owners_device() -> None:
    tree = SliceTree()
    dev = Device(tree)
    knobs(tree, "train", idle=1)
    dev.add(1, "train")
    dev.add_requests(2, "infer", period=50 * MS, work=MS)
    dev.run(2 * MS)  # the first request is served, then the trainer owns
    st = dev.arb.states()
    assert st[1] == RUN
    assert st[2] == TAKE


def test_light_tenant_leaves_the_rest_to_its_soft_neighbour() -> None:
    tree = SliceTree()
    dev = Device(tree)
    knobs(tree, "light", min=70)
    knobs(tree, "heavy", min=30, max=100)
    dev.add_requests(1, "light", period=5 * MS, work=MS)
    dev.add(2, "heavy")
    dev.run(100 * MS)
    dev.latencies[1].clear()
    got = dev.shares(1000 * MS)
    close(got, {"light": 0.20, "heavy": 0.80})
    # The light one is owed more than the heavy one: it never waits long.
    assert max(dev.latencies[1]) <= 2 * MS


def test_capped_owner_gives_up_when_its_budget_runs_out() -> None:
    tree = SliceTree()
    dev = Device(tree)
    knobs(tree, "capped", max=20)
    dev.add(1, "capped")
    dev.add(2, "free")
    dev.run(100 * MS)
    close(dev.shares(1000 * MS), {"capped": 0.20, "free": 0.80})


def test_live_change_moves_the_share() -> None:
    tree = SliceTree()
    dev = Device(tree)
    knobs(tree, "live", max=30)
    dev.add(1, "live")
    dev.run(200 * MS)
    close(dev.shares(1000 * MS), {"live": 0.30})
    knobs(tree, "live", max=60)
    dev.run(50 * MS)
    close(dev.shares(1000 * MS), {"live": 0.60})


def test_measured_tail_is_charged_to_the_old_owner_and_refunded() -> None:
    tree = SliceTree()
    arb = Arbiter(ShareModel(tree), ArbiterParams(window_ns=10 * MS))
    tree.attach(1, "a", 1, "a")
    tree.attach(2, "b", 2, "b")
    arb.attach(1, "a")
    arb.attach(2, "b")
    arb.want(1, 0)
    arb.want(2, 0)
    assert arb.owner == "a"
    arb.measured(1, [(0, 5 * MS), (5 * MS, 9 * MS)])  # a's window, from its start
    arb.take_usage()
    arb.advance(10 * MS)  # window ends: a stops launching...
    assert arb.states() == {1: WAIT, 2: WAIT}
    arb.drained(1, 10 * MS)  # ...and once its queue is empty, b's turn
    assert arb.owner == "b"
    arb.advance(12 * MS)
    use = arb.take_usage()
    assert use == {"a": 10 * MS, "b": 2 * MS}
    # a's last batch ran until 11 ms: 1 ms more for a, 1 ms back to b.
    arb.measured(1, [(9 * MS, 11 * MS)])
    arb.advance(13 * MS)
    use = arb.take_usage()
    assert use == {"a": 1 * MS}  # b: +1 ms owned, -1 ms refunded
    # Only the time the intervals cover counts (a tail time-sliced with the
    # new owner's work took only its part of the span).
    arb.measured(1, [(12 * MS, 12 * MS + MS // 2)])
    arb.advance(14 * MS)
    assert arb.take_usage() == {"a": MS // 2, "b": MS // 2}
    # b's own work started at 10.3 ms: that is inside the tail already refunded.
    arb.measured(2, [(10 * MS + MS * 3 // 10, 14 * MS)])
    arb.advance(15 * MS)
    assert arb.take_usage() == {"b": MS}


def test_late_start_of_a_window_is_given_back_up_to_a_bound() -> None:
    tree = SliceTree()
    arb = Arbiter(ShareModel(tree), ArbiterParams(window_ns=10 * MS))
    for c, g in ((1, "a"), (2, "b")):
        tree.attach(c, g, c, g)
        arb.attach(c, g)
        arb.want(c, 0)
    arb.measured(1, [(0, 9 * MS)])
    arb.advance(10 * MS)
    arb.drained(1, 10 * MS)
    assert arb.owner == "b"
    arb.advance(12 * MS)
    arb.take_usage()
    arb.measured(2, [(10 * MS + 400_000, 12 * MS)])  # woke 0.4 ms late
    arb.advance(13 * MS)
    assert arb.take_usage() == {"b": MS - 400_000}
    # A first interval 8 ms into the window is no wake-up: at most the bound.
    arb2 = Arbiter(ShareModel(tree), ArbiterParams(window_ns=10 * MS))
    arb2.attach(2, "b")
    arb2.want(2, 0)
    arb2.advance(9 * MS)
    arb2.measured(2, [(8 * MS, 9 * MS)])
    assert arb2.take_usage() == {"b": 9 * MS - ArbiterParams().max_start_gap_ns}


def test_states_wait_for_non_owners() -> None:
    tree = SliceTree()
    dev = Device(tree)
    dev.add(1, "a")
    knobs(tree, "b", max=50)
    dev.add(2, "b")
    st = dev.arb.states()
    assert sorted(st.values()) == [WAIT, RUN]


def test_detach_of_the_owner_hands_over() -> None:
    tree = SliceTree()
    dev = Device(tree)
    dev.add(1, "a")
    dev.add(2, "b")
    owner = dev.arb.owner
    leaving = 1 if owner == "a" else 2
    dev.arb.detach(leaving, dev.t)
    assert dev.arb.owner == ("b" if leaving == 1 else "a")


def test_alone_and_uncapped_queues_without_bound() -> None:
    tree = SliceTree()
    dev = Device(tree)
    knobs(tree, "a", min=10)
    dev.add(1, "a")
    assert dev.arb.inflight_ns(1) == 0
    dev.add(2, "b")
    assert dev.arb.inflight_ns(1) == ArbiterParams().inflight_ns


def trainer_beside_requests(lead_ns: int = 250_000) -> Device:
    """A best-effort trainer (1) beside an inference slice (2) that gets a
    1 ms request every 5 ms, with the look-ahead's lead as given (-1: the
    default parameters)."""
    tree = SliceTree()
    dev = Device(tree, None if lead_ns < 0 else ArbiterParams(yield_lead_ns=lead_ns))
    knobs(tree, "train", idle=1)
    dev.add(1, "train")
    dev.add_requests(2, "infer", period=5 * MS, work=MS)
    return dev


def test_an_owner_is_held_before_a_periodic_neighbour_is_due() -> None:
    dev = trainer_beside_requests()
    dev.run(100 * MS + MS // 2)  # requests at every 5 ms; this one is served
    dev.run(MS)
    p = dev.arb.p
    due = dev.arb._groups["infer"].expected_wake()
    assert due is not None
    assert abs(due - 105 * MS) < 1000
    # The trainer owns the device, but what it queues must have run the lead
    # before the request is due (its hooks enforce that), and the request
    # may take the device at once.
    assert dev.arb.states() == {1: HOLD, 2: TAKE}
    assert dev.arb.hold == (due - p.yield_lead_ns, due + p.yield_slack_ns)
    dev.run(due - dev.t + 1)
    assert dev.arb.owner == "infer"


def test_a_late_neighbour_holds_the_owner_only_until_the_slack() -> None:
    dev = trainer_beside_requests()
    dev.run(100 * MS + MS // 2)
    dev.periodic[2][2] += 50 * MS  # the next request comes 50 ms late
    dev.run(3 * MS)
    hold = dev.arb.hold
    assert hold is not None
    assert dev.arb.states()[1] == HOLD
    assert dev.arb.deadline() == hold[1]  # the daemon looks again when it ends
    dev.run(hold[1] - dev.t + MS // 10)
    assert dev.arb.states()[1] == RUN  # slot missed: the trainer launches freely
    dev.run(20 * MS)
    assert dev.arb.states()[1] == RUN  # no hold until the neighbour wakes again


def test_the_group_next_in_line_launches_again_before_a_regular_request_ends() -> None:
    from vgpu_cgroup._node._compute import _hold_of
    dev = trainer_beside_requests()
    dev.run(100 * MS + MS // 2)  # the request that came at 100 ms is being served
    g = dev.arb._groups["infer"]
    assert dev.arb.owner == "infer"
    assert dev.arb.states()[1] == HOLD  # not WAIT: it may launch from `at`
    at = g.woke_at + MS - dev.arb.p.resume_lead_ns  # its spells: 1 ms each
    assert dev.arb.resume == ("train", at)
    assert _hold_of(dev.arb, 1) == (0, at)  # nothing fits before 0: wait until `at`
    assert dev.arb.inflight_ns(1) == dev.arb.p.yield_inflight_ns
    # Spells that vary by more than a quarter: no early start.
    dev2 = trainer_beside_requests()
    for i in range(30):
        dev2.periodic[2][1] = (1, 2, 4)[i % 3] * MS // 2
        dev2.run(5 * MS)
    dev2.run(dev2.periodic[2][2] - dev2.t + MS // 2)
    assert dev2.arb.owner == "infer"
    assert dev2.arb.resume is None
    assert dev2.arb.states()[1] == WAIT


def test_no_hold_without_a_schedule_or_beside_a_capped_owner() -> None:
    dev = trainer_beside_requests()
    dev.periodic[2][0] = 1000 * MS  # one request per round, at an irregular time
    for i in range(40):  # wake-ups 4 ms and 26 ms apart: no schedule
        dev.periodic[2][2] = dev.t + (2 if i % 2 else 13) * MS
        dev.run(15 * MS)
        assert dev.arb.hold is None
    tree2 = SliceTree()
    dev2 = Device(tree2)
    knobs(tree2, "light", min=70)
    knobs(tree2, "heavy", min=30, max=90)  # capped: the light one waits for its drain
    dev2.add_requests(1, "light", period=5 * MS, work=MS)
    dev2.add(2, "heavy")
    for _ in range(40):
        dev2.run(5 * MS)
        assert dev2.arb.hold is None
        assert TAKE not in dev2.arb.states().values()


def test_a_light_soft_neighbour_takes_an_uncapped_owners_device_at_once() -> None:
    tree = SliceTree()
    dev = Device(tree)
    knobs(tree, "light", min=70)
    knobs(tree, "heavy", min=30, max=100)
    dev.add_requests(1, "light", period=5 * MS, work=MS)
    dev.add(2, "heavy")
    dev.run(100 * MS + MS // 2)
    dev.run(MS)
    # It would be owed more than the heavy owner the moment it woke: it is
    # pre-approved, the owner keeps a short queue and is held before the
    # request is due.
    assert dev.arb.states() == {1: TAKE, 2: HOLD}
    assert dev.arb.inflight_ns(2) == dev.arb.p.yield_inflight_ns
    lat = dev.latencies[1]
    assert max(lat[-10:]) == MS  # served at once, every time
    assert dev.shares(200 * MS)["heavy"] == pytest.approx(0.8, abs=0.01)


def test_the_look_ahead_is_on_by_default_and_0_turns_it_off() -> None:
    dev = trainer_beside_requests(lead_ns=-1)  # the default parameters
    dev.run(101 * MS)
    assert dev.arb.hold is not None
    dev = trainer_beside_requests(lead_ns=0)
    dev.run(200 * MS)
    assert dev.arb.hold is None


def test_only_power_bound_work_pays_the_clock_premium() -> None:
    tree = SliceTree()
    dev = Device(tree)
    knobs(tree, "mm", max=30)
    knobs(tree, "tr", max=30)
    dev.add(1, "mm")
    dev.add(2, "tr")
    dev.arb.scale = 1.2
    for _ in range(40):  # NVML samples while each owns the device
        dev.run(5 * MS)
        dev.arb.note_power(dev.arb.owner == "mm")
    assert dev.arb.group_scale("mm") == pytest.approx(1.2)
    assert dev.arb.group_scale("tr") == 1.0


def test_a_capped_group_alone_may_queue_deeper_than_beside_others() -> None:
    tree = SliceTree()
    dev = Device(tree)
    knobs(tree, "a", max=30)
    dev.add(1, "a")
    assert dev.arb.inflight_ns(1) == dev.arb.p.alone_inflight_ns  # off 47 ms a window
    knobs(tree, "a", max=60)
    assert dev.arb.inflight_ns(1) == pytest.approx(6_666_666, abs=1)  # off 13 ms
    knobs(tree, "a", max=90)
    assert dev.arb.inflight_ns(1) == dev.arb.p.inflight_ns
    dev.add(2, "b")
    assert dev.arb.inflight_ns(1) == dev.arb.p.inflight_ns
