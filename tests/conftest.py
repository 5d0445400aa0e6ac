"""Shared fixtures: an in-process vgpud on a temporary socket, fake hooks."""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from _e2e import Cgroups
from vgpu_cgroup._wire._abi import ffi

from vgpu_cgroup._core._bounds import ClientLimits
from vgpu_cgroup._core._config import DaemonConfig
from vgpu_cgroup._log import configure
from vgpu_cgroup._node._daemon import Daemon
from vgpu_cgroup._node._nvml import Device
from vgpu_cgroup._paths import SIM_NVML
from vgpu_cgroup._wire._client import Client
from vgpu_cgroup._wire._shm import CTL_SIZE, STAT_SIZE

FAKE_DEVICES = [
    Device(index=0, uuid="GPU-00000000-0000-0000-0000-000000000000", name="Fake H200",
           total_mem=16 << 30),
    Device(index=1, uuid="GPU-11111111-1111-1111-1111-111111111111", name="Fake H200",
           total_mem=16 << 30),
]

requires_sim = pytest.mark.skipif(not os.path.exists(SIM_NVML),
                                  reason="simulated GPU not built (make -C libhook sim)")


@dataclass
class RunningDaemon:
    """A vgpud running in a background thread with its own trio loop."""

    daemon: Daemon
    socket: str
    runtime_dir: str
    etc_dir: str
    token: trio.lowlevel.TrioToken

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the daemon's thread (the tree is not thread-safe)."""
        return trio.from_thread.run_sync(fn, trio_token=self.token)

    def client(self, role: str = "ctl", **hello: Any) -> Client:
        c = Client(self.socket, timeout=5)
        c.hello(role, **hello)
        return c


def start_daemon(tmp: Path, **kw: Any) -> tuple[RunningDaemon, Callable[[], None]]:
    runtime = tmp / "run"
    etc = tmp / "etc-slices"
    etc.mkdir(exist_ok=True)
    cfg = DaemonConfig(socket=str(runtime / "vgpud.sock"), runtime_dir=str(runtime),
                       etc_slices_dir=str(etc), identity=kw.pop("identity", "declared"),
                       limits=kw.pop("limits", ClientLimits()))
    configure("json")
    daemon = Daemon(cfg, list(kw.pop("devices", FAKE_DEVICES)), simulated=True, **kw)
    daemon.load_slices()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def main() -> None:
        with trio.CancelScope() as scope:
            holder["scope"] = scope
            holder["token"] = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as n:
                await n.start(daemon.serve)
                ready.set()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # surfaced by the fixture
            holder["error"] = exc
            ready.set()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    assert ready.wait(10), "vgpud did not start"
    if "error" in holder:
        raise holder["error"]
    rd = RunningDaemon(daemon, cfg.socket, str(runtime), str(etc), holder["token"])

    def stop() -> None:
        trio.from_thread.run_sync(holder["scope"].cancel, trio_token=holder["token"])
        th.join(10)
        if "error" in holder:
            raise holder["error"]

    return rd, stop


@pytest.fixture
def vgpud(tmp_path: Path) -> Iterator[RunningDaemon]:
    rd, stop = start_daemon(tmp_path)
    yield rd
    stop()


class FakeHook:
    """Plays libvgpu-hook: hello with role hook, maps the regions it is given."""

    def __init__(self, rd: RunningDaemon, slice: str | None = "test.slice", **hello: Any) -> None:
        extra = dict(hello)
        if slice is not None:
            extra["slice"] = slice
        self.client = rd.client("hook", **extra)
        assert len(self.client.fds) == 2, "welcome must carry two fds"
        self.ctl_fd, self.stat_fd = self.client.fds
        self.ctl_map = mmap.mmap(self.ctl_fd, CTL_SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
        self.stat_map = mmap.mmap(self.stat_fd, STAT_SIZE, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        self.ctl: Any = ffi.cast("struct vgpu_ctl_page *", ffi.from_buffer(self.ctl_map))
        self.stat: Any = ffi.cast("struct vgpu_stat_page *", ffi.from_buffer(self.stat_map))

    def attach(self, dev: str = FAKE_DEVICES[0].uuid, total: int = 16 << 30) -> dict[str, Any]:
        return self.client.request({"t": "attach", "dev": dev, "total": total})

    def reserve(self, slot: int, n: int) -> dict[str, Any]:
        return self.client.request({"t": "reserve", "slot": slot, "n": n})

    def release(self, slot: int, n: int) -> None:
        self.client.send({"t": "release", "slot": slot, "n": n})

    def close(self) -> None:
        self.client.close()


def wait_for(pred: Callable[[], bool], timeout: float = 2.0) -> float:
    """Poll until ``pred()``; returns the seconds it took (fails on timeout)."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)
    return time.monotonic() - t0


@pytest.fixture
def cgroups() -> Iterator[Cgroups]:
    """A private cgroup2 subtree for an end-to-end test, removed after it."""
    cg = Cgroups()
    try:
        yield cg
    finally:
        cg.cleanup()
