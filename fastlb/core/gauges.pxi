# Shared gauges: counts every worker process changes at once, exact across them (limits and
# refusal counts of issue 11).
#
# Owner of: the Gauges layout and its rules. A view over a buffer the caller owns (in
# production the shared memfd mapping, fastlb/shm.py), like HealthBitmap and Counters.
#
# Why not Counters: a Counters block has ONE writer (its worker) and readers sum over blocks,
# which is exact for totals but cannot enforce a limit: two workers each seeing 99 of 100 would
# both admit. A limit needs one word that every worker changes by compare-and-swap. So:
#   - ``nrows`` rows of GAUGE_LINE int64 (two cache lines, so two rows never share one). A row
#     is a backend's slot (G_CUR: its connections over all workers, what ``max_conns`` compares
#     with), a service's own slot (its listeners' sessions, queue and refusals), or the last
#     row, the whole balancer's (``[global] maxconn``).
#   - G_CUR and G_QUEUED move by CAS (take: +1 unless at the limit) and atomic decrement (give);
#     the other fields are atomic adds (relaxed: readers want an untorn, recent value).
#   - A worker that dies holds places it will never give back. Each process's view is bound to
#     its counter block, and every take/give is mirrored in that block's ``held`` words (one
#     writer each, relaxed), so the supervisor gives back a dead worker's places with
#     ``reclaim(block)``. A worker killed between the CAS and the mirror (a few instructions)
#     leaks one place until the slot is reused: bounded, and counted nowhere else.
# Uses _atomic.h's CAS as declared in srclimit.pxi (included before this file).
# Any row < 0 is "no row": take admits, the rest do nothing (a service without limits).

cdef enum:
    G_CUR = 0               # connections now (take/give)
    G_MAX = 1               # the highest G_CUR seen
    G_QUEUED = 2            # waiting in the queue now (take_field/give_field)
    G_TOTAL = 3             # sessions admitted
    G_DENY_ACL = 4
    G_DENY_SRC_CONNS = 5
    G_DENY_SRC_RATE = 6
    G_DENY_SRC_TABLE = 7
    G_PROXY_ERRORS = 8      # a PROXY header missing, malformed or late from a trusted source
    G_QUEUE_FULL = 9
    G_QUEUE_TIMEOUT = 10
    G_CLIENT_SILENT = 11    # closed before connecting: no first byte in client_first_byte
    G_LOCAL_ERRORS = 12     # socket()/connect() failed for a local reason (EMFILE...)
    G_NO_BACKEND = 13       # no backend could take the client
    G_MAXCONN_REACHED = 14  # times a listener paused at a maxconn
    G_FIRST_BYTE_TIMEOUT = 15
    G_NFIELDS = 16
    GAUGE_LINE = 16         # int64 per row: two cache lines
    G_HELD = 2              # fields mirrored per block: G_CUR and G_QUEUED

GAUGE_FIELDS = ("cur", "max", "queued", "total", "denied_acl", "denied_src_conns",
                "denied_src_rate", "denied_src_table", "proxy_errors", "queue_full",
                "queue_timeout", "client_silent", "local_errors", "no_backend",
                "maxconn_reached", "first_byte_timeout")


cdef inline bint _cas_i64(int64_t *p, int64_t *expected, int64_t desired) noexcept nogil:
    return flb_cas_u64(<uint64_t *>p, <uint64_t *>expected, <uint64_t>desired)


@cython.final
cdef class Gauges:
    """``nrows`` rows of GAUGE_FIELDS, shared by every process, plus ``nblocks`` per-block
    mirrors of the places each block holds. This view writes the mirror of ``block``."""
    cdef Py_buffer _view
    cdef bint _acquired
    cdef int64_t *rows
    cdef int64_t *held              # nblocks x nrows x G_HELD, after the rows
    cdef int64_t *mine              # this view's block's mirror
    cdef readonly int nrows
    cdef readonly int nblocks
    cdef readonly int block

    FIELDS = GAUGE_FIELDS

    @staticmethod
    def size_for(int nrows, int nblocks=1):
        """Bytes for ``nrows`` rows and ``nblocks`` mirrors (cache-line multiple)."""
        if nrows < 1 or nrows > MAX_SLOTS + 1:
            raise CoreArgumentError(f"nrows = {nrows}: must be from 1 to {MAX_SLOTS + 1}")
        if nblocks < 1 or nblocks > 1024:
            raise CoreArgumentError(f"nblocks = {nblocks}: must be from 1 to 1024")
        cdef Py_ssize_t block_bytes = ((<Py_ssize_t>nrows * G_HELD * 8 + CACHE_LINE - 1)
                                       // CACHE_LINE) * CACHE_LINE
        return <Py_ssize_t>nrows * GAUGE_LINE * 8 + nblocks * block_bytes

    def __cinit__(self, buffer, int nrows, int nblocks=1, int block=0):
        cdef Py_ssize_t need = Gauges.size_for(nrows, nblocks)
        if block < 0 or block >= nblocks:
            raise CoreArgumentError(f"block {block} out of range 0..{nblocks - 1}")
        cdef char *base = _writable_buffer(buffer, &self._view, need, "Gauges")
        self._acquired = True
        self.nrows = nrows
        self.nblocks = nblocks
        self.block = block
        self.rows = <int64_t *>base
        self.held = <int64_t *>(base + <Py_ssize_t>nrows * GAUGE_LINE * 8)
        self.mine = self._held_of(block)

    def __dealloc__(self):
        if self._acquired:
            PyBuffer_Release(&self._view)

    cdef inline int64_t *_held_of(self, int block) noexcept nogil:
        cdef Py_ssize_t words = ((<Py_ssize_t>self.nrows * G_HELD * 8 + CACHE_LINE - 1)
                                 // CACHE_LINE) * CACHE_LINE // 8
        return self.held + block * words

    # -- the data path (C, no Python) --------------------------------------------------------
    cdef inline int64_t get_c(self, int row, int field) noexcept nogil:
        if row < 0:
            return 0
        return flb_load_relaxed_i64(self.rows + <Py_ssize_t>row * GAUGE_LINE + field)

    cdef inline void add(self, int row, int field, int64_t v) noexcept nogil:
        if row >= 0:
            flb_add_relaxed_i64(self.rows + <Py_ssize_t>row * GAUGE_LINE + field, v)

    cdef bint take_field(self, int row, int field, int64_t limit) noexcept nogil:
        """field + 1 unless ``limit`` > 0 and field >= limit. True when taken. For G_CUR and
        G_QUEUED the place is mirrored in this block (reclaim)."""
        if row < 0:
            return True
        cdef int64_t *p = self.rows + <Py_ssize_t>row * GAUGE_LINE + field
        cdef int64_t v = flb_load_relaxed_i64(p)
        while True:
            if limit > 0 and v >= limit:
                return False
            if _cas_i64(p, &v, v + 1):
                break
        if field == G_CUR or field == G_QUEUED:
            flb_add_relaxed_i64(self.mine + <Py_ssize_t>row * G_HELD + (field == G_QUEUED), 1)
        return True

    cdef void give_field(self, int row, int field) noexcept nogil:
        """Undo one take_field of this process."""
        if row < 0:
            return
        if field == G_CUR or field == G_QUEUED:
            flb_add_relaxed_i64(self.mine + <Py_ssize_t>row * G_HELD + (field == G_QUEUED), -1)
        flb_sub_rel(<uint64_t *>(self.rows + <Py_ssize_t>row * GAUGE_LINE + field), 1)

    cdef bint take(self, int row, int64_t limit) noexcept nogil:
        """One more connection on ``row`` unless at ``limit`` (0: none); keeps G_MAX."""
        if not self.take_field(row, G_CUR, limit):
            return False
        if row < 0:
            return True
        cdef int64_t *base = self.rows + <Py_ssize_t>row * GAUGE_LINE
        cdef int64_t cur = flb_load_relaxed_i64(base + G_CUR)
        cdef int64_t m = flb_load_relaxed_i64(base + G_MAX)
        while cur > m:
            if _cas_i64(base + G_MAX, &m, cur):
                break
        return True

    cdef inline void give(self, int row) noexcept nogil:
        self.give_field(row, G_CUR)

    # -- Python side (supervisor, stats, tests) ------------------------------------------------
    cdef int _check(self, int row, int field) except -1:
        if row < 0 or row >= self.nrows:
            raise CoreArgumentError(f"row {row} out of range 0..{self.nrows - 1}")
        if field < 0 or field >= G_NFIELDS:
            raise CoreArgumentError(f"field {field} out of range 0..{G_NFIELDS - 1} "
                                    f"({', '.join(GAUGE_FIELDS)})")
        return 0

    @property
    def global_row(self):
        """The whole balancer's row (the last)."""
        return self.nrows - 1

    def get(self, int row, int field):
        self._check(row, field)
        return self.get_c(row, field)

    def row(self, int row):
        """Every field of ``row``, as a dict name -> value."""
        self._check(row, 0)
        return {name: self.get_c(row, i) for i, name in enumerate(GAUGE_FIELDS)}

    def py_take(self, int row, int64_t limit=0, int field=G_CUR):
        self._check(row, field)
        if field == G_CUR:
            return self.take(row, limit)
        return self.take_field(row, field, limit)

    def py_give(self, int row, int field=G_CUR):
        self._check(row, field)
        self.give_field(row, field)

    def py_add(self, int row, int field, int64_t v):
        self._check(row, field)
        self.add(row, field, v)

    def held_by(self, int block, int row):
        """``(cur, queued)`` places block ``block`` holds on ``row``."""
        if block < 0 or block >= self.nblocks:
            raise CoreArgumentError(f"block {block} out of range 0..{self.nblocks - 1}")
        self._check(row, 0)
        cdef int64_t *h = self._held_of(block) + <Py_ssize_t>row * G_HELD
        return flb_load_relaxed_i64(h), flb_load_relaxed_i64(h + 1)

    def reclaim(self, int block):
        """Give back every place ``block`` holds (its process is dead: it never will) and clear
        its mirror. Returns the connections given back. The caller makes sure no live process
        writes that block (the supervisor, after the worker's exit)."""
        if block < 0 or block >= self.nblocks:
            raise CoreArgumentError(f"block {block} out of range 0..{self.nblocks - 1}")
        cdef int64_t *h = self._held_of(block)
        cdef int r, k
        cdef int64_t n, total = 0
        cdef int fields[2]
        fields[0] = G_CUR
        fields[1] = G_QUEUED
        for r in range(self.nrows):
            for k in range(G_HELD):
                n = flb_load_relaxed_i64(h + <Py_ssize_t>r * G_HELD + k)
                if n:
                    flb_add_relaxed_i64(self.rows + <Py_ssize_t>r * GAUGE_LINE + fields[k], -n)
                    flb_store_relaxed_i64(h + <Py_ssize_t>r * G_HELD + k, 0)
                    if k == 0:
                        total += n
        return total

    def zero(self, int row):
        """Clear every field of ``row`` (a slot handed to a new backend or service) and every
        block's mirror of it. The caller makes sure nothing holds a place on it."""
        self._check(row, 0)
        cdef int f, b
        for f in range(GAUGE_LINE):
            flb_store_relaxed_i64(self.rows + <Py_ssize_t>row * GAUGE_LINE + f, 0)
        for b in range(self.nblocks):
            flb_store_relaxed_i64(self._held_of(b) + <Py_ssize_t>row * G_HELD, 0)
            flb_store_relaxed_i64(self._held_of(b) + <Py_ssize_t>row * G_HELD + 1, 0)


globals().update(
    G_CUR=int(G_CUR), G_MAX=int(G_MAX), G_QUEUED=int(G_QUEUED), G_TOTAL=int(G_TOTAL),
    G_DENY_ACL=int(G_DENY_ACL), G_DENY_SRC_CONNS=int(G_DENY_SRC_CONNS),
    G_DENY_SRC_RATE=int(G_DENY_SRC_RATE), G_DENY_SRC_TABLE=int(G_DENY_SRC_TABLE),
    G_PROXY_ERRORS=int(G_PROXY_ERRORS), G_QUEUE_FULL=int(G_QUEUE_FULL),
    G_QUEUE_TIMEOUT=int(G_QUEUE_TIMEOUT), G_CLIENT_SILENT=int(G_CLIENT_SILENT),
    G_LOCAL_ERRORS=int(G_LOCAL_ERRORS), G_NO_BACKEND=int(G_NO_BACKEND),
    G_MAXCONN_REACHED=int(G_MAXCONN_REACHED), G_FIRST_BYTE_TIMEOUT=int(G_FIRST_BYTE_TIMEOUT),
    G_NFIELDS=int(G_NFIELDS),
)
