"""vgpud end to end over its socket, with fake hooks written in Python."""

from __future__ import annotations

import mmap
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import pytest
from conftest import FAKE_DEVICES, FakeHook, RunningDaemon, requires_sim, start_daemon, wait_for
from vgpu_cgroup._wire._abi import lib

from vgpu_cgroup._wire._client import Client, ClientError
from vgpu_cgroup._wire._shm import CTL_SIZE, UNLIMITED

MiB = 1 << 20


def mem_current(rd: RunningDaemon, slc: str) -> int:
    with rd.client() as c:
        return int(c.ctl("show", slice=slc)["gpu.memory.current"]["total"])


def test_hello_welcome_fds_and_readonly_ctl(vgpud: RunningDaemon) -> None:
    hook = FakeHook(vgpud)
    try:
        w = hook.client.welcome
        assert w["slice"] == "test.slice"
        assert w["tick_ns"] == 10_000_000
        assert hook.ctl.magic == lib.VGPU_SHM_MAGIC
        assert hook.ctl.daemon_epoch == w["epoch"]
        with pytest.raises(PermissionError):
            mmap.mmap(hook.ctl_fd, CTL_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # The control tick publishes into the page when something changed:
        # the client's arrival, then a knob of its slice.
        wait_for(lambda: int(hook.ctl.seq) > 0)
        seq = int(hook.ctl.seq)
        with vgpud.client() as c:
            c.ctl("set", slice="test.slice", knobs={"gpu.memory.max": "1G"})
        wait_for(lambda: int(hook.ctl.seq) > seq)
    finally:
        hook.close()


def test_attach_reserve_deny_release(vgpud: RunningDaemon) -> None:
    hook = FakeHook(vgpud)
    try:
        att = hook.attach()
        assert att["t"] == "attached"
        assert att["slot"] == 0
        assert att["mem_limit"] is None
        assert hook.attach()["slot"] == 0  # idempotent
        assert hook.attach(FAKE_DEVICES[1].uuid)["slot"] == 1
        assert hook.reserve(0, 8 * MiB)["t"] == "granted"
        with vgpud.client() as c:
            c.ctl("set", slice="test.slice", runtime=False, knobs={"gpu.memory.max": "10M"})
        denied = hook.reserve(0, 4 * MiB)
        assert denied == {"t": "denied", "id": denied["id"], "slice": "test.slice",
                          "limit": 10 * MiB, "current": 8 * MiB}
        assert hook.reserve(1, 4 * MiB)["t"] == "granted"  # the limit is per GPU
        hook.release(0, 8 * MiB)
        assert hook.reserve(0, 10 * MiB)["t"] == "granted"
        assert mem_current(vgpud, "test.slice") == 14 * MiB
        # The ctl page shows the slice's limit and usage within a tick or two.
        wait_for(lambda: int(hook.ctl.dev[0].mem_limit) == 10 * MiB
                 and int(hook.ctl.dev[0].mem_used) == 10 * MiB)
    finally:
        hook.close()


def test_release_on_disconnect(vgpud: RunningDaemon) -> None:
    hook = FakeHook(vgpud, slice="gone.slice")
    hook.attach()
    assert hook.reserve(0, 64 * MiB)["t"] == "granted"
    assert mem_current(vgpud, "gone.slice") == 64 * MiB
    hook.close()

    def released() -> bool:
        try:
            return mem_current(vgpud, "gone.slice") == 0
        except ClientError as exc:
            return exc.code == "notfound"  # implicit slice pruned: also released

    assert wait_for(released, 1.0) < 1.0


def test_bad_frames_close_only_that_connection(vgpud: RunningDaemon) -> None:
    good = FakeHook(vgpud)
    try:
        good.attach()
        for garbage in [struct.pack(">I", 0), struct.pack(">I", 1 << 30),
                        struct.pack(">I", 3) + b"\xc1\xc1\xc1",
                        struct.pack(">I", 1) + b"\x05"]:
            bad = Client(vgpud.socket, timeout=5)
            bad.hello("hook", slice="bad.slice")
            bad.sock.sendall(garbage)
            err = bad.recv()
            assert err["t"] == "error"
            assert err["code"] in ("frame", "decode")
            with pytest.raises(ClientError, match="closed"):
                bad.recv()
            bad.close()
        assert good.reserve(0, MiB)["t"] == "granted"
    finally:
        good.close()


def test_out_of_order_and_bad_version(vgpud: RunningDaemon) -> None:
    c = Client(vgpud.socket, timeout=5)
    c.send({"t": "reserve", "id": 1, "slot": 0, "n": 1})
    assert c.recv()["code"] == "order"
    c.close()
    c = Client(vgpud.socket, timeout=5)
    c.send({"t": "hello", "v": 9, "role": "hook", "pid": 1, "comm": "x"})
    err = c.recv()
    assert err["code"] == "version"
    assert err["supported"] == [1]
    c.close()


def test_unattached_slot_and_over_release_close(vgpud: RunningDaemon) -> None:
    hook = FakeHook(vgpud)
    with pytest.raises(ClientError, match="not attached"):
        hook.reserve(3, MiB)
    hook.close()
    hook = FakeHook(vgpud)
    hook.attach()
    hook.release(0, MiB)
    err = hook.client.recv()
    assert err["code"] == "invalid"
    hook.close()


def test_unknown_device_is_an_error_not_a_close(vgpud: RunningDaemon) -> None:
    hook = FakeHook(vgpud)
    try:
        with pytest.raises(ClientError) as info:
            hook.attach("GPU-nope")
        assert info.value.code == "device"
        assert hook.attach()["t"] == "attached"
        with vgpud.client() as c:
            c.ctl("set", slice="test.slice", knobs={"gpu.devices": "0"})
        with pytest.raises(ClientError, match="not allowed"):
            hook.attach(FAKE_DEVICES[1].uuid)
    finally:
        hook.close()


def test_welcome_lists_the_devices_of_a_restricted_slice(vgpud: RunningDaemon) -> None:
    """A hook learns at registration which devices its slice may use (its
    CUDA and NVML views are made from it): none listed where that is every
    device of the node; the node's order whatever the knobs' order; UUIDs
    and indices both name devices; and nothing for a control connection."""
    every = FakeHook(vgpud, slice="open.slice")
    assert "devices" not in every.client.welcome
    with vgpud.client() as c:
        c.ctl("set", slice="one.slice", knobs={"gpu.devices": "1"})
        c.ctl("set", slice="both.slice", knobs={"gpu.devices": f"1,{FAKE_DEVICES[0].uuid}"})
        c.ctl("set", slice="none.slice", knobs={"gpu.devices": "7"})
        assert "devices" not in c.welcome
    one = FakeHook(vgpud, slice="one.slice/job")
    both = FakeHook(vgpud, slice="both.slice")
    none = FakeHook(vgpud, slice="none.slice")
    try:
        assert one.client.welcome["devices"] == [FAKE_DEVICES[1].uuid]
        assert "devices" not in both.client.welcome  # both of the node's: every device
        assert none.client.welcome["devices"] == []
        with pytest.raises(ClientError, match="not allowed"):
            one.attach(FAKE_DEVICES[0].uuid)
        assert one.attach(FAKE_DEVICES[1].uuid)["t"] == "attached"
    finally:
        for h in (every, one, both, none):
            h.close()


def test_silent_client_dropped_after_handshake_timeout(tmp_path: Path) -> None:
    rd, stop = start_daemon(tmp_path, handshake_timeout=0.3)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(rd.socket)
        t0 = time.monotonic()
        assert s.recv(100) == b""
        assert time.monotonic() - t0 < 2
        s.close()
        with rd.client() as c:  # the daemon is fine
            assert c.ctl("status")["simulated"] is True
    finally:
        stop()


def test_connection_cap(tmp_path: Path) -> None:
    """The node-wide bound (limits.clients): a hook past it is refused with
    an error that names it; uid 0's control connections are not, so the
    operator's vgpuctl answers on a full node."""
    if os.getuid() != 0:
        pytest.skip("the operator's allowance is uid 0's")
    rd, stop = start_daemon(tmp_path, max_connections=2)
    try:
        a, b = FakeHook(rd), FakeHook(rd)
        with pytest.raises(ClientError) as err:
            rd.client("hook")
        assert err.value.code == "limit"
        assert err.value.msg.startswith("limits.clients=2 reached: 2 connections")
        with rd.client() as root:  # uid 0, role ctl: beyond the bound
            assert len(root.ctl("status")["clients"]) == 3
            assert root.ctl("show")["gpu.clients.events"]["node"] == 1
        for x in (a, b):
            x.close()
        wait_for(lambda: rd.daemon.connections == 0)
        FakeHook(rd).close()
    finally:
        stop()


def test_set_reaches_ctl_page_within_a_second(vgpud: RunningDaemon) -> None:
    hook = FakeHook(vgpud, slice="live.slice")
    try:
        hook.attach()
        wait_for(lambda: int(hook.ctl.dev[0].flags) & lib.VGPU_DEV_ACTIVE != 0)
        assert int(hook.ctl.dev[0].mem_limit) == UNLIMITED
        with vgpud.client() as c:
            c.ctl("set", slice="live.slice", runtime=True,
                  knobs={"gpu.cores.max": "30", "gpu.memory.max": "1G"})
        # Gated from then on: free to take the idle device (TAKE).
        took = wait_for(lambda: int(hook.ctl.dev[0].mem_limit) == 1 << 30
                        and int(hook.ctl.dev[0].flags) & lib.VGPU_DEV_UNLIMITED == 0
                        and int(hook.ctl.dev[0].grant) & lib.VGPU_GRANT_STATE_MASK
                        == lib.VGPU_GRANT_TAKE, 1.0)
        assert took < 1.0
        # --runtime persisted it under <runtime_dir>/slices
        files = os.listdir(os.path.join(vgpud.runtime_dir, "slices"))
        assert any("live" in f for f in files)
    finally:
        hook.close()


def test_busy_intervals_are_charged(vgpud: RunningDaemon) -> None:
    hook = FakeHook(vgpud, slice="busy.slice")
    try:
        hook.attach()
        d = hook.stat.dev[0]
        now = time.monotonic_ns()
        for i in range(10):  # 10 x 5 ms busy, in the recent past
            start = now - 200_000_000 + i * 10_000_000
            d.ring[i].start_ns = start
            d.ring[i].end_ns = start + 5_000_000
        d.ring_head = 10

        def charged() -> bool:
            with vgpud.client() as c:
                stat = c.ctl("show", slice="busy.slice")["gpu.cores.stat"]
            return int(stat["usage_usec"]) >= 49_000

        wait_for(charged, 2.0)
        with vgpud.client() as c:
            top = c.ctl("top")
        assert top["slices"]["busy.slice"]["gpu_percent"][FAKE_DEVICES[0].uuid] > 0
    finally:
        hook.close()


def test_held_is_readmitted(vgpud: RunningDaemon) -> None:
    hook = FakeHook(vgpud, slice="back.slice",
                    held=[{"dev": FAKE_DEVICES[0].uuid, "n": 5 * MiB}])
    try:
        assert mem_current(vgpud, "back.slice") == 5 * MiB
        hook.attach()
        hook.release(0, 5 * MiB)
        wait_for(lambda: mem_current(vgpud, "back.slice") == 0)
    finally:
        hook.close()


def test_ctl_errors(vgpud: RunningDaemon) -> None:
    with vgpud.client() as c:
        with pytest.raises(ClientError) as info:
            c.ctl("show", slice="nope.slice")
        assert info.value.code == "notfound"
        with pytest.raises(ClientError) as info:
            c.ctl("set", slice="a.slice", knobs={"gpu.cores.max": "lots"})
        assert info.value.code == "invalid"
        with pytest.raises(ClientError) as info:
            c.ctl("set", slice="a.slice", knobs={"gpu.bogus": "1"})
        assert info.value.code == "invalid"
        st = c.ctl("status")
        assert [d["uuid"] for d in st["devices"]] == [d.uuid for d in FAKE_DEVICES]


def test_root_slice_is_read_only_for_knobs(vgpud: RunningDaemon) -> None:
    # As cgroup v2's root: no knobs (a clear error, nothing written), but
    # every statistic.
    with vgpud.client() as c:
        for name in ("", "-.slice"):
            for runtime in (False, True):
                with pytest.raises(ClientError) as info:
                    c.ctl("set", slice=name, runtime=runtime, knobs={"gpu.memory.max": "1G"})
                assert info.value.code == "invalid"
                assert "root slice (-.slice) takes no knobs" in str(info.value)
        show = c.ctl("show", slice="")
        assert show["knobs"]["gpu.memory.max"]["source"] == "default"
        assert "gpu.memory.events.local" in show
        assert c.ctl("events")["slices"][""]["gpu.memory.events.local"] == {
            "high": 0, "max": 0, "oom": 0}
    cfg = vgpud.daemon.cfg
    for d in (cfg.run_slices_dir, cfg.control_slices_dir):
        assert not Path(d).exists() or not list(Path(d).iterdir())


def test_set_needs_root() -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to drop privileges")
    # The peer's credentials are taken at connect(), so the child must connect
    # as nobody: the socket lives in a directory nobody can traverse.
    base = Path(tempfile.mkdtemp(prefix="vgpu-test-"))
    base.chmod(0o755)
    rd, stop = start_daemon(base)
    Path(rd.runtime_dir).chmod(0o755)
    code = (
        "import os\n"
        "from vgpu_cgroup._wire._client import Client, ClientError\n"
        "os.setgid(65534); os.setuid(65534)\n"
        f"c = Client({rd.socket!r}); c.hello('ctl')\n"
        "c.ctl('status')\n"
        "try:\n"
        "    c.ctl('set', slice='x.slice', knobs={'gpu.cores.max': '5'})\n"
        "except ClientError as e:\n"
        "    print(e.code)\n"
    )
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=30, cwd=os.path.dirname(os.path.dirname(__file__)))
        assert out.stdout.strip() == "permission", out.stderr
    finally:
        stop()
        shutil.rmtree(base)


def test_reload_keeps_old_state_on_error(vgpud: RunningDaemon) -> None:
    etc = Path(vgpud.etc_dir)
    (etc / "cfg.slice.conf").write_text('gpu.memory.max = "2G"\n')
    assert vgpud.call(vgpud.daemon.reload) is True
    with vgpud.client() as c:
        assert c.ctl("show", slice="cfg.slice")["knobs"]["gpu.memory.max"]["value"] == str(2 << 30)
    (etc / "cfg.slice.conf").write_text('gpu.memory.max = "lots"\n')
    assert vgpud.call(vgpud.daemon.reload) is False
    with vgpud.client() as c:
        assert c.ctl("show", slice="cfg.slice")["knobs"]["gpu.memory.max"]["value"] == str(2 << 30)


def test_cgroup_identity_ignores_declared_slice(tmp_path: Path) -> None:
    rd, stop = start_daemon(tmp_path, identity="cgroup")
    try:
        hook = FakeHook(rd, slice="evil.slice")
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            mine = next(ln[3:].strip("/\n") for ln in f if ln.startswith("0::"))
        assert hook.client.welcome["slice"] == mine
        hook.close()
    finally:
        stop()


def test_vgpud_without_driver_says_simulate(tmp_path: Path) -> None:
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("a real driver is present")
    out = subprocess.run(
        [sys.executable, "-m", "vgpu_cgroup._daemon_main", "--runtime-dir", str(tmp_path),
         "--etc-dir", str(tmp_path / "etc")],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "--simulate" in out.stderr


@requires_sim
def test_vgpud_process_simulated_and_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vgpu_cgroup._daemon_main", "--simulate",
         "--runtime-dir", str(tmp_path), "--etc-dir", str(tmp_path / "etc"),
         "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == f"vgpud: listening on {tmp_path / 'vgpud.sock'}"
        with Client(str(tmp_path / "vgpud.sock")) as c:
            c.hello("ctl")
            st = c.ctl("status")
        assert st["simulated"] is True
        assert st["devices"]
        proc.send_signal(signal.SIGHUP)  # reload: no slice files, still serving
        with Client(str(tmp_path / "vgpud.sock")) as c:
            c.hello("ctl")
            assert c.ctl("tree")["slice"] == ""
        proc.terminate()
        assert proc.wait(10) == 0
        assert not (tmp_path / "vgpud.sock").exists()
    finally:
        proc.kill()
        proc.wait()


def test_raw_msgpack_hello_roundtrip(vgpud: RunningDaemon) -> None:
    """A hook written from protocol.md alone (no vgpu imports) gets welcomed."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(vgpud.socket)
    body = msgpack.packb({"t": "hello", "v": 1, "role": "hook", "pid": os.getpid(),
                          "comm": "raw", "slice": "raw.slice"})
    s.sendall(struct.pack(">I", len(body)) + body)
    data, anc, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(8))
    fds = [fd for _, _, cd in anc for fd in struct.unpack(f"{len(cd) // 4}i", cd)]
    assert len(fds) == 2
    (n,) = struct.unpack(">I", data[:4])
    assert msgpack.unpackb(data[4 : 4 + n])["t"] == "welcome"
    for fd in fds:
        os.close(fd)
    s.close()


def test_grant_publishes_the_tightest_view_at_once(vgpud: RunningDaemon) -> None:
    """The reply to a reservation leaves after the client's memory view is
    written: cuMemGetInfo right after an allocation sees it, for the
    tightest slice on the path (here the parent, with less headroom)."""
    with vgpud.client() as c:
        c.ctl("set", slice="view.slice", runtime=True, knobs={"gpu.memory.max": "64M"})
        c.ctl("set", slice="view.slice/leaf", runtime=True, knobs={"gpu.memory.max": "1G"})
    other = FakeHook(vgpud, slice="view.slice")
    hook = FakeHook(vgpud, slice="view.slice/leaf")
    try:
        other.attach()
        hook.attach()
        assert other.reserve(0, 8 * MiB)["t"] == "granted"
        assert hook.reserve(0, 4 * MiB)["t"] == "granted"
        assert int(hook.ctl.dev[0].mem_limit) == 64 * MiB
        assert int(hook.ctl.dev[0].mem_used) == mem_current(vgpud, "view.slice")
        assert hook.reserve(0, 2 * MiB)["t"] == "granted"
        assert int(hook.ctl.dev[0].mem_used) == mem_current(vgpud, "view.slice")
        # A release is published with the next grant at the latest (the
        # hook sends them together), and on its own right after its read.
        hook.release(0, 4 * MiB)
        assert hook.reserve(0, 1 * MiB)["t"] == "granted"
        assert int(hook.ctl.dev[0].mem_used) == mem_current(vgpud, "view.slice") == 11 * MiB
        hook.release(0, 3 * MiB)
        wait_for(lambda: int(hook.ctl.dev[0].mem_used) == 8 * MiB)
    finally:
        hook.close()
        other.close()
