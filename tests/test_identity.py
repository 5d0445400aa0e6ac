"""Identity: SO_PEERCRED and the cgroup parsers, plus one real cgroup move."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vgpu_cgroup._core import cgroup2_mount, parse_proc_cgroup
from vgpu_cgroup._node._identity import (
    SO_PEERPIDFD,
    cgroup_of_pid,
    peer_cgroup,
    peer_pid_uid,
)
from vgpu_cgroup._paths import find_cgroup2_mount

HYBRID = """\
24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 24 0:27 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 31 0:39 / /sys/fs/cgroup/memory rw,relatime shared:12 - cgroup cgroup rw,memory
"""
UNIFIED = """\
35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
"""


def test_cgroup2_mount_hybrid_and_unified() -> None:
    assert cgroup2_mount(HYBRID) == "/sys/fs/cgroup/unified"
    assert cgroup2_mount(UNIFIED) == "/sys/fs/cgroup"


def test_cgroup2_mount_escapes_and_missing() -> None:
    text = "50 1 0:40 / /mnt/my\\040cg rw - cgroup2 none rw\n"
    assert cgroup2_mount(text) == "/mnt/my cg"
    with pytest.raises(LookupError, match="cgroup2"):
        cgroup2_mount(HYBRID.replace("cgroup2", "tmpfs") + "garbage line\n")


def test_parse_proc_cgroup() -> None:
    text = "12:memory:/docker/abc\n1:name=systemd:/x\n0::/tenants.slice/a.slice/job1\n"
    assert parse_proc_cgroup(text) == "tenants.slice/a.slice/job1"
    assert parse_proc_cgroup("0::/\n") == ""
    assert parse_proc_cgroup("0::/gone (deleted)\n") == "gone"
    with pytest.raises(LookupError):
        parse_proc_cgroup("4:memory:/x\n")


def test_peer_pid_uid_socketpair() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert peer_pid_uid(a) == (os.getpid(), os.getuid(), os.getgid())


def test_cgroup_of_self() -> None:
    with open("/proc/self/cgroup", encoding="utf-8") as f:
        want = parse_proc_cgroup(f.read())
    assert cgroup_of_pid(os.getpid()) == want
    with pytest.raises(FileNotFoundError):
        cgroup_of_pid(2**22 + 12345)


@pytest.fixture
def scratch_cgroup() -> Iterator[tuple[str, str]]:
    try:
        mount = find_cgroup2_mount()
    except LookupError:
        pytest.skip("no cgroup v2 here")
    name = f"vgpu-test-{uuid.uuid4().hex[:8]}"
    path = os.path.join(mount, name)
    try:
        os.mkdir(path)
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup: {exc}")
    try:
        yield path, name
    finally:
        os.rmdir(path)


def test_real_process_in_created_cgroup(scratch_cgroup: tuple[str, str]) -> None:
    path, name = scratch_cgroup
    proc = subprocess.Popen(["sleep", "30"])
    try:
        with open(os.path.join(path, "cgroup.procs"), "w", encoding="ascii") as f:
            f.write(str(proc.pid))
        # Relative to the hierarchy root as this test process sees it.
        base = cgroup_of_pid(os.getpid())
        assert cgroup_of_pid(proc.pid) in (name, f"{base}/{name}".strip("/"))
    finally:
        proc.kill()
        proc.wait()


def test_peer_cgroup_checks_the_peer_is_still_there(tmp_path: Path) -> None:
    """A peer that is gone by the time its cgroup is read may have had its
    pid reused: with a pidfd (Linux 6.5+) that is refused, not trusted."""
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(str(tmp_path / "s"))
    lst.listen(4)
    with lst:
        alive = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        alive.connect(str(tmp_path / "s"))
        conn, _ = lst.accept()
        with alive, conn:
            pid = peer_pid_uid(conn)[0]
            assert peer_cgroup(conn, pid) == cgroup_of_pid(os.getpid())
        # A child that connects and exits, left unreaped: its /proc entry
        # still reads, but it is not the process that connected any more.
        child = subprocess.Popen(
            [sys.executable, "-c", "import socket, sys; s = socket.socket(socket.AF_UNIX); "
             "s.connect(sys.argv[1])", str(tmp_path / "s")])
        conn, _ = lst.accept()
        try:
            pid = peer_pid_uid(conn)[0]
            assert pid == child.pid
            try:
                conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
            except OSError:
                pytest.skip("no SO_PEERPIDFD on this kernel")
            deadline = time.monotonic() + 30
            stat = Path(f"/proc/{pid}/stat")
            while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert cgroup_of_pid(pid) is not None  # readable, but...
            with pytest.raises(ProcessLookupError, match="exited before"):
                peer_cgroup(conn, pid)
        finally:
            conn.close()
            child.wait()
