"""The control operations of vgpud: what ``vgpuctl``, the metrics endpoint
and the Kubernetes plugins ask of it.

``status``, ``show``, ``tree``, ``top`` and ``events`` read the tree, the
connection bounds and the compute service's last second; ``set`` and
``reset`` change knobs like ``systemctl set-property``/``revert`` (the
files first, then the live tree); ``reload`` is SIGHUP over the socket.
Changing anything needs uid 0 (the peer's, from ``SO_PEERCRED``).

One thread: every operation runs on the daemon's thread, from the lane,
to completion; the tree cannot change under one.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from collections.abc import Mapping
from typing import Any, Protocol

import vgpu_cgroup
from vgpu_cgroup._core import (
    CONTROL_HEADER,
    ClientBounds,
    ClientLimits,
    ConfigError,
    DaemonConfig,
    KnobError,
    SliceTree,
)
from vgpu_cgroup._wire import proto

from ._compute import ComputeService
from ._files import remove_slice_setting, write_runtime_setting
from ._nvml import Device, process_util
from ._session import Session

TOP_WINDOW_NS = 1_000_000_000


class ControlHost(Protocol):
    """What the control operations read of the daemon (``_daemon.Daemon``)."""

    @property
    def cfg(self) -> DaemonConfig: ...
    @property
    def tree(self) -> SliceTree: ...
    @property
    def bounds(self) -> ClientBounds: ...
    @property
    def limits(self) -> ClientLimits: ...
    @property
    def compute(self) -> ComputeService: ...
    @property
    def devices(self) -> Mapping[str, Device]: ...
    @property
    def clients(self) -> Mapping[int, Session]: ...
    @property
    def connections(self) -> int: ...
    @property
    def simulated(self) -> bool: ...
    @property
    def socket_activated(self) -> bool: ...
    @property
    def tick_ns(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    @property
    def config_error(self) -> str | None: ...
    @property
    def log(self) -> Any: ...
    def reload(self) -> bool: ...


class ControlOps:
    """``ctl`` requests (see the module docstring)."""

    def __init__(self, host: ControlHost) -> None:
        self.d = host

    def handle(self, client: Session, ev: proto.Ctl) -> proto.Reply:
        try:
            if ev.op == "status":
                return proto.Ok(id=ev.id, data=self.status())
            if ev.op == "show":
                return proto.Ok(id=ev.id, data=self.show(ev.slice or ""))
            if ev.op == "tree":
                return proto.Ok(id=ev.id, data=self.snapshot())
            if ev.op == "top":
                return proto.Ok(id=ev.id, data=self.top())
            if ev.op == "events":
                return proto.Ok(id=ev.id, data=self.events())
            if ev.op == "set":
                return self._set(client, ev)
            if ev.op == "reset":
                return self._reset(client, ev)
            if ev.op == "reload":
                return self._reload_op(client, ev)
        except KeyError as exc:
            return proto.Error(code="notfound", id=ev.id,
                               msg=f"no such slice: {exc.args[0]} (vgpuctl tree lists them)")
        except (KnobError, ConfigError) as exc:
            return proto.Error(code="invalid", msg=str(exc), id=ev.id)
        return proto.Error(code="invalid", msg=f"unknown op {ev.op}", id=ev.id)

    # ------------------------------------------------------------ changes

    def _set(self, client: Session, ev: proto.Ctl) -> proto.Reply:
        """Like ``systemctl set-property``: persistent (control layer) or,
        with ``runtime``, until reboot (runtime layer, which wins over the
        others). A persistent set also drops those knobs from the runtime
        file, so the value just set is the one that holds after a reload."""
        if client.uid != 0:
            return proto.Error(code="permission", id=ev.id,
                               msg="setting knobs needs root (peer uid is not 0)")
        assert ev.slice is not None
        cfg, tree = self.d.cfg, self.d.tree
        # Check first (the root takes no knobs), then persist: a bad value
        # or a failed write leaves both the files and the live tree untouched.
        path, _ = tree.check_knobs(ev.slice, ev.knobs)
        try:
            if ev.runtime:
                source = write_runtime_setting(cfg.run_slices_dir, path, ev.knobs)
            else:
                source = write_runtime_setting(cfg.control_slices_dir, path, ev.knobs,
                                               header=CONTROL_HEADER)
                remove_slice_setting(cfg.run_slices_dir, path, list(ev.knobs))
        except OSError as exc:
            layer = "runtime" if ev.runtime else "persistent"
            return proto.Error(code="internal", id=ev.id,
                               msg=f"cannot write {layer} setting: {exc}")
        path = tree.set_knobs(path, ev.knobs, source)
        self.d.log.info("knobs set", slice=path, knobs=ev.knobs, runtime=ev.runtime,
                        source=source, uid=client.uid, pid=client.pid)
        return proto.Ok(id=ev.id, data={"slice": path, "knobs": dict(ev.knobs),
                                        "source": source, "show": self.show(path),
                                        "config_error": self.d.config_error})

    def _reset(self, client: Session, ev: proto.Ctl) -> proto.Reply:
        """Remove what ``vgpuctl set`` put on a slice: its runtime file, and
        with ``runtime=False`` its persistent control file too; then reload,
        so values fall back to /etc (or defaults) and an emptied transient
        slice disappears. ``vgpuctl run`` calls this when its command exits."""
        if client.uid != 0:
            return proto.Error(code="permission", id=ev.id,
                               msg="resetting knobs needs root (peer uid is not 0)")
        assert ev.slice is not None
        cfg = self.d.cfg
        path = self.d.tree.resolve(ev.slice)
        dirs = [cfg.run_slices_dir]
        if not ev.runtime:
            dirs.append(cfg.control_slices_dir)
        removed: list[str] = []
        try:
            for d in dirs:
                f = remove_slice_setting(d, path)
                if f is not None:
                    removed.append(f)
        except OSError as exc:
            return proto.Error(code="internal", id=ev.id, msg=f"cannot remove setting: {exc}")
        if removed and not self.d.reload():
            # Another file is broken: drop just the removed layers' knobs in memory.
            for f in removed:
                self._forget_source_knobs(path, None, source=f)
        self.d.log.info("knobs reset", slice=path, removed=removed, uid=client.uid,
                        pid=client.pid)
        return proto.Ok(id=ev.id, data={"slice": path, "removed": removed,
                                        "config_error": self.d.config_error})

    def _reload_op(self, client: Session, ev: proto.Ctl) -> proto.Reply:
        """SIGHUP over the socket, for a writer of slice files that cannot
        signal us (the Kubernetes plugin in another container): re-read every
        layer and answer whether that worked, with the error if not."""
        if client.uid != 0:
            return proto.Error(code="permission", id=ev.id,
                               msg="reloading needs root (peer uid is not 0)")
        ok = self.d.reload()
        return proto.Ok(id=ev.id, data={"ok": ok, "config_error": self.d.config_error})

    def _forget_source_knobs(self, path: str, knobs: list[str] | None, *,
                             source: str) -> None:
        """Drop in-memory knobs of ``path`` set by ``source``, without a reload."""
        tree = self.d.tree
        try:
            node = tree.node(path)
        except KeyError:
            return
        for k in list(node.knobs):
            src = node.knobs[k][2]
            if knobs is not None and k not in knobs:
                continue
            if src == source:
                del node.knobs[k]
        tree.generation += 1

    # ------------------------------------------------------------ views

    def _proc_stats(self, cid: int) -> dict[str, int]:
        """Per-process counters from the client's stat page (all devices)."""
        c = self.d.clients.get(cid)
        out = {"launches": 0, "allocs": 0, "frees": 0, "mem_bytes": 0,
               "throttled_usec": 0, "nr_throttled": 0}
        if c is None or c.shm is None:
            return out
        for slot in c.slots:
            cnt = c.shm.counters(slot)
            out["launches"] += cnt.launches
            out["allocs"] += cnt.allocs
            out["frees"] += cnt.frees
            out["throttled_usec"] += cnt.throttled_ns // 1000
            out["nr_throttled"] += cnt.nr_throttled
        with contextlib.suppress(KeyError):
            out["mem_bytes"] = sum(self.d.tree.held(cid).values())
        return out

    def snapshot(self) -> dict[str, Any]:
        """The tree for ``vgpuctl tree``/metrics: each process entry carries
        ``pid``, ``comm``, ``launches``, ``allocs``, ``frees``, ``mem_bytes``."""
        snap = self.d.tree.snapshot()
        stack = [snap]
        while stack:
            node = stack.pop()
            for p in node.get("processes", []):
                p.update(self._proc_stats(int(p["client"])))
            stack.extend(node.get("children", []))
        return snap

    def events(self) -> dict[str, Any]:
        """Per slice: ``gpu.memory.events`` (descendants included),
        ``gpu.memory.events.local``, ``gpu.cores.stat`` (and per device) and
        ``gpu.clients.events`` counters (also of slices known only from
        their connections or refusals)."""
        tree, bounds = self.d.tree, self.d.bounds
        out: dict[str, Any] = {}
        paths = dict.fromkeys(tree.slices())
        paths.update(dict.fromkeys(p for p in bounds.slices() if p not in paths))
        for path in paths:
            show = tree.show(path, missing_ok=True)
            out[path] = {"gpu.memory.events": show["gpu.memory.events"],
                         "gpu.memory.events.local": show["gpu.memory.events.local"],
                         "gpu.cores.stat": show["gpu.cores.stat"],
                         "gpu.cores.stat.devices": show["gpu.cores.stat.devices"],
                         "gpu.clients.events": bounds.events(path)}
        return {"slices": out}

    def show(self, slice: str) -> dict[str, Any]:
        """``vgpuctl show``: the tree's view of a slice and its connection
        counts (``gpu.clients.*``); a slice only the bounds know (control
        connections, refusals) shows too. KeyError if neither does."""
        tree, bounds = self.d.tree, self.d.bounds
        try:
            d = tree.show(slice)
        except KeyError:
            d = tree.show(slice, missing_ok=True)
            if d["slice"] not in bounds.slices():
                raise
        path = d["slice"]
        d["gpu.clients.current"] = bounds.current(path)
        d["gpu.clients.stat"] = bounds.local(path)
        d["gpu.clients.events"] = bounds.events(path)
        return d

    def status(self) -> dict[str, Any]:
        d, cfg = self.d, self.d.cfg
        return {
            "version": vgpu_cgroup.__version__,
            "protocol": proto.PROTO_VERSION,
            "simulated": d.simulated,
            "identity": cfg.identity,
            "socket": cfg.socket,
            "socket_activated": d.socket_activated,
            "config_error": d.config_error,
            "layers": {"etc": cfg.etc_slices_dir,
                       "persistent": cfg.control_slices_dir,
                       "runtime": cfg.run_slices_dir},
            "tick_ns": d.tick_ns,
            "epoch": d.epoch,
            "devices": [{"index": dev.index, "uuid": dev.uuid, "name": dev.name,
                         "total_mem": dev.total_mem} for dev in d.devices.values()],
            "clients": [{"id": c.id, "role": c.role, "pid": c.pid, "comm": c.comm,
                         "slice": c.slice, "devices": sorted(c.dev_slot)}
                        for c in d.clients.values()],
            "connections": {"open": d.connections, "counted": d.bounds.node,
                            "limits": dataclasses.asdict(d.limits)},
        }

    def top(self) -> dict[str, Any]:
        """Per slice: GPU time over the last second (% of one GPU, per device),
        and memory current, in all and per device (descendants included);
        the node's devices (UUID: index)."""
        tree, tick_ns = self.d.tree, self.d.tick_ns
        win = self.d.compute.window
        span = max(win[-1][0] - win[0][0] + tick_ns, tick_ns) if win else TOP_WINDOW_NS
        busy: dict[tuple[str, str], int] = collections.defaultdict(int)
        for _, charged in win:
            for key, ns in charged.items():
                busy[key] += ns
        slices: dict[str, dict[str, Any]] = {}
        for path in tree.slices():
            show = tree.show(path)
            slices[path] = {
                "gpu_percent": {},
                "memory_current": show["gpu.memory.current"]["total"],
                "memory_devices": show["gpu.memory.current"]["devices"],
                # Like systemd-cgtop's tasks: descendants' processes included.
                "processes": sum(len(n.clients) for n in tree.node(path).subtree()),
            }
        for (path, uuid), ns in busy.items():
            if path in slices:
                slices[path]["gpu_percent"][uuid] = round(100.0 * ns / span, 2)
        # Cross-check: the driver's own per-process SM utilization over the
        # same second, summed the same way (NVML samples coarsely, so expect
        # agreement within a few percent, not to the tick).
        since = int((time.time() - span / 1e9) * 1e6)
        for uuid, dev in self.d.devices.items():
            util = process_util(dev.index, since)
            for c in self.d.clients.values():
                pct = util.get(c.pid)
                if pct is None or uuid not in c.dev_slot or not c.in_tree:
                    continue
                for node in tree.client_nodes(c.id):
                    if node.path in slices:
                        nv = slices[node.path].setdefault("nvml_percent", {})
                        nv[uuid] = round(nv.get(uuid, 0.0) + pct, 2)
        devices = {uuid: dev.index for uuid, dev in self.d.devices.items()}
        return {"window_ns": span, "devices": devices, "slices": slices}
