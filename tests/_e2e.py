"""Helpers for end-to-end tests: real vgpud processes on the simulated GPU,
real cgroups, real CUDA programs running under the hook.

Not a conftest: e2e test modules import what they need from here. The two
fixtures every e2e module has are made here, once (``built_fixture``,
``vgpud_fixture``); a module says in one line which test programs it needs
and how its vgpud differs.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from vgpu_cgroup._core import cgroup2_mount

ROOT = Path(__file__).resolve().parent.parent
LIB = ROOT / "vgpu_cgroup" / "_lib"
HOOK = LIB / "libvgpu-hook.so"
SIMDIR = LIB / "sim"
_counter = itertools.count()


def build() -> None:
    """Build the hook, the simulated GPU and the ABI module (idempotent)."""
    subprocess.run(["make", "-s", "-C", str(ROOT / "libhook")], check=True)
    subprocess.run([sys.executable, str(ROOT / "vgpu_cgroup" / "_wire" / "_abi_build.py")],
                   check=True)


def build_c(name: str, out_dir: Path, *, link_cuda: bool = True) -> Path:
    """Compile tests/c/<name>.c against the simulated libcuda."""
    exe = out_dir / name
    cmd = ["cc", "-std=gnu11", "-O1", "-Wall", "-Wextra", "-Werror", "-D_GNU_SOURCE",
           f"-I{ROOT / 'libhook' / 'include'}", str(ROOT / "tests" / "c" / f"{name}.c"),
           "-o", str(exe), "-lpthread"]
    if link_cuda:
        cmd += [f"-L{SIMDIR}", "-l:libcuda.so.1", f"-Wl,-rpath-link,{SIMDIR}"]
    subprocess.run(cmd, check=True)
    return exe


def cgroup_mount() -> Path:
    with open("/proc/self/mountinfo") as f:
        return Path(cgroup2_mount(f.read()))


class Cgroups:
    """A private subtree of the cgroup2 hierarchy for one test."""

    def __init__(self) -> None:
        self.mount = cgroup_mount()
        self.base = f"vgpu-test-{os.getpid()}-{next(_counter)}"
        (self.mount / self.base).mkdir()
        self.made: list[Path] = [self.mount / self.base]

    def make(self, rel: str) -> str:
        """Create `base/rel` (and parents); return its path relative to the mount."""
        path = self.mount / self.base
        for part in rel.split("/"):
            path = path / part
            if not path.exists():
                path.mkdir()
                self.made.append(path)
        return str(path.relative_to(self.mount))

    def procs_file(self, rel_from_mount: str) -> str:
        return str(self.mount / rel_from_mount / "cgroup.procs")

    def cleanup(self) -> None:
        root_procs = self.mount / "cgroup.procs"
        for path in reversed(self.made):
            with contextlib.suppress(OSError):
                for pid in (path / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        os.kill(int(pid), signal.SIGKILL)
            for _ in range(50):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
        del root_procs


def spawn(cmd: Sequence[str], env: dict[str, str], cgroup: str | None = None,
          cgroups: Cgroups | None = None, **kw: Any) -> subprocess.Popen[str]:
    """Start cmd, moving the child into `cgroup` before it execs."""
    procs = cgroups.procs_file(cgroup) if (cgroup and cgroups) else None

    def enter() -> None:
        if procs:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

    return subprocess.Popen(list(cmd), env=env, preexec_fn=enter, text=True, **kw)


class VgpudProc:
    """vgpud --simulate in a subprocess with its own socket, dirs and device."""

    def __init__(self, tmp: Path, *, sim_mem: str = "16G", sim_devices: int = 1,
                 extra: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.socket = str(tmp / "vgpud.sock")
        self.shm = f"vgpu-e2e-{os.getpid()}-{next(_counter)}"
        self.env = dict(os.environ if env is None else env)
        # This checkout first; what was on the path stays (where the
        # dependencies were installed with --target, as on the H200 host).
        path = [str(ROOT), *filter(None, self.env.get("PYTHONPATH", "").split(os.pathsep))]
        self.env.update({"VGPU_SIM_SHM": self.shm, "VGPU_SIM_MEM": sim_mem,
                         "VGPU_SIM_DEVICES": str(sim_devices),
                         "PYTHONPATH": os.pathsep.join(path)})
        (tmp / "etc").mkdir(exist_ok=True)
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "vgpud.log"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vgpu_cgroup._daemon_main", "--simulate",
                 "--socket", self.socket, "--runtime-dir", str(self.tmp / "run"),
                 "--etc-dir", str(self.tmp / "etc"), "--log-format", "json", *self.extra],
                env=self.env, stdout=log, stderr=log,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vgpud exited: {self.log.read_text()[-3000:]}")
            if os.path.exists(self.socket) and self.ctl_rc("status") == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"vgpud did not start: {self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/dev/shm/{self.shm}")

    def client_env(self, **more: str) -> dict[str, str]:
        env = dict(self.env)
        env["LD_PRELOAD"] = str(HOOK)
        env["LD_LIBRARY_PATH"] = str(SIMDIR)
        env["VGPU_SOCKET"] = self.socket
        env.update(more)
        return env

    def ctl_cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "vgpu_cgroup._ctl", "--socket", self.socket, *args]

    def ctl_rc(self, *args: str) -> int:
        return subprocess.run(self.ctl_cmd(*args), env=self.env, capture_output=True).returncode

    def ctl(self, *args: str) -> Any:
        p = subprocess.run(self.ctl_cmd("--json", *args), env=self.env, capture_output=True,
                           text=True)
        if p.returncode != 0:
            raise RuntimeError(f"vgpuctl {' '.join(args)}: {p.stderr}")
        return json.loads(p.stdout)


def built_fixture(*programs: str) -> Any:
    """The module-scoped fixture ``built``: the hook, the simulated GPU and
    the ABI module built (``build``), and ``programs`` (tests/c/<name>.c)
    compiled into a directory of their own, which it returns."""

    @pytest.fixture(scope="module", name="built")
    def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
        build()
        out = tmp_path_factory.mktemp("bin")
        for name in programs:
            build_c(name, out)
        return out

    return built


def vgpud_fixture(*, sim_mem: str | None = None, ctx_overhead: int | None = None,
                  limits: Mapping[str, int] | None = None, sim_devices: int = 1) -> Any:
    """The fixture ``vgpud``: a started ``VgpudProc`` (after ``built``),
    stopped and cleaned up after the test.

    ``sim_mem``: the simulated GPU's memory (VgpudProc's default if None),
    on each of its ``sim_devices`` devices;
    ``ctx_overhead``: bytes a simulated context takes (VGPU_SIM_CTX_OVERHEAD);
    ``limits``: vgpud.toml's ``[limits]``, in a directory under /tmp that an
    unprivileged process can reach (pytest's is root's only), removed after.
    """

    @pytest.fixture(name="vgpud")
    def vgpud(request: pytest.FixtureRequest, built: Path) -> Iterator[VgpudProc]:
        if limits is not None:
            tmp = Path(tempfile.mkdtemp(prefix="vgpu-flood-", dir="/tmp"))
            tmp.chmod(0o755)
            conf = tmp / "vgpud.toml"
            conf.write_text("[limits]\n" + "".join(f"{k} = {v}\n" for k, v in limits.items()))
            extra = ["--config", str(conf)]
        else:
            tmp = request.getfixturevalue("tmp_path")
            extra = []
        d = VgpudProc(tmp, extra=extra, sim_devices=sim_devices) if sim_mem is None else \
            VgpudProc(tmp, sim_mem=sim_mem, extra=extra, sim_devices=sim_devices)
        if ctx_overhead is not None:
            d.env["VGPU_SIM_CTX_OVERHEAD"] = str(ctx_overhead)
        d.start()
        try:
            yield d
        finally:
            d.cleanup()
            if limits is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    return vgpud


def walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every node of a `vgpuctl tree --json` document."""
    yield node
    for child in node.get("children", []):
        yield from walk(child)


def find_process(tree: dict[str, Any], pid: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(slice node, process entry) for pid in a tree document."""
    for node in walk(tree):
        for p in node.get("processes", []):
            if p.get("pid") == pid:
                return node, p
    return None


_simcuda: Any = None


def sim_stats(shm: str, pid: int) -> tuple[int, int]:
    """(busy_ns, mem_bytes) of pid as the simulated device itself counts them:
    the ground truth the daemon's figures are checked against."""
    global _simcuda
    import ctypes

    if _simcuda is None:
        _simcuda = ctypes.CDLL(str(SIMDIR / "libcuda.so.1"))
    busy, mem = ctypes.c_uint64(), ctypes.c_uint64()
    old = os.environ.get("VGPU_SIM_SHM")
    os.environ["VGPU_SIM_SHM"] = shm
    try:
        if _simcuda.vgpuSimProcessStats(pid, ctypes.byref(busy), ctypes.byref(mem)) != 0:
            raise LookupError(f"pid {pid} unknown to the simulated device")
    finally:
        if old is None:
            os.environ.pop("VGPU_SIM_SHM", None)
        else:
            os.environ["VGPU_SIM_SHM"] = old
    return int(busy.value), int(mem.value)


def sim_mem_sum(shm: str, pids: Sequence[int]) -> int:
    """Memory the simulated device says `pids` hold together, read as one
    consistent snapshot (a sum of separate reads can count memory twice
    when one process frees it and another gets it in between)."""
    global _simcuda
    import ctypes

    if _simcuda is None:
        _simcuda = ctypes.CDLL(str(SIMDIR / "libcuda.so.1"))
    arr = (ctypes.c_int * len(pids))(*pids)
    out = ctypes.c_uint64()
    old = os.environ.get("VGPU_SIM_SHM")
    os.environ["VGPU_SIM_SHM"] = shm
    try:
        if _simcuda.vgpuSimMemorySum(arr, len(pids), ctypes.byref(out)) != 0:
            raise LookupError("simulated device not found")
    finally:
        if old is None:
            os.environ.pop("VGPU_SIM_SHM", None)
        else:
            os.environ["VGPU_SIM_SHM"] = old
    return int(out.value)


class JsonLines:
    """A child's stdout, one JSON line at a time, each with a deadline (a
    program that stalls must fail the test, not hang it), and its stdin for
    the go-ahead lines such programs wait for."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.q.put(line)
        self.q.put(None)

    def next(self, timeout: float) -> dict[str, Any]:
        while True:
            try:
                line = self.q.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no line from the program within {timeout} s") from None
            assert line is not None, "the program exited"
            if line.startswith("{"):
                return dict(json.loads(line))

    def say(self, line: str = "go") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
