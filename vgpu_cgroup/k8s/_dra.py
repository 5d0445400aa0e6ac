"""The DRA kubelet plugin: a claim's share becomes the knobs of its pod's slice.

The kubelet finds the plugin through its registration socket
(``pluginregistration``), then calls ``NodePrepareResources`` before a pod
with a ``vgpu.io`` claim starts. The request carries only the claim's
namespace, name and uid, so the plugin reads the claim (what the scheduler
allocated, the opaque config) and its pod (uid and QoS class, hence its
cgroup) from the API server; then it writes the pod's slice file into
vgpud's runtime layer, has vgpud reload, writes a CDI spec that puts the hook
into the containers, and returns its CDI id. ``NodeUnprepareResources``
removes both files. Everything the plugin did is in those files, named by
claim uid, so it carries no state across a restart and a repeated prepare
writes the same bytes again.

A request is planned whole before anything is written: a claim with a bad
config fails the call with INVALID_ARGUMENT (FAILED_PRECONDITION,
UNAVAILABLE, NOT_FOUND for the other cases) and no file is touched.
Failures while applying (vgpud unreachable or refusing) are reported in
that claim's entry of the response, as the kubelet's API intends.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from vgpu_cgroup._log import get_logger

from ._api import ApiError, ClusterApi
from ._claims import (
    allocated_devices,
    claim_config,
    claim_pod,
    pod_cgroup,
    pod_qos,
)
from ._files import (
    HookFiles,
    cdi_file,
    cdi_spec,
    gpu_cdi_ids,
    read,
    remove,
    slice_file,
    validate_slice_text,
    write_cdi,
)
from ._gen import dra_v1_pb2 as dra
from ._gen import dra_v1_pb2_grpc as dra_grpc
from ._gen import pluginregistration_pb2 as reg
from ._gen import pluginregistration_pb2_grpc as reg_grpc
from ._grpcserver import abort, stop_server, unix_server
from ._limits import (
    DRIVER,
    GpuShare,
    LimitError,
    check_uid,
    invalid,
    pod_limits,
    precondition,
    slice_meta,
    slice_text,
    unavailable,
)
from ._resourceslice import device_name
from ._vgpud import Gpu, SliceFiles

SERVICE_VERSION = "v1.DRAPlugin"
CDI_CLASS = "slice"
MAX_CLAIMS = 128


@dataclass
class DraOptions:
    node: str
    driver: str = DRIVER
    plugin_socket: str = ""  # default: /var/lib/kubelet/plugins/<driver>/dra.sock
    registrar_socket: str = ""  # default: /var/lib/kubelet/plugins_registry/<driver>-reg.sock
    #: The plugin socket as the kubelet sees it, when the plugin's view differs.
    kubelet_plugin_socket: str = ""
    cdi_dir: str = "/var/run/cdi"
    slices_dir: str = "/run/vgpu/slices"
    cgroup_driver: str = "systemd"
    cgroup_root: str = ""
    #: CDI id of the GPU itself, e.g. "nvidia.com/gpu={index}"; "" for none.
    gpu_cdi_device: str = ""
    hook: HookFiles = field(default_factory=HookFiles)

    def __post_init__(self) -> None:
        if not self.plugin_socket:
            self.plugin_socket = f"/var/lib/kubelet/plugins/{self.driver}/dra.sock"
        if not self.registrar_socket:
            self.registrar_socket = f"/var/lib/kubelet/plugins_registry/{self.driver}-reg.sock"
        if not self.kubelet_plugin_socket:
            self.kubelet_plugin_socket = self.plugin_socket

    @property
    def cdi_kind(self) -> str:
        return f"{self.driver}/{CDI_CLASS}"


@dataclass
class _Plan:
    """What one claim's prepare will write and answer."""

    uid: str
    slice_path: str
    slice_text: str
    cdi_path: str
    cdi: dict[str, Any]
    devices: list[dra.Device]


class DraDriver:
    """Prepare and unprepare, without gRPC (the servicer below wraps it)."""

    def __init__(self, opts: DraOptions, api: ClusterApi, slices: SliceFiles,
                 gpus: Sequence[Gpu]) -> None:
        self.opts = opts
        self.api = api
        self.slices = slices
        self.gpus = {device_name(g): g for g in gpus}
        self.log = get_logger(component="vgpu-k8s-dra", node=opts.node)
        self.lock = threading.Lock()

    # ------------------------------------------------------------ planning

    def _get(self, what: str, fn: Any, *args: str) -> dict[str, Any]:
        try:
            out: dict[str, Any] = fn(*args)
            return out
        except ApiError as e:
            if e.status == 404:
                raise LimitError("NOT_FOUND", f"{what} {'/'.join(args)} not found") from None
            raise unavailable(f"cannot read {what} {'/'.join(args)}: {e.msg}") from None

    def plan(self, ns: str, name: str, uid: str) -> _Plan:
        """Everything prepare will do for one claim, or a LimitError."""
        check_uid("claim", uid)
        if not ns or not name or len(ns) > 253 or len(name) > 253:
            raise invalid("the claim's namespace and name are required")
        claim = self._get("claim", self.api.get_claim, ns, name)
        if (claim.get("metadata") or {}).get("uid") != uid:
            raise precondition(f"claim {ns}/{name} now has uid "
                               f"{(claim.get('metadata') or {}).get('uid')}, not {uid}")
        allocated = allocated_devices(claim, self.opts.driver)
        shares: list[GpuShare] = []
        gpus: list[Gpu] = []
        for d in allocated:
            if d.pool != self.opts.node:
                raise precondition(f"device {d.pool}/{d.device} is not on node {self.opts.node}")
            gpu = self.gpus.get(d.device)
            if gpu is None:
                raise precondition(f"device {d.device} is not a GPU of this node "
                                   f"({', '.join(self.gpus) or 'none'})")
            if gpu not in gpus:
                gpus.append(gpu)
            shares.append(GpuShare(
                uuid=gpu.uuid,
                cores=d.cores if d.cores is not None else 100.0,
                memory=d.memory if d.memory is not None else gpu.total_mem))
        cfg = claim_config(claim, {d.request for d in allocated}, self.opts.driver)
        limits = pod_limits(shares, cfg)
        pod_name, pod_uid = claim_pod(claim)
        pod = self._get("pod", self.api.get_pod, ns, pod_name)
        meta = pod.get("metadata") or {}
        if meta.get("uid") != pod_uid:
            raise unavailable(f"pod {ns}/{pod_name} has uid {meta.get('uid')}, the claim is "
                              f"reserved for {pod_uid}")
        node = (pod.get("spec") or {}).get("nodeName")
        if node and node != self.opts.node:
            raise precondition(f"pod {ns}/{pod_name} runs on node {node}, not {self.opts.node}")
        slice = pod_cgroup(pod_uid, pod_qos(pod), driver=self.opts.cgroup_driver,
                           root=self.opts.cgroup_root)
        path = slice_file(self.opts.slices_dir, "claim", uid)
        other = self._claim_of_slice(slice)
        if other is not None and other != uid:
            raise precondition(f"pod {ns}/{pod_name} already has vgpu claim {other}; its "
                               "slice has one set of knobs: put all requests in one claim")
        text = slice_text(slice, limits.knobs, {
            "kind": "claim", "claim": f"{ns}/{name}", "uid": uid, "pod": f"{ns}/{pod_name}",
            "podUID": pod_uid})
        validate_slice_text(path, text)
        device_id = f"{self.opts.cdi_kind}={uid}"
        spec = cdi_spec(self.opts.cdi_kind, uid, self.opts.hook)
        devices = []
        for d in allocated:
            g = self.gpus[d.device]
            ids = [device_id, *gpu_cdi_ids(self.opts.gpu_cdi_device, [(g.index, g.uuid)])]
            dev = dra.Device(request_names=[d.request], pool_name=d.pool,
                             device_name=d.device, cdi_device_ids=ids)
            if d.share_id is not None:
                dev.share_id = d.share_id
            devices.append(dev)
        return _Plan(uid=uid, slice_path=path, slice_text=text,
                     cdi_path=cdi_file(self.opts.cdi_dir, self.opts.cdi_kind, uid), cdi=spec,
                     devices=devices)

    def _claim_of_slice(self, slice: str) -> str | None:
        """The claim whose file configures ``slice``, if any."""
        try:
            names = os.listdir(self.opts.slices_dir)
        except FileNotFoundError:
            return None
        for n in sorted(names):
            if not n.startswith("k8s-claim-") or not n.endswith(".conf"):
                continue
            text = read(os.path.join(self.opts.slices_dir, n))
            meta = slice_meta(text or "")
            if meta and meta.get("kind") == "claim" and text and \
                    f"slice = \"{slice}\"\n" in text:
                return str(meta.get("uid"))
        return None

    # ------------------------------------------------------------ doing

    def prepare(self, claims: Sequence[tuple[str, str, str]]
                ) -> dict[str, tuple[list[dra.Device], str]]:
        """(devices, error) per claim uid; LimitError if any claim cannot be
        planned (then nothing was written)."""
        if len(claims) > MAX_CLAIMS:
            raise invalid(f"{len(claims)} claims in one request, more than {MAX_CLAIMS}")
        with self.lock:
            plans = []
            for ns, name, uid in claims:
                try:
                    plans.append(self.plan(ns, name, uid))
                except LimitError as e:
                    raise LimitError(e.code, f"claim {ns}/{name} ({uid}): {e.msg}") from None
            out: dict[str, tuple[list[dra.Device], str]] = {}
            for p in plans:
                try:
                    write_cdi(p.cdi_path, p.cdi)
                    self.slices.put(p.slice_path, p.slice_text)
                except LimitError as e:
                    if not os.path.exists(p.slice_path):
                        remove(p.cdi_path)
                    out[p.uid] = ([], f"{e.code}: {e.msg}")
                    self.log.warning("prepare failed", claim=p.uid, error=e.msg)
                    continue
                except OSError as e:
                    out[p.uid] = ([], f"INTERNAL: cannot write {e.filename}: {e.strerror}")
                    continue
                out[p.uid] = (p.devices, "")
                self.log.info("claim prepared", claim=p.uid, slice_file=p.slice_path,
                              cdi=p.cdi_path)
            return out

    def unprepare(self, uids: Sequence[str]) -> dict[str, str]:
        """Error (or "") per claim uid; unknown claims are already unprepared."""
        out: dict[str, str] = {}
        with self.lock:
            for uid in uids:
                try:
                    check_uid("claim", uid)
                except LimitError as e:
                    out[uid] = f"{e.code}: {e.msg}"
                    continue
                try:
                    removed, warn = self.slices.drop(
                        slice_file(self.opts.slices_dir, "claim", uid))
                    remove(cdi_file(self.opts.cdi_dir, self.opts.cdi_kind, uid))
                except OSError as e:
                    out[uid] = f"INTERNAL: cannot remove {e.filename}: {e.strerror}"
                    continue
                if warn:
                    self.log.warning("vgpud did not take the removal", claim=uid, error=warn)
                if removed:
                    self.log.info("claim unprepared", claim=uid)
                out[uid] = ""
        return out


# --------------------------------------------------------------------------
# gRPC


class _DraService(dra_grpc.DRAPluginServicer):
    def __init__(self, driver: DraDriver) -> None:
        self.driver = driver

    def NodePrepareResources(self, request: dra.NodePrepareResourcesRequest,
                             context: grpc.ServicerContext) -> dra.NodePrepareResourcesResponse:
        try:
            res = self.driver.prepare([(c.namespace, c.name, c.uid) for c in request.claims])
        except LimitError as e:
            self.driver.log.warning("prepare refused", code=e.code, error=e.msg)
            abort(context, e)
        resp = dra.NodePrepareResourcesResponse()
        for uid, (devices, err) in res.items():
            entry = resp.claims[uid]
            entry.devices.extend(devices)
            entry.error = err
        return resp

    def NodeUnprepareResources(self, request: dra.NodeUnprepareResourcesRequest,
                               context: grpc.ServicerContext
                               ) -> dra.NodeUnprepareResourcesResponse:
        if len(request.claims) > MAX_CLAIMS:
            abort(context, invalid(f"more than {MAX_CLAIMS} claims in one request"))
        res = self.driver.unprepare([c.uid for c in request.claims])
        resp = dra.NodeUnprepareResourcesResponse()
        for uid, err in res.items():
            resp.claims[uid].error = err
        return resp


class _Registration(reg_grpc.RegistrationServicer):
    def __init__(self, opts: DraOptions, log: Any) -> None:
        self.opts = opts
        self.log = log
        self.registered = threading.Event()
        self.error: str | None = None

    def GetInfo(self, request: reg.InfoRequest, context: grpc.ServicerContext
                ) -> reg.PluginInfo:
        return reg.PluginInfo(type="DRAPlugin", name=self.opts.driver,
                              endpoint=self.opts.kubelet_plugin_socket,
                              supported_versions=[SERVICE_VERSION])

    def NotifyRegistrationStatus(self, request: reg.RegistrationStatus,
                                 context: grpc.ServicerContext
                                 ) -> reg.RegistrationStatusResponse:
        if request.plugin_registered:
            self.error = None
            self.registered.set()
            self.log.info("registered with the kubelet")
        else:
            self.error = request.error
            self.registered.clear()
            self.log.error("the kubelet refused the registration", error=request.error)
        return reg.RegistrationStatusResponse()


class DraPlugin:
    """The two sockets: the DRA service first, then the registration socket
    that tells the kubelet where it is."""

    def __init__(self, driver: DraDriver) -> None:
        self.driver = driver
        self.opts = driver.opts
        self.registration = _Registration(self.opts, driver.log)
        self._servers: list[tuple[grpc.Server, str]] = []

    def start(self) -> None:
        svc = _DraService(self.driver)
        self._servers.append((unix_server(
            self.opts.plugin_socket,
            lambda s: dra_grpc.add_DRAPluginServicer_to_server(svc, s)),
            self.opts.plugin_socket))
        self._servers.append((unix_server(
            self.opts.registrar_socket,
            lambda s: reg_grpc.add_RegistrationServicer_to_server(self.registration, s),
            workers=2), self.opts.registrar_socket))
        self.driver.log.info("serving", plugin=self.opts.plugin_socket,
                             registration=self.opts.registrar_socket)

    def stop(self) -> None:
        # The registration socket goes first, so the kubelet stops using us.
        for server, path in reversed(self._servers):
            stop_server(server, path)
        self._servers.clear()
