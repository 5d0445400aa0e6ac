"""Per-slice bounds on connections (_bounds), the log throttle, and the
daemon refusing for capacity over its socket."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FakeHook, RunningDaemon, start_daemon, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from vgpu_cgroup._core import _bounds
from vgpu_cgroup._core._bounds import ClientBounds, ClientLimits, Refusal, Ticket, prefixes
from vgpu_cgroup._log import Throttle
from vgpu_cgroup._node._identity import cgroup_of_pid
from vgpu_cgroup._wire._client import Client, ClientError

FLOODER = Path(__file__).resolve().parent / "programs" / "flooder.py"
NOBODY = 65534


def admit(b: ClientBounds, slc: str, uid: int = 1000, role: str | None = None) -> Ticket:
    t = b.accept(slc, uid)
    assert isinstance(t, Ticket), t
    if role is not None:
        assert b.hello(t, role) is None
    return t


def refused(res: Ticket | Refusal | None) -> Refusal:
    assert isinstance(res, Refusal), res
    return res


# ---------------------------------------------------------------- pure core


def test_prefixes() -> None:
    assert prefixes("") == ("",)
    assert prefixes("a.slice/b.scope") == ("", "a.slice", "a.slice/b.scope")


def test_per_slice_bounds_name_the_bound_and_count_on_the_slice() -> None:
    b = ClientBounds(ClientLimits(slice_clients=5, slice_handshakes=2, slice_hooks=2))
    h1, h2 = admit(b, "t/a"), admit(b, "t/a")
    r = refused(b.accept("t/a", 1000))
    assert (r.bound, r.key, r.slice, r.limit, r.current) == (
        "limits.slice_handshakes", "handshakes", "t/a", 2, 2)
    assert r.message() == "limits.slice_handshakes=2 reached: 2 handshakes in progress in t/a"
    other = admit(b, "t/b")  # another slice is not affected
    assert b.hello(h1, "hook") is None
    assert b.hello(h2, "hook") is None
    h3 = admit(b, "t/a")
    r = refused(b.hello(h3, "hook"))
    assert r.bound == "limits.slice_hooks"
    assert h3.stage == _bounds.GONE  # a refusal at hello gives the charge back
    for _ in range(3):
        admit(b, "t/a", role="ctl")
    r = refused(b.accept("t/a", 1000))
    assert (r.bound, r.current) == ("limits.slice_clients", 5)
    assert b.events("t/a") == {"max": 0, "clients": 1, "hooks": 1, "handshakes": 1,
                               "node": 0, "depth": 0}
    assert b.events("t/b") == dict.fromkeys(_bounds.EVENT_KEYS, 0)
    assert b.local("t/a") == {"clients": 5, "handshakes": 0, "hooks": 2}
    assert b.current("t") == 6
    assert b.current("") == 6
    b.release(other)
    b.release(other)  # twice: nothing more
    assert b.current("t") == 5
    assert b.node == 5


def test_node_bound_and_the_root_allowance() -> None:
    b = ClientBounds(ClientLimits(clients=3))
    admit(b, "a", role="ctl")
    admit(b, "b", role="hook")
    last = admit(b, "c")
    r = refused(b.accept("d", 1000))
    assert (r.bound, r.key, r.slice, r.current) == ("limits.clients", "node", "", 3)
    assert b.events("")["node"] == 1
    # uid 0: a handshake and a control connection are beyond the bound...
    root_ctl = admit(b, "ops", uid=0, role="ctl")
    assert b.node == 3
    # ...a hook is not: it takes a pair of shared regions like anyone's.
    root_hook = admit(b, "ops", uid=0)
    assert refused(b.hello(root_hook, "hook")).bound == "limits.clients"
    b.release(last)
    root_hook = admit(b, "ops", uid=0, role="hook")
    assert b.node == 3
    b.release(root_hook)
    b.release(root_ctl)
    assert b.node == 2


def test_gpu_clients_max_is_hierarchical() -> None:
    knobs = {"ten.slice": 3, "ten.slice/x": 1}

    def chain(path: str) -> list[tuple[str, int]]:
        return [(p, knobs[p]) for p in prefixes(path) if p in knobs]

    b = ClientBounds(ClientLimits(), chain)
    admit(b, "ten.slice/x")
    r = refused(b.accept("ten.slice/x", 1000))  # its own max, checked first
    assert (r.bound, r.slice, r.limit) == ("gpu.clients.max", "ten.slice/x", 1)
    admit(b, "ten.slice/y")
    admit(b, "ten.slice/y/deeper", uid=0)  # uid 0 too: per-slice bounds hold for all
    r = refused(b.accept("ten.slice/z", 1000))
    assert (r.bound, r.slice, r.current) == ("gpu.clients.max", "ten.slice", 3)
    assert r.message() == ("gpu.clients.max=3 reached: 3 connections (descendants "
                           "included) in ten.slice")
    assert b.events("ten.slice")["max"] == 1
    assert b.events("ten.slice/x")["max"] == 1
    admit(b, "other.slice")


def test_max_zero_refuses_a_slice_with_no_connection_and_keeps_the_event() -> None:
    b = ClientBounds(ClientLimits(), lambda p: [("banned", 0)] if p.startswith("banned") else [])
    r = refused(b.accept("banned/job", 1000))
    assert (r.slice, r.limit, r.current) == ("banned", 0, 0)
    assert b.events("banned")["max"] == 1
    assert b.current("banned") == 0


def test_too_deep_a_cgroup_is_refused() -> None:
    b = ClientBounds(ClientLimits(max_depth=3))
    admit(b, "a/b/c")
    r = refused(b.accept("a/b/c/d", 1000))
    assert (r.bound, r.key, r.slice, r.limit, r.current) == (
        "limits.max_depth", "depth", "a/b/c", 3, 4)


def test_records_go_with_the_last_connection_unless_they_have_events(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_bounds, "IDLE_RECORDS", 3)
    b = ClientBounds(ClientLimits(slice_handshakes=1))
    t = admit(b, "x/y")
    b.release(t)
    assert b.slices() == [""]
    for i in range(5):  # refused once each, then gone: records kept, the oldest evicted
        t = admit(b, f"s{i}")
        refused(b.accept(f"s{i}", 1000))
        b.release(t)
    assert b.slices() == ["", "s2", "s3", "s4"]
    assert b.events("s4")["handshakes"] == 1
    assert b.events("s0")["handshakes"] == 0
    t = admit(b, "s2")  # connected again: no longer idle, never evicted while it is
    for i in range(5, 9):
        t2 = admit(b, f"s{i}")
        refused(b.accept(f"s{i}", 1000))
        b.release(t2)
    assert "s2" in b.slices()
    b.release(t)


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match=r"limits\.slice_hooks"):
        ClientLimits(slice_hooks=0)
    with pytest.raises(ValueError, match="handshake_timeout"):
        ClientLimits(handshake_timeout_s=0)


_ops = st.lists(st.tuples(st.sampled_from(["accept", "hook", "ctl", "release"]),
                          st.sampled_from(["a/x", "a/y", "b", ""]), st.sampled_from([0, 1000]),
                          st.integers(0, 30)), max_size=80)


@settings(max_examples=200, deadline=None)
@given(_ops)
def test_counts_are_exact_and_within_bounds(ops: list[tuple[str, str, int, int]]) -> None:
    """Any sequence of accepts, hellos and closes: every count is what the
    live connections add up to, no bound is ever exceeded, and once all
    are closed nothing but refusal events is left."""
    lim = ClientLimits(clients=6, slice_clients=4, slice_handshakes=2, slice_hooks=2)
    b = ClientBounds(lim, lambda p: [("a", 5)] if p.startswith("a") else [])
    live: list[Ticket] = []
    for op, slc, uid, pick in ops:
        if op == "accept":
            res = b.accept(slc, uid)
            if isinstance(res, Ticket):
                live.append(res)
        elif live:
            t = live[pick % len(live)]
            if op == "release" or t.stage != _bounds.HANDSHAKE:
                b.release(t)
                live.remove(t)
            elif b.hello(t, op) is not None:
                live.remove(t)
        for s in ("a/x", "a/y", "b", ""):
            mine = [t for t in live if t.slice == s]
            assert b.local(s) == {
                "clients": len(mine),
                "handshakes": sum(t.stage == _bounds.HANDSHAKE for t in mine),
                "hooks": sum(t.stage == _bounds.HOOK for t in mine)}
            assert len(mine) <= lim.slice_clients
            assert b.local(s)["hooks"] <= lim.slice_hooks
            assert b.local(s)["handshakes"] <= lim.slice_handshakes
        assert b.current("a") == sum(t.slice.startswith("a/") for t in live) <= 5
        assert b.current("") == len(live)
        assert b.node == sum(t.node for t in live) <= lim.clients
        assert all(t.node == (t.uid != 0 or t.stage == _bounds.HOOK) for t in live)
    for t in live:
        b.release(t)
    assert b.current("") == 0
    assert b.node == 0
    assert all(any(b.events(s).values()) for s in b.slices() if s)


def test_throttle_lets_a_burst_through_then_summarises() -> None:
    th = Throttle(10.0, burst=2, max_keys=2)
    assert [th.allow("a", 0.0, "x") for _ in range(5)] == [True, True, False, False, False]
    assert th.allow("b", 1.0)
    # Past max_keys, new keys share one: c, d and e cannot grow the table.
    assert [th.allow(k, 1.0) for k in "cde"] == [True, True, False]
    assert len(th) == 3
    assert th.due(5.0) == []
    assert th.due(10.0) == [("a", {"x": 3})]
    assert th.due(11.0) == [(Throttle.OVERFLOW, {"": 1})]  # b had nothing held back
    assert len(th) == 0
    assert th.allow("a", 11.0, "x")  # a fresh interval


# ---------------------------------------------------------------- the daemon


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory other users can reach (pytest's tmp_path is root's only)."""
    d = Path(tempfile.mkdtemp(prefix="vgpu-bounds-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", str(d)], check=False)


def flood(rd: RunningDaemon, *args: str, uid: int | None = None) -> dict[str, Any]:
    """Run tests/programs/flooder.py's fill phase; its counts."""
    cmd = [sys.executable, str(FLOODER), rd.socket, "--fill-only", *args]
    if uid is not None:
        cmd += ["--uid", str(uid)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(FLOODER.parent.parent.parent)})
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    return dict(lines[0])


def test_per_slice_bounds_over_the_socket(tmp_path: Path) -> None:
    lim = ClientLimits(slice_clients=6, slice_hooks=3, slice_handshakes=2,
                       handshake_timeout_s=60)
    rd, stop = start_daemon(tmp_path, limits=lim)
    slc = cgroup_of_pid(os.getpid())  # where this process's connections are charged
    try:
        silent = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
        for s in silent:
            s.connect(rd.socket)
        # Accepted in order: the two are handshakes in progress by then.
        with pytest.raises(ClientError) as err:
            rd.client()
        assert err.value.code == "limit"
        assert "limits.slice_handshakes=2" in err.value.msg
        for s in silent:
            s.close()
        wait_for(lambda: rd.daemon.bounds.local(slc)["handshakes"] == 0, 30)
        hooks = [FakeHook(rd) for _ in range(3)]
        with pytest.raises(ClientError, match=r"limits\.slice_hooks=3 reached: 3 hooked"):
            FakeHook(rd)
        ctls = [rd.client() for _ in range(3)]
        c = Client(rd.socket, timeout=5)
        c.send({"t": "hello", "v": 1, "role": "ctl", "pid": 1, "comm": "x"})
        refusal = c.recv()
        assert refusal == {"t": "error", "code": "limit", "bound": "limits.slice_clients",
                           "slice": slc, "limit": 6, "current": 6,
                           "msg": f"limits.slice_clients=6 reached: 6 connections in "
                                  f"{slc or '-.slice'}"}
        shown = ctls[0].ctl("show", slice=slc)
        assert shown["gpu.clients.current"] == 6
        assert shown["gpu.clients.events"] == {"max": 0, "clients": 1, "hooks": 1,
                                               "handshakes": 1, "node": 0, "depth": 0}
        ev = ctls[0].ctl("events")["slices"][slc]["gpu.clients.events"]
        assert ev == shown["gpu.clients.events"]
        for h in hooks:
            h.close()
        for x in [*ctls, c]:
            x.close()
        wait_for(lambda: rd.daemon.bounds.current(slc) == 0 and rd.daemon.connections == 0, 30)
        with rd.client() as again:
            assert again.ctl("show", slice=slc)["gpu.clients.events"]["clients"] == 1
    finally:
        stop()


def test_dropped_handshakes_stop_counting(tmp_path: Path) -> None:
    """Silent and half-sent handshakes hold a slot only until the timeout."""
    rd, stop = start_daemon(tmp_path, limits=ClientLimits(slice_handshakes=2),
                            handshake_timeout=1.0)
    try:
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        partial = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        for s in (silent, partial):
            s.settimeout(30)
            s.connect(rd.socket)
        partial.sendall(b"\x00\x00\x00\x40\x85")  # a hello that never finishes
        slc = cgroup_of_pid(os.getpid())
        # Accepted in order, so these two are in progress when the third
        # comes (unless a whole second went by in between, then it is let in).
        why = ""
        try:
            rd.client().close()
        except ClientError as exc:
            why = exc.msg
        assert why.startswith("limits.slice_handshakes=2") or (
            not why and rd.daemon.bounds.events(slc)["handshakes"] == 0)
        assert silent.recv(100) == b""  # dropped by the daemon...
        assert partial.recv(100) == b""
        wait_for(lambda: rd.daemon.bounds.local(slc)["handshakes"] == 0, 30)  # ...not counted
        with rd.client() as c:
            c.ctl("status")
    finally:
        stop()


def test_the_operator_gets_in_when_the_node_is_full(tmp_path: Path, open_dir: Path,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    """An unprivileged flood fills the node-wide bound: more of its
    connections, of either role, are refused with the bound named, and the
    refusals are logged once, not per connection; uid 0's control
    connections still get in."""
    if os.getuid() != 0:
        pytest.skip("needs root to drop privileges")
    rd, stop = start_daemon(open_dir, max_connections=8)
    t0 = time.monotonic()
    try:
        got = flood(rd, "--ctls", "20", "--hooks", "4", uid=NOBODY)
        assert got["hooks"] + got["ctls"] == 8
        assert got["refused"] == {"limits.clients": 16}
        assert got["message"]["limits.clients"].startswith("limits.clients=8 reached")
        wait_for(lambda: rd.daemon.connections == 0, 30)
        held = [FakeHook(rd) for _ in range(4)]
        got = flood(rd, "--ctls", "10", uid=NOBODY)
        assert (got["ctls"], got["refused"]) == (4, {"limits.clients": 6})
        with rd.client() as root:
            status = root.ctl("status")
            assert status["connections"]["counted"] == 4  # the root hooks, not this
            assert root.ctl("show")["gpu.clients.events"]["node"] == 22
        for h in held:
            h.close()
        elapsed = time.monotonic() - t0
    finally:
        stop()
    lines = [json.loads(x) for x in capfd.readouterr().err.splitlines() if x.startswith("{")]
    refusals = [x for x in lines if x.get("event") == "connection refused"]
    # 22 refusals from one slice: one line per 10 s interval (one, unless
    # this machine took that long), not one per connection.
    assert 1 <= len(refusals) <= 1 + int(elapsed // 10)
    assert refusals[0]["bound"] == "limits.clients"
    assert refusals[0]["uid"] == NOBODY
