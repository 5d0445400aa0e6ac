"""The request lane on its own: serving, protocol errors, slow readers,
handler bugs, with real sockets and no daemon."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from vgpu_cgroup._node._lane import MAX_OUTBUF, PAUSE_EVENTS, Lane
from vgpu_cgroup._wire import proto

HELLO = proto.encode_frame({"t": "hello", "v": proto.PROTO_VERSION, "role": "hook", "pid": 1,
                            "comm": "t"})


def reserve(rid: int, n: int = 1) -> bytes:
    return proto.encode_frame({"t": "reserve", "id": rid, "slot": 0, "n": n})


class Harness:
    def __init__(self, *, send_timeout: float = 5.0, **groups: int) -> None:
        self.handled: list[tuple[str, proto.Event]] = []
        self.closed: list[tuple[str, str | None]] = []
        self.failed: list[tuple[str, BaseException]] = []
        self.after: list[tuple[str, int]] = []  # (client, requests handled by then)
        self.lane: Lane[str] = Lane(self._handle, self._closed, self._failed,
                                    after=self._after, send_timeout=send_timeout,
                                    **groups)
        self.peers: list[socket.socket] = []

    def _handle(self, client: str, ev: proto.Event) -> proto.Reply | None:
        self.handled.append((client, ev))
        if isinstance(ev, proto.Reserve):
            if ev.n == 666:
                raise RuntimeError("handler bug")
            if ev.n == 777:  # a large reply, as a control request's can be
                return proto.Error(code="invalid", msg="x" * 60_000, id=ev.id)
            return proto.Granted(id=ev.id)
        return None

    def _after(self, client: str) -> None:
        if client == "after-bug":
            raise RuntimeError("after bug")
        self.after.append((client, len(self.handled)))

    def _closed(self, client: str, why: str | None) -> None:
        self.closed.append((client, why))

    def _failed(self, client: str, exc: BaseException) -> None:
        self.failed.append((client, exc))

    def connect(self, name: str, pending: bytes = b"", group: str = "") -> socket.socket:
        ours, theirs = socket.socketpair()
        conn = proto.Connection()
        conn.feed(HELLO + pending)
        assert isinstance(conn.next_event(), proto.Hello)
        self.lane.add(ours, conn, name, group)
        theirs.settimeout(2)
        self.peers.append(theirs)
        return theirs

    def pump(self, rounds: int = 3) -> None:
        for _ in range(rounds):
            self.lane.run_ready()


def flood(h: Harness, peer: socket.socket, rounds: int, *, until_closed: bool = False) -> None:
    """Send requests without reading the replies, pumping the lane between."""
    peer.setblocking(False)
    req = reserve(1) * 2000
    for _ in range(rounds):
        with contextlib.suppress(BlockingIOError):
            peer.send(req)
        h.pump(1)
        if until_closed and h.closed:
            return


def read_frame(sock: socket.socket) -> dict[str, Any]:
    hdr = sock.recv(4, socket.MSG_WAITALL)
    (n,) = struct.unpack(">I", hdr)
    out: dict[str, Any] = msgpack.unpackb(sock.recv(n, socket.MSG_WAITALL))
    return out


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.lane.close_all("test over")
    for p in harness.peers:
        p.close()


def test_requests_answered_in_order_and_pending_bytes_served(h: Harness) -> None:
    a = h.connect("a", pending=reserve(1))  # arrived with the hello
    assert read_frame(a) == {"t": "granted", "id": 1}
    a.sendall(reserve(2) + reserve(3))
    h.pump()
    assert read_frame(a)["id"] == 2
    assert read_frame(a)["id"] == 3
    assert [ev.id for _c, ev in h.handled if isinstance(ev, proto.Reserve)] == [1, 2, 3]


def test_peer_close_is_reported_once(h: Harness) -> None:
    a = h.connect("a")
    a.close()
    h.peers.remove(a)
    h.pump()
    assert h.closed == [("a", None)]
    assert len(h.lane) == 0


def test_protocol_error_answers_then_closes_and_others_carry_on(h: Harness) -> None:
    a = h.connect("a")
    b = h.connect("b")
    a.sendall(reserve(1) + struct.pack(">I", 3) + b"\xc1\xc1\xc1")  # a good frame, then garbage
    b.sendall(reserve(9))
    h.pump()
    assert read_frame(a) == {"t": "granted", "id": 1}
    err = read_frame(a)
    assert err["t"] == "error"
    assert err["code"] == "decode"
    assert a.recv(1) == b""  # closed after the error
    assert h.closed[0][0] == "a"
    assert "protocol error" in str(h.closed[0][1])
    assert read_frame(b) == {"t": "granted", "id": 9}


def test_handler_bug_closes_that_connection_only(h: Harness) -> None:
    a = h.connect("a")
    b = h.connect("b")
    a.sendall(reserve(1, n=666))
    h.pump()
    assert [c for c, _e in h.failed] == ["a"]
    assert isinstance(h.failed[0][1], RuntimeError)
    assert a.recv(1) == b""
    b.sendall(reserve(2))
    h.pump()
    assert read_frame(b)["id"] == 2


def test_reader_that_never_reads_is_cut_off() -> None:
    h = Harness(send_timeout=0.0)
    try:
        a = h.connect("a")
        b = h.connect("b")
        # Replies pile up unread until the kernel buffer is full; then the
        # lane keeps them and, past the deadline (0 s here), closes.
        flood(h, a, 200, until_closed=True)
        assert h.closed
        assert h.closed[0][0] == "a"
        assert "too slow" in str(h.closed[0][1])
        b.sendall(reserve(5))
        h.pump()
        assert read_frame(b)["id"] == 5
    finally:
        h.lane.close_all("test over")
        for p in h.peers:
            p.close()


def test_a_peer_that_does_not_read_is_not_read_either() -> None:
    h = Harness(send_timeout=60.0)
    try:
        flood(h, h.connect("a"), 300)
        # The kernel's buffers filled up both ways and the lane stopped
        # reading: what it holds stays within one read's replies.
        conn = next(iter(h.lane._conns.values()))
        assert conn.out or conn.paused
        assert len(conn.out) <= MAX_OUTBUF
        assert len(conn.out) + conn.conn.buffered < 4 * 65536
        assert not h.closed
    finally:
        h.lane.close_all("test over")
        for p in h.peers:
            p.close()


def test_close_all_reports_every_connection(h: Harness) -> None:
    h.connect("a")
    h.connect("b")
    h.lane.close_all("stopping")
    assert sorted(h.closed) == [("a", "stopping"), ("b", "stopping")]
    assert h.lane.run_ready() == 0


def test_after_runs_once_per_read_after_its_replies(h: Harness) -> None:
    a = h.connect("a")
    a.sendall(reserve(1) + reserve(2))
    h.pump()
    assert read_frame(a)["id"] == 1
    assert read_frame(a)["id"] == 2
    assert h.after == [("a", 2)]  # once, after both
    b = h.connect("after-bug")
    b.sendall(reserve(3))
    h.pump()
    assert read_frame(b)["id"] == 3  # the reply went out before the bug
    assert h.closed == [("after-bug", "internal error")]
    assert [str(e) for _c, e in h.failed] == ["after bug"]
    a.sendall(reserve(4))
    h.pump()
    assert read_frame(a)["id"] == 4


def test_watched_fd_is_reported_and_connections_served_in_one_poll(h: Harness) -> None:
    r, w = os.pipe()
    try:
        h.lane.watch(r)
        a = h.connect("a")
        assert h.lane.poll(0.0)[0] == []
        os.write(w, b"x")
        a.sendall(reserve(1))
        deadline = time.monotonic() + 2
        seen: list[int] = []
        while not seen and time.monotonic() < deadline:
            seen = h.lane.poll(0.1)[0]
        assert seen == [r]
        h.pump()
        assert read_frame(a)["id"] == 1
    finally:
        os.close(r)
        os.close(w)


def test_pipelined_requests_are_served_a_pass_at_a_time(h: Harness) -> None:
    """A read of thousands of requests is handled PAUSE_EVENTS per pass,
    the rest kept in the buffer; another connection is served in between,
    and all of them are answered, in order, in the end."""
    a = h.connect("a")
    b = h.connect("b")
    n = 3 * PAUSE_EVENTS + 7
    a.sendall(b"".join(reserve(i) for i in range(n)))
    h.pump(1)
    assert len(h.handled) == PAUSE_EVENTS
    b.sendall(reserve(99_999))
    h.pump(1)
    assert read_frame(b)["id"] == 99_999
    got = [read_frame(a)["id"] for _ in range(PAUSE_EVENTS)]
    for _ in range(10):
        h.pump(1)
    got += [read_frame(a)["id"] for _ in range(n - PAUSE_EVENTS)]
    assert got == list(range(n))
    assert not h.closed
    assert h.lane.group_usage("") == (0, 0)


def test_a_group_cannot_hold_more_unread_replies_than_its_bound() -> None:
    """Connections of one group that never read their replies: the one that
    takes the group past group_out_max is closed; another group is served
    and the group's usage goes back to nothing once they are gone."""
    h = Harness(send_timeout=60.0, group_out_max=300_000)
    try:
        peers = [h.connect(f"a{i}", group="flood") for i in range(8)]
        other = h.connect("b", group="other")
        for p in peers:
            p.setblocking(False)
        for _ in range(50):
            for p in peers:
                with contextlib.suppress(BlockingIOError):
                    p.send(reserve(1, n=777) * 16)
            h.pump(1)
            if h.closed:
                break
        assert h.closed
        assert "bytes of replies unread" in str(h.closed[0][1])
        assert {c for c, _ in h.closed} <= {f"a{i}" for i in range(8)}
        assert h.lane.group_usage("flood")[1] <= 300_000
        other.sendall(reserve(5))
        h.pump()
        assert read_frame(other)["id"] == 5
    finally:
        h.lane.close_all("test over")
        for p in h.peers:
            p.close()
    assert h.lane.group_usage("flood") == (0, 0)


def test_a_group_cannot_hold_more_partial_frames_than_its_bound() -> None:
    h = Harness(group_in_max=100_000)
    try:
        peers = [h.connect(f"a{i}", group="flood") for i in range(4)]
        part = struct.pack(">I", 65536) + b"\x81" + b"x" * 40_000  # a frame never finished
        for p in peers:
            p.sendall(part)
            h.pump(1)
        assert len(h.closed) == 2  # the third and fourth went past 100_000 bytes
        assert all("requests unhandled" in str(why) for _c, why in h.closed)
        assert h.lane.group_usage("flood")[0] == 2 * 40_005
    finally:
        h.lane.close_all("test over")
        for p in h.peers:
            p.close()
    assert h.lane.group_usage("flood") == (0, 0)
