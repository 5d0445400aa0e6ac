"""Files the plugins own on the node: slice files for vgpud, CDI specs for the
container runtime, the hook library and hook.conf for containers.

Every write is a temp file in the same directory, fsynced, renamed over the
target: a reader (vgpud reloading, the runtime resolving a CDI id) sees the
old file or the new one, never half of one. All state the plugins need after
a restart is in these files, so they keep no other.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vgpu_cgroup._core import CONF_SUFFIX, KNOBS, ConfigError, parse_slice_file

from ._limits import CORES_IDLE, invalid

CDI_VERSION = "0.5.0"


def atomic_write(path: str, data: str | bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` in one rename."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, mode=0o755, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a crash
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def remove(path: str) -> bool:
    """Remove ``path``; False if it was not there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None


def validate_slice_text(path: str, text: str) -> None:
    """Parse a slice file exactly as vgpud will; INVALID_ARGUMENT if it would
    not load (a file vgpud rejects stops every reload, so it is never written).

    ``gpu.cores.idle`` is new: while this checkout's knob table lacks it, its
    line is checked here (0 or 1) and the rest by vgpud's parser.
    """
    check = text
    if CORES_IDLE not in KNOBS:
        kept = []
        for line in text.splitlines():
            key = line.split("=", 1)[0].strip()
            if key == CORES_IDLE:
                if line.split("=", 1)[1].strip() not in ("0", "1"):
                    raise invalid(f"{CORES_IDLE} must be 0 or 1")
                continue
            kept.append(line)
        check = "\n".join(kept) + "\n"
    try:
        parse_slice_file(path, check)
    except ConfigError as e:
        raise invalid(f"the slice file would not load: {e}") from None


def slice_file(dir: str, kind: str, uid: str) -> str:
    """``<dir>/k8s-<kind>-<uid>.conf``: named by what owns it, not by the
    slice, so ``vgpuctl set --runtime`` (which writes the slice's unit-named
    file, later in name order, so it wins) never touches it."""
    return os.path.join(dir, f"k8s-{kind}-{uid}{CONF_SUFFIX}")


# --------------------------------------------------------------------------
# what goes into a container


@dataclass(frozen=True)
class HookFiles:
    """Where the hook's files are on the host and where containers see them.

    The plugin installs the library and hook.conf under ``state_dir`` (its
    own host directory) at start; containers get them, and vgpud's socket
    directory, as read-only bind mounts plus ``LD_PRELOAD``.
    """

    state_dir: str = "/var/lib/vgpu"
    socket_dir: str = "/run/vgpu"  # on the host, holding vgpud.sock
    container_socket_dir: str = "/run/vgpu"
    socket_name: str = "vgpud.sock"
    container_lib_dir: str = "/usr/local/vgpu/lib"
    on_no_daemon: str = "fail"

    @property
    def lib(self) -> str:
        return os.path.join(self.state_dir, "lib", "libvgpu-hook.so")

    @property
    def hook_conf(self) -> str:
        return os.path.join(self.state_dir, "hook.conf")

    @property
    def container_lib(self) -> str:
        return os.path.join(self.container_lib_dir, "libvgpu-hook.so")

    def hook_conf_text(self) -> str:
        return ("# written by vgpu-k8s; mounted read-only at /etc/vgpu/hook.conf in the\n"
                "# containers of pods with a vgpu claim or vgpu.io resources\n"
                f"socket={os.path.join(self.container_socket_dir, self.socket_name)}\n"
                f"on_no_daemon={self.on_no_daemon}\n"
                "allow_env=no\n")

    def install(self, lib_source: str) -> None:
        """Put the hook library and hook.conf in place (atomically: a running
        container keeps the inode it mounted)."""
        if not os.path.isfile(lib_source):
            raise FileNotFoundError(f"hook library not found at {lib_source} "
                                    "(build it with make -C libhook)")
        d = os.path.dirname(self.lib)
        os.makedirs(d, mode=0o755, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
        os.close(fd)
        try:
            shutil.copyfile(lib_source, tmp)
            os.chmod(tmp, 0o755)
            os.replace(tmp, self.lib)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        atomic_write(self.hook_conf, self.hook_conf_text(), 0o644)

    def mounts(self) -> list[tuple[str, str]]:
        """(host path, container path), all mounted read-only."""
        return [(self.lib, self.container_lib),
                (self.socket_dir, self.container_socket_dir),
                (self.hook_conf, "/etc/vgpu/hook.conf")]

    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": self.container_lib}


def cdi_spec(kind: str, device: str, hook: HookFiles,
             annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A transient CDI spec with one device that puts the hook in a container."""
    mounts = [{"hostPath": h, "containerPath": c,
               "options": ["ro", "nosuid", "nodev", "bind"]} for h, c in hook.mounts()]
    edits: dict[str, Any] = {
        "env": [f"{k}={v}" for k, v in sorted(hook.env().items())],
        "mounts": mounts,
    }
    dev: dict[str, Any] = {"name": device, "containerEdits": edits}
    spec: dict[str, Any] = {"cdiVersion": CDI_VERSION, "kind": kind, "devices": [dev]}
    if annotations:
        spec["annotations"] = dict(annotations)
    return spec


def cdi_file(dir: str, kind: str, name: str) -> str:
    """Transient spec file name, ``<vendor>-<class>_<name>.json`` by CDI's convention."""
    return os.path.join(dir, kind.replace("/", "-") + "_" + name + ".json")


def write_cdi(path: str, spec: Mapping[str, Any]) -> None:
    atomic_write(path, json.dumps(spec, indent=2, sort_keys=True) + "\n", 0o644)


def gpu_cdi_ids(template: str, gpus: Sequence[tuple[int, str]]) -> list[str]:
    """CDI ids of the GPUs themselves from a template (``nvidia.com/gpu={index}``
    names the devices of the NVIDIA container toolkit's spec); [] when the
    template is empty (the GPU is made available some other way)."""
    if not template:
        return []
    return [template.format(index=i, uuid=u) for i, u in gpus]
