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

from collections.abc import Callable, Iterable, Mapping

from ._device import _MIN_RATE, ArbiterParams, DeviceGroups, Group
from ._handovers import HandoverLog
from ._lookahead import hold_window, resume_at
from ._share import ShareModel

__all__ = ["HOLD", "RUN", "TAKE", "WAIT", "Arbiter", "ArbiterParams", "diff_states"]

#: Gate states, as in ``vgpu_abi.h``.
WAIT = 0
RUN = 1
TAKE = 2
HOLD = 3

class Arbiter(DeviceGroups):
    """Ownership and charges of one device (see the module docstring); the
    groups and what they are charged are ``DeviceGroups``' (``_device``)."""

    def __init__(self, model: ShareModel, params: ArbiterParams | None = None) -> None:
        super().__init__(model, params)
        self.owner: str | None = None
        self._window_start = 0
        self._cursor: int | None = None  # owner charged up to here
        self._accrued: int | None = None
        #: recent hand-overs, for the measured tails (``_handovers``)
        self._log = HandoverLog(max_tail_ns=self.p.max_tail_ns,
                                max_start_gap_ns=self.p.max_start_gap_ns,
                                history_ns=self.p.history_ns)
        #: a hand-over waiting for the old owner's work to drain: the members
        #: that have not said ``drained`` yet, and when it goes ahead anyway
        self._drain: set[int] | None = None
        self._drain_until = 0
        self._drain_since = 0
        #: an idle owner keeps the device until then (0: not lingering)
        self._linger_until = 0
        self.handovers = 0  # counter, for stats and tests
        self.debug: Callable[[str], None] | None = None

    # ----------------------------------------------------------- membership

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
            self._take.discard(key)
        self._update(now)

    # --------------------------------------------------------------- events

    def want(self, client: int, now: int, at: int | None = None) -> None:
        """The process has work for the device (it launched, or waits to;
        ``at``: when, by its hook's clock, if it said)."""
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
        if woke:
            g.note_wake(at if at is not None and now - self.p.window_ns <= at <= now else now)
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
            if o is not None and g.rate > 0 and self.buckets.startable(g.key, self.owner):
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
            g.note_spell(now)
            if key == self.owner and self._drain is None and 2 * g.idle_ns < self.p.linger_ns:
                self._linger(now, g)
        self._update(now)

    def _linger(self, now: int, g: Group) -> None:
        """An idle owner keeps the device for about twice its usual idle
        spell if the group next in line would not yield to it (see
        ``ArbiterParams.linger_ns``)."""
        self._refresh_rates()
        nxt = self._pick()
        busy = frozenset(k for k, o in self._groups.items() if o.busy) | {g.key}
        if nxt is not None and self.model.rates(busy).get(nxt, 0.0) > 0:
            self._linger_until = now + int(min(self.p.linger_ns, max(
                self.p.linger_floor_ns, 2 * g.idle_ns)))

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
        scale = self.group_scale(key)
        self._log.measured(key, ivs, charge=self._charge, alive=self._groups.__contains__,
                           cursor=self._cursor, scale=scale, debug=self.debug)
        if scale != 1.0:
            # Windows are charged as wall time; the clock premium goes on the
            # part of them the group's work ran in (its CPU gaps ran at no clock).
            busy = self._log.busy_in_windows(key, ivs)
            if busy:
                self._charge(key, 0, busy * (scale - 1.0))

    # ------------------------------------------------------------ decisions

    def states(self) -> dict[int, int]:
        """The gate state of every attached process."""
        out: dict[int, int] = {}
        for key, g in self._groups.items():
            owns = key == self.owner and self._drain is None
            st = ((HOLD if self.hold is not None else RUN) if owns
                  else TAKE if key in self._take
                  else HOLD if self.resume is not None and self.resume[0] == key else WAIT)
            for c in g.members:
                out[c] = st
        return out

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
            out.extend(self.buckets.empty_deadlines(o.key, now, self.group_scale(o.key)))
            if self.hold is not None:
                out.append(self.hold[1])  # the hooks enforce its start
        else:
            for g in self._groups.values():
                if not g.busy or g.rate <= 0:
                    continue
                need = self.buckets.refill_wait(g.key)
                if need > 0:
                    out.append(now + int(need) + 1)
        return min(out) if out else None

    # ------------------------------------------------------------- internals

    def _settle(self, now: int) -> None:
        """Charge the owner up to ``now`` and fill the buckets."""
        self.buckets.sync(self._groups)
        if self._accrued is not None and now > self._accrued:
            self.buckets.fill(now - self._accrued)
        if self._accrued is None or now > self._accrued:
            self._accrued = now
        if self.owner is not None and self._cursor is not None and now > self._cursor:
            self._charge(self.owner, now - self._cursor)
        self._cursor = now
        o = self._owner_group()
        if o is not None:
            self._vref = o.v

    def _handover(self, now: int, new: str | None) -> None:
        old = self.owner
        self._drain = None
        self._linger_until = 0
        if old == new:
            self._window_start = now
            return
        self._log.record(now, old, new)
        self.owner = new
        self._window_start = now
        self._cursor = now
        o = self._owner_group()
        if o is not None:
            self._vref = o.v
        self.handovers += 1

    def _start_drain(self, now: int, o: Group) -> None:
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
        if o is not None and self.buckets.can_continue(o.key) and self._pick() == o.key:
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
            elif (not self.buckets.can_continue(o.key)
                  or now - self._window_start >= self._window(o)):
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
        o = self._owner_group()
        self.hold = self.resume = None
        if o is not None and o.busy and self._drain is None:
            if self._take:
                self.hold = hold_window(now, [self._groups[k] for k in self._take], self.p)
            nxt = self._next_after(o.key)
            at = resume_at(o, nxt, nxt is not None and self._gives_way(nxt, o.key), self.p)
            self.resume = None if nxt is None or at is None else (nxt, at)


def diff_states(old: Mapping[int, int], new: Mapping[int, int]) -> dict[int, int]:
    """The processes whose gate state changed (to write and wake)."""
    return {c: s for c, s in new.items() if old.get(c) != s}
