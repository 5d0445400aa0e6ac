"""What a pod's slice gets: from a claim's allocation and config, or from
device plugin units, to knobs. Pure functions, no I/O.

The scheduler is the authority on what a pod may take: it packed the claim's
consumed capacity (``cores``, ``memory``) onto a GPU without over-committing
it. A tenant's own config may shape that share (a lower memory cap, a burst
ceiling above the guaranteed cores, best-effort ``idle``) but never raise the
guarantee or the memory above what was scheduled; anything else is refused
with an error that names the field and the bound.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from vgpu_cgroup._core import (
    CORES_MAX,
    CORES_MIN,
    DEVICES,
    MEMORY_MAX,
    KnobError,
    parse_knob,
)

DRIVER = "vgpu.io"
CORES = "cores"
MEMORY = "memory"
#: Percent of one GPU, vcuda-core units: a whole GPU is 100.
CORES_PER_GPU = 100
#: vcuda-memory's unit, and the device plugin's ``vgpu.io/memory`` unit.
MEMORY_UNIT = 256 << 20
#: ``gpu.cores.idle`` is written only when a claim asks for it (see slice_text).
CORES_IDLE = "gpu.cores.idle"
CONFIG_API_VERSION = "vgpu.io/v1alpha1"
CONFIG_KIND = "SliceConfig"
#: The API server caps opaque parameters at 10 KiB; so do we, whatever sent them.
MAX_CONFIG_BYTES = 10 * 1024
MAX_CONFIGS = 64
MAX_RESULTS = 32

_UID_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z-]{0,62}$")
_CONFIG_KEYS = ("cores.min", "cores.max", "memory.max", "idle")


class LimitError(Exception):
    """A claim or pod that cannot be turned into knobs.

    ``code`` is the gRPC status the kubelet gets: ``INVALID_ARGUMENT`` for a
    config the tenant must fix, ``FAILED_PRECONDITION`` for an allocation or
    pod this driver cannot serve, ``UNAVAILABLE`` for state that is not there
    yet (the kubelet retries).
    """

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


def invalid(msg: str) -> LimitError:
    return LimitError("INVALID_ARGUMENT", msg)


def precondition(msg: str) -> LimitError:
    return LimitError("FAILED_PRECONDITION", msg)


def unavailable(msg: str) -> LimitError:
    return LimitError("UNAVAILABLE", msg)


def check_uid(what: str, uid: object) -> str:
    """A Kubernetes uid, safe to put in a file or cgroup name."""
    if not isinstance(uid, str) or not _UID_RE.match(uid):
        raise invalid(f"{what} uid {uid!r} is not a Kubernetes uid")
    return uid


# --------------------------------------------------------------------------
# quantities


def quantity(what: str, value: object) -> Decimal:
    """A Kubernetes resource quantity (``8Gi``, ``30``, ``1.5G``, ``500m``)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise invalid(f"{what}: expected a quantity like 8Gi, got {value!r}")
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise invalid(f"{what}: {value!r} is not a finite number")
        return Decimal(str(value))
    s = value.strip()
    m = re.fullmatch(r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
                     r"(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?", s)
    if m is None or len(s) > 64:
        raise invalid(f"{what}: {value!r} is not a quantity (like 8Gi, 512Mi, 30)")
    try:
        num = Decimal(m.group(1))
    except InvalidOperation:
        raise invalid(f"{what}: {value!r} is not a quantity") from None
    suffix = m.group(2) or ""
    binary = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
    decimal = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15,
               "E": 18}
    if suffix in binary:
        return num * (Decimal(1024) ** binary[suffix])
    if suffix in decimal:
        return num * (Decimal(10) ** decimal[suffix])
    return num * (Decimal(10) ** int(suffix[1:]))


def byte_count(what: str, value: object) -> int:
    q = quantity(what, value)
    if q != q.to_integral_value() or q < 0:
        raise invalid(f"{what}: {value!r} is not a whole number of bytes")
    return int(q)


# --------------------------------------------------------------------------
# the claim's opaque config


@dataclass(frozen=True)
class SliceConfig:
    """What a tenant (claim config) or an administrator (class config) asked."""

    cores_min: float | None = None
    cores_max: float | None = None  # "max" is unlimited: see cores_max_unlimited
    cores_max_unlimited: bool = False
    memory_max: int | None = None
    idle: bool | None = None

    def merged(self, later: SliceConfig) -> SliceConfig:
        """``later`` wins where it says something."""
        return SliceConfig(
            cores_min=later.cores_min if later.cores_min is not None else self.cores_min,
            cores_max=later.cores_max if (later.cores_max is not None
                                          or later.cores_max_unlimited) else self.cores_max,
            cores_max_unlimited=(later.cores_max_unlimited
                                 if (later.cores_max is not None or later.cores_max_unlimited)
                                 else self.cores_max_unlimited),
            memory_max=later.memory_max if later.memory_max is not None else self.memory_max,
            idle=later.idle if later.idle is not None else self.idle,
        )


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if not isinstance(k, str):
            raise invalid(f"config key {k!r} is not a string")
        key = prefix + k
        if isinstance(v, dict):
            for kk, vv in _flatten(v, key + ".").items():
                if kk in out:
                    raise invalid(f"config key {kk!r} is given twice")
                out[kk] = vv
        else:
            if key in out:
                raise invalid(f"config key {key!r} is given twice")
            out[key] = v
    return out


def _percent(key: str, v: object, lo_open: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise invalid(f"{key}: expected a number of cores (percent of one GPU), got {v!r}")
    try:
        f = float(quantity(key, v))
    except LimitError:
        raise invalid(f"{key}: expected a number of cores (percent of one GPU), "
                      f"got {v!r}") from None
    if (f <= 0 if lo_open else f < 0) or f > CORES_PER_GPU:
        rng = "0 < x <= 100" if lo_open else "0 <= x <= 100"
        raise invalid(f"{key}: {v!r} is out of range ({rng}, percent of one GPU)")
    return f


def parse_config(params: object, where: str) -> SliceConfig:
    """A ``vgpu.io`` opaque config's ``parameters`` (already JSON-decoded).

    Keys, nested or dotted: ``cores.min``, ``cores.max`` (a number or
    ``max``), ``memory.max`` (a Kubernetes quantity), ``idle`` (bool); with
    optional ``apiVersion: vgpu.io/v1alpha1`` and ``kind: SliceConfig``.
    Anything unknown, mistyped or oversized is refused (INVALID_ARGUMENT),
    naming ``where`` the config came from.
    """
    try:
        size = len(json.dumps(params))
    except (TypeError, ValueError):
        raise invalid(f"{where}: parameters are not JSON") from None
    if size > MAX_CONFIG_BYTES:
        raise invalid(f"{where}: parameters are {size} bytes, more than {MAX_CONFIG_BYTES}")
    if params is None:
        return SliceConfig()
    if not isinstance(params, dict):
        raise invalid(f"{where}: parameters must be an object, got {type(params).__name__}")
    p = dict(params)
    api = p.pop("apiVersion", CONFIG_API_VERSION)
    kind = p.pop("kind", CONFIG_KIND)
    if api != CONFIG_API_VERSION or kind != CONFIG_KIND:
        raise invalid(f"{where}: expected apiVersion {CONFIG_API_VERSION}, kind {CONFIG_KIND}; "
                      f"got {api!r}, {kind!r}")
    try:
        flat = _flatten(p)
    except LimitError as e:
        raise invalid(f"{where}: {e.msg}") from None
    unknown = [k for k in flat if k not in _CONFIG_KEYS]
    if unknown:
        raise invalid(f"{where}: unknown key {unknown[0]!r}; valid keys: "
                      + ", ".join(_CONFIG_KEYS))
    try:
        cmin = _percent("cores.min", flat["cores.min"], False) if "cores.min" in flat else None
        cmax: float | None = None
        unlimited = False
        if "cores.max" in flat:
            v = flat["cores.max"]
            if isinstance(v, str) and v.strip().lower() == "max":
                unlimited = True
            else:
                cmax = _percent("cores.max", v, True)
        mmax = None
        if "memory.max" in flat:
            mmax = byte_count("memory.max", flat["memory.max"])
            if mmax <= 0:
                raise invalid("memory.max: must be more than 0 bytes")
        idle = flat.get("idle")
        if idle is not None and not isinstance(idle, bool):
            raise invalid(f"idle: expected true or false, got {idle!r}")
    except LimitError as e:
        raise invalid(f"{where}: {e.msg}") from None
    return SliceConfig(cores_min=cmin, cores_max=cmax, cores_max_unlimited=unlimited,
                       memory_max=mmax, idle=idle)


# --------------------------------------------------------------------------
# knobs of a pod's slice


@dataclass(frozen=True)
class GpuShare:
    """What the scheduler (or the kubelet's device plugin units) gave a pod on one GPU."""

    uuid: str
    cores: float
    memory: int


@dataclass
class PodLimits:
    """The knobs of one pod's slice; ``knobs`` is in slice-file form."""

    gpus: tuple[str, ...]
    cores: float
    memory: int
    knobs: dict[str, Any] = field(default_factory=dict)


def _num(v: float) -> int | float:
    return int(v) if float(v).is_integer() else v


def pod_limits(shares: Iterable[GpuShare], cfg: SliceConfig, *, soft_max: bool = False
               ) -> PodLimits:
    """Knobs for a pod from its per-GPU shares and its config.

    A knob applies to each GPU a slice uses, so a pod on several GPUs must
    have the same share on each (FAILED_PRECONDITION otherwise). Defaults are
    vCUDA's hard mode: guaranteed = ceiling = the scheduled cores, memory cap
    = the scheduled memory (``soft_max``: ceiling 100, vCUDA's soft mode).
    """
    per: dict[str, list[float]] = {}
    for s in shares:
        acc = per.setdefault(s.uuid, [0.0, 0.0])
        acc[0] += s.cores
        acc[1] += s.memory
    if not per:
        raise precondition("nothing of this driver is allocated")
    values = {(c, m) for c, m in per.values()}
    if len(values) > 1:
        desc = ", ".join(f"{u}: {_num(c)} cores, {int(m)} bytes" for u, (c, m) in per.items())
        raise precondition("vgpu sets one limit for each GPU of a pod, but its shares "
                           f"differ ({desc}); ask for the same share on every GPU")
    cores, mem_f = values.pop()
    memory = int(mem_f)
    if cores > CORES_PER_GPU:
        raise precondition(f"{_num(cores)} cores on one GPU is more than {CORES_PER_GPU}")
    if memory <= 0:
        raise precondition("no GPU memory is allocated to the pod (ask for memory)")
    idle = bool(cfg.idle)
    cmin = cfg.cores_min if cfg.cores_min is not None else (0.0 if idle else cores)
    if cmin > cores:
        raise invalid(f"cores.min {_num(cmin)} is more than the {_num(cores)} cores "
                      "the scheduler reserved")
    knobs: dict[str, Any] = {CORES_MIN: _num(cmin)}
    if cfg.cores_max_unlimited:
        pass  # no ceiling: the pod may use what its siblings leave
    else:
        cmax = cfg.cores_max if cfg.cores_max is not None else (
            float(CORES_PER_GPU) if soft_max else cores)
        if cmax <= 0:
            raise precondition("no cores are allocated to the pod (ask for cores)")
        if cmax < cmin:
            raise invalid(f"cores.max {_num(cmax)} is below cores.min {_num(cmin)}")
        knobs[CORES_MAX] = _num(cmax)
    mmax = cfg.memory_max if cfg.memory_max is not None else memory
    if mmax > memory:
        raise invalid(f"memory.max {mmax} bytes is more than the {memory} bytes "
                      "the scheduler reserved")
    knobs[MEMORY_MAX] = mmax
    knobs[DEVICES] = sorted(per)
    if idle:
        knobs[CORES_IDLE] = 1
    for k, v in knobs.items():
        if k == CORES_IDLE:
            continue
        try:
            parse_knob(k, v)
        except KnobError as e:  # a bound above let something through: say so
            raise invalid(str(e)) from None
    return PodLimits(gpus=tuple(sorted(per)), cores=cores, memory=memory, knobs=knobs)


# --------------------------------------------------------------------------
# slice files


HEADER = "# written by vgpu-k8s"


def slice_text(slice: str, knobs: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """A slice file for vgpud (``_config`` format: top-level ``slice``, dotted
    knob keys), with ``meta`` on a comment line so the plugin can tell what
    it wrote after a restart."""
    lines = [f"{HEADER} {json.dumps(dict(meta), sort_keys=True)}",
             f"slice = {json.dumps(slice)}"]
    for k in sorted(knobs):
        v = knobs[k]
        if isinstance(v, list | tuple):
            val = "[" + ", ".join(json.dumps(str(x)) for x in v) + "]"
        elif isinstance(v, bool):
            val = "true" if v else "false"
        elif isinstance(v, int | float):
            val = repr(v) if isinstance(v, float) else str(v)
        else:
            val = json.dumps(str(v))
        lines.append(f"{k} = {val}")
    return "\n".join(lines) + "\n"


def slice_meta(text: str) -> dict[str, Any] | None:
    """The ``meta`` a file written by slice_text carries (None if not ours)."""
    first = text.split("\n", 1)[0]
    if not first.startswith(HEADER + " "):
        return None
    try:
        meta = json.loads(first[len(HEADER) + 1:])
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None
