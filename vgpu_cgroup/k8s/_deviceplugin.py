"""The device plugin for clusters without DRA: ``vgpu.io/cores`` (100 per GPU)
and ``vgpu.io/memory`` (256 MiB units), vCUDA's resource model.

Each resource is a list of fake devices (one per unit) served by its own
DevicePlugin socket. ``Allocate`` returns the mounts and env that put the
hook into the container. The limits never come from anything the tenant
controls: before each container starts (``PreStartContainer``, which the
plugin asks for) it asks the kubelet's PodResources API which pod holds
those unit ids, sums that pod's units over its containers, reads the pod's
uid and QoS class from the API server (PodResources names pods, not their
cgroups), and writes the pod's slice file from that. A periodic pass
removes the files of pods the kubelet no longer lists.

What it cannot do that the DRA driver does: the scheduler sees only node
totals, so it may place a pod on a node whose units are spread over GPUs
(GetPreferredAllocation keeps a pod's units on one GPU when the kubelet
lets it, and a pod whose cores and memory land on different GPUs is refused
before it starts); there is no per-claim config (soft mode is a node-wide
flag), no ``idle``, and no share of a GPU for pods on other nodes' terms.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from vgpu_cgroup._log import get_logger

from ._api import ApiError, ClusterApi
from ._claims import (
    pod_cgroup,
    pod_qos,
)
from ._files import HookFiles, gpu_cdi_ids, read, slice_file
from ._gen import deviceplugin_v1beta1_pb2 as dp
from ._gen import deviceplugin_v1beta1_pb2_grpc as dp_grpc
from ._gen import podresources_v1_pb2 as pr
from ._gen import podresources_v1_pb2_grpc as pr_grpc
from ._grpcserver import abort, rpc_error_text, stop_server, unix_channel, unix_server
from ._limits import (
    CORES,
    CORES_PER_GPU,
    MEMORY,
    MEMORY_UNIT,
    GpuShare,
    LimitError,
    SliceConfig,
    check_uid,
    invalid,
    pod_limits,
    precondition,
    slice_meta,
    slice_text,
    unavailable,
)
from ._vgpud import Gpu, SliceFiles

API_VERSION = "v1beta1"
RESOURCE_DOMAIN = "vgpu.io"
#: How long a GPU chosen for one resource is preferred for the other: the
#: kubelet asks for a container's resources one after the other.
AFFINITY_S = 5.0


@dataclass
class DevicePluginOptions:
    node: str
    plugin_dir: str = "/var/lib/kubelet/device-plugins"
    kubelet_socket: str = ""  # default: <plugin_dir>/kubelet.sock
    pod_resources_socket: str = "/var/lib/kubelet/pod-resources/kubelet.sock"
    slices_dir: str = "/run/vgpu/slices"
    cgroup_driver: str = "systemd"
    cgroup_root: str = ""
    gpu_cdi_device: str = ""
    #: vCUDA's soft mode: a pod is guaranteed its cores and may burst to 100.
    soft: bool = False
    gc_interval: float = 30.0
    hook: HookFiles = field(default_factory=HookFiles)

    def __post_init__(self) -> None:
        if not self.kubelet_socket:
            self.kubelet_socket = os.path.join(self.plugin_dir, "kubelet.sock")


def resource_name(kind: str) -> str:
    return f"{RESOURCE_DOMAIN}/{kind}"


class Units:
    """The fake devices: one per vgpu.io/cores unit and per vgpu.io/memory unit."""

    def __init__(self, gpus: Sequence[Gpu]) -> None:
        self.gpus = {g.uuid: g for g in gpus}
        self.ids: dict[str, list[str]] = {CORES: [], MEMORY: []}
        self.owner: dict[str, tuple[str, str]] = {}  # id -> (kind, gpu uuid)
        for g in gpus:
            for kind, n, tag in ((CORES, CORES_PER_GPU, "c"),
                                 (MEMORY, g.total_mem // MEMORY_UNIT, "m")):
                for i in range(n):
                    uid = f"{g.uuid}-{tag}{i:04d}"
                    if len(uid) > 63:  # the kubelet's limit on a device id
                        uid = f"gpu{g.index}-{tag}{i:04d}"
                    self.ids[kind].append(uid)
                    self.owner[uid] = (kind, g.uuid)

    def gpu_of(self, kind: str, device_id: str) -> str:
        got = self.owner.get(device_id)
        if got is None or got[0] != kind:
            raise invalid(f"{device_id!r} is not a {resource_name(kind)} device of this node")
        return got[1]


def preferred(units: Units, kind: str, available: Sequence[str], must: Sequence[str],
              size: int, hint: str | None) -> list[str]:
    """Device ids for one container: all from one GPU when one GPU can give
    them (the GPU of ``must``, else ``hint``, else the fullest GPU that
    fits, so partly used GPUs fill up first); spread over as few GPUs as
    possible otherwise."""
    chosen = list(dict.fromkeys(must))[:max(size, 0)]
    need = size - len(chosen)
    if need <= 0:
        return chosen
    taken = set(chosen)
    free: dict[str, list[str]] = {}
    for d in available:
        if d in taken or d not in units.owner or units.owner[d][0] != kind:
            continue
        free.setdefault(units.owner[d][1], []).append(d)
    order: list[str] = []
    for d in chosen:
        g = units.owner.get(d, ("", ""))[1]
        if g in free and g not in order:
            order.append(g)
    if hint in free and hint not in order:
        order.append(hint)
    fits = [g for g in order if len(free[g]) >= need]
    if not fits:
        fits = sorted((g for g in free if len(free[g]) >= need),
                      key=lambda g: (len(free[g]), units.gpus[g].index))
    if fits:
        return chosen + sorted(free[fits[0]])[:need]
    for g in sorted(free, key=lambda g: (-len(free[g]), units.gpus[g].index)):
        take = sorted(free[g])[:need]
        chosen += take
        need -= len(take)
        if need <= 0:
            break
    return chosen


class PodResources:
    """The kubelet's PodResources API: which devices each container holds."""

    def __init__(self, socket: str, timeout: float = 10.0) -> None:
        self.socket = socket
        self.timeout = timeout

    def list(self) -> list[pr.PodResources]:
        try:
            with unix_channel(self.socket) as ch:
                resp = pr_grpc.PodResourcesListerStub(ch).List(
                    pr.ListPodResourcesRequest(), timeout=self.timeout)
        except grpc.RpcError as e:
            raise unavailable(f"the kubelet's pod resources API at {self.socket}: "
                              f"{rpc_error_text(e)}") from None
        return list(resp.pod_resources)


def pod_units(pod: pr.PodResources) -> dict[str, set[str]]:
    """Device ids of each vgpu resource over the pod's containers (a set:
    an init container's devices are handed on to the app containers)."""
    out: dict[str, set[str]] = {CORES: set(), MEMORY: set()}
    for c in pod.containers:
        for d in c.devices:
            for kind in out:
                if d.resource_name == resource_name(kind):
                    out[kind].update(d.device_ids)
    return out


class PodSlices:
    """Slice files of device-plugin pods, from what the kubelet attests."""

    def __init__(self, opts: DevicePluginOptions, api: ClusterApi, slices: SliceFiles,
                 units: Units, podres: PodResources) -> None:
        self.opts = opts
        self.api = api
        self.slices = slices
        self.units = units
        self.podres = podres
        self.log = get_logger(component="vgpu-k8s-device-plugin", node=opts.node)

    def shares(self, held: Mapping[str, set[str]]) -> list[GpuShare]:
        per: dict[str, list[int]] = {}
        for kind, ids in held.items():
            for d in ids:
                acc = per.setdefault(self.units.gpu_of(kind, d), [0, 0])
                acc[0 if kind == CORES else 1] += 1
        if not any(c for c, _ in per.values()) or not any(m for _, m in per.values()):
            raise precondition("a pod needs both vgpu.io/cores and vgpu.io/memory: its slice "
                               "gets a share of GPU time and a cap on GPU memory")
        split = [g for g, (c, m) in per.items() if not c or not m]
        if split:
            raise precondition(
                "the kubelet gave the pod's cores and memory on different GPUs "
                f"({', '.join(sorted(per))}); without DRA the scheduler cannot keep them "
                "together: run such pods through the DRA driver, or on one-GPU nodes")
        return [GpuShare(uuid=g, cores=float(c), memory=m * MEMORY_UNIT)
                for g, (c, m) in per.items()]

    def on_prestart(self, kind: str, device_ids: Sequence[str]) -> str:
        """Write the slice file of the pod that holds ``device_ids``; its path."""
        for d in device_ids:
            self.units.gpu_of(kind, d)
        want = set(device_ids)
        owners = [p for p in self.podres.list() if pod_units(p)[kind] & want]
        if not owners:
            raise unavailable("the kubelet lists no pod holding these devices yet")
        if len(owners) > 1:
            raise precondition("devices are held by several pods: "
                               + ", ".join(f"{p.namespace}/{p.name}" for p in owners))
        return self.apply(owners[0])

    def apply(self, pod: pr.PodResources) -> str:
        ns, name = pod.namespace, pod.name
        shares = self.shares(pod_units(pod))
        limits = pod_limits(shares, SliceConfig(), soft_max=self.opts.soft)
        try:
            obj = self.api.get_pod(ns, name)
        except ApiError as e:
            raise unavailable(f"cannot read pod {ns}/{name}: {e.msg}") from None
        uid = check_uid("pod", (obj.get("metadata") or {}).get("uid"))
        slice = pod_cgroup(uid, pod_qos(obj), driver=self.opts.cgroup_driver,
                           root=self.opts.cgroup_root)
        path = slice_file(self.opts.slices_dir, "pod", uid)
        text = slice_text(slice, limits.knobs, {"kind": "pod", "pod": f"{ns}/{name}",
                                                "podUID": uid})
        self.slices.put(path, text)
        for old_path, meta in self.files().items():
            if meta.get("pod") == f"{ns}/{name}" and old_path != path:
                self.slices.drop(old_path)  # an earlier pod of the same name
        self.log.info("pod slice written", pod=f"{ns}/{name}", slice=slice, file=path)
        return path

    def files(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        try:
            names = sorted(os.listdir(self.opts.slices_dir))
        except FileNotFoundError:
            return out
        for n in names:
            if n.startswith("k8s-pod-") and n.endswith(".conf"):
                path = os.path.join(self.opts.slices_dir, n)
                meta = slice_meta(read(path) or "")
                if meta is not None and meta.get("kind") == "pod":
                    out[path] = meta
        return out

    def collect(self) -> list[str]:
        """Remove the files of pods the kubelet no longer lists; their paths."""
        listed = {f"{p.namespace}/{p.name}" for p in self.podres.list()}
        gone = []
        for path, meta in self.files().items():
            if meta.get("pod") not in listed:
                removed, warn = self.slices.drop(path)
                if removed:
                    gone.append(path)
                    self.log.info("pod gone, slice file removed", pod=meta.get("pod"),
                                  file=path, warning=warn)
        return gone


class _Affinity:
    """The GPU last chosen for a container, so its other resource follows."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last: tuple[str, str, float] | None = None  # kind, gpu, when

    def note(self, kind: str, gpu: str) -> None:
        with self.lock:
            self.last = (kind, gpu, time.monotonic())

    def hint(self, kind: str) -> str | None:
        with self.lock:
            if self.last and self.last[0] != kind and \
                    time.monotonic() - self.last[2] < AFFINITY_S:
                return self.last[1]
            return None


class _Service(dp_grpc.DevicePluginServicer):
    def __init__(self, kind: str, plugin: DevicePlugin) -> None:
        self.kind = kind
        self.plugin = plugin
        self.stop = threading.Event()

    def GetDevicePluginOptions(self, request: dp.Empty, context: grpc.ServicerContext
                               ) -> dp.DevicePluginOptions:
        return OPTIONS

    def ListAndWatch(self, request: dp.Empty, context: grpc.ServicerContext
                     ) -> Iterator[dp.ListAndWatchResponse]:
        # The units do not change while the plugin runs: one list, then hold
        # the stream open until the kubelet or the plugin ends it.
        yield dp.ListAndWatchResponse(devices=[
            dp.Device(ID=d, health="Healthy") for d in self.plugin.units.ids[self.kind]])
        while context.is_active() and not self.stop.wait(0.5):
            pass

    def GetPreferredAllocation(self, request: dp.PreferredAllocationRequest,
                               context: grpc.ServicerContext) -> dp.PreferredAllocationResponse:
        resp = dp.PreferredAllocationResponse()
        for r in request.container_requests:
            ids = preferred(self.plugin.units, self.kind, r.available_deviceIDs,
                            r.must_include_deviceIDs, r.allocation_size,
                            self.plugin.affinity.hint(self.kind))
            if ids:
                self.plugin.affinity.note(self.kind, self.plugin.units.owner[ids[0]][1])
            resp.container_responses.add(deviceIDs=ids)
        return resp

    def Allocate(self, request: dp.AllocateRequest, context: grpc.ServicerContext
                 ) -> dp.AllocateResponse:
        resp = dp.AllocateResponse()
        hook = self.plugin.opts.hook
        for r in request.container_requests:
            try:
                gpus = sorted({self.plugin.units.gpu_of(self.kind, d) for d in r.devices_ids})
            except LimitError as e:
                abort(context, e)
            c = resp.container_responses.add()
            c.envs.update(hook.env())
            for host, cont in hook.mounts():
                c.mounts.add(container_path=cont, host_path=host, read_only=True)
            by_uuid = self.plugin.units.gpus
            for cdi in gpu_cdi_ids(self.plugin.opts.gpu_cdi_device,
                                   [(by_uuid[g].index, g) for g in gpus]):
                c.cdi_devices.add(name=cdi)
        return resp

    def PreStartContainer(self, request: dp.PreStartContainerRequest,
                          context: grpc.ServicerContext) -> dp.PreStartContainerResponse:
        try:
            self.plugin.pods.on_prestart(self.kind, list(request.devices_ids))
        except LimitError as e:
            self.plugin.log.warning("container refused", resource=resource_name(self.kind),
                                    code=e.code, error=e.msg)
            abort(context, e)
        return dp.PreStartContainerResponse()


OPTIONS = dp.DevicePluginOptions(pre_start_required=True,
                                 get_preferred_allocation_available=True)


class DevicePlugin:
    """Both resources' servers, their registration, and the cleanup pass."""

    def __init__(self, opts: DevicePluginOptions, api: ClusterApi, slices: SliceFiles,
                 gpus: Sequence[Gpu]) -> None:
        self.opts = opts
        self.units = Units(gpus)
        self.pods = PodSlices(opts, api, slices, self.units,
                              PodResources(opts.pod_resources_socket))
        self.affinity = _Affinity()
        self.log = get_logger(component="vgpu-k8s-device-plugin", node=opts.node)
        self._servers: dict[str, tuple[grpc.Server, _Service]] = {}
        self._kubelet_inode: int | None = None
        self.registered = False

    def socket(self, kind: str) -> str:
        return os.path.join(self.opts.plugin_dir, f"vgpu-{kind}.sock")

    def start(self) -> None:
        """Serve both resources; registering is run()'s job (or call register())."""
        for kind in (CORES, MEMORY):
            svc = _Service(kind, self)

            def add(server: grpc.Server, svc: _Service = svc) -> None:
                dp_grpc.add_DevicePluginServicer_to_server(svc, server)

            self._servers[kind] = (unix_server(self.socket(kind), add), svc)

    def register(self) -> None:
        """Tell the kubelet about both resources (it then opens ListAndWatch)."""
        self.registered = False
        with unix_channel(self.opts.kubelet_socket) as ch:
            stub = dp_grpc.RegistrationStub(ch)
            for kind in (CORES, MEMORY):
                stub.Register(dp.RegisterRequest(
                    version=API_VERSION, endpoint=os.path.basename(self.socket(kind)),
                    resource_name=resource_name(kind), options=OPTIONS), timeout=10)
        try:
            self._kubelet_inode = os.stat(self.opts.kubelet_socket).st_ino
        except OSError:
            self._kubelet_inode = None
        self.registered = True
        self.log.info("registered with the kubelet", resources=[resource_name(k)
                                                                 for k in (CORES, MEMORY)])

    def stop(self) -> None:
        for kind, (server, svc) in self._servers.items():
            svc.stop.set()
            stop_server(server, self.socket(kind))
        self._servers.clear()

    def kubelet_restarted(self) -> bool:
        """The kubelet wipes the device-plugins directory when it starts: our
        sockets are gone, or its own socket is a new one."""
        if any(not os.path.exists(self.socket(k)) for k in self._servers):
            return True
        try:
            ino = os.stat(self.opts.kubelet_socket).st_ino
        except OSError:
            return False  # no kubelet yet: nothing to register with
        return ino != self._kubelet_inode

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop``: re-register after a kubelet restart, and
        remove the files of pods that are gone every gc_interval."""
        next_gc = time.monotonic() + self.opts.gc_interval
        while True:
            if self.registered and self.kubelet_restarted():
                self.log.info("the kubelet restarted: serving and registering again")
                self.stop()
                self.start()
                self.registered = False
            if not self.registered:
                try:
                    self.register()
                except grpc.RpcError as e:
                    self.log.warning("registration failed, retrying",
                                     kubelet=self.opts.kubelet_socket, error=rpc_error_text(e))
            if stop.wait(1.0):
                return
            if time.monotonic() >= next_gc:
                next_gc = time.monotonic() + self.opts.gc_interval
                try:
                    self.pods.collect()
                except LimitError as e:
                    self.log.warning("cleanup pass skipped", error=e.msg)
