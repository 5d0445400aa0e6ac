"""Configuration layers: the daemon's TOML file and the slice files.

Like systemd drop-ins: ``/etc/vgpu/slices/*.conf`` is the administrator's
persistent layer and ``/run/vgpu/slices/*.conf`` the runtime layer written by
``vgpuctl set --runtime``; the runtime layer wins until reboot. Parsing is
all-or-nothing so a bad edit never leaves the daemon half-configured.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ._knobs import KnobValue


class ConfigError(Exception):
    """A configuration problem, located as ``path:line: message``."""

    def __init__(self, path: str, line: int | None, msg: str) -> None:
        self.path = path
        self.line = line
        self.msg = msg
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.msg}"


@dataclass
class DaemonConfig:
    """Daemon settings from ``vgpud.toml``; defaults work with no file at all."""

    socket: str = "/run/vgpu/vgpud.sock"
    runtime_dir: str = "/run/vgpu"
    identity: str = "cgroup"
    tick_ms: int = 10
    simulate: bool = False
    log_format: str = "auto"
    metrics_listen: str | None = None
    cgroup_root: str | None = None
    etc_slices_dir: str = "/etc/vgpu/slices"
    run_slices_dir: str | None = None  # default: <runtime_dir>/slices


@dataclass
class SliceSetting:
    """One knob set on one slice by one source (a file path or ``vgpuctl``)."""

    slice: str
    knob: str
    raw: object
    value: KnobValue
    source: str


def expand_slice_name(name: str) -> str:
    """Canonical slice path relative to the cgroup root ("" is the root).

    Accepts a cgroup path (``tenants.slice/tenants-alice.slice``, a leading
    ``/`` allowed) or a systemd slice unit name (``tenants-alice.slice``),
    expanded the way systemd nests slices by their dashes.
    """
    raise NotImplementedError


def load_daemon_config(path: str | None) -> DaemonConfig:
    """Read ``vgpud.toml`` (None: defaults); ConfigError on bad content."""
    raise NotImplementedError


def load_slice_layers(
    etc_dir: str = "/etc/vgpu/slices", run_dir: str = "/run/vgpu/slices"
) -> list[SliceSetting]:
    """All slice settings, ``/etc`` first then ``/run`` (later wins)."""
    raise NotImplementedError


def write_runtime_setting(run_dir: str, slice: str, knobs: Mapping[str, str]) -> str:
    """Merge knobs into the slice's runtime file atomically; return its path."""
    raise NotImplementedError
