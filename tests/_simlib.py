"""Load and drive the simulated GPU (libhook/sim) from Python tests.

The simulated driver binds its shared device (VGPU_SIM_SHM) at cuInit and
keeps it for the life of the process, like a real driver keeps its device
nodes. Tests that need a fresh device therefore run their CUDA code in a
subprocess (`run_py`); the vgpuSim* stats calls and NVML re-read the
environment on every call/init, so the test process itself can inspect any
simulated device.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SIM_SRC = ROOT / "libhook" / "sim"
MiB = 1 << 20

CUDA_SUCCESS = 0
CUDA_ERROR_INVALID_VALUE = 1
CUDA_ERROR_OUT_OF_MEMORY = 2
CUDA_ERROR_NOT_INITIALIZED = 3
CUDA_ERROR_NO_DEVICE = 100
CUDA_ERROR_INVALID_DEVICE = 101
CUDA_ERROR_INVALID_CONTEXT = 201
CUDA_ERROR_INVALID_HANDLE = 400
CUDA_ERROR_NOT_FOUND = 500
CUDA_ERROR_NOT_READY = 600

_u64 = ctypes.c_uint64
_sz = ctypes.c_size_t
_vp = ctypes.c_void_p
_pvp = ctypes.POINTER(ctypes.c_void_p)
_pu64 = ctypes.POINTER(ctypes.c_uint64)
_psz = ctypes.POINTER(ctypes.c_size_t)
_int = ctypes.c_int
_uint = ctypes.c_uint

# name -> argtypes; every entry returns CUresult (int).
_SIGNATURES: dict[str, list[Any]] = {
    "cuInit": [_uint],
    "cuDriverGetVersion": [ctypes.POINTER(_int)],
    "cuDeviceGet": [ctypes.POINTER(_int), _int],
    "cuDeviceGetCount": [ctypes.POINTER(_int)],
    "cuDeviceGetName": [ctypes.c_char_p, _int, _int],
    "cuDeviceGetUuid_v2": [ctypes.c_char_p, _int],
    "cuDeviceTotalMem_v2": [_psz, _int],
    "cuDeviceGetAttribute": [ctypes.POINTER(_int), _int, _int],
    "cuDeviceGetDefaultMemPool": [_pvp, _int],
    "cuDevicePrimaryCtxRetain": [_pvp, _int],
    "cuDevicePrimaryCtxRelease_v2": [_int],
    "cuDevicePrimaryCtxReset_v2": [_int],
    "cuCtxCreate_v2": [_pvp, _uint, _int],
    "cuCtxDestroy_v2": [_vp],
    "cuCtxSetCurrent": [_vp],
    "cuCtxGetCurrent": [_pvp],
    "cuCtxPushCurrent_v2": [_vp],
    "cuCtxPopCurrent_v2": [_pvp],
    "cuCtxSynchronize": [],
    "cuModuleLoadData": [_pvp, ctypes.c_char_p],
    "cuModuleGetFunction": [_pvp, _vp, ctypes.c_char_p],
    "cuModuleUnload": [_vp],
    "cuMemAlloc_v2": [_pu64, _sz],
    "cuMemAllocPitch_v2": [_pu64, _psz, _sz, _sz, _uint],
    "cuMemAllocManaged": [_pu64, _sz, _uint],
    "cuMemFree_v2": [_u64],
    "cuMemGetInfo_v2": [_psz, _psz],
    "cuMemcpyHtoD_v2": [_u64, ctypes.c_char_p, _sz],
    "cuMemcpyDtoH_v2": [ctypes.c_char_p, _u64, _sz],
    "cuMemsetD8_v2": [_u64, ctypes.c_ubyte, _sz],
    "cuArray3DCreate_v2": [_pvp, _vp],
    "cuArrayDestroy": [_vp],
    "cuMipmappedArrayCreate": [_pvp, _vp, _uint],
    "cuMipmappedArrayDestroy": [_vp],
    "cuMemGetAllocationGranularity": [_psz, _vp, _int],
    "cuMemCreate": [_pu64, _sz, _vp, ctypes.c_ulonglong],
    "cuMemRelease": [_u64],
    "cuMemAddressReserve": [_pu64, _sz, _sz, _u64, ctypes.c_ulonglong],
    "cuMemAddressFree": [_u64, _sz],
    "cuMemMap": [_u64, _sz, _sz, _u64, ctypes.c_ulonglong],
    "cuMemUnmap": [_u64, _sz],
    "cuMemSetAccess": [_u64, _sz, _vp, _sz],
    "cuMemAllocAsync": [_pu64, _sz, _vp],
    "cuMemAllocFromPoolAsync": [_pu64, _sz, _vp, _vp],
    "cuMemFreeAsync": [_u64, _vp],
    "cuMemPoolCreate": [_pvp, _vp],
    "cuMemPoolDestroy": [_vp],
    "cuMemPoolTrimTo": [_vp, _sz],
    "cuMemPoolSetAttribute": [_vp, _int, _vp],
    "cuMemPoolGetAttribute": [_vp, _int, _vp],
    "cuLaunchKernel": [_vp, _uint, _uint, _uint, _uint, _uint, _uint, _uint, _vp, _vp, _vp],
    "cuStreamCreate": [_pvp, _uint],
    "cuStreamDestroy_v2": [_vp],
    "cuStreamSynchronize": [_vp],
    "cuStreamQuery": [_vp],
    "cuStreamWaitEvent": [_vp, _vp, _uint],
    "cuStreamBeginCapture_v2": [_vp, _int],
    "cuStreamEndCapture": [_vp, _pvp],
    "cuStreamIsCapturing": [_vp, ctypes.POINTER(_int)],
    "cuThreadExchangeStreamCaptureMode": [ctypes.POINTER(_int)],
    "cuStreamGetFlags": [_vp, ctypes.POINTER(_uint)],
    "cuEventCreate": [_pvp, _uint],
    "cuEventRecord": [_vp, _vp],
    "cuEventQuery": [_vp],
    "cuEventSynchronize": [_vp],
    "cuEventElapsedTime_v2": [ctypes.POINTER(ctypes.c_float), _vp, _vp],
    "cuEventDestroy_v2": [_vp],
    "cuGraphInstantiateWithFlags": [_pvp, _vp, ctypes.c_ulonglong],
    "cuGraphLaunch": [_vp, _vp],
    "cuGraphExecDestroy": [_vp],
    "cuGraphDestroy": [_vp],
    "cuGetProcAddress_v2": [ctypes.c_char_p, _pvp, _int, _u64, ctypes.POINTER(_int)],
    "vgpuSimProcessStats": [_int, _pu64, _pu64],
    "vgpuSimProcessDeviceStats": [_int, _int, _pu64, _pu64],
    "vgpuSimDeviceStats": [_int, _pu64, _pu64, _pu64],
    "vgpuSimReset": [],
}


def build(out: Path) -> Path:
    """Build the sim into `out` (make -C libhook/sim OUT=out); return the lib dir."""
    subprocess.run(["make", "-s", "-C", str(SIM_SRC), f"OUT={out}"], check=True)
    return out / "sim"


def load_cuda(simdir: Path | str) -> ctypes.CDLL:
    """Load the simulated libcuda.so.1 with argtypes set (64-bit values survive)."""
    lib = ctypes.CDLL(str(Path(simdir) / "libcuda.so.1"))
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = ctypes.c_int
    return lib


def load_nvml(simdir: Path | str) -> ctypes.CDLL:
    """Load the simulated NVML globally so pynvml's dlopen of the soname finds it."""
    return ctypes.CDLL(str(Path(simdir) / "libnvidia-ml.so.1"), mode=ctypes.RTLD_GLOBAL)


def new_shm_name() -> str:
    return f"vgpu-simtest-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def unlink_shm(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"/dev/shm/{name}")


@contextlib.contextmanager
def shm_env(name: str) -> Iterator[None]:
    """Point this process's vgpuSim* / NVML calls at the device `name` for a while."""
    old = os.environ.get("VGPU_SIM_SHM")
    os.environ["VGPU_SIM_SHM"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VGPU_SIM_SHM", None)
        else:
            os.environ["VGPU_SIM_SHM"] = old


def check(rc: int, what: str = "call") -> None:
    if rc != CUDA_SUCCESS:
        raise RuntimeError(f"{what} failed with CUresult {rc}")


class Cuda:
    """Thin conveniences over the simulated driver for test programs."""

    def __init__(self, simdir: Path | str) -> None:
        self.lib = load_cuda(simdir)

    def init_ctx(self) -> int:
        """cuInit, retain and make current the primary context; return it."""
        check(self.lib.cuInit(0), "cuInit")
        ctx = _vp()
        check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0), "retain")
        check(self.lib.cuCtxSetCurrent(ctx), "setcurrent")
        return int(ctx.value or 0)

    def sleep_fn(self) -> int:
        mod, fn = _vp(), _vp()
        check(self.lib.cuModuleLoadData(ctypes.byref(mod), b"vgpu-sim"), "module")
        check(self.lib.cuModuleGetFunction(ctypes.byref(fn), mod, b"sim_sleep_ns"), "function")
        return int(fn.value or 0)

    def launch_sleep(self, fn: int, ns: int, stream: int | None = None) -> int:
        val = _u64(ns)
        params = (_vp * 1)(ctypes.cast(ctypes.byref(val), _vp))
        return int(self.lib.cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, stream, params, None))

    def alloc(self, n: int) -> tuple[int, int]:
        p = _u64()
        rc = self.lib.cuMemAlloc_v2(ctypes.byref(p), n)
        return int(rc), int(p.value)

    def mem_info(self) -> tuple[int, int]:
        free, total = _sz(), _sz()
        check(self.lib.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)), "meminfo")
        return int(free.value), int(total.value)

    def event(self, flags: int = 0) -> int:
        ev = _vp()
        check(self.lib.cuEventCreate(ctypes.byref(ev), flags), "event")
        return int(ev.value or 0)

    def elapsed_ms(self, a: int, b: int) -> float:
        ms = ctypes.c_float()
        check(self.lib.cuEventElapsedTime_v2(ctypes.byref(ms), a, b), "elapsed")
        return float(ms.value)

    def stats(self, pid: int = 0) -> tuple[int, int]:
        """(busy_ns, mem_bytes) of pid (0: this process) on the device in VGPU_SIM_SHM."""
        busy, mem = _u64(), _u64()
        if self.lib.vgpuSimProcessStats(pid, ctypes.byref(busy), ctypes.byref(mem)) != 0:
            raise LookupError(f"pid {pid} unknown to the simulated device")
        return int(busy.value), int(mem.value)

    def dev_stats(self, dev: int, pid: int = 0) -> tuple[int, int]:
        """(busy_ns, mem_bytes) of pid (0: this process) on physical device dev."""
        busy, mem = _u64(), _u64()
        if self.lib.vgpuSimProcessDeviceStats(pid, dev, ctypes.byref(busy),
                                              ctypes.byref(mem)) != 0:
            raise LookupError(f"pid {pid} unknown to the simulated device")
        return int(busy.value), int(mem.value)


def _program(code: str, simdir: Path | str) -> str:
    return (
        "import ctypes, json, os, sys, time\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "from _simlib import *\n"
        f"cu = Cuda({str(simdir)!r})\n"
        "lib = cu.lib\n"
        "def out(obj):\n"
        "    print('RESULT ' + json.dumps(obj), flush=True)\n"
        + textwrap.dedent(code)
    )


def spawn_py(code: str, simdir: Path | str, env: Mapping[str, str]) -> subprocess.Popen[str]:
    """Start `code` in a fresh interpreter with `cu = Cuda(simdir)` and `lib` bound;
    it calls `out(obj)` to hand back a JSON value (read it with `result_of`)."""
    return subprocess.Popen([sys.executable, "-c", _program(code, simdir)],
                            env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_py(code: str, simdir: Path | str, env: Mapping[str, str], timeout: float = 30.0) -> Any:
    """spawn_py + result_of: run to completion, fail with its stderr."""
    return result_of(spawn_py(code, simdir, env), timeout)


def result_of(p: subprocess.Popen[str], timeout: float = 30.0) -> Any:
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise
    if p.returncode != 0:
        raise RuntimeError(f"subprocess failed ({p.returncode}):\n{stderr[-3000:]}")
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return None
