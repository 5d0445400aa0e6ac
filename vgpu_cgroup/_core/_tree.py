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

from collections.abc import Mapping, Sequence

from ._config import ROOT_KNOBS, ConfigError, SliceSetting, canonical_cgroup_path
from ._knobs import CLIENTS_MAX, KNOBS, KnobValue, parse_knob
from ._tree_index import ClientState, Denial, Grant, Limits, Node
from ._tree_memory import MemoryBooks
from ._tree_views import TreeViews

__all__ = ["ClientState", "Denial", "Grant", "Limits", "Node", "SliceTree"]


class SliceTree(MemoryBooks, TreeViews):
    """Slices (cgroup paths), their knobs, attached clients and usage.

    The index of nodes is ``SliceIndex``'s (``_tree_index``), memory
    admission ``MemoryBooks``' (``_tree_memory``), the views
    ``TreeViews``' (``_tree_views``); knobs and membership are here."""

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

    def allowed_devices(self, client: int, devices: Sequence[tuple[str, int]]) -> list[str]:
        """The UUIDs of ``devices`` ((uuid, index) pairs) that every slice on
        the client's path allows, in the order given."""
        return [uuid for uuid, index in devices if self.device_allowed(client, uuid, index)]

    def add_core_usage(
        self, client: int, dev: str, usage_ns: int, throttled_ns: int, nr_throttled: int
    ) -> None:
        """Accumulate GPU-time statistics on device ``dev`` into the client and
        every slice on its path (the slices' per device too)."""
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
            per = node.cores_dev.get(dev)
            if per is None:
                per = node.cores_dev[dev] = [0, 0, 0]
            per[0] += usage_ns
            per[1] += throttled_ns
            per[2] += nr_throttled
