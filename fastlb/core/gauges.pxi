# TEMPORARY STUB (branch wt-access only) of the lead's core/gauges.pxi, with the API of the
# brief, so that admission.pxi builds before the foundation lands; replaced by main's file at
# the merge.
cdef enum:
    G_CUR = 0
    G_MAX = 1
    G_QUEUED = 2
    G_TOTAL = 3
    G_DENY_ACL = 4
    G_DENY_SRC_CONNS = 5
    G_DENY_SRC_RATE = 6
    G_DENY_SRC_TABLE = 7
    G_PROXY_ERRORS = 8
    G_QUEUE_FULL = 9
    G_QUEUE_TIMEOUT = 10
    G_CLIENT_SILENT = 11
    G_LOCAL_ERRORS = 12
    G_NO_BACKEND = 13
    G_MAXCONN_REACHED = 14
    G_FIRST_BYTE_TIMEOUT = 15
    G_NFIELDS = 16

GAUGE_FIELDS = ("cur", "max", "queued", "total", "deny_acl", "deny_src_conns", "deny_src_rate",
                "deny_src_table", "proxy_errors", "queue_full", "queue_timeout", "client_silent",
                "local_errors", "no_backend", "maxconn_reached", "first_byte_timeout")


@cython.final
cdef class Gauges:
    cdef Py_buffer _view
    cdef bint _acquired
    cdef int64_t *base
    cdef readonly int nrows

    @staticmethod
    def size_for(int nrows):
        return nrows * G_NFIELDS * 8

    def __cinit__(self, buffer, int nrows):
        self.base = <int64_t *>_writable_buffer(buffer, &self._view, nrows * G_NFIELDS * 8, "Gauges")
        self._acquired = True
        self.nrows = nrows

    def __dealloc__(self):
        if self._acquired:
            PyBuffer_Release(&self._view)

    cdef void add(self, int row, int field, int64_t v) noexcept nogil:
        if 0 <= row < self.nrows:
            flb_add_relaxed_i64(&self.base[row * G_NFIELDS + field], v)

    cdef int64_t get_c(self, int row, int field) noexcept nogil:
        if 0 <= row < self.nrows:
            return flb_load_relaxed_i64(&self.base[row * G_NFIELDS + field])
        return 0

    def get(self, int row, int field):
        return self.get_c(row, field)

    def row(self, int row):
        return {name: self.get_c(row, i) for i, name in enumerate(GAUGE_FIELDS)}
