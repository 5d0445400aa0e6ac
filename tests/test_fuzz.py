"""Hostile input: whatever a peer sends, it gets a clear error and a close,
and the daemon and every other client carry on (SPEC.md, "Bad input").

Three levels, fastest first: the sans-IO protocol (bytes in, events or
ProtocolError out), the daemon's request handlers called directly (no
socket), and the real daemon over its socket with a well-behaved hook
checked after every hostile case. bench/fuzz_campaign.py runs the same
strategies for much longer.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from _e2e import VgpudProc
from conftest import FAKE_DEVICES, FakeHook, RunningDaemon, requires_sim, start_daemon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vgpu_cgroup._core._config import DaemonConfig
from vgpu_cgroup._core._tree import SliceTree
from vgpu_cgroup._node import Daemon, Session
from vgpu_cgroup._wire import proto

DEV = FAKE_DEVICES[0].uuid
MiB = 1 << 20

# ---- strategies (shared with bench/fuzz_campaign.py) -------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True), st.text(max_size=40), st.binary(max_size=40))
values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                     st.dictionaries(st.text(max_size=8), inner, max_size=5)),
    max_leaves=12)
KEYS = ["t", "v", "role", "pid", "comm", "slice", "held", "id", "dev", "total", "slot", "n",
        "op", "runtime", "knobs"]
TYPES = ["hello", "attach", "reserve", "release", "ctl", "welcome", "granted", "bogus", ""]
OPS = [*sorted(proto.CTL_OPS), "nope"]


def _field(key: str) -> st.SearchStrategy[Any]:
    """Mostly plausible values for a key, sometimes anything at all."""
    plausible: dict[str, st.SearchStrategy[Any]] = {
        "t": st.sampled_from(TYPES),
        "v": st.sampled_from([1, 1, 1, 0, 2, -1]),
        "role": st.sampled_from(["hook", "ctl", "root", ""]),
        "pid": st.integers(min_value=-1, max_value=2**32),
        "comm": st.text(max_size=20),
        "slice": st.sampled_from(["fuzz.slice", "fuzz.slice/a", "", "/", "../x", "a//b",
                                  "x" * 300, "fuzz.slice/\0"]),
        "held": st.lists(st.fixed_dictionaries(
            {"dev": st.sampled_from([DEV, "GPU-nope", ""]),
             "n": st.integers(min_value=-1, max_value=2**64 - 1)}), max_size=3),
        "id": st.integers(min_value=-1, max_value=2**32),
        "dev": st.sampled_from([DEV, FAKE_DEVICES[1].uuid, "GPU-nope", ""]),
        "total": st.integers(min_value=-1, max_value=2**64 - 1),
        "slot": st.integers(min_value=-1, max_value=17),
        "n": st.integers(min_value=-1, max_value=2**64 - 1),
        "op": st.sampled_from(OPS),
        "runtime": st.booleans(),
        "knobs": st.dictionaries(
            st.sampled_from(["gpu.memory.max", "gpu.cores.max", "gpu.cores.weight",
                             "gpu.bogus", ""]),
            st.sampled_from(["max", "1G", "50", "-1", "abc", "1e400", ""]), max_size=3),
    }
    return st.one_of(plausible[key], plausible[key], values)


messages = st.fixed_dictionaries(
    {"t": _field("t")},
    optional={k: _field(k) for k in KEYS if k != "t"})


def frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def hello(role: str = "hook", **extra: Any) -> dict[str, Any]:
    return {"t": "hello", "v": 1, "role": role, "pid": os.getpid(), "comm": "fuzz", **extra}


# A byte stream: good frames, mangled frames and raw junk, in any order.
chunks = st.one_of(
    messages.map(frame),
    values.map(lambda v: frame(v)),
    st.binary(max_size=64),
    st.tuples(messages.map(frame), st.integers(min_value=1, max_value=8)).map(
        lambda fc: fc[0][: -fc[1]]),  # truncated
    st.integers(min_value=0, max_value=2**32 - 1).map(lambda n: struct.pack(">I", n)),
)
streams = st.lists(chunks, max_size=8).map(b"".join)


# ---- level 1: sans-IO protocol ----------------------------------------------


def _caught(fn: Callable[[], object]) -> proto.ProtocolError | None:
    """Run fn; the ProtocolError it raised (checked to carry a known code),
    or None. Any other exception propagates and fails the test."""
    try:
        fn()
    except proto.ProtocolError as exc:
        err = exc
    else:
        return None
    assert err.code in proto.ERROR_CODES
    return err


def _drive(conn: proto.Connection, data: bytes) -> list[proto.Event]:
    """Feed data in uneven pieces; return events; only ProtocolError may escape."""
    out: list[proto.Event] = []
    for i in range(0, len(data), 7):
        conn.feed(data[i : i + 7])
        while (ev := conn.next_event()) is not None:
            out.append(ev)
    return out


@settings(max_examples=150, deadline=None)
@given(prefix=st.sampled_from([b"", frame(hello()), frame(hello("ctl"))]), data=streams)
def test_connection_only_raises_protocol_errors(prefix: bytes, data: bytes) -> None:
    conn = proto.Connection()
    events: list[proto.Event] = []
    err = _caught(lambda: events.extend(_drive(conn, prefix + data)))
    if err is not None:
        reply = conn.send(err.reply())  # the error always frames
        assert proto.decode_body(reply[4:])["t"] == "error"
        # Dead after an error: the same error again, whatever comes next.
        with pytest.raises(proto.ProtocolError) as again:
            conn.feed(frame(hello()))
        assert again.value is err
        return
    for ev in events[1:]:
        assert not isinstance(ev, proto.Hello)
    if events:
        assert isinstance(events[0], proto.Hello)
    assert conn.hello is None or isinstance(events[0], proto.Hello)


@settings(max_examples=150, deadline=None)
@given(msg=messages)
def test_any_map_parses_or_fails_with_a_known_code(msg: dict[str, Any]) -> None:
    conn = proto.Connection()
    conn.feed(frame(hello()))
    assert isinstance(conn.next_event(), proto.Hello)
    conn.feed(frame(msg))
    got: list[proto.Event | None] = []
    err = _caught(lambda: got.append(conn.next_event()))
    if err is not None:
        if err.id is not None:
            assert 0 <= err.id <= proto.U32_MAX
        return
    ev = got[0]
    assert ev is not None
    if isinstance(ev, proto.Reserve):
        assert 0 <= ev.slot < proto.MAX_DEVICES
        assert ev.n >= 0


def test_frame_bounds_are_checked_before_the_body_arrives() -> None:
    for n in (0, proto.MAX_FRAME + 1, 2**32 - 1):
        conn = proto.Connection()
        conn.feed(struct.pack(">I", n))
        with pytest.raises(proto.ProtocolError) as e:
            conn.next_event()
        assert e.value.code == "frame"


# ---- level 2: the daemon's handlers, no socket --------------------------------


@pytest.fixture(scope="module")
def bare_daemon() -> Iterator[Daemon]:
    with tempfile.TemporaryDirectory() as td:
        cfg = DaemonConfig(socket=f"{td}/s", runtime_dir=td, etc_slices_dir=f"{td}/etc",
                           identity="declared")
        d = Daemon(cfg, list(FAKE_DEVICES), simulated=True)
        d.tree.set_knobs("fuzz.slice", {"gpu.memory.max": "64M"}, "test")
        yield d
        for c in list(d.clients.values()):
            d._drop(c)


def _books_consistent(tree: SliceTree) -> None:
    """Every slice's current = what its clients hold; no max exceeded."""
    for path in tree.slices():
        show = tree.show(path)
        node = tree.node(path)
        total = sum(sum(tree.held(cid).values()) for n in node.subtree() for cid in n.clients)
        assert show["gpu.memory.current"]["total"] == total, path
        mx = node.mem_max
        if mx is not None:
            for dev, cur in node.current.items():
                assert cur <= mx, (path, dev, cur, mx)


hook_events = st.one_of(
    st.builds(proto.Reserve, id=st.integers(0, 9), slot=st.integers(0, 15),
              n=st.one_of(st.integers(0, 80 * MiB), st.integers(0, 2**63 - 1))),
    st.builds(proto.Release, slot=st.integers(0, 15),
              n=st.one_of(st.integers(0, 80 * MiB), st.integers(0, 2**63 - 1))),
    st.builds(proto.Attach, id=st.integers(0, 9),
              dev=st.sampled_from([DEV, FAKE_DEVICES[1].uuid, "GPU-nope"]),
              total=st.integers(0, 2**63 - 1)),
)
ctl_events = st.builds(
    proto.Ctl, id=st.integers(0, 9), op=st.sampled_from(sorted(proto.CTL_OPS)),
    slice=st.sampled_from([None, "", "fuzz.slice", "nope.slice", "fuzz.slice/x", "a/../b"]),
    runtime=st.booleans(),
    knobs=st.dictionaries(st.sampled_from(["gpu.memory.max", "gpu.cores.max", "gpu.x"]),
                          st.sampled_from(["max", "32M", "50", "-1", "zz"]), max_size=2))


def _dispatch_into(d: Daemon, who: Session, ev: proto.Event,
                   out: list[proto.Reply | None]) -> None:
    out.append(d._dispatch(who, ev))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(evs=st.lists(st.one_of(hook_events, hook_events, ctl_events), max_size=25))
def test_handlers_answer_or_raise_protocol_error(bare_daemon: Daemon,
                                                 evs: list[Any]) -> None:
    """Any sequence of well-typed but hostile requests: each handler returns a
    reply or raises ProtocolError (never anything else), and the books stay
    exact and within every cap after each step."""
    d = bare_daemon
    hook = d._register(proto.Hello(v=1, role="hook", pid=os.getpid(), comm="fuzz",
                                   slice="fuzz.slice/job"), os.getpid(), 0)
    ctl = d._register(proto.Hello(v=1, role="ctl", pid=os.getpid(), comm="fuzz"),
                      os.getpid(), 1000)  # not root: set/reset must be refused
    wire = proto.Connection()
    wire.hello = proto.Hello(v=1, role="hook", pid=1, comm="fuzz")
    try:
        for ev in evs:
            who: Session = ctl if isinstance(ev, proto.Ctl) else hook
            replies: list[proto.Reply | None] = []
            call = functools.partial(_dispatch_into, d, who, ev, replies)
            if _caught(call) is not None:
                continue
            reply = replies[0]
            if isinstance(ev, proto.Ctl) and ev.op in ("set", "reset"):
                assert isinstance(reply, proto.Error)
                assert reply.code == "permission"
            if reply is not None and who is hook:
                wire.send(reply)  # hook replies always fit one frame
            _books_consistent(d.tree)
    finally:
        d._drop(hook)
        d._drop(ctl)
    _books_consistent(d.tree)
    assert d.tree.show("fuzz.slice")["gpu.memory.current"]["total"] == 0


# ---- level 3: the real daemon over its socket ----------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    rd, stop = start_daemon(tmp_path_factory.mktemp("fuzzd"), handshake_timeout=0.5)
    yield rd
    stop()


@pytest.fixture(scope="module")
def good(live: RunningDaemon) -> Iterator[Callable[[], None]]:
    """A well-behaved hook on its own connection, checked after each case."""
    hook = FakeHook(live, slice="good.slice")
    slot = int(hook.attach()["slot"])

    def check() -> None:
        assert hook.reserve(slot, MiB)["t"] == "granted"
        hook.release(slot, MiB)
        with live.client() as c:
            assert c.ctl("status")["protocol"] == 1

    check()
    yield check
    hook.close()


def _exchange(path: str, data: bytes, timeout: float = 5.0) -> tuple[list[dict[str, Any]], bool]:
    """Send data, half-close, read until the daemon closes: (frames, closed)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    try:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon already answered and closed
        buf = b""
        closed = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got = s.recv(65536)
            except ConnectionResetError:
                closed = True
                break
            if not got:
                closed = True
                break
            buf += got
    finally:
        s.close()
    frames = []
    while len(buf) >= 4:
        (n,) = struct.unpack_from(">I", buf)
        assert 1 <= n <= proto.MAX_CTL_REPLY
        assert len(buf) >= 4 + n, "daemon sent a truncated frame"
        m = msgpack.unpackb(buf[4 : 4 + n], raw=False)
        assert isinstance(m, dict)
        assert isinstance(m.get("t"), str)
        frames.append(m)
        buf = buf[4 + n :]
    assert buf == b""
    return frames, closed


def _assert_clear_close(frames: list[dict[str, Any]], closed: bool) -> None:
    assert closed, "the daemon must close a connection that misbehaved or ended"
    errors = [i for i, f in enumerate(frames) if f["t"] == "error"]
    if errors:
        assert errors == [len(frames) - 1], "an error is the last thing sent"
        err = frames[-1]
        assert err["code"] in proto.ERROR_CODES
        assert isinstance(err["msg"], str)
        assert err["msg"]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=st.sampled_from([b"", frame(hello(slice="fuzz.slice")), frame(hello("ctl"))]),
       data=streams)
def test_socket_garbage_gets_an_error_and_a_close(live: RunningDaemon, good: Callable[[], None],
                                                  prefix: bytes, data: bytes) -> None:
    frames, closed = _exchange(live.socket, prefix + data)
    _assert_clear_close(frames, closed)
    good()


@pytest.mark.parametrize(("data", "code"), [
    (struct.pack(">I", 2**32 - 1), "frame"),
    (struct.pack(">I", 0), "frame"),
    (frame([1, 2, 3]), "decode"),
    (struct.pack(">I", 3) + b"\xc1\xc1\xc1", "decode"),
    (frame({"t": "reserve", "id": 1, "slot": 0, "n": 1}), "order"),
    (frame({**hello(), "v": 2}), "version"),
    (frame(hello(slice="fuzz.slice")) + frame({"t": "reserve", "id": 5, "slot": 0, "n": "x"}),
     "type"),
    (frame(hello(slice="fuzz.slice")) + frame({"t": "reserve", "id": 5, "slot": 3, "n": 1}),
     "invalid"),
    (frame(hello(slice="fuzz.slice")) + frame(hello()), "order"),
    (frame(hello("ctl")) + frame({"t": "reserve", "id": 1, "slot": 0, "n": 1}), "order"),
    (frame(hello(slice="fuzz.slice")) + frame({"t": "attach", "id": 1, "dev": DEV, "total": 1})
     + frame({"t": "release", "slot": 0, "n": MiB}), "invalid"),
    (frame({"t": "hello", "v": 1, "role": "hook", "pid": 1, "comm": "x", "held": [1] * 65}),
     "type"),
], ids=["huge-length", "zero-length", "not-a-map", "bad-msgpack", "before-hello", "version",
        "wrong-type", "unattached-slot", "hello-twice", "hook-msg-on-ctl", "over-release",
        "too-many-held"])
def test_each_kind_of_violation_names_its_code(live: RunningDaemon, good: Callable[[], None],
                                               data: bytes, code: str) -> None:
    frames, closed = _exchange(live.socket, data)
    _assert_clear_close(frames, closed)
    assert frames, "no error reply"
    assert (frames[-1]["t"], frames[-1]["code"]) == ("error", code), frames
    if code == "version":
        assert frames[-1]["supported"] == [1]
    if b"\xa2id\x05" in data:  # a request with a readable id: the error names it
        assert frames[-1].get("id") == 5
    good()


def test_silent_client_is_closed_after_the_handshake_timeout(
        live: RunningDaemon, good: Callable[[], None]) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(live.socket)
    t0 = time.monotonic()
    good()  # served while the silent one waits
    with contextlib.suppress(ConnectionResetError):
        assert s.recv(100) == b""
    assert 0.3 < time.monotonic() - t0 < 3.0
    s.close()
    # Half a frame, then silence: the same.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(live.socket)
    s.sendall(frame(hello())[:5])
    with contextlib.suppress(ConnectionResetError):
        assert s.recv(100) == b""
    s.close()
    good()


def test_pipelined_flood_is_answered_in_order(live: RunningDaemon,
                                             good: Callable[[], None]) -> None:
    """20 000 requests written as fast as the socket takes them (a writer
    thread; this side reads concurrently): every reply comes, in order, and
    the connection's books end at zero. (A peer that never reads is dropped
    after the send timeout instead: it cannot pin the daemon.)"""
    hook = FakeHook(live, slice="flood.slice")
    slot = int(hook.attach()["slot"])
    n = 20000
    batch = b"".join(frame({"t": "reserve", "id": i, "slot": slot, "n": 4096})
                     + frame({"t": "release", "slot": slot, "n": 4096}) for i in range(n))
    writer = threading.Thread(target=hook.client.sock.sendall, args=(batch,))
    writer.start()
    for i in range(n):
        r = hook.client.recv()
        assert r == {"t": "granted", "id": i}
    writer.join()
    good()
    with live.client() as c:
        assert c.ctl("show", slice="flood.slice")["gpu.memory.current"]["total"] == 0
    hook.close()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise LookupError("no VmRSS")


@requires_sim
@pytest.mark.e2e
def test_daemon_memory_stays_bounded_under_floods(tmp_path: Path) -> None:
    """A real vgpud process: RSS after rounds of connection, garbage and
    request floods is close to RSS after the first round."""
    d = VgpudProc(tmp_path)
    d.start()
    try:
        assert d.proc is not None
        dev = d.ctl("status")["devices"][0]["uuid"]

        def round_() -> None:
            socks = []
            # Connections that never speak, then vanish: fewer than the
            # slice may have in progress (limits.slice_handshakes, 128), as
            # the hooks below come from the same cgroup (test_bounds has
            # floods past it).
            for _ in range(100):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(d.socket)
                socks.append(s)
            for i in range(100):  # garbage
                _exchange(d.socket, os.urandom(200) if i % 2 else frame({"t": "x" * 3000}))
            from vgpu_cgroup._wire._client import Client

            hooks = []
            for _ in range(20):  # floods of real requests, then a close mid-stream
                c = Client(d.socket)
                c.hello("hook")
                slot = c.request({"t": "attach", "dev": dev, "total": 1 << 30})["slot"]
                c.sock.sendall(b"".join(
                    frame({"t": "reserve", "id": i, "slot": slot, "n": 4096}) for i in range(2000)))
                hooks.append(c)
            for c in hooks:
                c.close()
            for s in socks:
                s.close()
            time.sleep(0.3)

        round_()
        base = _rss_kib(d.proc.pid)
        for _ in range(3):
            round_()
        after = _rss_kib(d.proc.pid)
        assert after - base < 8 * 1024, (base, after)
        assert d.ctl("show")["gpu.memory.current"]["total"] == 0
        assert len(d.ctl("status")["clients"]) == 1  # just this ctl
    finally:
        d.cleanup()
