"""GPU busy-time attribution: who is charged for each instant of GPU time.

Without MPS the GPU runs one context at a time and round-robins between the
contexts that have work, so a client's own event timings include its
neighbours' time. Each instant during which k clients are busy is charged
1/k to each of them: what the hardware's time-slicing actually gave them.

Reports arrive late and out of order (the hook publishes a batch when its end
event completes, and the daemon polls the rings every tick), so time is
only attributed up to a *watermark* the daemon keeps some tens of ms behind
now. Wall time is then split once and never revisited.
"""

from __future__ import annotations

#: Longest interval accepted; longer reports are clamped (a broken clock, a
#: client that published garbage) so one bad report cannot buy a second of debt.
MAX_INTERVAL_NS = 2_000_000_000


class Attributor:
    """One device's attribution of reported busy intervals up to a watermark.

    An interval (or the part of it) that arrives for time already advanced
    past cannot be re-split among clients whose charges were already
    published; it is charged to its client alone, in full, at the next
    ``advance``. So the per-window total can exceed wall time only through
    such late reports; the daemon's lag keeps them rare.
    """

    def __init__(self, watermark_ns: int | None = None) -> None:
        self._wm = watermark_ns
        self._pending: dict[int, list[tuple[int, int]]] = {}
        self._late: dict[int, int] = {}
        self._busy: dict[int, int] = {}

    @property
    def watermark(self) -> int | None:
        return self._wm

    def add(self, client: int, start_ns: int, end_ns: int) -> None:
        """Record a busy interval ``[start_ns, end_ns]`` (CLOCK_MONOTONIC ns).

        Empty or negative intervals are ignored; lengths above
        MAX_INTERVAL_NS are clamped (the end is kept: it is when the client
        last saw its work finish).
        """
        if end_ns <= start_ns:
            return
        if end_ns - start_ns > MAX_INTERVAL_NS:
            start_ns = end_ns - MAX_INTERVAL_NS
        wm = self._wm
        if wm is not None and start_ns < wm:
            self._late[client] = self._late.get(client, 0) + min(end_ns, wm) - start_ns
            if end_ns <= wm:
                return
            start_ns = wm
        self._pending.setdefault(client, []).append((start_ns, end_ns))

    def forget(self, client: int) -> None:
        """Drop a client's pending intervals and late charges (it disconnected)."""
        self._pending.pop(client, None)
        self._late.pop(client, None)

    def pending(self) -> int:
        """Number of intervals held (for tests of boundedness and for metrics)."""
        return sum(len(v) for v in self._pending.values())

    def last_busy(self) -> dict[int, int]:
        """Per client, the union of its busy time in the last advanced window.

        Not split with neighbours: it tells the share scheduler that a client
        held back by time-slicing still had work the whole time.
        """
        return dict(self._busy)

    def advance(self, watermark_ns: int) -> dict[int, int]:
        """Charge wall time in ``(previous watermark, watermark_ns]``; ns per client.

        Each client's own intervals are merged (union) first, so overlapping
        reports from one client (several streams) count once. The first call
        with no previous watermark starts the window at the earliest interval.
        Intervals behind the new watermark are dropped (bounded memory).
        """
        out = self._late
        self._late = {}
        self._busy = {}
        lo = self._wm
        if lo is None:
            starts = [s for segs in self._pending.values() for s, _ in segs]
            lo = min(starts) if starts else watermark_ns
        hi = watermark_ns
        if hi <= lo:
            self._wm = lo if self._wm is None else self._wm
            return out
        self._wm = hi

        # Per client: union of its intervals clipped to the window.
        merged: dict[int, list[tuple[int, int]]] = {}
        keep: dict[int, list[tuple[int, int]]] = {}
        for client, segs in self._pending.items():
            clipped = sorted((max(s, lo), min(e, hi)) for s, e in segs if s < hi and e > lo)
            rest = [(max(s, hi), e) for s, e in segs if e > hi]
            if rest:
                keep[client] = rest
            if not clipped:
                continue
            m: list[tuple[int, int]] = []
            cs, ce = clipped[0]
            for s, e in clipped[1:]:
                if s <= ce:
                    ce = max(ce, e)
                else:
                    m.append((cs, ce))
                    cs, ce = s, e
            m.append((cs, ce))
            merged[client] = m
        self._pending = keep
        if not merged:
            return out
        self._busy = {c: sum(e - s for s, e in segs) for c, segs in merged.items()}

        # Sweep: F(t) = integral of 1/k(t) from lo; a client's charge is the
        # sum of F(end) - F(start) over its intervals.
        delta: dict[int, int] = {}
        for segs in merged.values():
            for s, e in segs:
                delta[s] = delta.get(s, 0) + 1
                delta[e] = delta.get(e, 0) - 1
        F: dict[int, float] = {}
        acc = 0.0
        k = 0
        busy = 0
        prev = lo
        for p in sorted(delta):
            if k > 0:
                acc += (p - prev) / k
                busy += p - prev
            F[p] = acc
            k += delta[p]
            prev = p
        charges = {c: round(sum(F[e] - F[s] for s, e in segs)) for c, segs in merged.items()}
        # Rounding must never charge more than the GPU was busy.
        excess = sum(charges.values()) - busy
        if excess > 0:
            for c in sorted(charges, key=lambda c: -charges[c]):
                if excess == 0:
                    break
                take = min(excess, charges[c])
                charges[c] -= take
                excess -= take
        for c, v in charges.items():
            if v:
                out[c] = out.get(c, 0) + v
        return out
