"""libvgpu-hook.so against a scripted daemon (tests/programs/hookpeer.py) on
the simulated GPU: registration, every allocation path, denial, info
clamping, the launch gate, measured intervals, interposition, on_no_daemon,
fork and reconnect.

Each test runs real programs under LD_PRELOAD with their own VGPU_SIM_SHM,
so the simulated device is private to the test.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "programs"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _e2e import HOOK, ROOT, SIMDIR, JsonLines, build, build_c
from hookpeer import Peer, wait_until
from vgpu_cgroup._wire._abi import lib

MB = 1 << 20
_n = itertools.count()


@pytest.fixture(scope="session")
def bins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    build()
    out = tmp_path_factory.mktemp("hookbin")
    return {
        "client_basic": build_c("client_basic", out),
        "hook_allocs": build_c("hook_allocs", out),
        "hook_interpose": build_c("hook_interpose", out, link_cuda=False),
        "busy_client": build_c("busy_client", out),
        "devices": build_c("devices", out),
    }


@pytest.fixture
def sock(tmp_path: Path) -> str:
    # sun_path is short: keep it under /tmp
    return f"/tmp/vgpu-hook-test-{os.getpid()}-{next(_n)}.sock"


@pytest.fixture
def peer(sock: str) -> Iterator[Peer]:
    p = Peer(sock)
    yield p
    p.close()


def env(sock: str, tmp: Path, **extra: str) -> dict[str, str]:
    conf = tmp / "hook.conf"
    if not conf.exists():
        conf.write_text("connect_timeout_ms=300\n")
    e = dict(os.environ)
    e.update({"LD_PRELOAD": str(HOOK), "LD_LIBRARY_PATH": str(SIMDIR),
              "VGPU_SIM_SHM": f"vgpu-hooktest-{os.getpid()}-{next(_n)}",
              "VGPU_SOCKET": sock, "VGPU_HOOK_CONF": str(conf)})
    e.update(extra)
    return e


def run(cmd: list[str], e: dict[str, str], timeout: float = 30) -> tuple[dict[str, Any], str]:
    p = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON from {cmd}: rc={p.returncode} out={p.stdout!r} err={p.stderr!r}"
    return json.loads(lines[-1]), p.stderr


def msgs(peer: Peer, t: str, conn: int = 0) -> list[dict[str, Any]]:
    return [m for m in peer.conns[conn].msgs if m.get("t") == t]


def test_registration_reserve_release_and_launch_counts(
        bins: dict[str, Path], peer: Peer, sock: str, tmp_path: Path) -> None:
    out, err = run([str(bins["client_basic"]), "50", "20000", str(1 * MB), str(2 * MB)],
                   env(sock, tmp_path))
    assert out["init_rc"] == 0, err
    assert out["ctx_rc"] == 0
    assert out["alloc_rc"] == [0, 0]
    assert out["launched"] == 50
    assert out["sync_rc"] == 0
    c = peer.wait_conn()
    hello = c.msgs[0]
    assert hello["role"] == "hook"
    assert hello["v"] == 1
    assert hello["pid"] == out["pid"]
    peer.wait_for(lambda: c.closed)
    att = msgs(peer, "attach")
    assert len(att) == 1
    assert att[0]["dev"].startswith("GPU-")
    assert len(att[0]["dev"]) == 40
    assert [m["n"] for m in msgs(peer, "reserve")] == [1 * MB, 2 * MB]
    assert sorted(m["n"] for m in msgs(peer, "release")) == [1 * MB, 2 * MB]
    assert c.used[0] == 0
    assert c.stat(0, "launches") == 50
    assert c.stat(0, "allocs") == 2
    assert c.stat(0, "frees") == 2
    assert "vgpu:" not in err


@pytest.mark.parametrize("driver", ["sim", "reentering"])
def test_every_allocation_path_is_reserved_and_released(
        bins: dict[str, Path], peer: Peer, sock: str, tmp_path: Path, driver: str) -> None:
    # reentering: a driver whose managed and stream-ordered allocations and
    # frees call cuMemAlloc_v2/cuMemFree_v2 by name (tests/c/reenter_driver.c),
    # which lands on the hook again: the re-entry guard passes the inner
    # call through, so each allocation is reserved and released once.
    extra: dict[str, str] = {}
    if driver == "reentering":
        shim = tmp_path / "reenter_driver.so"
        subprocess.run(["cc", "-std=gnu11", "-O1", "-Wall", "-Wextra", "-Werror", "-shared",
                        "-fPIC", f"-I{ROOT / 'libhook' / 'include'}",
                        str(ROOT / "tests" / "c" / "reenter_driver.c"), "-o", str(shim),
                        f"-L{SIMDIR}", "-l:libcuda.so.1"], check=True)
        extra["VGPU_REAL_LIBCUDA"] = str(shim)
    out, err = run([str(bins["hook_allocs"])], env(sock, tmp_path, **extra))
    assert out["init"] == 0, err
    assert all(rc == 0 for rc in out["rc"]), (out, err)
    c = peer.wait_conn()
    peer.wait_for(lambda: c.closed)
    res = [m["n"] for m in msgs(peer, "reserve")]
    rel = [m["n"] for m in msgs(peer, "release")]
    pitch, gran = out["pitch"], out["gran"]
    mip = sum(max(64 >> i, 1) * max(32 >> i, 1) * max(8 >> i, 1) * 2 for i in range(3))
    expected = [1 * MB, pitch * 100, 2 * MB, 256 * 64 * 16, 64 * 32 * 8 * 2, mip, 2 * gran,
                3 * MB, 4 * MB]
    # The pitch path reserves an estimate (width rounded up to 512) and
    # settles the difference once the driver says the pitch; the simulated
    # driver's pitch is that estimate, so there is nothing to settle here.
    assert pitch == 1024
    assert res == expected
    assert sorted(rel) == sorted(expected)
    assert c.used[0] == 0
    assert c.stat(0, "allocs") == 9
    assert c.stat(0, "frees") == 9


def test_denied_allocation_and_clamped_info(bins: dict[str, Path], sock: str,
                                            tmp_path: Path) -> None:
    p = Peer(sock, mem_limit=3 * MB)
    try:
        out, err = run([str(bins["client_basic"]), "1", "1000", str(2 * MB), str(2 * MB)],
                       env(sock, tmp_path))
        assert out["alloc_rc"] == [0, 2], (out, err)  # CUDA_ERROR_OUT_OF_MEMORY
        assert out["mem_total"] == 3 * MB
        assert out["dev_total"] == 3 * MB
        assert out["mem_free"] == 1 * MB
        c = p.wait_conn()
        p.wait_for(lambda: c.closed)
        assert [m["n"] for m in msgs(p, "reserve")] == [2 * MB, 2 * MB]
        assert [m["n"] for m in msgs(p, "release")] == [2 * MB]
        assert c.stat(0, "allocs") == 1
    finally:
        p.close()


def test_gate_blocks_until_the_device_is_granted(bins: dict[str, Path], sock: str,
                                                 tmp_path: Path) -> None:
    p = Peer(sock, unlimited=False, grant=lib.VGPU_GRANT_WAIT)
    try:
        proc = subprocess.Popen([str(bins["client_basic"]), "5", "1000"], env=env(sock, tmp_path),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        c = p.wait_conn()
        p.wait_for(lambda: bool(c.slots))
        time.sleep(0.4)
        assert proc.poll() is None, "launch ran without the device"
        assert c.stat(0, "launches") == 0
        # It asked for the device once, and the daemon's heartbeat keeps it
        # waiting (no stall).
        assert [m["slot"] for m in msgs(p, "want")] == [0]
        c.beat(1)
        c.set_dev(0, grant=lib.VGPU_GRANT_RUN)
        stdout, stderr = proc.communicate(timeout=10)
        out = json.loads(stdout.strip().splitlines()[-1])
        assert out["launched"] == 5, stderr
        assert c.stat(0, "launches") == 5
        assert c.stat(0, "nr_throttled") == 1
        assert c.stat(0, "throttled_ns") >= 300_000_000
    finally:
        p.close()


def test_take_launches_at_once_and_says_so_once(bins: dict[str, Path], sock: str,
                                                tmp_path: Path) -> None:
    """TAKE: the daemon pre-approved this process (it would hand the device
    over the moment it asked): launches do not wait, and it asks once."""
    p = Peer(sock, unlimited=False, grant=lib.VGPU_GRANT_TAKE)
    try:
        out, err = run([str(bins["client_basic"]), "20", "100000"], env(sock, tmp_path))
        assert out["launched"] == 20, err
        c = p.wait_conn()
        assert [m["slot"] for m in msgs(p, "want")] == [0]
        assert c.stat(0, "nr_throttled") == 0
    finally:
        p.close()


def test_drained_owner_says_idle_then_want_again(bins: dict[str, Path], sock: str,
                                                 tmp_path: Path) -> None:
    """An owner whose work drained tells the daemon (so the device can go to
    someone else), and says `want` again with its next launch."""
    p = Peer(sock, unlimited=False)
    proc = subprocess.Popen([str(bins["busy_client"]), "threads", "1", "10"],
                            env=env(sock, tmp_path), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        assert json.loads(proc.stdout.readline())["phase"] == "done"
        # Synchronized and quiet: `idle` follows within the accountant's bound.
        assert wait_until(lambda: bool(msgs(p, "idle")), timeout=3)
        assert [m["t"] for m in p.conns[0].msgs if m.get("t") in ("want", "idle")] == \
            ["want", "idle"]
    finally:
        proc.communicate("x\n", timeout=10)
        p.close()


def test_launch_waits_no_longer_than_the_stall_bound(bins: dict[str, Path], sock: str,
                                                     tmp_path: Path) -> None:
    """A daemon that is connected but no longer ticks (stopped, wedged) never
    hangs a launch: without its heartbeat the launch runs after the bound."""
    p = Peer(sock, unlimited=False, grant=lib.VGPU_GRANT_WAIT)
    try:
        t0 = time.monotonic()
        out, err = run([str(bins["client_basic"]), "3", "1000"], env(sock, tmp_path))
        took = time.monotonic() - t0
        assert out["launched"] == 3, err
        assert 2.0 <= took < 10.0, took
        assert "has not answered" in err
        assert p.conns[0].stat(0, "nr_throttled") >= 1
    finally:
        p.close()


@pytest.mark.parametrize("how", ["1", "unseen"])
def test_abandoned_capture_does_not_pause_measurement(bins: dict[str, Path], peer: Peer,
                                                      sock: str, tmp_path: Path,
                                                      how: str) -> None:
    """A capture that ends without the hooked EndCapture (its stream destroyed,
    even through an entry point the hook does not intercept) leaves no count
    behind: measurement, which pauses during captures, goes on at once, and
    launches stop paying for the capture query."""
    proc = subprocess.Popen([str(bins["client_basic"]), "10", "1000000"],
                            env=env(sock, tmp_path, CLIENT_ABANDON_CAPTURE=how,
                                    CLIENT_HOLD_MS="3000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        c = peer.wait_conn()
        # 10 ms of kernels are published long before the 5 s pause bound.
        assert wait_until(lambda: c.stat(0, "busy_ns") >= 9_000_000, timeout=2)
    finally:
        out, err = proc.communicate(timeout=15)
    assert json.loads(out.splitlines()[-1])["launched"] == 10, err


def test_intervals_match_kernel_durations(bins: dict[str, Path], peer: Peer, sock: str,
                                          tmp_path: Path) -> None:
    t0 = time.monotonic_ns()
    out, err = run([str(bins["client_basic"]), "20", "2000000"], env(sock, tmp_path))
    t1 = time.monotonic_ns()
    assert out["launched"] == 20, err
    c = peer.wait_conn()
    # the accountant publishes within a few ms of completion, before exit
    assert wait_until(lambda: c.stat(0, "busy_ns") >= 36_000_000, timeout=2)
    busy = c.stat(0, "busy_ns")
    # 20 x 2 ms of kernels, plus the simulated launch gaps between them
    assert 38_000_000 <= busy <= 70_000_000, busy
    ivs = c.intervals(0)
    assert ivs
    assert all(t0 <= s <= e <= t1 for s, e in ivs), (ivs, t0, t1)
    assert sum(e - s for s, e in ivs) == busy


def test_dlsym_and_get_proc_address_return_hooks(bins: dict[str, Path], peer: Peer, sock: str,
                                                 tmp_path: Path) -> None:
    e = env(sock, tmp_path)
    out, err = run([str(bins["hook_interpose"])], e)
    assert out["gpa1:cuMemAlloc"] == "libvgpu-hook.so:cuMemAlloc_v2"
    assert "vgpu:" not in err  # no "entry point the hook does not know"
    assert out["dlsym:cuMemAlloc_v2"] == "libvgpu-hook.so:cuMemAlloc_v2"
    assert out["dlsym:cuDeviceGetCount"] == "libcuda.so.1:cuDeviceGetCount"
    assert out["gpa:cuGetProcAddress"] == "libvgpu-hook.so:cuGetProcAddress_v2"
    assert out["gpa:cuLaunchKernel"] == "libvgpu-hook.so:cuLaunchKernel"
    assert out["gpa_ptsz:cuLaunchKernel"] == "libvgpu-hook.so:cuLaunchKernel_ptsz"
    assert out["gpa_ptsz:cuGraphLaunch"] == "libvgpu-hook.so:cuGraphLaunch_ptsz"
    assert out["gpa:cuMemAlloc"] == "libvgpu-hook.so:cuMemAlloc_v2"
    assert out["gpa_ptsz:cuMemAllocAsync"] == "libvgpu-hook.so:cuMemAllocAsync_ptsz"
    assert out["gpa:cuMemGetInfo"] == "libvgpu-hook.so:cuMemGetInfo_v2"
    assert out["gpa:cuDeviceGetCount"] == "libcuda.so.1:cuDeviceGetCount"


@pytest.mark.parametrize("how", ["dlvsym", "symbol-table", "sysv-next"])
def test_real_dlsym_is_found_without_version_names(bins: dict[str, Path], peer: Peer, sock: str,
                                                   tmp_path: Path, how: str) -> None:
    # The exported dlsym must find the C library's dlsym on any glibc and
    # architecture. symbol-table: a hook built to skip dlvsym and its
    # version names, so the lookup through the link map's symbol tables
    # (what an architecture or glibc with unknown version names gets) is
    # the only way: every lookup must still work. sysv-next: the same hook
    # with another dlsym interposer preloaded after it, linked with a SysV
    # hash table only: that one is next, as for RTLD_NEXT.
    hook = HOOK
    elf_only = how != "dlvsym"
    preload = []
    if how == "sysv-next":
        nxt = tmp_path / "dlsym_next.so"
        subprocess.run(["cc", "-std=gnu11", "-O1", "-Wall", "-Wextra", "-Werror", "-D_GNU_SOURCE",
                        "-shared", "-fPIC", "-Wl,--hash-style=sysv",
                        str(ROOT / "tests" / "c" / "dlsym_next.c"), "-o", str(nxt), "-ldl"],
                       check=True)
        dyn = subprocess.run(["readelf", "-d", str(nxt)], capture_output=True, text=True,
                             check=True).stdout
        assert "(HASH)" in dyn
        assert "GNU_HASH" not in dyn
        preload = [str(nxt)]
    if elf_only:
        out_dir = tmp_path / "elf-only"
        subprocess.run(["make", "-s", "-C", str(ROOT / "libhook"), "hook", f"LIBOUT={out_dir}",
                        "HOOK_EXTRA_CFLAGS=-DVGPU_DLSYM_ELF_ONLY"], check=True)
        hook = out_dir / "libvgpu-hook.so"
        nm = subprocess.run(["nm", "-D", str(hook)], capture_output=True, text=True, check=True)
        assert "dlvsym" not in nm.stdout
    e = env(sock, tmp_path, LD_PRELOAD=":".join([str(hook), *preload]), VGPU_DEBUG="getproc")
    out, err = run([str(bins["hook_interpose"])], e)
    assert out["dlsym:cuMemAlloc_v2"] == "libvgpu-hook.so:cuMemAlloc_v2"
    assert out["dlsym:cuDeviceGetCount"] == "libcuda.so.1:cuDeviceGetCount"
    assert out["dlsym:cuGetProcAddress_v2"] == "libvgpu-hook.so:cuGetProcAddress_v2"
    assert out["gpa:cuLaunchKernel"] == "libvgpu-hook.so:cuLaunchKernel"
    found = [ln for ln in err.splitlines() if "real dlsym found by" in ln]
    assert found, err
    if how == "sysv-next":
        assert all("the symbol table of" in ln and "dlsym_next.so" in ln for ln in found), found
        assert "dlsym_next: called" in err
    elif elf_only:
        # glibc 2.34 and later: libc.so.6; before: libdl.so.2
        assert all("the symbol table of" in ln for ln in found), found
        assert all("libc.so" in ln or "libdl.so" in ln for ln in found), found
    else:
        assert all("dlvsym(dlsym, GLIBC_" in ln for ln in found), found
    assert "cannot find the C library's dlsym" not in err


@pytest.mark.parametrize("elf_only", [False, True], ids=["dlvsym", "symbol-table"])
def test_rtld_next_answers_as_without_the_hook(sock: str, tmp_path: Path, elf_only: bool) -> None:
    # dlsym(RTLD_NEXT) from the program and from a plugin it dlopened (whose
    # libc comes before it in the link map) gets what it gets without the
    # hook. It crashed in glibc when the hook passed a preloaded library's
    # link map to dlsym as if it were a handle.
    plugin = tmp_path / "rtld_next_plugin.so"
    exe = tmp_path / "rtld_next"
    cc = ["cc", "-std=gnu11", "-O1", "-Wall", "-Wextra", "-Werror", "-D_GNU_SOURCE"]
    subprocess.run([*cc, "-shared", "-fPIC", str(ROOT / "tests" / "c" / "rtld_next_plugin.c"),
                    "-o", str(plugin), "-ldl"], check=True)
    subprocess.run([*cc, str(ROOT / "tests" / "c" / "rtld_next.c"), "-o", str(exe), "-ldl"],
                   check=True)
    hook = HOOK
    if elf_only:
        out_dir = tmp_path / "elf-only"
        subprocess.run(["make", "-s", "-C", str(ROOT / "libhook"), "hook", f"LIBOUT={out_dir}",
                        "HOOK_EXTRA_CFLAGS=-DVGPU_DLSYM_ELF_ONLY"], check=True)
        hook = out_dir / "libvgpu-hook.so"
    plain, _ = run([str(exe), str(plugin)], {k: v for k, v in os.environ.items()
                                             if k != "LD_PRELOAD"})
    hooked, err = run([str(exe), str(plugin)], env(sock, tmp_path, LD_PRELOAD=str(hook)))
    assert plain["main:puts"] == "libc.so.6:puts"
    assert plain["plugin:malloc"] == "libc.so.6:malloc"
    # The one known difference: the public link map does not say which
    # objects are in the global scope, so an object dlopened RTLD_LOCAL
    # after the program is searched too (found, where glibc says NULL).
    assert plain.pop("main:plugin_next") == "null:null"
    assert hooked.pop("main:plugin_next") == "rtld_next_plugin.so:plugin_next"
    assert hooked == plain, err


@pytest.mark.parametrize("ptsz", [False, True])
def test_ctypes_client_through_get_proc_address(bins: dict[str, Path], peer: Peer, sock: str,
                                                tmp_path: Path, ptsz: bool) -> None:
    cmd = [sys.executable, str(ROOT / "tests" / "programs" / "ctypes_client.py"),
           "30", "100000", str(MB)]
    out, err = run(cmd + (["--ptsz"] if ptsz else []), env(sock, tmp_path))
    assert out["launched"] == 30, err
    assert out["alloc_rc"] == [0]
    c = peer.wait_conn()
    peer.wait_for(lambda: c.closed)
    assert c.stat(0, "launches") == 30
    assert [m["n"] for m in msgs(peer, "reserve")] == [MB]
    assert [m["n"] for m in msgs(peer, "release")] == [MB]
    assert c.stat(0, "busy_ns") >= 2_000_000


@pytest.mark.parametrize("policy", ["fail", "unlimited"])
def test_on_no_daemon(bins: dict[str, Path], tmp_path: Path, policy: str) -> None:
    conf = tmp_path / "hook.conf"
    conf.write_text(f"on_no_daemon={policy}\nconnect_timeout_ms=50\n")
    out, err = run([str(bins["client_basic"]), "3", "1000", str(MB)],
                   env(str(tmp_path / "nobody.sock"), tmp_path))
    lines = [ln for ln in err.splitlines() if ln.startswith("vgpu:")]
    assert len(lines) == 1, err
    assert "cannot reach vgpud" in lines[0]
    assert str(conf) in lines[0]
    if policy == "fail":
        assert out["init_rc"] == 3  # CUDA_ERROR_NOT_INITIALIZED
        assert "refusing CUDA" in lines[0]
    else:
        assert out["init_rc"] == 0
        assert out["launched"] == 3
        assert out["alloc_rc"] == [0]
        assert "WITHOUT limits" in lines[0]


def test_fork_child_registers_as_its_own_client(bins: dict[str, Path], peer: Peer, sock: str,
                                                tmp_path: Path) -> None:
    code = r"""
import ctypes, os, json, sys
cuda = ctypes.CDLL("libcuda.so.1")
u64 = ctypes.c_uint64
assert cuda.cuInit(0) == 0
dev = ctypes.c_int(0); ctx = ctypes.c_void_p()
cuda.cuDeviceGet(ctypes.byref(dev), 0)
assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0
cuda.cuCtxSetCurrent(ctx)
p = u64(); assert cuda.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(1 << 20)) == 0
pid = os.fork()
if pid == 0:
    q = u64()
    rc = cuda.cuMemAlloc_v2(ctypes.byref(q), ctypes.c_size_t(3 << 20))
    os._exit(0)
os.waitpid(pid, 0)
print(json.dumps({"child": pid, "parent": os.getpid()}))
"""
    out, err = run([sys.executable, "-c", code], env(sock, tmp_path))
    peer.wait_for(lambda: len(peer.conns) >= 2)
    pids = {c.pid for c in peer.conns}
    assert pids == {out["child"], out["parent"]}, err
    child = next(c for c in peer.conns if c.pid == out["child"])
    parent = next(c for c in peer.conns if c.pid == out["parent"])
    peer.wait_for(lambda: child.closed and parent.closed)
    # Like the real driver, the simulated one refuses CUDA in a forked child;
    # what matters is that the child is its own client, holding nothing of
    # the parent's, and that the parent's accounting is untouched.
    assert "held" not in child.msgs[0]
    assert not [m for m in child.msgs if m.get("t") == "release"]
    assert [m["n"] for m in parent.msgs if m.get("t") == "reserve"] == [1 << 20]
    assert parent.stat(0, "allocs") == 1


def test_reconnect_declares_held_memory(bins: dict[str, Path], sock: str, tmp_path: Path) -> None:
    p = Peer(sock)
    proc = subprocess.Popen([str(bins["client_basic"]), "1", "1000", str(5 * MB)],
                            env=env(sock, tmp_path, CLIENT_HOLD_MS="3000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        c = p.wait_conn()
        p.wait_for(lambda: bool(msgs(p, "reserve")))
        p.close()  # the daemon "restarts"
        time.sleep(0.2)
        p2 = Peer(sock)
        try:
            c2 = p2.wait_conn(timeout=5)
            assert c2.msgs[0]["held"] == [{"dev": msgs(p, "attach")[0]["dev"], "n": 5 * MB}]
            p2.wait_for(lambda: bool(c2.slots))  # re-attached
            stdout, stderr = proc.communicate(timeout=10)
            out = json.loads(stdout.strip().splitlines()[-1])
            assert out["alloc_rc"] == [0], stderr
            assert out["free_rc"] == 0
            p2.wait_for(lambda: c2.closed)
            assert [m["n"] for m in c2.msgs if m.get("t") == "release"] == [5 * MB]
        finally:
            p2.close()
        assert c.used[0] == 5 * MB
    finally:
        if proc.poll() is None:
            proc.kill()


def test_refused_device_fails_context_creation(bins: dict[str, Path], sock: str,
                                               tmp_path: Path) -> None:
    # learn the simulated device's uuid from a first run, then refuse it
    e = env(sock, tmp_path)  # one simulated device (its uuid depends on the shm)
    p = Peer(sock)
    try:
        run([str(bins["client_basic"]), "0", "0"], e)
        slots = p.wait_conn().slots
        assert len(slots) == 1
        uuid = next(iter(slots))
    finally:
        p.close()
    p = Peer(sock, refuse=(uuid,))
    try:
        out, err = run([str(bins["client_basic"]), "1", "1000", str(MB)], e)
        assert out["ctx_rc"] == 101, err  # CUDA_ERROR_INVALID_DEVICE
        assert "refused device" in err
    finally:
        p.close()


def test_welcome_device_list_is_read_defensively(bins: dict[str, Path], sock: str,
                                                 tmp_path: Path) -> None:
    """The welcome's list of the slice's devices makes the program's view
    (tests/test_e2e_devices.py has the real daemon's): entries the hook
    cannot use are left out, with one line on stderr, and a list that is
    not a list restricts nothing."""
    e = env(sock, tmp_path, VGPU_SIM_DEVICES="2")
    p = Peer(sock)
    try:
        every, _ = run([str(bins["devices"])], e)
        assert every["count"] == 2
        p.devices = [7, "GPU-" + "f" * 60, every["uuids"][1]]
        one, err = run([str(bins["devices"]), "ctx=0", f"alloc={MB}"], e)
        assert one["uuids"] == [every["uuids"][1]]
        assert [d["uuid"] for d in one["nvml"]["devices"]] == [every["uuids"][1]]
        assert one["ctx"][0]["alloc"] == 0
        assert [m["dev"] for m in msgs(p, "attach", len(p.conns) - 1)] == [every["uuids"][1]]
        assert "2 of the 3 entries in the daemon's list of this slice's devices" in err
        p.devices = "all of them"
        again, _ = run([str(bins["devices"])], e)
        assert again["uuids"] == every["uuids"]
    finally:
        p.close()


# ---- the in-flight limit and the batch pool (issue 4) ----

# Launches N kernels of K ns, one by one, and after each one asks the
# simulated device how much of this process's work it has run: launched work
# minus run work is what the process has in flight. Prints the largest value.
_INFLIGHT_PROBE = r"""
import ctypes, json, sys
n, k, watch = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
cuda = ctypes.CDLL("libcuda.so.1")
assert cuda.cuInit(0) == 0
dev = ctypes.c_int(0); ctx = ctypes.c_void_p()
cuda.cuDeviceGet(ctypes.byref(dev), 0)
assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0
cuda.cuCtxSetCurrent(ctx)
mod = ctypes.c_void_p(); fn = ctypes.c_void_p()
assert cuda.cuModuleLoadData(ctypes.byref(mod), b"vgpu-sim") == 0
assert cuda.cuModuleGetFunction(ctypes.byref(fn), mod, b"sim_sleep_ns") == 0
ns = ctypes.c_uint64(k)
params = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.byref(ns), ctypes.c_void_p))
busy, mem = ctypes.c_uint64(), ctypes.c_uint64()
cuda.vgpuSimProcessStats(0, ctypes.byref(busy), ctypes.byref(mem))
b0 = busy.value
worst = 0
for i in range(n):
    assert cuda.cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, None, params, None) == 0
    if watch:
        cuda.vgpuSimProcessStats(0, ctypes.byref(busy), ctypes.byref(mem))
        worst = max(worst, (i + 1) * k - (busy.value - b0))
assert cuda.cuCtxSynchronize() == 0
cuda.vgpuSimProcessStats(0, ctypes.byref(busy), ctypes.byref(mem))
print(json.dumps({"launched": n, "max_inflight_ns": worst, "sim_busy_ns": busy.value - b0}))
"""

INFLIGHT_NS = 5_000_000  # VGPU_INFLIGHT_NS in hook_base.h


def _probe(sock: str, tmp_path: Path, n: int, k: int, *,
           watch: bool = True) -> tuple[dict[str, Any], str]:
    # watch=False: launch back to back (asking the device after each launch
    # is slower than a short kernel, and leaves it idle between launches).
    return run([sys.executable, "-c", _INFLIGHT_PROBE, str(n), str(k), "1" if watch else "0"],
               env(sock, tmp_path), timeout=60)


def test_inflight_limit_holds_for_a_gated_client(sock: str, tmp_path: Path) -> None:
    # Budget held constant and positive: only the in-flight limit stops the
    # client from queueing all 60 x 2 ms at once.
    p = Peer(sock, unlimited=False)
    try:
        k, n = 2_000_000, 60
        out, err = _probe(sock, tmp_path, n, k)
        assert "vgpu:" not in err, err
        # At most max(2, 5 ms / cost) launches, 5 while the cost is
        # unmeasured (1 ms assumed), plus the one racing the check: without
        # the limit it would be all 120 ms.
        first = INFLIGHT_NS // 1_000_000
        bound = (max(first, 2, INFLIGHT_NS // k) + 1) * k
        assert out["max_inflight_ns"] <= bound, out
        c = p.wait_conn()
        p.wait_for(lambda: c.closed)
        assert c.stat(0, "launches") == n
        # waiting for in-flight room is not waiting for budget
        assert c.stat(0, "nr_throttled") == 0
        assert c.stat(0, "throttled_ns") == 0
        # every launch measured: the hook's busy time covers the device's
        busy = c.stat(0, "busy_ns")
        assert out["sim_busy_ns"] * 0.97 <= busy <= out["sim_busy_ns"] * 1.3, (busy, out)
    finally:
        p.close()


def test_unlimited_client_is_not_inflight_limited(peer: Peer, sock: str, tmp_path: Path) -> None:
    k, n = 2_000_000, 60
    out, err = _probe(sock, tmp_path, n, k)
    assert "vgpu:" not in err, err
    # nothing holds it back: most of the 120 ms is queued at once
    assert out["max_inflight_ns"] >= 60_000_000, out


_HOLD_PROBE = r"""
import ctypes, json, sys, time
n, k = int(sys.argv[1]), int(sys.argv[2])
cuda = ctypes.CDLL("libcuda.so.1")
assert cuda.cuInit(0) == 0
dev = ctypes.c_int(0); ctx = ctypes.c_void_p()
cuda.cuDeviceGet(ctypes.byref(dev), 0)
assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0
cuda.cuCtxSetCurrent(ctx)
mod = ctypes.c_void_p(); fn = ctypes.c_void_p()
assert cuda.cuModuleLoadData(ctypes.byref(mod), b"vgpu-sim") == 0
assert cuda.cuModuleGetFunction(ctypes.byref(fn), mod, b"sim_sleep_ns") == 0
ns = ctypes.c_uint64(k)
params = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.byref(ns), ctypes.c_void_p))
for _ in range(3):  # let the hook learn the cost per launch
    for _ in range(4):
        assert cuda.cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, None, params, None) == 0
    assert cuda.cuCtxSynchronize() == 0
    time.sleep(0.05)
print(json.dumps({"phase": "warm"}), flush=True)
sys.stdin.readline()
t = []
for i in range(n):
    assert cuda.cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, None, params, None) == 0
    t.append(time.monotonic_ns())
assert cuda.cuCtxSynchronize() == 0
print(json.dumps({"returned": t}), flush=True)
"""


def test_hold_launches_only_what_runs_before_its_end(sock: str, tmp_path: Path) -> None:
    """HOLD: the owner's hook launches only what its estimate of its queue
    says will have run by the hold's end, then waits until the hold's
    `until` (or a new grant), then launches freely."""
    p = Peer(sock, unlimited=False)
    k, n = 2_000_000, 40
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_PROBE, str(n), str(k)],
                            env=env(sock, tmp_path), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        assert json.loads(proc.stdout.readline())["phase"] == "warm"
        c = p.wait_conn()
        go = time.monotonic_ns()
        end, until = go + 20_000_000, go + 300_000_000
        c.set_dev(0, hold_end_ns=end, hold_until_ns=until, grant=lib.VGPU_GRANT_HOLD)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out = json.loads(proc.stdout.readline())
        ret = out["returned"]
        assert len(ret) == n
        early = [r for r in ret if r < until]
        # What was launched before `until` fits before `end` by the hook's
        # estimate (cost learned: 2 ms a launch), give or take one launch;
        # it did not stop far short of it either.
        assert len(early) * k <= end - go + k, (len(early), (end - go) // k)
        assert len(early) >= 4, len(early)
        # The rest waited for `until` (not for the queue), then ran.
        assert len(early) < n
        assert ret[len(early)] - early[-1] >= (until - end) // 2
        assert c.stat(0, "nr_throttled") >= 1
    finally:
        proc.communicate("", timeout=30)
        p.close()


@pytest.mark.parametrize("unlimited", [True, False])
def test_burst_is_fully_measured(sock: str, tmp_path: Path, unlimited: bool) -> None:
    # 2000 launches back to back: far more than 16 batches of 64 can hold
    # while the device works through them. No launch may go unmeasured.
    p = Peer(sock, unlimited=unlimited)
    try:
        k, n = 50_000, 2000
        out, err = _probe(sock, tmp_path, n, k, watch=False)
        assert "vgpu:" not in err, err
        c = p.wait_conn()
        p.wait_for(lambda: c.closed)
        assert c.stat(0, "launches") == n
        busy = c.stat(0, "busy_ns")
        assert out["sim_busy_ns"] * 0.97 <= busy <= out["sim_busy_ns"] * 1.3, (busy, out)
    finally:
        p.close()


# ---- the hook never stalls its program behind the daemon (issue 16) ----


@pytest.mark.parametrize("reads", [False, True], ids=["reads-no-answers", "reads-nothing"])
def test_frees_never_wait_behind_a_hung_round_trip(sock: str, tmp_path: Path, reads: bool) -> None:
    # One thread's reservation waits on a daemon that does not answer (it
    # would for 30 s); the program's frees meanwhile must return at once.
    # reads-nothing is a SIGSTOPped daemon: its socket fills after a few
    # hundred releases, and the rest must wait in the hook, not the program,
    # and reach the daemon once it reads again, on the same connection.
    exe = build_c("free_stall", tmp_path)
    # Enough frees to fill the socket's send buffer whatever its size: a
    # frame takes at least ~600 bytes of it (the kernel's skb overhead).
    wmem = int(Path("/proc/sys/net/core/wmem_default").read_text())
    nsmall, small = max(3000, wmem // 300), 4096
    p = Peer(sock)
    proc = subprocess.Popen([str(exe), str(nsmall), str(small)], env=env(sock, tmp_path),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = JsonLines(proc)
        assert lines.next(30) == {"ready": 1, "alloc_err": 0}
        c = p.wait_conn()
        p.stall(reads=reads)
        lines.say()
        assert lines.next(10) == {"blocked": 1}
        p.wait_for(lambda: len(msgs(p, "reserve")) == nsmall + 2)  # the late one arrived
        lines.say()
        freed = lines.next(20)  # before the fix: the first free waits 30 s
        assert (freed["freed"], freed["free_err"]) == (nsmall + 1, 0)
        # "at once": far below the 30 s a round trip may take, with room for
        # a busy 2-core machine
        assert freed["max_free_ns"] < 1_000_000_000, freed
        p.resume()
        lines.say()
        done = lines.next(20)
        assert done == {"done": 1, "late_rc": 0, "late_free": 0}
        # Every byte came back on the one connection (deferred releases
        # included), while the process still lives.
        p.wait_for(lambda: c.used.get(0) == 0, timeout=5)
        assert len(p.conns) == 1
        rel = sum(m["n"] for m in msgs(p, "release"))
        assert rel == sum(m["n"] for m in msgs(p, "reserve")) == 2 * MB + nsmall * small
        if reads:
            # the socket really filled: releases were coalesced, not one per free
            assert len(msgs(p, "release")) < nsmall
        lines.say()
        assert proc.wait(timeout=10) == 0
        err = proc.stderr.read() if proc.stderr else ""
        assert "lost the connection" not in err, err
        assert "dropping" not in err, err
    finally:
        p.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_maximal_denied_frame_keeps_the_connection(bins: dict[str, Path], sock: str,
                                                   tmp_path: Path) -> None:
    # A `denied` naming a slice path so long that the frame is the largest
    # the protocol allows (VGPU_MAX_FRAME bytes of body): the hook reads it,
    # refuses the allocation, and keeps talking on the same connection.
    from vgpu_cgroup._wire._protocol import MAX_FRAME, Connection, Denied

    p = Peer(sock, mem_limit=3 * MB)
    try:
        frame = Connection().send(Denied(id=2, slice="", limit=3 * MB, current=2 * MB))
        pad = MAX_FRAME - (len(frame) - 4) - 2  # str8 -> str16 header: 2 more bytes
        p.denied_slice = "x" * pad
        body = Connection().send(Denied(id=2, slice=p.denied_slice, limit=3 * MB,
                                        current=2 * MB))
        assert len(body) - 4 == MAX_FRAME
        out, err = run([str(bins["client_basic"]), "1", "1000", str(2 * MB), str(2 * MB),
                        str(MB)], env(sock, tmp_path))
        assert out["alloc_rc"] == [0, 2, 0], (out, err)  # granted, denied, granted
        assert len(p.conns) == 1, err
        assert "vgpu:" not in err, err
    finally:
        p.close()


def test_send_oneway_never_waits_and_sends_whole_frames(sock: str, tmp_path: Path) -> None:
    # vgpu_client_send_oneway, called from a program linked with the hook's
    # own objects: it goes out while a round trip is pending on a daemon
    # that does not answer; when the daemon reads nothing at all, it fails
    # fast once the socket is full (counted) and every frame that did go
    # reaches the daemon whole; it refuses anything but exactly one frame.
    build()
    exe = tmp_path / "oneway_unit"
    objs = sorted(str(o) for o in (HOOK.parent / ".hook-obj").glob("*.o"))
    assert len(objs) >= 9
    subprocess.run(["cc", "-std=gnu11", "-O1", "-Wall", "-Wextra", "-Werror", "-D_GNU_SOURCE",
                    f"-I{ROOT / 'libhook'}", f"-I{ROOT / 'libhook' / 'include'}",
                    str(ROOT / "tests" / "c" / "oneway_unit.c"), *objs, "-o", str(exe),
                    "-ldl", "-lpthread"], check=True)
    e = env(sock, tmp_path)
    del e["LD_PRELOAD"]  # the hook is linked in
    p = Peer(sock)
    proc = subprocess.Popen([str(exe)], env=e, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = JsonLines(proc)

        def cmd(c: str) -> dict[str, Any]:
            assert proc.stdin is not None
            proc.stdin.write(c + "\n")
            proc.stdin.flush()
            return lines.next(20)

        assert lines.next(20) == {"init_rc": 0}
        c = p.wait_conn()
        p.stall()
        assert cmd("attach_bg") == {"started": 1}
        p.wait_for(lambda: bool(msgs(p, "attach")))  # its round trip is pending
        r = cmd("send 100")
        assert (r["ok"], r["fail"]) == (100, 0), r
        assert r["max_ns"] < 500_000_000, r
        p.wait_for(lambda: len(msgs(p, "note")) == 100)
        # A SIGSTOPped daemon: nothing is read; the socket takes a few
        # hundred frames, then sends fail at once instead of waiting.
        p.stall(reads=True)
        cmd("send 1")  # read by the peer's loop before it stops reading
        p.wait_for(lambda: len(msgs(p, "note")) == 101)
        r = cmd("send 20000")
        assert r["ok"] + r["fail"] == 20000, r
        assert min(r["ok"], r["fail"]) > 0, r
        assert r["max_ns"] < 500_000_000, r
        assert cmd("dropped") == {"dropped": r["fail"]}
        p.resume()
        total = 101 + r["ok"]
        p.wait_for(lambda: len(msgs(p, "note")) == total)
        # whole frames, in order: the peer decoded every one
        assert [m["i"] for m in msgs(p, "note")] == list(range(total))
        assert not c.closed
        assert cmd("bad") == {"shorter": 0, "longer": 0, "empty": 0, "null": 0}
        p.close()  # the daemon goes away: nothing to send to
        p.wait_for(lambda: c.closed)
        assert wait_until(lambda: cmd("send 1")["fail"] == 1, timeout=5)
        assert proc.stdin is not None
        proc.stdin.write("quit\n")
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0
    finally:
        p.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(("code", "ctx_rc", "says"), [
    ("oom", 2, "no GPU memory for a context"),  # CUDA_ERROR_OUT_OF_MEMORY
    ("device", 101, "refused device"),  # CUDA_ERROR_INVALID_DEVICE
    ("no-such-code", 101, "error code 'no-such-code', which this hook does not know"),
])
def test_attach_error_codes_from_the_one_table(bins: dict[str, Path], sock: str, tmp_path: Path,
                                               code: str, ctx_rc: int, says: str) -> None:
    # The hook reads an attach's error code against vgpu_abi.h's table (the
    # one the daemon's Error is checked against): oom fails the context with
    # out-of-memory, a refusal with invalid-device, and a code outside the
    # table is said to be one (then taken as a refusal).
    p = Peer(sock, attach_error=code)
    try:
        out, err = run([str(bins["client_basic"]), "0", "0", str(MB)], env(sock, tmp_path))
        assert out["ctx_rc"] == ctx_rc, err
        assert says in err, err
    finally:
        p.close()
