"""Load test: many real hooked processes against one vgpud on the simulated GPU.

    python3 bench/load.py [--clients 200] [--seconds 60] [--slices 4] [--json FILE]

Each client is tests/c/busy_client under LD_PRELOAD=libvgpu-hook.so in one of
``--slices`` cgroups (each with a gpu.memory.max that the clients contend
for; the first also has gpu.cores.max=50): it holds a buffer, launches
kernels in bursts of 8 and allocates a short-lived buffer around every
burst, then idles ``--think-ms``. Clients start in waves of ``--wave``.
While they run, the daemon's RSS and CPU are sampled every second.

At the end nothing may be lost: every client is paused and the daemon's
launch count for it must equal the client's own; every client exits 0 with
its data intact; afterwards every slice's gpu.memory.current is back to 0
and no client is left registered. Reported: reservation latency as the
application sees it (cuMemAlloc of the short-lived buffers, p50/p99/p999),
launches and allocations per second, OOM refusals, daemon RSS over time,
daemon CPU. Exit 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _e2e import Cgroups, VgpudProc, build, build_c, find_process, spawn  # noqa: E402

MiB = 1 << 20


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of /proc/PID/status in KiB: VmRSS, or its parts
    RssAnon (the daemon's own heap) and RssShmem (the clients' shared pages,
    faulted in as their rings are first read: bounded by the clients)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(xs: Sequence[int], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))] / 1000.0 if xs else float("nan")


def _read(p: subprocess.Popen[str], phase: str) -> dict[str, Any]:
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"client {p.pid} exited ({p.poll()}) before {phase!r}")
    msg: dict[str, Any] = json.loads(line)
    if phase == "holding" and "error" in msg:
        return msg  # counted by the caller
    if msg.get("phase") != phase:
        raise RuntimeError(f"client {p.pid}: expected {phase!r}, got {msg}")
    return msg


def _tell_all(procs: Sequence[subprocess.Popen[str]], cmd: str) -> None:
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(cmd + "\n")
        p.stdin.flush()


def run(clients: int, seconds: float, nslices: int, tmp: Path,
        kernel_ns: int = 20000, wave: int = 25, think_ms: int = 50,
        connect_ms: int = 30000) -> dict[str, Any]:
    build()
    exe = str(build_c("busy_client", tmp))
    d = VgpudProc(tmp, sim_mem="64G")
    d.env["VGPU_SIM_CTX_OVERHEAD"] = str(4 * MiB)
    d.start()
    cg = Cgroups()
    procs: list[subprocess.Popen[str]] = []
    problems: list[str] = []
    try:
        assert d.proc is not None
        dpid = d.proc.pid
        per = max(1, clients // nslices)
        slices = []
        for i in range(nslices):
            path = cg.make(f"load/s{i}")
            # Base per client: 4 MiB context + 2 MiB module + 4 MiB held + the
            # 4 KiB probe; room for about half the clients' short-lived 4 MiB
            # buffers at once, so they contend.
            cap = per * 11 * MiB + (per // 2 + 1) * 4 * MiB
            knobs = [f"gpu.memory.max={cap}"] + (["gpu.cores.max=50"] if i == 0 else [])
            d.ctl("set", path, *knobs)
            slices.append(path)
        # A loaded 2-core node answers hellos slowly: the default 2 s connect
        # timeout fails clients started while hundreds already run (reported).
        conf = tmp / "hook.conf"
        conf.write_text(f"connect_timeout_ms = {connect_ms}\n")
        env = d.client_env(VGPU_HOOK_CONF=str(conf))
        t_start = time.monotonic()
        for first in range(0, clients, wave):
            batch = []
            for i in range(first, min(clients, first + wave)):
                batch.append(spawn([exe, "busy", "4", "1", "4", str(kernel_ns), str(think_ms)], env,
                                   slices[i % nslices], cg, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE))
            procs.extend(batch)
            for p in batch:
                msg = _read(p, "holding")
                if msg.get("hold_rc") != 0:
                    problems.append(f"client {p.pid} could not start: {msg}")
        ready_s = time.monotonic() - t_start
        if problems:
            raise RuntimeError("; ".join(problems[:3]) + f" ({len(problems)} clients)")
        rss: list[tuple[float, int]] = []
        anon: list[int] = [_rss_kib(dpid, "RssAnon")]
        shmem: list[int] = [_rss_kib(dpid, "RssShmem")]
        stop = threading.Event()

        def sample() -> None:
            t0 = time.monotonic()
            while not stop.wait(1.0):
                rss.append((round(time.monotonic() - t0, 1), _rss_kib(dpid)))
                anon.append(_rss_kib(dpid, "RssAnon"))
                shmem.append(_rss_kib(dpid, "RssShmem"))

        sampler = threading.Thread(target=sample)
        rss.append((0.0, _rss_kib(dpid)))
        cpu0, w0 = _cpu_s(dpid), time.monotonic()
        sampler.start()
        _tell_all(procs, "g")
        for p in procs:
            _read(p, "go")
        time.sleep(seconds)
        _tell_all(procs, "p")
        paused = {p.pid: _read(p, "paused")["launched"] for p in procs}
        cpu1, w1 = _cpu_s(dpid), time.monotonic()
        stop.set()
        sampler.join()
        # Launch counts: the hook publishes them in the stat page at launch
        # time; the daemon reads them from there.
        deadline = time.monotonic() + 10
        while True:
            tree = d.ctl("tree")
            counted = {}
            for pid in paused:
                found = find_process(tree, pid)
                counted[pid] = -1 if found is None else int(found[1]["launches"])
            if counted == paused or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        wrong = {pid: (paused[pid], counted[pid]) for pid in paused if counted[pid] != paused[pid]}
        if wrong:
            problems.append(f"launch counts differ for {len(wrong)} clients: "
                            f"{dict(list(wrong.items())[:5])}")
        events = {s: d.ctl("show", s)["gpu.memory.events"] for s in slices}
        _tell_all(procs, "e")
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=60)
            r = json.loads(out.splitlines()[-1])
            results.append(r)
            if p.returncode != 0:
                problems.append(f"client {p.pid} exited {p.returncode}: "
                                f"{ {k: v for k, v in r.items() if k != 'spans'} }")
        deadline = time.monotonic() + 5
        while True:
            status = d.ctl("status")
            left = {s: d.ctl("show", s)["gpu.memory.current"]["total"] for s in slices}
            hooks = [c for c in status["clients"] if c["role"] == "hook"]
            if (not any(left.values()) and not hooks) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if any(left.values()):
            problems.append(f"memory still booked after every client exited: {left}")
        if hooks:
            problems.append(f"{len(hooks)} clients still registered after exit")
        lat = sorted(t1 - t0 for r in results for t0, t1 in r["spans"])
        launched = sum(r["launched"] for r in results)
        ok = sum(r["ok"] for r in results)
        oom = sum(r["oom"] for r in results)
        other = sum(r["other"] for r in results)
        if other:
            problems.append(f"{other} allocations failed with something other than OOM")
        rss_kib = [k for _, k in rss]
        if problems:
            _show_log(d)
        return {
            "clients": clients, "seconds": seconds, "slices": nslices, "wave": wave,
            "think_ms": think_ms,
            "all_registered_s": round(ready_s, 2),
            "launches": launched, "launches_per_s": round(launched / seconds),
            "allocs_ok": ok, "allocs_oom": oom, "allocs_other": other,
            "allocs_per_s": round((ok + oom) / seconds),
            "alloc_latency_us": {"samples": len(lat), "p50": round(_pct(lat, 0.5), 1),
                                 "p99": round(_pct(lat, 0.99), 1),
                                 "p999": round(_pct(lat, 0.999), 1)},
            "memory_events": events,
            "daemon_cpu_percent": round(100 * (cpu1 - cpu0) / (w1 - w0), 1),
            "daemon_rss_kib": {"first": rss_kib[0], "last": rss_kib[-1], "min": min(rss_kib),
                               "max": max(rss_kib)},
            "daemon_rss_series": rss,
            "daemon_rss_anon_kib": {"first": anon[0], "last": anon[-1], "max": max(anon)},
            "daemon_rss_shmem_kib": {"first": shmem[0], "last": shmem[-1], "max": max(shmem)},
            "problems": problems,
        }
    except BaseException:
        _show_log(d)
        raise
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        cg.cleanup()
        d.cleanup()


def _show_log(d: VgpudProc) -> None:
    """The daemon's warnings and errors, for a run that failed."""
    try:
        lines = d.log.read_text(errors="replace").splitlines()
    except OSError:
        return
    bad = [ln for ln in lines if '"warning"' in ln or '"error"' in ln or "Traceback" in ln]
    print(f"vgpud log: {len(lines)} lines, {len(bad)} warnings/errors; the last of them:",
          file=sys.stderr)
    for ln in bad[-20:]:
        print("  " + ln[:400], file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--kernel-ns", type=int, default=20000,
                    help="simulated duration of each kernel (bursts of 8 per allocation)")
    ap.add_argument("--wave", type=int, default=25,
                    help="clients started at once (the next wave once these hold memory); "
                         "--wave 200 starts 200 together")
    ap.add_argument("--connect-timeout-ms", type=int, default=30000,
                    help="the hook's connect_timeout_ms for the clients (hook.conf)")
    ap.add_argument("--think-ms", type=int, default=50,
                    help="each client's idle pause after a burst (0: flat out; with 200 "
                         "clients on 2 cores that starves everything, the daemon included)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or not 1 <= args.slices <= args.clients:
        ap.error("--clients >= 1, --seconds > 0, 1 <= --slices <= --clients")
    with tempfile.TemporaryDirectory(prefix="vgpu-load-") as td:
        r = run(args.clients, args.seconds, args.slices, Path(td), args.kernel_ns,
                max(1, args.wave), max(0, args.think_ms), args.connect_timeout_ms)
    lat = r["alloc_latency_us"]
    rss = r["daemon_rss_kib"]
    print(f"{r['clients']} clients x {r['seconds']} s in {r['slices']} slices "
          f"(all started, in waves of {r['wave']}, in {r['all_registered_s']} s)")
    print(f"  launches {r['launches']} ({r['launches_per_s']}/s), allocations ok {r['allocs_ok']}"
          f" + OOM {r['allocs_oom']} ({r['allocs_per_s']}/s), other errors {r['allocs_other']}")
    print(f"  cuMemAlloc latency (reservation round trip + driver): p50 {lat['p50']} us, "
          f"p99 {lat['p99']} us, p99.9 {lat['p999']} us over {lat['samples']} samples")
    an, sh = r["daemon_rss_anon_kib"], r["daemon_rss_shmem_kib"]
    print(f"  daemon CPU {r['daemon_cpu_percent']}%; RSS first {rss['first']} KiB, last "
          f"{rss['last']} KiB, min {rss['min']}, max {rss['max']}; of which its own heap "
          f"(RssAnon) {an['first']} -> {an['last']} KiB and clients' shared pages (RssShmem) "
          f"{sh['first']} -> {sh['last']} KiB")
    for p in r["problems"]:
        print(f"  PROBLEM: {p}")
    print("  accounting: " + ("OK (launch counts equal, every slice back to 0)"
                              if not r["problems"] else "FAILED"))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 1 if r["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
