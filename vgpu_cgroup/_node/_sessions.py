"""Registration: a connection's handshake, from its hello to the welcome
with the shared regions, and its end.

After ``_accept`` admitted a connection it is a trio task here until the
handshake is done, all of it within the handshake timeout; then it belongs
to the lane (``_lane``), which serves its requests. Until then it counts as
one of its slice's handshakes in progress; whatever ends it, its charge in
the bounds is given back (``ClientBounds.release`` is idempotent and called
from every path that ends a connection). A hooked process becomes a tree
client with shared pages; one that reconnects after a daemon restart takes
over its placeholder (``_recovery``) and re-declares what it holds.

Isolation: anything that goes wrong in one connection (bad frames, a
vanished peer, a bug) is caught here, logged, and only that connection is
closed. One thread: handshakes are trio tasks on the daemon's thread, and
registration does no I/O, so nothing leaks if the peer goes away mid-way.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket as _stdsocket
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import trio
import trio.socket
from structlog.typing import FilteringBoundLogger

from vgpu_cgroup._core import ClientBounds, ConfigError, DaemonConfig, SliceTree, Ticket
from vgpu_cgroup._wire import MAX_DEVICES, ClientShm, proto

from ._accept import Acceptor
from ._compute import ComputeService
from ._identity import cgroup_of_pid
from ._lane import Lane
from ._memory import MemoryService
from ._nvml import Device
from ._recovery import Recovery
from ._session import Close, Session

#: A handshake slower than this is worth a warning (registration's goal is 5 ms).
SLOW_HANDSHAKE_S = 1.0
SEND_TIMEOUT_S = 5.0
RECV_CHUNK = 65536


class SessionHost(Protocol):
    """What registration needs of the daemon (``_daemon.Daemon``)."""

    @property
    def cfg(self) -> DaemonConfig: ...
    @property
    def tree(self) -> SliceTree: ...
    @property
    def bounds(self) -> ClientBounds: ...
    @property
    def devices(self) -> Mapping[str, Device]: ...
    @property
    def clients(self) -> dict[int, Session]: ...
    @property
    def lane(self) -> Lane[Session]: ...
    @property
    def memory(self) -> MemoryService: ...
    @property
    def recovery(self) -> Recovery: ...
    @property
    def compute(self) -> ComputeService: ...
    @property
    def clock(self) -> Callable[[], int]: ...
    @property
    def tick_ns(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    @property
    def handshake_timeout(self) -> float: ...
    @property
    def log(self) -> FilteringBoundLogger: ...


class Sessions:
    """Handshakes, registration and the end of connections."""

    def __init__(self, host: SessionHost, door: Acceptor) -> None:
        self.d = host
        self.door = door
        #: connections open: in a handshake or served by the lane
        self.open = 0
        self._next_id = 1

    def start(self, nursery: trio.Nursery, sock: _stdsocket.socket, pid: int, uid: int,
              slc: str, ticket: Ticket) -> None:
        """An admitted connection: its handshake, as a task of ``nursery``."""
        self.open += 1
        nursery.start_soon(self._connection, trio.socket.from_stdlib_socket(sock),
                           pid, uid, slc, ticket)

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
            raise Close
        return data

    async def _connection(self, sock: trio.socket.SocketType, pid: int, uid: int, slc: str,
                          ticket: Ticket) -> None:
        """The handshake (hello, welcome with the shared regions), all of it
        within the handshake timeout; then the connection belongs to the
        lane, which serves its requests. Until then it counts as one of
        ``slc``'s handshakes in progress; whatever ends it, its charge is
        given back (``finally``)."""
        conn = proto.Connection()
        client: Session | None = None
        log = self.d.log.bind(pid=pid, slice=slc)
        handed_over = False
        t_accept = time.monotonic()
        clog = self.door.clog
        try:
            with sock:
                try:
                    with trio.fail_after(self.d.handshake_timeout):
                        hello: proto.Event | None = None
                        while hello is None:
                            conn.feed(await self._recv(sock))
                            hello = conn.next_event()
                        assert isinstance(hello, proto.Hello)
                        refusal = self.d.bounds.hello(ticket, hello.role)
                        if refusal is not None:
                            self.door.refused(refusal, slc, pid, uid)
                            with contextlib.suppress(OSError):
                                os.write(sock.fileno(),
                                         conn.send(self.door.limit_error(refusal)))
                            return
                        client = self.register(hello, pid, uid, slc, ticket)
                        log = client.log
                        await self._welcome(sock, conn, client)
                    took = time.monotonic() - t_accept
                    if took > SLOW_HANDSHAKE_S and clog(slc):
                        log.warning("slow handshake: the daemon is short of CPU",
                                    seconds=round(took, 3))
                    self.d.lane.add(_stdsocket.socket(fileno=sock.detach()), conn, client, slc)
                    handed_over = True
                except proto.ProtocolError as exc:
                    if clog(slc):
                        log.warning("protocol error, closing", code=exc.code, error=exc.msg)
                    with trio.move_on_after(1):
                        await self._sendall(sock, conn.send(exc.reply()))
                except trio.TooSlowError:
                    if clog(slc):
                        log.warning("handshake not done in time, closing",
                                    seconds=round(time.monotonic() - t_accept, 3))
                except (Close, ConnectionError):
                    pass
                except OSError as exc:
                    if clog(slc):
                        log.info("connection error", error=str(exc))
        except Exception:
            if clog(slc):
                log.exception("internal error on connection, closing it")
        finally:
            if not handed_over:
                self.open -= 1
                self.d.bounds.release(ticket)
                if client is not None:
                    self.drop(client)

    def register(self, hello: proto.Hello, pid: int, uid: int, slc: str | None = None,
                 ticket: Ticket | None = None) -> Session:
        """Tree membership and shared regions of a peer whose slice (its
        cgroup, read at accept) is ``slc`` (no I/O, so nothing leaks)."""
        d = self.d
        if slc is None:
            try:
                slc = cgroup_of_pid(pid)
            except (OSError, LookupError) as exc:
                raise proto.ProtocolError("internal",
                                          f"cannot read cgroup of pid {pid}: {exc}") from None
        if d.cfg.identity == "declared" and hello.slice is not None:
            slc = hello.slice.strip("/")
        cid = self._next_id
        self._next_id += 1
        log = d.log.bind(client=cid, pid=pid, slice=slc)
        client = Session(id=cid, role=hello.role, pid=pid, uid=uid, comm=hello.comm,
                         slice=slc, log=log, ticket=ticket)
        if hello.role == "hook":
            was_ghost = d.recovery.take(pid)  # its placeholder, booked at start: it re-declares now
            try:
                client.slice = d.tree.attach(cid, slc, pid, hello.comm)
            except (ValueError, ConfigError) as exc:
                raise proto.ProtocolError("invalid", f"bad slice {slc!r}: {exc}") from None
            client.in_tree = True
            d.clients[cid] = client
            client.shm = ClientShm(tick_ns=d.tick_ns, epoch=d.epoch, name=f"vgpu-{cid}")
            d.memory.readmit(client, hello.held)
            if hello.held or was_ghost:
                # A reconnecting process: book its context and module memory
                # now, not at its next attach, or neighbours reconnecting
                # meanwhile could be admitted into that room.
                now = d.clock()
                for uuid in d.devices:
                    d.memory.reconcile(client, uuid, now, d.memory.nvml_used(uuid))
            if self.door.clog(client.slice_key):
                log.info("client attached", comm=hello.comm)
        else:
            d.clients[cid] = client
        return client

    async def _welcome(self, sock: trio.socket.SocketType, conn: proto.Connection,
                       client: Session) -> None:
        """The welcome frame, with the two region fds for a hook."""
        welcome = conn.send(proto.Welcome(id=client.id, slice=client.slice,
                                          tick_ns=self.d.tick_ns, epoch=self.d.epoch,
                                          devices=self.visible_devices(client)))
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

    def visible_devices(self, client: Session) -> tuple[str, ...] | None:
        """What a hook's welcome lists: the UUIDs of the devices its slice
        may use (``gpu.devices`` along its path), in the node's order, at
        most MAX_DEVICES of them (what a hook can attach); None when that
        is every device of the node, or for a control connection."""
        if not client.in_tree:
            return None
        node = sorted(self.d.devices.values(), key=lambda dev: dev.index)
        allowed = self.d.tree.allowed_devices(client.id, [(dev.uuid, dev.index) for dev in node])
        if len(allowed) == len(node):
            return None
        return tuple(allowed[:MAX_DEVICES])

    def lane_closed(self, client: Session, why: str | None) -> None:
        """A connection the lane served has ended."""
        self.open -= 1
        if why is not None and self.door.clog(client.slice_key):
            client.log.info("connection closed", reason=why)
        self.drop(client)

    def lane_failed(self, client: Session, exc: BaseException) -> None:
        if self.door.clog(client.slice_key):
            client.log.error("internal error on connection, closing it",
                             exc_info=(type(exc), exc, exc.__traceback__))

    def drop(self, client: Session) -> None:
        """Connection gone: release everything, close fds, unmap."""
        d = self.d
        if client.ticket is not None:
            d.bounds.release(client.ticket)
        if d.clients.pop(client.id, None) is None:
            return
        if client.in_tree:
            d.compute.detach(client, d.clock())
        if client.in_tree:
            held = d.tree.held(client.id)
            slc = d.tree.client_slice(client.id)
            d.tree.detach(client.id)
            if self.door.clog(client.slice_key):
                client.log.info("client detached")
            # A connection can end while its process lives on and still holds
            # GPU memory (a hook that gave up waiting for the daemon and will
            # reconnect): keep that memory booked until NVML shows it gone.
            d.recovery.keep(client.pid, held, slc)
        if client.shm is not None:
            client.shm.close()
            client.shm = None
