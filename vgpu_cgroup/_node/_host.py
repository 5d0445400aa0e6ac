"""vgpud's main loop: a plain epoll loop that serves the request lane, runs
the control tick, and runs trio as a guest (``trio.lowlevel.start_guest_run``).

Every request from a CUDA program (a reservation above all) is then read,
answered and written without passing through trio's scheduler, and the
tick, in chunks (``Daemon.guarded_tick``), with the lane served between
them. Trio runs everything else (accepting and the handshake, signals, the
watchdog, metrics) in the same thread, between requests: its guest mode
does its I/O waits in a helper thread and asks this loop, through
``run_sync_soon_threadsafe``, to run its next batch of tasks here. So all of
the daemon's state is still touched by one thread only.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol

import trio

#: How long after a reply the loop waits before a chunk of the tick (see
#: run_hosted). Measured on the 2-core test machine (64 clients, 1,000
#: reservations/s, round trip p99): without the wait 204-301 us, waiting
#: 50 us 143-287 us, 100 us 200-213 us in three alternating pairs.
#: sched_yield() did about as well as 50 us, but what it does depends on
#: the scheduler, and waiting gives up the CPU under any.
GRACE_S = 100e-6


class _Lane(Protocol):
    @property
    def replied_at(self) -> float: ...
    @property
    def closed(self) -> bool: ...
    def watch(self, fd: int) -> None: ...
    def run_ready(self) -> int: ...
    def poll(self, timeout: float) -> tuple[list[int], int]: ...


class _Served(Protocol):
    """What the host loop needs of the daemon (``_daemon.Daemon``)."""

    @property
    def lane(self) -> _Lane: ...
    @property
    def tick_ns(self) -> int: ...
    def guarded_tick(self) -> Iterator[None]: ...
    def next_deadline(self) -> float | None: ...
    def run_due(self) -> None: ...


def run_hosted(daemon: _Served, async_fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Run ``async_fn(*args)`` as trio would, serving ``daemon.lane`` and
    running ``daemon``'s control tick in between; return its result or raise
    its exception."""
    lane = daemon.lane
    todo: collections.deque[Callable[[], object]] = collections.deque()
    wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    done: list[Any] = []  # trio's outcome of async_fn
    try:
        # One epoll set for the connections and trio's wake-ups: a request
        # then costs one epoll_wait, not two.
        lane.watch(wake)

        def soon_threadsafe(fn: Callable[[], object]) -> None:
            todo.append(fn)  # deque.append is atomic; the write wakes a waiting poll
            os.eventfd_write(wake, 1)

        trio.lowlevel.start_guest_run(
            async_fn, *args,
            run_sync_soon_threadsafe=soon_threadsafe,
            run_sync_soon_not_threadsafe=todo.append,
            done_callback=done.append,
        )

        def settle() -> None:
            # A client woken by a reply is often queued on this CPU (the
            # kernel puts a wakee near its waker), and would wait out the
            # whole tick behind us: on the 2-core test machine that was most
            # of the reservation p99. So before a chunk of tick work, if
            # anyone was answered under GRACE_S ago, wait out the rest
            # (serving any request that comes), which lets them run.
            wait = lane.replied_at + GRACE_S - time.monotonic()
            if wait > 0:
                lane.poll(wait)

        period = daemon.tick_ns / 1e9
        next_tick = time.monotonic() + period
        while not done:
            until = next_tick
            due = daemon.next_deadline()
            if due is not None and due < until:
                until = due
            timeout = 0.0 if todo else max(0.0, until - time.monotonic())
            if lane.closed:  # trio is finishing after the daemon closed the lane
                woke = bool(select.select([wake], [], [], timeout)[0])
            else:
                woke = bool(lane.poll(timeout)[0])
            if woke:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(wake)
            now = time.monotonic()
            if due is not None and now >= due:
                daemon.run_due()  # an ownership deadline: a hand-over, not the tick
            if now >= next_tick:
                # The tick in chunks, with the lane served between them.
                settle()
                for _ in daemon.guarded_tick():
                    lane.run_ready()
                    settle()
                next_tick += period
                if next_tick < now:  # fell behind (suspended?): don't catch up in a burst
                    next_tick = now + period
            # Run what trio asked for until now (one batch of its tasks, or
            # its I/O results), then look at the lane again.
            for _ in range(len(todo)):
                todo.popleft()()
    finally:
        os.close(wake)
    return done[0].unwrap()
