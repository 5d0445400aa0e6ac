"""Reliability end to end on the simulated GPU (SPEC.md, "Faults"): vgpud
SIGKILLed and restarted under load kills no client and loses no accounting;
a hook with no daemon does what hook.conf says; fork, exec and many
launching threads keep the books right."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _e2e import (
    Cgroups,
    VgpudProc,
    built_fixture,
    find_process,
    sim_mem_sum,
    sim_stats,
    spawn,
    vgpud_fixture,
)

pytestmark = pytest.mark.e2e
MiB = 1 << 20


built = built_fixture("busy_client", "client_basic")
vgpud = vgpud_fixture(sim_mem="8G", ctx_overhead=16 * MiB)


def _wait(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what} not reached in {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - t0


def _mem(shm: str, pid: int) -> int:
    try:
        return sim_stats(shm, pid)[1]
    except LookupError:
        return 0


def _line(p: subprocess.Popen[str], phase: str) -> dict[str, Any]:
    """The next stdout line of p, which must be the given phase."""
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line, f"pid {p.pid} closed stdout (exit {p.poll()}) before {phase!r}"
    msg: dict[str, Any] = json.loads(line)
    assert msg.get("phase") == phase, msg
    return msg


def _tell(p: subprocess.Popen[str], cmd: str) -> None:
    assert p.stdin is not None
    p.stdin.write(cmd + "\n")
    p.stdin.flush()


def _hooks(d: VgpudProc) -> set[int]:
    return {c["pid"] for c in d.ctl("status")["clients"] if c["role"] == "hook"}


# (leaf, gpu.memory.max, clients, hold MiB, buffers held, short-lived MiB, cores.max)
# Held memory (with 16 MiB context + 2 MiB module) is ~50 MiB a client in a
# and b: the short-lived allocations contend for the rest of each cap.
SLICES = [("a", 400, 6, 32, 1, 32, None), ("b", 300, 5, 16, 2, 24, None),
          ("c", 512, 5, 64, 1, 48, "50")]


def test_sigkill_restart_under_load(vgpud: VgpudProc, cgroups: Cgroups, built: Path) -> None:
    """16 busy clients in three capped slices; vgpud is SIGKILLed and
    restarted on the same socket and runtime directory mid-run.

    Throughout, the device's own per-process memory is sampled: no slice
    ever goes over its cap, before, during or after the outage. No
    short-lived allocation both started and returned while no daemon
    process existed (it waited or failed with OOM). After recovery the
    books equal the device per process and per slice; every client ends
    with exit 0, its data intact and no launch failed."""
    paths: dict[str, str] = {}
    for leaf, cap, *_rest, cores in SLICES:
        paths[leaf] = cgroups.make(f"job/{leaf}")
        knobs = [f"gpu.memory.max={cap}M"] + ([f"gpu.cores.max={cores}"] if cores else [])
        vgpud.ctl("set", paths[leaf], *knobs)
    exe = str(built / "busy_client")
    env = vgpud.client_env()
    procs: dict[str, list[subprocess.Popen[str]]] = {}
    for leaf, _cap, n, hold, nhold, extra, _ in SLICES:
        procs[leaf] = [spawn([exe, "busy", str(hold), str(nhold), str(extra), "20000"], env,
                             paths[leaf], cgroups, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE) for _ in range(n)]
    everyone = [p for ps in procs.values() for p in ps]
    assert len(everyone) == 16
    try:
        for p in everyone:
            assert _line(p, "holding")["hold_rc"] == 0
        for p in everyone:
            _tell(p, "g")
            _line(p, "go")

        peaks = dict.fromkeys(procs, 0)
        samples = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal samples
            while not stop.is_set():
                for leaf, ps in procs.items():
                    peaks[leaf] = max(peaks[leaf], sim_mem_sum(vgpud.shm, [p.pid for p in ps]))
                samples += 1

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            time.sleep(1.5)
            assert vgpud.proc is not None
            vgpud.proc.send_signal(signal.SIGKILL)
            vgpud.proc.wait(10)
            t_dead = time.monotonic_ns()
            vgpud.proc = None
            time.sleep(0.7)  # outage: clients keep launching and try to allocate
            t_spawn = time.monotonic_ns()
            vgpud.start()
            pids = {p.pid for p in everyone}
            took = _wait(lambda: _hooks(vgpud) >= pids, 15, "all clients re-registered")
            time.sleep(1.0)  # some load after recovery
            for p in everyone:
                _tell(p, "q")
                _line(p, "quiet")
        finally:
            stop.set()
            sampler.join()
        assert samples > 20
        for leaf, cap, *_ in SLICES:
            assert peaks[leaf] <= cap * MiB, (leaf, peaks[leaf], cap)
        # The caps survived the restart (persistent layer) and still bind.
        for leaf, cap, *_ in SLICES:
            knob = vgpud.ctl("show", paths[leaf])["knobs"]["gpu.memory.max"]
            assert knob["value"] == f"{cap * MiB}" or knob["value"] == f"{cap}M", knob

        # Books equal the device, per process and per slice.
        def books_match() -> bool:
            tree = vgpud.ctl("tree")
            for leaf, ps in procs.items():
                dev_total = 0
                for p in ps:
                    found = find_process(tree, p.pid)
                    if found is None or found[1]["mem_bytes"] != _mem(vgpud.shm, p.pid):
                        return False
                    dev_total += _mem(vgpud.shm, p.pid)
                if vgpud.ctl("show", paths[leaf])["gpu.memory.current"]["total"] != dev_total:
                    return False
            return True

        _wait(books_match, 5, "books equal to the device")

        results = []
        for p in everyone:
            _tell(p, "e")
        for p in everyone:
            out, _ = p.communicate(timeout=30)
            r = json.loads(out.splitlines()[-1])
            results.append(r)
            assert p.returncode == 0, r
        for r in results:
            assert (r["data_ok"], r["launch_err"], r["other"]) == (1, 0, 0), r
            assert r["launched"] > 0
            for t0, t1 in r["spans"]:
                assert not (t0 >= t_dead and t1 <= t_spawn), \
                    f"allocation admitted while no daemon existed: {t0}..{t1}"
        assert sum(r["ok"] for r in results) > 0
        assert sum(r["oom"] for r in results) > 0, "the caps were never contended"
        # Some allocations were in flight across the outage and waited for the daemon.
        waited = sum(1 for r in results for t0, t1 in r["spans"] if t0 < t_spawn < t1)
        assert waited > 0, "no allocation spanned the outage: the test did not test it"
        _wait(lambda: vgpud.ctl("show")["gpu.memory.current"]["total"] == 0, 2,
              "all memory released after exit")
        print(f"re-registered in {took:.2f} s; {samples} samples; peaks "
              f"{ {k: v // MiB for k, v in peaks.items()} } MiB; {waited} waited across it")
    finally:
        for p in everyone:
            if p.poll() is None:
                p.kill()
                p.wait()


def _conf(tmp: Path, mode: str) -> str:
    path = tmp / f"hook-{mode}.conf"
    path.write_text(f"on_no_daemon = {mode}\nconnect_timeout_ms = 300\n")
    return str(path)


@pytest.mark.parametrize("mode", ["fail", "unlimited"])
def test_no_daemon(tmp_path: Path, built: Path, mode: str) -> None:
    """No vgpud at the socket: `fail` refuses CUDA (cuInit answers
    CUDA_ERROR_NOT_INITIALIZED) and says why on stderr; `unlimited` runs
    the program without limits and says that too. Both within the
    connect timeout, not hanging."""
    d = VgpudProc(tmp_path)  # not started: nothing listens on d.socket
    env = d.client_env(VGPU_HOOK_CONF=_conf(tmp_path, mode))
    t0 = time.monotonic()
    p = subprocess.run([str(built / "client_basic"), "5", "1000", str(MiB)], env=env,
                       capture_output=True, text=True, timeout=30)
    took = time.monotonic() - t0
    r = json.loads(p.stdout.splitlines()[-1])
    assert took < 5
    if mode == "fail":
        assert p.returncode == 1
        assert r["init_rc"] == 3  # CUDA_ERROR_NOT_INITIALIZED
        assert "on_no_daemon=fail" in p.stderr
        assert d.socket in p.stderr
    else:
        assert p.returncode == 0, p.stderr
        assert r["init_rc"] == 0
        assert r["launched"] == 5
        assert r["alloc_rc"] == [0]
        assert "WITHOUT limits" in p.stderr
    d.cleanup()  # the simulated device the unlimited run made


def test_many_threads_launching_at_once(vgpud: VgpudProc, cgroups: Cgroups,
                                       built: Path) -> None:
    """32 threads launch 200 kernels each at once: no deadlock, the daemon's
    count is exact, and the process is gone from the books within a second
    of its exit."""
    slc = cgroups.make("threads")
    vgpud.ctl("set", slc, "gpu.cores.max=80")
    p = spawn([str(built / "busy_client"), "threads", "32", "200"], vgpud.client_env(), slc,
              cgroups, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        done = _line(p, "done")
        assert done["launched"] == 32 * 200
        assert done["launch_err"] == 0
        assert done["sync_rc"] == 0

        def counted() -> int:
            found = find_process(vgpud.ctl("tree"), p.pid)
            return -1 if found is None else int(found[1]["launches"])

        _wait(lambda: counted() == 32 * 200, 5, "daemon launch count")
        _tell(p, "")
        p.communicate(timeout=10)
        assert p.returncode == 0
        t0 = time.monotonic()
        _wait(lambda: p.pid not in _hooks(vgpud)
              and vgpud.ctl("show", slc)["gpu.memory.current"]["total"] == 0, 2, "cleanup")
        assert time.monotonic() - t0 < 1.0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_fork_after_init_and_exec_under_the_hook(vgpud: VgpudProc, cgroups: Cgroups,
                                                 built: Path) -> None:
    """A process with CUDA initialised forks a child that exits without CUDA
    and a child that execs another CUDA program: the exec'd program is its
    own client with its own books, gone when it exits; the parent's books
    and connection are untouched and it keeps allocating and launching."""
    slc = cgroups.make("forker")
    vgpud.ctl("set", slc, "gpu.memory.max=1G")
    p = spawn([str(built / "busy_client"), "fork", str(built / "client_basic"), "10", "1000",
               str(8 * MiB)], vgpud.client_env(CLIENT_HOLD_MS="0"), slc, cgroups,
              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None
        child = json.loads(p.stdout.readline())  # client_basic's line comes first
        assert child["init_rc"] == 0
        assert child["launched"] == 10
        assert child["alloc_rc"] == [0]
        assert child["pid"] != p.pid
        forked = _line(p, "forked")
        assert forked["plain_exit"] == 7
        assert forked["exec_exit"] == 0
        assert forked["alloc_rc"] == 0
        assert forked["launch_rc"] == 0
        assert forked["sync_rc"] == 0

        def parent_books() -> bool:
            tree = vgpud.ctl("tree")
            found = find_process(tree, p.pid)
            return (found is not None and find_process(tree, child["pid"]) is None
                    and found[1]["mem_bytes"] == _mem(vgpud.shm, p.pid)
                    and vgpud.ctl("show", slc)["gpu.memory.current"]["total"]
                    == _mem(vgpud.shm, p.pid))

        _wait(parent_books, 5, "parent's books equal the device, child gone")
        assert _mem(vgpud.shm, p.pid) >= 64 * MiB
        _tell(p, "")
        out, _ = p.communicate(timeout=10)
        end = json.loads(out.splitlines()[-1])
        assert end["alloc2_rc"] == 0
        assert end["free_rc"] == 0
        assert p.returncode == 0
        _wait(lambda: vgpud.ctl("show", slc)["gpu.memory.current"]["total"] == 0, 2, "cleanup")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_load_smoke(tmp_path: Path, built: Path) -> None:
    """bench/load.py in small: 12 hooked clients in 3 capped slices for 3 s;
    nothing lost (launch counts equal, slices back to 0, all exit 0)."""
    p = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "bench"
                                            / "load.py"), "--clients", "12", "--slices", "3",
                        "--seconds", "3", "--json", str(tmp_path / "load.json")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    r = json.loads((tmp_path / "load.json").read_text())
    assert r["problems"] == []
    assert r["launches"] > 0
    assert r["allocs_ok"] > 0
