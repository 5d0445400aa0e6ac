"""Hand-overs of one device and what the hooks' measurements later say
about them (``_arbiter``).

A hand-over does not wait for the old owner's queued work to drain: the old
owner stops launching, the new one starts, and the old owner's last GPU work
(at most ``inflight_ns`` of it, bounded in the hook) finishes meanwhile. The
hooks' measured intervals later show when it ended: that tail is charged to
the old owner and given back to the new one, and a new owner whose own work
started late (its threads waking up) gets that part of its window back.
Pure.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class Handover:
    t: int
    old: str | None
    new: str | None
    tail_end: int  # t + the tail measured so far
    refunded: int = 0  # given back to the new owner so far
    new_end: int | None = None  # when the new owner's window ended
    started: int | None = None  # when the new owner's own work began (measured)
    regained: int | None = None  # when the old owner owned the device again


#: charge(group, ns, work): what the arbiter does with a correction (negative:
#: a refund); ``work``, when given, is what it is worth in virtual time and caps
Charge = Callable[[str, int, float | None], None]


class HandoverLog:
    """Recent hand-overs of one device, corrected by measurements."""

    def __init__(self, *, max_tail_ns: int, max_start_gap_ns: int, history_ns: int) -> None:
        self.max_tail_ns = max_tail_ns
        self.max_start_gap_ns = max_start_gap_ns
        self.history_ns = history_ns
        self._log: collections.deque[Handover] = collections.deque()
        #: the hand-over that gave each owner the device (its window not
        #: ended yet), and the one that took it from each group that has
        #: not owned it since: what ``record`` updates, without walking the
        #: log (a second of hand-overs, hundreds beside a request-driven
        #: tenant, on the daemon's hand-over path)
        self._to: dict[str | None, Handover] = {}
        self._from: dict[str | None, Handover] = {}

    def record(self, now: int, old: str | None, new: str | None) -> None:
        """Ownership moved from ``old`` to ``new`` at ``now``."""
        h = self._to.pop(old, None)
        if h is not None and h.new_end is None:
            h.new_end = now
        h = self._from.pop(new, None)
        if h is not None and h.regained is None:
            h.regained = now
        h = Handover(t=now, old=old, new=new, tail_end=now)
        self._log.append(h)
        self._to[new] = h
        self._from[old] = h
        while self._log and self._log[0].t < now - self.history_ns:
            self._log.popleft()

    def measured(self, key: str, ivs: Sequence[tuple[int, int]], *, charge: Charge,
                 alive: Callable[[str], bool], cursor: int | None, scale: float,
                 debug: Callable[[str], None] | None) -> None:
        """Group ``key``'s sorted busy intervals: charge its tails, refund
        the windows it took over (see ``Arbiter.measured``). ``cursor``: how
        far the current owner is charged; ``alive``: whether a group is
        still attached."""
        for h in self._log:
            if h.old == key:
                limit = h.t + self.max_tail_ns
                if h.regained is not None:
                    limit = min(limit, h.regained)
                covered = 0
                start = h.t
                for s, e in ivs:  # the union of the intervals' parts in (h.t, limit)
                    lo, hi = max(s, start), min(e, limit)
                    if hi > lo:
                        covered += hi - lo
                        start = hi
                if covered > 0:
                    h.tail_end += covered
                    charge(key, covered, covered * scale)  # GPU work, at its clock
                    self._refund(h, charge, alive, cursor)
            elif h.new == key and h.started is None:
                end = h.new_end if h.new_end is not None else None
                for s, e in ivs:
                    if e > h.t and (end is None or s < end):
                        h.started = max(h.t, s)
                        if debug is not None:
                            debug(f"started {key} {h.started - h.t}")
                        self._refund(h, charge, alive, cursor)
                        break

    def _refund(self, h: Handover, charge: Charge, alive: Callable[[str], bool],
                cursor: int | None) -> None:
        """Give the new owner of ``h`` back what of its window it could not use."""
        if h.new is None or not alive(h.new):
            return
        end = h.new_end if h.new_end is not None else cursor
        window = max(0, (end if end is not None else h.t) - h.t)
        gap = min(h.started - h.t, self.max_start_gap_ns) if h.started is not None else 0
        owed = max(0, min(window, max(h.tail_end - h.t, gap)))
        if owed > h.refunded:
            charge(h.new, h.refunded - owed, None)
            h.refunded = owed

    def busy_in_windows(self, key: str, ivs: Sequence[tuple[int, int]]) -> int:
        """Time the sorted intervals cover inside the windows group ``key``
        owned, as far back as the log goes."""
        windows: list[tuple[int, int]] = []
        start: int | None = None
        for h in self._log:
            if h.new == key and start is None:
                start = h.t
            elif h.old == key and start is not None:
                windows.append((start, h.t))
                start = None
        if start is not None:
            windows.append((start, 1 << 62))
        total = 0
        for lo_w, hi_w in windows:
            cursor = lo_w
            for s, e in ivs:
                lo, hi = max(s, cursor), min(e, hi_w)
                if hi > lo:
                    total += hi - lo
                    cursor = hi
        return total
