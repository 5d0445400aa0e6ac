"""Who is on the other end of a socket, as the kernel says.

A client's slice is never taken from what it sends: the peer pid comes from
``SO_PEERCRED`` and its cgroup from ``/proc/<pid>/cgroup``.  The parsers are
pure functions over file texts (``_core._cgroupfs``) so they are tested on
sample data.
"""

from __future__ import annotations

import os
import select
import socket
import struct
from typing import Protocol

from vgpu_cgroup._core import parse_proc_cgroup

_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
#: A pidfd of the peer (Linux 6.5+); not in Python's socket module yet.
SO_PEERPIDFD: int = getattr(socket, "SO_PEERPIDFD", 77)


class _HasGetsockopt(Protocol):
    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes: ...


class _HasIntGetsockopt(Protocol):
    def getsockopt(self, level: int, optname: int) -> int: ...


def peer_pid_uid(sock: _HasGetsockopt) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected to a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def cgroup_of_pid(pid: int, proc: str = "/proc") -> str:
    """The cgroup v2 path of a live process, relative to the hierarchy root.

    Raises OSError if the process is gone, LookupError if it has no v2 line.
    """
    # Plain os calls: this runs at every accept, and a buffered text file
    # costs several times the read itself.
    fd = os.open(f"{proc}/{pid}/cgroup", os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise LookupError(f"the cgroup path of pid {pid} is not UTF-8") from None
    return parse_proc_cgroup(text)


def _exited(pidfd: int) -> bool:
    """A pidfd is readable once its process has exited."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


def peer_cgroup(sock: _HasIntGetsockopt, pid: int, proc: str = "/proc") -> str:
    """The cgroup v2 path of the process that connected to ``sock`` (its pid
    from ``SO_PEERCRED``).

    A pid can be reused once its process is gone: read after that, the
    cgroup would be some other process's, and the connection charged to its
    slice. So where the kernel gives a pidfd of the peer (``SO_PEERPIDFD``,
    Linux 6.5+, which names that very process), the cgroup is only trusted
    if the process is still alive after it was read: ProcessLookupError
    otherwise. Older kernels: the pid alone (the window is a process that
    exits, and a pid wraps around, between its ``connect`` and this read).
    """
    try:
        pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        pidfd = -1
    try:
        path = cgroup_of_pid(pid, proc)
        if pidfd >= 0 and _exited(pidfd):
            raise ProcessLookupError(f"pid {pid} exited before it could be identified")
        return path
    finally:
        if pidfd >= 0:
            os.close(pidfd)
