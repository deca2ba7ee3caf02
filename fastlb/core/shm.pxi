# Shared-memory views: the health bitmap and the per-worker counter blocks.
#
# Both are views over a buffer the caller owns (in production one anonymous MAP_SHARED mmap made
# before the fork; in tests a bytearray or mmap). The view holds a buffer export, so the mapping
# cannot be closed or resized under it.

cdef extern from "_atomic.h":
    uint64_t flb_load_acq(const uint64_t *p) noexcept nogil
    uint64_t flb_fetch_or(uint64_t *p, uint64_t v) noexcept nogil
    uint64_t flb_fetch_and(uint64_t *p, uint64_t v) noexcept nogil
    uint64_t flb_add_rel(uint64_t *p, uint64_t v) noexcept nogil
    int64_t flb_load_relaxed_i64(const int64_t *p) noexcept nogil
    void flb_add_relaxed_i64(int64_t *p, int64_t v) noexcept nogil
    void flb_store_relaxed_i64(int64_t *p, int64_t v) noexcept nogil
    void flb_racy_or(uint64_t *p, uint64_t v) noexcept nogil
    void flb_racy_and(uint64_t *p, uint64_t v) noexcept nogil


cdef char *_writable_buffer(object buffer, Py_buffer *view, Py_ssize_t need, str what) except NULL:
    """Acquire a writable, 8-byte aligned buffer of at least ``need`` bytes into ``view``."""
    if isinstance(buffer, (bytes, str, memoryview)) and (
            not isinstance(buffer, memoryview) or buffer.readonly):
        raise CoreTypeError(
            f"{what} needs a writable buffer (bytearray, mmap.mmap); got a read-only "
            f"{type(buffer).__name__}")
    try:
        PyObject_GetBuffer(buffer, view, PyBUF_WRITABLE)
    except BufferError as exc:
        raise CoreTypeError(f"{what} needs a writable buffer (bytearray, mmap.mmap): {exc}") from None
    except TypeError:
        raise CoreTypeError(
            f"{what} needs a writable buffer (bytearray, mmap.mmap); got "
            f"{type(buffer).__name__}") from None
    if view.len < need:
        PyBuffer_Release(view)
        raise CoreArgumentError(
            f"{what} buffer too small: {view.len} bytes, needs at least {need}")
    if (<size_t>view.buf) % 8:
        PyBuffer_Release(view)
        raise CoreArgumentError(f"{what} buffer must be 8-byte aligned (mmap and bytearray are)")
    return <char *>view.buf


cdef int _check_nslots(int nslots) except -1:
    if nslots < 1 or nslots > MAX_SLOTS:
        raise CoreArgumentError(f"nslots = {nslots}: must be from 1 to {MAX_SLOTS}")
    return 0


@cython.final
cdef class HealthBitmap:
    """One bit per backend slot (1 = up) plus a generation counter, over a writable buffer.

    Layout: the generation (uint64) alone on the first cache line, then ceil(nslots/64) uint64
    words of bits. Writers (one process: the health owner) use atomic fetch-or/fetch-and, then a
    release increment of the generation when a bit really changed. Readers load with acquire
    and never lock. A fresh (zeroed) buffer reads as every slot down.
    """
    cdef Py_buffer _view
    cdef bint _acquired
    cdef uint64_t *gen
    cdef uint64_t *words
    cdef readonly int nslots

    @staticmethod
    def size_for(int nslots):
        """Bytes needed for ``nslots`` slots (a multiple of the cache line)."""
        _check_nslots(nslots)
        cdef Py_ssize_t n = CACHE_LINE + ((nslots + 63) // 64) * 8
        return ((n + CACHE_LINE - 1) // CACHE_LINE) * CACHE_LINE

    def __cinit__(self, buffer, int nslots):
        _check_nslots(nslots)
        cdef char *base = _writable_buffer(buffer, &self._view, HealthBitmap.size_for(nslots),
                                           "HealthBitmap")
        self._acquired = True
        self.gen = <uint64_t *>base
        self.words = <uint64_t *>(base + CACHE_LINE)
        self.nslots = nslots

    def __dealloc__(self):
        if self._acquired:
            PyBuffer_Release(&self._view)

    cdef inline bint up(self, int slot) noexcept nogil:
        return (flb_load_acq(&self.words[slot >> 6]) >> (slot & 63)) & 1

    cdef inline uint64_t generation_c(self) noexcept nogil:
        return flb_load_acq(self.gen)

    cdef int _check(self, int slot) except -1:
        if slot < 0 or slot >= self.nslots:
            raise CoreArgumentError(f"slot {slot} out of range 0..{self.nslots - 1}")
        return 0

    def is_up(self, int slot):
        self._check(slot)
        return bool(self.up(slot))

    def mark_up(self, int slot):
        """Set the slot's bit. Returns True when it was down (and bumps the generation)."""
        self._check(slot)
        cdef uint64_t bit = (<uint64_t>1) << (slot & 63)
        if flb_fetch_or(&self.words[slot >> 6], bit) & bit:
            return False
        flb_add_rel(self.gen, 1)
        return True

    def mark_down(self, int slot):
        """Clear the slot's bit. Returns True when it was up (and bumps the generation)."""
        self._check(slot)
        cdef uint64_t bit = (<uint64_t>1) << (slot & 63)
        if not (flb_fetch_and(&self.words[slot >> 6], ~bit) & bit):
            return False
        flb_add_rel(self.gen, 1)
        return True

    def _racy_mark(self, int slot, bint up):
        """Test-only: the same change with a NON-atomic read-modify-write (a known-bad twin)."""
        self._check(slot)
        cdef uint64_t bit = (<uint64_t>1) << (slot & 63)
        if up:
            flb_racy_or(&self.words[slot >> 6], bit)
        else:
            flb_racy_and(&self.words[slot >> 6], ~bit)
        flb_add_rel(self.gen, 1)

    @property
    def generation(self):
        return self.generation_c()

    def up_slots(self):
        """The slots whose bit is set, ascending."""
        return [s for s in range(self.nslots) if self.up(s)]


@cython.final
cdef class Counters:
    """Per-slot connection counters in ``nblocks`` blocks (one per worker), over a buffer.

    Each (block, slot) owns one cache line of CTR_LINE int64, the first CTR_NFIELDS used:
    COUNTER_FIELDS (active, total, bytes_in, bytes_out, connect_failures), indexed by the CTR_*
    constants. A block has one writer (its worker): writes are relaxed atomic adds, so a reader
    in another process sees untorn values. Readers sum over blocks. ``zero`` is the one way to
    clear counters (a dead worker's active counts, a reused slot).
    """
    cdef Py_buffer _view
    cdef bint _acquired
    cdef int64_t *base
    cdef readonly int nslots
    cdef readonly int nblocks

    FIELDS = COUNTER_FIELDS

    @staticmethod
    def size_for(int nslots, int nblocks=1):
        _check_nslots(nslots)
        if nblocks < 1 or nblocks > 1024:
            raise CoreArgumentError(f"nblocks = {nblocks}: must be from 1 to 1024")
        return <Py_ssize_t>nblocks * nslots * CACHE_LINE

    def __cinit__(self, buffer, int nslots, int nblocks=1):
        cdef Py_ssize_t need = Counters.size_for(nslots, nblocks)
        self.base = <int64_t *>_writable_buffer(buffer, &self._view, need, "Counters")
        self._acquired = True
        self.nslots = nslots
        self.nblocks = nblocks

    def __dealloc__(self):
        if self._acquired:
            PyBuffer_Release(&self._view)

    cdef inline int64_t *line(self, int block, int slot) noexcept nogil:
        return self.base + (<Py_ssize_t>block * self.nslots + slot) * CTR_LINE

    cdef inline void add_c(self, int block, int slot, int field, int64_t delta) noexcept nogil:
        flb_add_relaxed_i64(self.line(block, slot) + field, delta)

    cdef inline int64_t sum_c(self, int slot, int field) noexcept nogil:
        cdef int64_t total = 0
        cdef int b
        for b in range(self.nblocks):
            total += flb_load_relaxed_i64(self.line(b, slot) + field)
        return total

    cdef int _check(self, int block, int slot, int field) except -1:
        if block < 0 or block >= self.nblocks:
            raise CoreArgumentError(f"block {block} out of range 0..{self.nblocks - 1}")
        if slot < 0 or slot >= self.nslots:
            raise CoreArgumentError(f"slot {slot} out of range 0..{self.nslots - 1}")
        if field < 0 or field >= CTR_NFIELDS:
            raise CoreArgumentError(
                f"field {field} out of range 0..{CTR_NFIELDS - 1} ({', '.join(COUNTER_FIELDS)})")
        return 0

    def add(self, int block, int slot, int field, int64_t delta):
        self._check(block, slot, field)
        self.add_c(block, slot, field, delta)

    def get(self, int slot, int field):
        """The field summed over all blocks."""
        self._check(0, slot, field)
        return self.sum_c(slot, field)

    def get_block(self, int block, int slot, int field):
        self._check(block, slot, field)
        return flb_load_relaxed_i64(self.line(block, slot) + field)

    def active(self, int slot):
        self._check(0, slot, 0)
        return self.sum_c(slot, CTR_ACTIVE)

    def slot_stats(self, int slot):
        """All fields of a slot summed over blocks, as a dict."""
        self._check(0, slot, 0)
        return {name: self.sum_c(slot, i) for i, name in enumerate(Counters.FIELDS)}

    def zero(self, int block, int slot=-1, fields=None):
        """Zero counters of ``block``: one ``slot`` (or every slot with -1), the fields in
        ``fields`` (indexes, e.g. ``(CTR_ACTIVE,)``; every field with None). The one way to clear
        counters: a dead worker's active counts, a slot handed to a new backend. Each word is
        stored atomically (relaxed), so readers in other processes never see a torn value; the
        caller makes sure no process still writes the words it clears."""
        self._check(block, 0 if slot == -1 else slot, 0)
        cdef int f, s, lo = slot, hi = slot + 1
        cdef int want[CTR_NFIELDS]
        cdef int nwant = 0
        if fields is None:
            for f in range(CTR_NFIELDS):
                want[f] = f
            nwant = CTR_NFIELDS
        else:
            try:
                fields = list(fields)
            except TypeError:
                raise CoreTypeError(f"fields must be an iterable of field indexes (CTR_*), got "
                                    f"{type(fields).__name__}") from None
            for field in fields:
                if not isinstance(field, int) or isinstance(field, bool):
                    raise CoreTypeError(f"fields: {field!r} is not a field index (CTR_*)")
                self._check(block, 0, field)
                if nwant == CTR_NFIELDS:
                    raise CoreArgumentError(f"fields: more than {CTR_NFIELDS} indexes")
                want[nwant] = field
                nwant += 1
        if slot == -1:
            lo, hi = 0, self.nslots
        for s in range(lo, hi):
            for f in range(nwant):
                flb_store_relaxed_i64(self.line(block, s) + want[f], 0)
