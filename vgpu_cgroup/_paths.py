"""Where things are on this machine: the C libraries shipped inside the
package (``make -C libhook`` builds them into ``vgpu_cgroup/_lib``) and the
cgroup v2 mount. For every part of vgpu but the pure core.
"""

from __future__ import annotations

import os

from vgpu_cgroup._core import cgroup2_mount

LIB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_lib")
#: The hook that ``vgpuctl run`` (and the Kubernetes plugins) preload.
HOOK_LIB = os.path.join(LIB_DIR, "libvgpu-hook.so")
#: The simulated GPU: libcuda.so.1 and libnvidia-ml.so.1.
SIM_DIR = os.path.join(LIB_DIR, "sim")
SIM_NVML = os.path.join(SIM_DIR, "libnvidia-ml.so.1")


def find_cgroup2_mount() -> str:
    """The cgroup v2 mount point of this machine."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return cgroup2_mount(f.read())
