# round_robin: smooth weighted round-robin (nginx's ngx_stream_upstream_get_peer, in
# src/stream/ngx_stream_upstream_round_robin.c), with nginx's max_fails easing on a reported
# failure. Owner of: RoundRobin. The interface it implements is Policy (policy.pxi).

@cython.final
cdef class RoundRobin(Policy):
    """Smooth weighted round-robin, exactly nginx's ngx_stream_upstream_get_peer.

    Per pick, each usable peer: current += effective; total += effective; effective climbs by
    one toward weight; the first peer with the greatest current wins; winner.current -= total.
    A reported failure lowers effective by weight // max_fails (nginx's rule, floored at 0), so a
    failed peer is eased back in one step per round. Weights {5,1,1} give a a b a c a a.
    nginx's own max_fails/fail_timeout exclusion is not here: exclusion is the health bitmap's.
    """
    cdef int64_t *current
    cdef int64_t *effective
    cdef readonly int max_fails

    NAME = "round_robin"
    OPTIONS = ("max_fails",)

    cdef int _configure(self, object counters, object ids, uint64_t seed, dict options) except -1:
        self.max_fails = self._int_option(options, "max_fails", 1, 1, MAX_FAILS)
        self.current = <int64_t *>calloc(self.n, sizeof(int64_t))
        self.effective = <int64_t *>malloc(self.n * sizeof(int64_t))
        if self.current == NULL or self.effective == NULL:
            raise MemoryError()
        for i in range(self.n):
            self.effective[i] = self.weights[i]
        return 0

    def __dealloc__(self):
        free(self.current)
        free(self.effective)

    cdef int pick_c(self, uint64_t key, const int *tried, int ntried) noexcept:
        cdef int i, s, best = -1
        cdef int64_t total = 0
        for i in range(self.n):
            s = self.slots[i]
            if not self.health.up(s) or in_tried(s, tried, ntried):
                continue
            self.current[i] += self.effective[i]
            total += self.effective[i]
            if self.effective[i] < self.weights[i]:
                self.effective[i] += 1
            if best == -1 or self.current[i] > self.current[best]:
                best = i
        if best == -1:
            return -1
        self.current[best] -= total
        return self.slots[best]

    cdef void on_failure(self, int slot) noexcept:
        cdef int i = self._index(slot)
        if i < 0:
            return
        self.effective[i] -= self.weights[i] // self.max_fails
        if self.effective[i] < 0:
            self.effective[i] = 0

    def state(self):
        """(current, effective) per member, for tests and introspection."""
        return [(self.current[i], self.effective[i]) for i in range(self.n)]
