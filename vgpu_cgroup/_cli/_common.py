"""What every vgpuctl command shares: the exit codes and errors, argument
helpers, and the round trip to vgpud through the wire's control client.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vgpu_cgroup._core import ConfigError, expand_slice_name
from vgpu_cgroup._wire import Client, ClientError

DEFAULT_SOCKET = "/run/vgpu/vgpud.sock"

EXIT_USAGE = 1
EXIT_DAEMON = 2


class UsageError(Exception):
    pass


class DaemonError(Exception):
    pass


def slice_arg(name: str) -> str:
    try:
        return expand_slice_name(name)
    except ConfigError as exc:
        raise UsageError(exc.msg) from None


def assignments(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        knob, sep, value = item.partition("=")
        if not sep or not knob or not value:
            raise UsageError(f"expected KNOB=VALUE, got {item!r}")
        out[knob.strip()] = value.strip()
    return out


def connect(path: str) -> Client:
    try:
        c = Client(path)
    except OSError as exc:
        raise DaemonError(f"cannot connect to vgpud at {path}: "
                          f"{exc.strerror or exc} (is vgpud running?)") from None
    try:
        c.hello("ctl")
    except (ClientError, OSError) as exc:
        c.close()
        raise DaemonError(f"vgpud at {path} refused the handshake: {exc}") from None
    return c


def ctl(c: Client, op: str, **fields: Any) -> dict[str, Any]:
    try:
        return c.ctl(op, **fields)
    except ClientError as exc:
        raise DaemonError(exc.msg) from None
    except OSError as exc:
        raise DaemonError(f"lost connection to vgpud: {exc}") from None


def human_bytes(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def knob_text(knob: str, value: str) -> str:
    """Memory knobs in K/M/G when exact, for people; --json keeps bytes."""
    return human_bytes(int(value)) if knob.startswith("gpu.memory.") and value.isdigit() else value


def slice_name(path: str) -> str:
    return path or "-.slice"
