"""Shared regions: read-only ctl fd, layout initialisation, ring draining."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import pytest
from vgpu_cgroup._wire._abi import ffi, lib

from vgpu_cgroup._wire._shm import CTL_SIZE, RING_SLOTS, STAT_SIZE, UNLIMITED, ClientShm


@pytest.fixture
def shm() -> Iterator[ClientShm]:
    s = ClientShm(tick_ns=10_000_000, epoch=77)
    yield s
    s.close()


def test_ctl_fd_cannot_be_mapped_writable(shm: ClientShm) -> None:
    ctl_ro, stat = shm.fds_for_client()
    with pytest.raises(PermissionError):
        mmap.mmap(ctl_ro, CTL_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    # Reopening through /proc does not help either (F_SEAL_FUTURE_WRITE).
    fd = os.open(f"/proc/self/fd/{ctl_ro}", os.O_RDWR)
    try:
        with pytest.raises(PermissionError):
            mmap.mmap(fd, CTL_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    # Nor shrinking the stat region under the daemon.
    with pytest.raises(PermissionError):
        os.ftruncate(stat, 0)
    ro = mmap.mmap(ctl_ro, CTL_SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
    page = ffi.cast("struct vgpu_ctl_page *", ffi.from_buffer(ro))
    assert page.magic == lib.VGPU_SHM_MAGIC
    assert page.abi_version == lib.VGPU_ABI_VERSION
    assert page.tick_ns == 10_000_000
    assert page.daemon_epoch == 77
    assert page.dev[3].mem_limit == UNLIMITED
    assert shm.write_gate(3, lib.VGPU_GRANT_RUN, unlimited=False, contended=True,
                          inflight_ns=2_000_000, rate_ppm=300_000)
    shm.write_mem_view(3, 4 << 30, 1 << 20)
    shm.bump_seq()
    g1 = int(page.dev[3].grant)
    assert g1 & lib.VGPU_GRANT_STATE_MASK == lib.VGPU_GRANT_RUN
    assert page.dev[3].flags == lib.VGPU_DEV_ACTIVE | lib.VGPU_DEV_CONTENDED
    assert page.dev[3].rate_ppm == 300_000
    assert page.dev[3].inflight_ns == 2_000_000
    assert page.dev[3].mem_limit == 4 << 30
    assert page.seq == 1
    # The same gate again: nothing written; a new rate: no new generation
    # (nobody waits on a rate); a new state: the next generation.
    assert not shm.write_gate(3, lib.VGPU_GRANT_RUN, unlimited=False, contended=True,
                              inflight_ns=2_000_000, rate_ppm=300_000)
    assert shm.write_gate(3, lib.VGPU_GRANT_RUN, unlimited=False, contended=True,
                          inflight_ns=2_000_000, rate_ppm=400_000)
    assert int(page.dev[3].grant) == g1
    shm.write_gate(3, lib.VGPU_GRANT_WAIT, unlimited=False, contended=True,
                   inflight_ns=2_000_000, rate_ppm=0)
    g2 = int(page.dev[3].grant)
    assert g2 >> lib.VGPU_GRANT_GEN_SHIFT == (g1 >> lib.VGPU_GRANT_GEN_SHIFT) + 1
    assert g2 & lib.VGPU_GRANT_STATE_MASK == lib.VGPU_GRANT_WAIT
    shm.write_gate(3, lib.VGPU_GRANT_RUN, unlimited=True, contended=False,
                   inflight_ns=-5, rate_ppm=-1)  # clamped, not an OverflowError
    assert page.dev[3].flags == lib.VGPU_DEV_ACTIVE | lib.VGPU_DEV_UNLIMITED
    assert page.dev[3].inflight_ns == 0


def client_stat(shm: ClientShm) -> tuple[mmap.mmap, object]:
    m = mmap.mmap(shm.stat_fd, STAT_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return m, ffi.cast("struct vgpu_stat_page *", ffi.from_buffer(m))


def publish(page: object, slot: int, start: int, end: int) -> None:
    d = page.dev[slot]  # type: ignore[attr-defined]
    h = int(d.ring_head)
    d.ring[h % RING_SLOTS].start_ns = start
    d.ring[h % RING_SLOTS].end_ns = end
    d.ring_head = h + 1


def test_drain_in_order_and_counters(shm: ClientShm) -> None:
    _m, page = client_stat(shm)
    assert page.magic == lib.VGPU_SHM_MAGIC  # type: ignore[attr-defined]
    shm.activate(1)
    assert shm.drain(1).intervals == []
    for i in range(5):
        publish(page, 1, i * 10, i * 10 + 5)
    got = shm.drain(1)
    assert got.intervals == [(i * 10, i * 10 + 5) for i in range(5)]
    assert got.lost == 0
    assert shm.drain(1).intervals == []
    page.dev[1].nr_throttled = 3  # type: ignore[attr-defined]
    assert shm.counters(1).nr_throttled == 3


def test_drain_overrun_and_garbage(shm: ClientShm) -> None:
    _m, page = client_stat(shm)
    shm.activate(0)
    total = RING_SLOTS + 100
    for i in range(total):
        publish(page, 0, i, i + 1)
    got = shm.drain(0)
    assert got.lost == 100
    assert len(got.intervals) == RING_SLOTS
    assert got.intervals[0] == (100, 101)
    publish(page, 0, 50, 10)  # end before start: dropped
    got = shm.drain(0)
    assert got.intervals == []
    assert got.lost == 1
    page.dev[0].ring_head = 3  # type: ignore[attr-defined]
    assert shm.drain(0).intervals == []  # head went backwards: resync, no crash
    publish(page, 0, 1, 2)
    assert shm.drain(0).intervals == [(1, 2)]


def test_close_is_idempotent() -> None:
    s = ClientShm(tick_ns=1, epoch=1)
    fds = s.fds_for_client()
    s.close()
    s.close()
    for fd in fds:
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(fd)
