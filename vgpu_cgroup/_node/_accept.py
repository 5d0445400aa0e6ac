"""The door of vgpud: its listening socket, the accept loop, and who may
have one more connection (``_core._bounds``), decided before anything is
spent on it.

Connections are admitted in the accept loop itself, before a task is
started for them: peer credentials, the cgroup (checked against the peer's
pidfd), then ``ClientBounds.accept``. A refusal is one non-blocking write of
the ``limit`` error and a close, here; the loop takes up to ACCEPT_BATCH
connections per wake-up with plain calls and serves the lane between any
two, so a flood of refusals delays a reservation by one refusal, not by the
flood. What follows an admission (the handshake) is ``_sessions``'.

Lines about connections are bounded per slice (``_log.Throttle``): a
refusal is logged once per slice every REFUSAL_LOG_S, other lines up to
CONN_LOG_BURST per CONN_LOG_S; the rest are summarised.

One thread: the accept loop is a trio task on the daemon's thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket as _stdsocket
import stat
import time
from collections.abc import Callable
from typing import Protocol

import trio
import trio.lowlevel
from structlog.typing import FilteringBoundLogger

from vgpu_cgroup._core import ClientBounds, DaemonConfig, Refusal, Ticket
from vgpu_cgroup._log import Throttle
from vgpu_cgroup._wire import proto

from . import _systemd
from ._identity import peer_cgroup, peer_pid_uid

#: Connections accepted per wake-up of the accept loop (see accept_loop).
ACCEPT_BATCH = 8
#: Refusals are logged once per slice and this interval (then summarised);
#: other lines about connections (attach, detach, errors) up to
#: CONN_LOG_BURST per slice and CONN_LOG_S.
REFUSAL_LOG_S = 10.0
CONN_LOG_S = 10.0
CONN_LOG_BURST = 100

#: start(nursery, sock, pid, uid, slice, ticket): an admitted connection
Start = Callable[[trio.Nursery, _stdsocket.socket, int, int, str, Ticket], None]


class _Lane(Protocol):
    @property
    def closed(self) -> bool: ...
    def run_ready(self) -> int: ...


class Acceptor:
    """The listening socket and the admission of connections."""

    def __init__(self, cfg: DaemonConfig, bounds: ClientBounds, lane: _Lane,
                 log: FilteringBoundLogger) -> None:
        self.cfg = cfg
        self.bounds = bounds
        self.lane = lane
        self.log = log
        self._refusal_log = Throttle(REFUSAL_LOG_S)
        self._conn_log = Throttle(CONN_LOG_S, burst=CONN_LOG_BURST)
        #: the socket came from systemd (vgpud.socket): never unlink it
        self.inherited = False

    def bind(self) -> _stdsocket.socket:
        """The listening socket: inherited (socket activation) or bound here.

        An inherited socket belongs to vgpud.socket: it is never unlinked, so
        clients find the same path across a restart of the service.
        """
        fds = _systemd.listen_fds()
        if fds:
            self.inherited = True
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

    async def accept_loop(self, listener: _stdsocket.socket, nursery: trio.Nursery,
                          start: Start) -> None:
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
                    start(nursery, sock, *admitted)
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
            self.refused(res, slc, pid, uid)
            self._refuse_now(sock, self.limit_error(res))
            return None
        return pid, uid, slc, res

    @staticmethod
    def _refuse_now(sock: _stdsocket.socket, err: proto.Error) -> None:
        """Send ``err`` if the socket takes it at once (a new connection's
        buffer is empty), and close."""
        with sock, contextlib.suppress(OSError):
            os.write(sock.fileno(), proto.Connection().send(err))

    @staticmethod
    def limit_error(ref: Refusal) -> proto.Error:
        return proto.Error(code="limit", msg=ref.message(), extra={
            "bound": ref.bound, "slice": ref.slice, "limit": ref.limit,
            "current": ref.current})

    def refused(self, ref: Refusal, slc: str, pid: int, uid: int) -> None:
        """Log a refusal: the first of a slice in each REFUSAL_LOG_S, the
        rest in one summary at its end (see log_summaries)."""
        if self._refusal_log.allow(slc, time.monotonic(), ref.bound):
            self.log.warning("connection refused", bound=ref.bound, limit=ref.limit,
                             current=ref.current, limit_slice=ref.slice, slice=slc,
                             pid=pid, uid=uid)

    def clog(self, slc: str) -> bool:
        """Whether a line about one of ``slc``'s connections may be logged."""
        return self._conn_log.allow(slc, time.monotonic(), "lines")

    async def log_summaries(self) -> None:
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
