"""The README's demo: vgpud on built-in defaults and two tenants under quotas.

    python -m vgpu_cgroup._demo            # orchestrate (what scripts/demo runs)
    python -m vgpu_cgroup._demo workload   # one tenant's CUDA program

The workload is an ordinary CUDA driver-API program written with ctypes: it
knows nothing of vgpu. It runs 1 ms kernels for a few seconds, then allocates
64 MiB buffers until CUDA says out of memory, and reports what it got. On the
simulated GPU the device's own busy-time counter says what share it really
had. With no NVIDIA driver the demo runs vgpud on the simulated GPU (an
explicit --simulate, never a silent fallback).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

_KERNEL_NS = 1_000_000
MiB = 1 << 20


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} failed with CUDA error {rc}")


def workload(seconds: float) -> dict[str, Any]:
    cuda = ctypes.CDLL("libcuda.so.1")
    _check(cuda.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    _check(cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    ctx = ctypes.c_void_p()
    _check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    _check(cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    mod = ctypes.c_void_p()
    _check(cuda.cuModuleLoadData(ctypes.byref(mod), b"vgpu-sim"), "cuModuleLoadData")
    fn = ctypes.c_void_p()
    _check(cuda.cuModuleGetFunction(ctypes.byref(fn), mod, b"sim_sleep_ns"), "cuModuleGetFunction")
    ns = ctypes.c_uint64(_KERNEL_NS)
    params = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.byref(ns), ctypes.c_void_p))
    busy0 = ctypes.c_uint64()
    mem = ctypes.c_uint64()
    have_sim = hasattr(cuda, "vgpuSimProcessStats")
    if have_sim:
        cuda.vgpuSimProcessStats(0, ctypes.byref(busy0), ctypes.byref(mem))
    t0 = time.monotonic()
    launches = 0
    while time.monotonic() - t0 < seconds:
        for _ in range(10):
            _check(cuda.cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, None, params, None), "launch")
            launches += 1
        _check(cuda.cuCtxSynchronize(), "cuCtxSynchronize")
    wall = time.monotonic() - t0
    res: dict[str, Any] = {"pid": os.getpid(), "launches": launches, "seconds": round(wall, 2)}
    if have_sim:
        busy1 = ctypes.c_uint64()
        cuda.vgpuSimProcessStats(0, ctypes.byref(busy1), ctypes.byref(mem))
        res["gpu_share"] = round((busy1.value - busy0.value) / 1e9 / wall, 3)
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    _check(cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)), "cuMemGetInfo")
    got = 0
    ptr = ctypes.c_uint64()
    while cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(64 * MiB)) == 0:
        got += 64 * MiB
    res["mem_total_seen_mib"] = total.value // MiB
    res["mem_allocated_mib"] = got // MiB
    return res


def _vgpuctl(*args: str) -> list[str]:
    return [sys.executable, "-m", "vgpu_cgroup._ctl", *args]


def orchestrate() -> int:
    simulate = not os.path.exists("/dev/nvidiactl")
    tmp = tempfile.mkdtemp(prefix="vgpu-demo-")
    env = dict(os.environ)
    if simulate:
        env["VGPU_SIM_SHM"] = f"vgpu-demo-{os.getpid()}"
        env["VGPU_SIM_MEM"] = "8G"
    daemon_cmd = [sys.executable, "-m", "vgpu_cgroup._daemon_main"]
    if simulate:
        daemon_cmd.append("--simulate")
        print("demo: no NVIDIA driver here, so vgpud runs on the simulated GPU (--simulate)")
    log = open(os.path.join(tmp, "vgpud.log"), "wb")  # noqa: SIM115 - closed in finally
    daemon = subprocess.Popen(daemon_cmd, env=env, stdout=log, stderr=log)
    try:
        for _ in range(100):
            if subprocess.run(_vgpuctl("tree"), env=env, capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            with open(os.path.join(tmp, "vgpud.log")) as f:
                print(f.read(), file=sys.stderr)
            print("demo: vgpud did not start", file=sys.stderr)
            return 1
        tenants = [
            ("demo-alice.slice", {"gpu.cores.max": "30", "gpu.memory.max": "2G"}),
            ("demo-bob.slice", {"gpu.cores.max": "60", "gpu.memory.max": "1G"}),
        ]
        procs = []
        for slice_, knobs in tenants:
            cmd = _vgpuctl("run", "--slice", slice_)
            for k, v in knobs.items():
                cmd += ["-p", f"{k}={v}"]
            cmd += ["--", sys.executable, "-m", "vgpu_cgroup._demo", "workload"]
            print("$ vgpuctl " + " ".join(cmd[3:]))
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
        time.sleep(2.5)
        print("$ vgpuctl tree")
        subprocess.run(_vgpuctl("tree"), env=env, check=False)
        print("$ vgpuctl top")
        subprocess.run(_vgpuctl("top"), env=env, check=False)
        ok = True
        for (slice_, knobs), p in zip(tenants, procs, strict=True):
            out, _ = p.communicate(timeout=120)
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            if p.returncode != 0 or not lines:
                print(f"demo: tenant {slice_} failed (exit {p.returncode})", file=sys.stderr)
                ok = False
                continue
            r = json.loads(lines[-1])
            print(
                f"{slice_}: cap {knobs['gpu.cores.max']}% of the GPU -> device busy share "
                f"{r.get('gpu_share', '?')}; cap {knobs['gpu.memory.max']} -> sees "
                f"{r['mem_total_seen_mib']} MiB total, allocated {r['mem_allocated_mib']} MiB "
                "before CUDA_ERROR_OUT_OF_MEMORY"
            )
        return 0 if ok else 1
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["workload"]:
        seconds = float(argv[1]) if len(argv) > 1 else 4.0
        print(json.dumps(workload(seconds)), flush=True)
        return 0
    return orchestrate()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
