"""One device's groups: who is attached in which group (the slice a process
is attached to), who has work, each group's rate and virtual time, and
what each is charged; with the budgets of capped slices (``_buckets``).
The state the arbiter (``_arbiter``) decides ownership on. Pure.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field, replace

from ._buckets import CapBuckets
from ._share import ShareModel

_SCHEDULE_SPAN = 9  # wake-ups and busy spells a schedule is judged on
_MIN_RATE = 0.01  # charging a group whose rate fell to 0 (its tail) moves v by at most this


@dataclass(frozen=True)
class ArbiterParams:
    """The arbiter's constants; docs/design.md says how each was chosen."""

    #: An owner keeps the device this long among groups that all have work.
    window_ns: int = 20_000_000
    #: Windows hold at least this many of the owner's launches...
    window_kernels: int = 8
    #: ...up to this long (large kernels).
    max_window_ns: int = 100_000_000
    #: An owner that goes idle keeps the device (charged for it) for up to
    #: twice its usual idle spell, at most this long, unless the group next
    #: in line yields to it anyway: a training step's Python between kernels
    #: would otherwise hand the device over, and back, several times a step,
    #: while a request-driven tenant that is idle for milliseconds hands it
    #: over at once.
    linger_ns: int = 1_000_000
    #: ...and at least this long (a short spell measured shorter than the next).
    linger_floor_ns: int = 300_000
    #: A capped group starts a window only with this much budget (no slivers).
    quantum_ns: int = 500_000
    #: The most budget a capped slice can bank while idle.
    bucket_ns: int = 30_000_000
    #: A waking group is owed at most this much service on arrival: two windows,
    #: so a group that went idle for a moment (a training step's Python) keeps
    #: what it was owed while another group had a whole window.
    bonus_ns: int = 40_000_000
    #: A waking group takes the device at once if owed this much more than the owner.
    granularity_ns: int = 1_000_000
    #: A revoked owner's measured work is charged at most this long after its window.
    max_tail_ns: int = 50_000_000
    #: A hand-over at the end of a window waits for the old owner's queued work
    #: to drain (so the two never share the hardware's time-slices), at most
    #: this long, or four of its launches if longer (large kernels).
    max_drain_ns: int = 5_000_000
    #: At most this much of a window is given back for the new owner's late start
    #: (its threads waking up); more is no wake-up, and the hook's word is not proof.
    max_start_gap_ns: int = 1_000_000
    #: How long hand-overs are remembered for measured tails.
    history_ns: int = 1_000_000_000
    #: GPU time an owner may keep queued when other groups use the device.
    inflight_ns: int = 5_000_000
    #: ...when it is alone on the device but capped: half of the time its
    #: cap keeps it off the device after a window, between ``inflight_ns``
    #: and this. Its hand-overs are to nobody (what it queued runs after its
    #: window, charged to it), and a PyTorch loop's CPU, blocked while it
    #: is off, can run ahead in its window: an H200 trainer capped at 30 did
    #: 0.248 of native with 5 ms queued and 0.279 with 20 ms; capped at 60
    #: (off 13 ms a window) 0.527 with 5 ms and 0.49 with 20 ms.
    alone_inflight_ns: int = 20_000_000
    #: ...when it yields to a non-idle neighbour (best-effort owners).
    yield_inflight_ns: int = 2_000_000
    #: An owner beside a neighbour that may take the device at once and
    #: wakes on a schedule (a request every few ms) must have run what it
    #: queued this long (plus the neighbour's jitter) before the neighbour
    #: is due: its HOLD grant, which its hooks enforce from their estimate
    #: of their queue (``_lookahead``); 0: never.
    yield_lead_ns: int = 250_000
    #: ...and launches again if the neighbour has not come this long after it
    #: was expected (late, or no longer periodic).
    yield_slack_ns: int = 500_000
    #: While a neighbour that took the device is serving a request whose
    #: spells are regular, the group next in line (one that gives way to
    #: it) may launch again this long before the neighbour is expected to
    #: say ``idle`` (its HOLD until then): its threads are awake and its
    #: first work queued when the neighbour's ends, instead of a report
    #: and a wake-up later (0.44 ms at the median on the H200). What it
    #: queues early runs after the neighbour's queue, within the
    #: neighbour's time-slice; it is charged to it as a tail; 0: never.
    resume_lead_ns: int = 400_000


def arbiter_params(us: dict[str, int]) -> ArbiterParams:
    """ArbiterParams from vgpud.toml's ``[compute]`` (µs; see ``_config``)."""
    names = {"window_us": "window_ns", "inflight_us": "inflight_ns",
             "yield_inflight_us": "yield_inflight_ns", "linger_us": "linger_ns",
             "yield_lead_us": "yield_lead_ns", "resume_lead_us": "resume_lead_ns"}
    return replace(ArbiterParams(), **{names[k]: v * 1000 for k, v in us.items() if k in names})


@dataclass(eq=False, slots=True)
class Group:
    key: str
    members: set[int] = field(default_factory=set)
    busy: set[int] = field(default_factory=set)
    v: float = 0.0
    rate: float = 0.0
    #: the rate it last had while it had work: what charges that arrive
    #: after it went idle (its tail, measured late) are divided by
    last_rate: float = 0.0
    cost_ns: int = 0
    #: how often the GPU was held down by its power cap while this group
    #: owned it (moving average of NVML's samples): work that draws the
    #: power to be throttled at full load gains from a lightly loaded GPU's
    #: boost clocks and pays their premium (``_clock``); work that does not
    #: (a PyTorch trainer's small kernels) runs no faster and does not
    power_bound: float = 0.0
    #: when it last went idle, and a moving average of how long it stays so
    idle_at: int = -1
    idle_ns: float = float("inf")
    #: when it last woke (went from no work to work), the last few wake-ups
    #: and how long each busy spell lasted (from its wake-up to its ``idle``):
    #: a request-driven group wakes on a schedule an owner can make room
    #: for, and gives the device back after a spell its neighbour can be
    #: ready for (``_lookahead``). Medians, not averages: one late request
    #: (an inference that fell behind) must not move the schedule.
    woke_at: int = -1
    wakes: int = 0
    _wake_log: collections.deque[int] = field(
        default_factory=lambda: collections.deque(maxlen=_SCHEDULE_SPAN))
    _spells: collections.deque[int] = field(
        default_factory=lambda: collections.deque(maxlen=_SCHEDULE_SPAN))
    period_ns: float = float("inf")
    jitter_ns: float = 0.0

    def note_wake(self, at: int) -> None:
        """It woke at ``at`` (its hook's clock, when it first wanted the device)."""
        self.wakes += 1
        self.woke_at = at
        log = self._wake_log
        log.append(at)
        if len(log) >= 3:
            gaps = sorted(b - a for a, b in itertools.pairwise(log))
            self.period_ns = float(gaps[len(gaps) // 2])
            devs = sorted(abs(g - self.period_ns) for g in gaps)
            self.jitter_ns = devs[len(devs) // 2]

    def note_spell(self, now: int) -> None:
        """It went idle at ``now``, having woken at ``woke_at``."""
        if self.woke_at >= 0 and now >= self.woke_at:
            self._spells.append(now - self.woke_at)

    def expected_wake(self) -> int | None:
        """When it should next wake, if it wakes on a schedule (seen a few
        times, its wake-ups stray by less than a quarter of their period):
        the median of what each recent wake-up says, so a late one does not
        move it."""
        if self.wakes < 5 or self.period_ns == float("inf") or self.jitter_ns * 4 > self.period_ns:
            return None  # a schedule shows in a few wake-ups, not one
        log = self._wake_log
        n = len(log)
        p = self.period_ns
        guesses = sorted(int(w + (n - i) * p) for i, w in enumerate(log) if i >= n - 5)
        return guesses[len(guesses) // 2]

    def expected_idle(self) -> int | None:
        """When its current busy spell should have ended (its ``idle``), if
        its spells are regular (a request's work): by the second longest of
        the last few (one slow request is forgiven, two are not), if that is
        within a quarter of their median."""
        sp = sorted(self._spells)
        if len(sp) < 5 or self.woke_at < 0:
            return None
        mid, long = sp[len(sp) // 2], sp[-2]
        if (long - mid) * 4 > mid:
            return None
        return self.woke_at + long


class DeviceGroups:
    """The groups attached to one device and their charges."""

    def __init__(self, model: ShareModel, params: ArbiterParams | None = None) -> None:
        self.model = model
        self.p = params or ArbiterParams()
        #: charges are multiplied by this (the clock scale, ``_clock``)
        self.scale = 1.0
        self._groups: dict[str, Group] = {}
        self._group_of: dict[int, str] = {}
        self._vref = 0.0  # the owner's (or last owner's) virtual time
        #: budgets of the capped slices on the groups' paths (``_buckets``)
        self.buckets = CapBuckets(model, bucket_ns=self.p.bucket_ns,
                                  quantum_ns=self.p.quantum_ns, window_ns=self.p.window_ns)
        self._usage: dict[str, int] = {}
        self.owner: str | None = None
        self._seen = (-1, -1)
        self._yielding: dict[str, bool] = {}
        #: groups that may take the device the moment they ask (TAKE)
        self._take: set[str] = set()
        #: the owner's HOLD grant, which its hooks enforce (``_lookahead``):
        #: its queued work must have run by the first time (a neighbour that
        #: may take the device at once is due), and it launches freely from
        #: the second
        self.hold: tuple[int, int] | None = None
        #: the group next in line may launch from then (its HOLD meanwhile)
        self.resume: tuple[str, int] | None = None

    def attach(self, client: int, group: str) -> None:
        """A process attached the device; it belongs to ``group`` (its slice)."""
        if client in self._group_of:
            return
        g = self._groups.get(group)
        if g is None:
            g = self._groups[group] = Group(group, v=self._vref)
        g.members.add(client)
        self._group_of[client] = group

    def group_of(self, client: int) -> str | None:
        return self._group_of.get(client)

    def clients(self) -> list[int]:
        return list(self._group_of)

    def set_cost(self, client: int, cost_ns: int) -> None:
        """The process's measured GPU time per launch (its hook's moving average)."""
        key = self._group_of.get(client)
        if key is not None:
            g = self._groups[key]
            g.cost_ns = max(0, min(cost_ns, self.p.max_window_ns))

    def contended(self, client: int) -> bool:
        """Whether other groups use the device (the hook then reports idleness fast)."""
        return len(self._groups) > 1

    def rate(self, client: int) -> float:
        key = self._group_of.get(client)
        return 0.0 if key is None else self._groups[key].rate

    def rates(self) -> dict[str, float]:
        """Current rate of every group with work (fraction of one GPU)."""
        return {k: g.rate for k, g in self._groups.items() if g.busy}

    def take_usage(self) -> dict[str, int]:
        """GPU time charged per group since the last call (ns, never negative:
        a refund larger than what was charged in between waits for the next)."""
        out = {k: v for k, v in self._usage.items() if v > 0}
        self._usage = {k: v for k, v in self._usage.items() if v < 0 and k in self._groups}
        return out

    def inflight_ns(self, client: int) -> int:
        """GPU time the process may keep queued while its group owns the device."""
        key = self._group_of.get(client)
        if key is None:
            return self.p.inflight_ns
        if len(self._groups) == 1:
            cap = self.model.ceiling(key)
            if cap >= 1.0:
                return 0  # alone and uncapped: nobody to hand over to, no bound
            # Alone and capped: half of the time its cap keeps it off the
            # device after a window (see ArbiterParams.alone_inflight_ns).
            off = self.p.window_ns * (1.0 - cap) / max(cap, 0.01)
            return int(min(self.p.alone_inflight_ns, max(self.p.inflight_ns, off / 2)))
        if (self._yields(key) or (key == self.owner and self._take)
                or (self.resume is not None and self.resume[0] == key)):
            # It yields to a neighbour, a neighbour may take the device from
            # it at once, or it launches early: a short queue, so that the
            # two overlap little.
            return self.p.yield_inflight_ns
        return self.p.inflight_ns

    def _window(self, g: Group) -> int:
        return max(self.p.window_ns, min(self.p.max_window_ns, self.p.window_kernels * g.cost_ns))

    def _charge(self, key: str, ns: int, work: float | None = None) -> None:
        """Charge ``ns`` of device time (usage statistics) worth ``work`` ns
        (virtual time and caps; the time itself unless given)."""
        g = self._groups.get(key)
        if g is None:
            return
        w = float(ns) if work is None else work
        g.v += w / max(g.rate if g.rate > 0 else g.last_rate, _MIN_RATE)
        self.buckets.spend(key, w)
        if ns:
            self._usage[key] = self._usage.get(key, 0) + ns

    def _refresh_rates(self) -> None:
        busy = frozenset(k for k, g in self._groups.items() if g.busy)
        rates = self.model.rates(busy)
        for k, g in self._groups.items():
            g.rate = rates.get(k, 0.0)
            if g.rate > 0:
                g.last_rate = g.rate


    def _owner_group(self) -> Group | None:
        return self._groups.get(self.owner) if self.owner is not None else None

    def _pick(self, exclude: str | None = None) -> str | None:
        best: Group | None = None
        for key, g in self._groups.items():
            if not g.busy or g.rate <= 0 or key == exclude:
                continue
            b = self.buckets
            if not (b.can_continue(key) if key == self.owner else b.startable(key, self.owner)):
                continue
            if best is None or (g.v, key) < (best.v, best.key):
                best = g
        return None if best is None else best.key

    def _pre_approved(self) -> set[str]:
        """Groups without work that may take the device the moment they ask
        (TAKE): where nobody owns it; where its owner is best-effort beside
        them; or where neither it nor the owner is capped and it would be
        owed more than the owner the moment it woke (a light soft tenant
        beside a heavy one: waiting for the owner to drain cost it a
        report and a wake-up each time, 0.36 ms at the median on the
        H200). Taking overlaps the owner's last queued work with the
        taker's first, so such an owner keeps a short queue
        (``yield_inflight_ns``) and, where the taker wakes on a schedule,
        lets it run out before the taker is due (``_lookahead``). A capped
        group owed more waits for the owner to drain instead (``want``):
        overlapping work would blur what each is charged."""
        out: set[str] = set()
        o = self._owner_group()
        busy = frozenset(k for k, g in self._groups.items() if g.busy)
        for key, g in self._groups.items():
            if g.busy or not self.buckets.startable(g.key, self.owner):
                continue
            rates = self.model.rates(busy | {key})
            r = rates.get(key, 0.0)
            if r <= 0:
                continue
            o_r = rates.get(o.key, 0.0) if o is not None else 0.0
            if o is None or o_r <= 0:
                out.add(key)  # nobody owns it, or its owner yields to this group
            elif (o.busy and self._uncapped(key, o.key)
                  and max(g.v, o.v - self.p.bonus_ns / r) + self.p.granularity_ns / r < o.v):
                out.add(key)  # owed more than an uncapped owner: would preempt it
        return out

    def _next_after(self, owner: str) -> str | None:
        """The group that gets the device when ``owner`` goes idle, by the
        rates of the others with work (a best-effort one has none beside it)."""
        busy = frozenset(k for k, g in self._groups.items() if g.busy and k != owner)
        rates = self.model.rates(busy)
        best: Group | None = None
        for key in busy:
            g = self._groups[key]
            if rates.get(key, 0.0) > 0 and self.buckets.startable(key, owner) and (
                    best is None or (g.v, key) < (best.v, best.key)):
                best = g
        return None if best is None else best.key

    def _uncapped(self, *keys: str) -> bool:
        return all(self.model.ceiling(k) >= 1.0 for k in keys)

    def _gives_way(self, key: str, owner: str) -> bool:
        """Whether group ``key`` is one whose device ``owner`` takes at once
        when it wakes (``_pre_approved``): ``key`` is best-effort beside it,
        or neither is capped."""
        rates = self.model.rates(frozenset((key, owner)))
        return rates.get(key, 0.0) <= 0 or self._uncapped(key, owner)

    def note_power(self, capped: bool) -> None:
        """An NVML sample: whether the power cap holds the clock down now.
        Counted for the owner, if its work is running (see ``Group.power_bound``)."""
        o = self._groups.get(self.owner) if self.owner is not None else None
        if o is not None and o.busy:
            o.power_bound += 0.2 * (float(capped) - o.power_bound)

    def group_scale(self, key: str) -> float:
        """The clock premium a group pays (``_clock``): the device's, for
        work seen power-bound at least half the time it owned the device,
        in proportion below that, none for work never seen so."""
        g = self._groups.get(key)
        if g is None or self.scale == 1.0:
            return self.scale
        return 1.0 + (self.scale - 1.0) * min(1.0, 2.0 * g.power_bound)

    def _fresh(self) -> None:
        seen = (self.model.tree.generation, self.model.tree.membership)
        if seen != self._seen:
            self._seen = seen
            self._yielding.clear()

    def _yields(self, key: str) -> bool:
        """Whether the group's rate drops to 0 beside some other attached
        group (it is best-effort next to it): it then keeps less queued, so
        that it hands the device over quickly."""
        self._fresh()
        y = self._yielding.get(key)
        if y is None:
            y = any(self.model.rates(frozenset((key, other))).get(key, 0.0) <= 0
                    for other in self._groups if other != key)
            self._yielding[key] = y
        return y
