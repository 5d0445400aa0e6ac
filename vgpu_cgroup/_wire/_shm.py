"""The two shared-memory regions of one client (see libhook/include/vgpu_abi.h).

ctl:  written by the daemon (budgets, flags, memory view); the client gets a
      read-only reopen of the memfd, and the memfd carries
      F_SEAL_FUTURE_WRITE, so neither that fd nor a reopen through
      /proc/<pid>/fd can ever be mapped writable: a process cannot raise its
      own budget.
stat: written by the client (counters, busy-interval ring); the daemon reads
      it every tick.  Both are sealed against shrinking, so a hostile client
      cannot truncate a region and make the daemon fault on its mapping.

Layouts come from the cffi module built against the C header, never from
hand-written offsets.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from dataclasses import dataclass
from typing import Any, Final

from ._abi import ffi, lib

CTL_SIZE: Final[int] = int(ffi.sizeof("struct vgpu_ctl_page"))
STAT_SIZE: Final[int] = int(ffi.sizeof("struct vgpu_stat_page"))
RING_SLOTS: Final[int] = int(lib.VGPU_RING_SLOTS)
MAX_DEVICES: Final[int] = int(lib.VGPU_MAX_DEVICES)
UNLIMITED: Final[int] = 2**64 - 1
DEV_ACTIVE: Final[int] = int(lib.VGPU_DEV_ACTIVE)
DEV_UNLIMITED: Final[int] = int(lib.VGPU_DEV_UNLIMITED)
DEV_CONTENDED: Final[int] = int(lib.VGPU_DEV_CONTENDED)
GRANT_STATE_MASK: Final[int] = int(lib.VGPU_GRANT_STATE_MASK)
GRANT_HOLD: Final[int] = int(lib.VGPU_GRANT_HOLD)
GRANT_GEN_SHIFT: Final[int] = int(lib.VGPU_GRANT_GEN_SHIFT)
_U32 = 2**32 - 1

# Not in Python's fcntl module yet (Linux 5.1+).
F_SEAL_FUTURE_WRITE: Final[int] = 0x0010
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True, slots=True)
class StatCounters:
    """The monotonically growing counters of one device slot."""

    launches: int
    graph_launches: int
    throttled_ns: int
    nr_throttled: int
    busy_ns: int
    allocs: int
    frees: int
    cost_ns: int


@dataclass(frozen=True, slots=True)
class Drained:
    """Intervals published since the last drain; ``lost`` were overwritten
    before we read them (ring overrun) or were malformed."""

    intervals: list[tuple[int, int]]
    lost: int


def _memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _add_seals(fd: int, seals: int) -> None:
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except OSError:
        # Kernels before 5.1 lack FUTURE_WRITE: keep the rest of the seals.
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals & ~F_SEAL_FUTURE_WRITE)


class ClientShm:
    """The ctl and stat regions of one client connection, mapped in the daemon."""

    def __init__(self, *, tick_ns: int, epoch: int, name: str = "vgpu") -> None:
        self._fds: list[int] = []
        self._closed = False
        try:
            self._ctl_fd = _memfd(f"{name}-ctl", CTL_SIZE)
            self._fds.append(self._ctl_fd)
            self._stat_fd = _memfd(f"{name}-stat", STAT_SIZE)
            self._fds.append(self._stat_fd)
            self._ctl_map = mmap.mmap(self._ctl_fd, CTL_SIZE, mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
            self._stat_map = mmap.mmap(self._stat_fd, STAT_SIZE, mmap.MAP_SHARED,
                                       mmap.PROT_READ | mmap.PROT_WRITE)
            # Seal after mapping: our writable mapping stays valid, no new one can.
            grow_shrink = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
            _add_seals(self._ctl_fd, grow_shrink | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL)
            _add_seals(self._stat_fd, grow_shrink | fcntl.F_SEAL_SEAL)
            self.ctl_ro_fd = os.open(f"/proc/self/fd/{self._ctl_fd}",
                                     os.O_RDONLY | os.O_CLOEXEC)
            self._fds.append(self.ctl_ro_fd)
        except BaseException:
            for fd in self._fds:
                os.close(fd)
            raise
        self._ctl_buf = ffi.from_buffer("char[]", self._ctl_map, require_writable=True)
        self._stat_buf = ffi.from_buffer("char[]", self._stat_map)
        self.ctl: Any = ffi.cast("struct vgpu_ctl_page *", self._ctl_buf)
        self.stat: Any = ffi.cast("struct vgpu_stat_page *", self._stat_buf)
        self.ctl.magic = lib.VGPU_SHM_MAGIC
        self.ctl.abi_version = lib.VGPU_ABI_VERSION
        self.ctl.tick_ns = tick_ns
        self.ctl.daemon_epoch = epoch
        for i in range(MAX_DEVICES):
            self.ctl.dev[i].mem_limit = UNLIMITED
        self.stat.magic = lib.VGPU_SHM_MAGIC
        self.stat.abi_version = lib.VGPU_ABI_VERSION
        self._last_head = [0] * MAX_DEVICES
        self._last_throttle = [(0, 0)] * MAX_DEVICES
        self._sdev = [self.stat.dev[i] for i in range(MAX_DEVICES)]
        self._cdev = [self.ctl.dev[i] for i in range(MAX_DEVICES)]
        # What was last written per slot: the tick rewrites a slot only when
        # its values change, so an idle client costs the daemon little.
        self._gate_last: list[tuple[int, bool, bool, tuple[int, int] | None, int, int] | None] = (
            [None] * MAX_DEVICES)
        self._mem_last: list[tuple[int | None, int] | None] = [None] * MAX_DEVICES

    @property
    def stat_fd(self) -> int:
        """The read-write stat fd to hand to the client."""
        return self._stat_fd

    def fds_for_client(self) -> list[int]:
        """The fds for the welcome's SCM_RIGHTS, in protocol order."""
        return [self.ctl_ro_fd, self._stat_fd]

    def close_fds(self) -> None:
        """Close the memfds once the client has them: the mappings stay
        (the daemon needs nothing else), and a hooked process then costs
        the daemon one fd, its socket, instead of four."""
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    # ---- daemon writes ----

    def activate(self, slot: int) -> None:
        """Mark a slot assigned; start ring reads at what is already there."""
        d = self.stat.dev[slot]
        self._last_head[slot] = int(d.ring_head)
        self._last_throttle[slot] = (int(d.nr_throttled), int(d.throttled_ns))
        self._gate_last[slot] = self._mem_last[slot] = None
        self.ctl.dev[slot].flags = self.ctl.dev[slot].flags | DEV_ACTIVE

    def write_gate(self, slot: int, state: int, *, unlimited: bool, contended: bool,
                   inflight_ns: int, rate_ppm: int, hold: tuple[int, int] | None = None) -> bool:
        """Publish a slot's launch gate; whether it differed from the last one.

        A change of state, flags or hold (``(end, until)`` of a HOLD grant)
        bumps the grant word's generation (written last, with release order:
        a hook reads the hold after the word) and wakes the hook's threads
        waiting on it; the bound and the rate are read when next needed."""
        hold = hold if state == GRANT_HOLD else None
        key = (state, unlimited, contended, hold, inflight_ns, rate_ppm)
        last = self._gate_last[slot]
        if last == key:
            return False
        self._gate_last[slot] = key
        d = self._cdev[slot]
        d.inflight_ns = max(0, inflight_ns)
        d.rate_ppm = max(0, rate_ppm)
        if hold is not None:
            d.hold_end_ns = max(0, hold[0])
            d.hold_until_ns = max(0, hold[1])
        flags = (DEV_ACTIVE | (DEV_UNLIMITED if unlimited else 0)
                 | (DEV_CONTENDED if contended else 0))
        lib.vgpu_store_release_u32(ffi.addressof(d, "flags"), flags)
        if last is not None and last[:4] == key[:4]:
            return True
        gen = ((int(d.grant) >> GRANT_GEN_SHIFT) + 1) & (_U32 >> GRANT_GEN_SHIFT)
        word = ffi.addressof(d, "grant")
        lib.vgpu_store_release_u32(word, (gen << GRANT_GEN_SHIFT) | (state & GRANT_STATE_MASK))
        lib.vgpu_futex_wake(word)
        return True

    def heartbeat(self, beat: int) -> None:
        """Tell a waiting hook the daemon is alive (see ``vgpu_ctl_page``)."""
        self.ctl.heartbeat = beat

    def cost_ns(self, slot: int) -> int:
        """The hook's measured GPU time per launch on ``slot`` (untrusted)."""
        return int(self._sdev[slot].cost_ns)

    def write_mem_view(self, slot: int, limit: int | None, used: int) -> bool:
        """Publish a slot's cuMemGetInfo view; whether it changed."""
        key = (limit, used)
        if self._mem_last[slot] == key:
            return False
        self._mem_last[slot] = key
        d = self._cdev[slot]
        d.mem_limit = UNLIMITED if limit is None else max(0, limit)
        d.mem_used = max(0, used)
        return True

    def bump_seq(self) -> None:
        self.ctl.seq = self.ctl.seq + 1

    def read_ctl(self, slot: int) -> dict[str, int]:
        """The daemon-side values of one ctl slot (for tests and status)."""
        d = self.ctl.dev[slot]
        return {"grant": int(d.grant), "flags": int(d.flags),
                "mem_limit": int(d.mem_limit), "mem_used": int(d.mem_used),
                "rate_ppm": int(d.rate_ppm), "inflight_ns": int(d.inflight_ns),
                "seq": int(self.ctl.seq), "heartbeat": int(self.ctl.heartbeat)}

    # ---- client-written data ----

    def counters(self, slot: int) -> StatCounters:
        d = self.stat.dev[slot]
        return StatCounters(
            launches=int(d.launches), graph_launches=int(d.graph_launches),
            throttled_ns=int(d.throttled_ns), nr_throttled=int(d.nr_throttled),
            busy_ns=int(d.busy_ns), allocs=int(d.allocs), frees=int(d.frees),
            cost_ns=int(d.cost_ns),
        )

    def poll(self, slot: int) -> tuple[Drained, int, int] | None:
        """What the tick needs of a slot: new intervals and how much the
        throttle counters (nr_throttled, throttled_ns) grew, or None when
        nothing changed since the last poll (an idle client: three reads)."""
        d = self._sdev[slot]
        head, nr, ns = int(d.ring_head), int(d.nr_throttled), int(d.throttled_ns)
        last = self._last_throttle[slot]
        if head == self._last_head[slot] and nr == last[0] and ns == last[1]:
            return None
        self._last_throttle[slot] = (nr, ns)
        return self.drain(slot), max(0, nr - last[0]), max(0, ns - last[1])

    def drain(self, slot: int) -> Drained:
        """Intervals published in ``slot``'s ring since the last drain.

        The client may overwrite slots while we read, so the head is read
        again afterwards and anything that may have been overwritten in the
        meantime is dropped and counted as lost.  A head that goes backwards
        (a buggy or hostile client) resynchronises without reading.
        """
        d = self.stat.dev[slot]
        head = int(d.ring_head)
        last = self._last_head[slot]
        if head == last:
            return Drained([], 0)
        if head < last:
            self._last_head[slot] = head
            return Drained([], 0)
        lost = 0
        if head - last > RING_SLOTS:
            lost = head - last - RING_SLOTS
            last = head - RING_SLOTS
        ring = d.ring
        raw = [(i, int(ring[i % RING_SLOTS].start_ns), int(ring[i % RING_SLOTS].end_ns))
               for i in range(last, head)]
        head_after = int(d.ring_head)
        oldest_valid = head_after - RING_SLOTS
        out: list[tuple[int, int]] = []
        for i, start, end in raw:
            if i < oldest_valid or end < start:
                lost += 1
                continue
            out.append((start, end))
        self._last_head[slot] = head
        return Drained(out, lost)

    def close(self) -> None:
        """Unmap and close; the client's own mappings stay valid until it exits."""
        if self._closed:
            return
        self._closed = True
        self.ctl = self.stat = None
        self._sdev = []
        ffi.release(self._ctl_buf)
        ffi.release(self._stat_buf)
        self._ctl_map.close()
        self._stat_map.close()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
