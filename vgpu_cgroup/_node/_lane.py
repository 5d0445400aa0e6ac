"""The request lane: every connection after its handshake, on one epoll set.

A reservation is the one request a CUDA program waits on, so its round trip
is kept free of trio's per-request cost (a task switch, a cancel scope and
an epoll registration change for each read: measured on the 2-core test
machine, a trio echo server took about four times the CPU per request of a
plain epoll loop and had four times its p99). The lane reads, decodes,
dispatches and answers with plain non-blocking calls; the handler it calls
is synchronous, so it never waits on anything.

The lane is driven in one of two ways, and either way runs in the thread
that runs the daemon's trio code, so no state is shared across threads:

* from a trio task that waits for the lane's epoll fd to become readable
  (``Daemon.serve`` does this unless told the host drives it; the tests);
* by ``_host.run_hosted``: vgpud's main loop is then a plain epoll loop
  that serves the lane directly and runs trio as a guest between requests.

A peer that breaks the protocol gets its ``error`` frame and is closed. A
peer that does not read its replies is not read from either until it does
(so it cannot make the daemon buffer without bound), and is closed when
they have waited ``send_timeout`` seconds. Nothing one connection does stops
the others being served: each gets one read of at most ``RECV_CHUNK`` bytes
per pass, and at most ``PAUSE_EVENTS`` requests or ``PAUSE_BYTES`` of
replies of it are handled per pass (a peer that pipelines thousands of
control requests in one read waits for the next pass for the rest, whose
bytes stay in its buffer, and nothing more is read from it meanwhile).

Connections belong to groups (the daemon's slices): what a group's
connections together leave in the daemon's buffers, received and not yet
handled (``group_in_max``) or answered and not yet read by the peers
(``group_out_max``), is bounded; the connection that would go past it is
closed, so one slice cannot make the daemon hold its replies for thousands
of connections that never read them.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from vgpu_cgroup._wire import proto

RECV_CHUNK = 65536
#: Unsent replies a connection may hold before it is cut off: the replies to
#: one read's worth of requests (nothing more is read from a connection
#: while its replies wait), the largest being a control reply.
MAX_OUTBUF = proto.MAX_CTL_REPLY + (1 << 20)
#: Requests and reply bytes of one connection handled per pass (see above):
#: far more than a hook ever sends in one read (one reservation and the
#: releases batched with it), and a few large control replies.
PAUSE_EVENTS = 256
PAUSE_BYTES = 256 * 1024
_IN = select.EPOLLIN | select.EPOLLRDHUP
_OUT = select.EPOLLOUT

C = TypeVar("C")


@dataclass(eq=False)
class _Conn(Generic[C]):
    sock: socket.socket
    conn: proto.Connection
    client: C
    out: bytearray = field(default_factory=bytearray)
    #: time.monotonic() by which ``out`` must have drained, when it is not empty
    out_deadline: float = 0.0
    group: str = ""
    #: bytes of ``conn``'s buffer counted in the group
    in_held: int = 0
    #: requests left in ``conn``'s buffer for the next pass (see PAUSE_EVENTS)
    paused: bool = False


class Lane(Generic[C]):
    """Connections after their handshake, served with plain non-blocking I/O.

    ``handle(client, event)`` answers one request (or returns None); it may
    raise ``ProtocolError`` to have the peer told and closed. ``closed(client,
    why)`` is called once per connection when it ends, whatever the reason;
    ``why`` is None for an orderly end by the peer. ``failed(client, exc)``
    is told of an unexpected exception in ``handle`` (the connection is
    closed; the lane and every other connection carry on). ``after(client)``,
    if given, runs once the replies to what one read brought have been
    sent: work the peer does not wait for goes there, off its round trip.
    """

    def __init__(
        self,
        handle: Callable[[C, proto.Event], proto.Reply | None],
        closed: Callable[[C, str | None], None],
        failed: Callable[[C, BaseException], None],
        *,
        after: Callable[[C], None] | None = None,
        send_timeout: float = 5.0,
        group_in_max: int | None = None,
        group_out_max: int | None = None,
    ) -> None:
        self._handle = handle
        self._after = after
        self._closed = closed
        self._failed = failed
        self.send_timeout = send_timeout
        self._ep = select.epoll()
        self._conns: dict[int, _Conn[C]] = {}
        self._backlog: set[int] = set()  # fds with unsent replies
        self._watched: set[int] = set()
        #: time.monotonic() when replies were last sent
        self.replied_at = 0.0
        self.group_in_max = group_in_max
        self.group_out_max = group_out_max
        #: group -> [bytes received and not handled, bytes of unread replies]
        self._groups: dict[str, list[int]] = {}

    def fileno(self) -> int:
        """Readable whenever some connection needs serving."""
        return self._ep.fileno()

    @property
    def closed(self) -> bool:
        """After :meth:`close_all`."""
        return self._ep.closed

    def __len__(self) -> int:
        return len(self._conns)

    def add(self, sock: socket.socket, conn: proto.Connection, client: C,
            group: str = "") -> None:
        """Take over a connection whose handshake is done; ``conn`` may hold
        bytes already received after the hello, which are served at once."""
        sock.setblocking(False)
        fd = sock.fileno()
        lc = _Conn(sock, conn, client, group=group)
        self._conns[fd] = lc
        self._ep.register(fd, _IN)
        self._serve(fd, lc, b"")

    def watch(self, fd: int) -> None:
        """Also wait for ``fd`` to become readable (not a connection): the
        host loop's own wake-up fd, so that one ``epoll_wait`` serves both
        (on the 2-core VM each system call on this path costs 5-15 us)."""
        self._ep.register(fd, select.EPOLLIN)
        self._watched.add(fd)

    def run_ready(self) -> int:
        """Serve every connection that is ready now, without waiting; returns
        how many events were handled."""
        return self.poll(0.0)[1]

    def poll(self, timeout: float) -> tuple[list[int], int]:
        """Wait up to ``timeout`` seconds, serve the connections that became
        ready; returns the watched fds that did, and how many events came."""
        if self._ep.closed:
            return [], 0
        events = self._ep.poll(timeout)
        watched: list[int] = []
        for fd, ev in events:
            lc = self._conns.get(fd)
            if lc is None:
                if fd in self._watched:
                    watched.append(fd)
                continue
            if ev & _OUT:
                self._flush(fd, lc)
                if fd not in self._conns:
                    continue
            if lc.out or lc.paused:
                continue  # backpressure: no new requests until the replies are read
            if ev & (_IN | select.EPOLLHUP | select.EPOLLERR):
                try:
                    data = lc.sock.recv(RECV_CHUNK)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    self._close(fd, lc, f"connection error: {exc}")
                    continue
                if not data:
                    self._close(fd, lc, None)
                    continue
                self._serve(fd, lc, data)
        if self._backlog:
            self.expire(time.monotonic())
        return watched, len(events)

    def expire(self, now: float) -> None:
        """Close connections whose replies have waited past their deadline."""
        if not self._backlog:
            return
        for fd in [fd for fd in self._backlog if self._conns[fd].out_deadline <= now]:
            self._close(fd, self._conns[fd], "client too slow to read its replies")

    def close_all(self, why: str) -> None:
        for fd, lc in list(self._conns.items()):
            self._close(fd, lc, why)
        self._ep.close()

    # ------------------------------------------------------------ internals

    def _serve(self, fd: int, lc: _Conn[C], data: bytes) -> None:
        conn = lc.conn
        out: list[bytes] = []
        handled = 0
        size = 0
        try:
            if data:
                conn.feed(data)
            while (ev := conn.next_event()) is not None:
                handled += 1
                reply = self._handle(lc.client, ev)
                if reply is not None:
                    frame = conn.send(reply)
                    out.append(frame)
                    size += len(frame)
                if handled >= PAUSE_EVENTS or size >= PAUSE_BYTES:
                    # The rest waits for the next pass: EPOLLOUT, once what
                    # is queued is out, resumes it (_flush).
                    lc.paused = True
                    break
        except proto.ProtocolError as exc:
            # Answer what came before the bad frame, then the error; best
            # effort, the connection is closed either way.
            out.append(conn.send(exc.reply()))
            self._send(fd, lc, b"".join(out))
            self._close(fd, lc, f"protocol error: {exc}")
            return
        except Exception as exc:  # one connection's bug must not stop the lane
            self._failed(lc.client, exc)
            self._close(fd, lc, "internal error")
            return
        if out:
            self._send(fd, lc, out[0] if len(out) == 1 else b"".join(out))
            if fd not in self._conns:
                return
        held = conn.buffered
        if held != lc.in_held and not self._hold_in(fd, lc, held):
            return
        if lc.paused and not lc.out:
            # Resumed on EPOLLOUT, which a peer that does not read its
            # replies never gives: it is then cut off like one whose replies
            # are queued here (expire).
            lc.out_deadline = time.monotonic() + self.send_timeout
            self._backlog.add(fd)
            self._ep.modify(fd, _OUT)
        if handled and self._after is not None and fd in self._conns:
            try:
                self._after(lc.client)
            except Exception as exc:
                self._failed(lc.client, exc)
                self._close(fd, lc, "internal error")

    def _send(self, fd: int, lc: _Conn[C], data: bytes) -> None:
        self.replied_at = time.monotonic()
        if lc.out:
            lc.out += data
            queued = len(data)
        else:
            try:
                n = lc.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                return  # the read side will see the end
            if n == len(data):
                return
            lc.out += data[n:]
            queued = len(data) - n
            lc.out_deadline = time.monotonic() + self.send_timeout
            self._backlog.add(fd)
            self._ep.modify(fd, _OUT)
        g = self._group(lc.group)
        g[1] += queued
        if len(lc.out) > MAX_OUTBUF:
            self._close(fd, lc, "client does not read its replies")
        elif self.group_out_max is not None and g[1] > self.group_out_max:
            self._close(fd, lc, f"the connections of {lc.group or '-.slice'} leave more than "
                        f"{self.group_out_max} bytes of replies unread")

    def _flush(self, fd: int, lc: _Conn[C]) -> None:
        if lc.out:
            try:
                n = lc.sock.send(lc.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._close(fd, lc, f"connection error: {exc}")
                return
            del lc.out[:n]
            self._ungroup(lc.group, 1, n)
        if not lc.out:
            self._backlog.discard(fd)
            self._ep.modify(fd, _IN)
            if lc.paused:  # requests left from the last pass: their turn
                lc.paused = False
                self._serve(fd, lc, b"")

    def _group(self, group: str) -> list[int]:
        g = self._groups.get(group)
        if g is None:
            g = self._groups[group] = [0, 0]
        return g

    def _ungroup(self, group: str, which: int, n: int) -> None:
        g = self._groups.get(group)
        if g is not None and n:
            g[which] -= n
            if not g[0] and not g[1]:
                del self._groups[group]

    def _hold_in(self, fd: int, lc: _Conn[C], held: int) -> bool:
        """Count what ``lc`` leaves in its buffer (a partial frame, or the
        requests of a paused pass) in its group; False when that closed it."""
        delta = held - lc.in_held
        lc.in_held = held
        if delta < 0:
            self._ungroup(lc.group, 0, -delta)
            return True
        g = self._group(lc.group)
        g[0] += delta
        if self.group_in_max is not None and g[0] > self.group_in_max:
            self._close(fd, lc, f"the connections of {lc.group or '-.slice'} leave more than "
                        f"{self.group_in_max} bytes of requests unhandled")
            return False
        return True

    def group_usage(self, group: str) -> tuple[int, int]:
        """(bytes received and not handled, bytes of unread replies) held
        for the group's connections."""
        g = self._groups.get(group)
        return (0, 0) if g is None else (g[0], g[1])

    def _close(self, fd: int, lc: _Conn[C], why: str | None) -> None:
        if self._conns.pop(fd, None) is None:
            return
        self._ungroup(lc.group, 0, lc.in_held)
        self._ungroup(lc.group, 1, len(lc.out))
        lc.in_held = 0
        self._backlog.discard(fd)
        with contextlib.suppress(OSError, ValueError):
            self._ep.unregister(fd)
        lc.sock.close()
        self._closed(lc.client, why)
