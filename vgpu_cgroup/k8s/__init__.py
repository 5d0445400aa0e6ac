"""vgpu on Kubernetes: a DRA kubelet plugin and a device plugin that turn a
pod's claim (or its ``vgpu.io/cores`` and ``vgpu.io/memory``) into the knobs
of the pod's own cgroup slice, and put the hook into its containers.

Run as ``vgpu-k8s dra`` and ``vgpu-k8s device-plugin`` (``_main``), beside
vgpud; ``contrib/kubernetes/`` has the manifests. Needs the ``k8s`` extra
(grpcio, protobuf, kubernetes). The modules are private; what tests and
other tools use is re-exported here.
"""

from ._api import ApiError, ClusterApi, KubeApi
from ._claims import (
    pod_cgroup,
    pod_qos,
)
from ._deviceplugin import DevicePlugin, DevicePluginOptions, Units, preferred
from ._dra import DraDriver, DraOptions, DraPlugin
from ._files import HookFiles, cdi_file, cdi_spec, slice_file
from ._limits import (
    CORES_PER_GPU,
    DRIVER,
    MEMORY_UNIT,
    GpuShare,
    LimitError,
    SliceConfig,
    parse_config,
    pod_limits,
    quantity,
)
from ._main import main
from ._resourceslice import publish, slice_name, slice_spec
from ._vgpud import Gpu, SliceFiles, Vgpud, VgpudError

__all__ = [
    "CORES_PER_GPU",
    "DRIVER",
    "MEMORY_UNIT",
    "ApiError",
    "ClusterApi",
    "DevicePlugin",
    "DevicePluginOptions",
    "DraDriver",
    "DraOptions",
    "DraPlugin",
    "Gpu",
    "GpuShare",
    "HookFiles",
    "KubeApi",
    "LimitError",
    "SliceConfig",
    "SliceFiles",
    "Units",
    "Vgpud",
    "VgpudError",
    "cdi_file",
    "cdi_spec",
    "main",
    "parse_config",
    "pod_cgroup",
    "pod_limits",
    "pod_qos",
    "preferred",
    "publish",
    "quantity",
    "slice_file",
    "slice_name",
    "slice_spec",
]
