# maglev: weighted Maglev consistent hashing (Eisenbud et al., NSDI 2016, with Katran's V2
# weighting), bounded loads optional (arXiv 1608.01350, HAProxy's hash-balance-factor).
# Owner of: Maglev, its table-size helpers (_is_prime, next_prime) and the fixed seeds of its
# permutation hashes. The interface it implements is Policy (policy.pxi).

cdef extern from *:
    # Exact products for maglev's bounded-load test (active x sum of weights x 100 can pass 2**63).
    ctypedef long long flb_i128 "__int128"

cdef bint _is_prime(uint64_t m) noexcept:
    cdef uint64_t d = 3
    if m < 2:
        return False
    if m % 2 == 0:
        return m == 2
    while d * d <= m:
        if m % d == 0:
            return False
        d += 2
    return True


def next_prime(uint64_t m):
    """The smallest prime >= m."""
    while not _is_prime(m):
        m += 1
    return m


# Fixed seeds of the two permutation hashes: part of the on-the-wire contract that every fastlb
# instance builds the same table (changing them moves every key).
MAGLEV_SEED_OFFSET = 0x5BD1E995
MAGLEV_SEED_SKIP = 0x1B873593


@cython.final
cdef class Maglev(Policy):
    """Weighted Maglev consistent hashing (Eisenbud et al., NSDI 2016), Katran's V2 weighting.

    Each member has a permutation (offset = h1(id) % M, skip = h2(id) % (M-1) + 1) of the M
    table positions. Population takes turns: each round every member adds its weight to a
    credit, and a member whose credit reaches the largest weight spends it to claim its next
    free preferred position. Shares are then proportional to weights (Katran V2, katran#35).

    The table is built from the whole set; a lookup probes forward from key % M past entries
    whose slot is down or tried (sozu's approach), so a health flap moves only the keys of the
    flapping backend. With the option ``hash_balance_factor`` f > 0 (bounded loads, arXiv
    1608.01350; HAProxy's hash-balance-factor, a percent) probing also skips a backend whose
    active count + 1 would exceed f% of its weighted share of (total active + 1), all counted
    over the members up and not tried, in every worker (the shared counters):
        (active + 1) x W x 100 <= f x (total + 1) x w        (exact, in 128-bit integers)
    When every member is over its bound the first usable one in probe order is taken.
    """
    cdef int *table
    cdef readonly uint64_t table_size
    cdef readonly int balance_factor
    cdef Counters counters
    cdef uint64_t gen
    cdef int nup
    cdef readonly tuple ids

    NAME = "maglev"
    OPTIONS = ("hash_balance_factor", "table_size")

    cdef int _configure(self, object counters, object ids, uint64_t seed, dict options) except -1:
        cdef int n = self.n
        table_size = options.get("table_size")
        if ids is None:
            ids = [str(self.slots[i]) for i in range(n)]
        ids = tuple(i.encode() if isinstance(i, str) else bytes(i) for i in ids)
        if len(ids) != n:
            raise CoreArgumentError(f"maglev: {n} slots but {len(ids)} ids")
        if len(set(ids)) != n:
            raise CoreArgumentError("maglev: backend ids must be distinct")
        self.ids = ids
        cdef uint64_t m
        if table_size is None:
            m = MAGLEV_DEFAULT_M
            if m <= <uint64_t>(100 * n):
                m = next_prime(100 * n + 1)
        else:
            if not isinstance(table_size, int) or isinstance(table_size, bool):
                raise CoreTypeError(
                    f"maglev: option table_size must be an int, got {type(table_size).__name__}")
            if table_size <= 100 * n:
                raise CoreArgumentError(
                    f"maglev table_size {table_size} too small for {n} backends: must exceed "
                    f"100 x N = {100 * n} (try {next_prime(100 * n + 1)})")
            if not _is_prime(table_size):
                raise CoreArgumentError(
                    f"maglev table_size {table_size} is not prime; use a prime such as "
                    f"{next_prime(table_size)}")
            m = table_size
        if m > MAGLEV_MAX_M:
            raise CoreArgumentError(f"maglev table_size {m} exceeds the maximum {MAGLEV_MAX_M}")
        self.table_size = m
        self.balance_factor = self._int_option(options, "hash_balance_factor", 0, 100,
                                               MAX_BALANCE_FACTOR, zero_ok=True)
        if self.balance_factor:
            self.counters = _need_counters(self, counters, "maglev with a hash_balance_factor")
        self._populate()
        self._count_up()
        return 0

    def __dealloc__(self):
        free(self.table)

    cdef void _count_up(self) noexcept:
        # generation first: a change racing with the count makes the next pick count again
        self.gen = self.health.generation_c()
        cdef int i, k = 0
        for i in range(self.n):
            if self.health.up(self.slots[i]):
                k += 1
        self.nup = k

    cdef int _populate(self) except -1:
        cdef int n = self.n, i
        cdef uint64_t m = self.table_size, runs = 0, cur, maxw = 0
        cdef uint64_t *offset = <uint64_t *>malloc(n * sizeof(uint64_t))
        cdef uint64_t *skip = <uint64_t *>malloc(n * sizeof(uint64_t))
        cdef uint64_t *nxt = <uint64_t *>calloc(n, sizeof(uint64_t))
        cdef uint64_t *credit = <uint64_t *>calloc(n, sizeof(uint64_t))
        self.table = <int *>malloc(m * sizeof(int))
        if offset == NULL or skip == NULL or nxt == NULL or credit == NULL or self.table == NULL:
            free(offset); free(skip); free(nxt); free(credit)
            raise MemoryError()
        for i in range(n):
            ident = self.ids[i]
            offset[i] = flb_xxh64(<const char *>ident, len(ident), MAGLEV_SEED_OFFSET) % m
            skip[i] = flb_xxh64(<const char *>ident, len(ident), MAGLEV_SEED_SKIP) % (m - 1) + 1
            if <uint64_t>self.weights[i] > maxw:
                maxw = <uint64_t>self.weights[i]
        for cur in range(m):
            self.table[cur] = -1
        while runs < m:
            for i in range(n):
                credit[i] += <uint64_t>self.weights[i]
                if credit[i] < maxw:
                    continue
                credit[i] -= maxw
                cur = (offset[i] + nxt[i] * skip[i]) % m
                while self.table[cur] >= 0:
                    nxt[i] += 1
                    cur = (offset[i] + nxt[i] * skip[i]) % m
                self.table[cur] = i
                nxt[i] += 1
                runs += 1
                if runs == m:
                    break
        free(offset); free(skip); free(nxt); free(credit)
        return 0

    cdef int pick_c(self, uint64_t key, const int *tried, int ntried) noexcept:
        cdef int i, s, k, fallback = -1
        cdef uint64_t pos, steps
        cdef uint64_t m = self.table_size
        cdef int64_t total_active = 0, wup = 0
        cdef bint bounded = self.balance_factor > 0
        if self.health.generation_c() != self.gen:
            self._count_up()
        if self.nup == 0:
            return -1
        if ntried > 0:
            k = 0
            for i in range(self.n):
                s = self.slots[i]
                if self.health.up(s) and not in_tried(s, tried, ntried):
                    k += 1
            if k == 0:
                return -1
        if bounded:
            for i in range(self.n):
                s = self.slots[i]
                if self.health.up(s) and not in_tried(s, tried, ntried):
                    total_active += self.counters.sum_c(s, CTR_ACTIVE)
                    wup += self.weights[i]
        pos = key % m
        for steps in range(m):
            i = self.table[pos]
            s = self.slots[i]
            if self.health.up(s) and not in_tried(s, tried, ntried):
                if not bounded:
                    return s
                if fallback < 0:
                    fallback = s
                if (<flb_i128>(self.counters.sum_c(s, CTR_ACTIVE) + 1) * wup * 100
                        <= <flb_i128>self.balance_factor * (total_active + 1) * self.weights[i]):
                    return s
            pos += 1
            if pos == m:
                pos = 0
        return fallback

    def table_slots(self):
        """The lookup table as a list of slots (position -> slot), for tests."""
        return [self.slots[self.table[p]] for p in range(self.table_size)]
