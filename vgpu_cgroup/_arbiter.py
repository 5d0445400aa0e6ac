"""Who owns each GPU, window by window, and what each slice is charged.

Without MPS a GPU runs one context at a time and time-slices between the
contexts that have work queued, by its own rules: whoever has the deeper
queue gets more, and a kernel of a latency-sensitive process waits behind
whatever its neighbours queued. So vgpud, not the hardware, decides whose
work is on a device: one *group* (the slice a process is attached to, all
its processes together) *owns* the device for a window; its hooks launch
freely (within a bound of queued GPU time), every other gated process waits
in its hook. A group is charged the wall time it owned the device, so
shares are exact by construction, CPU gaps inside a window included (they
are the owner's, as they would be natively).

Pure: events in (a process has work: ``want``; its work drained: ``idle``;
time passed: ``advance``; measured GPU intervals: ``measured``), decisions
out (``states``: the gate state of every attached process). One Arbiter per
device; times are CLOCK_MONOTONIC ns, the clock the hooks' intervals use.

Who gets the device next (``_pick``): among the groups with work whose
capped slices all have budget, the one with the least *virtual time*
(``v``), where owning the device for ``t`` adds ``t / rate`` and the rates
come from ``_share`` for the set of groups that have work (mins, weights,
maxes and ``gpu.cores.idle`` down the tree): stride scheduling, so every
group gets its rate of the time. Caps are a separate, absolute rule: a
token bucket per capped slice, filled at the cap's rate of wall time (up to
``bucket_ns``), emptied by what its groups are charged; a group may start a
window only with ``quantum`` in every bucket on its path and must give the
device up when one is empty. Where the groups with work can use the whole
GPU between them (caps that sum to 100, or an uncapped neighbour) the
stride schedule alone gives each its rate and the buckets never bind; where
they cannot (a capped slice alone) the buckets leave the device idle.

A group that wakes up is placed at most
``bonus_ns`` of service behind the owner (it cannot bank idle time), and
takes the device at once if it is owed ``granularity_ns`` more than the
owner, or if the owner's rate drops to 0 because of it (a best-effort
owner yields to a non-idle sibling). Otherwise ownership moves at the end
of the owner's window, when its work drains, or when one of its capped
slices runs out of budget (a token bucket per ``gpu.cores.max``, filled at
the cap's rate).

A hand-over does not wait for the old owner's queued work to drain: the old
owner stops launching, the new one starts, and the old owner's last GPU work
(at most ``inflight_ns`` of it, bounded in the hook) finishes meanwhile. The
hooks' measured intervals later show when it ended: that tail is charged to
the old owner and given back to the new one (``measured``).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ._share import ShareModel

#: Gate states, as in ``vgpu_abi.h``.
WAIT = 0
RUN = 1
TAKE = 2

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
    yield_inflight_ns: int = 500_000


@dataclass(eq=False, slots=True)
class _Group:
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


@dataclass(slots=True)
class _Handover:
    t: int
    old: str | None
    new: str | None
    tail_end: int  # t + the tail measured so far
    refunded: int = 0  # given back to the new owner so far
    new_end: int | None = None  # when the new owner's window ended
    started: int | None = None  # when the new owner's own work began (measured)
    regained: int | None = None  # when the old owner owned the device again


class Arbiter:
    """Ownership and charges of one device (see the module docstring)."""

    def __init__(self, model: ShareModel, params: ArbiterParams | None = None) -> None:
        self.model = model
        self.p = params or ArbiterParams()
        #: charges are multiplied by this (the clock scale, ``_clock``)
        self.scale = 1.0
        self._groups: dict[str, _Group] = {}
        self._group_of: dict[int, str] = {}
        self.owner: str | None = None
        self._window_start = 0
        self._cursor: int | None = None  # owner charged up to here
        self._vref = 0.0  # the owner's (or last owner's) virtual time
        self._buckets: dict[str, list[float]] = {}  # slice -> [tokens ns, cap fraction]
        self._accrued: int | None = None
        self._handovers: collections.deque[_Handover] = collections.deque()
        self._take: set[str] = set()
        #: a hand-over waiting for the old owner's work to drain: the members
        #: that have not said ``drained`` yet, and when it goes ahead anyway
        self._drain: set[int] | None = None
        self._drain_until = 0
        self._drain_since = 0
        #: an idle owner keeps the device until then (0: not lingering)
        self._linger_until = 0
        #: per group, its recent windows [start, end] (end -1: still open)
        self._windows: dict[str, collections.deque[list[int]]] = {}
        self._usage: dict[str, int] = {}
        self._seen = (-1, -1)
        self._yielding: dict[str, bool] = {}
        self.handovers = 0  # counter, for stats and tests
        self.debug: Callable[[str], None] | None = None

    # ----------------------------------------------------------- membership

    def attach(self, client: int, group: str) -> None:
        """A process attached the device; it belongs to ``group`` (its slice)."""
        if client in self._group_of:
            return
        g = self._groups.get(group)
        if g is None:
            g = self._groups[group] = _Group(group, v=self._vref)
        g.members.add(client)
        self._group_of[client] = group

    def detach(self, client: int, now: int) -> None:
        """The process is gone; its group keeps the device only if others in it have work."""
        key = self._group_of.pop(client, None)
        if key is None:
            return
        g = self._groups[key]
        g.members.discard(client)
        g.busy.discard(client)
        if not g.members:
            self._settle(now)
            if self.owner == key:
                self._handover(now, None)
            del self._groups[key]
            self._windows.pop(key, None)
            self._take.discard(key)
        self._update(now)

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

    # --------------------------------------------------------------- events

    def want(self, client: int, now: int) -> None:
        """The process has work for the device (it launched, or waits to)."""
        key = self._group_of.get(client)
        if key is None:
            return
        g = self._groups[key]
        if client in g.busy:
            self._update(now)
            return
        woke = not g.busy
        pre_approved = key in self._take
        self._settle(now)
        g.busy.add(client)
        if woke and g.idle_at >= 0:
            gap = now - g.idle_at
            g.idle_ns = gap if g.idle_ns == float("inf") else 0.75 * g.idle_ns + 0.25 * gap
            g.idle_at = -1
        if key == self.owner:
            self._linger_until = 0
        self._refresh_rates()
        if woke and self.owner != key:
            # Placed at most bonus_ns of service behind the owner: idle time
            # is not banked, but a light group is served as soon as it asks.
            r = max(g.rate, _MIN_RATE)
            g.v = max(g.v, self._vref - self.p.bonus_ns / r)
            o = self._owner_group()
            if o is not None and g.rate > 0 and self._startable(g):
                if pre_approved or o.rate <= 0:
                    # The owner yields to g (best-effort beside it), or g was
                    # told it may take the device: at once. The owner's last
                    # work (its small in-flight bound) overlaps g's first.
                    self._handover(now, key)
                elif (g.v + self.p.granularity_ns / r < o.v and self._drain is None
                      and self._pick() == key):
                    # Owed more than the owner: the owner's window ends now,
                    # and g starts once its queue has drained, so the two
                    # never share the hardware's time-slices.
                    self._start_drain(now, o)
        self._update(now)

    def idle(self, client: int, now: int) -> None:
        """The process's work on the device has drained and it launches nothing."""
        key = self._group_of.get(client)
        if key is None:
            return
        g = self._groups[key]
        if client not in g.busy:
            return
        self._settle(now)
        g.busy.discard(client)
        if not g.busy:
            g.idle_at = now
            if key == self.owner and self._drain is None and 2 * g.idle_ns < self.p.linger_ns:
                self._refresh_rates()
                nxt = self._pick()
                if nxt is not None and self.model.rates(
                        frozenset(k for k, o in self._groups.items() if o.busy) | {key}
                ).get(nxt, 0.0) > 0:
                    self._linger_until = now + int(min(self.p.linger_ns, max(
                        self.p.linger_floor_ns, 2 * g.idle_ns)))
        self._update(now)

    def drained(self, client: int, now: int) -> None:
        """The process's queued work finished after its group lost the device."""
        if self._drain is None or client not in self._drain:
            return
        self._drain.discard(client)
        if not self._drain:
            self._settle(now)
            self._end_drain(now)
        self._update(now)

    def advance(self, now: int) -> None:
        """Time passed (a deadline, the control tick)."""
        self._update(now)

    def measured(self, client: int, intervals: Iterable[tuple[int, int]]) -> None:
        """GPU busy intervals the process's hook measured, used to correct
        the charges of recent hand-overs:

        * what of them ran after its group lost the device (its last queued
          work, the *tail*) is charged to the group; only the time they
          cover counts, not the span to their end (a tail the hardware
          time-slices with the new owner's work took only its part of it);
        * a new owner's window starts when its own work does: until then
          (its threads waking up, the old owner's tail) the window is given
          back. The larger of the two is refunded to the new owner, at most
          its window.
        """
        key = self._group_of.get(client)
        if key is None:
            return
        ivs = sorted(intervals)
        if not ivs:
            return
        for h in self._handovers:
            if h.old == key:
                limit = h.t + self.p.max_tail_ns
                if h.regained is not None:
                    limit = min(limit, h.regained)
                covered = 0
                cursor = h.t
                for s, e in ivs:  # the union of the intervals' parts in (h.t, limit)
                    lo, hi = max(s, cursor), min(e, limit)
                    if hi > lo:
                        covered += hi - lo
                        cursor = hi
                if covered > 0:
                    h.tail_end += covered
                    self._charge(key, covered, covered * self.scale)
                    self._refund(h)
            elif h.new == key and h.started is None:
                end = h.new_end if h.new_end is not None else None
                for s, e in ivs:
                    if e > h.t and (end is None or s < end):
                        h.started = max(h.t, s)
                        if self.debug is not None:
                            self.debug(f"started {key} {h.started - h.t}")
                        self._refund(h)
                        break
        if self.scale != 1.0:
            # Windows are charged as wall time; the clock premium goes on the
            # part of them the group's work ran in (its CPU gaps ran at no clock).
            busy = _covered(ivs, self._windows.get(key, ()))
            if busy:
                self._charge(key, 0, busy * (self.scale - 1.0))

    def _refund(self, h: _Handover) -> None:
        """Give the new owner of ``h`` back what of its window it could not use."""
        if h.new is None or h.new not in self._groups:
            return
        end = h.new_end if h.new_end is not None else self._cursor
        window = max(0, (end if end is not None else h.t) - h.t)
        gap = min(h.started - h.t, self.p.max_start_gap_ns) if h.started is not None else 0
        owed = max(0, min(window, max(h.tail_end - h.t, gap)))
        if owed > h.refunded:
            self._charge(h.new, h.refunded - owed)
            h.refunded = owed

    # ------------------------------------------------------------ decisions

    def states(self) -> dict[int, int]:
        """The gate state of every attached process."""
        out: dict[int, int] = {}
        for key, g in self._groups.items():
            owns = key == self.owner and self._drain is None
            st = RUN if owns else TAKE if key in self._take else WAIT
            for c in g.members:
                out[c] = st
        return out

    def inflight_ns(self, client: int) -> int:
        """GPU time the process may keep queued while its group owns the device."""
        key = self._group_of.get(client)
        if key is None:
            return self.p.inflight_ns
        if len(self._groups) == 1 and self.model.ceiling(key) >= 1.0:
            return 0  # alone and uncapped: nobody to hand over to, no bound
        return self.p.yield_inflight_ns if self._yields(key) else self.p.inflight_ns

    def contended(self, client: int) -> bool:
        """Whether other groups use the device (the hook then reports idleness fast)."""
        return len(self._groups) > 1

    def rate(self, client: int) -> float:
        key = self._group_of.get(client)
        return 0.0 if key is None else self._groups[key].rate

    def rates(self) -> dict[str, float]:
        """Current rate of every group with work (fraction of one GPU)."""
        return {k: g.rate for k, g in self._groups.items() if g.busy}

    def deadline(self) -> int | None:
        """When ``advance`` must next be called, if no event comes first."""
        out: list[int] = []
        now = self._accrued if self._accrued is not None else 0
        o = self._owner_group()
        if self._drain is not None:
            out.append(self._drain_until)
        elif o is not None and not o.busy and self._linger_until:
            out.append(self._linger_until)
        elif o is not None:
            out.append(self._window_start + self._window(o))
            for path, cap in self.model.caps(o.key):
                b = self._buckets.get(path)
                if b is None:
                    continue
                drain = self.scale - cap
                if drain > 0:
                    out.append(now + max(1, int(b[0] / drain) + 1))
        else:
            for g in self._groups.values():
                if not g.busy or g.rate <= 0:
                    continue
                need = 0.0
                for path, cap in self.model.caps(g.key):
                    b = self._buckets.get(path)
                    if b is not None and cap > 0:
                        need = max(need, (self._start_tokens(b) - b[0]) / cap)
                if need > 0:
                    out.append(now + int(need) + 1)
        return min(out) if out else None

    def take_usage(self) -> dict[str, int]:
        """GPU time charged per group since the last call (ns, never negative:
        a refund larger than what was charged in between waits for the next)."""
        out = {k: v for k, v in self._usage.items() if v > 0}
        self._usage = {k: v for k, v in self._usage.items() if v < 0 and k in self._groups}
        return out

    # ------------------------------------------------------------- internals

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

    def _window(self, g: _Group) -> int:
        return max(self.p.window_ns, min(self.p.max_window_ns, self.p.window_kernels * g.cost_ns))

    def _start_tokens(self, b: Sequence[float]) -> float:
        """A capped group waits for this much budget before a window: at
        least ``quantum_ns``, and its cap's share of a window, so that a
        slice held to its cap alone owns the device in windows of a few ms
        rather than slivers (each hand-over has its cost)."""
        return min(max(self.p.quantum_ns, b[1] * self.p.window_ns), self.p.bucket_ns / 2)

    def _startable(self, g: _Group) -> bool:
        """Whether g may start a window: every capped slice on its path has a
        quantum of budget, or, for one the owner draws from too (siblings
        under a capped parent), any budget: taking turns inside a capped
        slice is no new sliver of its time."""
        shared = {p for p, _ in self.model.caps(self.owner)} if self.owner is not None else set()
        for path, _cap in self.model.caps(g.key):
            b = self._buckets.get(path)
            if b is not None and (b[0] <= 0 if path in shared else b[0] < self._start_tokens(b)):
                return False
        return True

    def _can_continue(self, g: _Group) -> bool:
        for path, _cap in self.model.caps(g.key):
            b = self._buckets.get(path)
            if b is not None and b[0] <= 0:
                return False
        return True

    def _sync_buckets(self) -> None:
        """One bucket per capped slice on an attached group's path (knobs can
        change live: a new cap starts full, a removed one is dropped)."""
        want: dict[str, float] = {}
        for key in self._groups:
            for path, cap in self.model.caps(key):
                want[path] = cap
        for path in [p for p in self._buckets if p not in want]:
            del self._buckets[path]
        for path, cap in want.items():
            b = self._buckets.get(path)
            if b is None:
                self._buckets[path] = [float(self.p.bucket_ns), cap]
            else:
                b[1] = cap

    def _settle(self, now: int) -> None:
        """Charge the owner up to ``now`` and fill the buckets."""
        self._sync_buckets()
        if self._accrued is not None and now > self._accrued:
            dt = now - self._accrued
            for b in self._buckets.values():
                b[0] = min(float(self.p.bucket_ns), b[0] + b[1] * dt)
        if self._accrued is None or now > self._accrued:
            self._accrued = now
        if self.owner is not None and self._cursor is not None and now > self._cursor:
            self._charge(self.owner, now - self._cursor)  # wall time; see measured
        self._cursor = now
        o = self._owner_group()
        if o is not None:
            self._vref = o.v

    def _charge(self, key: str, ns: int, work: float | None = None) -> None:
        """Charge ``ns`` of device time (usage statistics) worth ``work`` ns
        (virtual time and caps; the time itself unless given)."""
        g = self._groups.get(key)
        if g is None:
            return
        w = float(ns) if work is None else work
        g.v += w / max(g.rate if g.rate > 0 else g.last_rate, _MIN_RATE)
        for path, _cap in self.model.caps(key):
            b = self._buckets.get(path)
            if b is not None:
                b[0] -= w
        if ns:
            self._usage[key] = self._usage.get(key, 0) + ns

    def _refresh_rates(self) -> None:
        busy = frozenset(k for k, g in self._groups.items() if g.busy)
        rates = self.model.rates(busy)
        for k, g in self._groups.items():
            g.rate = rates.get(k, 0.0)
            if g.rate > 0:
                g.last_rate = g.rate


    def _pick(self, exclude: str | None = None) -> str | None:
        best: _Group | None = None
        for key, g in self._groups.items():
            if not g.busy or g.rate <= 0 or key == exclude:
                continue
            if not (self._can_continue(g) if key == self.owner else self._startable(g)):
                continue
            if best is None or (g.v, key) < (best.v, best.key):
                best = g
        return None if best is None else best.key

    def _handover(self, now: int, new: str | None) -> None:
        old = self.owner
        self._drain = None
        self._linger_until = 0
        if old == new:
            self._window_start = now
            return
        for h in self._handovers:
            if h.new == old and h.new_end is None:
                h.new_end = now
            if h.old == new and h.regained is None:
                h.regained = now
        self._handovers.append(_Handover(t=now, old=old, new=new, tail_end=now))
        while self._handovers and self._handovers[0].t < now - self.p.history_ns:
            self._handovers.popleft()
        if old is not None and old in self._windows and self._windows[old][-1][1] < 0:
            self._windows[old][-1][1] = now
        if new is not None:
            win = self._windows.setdefault(new, collections.deque())
            win.append([now, -1])
            while win and 0 <= win[0][1] < now - self.p.history_ns:
                win.popleft()
        self.owner = new
        self._window_start = now
        self._cursor = now
        o = self._owner_group()
        if o is not None:
            self._vref = o.v
        self.handovers += 1

    def _owner_group(self) -> _Group | None:
        return self._groups.get(self.owner) if self.owner is not None else None

    def _start_drain(self, now: int, o: _Group) -> None:
        """The owner's window is over: it stops launching now, and the next
        owner gets the device once what it queued has run (``drained`` from
        each of its busy processes, or the bound)."""
        self._drain = set(o.busy)
        self._drain_until = now + max(self.p.max_drain_ns, 4 * o.cost_ns)
        self._drain_since = now

    def _end_drain(self, now: int) -> None:
        """The old owner was charged for its drain: pick afresh (usually
        the group the window's end was for)."""
        if self.debug is not None:
            self.debug(f"drain {self.owner} {now - self._drain_since} left={self._drain}")
        self._drain = None
        o = self._owner_group()
        if o is not None and self._can_continue(o) and self._pick() == o.key:
            self._window_start = now  # still the one owed most: keep it
            return
        self._handover(now, self._pick(exclude=self.owner))

    def _update(self, now: int) -> None:
        self._settle(now)
        self._refresh_rates()
        o = self._owner_group()
        if self._drain is not None:
            if not self._drain or now >= self._drain_until or o is None or not o.busy:
                self._end_drain(now)
        elif o is not None:
            if not o.busy and now < self._linger_until:
                pass  # idle for a moment: keeps the device (see linger_ns)
            elif not o.busy or o.rate <= 0:
                self._handover(now, self._pick())  # nothing queued, or yields: at once
            elif not self._can_continue(o) or now - self._window_start >= self._window(o):
                nxt = self._pick()
                if nxt != o.key and nxt is not None:
                    self._start_drain(now, o)
                elif nxt is None:
                    self._start_drain(now, o)  # out of budget: no one next
                else:
                    self._window_start = now
        if self.owner is None:
            nxt = self._pick()
            if nxt is not None:
                self._handover(now, nxt)
        self._take = self._pre_approved()

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
            if g.busy or not self._startable(g):
                continue
            rates = self.model.rates(busy | {key})
            r = rates.get(key, 0.0)
            if r <= 0:
                continue
            if o is None or rates.get(o.key, 0.0) <= 0:
                out.add(key)  # nobody owns it, or its owner yields to this group
        return out


def _covered(ivs: Sequence[tuple[int, int]], windows: Iterable[Sequence[int]]) -> int:
    """Time covered by the union of sorted intervals, within the windows."""
    total = 0
    for lo_w, hi_w in windows:
        hi_w = hi_w if hi_w >= 0 else 1 << 62
        cursor = lo_w
        for s, e in ivs:
            lo, hi = max(s, cursor), min(e, hi_w)
            if hi > lo:
                total += hi - lo
                cursor = hi
    return total


def diff_states(old: Mapping[int, int], new: Mapping[int, int]) -> dict[int, int]:
    """The processes whose gate state changed (to write and wake)."""
    return {c: s for c, s in new.items() if old.get(c) != s}
