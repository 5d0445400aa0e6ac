"""The daemon's compute service: device ownership published to the hooks,
measurements read back, GPU time charged to slices.

Everything here runs on the daemon's one thread, called from the request
lane (``want``/``idle``, each handled to completion before the next, so an
arbiter never sees two events at once), from the host loop when an
arbiter's deadline is due (``run_due``), and from the control tick. It does
no I/O but shared-memory reads and writes and futex wakes: the decisions
are ``_arbiter``'s and ``_share``'s, pure.

A device on which no attached process's slice sets any GPU-time knob is
*ungated*: its hooks skip the gate (``UNLIMITED``), the hardware time-slices
as it would without vgpu, and usage is estimated from the hooks' measured
intervals (``_attrib``, display only). Once any knob asks for control, every
process on the device is gated and ownership decides who runs.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable, Iterator
from typing import Protocol

from vgpu_cgroup._core import (
    HOLD,
    RUN,
    WAIT,
    Arbiter,
    ArbiterParams,
    Attributor,
    ClockScale,
    ShareModel,
    SliceTree,
)
from vgpu_cgroup._wire import ClientShm

#: Most GPU time per launch a hook may claim (its window sizing input).
MAX_COST_NS = 100_000_000
#: Clients polled or published between two checkpoints of the tick.
TICK_CHUNK = 16


class Peer(Protocol):
    """What the service needs of a daemon connection (``_session.Session``)."""

    @property
    def id(self) -> int: ...
    @property
    def shm(self) -> ClientShm | None: ...
    @property
    def slots(self) -> dict[int, str]: ...
    @property
    def dev_slot(self) -> dict[str, int]: ...


class ComputeService:
    """GPU time on every device of the node (see the module docstring)."""

    def __init__(self, tree: SliceTree, devices: Iterable[str], *, lag_ns: int,
                 clock_exponent: float, params: ArbiterParams | None = None) -> None:
        self.tree = tree
        self.params = params or ArbiterParams()
        self.lag_ns = lag_ns
        #: one share model per GPU: knobs may have values per device
        self.models = {uuid: ShareModel(tree, tree.ref(uuid)) for uuid in devices}
        self.arbiters = {uuid: Arbiter(m, self.params) for uuid, m in self.models.items()}
        self.attrib = {uuid: Attributor() for uuid in self.arbiters}
        self.clock = {uuid: ClockScale(exponent=clock_exponent) for uuid in self.arbiters}
        self._peers: dict[int, Peer] = {}
        self._limited: dict[str, tuple[tuple[int, int], bool]] = {}
        self._beat = 0
        trace = os.environ.get("VGPU_DEBUG_ARBITER")
        self._trace = open(trace, "a", buffering=1 << 16) if trace else None  # noqa: SIM115
        if self._trace is not None:
            for a in self.arbiters.values():
                a.debug = self._note_line
        #: (tick time, {(slice, dev): charged ns}) for ``top``
        self.window: collections.deque[tuple[int, dict[tuple[str, str], int]]] = (
            collections.deque())

    # ----------------------------------------------------------- membership

    def attach(self, peer: Peer, uuid: str) -> None:
        """The peer attached ``uuid`` (its slot is active): gate it."""
        self._peers[peer.id] = peer
        arb = self.arbiters[uuid]
        arb.attach(peer.id, self.tree.client_slice(peer.id))
        self.publish(uuid)

    def detach(self, peer: Peer, now: int) -> None:
        """The peer is gone: whatever it owned is handed on."""
        if self._peers.pop(peer.id, None) is None:
            return
        for uuid in peer.slots.values():
            arb = self.arbiters.get(uuid)
            if arb is not None:
                arb.detach(peer.id, now)
                self.attrib[uuid].forget(peer.id)
                self.publish(uuid)

    # --------------------------------------------------------------- events

    def want(self, peer: Peer, slot: int, now: int, at: int | None = None) -> None:
        uuid = peer.slots.get(slot)
        if uuid is not None and self.gated(uuid):
            self.arbiters[uuid].want(peer.id, now, at)
            self.publish(uuid)
            self._note(now, "want", peer.id, uuid)

    def idle(self, peer: Peer, slot: int, now: int) -> None:
        uuid = peer.slots.get(slot)
        if uuid is not None and self.gated(uuid):
            self.arbiters[uuid].idle(peer.id, now)
            self.publish(uuid)
            self._note(now, "idle", peer.id, uuid)

    def drained(self, peer: Peer, slot: int, now: int) -> None:
        uuid = peer.slots.get(slot)
        if uuid is not None and self.gated(uuid):
            self.arbiters[uuid].drained(peer.id, now)
            self.publish(uuid)
            self._note(now, "drained", peer.id, uuid)

    def _note_line(self, line: str) -> None:
        if self._trace is not None:
            self._trace.write(line + "\n")

    def _note(self, now: int, what: str, client: int, uuid: str) -> None:
        """VGPU_DEBUG_ARBITER=FILE: every event and the owner after it (tuning)."""
        if self._trace is not None:
            arb = self.arbiters[uuid]
            b = " ".join(f"{k[-2:]}:{v / 1e6:.2f}" for k, v in sorted(arb.buckets.tokens().items()))
            vs = " ".join(f"{k[-2:]}:{g.v / 1e6:.1f}" for k, g in sorted(arb._groups.items()))
            self._trace.write(f"{now} {what} {client} {arb.owner} {sorted(arb.states().items())} "
                              f"b[{b}] v[{vs}]\n")

    def deadline(self) -> int | None:
        """The earliest arbiter deadline (CLOCK_MONOTONIC ns), if any."""
        due = [d for uuid, a in self.arbiters.items()
               if self.gated(uuid) and (d := a.deadline()) is not None]
        return min(due) if due else None

    def run_due(self, now: int) -> None:
        """Advance every arbiter whose deadline has come."""
        for uuid, arb in self.arbiters.items():
            d = arb.deadline()
            if d is not None and d <= now and self.gated(uuid):
                arb.advance(now)
                self.publish(uuid)
                self._note(now, "due", -1, uuid)

    # ------------------------------------------------------------ publishing

    def gated(self, uuid: str) -> bool:
        """Whether any knob on the device's processes' slices asks for control."""
        seen = (self.tree.generation, self.tree.membership)
        got = self._limited.get(uuid)
        if got is None or got[0] != seen:
            arb = self.arbiters[uuid]
            groups = {g for c in arb.clients() if (g := arb.group_of(c)) is not None}
            got = self._limited[uuid] = (seen, self.models[uuid].limited(groups))
        return got[1]

    def publish(self, uuid: str) -> None:
        """Write every process's gate on ``uuid`` where it changed."""
        arb = self.arbiters[uuid]
        gated = self.gated(uuid)
        states = arb.states()
        for cid, st in states.items():
            peer = self._peers.get(cid)
            if peer is None or peer.shm is None:
                continue
            slot = peer.dev_slot.get(uuid)
            if slot is None:
                continue
            if gated:
                peer.shm.write_gate(slot, st, unlimited=False, contended=arb.contended(cid),
                                    inflight_ns=arb.inflight_ns(cid),
                                    rate_ppm=round(arb.rate(cid) * 1_000_000),
                                    hold=_hold_of(arb, cid) if st == HOLD else None)
            else:
                peer.shm.write_gate(slot, RUN, unlimited=True, contended=False,
                                    inflight_ns=0, rate_ppm=1_000_000)

    # ------------------------------------------------------------------ tick

    def tick_steps(self, peers: list[Peer], now: int) -> Iterator[None]:
        """Read every hook's measurements, charge usage, keep waiters' heartbeats.

        A generator that yields after every TICK_CHUNK peers, so the lane is
        served in between."""
        self._beat += 1
        throttles: dict[tuple[int, str], tuple[int, int]] = {}
        waiting = {c for uuid, a in self.arbiters.items() if self.gated(uuid)
                   for c, st in a.states().items() if st == WAIT}
        for i, p in enumerate(peers):
            if i and i % TICK_CHUNK == 0:
                yield
            if p.shm is None or p.id not in self._peers:
                continue
            for slot, uuid in p.slots.items():
                news = p.shm.poll(slot)
                arb = self.arbiters[uuid]
                if news is not None:
                    drained, d_nr, d_ns = news
                    if drained.intervals:
                        if self.gated(uuid):
                            arb.measured(p.id, drained.intervals)
                            if self._trace is not None:
                                self._trace.write(f"{now} iv {p.id} " + " ".join(
                                    f"{a}-{b}" for a, b in drained.intervals) + "\n")
                        else:
                            att = self.attrib[uuid]
                            for start, end in drained.intervals:
                                att.add(p.id, start, end)
                    if d_nr or d_ns:
                        throttles[(p.id, uuid)] = (d_nr, d_ns)
                    arb.set_cost(p.id, min(MAX_COST_NS, p.shm.cost_ns(slot)))
            if p.id in waiting:
                p.shm.heartbeat(self._beat)
        yield
        window: dict[tuple[str, str], int] = collections.defaultdict(int)
        watermark = now - self.lag_ns
        for uuid, arb in self.arbiters.items():
            usage: dict[int, int] = {}
            if self.gated(uuid):
                arb.scale = self.clock[uuid].scale
                arb.advance(now)
            # Every tick, so a knob that gates or ungates a device reaches its
            # hooks (unchanged gates cost a comparison each).
            self.publish(uuid)
            if self.gated(uuid):
                members: dict[str, list[int]] = collections.defaultdict(list)
                for c in arb.clients():
                    g = arb.group_of(c)
                    if g is not None:
                        members[g].append(c)
                for g, ns in arb.take_usage().items():
                    cs = members.get(g, [])
                    for k, c in enumerate(cs):  # a group's time, split among its processes
                        usage[c] = ns // len(cs) + (1 if k < ns % len(cs) else 0)
                self.attrib[uuid].advance(watermark)  # drop what piled up while ungated
            else:
                usage = self.attrib[uuid].advance(watermark)
            for cid in set(usage) | {c for c, u in throttles if u == uuid}:
                if cid not in self.tree.clients:
                    continue
                ns = usage.get(cid, 0)
                d_nr, d_ns = throttles.get((cid, uuid), (0, 0))
                if ns or d_nr or d_ns:
                    self.tree.add_core_usage(cid, uuid, ns, d_ns, d_nr)
                if ns:
                    for node in self.tree.client_nodes(cid):
                        window[(node.path, uuid)] += ns
        self.window.append((now, dict(window)))

    def trim_window(self, now: int, span_ns: int) -> None:
        while self.window and self.window[0][0] <= now - span_ns:
            self.window.popleft()

    def slice_rates(self) -> dict[tuple[str, str], float]:
        """Each busy group's current rate per device (for show/status)."""
        return {(g, uuid): r for uuid, a in self.arbiters.items() for g, r in a.rates().items()}


def _hold_of(arb: Arbiter, client: int) -> tuple[int, int] | None:
    """A HOLD grant's (end, until) for the process: its group owns the
    device ahead of a neighbour's request, or is next in line and may
    launch again from ``until`` (``Arbiter.resume``)."""
    if arb.resume is not None and arb.group_of(client) == arb.resume[0]:
        return (0, arb.resume[1])
    return arb.hold
