"""GPU-time shares: how one GPU is split among the slices that have work.

Pure: the slice tree in, a rate per *group* out. A group is the slice a
process is attached to (its own cgroup); every process of a group shares
the group's ownership of a device (``_arbiter``). Given the set of groups
that have work right now, the GPU is split down the tree:

* at each node, the children with work below them first get their
  ``gpu.cores.min`` (scaled down together if they overcommit);
* what is left is split by ``gpu.cores.weight`` among them, water-filling:
  no child gets more than its ``gpu.cores.max``, or more than its own
  children can take (a subtree whose groups are all capped wants no more
  than the sum of their caps), and what a full child leaves flows to its
  siblings;
* ``gpu.cores.idle = 1`` children (best-effort, like ``cpu.idle``) take part
  only in what their non-idle siblings leave: while a non-idle sibling has
  work and no cap stops it, an idle child's rate is 0;
* processes directly in a slice that also has child slices share one unit
  of the default weight there.

Every group with work wants as much as it can get: the arbiter knows who has
work (its hooks said ``want`` and have not said ``idle``), so nothing here
estimates demand. The rates are what each group is owed while the set of
groups with work stays as it is; the arbiter turns them into ownership.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ._knobs import WEIGHT_DEFAULT, DeviceRef
from ._tree import Node, SliceTree

_EPS = 1e-12


@dataclass(slots=True)
class _Unit:
    """A child at one level of the water-filling: a slice, or a node's own processes."""

    node: Node | None  # None: the processes directly in the parent slice
    lo: float  # guaranteed (cores.min), fraction of a GPU
    hi: float  # ceiling (cores.max), fraction of a GPU
    weight: int
    idle: bool
    want: float  # most it can take, at most hi
    alloc: float = 0.0


def water_fill(total: float, units: Sequence[_Unit]) -> None:
    """Split ``total`` among units: mins first, then by weight up to each ``want``.

    Mins are scaled down proportionally if they overcommit ``total``. Sets
    ``unit.alloc``; never gives a unit more than its ``want``.
    """
    if len(units) == 1:  # the common chain of single children
        u = units[0]
        u.alloc = max(0.0, min(total, u.want))
        return
    for u in units:
        u.alloc = min(u.lo, u.want)
    used = sum(u.alloc for u in units)
    if used > total:
        scale = total / used if used > 0 else 0.0
        for u in units:
            u.alloc *= scale
        return
    rest = total - used
    hungry = [u for u in units if u.alloc < u.want - _EPS]
    while rest > _EPS and hungry:
        wsum = sum(u.weight for u in hungry)
        full = [u for u in hungry if u.alloc + rest * u.weight / wsum >= u.want]
        if not full:
            for u in hungry:
                u.alloc += rest * u.weight / wsum
            rest = 0.0
            break
        for u in full:
            rest -= u.want - u.alloc
            u.alloc = u.want
        hungry = [u for u in hungry if u not in full]


def frac(pct: float | None) -> float:
    """A ``gpu.cores.*`` percent as a fraction of one GPU (``max``: 1)."""
    return 1.0 if pct is None else min(1.0, max(0.0, pct / 100.0))


class ShareModel:
    """Rates for sets of busy groups on one GPU, read from the tree's current
    knobs (their values on that GPU: ``dev``; None for a GPU that no
    per-device value names).

    Results are cached per set of groups until the tree's knobs or
    membership change (``SliceTree.generation``/``membership``), so the
    arbiter may ask at every decision.
    """

    def __init__(self, tree: SliceTree, dev: DeviceRef | None = None) -> None:
        self.tree = tree
        self.dev = dev
        self._seen = (-1, -1)
        self._rates: dict[frozenset[str], dict[str, float]] = {}
        self._paths: dict[str, list[Node]] = {}
        self._caps: dict[str, list[tuple[str, float]]] = {}

    def _fresh(self) -> None:
        now = (self.tree.generation, self.tree.membership)
        if now != self._seen:
            self._seen = now
            self._rates.clear()
            self._paths.clear()
            self._caps.clear()

    def path(self, group: str) -> list[Node]:
        """The group's slice and its ancestors, leaf first."""
        self._fresh()
        p = self._paths.get(group)
        if p is None:
            p = self._paths[group] = list(self.tree.node_at(group).ancestry())
        return p

    def ceiling(self, group: str) -> float:
        """The tightest ``gpu.cores.max`` on the group's path, as a fraction."""
        return min(frac(n.cores_max_on(self.dev)) for n in self.path(group))

    def caps(self, group: str) -> list[tuple[str, float]]:
        """The slices on the group's path whose ``gpu.cores.max`` is below a
        whole GPU: (slice, fraction). Cached with the paths: the budgets ask
        at every decision."""
        path = self.path(group)
        out = self._caps.get(group)
        if out is None:
            out = self._caps[group] = []
            for n in path:
                cap = n.cores_max_on(self.dev)
                if cap is not None and cap < 100:
                    out.append((n.path, frac(cap)))
        return out

    def limited(self, groups: Iterable[str]) -> bool:
        """Whether any knob on any of these groups' paths asks for GPU-time
        control (a max, a min, a weight, idle): if none does, the device is
        left to the hardware's own time-slicing, with no gate at all."""
        d = self.dev
        return any(n.cores_max_on(d) is not None or n.cores_min_on(d) > 0
                   or n.weight_on(d) != WEIGHT_DEFAULT or n.cores_idle
                   for g in groups for n in self.path(g))

    def rates(self, busy: frozenset[str]) -> dict[str, float]:
        """Each busy group's share of one GPU (fraction), the others absent."""
        self._fresh()
        got = self._rates.get(busy)
        if got is None:
            got = self._rates[busy] = self._compute(busy)
            if len(self._rates) > 4096:  # bounded: drop the oldest half
                for key in list(self._rates)[:2048]:
                    del self._rates[key]
        return got

    def _compute(self, busy: frozenset[str]) -> dict[str, float]:
        if not busy:
            return {}
        d = self.dev
        kids: dict[int, dict[str, Node]] = {}  # id(node) -> children with busy groups below
        own: set[int] = set()  # id(node) of busy groups
        for g in busy:
            path = self.path(g)
            own.add(id(path[0]))
            for child, parent in itertools.pairwise(path):
                kids.setdefault(id(parent), {})[child.path] = child
        wants: dict[int, float] = {}

        def want(node: Node) -> float:
            key = id(node)
            w = wants.get(key)
            if w is None:
                total = 1.0 if key in own else 0.0
                total += sum(want(ch) for ch in kids.get(key, {}).values())
                w = wants[key] = min(total, frac(node.cores_max_on(d)))
            return w

        rates: dict[str, float] = {}

        def allocate(node: Node, amount: float) -> None:
            units = [_Unit(ch, ch.cores_min_on(d) / 100.0, frac(ch.cores_max_on(d)),
                           ch.weight_on(d), ch.cores_idle, min(want(ch), frac(ch.cores_max_on(d))))
                     for ch in kids.get(id(node), {}).values()]
            if id(node) in own:
                units.append(_Unit(None, 0.0, 1.0, WEIGHT_DEFAULT, False, 1.0))
            normal = [u for u in units if not u.idle]
            idle = [u for u in units if u.idle]
            water_fill(amount, normal)
            if idle:
                water_fill(max(0.0, amount - sum(u.alloc for u in normal)), idle)
            for u in units:
                if u.node is None:
                    rates[node.path] = u.alloc
                else:
                    allocate(u.node, u.alloc)

        root = self.tree.root
        allocate(root, min(want(root), frac(root.cores_max_on(d))))
        return rates
