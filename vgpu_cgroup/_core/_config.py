"""Configuration: the daemon's TOML file and the slice files, as texts.

Pure: file names and texts in, settings (or a located ConfigError) out; no
file is opened here (``_node._files`` reads and writes the layers on disk).

Like systemd drop-ins: ``/etc/vgpu/slices/*.conf`` is the administrator's
persistent layer and ``/run/vgpu/slices/*.conf`` the runtime layer written by
``vgpuctl set --runtime``; the runtime layer wins until reboot.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ._bounds import ClientLimits
from ._knobs import KNOBS, READONLY_KNOBS, KnobError, KnobValue, parse_knob

DEFAULT_CONFIG = "/etc/vgpu/vgpud.toml"
DEFAULT_ETC_SLICES = "/etc/vgpu/slices"
DEFAULT_RUN_SLICES = "/run/vgpu/slices"
CONF_SUFFIX = ".conf"


class ConfigError(Exception):
    """A configuration problem, located as ``path:line: message``.

    ``line`` is 1-based, or None when the problem is not tied to a line (a
    missing file, a file name that names no slice); then str() omits it.
    """

    def __init__(self, path: str, line: int | None, msg: str) -> None:
        self.path = path
        self.line = line
        self.msg = msg
        super().__init__(path, line, msg)

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.path}: {self.msg}"
        return f"{self.path}:{self.line}: {self.msg}"


#: The root slice takes no knobs, as the root cgroup has no limit files.
ROOT_KNOBS = ("the root slice (-.slice) takes no knobs, as in cgroup v2 (its limits are the "
              "node's): set them on a slice below it")

IDENTITY_MODES = ("cgroup", "declared")
LOG_FORMATS = ("auto", "json", "console")
#: ``[compute]`` settings (µs) and their ranges; see ``_arbiter.ArbiterParams``
COMPUTE_KEYS: dict[str, tuple[int, int]] = {
    "compute.window_us": (1_000, 1_000_000),
    "compute.inflight_us": (100, 1_000_000),
    "compute.yield_inflight_us": (0, 1_000_000),
    "compute.linger_us": (0, 100_000),
    "compute.yield_lead_us": (0, 100_000),
    "compute.resume_lead_us": (0, 100_000),
}


@dataclass
class DaemonConfig:
    """Daemon settings from ``vgpud.toml``; the defaults work with no file at all."""

    socket: str = "/run/vgpu/vgpud.sock"
    runtime_dir: str = "/run/vgpu"
    identity: str = "cgroup"
    tick_ms: int = 10
    lag_ms: int = 30
    #: how strongly GPU work speeds up with the clock (see _clock)
    clock_exponent: float = 0.8
    #: ``[compute]``: the arbiter's windows and in-flight bounds, in µs
    #: (``compute.window_us``, ``inflight_us``, ``yield_inflight_us``,
    #: ``linger_us``, ``yield_lead_us``, ``resume_lead_us``); absent keys keep
    #: ``ArbiterParams``' defaults
    compute: dict[str, int] = field(default_factory=dict)
    simulate: bool = False
    log_format: str = "auto"
    metrics_listen: str | None = None
    metrics_listen_any: bool = False  # allow a non-loopback metrics address
    cgroup_root: str | None = None  # None: find the cgroup2 mount
    etc_slices_dir: str = DEFAULT_ETC_SLICES
    run_slices_dir: str = ""  # "": <runtime_dir>/slices
    # `vgpuctl set` without --runtime: persistent, wins over etc_slices_dir
    # (like systemd's /etc/systemd/system.control for set-property).
    control_slices_dir: str = ""  # "": <etc_slices_dir>.control
    #: ``[limits]``: what one slice's connections may make vgpud hold (_bounds)
    limits: ClientLimits = field(default_factory=ClientLimits)

    def __post_init__(self) -> None:
        if not self.run_slices_dir:
            self.run_slices_dir = os.path.join(self.runtime_dir, "slices")
        if not self.control_slices_dir:
            self.control_slices_dir = self.etc_slices_dir.rstrip("/") + ".control"


@dataclass
class SliceSetting:
    """One knob set on one slice by one source (a file path or ``vgpuctl``)."""

    slice: str
    knob: str
    raw: object
    value: KnobValue
    source: str


# --------------------------------------------------------------------------
# slice names


def _bad_name(name: str, why: str) -> ConfigError:
    return ConfigError("slice name", None, f"invalid slice {name!r}: {why}")


def expand_slice_name(name: str) -> str:
    """Canonical slice path relative to the cgroup root ("" is the root).

    Accepts a cgroup path (``tenants.slice/tenants-alice.slice``, a leading
    ``/`` allowed) or a systemd slice unit name (``tenants-alice.slice``),
    expanded the way systemd nests slices by their dashes:
    ``a-b-c.slice`` → ``a.slice/a-b.slice/a-b-c.slice``; ``-.slice`` is the root.
    """
    if not isinstance(name, str):
        raise _bad_name(repr(name), "not a string")
    if "\0" in name:
        raise _bad_name(name, "contains NUL")
    s = name.strip()
    if s in ("", "/", "-.slice"):
        return ""
    if "/" not in s and s.endswith(".slice"):
        prefix = s[: -len(".slice")]
        parts = prefix.split("-")
        if any(p == "" for p in parts):
            raise _bad_name(name, "empty component between dashes in a slice unit name")
        return "/".join("-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))
    return canonical_cgroup_path(name)


def canonical_cgroup_path(path: str) -> str:
    """A cgroup path relative to the root, validated, with no unit expansion.

    For paths that come from ``/proc/<pid>/cgroup``: ``/my-job.slice`` is a
    directory at the root even though its unit name would nest it.
    """
    if "\0" in path:
        raise _bad_name(path, "contains NUL")
    s = path.strip()
    if s.startswith("/"):
        s = s[1:]
    if s.endswith("/"):
        s = s[:-1]
    if s == "":
        return ""
    comps = s.split("/")
    for c in comps:
        if c == "":
            raise _bad_name(path, "empty path component")
        if c in (".", ".."):
            raise _bad_name(path, f"{c!r} is not allowed in a slice path")
    return "/".join(comps)


def slice_file_name(slice: str) -> str:
    """The runtime file name for a slice: its unit name when it has one.

    ``tenants.slice/tenants-alice.slice`` → ``tenants-alice.slice.conf``;
    other paths (``kubepods/pod1``) are escaped (``%`` → ``%25``, ``/`` →
    ``%2F``) since the file carries ``slice = ...`` anyway.
    """
    if slice == "":
        return "-.slice" + CONF_SUFFIX
    last = slice.rsplit("/", 1)[-1]
    try:
        if last.endswith(".slice") and expand_slice_name(last) == slice:
            return last + CONF_SUFFIX
    except ConfigError:
        pass
    return slice.replace("%", "%25").replace("/", "%2F") + CONF_SUFFIX


# --------------------------------------------------------------------------
# TOML helpers


def flatten_toml(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys from nested tables (``[gpu.cores] max=1`` == ``gpu.cores.max=1``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_toml(v, key + "."))
        else:
            out[key] = v
    return out


def _find_line(text: str, key: str) -> int | None:
    """Best-effort 1-based line where a dotted key is assigned.

    Tries the full dotted key (bare or quoted parts, spaces around dots), then
    the last component inside a ``[table]``. None if nothing matches.
    """
    parts = key.split(".")
    part_re = [rf"(?:{re.escape(p)}|\"{re.escape(p)}\"|'{re.escape(p)}')" for p in parts]
    full = re.compile(r"^\s*" + r"\s*\.\s*".join(part_re) + r"\s*=")
    quoted = re.compile(r"^\s*[\"']" + re.escape(key) + r"[\"']\s*=")
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        if full.match(line) or quoted.match(line):
            return i
    for n in range(len(parts) - 1, 0, -1):
        tail = re.compile(r"^\s*" + r"\s*\.\s*".join(part_re[n:]) + r"\s*=")
        for i, line in enumerate(lines, 1):
            if tail.match(line):
                return i
    return None


def toml_text(path: str, data: bytes) -> tuple[str, dict[str, Any]]:
    """The text and the document of a TOML file's bytes (``path`` names it
    in errors); ConfigError, with the line, if it is not UTF-8 or not TOML."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad_line = data[: e.start].count(b"\n") + 1
        raise ConfigError(path, bad_line, "not valid UTF-8") from e
    return text, toml_document(path, text)


def toml_document(path: str, text: str) -> dict[str, Any]:
    """The TOML document in ``text``; ConfigError with the line if it is not TOML."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        line, msg = _toml_error(e)
        if line is None:  # "at end of document": the last line is where it broke
            line = max(1, len(text.rstrip().splitlines()))
        raise ConfigError(path, line, f"TOML syntax error: {msg}") from e


def _toml_error(e: tomllib.TOMLDecodeError) -> tuple[int | None, str]:
    """Line and message of a TOMLDecodeError (3.11 only has them in the text)."""
    lineno: int | None = getattr(e, "lineno", None)
    msg = getattr(e, "msg", None) or str(e)
    m = re.search(r"\(at line (\d+), column \d+\)", str(e))
    if lineno is None and m:
        lineno = int(m.group(1))
    msg = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", msg)
    return (int(lineno) if lineno is not None else None), msg


# --------------------------------------------------------------------------
# daemon config


def _want(path: str, text: str, key: str, v: object, typ: type | tuple[type, ...]) -> None:
    if isinstance(v, bool) and typ is int:
        raise ConfigError(path, _find_line(text, key), f"{key}: expected an integer")
    if not isinstance(v, typ):
        names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise ConfigError(
            path, _find_line(text, key), f"{key}: expected {names}, got {type(v).__name__}"
        )


def daemon_config(path: str, text: str, doc: Mapping[str, Any]) -> DaemonConfig:
    """The daemon's settings in vgpud.toml's text and document (``path``
    names it in errors); ConfigError on anything unknown or invalid."""
    flat = flatten_toml(doc)
    kw: dict[str, Any] = {}
    limits: dict[str, int] = {}
    compute: dict[str, int] = {}
    str_keys = {
        "socket": "socket",
        "runtime_dir": "runtime_dir",
        "cgroup_root": "cgroup_root",
        "slices_dir": "etc_slices_dir",
        "runtime_slices_dir": "run_slices_dir",
        "control_slices_dir": "control_slices_dir",
        "metrics.listen": "metrics_listen",
    }
    for key, v in flat.items():
        line = _find_line(text, key)
        if key in str_keys:
            _want(path, text, key, v, str)
            assert isinstance(v, str)
            if not v:
                raise ConfigError(path, line, f"{key}: must not be empty")
            kw[str_keys[key]] = v
        elif key == "identity":
            if v not in IDENTITY_MODES:
                raise ConfigError(
                    path, line, f"identity: {v!r} is not one of {', '.join(IDENTITY_MODES)}"
                )
            kw["identity"] = v
        elif key == "log_format":
            if v not in LOG_FORMATS:
                raise ConfigError(
                    path, line, f"log_format: {v!r} is not one of {', '.join(LOG_FORMATS)}"
                )
            kw["log_format"] = v
        elif key in ("tick_ms", "lag_ms"):
            _want(path, text, key, v, int)
            assert isinstance(v, int)
            if not 1 <= v <= 1000:
                raise ConfigError(path, line, f"{key}: {v} out of range 1..1000")
            kw[key] = v
        elif key == "clock_exponent":
            _want(path, text, key, v, (int, float))
            assert isinstance(v, (int, float))
            if isinstance(v, bool) or not 0 <= v <= 1:
                raise ConfigError(path, line, f"{key}: {v} out of range 0..1")
            kw[key] = float(v)
        elif key == "simulate":
            _want(path, text, key, v, bool)
            kw["simulate"] = v
        elif key == "metrics.listen_any":
            _want(path, text, key, v, bool)
            kw["metrics_listen_any"] = v
        elif key in COMPUTE_KEYS:
            _want(path, text, key, v, int)
            assert isinstance(v, int)
            lo, hi = COMPUTE_KEYS[key]
            if not lo <= v <= hi:
                raise ConfigError(path, line, f"{key}: {v} out of range {lo}..{hi}")
            compute[key.removeprefix("compute.")] = v
        elif key in LIMIT_KEYS:
            _want(path, text, key, v, int)
            assert isinstance(v, int)
            lo, hi = LIMIT_KEYS[key]
            if not lo <= v <= hi:
                raise ConfigError(path, line, f"{key}: {v} out of range {lo}..{hi}")
            limits[key] = v
        else:
            raise ConfigError(path, line, f"unknown setting {key!r}")
    cfg = DaemonConfig(**kw)
    cfg.compute = compute
    if limits:
        fields = {k.removeprefix("limits."): v for k, v in limits.items()}
        if "handshake_timeout_ms" in fields:
            fields["handshake_timeout_s"] = fields.pop("handshake_timeout_ms") / 1000  # type: ignore[assignment]
        cfg.limits = replace(cfg.limits, **fields)
    return cfg



#: ``[limits]`` keys of vgpud.toml and their ranges (see _bounds).
LIMIT_KEYS: dict[str, tuple[int, int]] = {
    "limits.clients": (1, 1 << 20),
    "limits.slice_clients": (1, 1 << 20),
    "limits.slice_handshakes": (1, 1 << 20),
    "limits.slice_hooks": (1, 1 << 20),
    "limits.max_depth": (1, 1024),
    "limits.handshake_timeout_ms": (1, 600_000),
}


# --------------------------------------------------------------------------
# slice files


def slice_from_filename(path: str) -> str:
    """The slice a ``*.conf`` file configures by its name (no ``slice =`` key)."""
    base = os.path.basename(path)
    stem = base[: -len(CONF_SUFFIX)] if base.endswith(CONF_SUFFIX) else base
    if "%2F" in stem or "%2f" in stem:
        unescaped = re.sub("%2[fF]", "/", stem).replace("%25", "%")
        try:
            return expand_slice_name(unescaped)
        except ConfigError as e:
            raise ConfigError(path, None, e.msg) from e
    if not stem.endswith(".slice"):
        raise ConfigError(
            path,
            None,
            "file name is not a slice unit name (like tenants-alice.slice.conf); "
            "add a top-level slice = \"...\" key",
        )
    try:
        return expand_slice_name(stem)
    except ConfigError as e:
        raise ConfigError(path, None, e.msg) from e


def parse_slice_file(path: str, text: str) -> list[SliceSetting]:
    """Settings in one slice file's text (``path`` names the file and the slice)."""
    flat = flatten_toml(toml_document(path, text))
    if "slice" in flat:
        name = flat.pop("slice")
        if not isinstance(name, str):
            raise ConfigError(path, _find_line(text, "slice"), "slice: expected a string")
        try:
            slice = expand_slice_name(name)
        except ConfigError as e:
            raise ConfigError(path, _find_line(text, "slice"), e.msg) from e
    else:
        slice = slice_from_filename(path)
    out: list[SliceSetting] = []
    for key, raw in flat.items():
        line = _find_line(text, key)
        if key in READONLY_KNOBS:
            raise ConfigError(path, line, f"{key} is read-only")
        if slice == "" and key in KNOBS:
            raise ConfigError(path, line, ROOT_KNOBS)
        if key not in KNOBS:
            raise ConfigError(
                path, line, f"unknown knob {key!r}; valid knobs: {', '.join(KNOBS)}"
            )
        try:
            value = parse_knob(key, raw)
        except KnobError as e:
            raise ConfigError(path, line, str(e)) from e
        out.append(SliceSetting(slice, key, raw, value, path))
    return out


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"cannot write {v!r} to TOML")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic strings
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ValueError(f"cannot write {type(v).__name__} to TOML")


RUNTIME_HEADER = "# written by vgpuctl set --runtime; lost on reboot"
CONTROL_HEADER = "# written by vgpuctl set; persistent (vgpuctl reset SLICE removes it)"


def slice_file_text(path: str, slice: str, merged: Mapping[str, Any], header: str) -> str:
    """A slice file setting ``merged`` on ``slice``, checked by parsing it
    back (as ``path``) before anyone writes it."""
    lines = [header, f"slice = {_toml_value(slice)}"]
    lines += [f"{k} = {_toml_value(merged[k])}" for k in sorted(merged)]
    text = "\n".join(lines) + "\n"
    parse_slice_file(path, text)
    return text

