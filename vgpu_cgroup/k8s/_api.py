"""The few Kubernetes API calls the plugins make, behind one small interface.

The kubelet tells a DRA driver only a claim's namespace, name and uid, and a
device plugin only device ids; what the pod is (its uid, its QoS class and so
its cgroup) and what the scheduler allocated are in the API server. The
calls go through the ``kubernetes`` client (its configuration: in-cluster
service account or kubeconfig, TLS, token refresh), but as plain JSON rather
than its generated models: a model older than the cluster drops fields it
does not know (KEP-5075's ``consumedCapacity`` and ``shareID`` among them),
and the plugins must see exactly what the API server sent.
"""

from __future__ import annotations

import contextlib
import json
import urllib.parse
from typing import Any, Protocol


class ApiError(Exception):
    """A failed API call; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


class ClusterApi(Protocol):
    """What the plugins read and write in the cluster."""

    def get_claim(self, namespace: str, name: str) -> dict[str, Any]: ...
    def get_pod(self, namespace: str, name: str) -> dict[str, Any]: ...
    def get_node(self, name: str) -> dict[str, Any]: ...
    def list_resource_slices(self, node: str, driver: str) -> list[dict[str, Any]]: ...
    def create_resource_slice(self, body: dict[str, Any]) -> dict[str, Any]: ...
    def replace_resource_slice(self, name: str, body: dict[str, Any]) -> dict[str, Any]: ...
    def delete_resource_slice(self, name: str) -> None: ...


RESOURCE = "/apis/resource.k8s.io/v1"


def _q(s: str) -> str:
    return urllib.parse.quote(s, safe="")


class KubeApi:
    """ClusterApi over the ``kubernetes`` client's transport."""

    def __init__(self, api_client: Any, *, timeout: float = 15.0) -> None:
        self.client = api_client
        self.timeout = timeout

    @classmethod
    def from_environment(cls, kubeconfig: str | None = None) -> KubeApi:
        """In-cluster config (the pod's service account) unless a kubeconfig
        is named or found."""
        from kubernetes import client, config

        try:
            if kubeconfig:
                config.load_kube_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
            else:
                try:
                    config.load_incluster_config()  # type: ignore[no-untyped-call]
                except config.ConfigException:
                    config.load_kube_config()  # type: ignore[no-untyped-call]
        except (config.ConfigException, OSError) as e:
            raise ApiError(0, f"no Kubernetes API configuration: {e}") from None
        return cls(client.ApiClient())

    def _call(self, method: str, path: str, *, body: Any = None,
              query: list[tuple[str, str]] | None = None) -> Any:
        from kubernetes.client.exceptions import ApiException

        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            m, url, hdrs, data, _ = self.client.param_serialize(
                method=method, resource_path=path, query_params=query or [],
                header_params=headers, body=body, auth_settings=["BearerToken"])
            resp = self.client.call_api(m, url, header_params=hdrs, body=data,
                                        _request_timeout=self.timeout)
            raw = resp.read()
            status = int(resp.status)
        except ApiException as e:
            raise ApiError(int(e.status or 0), f"{method} {path}: {e.status} {e.reason}") from None
        except OSError as e:  # includes urllib3's connection errors
            raise ApiError(0, f"{method} {path}: {e}") from None
        except Exception as e:  # urllib3 errors that are not OSErrors
            if type(e).__module__.startswith("urllib3"):
                raise ApiError(0, f"{method} {path}: {e}") from None
            raise
        if not 200 <= status < 300:
            reason = ""
            with contextlib.suppress(ValueError, AttributeError):
                reason = str(json.loads(raw).get("message", ""))
            raise ApiError(status, f"{method} {path}: HTTP {status} {reason}".rstrip())
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise ApiError(status, f"{method} {path}: the answer is not JSON") from None

    def _obj(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        out = self._call(method, path, **kw)
        if not isinstance(out, dict):
            raise ApiError(0, f"{method} {path}: the answer is not an object")
        return out

    def get_claim(self, namespace: str, name: str) -> dict[str, Any]:
        return self._obj("GET", f"{RESOURCE}/namespaces/{_q(namespace)}/resourceclaims/"
                                f"{_q(name)}")

    def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        return self._obj("GET", f"/api/v1/namespaces/{_q(namespace)}/pods/{_q(name)}")

    def get_node(self, name: str) -> dict[str, Any]:
        return self._obj("GET", f"/api/v1/nodes/{_q(name)}")

    def list_resource_slices(self, node: str, driver: str) -> list[dict[str, Any]]:
        out = self._obj("GET", f"{RESOURCE}/resourceslices", query=[
            ("fieldSelector", f"spec.nodeName={node},spec.driver={driver}")])
        items = out.get("items") or []
        return [i for i in items if isinstance(i, dict)]

    def create_resource_slice(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._obj("POST", f"{RESOURCE}/resourceslices", body=body)

    def replace_resource_slice(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._obj("PUT", f"{RESOURCE}/resourceslices/{_q(name)}", body=body)

    def delete_resource_slice(self, name: str) -> None:
        self._call("DELETE", f"{RESOURCE}/resourceslices/{_q(name)}")
