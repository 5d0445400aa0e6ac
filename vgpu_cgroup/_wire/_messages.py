"""The messages of the vgpu wire protocol (docs/protocol.md) and its
constants, as values: what ``_protocol`` decodes frames into and encodes
replies from. The constants shared with the hook come from vgpu_abi.h
through the cffi module (``_abi``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from ._abi import ffi, lib

PROTO_VERSION: Final[int] = int(lib.VGPU_PROTO_VERSION)
FRAME_HEADER: Final[int] = int(lib.VGPU_FRAME_HEADER)
MAX_FRAME: Final[int] = int(lib.VGPU_MAX_FRAME)
MAX_DEVICES: Final[int] = int(lib.VGPU_MAX_DEVICES)
#: Replies to ``ctl`` requests (``tree`` on a busy node) may exceed one
#: request frame; clients accept up to this much.  Hook traffic stays within
#: MAX_FRAME in both directions.
MAX_CTL_REPLY: Final[int] = 16 * 1024 * 1024

U32_MAX: Final[int] = 2**32 - 1
U63_MAX: Final[int] = 2**63 - 1
#: Longest string field we accept (slice paths, UUIDs, comm, knob values).
MAX_STR: Final[int] = 4096
#: Most entries of ``hello.held`` and ``set.knobs``.
MAX_ITEMS: Final[int] = 64


def _error_codes() -> tuple[str, ...]:
    """The codes of ``error`` messages, from vgpu_abi.h's VGPU_ERROR_CODES:
    the hook matches what it receives against the same table, so a code the
    daemon sends is one the hook knows."""
    return tuple(ffi.string(lib.vgpu_error_code_name(i)).decode("ascii")
                 for i in range(int(lib.VGPU_NR_ERROR_CODES)))


ERROR_CODES: Final[frozenset[str]] = frozenset(_error_codes())
CTL_OPS: Final[frozenset[str]] = frozenset(
    {"status", "show", "tree", "top", "events", "set", "reset", "reload"})

class ProtocolError(Exception):
    """A peer broke the protocol; reply ``error`` and close."""

    def __init__(self, code: str, msg: str, *, id: int | None = None) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"error code {code!r} is not one of vgpu_abi.h's VGPU_ERROR_CODES")
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg
        self.id = id

    def reply(self) -> Error:
        """The ``error`` message to send before closing."""
        supported = [PROTO_VERSION] if self.code == "version" else None
        return Error(code=self.code, msg=self.msg, id=self.id, supported=supported)


# ---- client -> daemon events ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Held:
    """One entry of ``hello.held``: bytes a reconnecting client still holds."""

    dev: str
    n: int


@dataclass(frozen=True, slots=True)
class Hello:
    v: int
    role: str
    pid: int
    comm: str
    slice: str | None = None
    held: tuple[Held, ...] = ()


@dataclass(frozen=True, slots=True)
class Attach:
    id: int
    dev: str
    total: int


# Reserve, Release and Granted are the reservation round trip's, made and
# dropped once per allocation: plain slotted classes, which build in half
# the time of frozen ones (no object.__setattr__ per field).


@dataclass(slots=True)
class Reserve:
    id: int
    slot: int
    n: int


@dataclass(slots=True)
class Release:
    slot: int
    n: int


@dataclass(slots=True)
class Want:
    """One-way: this process has work for the device in ``slot`` (it launched,
    or one of its threads waits to); see docs/design.md, "Compute". ``at``:
    when, by the hook's CLOCK_MONOTONIC (a schedule is judged on it, not on
    when the daemon got round to reading the note); optional."""

    slot: int
    at: int | None = None


@dataclass(slots=True)
class Idle:
    """One-way: this process's work on ``slot`` has drained and it launches nothing."""

    slot: int


@dataclass(slots=True)
class Drained:
    """One-way: what this process had queued on ``slot`` when its slice lost
    the device has finished (the next owner can start on an empty device)."""

    slot: int


@dataclass(frozen=True, slots=True)
class Ctl:
    id: int
    op: str
    slice: str | None = None
    runtime: bool = False
    knobs: dict[str, str] = field(default_factory=dict)


Event = Hello | Attach | Reserve | Release | Want | Idle | Drained | Ctl

# ---- daemon -> client messages ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Welcome:
    id: int
    slice: str
    tick_ns: int
    epoch: int
    #: the UUIDs of the devices the slice may use, in the node's order;
    #: None (not sent) when it may use every device of the node
    devices: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Attached:
    id: int
    slot: int
    mem_limit: int | None


@dataclass(slots=True)
class Granted:
    id: int


@dataclass(frozen=True, slots=True)
class Denied:
    id: int
    slice: str
    limit: int
    current: int


@dataclass(frozen=True, slots=True)
class Ok:
    id: int
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Error:
    """``{t:"error", code, msg}``: ``code`` must be one of ERROR_CODES (the
    header's table), or the hook would not know what it means."""

    code: str
    msg: str
    id: int | None = None
    supported: list[int] | None = None
    #: more fields of the frame (a ``limit`` error's bound, slice, limit, current)
    extra: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.code not in ERROR_CODES:
            raise ValueError(f"error code {self.code!r} is not one of vgpu_abi.h's "
                             f"VGPU_ERROR_CODES ({', '.join(sorted(ERROR_CODES))})")


Reply = Welcome | Attached | Granted | Denied | Ok | Error
