"""The node's ResourceSlice: each GPU a device that allows many allocations,
with consumable capacity ``cores`` (100) and ``memory`` (its bytes), so the
scheduler itself packs claims onto GPUs and never over-commits one
(``resource.k8s.io/v1``, KEP-5075 consumable capacity).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ._api import ApiError, ClusterApi
from ._limits import CORES, CORES_PER_GPU, MEMORY, MEMORY_UNIT, LimitError, quantity
from ._vgpud import Gpu

API_VERSION = "resource.k8s.io/v1"


def device_name(gpu: Gpu) -> str:
    """A DNS label, stable for the GPU's index on this node."""
    return f"gpu-{gpu.index}"


def slice_name(node: str, driver: str) -> str:
    name = re.sub(r"[^a-z0-9.-]", "-", f"{node}-{driver}".lower()).strip("-.")
    return name[:253]


def _attr_str(s: str) -> dict[str, str]:
    return {"string": s[:64]}


def slice_spec(node: str, driver: str, gpus: Sequence[Gpu], generation: int) -> dict[str, Any]:
    devices = []
    for g in gpus:
        devices.append({
            "name": device_name(g),
            "allowMultipleAllocations": True,
            "attributes": {
                "uuid": _attr_str(g.uuid),
                "index": {"int": g.index},
                "productName": _attr_str(g.name),
            },
            "capacity": {
                # Percent of the GPU, like vcuda-core: a claim that names no
                # cores takes the whole GPU's time.
                CORES: {"value": str(CORES_PER_GPU), "requestPolicy": {
                    "default": str(CORES_PER_GPU),
                    "validRange": {"min": "1", "max": str(CORES_PER_GPU), "step": "1"}}},
                # Bytes; requests are rounded up to at least one vcuda-memory
                # unit; a claim that names no memory takes all of it, so
                # memory is never over-committed.
                MEMORY: {"value": str(g.total_mem), "requestPolicy": {
                    "default": str(g.total_mem),
                    "validRange": {"min": str(MEMORY_UNIT)}}},
            },
        })
    return {
        "driver": driver,
        "nodeName": node,
        "pool": {"name": node, "generation": generation, "resourceSliceCount": 1},
        "devices": devices,
    }


def _eq(have: object, want: object) -> bool:
    """``have`` (from the API server) says what ``want`` says: fields we do
    not set are ignored (defaults), and quantities compare by value (the
    API server writes 268435456 back as 256Mi)."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(_eq(have.get(k), v) for k, v in want.items())
    if isinstance(want, list):
        return (isinstance(have, list) and len(have) == len(want)
                and all(_eq(h, w) for h, w in zip(have, want, strict=True)))
    if isinstance(want, str) and isinstance(have, str) and have != want:
        try:
            return quantity("", have) == quantity("", want)
        except LimitError:
            return False
    return bool(have == want)


def _same(have: dict[str, Any], want: dict[str, Any]) -> bool:
    """Specs equal but for the pool generation."""
    def strip(s: dict[str, Any]) -> dict[str, Any]:
        s = dict(s)
        pool = dict(s.get("pool") or {})
        pool.pop("generation", None)
        s["pool"] = pool
        return {k: s.get(k) for k in ("driver", "nodeName", "pool", "devices")}
    return _eq(strip(have), strip(want))


def publish(api: ClusterApi, node: str, driver: str, gpus: Sequence[Gpu]) -> str:
    """Create or update the node's one ResourceSlice (owned by the Node, so it
    goes with it) and delete any other slice of this driver on this node.
    Returns what was done: ``created``, ``updated`` or ``unchanged``."""
    name = slice_name(node, driver)
    existing = api.list_resource_slices(node, driver)
    mine = next((s for s in existing if (s.get("metadata") or {}).get("name") == name), None)
    for s in existing:
        other = (s.get("metadata") or {}).get("name")
        if other and other != name:
            try:
                api.delete_resource_slice(str(other))
            except ApiError as e:
                if e.status != 404:
                    raise
    meta: dict[str, Any] = {"name": name}
    try:
        node_obj = api.get_node(node)
        uid = (node_obj.get("metadata") or {}).get("uid")
        if uid:
            meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": node,
                                        "uid": uid, "controller": True}]
    except ApiError as e:
        if e.status not in (403, 404):
            raise
    if mine is None:
        body = {"apiVersion": API_VERSION, "kind": "ResourceSlice", "metadata": meta,
                "spec": slice_spec(node, driver, gpus, 1)}
        api.create_resource_slice(body)
        return "created"
    spec = mine.get("spec") or {}
    gen = int((spec.get("pool") or {}).get("generation") or 0)
    want = slice_spec(node, driver, gpus, gen)
    if _same(spec, want):
        return "unchanged"
    meta["resourceVersion"] = (mine.get("metadata") or {}).get("resourceVersion")
    body = {"apiVersion": API_VERSION, "kind": "ResourceSlice", "metadata": meta,
            "spec": slice_spec(node, driver, gpus, gen + 1)}
    api.replace_resource_slice(name, body)
    return "updated"
