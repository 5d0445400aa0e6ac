"""The control tick: every ``tick_ms`` (10 ms) the compute service reads the
hooks' stat pages and charges GPU time, the memory service reconciles NVML
(every OVERHEAD_EVERY_TICKS ticks) and republishes memory views, and the
lane expires stalled connections. The watchdog pings systemd only while the
tick keeps running.

The tick runs in chunks (``steps`` is a generator that yields after every
chunk of clients), so the host loop answers requests in between: a
reservation waits for at most one chunk. Ownership itself moves on events
and deadlines (``_compute``), not at ticks; ``run_due`` runs those.

One thread: the host loop (``_host``) or, in the in-process tests, a trio
task runs the tick on the daemon's thread, between requests, never during
one.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import trio
import trio.lowlevel

from . import _systemd
from ._compute import ComputeService
from ._control import TOP_WINDOW_NS
from ._memory import OVERHEAD_EVERY_TICKS, MemoryService
from ._nvml import Device, clocks, max_sm_clock
from ._recovery import Recovery
from ._session import Session

CLOCK_EVERY_TICKS = 5  # SM clock and utilization sampled every 50 ms


class _Lane(Protocol):
    def expire(self, now: float) -> None: ...


class TickHost(Protocol):
    """What the tick needs of the daemon (``_daemon.Daemon``)."""

    @property
    def devices(self) -> Mapping[str, Device]: ...
    @property
    def simulated(self) -> bool: ...
    @property
    def clock(self) -> Callable[[], int]: ...
    @property
    def tick_ns(self) -> int: ...
    @property
    def clients(self) -> Mapping[int, Session]: ...
    @property
    def lane(self) -> _Lane: ...
    @property
    def compute(self) -> ComputeService: ...
    @property
    def memory(self) -> MemoryService: ...
    @property
    def recovery(self) -> Recovery: ...
    @property
    def log(self) -> Any: ...


class ControlTick:
    """The daemon's periodic work (see the module docstring)."""

    def __init__(self, host: TickHost) -> None:
        self.d = host
        self._errors = 0
        self._ticks = 0
        # Charges are scaled to the full-load clock where the driver reports
        # clocks (see _core._clock); the simulated GPU does not, so it is plain time.
        self._max_mhz = {uuid: None if host.simulated else max_sm_clock(d.index)
                         for uuid, d in host.devices.items()}
        trace = os.environ.get("VGPU_DEBUG_TICK")
        self._trace = open(trace, "a", buffering=1 << 16) if trace else None  # noqa: SIM115
        #: time.monotonic() when the last tick started; the watchdog checks it.
        self.last_tick = 0.0

    def next_deadline(self) -> float | None:
        """When the compute service must next run (time.monotonic()), if before a tick."""
        due = self.d.compute.deadline()
        return None if due is None else due / 1e9

    def run_due(self) -> None:
        """Run the compute service's due deadlines (hand-overs at a window's end)."""
        self.d.compute.run_due(self.d.clock())

    async def loop(self) -> None:
        """The control tick from trio (when no host loop runs it)."""
        deadline = trio.current_time()
        period = self.d.tick_ns / 1e9
        while True:
            deadline += period
            now = trio.current_time()
            if deadline < now - period:  # fell behind (suspended?): don't catch up in a burst
                deadline = now + period
            while True:
                due = self.next_deadline()
                wait = deadline - trio.current_time()
                if due is not None:
                    wait = min(wait, due - time.monotonic())
                if wait > 0:
                    await trio.sleep(wait)
                if trio.current_time() >= deadline:
                    break
                self.run_due()
            # Between chunks other tasks run: a reservation waits for at
            # most one chunk of the tick, not all of it.
            for _ in self.guarded():
                await trio.lowlevel.checkpoint()

    async def watchdog(self, period: float) -> None:
        """WATCHDOG=1 every ``period`` from this loop, only while the control
        tick keeps running: a wedged loop or a stuck tick stops the pings and
        systemd restarts us (clients keep their grants and reconnect)."""
        while True:
            await trio.sleep(period)  # first ping after READY=1, not before
            if time.monotonic() - self.last_tick < max(period, 10 * self.d.tick_ns / 1e9):
                with contextlib.suppress(OSError):
                    _systemd.notify("WATCHDOG=1")

    def guarded(self) -> Iterator[None]:
        """``steps`` for a loop: a failing tick is logged (rate-limited) and
        the loop goes on; the next tick starts afresh."""
        self.last_tick = time.monotonic()
        try:
            yield from self.steps()
        except Exception:
            self._errors += 1
            if self._errors in (1, 10, 100) or self._errors % 1000 == 0:
                self.d.log.exception("control tick failed", count=self._errors)

    def steps(self) -> Iterator[None]:
        """One control step: measurements, charges, memory views.

        A generator that yields after every chunk of clients polled or
        published (``_compute.TICK_CHUNK``, ``_memory.TICK_CHUNK``), so the
        host loop can answer requests in between. Clients that connect or
        leave while the tick is under way are skipped until the next one.
        """
        d = self.d
        compute, memory = d.compute, d.memory
        now = d.clock()
        d.lane.expire(time.monotonic())
        if not d.simulated and self._ticks % CLOCK_EVERY_TICKS == 0:
            for uuid, dev in d.devices.items():
                got = clocks(dev.index)
                if got is not None:
                    compute.clock[uuid].sample(got[0], got[1], self._max_mhz[uuid], got[2])
                    compute.arbiters[uuid].note_power(got[2])
        clients = list(d.clients.values())
        yield from compute.tick_steps([c for c in clients if c.in_tree], now)
        compute.trim_window(now, TOP_WINDOW_NS)
        if self._trace is not None and compute.window:
            self._trace_tick(now, compute.window[-1][1])
        self._ticks += 1
        if self._ticks % OVERHEAD_EVERY_TICKS == 0:
            yield
            # In one step with the NVML query: a release served in between
            # would be booked as overhead (NVML still shows that memory).
            per_dev = {uuid: memory.nvml_used(uuid) for uuid in d.devices}
            d.recovery.expire(per_dev)
            memory.reconcile_all(d.clients.values(), now, per_dev)
        yield from memory.publish_views(clients, d.clients.__contains__, self._ticks)

    def _trace_tick(self, now: int, usage: dict[tuple[str, str], int]) -> None:
        """VGPU_DEBUG_TICK=FILE: one line per busy slice, device and tick (its
        rate, the GPU time charged to it and the device's hand-overs so far),
        for tuning against a real GPU. Off unless asked for."""
        assert self._trace is not None
        compute = self.d.compute
        for (path, uuid), rate in compute.slice_rates().items():
            arb = compute.arbiters[uuid]
            clk = compute.clock[uuid]
            self._trace.write(
                f"{now} {uuid[-8:]} {path} {rate:.4f} {usage.get((path, uuid), 0)} "
                f"{int(arb.owner == path)} {arb.handovers} {clk.now_mhz or 0:.0f} "
                f"{clk.full_mhz or 0:.0f}\n")
