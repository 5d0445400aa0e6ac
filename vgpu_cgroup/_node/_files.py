"""The configuration layers on disk: vgpud.toml, and the slice files of
``/etc/vgpu/slices``, the persistent ``vgpuctl set`` layer and ``/run``.

Loading is all-or-nothing (the first bad file raises) so a bad edit never
leaves the daemon half-configured: the caller keeps its previous state.
Writing is atomic (a temporary file renamed over the old one) and checked
(the new text is parsed before it replaces anything). What a text means is
``_core._config``'s.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from vgpu_cgroup._core import (
    CONF_SUFFIX,
    DEFAULT_CONFIG,
    DEFAULT_ETC_SLICES,
    DEFAULT_RUN_SLICES,
    RUNTIME_HEADER,
    ConfigError,
    DaemonConfig,
    SliceSetting,
    daemon_config,
    expand_slice_name,
    flatten_toml,
    parse_knob,
    parse_slice_file,
    slice_file_name,
    slice_file_text,
    toml_text,
)


def _load_toml(path: str) -> tuple[str, dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(path, None, f"cannot read: {e.strerror or e}") from e
    return toml_text(path, data)


def load_daemon_config(path: str | None) -> DaemonConfig:
    """Read the daemon's TOML file; ConfigError on anything unknown or invalid.

    ``path=None`` reads ``/etc/vgpu/vgpud.toml`` when it exists and otherwise
    returns the built-in defaults; an explicit path must exist.
    """
    if path is None:
        if not os.path.exists(DEFAULT_CONFIG):
            return DaemonConfig()
        path = DEFAULT_CONFIG
    text, doc = _load_toml(path)
    return daemon_config(path, text, doc)


def _conf_files(d: str) -> list[str]:
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ConfigError(d, None, f"cannot list: {e.strerror or e}") from e
    return [
        os.path.join(d, n)
        for n in names
        if n.endswith(CONF_SUFFIX) and not n.startswith(".") and os.path.isfile(os.path.join(d, n))
    ]


def load_slice_layers(
    etc_dir: str = DEFAULT_ETC_SLICES, run_dir: str = DEFAULT_RUN_SLICES,
    control_dir: str | None = None,
) -> list[SliceSetting]:
    """All slice settings in priority order (later wins): ``/etc/vgpu/slices``,
    then ``control_dir`` (persistent ``vgpuctl set``), then ``/run``.

    Missing directories are empty layers. Raises ConfigError on the first bad
    file; nothing is returned in that case, so the caller keeps its old state.
    """
    out: list[SliceSetting] = []
    dirs = (etc_dir, run_dir) if control_dir is None else (etc_dir, control_dir, run_dir)
    for d in dirs:
        for path in _conf_files(d):
            text, _ = _load_toml(path)
            out.extend(parse_slice_file(path, text))
    return out


def write_runtime_setting(run_dir: str, slice: str, knobs: Mapping[str, str],
                          header: str = RUNTIME_HEADER) -> str:
    """Merge knobs into the slice's file in ``run_dir`` atomically; return its path.

    Used for the runtime layer and (with CONTROL_HEADER) for the persistent
    control layer. Values are validated first (KnobError, nothing written).
    The merged file is re-parsed before it replaces the old one (temp file +
    rename), so the layer is never left unreadable.
    """
    slice = expand_slice_name(slice)
    for k, v in knobs.items():
        parse_knob(k, v)
    path = os.path.join(run_dir, slice_file_name(slice))
    merged: dict[str, Any] = {}
    if os.path.exists(path):
        _, doc = _load_toml(path)
        merged = flatten_toml(doc)
        merged.pop("slice", None)
    merged.update(knobs)
    _write_slice_file(run_dir, path, slice, merged, header)
    return path


def remove_slice_setting(dir: str, slice: str, knobs: Sequence[str] | None = None) -> str | None:
    """Drop ``knobs`` (all when None) from the slice's file in ``dir``.

    The file is removed when nothing is left. Returns its path when it
    changed, None when there was nothing to remove.
    """
    slice = expand_slice_name(slice)
    path = os.path.join(dir, slice_file_name(slice))
    if not os.path.exists(path):
        return None
    if knobs is None:
        os.unlink(path)
        return path
    text, doc = _load_toml(path)
    merged = flatten_toml(doc)
    merged.pop("slice", None)
    if not any(k in merged for k in knobs):
        return None
    for k in knobs:
        merged.pop(k, None)
    if not merged:
        os.unlink(path)
        return path
    header = text.splitlines()[0] if text.startswith("#") else RUNTIME_HEADER
    _write_slice_file(dir, path, slice, merged, header)
    return path


def _write_slice_file(dir: str, path: str, slice: str, merged: Mapping[str, Any],
                      header: str) -> None:
    text = slice_file_text(path, slice, merged, header)
    os.makedirs(dir, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=CONF_SUFFIX, dir=dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
