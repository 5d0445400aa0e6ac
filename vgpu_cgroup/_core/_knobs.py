"""Knob names, parsing and formatting, following cgroup v2's conventions.

One knob per key, ``max`` for "no limit", bytes shown as plain integers the
way ``memory.max`` shows them. Values may come from TOML (int, float, str,
list) or from the command line (always str), so every parser accepts both
and rejects anything else with a message that names the knob, the bad value
and what would have been accepted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

#: One GPU's value of a knob. ``None`` means "max".
Scalar = float | int | None


@dataclass(frozen=True, slots=True)
class DeviceRef:
    """A GPU of the node as knobs name it: its UUID, or its index as NVML
    numbers the node's GPUs."""

    uuid: str
    index: int


@dataclass(frozen=True)
class PerDevice:
    """A limit that differs between GPUs, like cgroup v2's ``io.max`` lines:
    ``default`` on every GPU but those ``devices`` names (an index or a UUID,
    with its value). A UUID's entry wins over an index's for the same GPU."""

    default: Scalar
    devices: tuple[tuple[str, Scalar], ...]

    def on(self, dev: DeviceRef | None) -> Scalar:
        """The value on ``dev`` (``default`` when None or not named)."""
        if dev is not None:
            for name, v in self.devices:
                if name == dev.uuid:
                    return v
            index = str(dev.index)
            for name, v in self.devices:
                if name == index:
                    return v
        return self.default


#: A parsed knob value. ``None`` means "max" (limits) or "all" (devices).
KnobValue = float | int | tuple[str, ...] | PerDevice | None

CORES_MAX = "gpu.cores.max"
CORES_MIN = "gpu.cores.min"
CORES_WEIGHT = "gpu.cores.weight"
CORES_IDLE = "gpu.cores.idle"
MEMORY_MAX = "gpu.memory.max"
MEMORY_HIGH = "gpu.memory.high"
DEVICES = "gpu.devices"
CLIENTS_MAX = "gpu.clients.max"

#: Knobs that can be read but never set (``show`` reports them).
READONLY_KNOBS: tuple[str, ...] = (
    "gpu.memory.current",
    "gpu.memory.peak",
    "gpu.memory.events",
    "gpu.memory.events.local",
    "gpu.cores.stat",
    "gpu.clients.current",
    "gpu.clients.stat",
    "gpu.clients.events",
)

WEIGHT_MIN = 1
WEIGHT_MAX = 10000
WEIGHT_DEFAULT = 100


class KnobError(ValueError):
    """A knob name or value that cannot be accepted.

    Subclasses ValueError so callers that only care about "bad input" can
    catch one type; ``knob`` and ``value`` let the CLI and config loader point
    at the culprit.
    """

    def __init__(self, knob: str, value: object, msg: str) -> None:
        self.knob = knob
        self.value = value
        self.msg = msg
        super().__init__(f"{knob}={value!r}: {msg}")


@dataclass(frozen=True)
class KnobSpec:
    """What a writable knob accepts, its default, and how to show it."""

    name: str
    accepts: str  # human description, used in error messages
    default: KnobValue
    parse: Callable[[str, object], KnobValue]
    format: Callable[[KnobValue], str]


_NUM_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?\s*$")
_BYTES_RE = re.compile(
    r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kmgtpe]?)(i?b?)\s*$", re.IGNORECASE
)
_SUFFIX = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_UUID_RE = re.compile(r"^(GPU|MIG)-[0-9A-Za-z-]+$")
_U64_MAX = 2**64 - 1


def _number(name: str, value: object, accepts: str) -> float:
    """Coerce an int/float/numeric string to a finite float (bools refused)."""
    if isinstance(value, bool):
        raise KnobError(name, value, f"expected {accepts}")
    if isinstance(value, int | float) or (isinstance(value, str) and _NUM_RE.match(value)):
        f = float(value)
    else:
        raise KnobError(name, value, f"expected {accepts}")
    if not math.isfinite(f):
        raise KnobError(name, value, f"expected {accepts}")
    return f


def _is_max(value: object) -> bool:
    return isinstance(value, str) and value.strip().lower() == "max"


def _parse_cores_max(name: str, value: object) -> KnobValue:
    accepts = "a percent of one GPU, 0 < x <= 100, or 'max'"
    if _is_max(value):
        return None
    f = _number(name, value, accepts)
    if not 0 < f <= 100:
        raise KnobError(name, value, f"out of range: expected {accepts}")
    return f


def _parse_cores_min(name: str, value: object) -> KnobValue:
    accepts = "a percent of one GPU, 0 <= x <= 100"
    f = _number(name, value, accepts)
    if not 0 <= f <= 100:
        raise KnobError(name, value, f"out of range: expected {accepts}")
    return f


def _parse_weight(name: str, value: object) -> KnobValue:
    accepts = f"an integer {WEIGHT_MIN}..{WEIGHT_MAX}"
    f = _number(name, value, accepts)
    if f != int(f):
        raise KnobError(name, value, f"expected {accepts}")
    if not WEIGHT_MIN <= f <= WEIGHT_MAX:
        raise KnobError(name, value, f"out of range: expected {accepts}")
    return int(f)


def _parse_idle(name: str, value: object) -> KnobValue:
    """0 or 1, as cgroup v2's ``cpu.idle`` (TOML booleans are accepted too)."""
    accepts = "0 (normal) or 1 (best-effort: runs only when no non-idle sibling has work)"
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) or (isinstance(value, str) and value.strip() in ("0", "1")):
        n = int(value)
        if n in (0, 1):
            return n
    raise KnobError(name, value, f"expected {accepts}")


def parse_bytes(name: str, value: object) -> int | None:
    """Parse a byte count: int, ``"8G"``, ``"7680M"``, ``"4GiB"``, or ``"max"``.

    Suffixes are binary (1024-based) and case-insensitive, as in cgroup v2's
    ``memory.max``; a fractional amount is rounded down to whole bytes.
    """
    accepts = "bytes as an integer or with a K/M/G/T suffix (1024-based), or 'max'"
    if _is_max(value):
        return None
    if isinstance(value, bool):
        raise KnobError(name, value, f"expected {accepts}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise KnobError(name, value, f"expected {accepts}")
        n = int(value)
    elif isinstance(value, str):
        m = _BYTES_RE.match(value)
        if m is None or (m.group(3) and not m.group(2) and m.group(3).lower() != "b"):
            raise KnobError(name, value, f"expected {accepts}")
        num, suffix = m.group(1), m.group(2).lower()
        if "." in num:
            n = math.floor(float(num) * 1024 ** _SUFFIX[suffix])
        else:
            n = int(num) * 1024 ** _SUFFIX[suffix]
    else:
        raise KnobError(name, value, f"expected {accepts}")
    if n < 0:
        raise KnobError(name, value, f"negative: expected {accepts}")
    if n > _U64_MAX:
        raise KnobError(name, value, "too large: must fit in 64 bits")
    return n


def _device_name(it: object) -> str | None:
    """A GPU's name as gpu.devices and per-device values take it: an index
    as NVML numbers the node's GPUs, or a UUID as NVML and cuDeviceGetUuid
    write it (hex digits in lower case); None if it is neither."""
    if isinstance(it, int) and not isinstance(it, bool) and it >= 0:
        return str(it)
    if isinstance(it, str) and (it.strip().isdigit() or _UUID_RE.match(it.strip())):
        s = it.strip()
        return str(int(s)) if s.isdigit() else s[:4].upper() + s[4:].lower()
    return None


def _parse_devices(name: str, value: object) -> KnobValue:
    accepts = "'all', or GPU indices/UUIDs as '0,1', 'GPU-...' or a list"
    items: list[object]
    if isinstance(value, str):
        if value.strip().lower() == "all":
            return None
        items = [p for p in (s.strip() for s in value.split(",")) if p]
        if not items and value.strip():
            raise KnobError(name, value, f"expected {accepts}")
    elif isinstance(value, list | tuple):
        items = list(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    else:
        raise KnobError(name, value, f"expected {accepts}")
    out: list[str] = []
    for it in items:
        s = _device_name(it)
        if s is None:
            raise KnobError(name, value, f"bad device {it!r}: expected {accepts}")
        if s not in out:
            out.append(s)
    return tuple(out)


_ENTRY_SEP = re.compile(r"[\s,]+")


def _per_device(parse: Callable[[str, object], KnobValue], default: Scalar
                ) -> Callable[[str, object], KnobValue]:
    """``parse`` (one GPU's value) extended to values per GPU: ``VALUE`` for
    every GPU, or entries ``DEV=VALUE`` (DEV an index or a UUID) with at most
    one plain ``VALUE`` for the others, separated by blanks or commas or
    given as a TOML list: ``"8G 1=2G"``, ``"1=30"``, ``["max", "GPU-...=4G"]``.
    A value that names no GPU is the plain one, as before; a list must name
    one."""

    def parse_per_device(name: str, value: object) -> KnobValue:
        if isinstance(value, str) and "=" in value:
            entries: list[object] = [e for e in _ENTRY_SEP.split(value.strip()) if e]
        elif isinstance(value, list | tuple) and any(isinstance(e, str) and "=" in e
                                                     for e in value):
            entries = list(value)
        else:
            return parse(name, value)  # one value for every GPU (a list is none)
        if not entries:
            raise KnobError(name, value, "expected a value, or DEV=VALUE entries")
        plain: KnobValue = default
        seen_plain = False
        per: list[tuple[str, Scalar]] = []
        for e in entries:
            if isinstance(e, str) and "=" in e:
                dev_s, _, v = e.partition("=")
                dev = _device_name(dev_s)
                if dev is None:
                    raise KnobError(name, value, f"bad device {dev_s!r} in {e!r}: expected "
                                    "a GPU index or UUID before '='")
                if any(d == dev for d, _ in per):
                    raise KnobError(name, value, f"device {dev} given twice")
                one = parse(name, v)
                assert one is None or isinstance(one, int | float)
                per.append((dev, one))
            else:
                if seen_plain:
                    raise KnobError(name, value, "more than one value for every device "
                                    "(the others need DEV=VALUE)")
                plain, seen_plain = parse(name, e), True
        if not per:
            return plain
        assert plain is None or isinstance(plain, int | float)
        return PerDevice(plain, tuple(per))

    return parse_per_device


def _fmt_per_device(fmt: Callable[[KnobValue], str]) -> Callable[[KnobValue], str]:
    """``fmt`` extended to PerDevice: the value on every other GPU first,
    then ``DEV=VALUE`` (what the parser reads back)."""

    def fmt_per_device(v: KnobValue) -> str:
        if isinstance(v, PerDevice):
            return " ".join([fmt(v.default), *(f"{d}={fmt(x)}" for d, x in v.devices)])
        return fmt(v)

    return fmt_per_device


def _parse_count(name: str, value: object) -> KnobValue:
    accepts = "a whole number >= 0, or 'max'"
    if _is_max(value):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        f = _number(name, value, accepts)
        if f != int(f):
            raise KnobError(name, value, f"expected {accepts}")
        n = int(f)
    if not 0 <= n <= _U64_MAX:
        raise KnobError(name, value, f"out of range: expected {accepts}")
    return n


def _fmt_percent(v: KnobValue) -> str:
    if v is None:
        return "max"
    assert isinstance(v, int | float)
    if float(v) == int(v):
        return str(int(v))
    return f"{float(v):.6g}"


def _fmt_int(v: KnobValue) -> str:
    if v is None:
        return "max"
    assert isinstance(v, int | float)
    return str(int(v))


def _fmt_devices(v: KnobValue) -> str:
    if v is None:
        return "all"
    assert isinstance(v, tuple)
    return ",".join(v)


KNOBS: Mapping[str, KnobSpec] = {
    s.name: s
    for s in (
        KnobSpec(CORES_MAX, "percent 0<x<=100 or 'max', for every GPU or per GPU (DEV=...)",
                 None, _per_device(_parse_cores_max, None), _fmt_per_device(_fmt_percent)),
        KnobSpec(CORES_MIN, "percent 0<=x<=100, for every GPU or per GPU (DEV=...)", 0.0,
                 _per_device(_parse_cores_min, 0.0), _fmt_per_device(_fmt_percent)),
        KnobSpec(
            CORES_WEIGHT,
            f"integer {WEIGHT_MIN}..{WEIGHT_MAX}, for every GPU or per GPU (DEV=...)",
            WEIGHT_DEFAULT,
            _per_device(_parse_weight, WEIGHT_DEFAULT),
            _fmt_per_device(_fmt_int),
        ),
        KnobSpec(CORES_IDLE, "0 or 1", 0, _parse_idle, _fmt_int),
        KnobSpec(MEMORY_MAX, "bytes (K/M/G/T suffix) or 'max', for every GPU or per GPU "
                 "(DEV=...)", None, _per_device(parse_bytes, None), _fmt_per_device(_fmt_int)),
        KnobSpec(MEMORY_HIGH, "bytes (K/M/G/T suffix) or 'max', for every GPU or per GPU "
                 "(DEV=...)", None, _per_device(parse_bytes, None), _fmt_per_device(_fmt_int)),
        KnobSpec(DEVICES, "'all' or GPU indices/UUIDs", None, _parse_devices, _fmt_devices),
        KnobSpec(CLIENTS_MAX, "integer >= 0 or 'max'", None, _parse_count, _fmt_int),
    )
}


def knob_spec(name: str) -> KnobSpec:
    """The spec of a writable knob; KnobError naming the valid knobs otherwise."""
    spec = KNOBS.get(name)
    if spec is not None:
        return spec
    if name in READONLY_KNOBS:
        raise KnobError(name, None, "read-only knob; writable: " + ", ".join(KNOBS))
    raise KnobError(name, None, "unknown knob; valid knobs: " + ", ".join(KNOBS))


def parse_knob(name: str, value: object) -> KnobValue:
    """Validate and normalise one knob value (None means 'max' or 'all')."""
    return knob_spec(name).parse(name, value)


def format_knob(name: str, value: KnobValue) -> str:
    """Show a parsed value the way cgroup v2 files do (``max``, plain bytes)."""
    return knob_spec(name).format(value)


def default_value(name: str) -> KnobValue:
    """The value a knob has when nothing sets it."""
    return knob_spec(name).default
