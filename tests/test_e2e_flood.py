"""End to end: one tenant floods vgpud and the others do not notice.

A real vgpud on the simulated GPU with small per-slice bounds; an
unprivileged process in one cgroup opens every connection it can, of both
roles, and keeps half-open handshakes in flight; meanwhile a CUDA program in
another cgroup registers, allocates and launches, and root's vgpuctl
answers. What is asserted is what the bounds guarantee (counts, errors,
memory that does not grow with the attempts), never how fast anything was:
this runs on a busy 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from _e2e import (
    ROOT,
    Cgroups,
    VgpudProc,
    built_fixture,
    find_process,
    spawn,
    vgpud_fixture,
)

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(os.getuid() != 0, reason="makes cgroups, drops privileges")]
MiB = 1 << 20
NOBODY = 65534
FLOODER = ROOT / "tests" / "programs" / "flooder.py"
LIMITS = {"slice_clients": 64, "slice_hooks": 24, "slice_handshakes": 8,
          "handshake_timeout_ms": 1500}


built = built_fixture("client_basic")
vgpud = vgpud_fixture(limits=LIMITS)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError("no VmRSS")


def _wait_for(pred: Any, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def _line(p: subprocess.Popen[str]) -> dict[str, Any]:
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line, f"flooder exited ({p.poll()})"
    out: dict[str, Any] = json.loads(line)
    return out


def test_a_flooding_slice_does_not_deny_the_others(vgpud: VgpudProc, cgroups: Cgroups,
                                                   built: Path) -> None:
    assert vgpud.proc is not None
    flood = cgroups.make("flood")
    victim = cgroups.make("victim")
    rss_before = _rss_kib(vgpud.proc.pid)
    flooder = spawn([sys.executable, str(FLOODER), vgpud.socket, "--uid", str(NOBODY),
                     "--hooks", "40", "--ctls", "32", "--half", "16"],
                    vgpud.env, flood, cgroups, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        filled = _line(flooder)
        # Hooks up to limits.slice_hooks, each refusal naming the bound...
        assert filled["hooks"] == 24
        assert filled["refused"]["limits.slice_hooks"] == 16
        assert filled["message"]["limits.slice_hooks"] == (
            f"limits.slice_hooks=24 reached: 24 hooked processes in {flood}")
        assert filled["ctls"] == 32
        # ...and of the 16 half-open handshakes, 8 (limits.slice_handshakes)
        # are held; the others are refused by that bound.
        _wait_for(lambda: vgpud.ctl("show", flood)["gpu.clients.events"]["handshakes"] >= 8)
        rss_filled = _rss_kib(vgpud.proc.pid)

        def check_bounds() -> None:
            shown = vgpud.ctl("show", flood)  # root's vgpuctl answers, too
            stat = shown["gpu.clients.stat"]
            assert shown["gpu.clients.current"] == stat["clients"] <= 64
            assert stat["hooks"] <= 24
            assert stat["handshakes"] <= 8

        # Meanwhile, in another slice, a CUDA program registers, reserves
        # and launches as if nobody were there.
        env = vgpud.client_env(CLIENT_HOLD_MS="1500")
        prog = spawn([str(built / "client_basic"), "50", "20000", str(MiB), str(3 * MiB)],
                     env, victim, cgroups, stdout=subprocess.PIPE)

        def counted() -> bool:
            check_bounds()
            status = vgpud.ctl("status")
            assert status["devices"]
            found = find_process(vgpud.ctl("tree"), prog.pid)
            return found is not None and found[1].get("launches") == 50

        _wait_for(counted)
        out, _ = prog.communicate(timeout=120)
        got = json.loads(out.splitlines()[-1])
        assert prog.returncode == 0
        assert (got["init_rc"], got["ctx_rc"], got["launched"], got["sync_rc"],
                got["alloc_rc"], got["free_rc"]) == (0, 0, 50, 0, [0, 0], 0)
        # A CUDA program in the flooded slice is refused, and says why.
        refused = spawn([str(built / "client_basic"), "1", "1000"],
                        vgpud.client_env(), flood, cgroups, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE)
        _out, err = refused.communicate(timeout=120)
        assert refused.returncode != 0
        assert "daemon said error: limit limits.slice_" in err, err
        # Keep flooding until the flooder has been refused many times over
        # (what the daemon holds must not grow with the attempts) and the
        # handshake timeout has dropped its first half-open handshakes.
        assert flooder.stdin is not None

        def flooded() -> bool:
            if sum(vgpud.ctl("show", flood)["gpu.clients.events"].values()) < 600:
                return False
            assert flooder.stdin is not None
            flooder.stdin.write("report\n")
            flooder.stdin.flush()
            return int(_line(flooder)["dropped"]) >= 8

        _wait_for(flooded)
        check_bounds()
        rss_end = _rss_kib(vgpud.proc.pid)
        flooder.stdin.write("stop\n")
        flooder.stdin.flush()
        done = _line(flooder)
        assert flooder.wait(60) == 0
    finally:
        if flooder.poll() is None:
            flooder.kill()
            flooder.wait()
    events = vgpud.ctl("show", flood)["gpu.clients.events"]
    assert events["hooks"] >= 16
    assert events["handshakes"] >= 8
    assert sum(done["refused"].values()) >= 600
    assert set(done["refused"]) <= {"limits.slice_hooks", "limits.slice_handshakes",
                                    "limits.slice_clients"}
    # Half-open handshakes held their slots until the timeout, not longer
    # than the daemon let them: each was dropped, none before 1.5 s.
    assert done["dropped"] >= 8
    assert done["dropped_s"][0] >= 1.5
    # Everything the flooder had is given back when it is gone.
    _wait_for(lambda: vgpud.ctl("show", flood)["gpu.clients.current"] == 0, 60)
    # Memory: the flood's connections cost what the bounds allow (24 hooks,
    # 64 connections), and refusals cost nothing that stays.
    assert rss_filled - rss_before < 32 * 1024, (rss_before, rss_filled)
    assert rss_end - rss_filled < 16 * 1024, (rss_filled, rss_end)
    print(json.dumps({"rss_kib": [rss_before, rss_filled, rss_end], "flooder": done}))


def test_gpu_clients_max_bounds_a_subtree(vgpud: VgpudProc, cgroups: Cgroups) -> None:
    """A tenant that can make cgroups (a delegated subtree) spreads its
    connections over many; gpu.clients.max on the subtree bounds them all."""
    tenant = cgroups.make("tenant")
    vgpud.ctl("set", tenant, "gpu.clients.max=10")
    procs = []
    try:
        results = []
        for i in range(3):
            leaf = cgroups.make(f"tenant/job{i}")
            p = spawn([sys.executable, str(FLOODER), vgpud.socket, "--ctls", "5",
                       "--hold"], vgpud.env, leaf, cgroups, stdout=subprocess.PIPE,
                      stdin=subprocess.PIPE)
            procs.append(p)
            results.append(_line(p))
        assert [r["ctls"] for r in results] == [5, 5, 0]
        assert results[2]["refused"] == {"gpu.clients.max": 5}
        assert results[2]["message"]["gpu.clients.max"] == (
            f"gpu.clients.max=10 reached: 10 connections (descendants included) in {tenant}")
        shown = vgpud.ctl("show", tenant)
        assert shown["gpu.clients.events"]["max"] == 5
        assert shown["knobs"]["gpu.clients.max"]["value"] == "10"
    finally:
        for p in procs:
            p.kill()
            p.wait()
    # Leaves with no connection and no event are gone; the tenant keeps its events.
    _wait_for(lambda: vgpud.ctl("show", tenant)["gpu.clients.current"] == 0, 60)
    ev = vgpud.ctl("events")["slices"]
    assert ev[tenant]["gpu.clients.events"]["max"] == 5
    assert f"{tenant}/job0" not in ev
