"""The share algorithm: GPU-time rates per client and their token budgets.

Every control tick the daemon hands in what each active client was charged
(from ``_attrib``) and whether it was throttled (its launches waited for
budget). Per device, the scheduler splits one GPU down the slice tree:

* at each node, the children with an active client below them first get
  ``min(gpu.cores.min, what they want)``;
* the rest is split by ``gpu.cores.weight`` among children that want more,
  water-filling: a child is capped by its own ``gpu.cores.max`` and, when it
  was not throttled, by its demand (usage × 1.2 + 1 % of a GPU, so it can
  grow); what a capped child leaves flows to its siblings;
* clients directly in a slice are leaves of weight 100 sharing its allocation.

A child *wants more* (unbounded demand) when a client below it was throttled:
usage alone cannot show how much more it would take. Each client's budget
then moves by ``tokens += rate * tick - charged``, clamped to
``[-debt_ticks * tick * rate, burst_ticks * tick * max(rate, ceiling)]``; the
hook's launch gate lets launches through while tokens are positive.

Charges arrive a few ticks after the work ran (the attribution lag), and the
hook reports a throttled wait only when it ends. So a pair counts as
*wanting more* while it is in debt and for ``idle_ticks`` after, and an
unthrottled pair's demand is the most it used in the last ``idle_ticks``
ticks; otherwise a client that just got budget back looks idle for a tick,
gets a small rate, and loses credit it was owed (measured on the simulated
GPU: a 60 % cap ran at 0.53 before, 0.60 after).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from ._knobs import WEIGHT_DEFAULT
from ._tree import Node, SliceTree

#: Multiplicative and additive headroom on an unthrottled client's demand.
DEMAND_GAIN = 1.2
DEMAND_FLOOR = 0.01
#: Smallest rate used for the burst cap, so a tiny share can still launch.
MIN_BURST_RATE = 0.01
_INF = float("inf")
_EPS = 1e-12


@dataclass
class ClientDemand:
    """What one client did on one device during the last tick."""

    client: int
    dev: str
    charged_ns: int
    throttled: bool
    #: wall time the client had work on the GPU (union of its intervals, not
    #: split with neighbours: ``Attributor.last_busy``). Under time-slicing a
    #: client that is busy the whole tick but charged half of it was held back
    #: by contention, not by lack of work, so it still wants more. 0: unknown.
    busy_ns: int = 0


@dataclass
class Budget:
    """What the daemon writes into the client's ctl page for one device."""

    tokens_ns: int
    unlimited: bool
    rate_ppm: int


@dataclass
class _Unit:
    """A child at one level of the water-filling: a slice or a client."""

    node: Node | None  # None: a client directly in the parent slice
    client: int
    lo: float  # guaranteed (cores.min), fraction of a GPU
    hi: float  # ceiling (cores.max), fraction of a GPU
    weight: int
    want: float  # demand, capped by hi
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


def _frac(pct: float | None) -> float:
    return 1.0 if pct is None else min(1.0, pct / 100.0)


class ShareScheduler:
    """Computes per-client rates and budgets from the tree every tick.

    Knobs are read from the tree at every tick, so a live ``set_knobs``
    takes effect at the next one.
    """

    def __init__(
        self,
        tree: SliceTree,
        tick_ns: int = 10_000_000,
        burst_ticks: int = 5,
        debt_ticks: int = 50,
        idle_ticks: int = 5,
    ) -> None:
        if tick_ns <= 0 or burst_ticks <= 0 or debt_ticks < 0:
            raise ValueError("tick_ns and burst_ticks must be positive, debt_ticks >= 0")
        self.tree = tree
        self.tick_ns = tick_ns
        self.burst_ticks = burst_ticks
        self.debt_ticks = debt_ticks
        #: ticks without charge or throttling before a pair counts as idle;
        #: must exceed the attribution lag in ticks (30 ms / 10 ms by default).
        self.idle_ticks = max(1, idle_ticks)
        self._recent: dict[tuple[int, str], tuple[ClientDemand, int]] = {}
        self._usage: dict[tuple[int, str], list[int]] = {}  # last ticks' usage, ns
        self._tokens: dict[tuple[int, str], float] = {}
        self._rates: dict[tuple[int, str], float] = {}
        self._slice_rates: dict[tuple[str, str], float] = {}
        self._budgets: dict[tuple[int, str], Budget] = {}
        # Per client, kept across ticks while the tree's knobs are unchanged
        # (``SliceTree.generation``): its path (leaf first), ceiling, and
        # whether anything on the path limits it.
        self._gen = -1
        self._paths: dict[int, list[Node]] = {}
        self._ceilings: dict[int, float] = {}
        self._limits: dict[int, bool] = {}
        #: idle pairs whose budget has settled: (tokens, unlimited, budget).
        #: Such a pair's next budget is the same, so a tick over many idle
        #: clients costs little more than a lookup each.
        self._steady: dict[tuple[int, str], tuple[float, bool, Budget]] = {}
        #: every pair settled at the last tick (see the top of ``tick``)
        self._quiet = False
        self._membership = -1

    # -------------------------------------------------------------- helpers

    def _path(self, client: int) -> list[Node]:
        """The client's slices, leaf first (cached while knobs are unchanged)."""
        p = self._paths.get(client)
        if p is None:
            p = self._paths[client] = self.tree.client_nodes(client)
        return p

    def _limited(self, client: int) -> bool:
        """Whether anything on the client's path asks for protection."""
        lim = self._limits.get(client)
        if lim is None:
            lim = self._limits[client] = any(
                n.cores_max is not None or n.cores_min > 0 or n.weight != WEIGHT_DEFAULT
                for n in self._path(client))
        return lim

    def _ceiling(self, client: int) -> float:
        """The client's effective ``cores.max`` as a fraction (1.0 if none)."""
        c = self._ceilings.get(client)
        if c is None:
            c = 1.0
            for n in self._path(client):
                c = min(c, _frac(n.cores_max))
            self._ceilings[client] = c
        return c

    def _demand(self, d: ClientDemand) -> float:
        if d.throttled:
            return _INF
        used = max(d.charged_ns, d.busy_ns) / self.tick_ns
        return min(1.0, used * DEMAND_GAIN + DEMAND_FLOOR)

    def _device_rates(self, dev: str, active: dict[int, ClientDemand]) -> dict[int, float]:
        """Hierarchical water-filling of one GPU among the active clients."""
        direct: dict[int, list[int]] = {}  # id(node) -> clients directly in it
        kids: dict[int, dict[str, Node]] = {}  # id(node) -> active children
        for c in active:
            path = self._path(c)
            direct.setdefault(id(path[0]), []).append(c)
            for child, parent in itertools.pairwise(path):
                kids.setdefault(id(parent), {})[child.path] = child

        demand_cache: dict[int, float] = {}

        def demand(node: Node) -> float:
            key = id(node)
            if key not in demand_cache:
                total = sum(self._demand(active[c]) for c in direct.get(key, []))
                total += sum(demand(ch) for ch in kids.get(key, {}).values())
                demand_cache[key] = min(total, _frac(node.cores_max))
            return demand_cache[key]

        rates: dict[int, float] = {}

        def allocate(node: Node, amount: float) -> None:
            self._slice_rates[(node.path, dev)] = amount
            units: list[_Unit] = []
            for ch in kids.get(id(node), {}).values():
                hi = _frac(ch.cores_max)
                units.append(_Unit(ch, -1, ch.cores_min / 100.0, hi, ch.weight, demand(ch)))
            for c in direct.get(id(node), []):
                units.append(_Unit(None, c, 0.0, 1.0, WEIGHT_DEFAULT, self._demand(active[c])))
            for u in units:
                u.want = min(u.want, u.hi)
            water_fill(amount, units)
            for u in units:
                if u.node is None:
                    rates[u.client] = u.alloc
                else:
                    allocate(u.node, u.alloc)

        root = self.tree.root
        if active:
            allocate(root, _frac(root.cores_max))
        return rates

    # ----------------------------------------------------------------- tick

    def tick(self, demands: Sequence[ClientDemand]) -> dict[tuple[int, str], Budget]:
        """One control step: a Budget for every attached client-device pair.

        ``demands`` lists the pairs that were active in the last tick (they
        were charged, or wanted to run and were throttled); entries with
        neither, and pairs left out, are idle once ``idle_ticks`` have passed
        since they were last active. Idle pairs pay back debt at their
        ceiling rate and hold at most one tick of budget, so a client that
        wakes up can launch at once but cannot burst past its share for
        more than a tick.
        """
        T = self.tick_ns
        clients = self.tree.clients
        if (self._quiet and not demands and self._gen == self.tree.generation
                and self._membership == self.tree.membership):
            # Nothing ran, nothing changed, every budget has settled: the
            # budgets are those of the last tick. An idle node costs nothing.
            return self._budgets
        if self._gen != self.tree.generation:
            self._gen = self.tree.generation
            self._paths = {}
            self._ceilings = {}
            self._limits = {}
            self._steady = {}
        elif self._membership != self.tree.membership:
            # A client id is never reused while attached, but a detached one
            # may come back elsewhere (tests do): forget what is gone.
            for cache in (self._paths, self._ceilings, self._limits):
                for c in [c for c in cache if c not in clients]:
                    del cache[c]
        self._membership = self.tree.membership
        pairs: list[tuple[int, str]] = []
        by_dev: dict[str, list[int]] = {}
        for c, st in clients.items():
            for dev in st.devices:
                pairs.append((c, dev))
                by_dev.setdefault(dev, []).append(c)
        attached = set(pairs)

        # What each pair is charged this tick, and which pairs are active.
        charged: dict[tuple[int, str], int] = {}
        now: dict[tuple[int, str], ClientDemand] = {}
        for d in demands:
            key = (d.client, d.dev)
            if key not in attached:
                continue  # detached since; nothing to charge
            ns = max(0, d.charged_ns)
            charged[key] = charged.get(key, 0) + ns
            prev = now.get(key)
            if prev is None:
                now[key] = ClientDemand(d.client, d.dev, ns, d.throttled, max(0, d.busy_ns))
            else:
                prev.charged_ns += ns
                prev.busy_ns += max(0, d.busy_ns)
                prev.throttled = prev.throttled or d.throttled
        # A pair in debt is being held back by the gate right now (the hook
        # counts a throttled wait only when it ends, which may be many ticks
        # later): it wants more, whatever it was charged this tick.
        for key in pairs:
            if self._tokens.get(key, 1) <= 0:
                got = now.get(key)
                if got is None:
                    now[key] = ClientDemand(key[0], key[1], 0, True, 0)
                else:
                    got.throttled = True
        # Charges arrive some ticks after the work ran, so one tick's usage
        # understates a client that is speeding up: its demand is the most it
        # used in any of the last idle_ticks ticks.
        # Likewise a client that was held back a few ticks ago and is running
        # on fresh budget now still wants more: its charges have not caught up.
        for key, got in now.items():
            hist = self._usage.setdefault(key, [])
            hist.append(-1 if got.throttled else max(got.charged_ns, got.busy_ns))
            del hist[:-self.idle_ticks]
            if -1 in hist:
                got.throttled = True
            got.busy_ns = max(hist)
        if len(self._usage) > len(now):  # pairs left out ran nothing: age them
            for key in [k for k in self._usage if k not in now]:
                hist = self._usage[key]
                hist.append(0)
                del hist[:-self.idle_ticks]
                if not any(hist):
                    del self._usage[key]
        active: dict[str, dict[int, ClientDemand]] = {}
        for key in pairs:
            got = now.get(key)
            if got is not None and (got.charged_ns > 0 or got.throttled):
                self._recent[key] = (got, 0)
                use = got
            else:
                # Charges arrive some ticks late (the attribution lag): a pair
                # that was active recently keeps its last demand for a grace
                # period rather than being treated as idle while it still runs.
                last = self._recent.get(key)
                if last is None or last[1] + 1 >= self.idle_ticks:
                    self._recent.pop(key, None)
                    continue
                use = last[0]
                self._recent[key] = (use, last[1] + 1)
            active.setdefault(key[1], {})[key[0]] = use

        self._slice_rates = {}
        limited_dev = {dev: any(self._limited(c) for c in cs) for dev, cs in by_dev.items()}
        rates: dict[tuple[int, str], float] = {}
        for dev, cs in by_dev.items():
            act = active.get(dev, {})
            dev_rates = self._device_rates(dev, act)
            for c in cs:
                rates[(c, dev)] = dev_rates.get(c, 0.0)

        out: dict[tuple[int, str], Budget] = {}
        steady = self._steady
        for key in pairs:
            c, dev = key
            cur = active.get(dev, {}).get(c)
            tokens = self._tokens.get(key)
            spent = charged.get(key, 0)
            if cur is None and not spent:
                settled = steady.get(key)
                if (settled is not None and settled[0] == tokens
                        and settled[1] == (not limited_dev[dev])):
                    out[key] = settled[2]
                    continue
            steady.pop(key, None)
            before = tokens
            if cur is not None:
                rate = rates[key]
                if tokens is None:
                    tokens = rate * T
                tokens += rate * T - spent
                # A light client may bank as much as an idle one (one tick at
                # its ceiling), so a spike does not throttle it needlessly.
                hi = self.burst_ticks * T * max(rate, self._ceiling(c), MIN_BURST_RATE)
            else:
                rate = self._ceiling(c)
                if tokens is None:
                    tokens = rate * T
                hi = max(rate * T, MIN_BURST_RATE * T)
                tokens = min(tokens + rate * T, max(tokens, hi)) - spent
                hi = max(hi, tokens)
            unlimited = not limited_dev[dev]
            if unlimited:
                tokens = self.burst_ticks * T * max(rate, MIN_BURST_RATE)
            # Debt is bounded by what the pair repays in debt_ticks at its
            # own rate: a charge that arrived late and whole (see _attrib)
            # must not hold a client with a tiny share back for a minute
            # (seen with 200 clients on one simulated GPU: 110 ms of debt
            # at 0.5 % of a GPU is 22 s of waiting).
            tokens = max(-self.debt_ticks * T * max(rate, MIN_BURST_RATE), min(tokens, hi))
            self._tokens[key] = tokens
            self._rates[key] = rate if cur is not None else 0.0
            out[key] = Budget(int(tokens), unlimited, round(rate * 1_000_000))
            if cur is None and not spent and tokens == before:
                steady[key] = (tokens, unlimited, out[key])
        if len(self._tokens) > len(attached):
            for key in [k for k in self._tokens if k not in attached]:
                del self._tokens[key]
                self._rates.pop(key, None)
                self._recent.pop(key, None)
                self._usage.pop(key, None)
                steady.pop(key, None)
        self._budgets = out
        self._quiet = (len(steady) == len(out) and not self._recent and not self._usage)
        return out

    # -------------------------------------------------------- introspection

    def rates(self) -> dict[tuple[int, str], float]:
        """Last tick's rate (fraction of one GPU) per active client-device pair."""
        return {k: v for k, v in self._rates.items() if v > 0}

    def slice_rates(self) -> dict[tuple[str, str], float]:
        """Last tick's allocation per (slice, device), for ``show`` and ``top``."""
        return dict(self._slice_rates)

    def budgets(self) -> dict[tuple[int, str], Budget]:
        """The budgets the last tick returned."""
        return dict(self._budgets)
