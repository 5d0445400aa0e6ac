"""One device's groups: who is attached in which group (the slice a process
is attached to), who has work, each group's rate and virtual time, and
what each is charged; with the budgets of capped slices (``_buckets``).
The state the arbiter (``_arbiter``) decides ownership on. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ._buckets import CapBuckets
from ._share import ShareModel

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
    #: ...when it yields to a non-idle neighbour (best-effort owners).
    yield_inflight_ns: int = 2_000_000


def arbiter_params(us: dict[str, int]) -> ArbiterParams:
    """ArbiterParams from vgpud.toml's ``[compute]`` (µs; see ``_config``)."""
    names = {"window_us": "window_ns", "inflight_us": "inflight_ns",
             "yield_inflight_us": "yield_inflight_ns", "linger_us": "linger_ns"}
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
    #: when it last went idle, and a moving average of how long it stays so
    idle_at: int = -1
    idle_ns: float = float("inf")



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
        (TAKE): where nobody owns it, or its owner is best-effort beside
        them. Taking overlaps the owner's last queued work with the taker's
        first, which only an owner with a small in-flight bound (one that
        yields) keeps short: a group owed more than a normal owner waits
        for that owner to drain instead (``want``)."""
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
            if o is None or rates.get(o.key, 0.0) <= 0:
                out.add(key)  # nobody owns it, or its owner yields to this group
        return out
