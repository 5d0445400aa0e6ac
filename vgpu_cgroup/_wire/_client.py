"""A small synchronous client of the vgpud protocol, for vgpuctl and tests.

Blocking sockets are right here: vgpuctl makes one request at a time and
exits; tests use it to play a hook (``role="hook"`` returns the two region
fds the welcome carries).
"""

from __future__ import annotations

import array
import os
import socket
import struct
from typing import Any

import msgpack

from ._protocol import FRAME_HEADER, MAX_CTL_REPLY, PROTO_VERSION, encode_frame

_HEADER = struct.Struct(">I")


class ClientError(Exception):
    """The daemon answered ``error`` (``code``, ``msg``), or the link broke."""

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(f"{msg} ({code})")
        self.code = code
        self.msg = msg


class Client:
    """One connection to vgpud."""

    def __init__(self, socket_path: str, *, timeout: float | None = 10.0) -> None:
        self.path = socket_path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(socket_path)
        except OSError:
            self.sock.close()
            raise
        self._buf = bytearray()
        self._next_id = 1
        self.welcome: dict[str, Any] = {}
        self.fds: list[int] = []

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(encode_frame(msg, max_len=MAX_CTL_REPLY))

    def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            fds = array.array("i")
            data, anc, _flags, _ = self.sock.recvmsg(
                65536, socket.CMSG_SPACE(2 * fds.itemsize))
            for level, typ, cdata in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
            self.fds.extend(fds)
            if not data:
                raise ClientError("closed", "connection closed by vgpud")
            self._buf += data

    def recv(self) -> dict[str, Any]:
        """The next message from the daemon, whatever it is."""
        self._fill(FRAME_HEADER)
        (n,) = _HEADER.unpack_from(self._buf)
        if not 1 <= n <= MAX_CTL_REPLY:
            raise ClientError("frame", f"bad frame length {n} from vgpud")
        self._fill(FRAME_HEADER + n)
        body = bytes(self._buf[FRAME_HEADER : FRAME_HEADER + n])
        del self._buf[: FRAME_HEADER + n]
        msg = msgpack.unpackb(body, raw=False)
        if not isinstance(msg, dict):
            raise ClientError("decode", "vgpud sent a non-map frame")
        return msg

    def hello(self, role: str = "ctl", **extra: Any) -> dict[str, Any]:
        """Handshake; raises ClientError if refused."""
        self.send({"t": "hello", "v": PROTO_VERSION, "role": role, "pid": os.getpid(),
                   "comm": "vgpuctl", **extra})
        msg = self.recv()
        if msg.get("t") != "welcome":
            raise ClientError(str(msg.get("code", "protocol")), str(msg.get("msg", msg)))
        self.welcome = msg
        return msg

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send a request with a fresh id and return its reply (``error`` raises)."""
        rid = self._next_id
        self._next_id += 1
        self.send({**msg, "id": rid})
        reply = self.recv()
        if reply.get("t") == "error":
            raise ClientError(str(reply.get("code")), str(reply.get("msg")))
        if reply.get("id") != rid:
            raise ClientError("order", f"reply for id {reply.get('id')}, expected {rid}")
        return reply

    def ctl(self, op: str, **fields: Any) -> dict[str, Any]:
        """A control request; returns its ``data``."""
        data = self.request({"t": "ctl", "op": op, **fields}).get("data")
        return data if isinstance(data, dict) else {}
