"""The share algorithm: GPU-time rates per client and their token budgets.

Every control tick the daemon hands in what each active client was charged
and whether it was throttled; the scheduler splits each device's time down
the slice tree (mins first, then weights, water-filling under every max) and
moves each client's budget by ``rate * tick - charged``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ._tree import SliceTree


@dataclass
class ClientDemand:
    """What one client did on one device during the last tick."""

    client: int
    dev: str
    charged_ns: int
    throttled: bool


@dataclass
class Budget:
    """What the daemon writes into the client's ctl page for one device."""

    tokens_ns: int
    unlimited: bool
    rate_ppm: int


class ShareScheduler:
    """Computes per-client rates and budgets from the tree every tick."""

    def __init__(
        self,
        tree: SliceTree,
        tick_ns: int = 10_000_000,
        burst_ticks: int = 5,
        debt_ticks: int = 50,
    ) -> None:
        self.tree = tree
        self.tick_ns = tick_ns
        self.burst_ticks = burst_ticks
        self.debt_ticks = debt_ticks

    def tick(self, demands: Sequence[ClientDemand]) -> dict[tuple[int, str], Budget]:
        """One control step: a Budget for every attached client-device pair."""
        raise NotImplementedError
