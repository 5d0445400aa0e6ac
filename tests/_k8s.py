"""Helpers for the Kubernetes plugin tests: a small API server, the kubelet's
sides of the gRPC APIs, and claim/pod objects shaped like the API server's.

The API server is a real HTTP server on 127.0.0.1 answering the few paths
the plugins use, so the tests go through the ``kubernetes`` client's own
transport (URLs, verbs, JSON bodies) rather than a stand-in for the plugins'
interface: what is tested is what a cluster would see.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import urllib.parse
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc

from vgpu_cgroup.k8s import KubeApi
from vgpu_cgroup.k8s._gen import deviceplugin_v1beta1_pb2 as dp
from vgpu_cgroup.k8s._gen import deviceplugin_v1beta1_pb2_grpc as dp_grpc
from vgpu_cgroup.k8s._gen import podresources_v1_pb2 as pr
from vgpu_cgroup.k8s._gen import podresources_v1_pb2_grpc as pr_grpc

GiB = 1 << 30
MiB = 1 << 20
RES = "/apis/resource.k8s.io/v1"


class FakeApiServer:
    """Claims, pods, nodes and ResourceSlices in memory, over HTTP."""

    def __init__(self) -> None:
        self.claims: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.slices: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._rv = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def _send(self, code: int, obj: object) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> Any:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n)) if n else None

            def _handle(self, method: str) -> None:
                url = urllib.parse.urlsplit(self.path)
                with outer.lock:
                    outer.requests.append((method, url.path))
                    code, obj = outer.route(method, url.path,
                                            urllib.parse.parse_qs(url.query),
                                            self._body() if method in ("POST", "PUT") else None)
                self._send(code, obj)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_PUT(self) -> None:
                self._handle("PUT")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def client(self) -> KubeApi:
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        return KubeApi(client.ApiClient(cfg), timeout=5)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def route(self, method: str, path: str, query: dict[str, list[str]],
              body: Any) -> tuple[int, object]:
        parts = path.strip("/").split("/")
        nf = (404, {"kind": "Status", "code": 404, "message": f"{path} not found"})
        if method == "GET" and parts[:3] == ["api", "v1", "namespaces"] and len(parts) == 6:
            obj = self.pods.get((parts[3], parts[5])) if parts[4] == "pods" else None
            return (200, obj) if obj else nf
        if method == "GET" and parts[:3] == ["api", "v1", "nodes"] and len(parts) == 4:
            node = self.nodes.get(parts[3])
            return (200, node) if node else nf
        if parts[:3] != ["apis", "resource.k8s.io", "v1"]:
            return nf
        rest = parts[3:]
        if method == "GET" and len(rest) == 4 and rest[0] == "namespaces" and \
                rest[2] == "resourceclaims":
            claim = self.claims.get((rest[1], rest[3]))
            return (200, claim) if claim else nf
        if rest[:1] == ["resourceslices"]:
            if method == "GET" and len(rest) == 1:
                sel = dict(kv.split("=", 1) for kv in
                           ",".join(query.get("fieldSelector", [])).split(",") if kv)
                items = [s for s in self.slices.values()
                         if all(_field(s, k) == v for k, v in sel.items())]
                return 200, {"kind": "ResourceSliceList", "items": copy.deepcopy(items)}
            if method == "POST" and len(rest) == 1:
                name = body["metadata"]["name"]
                if name in self.slices:
                    return 409, {"kind": "Status", "code": 409, "message": "exists"}
                body["metadata"]["resourceVersion"] = self._next_rv()
                body["metadata"]["uid"] = str(uuid.uuid4())
                self.slices[name] = body
                return 201, body
            if method == "PUT" and len(rest) == 2:
                old = self.slices.get(rest[1])
                if old is None:
                    return nf
                if body["metadata"].get("resourceVersion") != old["metadata"]["resourceVersion"]:
                    return 409, {"kind": "Status", "code": 409, "message": "conflict"}
                body["metadata"]["resourceVersion"] = self._next_rv()
                self.slices[rest[1]] = body
                return 200, body
            if method == "DELETE" and len(rest) == 2:
                return (200, self.slices.pop(rest[1])) if rest[1] in self.slices else nf
        return nf


def _field(obj: dict[str, Any], path: str) -> Any:
    cur: Any = obj
    for p in path.split("."):
        cur = cur.get(p) if isinstance(cur, dict) else None
    return cur


# ---------------------------------------------------------------- objects


def pod(name: str, *, ns: str = "default", node: str = "node-1", qos: str = "Burstable",
        uid: str | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": uid or str(uuid.uuid4())},
            "spec": {"nodeName": node, "containers": [{"name": "main", "image": "cuda"}]},
            "status": {"qosClass": qos, "phase": "Pending"}}


def claim(name: str, pod_obj: dict[str, Any], *, ns: str = "default", node: str = "node-1",
          results: Sequence[dict[str, Any]] | None = None,
          configs: Sequence[dict[str, Any]] = (), uid: str | None = None) -> dict[str, Any]:
    """An allocated claim reserved for ``pod_obj``, as the scheduler leaves it."""
    if results is None:
        results = [result()]
    for r in results:
        r.setdefault("pool", node)
    return {
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": ns, "uid": uid or str(uuid.uuid4())},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {
            "deviceClassName": "vgpu.io"}}]}},
        "status": {
            "allocation": {"devices": {"results": list(results), "config": list(configs)}},
            "reservedFor": [{"resource": "pods", "name": pod_obj["metadata"]["name"],
                             "uid": pod_obj["metadata"]["uid"]}],
        },
    }


def result(device: str = "gpu-0", cores: str | None = "30", memory: str | None = "8Gi",
           request: str = "gpu") -> dict[str, Any]:
    r: dict[str, Any] = {"request": request, "driver": "vgpu.io", "device": device,
                         "shareID": str(uuid.uuid4())}
    consumed = {}
    if cores is not None:
        consumed["cores"] = cores
    if memory is not None:
        consumed["memory"] = memory
    if consumed:
        r["consumedCapacity"] = consumed
    return r


def config(params: Any, source: str = "FromClaim", requests: Sequence[str] = ()
           ) -> dict[str, Any]:
    c: dict[str, Any] = {"source": source, "opaque": {"driver": "vgpu.io",
                                                      "parameters": params}}
    if requests:
        c["requests"] = list(requests)
    return c


# ---------------------------------------------------------------- the kubelet


class FakeDeviceKubelet:
    """The kubelet's side for device plugins: Registration on kubelet.sock and
    PodResourcesLister on its own socket, answering from ``pods``."""

    def __init__(self, plugin_dir: str, pod_resources_socket: str) -> None:
        self.plugin_dir = plugin_dir
        self.registered: list[dp.RegisterRequest] = []
        self.pods: list[pr.PodResources] = []
        self.lock = threading.Lock()
        outer = self

        class Reg(dp_grpc.RegistrationServicer):
            def Register(self, request: dp.RegisterRequest, context: grpc.ServicerContext
                         ) -> dp.Empty:
                with outer.lock:
                    outer.registered.append(request)
                return dp.Empty()

        class Lister(pr_grpc.PodResourcesListerServicer):
            def List(self, request: pr.ListPodResourcesRequest, context: grpc.ServicerContext
                     ) -> pr.ListPodResourcesResponse:
                with outer.lock:
                    return pr.ListPodResourcesResponse(pod_resources=list(outer.pods))

            def GetAllocatableResources(self, request: pr.AllocatableResourcesRequest,
                                        context: grpc.ServicerContext
                                        ) -> pr.AllocatableResourcesResponse:
                context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this fake kubelet")

            def Get(self, request: pr.GetPodResourcesRequest, context: grpc.ServicerContext
                    ) -> pr.GetPodResourcesResponse:
                context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this fake kubelet")

        os.makedirs(plugin_dir, exist_ok=True)
        self.reg_server = grpc.server(ThreadPoolExecutor(2))
        dp_grpc.add_RegistrationServicer_to_server(Reg(), self.reg_server)
        self.reg_server.add_insecure_port(f"unix://{os.path.join(plugin_dir, 'kubelet.sock')}")
        self.reg_server.start()
        self.pr_server = grpc.server(ThreadPoolExecutor(2))
        pr_grpc.add_PodResourcesListerServicer_to_server(Lister(), self.pr_server)
        self.pr_server.add_insecure_port(f"unix://{pod_resources_socket}")
        self.pr_server.start()

    def give(self, ns: str, name: str,
             containers: Mapping[str, Mapping[str, Sequence[str]]]) -> None:
        """Record that containers of a pod hold devices: {container: {resource: ids}}."""
        p = pr.PodResources(name=name, namespace=ns)
        for cname, res in containers.items():
            c = p.containers.add(name=cname)
            for rname, ids in res.items():
                c.devices.add(resource_name=rname, device_ids=list(ids))
        with self.lock:
            self.pods = [x for x in self.pods if (x.namespace, x.name) != (ns, name)] + [p]

    def forget(self, ns: str, name: str) -> None:
        with self.lock:
            self.pods = [x for x in self.pods if (x.namespace, x.name) != (ns, name)]

    def close(self) -> None:
        self.reg_server.stop(0).wait()
        self.pr_server.stop(0).wait()

