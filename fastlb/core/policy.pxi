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
# Owner of: that interface (Policy) and what every policy shares: in_tried, splitmix64,
# _need_counters, and the benchmark driver pick_many. One file per policy: round_robin.pxi,
# weighted_random.pxi (random, least_conn), maglev.pxi; the name -> class table (POLICIES,
# make_policy) in policy_table.pxi, included last.
#
# Health is an input: every pick skips slots whose bit is down and slots in `tried`.
# Each policy has a slow pure-Python twin in fastlb/reference.py that must give the same answers.

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
