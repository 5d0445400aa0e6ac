"""The pure core of the Kubernetes plugins: a claim's allocation and config to
knobs, the pod's cgroup, the ResourceSlice, the device plugin's units."""

from __future__ import annotations

from typing import Any

import pytest
from _k8s import GiB, MiB, claim, config, pod, result

from vgpu_cgroup._core._config import parse_slice_file
from vgpu_cgroup.k8s import (
    Gpu,
    GpuShare,
    LimitError,
    SliceConfig,
    Units,
    parse_config,
    pod_cgroup,
    pod_limits,
    pod_qos,
    preferred,
    quantity,
    slice_spec,
)
from vgpu_cgroup.k8s._claims import (
    allocated_devices,
    claim_config,
    claim_pod,
)
from vgpu_cgroup.k8s._limits import (
    slice_meta,
    slice_text,
)
from vgpu_cgroup.k8s._resourceslice import _same

UUID0 = "GPU-00000000-0000-0000-0000-000000000000"
UUID1 = "GPU-11111111-1111-1111-1111-111111111111"
GPUS = [Gpu(0, UUID0, "Fake H200", 16 * GiB), Gpu(1, UUID1, "Fake H200", 16 * GiB)]


def _code(fn: Any, *a: Any, **kw: Any) -> tuple[str, str]:
    with pytest.raises(LimitError) as ei:
        fn(*a, **kw)
    return ei.value.code, ei.value.msg


def test_quantities_are_kubernetes_quantities() -> None:
    assert quantity("x", "8Gi") == 8 * GiB
    assert quantity("x", "512Mi") == 512 * MiB
    assert quantity("x", "8G") == 8_000_000_000
    assert quantity("x", "30") == 30
    assert quantity("x", "1.5") == quantity("x", "1500m")
    assert quantity("x", "1e3") == 1000
    for bad in ("8 GiB", "lots", "", "1Gib", True, None, [1]):
        assert _code(quantity, "x", bad)[0] == "INVALID_ARGUMENT"


def test_config_nested_or_dotted() -> None:
    nested = parse_config({"apiVersion": "vgpu.io/v1alpha1", "kind": "SliceConfig",
                           "cores": {"min": 20, "max": 60}, "memory": {"max": "4Gi"},
                           "idle": False}, "claim")
    dotted = parse_config({"cores.min": "20", "cores.max": 60, "memory.max": "4Gi",
                           "idle": False}, "claim")
    assert nested == dotted == SliceConfig(cores_min=20, cores_max=60, memory_max=4 * GiB,
                                           idle=False)
    assert parse_config({"cores": {"max": "max"}}, "c").cores_max_unlimited
    assert parse_config(None, "c") == SliceConfig()


@pytest.mark.parametrize(("params", "words"), [
    ({"cores": {"max": 150}}, "cores.max: 150 is out of range"),
    ({"cores": {"max": 0}}, "cores.max: 0 is out of range"),
    ({"cores": {"min": -1}}, "cores.min"),
    ({"cores": {"min": "lots"}}, "expected a number of cores"),
    ({"memory": {"max": "8 gigs"}}, "memory.max"),
    ({"memory": {"max": "0"}}, "more than 0 bytes"),
    ({"idle": "yes"}, "idle: expected true or false"),
    ({"cores": {"weight": 5}}, "unknown key 'cores.weight'"),
    ({"cores.min": 1, "cores": {"min": 2}}, "given twice"),
    ({"kind": "Other"}, "expected apiVersion vgpu.io/v1alpha1, kind SliceConfig"),
    ([1, 2], "parameters must be an object"),
    ({"cores": {"min": 1}, "pad": "x" * 11000}, "more than 10240"),
])
def test_bad_configs_are_refused_by_name(params: Any, words: str) -> None:
    code, msg = _code(parse_config, params, "claim config #1")
    assert code == "INVALID_ARGUMENT"
    assert msg.startswith("claim config #1: ")
    assert words in msg


def test_limits_default_to_hard_mode_from_the_scheduled_share() -> None:
    lim = pod_limits([GpuShare(UUID0, 30, 8 * GiB)], SliceConfig())
    assert lim.knobs == {"gpu.cores.min": 30, "gpu.cores.max": 30,
                         "gpu.memory.max": 8 * GiB, "gpu.devices": [UUID0]}
    soft = pod_limits([GpuShare(UUID0, 30, 8 * GiB)], SliceConfig(), soft_max=True)
    assert soft.knobs["gpu.cores.max"] == 100


def test_config_shapes_the_share_but_never_raises_the_guarantee() -> None:
    share = [GpuShare(UUID0, 30, 8 * GiB)]
    lim = pod_limits(share, SliceConfig(cores_min=10, cores_max=80, memory_max=4 * GiB))
    assert lim.knobs["gpu.cores.min"] == 10
    assert lim.knobs["gpu.cores.max"] == 80
    assert lim.knobs["gpu.memory.max"] == 4 * GiB
    idle = pod_limits(share, SliceConfig(idle=True))
    assert idle.knobs["gpu.cores.idle"] == 1
    assert idle.knobs["gpu.cores.min"] == 0
    unlimited = pod_limits(share, SliceConfig(cores_max_unlimited=True))
    assert "gpu.cores.max" not in unlimited.knobs
    code, msg = _code(pod_limits, share, SliceConfig(cores_min=40))
    assert code == "INVALID_ARGUMENT"
    assert "more than the 30 cores" in msg
    code, msg = _code(pod_limits, share, SliceConfig(memory_max=9 * GiB))
    assert code == "INVALID_ARGUMENT"
    assert "more than the 8589934592 bytes" in msg
    code, msg = _code(pod_limits, share, SliceConfig(cores_min=20, cores_max=10))
    assert code == "INVALID_ARGUMENT"
    assert "below cores.min" in msg


def test_a_pod_on_two_gpus_needs_the_same_share_on_each() -> None:
    lim = pod_limits([GpuShare(UUID0, 50, 4 * GiB), GpuShare(UUID1, 50, 4 * GiB)],
                     SliceConfig())
    assert lim.knobs["gpu.devices"] == [UUID0, UUID1]
    code, msg = _code(pod_limits, [GpuShare(UUID0, 50, 4 * GiB),
                                   GpuShare(UUID1, 30, 4 * GiB)], SliceConfig())
    assert code == "FAILED_PRECONDITION"
    assert "shares differ" in msg
    # Two requests on one GPU add up.
    lim = pod_limits([GpuShare(UUID0, 20, GiB), GpuShare(UUID0, 10, GiB)], SliceConfig())
    assert lim.knobs["gpu.cores.max"] == 30
    assert lim.knobs["gpu.memory.max"] == 2 * GiB


def test_pod_cgroup_is_the_kubelets() -> None:
    uid = "0d7bd12c-5a2e-4b0c-9d3e-1f2a3b4c5d6e"
    u = uid.replace("-", "_")
    assert pod_cgroup(uid, "Burstable") == (
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice")
    assert pod_cgroup(uid, "BestEffort") == (
        f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice")
    assert pod_cgroup(uid, "Guaranteed") == f"kubepods.slice/kubepods-pod{u}.slice"
    assert pod_cgroup(uid, "Burstable", driver="cgroupfs") == f"kubepods/burstable/pod{uid}"
    assert pod_cgroup(uid, "Guaranteed", root="/test-1/") == (
        f"test-1/kubepods.slice/kubepods-pod{u}.slice")
    assert _code(pod_cgroup, "../etc", "Burstable")[0] == "INVALID_ARGUMENT"


def test_qos_from_status_or_computed_like_the_kubelet() -> None:
    p = pod("a")
    assert pod_qos(p) == "Burstable"
    del p["status"]["qosClass"]
    assert pod_qos(p) == "BestEffort"
    p["spec"]["containers"][0]["resources"] = {"limits": {"cpu": "1", "memory": "1Gi"}}
    assert pod_qos(p) == "Guaranteed"
    p["spec"]["containers"][0]["resources"]["requests"] = {"cpu": "500m"}
    assert pod_qos(p) == "Burstable"


def test_claim_results_config_and_pod() -> None:
    p = pod("job")
    c = claim("job-gpu", p, results=[result(cores="30", memory="8Gi")], configs=[
        config({"cores": {"max": 50}}, source="FromClass"),
        config({"cores": {"max": 60}, "memory": {"max": "6Gi"}}),
        config({"cores": {"max": 99}}, requests=["other"]),
        {"source": "FromClaim", "opaque": {"driver": "gpu.example.com", "parameters": 1}},
    ])
    devs = allocated_devices(c)
    assert [(d.device, d.cores, d.memory) for d in devs] == [("gpu-0", 30.0, 8 * GiB)]
    assert devs[0].share_id
    cfg = claim_config(c, {"gpu"})
    assert cfg.cores_max == 60
    assert cfg.memory_max == 6 * GiB
    assert claim_pod(c) == ("job", p["metadata"]["uid"])
    c["status"]["reservedFor"].append({"resource": "pods", "name": "b", "uid": "x"})
    assert _code(claim_pod, c)[0] == "FAILED_PRECONDITION"
    c["status"]["reservedFor"] = []
    assert _code(claim_pod, c)[0] == "UNAVAILABLE"
    del c["status"]["allocation"]
    assert _code(allocated_devices, c)[0] == "UNAVAILABLE"


def test_slice_text_loads_in_vgpud_and_carries_its_owner() -> None:
    lim = pod_limits([GpuShare(UUID0, 30, 8 * GiB)], SliceConfig(cores_max=50))
    slc = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podx.slice"
    text = slice_text(slc, lim.knobs, {"kind": "claim", "uid": "u1"})
    settings = {s.knob: s.value for s in parse_slice_file("/x/k8s-claim-u1.conf", text)}
    assert settings == {"gpu.cores.min": 30.0, "gpu.cores.max": 50.0,
                        "gpu.memory.max": 8 * GiB, "gpu.devices": (UUID0,)}
    assert {s.slice for s in parse_slice_file("/x/k8s-claim-u1.conf", text)} == {slc}
    assert slice_meta(text) == {"kind": "claim", "uid": "u1"}
    assert slice_meta("gpu.cores.max = 3\n") is None


def test_resource_slice_devices_share_by_capacity() -> None:
    spec = slice_spec("node-1", "vgpu.io", GPUS, 3)
    assert spec["pool"] == {"name": "node-1", "generation": 3, "resourceSliceCount": 1}
    assert spec["nodeName"] == "node-1"
    assert spec["driver"] == "vgpu.io"
    d = spec["devices"][0]
    assert d["name"] == "gpu-0"
    assert d["allowMultipleAllocations"] is True
    assert d["attributes"]["uuid"] == {"string": UUID0}
    assert d["capacity"]["cores"]["value"] == "100"
    assert d["capacity"]["cores"]["requestPolicy"]["validRange"] == {
        "min": "1", "max": "100", "step": "1"}
    assert d["capacity"]["memory"]["value"] == str(16 * GiB)
    # The API server writes quantities back in canonical form: still the same.
    have = slice_spec("node-1", "vgpu.io", GPUS, 3)
    have["devices"][0]["capacity"]["memory"]["value"] = "16Gi"
    have["devices"][0]["capacity"]["memory"]["requestPolicy"]["validRange"]["min"] = "256Mi"
    assert _same(have, slice_spec("node-1", "vgpu.io", GPUS, 4))
    assert not _same(have, slice_spec("node-1", "vgpu.io", GPUS[:1], 4))


def test_units_and_preferred_allocation_keep_a_pod_on_one_gpu() -> None:
    u = Units(GPUS)
    assert len(u.ids["cores"]) == 200
    assert len(u.ids["memory"]) == 2 * 64  # 16 GiB in 256 MiB units
    assert all(len(i) <= 63 for i in u.ids["cores"] + u.ids["memory"])
    cores = u.ids["cores"]
    # GPU 0 is partly used (40 free), GPU 1 empty: 30 go to the fuller GPU 0.
    avail = cores[60:100] + cores[100:]
    got = preferred(u, "cores", avail, [], 30, None)
    assert {u.owner[d][1] for d in got} == {UUID0}
    assert len(got) == 30
    # Too many for GPU 0: all from GPU 1.
    got = preferred(u, "cores", avail, [], 50, None)
    assert {u.owner[d][1] for d in got} == {UUID1}
    # A hint from the container's other resource wins when it fits.
    got = preferred(u, "cores", avail, [], 30, UUID1)
    assert {u.owner[d][1] for d in got} == {UUID1}
    # Must-include devices stay, and pull the rest to their GPU.
    got = preferred(u, "cores", avail, [cores[150]], 10, None)
    assert cores[150] in got
    assert {u.owner[d][1] for d in got} == {UUID1}
    # More than one GPU has: spread over as few as possible.
    got = preferred(u, "cores", cores, [], 150, None)
    assert len(got) == 150
    with pytest.raises(LimitError):
        u.gpu_of("memory", cores[0])
