# Per-source limits in shared memory: service.limits = { per_source_conns, per_source_rate, burst }.
#
# Owner of: the SourceTable layout and its rules. The table is a view over a buffer the caller
# owns (in production one MAP_SHARED mapping per service made before the fork, so every worker
# counts against the same entries); no locks, every word changed by compare-and-swap (_atomic.h).
#
# Layout: ``nentries`` (a power of two) entries of two uint64:
#   state = key << 16 | conns   key: 48 bits of xxh64(source), 0 = never used; conns: 16 bits
#   tat                         the rate's GCRA theoretical arrival time, ns of the caller's
#                               clock (0 = a full bucket)
# The source of an IPv4 client is its /32, of an IPv6 client its /64 (one subscriber's LAN: one
# host can take a whole /64, so counting /128s would count nothing); IPv4-mapped IPv6 is IPv4.
# Its home is xxh64(source) & (nentries - 1); it may live in the SRC_PROBE entries from there
# (linear probing, bounded: a lookup touches at most 8 entries, 2 cache lines).
#
# Rate: GCRA (the cell-rate algorithm of ATM, as in Brandur's and redis-cell's limiters): with
# T = 1 s / rate and tolerance tau = burst * T, a connection at ``now`` is admitted when
# max(tat, now) + T - now <= tau, and then tat becomes max(tat, now) + T. That is a token bucket
# of ``burst`` tokens refilled at ``rate``/s, kept in ONE word: lock-free and exact.
#
# acquire (one connection of a source):
#   1. find the source's entry in its window; else claim the first entry that is free: never
#      used, or reusable = no connection and a full bucket (tat <= now), since such an entry
#      holds nothing a fresh one would not. The claim is one CAS (old state -> key << 16 | 1).
#   2. pin it: CAS conns + 1, refused with CONNS at max_conns. A pinned entry (conns > 0) is
#      never reused, so its tat belongs to this source while we look at it.
#   3. rate: CAS tat forward; refused with RATE (and the pin undone) when over the burst.
#      Refusals for CONNS take no token (nothing was attempted on the backend).
#   Table full (the window holds 8 live sources, none reusable): refused with TABLE_FULL. Why
#   refuse rather than admit uncounted: a full window is what a flood of distinct sources looks
#   like (IPv6 /64s are cheap), and admitting uncounted would turn the limiter off exactly then;
#   entries become reusable burst/rate seconds after their last connection, so legitimate
#   sources get a place back quickly, and the table is sized (entries >= 4 x the sources
#   expected at once, SourceTable.size_for) so that a full window is an attack, not a load.
#   HAProxy's stick tables evict the oldest entry instead; with counters that must stay exact
#   (a live connection's count) we cannot evict an entry that still holds connections.
# Known imprecisions, both bounded, both needing an entry to become reusable while another
# process is between its two passes over the same window (microseconds):
#   (a) two processes inserting the same new source may claim two entries. Every later acquire
#       pins the first match in probe order, so the duplicate keeps only the connections pinned
#       on it during the race (in practice one per racing process), which the limit on the
#       other entry does not see; they drain normally and the duplicate becomes reusable.
#   (b) an entry reused just after its previous source took a token (an ABA on the state word
#       between the reuse check of tat and the claim): the new source starts with up to one
#       burst consumed, the old one with a fresh bucket.
# Neither loses or leaks a connection count: every pin is undone by exactly one decrement of
# the entry it was made on.

cdef enum:
    SRC_ADMIT = 0
    SRC_REFUSED_CONNS = 1
    SRC_REFUSED_RATE = 2
    SRC_TABLE_FULL = 3
    SRC_NREASONS = 4
    # Entries examined per source: 8 x 16 bytes = 2 cache lines; with a table at <= 1/4 load
    # the chance that 8 consecutive entries are all live is far below 1e-4.
    SRC_PROBE = 8
    SRC_MAX_CONNS = 65535            # conns is 16 bits of the state word
    SRC_MIN_ENTRIES = 16
    SRC_MAX_ENTRIES = 16777216       # 256 MiB of table; far above any sane sizing
    SRC_CONNS_MASK = 0xffff

cdef extern from "_atomic.h":
    int flb_cas_u64(uint64_t *p, uint64_t *expected, uint64_t desired) noexcept nogil
    uint64_t flb_sub_rel(uint64_t *p, uint64_t v) noexcept nogil
    void flb_racy_store(uint64_t *p, uint64_t v) noexcept nogil

# The seed of the source hash, apart from Maglev's keys so a table slot says nothing of a pick.
cdef uint64_t SRC_SEED = 0x5352434C494D4954   # "SRCLIMIT"

SOURCE_REASONS = ("admit", "conns", "rate", "table_full")


cdef inline uint64_t src_hash(const flb_addr *a, uint64_t salt) noexcept nogil:
    """xxh64 of the source: the 16 bytes of an IPv4 (mapped) address, or an IPv6 /64. ``salt``
    (the engine passes the service's row + 1) is mixed into the seed, so that one table keeps
    apart the counts of one source in two services; 0 is the plain seed (the twin's)."""
    cdef unsigned char k[16]
    memcpy(k, a.ip, 16)
    if not addr_is_v4(a):
        memset(k + 8, 0, 8)
    return flb_xxh64(k, 16, SRC_SEED ^ (salt * <uint64_t>0x9E3779B97F4A7C15))


cdef inline uint64_t src_key(uint64_t h) noexcept nogil:
    cdef uint64_t key = h >> 16
    return key if key else 1


cdef int _check_entries(Py_ssize_t entries) except -1:
    if entries < SRC_MIN_ENTRIES or entries > SRC_MAX_ENTRIES or (entries & (entries - 1)):
        raise CoreArgumentError(
            f"entries = {entries}: must be a power of two from {SRC_MIN_ENTRIES} to "
            f"{SRC_MAX_ENTRIES} (4 x the sources expected at once is a good size)")
    return 0


@cython.final
cdef class SourceTable:
    """Per-source connection counts and rates over a writable (shared) buffer; see the rules
    at the top of core/srclimit.pxi. A zeroed buffer is an empty table."""
    cdef Py_buffer _view
    cdef bint _acquired
    cdef uint64_t *w
    cdef uint64_t mask
    cdef readonly Py_ssize_t entries

    @staticmethod
    def size_for(Py_ssize_t entries):
        """Bytes needed for ``entries`` entries (16 each; a multiple of the cache line)."""
        _check_entries(entries)
        return entries * 16

    def __cinit__(self, buffer, Py_ssize_t entries):
        _check_entries(entries)
        self.w = <uint64_t *>_writable_buffer(buffer, &self._view, entries * 16, "SourceTable")
        self._acquired = True
        self.entries = entries
        self.mask = <uint64_t>(entries - 1)

    def __dealloc__(self):
        if self._acquired:
            PyBuffer_Release(&self._view)

    cdef Py_ssize_t _pin(self, uint64_t key, uint64_t home, uint64_t now,
                         uint64_t cap) noexcept nogil:
        """Steps 1-2: the index of the source's entry, pinned (conns + 1); or -SRC_REFUSED_CONNS
        or -SRC_TABLE_FULL."""
        cdef Py_ssize_t e, j
        cdef uint64_t s
        cdef int i, attempt
        for attempt in range(4):
            e = -1
            for i in range(SRC_PROBE):
                j = <Py_ssize_t>((home + i) & self.mask)
                if (flb_load_acq(&self.w[2 * j]) >> 16) == key:
                    e = j
                    break
            if e < 0:
                for i in range(SRC_PROBE):
                    j = <Py_ssize_t>((home + i) & self.mask)
                    s = flb_load_acq(&self.w[2 * j])
                    while True:
                        if (s >> 16) == key:          # inserted meanwhile by another process
                            e = j
                            break
                        if s == 0 or ((s & SRC_CONNS_MASK) == 0
                                      and flb_load_acq(&self.w[2 * j + 1]) <= now):
                            if flb_cas_u64(&self.w[2 * j], &s, (key << 16) | 1):
                                return j              # claimed, pinned
                            continue                  # s is the new value: look again
                        break                         # live entry of another source
                    if e >= 0:
                        break
                if e < 0:
                    return -SRC_TABLE_FULL
            s = flb_load_acq(&self.w[2 * e])
            while (s >> 16) == key:
                if (s & SRC_CONNS_MASK) >= cap:
                    return -SRC_REFUSED_CONNS
                if flb_cas_u64(&self.w[2 * e], &s, s + 1):
                    return e
            # reused for another source between our look and our pin: look again
        return -SRC_TABLE_FULL

    cdef inline int acquire(self, const flb_addr *a, int64_t now_ms, uint32_t max_conns,
                            uint32_t rate, uint32_t burst, Py_ssize_t *entry) noexcept nogil:
        return self.acquire_salted(a, now_ms, max_conns, rate, burst, 0, entry)

    cdef int acquire_salted(self, const flb_addr *a, int64_t now_ms, uint32_t max_conns,
                            uint32_t rate, uint32_t burst, uint64_t salt,
                            Py_ssize_t *entry) noexcept nogil:
        """One new connection from ``a`` at ``now_ms`` (a monotonic ms clock shared by the
        processes, >= 0: CLOCK_MONOTONIC is one clock for the whole machine). ``max_conns``:
        concurrent connections per source (0: no limit, SRC_MAX_CONNS at most); ``rate``:
        new connections per second (0: no limit) with ``burst`` (>= 1) at once. Returns
        SRC_ADMIT with *entry to hand to release() when the connection ends (-1: nothing to
        release), or SRC_REFUSED_CONNS / SRC_REFUSED_RATE / SRC_TABLE_FULL with *entry = -1.
        A client without an address is admitted, untracked. ``salt``: see src_hash (one
        table, many services)."""
        cdef uint64_t h, now, t, nt, period, tau
        cdef uint64_t cap = max_conns if 0 < max_conns < SRC_MAX_CONNS else SRC_MAX_CONNS
        cdef Py_ssize_t e
        entry[0] = -1
        if a.family == FLB_FAM_UNSPEC or (max_conns == 0 and rate == 0):
            return SRC_ADMIT
        h = src_hash(a, salt)
        now = <uint64_t>now_ms * 1000000
        e = self._pin(src_key(h), h & self.mask, now, cap)
        if e < 0:
            return <int>-e
        if rate:
            period = 1000000000 // rate
            tau = period * (burst if burst else 1)
            t = flb_load_acq(&self.w[2 * e + 1])
            while True:
                nt = (t if t > now else now) + period
                if nt - now > tau:
                    flb_sub_rel(&self.w[2 * e], 1)
                    return SRC_REFUSED_RATE
                if flb_cas_u64(&self.w[2 * e + 1], &t, nt):
                    break
        entry[0] = e
        return SRC_ADMIT

    cdef inline void release(self, Py_ssize_t entry) noexcept nogil:
        """The end of a connection admitted with ``entry`` (a no-op for -1). Precondition:
        called exactly once per admitted connection."""
        if entry >= 0:
            flb_sub_rel(&self.w[2 * entry], 1)

    # -- Python side (tests, admin display) --------------------------------------------------

    def py_acquire(self, str ip, int64_t now_ms, uint32_t max_conns=0, uint32_t rate=0,
                   uint32_t burst=1, uint64_t salt=0):
        """acquire() from Python: ``(reason, entry)``, reason a SRC_* code (SOURCE_REASONS)."""
        cdef flb_addr a
        cdef Py_ssize_t e
        if now_ms < 0:
            raise CoreArgumentError(f"now_ms = {now_ms}: a monotonic clock reading, >= 0")
        if max_conns > SRC_MAX_CONNS:
            raise CoreArgumentError(f"max_conns = {max_conns}: at most {SRC_MAX_CONNS}")
        if rate > 1000000000:
            raise CoreArgumentError(f"rate = {rate}: at most 1e9 per second")
        addr_from_text(ip, 0, &a, "SourceTable.acquire")
        cdef int r = self.acquire_salted(&a, now_ms, max_conns, rate, burst, salt, &e)
        return r, e

    def py_release(self, Py_ssize_t entry):
        """release() from Python; CoreArgumentError for an entry out of range or with no
        connection (a double release)."""
        if entry == -1:
            return
        if entry < 0 or entry >= self.entries:
            raise CoreArgumentError(f"entry {entry} out of range 0..{self.entries - 1}")
        if (flb_load_acq(&self.w[2 * entry]) & SRC_CONNS_MASK) == 0:
            raise CoreArgumentError(f"entry {entry} has no connection to release (released twice?)")
        self.release(entry)

    def conns(self, str ip, uint64_t salt=0):
        """Connections counted now for the source of ``ip`` (0 when it has no entry); ``salt``:
        the service's (row + 1) for a table the engine fills."""
        cdef flb_addr a
        addr_from_text(ip, 0, &a, "SourceTable.conns")
        cdef uint64_t h = src_hash(&a, salt), key = src_key(h), s
        cdef int i
        cdef uint64_t total = 0
        for i in range(SRC_PROBE):
            s = flb_load_acq(&self.w[2 * ((h + i) & self.mask)])
            if (s >> 16) == key:
                total += s & SRC_CONNS_MASK
        return total

    def entry(self, Py_ssize_t i):
        """``(key, conns, tat_ns)`` of entry ``i`` (key 0: never used)."""
        if i < 0 or i >= self.entries:
            raise CoreArgumentError(f"entry {i} out of range 0..{self.entries - 1}")
        cdef uint64_t s = flb_load_acq(&self.w[2 * i])
        return s >> 16, s & SRC_CONNS_MASK, flb_load_acq(&self.w[2 * i + 1])

    def total_conns(self):
        """Connections counted over the whole table."""
        cdef Py_ssize_t i
        cdef uint64_t total = 0
        for i in range(self.entries):
            total += flb_load_acq(&self.w[2 * i]) & SRC_CONNS_MASK
        return total

    def _racy_acquire(self, str ip, uint32_t max_conns):
        """Test-only: a concurrency limit with plain loads and stores where CASes belong (a
        known-bad twin, so the multi-process test can show it catches lost updates). Assumes
        the source's entry exists (one py_acquire made it). ``(reason, entry)``."""
        cdef flb_addr a
        addr_from_text(ip, 0, &a, "SourceTable._racy_acquire")
        cdef uint64_t h = src_hash(&a, 0), key = src_key(h), s
        cdef Py_ssize_t j
        cdef int i
        for i in range(SRC_PROBE):
            j = <Py_ssize_t>((h + i) & self.mask)
            s = flb_load_acq(&self.w[2 * j])
            if (s >> 16) == key:
                if (s & SRC_CONNS_MASK) >= max_conns:
                    return SRC_REFUSED_CONNS, -1
                flb_racy_store(&self.w[2 * j], s + 1)
                return SRC_ADMIT, j
        return SRC_TABLE_FULL, -1

    def _racy_release(self, Py_ssize_t entry):
        """Test-only: release with a plain load and store (the racy twin's other half)."""
        if 0 <= entry < self.entries:
            flb_racy_store(&self.w[2 * entry], flb_load_acq(&self.w[2 * entry]) - 1)


def source_acquire_many(SourceTable table, str ip, int count, uint32_t max_conns, uint32_t rate,
                        uint32_t burst):
    """Benchmark helper: ``count`` acquire+release pairs of one source through the cdef path;
    returns how many were admitted."""
    cdef flb_addr a
    cdef Py_ssize_t e
    cdef int i, n = 0
    addr_from_text(ip, 0, &a, "source_acquire_many")
    for i in range(count):
        if table.acquire(&a, i, max_conns, rate, burst, &e) == SRC_ADMIT:
            n += 1
            table.release(e)
    return n


globals().update(
    SRC_ADMIT=int(SRC_ADMIT), SRC_REFUSED_CONNS=int(SRC_REFUSED_CONNS),
    SRC_REFUSED_RATE=int(SRC_REFUSED_RATE), SRC_TABLE_FULL=int(SRC_TABLE_FULL),
    SRC_PROBE=int(SRC_PROBE), SRC_MAX_CONNS=int(SRC_MAX_CONNS),
    SRC_MIN_ENTRIES=int(SRC_MIN_ENTRIES), SRC_MAX_ENTRIES=int(SRC_MAX_ENTRIES),
)
