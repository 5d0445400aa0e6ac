"""Sans-IO implementation of the vgpu wire protocol (docs/protocol.md).

The daemon owns a :class:`Connection` per socket: bytes go in through
:meth:`Connection.feed`, validated events come out of
:meth:`Connection.next_event`, and replies are framed by
:meth:`Connection.send`.  No I/O happens here, so every rule of the protocol
(frame bounds, msgpack limits, field types, hello-first ordering) is tested
without sockets, and the daemon cannot forget a check on some code path.

Any violation raises :class:`ProtocolError`; the caller replies with
:meth:`ProtocolError.reply` and closes the connection.  After an error the
connection is dead: every later call raises the same error again. The
messages themselves are ``_messages``' (re-exported here).
"""

from __future__ import annotations

import struct
from typing import Any, Final

import msgpack

from ._messages import (
    CTL_OPS,
    ERROR_CODES,
    FRAME_HEADER,
    MAX_CTL_REPLY,
    MAX_DEVICES,
    MAX_FRAME,
    MAX_ITEMS,
    MAX_STR,
    PROTO_VERSION,
    U32_MAX,
    U63_MAX,
    Attach,
    Attached,
    Ctl,
    Denied,
    Drained,
    Error,
    Event,
    Granted,
    Held,
    Hello,
    Idle,
    Ok,
    ProtocolError,
    Release,
    Reply,
    Reserve,
    Want,
    Welcome,
)

__all__ = [
    "CTL_OPS",
    "ERROR_CODES",
    "FRAME_HEADER",
    "MAX_CTL_REPLY",
    "MAX_DEVICES",
    "MAX_FRAME",
    "MAX_ITEMS",
    "MAX_STR",
    "PROTO_VERSION",
    "U32_MAX",
    "U63_MAX",
    "Attach",
    "Attached",
    "Connection",
    "Ctl",
    "Denied",
    "Drained",
    "Error",
    "Event",
    "FrameBuffer",
    "Granted",
    "Held",
    "Hello",
    "Idle",
    "Ok",
    "ProtocolError",
    "Release",
    "Reply",
    "Reserve",
    "Want",
    "Welcome",
    "decode_body",
    "encode_frame",
    "granted_frame",
]

_HEADER = struct.Struct(">I")


def _reply_map(msg: Reply) -> dict[str, Any]:
    if isinstance(msg, Welcome):
        welcome: dict[str, Any] = {"t": "welcome", "v": PROTO_VERSION, "id": msg.id,
                                   "slice": msg.slice, "tick_ns": msg.tick_ns,
                                   "epoch": msg.epoch}
        if msg.devices is not None:
            welcome["devices"] = list(msg.devices)
        return welcome
    if isinstance(msg, Attached):
        return {"t": "attached", "id": msg.id, "slot": msg.slot, "mem_limit": msg.mem_limit}
    if isinstance(msg, Granted):
        return {"t": "granted", "id": msg.id}
    if isinstance(msg, Denied):
        return {"t": "denied", "id": msg.id, "slice": msg.slice, "limit": msg.limit,
                "current": msg.current}
    if isinstance(msg, Ok):
        return {"t": "ok", "id": msg.id, "data": msg.data}
    out: dict[str, Any] = {"t": "error", "code": msg.code, "msg": msg.msg}
    if msg.id is not None:
        out["id"] = msg.id
    if msg.supported is not None:
        out["supported"] = msg.supported
    if msg.extra:
        out.update({k: v for k, v in msg.extra.items() if k not in out})
    return out


# ---- framing ----------------------------------------------------------------


def encode_frame(obj: dict[str, Any], *, max_len: int = MAX_FRAME) -> bytes:
    """Frame one map: 4-byte big-endian length, then msgpack.

    Raises ValueError if the body would exceed ``max_len`` (a bug on our side,
    not the peer's, so it is not a ProtocolError)."""
    body = msgpack.packb(obj, use_bin_type=True)
    if not 1 <= len(body) <= max_len:
        raise ValueError(f"frame of {len(body)} bytes exceeds {max_len}")
    return _HEADER.pack(len(body)) + body


_GRANTED_PREFIX: Final[bytes] = b"\x82" + b"".join(
    msgpack.packb(x) for x in ("t", "granted", "id"))
_PACKER = msgpack.Packer(use_bin_type=True)


def granted_frame(rid: int) -> bytes:
    """``encode_frame({"t": "granted", "id": rid})``, byte for byte, at a
    third of the cost: the answer to nearly every reservation."""
    body = _GRANTED_PREFIX + _PACKER.pack(rid)
    return _HEADER.pack(len(body)) + body


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError("decode", f"msgpack ext type {code} not allowed")


def decode_body(body: bytes) -> dict[str, Any]:
    """Decode one frame body into a map with str keys and a str ``t``."""
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_reject_ext,
            timestamp=0,
            max_str_len=MAX_STR * 4,
            max_bin_len=MAX_STR,
            max_array_len=MAX_ITEMS * 4,
            max_map_len=MAX_ITEMS * 4,
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises a zoo of ValueError/TypeError/...
        raise ProtocolError("decode", f"invalid msgpack: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("decode", f"frame is a {type(obj).__name__}, not a map")
    for key in obj:
        if not isinstance(key, str):
            raise ProtocolError("decode", "map keys must be strings")
    t = obj.get("t")
    if not isinstance(t, str):
        raise ProtocolError("type", "missing or non-string field 't'")
    return obj


class FrameBuffer:
    """Splits a byte stream into frame bodies, enforcing 1..max_len."""

    def __init__(self, max_len: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_len

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_body(self) -> bytes | None:
        if len(self._buf) < FRAME_HEADER:
            return None
        (n,) = _HEADER.unpack_from(self._buf)
        if not 1 <= n <= self._max:
            raise ProtocolError("frame", f"frame length {n} outside 1..{self._max}")
        if len(self._buf) < FRAME_HEADER + n:
            return None
        body = bytes(self._buf[FRAME_HEADER : FRAME_HEADER + n])
        del self._buf[: FRAME_HEADER + n]
        return body

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buf)


# ---- field validation -------------------------------------------------------


def _int(m: dict[str, Any], key: str, lo: int, hi: int, *, rid: int | None = None) -> int:
    val = m.get(key)
    # bool is a subclass of int in Python but not in msgpack: reject it.
    if type(val) is not int:
        raise ProtocolError("type", f"field {key!r} must be an integer", id=rid)
    if not lo <= val <= hi:
        raise ProtocolError("type", f"field {key!r}={val} outside {lo}..{hi}", id=rid)
    return val


def _str(m: dict[str, Any], key: str, *, rid: int | None = None, empty: bool = False) -> str:
    val = m.get(key)
    if type(val) is not str:
        raise ProtocolError("type", f"field {key!r} must be a string", id=rid)
    if len(val) > MAX_STR or (not empty and not val) or "\0" in val:
        raise ProtocolError("type", f"field {key!r} is empty, too long or has NUL", id=rid)
    return val


def _opt_str(m: dict[str, Any], key: str, *, rid: int | None = None,
             empty: bool = False) -> str | None:
    if m.get(key) is None:
        return None
    return _str(m, key, rid=rid, empty=empty)


def _id(m: dict[str, Any]) -> int:
    return _int(m, "id", 0, U32_MAX)


def _maybe_id(m: dict[str, Any]) -> int | None:
    """The request id if it is valid, so an error reply can still name it."""
    rid = m.get("id")
    return rid if type(rid) is int and 0 <= rid <= U32_MAX else None


def _parse_hello(m: dict[str, Any]) -> Hello:
    v = m.get("v")
    if type(v) is not int:
        raise ProtocolError("type", "field 'v' must be an integer")
    if v != PROTO_VERSION:
        raise ProtocolError("version", f"protocol version {v} not supported")
    role = _str(m, "role")
    if role not in ("hook", "ctl"):
        raise ProtocolError("type", f"role {role!r} is not 'hook' or 'ctl'")
    pid = _int(m, "pid", 0, U32_MAX)
    comm = _str(m, "comm", empty=True)
    slc = _opt_str(m, "slice")
    raw_held = m.get("held")
    held: list[Held] = []
    if raw_held is not None:
        if type(raw_held) is not list or len(raw_held) > MAX_ITEMS:
            raise ProtocolError("type", f"field 'held' must be a list of <= {MAX_ITEMS} maps")
        for item in raw_held:
            if type(item) is not dict:
                raise ProtocolError("type", "entries of 'held' must be maps")
            held.append(Held(dev=_str(item, "dev"), n=_int(item, "n", 0, U63_MAX)))
    return Hello(v=v, role=role, pid=pid, comm=comm, slice=slc, held=tuple(held))


def _parse_ctl(m: dict[str, Any]) -> Ctl:
    rid = _id(m)
    op = _str(m, "op", rid=rid)
    if op not in CTL_OPS:
        raise ProtocolError("type", f"unknown ctl op {op!r}", id=rid)
    slc = _opt_str(m, "slice", rid=rid, empty=True)  # "" is the root slice
    if op == "reset":
        if slc is None:
            raise ProtocolError("type", "reset needs a 'slice'", id=rid)
        reset_rt = m.get("runtime", True)
        if type(reset_rt) is not bool:
            raise ProtocolError("type", "field 'runtime' must be a boolean", id=rid)
        return Ctl(id=rid, op=op, slice=slc, runtime=reset_rt)
    if op != "set":
        return Ctl(id=rid, op=op, slice=slc)
    if slc is None:
        raise ProtocolError("type", "set needs a 'slice'", id=rid)
    runtime = m.get("runtime", False)
    if type(runtime) is not bool:
        raise ProtocolError("type", "field 'runtime' must be a boolean", id=rid)
    raw = m.get("knobs")
    if type(raw) is not dict or not raw or len(raw) > MAX_ITEMS:
        raise ProtocolError("type", "field 'knobs' must be a non-empty map", id=rid)
    knobs: dict[str, str] = {}
    for k, val in raw.items():
        if type(k) is not str or type(val) is not str or len(k) > MAX_STR or len(val) > MAX_STR:
            raise ProtocolError("type", "knobs must map strings to strings", id=rid)
        knobs[k] = val
    return Ctl(id=rid, op=op, slice=slc, runtime=runtime, knobs=knobs)


class Connection:
    """Server side of one connection: framing, decoding and ordering rules."""

    def __init__(self) -> None:
        self._frames = FrameBuffer(MAX_FRAME)
        self._error: ProtocolError | None = None
        self.hello: Hello | None = None
        self._hook = False  # hello said role 'hook'

    @property
    def role(self) -> str | None:
        return None if self.hello is None else self.hello.role

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken out as events (the daemon bounds
        what one slice's connections may leave here)."""
        return self._frames.pending

    def feed(self, data: bytes) -> None:
        """Add bytes received from the peer."""
        if self._error is not None:
            raise self._error
        self._frames.feed(data)

    def next_event(self) -> Event | None:
        """The next complete, validated event, or None if more bytes are needed."""
        if self._error is not None:
            raise self._error
        try:
            body = self._frames.next_body()
            if body is None:
                return None
            return self._parse(decode_body(body))
        except ProtocolError as exc:
            self._error = exc
            raise

    def events(self) -> list[Event]:
        """All complete events; raises at the first bad frame (after the good ones
        were consumed, so call :meth:`next_event` in a loop to handle them in order)."""
        out: list[Event] = []
        while (ev := self.next_event()) is not None:
            out.append(ev)
        return out

    def _parse(self, m: dict[str, Any]) -> Event:
        t = m["t"]
        if self._hook:  # a reservation's round trip: its messages first
            if t == "reserve":
                res_id = _id(m)
                return Reserve(id=res_id, slot=_int(m, "slot", 0, MAX_DEVICES - 1, rid=res_id),
                               n=_int(m, "n", 0, U63_MAX, rid=res_id))
            if t == "release":
                return Release(slot=_int(m, "slot", 0, MAX_DEVICES - 1),
                               n=_int(m, "n", 0, U63_MAX))
            if t == "want":
                return Want(slot=_int(m, "slot", 0, MAX_DEVICES - 1),
                            at=_int(m, "at", 0, U63_MAX) if "at" in m else None)
            if t == "idle":
                return Idle(slot=_int(m, "slot", 0, MAX_DEVICES - 1))
            if t == "drained":
                return Drained(slot=_int(m, "slot", 0, MAX_DEVICES - 1))
        rid = _maybe_id(m)
        if self.hello is None:
            if t != "hello":
                raise ProtocolError("order", f"first message must be 'hello', got {t!r}")
            self.hello = _parse_hello(m)
            self._hook = self.hello.role == "hook"
            return self.hello
        if t == "hello":
            raise ProtocolError("order", "'hello' sent twice", id=rid)
        if not self._hook:
            if t != "ctl":
                raise ProtocolError("order", f"message {t!r} not allowed for role 'ctl'", id=rid)
            return _parse_ctl(m)
        if t == "attach":
            att_id = _id(m)
            return Attach(id=att_id, dev=_str(m, "dev", rid=att_id),
                          total=_int(m, "total", 0, U63_MAX, rid=att_id))
        if t == "ctl":
            raise ProtocolError("order", "message 'ctl' not allowed for role 'hook'", id=rid)
        raise ProtocolError("type", f"unknown message type {t!r}", id=rid)

    def send(self, msg: Reply) -> bytes:
        """Frame a reply.  Hook replies must fit MAX_FRAME; ctl replies MAX_CTL_REPLY."""
        if type(msg) is Granted:
            return granted_frame(msg.id)
        limit = MAX_CTL_REPLY if self.role == "ctl" else MAX_FRAME
        return encode_frame(_reply_map(msg), max_len=limit)
