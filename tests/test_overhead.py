"""The overhead booking rule: grows at once, shrinks only when quiet."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vgpu_cgroup._core._overhead import overhead_target

MiB = 1 << 20


def test_context_overhead_is_booked() -> None:
    assert overhead_target(nvml_used=300 * MiB, reserved=0, booked=0, quiet=False) == 300 * MiB


def test_dip_during_allocation_does_not_shrink() -> None:
    # 1 GiB reserved but not yet allocated: NVML still shows only the context.
    assert overhead_target(300 * MiB, 1024 * MiB, 300 * MiB, quiet=False) == 300 * MiB


def test_shrinks_when_quiet() -> None:
    # A pool was trimmed and nothing was granted for a while.
    assert overhead_target(400 * MiB, 100 * MiB, 500 * MiB, quiet=True) == 300 * MiB


@given(st.integers(0, 1 << 40), st.integers(0, 1 << 40), st.integers(0, 1 << 40), st.booleans())
def test_never_negative_and_never_below_unreserved(used: int, res: int, booked: int,
                                                   quiet: bool) -> None:
    got = overhead_target(used, res, booked, quiet)
    assert got >= 0
    assert got >= used - res
    if not quiet:
        assert got >= booked
