"""Yielding ahead of a neighbour that wakes on a schedule (``_arbiter``).

A best-effort owner (``gpu.cores.idle``) hands the device over the moment a
non-idle neighbour asks, but what it has queued still runs first: the
neighbour's first kernel waits up to the owner's in-flight bound. A
request-driven neighbour (an inference server: a request every few ms)
wakes on a schedule, so the owner can stop launching shortly before it is
due and let its queue run out, and the neighbour finds the device empty.
Pure.
"""

from __future__ import annotations

from collections.abc import Iterable

from ._device import ArbiterParams, Group


def hold_window(now: int, neighbours: Iterable[Group],
                p: ArbiterParams) -> tuple[int, int] | None:
    """When a best-effort owner should stop launching, as (from, until), for
    the ``neighbours`` it yields to (idle now, pre-approved to take the
    device): from ``yield_lead_ns`` (about its in-flight bound) before the
    earliest one is due, so that its queued work has run when that
    neighbour's first kernel comes, to ``yield_slack_ns`` after (a late
    neighbour stalls it no longer; it has missed its slot). None: no
    neighbour on a schedule. H200, inference beside an idle-slice trainer:
    see docs/design.md."""
    lead = p.yield_lead_ns
    if lead <= 0:
        return None
    best: tuple[int, int] | None = None
    for g in neighbours:
        due = g.expected_wake()
        if due is None or g.period_ns < lead + 2 * p.yield_slack_ns:
            continue  # not on a schedule, or one too tight to run between
        until = due + max(p.yield_slack_ns, int(2 * g.jitter_ns))
        if now >= until:
            continue  # late: it has missed this slot
        start = due - lead - int(g.jitter_ns)
        if best is None or start < best[0]:
            best = (start, until)
    return best
