"""vgpud's I/O shell: sockets, shared memory and the control tick, in trio.

Everything that decides anything lives in the pure core (_tree, _share,
_attrib, _config); this module only moves bytes and fds between the kernel
and it.  trio runs everything on one thread, so each request handler runs
to completion before the next: that is what makes the tree's admission
exact without locks.

Isolation: each connection is its own task; anything that goes wrong in
one (bad frames, a vanished peer, a bug) is caught there, logged, and only
that connection is closed.
"""

from __future__ import annotations

import array
import collections
import contextlib
import dataclasses
import errno
import os
import signal
import socket as _stdsocket
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.lowlevel
from structlog.typing import FilteringBoundLogger

import vgpu_cgroup
from vgpu_cgroup import _protocol as proto
from vgpu_cgroup import _systemd
from vgpu_cgroup._bounds import ClientBounds, ClientLimits, Refusal, Ticket
from vgpu_cgroup._compute import ComputeService
from vgpu_cgroup._config import (
    CONTROL_HEADER,
    ConfigError,
    DaemonConfig,
    load_slice_layers,
    remove_slice_setting,
    write_runtime_setting,
)
from vgpu_cgroup._identity import cgroup_of_pid, peer_cgroup, peer_pid_uid
from vgpu_cgroup._knobs import KnobError
from vgpu_cgroup._lane import MAX_OUTBUF, Lane
from vgpu_cgroup._log import Throttle, get_logger
from vgpu_cgroup._nvml import (
    Device,
    NvmlError,
    clocks,
    max_sm_clock,
    process_memory,
    process_util,
)
from vgpu_cgroup._overhead import AUDIT_BYTES, QUIET_NS, overhead_target
from vgpu_cgroup._shm import MAX_DEVICES, ClientShm
from vgpu_cgroup._tree import Denial, SliceTree

MAX_CONNECTIONS = ClientLimits().clients  # node-wide default: limits.clients
MAX_CTX_ESTIMATE = 2 << 30  # larger unreserved use is not a context: not learned
CLOCK_EVERY_TICKS = 5  # SM clock and utilization sampled every 50 ms
#: Headroom below which a reservation reads NVML before admission (see _dispatch).
NVML_GUARD_BYTES = 256 << 20
#: Memory views of neighbours' bookings are republished every this many ticks.
VIEW_EVERY_TICKS = 5
#: Clients polled or published between two checkpoints of the tick.
TICK_CHUNK = 16
OVERHEAD_EVERY_TICKS = 20  # NVML per-process memory is reconciled every 20 ticks (200 ms)
HANDSHAKE_TIMEOUT_S = ClientLimits().handshake_timeout_s
#: What one slice's connections may leave in the lane's buffers (see _lane):
#: requests received and not handled (a hook leaves none; each connection
#: at most a partial frame and a paused read), and replies not yet read
#: (as much as one connection may have).
SLICE_IN_MAX = 8 << 20
SLICE_OUT_MAX = MAX_OUTBUF
#: Refusals are logged once per slice and this interval (then summarised);
#: other lines about connections (attach, detach, errors) up to
#: CONN_LOG_BURST per slice and CONN_LOG_S.
REFUSAL_LOG_S = 10.0
CONN_LOG_S = 10.0
CONN_LOG_BURST = 100
#: A handshake slower than this is worth a warning (registration's goal is 5 ms).
SLOW_HANDSHAKE_S = 1.0
SEND_TIMEOUT_S = 5.0
#: Connections accepted per wake-up of the accept loop (see _accept_loop).
ACCEPT_BATCH = 8
TOP_WINDOW_NS = 1_000_000_000
RECV_CHUNK = 65536


@dataclass
class _Client:
    """Daemon-side state of one connection after its hello."""

    id: int
    role: str
    pid: int
    uid: int
    comm: str
    slice: str
    log: FilteringBoundLogger
    shm: ClientShm | None = None
    slots: dict[int, str] = field(default_factory=dict)  # slot -> device UUID
    dev_slot: dict[str, int] = field(default_factory=dict)
    in_tree: bool = False
    overhead: dict[str, int] = field(default_factory=dict)  # dev -> booked overhead bytes
    overhead_checked: dict[str, int] = field(default_factory=dict)  # dev -> clock ns
    last_grant_ns: int = 0
    audited: bool = False
    readmitted: bool = False  # re-declared held memory after a daemon restart
    #: slots whose cuMemGetInfo view a release changed, published after the
    #: replies to the same read are sent (a grant in that read publishes it)
    stale_views: set[int] = field(default_factory=set)
    #: devices on which a reservation has read NVML (see _reserve_looking)
    looked: set[str] = field(default_factory=set)
    #: the connection's charge in the slice's bounds (see _bounds)
    ticket: Ticket | None = None

    @property
    def slice_key(self) -> str:
        """The slice the connection is charged to: its cgroup at accept
        (``slice`` differs in ``declared`` identity mode)."""
        return self.ticket.slice if self.ticket is not None else self.slice


class _Close(Exception):
    """End this connection quietly (peer went away)."""


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
        self.tree = SliceTree()
        #: connection counts per slice and their admission (see _bounds)
        self.bounds = ClientBounds(limits, self.tree.clients_max_chain)
        self._refusal_log = Throttle(REFUSAL_LOG_S)
        self._conn_log = Throttle(CONN_LOG_S, burst=CONN_LOG_BURST)
        self.compute = ComputeService(self.tree, self.devices, lag_ns=self.lag_ns,
                                      clock_exponent=cfg.clock_exponent)
        self.clients: dict[int, _Client] = {}
        self.connections = 0
        #: every connection after its handshake (see _lane)
        #: what the last tick published from (see tick_steps)
        self._published: tuple[tuple[int, int], int] = ((-1, -1), -1)
        self.lane: Lane[_Client] = Lane(self._dispatch, self._lane_closed, self._lane_failed,
                                        after=self._publish_stale_views,
                                        send_timeout=SEND_TIMEOUT_S,
                                        group_in_max=SLICE_IN_MAX, group_out_max=SLICE_OUT_MAX)
        self.log = get_logger()
        self._next_id = 1
        self._tick_errors = 0
        self._ticks = 0
        self._nvml_warned = False
        self._ghosts: dict[int, int] = {}  # pid -> placeholder client id (-pid)
        # Charges are scaled to the full-load clock where the driver reports
        # clocks (see _clock); the simulated GPU does not, so it is plain time.
        self._max_mhz = {uuid: None if simulated else max_sm_clock(d.index)
                         for uuid, d in self.devices.items()}
        trace = os.environ.get("VGPU_DEBUG_TICK")
        self._tick_trace = open(trace, "a", buffering=1 << 16) if trace else None  # noqa: SIM115
        #: per device, the largest context+module overhead seen (bytes)
        self._ctx_estimate: dict[str, int] = {}
        self.listener: trio.socket.SocketType | None = None
        self._inherited = False
        #: time.monotonic() when the last tick started; the watchdog checks it.
        self.last_tick = 0.0
        #: the last configuration error (str), or None after a good load.
        self.config_error: str | None = None

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
        """The listening socket: inherited (socket activation) or bound here.

        An inherited socket belongs to vgpud.socket: it is never unlinked, so
        clients find the same path across a restart of the service.
        """
        fds = _systemd.listen_fds()
        if fds:
            self._inherited = True
            sock = _stdsocket.socket(fileno=fds[0])
            for extra in fds[1:]:
                os.close(extra)
            with contextlib.suppress(OSError):
                name = sock.getsockname()
                if isinstance(name, str) and name:
                    self.cfg.socket = name
            return sock
        path = self.cfg.socket
        parent = os.path.dirname(path) or "."
        os.makedirs(parent, mode=0o755, exist_ok=True)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
            probe = _stdsocket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale socket of a dead daemon
            else:
                raise OSError(errno.EADDRINUSE, f"another vgpud is listening on {path}")
            finally:
                probe.close()
        raw = _stdsocket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM)
        try:
            raw.bind(path)
            # Anyone may connect: identity comes from the kernel, not permissions.
            os.chmod(path, 0o666)
            raw.listen(512)
        except BaseException:
            raw.close()
            raise
        return raw

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
        self.last_tick = time.monotonic()
        self.book_running_processes()
        try:
            async with trio.open_nursery() as nursery:
                if handle_signals:
                    await nursery.start(self._signals, nursery.cancel_scope)
                if not hosted:
                    nursery.start_soon(self._tick_loop)
                    nursery.start_soon(self._lane_loop)
                nursery.start_soon(self._accept_loop, raw, nursery)
                nursery.start_soon(self._log_summaries)
                wd = _systemd.watchdog_interval()
                if wd is not None:
                    nursery.start_soon(self._watchdog, wd)
                self.log.info("vgpud ready", socket=self.cfg.socket, simulated=self.simulated,
                              devices=len(self.devices), tick_ms=self.cfg.tick_ms)
                task_status.started(self.cfg.socket)
        finally:
            listener.close()
            self.lane.close_all("vgpud stopping")
            for c in list(self.clients.values()):
                self._drop(c)
            if not self._inherited:
                with contextlib.suppress(OSError):
                    os.unlink(self.cfg.socket)

    def book_running_processes(self) -> None:
        """Book the GPU memory of every process already on the devices into
        its slice, before the first client is admitted.

        After a daemon restart the clients reconnect one by one; until a
        client has re-declared what it holds, its memory would be missing
        from the books and a neighbour could be admitted past a cap. So each
        process NVML shows is booked as a placeholder ("ghost") in its
        cgroup's slice, replaced by the real client when it reconnects and
        dropped when the process is gone.
        """
        for uuid in self.devices:
            for pid, n in (self._nvml_used(uuid) or {}).items():
                if pid != os.getpid():
                    self._book_ghost(pid, uuid, n)
        if self._ghosts:
            self.log.info("booked memory of running GPU processes until they reconnect",
                          processes=len(self._ghosts))

    def _book_ghost(self, pid: int, uuid: str, n: int, slc: str | None = None) -> None:
        """Book n bytes that process pid holds on a device, with no client."""
        if n <= 0:
            return
        if slc is None:
            try:
                slc = cgroup_of_pid(pid)
            except (OSError, LookupError):
                return
        ghost = -pid
        if pid not in self._ghosts:
            try:
                self.tree.attach(ghost, slc, pid, "(not connected)")
            except ValueError:
                return
            self._ghosts[pid] = ghost
        self.tree.attach_device(ghost, uuid)
        self.tree.adopt(ghost, uuid, n)

    def _drop_ghost(self, pid: int) -> None:
        if self._ghosts.pop(pid, None) is not None:
            self.tree.detach(-pid)

    def _expire_ghosts(self, per_dev: dict[str, dict[int, int] | None]) -> None:
        """Drop placeholders of processes that no longer hold GPU memory."""
        for pid in list(self._ghosts):
            known = [used for used in per_dev.values() if used is not None]
            if known and all(used.get(pid, 0) == 0 for used in known):
                self._drop_ghost(pid)
                continue
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                self._drop_ghost(pid)
            except PermissionError:
                pass

    async def _watchdog(self, period: float) -> None:
        """WATCHDOG=1 every ``period`` from this loop, only while the control
        tick keeps running: a wedged loop or a stuck tick stops the pings and
        systemd restarts us (clients keep their grants and reconnect)."""
        while True:
            await trio.sleep(period)  # first ping after READY=1, not before
            if time.monotonic() - self.last_tick < max(period, 10 * self.tick_ns / 1e9):
                with contextlib.suppress(OSError):
                    _systemd.notify("WATCHDOG=1")

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

    async def _accept_loop(self, listener: _stdsocket.socket, nursery: trio.Nursery) -> None:
        """Accept up to ACCEPT_BATCH connections per wake-up, with plain
        non-blocking calls: a flood of connections that are refused at once
        then costs the daemon the refusals, not a pass through trio's
        scheduler each (which took half again the CPU of the refusal), and
        the lane is served between two of them."""
        while True:
            await trio.lowlevel.wait_readable(listener)
            for _ in range(ACCEPT_BATCH):
                try:
                    sock, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    # EMFILE and friends: back off instead of spinning.
                    if self._conn_log.allow("(accept)", time.monotonic()):
                        self.log.warning("accept failed", error=str(exc))
                    await trio.sleep(0.1)
                    break
                try:
                    admitted = self._admit(sock)
                except Exception:  # a bug here must not end accepting for everyone
                    sock.close()
                    if self._conn_log.allow("(accept)", time.monotonic()):
                        self.log.exception("internal error admitting a connection")
                    continue
                if admitted is not None:
                    self.connections += 1
                    nursery.start_soon(self._connection, trio.socket.from_stdlib_socket(sock),
                                       *admitted)
                # Reservations that came meanwhile go first: behind a flood
                # of refusals, one waits for one refusal, not a batch.
                if not self.lane.closed:
                    self.lane.run_ready()
            await trio.lowlevel.checkpoint()

    def _admit(self, sock: _stdsocket.socket) -> tuple[int, int, str, Ticket] | None:
        """Who connected, and whether their slice may have one more
        connection: decided at accept, before a task, a buffer or a byte of
        the peer's is spent on it. A refusal is answered and closed here,
        without waiting on the peer, so refused connections hold nothing."""
        pid = uid = -1
        try:
            pid, uid, _gid = peer_pid_uid(sock)
            slc = peer_cgroup(sock, pid)
        except (OSError, LookupError) as exc:
            self._refuse_now(sock, proto.Error(
                code="internal", msg=f"cannot read cgroup of pid {pid}: {exc}"))
            return None
        res = self.bounds.accept(slc, uid)
        if isinstance(res, Refusal):
            self._refused(res, slc, pid, uid)
            self._refuse_now(sock, self._limit_error(res))
            return None
        return pid, uid, slc, res

    @staticmethod
    def _refuse_now(sock: _stdsocket.socket, err: proto.Error) -> None:
        """Send ``err`` if the socket takes it at once (a new connection's
        buffer is empty), and close."""
        with sock, contextlib.suppress(OSError):
            os.write(sock.fileno(), proto.Connection().send(err))

    @staticmethod
    def _limit_error(ref: Refusal) -> proto.Error:
        return proto.Error(code="limit", msg=ref.message(), extra={
            "bound": ref.bound, "slice": ref.slice, "limit": ref.limit,
            "current": ref.current})

    def _refused(self, ref: Refusal, slc: str, pid: int, uid: int) -> None:
        """Log a refusal: the first of a slice in each REFUSAL_LOG_S, the
        rest in one summary at its end (see _log_summaries)."""
        if self._refusal_log.allow(slc, time.monotonic(), ref.bound):
            self.log.warning("connection refused", bound=ref.bound, limit=ref.limit,
                             current=ref.current, limit_slice=ref.slice, slice=slc,
                             pid=pid, uid=uid)

    def _clog(self, slc: str) -> bool:
        """Whether a line about one of ``slc``'s connections may be logged."""
        return self._conn_log.allow(slc, time.monotonic(), "lines")

    async def _log_summaries(self) -> None:
        """What the throttles held back, once each interval is over."""
        while True:
            await trio.sleep(1.0)
            now = time.monotonic()
            for slc, counts in self._refusal_log.due(now):
                self.log.warning("connections refused", slice=slc, refused=counts,
                                 seconds=REFUSAL_LOG_S)
            for slc, counts in self._conn_log.due(now):
                self.log.info("lines about connections not logged", slice=slc,
                              lines=counts.get("lines", 0), seconds=CONN_LOG_S)

    # ------------------------------------------------------------ connections

    @staticmethod
    async def _sendall(sock: trio.socket.SocketType, data: bytes) -> None:
        with trio.fail_after(SEND_TIMEOUT_S):
            view = memoryview(data)
            while view:
                n = await sock.send(view)
                view = view[n:]

    async def _recv(self, sock: trio.socket.SocketType) -> bytes:
        data = await sock.recv(RECV_CHUNK)
        if not data:
            raise _Close
        return data

    async def _connection(self, sock: trio.socket.SocketType, pid: int, uid: int, slc: str,
                          ticket: Ticket) -> None:
        """The handshake (hello, welcome with the shared regions), all of it
        within the handshake timeout; then the connection belongs to the
        lane, which serves its requests. Until then it counts as one of
        ``slc``'s handshakes in progress; whatever ends it, its charge is
        given back (``finally``)."""
        conn = proto.Connection()
        client: _Client | None = None
        log = self.log.bind(pid=pid, slice=slc)
        handed_over = False
        t_accept = time.monotonic()
        try:
            with sock:
                try:
                    with trio.fail_after(self.handshake_timeout):
                        hello: proto.Event | None = None
                        while hello is None:
                            conn.feed(await self._recv(sock))
                            hello = conn.next_event()
                        assert isinstance(hello, proto.Hello)
                        refusal = self.bounds.hello(ticket, hello.role)
                        if refusal is not None:
                            self._refused(refusal, slc, pid, uid)
                            with contextlib.suppress(OSError):
                                os.write(sock.fileno(), conn.send(self._limit_error(refusal)))
                            return
                        client = self._register(hello, pid, uid, slc, ticket)
                        log = client.log
                        await self._welcome(sock, conn, client)
                    took = time.monotonic() - t_accept
                    if took > SLOW_HANDSHAKE_S and self._clog(slc):
                        log.warning("slow handshake: the daemon is short of CPU",
                                    seconds=round(took, 3))
                    self.lane.add(_stdsocket.socket(fileno=sock.detach()), conn, client, slc)
                    handed_over = True
                except proto.ProtocolError as exc:
                    if self._clog(slc):
                        log.warning("protocol error, closing", code=exc.code, error=exc.msg)
                    with trio.move_on_after(1):
                        await self._sendall(sock, conn.send(exc.reply()))
                except trio.TooSlowError:
                    if self._clog(slc):
                        log.warning("handshake not done in time, closing",
                                    seconds=round(time.monotonic() - t_accept, 3))
                except (_Close, ConnectionError):
                    pass
                except OSError as exc:
                    if self._clog(slc):
                        log.info("connection error", error=str(exc))
        except Exception:
            if self._clog(slc):
                log.exception("internal error on connection, closing it")
        finally:
            if not handed_over:
                self.connections -= 1
                self.bounds.release(ticket)
                if client is not None:
                    self._drop(client)

    def _lane_closed(self, client: _Client, why: str | None) -> None:
        """A connection the lane served has ended."""
        self.connections -= 1
        if why is not None and self._clog(client.slice_key):
            client.log.info("connection closed", reason=why)
        self._drop(client)

    def _lane_failed(self, client: _Client, exc: BaseException) -> None:
        if self._clog(client.slice_key):
            client.log.error("internal error on connection, closing it",
                             exc_info=(type(exc), exc, exc.__traceback__))

    async def _lane_loop(self) -> None:
        """Drive the lane from trio: serve it whenever its epoll fd is readable."""
        while True:
            await trio.lowlevel.wait_readable(self.lane.fileno())
            self.lane.run_ready()

    def _register(self, hello: proto.Hello, pid: int, uid: int, slc: str | None = None,
                  ticket: Ticket | None = None) -> _Client:
        """Tree membership and shared regions of a peer whose slice (its
        cgroup, read at accept) is ``slc`` (no I/O, so nothing leaks)."""
        if slc is None:
            try:
                slc = cgroup_of_pid(pid)
            except (OSError, LookupError) as exc:
                raise proto.ProtocolError("internal",
                                          f"cannot read cgroup of pid {pid}: {exc}") from None
        if self.cfg.identity == "declared" and hello.slice is not None:
            slc = hello.slice.strip("/")
        cid = self._next_id
        self._next_id += 1
        log = self.log.bind(client=cid, pid=pid, slice=slc)
        client = _Client(id=cid, role=hello.role, pid=pid, uid=uid, comm=hello.comm,
                         slice=slc, log=log, ticket=ticket)
        if hello.role == "hook":
            was_ghost = pid in self._ghosts
            self._drop_ghost(pid)  # its placeholder, booked at start: it re-declares now
            try:
                client.slice = self.tree.attach(cid, slc, pid, hello.comm)
            except (ValueError, ConfigError) as exc:
                raise proto.ProtocolError("invalid", f"bad slice {slc!r}: {exc}") from None
            client.in_tree = True
            self.clients[cid] = client
            client.shm = ClientShm(tick_ns=self.tick_ns, epoch=self.epoch, name=f"vgpu-{cid}")
            self._readmit(client, hello.held)
            if hello.held or was_ghost:
                # A reconnecting process: book its context and module memory
                # now, not at its next attach, or neighbours reconnecting
                # meanwhile could be admitted into that room.
                now = self.clock()
                for uuid in self.devices:
                    self._reconcile(client, uuid, now, self._nvml_used(uuid))
            if self._clog(client.slice_key):
                log.info("client attached", comm=hello.comm)
        else:
            self.clients[cid] = client
        return client

    async def _welcome(self, sock: trio.socket.SocketType, conn: proto.Connection,
                       client: _Client) -> None:
        """The welcome frame, with the two region fds for a hook."""
        cid = client.id
        welcome = conn.send(proto.Welcome(id=cid, slice=client.slice, tick_ns=self.tick_ns,
                                          epoch=self.epoch))
        if client.shm is not None:
            fds = array.array("i", client.shm.fds_for_client())
            with trio.fail_after(SEND_TIMEOUT_S):
                sent = await sock.sendmsg(
                    [welcome], [(_stdsocket.SOL_SOCKET, _stdsocket.SCM_RIGHTS, fds)])
            # The peer has its fds now; the daemon keeps only the mappings
            # (one fd per hooked process, not four).
            client.shm.close_fds()
            if sent < len(welcome):  # fds went with the first byte; send the rest plainly
                await self._sendall(sock, welcome[sent:])
        else:
            await self._sendall(sock, welcome)

    def _readmit(self, client: _Client, held: tuple[proto.Held, ...]) -> None:
        """After a daemon restart: book what the client still holds.

        The memory is already allocated on the GPU, so refusing would only make
        accounting wrong: it is booked even over a cap (``SliceTree.adopt``),
        logged, and later reservations are refused until enough is freed.
        """
        client.readmitted = bool(held)
        for h in held:
            if h.dev not in self.devices:
                client.log.warning("held memory on unknown device ignored", dev=h.dev, n=h.n)
                continue
            if h.n == 0:
                continue
            self.tree.attach_device(client.id, h.dev)
            res = self.tree.adopt(client.id, h.dev, h.n)
            if res is not None:
                client.log.warning("re-declared memory exceeds the slice's limit",
                                   dev=h.dev, n=h.n, limit_slice=res.slice, limit=res.limit,
                                   current=res.current)

    def _drop(self, client: _Client) -> None:
        """Connection gone: release everything, close fds, unmap."""
        if client.ticket is not None:
            self.bounds.release(client.ticket)
        if self.clients.pop(client.id, None) is None:
            return
        if client.in_tree:
            self.compute.detach(client, self.clock())
        if client.in_tree:
            held = self.tree.held(client.id)
            slc = self.tree.client_slice(client.id)
            self.tree.detach(client.id)
            if self._clog(client.slice_key):
                client.log.info("client detached")
            # A connection can end while its process lives on and still holds
            # GPU memory (a hook that gave up waiting for the daemon and will
            # reconnect): keep that memory booked until NVML shows it gone.
            for uuid, n in held.items():
                used = self._nvml_used(uuid) if n else None
                if used is not None and used.get(client.pid, 0) > 0:
                    self._book_ghost(client.pid, uuid, min(n, used[client.pid]), slc)
        if client.shm is not None:
            client.shm.close()
            client.shm = None

    # ------------------------------------------------------------ requests

    def _dispatch(self, client: _Client, ev: proto.Event) -> proto.Reply | None:
        if type(ev) is proto.Reserve:
            uuid = self._slot_dev(client, ev.slot, ev.id)
            if ev.n == 0:
                return proto.Granted(id=ev.id)
            # Once the process's context is booked, and with more than
            # NVML_GUARD_BYTES left on every slice after this request, the
            # 200 ms reconciliation is recent enough: admit and book in one
            # walk, no driver query.
            if uuid not in client.looked:
                return self._reserve_looking(client, ev, uuid)
            view = self.tree.admit(client.id, uuid, ev.n, NVML_GUARD_BYTES)
            if view is None:
                return self._reserve_looking(client, ev, uuid)
            client.last_grant_ns = self.clock()
            client.stale_views.discard(ev.slot)
            if client.shm is not None:
                client.shm.write_mem_view(ev.slot, view[0], view[1])
            return proto.Granted(id=ev.id)
        if type(ev) is proto.Release:
            uuid = self._slot_dev(client, ev.slot, None)
            if ev.n:
                try:
                    self.tree.release(client.id, uuid, ev.n)
                except ValueError as exc:
                    raise proto.ProtocolError("invalid", str(exc)) from None
                client.stale_views.add(ev.slot)
            return None
        if type(ev) is proto.Want:
            self._slot_dev(client, ev.slot, None)
            self.compute.want(client, ev.slot, self.clock())
            return None
        if type(ev) is proto.Idle:
            self._slot_dev(client, ev.slot, None)
            self.compute.idle(client, ev.slot, self.clock())
            return None
        if type(ev) is proto.Drained:
            self._slot_dev(client, ev.slot, None)
            self.compute.drained(client, ev.slot, self.clock())
            return None
        if isinstance(ev, proto.Attach):
            return self._attach(client, ev)
        if isinstance(ev, proto.Ctl):
            return self._ctl(client, ev)
        raise proto.ProtocolError("order", f"unexpected {type(ev).__name__}")

    def _reserve_looking(self, client: _Client, ev: proto.Reserve, uuid: str) -> proto.Reply:
        """A reservation that reads NVML first, so that admission sees the
        memory the process holds outside its reservations as it is now:
        its first on the device (its context exists by then, and may be the
        first on this device, with no estimate booked for it at attach), and
        any that would leave some slice under NVML_GUARD_BYTES (modules load
        lazily, pools grow)."""
        now = self.clock()
        client.looked.add(uuid)
        self._reconcile(client, uuid, now, self._nvml_used(uuid))
        res = self.tree.reserve(client.id, uuid, ev.n)
        if isinstance(res, Denial):
            client.log.info("allocation refused", dev=uuid, n=ev.n, limit_slice=res.slice,
                            limit=res.limit, current=res.current)
            return proto.Denied(id=ev.id, slice=res.slice, limit=res.limit,
                                current=res.current)
        client.last_grant_ns = now
        client.stale_views.discard(ev.slot)
        self._publish_mem_view(client, ev.slot, uuid)
        return proto.Granted(id=ev.id)

    def _slot_dev(self, client: _Client, slot: int, rid: int | None) -> str:
        uuid = client.slots.get(slot)
        if uuid is None:
            raise proto.ProtocolError("invalid", f"slot {slot} is not attached", id=rid)
        return uuid

    def _attach(self, client: _Client, ev: proto.Attach) -> proto.Reply:
        dev = self.devices.get(ev.dev)
        if dev is None:
            return proto.Error(code="device", msg=f"unknown device {ev.dev}", id=ev.id)
        if not self.tree.device_allowed(client.id, dev.uuid, dev.index):
            return proto.Error(code="device", id=ev.id,
                               msg=f"device {dev.index} ({dev.uuid}) not allowed by gpu.devices")
        assert client.shm is not None
        now = self.clock()
        slot = client.dev_slot.get(dev.uuid)
        if slot is None:
            free = [s for s in range(MAX_DEVICES) if s not in client.slots]
            if not free:
                return proto.Error(code="device", msg="all device slots in use", id=ev.id)
            # The context the hook is about to create takes memory no
            # allocation call reports: admit an estimate of it first (what
            # contexts on this device have measured), so a process that
            # joins a full slice fails with out-of-memory instead of pushing
            # the slice past its cap. Reconciliation replaces the estimate.
            est = self._ctx_estimate.get(dev.uuid, 0)
            if est and not client.readmitted and dev.uuid not in client.overhead:
                self.tree.attach_device(client.id, dev.uuid)
                res = self.tree.reserve(client.id, dev.uuid, est)
                if isinstance(res, Denial):
                    client.log.info("no memory left for a context", dev=dev.uuid, need=est,
                                    limit_slice=res.slice, limit=res.limit, current=res.current)
                    return proto.Error(code="oom", id=ev.id, msg=(
                        f"slice {res.slice or '-.slice'} has {max(0, res.limit - res.current)} "
                        f"bytes left of gpu.memory.max={res.limit}; a context needs about {est}"))
                client.overhead[dev.uuid] = est
                client.last_grant_ns = now
            slot = free[0]
            client.slots[slot] = dev.uuid
            client.dev_slot[dev.uuid] = slot
            self.tree.attach_device(client.id, dev.uuid)
            client.shm.activate(slot)
            self.compute.attach(client, dev.uuid)
        self._reconcile(client, dev.uuid, now, self._nvml_used(dev.uuid))
        limit, used = self.tree.mem_view(client.id, dev.uuid)
        client.shm.write_mem_view(slot, limit, used)
        return proto.Attached(id=ev.id, slot=slot, mem_limit=limit)

    def _trace_tick(self, now: int, usage: dict[tuple[str, str], int]) -> None:
        """VGPU_DEBUG_TICK=FILE: one line per busy slice, device and tick (its
        rate, the GPU time charged to it and the device's hand-overs so far),
        for tuning against a real GPU. Off unless asked for."""
        assert self._tick_trace is not None
        for (path, uuid), rate in self.compute.slice_rates().items():
            arb = self.compute.arbiters[uuid]
            clk = self.compute.clock[uuid]
            self._tick_trace.write(
                f"{now} {uuid[-8:]} {path} {rate:.4f} {usage.get((path, uuid), 0)} "
                f"{int(arb.owner == path)} {arb.handovers} {clk.now_mhz or 0:.0f} "
                f"{clk.full_mhz or 0:.0f}\n")

    def _publish_stale_views(self, client: _Client) -> None:
        """The views releases changed, once the read's replies are out: a
        hook batches its releases with its next reservation, whose grant
        then publishes the view itself."""
        while client.stale_views:
            slot = client.stale_views.pop()
            uuid = client.slots.get(slot)
            if uuid is not None:
                self._publish_mem_view(client, slot, uuid)

    def _publish_mem_view(self, client: _Client, slot: int, uuid: str) -> None:
        """The client's cuMemGetInfo view, right after its own usage changed
        (neighbours' changes reach it at the next tick)."""
        if client.shm is not None:
            limit, used = self.tree.mem_view(client.id, uuid)
            client.shm.write_mem_view(slot, limit, used)

    # ------------------------------------------------------------ overhead

    def _nvml_used(self, uuid: str) -> dict[int, int] | None:
        """Per-pid memory on a device as the driver reports it now.

        Never cached: compared with reservations that move between two
        queries, a stale figure would book memory that was already freed.
        """
        try:
            used = process_memory(self.devices[uuid].index)
        except NvmlError as exc:
            if not self._nvml_warned:
                self._nvml_warned = True
                self.log.warning("cannot read per-process GPU memory; context overhead "
                                 "is not counted", error=str(exc))
            return None
        return used

    def _reconcile(self, client: _Client, uuid: str, now: int,
                   used: dict[int, int] | None) -> None:
        """Book the memory the client's process holds beyond its reservations
        (context, modules, pools) into its slice: see _overhead."""
        if used is None or not client.in_tree or client.pid not in used:
            return
        booked = client.overhead.get(uuid, 0)
        reserved = self.tree.held(client.id).get(uuid, 0) - booked
        quiet = now - client.last_grant_ns >= QUIET_NS
        target = overhead_target(used[client.pid], reserved, booked, quiet)
        client.overhead_checked[uuid] = now
        if target > booked:
            self.tree.adopt(client.id, uuid, target - booked)
        elif target < booked:
            self.tree.release(client.id, uuid, booked - target)
        client.overhead[uuid] = target
        measured = used[client.pid] - reserved
        if 0 < measured <= MAX_CTX_ESTIMATE and measured > self._ctx_estimate.get(uuid, 0):
            self._ctx_estimate[uuid] = measured
        if target > AUDIT_BYTES and not client.audited:
            client.audited = True
            client.log.warning("process uses GPU memory it never reserved: is the hook "
                               "bypassed?", dev=uuid, unreserved=target)

    # ------------------------------------------------------------ control ops

    def _ctl(self, client: _Client, ev: proto.Ctl) -> proto.Reply:
        try:
            if ev.op == "status":
                return proto.Ok(id=ev.id, data=self.status())
            if ev.op == "show":
                return proto.Ok(id=ev.id, data=self.show(ev.slice or ""))
            if ev.op == "tree":
                return proto.Ok(id=ev.id, data=self.snapshot())
            if ev.op == "top":
                return proto.Ok(id=ev.id, data=self.top())
            if ev.op == "events":
                return proto.Ok(id=ev.id, data=self.events())
            if ev.op == "set":
                return self._set(client, ev)
            if ev.op == "reset":
                return self._reset(client, ev)
            if ev.op == "reload":
                return self._reload_op(client, ev)
        except KeyError as exc:
            return proto.Error(code="notfound", id=ev.id,
                               msg=f"no such slice: {exc.args[0]} (vgpuctl tree lists them)")
        except (KnobError, ConfigError) as exc:
            return proto.Error(code="invalid", msg=str(exc), id=ev.id)
        return proto.Error(code="invalid", msg=f"unknown op {ev.op}", id=ev.id)

    def _set(self, client: _Client, ev: proto.Ctl) -> proto.Reply:
        """Like ``systemctl set-property``: persistent (control layer) or,
        with ``runtime``, until reboot (runtime layer, which wins over the
        others). A persistent set also drops those knobs from the runtime
        file, so the value just set is the one that holds after a reload."""
        if client.uid != 0:
            return proto.Error(code="permission", id=ev.id,
                               msg="setting knobs needs root (peer uid is not 0)")
        assert ev.slice is not None
        # Check first (the root takes no knobs), then persist: a bad value
        # or a failed write leaves both the files and the live tree untouched.
        path, _ = self.tree.check_knobs(ev.slice, ev.knobs)
        try:
            if ev.runtime:
                source = write_runtime_setting(self.cfg.run_slices_dir, path, ev.knobs)
            else:
                source = write_runtime_setting(self.cfg.control_slices_dir, path, ev.knobs,
                                               header=CONTROL_HEADER)
                remove_slice_setting(self.cfg.run_slices_dir, path, list(ev.knobs))
        except OSError as exc:
            layer = "runtime" if ev.runtime else "persistent"
            return proto.Error(code="internal", id=ev.id,
                               msg=f"cannot write {layer} setting: {exc}")
        path = self.tree.set_knobs(path, ev.knobs, source)
        self.log.info("knobs set", slice=path, knobs=ev.knobs, runtime=ev.runtime,
                      source=source, uid=client.uid, pid=client.pid)
        return proto.Ok(id=ev.id, data={"slice": path, "knobs": dict(ev.knobs),
                                        "source": source, "show": self.show(path),
                                        "config_error": self.config_error})

    def _reset(self, client: _Client, ev: proto.Ctl) -> proto.Reply:
        """Remove what ``vgpuctl set`` put on a slice: its runtime file, and
        with ``runtime=False`` its persistent control file too; then reload,
        so values fall back to /etc (or defaults) and an emptied transient
        slice disappears. ``vgpuctl run`` calls this when its command exits."""
        if client.uid != 0:
            return proto.Error(code="permission", id=ev.id,
                               msg="resetting knobs needs root (peer uid is not 0)")
        assert ev.slice is not None
        path = self.tree.resolve(ev.slice)
        dirs = [self.cfg.run_slices_dir]
        if not ev.runtime:
            dirs.append(self.cfg.control_slices_dir)
        removed: list[str] = []
        try:
            for d in dirs:
                f = remove_slice_setting(d, path)
                if f is not None:
                    removed.append(f)
        except OSError as exc:
            return proto.Error(code="internal", id=ev.id, msg=f"cannot remove setting: {exc}")
        if removed and not self.reload():
            # Another file is broken: drop just the removed layers' knobs in memory.
            for f in removed:
                self._forget_source_knobs(path, None, source=f)
        self.log.info("knobs reset", slice=path, removed=removed, uid=client.uid,
                      pid=client.pid)
        return proto.Ok(id=ev.id, data={"slice": path, "removed": removed,
                                        "config_error": self.config_error})

    def _reload_op(self, client: _Client, ev: proto.Ctl) -> proto.Reply:
        """SIGHUP over the socket, for a writer of slice files that cannot
        signal us (the Kubernetes plugin in another container): re-read every
        layer and answer whether that worked, with the error if not."""
        if client.uid != 0:
            return proto.Error(code="permission", id=ev.id,
                               msg="reloading needs root (peer uid is not 0)")
        ok = self.reload()
        return proto.Ok(id=ev.id, data={"ok": ok, "config_error": self.config_error})

    def _forget_source_knobs(self, path: str, knobs: list[str] | None, *,
                             source: str) -> None:
        """Drop in-memory knobs of ``path`` set by ``source``, without a reload."""
        try:
            node = self.tree.node(path)
        except KeyError:
            return
        for k in list(node.knobs):
            src = node.knobs[k][2]
            if knobs is not None and k not in knobs:
                continue
            if src == source:
                del node.knobs[k]
        self.tree.generation += 1

    def _proc_stats(self, cid: int) -> dict[str, int]:
        """Per-process counters from the client's stat page (all devices)."""
        c = self.clients.get(cid)
        out = {"launches": 0, "allocs": 0, "frees": 0, "mem_bytes": 0,
               "throttled_usec": 0, "nr_throttled": 0}
        if c is None or c.shm is None:
            return out
        for slot in c.slots:
            cnt = c.shm.counters(slot)
            out["launches"] += cnt.launches
            out["allocs"] += cnt.allocs
            out["frees"] += cnt.frees
            out["throttled_usec"] += cnt.throttled_ns // 1000
            out["nr_throttled"] += cnt.nr_throttled
        with contextlib.suppress(KeyError):
            out["mem_bytes"] = sum(self.tree.held(cid).values())
        return out

    def snapshot(self) -> dict[str, Any]:
        """The tree for ``vgpuctl tree``/metrics: each process entry carries
        ``pid``, ``comm``, ``launches``, ``allocs``, ``frees``, ``mem_bytes``."""
        snap = self.tree.snapshot()
        stack = [snap]
        while stack:
            node = stack.pop()
            for p in node.get("processes", []):
                p.update(self._proc_stats(int(p["client"])))
            stack.extend(node.get("children", []))
        return snap

    def events(self) -> dict[str, Any]:
        """Per slice: ``gpu.memory.events`` (descendants included),
        ``gpu.memory.events.local``, ``gpu.cores.stat`` and
        ``gpu.clients.events`` counters (also of slices known only from
        their connections or refusals)."""
        out: dict[str, Any] = {}
        paths = dict.fromkeys(self.tree.slices())
        paths.update(dict.fromkeys(p for p in self.bounds.slices() if p not in paths))
        for path in paths:
            show = self.tree.show(path, missing_ok=True)
            out[path] = {"gpu.memory.events": show["gpu.memory.events"],
                         "gpu.memory.events.local": show["gpu.memory.events.local"],
                         "gpu.cores.stat": show["gpu.cores.stat"],
                         "gpu.clients.events": self.bounds.events(path)}
        return {"slices": out}

    def show(self, slice: str) -> dict[str, Any]:
        """``vgpuctl show``: the tree's view of a slice and its connection
        counts (``gpu.clients.*``); a slice only the bounds know (control
        connections, refusals) shows too. KeyError if neither does."""
        try:
            d = self.tree.show(slice)
        except KeyError:
            d = self.tree.show(slice, missing_ok=True)
            if d["slice"] not in self.bounds.slices():
                raise
        path = d["slice"]
        d["gpu.clients.current"] = self.bounds.current(path)
        d["gpu.clients.stat"] = self.bounds.local(path)
        d["gpu.clients.events"] = self.bounds.events(path)
        return d

    def status(self) -> dict[str, Any]:
        return {
            "version": vgpu_cgroup.__version__,
            "protocol": proto.PROTO_VERSION,
            "simulated": self.simulated,
            "identity": self.cfg.identity,
            "socket": self.cfg.socket,
            "socket_activated": self._inherited,
            "config_error": self.config_error,
            "layers": {"etc": self.cfg.etc_slices_dir,
                       "persistent": self.cfg.control_slices_dir,
                       "runtime": self.cfg.run_slices_dir},
            "tick_ns": self.tick_ns,
            "epoch": self.epoch,
            "devices": [{"index": d.index, "uuid": d.uuid, "name": d.name,
                         "total_mem": d.total_mem} for d in self.devices.values()],
            "clients": [{"id": c.id, "role": c.role, "pid": c.pid, "comm": c.comm,
                         "slice": c.slice, "devices": sorted(c.dev_slot)}
                        for c in self.clients.values()],
            "connections": {"open": self.connections, "counted": self.bounds.node,
                            "limits": dataclasses.asdict(self.limits)},
        }

    def top(self) -> dict[str, Any]:
        """Per slice: GPU time over the last second (% of one GPU, per device),
        and memory current (descendants included)."""
        win = self.compute.window
        span = max(win[-1][0] - win[0][0] + self.tick_ns, self.tick_ns) if win else TOP_WINDOW_NS
        busy: dict[tuple[str, str], int] = collections.defaultdict(int)
        for _, charged in win:
            for key, ns in charged.items():
                busy[key] += ns
        slices: dict[str, dict[str, Any]] = {}
        for path in self.tree.slices():
            show = self.tree.show(path)
            slices[path] = {
                "gpu_percent": {},
                "memory_current": show["gpu.memory.current"]["total"],
                # Like systemd-cgtop's tasks: descendants' processes included.
                "processes": sum(len(n.clients) for n in self.tree.node(path).subtree()),
            }
        for (path, uuid), ns in busy.items():
            if path in slices:
                slices[path]["gpu_percent"][uuid] = round(100.0 * ns / span, 2)
        # Cross-check: the driver's own per-process SM utilization over the
        # same second, summed the same way (NVML samples coarsely, so expect
        # agreement within a few percent, not to the tick).
        since = int((time.time() - span / 1e9) * 1e6)
        for uuid, dev in self.devices.items():
            util = process_util(dev.index, since)
            for c in self.clients.values():
                pct = util.get(c.pid)
                if pct is None or uuid not in c.dev_slot or not c.in_tree:
                    continue
                for node in self.tree.client_nodes(c.id):
                    if node.path in slices:
                        nv = slices[node.path].setdefault("nvml_percent", {})
                        nv[uuid] = round(nv.get(uuid, 0.0) + pct, 2)
        return {"window_ns": span, "slices": slices}

    # ------------------------------------------------------------ control tick

    def next_deadline(self) -> float | None:
        """When the compute service must next run (time.monotonic()), if before a tick."""
        due = self.compute.deadline()
        return None if due is None else due / 1e9

    def run_due(self) -> None:
        """Run the compute service's due deadlines (hand-overs at a window's end)."""
        self.compute.run_due(self.clock())

    async def _tick_loop(self) -> None:
        """The control tick from trio (when no host loop runs it)."""
        deadline = trio.current_time()
        period = self.tick_ns / 1e9
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
            for _ in self.guarded_tick():
                await trio.lowlevel.checkpoint()

    def guarded_tick(self) -> Iterator[None]:
        """``tick_steps`` for a loop: a failing tick is logged (rate-limited)
        and the loop goes on; the next tick starts afresh."""
        self.last_tick = time.monotonic()
        try:
            yield from self.tick_steps()
        except Exception:
            self._tick_errors += 1
            if self._tick_errors in (1, 10, 100) or self._tick_errors % 1000 == 0:
                self.log.exception("control tick failed", count=self._tick_errors)

    def tick(self) -> None:
        """One control step, all at once (tests; the loop runs it in chunks)."""
        for _ in self.tick_steps():
            pass

    def tick_steps(self) -> Iterator[None]:
        """One control step: measurements, charges, memory views.

        A generator that yields after every TICK_CHUNK clients polled or
        published, so the host loop can answer requests in between. Clients
        that connect or leave while the tick is under way are skipped until
        the next one. Ownership itself moves on events and deadlines
        (``_compute``), not at ticks.
        """
        now = self.clock()
        self.lane.expire(time.monotonic())
        if not self.simulated and self._ticks % CLOCK_EVERY_TICKS == 0:
            for uuid, dev in self.devices.items():
                got = clocks(dev.index)
                if got is not None:
                    self.compute.clock[uuid].sample(got[0], got[1], self._max_mhz[uuid])
        clients = list(self.clients.values())
        yield from self.compute.tick_steps([c for c in clients if c.in_tree], now)
        self.compute.trim_window(now, TOP_WINDOW_NS)
        if self._tick_trace is not None and self.compute.window:
            self._trace_tick(now, self.compute.window[-1][1])
        self._ticks += 1
        if self._ticks % OVERHEAD_EVERY_TICKS == 0:
            yield
            # In one step with the NVML query: a release served in between
            # would be booked as overhead (NVML still shows that memory).
            per_dev = {uuid: self._nvml_used(uuid) for uuid in self.devices}
            self._expire_ghosts(per_dev)
            for uuid, per_pid in per_dev.items():
                if per_pid is None:
                    continue
                for c in list(self.clients.values()):
                    if uuid in c.dev_slot:
                        self._reconcile(c, uuid, now, per_pid)
        # Publish memory views when slices, clients or knobs changed, or
        # every VIEW_EVERY_TICKS ticks while bookings move (a client's own
        # change is published when it is made, in _dispatch; neighbours'
        # reach cuMemGetInfo within 50 ms).
        versions, mem_seen = self._published
        now_versions = (self.tree.generation, self.tree.membership)
        views_due = now_versions != versions or (
            self.tree.mem_version != mem_seen and self._ticks % VIEW_EVERY_TICKS == 0)
        if not views_due:
            return
        self._published = (now_versions, self.tree.mem_version)
        moved = now_versions != versions  # every page's seq says so, written or not
        # Clients in one slice see one memory view: walk each slice's path once.
        views: dict[tuple[str, str], tuple[int | None, int]] = {}
        for i, c in enumerate(clients):
            if i % TICK_CHUNK == 0:
                yield
                views.clear()  # reservations may have run meanwhile
            if c.shm is None or c.id not in self.clients:
                continue
            wrote = moved
            for slot, uuid in c.slots.items():
                vkey = (c.slice, uuid)
                view = views.get(vkey)
                if view is None:
                    view = views[vkey] = self.tree.mem_view(c.id, uuid)
                wrote |= c.shm.write_mem_view(slot, *view)
            if wrote:
                c.shm.bump_seq()
