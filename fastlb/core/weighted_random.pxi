# random and least_conn. Owner of: WeightedRandom (weighted random in O(1) by Vose's alias
# method) and LeastConn, which derives from WeightedRandom: it draws two members by weight
# from the same alias table and keeps the less loaded (weighted power of two choices,
# Envoy's default). The interface both implement is Policy (policy.pxi).

cdef class WeightedRandom(Policy):
    """Weighted random in O(1): Vose's alias method over the healthy members, integer-exact.

    The alias table is rebuilt lazily when the bitmap's generation moves. A pick draws a column
    j uniformly and keeps it when a second draw t (mod W) is below prob[j], else takes alias[j].
    With ``tried`` non-empty (a retry: rare) or a slot that went down since the rebuild, a
    linear weighted draw over the usable members is used instead.
    """
    cdef int *usable          # member indices of healthy members, in member order
    cdef int nusable
    cdef uint64_t total       # sum of the weights of usable members
    cdef uint64_t *prob       # scaled: column j keeps itself when t < prob[j], t in [0, total)
    cdef int *alias
    cdef int *scratch_small
    cdef int *scratch_large
    cdef uint64_t gen
    cdef uint64_t rng

    NAME = "random"

    cdef int _configure(self, object counters, object ids, uint64_t seed, dict options) except -1:
        self.rng = seed
        cdef int n = self.n
        self.usable = <int *>malloc(n * sizeof(int))
        self.prob = <uint64_t *>malloc(n * sizeof(uint64_t))
        self.alias = <int *>malloc(n * sizeof(int))
        self.scratch_small = <int *>malloc(n * sizeof(int))
        self.scratch_large = <int *>malloc(n * sizeof(int))
        if (self.usable == NULL or self.prob == NULL or self.alias == NULL
                or self.scratch_small == NULL or self.scratch_large == NULL):
            raise MemoryError()
        self._rebuild()
        return 0

    def __dealloc__(self):
        free(self.usable)
        free(self.prob)
        free(self.alias)
        free(self.scratch_small)
        free(self.scratch_large)

    cdef void _rebuild(self) noexcept:
        # Read the generation first: a change racing with this rebuild leaves self.gen stale and
        # the next pick rebuilds again.
        self.gen = self.health.generation_c()
        cdef int i, j, l, g, ns = 0, nl = 0, m = 0
        cdef uint64_t total = 0
        for i in range(self.n):
            if self.health.up(self.slots[i]):
                self.usable[m] = i
                total += <uint64_t>self.weights[i]
                m += 1
        self.nusable = m
        self.total = total
        for j in range(m):
            self.prob[j] = <uint64_t>self.weights[self.usable[j]] * <uint64_t>m
            self.alias[j] = j
            if self.prob[j] < total:
                self.scratch_small[ns] = j
                ns += 1
            else:
                self.scratch_large[nl] = j
                nl += 1
        while ns > 0 and nl > 0:
            ns -= 1
            l = self.scratch_small[ns]
            nl -= 1
            g = self.scratch_large[nl]
            self.alias[l] = g
            self.prob[g] = self.prob[g] - (total - self.prob[l])
            if self.prob[g] < total:
                self.scratch_small[ns] = g
                ns += 1
            else:
                self.scratch_large[nl] = g
                nl += 1
        while nl > 0:
            nl -= 1
            self.prob[self.scratch_large[nl]] = total
        while ns > 0:  # unreachable with exact integers; kept as the textbook's safety net
            ns -= 1
            self.prob[self.scratch_small[ns]] = total

    cdef inline int _draw(self) noexcept:
        """A member index drawn by weight from the alias table (nusable > 0)."""
        cdef int j = <int>(splitmix64(&self.rng) % <uint64_t>self.nusable)
        if splitmix64(&self.rng) % self.total >= self.prob[j]:
            j = self.alias[j]
        return self.usable[j]

    cdef int _slow_draw(self, const int *tried, int ntried) noexcept:
        """A member index drawn by weight among members up and not tried, or -1."""
        cdef int i
        cdef uint64_t total = 0, t
        for i in range(self.n):
            if self.health.up(self.slots[i]) and not in_tried(self.slots[i], tried, ntried):
                total += <uint64_t>self.weights[i]
        if total == 0:
            return -1
        t = splitmix64(&self.rng) % total
        for i in range(self.n):
            if self.health.up(self.slots[i]) and not in_tried(self.slots[i], tried, ntried):
                if t < <uint64_t>self.weights[i]:
                    return i
                t -= <uint64_t>self.weights[i]
        return -1

    cdef inline bint _fresh(self) noexcept:
        if self.health.generation_c() != self.gen:
            self._rebuild()
        return self.nusable > 0

    cdef int pick_c(self, uint64_t key, const int *tried, int ntried) noexcept:
        cdef int i
        if not self._fresh():
            return -1
        if ntried == 0:
            i = self._draw()
            if self.health.up(self.slots[i]):
                return self.slots[i]
        i = self._slow_draw(tried, ntried)
        return -1 if i < 0 else self.slots[i]

    def probabilities(self):
        """{slot: Fraction} that the alias table encodes, for exactness tests."""
        from fractions import Fraction
        self._fresh()
        out = {}
        cdef int j, m = self.nusable
        for j in range(m):
            keep = Fraction(self.prob[j], self.total) / m
            s = self.slots[self.usable[j]]
            out[s] = out.get(s, 0) + keep
            a = self.slots[self.usable[self.alias[j]]]
            out[a] = out.get(a, 0) + Fraction(1, m) - keep
        return {s: p for s, p in out.items() if p}


@cython.final
cdef class LeastConn(WeightedRandom):
    """Weighted power of two choices over the shared active-connection counters (Envoy's default).

    Two members are drawn by weight (as WeightedRandom does); the one with the smaller
    (active + 1) / weight wins, the first on a tie. O(1), and no herd on one idle backend when
    many workers pick at once.
    """
    cdef Counters counters

    NAME = "least_conn"

    cdef int _configure(self, object counters, object ids, uint64_t seed, dict options) except -1:
        self.counters = _need_counters(self, counters, "least_conn")
        WeightedRandom._configure(self, counters, ids, seed, options)
        return 0

    cdef inline int _better(self, int a, int b) noexcept:
        cdef int64_t ca = self.counters.sum_c(self.slots[a], CTR_ACTIVE) + 1
        cdef int64_t cb = self.counters.sum_c(self.slots[b], CTR_ACTIVE) + 1
        # b wins only when cb/wb < ca/wa, i.e. cb*wa < ca*wb
        if cb * self.weights[a] < ca * self.weights[b]:
            return b
        return a

    cdef int pick_c(self, uint64_t key, const int *tried, int ntried) noexcept:
        cdef int a, b
        if not self._fresh():
            return -1
        if ntried == 0:
            a = self._draw()
            b = self._draw()
            if self.health.up(self.slots[a]) and self.health.up(self.slots[b]):
                return self.slots[self._better(a, b)]
        a = self._slow_draw(tried, ntried)
        if a < 0:
            return -1
        b = self._slow_draw(tried, ntried)
        return self.slots[self._better(a, b)]
