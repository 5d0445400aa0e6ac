"""The three pieces of systemd's service protocol vgpud speaks, without a
dependency: readiness/watchdog notification (sd_notify(3)), socket
activation (sd_listen_fds(3)), and the watchdog interval.

Each is a few lines over the environment and one datagram socket; libsystemd
would be a C dependency for that, and python-systemd is not on PyPI wheels.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

SD_LISTEN_FDS_START = 3


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1", "WATCHDOG=1", "STOPPING=1") to the
    service manager. Returns False when not run under a notify-aware manager.

    Abstract sockets ("@name") are supported as systemd passes them.
    """
    env = os.environ if env is None else env
    path = env.get("NOTIFY_SOCKET")
    if not path:
        return False
    addr = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(addr)
        s.sendall(state.encode())
    return True


def listen_fds(env: Mapping[str, str] | None = None, pid: int | None = None) -> list[int]:
    """File descriptors passed by socket activation, or [] when none.

    Honoured only when LISTEN_PID is this process, as sd_listen_fds(3)
    requires: a child that inherited the variables must not take the fds.
    """
    env = os.environ if env is None else env
    pid = os.getpid() if pid is None else pid
    try:
        if int(env.get("LISTEN_PID", "0")) != pid:
            return []
        n = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(0, n)))


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between watchdog pings (half of WatchdogSec, as systemd
    recommends), or None when no watchdog is configured for us."""
    env = os.environ if env is None else env
    pid = os.getpid() if pid is None else pid
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
        wpid = env.get("WATCHDOG_PID")
        if wpid is not None and int(wpid) != pid:
            return None
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000
