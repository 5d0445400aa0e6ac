"""One tenant floods vgpud: what the others see (issue 15).

    python3 bench/flood_bench.py [--clients 64] [--rate 1000] [--seconds 10]
                                 [--hooks 600] [--ctls 384] [--half 128] [--json FILE]

A real ``vgpud --simulate`` on its default bounds (``[limits]`` of
vgpud.toml as shipped). In a *victim* cgroup, ``--clients`` reservation
clients (bench/reserve_client.c, as in bench/reserve_bench.py) reserve
and release at ``--rate`` per second in all, open loop, for ``--seconds``:
once with nothing else on the node (*before*), then again (*during*) while,
in a *flood* cgroup, an unprivileged process (tests/programs/flooder.py as
uid 65534) first takes every connection its slice may have (``--hooks``
hook hellos, ``--ctls`` control hellos, ``--half`` half-open handshakes)
and then keeps asking for more as fast as the daemon refuses it, replacing
half-open handshakes as the handshake timeout drops them.

The control (``--hog``, on by default): the victims once more beside a
process in the flood cgroup that only burns CPU, as the flooder's own
process does, and never connects: the latency a busy neighbour costs on
this machine whatever vgpud does, to read *during* against.

Reported: the victims' reservation latency before and during (from the
scheduled send, so a stalled daemon is not hidden, and from the actual
send), how many the flooder got and how many were refused per bound, the
attempts per second, the daemon's RSS (before, after the fill, at the end)
and CPU, and root's ``status`` round trip (connect, hello, request) sampled
during each phase. Exit 1 if a victim failed, root was refused, or the
flood got more than its slice's bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _e2e import Cgroups, VgpudProc, build, spawn  # noqa: E402
from reserve_bench import _cpu_s, run_phase  # noqa: E402

from vgpu_cgroup._core._bounds import ClientLimits  # noqa: E402
from vgpu_cgroup._wire._client import Client  # noqa: E402

FLOODER = ROOT / "tests" / "programs" / "flooder.py"
NOBODY = 65534


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class RootProbe(threading.Thread):
    """Root's ``status`` round trip, sampled every ``period`` seconds."""

    def __init__(self, sock: str, period: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.sock, self.period = sock, period
        self.samples: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.period):
            t0 = time.monotonic()
            try:
                with Client(self.sock, timeout=30) as c:
                    c.hello("ctl")
                    c.ctl("status")
            except Exception as exc:  # the bench reports it
                self.failures.append(repr(exc))
                continue
            self.samples.append((time.monotonic() - t0) * 1000)

    def figures(self) -> dict[str, Any]:
        s = sorted(self.samples)
        return {"n": len(s), "failures": len(self.failures),
                "median_ms": round(statistics.median(s), 2) if s else None,
                "max_ms": round(s[-1], 2) if s else None}


def _phase(d: VgpudProc, exe: str, args: argparse.Namespace, tmp: Path, name: str,
           procs: str) -> dict[str, Any]:
    assert d.proc is not None
    probe = RootProbe(d.socket)
    probe.start()
    try:
        r = run_phase(d.socket, d.proc.pid, exe, args.clients, args.seconds, args.rate, tmp,
                      name, cgroup_procs=procs)
    finally:
        probe.stop.set()
        probe.join()
    r["root_status"] = probe.figures()
    return r


def _line(r: dict[str, Any]) -> str:
    rs = r["root_status"]
    return (f"{r['clients']} victims at {r['target_rate']:.0f}/s: {r['ops']} reservations, "
            f"p50 {r['p50_us']} us, p99 {r['p99_us']} us, p99.9 {r['p999_us']} us "
            f"(from send: p50 {r['rtt_p50_us']}, p99 {r['rtt_p99_us']}), denied {r['denied']}, "
            f"failed {r['failed_clients']}, vgpud CPU {r['server_cpu_percent']}%; root status "
            f"{rs['n']} samples, median {rs['median_ms']} ms, max {rs['max_ms']} ms, "
            f"failures {rs['failures']}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--hooks", type=int, default=600)
    ap.add_argument("--ctls", type=int, default=384)
    ap.add_argument("--half", type=int, default=128)
    ap.add_argument("--hog", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the victims beside a process that only burns CPU")
    ap.add_argument("--daemon-tree", metavar="DIR",
                    help="run the daemon from this checkout (a `git archive` of another "
                         "commit, built), to compare")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    build()
    lim = ClientLimits()
    tmp = Path(tempfile.mkdtemp(prefix="vgpu-flood-bench-", dir="/tmp"))
    tmp.chmod(0o755)  # the flooder runs as nobody
    cg = Cgroups()
    flooder: subprocess.Popen[str] | None = None
    out: dict[str, Any] = {"limits": {k: getattr(lim, k) for k in (
        "clients", "slice_clients", "slice_hooks", "slice_handshakes")}}
    ok = False
    d: VgpudProc | None = None
    try:
        exe = str(tmp / "reserve_client")
        subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", exe,
                        str(ROOT / "bench" / "reserve_client.c")], check=True)
        d = VgpudProc(tmp)
        if args.daemon_tree:
            d.env["PYTHONPATH"] = os.path.abspath(args.daemon_tree)
            os.chdir(tmp)  # `python -m` looks in the working directory first
        d.start()
        assert d.proc is not None
        dpid = d.proc.pid
        os.environ["BENCH_DEV"] = str(d.ctl("status")["devices"][0]["uuid"])
        victim = cg.make("victim")
        flood = cg.make("flood")
        procs = cg.procs_file(victim)
        rss = {"start": _rss_kib(dpid)}
        before = _phase(d, exe, args, tmp, "before", procs)
        print("before: " + _line(before), flush=True)
        rss["before_flood"] = _rss_kib(dpid)
        if args.hog:
            # The control: a neighbour that only burns CPU (as the flooder
            # does besides connecting), no connection to vgpud at all.
            hog = spawn([sys.executable, "-c", "while True: pass"], d.env, flood, cg)
            try:
                hogged = _phase(d, exe, args, tmp, "hog", procs)
            finally:
                hog.kill()
                hog.wait()
            out["hog"] = hogged
            print("beside a CPU hog: " + _line(hogged), flush=True)
        t0 = time.monotonic()
        flooder = spawn([sys.executable, str(FLOODER), d.socket, "--uid", str(NOBODY),
                         "--hooks", str(args.hooks), "--ctls", str(args.ctls),
                         "--half", str(args.half)], d.env, flood, cg,
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert flooder.stdout is not None
        assert flooder.stdin is not None
        filled = json.loads(flooder.stdout.readline())
        fill_s = time.monotonic() - t0
        rss["filled"] = _rss_kib(dpid)
        print(f"flood filled its slice in {fill_s:.1f} s: {filled['hooks']} hooks, "
              f"{filled['ctls']} control, refused {filled['refused']}", flush=True)
        cpu0, w0 = _cpu_s(dpid), time.monotonic()
        during = _phase(d, exe, args, tmp, "during", procs)
        cpu_flood = 100.0 * (_cpu_s(dpid) - cpu0) / (time.monotonic() - w0)
        try:
            shown = d.ctl("show", flood)
        except RuntimeError as exc:  # a daemon without the bounds, full, refuses root too
            shown = {"error": str(exc)}
        rss["end"] = _rss_kib(dpid)
        flooder.stdin.write("stop\n")
        flooder.stdin.flush()
        t_stop = time.monotonic()
        done = json.loads(flooder.stdout.readline())
        flooder.wait(60)
        flood_s = t_stop - t0 - fill_s
        refused_during = sum(done["refused"].values()) - sum(filled["refused"].values())
        print("during: " + _line(during), flush=True)
        print(f"flood: {done['attempts']} connections attempted, {done['hooks']} hooks and "
              f"{done['ctls']} control connections got (bounds: {lim.slice_hooks} hooks, "
              f"{lim.slice_clients} connections, {lim.slice_handshakes} handshakes per slice), "
              f"refused {done['refused']}, half-open dropped {done['dropped']} after "
              f"{done['dropped_s']} s; {refused_during / flood_s:.0f} refusals/s after the "
              f"fill; vgpud CPU {cpu_flood:.0f}% during the victims' run", flush=True)
        print(f"vgpud RSS (KiB): {rss}", flush=True)
        stat = shown.get("gpu.clients.stat", {"clients": 0, "hooks": 0, "handshakes": 0})
        over = (stat["clients"] > lim.slice_clients or stat["hooks"] > lim.slice_hooks
                or stat["handshakes"] > lim.slice_handshakes)
        ok = not over and all(r["failed_clients"] == 0 and r["root_status"]["failures"] == 0
                              for r in (before, during))
        out.update({"before": before, "during": during, "filled": filled, "done": done,
                    "fill_seconds": round(fill_s, 2), "flood_seconds": round(flood_s, 2),
                    "refused_per_s": round(refused_during / flood_s, 1),
                    "vgpud_cpu_percent_during": round(cpu_flood, 1),
                    "flood_slice": shown, "rss_kib": rss, "ok": ok})
    finally:
        if d is not None:
            d.cleanup()
        if flooder is not None and flooder.poll() is None:
            flooder.kill()
            flooder.wait()
        cg.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    print("ok" if ok else "FAILED: a victim failed, root was refused, or a bound was exceeded")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
