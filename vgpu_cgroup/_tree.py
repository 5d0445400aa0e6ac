"""The slice tree: knobs per slice, memory admission and accounting.

Pure state, no I/O: the daemon is single-threaded, so ``reserve`` checks every
ancestor's ``gpu.memory.max`` and books the allocation in one step, which is
what makes admission exact under any concurrency of clients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._config import SliceSetting


@dataclass(frozen=True)
class Limits:
    """Effective limits of a slice: the tightest along its path from the root."""

    cores_max: float | None
    cores_min: float
    weight: int
    mem_max: int | None
    mem_high: int | None
    devices: tuple[str, ...] | None


@dataclass(frozen=True)
class Grant:
    """A reservation was admitted and booked."""

    n: int


@dataclass(frozen=True)
class Denial:
    """A reservation was refused by ``slice``'s ``gpu.memory.max``."""

    slice: str
    limit: int
    current: int


class SliceTree:
    """Slices (cgroup paths), their knobs, attached clients and usage."""

    def apply_settings(self, settings: Sequence[SliceSetting]) -> None:
        """Replace all configured knobs (later settings win)."""
        raise NotImplementedError

    def set_knobs(self, slice: str, knobs: Mapping[str, object], source: str) -> None:
        """Live change; validates all knobs first (KnobError leaves no change)."""
        raise NotImplementedError

    def attach(self, client: int, cgroup_path: str, pid: int, comm: str) -> str:
        """Put a client in the slice at ``cgroup_path``; return the canonical path."""
        raise NotImplementedError

    def detach(self, client: int) -> None:
        """Release everything the client holds and prune empty implicit slices."""
        raise NotImplementedError

    def attach_device(self, client: int, dev: str) -> None:
        """Record that the client uses device ``dev`` (a UUID)."""
        raise NotImplementedError

    def device_allowed(self, client: int, dev_uuid: str, dev_index: int) -> bool:
        """Whether every slice on the client's path allows the device."""
        raise NotImplementedError

    def reserve(self, client: int, dev: str, n: int) -> Grant | Denial:
        """Exact admission of ``n`` bytes on ``dev`` against every ancestor's max."""
        raise NotImplementedError

    def release(self, client: int, dev: str, n: int) -> None:
        """Give back ``n`` bytes; ValueError if the client holds less."""
        raise NotImplementedError

    def held(self, client: int) -> dict[str, int]:
        """Bytes the client holds, per device."""
        raise NotImplementedError

    def mem_view(self, client: int, dev: str) -> tuple[int | None, int]:
        """(limit, current) of the slice with the least headroom on the path."""
        raise NotImplementedError

    def effective_limits(self, slice: str) -> Limits:
        """Tightest limits along the slice's path."""
        raise NotImplementedError

    def show(self, slice: str) -> dict[str, Any]:
        """JSON-ready view of one slice; KeyError if unknown."""
        raise NotImplementedError

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready nested view of the whole tree."""
        raise NotImplementedError

    def add_core_usage(
        self, client: int, dev: str, usage_ns: int, throttled_ns: int, nr_throttled: int
    ) -> None:
        """Accumulate GPU-time statistics into every slice on the client's path."""
        raise NotImplementedError
