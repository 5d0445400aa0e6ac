"""The sans-IO protocol: framing, validation, ordering, and fuzzing."""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vgpu_cgroup._wire._protocol import (
    ERROR_CODES,
    MAX_FRAME,
    Attach,
    Attached,
    Connection,
    Ctl,
    Denied,
    Error,
    Granted,
    Hello,
    Ok,
    ProtocolError,
    Release,
    Reply,
    Reserve,
    Welcome,
    encode_frame,
)

HOOK_HELLO: dict[str, Any] = {"t": "hello", "v": 1, "role": "hook", "pid": 42, "comm": "python"}
CTL_HELLO: dict[str, Any] = {"t": "hello", "v": 1, "role": "ctl", "pid": 42, "comm": "vgpuctl"}


def frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def conn_after(hello: dict[str, Any]) -> Connection:
    c = Connection()
    c.feed(frame(hello))
    assert isinstance(c.next_event(), Hello)
    return c


def expect_error(c: Connection, data: bytes, code: str) -> ProtocolError:
    c.feed(data)
    with pytest.raises(ProtocolError) as info:
        c.events()
    assert info.value.code == code, info.value
    return info.value


def test_hello_parsed_with_held() -> None:
    c = Connection()
    c.feed(frame({**HOOK_HELLO, "slice": "a.slice", "held": [{"dev": "GPU-1", "n": 4096}]}))
    ev = c.next_event()
    assert isinstance(ev, Hello)
    assert ev.role == "hook"
    assert ev.pid == 42
    assert ev.slice == "a.slice"
    assert ev.held[0].dev == "GPU-1"
    assert ev.held[0].n == 4096
    assert c.role == "hook"


def test_hook_requests_in_one_chunk_and_byte_by_byte() -> None:
    data = (
        frame(HOOK_HELLO)
        + frame({"t": "attach", "id": 1, "dev": "GPU-x", "total": 1 << 30})
        + frame({"t": "reserve", "id": 2, "slot": 0, "n": 1024})
        + frame({"t": "release", "slot": 0, "n": 1024})
    )
    whole = Connection()
    whole.feed(data)
    evs = whole.events()
    trickle = Connection()
    got = []
    for b in data:
        trickle.feed(bytes([b]))
        got.extend(trickle.events())
    assert evs == got
    assert evs[1:] == [
        Attach(id=1, dev="GPU-x", total=1 << 30),
        Reserve(id=2, slot=0, n=1024),
        Release(slot=0, n=1024),
    ]


def test_ctl_set() -> None:
    c = conn_after(CTL_HELLO)
    c.feed(frame({"t": "ctl", "id": 7, "op": "set", "slice": "a.slice", "runtime": True,
                  "knobs": {"gpu.cores.max": "30"}}))
    ev = c.next_event()
    assert ev == Ctl(id=7, op="set", slice="a.slice", runtime=True,
                     knobs={"gpu.cores.max": "30"})


@pytest.mark.parametrize(
    ("msg", "code"),
    [
        ({"t": "attach", "id": 1, "dev": "x", "total": 1}, "order"),
        ({"t": "hello", "v": 2, "role": "hook", "pid": 1, "comm": "c"}, "version"),
        ({"t": "hello", "v": True, "role": "hook", "pid": 1, "comm": "c"}, "type"),
        ({"t": "hello", "v": 1, "role": "root", "pid": 1, "comm": "c"}, "type"),
        ({"t": "hello", "v": 1, "role": "hook", "pid": -1, "comm": "c"}, "type"),
        ({"t": "hello", "v": 1, "role": "hook", "pid": 1, "comm": 5}, "type"),
        ({"t": "hello", "v": 1, "role": "hook", "pid": 1, "comm": "c", "held": [1]}, "type"),
        ({"v": 1}, "type"),
        ([1, 2], "decode"),
    ],
)
def test_bad_hello(msg: Any, code: str) -> None:
    err = expect_error(Connection(), frame(msg), code)
    if code == "version":
        reply = msgpack.unpackb(encode_frame({"x": 1})[4:])  # sanity of encoder
        assert reply == {"x": 1}
        assert err.reply().supported == [1]


@pytest.mark.parametrize(
    ("msg", "code"),
    [
        (HOOK_HELLO, "order"),
        ({"t": "reserve", "id": 1, "slot": 0, "n": True}, "type"),
        ({"t": "reserve", "id": 1, "slot": 16, "n": 1}, "type"),
        ({"t": "reserve", "id": 1, "slot": 0, "n": -5}, "type"),
        ({"t": "reserve", "id": 2**32, "slot": 0, "n": 1}, "type"),
        ({"t": "reserve", "id": 1.0, "slot": 0, "n": 1}, "type"),
        ({"t": "reserve", "slot": 0, "n": 1}, "type"),
        ({"t": "attach", "id": 1, "dev": b"bytes", "total": 1}, "type"),
        ({"t": "attach", "id": 1, "dev": "", "total": 1}, "type"),
        ({"t": "release", "slot": "0", "n": 1}, "type"),
        ({"t": "ctl", "id": 1, "op": "status"}, "order"),
        ({"t": "bogus"}, "type"),
    ],
)
def test_bad_hook_messages(msg: Any, code: str) -> None:
    err = expect_error(conn_after(HOOK_HELLO), frame(msg), code)
    if isinstance(msg, dict) and type(msg.get("id")) is int and msg["id"] < 2**32:
        assert err.id == msg["id"]  # the error reply can name the request


@pytest.mark.parametrize(
    "msg",
    [
        {"t": "reserve", "id": 1, "slot": 0, "n": 1},
        {"t": "ctl", "id": 1, "op": "rm"},
        {"t": "ctl", "id": 1, "op": "set", "slice": "a", "knobs": {}},
        {"t": "ctl", "id": 1, "op": "set", "slice": "a", "knobs": {"k": 1}},
        {"t": "ctl", "id": 1, "op": "set", "slice": "a", "runtime": 1, "knobs": {"k": "v"}},
        {"t": "ctl", "id": 1, "op": "set", "knobs": {"k": "v"}},
    ],
)
def test_bad_ctl_messages(msg: Any) -> None:
    err = expect_error(conn_after(CTL_HELLO), frame(msg), err_code(msg))
    assert err.reply().code in ("order", "type")


def err_code(msg: dict[str, Any]) -> str:
    return "order" if msg["t"] != "ctl" else "type"


def test_frame_length_limits() -> None:
    expect_error(Connection(), struct.pack(">I", 0), "frame")
    expect_error(Connection(), struct.pack(">I", MAX_FRAME + 1), "frame")
    # A frame of exactly MAX_FRAME is accepted by the framer (then decoded).
    big = {"t": "hello", "v": 1, "role": "hook", "pid": 1, "comm": "c", "pad": "x" * 100}
    c = Connection()
    c.feed(frame(big))
    assert isinstance(c.next_event(), Hello)


def test_invalid_msgpack_and_trailing_bytes() -> None:
    expect_error(Connection(), struct.pack(">I", 1) + b"\xc1", "decode")
    body = msgpack.packb(HOOK_HELLO) + b"\x00"
    expect_error(Connection(), struct.pack(">I", len(body)) + body, "decode")
    ext = msgpack.packb({"t": "hello", "x": msgpack.ExtType(3, b"zz")})
    expect_error(Connection(), struct.pack(">I", len(ext)) + ext, "decode")


def test_dead_after_error() -> None:
    c = Connection()
    expect_error(c, struct.pack(">I", 0), "frame")
    with pytest.raises(ProtocolError):
        c.feed(frame(HOOK_HELLO))


def test_send_replies_roundtrip() -> None:
    c = conn_after(HOOK_HELLO)
    cases: list[tuple[Reply, dict[str, Any]]] = [
        (Welcome(id=3, slice="a.slice", tick_ns=10, epoch=9),
         {"t": "welcome", "v": 1, "id": 3, "slice": "a.slice", "tick_ns": 10, "epoch": 9}),
        (Welcome(id=3, slice="a.slice", tick_ns=10, epoch=9, devices=("GPU-b",)),
         {"t": "welcome", "v": 1, "id": 3, "slice": "a.slice", "tick_ns": 10, "epoch": 9,
          "devices": ["GPU-b"]}),
        (Attached(id=1, slot=0, mem_limit=None),
         {"t": "attached", "id": 1, "slot": 0, "mem_limit": None}),
        (Granted(id=2), {"t": "granted", "id": 2}),
        (Denied(id=2, slice="a", limit=5, current=4),
         {"t": "denied", "id": 2, "slice": "a", "limit": 5, "current": 4}),
        (Ok(id=1, data={"x": [1]}), {"t": "ok", "id": 1, "data": {"x": [1]}}),
        (Error(code="frame", msg="m"), {"t": "error", "code": "frame", "msg": "m"}),
    ]
    for msg, want in cases:
        out = c.send(msg)
        (n,) = struct.unpack(">I", out[:4])
        assert n == len(out) - 4
        assert msgpack.unpackb(out[4:]) == want


def test_granted_frame_is_the_generic_encoding() -> None:
    c = conn_after(HOOK_HELLO)
    for rid in (0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1):
        assert c.send(Granted(id=rid)) == encode_frame({"t": "granted", "id": rid})


def test_hook_reply_too_large_is_our_bug() -> None:
    c = conn_after(HOOK_HELLO)
    with pytest.raises(ValueError, match="exceeds"):
        c.send(Ok(id=1, data={"x": "y" * MAX_FRAME}))
    ctl = conn_after(CTL_HELLO)
    assert len(ctl.send(Ok(id=1, data={"x": "y" * MAX_FRAME}))) > MAX_FRAME


# ---- fuzzing: nothing but ProtocolError may ever escape ----------------------

fuzz_settings = settings(max_examples=300, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow])


def drive(c: Connection, data: bytes) -> None:
    code: str | None = None
    try:
        c.feed(data)
        c.events()
    except ProtocolError as exc:
        code = exc.reply().code
    assert code is None or code in ERROR_CODES


@fuzz_settings
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data: bytes) -> None:
    drive(Connection(), data)
    drive(conn_after(HOOK_HELLO), data)
    drive(conn_after(CTL_HELLO), data)


@fuzz_settings
@given(st.binary(max_size=600))
def test_fuzz_framed_random_body(body: bytes) -> None:
    if body:
        drive(conn_after(HOOK_HELLO), struct.pack(">I", len(body)) + body)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
keys = st.sampled_from(["t", "id", "slot", "n", "dev", "total", "op", "slice", "runtime",
                        "knobs", "v", "role", "pid", "comm", "held"])
type_names = st.sampled_from(["hello", "attach", "reserve", "release", "ctl", "x"])


@fuzz_settings
@given(st.dictionaries(keys, msgpack_values, max_size=8), type_names,
       st.sampled_from([None, HOOK_HELLO, CTL_HELLO]))
def test_fuzz_wrong_types(m: dict[str, Any], t: str, hello: dict[str, Any] | None) -> None:
    m = {**m, "t": t}
    c = Connection() if hello is None else conn_after(hello)
    try:
        c.feed(frame(m))
        evs = c.events()
    except ProtocolError:
        return
    # Whatever got through is well typed.
    for ev in evs:
        for name in getattr(ev, "__slots__", ()):
            assert not isinstance(getattr(ev, name), float)


@fuzz_settings
@given(st.integers(min_value=1, max_value=80))
def test_fuzz_truncated_frames(cut: int) -> None:
    data = frame(HOOK_HELLO) + frame({"t": "reserve", "id": 1, "slot": 0, "n": 10})
    c = Connection()
    c.feed(data[:cut])
    got = c.events()
    assert len(got) <= 2
    c.feed(data[cut:])
    assert len(got) + len(c.events()) == 2


# ---- error codes: one table for both sides (issue 16) ----

ROOT = Path(__file__).resolve().parent.parent


def test_error_codes_come_from_the_header_and_match_the_docs() -> None:
    # vgpu_abi.h's VGPU_ERROR_CODES is the list; the daemon's ERROR_CODES is
    # read from it, and docs/protocol.md names the same codes.
    header = (ROOT / "libhook" / "include" / "vgpu_abi.h").read_text()
    table = re.search(r"#define VGPU_ERROR_CODES\(X\)(.*?)\n\n", header, re.S)
    assert table is not None
    in_header = set(re.findall(r'X\(\w+, "(\w+)"\)', table.group(1)))
    assert in_header == ERROR_CODES
    assert "oom" in ERROR_CODES  # the daemon sends it for a context that does not fit
    doc = (ROOT / "docs" / "protocol.md").read_text()
    errors = doc[doc.index("Errors: "):]
    in_docs = set(re.findall(r"^\| `(\w+)` \|", errors, re.M))
    assert in_docs == ERROR_CODES


def test_error_validates_its_code() -> None:
    assert Error(code="oom", msg="no room for a context", id=3).code == "oom"
    with pytest.raises(ValueError, match="not one of"):
        Error(code="no-memory", msg="x")
    for code in ERROR_CODES:
        assert Connection().send(Error(code=code, msg="m"))


def test_daemon_sends_only_codes_of_the_table() -> None:
    # Every code the daemon's sources put in an error is in the table (a
    # static check: the ValueError above would come only when one is sent).
    used: set[str] = set()
    for src in (ROOT / "vgpu_cgroup").rglob("*.py"):
        if "k8s" in src.parts:
            continue  # the Kubernetes plugins send no vgpu protocol errors
        text = src.read_text()
        used |= set(re.findall(r"(?<![A-Za-z])(?:Error|ProtocolError)\(\s*(?:code=)?\"(\w+)\"",
                               text))
    assert used
    assert used <= ERROR_CODES, used - ERROR_CODES
