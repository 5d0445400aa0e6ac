"""Restart recovery: memory the daemon must count for processes that are not
connected ("ghosts").

After a daemon restart the clients reconnect one by one; until a client has
re-declared what it holds (``hello.held``, readmitted by the memory
service), its memory would be missing from the books and a neighbour could
be admitted past a cap. So at start every process NVML shows is booked as a
placeholder in its cgroup's slice, replaced by the real client when it
reconnects and dropped when the process is gone. A connection that ends
while its process still holds memory (a hook that gave up waiting for the
daemon and will reconnect) is kept the same way until NVML shows the memory
gone.

A ghost is a tree client with id ``-pid``. One thread: called from
registration, from a connection's end and from the control tick, all on
the daemon's thread.
"""

from __future__ import annotations

import os

from structlog.typing import FilteringBoundLogger

from vgpu_cgroup._core import SliceTree

from ._identity import cgroup_of_pid
from ._memory import MemoryService


class Recovery:
    """The placeholders of processes that hold GPU memory and are not connected."""

    def __init__(self, tree: SliceTree, memory: MemoryService, log: FilteringBoundLogger) -> None:
        self.tree = tree
        self.memory = memory
        self.log = log
        self._ghosts: dict[int, int] = {}  # pid -> placeholder client id (-pid)

    def book_running_processes(self) -> None:
        """Book the GPU memory of every process already on the devices into
        its slice, before the first client is admitted (see the module
        docstring)."""
        for uuid in self.memory.devices:
            for pid, n in (self.memory.nvml_used(uuid) or {}).items():
                if pid != os.getpid():
                    self.book(pid, uuid, n)
        if self._ghosts:
            self.log.info("booked memory of running GPU processes until they reconnect",
                          processes=len(self._ghosts))

    def book(self, pid: int, uuid: str, n: int, slc: str | None = None) -> None:
        """Book n bytes that process pid holds on a device, with no client."""
        if n <= 0:
            return
        if slc is None:
            try:
                slc = cgroup_of_pid(pid)
            except (OSError, LookupError):
                return
        ghost = -pid
        if pid not in self._ghosts:
            try:
                self.tree.attach(ghost, slc, pid, "(not connected)")
            except ValueError:
                return
            self._ghosts[pid] = ghost
        self.tree.attach_device(ghost, uuid)
        self.tree.adopt(ghost, uuid, n)

    def take(self, pid: int) -> bool:
        """The process reconnected and re-declares what it holds: drop its
        placeholder. Whether it had one."""
        had = pid in self._ghosts
        self._drop(pid)
        return had

    def _drop(self, pid: int) -> None:
        if self._ghosts.pop(pid, None) is not None:
            self.tree.detach(-pid)

    def keep(self, pid: int, held: dict[str, int], slc: str) -> None:
        """A connection of ``pid`` ended holding ``held`` (bytes per device)
        in slice ``slc``: keep booked what NVML shows the process still has."""
        for uuid, n in held.items():
            used = self.memory.nvml_used(uuid) if n else None
            if used is not None and used.get(pid, 0) > 0:
                self.book(pid, uuid, min(n, used[pid]), slc)

    def expire(self, per_dev: dict[str, dict[int, int] | None]) -> None:
        """Drop placeholders of processes that no longer hold GPU memory."""
        for pid in list(self._ghosts):
            known = [used for used in per_dev.values() if used is not None]
            if known and all(used.get(pid, 0) == 0 for used in known):
                self._drop(pid)
                continue
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                self._drop(pid)
            except PermissionError:
                pass
