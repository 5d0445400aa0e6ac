"""What the daemon keeps of one connection after its hello: a ``Session``.

Sessions are made at registration (``_sessions``), served by the lane
(``_lane``), used by the memory, compute and control services, and dropped
when the connection ends. Like everything in the daemon they are touched on
its one thread only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from structlog.typing import FilteringBoundLogger

from vgpu_cgroup._core import Ticket
from vgpu_cgroup._wire import ClientShm, proto


@dataclass
class Session:
    """Daemon-side state of one connection after its hello."""

    id: int
    role: str
    pid: int
    uid: int
    comm: str
    slice: str
    log: FilteringBoundLogger
    shm: ClientShm | None = None
    slots: dict[int, str] = field(default_factory=dict)  # slot -> device UUID
    dev_slot: dict[str, int] = field(default_factory=dict)
    in_tree: bool = False
    overhead: dict[str, int] = field(default_factory=dict)  # dev -> booked overhead bytes
    overhead_checked: dict[str, int] = field(default_factory=dict)  # dev -> clock ns
    last_grant_ns: int = 0
    audited: bool = False
    readmitted: bool = False  # re-declared held memory after a daemon restart
    #: slots whose cuMemGetInfo view a release changed, published after the
    #: replies to the same read are sent (a grant in that read publishes it)
    stale_views: set[int] = field(default_factory=set)
    #: devices on which a reservation has read NVML (see MemoryService)
    looked: set[str] = field(default_factory=set)
    #: the connection's charge in the slice's bounds (see _core._bounds)
    ticket: Ticket | None = None

    @property
    def slice_key(self) -> str:
        """The slice the connection is charged to: its cgroup at accept
        (``slice`` differs in ``declared`` identity mode)."""
        return self.ticket.slice if self.ticket is not None else self.slice

    def device_of(self, slot: int, rid: int | None) -> str:
        """The device attached at ``slot``; a protocol error if none is."""
        uuid = self.slots.get(slot)
        if uuid is None:
            raise proto.ProtocolError("invalid", f"slot {slot} is not attached", id=rid)
        return uuid


class Close(Exception):
    """End this connection quietly (peer went away)."""
