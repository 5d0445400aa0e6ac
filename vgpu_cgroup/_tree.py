"""The slice tree: knobs per slice, memory admission and accounting.

Pure state, no I/O. The daemon is single-threaded, so ``reserve`` checks every
ancestor's ``gpu.memory.max`` and books the allocation in one step: that is
what makes admission exact under any concurrency of clients.

Slices are cgroup v2 paths relative to the root (``""``). A slice exists when
configuration names it (*configured*) or when a client lives at or below it
(*implicit*); implicit slices disappear when their last client leaves.

As in cgroup v2, every value a slice shows includes its descendants: usage,
peaks and ``gpu.memory.events`` (an event counts at the slice where it
happened and at each ancestor; ``gpu.memory.events.local`` has only the
slice's own), and the root takes no knobs (its limits are the node's) but
has every statistic.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._config import (
    ROOT_KNOBS,
    ConfigError,
    SliceSetting,
    canonical_cgroup_path,
    expand_slice_name,
)
from ._knobs import (
    CLIENTS_MAX,
    CORES_IDLE,
    CORES_MAX,
    CORES_MIN,
    CORES_WEIGHT,
    DEVICES,
    KNOBS,
    MEMORY_HIGH,
    MEMORY_MAX,
    KnobValue,
    default_value,
    format_knob,
    parse_knob,
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

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def get(self, knob: str) -> KnobValue:
        """The knob's own value on this slice (default when unset)."""
        v = self.knobs.get(knob)
        return _DEFAULTS[knob] if v is None else v[0]

    @property
    def cores_max(self) -> float | None:
        v = self.get(CORES_MAX)
        return None if v is None else float(v)  # type: ignore[arg-type]

    @property
    def cores_min(self) -> float:
        return float(self.get(CORES_MIN))  # type: ignore[arg-type]

    @property
    def weight(self) -> int:
        return int(self.get(CORES_WEIGHT))  # type: ignore[arg-type]

    @property
    def cores_idle(self) -> bool:
        """``gpu.cores.idle``: best-effort, like cgroup v2's ``cpu.idle``."""
        return bool(self.get(CORES_IDLE))

    @property
    def mem_max(self) -> int | None:
        v = self.get(MEMORY_MAX)
        return None if v is None else int(v)  # type: ignore[arg-type]

    @property
    def mem_high(self) -> int | None:
        v = self.get(MEMORY_HIGH)
        return None if v is None else int(v)  # type: ignore[arg-type]

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
    #: (slice, its gpu.memory.max, its gpu.memory.high), leaf first, valid
    #: while the tree's generation is ``chain_gen`` (see SliceTree._chain)
    chain: list[tuple[Node, int | None, int | None]] = field(default_factory=list)
    chain_gen: int = -1


def _tightest(node: Node, knob: str) -> int | None:
    """The smallest value of an integer knob set on the node or an ancestor."""
    best: int | None = None
    for n in node.ancestry():
        v = n.get(knob)
        if v is not None:
            best = int(v) if best is None else min(best, int(v))  # type: ignore[arg-type]
    return best


def _check_bytes(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"byte count must be a positive integer, got {n!r}")
    return n


class SliceTree:
    """Slices (cgroup paths), their knobs, attached clients and usage."""

    def __init__(self) -> None:
        self.root = Node("", None)
        self.clients: dict[int, ClientState] = {}
        #: bumped on every knob change, so caches (the share scheduler) can tell.
        self.generation = 0
        #: bumped whenever a client attaches, detaches or starts using a device.
        self.membership = 0
        #: bumped whenever memory is booked or given back anywhere.
        self.mem_version = 0

    # ------------------------------------------------------------------ nodes

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

    def clients_max_chain(self, path: str) -> list[tuple[str, int]]:
        """The ``gpu.clients.max`` set along a cgroup path (root first), as
        (slice, max): what admission of a connection from ``path`` checks."""
        out: list[tuple[str, int]] = []
        node: Node | None = self.root
        for comp in path.split("/") if path else ():
            node = node.children.get(comp) if node is not None else None
            if node is None:
                break
            ent = node.knobs.get(CLIENTS_MAX)
            if ent is not None and ent[0] is not None:
                out.append((node.path, int(ent[0])))  # type: ignore[arg-type]
        return out

    # ------------------------------------------------------------------ knobs

    def apply_settings(self, settings: Sequence[SliceSetting]) -> None:
        """Replace all configured knobs with ``settings`` (later ones win).

        Live changes made with ``set_knobs`` are replaced too: a caller that
        wants them to survive a reload persists them in a layer (the runtime
        files) first. Every slice named becomes a *configured* slice.
        """
        for s in settings:
            if s.knob not in KNOBS:
                raise ValueError(f"unknown knob {s.knob!r} from {s.source}")
            if canonical_cgroup_path(s.slice) == "":
                raise ConfigError(s.source, None, ROOT_KNOBS)
        old = list(self.root.subtree())
        for n in old:
            n.knobs.clear()
            n.configured = False
        for s in settings:
            node = self._ensure(canonical_cgroup_path(s.slice))
            node.configured = True
            node.knobs[s.knob] = (s.value, s.raw, s.source)
        for n in old:
            if not n.children:
                self._prune(n)
        self.generation += 1

    def set_knobs(self, slice: str, knobs: Mapping[str, object], source: str) -> str:
        """Live change of one slice's knobs; returns the slice's canonical path.

        Every value is validated before any is applied, so a KnobError (or a
        ConfigError for the root, which takes no knobs) leaves the tree
        unchanged. Takes effect at the scheduler's next tick.
        """
        path, parsed = self.check_knobs(slice, knobs)
        node = self._ensure(path)
        node.configured = True
        for k, v in parsed.items():
            node.knobs[k] = (v, knobs[k], source)
        self.generation += 1
        return path

    def check_knobs(self, slice: str, knobs: Mapping[str, object]
                    ) -> tuple[str, dict[str, KnobValue]]:
        """What :meth:`set_knobs` would apply: the canonical path and the
        parsed values. Raises as it does, changing nothing, so a caller can
        check before it persists anything."""
        path = self.resolve(slice)
        if path == "":
            raise ConfigError("-.slice", None, ROOT_KNOBS)
        return path, {k: parse_knob(k, v) for k, v in knobs.items()}

    def effective_limits(self, slice: str) -> Limits:
        """Tightest limits along the slice's path (KeyError if unknown).

        ``cores_max``, ``mem_max``, ``mem_high``: the minimum set on the path;
        ``cores_min``: the slice's own, capped by the effective max;
        ``weight``: the slice's own; ``devices``: those every level allows
        (compared as written: an index and a UUID of the same GPU differ).
        """
        return self._limits(self.node(slice))

    def _limits(self, node: Node) -> Limits:
        cmax: float | None = None
        mmax: int | None = None
        mhigh: int | None = None
        devs: tuple[str, ...] | None = None
        for n in node.ancestry():
            if n.cores_max is not None:
                cmax = n.cores_max if cmax is None else min(cmax, n.cores_max)
            if n.mem_max is not None:
                mmax = n.mem_max if mmax is None else min(mmax, n.mem_max)
            if n.mem_high is not None:
                mhigh = n.mem_high if mhigh is None else min(mhigh, n.mem_high)
            d = n.devices
            if d is not None:
                devs = d if devs is None else tuple(x for x in devs if x in d)
        cmin = node.cores_min if cmax is None else min(node.cores_min, cmax)
        return Limits(cmax, cmin, node.weight, mmax, mhigh, devs)

    # ---------------------------------------------------------------- clients

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

    def attach(self, client: int, cgroup_path: str, pid: int, comm: str) -> str:
        """Put a client in the slice at ``cgroup_path``; return the canonical path.

        ``cgroup_path`` is taken literally (no unit-name expansion): it comes
        from ``/proc/<pid>/cgroup``. Implicit slices are created along it.
        """
        if client in self.clients:
            raise ValueError(f"client {client} is already attached")
        try:
            path = canonical_cgroup_path(cgroup_path)
        except ConfigError as e:
            raise ValueError(e.msg) from e
        node = self._ensure(path)
        node.clients.add(client)
        self.clients[client] = ClientState(client, node, pid, comm)
        self.membership += 1
        return path

    def detach(self, client: int) -> None:
        """Release everything the client holds and prune empty implicit slices.

        Unknown clients are ignored, so the daemon can call this on every
        connection close whatever stage it reached.
        """
        st = self.clients.pop(client, None)
        if st is None:
            return
        self.membership += 1
        self.mem_version += 1
        for dev, n in st.held.items():
            for node in st.node.ancestry():
                node.current[dev] = node.current.get(dev, 0) - n
        st.held.clear()
        st.node.clients.discard(client)
        self._prune(st.node)

    def client_slice(self, client: int) -> str:
        return self._client(client).node.path

    def client_nodes(self, client: int) -> list[Node]:
        """The client's slices, leaf first, root last."""
        return list(self._client(client).node.ancestry())

    def attach_device(self, client: int, dev: str) -> None:
        """Record that the client uses device ``dev`` (a UUID).

        Does not check ``gpu.devices``: call ``device_allowed`` first (it needs
        the index too, which only the daemon knows).
        """
        st = self._client(client)
        if dev not in st.devices:
            st.devices.append(dev)
            self.membership += 1

    def client_devices(self, client: int) -> list[str]:
        return list(self._client(client).devices)

    def clients_on_device(self, dev: str) -> list[int]:
        """Clients that attached ``dev`` (or hold memory there), by id."""
        return sorted(
            c for c, st in self.clients.items() if dev in st.devices or dev in st.held
        )

    def device_allowed(self, client: int, dev_uuid: str, dev_index: int) -> bool:
        """Whether every slice on the client's path allows the device."""
        for node in self._client(client).node.ancestry():
            d = node.devices
            if d is not None and dev_uuid not in d and str(dev_index) not in d:
                return False
        return True

    # ----------------------------------------------------------------- memory

    def _chain(self, st: ClientState) -> list[tuple[Node, int | None, int | None]]:
        """The client's slices with their memory limits, cached per knob
        generation: admission is the reservation round trip's hot path."""
        if st.chain_gen != self.generation:
            st.chain = [(n, n.mem_max, n.mem_high) for n in st.node.ancestry()]
            st.chain_gen = self.generation
        return st.chain

    def reserve(self, client: int, dev: str, n: int) -> Grant | Denial:
        """Exact admission of ``n`` bytes on ``dev`` against every ancestor's max.

        On success the bytes are booked on the client and every slice on its
        path (``peak`` and the ``high`` event updated). On refusal nothing is
        booked; the refusing slice has a ``max`` event and the leaf an
        ``oom`` event, each counted there (local) and on every ancestor.
        """
        n = _check_bytes(n)
        st = self._client(client)
        path = self._chain(st)
        for i, (node, lim, _high) in enumerate(path):
            cur = node.current.get(dev, 0)
            if lim is not None and cur + n > lim:
                node.lev_max += 1
                st.node.lev_oom += 1
                for j, (up, _l, _h) in enumerate(path):
                    up.ev_oom += 1
                    if j >= i:
                        up.ev_max += 1
                return Denial(node.path, lim, cur)
        self._book(st, path, dev, n)
        return Grant(n)

    def admit(self, client: int, dev: str, n: int, guard: int) -> tuple[int | None, int] | None:
        """:meth:`reserve` in one walk, when it is sure to succeed with at
        least ``guard`` bytes to spare on every slice; then the client's
        memory view after it, as :meth:`mem_view` would give. None, with
        nothing booked and nothing counted, when some slice would be left
        with less: the caller looks closer (the driver's own figures) and
        calls :meth:`reserve`.

        The reservation round trip's hot path: one pass over the path
        finds both whether the request fits and the tightest slice.
        """
        n = _check_bytes(n)
        st = self._client(client)
        path = self._chain(st)
        best: tuple[int, int] | None = None  # (headroom, limit) of the tightest
        for node, lim, _high in path:
            if lim is not None:
                room = lim - node.current.get(dev, 0)
                if room - n < guard:
                    return None
                if best is None or room < best[0]:
                    best = (room, lim)
        self._book(st, path, dev, n)
        if best is None:
            return None, st.node.current[dev]
        return best[1], best[1] - best[0] + n

    def _book(self, st: ClientState, path: list[tuple[Node, int | None, int | None]],
              dev: str, n: int) -> None:
        """Book admitted bytes on the client and every slice of its path.

        A slice left above its own ``gpu.memory.high`` has a ``high`` event;
        each slice counts those of itself and of the slices below it on the
        path (leaf first, so ``over`` is how many there were so far)."""
        over = 0
        for node, _lim, high in path:
            cur = node.current.get(dev, 0) + n
            node.current[dev] = cur
            if cur > node.peak.get(dev, 0):
                node.peak[dev] = cur
            if high is not None and cur > high:
                node.lev_high += 1
                over += 1
            node.ev_high += over
        st.held[dev] = st.held.get(dev, 0) + n
        self.mem_version += 1
        if dev not in st.devices:
            st.devices.append(dev)
            self.membership += 1

    def adopt(self, client: int, dev: str, n: int) -> Denial | None:
        """Book memory the client already holds, without admission.

        For ``hello{held}`` after a daemon restart: the memory exists on the
        GPU whatever the limits say now, so it is booked even when that puts
        a slice over its ``gpu.memory.max`` (later reservations are then
        refused until enough is freed; nothing is killed). Returns the Denial
        that a reserve would have got, for the caller to log, else None. No
        events are counted: no allocation failed.
        """
        n = _check_bytes(n)
        st = self._client(client)
        over: Denial | None = None
        for node in st.node.ancestry():
            lim = node.mem_max
            cur = node.current.get(dev, 0)
            if over is None and lim is not None and cur + n > lim:
                over = Denial(node.path, lim, cur)
            cur += n
            node.current[dev] = cur
            if cur > node.peak.get(dev, 0):
                node.peak[dev] = cur
        st.held[dev] = st.held.get(dev, 0) + n
        self.mem_version += 1
        if dev not in st.devices:
            st.devices.append(dev)
            self.membership += 1
        return over

    def release(self, client: int, dev: str, n: int) -> None:
        """Give back ``n`` bytes; ValueError if the client holds less."""
        n = _check_bytes(n)
        st = self._client(client)
        have = st.held.get(dev, 0)
        if n > have:
            raise ValueError(f"release of {n} bytes on {dev} but client holds {have}")
        st.held[dev] = have - n
        self.mem_version += 1
        if st.held[dev] == 0:
            del st.held[dev]
        for node, _lim, _high in self._chain(st):
            node.current[dev] -= n

    def held(self, client: int) -> dict[str, int]:
        """Bytes the client holds, per device."""
        return dict(self._client(client).held)

    def mem_view(self, client: int, dev: str) -> tuple[int | None, int]:
        """(limit, current) of the slice with the least headroom on the path.

        What ``cuMemGetInfo`` inside the slice should show. (None, the leaf's
        current) when no slice on the path has a ``gpu.memory.max``.
        """
        st = self._client(client)
        best: tuple[int, int] | None = None
        for node, lim, _high in self._chain(st):
            if lim is None:
                continue
            cur = node.current.get(dev, 0)
            if best is None or lim - cur < best[0] - best[1]:
                best = (lim, cur)
        if best is None:
            return None, st.node.current.get(dev, 0)
        return best

    # ------------------------------------------------------------------ cores

    def add_core_usage(
        self, client: int, dev: str, usage_ns: int, throttled_ns: int, nr_throttled: int
    ) -> None:
        """Accumulate GPU-time statistics into the client and every slice on its path."""
        if min(usage_ns, throttled_ns, nr_throttled) < 0:
            raise ValueError("core usage counters cannot go backwards")
        st = self._client(client)
        st.usage_ns += usage_ns
        st.throttled_ns += throttled_ns
        st.nr_throttled += nr_throttled
        for node in st.node.ancestry():
            node.usage_ns += usage_ns
            node.throttled_ns += throttled_ns
            node.nr_throttled += nr_throttled

    # ------------------------------------------------------------------ views

    def _procs(self, node: Node) -> list[dict[str, Any]]:
        return [
            {"pid": self.clients[c].pid, "comm": self.clients[c].comm, "client": c}
            for c in sorted(node.clients)
        ]

    @staticmethod
    def _mem(d: Mapping[str, int]) -> dict[str, Any]:
        return {"total": sum(d.values()), "devices": {k: v for k, v in sorted(d.items())}}

    def _stat(self, node: Node) -> dict[str, Any]:
        return {
            "usage_usec": node.usage_ns // 1000,
            "throttled_usec": node.throttled_ns // 1000,
            "nr_throttled": node.nr_throttled,
        }

    def _node_or_detached(self, slice: str) -> Node:
        """The slice's node, or one made for the view only (not in the tree)
        under its nearest existing ancestor: a slice known elsewhere (one
        that only has control connections, or refusals) shows its defaults
        and what its ancestors impose."""
        try:
            return self.node(slice)
        except KeyError:
            pass
        try:
            path = self.resolve(slice)
        except ConfigError as e:
            raise KeyError(slice) from e
        parent = self.root
        for comp in path.split("/")[:-1]:
            nxt = parent.children.get(comp)
            if nxt is None:
                break
            parent = nxt
        return Node(path, parent)

    def show(self, slice: str, *, missing_ok: bool = False) -> dict[str, Any]:
        """JSON-ready view of one slice (KeyError if unknown, unless
        ``missing_ok``: then an unknown slice shows as an empty one).

        ``knobs`` gives each writable knob's own value as cgroup text and the
        file (or ``vgpuctl``/``default``) that set it; ``effective`` the
        tightest values along the path.
        """
        node = self._node_or_detached(slice) if missing_ok else self.node(slice)
        knobs: dict[str, Any] = {}
        for name in KNOBS:
            ent = node.knobs.get(name)
            if ent is None:
                knobs[name] = {"value": format_knob(name, default_value(name)), "source": "default"}
            else:
                knobs[name] = {"value": format_knob(name, ent[0]), "source": ent[2]}
        lim = self._limits(node)
        effective = {
            CORES_MAX: format_knob(CORES_MAX, lim.cores_max),
            CORES_MIN: format_knob(CORES_MIN, lim.cores_min),
            CORES_WEIGHT: format_knob(CORES_WEIGHT, lim.weight),
            CORES_IDLE: format_knob(CORES_IDLE, int(node.cores_idle)),
            MEMORY_MAX: format_knob(MEMORY_MAX, lim.mem_max),
            MEMORY_HIGH: format_knob(MEMORY_HIGH, lim.mem_high),
            DEVICES: format_knob(DEVICES, lim.devices),
            CLIENTS_MAX: format_knob(CLIENTS_MAX, _tightest(node, CLIENTS_MAX)),
        }
        return {
            "slice": node.path,
            "configured": node.configured,
            "knobs": knobs,
            "effective": effective,
            "gpu.memory.current": self._mem(node.current),
            "gpu.memory.peak": self._mem(node.peak),
            "gpu.memory.events": {"high": node.ev_high, "max": node.ev_max, "oom": node.ev_oom},
            "gpu.memory.events.local": {"high": node.lev_high, "max": node.lev_max,
                                        "oom": node.lev_oom},
            "gpu.cores.stat": self._stat(node),
            "processes": self._procs(node),
            "children": sorted(node.children),
        }

    def _snap(self, node: Node) -> dict[str, Any]:
        return {
            "slice": node.path,
            "name": node.name,
            "configured": node.configured,
            "knobs": {k: format_knob(k, v[0]) for k, v in sorted(node.knobs.items())},
            "processes": self._procs(node),
            "memory": self._mem(node.current),
            "cores": self._stat(node),
            "children": [self._snap(c) for _, c in sorted(node.children.items())],
        }

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready nested view of the whole tree, for ``tree`` and ``top``."""
        return self._snap(self.root)
