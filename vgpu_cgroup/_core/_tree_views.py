"""The slice tree as JSON-ready views: one slice (``vgpuctl show``) and the
whole tree (``vgpuctl tree``, ``top``, metrics). Pure, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._config import ConfigError
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
    default_value,
    format_knob,
)
from ._tree_index import Node, SliceIndex, tightest


class TreeViews(SliceIndex):
    """``show`` and ``snapshot`` (``SliceTree``'s)."""

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

    @staticmethod
    def _stat_devices(node: Node) -> dict[str, dict[str, int]]:
        """``gpu.cores.stat`` per device (UUID), like cgroup v2's io.stat."""
        return {dev: {"usage_usec": u // 1000, "throttled_usec": t // 1000, "nr_throttled": n}
                for dev, (u, t, n) in sorted(node.cores_dev.items())}

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
            CLIENTS_MAX: format_knob(CLIENTS_MAX, tightest(node, CLIENTS_MAX)),
        }
        return {
            "slice": node.path,
            "configured": node.configured,
            "knobs": knobs,
            "effective": effective,
            "effective.devices": self._effective_devices(node),
            "gpu.memory.current": self._mem(node.current),
            "gpu.memory.peak": self._mem(node.peak),
            "gpu.memory.events": {"high": node.ev_high, "max": node.ev_max, "oom": node.ev_oom},
            "gpu.memory.events.local": {"high": node.lev_high, "max": node.lev_max,
                                        "oom": node.lev_oom},
            "gpu.cores.stat": self._stat(node),
            "gpu.cores.stat.devices": self._stat_devices(node),
            "processes": self._procs(node),
            "children": sorted(node.children),
        }

    def _effective_devices(self, node: Node) -> dict[str, dict[str, str]]:
        """Where a knob on the path has values per GPU: the effective limits
        on each of the node's GPUs (UUID: knob: text); else nothing."""
        if not any(n.per_device() for n in node.ancestry()):
            return {}
        out: dict[str, dict[str, str]] = {}
        for uuid, ref in sorted(self.device_refs.items(), key=lambda kv: kv[1].index):
            lim = self._limits(node, ref)
            out[uuid] = {
                CORES_MAX: format_knob(CORES_MAX, lim.cores_max),
                CORES_MIN: format_knob(CORES_MIN, lim.cores_min),
                CORES_WEIGHT: format_knob(CORES_WEIGHT, lim.weight),
                MEMORY_MAX: format_knob(MEMORY_MAX, lim.mem_max),
                MEMORY_HIGH: format_knob(MEMORY_HIGH, lim.mem_high),
            }
        return out

    def _snap(self, node: Node) -> dict[str, Any]:
        return {
            "slice": node.path,
            "name": node.name,
            "configured": node.configured,
            "knobs": {k: format_knob(k, v[0]) for k, v in sorted(node.knobs.items())},
            "processes": self._procs(node),
            "memory": self._mem(node.current),
            "cores": {**self._stat(node), "devices": self._stat_devices(node)},
            "children": [self._snap(c) for _, c in sorted(node.children.items())],
        }

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready nested view of the whole tree, for ``tree`` and ``top``."""
        return self._snap(self.root)
