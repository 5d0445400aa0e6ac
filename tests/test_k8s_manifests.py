"""contrib/kubernetes/: the manifests parse, and agree with the plugins: every
path a plugin writes (and puts in a CDI spec or an Allocate answer) is a host
path mounted at the same place, vgpud runs in the host's pid and cgroup
namespaces with the systemd unit's capabilities (plus setns), the RBAC rules
cover the API calls, and the examples are what the README says."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from vgpu_cgroup.k8s import GpuShare, SliceConfig, parse_config, pod_limits, quantity
from vgpu_cgroup.k8s._main import _parser

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "contrib" / "kubernetes"
GiB = 1 << 30


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _daemonset() -> dict[str, Any]:
    [ds] = _docs("daemonset.yaml")
    assert ds["kind"] == "DaemonSet"
    return ds


def test_every_manifest_is_a_named_object() -> None:
    for f in sorted(K8S.glob("*.yaml")):
        for d in _docs(f.name):
            assert d["apiVersion"], f
            assert d["kind"], f
            assert d["metadata"]["name"], f


def test_plugin_paths_are_host_paths_mounted_in_place() -> None:
    spec = _daemonset()["spec"]["template"]["spec"]
    host = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    containers = {c["name"]: c for c in spec["containers"]}
    assert set(containers) == {"vgpud", "dra", "device-plugin"}
    for name in ("dra", "device-plugin"):
        c = containers[name]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        for mp, vol in mounts.items():
            assert host.get(vol) == mp, f"{name}: {vol} must be mounted at its host path"
        args = _parser().parse_args(c["command"][1:])
        socket_dir = args.socket_dir or os.path.dirname(args.vgpud_socket)
        paths = [args.slices_dir, args.state_dir, socket_dir, args.vgpud_socket]
        if name == "dra":
            paths += [args.cdi_dir, args.plugin_dir, args.registry_dir]
        else:
            paths += [args.device_plugin_dir, args.pod_resources_socket]
        for p in paths:
            assert any(p == mp or p.startswith(mp + "/") for mp in mounts), (name, p)
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        env = {e["name"]: e for e in c["env"]}
        assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_vgpud_sees_the_hosts_processes_and_cgroups_with_the_units_hardening() -> None:
    spec = _daemonset()["spec"]["template"]["spec"]
    assert spec["hostPID"] is True
    [vgpud] = [c for c in spec["containers"] if c["name"] == "vgpud"]
    assert vgpud["command"][:3] == ["nsenter", "--cgroup=/proc/1/ns/cgroup", "--"]
    assert vgpud["command"][3] == "vgpud"
    cmd = vgpud["command"]
    sock = cmd[cmd.index("--socket") + 1]
    for c in spec["containers"]:
        if c["name"] != "vgpud":  # the plugins talk to that socket, and mount its directory
            args = _parser().parse_args(c["command"][1:])
            assert args.vgpud_socket == sock
            assert os.path.dirname(sock) != "/run/vgpu"  # tenants see only the socket
    # The runtime layer vgpud reads is where the plugins write.
    assert cmd[cmd.index("--runtime-dir") + 1] + "/slices" == _parser().parse_args(
        ["dra"]).slices_dir
    mounts = {m["mountPath"]: m for m in vgpud["volumeMounts"]}
    assert mounts["/sys/fs/cgroup"]["readOnly"] is True
    assert "/run/vgpu" in mounts
    assert mounts["/etc/vgpu/slices"]["readOnly"] is True
    assert not mounts["/etc/vgpu/slices.control"].get("readOnly")
    unit = (ROOT / "contrib" / "systemd" / "vgpud.service").read_text()
    bounding = set(re.search(r"^CapabilityBoundingSet=(.*)$", unit, re.M)
                   .group(1).split())  # type: ignore[union-attr]
    caps = vgpud["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"]
    assert {f"CAP_{c}" for c in caps["add"]} == bounding | {"CAP_SYS_ADMIN"}
    assert vgpud["securityContext"]["readOnlyRootFilesystem"] is True


def test_rbac_covers_the_plugins_api_calls() -> None:
    role = next(d for d in _docs("rbac.yaml") if d["kind"] == "ClusterRole")
    allowed = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    for need in [("resource.k8s.io", "resourceclaims", "get"), ("", "pods", "get"),
                 ("", "nodes", "get")] + [("resource.k8s.io", "resourceslices", v)
                                          for v in ("list", "create", "update", "delete")]:
        assert need in allowed, need
    [ds] = _docs("daemonset.yaml")
    sa = next(d for d in _docs("rbac.yaml") if d["kind"] == "ServiceAccount")
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert ds["metadata"]["namespace"] == sa["metadata"]["namespace"]


def test_device_class_selects_the_driver() -> None:
    [dc] = _docs("deviceclass.yaml")
    assert dc["kind"] == "DeviceClass"
    assert dc["spec"]["selectors"] == [{"cel": {"expression": 'device.driver == "vgpu.io"'}}]


def test_the_examples_ask_for_30_cores_and_8_gib() -> None:
    tmpl, p = _docs("example-claim.yaml")
    assert tmpl["kind"] == "ResourceClaimTemplate"
    [req] = tmpl["spec"]["spec"]["devices"]["requests"]
    assert req["exactly"]["deviceClassName"] == "vgpu.io"
    asked = req["exactly"]["capacity"]["requests"]
    assert quantity("cores", asked["cores"]) == 30
    assert quantity("memory", asked["memory"]) == 8 * GiB
    [cfg] = tmpl["spec"]["spec"]["devices"]["config"]
    parsed = parse_config(cfg["opaque"]["parameters"], "example")
    lim = pod_limits([GpuShare("GPU-x", 30, 8 * GiB)], parsed)
    assert lim.knobs["gpu.cores.max"] == 30
    assert lim.knobs["gpu.memory.max"] == 8 * GiB
    assert p["spec"]["resourceClaims"][0]["resourceClaimTemplateName"] == \
        tmpl["metadata"]["name"]
    [dp_pod] = _docs("example-device-plugin.yaml")
    limits = dp_pod["spec"]["containers"][0]["resources"]["limits"]
    assert limits["vgpu.io/cores"] == 30
    assert limits["vgpu.io/memory"] * (256 << 20) == 8 * GiB
    assert pod_limits([GpuShare("GPU-x", 30, 8 * GiB)], SliceConfig()).knobs[
        "gpu.memory.max"] == 8 * GiB
