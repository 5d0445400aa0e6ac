"""Bounds on what one slice's connections can make vgpud hold (pure, no I/O).

Anyone may connect to vgpud's socket, so without bounds one unprivileged
process can take every connection the daemon will accept (and, as hooks,
two shared regions each) and deny the daemon to every other tenant, root's
``vgpuctl`` included. cgroup v2 and systemd bound what one group can take
(``pids.max``, ``TasksMax=``); these do the same for vgpud's own resources.

A connection is charged, from ``accept`` on, to the slice of the process
that connected: its cgroup, from ``SO_PEERCRED`` and ``/proc/<pid>/cgroup``.
The charge stays there for the connection's life, like a memcg v2 charge: a
process that later moves, or hands its socket to another process, leaves
the connection counted where it was made (so nobody can make another slice
pay for its connections).

The bounds, each checked before anything is allocated for a connection:

* node-wide, ``limits.clients``: every connection except uid 0's control
  connections, which have an allowance beyond it, so the operator can always
  see and fix the node (uid 0's handshakes are outside it too, until their
  role is known);
* per slice (the cgroup a process is in, not its ancestors): ``limits.
  slice_clients`` connections of every role, of which ``limits.
  slice_handshakes`` may be handshakes in progress and ``limits.slice_hooks``
  hooked processes (a pair of shared regions each);
* hierarchical, the ``gpu.clients.max`` knob: the connections of a slice and
  all its descendants, like ``pids.max``, so an operator bounds a tenant that
  owns a delegated subtree (and can make as many cgroups as it likes) as a
  whole.

Why the defaults are per cgroup and not hierarchical: a default applied on
every level would bound an interior slice (``kubepods.slice``) to what one
pod may hold. systemd does the same with ``DefaultTasksMax=``, which applies
to units and not to slices.

A refusal is a :class:`Refusal` naming the bound; it is counted in the
``gpu.clients.events`` of the slice whose bound it was (``-.slice`` for the
node-wide one).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

#: Keys of ``gpu.clients.events``, in the order they are shown.
EVENT_KEYS: Final[tuple[str, ...]] = ("max", "clients", "hooks", "handshakes", "node", "depth")
#: Slices with refusal events but no connection left whose records are kept
#: (so ``vgpuctl events`` still shows who was refused); the oldest go first.
IDLE_RECORDS: Final[int] = 1024

HANDSHAKE: Final[str] = "handshake"
HOOK: Final[str] = "hook"
CTL: Final[str] = "ctl"
GONE: Final[str] = "gone"


@dataclass(frozen=True)
class ClientLimits:
    """The daemon-level bounds (``[limits]`` in vgpud.toml).

    The defaults are far above what ordinary workloads reach (a slice running
    200 CUDA processes uses 200 hooks and a few control connections) and far
    below what would let one slice take the node.
    """

    clients: int = 4096
    slice_clients: int = 1024
    slice_handshakes: int = 128
    slice_hooks: int = 512
    #: cgroup paths deeper than this are refused: every level is a tree node,
    #: walked on each reservation (systemd and Kubernetes nest 4 to 6 deep).
    max_depth: int = 32
    #: a handshake (hello to welcome) must be done within this; then it is
    #: dropped and stops counting.
    handshake_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("clients", "slice_clients", "slice_handshakes", "slice_hooks", "max_depth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"limits.{name} must be a positive integer, got {v!r}")
        if not 0 < self.handshake_timeout_s <= 600:
            raise ValueError("limits.handshake_timeout_ms must be 1..600000")


@dataclass(frozen=True)
class Refusal:
    """A connection refused for capacity: which bound, on which slice."""

    bound: str  # "gpu.clients.max", "limits.slice_hooks", ...
    key: str  # its gpu.clients.events key
    slice: str  # the slice whose bound it is ("" is -.slice)
    limit: int
    current: int
    what: str  # what the bound counts, for people

    def message(self) -> str:
        """One line for the error frame: the bound first (the hook keeps 159
        characters of it), the slice last (it is in the frame's ``slice`` too)."""
        where = self.slice or "-.slice"
        return f"{self.bound}={self.limit} reached: {self.current} {self.what} in {where}"


@dataclass(eq=False)
class _Record:
    """Counts of one slice; ``subtree`` includes its descendants'."""

    clients: int = 0
    handshakes: int = 0
    hooks: int = 0
    subtree: int = 0
    events: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False)
class Ticket:
    """One connection's charge, from accept to close."""

    slice: str
    prefixes: tuple[str, ...]  # "" (the root), then each ancestor, then the slice
    uid: int
    stage: str = HANDSHAKE
    node: bool = False  # counted against limits.clients


def prefixes(path: str) -> tuple[str, ...]:
    """``"a/b"`` -> ``("", "a", "a/b")``: the slice and its ancestors, root first."""
    if not path:
        return ("",)
    parts = path.split("/")
    return ("", *("/".join(parts[: i + 1]) for i in range(len(parts))))


class ClientBounds:
    """Connection counts per slice and the admission that keeps them bounded.

    ``knob(path)`` gives the explicit ``gpu.clients.max`` values along a
    path, as (slice, max) pairs (the slice tree knows them).
    """

    def __init__(self, limits: ClientLimits,
                 knob: Callable[[str], list[tuple[str, int]]] | None = None) -> None:
        self.limits = limits
        self._knob = knob or (lambda path: [])
        self._records: dict[str, _Record] = {"": _Record()}
        #: records with events and no connection, oldest first
        self._idle: collections.OrderedDict[str, None] = collections.OrderedDict()
        #: connections counted against limits.clients
        self.node = 0

    # ------------------------------------------------------------ admission

    def accept(self, slice: str, uid: int) -> Ticket | Refusal:
        """Admit a connection that was just accepted (its role is not known
        yet: it is a handshake until :meth:`hello`)."""
        lim = self.limits
        pre = prefixes(slice)
        if len(pre) - 1 > lim.max_depth:
            # Counted on the slice at the deepest level allowed: the tenant's.
            return self._refuse(Refusal("limits.max_depth", "depth", pre[lim.max_depth],
                                        lim.max_depth, len(pre) - 1, "levels of cgroup"))
        rec = self._records.get(slice)
        if rec is not None:
            if rec.handshakes >= lim.slice_handshakes:
                return self._refuse(Refusal("limits.slice_handshakes", "handshakes", slice,
                                            lim.slice_handshakes, rec.handshakes,
                                            "handshakes in progress"))
            if rec.clients >= lim.slice_clients:
                return self._refuse(Refusal("limits.slice_clients", "clients", slice,
                                            lim.slice_clients, rec.clients, "connections"))
        for path, mx in sorted(self._knob(slice), key=lambda pm: -len(pm[0])):
            r = self._records.get(path)
            n = 0 if r is None else r.subtree
            if n >= mx:
                return self._refuse(Refusal("gpu.clients.max", "max", path, mx, n,
                                            "connections (descendants included)"))
        counted = uid != 0
        if counted and self.node >= lim.clients:
            return self._refuse(self._node_refusal())
        for p in pre:
            r = self._records.get(p)
            if r is None:
                r = self._records[p] = _Record()
            else:
                self._idle.pop(p, None)
            r.subtree += 1
        leaf = self._records[slice]
        leaf.clients += 1
        leaf.handshakes += 1
        if counted:
            self.node += 1
        return Ticket(slice, pre, uid, node=counted)

    def hello(self, t: Ticket, role: str) -> Refusal | None:
        """The handshake said its role: a hook takes a pair of shared regions
        (bounded per slice); uid 0's hook joins the node-wide count, uid 0's
        control connection stays in its allowance beyond it. On a refusal
        the ticket is released."""
        if t.stage != HANDSHAKE:
            raise ValueError(f"hello on a connection at stage {t.stage}")
        leaf = self._records[t.slice]
        if role == HOOK:
            lim = self.limits
            if leaf.hooks >= lim.slice_hooks:
                ref = self._refuse(Refusal("limits.slice_hooks", "hooks", t.slice,
                                           lim.slice_hooks, leaf.hooks, "hooked processes"))
                self.release(t)
                return ref
            if not t.node:
                if self.node >= lim.clients:
                    ref = self._refuse(self._node_refusal())
                    self.release(t)
                    return ref
                self.node += 1
                t.node = True
            leaf.hooks += 1
        leaf.handshakes -= 1
        t.stage = HOOK if role == HOOK else CTL
        return None

    def release(self, t: Ticket) -> None:
        """The connection is gone (any stage; a second call does nothing)."""
        if t.stage == GONE:
            return
        leaf = self._records[t.slice]
        if t.stage == HANDSHAKE:
            leaf.handshakes -= 1
        elif t.stage == HOOK:
            leaf.hooks -= 1
        leaf.clients -= 1
        if t.node:
            self.node -= 1
            t.node = False
        t.stage = GONE
        for p in t.prefixes:
            r = self._records[p]
            r.subtree -= 1
            if r.subtree == 0 and p:
                self._retire(p, r)

    # ------------------------------------------------------------ views

    def current(self, path: str) -> int:
        """``gpu.clients.current``: connections of the slice and its descendants."""
        r = self._records.get(path)
        return 0 if r is None else r.subtree

    def local(self, path: str) -> dict[str, int]:
        """``gpu.clients.stat``: the slice's own counts, descendants not
        included (what the per-slice limits bound): connections of every
        role, handshakes in progress, hooked processes."""
        r = self._records.get(path) or _Record()
        return {"clients": r.clients, "handshakes": r.handshakes, "hooks": r.hooks}

    def events(self, path: str) -> dict[str, int]:
        """``gpu.clients.events`` of a slice, every key present."""
        r = self._records.get(path)
        got = {} if r is None else r.events
        return {k: got.get(k, 0) for k in EVENT_KEYS}

    def slices(self) -> list[str]:
        """Slices with connections or refusal events."""
        return sorted(self._records)

    def __len__(self) -> int:
        return len(self._records)

    # ------------------------------------------------------------ internals

    def _node_refusal(self) -> Refusal:
        return Refusal("limits.clients", "node", "", self.limits.clients, self.node,
                       "connections to vgpud")

    def _refuse(self, ref: Refusal) -> Refusal:
        r = self._records.get(ref.slice)
        if r is None:
            r = self._records[ref.slice] = _Record()
            self._retire(ref.slice, r, counted=False)
        r.events[ref.key] = r.events.get(ref.key, 0) + 1
        return ref

    def _retire(self, path: str, r: _Record, *, counted: bool = True) -> None:
        """A record with no connection left: kept while it has events (up to
        IDLE_RECORDS of them), else dropped."""
        if not path:
            return
        if not r.events and counted:
            del self._records[path]
            return
        self._idle[path] = None
        self._idle.move_to_end(path)
        while len(self._idle) > IDLE_RECORDS:
            old, _ = self._idle.popitem(last=False)
            self._records.pop(old, None)
