"""The daemon's memory service: reservations, device attach, and NVML's
view of what each process really holds.

A reservation is the one request a CUDA program waits on, so ``reserve`` is
short: once the process's context is booked, and with more than
NVML_GUARD_BYTES left on every slice after the request, it admits and books
in one walk of the tree (``SliceTree.admit``) with no driver query;
otherwise it reads NVML first (``_reserve_looking``). Memory the driver
takes for contexts and modules, which no allocation reports, is booked into
the process's slice by reconciliation (``_core._overhead``): on attach,
before a process's first reservation on a device, near a limit, and every
OVERHEAD_EVERY_TICKS ticks.

One thread: every method runs on the daemon's thread (from the lane, from
a handshake task or from the control tick), each to completion, so the
tree's admission is exact without locks. NVML is the only I/O here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from structlog.typing import FilteringBoundLogger

from vgpu_cgroup._core import AUDIT_BYTES, QUIET_NS, Denial, SliceTree, overhead_target
from vgpu_cgroup._wire import MAX_DEVICES, proto

from ._compute import ComputeService
from ._nvml import Device, NvmlError, process_memory
from ._session import Session

MAX_CTX_ESTIMATE = 2 << 30  # larger unreserved use is not a context: not learned
#: Headroom below which a reservation reads NVML before admission (see reserve).
NVML_GUARD_BYTES = 256 << 20
#: Memory views of neighbours' bookings are republished every this many ticks.
VIEW_EVERY_TICKS = 5
#: Clients polled or published between two checkpoints of the tick.
TICK_CHUNK = 16
OVERHEAD_EVERY_TICKS = 20  # NVML per-process memory is reconciled every 20 ticks (200 ms)


class MemoryService:
    """GPU memory of every device of the node (see the module docstring)."""

    def __init__(self, tree: SliceTree, devices: dict[str, Device], compute: ComputeService, *,
                 clock: Callable[[], int], log: FilteringBoundLogger) -> None:
        self.tree = tree
        self.devices = devices
        self.compute = compute
        self.clock = clock
        self.log = log
        self._nvml_warned = False
        #: per device, the largest context+module overhead seen (bytes)
        self._ctx_estimate: dict[str, int] = {}
        #: what the last tick published from (see publish_views)
        self._published: tuple[tuple[int, int], int] = ((-1, -1), -1)

    # ------------------------------------------------------------ requests

    def reserve(self, client: Session, ev: proto.Reserve) -> proto.Reply:
        uuid = client.device_of(ev.slot, ev.id)
        if ev.n == 0:
            return proto.Granted(id=ev.id)
        # Once the process's context is booked, and with more than
        # NVML_GUARD_BYTES left on every slice after this request, the
        # 200 ms reconciliation is recent enough: admit and book in one
        # walk, no driver query.
        if uuid not in client.looked:
            return self._reserve_looking(client, ev, uuid)
        view = self.tree.admit(client.id, uuid, ev.n, NVML_GUARD_BYTES)
        if view is None:
            return self._reserve_looking(client, ev, uuid)
        client.last_grant_ns = self.clock()
        client.stale_views.discard(ev.slot)
        if client.shm is not None:
            client.shm.write_mem_view(ev.slot, view[0], view[1])
        return proto.Granted(id=ev.id)

    def release(self, client: Session, ev: proto.Release) -> None:
        uuid = client.device_of(ev.slot, None)
        if ev.n:
            try:
                self.tree.release(client.id, uuid, ev.n)
            except ValueError as exc:
                raise proto.ProtocolError("invalid", str(exc)) from None
            client.stale_views.add(ev.slot)

    def _reserve_looking(self, client: Session, ev: proto.Reserve, uuid: str) -> proto.Reply:
        """A reservation that reads NVML first, so that admission sees the
        memory the process holds outside its reservations as it is now:
        its first on the device (its context exists by then, and may be the
        first on this device, with no estimate booked for it at attach), and
        any that would leave some slice under NVML_GUARD_BYTES (modules load
        lazily, pools grow)."""
        now = self.clock()
        client.looked.add(uuid)
        self.reconcile(client, uuid, now, self.nvml_used(uuid))
        res = self.tree.reserve(client.id, uuid, ev.n)
        if isinstance(res, Denial):
            client.log.info("allocation refused", dev=uuid, n=ev.n, limit_slice=res.slice,
                            limit=res.limit, current=res.current)
            return proto.Denied(id=ev.id, slice=res.slice, limit=res.limit,
                                current=res.current)
        client.last_grant_ns = now
        client.stale_views.discard(ev.slot)
        self.publish_mem_view(client, ev.slot, uuid)
        return proto.Granted(id=ev.id)

    def attach(self, client: Session, ev: proto.Attach) -> proto.Reply:
        """A device for the hook: its slot in the shared pages, after an
        estimate of the context it is about to create is admitted."""
        dev = self.devices.get(ev.dev)
        if dev is None:
            return proto.Error(code="device", msg=f"unknown device {ev.dev}", id=ev.id)
        if not self.tree.device_allowed(client.id, dev.uuid, dev.index):
            return proto.Error(code="device", id=ev.id,
                               msg=f"device {dev.index} ({dev.uuid}) not allowed by gpu.devices")
        assert client.shm is not None
        now = self.clock()
        slot = client.dev_slot.get(dev.uuid)
        if slot is None:
            free = [s for s in range(MAX_DEVICES) if s not in client.slots]
            if not free:
                return proto.Error(code="device", msg="all device slots in use", id=ev.id)
            # The context the hook is about to create takes memory no
            # allocation call reports: admit an estimate of it first (what
            # contexts on this device have measured), so a process that
            # joins a full slice fails with out-of-memory instead of pushing
            # the slice past its cap. Reconciliation replaces the estimate.
            est = self._ctx_estimate.get(dev.uuid, 0)
            if est and not client.readmitted and dev.uuid not in client.overhead:
                self.tree.attach_device(client.id, dev.uuid)
                res = self.tree.reserve(client.id, dev.uuid, est)
                if isinstance(res, Denial):
                    client.log.info("no memory left for a context", dev=dev.uuid, need=est,
                                    limit_slice=res.slice, limit=res.limit, current=res.current)
                    return proto.Error(code="oom", id=ev.id, msg=(
                        f"slice {res.slice or '-.slice'} has {max(0, res.limit - res.current)} "
                        f"bytes left of gpu.memory.max={res.limit}; a context needs about {est}"))
                client.overhead[dev.uuid] = est
                client.last_grant_ns = now
            slot = free[0]
            client.slots[slot] = dev.uuid
            client.dev_slot[dev.uuid] = slot
            self.tree.attach_device(client.id, dev.uuid)
            client.shm.activate(slot)
            self.compute.attach(client, dev.uuid)
        self.reconcile(client, dev.uuid, now, self.nvml_used(dev.uuid))
        limit, used = self.tree.mem_view(client.id, dev.uuid)
        client.shm.write_mem_view(slot, limit, used)
        return proto.Attached(id=ev.id, slot=slot, mem_limit=limit)

    def readmit(self, client: Session, held: tuple[proto.Held, ...]) -> None:
        """After a daemon restart: book what the client still holds.

        The memory is already allocated on the GPU, so refusing would only make
        accounting wrong: it is booked even over a cap (``SliceTree.adopt``),
        logged, and later reservations are refused until enough is freed.
        """
        client.readmitted = bool(held)
        for h in held:
            if h.dev not in self.devices:
                client.log.warning("held memory on unknown device ignored", dev=h.dev, n=h.n)
                continue
            if h.n == 0:
                continue
            self.tree.attach_device(client.id, h.dev)
            res = self.tree.adopt(client.id, h.dev, h.n)
            if res is not None:
                client.log.warning("re-declared memory exceeds the slice's limit",
                                   dev=h.dev, n=h.n, limit_slice=res.slice, limit=res.limit,
                                   current=res.current)

    # ------------------------------------------------------------ views

    def publish_stale_views(self, client: Session) -> None:
        """The views releases changed, once the read's replies are out: a
        hook batches its releases with its next reservation, whose grant
        then publishes the view itself."""
        while client.stale_views:
            slot = client.stale_views.pop()
            uuid = client.slots.get(slot)
            if uuid is not None:
                self.publish_mem_view(client, slot, uuid)

    def publish_mem_view(self, client: Session, slot: int, uuid: str) -> None:
        """The client's cuMemGetInfo view, right after its own usage changed
        (neighbours' changes reach it at the next tick)."""
        if client.shm is not None:
            limit, used = self.tree.mem_view(client.id, uuid)
            client.shm.write_mem_view(slot, limit, used)

    def publish_views(self, clients: list[Session], live: Callable[[int], bool],
                      ticks: int) -> Iterator[None]:
        """The tick's part: memory views of every client when slices, clients
        or knobs changed, or every VIEW_EVERY_TICKS ticks while bookings
        move (a client's own change is published when it is made, in
        ``reserve``; neighbours' reach cuMemGetInfo within 50 ms). Yields
        every TICK_CHUNK clients; ``live``: whether a client is still
        connected when its turn comes."""
        versions, mem_seen = self._published
        now_versions = (self.tree.generation, self.tree.membership)
        views_due = now_versions != versions or (
            self.tree.mem_version != mem_seen and ticks % VIEW_EVERY_TICKS == 0)
        if not views_due:
            return
        self._published = (now_versions, self.tree.mem_version)
        moved = now_versions != versions  # every page's seq says so, written or not
        # Clients in one slice see one memory view: walk each slice's path once.
        views: dict[tuple[str, str], tuple[int | None, int]] = {}
        for i, c in enumerate(clients):
            if i % TICK_CHUNK == 0:
                yield
                views.clear()  # reservations may have run meanwhile
            if c.shm is None or not live(c.id):
                continue
            wrote = moved
            for slot, uuid in c.slots.items():
                vkey = (c.slice, uuid)
                view = views.get(vkey)
                if view is None:
                    view = views[vkey] = self.tree.mem_view(c.id, uuid)
                wrote |= c.shm.write_mem_view(slot, *view)
            if wrote:
                c.shm.bump_seq()

    # ------------------------------------------------------------ overhead

    def nvml_used(self, uuid: str) -> dict[int, int] | None:
        """Per-pid memory on a device as the driver reports it now.

        Never cached: compared with reservations that move between two
        queries, a stale figure would book memory that was already freed.
        """
        try:
            used = process_memory(self.devices[uuid].index)
        except NvmlError as exc:
            if not self._nvml_warned:
                self._nvml_warned = True
                self.log.warning("cannot read per-process GPU memory; context overhead "
                                 "is not counted", error=str(exc))
            return None
        return used

    def reconcile(self, client: Session, uuid: str, now: int,
                  used: dict[int, int] | None) -> None:
        """Book the memory the client's process holds beyond its reservations
        (context, modules, pools) into its slice: see _core._overhead."""
        if used is None or not client.in_tree or client.pid not in used:
            return
        booked = client.overhead.get(uuid, 0)
        reserved = self.tree.held(client.id).get(uuid, 0) - booked
        quiet = now - client.last_grant_ns >= QUIET_NS
        target = overhead_target(used[client.pid], reserved, booked, quiet)
        client.overhead_checked[uuid] = now
        if target > booked:
            self.tree.adopt(client.id, uuid, target - booked)
        elif target < booked:
            self.tree.release(client.id, uuid, booked - target)
        client.overhead[uuid] = target
        measured = used[client.pid] - reserved
        if 0 < measured <= MAX_CTX_ESTIMATE and measured > self._ctx_estimate.get(uuid, 0):
            self._ctx_estimate[uuid] = measured
        if target > AUDIT_BYTES and not client.audited:
            client.audited = True
            client.log.warning("process uses GPU memory it never reserved: is the hook "
                               "bypassed?", dev=uuid, unreserved=target)

    def reconcile_all(self, clients: Iterable[Session], now: int,
                      per_dev: dict[str, dict[int, int] | None]) -> None:
        """Reconcile every client on every device from one NVML reading each."""
        clients = list(clients)
        for uuid, per_pid in per_dev.items():
            if per_pid is None:
                continue
            for c in clients:
                if uuid in c.dev_slot:
                    self.reconcile(c, uuid, now, per_pid)
