"""The slice tree's index: slices by path, the nodes and per-client state,
and the effective limits along a path. Pure state, no I/O.

``SliceTree`` (``_tree``) is this index with its memory books
(``_tree_memory``), its views (``_tree_views``), knobs and membership.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from ._config import ConfigError, canonical_cgroup_path, expand_slice_name
from ._knobs import (
    CORES_IDLE,
    CORES_MAX,
    CORES_MIN,
    CORES_WEIGHT,
    DEVICES,
    KNOBS,
    MEMORY_HIGH,
    MEMORY_MAX,
    WEIGHT_DEFAULT,
    DeviceRef,
    KnobValue,
    PerDevice,
    Scalar,
    default_value,
)

_DEFAULTS: dict[str, KnobValue] = {k: default_value(k) for k in KNOBS}


@dataclass(frozen=True)
class Limits:
    """Effective limits of a slice: the tightest along its path from the root.

    ``cores_*`` are percent of one GPU, as the knobs are written.
    """

    cores_max: float | None
    cores_min: float
    weight: int
    mem_max: int | None
    mem_high: int | None
    devices: tuple[str, ...] | None


@dataclass(frozen=True)
class Grant:
    """A reservation was admitted and booked."""

    n: int


@dataclass(frozen=True)
class Denial:
    """A reservation was refused by ``slice``'s ``gpu.memory.max``."""

    slice: str
    limit: int
    current: int


@dataclass(eq=False)
class Node:
    """One slice. Usage counters include every descendant (hierarchical)."""

    path: str
    parent: Node | None
    children: dict[str, Node] = field(default_factory=dict)
    knobs: dict[str, tuple[KnobValue, object, str]] = field(default_factory=dict)
    configured: bool = False
    clients: set[int] = field(default_factory=set)
    current: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)
    #: gpu.memory.events: this slice's events and its descendants'
    ev_high: int = 0
    ev_max: int = 0
    ev_oom: int = 0
    #: gpu.memory.events.local: this slice's own
    lev_high: int = 0
    lev_max: int = 0
    lev_oom: int = 0
    usage_ns: int = 0
    throttled_ns: int = 0
    nr_throttled: int = 0
    #: the same three per device (UUID): [usage_ns, throttled_ns, nr_throttled]
    cores_dev: dict[str, list[int]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def get(self, knob: str) -> KnobValue:
        """The knob's own value on this slice (default when unset)."""
        v = self.knobs.get(knob)
        return _DEFAULTS[knob] if v is None else v[0]

    def on(self, knob: str, dev: DeviceRef | None) -> Scalar:
        """The knob's own value on one GPU (``dev``; None: on a GPU that no
        per-device value names)."""
        v = self.get(knob)
        if isinstance(v, PerDevice):
            return v.on(dev)
        assert v is None or isinstance(v, int | float)
        return v

    def per_device(self) -> bool:
        """Whether some knob of this slice has values per GPU."""
        return any(isinstance(v[0], PerDevice) for v in self.knobs.values())

    def cores_max_on(self, dev: DeviceRef | None) -> float | None:
        v = self.on(CORES_MAX, dev)
        return None if v is None else float(v)

    def cores_min_on(self, dev: DeviceRef | None) -> float:
        return float(self.on(CORES_MIN, dev) or 0)

    def weight_on(self, dev: DeviceRef | None) -> int:
        v = self.on(CORES_WEIGHT, dev)
        return int(v) if v is not None else WEIGHT_DEFAULT

    def mem_max_on(self, dev: DeviceRef | None) -> int | None:
        v = self.on(MEMORY_MAX, dev)
        return None if v is None else int(v)

    def mem_high_on(self, dev: DeviceRef | None) -> int | None:
        v = self.on(MEMORY_HIGH, dev)
        return None if v is None else int(v)

    # The values on a GPU that no per-device value names.
    @property
    def cores_max(self) -> float | None:
        return self.cores_max_on(None)

    @property
    def cores_min(self) -> float:
        return self.cores_min_on(None)

    @property
    def weight(self) -> int:
        return self.weight_on(None)

    @property
    def cores_idle(self) -> bool:
        """``gpu.cores.idle``: best-effort, like cgroup v2's ``cpu.idle``."""
        return bool(self.get(CORES_IDLE))

    @property
    def mem_max(self) -> int | None:
        return self.mem_max_on(None)

    @property
    def mem_high(self) -> int | None:
        return self.mem_high_on(None)

    @property
    def devices(self) -> tuple[str, ...] | None:
        v = self.get(DEVICES)
        assert v is None or isinstance(v, tuple)
        return v

    def ancestry(self) -> Iterator[Node]:
        """This node, then its parent, up to the root."""
        n: Node | None = self
        while n is not None:
            yield n
            n = n.parent

    def subtree(self) -> Iterator[Node]:
        yield self
        for c in self.children.values():
            yield from c.subtree()


@dataclass(eq=False)
class ClientState:
    """One connection: where it lives and what it holds."""

    client: int
    node: Node
    pid: int
    comm: str
    held: dict[str, int] = field(default_factory=dict)
    devices: list[str] = field(default_factory=list)
    usage_ns: int = 0
    throttled_ns: int = 0
    nr_throttled: int = 0
    #: per device, (slice, its gpu.memory.max, its gpu.memory.high there),
    #: leaf first, valid while the tree's generation is ``chain_gen`` (see
    #: SliceTree._chain)
    chains: dict[str, list[tuple[Node, int | None, int | None]]] = field(default_factory=dict)
    chain_gen: int = -1


def tightest(node: Node, knob: str) -> int | None:
    """The smallest value of an integer knob set on the node or an ancestor."""
    best: int | None = None
    for n in node.ancestry():
        v = n.get(knob)
        if v is not None:
            best = int(v) if best is None else min(best, int(v))  # type: ignore[arg-type]
    return best


def check_bytes(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"byte count must be a positive integer, got {n!r}")
    return n


class SliceIndex:
    """The nodes of the tree and the clients in them, found by path; the
    state every part of ``SliceTree`` shares."""

    def __init__(self) -> None:
        self.root = Node("", None)
        self.clients: dict[int, ClientState] = {}
        #: bumped on every knob change, so caches (the share scheduler) can tell.
        self.generation = 0
        #: bumped whenever a client attaches, detaches or starts using a device.
        self.membership = 0
        #: bumped whenever memory is booked or given back anywhere.
        self.mem_version = 0
        #: the node's GPUs by UUID (``set_devices``): what per-device values
        #: that name a GPU by index are matched against
        self.device_refs: dict[str, DeviceRef] = {}

    def set_devices(self, refs: list[DeviceRef]) -> None:
        """The node's GPUs (each UUID with its index)."""
        self.device_refs = {r.uuid: r for r in refs}
        self.generation += 1

    def ref(self, dev: str) -> DeviceRef:
        """The GPU a UUID names, for per-device values (one unknown to the
        tree gets index -1: only values that name it by UUID apply)."""
        r = self.device_refs.get(dev)
        return r if r is not None else DeviceRef(dev, -1)

    def _lookup(self, path: str) -> Node | None:
        node = self.root
        if path == "":
            return node
        for comp in path.split("/"):
            nxt = node.children.get(comp)
            if nxt is None:
                return None
            node = nxt
        return node

    def _ensure(self, path: str) -> Node:
        node = self.root
        if path == "":
            return node
        acc = ""
        for comp in path.split("/"):
            acc = comp if not acc else f"{acc}/{comp}"
            nxt = node.children.get(comp)
            if nxt is None:
                nxt = Node(acc, node)
                node.children[comp] = nxt
            node = nxt
        return node

    def _prune(self, node: Node | None) -> None:
        """Remove implicit slices with nothing left in them, walking upwards."""
        while node is not None and node.parent is not None:
            if (
                node.configured
                or node.clients
                or node.children
                or any(node.current.values())
            ):
                return
            parent = node.parent
            if parent.children.get(node.name) is node:
                del parent.children[node.name]
            node = parent

    def resolve(self, slice: str) -> str:
        """Canonical path of a slice named by path or by systemd unit name.

        An existing slice with exactly that path wins (``my-job.slice`` at
        the root); otherwise a unit name is expanded (``tenants-alice.slice``
        → ``tenants.slice/tenants-alice.slice``). Raises ConfigError.
        """
        path = canonical_cgroup_path(slice)
        if self._lookup(path) is not None:
            return path
        return expand_slice_name(slice)

    def node(self, slice: str) -> Node:
        """The node of an existing slice; KeyError if there is none."""
        try:
            path = self.resolve(slice)
        except ConfigError as e:
            raise KeyError(slice) from e
        node = self._lookup(path)
        if node is None:
            raise KeyError(slice)
        return node

    def slices(self) -> list[str]:
        """Every slice path, parents before children."""
        return [n.path for n in self.root.subtree()]

    def node_at(self, path: str) -> Node:
        """The node at a canonical path, taken literally; KeyError if none."""
        node = self._lookup(path)
        if node is None:
            raise KeyError(path)
        return node

    def _client(self, client: int) -> ClientState:
        try:
            return self.clients[client]
        except KeyError:
            raise KeyError(f"unknown client {client}") from None

    def effective_limits(self, slice: str, dev: str | None = None) -> Limits:
        """Tightest limits along the slice's path (KeyError if unknown), on
        GPU ``dev`` (a UUID; None: on a GPU that no per-device value names).

        ``cores_max``, ``mem_max``, ``mem_high``: the minimum set on the path;
        ``cores_min``: the slice's own, capped by the effective max;
        ``weight``: the slice's own; ``devices``: those every level allows
        (compared as written: an index and a UUID of the same GPU differ).
        """
        return self._limits(self.node(slice), None if dev is None else self.ref(dev))

    def _limits(self, node: Node, dev: DeviceRef | None = None) -> Limits:
        cmax: float | None = None
        mmax: int | None = None
        mhigh: int | None = None
        devs: tuple[str, ...] | None = None
        for n in node.ancestry():
            c, m, h = n.cores_max_on(dev), n.mem_max_on(dev), n.mem_high_on(dev)
            if c is not None:
                cmax = c if cmax is None else min(cmax, c)
            if m is not None:
                mmax = m if mmax is None else min(mmax, m)
            if h is not None:
                mhigh = h if mhigh is None else min(mhigh, h)
            d = n.devices
            if d is not None:
                devs = d if devs is None else tuple(x for x in devs if x in d)
        cmin = node.cores_min_on(dev)
        cmin = cmin if cmax is None else min(cmin, cmax)
        return Limits(cmax, cmin, node.weight_on(dev), mmax, mhigh, devs)
