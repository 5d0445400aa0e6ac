"""Clock-scaled charging: plain time until clocks are known, then busy time
times clock/full-load clock, learned only from fully busy samples."""

from __future__ import annotations

import pytest

from vgpu_cgroup._core._clock import CLOCK_EXPONENT, ClockScale


def test_no_clock_is_plain_time() -> None:
    assert ClockScale().charge(1000) == 1000


def test_boosted_work_costs_more_than_its_time() -> None:
    c = ClockScale()
    for _ in range(200):  # an uncapped job held the GPU flat out at 1700 MHz
        c.sample(1700, 100, max_mhz=1980)
    assert c.full_mhz == pytest.approx(1700, abs=5)
    c.sample(1980, 30)  # a capped tenant runs its share at boost clocks
    boosted = 1_000_000 * (1980 / 1700) ** CLOCK_EXPONENT
    assert c.charge(1_000_000) == pytest.approx(boosted, rel=0.01)
    c.exponent = 1.0  # work that only computes: the whole clock ratio
    assert c.charge(1_000_000) == pytest.approx(1_000_000 * 1980 / 1700, rel=0.01)
    c.exponent = 0.0  # work that only waits on memory: plain time
    assert c.charge(1_000_000) == 1_000_000


def test_light_load_does_not_teach_the_full_load_clock() -> None:
    c = ClockScale()
    c.sample(1980, 40, max_mhz=1980)
    for _ in range(100):
        c.sample(1200, 10)
    assert c.full_mhz == 1980
    assert c.scale == pytest.approx((1200 / 1980) ** CLOCK_EXPONENT)


def test_scale_is_bounded() -> None:
    c = ClockScale(full_mhz=1000.0, exponent=1.0)
    c.sample(5000, 0)
    assert c.scale == 1.5


def test_a_fully_busy_gpu_below_its_power_cap_does_not_teach_the_full_load_clock() -> None:
    # A trainer's small kernels keep the GPU busy at its boost clock without
    # reaching the power limit: that is no full-load clock of power-bound work.
    c = ClockScale()
    for _ in range(200):
        c.sample(1980, 100, max_mhz=1980, power_capped=False)
    assert c.full_mhz == 1980
    for _ in range(200):
        c.sample(1550, 100, power_capped=True)
    assert c.full_mhz == pytest.approx(1550, abs=5)
