"""sd_notify, socket activation and the watchdog interval, against sockets
the test owns; and the unit files through systemd-analyze."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vgpu_cgroup._node import _systemd

ROOT = Path(__file__).resolve().parent.parent


def _notify_sock(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    return s, path


def test_notify_sends_state(tmp_path: Path) -> None:
    s, path = _notify_sock(tmp_path)
    with s:
        assert _systemd.notify("READY=1", {"NOTIFY_SOCKET": path})
        assert s.recv(100) == b"READY=1"
        assert _systemd.notify("WATCHDOG=1", {"NOTIFY_SOCKET": path})
        assert s.recv(100) == b"WATCHDOG=1"


def test_notify_abstract_socket() -> None:
    name = f"vgpu-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(5)
    with s:
        assert _systemd.notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert s.recv(100) == b"STOPPING=1"


def test_notify_without_manager() -> None:
    assert _systemd.notify("READY=1", {}) is False


def test_listen_fds() -> None:
    assert _systemd.listen_fds({"LISTEN_PID": "42", "LISTEN_FDS": "2"}, pid=42) == [3, 4]
    assert _systemd.listen_fds({"LISTEN_PID": "41", "LISTEN_FDS": "2"}, pid=42) == []
    assert _systemd.listen_fds({"LISTEN_PID": "x", "LISTEN_FDS": "2"}, pid=42) == []
    assert _systemd.listen_fds({}, pid=42) == []


def test_watchdog_interval() -> None:
    assert _systemd.watchdog_interval({"WATCHDOG_USEC": "10000000"}, pid=1) == 5.0
    assert (
        _systemd.watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "2"}, pid=1)
        is None
    )
    assert _systemd.watchdog_interval({}, pid=1) is None
    assert _systemd.watchdog_interval({"WATCHDOG_USEC": "bad"}, pid=1) is None


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_units_verify(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the units; ExecStart is pointed at a real
    executable since the package is not installed to /usr/bin here."""
    for name in ("vgpud.service", "vgpud.socket"):
        text = (ROOT / "contrib" / "systemd" / name).read_text()
        text = re.sub(
            r"^ExecStart=.*$", f"ExecStart={sys.executable} -m vgpu_cgroup", text, flags=re.M
        )
        (tmp_path / name).write_text(text)
    proc = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            str(tmp_path / "vgpud.service"),
            str(tmp_path / "vgpud.socket"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    problems = [ln for ln in proc.stderr.splitlines() if "vgpud" in ln]
    assert proc.returncode == 0, proc.stderr
    assert not problems, proc.stderr
