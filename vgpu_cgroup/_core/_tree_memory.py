"""Memory admission and accounting on the slice tree.

The daemon is single-threaded, so ``reserve`` checks every ancestor's
``gpu.memory.max`` and books the allocation in one step: that is what makes
admission exact under any concurrency of clients. Everything is per device:
each GPU has its own usage and its own limits (a per-device value of the
knob, or the one for every GPU). Pure state, no I/O.
"""

from __future__ import annotations

from ._tree_index import ClientState, Denial, Grant, Node, SliceIndex, check_bytes


class MemoryBooks(SliceIndex):
    """What each client and slice holds on each device (``SliceTree``'s)."""

    def _chain(self, st: ClientState, dev: str) -> list[tuple[Node, int | None, int | None]]:
        """The client's slices with their memory limits on device ``dev``,
        cached per knob generation: admission is the reservation round
        trip's hot path."""
        if st.chain_gen != self.generation:
            st.chains.clear()
            st.chain_gen = self.generation
        chain = st.chains.get(dev)
        if chain is None:
            ref = self.ref(dev)
            chain = st.chains[dev] = [(n, n.mem_max_on(ref), n.mem_high_on(ref))
                                      for n in st.node.ancestry()]
        return chain

    def reserve(self, client: int, dev: str, n: int) -> Grant | Denial:
        """Exact admission of ``n`` bytes on ``dev`` against every ancestor's max.

        On success the bytes are booked on the client and every slice on its
        path (``peak`` and the ``high`` event updated). On refusal nothing is
        booked; the refusing slice has a ``max`` event and the leaf an
        ``oom`` event, each counted there (local) and on every ancestor.
        """
        n = check_bytes(n)
        st = self._client(client)
        path = self._chain(st, dev)
        for i, (node, lim, _high) in enumerate(path):
            cur = node.current.get(dev, 0)
            if lim is not None and cur + n > lim:
                node.lev_max += 1
                st.node.lev_oom += 1
                for j, (up, _l, _h) in enumerate(path):
                    up.ev_oom += 1
                    if j >= i:
                        up.ev_max += 1
                return Denial(node.path, lim, cur)
        self._book(st, path, dev, n)
        return Grant(n)

    def admit(self, client: int, dev: str, n: int, guard: int) -> tuple[int | None, int] | None:
        """:meth:`reserve` in one walk, when it is sure to succeed with at
        least ``guard`` bytes to spare on every slice; then the client's
        memory view after it, as :meth:`mem_view` would give. None, with
        nothing booked and nothing counted, when some slice would be left
        with less: the caller looks closer (the driver's own figures) and
        calls :meth:`reserve`.

        The reservation round trip's hot path: one pass over the path
        finds both whether the request fits and the tightest slice.
        """
        n = check_bytes(n)
        st = self._client(client)
        path = self._chain(st, dev)
        best: tuple[int, int] | None = None  # (headroom, limit) of the tightest
        for node, lim, _high in path:
            if lim is not None:
                room = lim - node.current.get(dev, 0)
                if room - n < guard:
                    return None
                if best is None or room < best[0]:
                    best = (room, lim)
        self._book(st, path, dev, n)
        if best is None:
            return None, st.node.current[dev]
        return best[1], best[1] - best[0] + n

    def _book(self, st: ClientState, path: list[tuple[Node, int | None, int | None]],
              dev: str, n: int) -> None:
        """Book admitted bytes on the client and every slice of its path.

        A slice left above its own ``gpu.memory.high`` has a ``high`` event;
        each slice counts those of itself and of the slices below it on the
        path (leaf first, so ``over`` is how many there were so far)."""
        over = 0
        for node, _lim, high in path:
            cur = node.current.get(dev, 0) + n
            node.current[dev] = cur
            if cur > node.peak.get(dev, 0):
                node.peak[dev] = cur
            if high is not None and cur > high:
                node.lev_high += 1
                over += 1
            node.ev_high += over
        st.held[dev] = st.held.get(dev, 0) + n
        self.mem_version += 1
        if dev not in st.devices:
            st.devices.append(dev)
            self.membership += 1

    def adopt(self, client: int, dev: str, n: int) -> Denial | None:
        """Book memory the client already holds, without admission.

        For ``hello{held}`` after a daemon restart: the memory exists on the
        GPU whatever the limits say now, so it is booked even when that puts
        a slice over its ``gpu.memory.max`` (later reservations are then
        refused until enough is freed; nothing is killed). Returns the Denial
        that a reserve would have got, for the caller to log, else None. No
        events are counted: no allocation failed.
        """
        n = check_bytes(n)
        st = self._client(client)
        over: Denial | None = None
        for node, lim, _high in self._chain(st, dev):
            cur = node.current.get(dev, 0)
            if over is None and lim is not None and cur + n > lim:
                over = Denial(node.path, lim, cur)
            cur += n
            node.current[dev] = cur
            if cur > node.peak.get(dev, 0):
                node.peak[dev] = cur
        st.held[dev] = st.held.get(dev, 0) + n
        self.mem_version += 1
        if dev not in st.devices:
            st.devices.append(dev)
            self.membership += 1
        return over

    def release(self, client: int, dev: str, n: int) -> None:
        """Give back ``n`` bytes; ValueError if the client holds less."""
        n = check_bytes(n)
        st = self._client(client)
        have = st.held.get(dev, 0)
        if n > have:
            raise ValueError(f"release of {n} bytes on {dev} but client holds {have}")
        st.held[dev] = have - n
        self.mem_version += 1
        if st.held[dev] == 0:
            del st.held[dev]
        for node in st.node.ancestry():
            node.current[dev] -= n

    def held(self, client: int) -> dict[str, int]:
        """Bytes the client holds, per device."""
        return dict(self._client(client).held)

    def mem_view(self, client: int, dev: str) -> tuple[int | None, int]:
        """(limit, current) of the slice with the least headroom on the path.

        What ``cuMemGetInfo`` inside the slice should show. (None, the leaf's
        current) when no slice on the path has a ``gpu.memory.max``.
        """
        st = self._client(client)
        best: tuple[int, int] | None = None
        for node, lim, _high in self._chain(st, dev):
            if lim is None:
                continue
            cur = node.current.get(dev, 0)
            if best is None or lim - cur < best[0] - best[1]:
                best = (lim, cur)
        if best is None:
            return None, st.node.current.get(dev, 0)
        return best
