"""A long fuzz campaign against the protocol decoder and the daemon's
request handlers, run on purpose (not in the test suite).

    python3 bench/fuzz_campaign.py [--seconds 180] [--batch 2000] [--json FILE]

It reuses tests/test_fuzz.py's hypothesis strategies, but records failures
instead of stopping at the first: each target runs batches of
``--batch`` generated inputs until the time is up, and the report gives
inputs tried, failures found (distinct by exception type and location) with
a sample input each, and the time. Exit status 1 if anything was found.

Targets:
  mutate    random byte-level mutations (flips, inserts, deletes, splices,
            truncations) of a corpus of valid frames, fed to the decoder as
            below: the high-volume target.
  decoder   byte streams of good, mangled, truncated and random frames fed in
            uneven pieces to a fresh sans-IO Connection (after no hello, a
            hook hello or a ctl hello): only ProtocolError may come out, and
            its reply must frame.
  messages  one arbitrary map after a hook hello: parses or ProtocolError.
  handlers  sequences of well-typed hostile requests dispatched to a real
            Daemon object (no socket) by a hook and a non-root ctl client:
            replies or ProtocolError only, and after each step every
            slice's books equal its clients' holdings and no cap is passed.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

import test_fuzz as tf  # noqa: E402
from conftest import FAKE_DEVICES  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vgpu_cgroup._core._config import DaemonConfig  # noqa: E402
from vgpu_cgroup._log import configure  # noqa: E402
from vgpu_cgroup._node._daemon import Daemon  # noqa: E402
from vgpu_cgroup._wire import proto  # noqa: E402


class Findings:
    """Failures by (exception type, innermost project frame)."""

    def __init__(self) -> None:
        self.tried = 0
        self.found: dict[str, dict[str, Any]] = {}

    def record(self, exc: BaseException, example: Any) -> None:
        frames = [f for f in traceback.extract_tb(exc.__traceback__)
                  if "vgpu_cgroup" in f.filename or "test_fuzz" in f.filename]
        where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"
        key = f"{type(exc).__name__} at {where}"
        ent = self.found.setdefault(key, {"count": 0, "message": str(exc)[:300],
                                          "example": repr(example)[:500]})
        ent["count"] += 1


def _guard(findings: Findings, fn: Callable[[], None], example: Any) -> None:
    findings.tried += 1
    try:
        fn()
    except Exception as exc:  # a finding, not a crash of the campaign
        findings.record(exc, example)


def _decoder_case(prefix: bytes, data: bytes) -> None:
    conn = proto.Connection()
    try:
        tf._drive(conn, prefix + data)
    except proto.ProtocolError as exc:
        if exc.code not in proto.ERROR_CODES:
            raise AssertionError(f"unknown error code {exc.code}") from None
        reply = conn.send(exc.reply())
        if proto.decode_body(reply[4:])["t"] != "error":
            raise AssertionError("error reply does not decode") from None


def _message_case(msg: dict[str, Any]) -> None:
    conn = proto.Connection()
    conn.feed(tf.frame(tf.hello()))
    conn.next_event()
    conn.feed(tf.frame(msg))
    try:
        conn.next_event()
    except proto.ProtocolError as exc:
        if exc.id is not None and not 0 <= exc.id <= proto.U32_MAX:
            raise AssertionError(f"error id {exc.id} out of range") from None


def _handlers_case(d: Daemon, evs: list[Any]) -> None:
    hook = d._register(proto.Hello(v=1, role="hook", pid=os.getpid(), comm="fuzz",
                                   slice="fuzz.slice/job"), os.getpid(), 0)
    ctl = d._register(proto.Hello(v=1, role="ctl", pid=os.getpid(), comm="fuzz"),
                      os.getpid(), 1000)
    wire = proto.Connection()
    wire.hello = proto.Hello(v=1, role="hook", pid=1, comm="fuzz")
    try:
        for ev in evs:
            who = ctl if isinstance(ev, proto.Ctl) else hook
            try:
                reply = d._dispatch(who, ev)
            except proto.ProtocolError:
                continue
            if reply is not None and who is hook:
                wire.send(reply)
            tf._books_consistent(d.tree)
    finally:
        d._drop(hook)
        d._drop(ctl)
    tf._books_consistent(d.tree)


CORPUS = [
    tf.frame(tf.hello()), tf.frame(tf.hello("ctl")),
    tf.frame(tf.hello(held=[{"dev": tf.DEV, "n": 1 << 20}])),
    tf.frame({"t": "attach", "id": 1, "dev": tf.DEV, "total": 1 << 34}),
    tf.frame({"t": "reserve", "id": 2, "slot": 0, "n": 4096}),
    tf.frame({"t": "release", "slot": 0, "n": 4096}),
    tf.frame({"t": "ctl", "id": 3, "op": "set", "slice": "a.slice",
              "knobs": {"gpu.memory.max": "1G"}, "runtime": True}),
]


def _mutate(rng: random.Random) -> bytes:
    """A stream of corpus frames with byte flips, inserts, deletes, splices
    and truncations: far more inputs per second than hypothesis generates."""
    data = bytearray(b"".join(rng.choice(CORPUS) for _ in range(rng.randint(1, 5))))
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(5)
        i = rng.randrange(len(data)) if data else 0
        if op == 0 and data:
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[i:i] = bytes([rng.choice([0x00, 0x7F, 0x80, 0xC1, 0xD9, 0xDC, 0xDE, 0xFF,
                                           rng.randrange(256)])])
        elif op == 2 and data:
            del data[i : i + rng.randint(1, 8)]
        elif op == 3:
            data[i:i] = rng.choice(CORPUS)[rng.randrange(4):]
        elif data:
            del data[rng.randrange(len(data)):]
    return bytes(data)


def run_mutator(seconds: float) -> Findings:
    findings = Findings()
    rng = random.Random(0x5EED)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(1000):
            data = _mutate(rng)
            prefix = rng.choice([b"", CORPUS[0], CORPUS[1]])
            _guard(findings, functools.partial(_decoder_case, prefix, data), (prefix, data))
    return findings


def run_target(name: str, seconds: float, batch: int, d: Daemon) -> Findings:
    findings = Findings()
    if name == "mutate":
        return run_mutator(seconds)
    cfg = settings(max_examples=batch, deadline=None, database=None,
                   phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    prefixes = st.sampled_from([b"", tf.frame(tf.hello()), tf.frame(tf.hello("ctl"))])

    @cfg
    @given(prefix=prefixes, data=tf.streams)
    def decoder(prefix: bytes, data: bytes) -> None:
        _guard(findings, lambda: _decoder_case(prefix, data), (prefix, data))

    @cfg
    @given(msg=tf.messages)
    def messages(msg: dict[str, Any]) -> None:
        _guard(findings, lambda: _message_case(msg), msg)

    @cfg
    @given(evs=st.lists(st.one_of(tf.hook_events, tf.hook_events, tf.ctl_events), max_size=40))
    def handlers(evs: list[Any]) -> None:
        _guard(findings, lambda: _handlers_case(d, evs), evs)

    target = {"decoder": decoder, "messages": messages, "handlers": handlers}[name]
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        target()
    return findings


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=180.0, help="total, split over targets")
    ap.add_argument("--batch", type=int, default=2000, help="inputs per hypothesis run")
    ap.add_argument("--targets", default="mutate,decoder,messages,handlers")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    names = [n for n in args.targets.split(",") if n]
    configure("json", level=logging.CRITICAL)  # refusals and warnings by the thousand
    report: dict[str, Any] = {}
    bad = 0
    with tempfile.TemporaryDirectory() as td:
        cfg = DaemonConfig(socket=f"{td}/s", runtime_dir=td, etc_slices_dir=f"{td}/etc",
                           identity="declared")
        d = Daemon(cfg, list(FAKE_DEVICES), simulated=True)
        d.tree.set_knobs("fuzz.slice", {"gpu.memory.max": "64M"}, "campaign")
        for name in names:
            t0 = time.monotonic()
            f = run_target(name, args.seconds / len(names), args.batch, d)
            took = time.monotonic() - t0
            report[name] = {"inputs": f.tried, "seconds": round(took, 1),
                            "per_second": round(f.tried / took), "failures": f.found}
            bad += len(f.found)
            print(f"{name:>9}: {f.tried} inputs in {took:.1f} s ({f.tried / took:.0f}/s), "
                  f"{len(f.found)} distinct failures", flush=True)
            for key, ent in f.found.items():
                print(f"           {key} x{ent['count']}: {ent['message']}\n"
                      f"             e.g. {ent['example']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
