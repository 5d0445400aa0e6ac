"""The pure core of vgpu: the model every other part acts on.

No I/O, no clock of its own, no trio: functions and state machines over
values the shell (``_node``) reads from the kernel, the hooks and the
files. What lives here:

* the slice tree (``_tree``, with ``_tree_index``, ``_tree_memory``,
  ``_tree_views``): slices, knobs, clients, exact memory admission;
* knobs (``_knobs``) and configuration texts (``_config``), connection
  bounds (``_bounds``), the kernel's cgroup files as texts (``_cgroupfs``);
* GPU time: the share model (``_share``), the arbiter of each device
  (``_arbiter``, with ``_device``, ``_buckets``, ``_handovers``),
  busy-time attribution (``_attrib``), the clock scale (``_clock``) and the
  context overhead rule (``_overhead``).

Modules inside the core import each other directly; every other part of vgpu
imports from this package (tests/test_layers.py checks both, and that the
core imports nothing of the rest).
"""

from ._arbiter import (
    HOLD,
    RUN,
    TAKE,
    WAIT,
    Arbiter,
    diff_states,
)
from ._attrib import (
    MAX_INTERVAL_NS,
    Attributor,
)
from ._bounds import (
    CTL,
    EVENT_KEYS,
    GONE,
    HANDSHAKE,
    HOOK,
    IDLE_RECORDS,
    ClientBounds,
    ClientLimits,
    Refusal,
    Ticket,
    prefixes,
)
from ._buckets import (
    CapBuckets,
)
from ._cgroupfs import (
    cgroup2_mount,
    parse_proc_cgroup,
)
from ._clock import (
    ALPHA,
    CLOCK_EXPONENT,
    FULL_UTIL,
    ClockScale,
)
from ._config import (
    CONF_SUFFIX,
    CONTROL_HEADER,
    DEFAULT_CONFIG,
    DEFAULT_ETC_SLICES,
    DEFAULT_RUN_SLICES,
    IDENTITY_MODES,
    LIMIT_KEYS,
    LOG_FORMATS,
    ROOT_KNOBS,
    RUNTIME_HEADER,
    ConfigError,
    DaemonConfig,
    SliceSetting,
    canonical_cgroup_path,
    daemon_config,
    expand_slice_name,
    flatten_toml,
    parse_slice_file,
    slice_file_name,
    slice_file_text,
    slice_from_filename,
    toml_document,
    toml_text,
)
from ._device import (
    ArbiterParams,
    DeviceGroups,
    Group,
    arbiter_params,
)
from ._handovers import (
    HandoverLog,
)
from ._knobs import (
    CLIENTS_MAX,
    CORES_IDLE,
    CORES_MAX,
    CORES_MIN,
    CORES_WEIGHT,
    DEVICES,
    KNOBS,
    MEMORY_HIGH,
    MEMORY_MAX,
    READONLY_KNOBS,
    WEIGHT_DEFAULT,
    WEIGHT_MAX,
    WEIGHT_MIN,
    DeviceRef,
    KnobError,
    KnobSpec,
    KnobValue,
    PerDevice,
    Scalar,
    default_value,
    format_knob,
    knob_spec,
    parse_bytes,
    parse_knob,
)
from ._overhead import (
    AUDIT_BYTES,
    QUIET_NS,
    overhead_target,
)
from ._share import (
    ShareModel,
    frac,
    water_fill,
)
from ._tree import (
    SliceTree,
)
from ._tree_index import (
    ClientState,
    Denial,
    Grant,
    Limits,
    Node,
    SliceIndex,
)
from ._tree_memory import (
    MemoryBooks,
)
from ._tree_views import (
    TreeViews,
)

__all__ = [
    "ALPHA",
    "AUDIT_BYTES",
    "CLIENTS_MAX",
    "CLOCK_EXPONENT",
    "CONF_SUFFIX",
    "CONTROL_HEADER",
    "CORES_IDLE",
    "CORES_MAX",
    "CORES_MIN",
    "CORES_WEIGHT",
    "CTL",
    "DEFAULT_CONFIG",
    "DEFAULT_ETC_SLICES",
    "DEFAULT_RUN_SLICES",
    "DEVICES",
    "EVENT_KEYS",
    "FULL_UTIL",
    "GONE",
    "HANDSHAKE",
    "HOLD",
    "HOOK",
    "IDENTITY_MODES",
    "IDLE_RECORDS",
    "KNOBS",
    "LIMIT_KEYS",
    "LOG_FORMATS",
    "MAX_INTERVAL_NS",
    "MEMORY_HIGH",
    "MEMORY_MAX",
    "QUIET_NS",
    "READONLY_KNOBS",
    "ROOT_KNOBS",
    "RUN",
    "RUNTIME_HEADER",
    "TAKE",
    "WAIT",
    "WEIGHT_DEFAULT",
    "WEIGHT_MAX",
    "WEIGHT_MIN",
    "Arbiter",
    "ArbiterParams",
    "Attributor",
    "CapBuckets",
    "ClientBounds",
    "ClientLimits",
    "ClientState",
    "ClockScale",
    "ConfigError",
    "DaemonConfig",
    "Denial",
    "DeviceGroups",
    "DeviceRef",
    "Grant",
    "Group",
    "HandoverLog",
    "KnobError",
    "KnobSpec",
    "KnobValue",
    "Limits",
    "MemoryBooks",
    "Node",
    "PerDevice",
    "Refusal",
    "Scalar",
    "ShareModel",
    "SliceIndex",
    "SliceSetting",
    "SliceTree",
    "Ticket",
    "TreeViews",
    "arbiter_params",
    "canonical_cgroup_path",
    "cgroup2_mount",
    "daemon_config",
    "default_value",
    "diff_states",
    "expand_slice_name",
    "flatten_toml",
    "format_knob",
    "frac",
    "knob_spec",
    "overhead_target",
    "parse_bytes",
    "parse_knob",
    "parse_proc_cgroup",
    "parse_slice_file",
    "prefixes",
    "slice_file_name",
    "slice_file_text",
    "slice_from_filename",
    "toml_document",
    "toml_text",
    "water_fill",
]
