"""vgpud: one daemon, its services, its lifecycle and its control tick.

The daemon is the shell around the pure core (``_core``): it moves bytes and
fds between the kernel and the core, and decides nothing itself. Its parts,
each a unit of its own:

* the door (``_accept.Acceptor``): the listening socket, the accept loop and
  the connection bounds;
* registration (``_sessions.Sessions``): handshakes, welcomes, the end of a
  connection;
* the memory service (``_memory.MemoryService``): reservations, device
  attach, NVML reconciliation, memory views;
* the compute service (``_compute.ComputeService``): device ownership, GPU
  time measured and charged;
* the control operations (``_control.ControlOps``): status, show, tree, top,
  events, set, reset, reload;
* restart recovery (``_recovery.Recovery``): placeholders for processes
  that hold GPU memory and are not connected;
* the control tick (``_tick.ControlTick``) and the watchdog.

This module wires them together, routes each request to its service
(``_dispatch``), loads the configuration and runs until stopped.

One thread: everything runs on the daemon's thread. In production that is
the epoll host loop (``_host.run_hosted``), which serves the lane and runs
the tick itself, with trio as its guest for the rest (accepting,
handshakes, signals, the watchdog, metrics); in the in-process tests trio
runs it all. Either way each request handler runs to completion before the
next, which is what makes the tree's admission exact without locks, and no
state is shared across threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket as _stdsocket
import time
from collections.abc import Callable, Iterator
from typing import Any

import trio
import trio.lowlevel

from vgpu_cgroup._core import (
    ClientBounds,
    ClientLimits,
    ConfigError,
    DaemonConfig,
    DeviceRef,
    KnobError,
    SliceTree,
    Ticket,
    arbiter_params,
)
from vgpu_cgroup._log import get_logger
from vgpu_cgroup._wire import proto

from . import _systemd
from ._accept import Acceptor
from ._compute import ComputeService
from ._control import ControlOps
from ._files import load_slice_layers
from ._lane import MAX_OUTBUF, Lane
from ._memory import MemoryService
from ._nvml import Device
from ._recovery import Recovery
from ._session import Session
from ._sessions import SEND_TIMEOUT_S, Sessions
from ._tick import ControlTick

MAX_CONNECTIONS = ClientLimits().clients  # node-wide default: limits.clients
HANDSHAKE_TIMEOUT_S = ClientLimits().handshake_timeout_s
#: What one slice's connections may leave in the lane's buffers (see _lane):
#: requests received and not handled (a hook leaves none; each connection
#: at most a partial frame and a paused read), and replies not yet read
#: (as much as one connection may have).
SLICE_IN_MAX = 8 << 20
SLICE_OUT_MAX = MAX_OUTBUF


class Daemon:
    """One vgpud instance: configuration, devices, and the tree they feed."""

    def __init__(
        self,
        cfg: DaemonConfig,
        devices: list[Device],
        *,
        simulated: bool,
        clock: Callable[[], int] = time.monotonic_ns,
        handshake_timeout: float | None = None,
        max_connections: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.devices = {d.uuid: d for d in devices}
        self.simulated = simulated
        self.clock = clock
        # The keyword arguments win over vgpud.toml's [limits] (tests).
        limits = cfg.limits
        if handshake_timeout is not None:
            limits = dataclasses.replace(limits, handshake_timeout_s=handshake_timeout)
        if max_connections is not None:
            limits = dataclasses.replace(limits, clients=max_connections)
        self.limits = limits
        self.handshake_timeout = limits.handshake_timeout_s
        self.tick_ns = cfg.tick_ms * 1_000_000
        self.lag_ns = cfg.lag_ms * 1_000_000
        self.epoch = time.time_ns()
        self.log = get_logger()
        self.tree = SliceTree()
        self.tree.set_devices([DeviceRef(d.uuid, d.index) for d in devices])
        #: connection counts per slice and their admission (see _core._bounds)
        self.bounds = ClientBounds(limits, self.tree.clients_max_chain)
        self.clients: dict[int, Session] = {}
        # The services (see the module docstring).
        self.compute = ComputeService(self.tree, self.devices, lag_ns=self.lag_ns,
                                      clock_exponent=cfg.clock_exponent,
                                      params=arbiter_params(cfg.compute))
        self.memory = MemoryService(self.tree, self.devices, self.compute, clock=clock,
                                    log=self.log)
        self.recovery = Recovery(self.tree, self.memory, self.log)
        self.control = ControlOps(self)
        #: every connection after its handshake (see _lane)
        self.lane: Lane[Session] = Lane(self._dispatch, self._lane_closed, self._lane_failed,
                                        after=self.memory.publish_stale_views,
                                        send_timeout=SEND_TIMEOUT_S,
                                        group_in_max=SLICE_IN_MAX, group_out_max=SLICE_OUT_MAX)
        self.door = Acceptor(cfg, self.bounds, self.lane, self.log)
        self.sessions = Sessions(self, self.door)
        self.ticker = ControlTick(self)
        self.listener: trio.socket.SocketType | None = None
        #: the last configuration error (str), or None after a good load.
        self.config_error: str | None = None

    @property
    def connections(self) -> int:
        """Connections open: in a handshake or served by the lane."""
        return self.sessions.open

    @property
    def socket_activated(self) -> bool:
        """The listening socket came from systemd (vgpud.socket)."""
        return self.door.inherited

    # ------------------------------------------------------------ lifecycle

    def load_slices(self) -> None:
        """Read the slice layers into the tree; ConfigError leaves it unchanged.

        Layers, later wins: /etc/vgpu/slices, the persistent ``vgpuctl set``
        layer (control dir), the runtime layer (``--runtime``, /run).
        """
        settings = load_slice_layers(self.cfg.etc_slices_dir, self.cfg.run_slices_dir,
                                     self.cfg.control_slices_dir)
        self.tree.apply_settings(settings)
        self.config_error = None

    def reload(self) -> bool:
        """SIGHUP: re-read slice files, keeping the old state on any error.

        The error (with file and line) is logged and kept in ``config_error``
        so ``vgpuctl status`` and a failed ``vgpuctl set`` can show it.
        """
        try:
            self.load_slices()
        except ConfigError as exc:
            self.config_error = str(exc)
            self.log.error("reload failed, keeping old configuration",
                           path=exc.path, line=exc.line, error=exc.msg)
            return False
        except (KnobError, ValueError) as exc:
            self.config_error = str(exc)
            self.log.error("reload failed, keeping old configuration", error=str(exc))
            return False
        self.log.info("configuration reloaded", slices=len(self.tree.slices()))
        return True

    def bind(self) -> _stdsocket.socket:
        """The listening socket (see ``Acceptor.bind``)."""
        return self.door.bind()

    async def serve(self, sock: _stdsocket.socket | None = None, *,
                    handle_signals: bool = False, hosted: bool = False,
                    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled (or SIGTERM/SIGINT when ``handle_signals``).

        ``hosted``: trio runs as a guest of ``_host.run_hosted``, which
        serves ``self.lane`` and runs the control tick itself; otherwise
        tasks here do.
        """
        if self.cfg.identity == "declared":
            self.log.warning("identity mode 'declared': clients choose their slice; "
                             "development only, never in production")
        raw = sock if sock is not None else self.bind()
        listener = trio.socket.from_stdlib_socket(raw)  # non-blocking now
        self.listener = listener
        self.ticker.last_tick = time.monotonic()
        self.recovery.book_running_processes()
        try:
            async with trio.open_nursery() as nursery:
                if handle_signals:
                    await nursery.start(self._signals, nursery.cancel_scope)
                if not hosted:
                    nursery.start_soon(self.ticker.loop)
                    nursery.start_soon(self._lane_loop)
                nursery.start_soon(self.door.accept_loop, raw, nursery, self.sessions.start)
                nursery.start_soon(self.door.log_summaries)
                wd = _systemd.watchdog_interval()
                if wd is not None:
                    nursery.start_soon(self.ticker.watchdog, wd)
                self.log.info("vgpud ready", socket=self.cfg.socket, simulated=self.simulated,
                              devices=len(self.devices), tick_ms=self.cfg.tick_ms)
                task_status.started(self.cfg.socket)
        finally:
            listener.close()
            self.lane.close_all("vgpud stopping")
            for c in list(self.clients.values()):
                self._drop(c)
            if not self.door.inherited:
                with contextlib.suppress(OSError):
                    os.unlink(self.cfg.socket)

    async def _signals(self, scope: trio.CancelScope,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as sigs:
            task_status.started()
            async for sig in sigs:
                if sig == signal.SIGHUP:
                    self.reload()
                else:
                    self.log.info("stopping", signal=signal.Signals(sig).name)
                    scope.cancel()
                    return

    async def _lane_loop(self) -> None:
        """Drive the lane from trio: serve it whenever its epoll fd is readable."""
        while True:
            await trio.lowlevel.wait_readable(self.lane.fileno())
            self.lane.run_ready()

    # ------------------------------------------------------------ connections

    def _register(self, hello: proto.Hello, pid: int, uid: int, slc: str | None = None,
                  ticket: Ticket | None = None) -> Session:
        """A peer's registration (see ``Sessions.register``)."""
        return self.sessions.register(hello, pid, uid, slc, ticket)

    def _drop(self, client: Session) -> None:
        """A connection's end (see ``Sessions.drop``)."""
        self.sessions.drop(client)

    def _lane_closed(self, client: Session, why: str | None) -> None:
        self.sessions.lane_closed(client, why)

    def _lane_failed(self, client: Session, exc: BaseException) -> None:
        self.sessions.lane_failed(client, exc)

    # ------------------------------------------------------------ requests

    def _dispatch(self, client: Session, ev: proto.Event) -> proto.Reply | None:
        """The lane's handler: each request to its service, run to completion."""
        if type(ev) is proto.Reserve:
            return self.memory.reserve(client, ev)
        if type(ev) is proto.Release:
            self.memory.release(client, ev)
            return None
        if type(ev) is proto.Want:
            client.device_of(ev.slot, None)
            self.compute.want(client, ev.slot, self.clock(), ev.at)
            return None
        if type(ev) is proto.Idle:
            client.device_of(ev.slot, None)
            self.compute.idle(client, ev.slot, self.clock())
            return None
        if type(ev) is proto.Drained:
            client.device_of(ev.slot, None)
            self.compute.drained(client, ev.slot, self.clock())
            return None
        if isinstance(ev, proto.Attach):
            return self.memory.attach(client, ev)
        if isinstance(ev, proto.Ctl):
            return self.control.handle(client, ev)
        raise proto.ProtocolError("order", f"unexpected {type(ev).__name__}")

    # ------------------------------------------------------------ views

    def snapshot(self) -> dict[str, Any]:
        """The tree with per-process counters (metrics; see ``ControlOps.snapshot``)."""
        return self.control.snapshot()

    # ------------------------------------------------------------ control tick

    def next_deadline(self) -> float | None:
        return self.ticker.next_deadline()

    def run_due(self) -> None:
        self.ticker.run_due()

    def guarded_tick(self) -> Iterator[None]:
        """One control tick in chunks, for the host loop (see ``ControlTick``)."""
        return self.ticker.guarded()

    def tick(self) -> None:
        """One control step, all at once (the loops run it in chunks)."""
        for _ in self.ticker.steps():
            pass
