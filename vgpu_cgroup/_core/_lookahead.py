"""Letting the owner's queue run out before a neighbour due on its schedule.

A neighbour that may take the device at once (pre-approved: the owner is
best-effort beside it, or an uncapped owner it would preempt) launches the
moment it wakes, but what the owner has queued still runs first: the
neighbour's first kernel waits behind it, time-sliced by the hardware. A
request-driven neighbour (an inference server: a request every few ms)
wakes on a schedule, so the owner can be told when its queue must have run:
the owner's grant is HOLD with that time and the time from which it may
launch freely again (the neighbour is late), and its hooks launch only what
their estimate of their queue says fits before it. The neighbour then finds
the device empty, while the owner kept the GPU busy until just before.

Earlier the daemon itself stopped the owner a fixed lead before the
neighbour was due (H200, an inference beside a best-effort trainer: a 2 ms
lead took the inference's p50 / p99 from 1.30x / 2.05x of solo to 1.11x /
1.28x but left the trainer 0.44 of what the inference left, instead of
0.85: its CPU runs just ahead of its GPU, so its queue was shallow when it
stopped and the GPU idled until the request). The hooks know their queue;
the daemon only knows when the neighbour is due. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable

from ._device import ArbiterParams, Group


def hold_window(now: int, neighbours: Iterable[Group],
                p: ArbiterParams) -> tuple[int, int] | None:
    """The owner's hold for the ``neighbours`` that may take the device at
    once (idle now, pre-approved), as (end, until): its queued work must
    have run ``yield_lead_ns`` and the neighbour's jitter before the
    earliest one is due (``end``), and from ``yield_slack_ns`` (or twice
    the jitter) after the due time it launches freely again (``until``: a
    late neighbour stalls it no longer; it has missed its slot). None: no
    neighbour on a schedule, or ``yield_lead_ns`` is 0."""
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
        end = due - lead - int(g.jitter_ns)
        if best is None or end < best[0]:
            best = (end, until)
    return best


def resume_at(owner: Group, nxt: str | None, gives_way: bool, p: ArbiterParams) -> int | None:
    """When the group next in line (``nxt``, which ``gives_way`` to the
    owner: the owner took the device from it at once) may launch again
    while the owner serves a request: ``resume_lead_ns`` before the owner
    is expected to go idle, if its busy spells are regular. None: not."""
    if nxt is None or not gives_way or p.resume_lead_ns <= 0 or not owner.busy:
        return None
    end = owner.expected_idle()
    return None if end is None else end - p.resume_lead_ns
