"""The plugins' link to vgpud: its GPUs, and making it re-read slice files.

Over vgpud's own socket with the client vgpuctl uses: the plugin and vgpud
run in different containers of one pod, so the socket (in the shared
``/run/vgpu``) is how one reaches the other; a signal would need a shared
pid namespace. The GPUs the plugins advertise are the ones vgpud manages
(it found them through NVML, or runs on the simulated GPU), so the two can
never disagree about what a node has.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from vgpu_cgroup._wire import Client, ClientError

from ._files import atomic_write, read, remove, validate_slice_text
from ._limits import LimitError, unavailable


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    total_mem: int


class VgpudError(Exception):
    """vgpud could not be reached or refused."""


class Vgpud:
    """Requests to vgpud, one short connection each."""

    def __init__(self, socket: str, *, timeout: float = 10.0) -> None:
        self.socket = socket
        self.timeout = timeout

    def _ctl(self, op: str) -> dict[str, object]:
        try:
            with Client(self.socket, timeout=self.timeout) as c:
                c.hello("ctl")
                return c.ctl(op)
        except ClientError as e:
            raise VgpudError(f"vgpud at {self.socket}: {e.msg} ({e.code})") from None
        except OSError as e:
            raise VgpudError(f"vgpud at {self.socket} is not reachable: "
                             f"{e.strerror or e}") from None

    def gpus(self) -> list[Gpu]:
        devs = self._ctl("status").get("devices")
        if not isinstance(devs, list):
            raise VgpudError("vgpud's status has no device list")
        out = []
        for d in devs:
            if not isinstance(d, dict):
                continue
            out.append(Gpu(index=int(d["index"]), uuid=str(d["uuid"]), name=str(d["name"]),
                           total_mem=int(d["total_mem"])))
        return sorted(out, key=lambda g: g.index)

    def reload(self) -> tuple[bool, str | None]:
        """(taken, the broken file's error if not)."""
        data = self._ctl("reload")
        err = data.get("config_error")
        return bool(data.get("ok")), str(err) if err else None


class SliceFiles:
    """The plugin's slice files in vgpud's runtime layer, each written or
    removed together with a reload, under one lock (the gRPC server runs
    requests on several threads)."""

    def __init__(self, dir: str, vgpud: Vgpud) -> None:
        self.dir = dir
        self.vgpud = vgpud
        self.lock = threading.Lock()

    def put(self, path: str, text: str) -> None:
        """Write a slice file and have vgpud take it.

        The text is checked with vgpud's own parser first (INVALID_ARGUMENT,
        nothing written). If vgpud then refuses the layer because of this
        file, the old content is put back (or the file removed) and reloaded,
        so the plugin never leaves vgpud on a configuration it cannot load.
        If vgpud is down the file stays (vgpud reads it when it starts) and
        UNAVAILABLE says so; the kubelet retries, and rewriting is harmless.
        """
        validate_slice_text(path, text)
        with self.lock:
            old = read(path)
            if old != text:
                atomic_write(path, text)
            self._reload(path, lambda: (atomic_write(path, old) if old is not None
                                        else remove(path)))

    def drop(self, path: str) -> tuple[bool, str | None]:
        """Remove a slice file and reload: (whether it was there, why vgpud
        could not take the change). The file is gone either way: what it
        configured belongs to a pod that is gone, and vgpud drops it at its
        next good reload."""
        with self.lock:
            if not remove(path):
                return False, None
            try:
                self._reload(path, None)
            except LimitError as e:
                return True, e.msg
            return True, None

    def _reload(self, path: str, undo: Callable[[], object] | None) -> None:
        try:
            ok, err = self.vgpud.reload()
        except VgpudError as e:
            raise unavailable(f"{e}; {path} is in place and vgpud will read it "
                              "when it starts") from None
        if ok:
            return
        # vgpud names the file by its own path, which is this one where both
        # containers mount the directory at the same place; compare names.
        bad = os.path.basename(err.split(":", 1)[0]) if err else None
        if undo is not None and bad == os.path.basename(path):
            undo()
            with contextlib.suppress(VgpudError):
                self.vgpud.reload()
            raise LimitError("FAILED_PRECONDITION",
                             f"vgpud refused the slice file: {err} (is vgpud older than "
                             "this plugin?)")
        raise unavailable(f"vgpud cannot load its slice files: {err}")
