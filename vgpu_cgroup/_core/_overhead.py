"""Memory a process holds on a GPU that no allocation call reported.

The driver takes memory of its own for every context (hundreds of MiB on an
H200) and for every module it loads, and a pool may keep freed memory. None
of it passes through an allocation call the hook sees, yet it fills the GPU
all the same, so a slice capped at 4 GiB must count it or NVML would show the
slice above its cap. The daemon therefore compares, per process and device,
what the driver reports (NVML's per-process used memory) with what the
process reserved, and books the difference into the slice as *overhead*.

The comparison races with allocation: between a granted reservation and the
driver's allocation, NVML shows less than was reserved. If the booking
followed that dip, the slice would look emptier than it is and a neighbour
could be admitted past the cap. So the booking only grows while
reservations are being granted, and shrinks only after a quiet spell with no
grant (``QUIET_NS``), when NVML and the reservations agree again.
"""

from __future__ import annotations

QUIET_NS = 1_000_000_000
#: Unreserved memory above this is worth an audit line: more than a context
#: and its modules, so likely memory allocated around the hook.
AUDIT_BYTES = 2 << 30


def overhead_target(nvml_used: int, reserved: int, booked: int, quiet: bool) -> int:
    """The overhead to book next, given what NVML reports for the process
    (`nvml_used`), what it holds through reservations (`reserved`), what is
    booked as overhead now (`booked`), and whether no reservation was
    granted to it recently (`quiet`)."""
    want = max(0, nvml_used - reserved)
    if want >= booked or quiet:
        return want
    return booked
