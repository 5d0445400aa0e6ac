"""A tenant that tries to deny vgpud to everyone else, for the tests and
bench/flood_bench.py.

    python3 tests/programs/flooder.py SOCKET [--uid UID] [--hooks N] [--ctls N]
                                      [--half N] [--fill-only | --hold]

From the cgroup it is started in (and, with ``--uid``, as that user: the
interpreter starts as root, then drops to UID before the first connect, as
SO_PEERCRED is taken at connect), it opens connections to vgpud as fast as
the daemon answers, and keeps every one it gets:

* fill: ``--hooks`` hook hellos, then ``--ctls`` control hellos, one after
  the other, each waiting for its welcome or refusal; then ``--half``
  half-open handshakes (connect, a frame header promising a hello, and
  nothing more), all at once. Prints one JSON line (``"phase": "filled"``).
* flood: until a line ``stop`` on stdin, keeps ``--half`` half-open
  handshakes and one hook and one control hello in flight, replacing each
  as soon as it is answered (welcomed: kept; refused: counted) or dropped
  (a half-open closed by the daemon without a frame: its handshake timed
  out). A line ``report`` prints the counts so far (``"phase": "flooding"``).
  Then prints the totals (``"phase": "done"``) and exits, closing all.
  ``--fill-only`` exits after the fill, ``--hold`` holds what it got until
  stdin says ``stop``.

Each JSON line counts: ``hooks`` and ``ctls`` welcomed (and held),
``refused`` per bound named in the ``limit`` error frames, one example
``message`` per bound, ``dropped`` half-opens and how long they were held
(``dropped_s``: min, max), ``closed`` (closed without a frame, not a
half-open), ``attempts``.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

_HDR = struct.Struct(">I")


def _hello(role: str) -> bytes:
    body = msgpack.packb({"t": "hello", "v": 1, "role": role, "pid": os.getpid(),
                          "comm": "flooder"})
    return _HDR.pack(len(body)) + body


@dataclass(eq=False)
class _Attempt:
    kind: str  # hook, ctl, half
    sock: socket.socket
    t0: float
    buf: bytearray = field(default_factory=bytearray)
    welcomed: bool = False


@dataclass
class Flood:
    path: str
    sel: selectors.DefaultSelector = field(default_factory=selectors.DefaultSelector)
    held: list[socket.socket] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=lambda: {
        "hooks": 0, "ctls": 0, "refused": {}, "message": {}, "dropped": 0,
        "dropped_s": [None, None], "closed": 0, "attempts": 0, "connect_failed": 0})
    inflight: dict[str, int] = field(default_factory=lambda: {"hook": 0, "ctl": 0, "half": 0})

    def start(self, kind: str) -> bool:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        t0 = time.monotonic()  # before connect: the daemon's clock starts after it
        try:
            s.connect(self.path)
        except OSError:
            s.close()
            self.counts["connect_failed"] += 1
            return False
        s.setblocking(False)
        self.counts["attempts"] += 1
        try:
            if kind == "half":
                s.send(_HDR.pack(64))  # a hello is coming, then never does
            else:
                s.send(_hello(kind))
        except OSError:
            pass
        self.sel.register(s, selectors.EVENT_READ, _Attempt(kind, s, t0))
        self.inflight[kind] += 1
        return True

    def _done(self, a: _Attempt, keep: bool) -> None:
        self.sel.unregister(a.sock)
        self.inflight[a.kind] -= 1
        if keep:
            self.held.append(a.sock)
        else:
            a.sock.close()

    def _frame(self, a: _Attempt, msg: dict[str, Any]) -> None:
        if msg.get("t") == "welcome":
            self.counts["hooks" if a.kind == "hook" else "ctls"] += 1
            self._done(a, keep=True)
            return
        bound = str(msg.get("bound", msg.get("code", "?")))
        ref = self.counts["refused"]
        ref[bound] = ref.get(bound, 0) + 1
        self.counts["message"].setdefault(bound, str(msg.get("msg", "")))
        self._done(a, keep=False)

    def _readable(self, a: _Attempt) -> None:
        try:
            data, anc, _f, _ = a.sock.recvmsg(65536, socket.CMSG_SPACE(2 * 4))
        except BlockingIOError:
            return
        except OSError:
            data, anc = b"", []
        for level, typ, cdata in anc:  # a hook's two regions: not needed here
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                for i in range(0, len(cdata) - len(cdata) % 4, 4):
                    os.close(struct.unpack_from("i", cdata, i)[0])
        if not data:
            if a.kind == "half":
                took = time.monotonic() - a.t0
                self.counts["dropped"] += 1
                lo, hi = self.counts["dropped_s"]
                self.counts["dropped_s"] = [round(took if lo is None else min(lo, took), 3),
                                            round(took if hi is None else max(hi, took), 3)]
            else:
                self.counts["closed"] += 1
            self._done(a, keep=False)
            return
        a.buf += data
        if len(a.buf) >= 4:
            (n,) = _HDR.unpack_from(a.buf)
            if len(a.buf) >= 4 + n:
                self._frame(a, msgpack.unpackb(bytes(a.buf[4:4 + n]), raw=False))

    def step(self, timeout: float) -> list[str]:
        """Serve what is ready; lines that came on stdin."""
        lines: list[str] = []
        for key, _ev in self.sel.select(timeout):
            if key.data is None:
                line = sys.stdin.readline()
                lines.append(line.strip() if line else "stop")
                continue
            self._readable(key.data)
        return lines

    def settle(self, kind: str) -> None:
        while self.inflight[kind]:
            self.step(1.0)

    def report(self, phase: str) -> None:
        print(json.dumps({"phase": phase, "held": len(self.held), **self.counts}), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("socket")
    ap.add_argument("--uid", type=int, default=None)
    ap.add_argument("--hooks", type=int, default=0)
    ap.add_argument("--ctls", type=int, default=0)
    ap.add_argument("--half", type=int, default=0)
    ap.add_argument("--fill-only", action="store_true", help="exit after the fill phase")
    ap.add_argument("--hold", action="store_true",
                    help="after the fill phase, hold what it got until stdin says stop")
    args = ap.parse_args(argv)
    if args.uid is not None:
        os.setgroups([])
        os.setgid(args.uid)
        os.setuid(args.uid)
    f = Flood(args.socket)
    for kind, n in (("hook", args.hooks), ("ctl", args.ctls)):
        for _ in range(n):
            f.start(kind)
            f.settle(kind)
    for _ in range(args.half):
        f.start("half")
    f.report("filled")
    if args.fill_only:
        return 0
    if args.hold:
        sys.stdin.readline()
        return 0
    f.sel.register(sys.stdin, selectors.EVENT_READ, None)
    while True:
        for kind, want in (("hook", 1), ("ctl", 1), ("half", args.half)):
            while f.inflight[kind] < want and f.start(kind):
                pass
        lines = f.step(0.5)
        if "report" in lines:
            f.report("flooding")
        if "stop" in lines:
            break
    f.report("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
