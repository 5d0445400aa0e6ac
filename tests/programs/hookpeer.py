"""A scripted vgpud for the hook's tests: speaks docs/protocol.md (hello,
welcome with the two memfds, attach, reserve, release) from a thread, keeps
the regions writable on its side, and records every message it got.

Not the daemon: no tree, no arbiter. It lets a test set the launch gate and
limits by hand and read the client's stat page, so each hook mechanism is
checked in isolation from the daemon's policy.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
from vgpu_cgroup._wire._abi import ffi, lib

CTL_SIZE = ffi.sizeof("struct vgpu_ctl_page")
STAT_SIZE = ffi.sizeof("struct vgpu_stat_page")
CTL_DEV0 = ffi.offsetof("struct vgpu_ctl_page", "dev")
CTL_DEV = ffi.sizeof("struct vgpu_ctl_dev")
STAT_DEV0 = ffi.offsetof("struct vgpu_stat_page", "dev")
STAT_DEV = ffi.sizeof("struct vgpu_stat_dev")
UNLIMITED = 2**64 - 1


def _off(struct: str, name: str) -> int:
    return int(ffi.offsetof(struct, name))


@dataclass
class Conn:
    sock: socket.socket
    ctl_map: mmap.mmap
    stat_map: mmap.mmap
    pid: int
    hello: dict[str, Any]
    slots: dict[str, int] = field(default_factory=dict)
    used: dict[int, int] = field(default_factory=dict)
    msgs: list[dict[str, Any]] = field(default_factory=list)
    closed: bool = False

    # ---- ctl page (the daemon's side) ----
    def set_dev(self, slot: int, **kv: int) -> None:
        """Write ctl fields; ``grant`` is the gate's state, given a new
        generation, written last and its waiters woken (as vgpud does)."""
        base = CTL_DEV0 + slot * CTL_DEV
        fmt = {"grant": "<I", "flags": "<I", "mem_limit": "<Q", "mem_used": "<Q",
               "rate_ppm": "<Q", "inflight_ns": "<Q", "hold_end_ns": "<Q", "hold_until_ns": "<Q"}
        grant = kv.pop("grant", None)
        for k, v in kv.items():
            struct.pack_into(fmt[k], self.ctl_map, base + _off("struct vgpu_ctl_dev", k), v)
        if grant is not None:
            off = base + _off("struct vgpu_ctl_dev", "grant")
            (old,) = struct.unpack_from("<I", self.ctl_map, off)
            gen = ((old >> lib.VGPU_GRANT_GEN_SHIFT) + 1) << lib.VGPU_GRANT_GEN_SHIFT
            struct.pack_into("<I", self.ctl_map, off, (gen & 0xFFFFFFFF) | grant)
            word = ffi.cast("uint32_t *", ffi.from_buffer(self.ctl_map)) + off // 4
            lib.vgpu_futex_wake(word)

    def beat(self, n: int) -> None:
        """The page's heartbeat (a live daemon writes it while a slot waits)."""
        struct.pack_into("<Q", self.ctl_map, _off("struct vgpu_ctl_page", "heartbeat"), n)

    # ---- stat page (the client's side) ----
    def stat(self, slot: int, name: str) -> int:
        off = STAT_DEV0 + slot * STAT_DEV + _off("struct vgpu_stat_dev", name)
        return int(struct.unpack_from("<Q", self.stat_map, off)[0])

    def intervals(self, slot: int) -> list[tuple[int, int]]:
        head = self.stat(slot, "ring_head")
        ring = STAT_DEV0 + slot * STAT_DEV + _off("struct vgpu_stat_dev", "ring")
        out = []
        for i in range(max(0, head - lib.VGPU_RING_SLOTS), head):
            s, e = struct.unpack_from("<QQ", self.stat_map, ring + (i % lib.VGPU_RING_SLOTS) * 16)
            out.append((s, e))
        return out


class Peer:
    """Listens on `path`; policy knobs are plain attributes set by the test."""

    def __init__(self, path: str, *, mem_limit: int = UNLIMITED, unlimited: bool = True,
                 grant: int = lib.VGPU_GRANT_RUN, refuse: tuple[str, ...] = (),
                 attach_error: str | None = None) -> None:
        self.path = path
        self.mem_limit = mem_limit
        self.unlimited = unlimited
        self.grant = grant
        self.refuse = refuse
        #: answer every attach with {t:"error", code: attach_error}
        self.attach_error = attach_error
        #: the slice a `denied` names (long ones make large frames)
        self.denied_slice = "test.slice"
        #: the welcome's `devices` (the slice's GPUs), sent when not None
        self.devices: Any = None
        #: a hung daemon: requests are read (unless stall_reads) but not
        #: answered until resume()
        self.stalled = False
        self.stall_reads = False
        self.withheld: list[tuple[Conn, dict[str, Any]]] = []
        self.conns: list[Conn] = []
        self.lock = threading.Lock()
        self.cv = threading.Condition(self.lock)
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(64)
        self._stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def close(self) -> None:
        with self.cv:
            self._stop = True
            self.stall_reads = False
            self.cv.notify_all()
        with contextlib.suppress(OSError):
            self.srv.shutdown(socket.SHUT_RDWR)
        self.srv.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_RDWR)
            c.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def wait_conn(self, n: int = 1, timeout: float = 10.0) -> Conn:
        with self.cv:
            self.cv.wait_for(lambda: len(self.conns) >= n, timeout)
            assert len(self.conns) >= n, f"only {len(self.conns)} connections"
            return self.conns[n - 1]

    def wait_for(self, pred: Any, timeout: float = 10.0) -> None:
        with self.cv:
            assert self.cv.wait_for(pred, timeout), "condition not reached"

    def stall(self, *, reads: bool = False) -> None:
        """Hang like a SIGSTOPped daemon: stop answering requests, and with
        ``reads`` stop reading the sockets too (after the message being read)."""
        with self.cv:
            self.stalled = True
            self.stall_reads = reads
            self.cv.notify_all()

    def resume(self) -> None:
        """Read again and answer what was withheld, in order."""
        with self.cv:
            self.stalled = self.stall_reads = False
            for c, m in self.withheld:
                self._handle(c, m)
            self.withheld.clear()
            self.cv.notify_all()

    # ---- protocol ----
    def _accept(self) -> None:
        while not self._stop:
            try:
                s, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    @staticmethod
    def _recv(s: socket.socket) -> dict[str, Any] | None:
        hdr = b""
        while len(hdr) < 4:
            chunk = s.recv(4 - len(hdr))
            if not chunk:
                return None
            hdr += chunk
        (n,) = struct.unpack(">I", hdr)
        body = b""
        while len(body) < n:
            chunk = s.recv(n - len(body))
            if not chunk:
                return None
            body += chunk
        msg = msgpack.unpackb(body, raw=False)
        assert isinstance(msg, dict)
        return msg

    @staticmethod
    def _send(s: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
        body = msgpack.packb(msg)
        frame = struct.pack(">I", len(body)) + body
        if fds:
            socket.send_fds(s, [frame], fds)
        else:
            s.sendall(frame)

    def _serve(self, s: socket.socket) -> None:
        hello = self._recv(s)
        if hello is None or hello.get("t") != "hello":
            s.close()
            return
        ctl_fd = os.memfd_create("vgpu-ctl")
        stat_fd = os.memfd_create("vgpu-stat")
        os.ftruncate(ctl_fd, CTL_SIZE)
        os.ftruncate(stat_fd, STAT_SIZE)
        ctl = mmap.mmap(ctl_fd, CTL_SIZE)
        stat = mmap.mmap(stat_fd, STAT_SIZE)
        struct.pack_into("<II", ctl, 0, lib.VGPU_SHM_MAGIC, lib.VGPU_ABI_VERSION)
        ro = os.open(f"/proc/self/fd/{ctl_fd}", os.O_RDONLY)
        conn = Conn(sock=s, ctl_map=ctl, stat_map=stat, pid=int(hello.get("pid", 0)), hello=hello)
        conn.msgs.append(hello)
        welcome: dict[str, Any] = {"t": "welcome", "v": 1, "id": len(self.conns) + 1,
                                   "slice": "test.slice", "tick_ns": 10_000_000, "epoch": 1}
        if self.devices is not None:
            welcome["devices"] = self.devices
        self._send(s, welcome, [ro, stat_fd])
        for fd in (ro, ctl_fd, stat_fd):
            os.close(fd)
        with self.cv:
            self.conns.append(conn)
            self.cv.notify_all()
        while True:
            with self.cv:
                self.cv.wait_for(lambda: not self.stall_reads or self._stop)
            try:
                msg = self._recv(s)
            except OSError:
                msg = None
            if msg is None:
                break
            with self.cv:
                conn.msgs.append(msg)
                if self.stalled and "id" in msg:
                    self.withheld.append((conn, msg))
                else:
                    self._handle(conn, msg)
                self.cv.notify_all()
        with self.cv:
            conn.closed = True
            self.cv.notify_all()

    def _handle(self, c: Conn, m: dict[str, Any]) -> None:
        t = m.get("t")
        if t == "attach":
            dev = m["dev"]
            if self.attach_error is not None:
                self._send(c.sock, {"t": "error", "id": m["id"], "code": self.attach_error,
                                    "msg": "no room"})
                return
            if dev in self.refuse:
                self._send(c.sock, {"t": "error", "id": m["id"], "code": "device",
                                    "msg": "not allowed"})
                return
            if dev not in c.slots:
                c.slots[dev] = len(c.slots)
                # what the client re-declared after a restart is held from now
                held = {h["dev"]: h["n"] for h in c.hello.get("held", [])}
                c.used[c.slots[dev]] = held.get(dev, 0)
            slot = c.slots[dev]
            flags = lib.VGPU_DEV_ACTIVE | (lib.VGPU_DEV_UNLIMITED if self.unlimited else 0)
            c.set_dev(slot, grant=self.grant, flags=flags, mem_limit=self.mem_limit,
                      mem_used=c.used.get(slot, 0))
            limit = None if self.mem_limit == UNLIMITED else self.mem_limit
            self._send(c.sock, {"t": "attached", "id": m["id"], "slot": slot, "mem_limit": limit})
        elif t == "reserve":
            slot, n = m["slot"], m["n"]
            cur = c.used.get(slot, 0)
            if cur + n > self.mem_limit:
                self._send(c.sock, {"t": "denied", "id": m["id"], "slice": self.denied_slice,
                                    "limit": self.mem_limit, "current": cur})
            else:
                c.used[slot] = cur + n
                c.set_dev(slot, mem_used=cur + n)
                self._send(c.sock, {"t": "granted", "id": m["id"]})
        elif t == "release":
            slot, n = m["slot"], m["n"]
            assert c.used.get(slot, 0) >= n, "release of more than held"
            c.used[slot] -= n
            c.set_dev(slot, mem_used=c.used[slot])


def wait_until(pred: Any, timeout: float = 10.0, step: float = 0.01) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())
