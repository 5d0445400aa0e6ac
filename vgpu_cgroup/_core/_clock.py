"""GPU time in the clock the uncapped workload would see.

A GPU boosts its clocks when it is lightly loaded and drops them when it runs
flat out against its power limit (an H200 doing bf16 matrix work: about
15 % apart). A tenant capped at 30 % of the GPU's *time* runs its share at
boost clocks and so does more than 30 % of the *work* it would do uncapped
(measured on the H200: 0.35 of native throughput at exactly 0.300 of the
time). Caps are promised as a fraction of what the tenant would get alone,
so the daemon charges GPU time scaled by the SM clock it ran at, relative to
the clock of a fully busy GPU, raised to how strongly the work's speed
follows the clock:

    charge = busy_ns * (clock_now / clock_full) ** exponent

Work that only computes runs in proportion to the clock (exponent 1); work
that waits on memory hardly cares (0). The premium is the device's, and each
group pays it in proportion to how often the GPU was held down by its power
cap while that group owned it (``Arbiter.group_scale``): on the H200 a bf16
matmul loop capped at 30 ran its windows at about 1910 MHz, power-capped in
most samples, and did 0.353 of its native work in 0.30 of the time against
a full-load clock of about 1550 MHz (exponent 0.7; 1.1 at a cap of 60),
while a transformer trainer's small kernels were never power-capped and
did no more than their share of time's work at any clock. The default is
0.8 and ``clock_exponent`` in vgpud.toml sets it.

``clock_full`` is learned from NVML whenever the device is (nearly) fully
busy *and* power-capped, and starts at the maximum SM clock (so before it
is learned, caps err towards the tenant). Devices that report no clock are
charged plain time.
"""

from __future__ import annotations

from dataclasses import dataclass

#: utilization (percent) above which a clock sample counts as "fully busy"
FULL_UTIL = 95
#: weight of a new fully-busy sample in the running estimate
ALPHA = 0.05
MIN_SCALE, MAX_SCALE = 0.5, 1.5
#: default exponent of the clock ratio (see the module's docstring)
CLOCK_EXPONENT = 0.8


@dataclass
class ClockScale:
    """Per-device charge scale, fed with (clock MHz, utilization %) samples."""

    full_mhz: float | None = None
    now_mhz: float | None = None
    exponent: float = CLOCK_EXPONENT

    def sample(self, mhz: int, util: int, max_mhz: int | None = None,
               power_capped: bool = True) -> None:
        """One NVML sample. The full-load clock is learned only where the
        GPU is both fully busy and held down by its power cap: a fully busy
        GPU running work that does not draw that power stays at its boost
        clock, which would make every premium vanish."""
        if mhz <= 0:
            return
        self.now_mhz = float(mhz)
        if self.full_mhz is None:
            self.full_mhz = float(max_mhz or mhz)
        if util >= FULL_UTIL and power_capped:
            self.full_mhz += ALPHA * (mhz - self.full_mhz)

    @property
    def scale(self) -> float:
        if not self.full_mhz or not self.now_mhz:
            return 1.0
        ratio = min(MAX_SCALE, max(MIN_SCALE, self.now_mhz / self.full_mhz))
        return float(ratio**self.exponent)

    def charge(self, busy_ns: int) -> int:
        return int(busy_ns * self.scale)
