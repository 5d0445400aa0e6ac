"""A pod and its claim as the API server gives them: the pod's QoS class
and cgroup, and a DRA claim's allocated devices, config and pod. Pure
functions over the API's JSON, no I/O; what the shares become is
``_limits``'.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._limits import (
    CORES,
    DRIVER,
    MAX_CONFIGS,
    MAX_RESULTS,
    MEMORY,
    SliceConfig,
    byte_count,
    check_uid,
    invalid,
    parse_config,
    precondition,
    quantity,
    unavailable,
)

QOS_CLASSES = ("Guaranteed", "Burstable", "BestEffort")


def pod_qos(pod: Mapping[str, Any]) -> str:
    """The pod's QoS class: status.qosClass (set by the API server at
    creation), else computed from its containers as the kubelet does."""
    status = pod.get("status") or {}
    qos = status.get("qosClass") if isinstance(status, dict) else None
    if isinstance(qos, str) and qos in QOS_CLASSES:
        return qos
    spec = pod.get("spec") or {}
    containers = [*spec.get("containers", []), *spec.get("initContainers", [])]
    requests_any = False
    guaranteed = bool(containers)
    for c in containers:
        res = c.get("resources") or {}
        req, lim = res.get("requests") or {}, res.get("limits") or {}
        for r in ("cpu", "memory"):
            if r in req or r in lim:
                requests_any = True
            lv = lim.get(r)
            rv = req.get(r, lv)
            if lv is None or rv is None or quantity(r, rv) != quantity(r, lv):
                guaranteed = False
    if guaranteed:
        return "Guaranteed"
    return "Burstable" if requests_any else "BestEffort"


def pod_cgroup(uid: str, qos: str, *, driver: str = "systemd", root: str = "") -> str:
    """The pod's cgroup path relative to the cgroup2 mount, as the kubelet
    names it: ``kubepods.slice/kubepods-burstable.slice/kubepods-burstable-
    pod<uid with _>.slice`` (systemd driver; Guaranteed pods sit directly in
    ``kubepods.slice``) or ``kubepods/burstable/pod<uid>`` (cgroupfs).
    ``root`` is the kubelet's --cgroup-root (or a test's private subtree)."""
    check_uid("pod", uid)
    if qos not in QOS_CLASSES:
        raise precondition(f"unknown QoS class {qos!r}")
    if driver == "systemd":
        u = uid.replace("-", "_")
        if qos == "Guaranteed":
            rel = f"kubepods.slice/kubepods-pod{u}.slice"
        else:
            q = qos.lower()
            rel = f"kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{u}.slice"
    elif driver == "cgroupfs":
        rel = f"kubepods/pod{uid}" if qos == "Guaranteed" else f"kubepods/{qos.lower()}/pod{uid}"
    else:
        raise ValueError(f"cgroup driver {driver!r} is not systemd or cgroupfs")
    root = root.strip("/")
    return f"{root}/{rel}" if root else rel


# --------------------------------------------------------------------------
# DRA: claim → shares and config


@dataclass(frozen=True)
class AllocatedDevice:
    """One allocation result of this driver in a claim."""

    request: str
    pool: str
    device: str
    share_id: str | None
    cores: float | None  # None: the claim took the device whole
    memory: int | None


def _capacity(consumed: Mapping[str, Any], name: str, driver: str) -> object:
    for key in (name, f"{driver}/{name}"):
        if key in consumed:
            return consumed[key]
    return None


def allocated_devices(claim: Mapping[str, Any], driver: str = DRIVER
                      ) -> list[AllocatedDevice]:
    """This driver's results in ``status.allocation``; UNAVAILABLE if the
    claim is not allocated yet."""
    alloc = (claim.get("status") or {}).get("allocation")
    if not isinstance(alloc, dict):
        raise unavailable("the claim is not allocated yet")
    results = ((alloc.get("devices") or {}).get("results")) or []
    if not isinstance(results, list) or len(results) > MAX_RESULTS:
        raise invalid("status.allocation.devices.results is malformed")
    out: list[AllocatedDevice] = []
    for r in results:
        if not isinstance(r, dict) or r.get("driver") != driver:
            continue
        consumed = r.get("consumedCapacity") or {}
        if not isinstance(consumed, dict):
            raise invalid("consumedCapacity is not a map")
        c = _capacity(consumed, CORES, driver)
        m = _capacity(consumed, MEMORY, driver)
        share = r.get("shareID")
        out.append(AllocatedDevice(
            request=str(r.get("request", "")), pool=str(r.get("pool", "")),
            device=str(r.get("device", "")),
            share_id=share if isinstance(share, str) and share else None,
            cores=float(quantity("consumed cores", c)) if c is not None else None,
            memory=byte_count("consumed memory", m) if m is not None else None))
    if not out:
        raise precondition(f"the claim has no device of driver {driver}")
    return out


def _request_matches(filters: Sequence[str], requests: set[str]) -> bool:
    if not filters:
        return True
    return any(f in requests or any(r.startswith(f + "/") for r in requests) for f in filters)


def claim_config(claim: Mapping[str, Any], requests: set[str], driver: str = DRIVER
                 ) -> SliceConfig:
    """The merged config of this driver for a claim: class configs
    (``FromClass``, the administrator's defaults) first, then the claim's
    own (``FromClaim``); later wins. From status.allocation.devices.config,
    which the scheduler copied when it allocated."""
    alloc = (claim.get("status") or {}).get("allocation") or {}
    configs = (alloc.get("devices") or {}).get("config") or []
    if not isinstance(configs, list) or len(configs) > MAX_CONFIGS:
        raise invalid("status.allocation.devices.config is malformed")
    ordered = sorted(
        (c for c in configs if isinstance(c, dict)),
        key=lambda c: 0 if c.get("source") == "FromClass" else 1)
    cfg = SliceConfig()
    for i, c in enumerate(ordered):
        opaque = c.get("opaque")
        if not isinstance(opaque, dict) or opaque.get("driver") != driver:
            continue
        filters = c.get("requests") or []
        if not isinstance(filters, list) or not _request_matches(
                [str(f) for f in filters], requests):
            continue
        where = f"{'class' if c.get('source') == 'FromClass' else 'claim'} config #{i + 1}"
        cfg = cfg.merged(parse_config(opaque.get("parameters"), where))
    return cfg


def claim_pod(claim: Mapping[str, Any]) -> tuple[str, str]:
    """(name, uid) of the one pod the claim is reserved for."""
    reserved = (claim.get("status") or {}).get("reservedFor") or []
    pods = [r for r in reserved if isinstance(r, dict) and r.get("resource") == "pods"
            and not r.get("apiGroup")]
    if not pods:
        raise unavailable("the claim is not reserved for a pod yet")
    if len(pods) > 1 or len(reserved) > 1:
        raise precondition(
            f"the claim is reserved for {len(reserved)} consumers; a vgpu claim gives its "
            "share to one pod's slice (use a ResourceClaimTemplate, one claim per pod)")
    p = pods[0]
    return str(p.get("name", "")), check_uid("pod", p.get("uid"))
