"""GPU discovery through NVML, real or simulated.

Real hardware goes through ``pynvml`` (the nvidia-ml-py package).  The
simulated GPU is the ``libnvidia-ml.so.1`` built in ``libhook/sim`` and
shipped in ``vgpu_cgroup/_lib/sim``: it is loaded with RTLD_GLOBAL before
``nvmlInit`` so pynvml's ``dlopen("libnvidia-ml.so.1")`` finds it by soname.
Simulation is always explicit; with no driver and no ``--simulate`` the
daemon stops with an error that says so, never falls back silently.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from dataclasses import dataclass

import pynvml

from vgpu_cgroup._paths import SIM_NVML


class NvmlError(Exception):
    """GPU discovery failed; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Device:
    index: int
    uuid: str
    name: str
    total_mem: int


def _text(v: str | bytes) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def load_simulated(path: str = SIM_NVML) -> None:
    """Make the simulated NVML the one pynvml will bind to."""
    if not os.path.exists(path):
        raise NvmlError(
            f"simulated NVML not found at {path} (build it with `make -C libhook sim`)"
        )
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def discover(*, simulate: bool, sim_path: str = SIM_NVML) -> list[Device]:
    """Every GPU NVML reports, in index order."""
    if simulate:
        load_simulated(sim_path)
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        if simulate:
            raise NvmlError(f"simulated NVML failed to initialise: {exc}") from None
        raise NvmlError(
            f"no NVIDIA driver usable ({exc}); on a machine without a GPU pass "
            "--simulate (or simulate = true in vgpud.toml) to use the simulated GPU"
        ) from None
    try:
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            devices.append(Device(index=i, uuid=_text(pynvml.nvmlDeviceGetUUID(h)),
                                  name=_text(pynvml.nvmlDeviceGetName(h)),
                                  total_mem=int(mem.total)))
        return devices
    except pynvml.NVMLError as exc:
        raise NvmlError(f"NVML device query failed: {exc}") from None


def process_memory(index: int) -> dict[int, int]:
    """GPU memory used per pid on a device, as the driver sees it (used to
    reconcile context overhead that no allocation call reports)."""
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
    except pynvml.NVMLError as exc:
        raise NvmlError(f"NVML process query failed on device {index}: {exc}") from None
    return {int(p.pid): int(p.usedGpuMemory or 0) for p in procs}


def shutdown() -> None:
    with contextlib.suppress(pynvml.NVMLError):
        pynvml.nvmlShutdown()


#: nvmlClocksEventReasonSwPowerCap: the clock is held down to stay within the power limit
POWER_CAP_REASON = 0x4


def clocks(index: int) -> tuple[int, int, bool] | None:
    """(current SM clock MHz, GPU utilization %, whether the power cap holds
    the clock down) of a device, or None where the driver does not report
    them (the simulated GPU, some vGPUs)."""
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        sm = int(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM))
        util = int(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
    except (pynvml.NVMLError, AttributeError):
        return None
    get = (getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
           or getattr(pynvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None))
    try:
        reasons = int(get(h)) if get is not None else 0
    except pynvml.NVMLError:
        reasons = 0
    return sm, util, bool(reasons & POWER_CAP_REASON)


def max_sm_clock(index: int) -> int | None:
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        return int(pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM))
    except (pynvml.NVMLError, AttributeError):
        return None


def process_util(index: int, since_us: int) -> dict[int, float]:
    """Per pid, NVML's average SM utilization (percent of the GPU) over its
    samples since `since_us` (microseconds since the epoch). The driver's own
    view of who used the GPU: a cross-check of vgpu's measured GPU time. {}
    when the driver has no samples or does not support the query."""
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        samples = pynvml.nvmlDeviceGetProcessUtilization(h, since_us)
    except (pynvml.NVMLError, AttributeError):
        return {}
    acc: dict[int, list[int]] = {}
    for smp in samples:
        acc.setdefault(int(smp.pid), []).append(int(smp.smUtil))
    return {pid: sum(v) / len(v) for pid, v in acc.items()}
