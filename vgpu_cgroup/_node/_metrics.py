"""Prometheus metrics for vgpud: off by default, loopback only unless told.

Nothing is instrumented per event: a custom collector reads the daemon's
tree at scrape time, and the HTTP responder is a trio task in the daemon's
own loop, so the collector sees a consistent tree without locks (the loop is
single-threaded) and a scrape costs nothing between scrapes.

The HTTP side is deliberately tiny (HTTP/1.0, GET only, one response per
connection): Prometheus needs nothing more, and a thread running
``prometheus_client.start_http_server`` would read the tree while the loop
mutates it.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from ._daemon import Daemon

MAX_REQUEST = 8192
REQUEST_TIMEOUT_S = 5.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsError(Exception):
    """A bad ``metrics.listen`` value or a missing prometheus-client."""


def parse_listen(addr: str, *, allow_any: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) → (host, port).

    Only loopback addresses (or ``localhost``) are accepted unless
    ``allow_any``: the endpoint has no authentication, and slice names and
    usage are not for the whole network.
    """
    host, sep, port_s = addr.strip().rpartition(":")
    if not sep or not host:
        raise MetricsError(f"metrics listen address {addr!r}: expected HOST:PORT, "
                           "like 127.0.0.1:9400")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_s)
    except ValueError:
        raise MetricsError(f"metrics listen address {addr!r}: port {port_s!r} is not "
                           "a number") from None
    if not 0 <= port <= 65535:
        raise MetricsError(f"metrics listen address {addr!r}: port out of range 0..65535")
    if host == "localhost":
        return "127.0.0.1", port
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise MetricsError(f"metrics listen address {addr!r}: {host!r} is not an IP address "
                           "(use 127.0.0.1, ::1 or localhost)") from None
    if not ip.is_loopback and not allow_any:
        raise MetricsError(f"metrics listen address {addr!r} is not loopback; the endpoint "
                           "has no authentication (use --metrics-listen-any to allow it)")
    return str(ip), port


def _walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(n.get("children", []))


def _count_procs(node: dict[str, Any]) -> int:
    return sum(len(n.get("processes", [])) for n in _walk(node))


class VgpuCollector:
    """prometheus-client collector over a daemon snapshot, built per scrape.

    ``source`` returns (tree snapshot, per-slice events view, effective
    gpu.memory.max per slice or None, device UUIDs, connections); reading it
    is the only work done, at scrape time.
    """

    def __init__(self, source: Callable[[], dict[str, Any]]) -> None:
        self.source = source

    def describe(self) -> list[Any]:
        return []  # no registration-time collect(): the daemon may not be running yet

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        data = self.source()
        snap: dict[str, Any] = data["tree"]
        #: per slice, the effective gpu.memory.max on each device (UUID)
        mem_max: dict[str, dict[str, int | None]] = data["mem_max"]
        devices: list[str] = data["devices"]
        gpu = CounterMetricFamily("vgpu_slice_gpu_time_seconds",
                                  "GPU time charged to the slice on the device (descendants "
                                  "included)", labels=["slice", "device"])
        thr = CounterMetricFamily("vgpu_slice_throttled_seconds",
                                  "Time launching threads waited for GPU-time budget on the "
                                  "device", labels=["slice", "device"])
        nthr = CounterMetricFamily("vgpu_slice_throttled",
                                   "Kernel launches on the device that had to wait for budget",
                                   labels=["slice", "device"])
        cur = GaugeMetricFamily("vgpu_slice_memory_current_bytes",
                                "GPU memory held by the slice", labels=["slice", "device"])
        peak = GaugeMetricFamily("vgpu_slice_memory_peak_bytes",
                                 "Highest GPU memory held by the slice",
                                 labels=["slice", "device"])
        mmax = GaugeMetricFamily("vgpu_slice_memory_max_bytes",
                                 "Effective gpu.memory.max (absent when unlimited)",
                                 labels=["slice", "device"])
        events = CounterMetricFamily("vgpu_slice_memory_events",
                                     "gpu.memory.events counters (descendants included)",
                                     labels=["slice", "type"])
        local = CounterMetricFamily("vgpu_slice_memory_events_local",
                                    "gpu.memory.events.local counters (the slice's own)",
                                    labels=["slice", "type"])
        clients = GaugeMetricFamily("vgpu_slice_clients",
                                    "Hooked processes connected in the slice (descendants "
                                    "included)", labels=["slice"])
        for node in _walk(snap):
            slc = node["slice"] or "-.slice"
            per_dev: dict[str, dict[str, int]] = node["cores"].get("devices", {})
            for dev in devices:
                cores = per_dev.get(dev, {})
                gpu.add_metric([slc, dev], cores.get("usage_usec", 0) / 1e6)
                thr.add_metric([slc, dev], cores.get("throttled_usec", 0) / 1e6)
                nthr.add_metric([slc, dev], cores.get("nr_throttled", 0))
                cur.add_metric([slc, dev], node["memory"]["devices"].get(dev, 0))
                peak.add_metric([slc, dev], node["peak"].get(dev, 0))
                lim = mem_max.get(node["slice"], {}).get(dev)
                if lim is not None:
                    mmax.add_metric([slc, dev], lim)
            for typ, n in node["events"].items():
                events.add_metric([slc, typ], n)
            for typ, n in node["events_local"].items():
                local.add_metric([slc, typ], n)
            clients.add_metric([slc], _count_procs(node))
        yield from (gpu, thr, nthr, cur, peak, mmax, events, local, clients)
        # Connections and refusals per slice (gpu.clients.*): the tree's
        # slices and those known only from their connections or refusals,
        # a set the daemon bounds (see _bounds.IDLE_RECORDS).
        per: dict[str, tuple[int, dict[str, int]]] = data.get("clients", {})
        sconns = GaugeMetricFamily("vgpu_slice_connections",
                                   "Connections to vgpud from the slice's processes (every "
                                   "role, descendants included: gpu.clients.current)",
                                   labels=["slice"])
        refused = CounterMetricFamily("vgpu_slice_clients_events",
                                      "Connections refused for capacity, on the slice whose "
                                      "bound it was (gpu.clients.events)",
                                      labels=["slice", "type"])
        for path, (current, evs) in sorted(per.items()):
            slc = path or "-.slice"
            sconns.add_metric([slc], current)
            for typ, n in evs.items():
                refused.add_metric([slc, typ], n)
        yield from (sconns, refused)
        conns = GaugeMetricFamily("vgpu_connections", "Open connections to vgpud (hooks and "
                                  "vgpuctl)")
        conns.add_metric([], data["connections"])
        yield conns


def daemon_source(daemon: Daemon) -> Callable[[], dict[str, Any]]:
    """What the collector reads, from the live daemon (call on its loop)."""

    def source() -> dict[str, Any]:
        snap = daemon.snapshot()
        mem_max: dict[str, dict[str, int | None]] = {}
        for node in _walk(snap):
            show = daemon.tree.show(node["slice"])
            node["peak"] = show["gpu.memory.peak"]["devices"]
            node["events"] = show["gpu.memory.events"]
            node["events_local"] = show["gpu.memory.events.local"]
            mem_max[node["slice"]] = {
                dev: daemon.tree.effective_limits(node["slice"], dev).mem_max
                for dev in daemon.devices}
        b = daemon.bounds
        paths = {*mem_max, *b.slices()}
        clients = {p: (b.current(p), b.events(p)) for p in paths}
        return {"tree": snap, "mem_max": mem_max, "devices": sorted(daemon.devices),
                "connections": daemon.connections, "clients": clients}

    return source


def registry_for(source: Callable[[], dict[str, Any]]) -> Any:
    """A fresh registry holding only our collector (no process/GC metrics
    of the default registry: they describe Python, not the GPUs)."""
    try:
        from prometheus_client import CollectorRegistry
    except ImportError:
        raise MetricsError("metrics need prometheus-client: pip install "
                           "'vgpu-cgroup[metrics]'") from None
    reg = CollectorRegistry(auto_describe=False)
    reg.register(VgpuCollector(source))
    return reg


def render(registry: Any) -> bytes:
    from prometheus_client import generate_latest

    out: bytes = generate_latest(registry)
    return out


def response_for(request: bytes, registry: Any) -> bytes:
    """The whole HTTP/1.0 response to one request head (pure but for render)."""
    line = request.split(b"\r\n", 1)[0].decode("latin-1", "replace")
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return _http(400, b"bad request\n")
    method, target = parts[0], parts[1].split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return _http(405, b"only GET\n", extra="Allow: GET, HEAD\r\n")
    if target not in ("/metrics", "/"):
        return _http(404, b"metrics are at /metrics\n")
    body = render(registry)
    return _http(200, b"" if method == "HEAD" else body, ctype=CONTENT_TYPE,
                 length=len(body))


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 500: "Internal Server Error"}


def _http(status: int, body: bytes, *, ctype: str = "text/plain; charset=utf-8",
          extra: str = "", length: int | None = None) -> bytes:
    head = (f"HTTP/1.0 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n"
            f"Connection: close\r\n{extra}\r\n")
    return head.encode("latin-1") + body


async def _handle(sock: trio.socket.SocketType, registry: Any, log: Any) -> None:
    with sock:
        buf = b""
        resp: bytes
        with trio.move_on_after(REQUEST_TIMEOUT_S) as scope:
            while b"\r\n\r\n" not in buf and len(buf) < MAX_REQUEST:
                try:
                    chunk = await sock.recv(4096)
                except OSError:
                    return
                if not chunk:
                    break
                buf += chunk
        if scope.cancelled_caught:
            resp = _http(408, b"request timeout\n")
        else:
            try:
                resp = response_for(buf, registry)
            except Exception:
                log.exception("metrics scrape failed")
                resp = _http(500, b"internal error\n")
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            view = memoryview(resp)
            try:
                while view:
                    n = await sock.send(view)
                    view = view[n:]
            except OSError:
                return


async def serve_metrics(daemon: Daemon, host: str, port: int, *,
                        task_status: trio.TaskStatus[tuple[str, int]] =
                        trio.TASK_STATUS_IGNORED) -> None:
    """Serve /metrics on (host, port) until cancelled; reports the bound
    address (port 0 picks a free one, for tests)."""
    registry = registry_for(daemon_source(daemon))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = trio.socket.socket(family, socket.SOCK_STREAM)
    with listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await listener.bind((host, port))
        listener.listen(64)
        bound = listener.getsockname()
        daemon.log.info("metrics endpoint ready", address=f"{host}:{bound[1]}")
        task_status.started((host, int(bound[1])))
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    sock, _ = await listener.accept()
                except OSError as exc:
                    daemon.log.warning("metrics accept failed", error=str(exc))
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(_handle, sock, registry, daemon.log)
