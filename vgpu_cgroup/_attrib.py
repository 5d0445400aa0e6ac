"""GPU busy-time attribution: who gets charged for each instant of GPU time.

Without MPS the GPU runs one context at a time and round-robins between the
contexts that have work, so a client's own event timings include its
neighbours' time. Each instant during which k clients are busy is charged
1/k to each of them.
"""

from __future__ import annotations


class Attributor:
    """Per-device attribution of reported busy intervals up to a watermark."""

    def add(self, client: int, start_ns: int, end_ns: int) -> None:
        """Record a busy interval ``[start_ns, end_ns]`` (CLOCK_MONOTONIC)."""
        raise NotImplementedError

    def advance(self, watermark_ns: int) -> dict[int, int]:
        """Charge wall time in ``(previous watermark, watermark_ns]``; ns per client."""
        raise NotImplementedError

    def forget(self, client: int) -> None:
        """Drop a client's pending intervals (it disconnected)."""
        raise NotImplementedError
