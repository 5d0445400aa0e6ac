"""Budgets of capped slices on one device: a token bucket per slice with a
``gpu.cores.max`` on the path of a group attached to the device, filled at
the cap's rate of wall time (up to ``bucket_ns``) and emptied by what its
groups are charged (``_arbiter``). A group may start a window only with
enough in every bucket on its path, and must give the device up when one is
empty. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable

from ._share import ShareModel


class CapBuckets:
    """The token buckets of one device's arbiter (see the module docstring)."""

    def __init__(self, model: ShareModel, *, bucket_ns: int, quantum_ns: int,
                 window_ns: int) -> None:
        self.model = model
        self.bucket_ns = bucket_ns
        self.quantum_ns = quantum_ns
        self.window_ns = window_ns
        self._b: dict[str, list[float]] = {}  # slice -> [tokens ns, cap fraction]
        #: whether one group alone is attached to the device (``sync``)
        self.alone = False

    def tokens(self) -> dict[str, float]:
        """Tokens (ns) per capped slice, for tracing."""
        return {path: b[0] for path, b in self._b.items()}

    def start_tokens(self, b: list[float]) -> float:
        """A capped group waits for this much budget before a window, at
        least ``quantum_ns``: beside other groups, its cap's share of a
        window; alone on the device, enough to own it for about a window
        (the bucket drains at 1 - cap while it does). Each hand-over costs a
        capped tenant alone its pipeline (a PyTorch trainer capped at 30 did
        0.71 of its charged time's work in windows of 8 ms, 0.97 in windows
        of 25 ms: H200); beside others the larger budget made the simulated
        GPU's slices that share a device under caps lose up to 0.035 of
        their share to the waits."""
        share = (1.0 - b[1]) if self.alone else b[1]
        return min(max(self.quantum_ns, share * self.window_ns), self.bucket_ns / 2)

    def startable(self, key: str, owner: str | None = None) -> bool:
        """Whether group ``key`` may start a window: every capped slice on
        its path has a quantum of budget, or, for one the owner draws from
        too (siblings under a capped parent), any budget: taking turns inside
        a capped slice is no new sliver of its time."""
        shared = {p for p, _ in self.model.caps(owner)} if owner is not None else set()
        for path, _cap in self.model.caps(key):
            b = self._b.get(path)
            if b is not None and (b[0] <= 0 if path in shared else b[0] < self.start_tokens(b)):
                return False
        return True

    def can_continue(self, key: str) -> bool:
        """Whether group ``key`` may keep the device (no bucket on its path empty)."""
        for path, _cap in self.model.caps(key):
            b = self._b.get(path)
            if b is not None and b[0] <= 0:
                return False
        return True

    def sync(self, groups: Iterable[str]) -> None:
        """One bucket per capped slice on an attached group's path (knobs can
        change live: a new cap starts full, a removed one is dropped)."""
        want: dict[str, float] = {}
        keys = list(groups)
        self.alone = len(keys) == 1
        for key in keys:
            for path, cap in self.model.caps(key):
                want[path] = cap
        for path in [p for p in self._b if p not in want]:
            del self._b[path]
        for path, cap in want.items():
            b = self._b.get(path)
            if b is None:
                self._b[path] = [float(self.bucket_ns), cap]
            else:
                b[1] = cap

    def fill(self, dt: int) -> None:
        """``dt`` ns of wall time passed: every bucket gains its cap's share."""
        for b in self._b.values():
            b[0] = min(float(self.bucket_ns), b[0] + b[1] * dt)

    def spend(self, key: str, scaled: float) -> None:
        """Group ``key`` was charged ``scaled`` ns: every bucket on its path pays."""
        for path, _cap in self.model.caps(key):
            b = self._b.get(path)
            if b is not None:
                b[0] -= scaled

    def empty_deadlines(self, key: str, now: int, scale: float) -> list[int]:
        """When, at the owner ``key``'s charge rate (``scale``), each bucket on
        its path runs out."""
        out: list[int] = []
        for path, cap in self.model.caps(key):
            b = self._b.get(path)
            if b is None:
                continue
            drain = scale - cap
            if drain > 0:
                out.append(now + max(1, int(b[0] / drain) + 1))
        return out

    def refill_wait(self, key: str) -> float:
        """How long (ns) until group ``key`` may start a window (0: now)."""
        need = 0.0
        for path, cap in self.model.caps(key):
            b = self._b.get(path)
            if b is not None and cap > 0:
                need = max(need, (self.start_tokens(b) - b[0]) / cap)
        return need
