# Balancing policies. One interface for all (HAProxy's lb_* modules, STYLE.md point 2):
#
#   Policy(slots, weights, health, *, counters=None, ids=None, seed=0, options=None): built
#     from an immutable backend set (slots, weights) over a HealthBitmap (cold path); the same
#     constructor for every policy, each taking what it needs and refusing options it does not
#     know (CoreArgumentError naming the policy and the option);
#   cdef pick_c(key, tried, ntried) -> slot, or -1 when nothing is usable; never raises (hot
#     path, called by the engine with no Python in between);
#   cdef on_failure(slot): a connect to slot failed (the engine's passive failure hook; only
#     round_robin acts on it). report_failure(slot) is its Python face, for tests.
#
# POLICIES (name -> class) is the one table; make_policy() builds from it. Options:
#   round_robin  max_fails            nginx's max_fails: a failure lowers the effective weight
#                                     by weight // max_fails (1..MAX_FAILS, default 1)
#   maglev       hash_balance_factor  HAProxy's hash-balance-factor, a percent: a backend takes
#                                     a new key only while its active count stays within that
#                                     % of its weighted share (0 = off, else 100..MAX_BALANCE_FACTOR);
#                                     needs counters
#                table_size           a prime > 100 x backends (default 65537 or above)
#
# Health is an input: every pick skips slots whose bit is down and slots in `tried`.
# Each policy has a slow pure-Python twin in fastlb/reference.py that must give the same answers.

cdef extern from *:
    # Exact products for maglev's bounded-load test (active x sum of weights x 100 can pass 2**63).
    ctypedef long long flb_i128 "__int128"

cdef inline bint in_tried(int slot, const int *tried, int ntried) noexcept nogil:
    cdef int i
    for i in range(ntried):
        if tried[i] == slot:
            return True
    return False


cdef inline uint64_t splitmix64(uint64_t *state) noexcept nogil:
    # Sebastiano Vigna's splitmix64: a fast, well-mixed 64-bit generator; seeded per worker.
    state[0] += 0x9E3779B97F4A7C15ULL
    cdef uint64_t z = state[0]
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef class Policy:
    """The interface of every policy: owns the member arrays (slots, weights) and the health
    view. Subclasses set NAME and OPTIONS and implement _configure, pick_c and (if they need
    it) on_failure."""
    cdef HealthBitmap health
    cdef int n
    cdef int *slots
    cdef int64_t *weights
    cdef readonly str name

    NAME = None
    OPTIONS = ()                          # the option names this policy takes

    def __init__(self, slots, weights, health, *, counters=None, ids=None, uint64_t seed=0,
                 options=None):
        if type(self).NAME is None:
            raise CoreTypeError("Policy is the interface; build one of POLICIES "
                                f"({', '.join(POLICIES)}) or call make_policy()")
        self.name = type(self).NAME
        if options is None:
            options = {}
        elif not isinstance(options, dict):
            raise CoreTypeError(f"{self.name}: options must be a dict, got {type(options).__name__}")
        for key in options:
            if key not in type(self).OPTIONS:
                raise CoreArgumentError(
                    f"{self.name}: unknown option {key!r}; {self.name} takes "
                    + (", ".join(type(self).OPTIONS) or "no option"))
        self._set_members(slots, weights, health)
        self._configure(counters, ids, seed, options)

    def __dealloc__(self):
        free(self.slots)
        free(self.weights)

    cdef int _configure(self, object counters, object ids, uint64_t seed, dict options) except -1:
        """Take what this policy needs of the constructor's arguments (members already set)."""
        return 0

    cdef long _int_option(self, dict options, str key, long default, long lo, long hi,
                          bint zero_ok=False) except? -1:
        """options[key] (default when absent): an int from lo to hi, or 0 when zero_ok."""
        value = options.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise CoreTypeError(f"{self.name}: option {key} must be an int, got {type(value).__name__}")
        if not (lo <= value <= hi or (zero_ok and value == 0)):
            raise CoreArgumentError(
                f"{self.name}: option {key} = {value}: expected "
                + ("0 (off) or " if zero_ok else "") + f"an integer from {lo} to {hi}")
        return value

    cdef int _set_members(self, object slots, object weights, object health) except -1:
        if not isinstance(health, HealthBitmap):
            raise CoreTypeError(f"health must be a HealthBitmap, got {type(health).__name__}")
        self.health = <HealthBitmap>health
        try:
            slots = list(slots)
            weights = list(weights)
        except TypeError:
            raise CoreTypeError("slots and weights must be sequences of ints") from None
        cdef int n = len(slots)
        if n == 0:
            raise CoreArgumentError(f"{self.name}: an empty backend set; a policy needs at least one backend")
        if len(weights) != n:
            raise CoreArgumentError(
                f"{self.name}: {n} slots but {len(weights)} weights; give one weight per slot")
        seen = set()
        for i in range(n):
            s, w = slots[i], weights[i]
            if not isinstance(s, int) or isinstance(s, bool):
                raise CoreTypeError(f"slots[{i}] must be an int, got {type(s).__name__}")
            if not isinstance(w, int) or isinstance(w, bool):
                raise CoreTypeError(f"weights[{i}] must be an int, got {type(w).__name__}")
            if s < 0 or s >= self.health.nslots:
                raise CoreArgumentError(
                    f"slots[{i}] = {s}: out of range 0..{self.health.nslots - 1} of the bitmap")
            if s in seen:
                raise CoreArgumentError(f"slots[{i}] = {s}: duplicate slot")
            seen.add(s)
            if w < 1 or w > MAX_WEIGHT:
                raise CoreArgumentError(
                    f"weights[{i}] = {w}: a weight must be an integer from 1 to {MAX_WEIGHT}")
        self.slots = <int *>malloc(n * sizeof(int))
        self.weights = <int64_t *>malloc(n * sizeof(int64_t))
        if self.slots == NULL or self.weights == NULL:
            raise MemoryError()
        for i in range(n):
            self.slots[i] = slots[i]
            self.weights[i] = weights[i]
        self.n = n
        return 0

    cdef int pick_c(self, uint64_t key, const int *tried, int ntried) noexcept:
        """The slot for ``key`` among the members up and not in tried[:ntried], or -1."""
        return -1

    cdef void on_failure(self, int slot) noexcept:
        """A connect to ``slot`` failed (refused, error, timeout). Default: nothing."""
        pass

    def pick(self, key=0, tried=()):
        """Pick a usable slot for ``key`` (an int, taken mod 2**64), skipping slots in ``tried``.

        Returns -1 when no slot is usable. ``key`` only matters to consistent hashing.
        """
        cdef uint64_t k = PyLong_AsUnsignedLongLongMask(key)
        if not tried:
            return self.pick_c(k, NULL, 0)
        cdef int buf[MAX_TRIED]
        cdef int nt = 0
        for t in tried:
            if nt == MAX_TRIED:
                raise CoreArgumentError(f"tried holds more than {MAX_TRIED} slots")
            buf[nt] = t
            nt += 1
        return self.pick_c(k, buf, nt)

    def report_failure(self, int slot):
        """on_failure from Python: a connect to ``slot`` failed (what the engine reports)."""
        self.on_failure(slot)

    @property
    def members(self):
        """The backend set as a tuple of (slot, weight)."""
        return tuple((self.slots[i], self.weights[i]) for i in range(self.n))

    cdef int _index(self, int slot) noexcept:
        cdef int i
        for i in range(self.n):
            if self.slots[i] == slot:
                return i
        return -1


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


cdef Counters _need_counters(Policy p, object counters, str who):
    """``counters`` as a Counters covering every member's slot, or CoreTypeError/ArgumentError."""
    if not isinstance(counters, Counters):
        raise CoreTypeError(f"{who} needs counters (a Counters), got {type(counters).__name__}")
    cdef Counters c = <Counters>counters
    for i in range(p.n):
        if p.slots[i] >= c.nslots:
            raise CoreArgumentError(
                f"slots[{i}] = {p.slots[i]}: out of range of the counters (0..{c.nslots - 1})")
    return c


# The one name -> class table (config's policy names, make_policy, the stub).
POLICIES = {cls.NAME: cls for cls in (RoundRobin, WeightedRandom, LeastConn, Maglev)}


def make_policy(str name, slots, weights, health, *, counters=None, ids=None, uint64_t seed=0,
                options=None):
    """Build the policy called ``name`` (a key of POLICIES). Every policy takes the same
    arguments and uses what it needs: ``counters`` (least_conn; maglev with a balance factor),
    ``ids`` (maglev: the stable backend ids its table is built from), ``seed`` (random,
    least_conn), ``options`` (a dict of the policy's own options, see POLICIES[name].OPTIONS)."""
    cls = POLICIES.get(name)
    if cls is None:
        raise CoreArgumentError(f"unknown policy {name!r}; expected one of {', '.join(POLICIES)}")
    return cls(slots, weights, health, counters=counters, ids=ids, seed=seed, options=options)


def pick_many(Policy policy, long count, uint64_t key_step=0x9E3779B97F4A7C15):
    """Benchmark helper: ``count`` picks through the cdef path (no Python call per pick), keys
    spread by ``key_step``. Returns the number of picks that found a slot."""
    cdef long i, found = 0
    cdef uint64_t key = 0
    for i in range(count):
        key += key_step
        if policy.pick_c(key, NULL, 0) >= 0:
            found += 1
    return found
