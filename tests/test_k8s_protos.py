"""The kubelet's gRPC APIs as vgpu's .proto files define them: the committed
Python is what scripts/gen-protos makes from them, and what goes on the
wire (proto packages, services, methods, field numbers and types) is the
kubelet's, as in k8s.io/kubelet/pkg/apis."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from vgpu_cgroup.k8s._gen import (
    deviceplugin_v1beta1_pb2,
    dra_v1_pb2,
    pluginregistration_pb2,
    podresources_v1_pb2,
)

ROOT = Path(__file__).resolve().parent.parent
GEN = ROOT / "vgpu_cgroup" / "k8s" / "_gen"


def test_committed_code_is_what_the_protos_generate(tmp_path: Path) -> None:
    if shutil.which("protoc-gen-mypy", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("mypy-protobuf is not installed")
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run([str(ROOT / "scripts" / "gen-protos"), str(tmp_path)], check=True, env=env,
                   capture_output=True)
    made = tmp_path / "vgpu_cgroup" / "k8s" / "_gen"
    names = sorted(p.name for p in made.iterdir())
    assert names == sorted(p.name for p in GEN.iterdir()
                           if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py",
                                               "_pb2_grpc.pyi")))
    for n in names:
        assert filecmp.cmp(made / n, GEN / n, shallow=False), (
            f"{n} differs from scripts/gen-protos' output: run scripts/gen-protos")


def _fields(msg: type) -> dict[str, tuple[int, int, bool]]:
    d = msg.DESCRIPTOR  # type: ignore[attr-defined]
    return {f.name: (f.number, f.type, f.is_repeated) for f in d.fields}


S, B, M, I64, U64 = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BOOL,
                     FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_INT64,
                     FieldDescriptor.TYPE_UINT64)
I32 = FieldDescriptor.TYPE_INT32


def _methods(module: object, service: str) -> dict[str, tuple[str, str, bool]]:
    svc = module.DESCRIPTOR.services_by_name[service]  # type: ignore[attr-defined]
    return {m.name: (m.input_type.full_name, m.output_type.full_name, m.server_streaming)
            for m in svc.methods}


def test_plugin_registration_is_the_kubelets() -> None:
    m = pluginregistration_pb2
    assert m.DESCRIPTOR.package == "pluginregistration"
    assert _methods(m, "Registration") == {
        "GetInfo": ("pluginregistration.InfoRequest", "pluginregistration.PluginInfo", False),
        "NotifyRegistrationStatus": ("pluginregistration.RegistrationStatus",
                                     "pluginregistration.RegistrationStatusResponse", False)}
    assert _fields(m.PluginInfo) == {"type": (1, S, False), "name": (2, S, False),
                                     "endpoint": (3, S, False),
                                     "supported_versions": (4, S, True)}
    assert _fields(m.RegistrationStatus) == {"plugin_registered": (1, B, False),
                                             "error": (2, S, False)}


def test_dra_v1_is_the_kubelets() -> None:
    m = dra_v1_pb2
    pkg = "k8s.io.kubelet.pkg.apis.dra.v1"
    assert m.DESCRIPTOR.package == pkg
    assert _methods(m, "DRAPlugin") == {
        "NodePrepareResources": (f"{pkg}.NodePrepareResourcesRequest",
                                 f"{pkg}.NodePrepareResourcesResponse", False),
        "NodeUnprepareResources": (f"{pkg}.NodeUnprepareResourcesRequest",
                                   f"{pkg}.NodeUnprepareResourcesResponse", False)}
    assert _fields(m.Claim) == {"namespace": (1, S, False), "uid": (2, S, False),
                                "name": (3, S, False)}
    assert _fields(m.Device) == {"request_names": (1, S, True), "pool_name": (2, S, False),
                                 "device_name": (3, S, False), "cdi_device_ids": (4, S, True),
                                 "share_id": (5, S, False)}
    assert _fields(m.NodePrepareResourceResponse) == {"devices": (1, M, True),
                                                      "error": (2, S, False)}
    assert _fields(m.NodeUnprepareResourceResponse) == {"error": (1, S, False)}
    assert _fields(m.NodePrepareResourcesRequest) == {"claims": (1, M, True)}
    # The response's claims is map<string, ...>: a repeated entry message.
    entry = m.NodePrepareResourcesResponse.DESCRIPTOR.fields_by_name["claims"].message_type
    assert entry is not None
    assert entry.GetOptions().map_entry
    # Bytes as the kubelet (Go) marshals a Claim decode here.
    c = m.Claim.FromString(b"\n\x02ns\x12\x03uid\x1a\x04name")
    assert (c.namespace, c.uid, c.name) == ("ns", "uid", "name")
    assert m.Device(share_id="s").SerializeToString() == b"*\x01s"


def test_device_plugin_v1beta1_is_the_kubelets() -> None:
    m = deviceplugin_v1beta1_pb2
    assert m.DESCRIPTOR.package == "v1beta1"
    assert _methods(m, "Registration") == {
        "Register": ("v1beta1.RegisterRequest", "v1beta1.Empty", False)}
    assert _methods(m, "DevicePlugin") == {
        "GetDevicePluginOptions": ("v1beta1.Empty", "v1beta1.DevicePluginOptions", False),
        "ListAndWatch": ("v1beta1.Empty", "v1beta1.ListAndWatchResponse", True),
        "GetPreferredAllocation": ("v1beta1.PreferredAllocationRequest",
                                   "v1beta1.PreferredAllocationResponse", False),
        "Allocate": ("v1beta1.AllocateRequest", "v1beta1.AllocateResponse", False),
        "PreStartContainer": ("v1beta1.PreStartContainerRequest",
                              "v1beta1.PreStartContainerResponse", False)}
    assert _fields(m.RegisterRequest) == {"version": (1, S, False), "endpoint": (2, S, False),
                                          "resource_name": (3, S, False),
                                          "options": (4, M, False)}
    assert _fields(m.DevicePluginOptions) == {
        "pre_start_required": (1, B, False), "get_preferred_allocation_available": (2, B, False)}
    assert _fields(m.Device) == {"ID": (1, S, False), "health": (2, S, False),
                                 "topology": (3, M, False)}
    assert _fields(m.ContainerPreferredAllocationRequest) == {
        "available_deviceIDs": (1, S, True), "must_include_deviceIDs": (2, S, True),
        "allocation_size": (3, I32, False)}
    assert _fields(m.ContainerPreferredAllocationResponse) == {"deviceIDs": (1, S, True)}
    assert _fields(m.ContainerAllocateRequest) == {"devices_ids": (1, S, True)}
    assert _fields(m.PreStartContainerRequest) == {"devices_ids": (1, S, True)}
    assert _fields(m.ContainerAllocateResponse) == {
        "envs": (1, M, True), "mounts": (2, M, True), "devices": (3, M, True),
        "annotations": (4, M, True), "cdi_devices": (5, M, True)}
    assert _fields(m.Mount) == {"container_path": (1, S, False), "host_path": (2, S, False),
                                "read_only": (3, B, False)}
    assert _fields(m.CDIDevice) == {"name": (1, S, False)}


def test_pod_resources_v1_is_the_kubelets() -> None:
    m = podresources_v1_pb2
    assert m.DESCRIPTOR.package == "v1"
    assert set(_methods(m, "PodResourcesLister")) == {"List", "GetAllocatableResources", "Get"}
    assert _methods(m, "PodResourcesLister")["List"] == (
        "v1.ListPodResourcesRequest", "v1.ListPodResourcesResponse", False)
    assert _fields(m.PodResources) == {"name": (1, S, False), "namespace": (2, S, False),
                                       "containers": (3, M, True)}
    assert _fields(m.ContainerResources) == {
        "name": (1, S, False), "devices": (2, M, True), "cpu_ids": (3, I64, True),
        "memory": (4, M, True), "dynamic_resources": (5, M, True)}
    assert _fields(m.ContainerDevices) == {"resource_name": (1, S, False),
                                           "device_ids": (2, S, True),
                                           "topology": (3, M, False)}
    assert _fields(m.ContainerMemory)["size"] == (2, U64, False)
    assert _fields(m.DynamicResource) == {"claim_name": (2, S, False),
                                          "claim_namespace": (3, S, False),
                                          "claim_resources": (4, M, True)}
