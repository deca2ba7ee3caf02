# The connection log and the latency histograms, written by the data path in C (issue 14).
#
# Owner of: the connection record (cl_rec), the termination codes (TERM_*, TERM_CODES), the
# per-block ring of records and the per-(block, row) histograms, all in the shared mapping
# (fastlb/shm.py places the region after the gauges), and the session hooks (cl_*) that fill
# them. The supervisor drains the rings and formats the lines (fastlb/connlog.py); /metrics
# sums the histograms over blocks (fastlb/promex.py). docs/connlog.md is the reference.
#
# Ring: one per counter block, so one writer (the worker of that block) and one reader (the
# supervisor): a single-producer single-consumer queue. ``head`` (records written) is stored
# by the writer with release after the record is complete, ``tail`` (records read) by the
# reader with release after it copied them out; each loads the other's with acquire. Both only
# grow (64 bits: they never wrap); the record of number n is at n % capacity. A full ring drops
# the record and counts it in ``drops`` (the writer's word, relaxed): the data path never
# waits for the reader (HAProxy's ring buffers drop and count the same way).
#
# Histograms: per (block, row) two of them (connect time, session duration), HB_BUCKETS counts
# each (not cumulative: the reader makes Prometheus's cumulative ``le`` buckets) and the sum of
# the values in microseconds. One writer per word (the block's worker), relaxed adds like the
# counters. The row is a slot of the shared slot table: a service's own row (ServiceState.row),
# so a service's histograms are summed over its workers. Only the rows written are ever
# touched: the memfd is sparse, so the rows of unused slots cost address space, not memory.
#
# Times are CLOCK_MONOTONIC nanoseconds on the session (vDSO clock_gettime, ~20 ns, 4-5 per
# connection); the record's end time is CLOCK_REALTIME, read only for a record that is written.
from libc.string cimport memset
from libc.errno cimport EMFILE, ENFILE, ENOBUFS, EADDRNOTAVAIL

cdef extern from *:
    """
    #include <stdint.h>
    #include <time.h>
    /* One connection record: 128 bytes, two cache lines (the ring's unit). */
    typedef struct {
        int64_t end_ns;        /* CLOCK_REALTIME at the close */
        int64_t accept_ns;     /* CLOCK_REALTIME of the accept (end_ns - total time) */
        int64_t tw;            /* us: accept -> first connect attempt (queue, PROXY header); -1 none */
        int64_t tc;            /* us: first connect attempt -> established (retries included); -1 */
        int64_t tr;            /* us: established -> backend's first byte; -1 none */
        int64_t tt;            /* us: accept -> close */
        uint64_t bytes_in;     /* client -> backend */
        uint64_t bytes_out;    /* backend -> client */
        unsigned char ip[16];  /* the client (flb_addr): IPv4 as ::ffff:a.b.c.d */
        uint16_t port;
        uint8_t family;        /* 4, 6, 0 (unknown) */
        uint8_t term;          /* TERM_* */
        uint16_t lport;        /* the listener's local port */
        uint16_t retries;      /* failed connect attempts */
        int32_t row;           /* the service's row (slot table), -1 none */
        int32_t slot;          /* the backend's slot, -1 none */
        uint8_t pad[32];
    } flb_cl_rec;
    _Static_assert(sizeof(flb_cl_rec) == 128, "a connection record is 128 bytes");

    static inline void flb_cl_store_rel(uint64_t *p, uint64_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    static inline int64_t flb_cl_clock_ns(clockid_t c) {
        struct timespec ts;
        clock_gettime(c, &ts);
        return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    }
    #define FLB_CL_MONO CLOCK_MONOTONIC
    #define FLB_CL_REAL CLOCK_REALTIME

    /* -- the reader's formatter (the supervisor; never the data path) ----------------------
     * Lines are made here, in C, because the supervisor shares its core with the data path
     * when workers = 1: Python formatting cost ~20 us a line, this ~0.5 us. */
    #include <stdio.h>
    #include <string.h>
    #include <arpa/inet.h>
    typedef struct { int64_t sec; char text[40]; size_t len; } flb_cl_tcache;

    /* "2026-11-28T02:41:07.123456+01:00": local time with its offset (ISO 8601, as the
     * process log). localtime_r and strftime once per second per cache. */
    static size_t flb_cl_time(char *out, int64_t ns, flb_cl_tcache *c) {
        int64_t sec = ns / 1000000000LL, us = (ns % 1000000000LL) / 1000;
        if (ns < 0) { sec = 0; us = 0; }
        if (sec != c->sec || c->len == 0) {
            time_t t = (time_t)sec; struct tm tm; long off; char sign = '+';
            localtime_r(&t, &tm);
            off = tm.tm_gmtoff / 60;
            if (off < 0) { sign = '-'; off = -off; }
            c->len = strftime(c->text, 24, "%Y-%m-%dT%H:%M:%S", &tm);
            c->len += (size_t)snprintf(c->text + c->len, 16, "|%c%02ld:%02ld", sign, off / 60, off % 60);
            c->sec = sec;
        }
        /* the cache holds "date|+hh:mm": the microseconds go where the bar is */
        const char *bar = memchr(c->text, '|', c->len);
        size_t head = (size_t)(bar - c->text);
        memcpy(out, c->text, head);
        int n = snprintf(out + head, 16, ".%06lld", (long long)us);
        memcpy(out + head + n, bar + 1, c->len - head - 1);
        return head + (size_t)n + c->len - head - 1;
    }

    static size_t flb_cl_ms(char *out, int64_t us) {
        if (us < 0) { memcpy(out, "-1", 2); return 2; }
        return (size_t)sprintf(out, "%lld.%03lld", (long long)(us / 1000), (long long)(us % 1000));
    }

    static size_t flb_cl_ip(char *out, const flb_cl_rec *r, int brackets) {
        if (r->family == 4) {
            inet_ntop(AF_INET, r->ip + 12, out, 64);
            return strlen(out);
        }
        if (r->family == 6) {
            size_t n = 0;
            if (brackets) out[n++] = '[';
            inet_ntop(AF_INET6, r->ip, out + n, 64);
            n += strlen(out + n);
            if (brackets) out[n++] = ']';
            return n;
        }
        out[0] = '-';
        return 1;
    }

    /* One line (no newline) into out (at least 640 + svclen + blen bytes). json: svc and
     * backend come JSON-quoted (backend "null" when none); text: raw (backend NULL: <NOSRV>). */
    static size_t flb_cl_format(char *out, const flb_cl_rec *r, const char *svc, size_t svclen,
                                const char *be, size_t belen, const char *term, int json,
                                int worker, flb_cl_tcache *tend, flb_cl_tcache *tacc) {
        char *p = out;
        if (json) {
            p += sprintf(p, "{\\"time\\":\\"");
            p += flb_cl_time(p, r->end_ns, tend);
            p += sprintf(p, "\\",\\"accept_time\\":\\"");
            p += flb_cl_time(p, r->accept_ns, tacc);
            if (r->family) {
                p += sprintf(p, "\\",\\"client\\":\\"");
                p += flb_cl_ip(p, r, 0);
                p += sprintf(p, "\\",\\"client_port\\":%u,\\"service\\":", (unsigned)r->port);
            } else {
                p += sprintf(p, "\\",\\"client\\":null,\\"client_port\\":null,\\"service\\":");
            }
            memcpy(p, svc, svclen); p += svclen;
            p += sprintf(p, ",\\"listener_port\\":%u,\\"backend\\":", (unsigned)r->lport);
            memcpy(p, be, belen); p += belen;
            p += sprintf(p, ",\\"retries\\":%u,\\"queue_us\\":%lld,\\"connect_us\\":%lld,"
                         "\\"first_byte_us\\":%lld,\\"total_us\\":%lld,\\"bytes_in\\":%llu,"
                         "\\"bytes_out\\":%llu,\\"term\\":\\"%s\\",\\"worker\\":%d}",
                         (unsigned)r->retries, (long long)r->tw, (long long)r->tc,
                         (long long)r->tr, (long long)r->tt, (unsigned long long)r->bytes_in,
                         (unsigned long long)r->bytes_out, term, worker);
            return (size_t)(p - out);
        }
        p += flb_cl_time(p, r->end_ns, tend);
        *p++ = ' ';
        p += flb_cl_ip(p, r, 1);
        p += sprintf(p, ":%u ", r->family ? (unsigned)r->port : 0u);
        memcpy(p, svc, svclen); p += svclen;
        p += sprintf(p, ":%u ", (unsigned)r->lport);
        memcpy(p, svc, svclen); p += svclen;
        *p++ = '/';
        if (be) { memcpy(p, be, belen); p += belen; }
        else { memcpy(p, "<NOSRV>", 7); p += 7; }
        *p++ = ' ';
        p += flb_cl_ms(p, r->tw); *p++ = '/';
        p += flb_cl_ms(p, r->tc); *p++ = '/';
        p += flb_cl_ms(p, r->tr); *p++ = '/';
        p += flb_cl_ms(p, r->tt);
        p += sprintf(p, " %llu/%llu %s %u", (unsigned long long)r->bytes_in,
                     (unsigned long long)r->bytes_out, term, (unsigned)r->retries);
        return (size_t)(p - out);
    }
    """
    ctypedef struct flb_cl_rec:
        int64_t end_ns
        int64_t accept_ns
        int64_t tw
        int64_t tc
        int64_t tr
        int64_t tt
        uint64_t bytes_in
        uint64_t bytes_out
        unsigned char ip[16]
        unsigned short port
        unsigned char family
        unsigned char term
        unsigned short lport
        unsigned short retries
        int row
        int slot
    ctypedef struct flb_cl_tcache:
        int64_t sec
        size_t len
    size_t flb_cl_format(char *out, const flb_cl_rec *r, const char *svc, size_t svclen,
                         const char *be, size_t belen, const char *term, int json, int worker,
                         flb_cl_tcache *tend, flb_cl_tcache *tacc) noexcept nogil
    void flb_cl_store_rel(uint64_t *p, uint64_t v) noexcept nogil
    int64_t flb_cl_clock_ns(int c) noexcept nogil
    int FLB_CL_MONO
    int FLB_CL_REAL


# -- termination codes: HAProxy's two-letter session state (configuration.txt, 8.5) -------------
# First letter, who or what ended it: C client, S server (backend), c client-side timeout,
# s server-side timeout, P the proxy refused (ACL, limit), R a local resource, I internal
# error, K killed by the operator (maint, shutdown), - normal. Second letter, the phase:
# R before connecting (request), Q queue, C connect, D data, L last data (half-closed), - normal.
# The value of a code is its index in TERM_CODES; 0 is "not set yet" (derived at the close).
cdef enum:
    TERM_UNSET = 0
    TERM_NORMAL = 1      # "--" both directions closed by their peers
    TERM_CC = 2          # the client aborted while we were connecting
    TERM_CD = 3          # the client reset (or a send to it failed) during data
    TERM_SC = 4          # every backend tried refused or failed; or no backend to try
    TERM_sC = 5          # connect timeout on the last backend tried
    TERM_SD = 6          # the backend reset (or a send to it failed) during data
    TERM_cD = 7          # idle timeout: no byte either way for timeouts.idle
    TERM_sD = 8          # the backend sent nothing in its first-byte timeout
    TERM_cR = 9          # the client sent nothing in client_first_byte
    TERM_PR = 10         # refused before connecting: ACL, per-source limit, PROXY header error
    TERM_PQ = 11         # refused at the queue: the queue is full
    TERM_sQ = 12         # queue timeout
    TERM_RC = 13         # a local resource failed the connect (EMFILE, ENOBUFS, EADDRNOTAVAIL)
    TERM_RD = 14         # a local resource failed during data (no buffer memory)
    TERM_ID = 15         # internal error (epoll_ctl refused) during data
    TERM_IC = 16         # internal error before the backend was connected
    TERM_KC = 17         # killed by the operator (maint, shutdown) before connected
    TERM_KD = 18         # killed by the operator during data
    TERM_PD = 19         # max_duration reached
    TERM_cL = 20         # fin timeout: the client half-closed, the backend did not finish
    TERM_sL = 21         # fin timeout: the backend half-closed, the client did not finish
    TERM_NCODES = 22

# The names the other parts of the issue-11 work set at their close sites (one line each,
# ``s.term = TERM_...``): aliases of the codes above.
cdef enum:
    TERM_DENY_ACL = TERM_PR
    TERM_DENY_SRC = TERM_PR              # per-source conns, rate, table full
    TERM_PROXY_ERROR = TERM_PR           # PROXY header missing, malformed or late
    TERM_CLIENT_SILENT = TERM_cR         # client_first_byte
    TERM_QUEUE_FULL = TERM_PQ
    TERM_QUEUE_TIMEOUT = TERM_sQ
    TERM_LOCAL_ERROR = TERM_RC           # socket()/connect() failed for a local reason
    TERM_NO_BUFFER = TERM_RD             # buffer_budget / malloc failed
    TERM_FIRST_BYTE_TIMEOUT = TERM_sD
    TERM_MAX_DURATION = TERM_PD
    TERM_FIN_CLIENT = TERM_cL
    TERM_FIN_SERVER = TERM_sL

TERM_CODES = ("??", "--", "CC", "CD", "SC", "sC", "SD", "cD", "sD", "cR", "PR", "PQ", "sQ", "RC",
              "RD", "ID", "IC", "KC", "KD", "PD", "cL", "sL")
cdef const char *_TERM_TEXT[TERM_NCODES]
_TERM_TEXT[:] = [b"??", b"--", b"CC", b"CD", b"SC", b"sC", b"SD", b"cD", b"sD", b"cR", b"PR", b"PQ",
                 b"sQ", b"RC", b"RD", b"ID", b"IC", b"KC", b"KD", b"PD", b"cL", b"sL"]

# -- histograms ------------------------------------------------------------------------------
# Upper bounds in microseconds, log-scaled (1-2.5-5 steps, as Prometheus's defaults): from
# 25 us (a loopback connect) to an hour (a long session); the last bucket is +Inf.
cdef enum:
    HB_FINITE = 23
    HB_BUCKETS = 24          # + the +Inf bucket
    HB_SUM = 24              # the word holding the sum (us)
    HB_WORDS = 32            # per histogram: 4 cache lines
    H_CONNECT = 0
    H_DURATION = 1
    H_KINDS = 2
    CL_HDR = 192             # ring header: head, tail, drops+capacity on their own cache lines
    CL_REC = 128
    CL_DEFAULT_CAPACITY = 4096
    CL_MAX_CAPACITY = 1048576

cdef int64_t HB_EDGES[HB_FINITE]
HB_EDGES[:] = [25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000,
               500000, 1000000, 2500000, 5000000, 10000000, 30000000, 60000000, 300000000,
               900000000, 3600000000]
HISTOGRAM_EDGES_US = tuple(HB_EDGES[i] for i in range(HB_FINITE))


cdef inline int hb_bucket(int64_t us) noexcept nogil:
    cdef int i = 0
    while i < HB_FINITE and us > HB_EDGES[i]:
        i += 1
    return i


cdef inline int64_t _mono_ns() noexcept nogil:
    return flb_cl_clock_ns(FLB_CL_MONO)


@cython.final
cdef class ConnLog:
    """The connection-log rings (one per block) and the histograms (per block and row) over a
    buffer the caller owns (the shared mapping). This view writes block ``block``; the reader
    (the supervisor) drains any block and sums the histograms over all of them."""
    cdef Py_buffer _view
    cdef bint _acquired
    cdef char *base
    cdef int64_t *hist              # nblocks x nrows x H_KINDS x HB_WORDS
    cdef char *rings                # nblocks x ring_bytes
    cdef readonly int nrows
    cdef readonly int nblocks
    cdef readonly int block
    cdef readonly long capacity
    cdef Py_ssize_t ring_bytes
    cdef uint64_t rng               # xorshift64 state: the sampling (this process only)

    @staticmethod
    def size_for(int nrows, int nblocks=1, long capacity=CL_DEFAULT_CAPACITY):
        """Bytes of the region for ``nrows`` rows, ``nblocks`` blocks and rings of
        ``capacity`` records (a power of two)."""
        _cl_check(nrows, nblocks, capacity)
        return (<Py_ssize_t>nblocks * nrows * H_KINDS * HB_WORDS * 8
                + <Py_ssize_t>nblocks * (CL_HDR + capacity * CL_REC))

    def __cinit__(self, buffer, int nrows, int nblocks=1, int block=0,
                  long capacity=CL_DEFAULT_CAPACITY, uint64_t seed=0):
        _cl_check(nrows, nblocks, capacity)
        if block < 0 or block >= nblocks:
            raise CoreArgumentError(f"block {block} out of range 0..{nblocks - 1}")
        self.base = _writable_buffer(buffer, &self._view,
                                     ConnLog.size_for(nrows, nblocks, capacity), "ConnLog")
        self._acquired = True
        self.nrows = nrows
        self.nblocks = nblocks
        self.block = block
        self.capacity = capacity
        self.hist = <int64_t *>self.base
        self.rings = self.base + <Py_ssize_t>nblocks * nrows * H_KINDS * HB_WORDS * 8
        self.ring_bytes = CL_HDR + capacity * CL_REC
        self.rng = seed | 1

    def __dealloc__(self):
        if self._acquired:
            PyBuffer_Release(&self._view)

    cdef inline uint64_t *_hdr(self, int block) noexcept nogil:
        return <uint64_t *>(self.rings + block * self.ring_bytes)

    cdef inline flb_cl_rec *_rec(self, int block, uint64_t n) noexcept nogil:
        return <flb_cl_rec *>(self.rings + block * self.ring_bytes + CL_HDR
                              + <Py_ssize_t>(n & <uint64_t>(self.capacity - 1)) * CL_REC)

    cdef inline int64_t *_hist(self, int block, int row, int kind) noexcept nogil:
        return self.hist + ((<Py_ssize_t>block * self.nrows + row) * H_KINDS + kind) * HB_WORDS

    # -- the data path (C, no Python) --------------------------------------------------------
    cdef inline void observe(self, int row, int kind, int64_t us) noexcept nogil:
        """One value (us) into this block's histogram ``kind`` of ``row`` (row < 0: none)."""
        if row < 0 or row >= self.nrows:
            return
        if us < 0:
            us = 0
        cdef int64_t *h = self._hist(self.block, row, kind)
        flb_add_relaxed_i64(h + hb_bucket(us), 1)
        flb_add_relaxed_i64(h + HB_SUM, us)

    cdef inline bint sampled(self, uint64_t threshold) noexcept nogil:
        """True with probability threshold / 2**32 (0: never, 2**32: always)."""
        cdef uint64_t x
        if threshold == 0:
            return False
        if threshold >= (<uint64_t>1 << 32):
            return True
        x = self.rng                    # xorshift64 (Marsaglia): three shifts, no division
        x ^= x << 13
        x ^= x >> 7
        x ^= x << 17
        self.rng = x
        return (x >> 32) < threshold

    cdef inline flb_cl_rec *reserve(self) noexcept nogil:
        """The next free record of this block's ring, or NULL when full (the drop counted).
        Fill it, then commit()."""
        cdef uint64_t *hdr = self._hdr(self.block)
        cdef uint64_t head = hdr[0]                 # ours: no other writer
        if head - flb_load_acq(hdr + 8) >= <uint64_t>self.capacity:
            flb_add_relaxed_i64(<int64_t *>(hdr + 16), 1)
            return NULL
        return self._rec(self.block, head)

    cdef inline void commit(self) noexcept nogil:
        cdef uint64_t *hdr = self._hdr(self.block)
        flb_cl_store_rel(hdr, hdr[0] + 1)

    # -- Python side (the supervisor's drain, stats, tests) -------------------------------------
    def _block(self, int block):
        if block < 0 or block >= self.nblocks:
            raise CoreArgumentError(f"block {block} out of range 0..{self.nblocks - 1}")

    def pending(self, int block):
        """Records written and not yet drained in ``block``'s ring."""
        self._block(block)
        cdef uint64_t *hdr = self._hdr(block)
        return <long long>(flb_load_acq(hdr) - flb_load_acq(hdr + 8))

    def dropped(self, int block):
        """Records ``block``'s writer dropped because its ring was full (since the start)."""
        self._block(block)
        return flb_load_relaxed_i64(<int64_t *>(self._hdr(block) + 16))

    def drain(self, int block, long limit=1 << 30):
        """Take up to ``limit`` records of ``block``'s ring, oldest first, as tuples
        (end_ns, accept_ns, tw, tc, tr, tt, bytes_in, bytes_out, client, lport, retries, row,
        slot, term); client is (ip, port) or None. Only one reader per ring (the supervisor)."""
        self._block(block)
        cdef uint64_t *hdr = self._hdr(block)
        cdef uint64_t tail = hdr[8]                 # ours: no other reader
        cdef uint64_t head = flb_load_acq(hdr)
        cdef flb_cl_rec r
        cdef flb_addr a
        out = []
        while tail != head and limit > 0:
            r = self._rec(block, tail)[0]           # copied out before the slot is given back
            memcpy(a.ip, r.ip, 16)
            a.port = r.port
            a.family = r.family
            out.append((r.end_ns, r.accept_ns, r.tw, r.tc, r.tr, r.tt, r.bytes_in, r.bytes_out,
                        addr_to_py(&a), r.lport, r.retries, r.row, r.slot, r.term))
            tail += 1
            limit -= 1
        flb_cl_store_rel(hdr + 8, tail)
        return out

    def format(self, int block, dict rows, dict slots, long limit=1 << 30):
        """Drain up to ``limit`` records of ``block``'s ring straight into lines: ``(data,
        n)``, ``data`` the n lines, each ending in a newline. ``rows``: row -> (service name
        as text, as a JSON string, True for JSON lines); ``slots``: slot -> (address as
        text, as a JSON string). A row or slot missing from them is shown as ``row<N>`` /
        ``slot<N>``. The reader's fast path (fastlb/connlog.py); ``drain`` gives tuples."""
        self._block(block)
        cdef uint64_t *hdr = self._hdr(block)
        cdef uint64_t tail = hdr[8]
        cdef uint64_t head = flb_load_acq(hdr)
        cdef uint64_t n = head - tail
        if <long>n > limit:
            n = <uint64_t>limit
        if n == 0:
            return b"", 0
        cdef flb_cl_rec r
        cdef flb_cl_tcache tend, tacc
        memset(&tend, 0, sizeof(tend))
        memset(&tacc, 0, sizeof(tacc))
        cdef Py_ssize_t cap = <Py_ssize_t>n * 400 + 4096, used = 0
        cdef bytearray out = bytearray(cap)
        cdef char *buf = out
        cdef bytes svc = None, be = None
        cdef const char *bep
        cdef Py_ssize_t belen
        cdef bint js = False
        cdef uint64_t i
        cdef int last_row = -2, last_slot = -2   # consecutive records mostly share both
        for i in range(n):
            r = self._rec(block, tail + i)[0]
            if r.row != last_row:
                names = rows.get(r.row)
                if names is None:
                    names = (f"row{r.row}".encode(), f'"row{r.row}"'.encode(), False)
                js = names[2]
                svc = names[1] if js else names[0]
                last_row = r.row
                last_slot = -2
            if r.slot != last_slot:
                if r.slot < 0:
                    be = b"null" if js else None
                else:
                    addr = slots.get(r.slot)
                    if addr is None:
                        addr = (f"slot{r.slot}".encode(), f'"slot{r.slot}"'.encode())
                    be = addr[1] if js else addr[0]
                last_slot = r.slot
            bep = NULL if be is None else PyBytes_AS_STRING(be)
            belen = 0 if be is None else len(be)
            if used + 1024 + len(svc) + belen > cap:
                cap = cap * 2 + len(svc) + belen + 1024
                out[used:] = bytes(cap - used)
                buf = out
            used += <Py_ssize_t>flb_cl_format(buf + used, &r, PyBytes_AS_STRING(svc), len(svc),
                                             bep, belen, _TERM_TEXT[r.term if r.term < TERM_NCODES
                                                                    else 0], js,
                                             block, &tend, &tacc)
            buf[used] = 10
            used += 1
        flb_cl_store_rel(hdr + 8, tail + n)
        return bytes(out[:used]), <long>n

    def histogram(self, int row, int kind):
        """``(counts, sum_us)`` of ``row``'s histogram ``kind`` (H_CONNECT, H_DURATION) summed
        over every block: HB_BUCKETS counts, not cumulative, the last one +Inf."""
        if row < 0 or row >= self.nrows:
            raise CoreArgumentError(f"row {row} out of range 0..{self.nrows - 1}")
        if kind < 0 or kind >= H_KINDS:
            raise CoreArgumentError(f"kind {kind}: expected H_CONNECT (0) or H_DURATION (1)")
        counts = [0] * HB_BUCKETS
        cdef int64_t total = 0
        cdef int b, i
        cdef int64_t *h
        for b in range(self.nblocks):
            h = self._hist(b, row, kind)
            for i in range(HB_BUCKETS):
                counts[i] += flb_load_relaxed_i64(h + i)
            total += flb_load_relaxed_i64(h + HB_SUM)
        return counts, total

    def zero(self, int row):
        """Clear ``row``'s histograms in every block (a slot handed to a new service)."""
        if row < 0 or row >= self.nrows:
            raise CoreArgumentError(f"row {row} out of range 0..{self.nrows - 1}")
        cdef int b, i
        cdef int64_t *h
        for b in range(self.nblocks):
            h = self._hist(b, row, 0)
            for i in range(H_KINDS * HB_WORDS):
                flb_store_relaxed_i64(h + i, 0)

    def py_observe(self, int row, int kind, int64_t us):
        """Test hook: observe() from Python."""
        if kind < 0 or kind >= H_KINDS:
            raise CoreArgumentError(f"kind {kind}: expected 0 or 1")
        self.observe(row, kind, us)

    def py_sampled(self, uint64_t threshold):
        """Test hook: sampled() from Python."""
        return self.sampled(threshold)

    def py_push(self, tuple rec):
        """Test hook: write one record as the data path does (the drain's tuple, without the
        client's port family check). False when the ring was full (the drop counted)."""
        cdef flb_cl_rec *r = self.reserve()
        cdef flb_addr a
        if r == NULL:
            return False
        (r.end_ns, r.accept_ns, r.tw, r.tc, r.tr, r.tt, r.bytes_in, r.bytes_out, client,
         r.lport, r.retries, r.row, r.slot, r.term) = rec
        addr_from_py(client, &a, "client")
        memcpy(r.ip, a.ip, 16)
        r.port = a.port
        r.family = a.family
        self.commit()
        return True


cdef int _cl_check(int nrows, int nblocks, long capacity) except -1:
    if nrows < 1 or nrows > MAX_SLOTS + 1:
        raise CoreArgumentError(f"nrows = {nrows}: must be from 1 to {MAX_SLOTS + 1}")
    if nblocks < 1 or nblocks > 1024:
        raise CoreArgumentError(f"nblocks = {nblocks}: must be from 1 to 1024")
    if capacity < 2 or capacity > CL_MAX_CAPACITY or capacity & (capacity - 1):
        raise CoreArgumentError(f"connection log ring capacity {capacity}: must be a power of "
                                f"two from 2 to {CL_MAX_CAPACITY}")
    return 0


globals().update(
    H_CONNECT=int(H_CONNECT), H_DURATION=int(H_DURATION), HB_BUCKETS=int(HB_BUCKETS),
    CL_DEFAULT_CAPACITY=int(CL_DEFAULT_CAPACITY), CL_MAX_CAPACITY=int(CL_MAX_CAPACITY),
    TERM_NCODES=int(TERM_NCODES),
)
# TERM_UNSET, TERM_NORMAL and one TERM_<code> per code (TERM_SC, TERM_sC, ...), as in C
globals().update({("TERM_UNSET" if i == 0 else "TERM_NORMAL" if i == 1 else f"TERM_{c}"): i
                  for i, c in enumerate(TERM_CODES)})


# -- the session hooks: one call at each place of session.pxi/engine.pxi (plain C) ---------------
cdef inline void cl_accept(Session s, unsigned short lport, sockaddr_storage *ss) noexcept:
    """Engine._accept: the accept time, the client (the PROXY source replaces it once
    accepted), the listener's port."""
    s.t_acc = _mono_ns()
    s.lport = lport
    addr_from_sockaddr(<const sockaddr *>ss, &s.client)


cdef inline void cl_attempt(Session s) noexcept:
    """Session._connect: the first connect attempt starts Tc (Tw ends)."""
    if s.t_conn == 0:
        s.t_conn = _mono_ns()


cdef inline void cl_failed(Session s, int err) noexcept:
    """A connect attempt failed: err 0 is a timeout; a local resource (EMFILE...) is RC."""
    if err == 0:
        s.term = TERM_sC
    elif err == EMFILE or err == ENFILE or err == ENOBUFS or err == ENOMEM or err == EADDRNOTAVAIL:
        s.term = TERM_RC
    else:
        s.term = TERM_SC


cdef inline void cl_established(Session s) noexcept:
    """The backend accepted: Tc ends, into the service's connect-time histogram."""
    s.t_est = _mono_ns()
    s.term = TERM_UNSET                      # a failed attempt before this one is no longer the end
    if s.eng.connlog is not None:
        s.eng.connlog.observe(s.svc.row, H_CONNECT, (s.t_est - s.t_conn) // 1000)


cdef void cl_close(Session s) noexcept:
    """Session._close, before anything is torn down: the termination code (derived from the
    state when no close site set one), the duration histogram, and the record when the
    service's log is on and the sample says so. A full ring drops the record (counted)."""
    cdef int64_t now = _mono_ns()
    cdef ConnLog cl = s.eng.connlog
    cdef flb_cl_rec *r
    cdef int64_t tt
    if s.term == TERM_UNSET:
        if s.state == S_OPEN:
            s.term = TERM_NORMAL if (s.c2b_shut and s.b2c_shut) else TERM_ID
        else:
            s.term = TERM_IC
    if cl is None or s.t_acc == 0:
        return
    tt = (now - s.t_acc) // 1000
    cl.observe(s.svc.row, H_DURATION, tt)
    if not cl.sampled(s.svc.log_sample):
        return
    r = cl.reserve()
    if r == NULL:
        return
    r.end_ns = flb_cl_clock_ns(FLB_CL_REAL)
    r.accept_ns = r.end_ns - (now - s.t_acc)
    r.tt = tt
    r.tw = (s.t_conn - s.t_acc) // 1000 if s.t_conn else -1
    r.tc = (s.t_est - s.t_conn) // 1000 if s.t_est else -1
    r.tr = (s.t_first - s.t_est) // 1000 if s.t_first and s.t_est else -1
    r.bytes_in = s.nbin
    r.bytes_out = s.nbout
    memcpy(r.ip, s.client.ip, 16)
    r.port = s.client.port
    r.family = s.client.family
    r.term = s.term
    r.lport = s.lport
    r.retries = s.ntried
    r.row = s.svc.row
    r.slot = s.slot                          # the last backend tried; -1: none (<NOSRV>)
    cl.commit()


cdef inline void cl_kill(Session s) noexcept:
    """The operator closes it (maint, drain timeout, shutdown): K and the phase."""
    s.term = TERM_KD if s.state == S_OPEN else TERM_KC


cdef void cl_refused(Engine eng, ServiceState svc, unsigned short lport, const flb_addr *client,
                     int64_t t_acc, unsigned char term) noexcept:
    """A connection refused before any Session exists (an ACL or per-source limit checked at
    the accept, a full queue): its log record, when the service's log is on and sampled.
    ``t_acc``: its accept time (CLOCK_MONOTONIC ns; 0: now). No histogram: no session. For the
    overload and access work (issue 11): one call where such a connection is closed."""
    cdef ConnLog cl = eng.connlog
    cdef flb_cl_rec *r
    cdef int64_t now
    if cl is None or not cl.sampled(svc.log_sample):
        return
    r = cl.reserve()
    if r == NULL:
        return
    now = _mono_ns()
    if t_acc == 0:
        t_acc = now
    r.end_ns = flb_cl_clock_ns(FLB_CL_REAL)
    r.accept_ns = r.end_ns - (now - t_acc)
    r.tw = -1
    r.tc = -1
    r.tr = -1
    r.tt = (now - t_acc) // 1000
    r.bytes_in = 0
    r.bytes_out = 0
    memcpy(r.ip, client.ip, 16)
    r.port = client.port
    r.family = client.family
    r.term = term
    r.lport = lport
    r.retries = 0
    r.row = svc.row
    r.slot = -1
    cl.commit()


def _cl_refused(Engine eng, ServiceState svc, int lport, client, int term):
    """Test hook: cl_refused from Python (``client``: (ip, port) or None)."""
    cdef flb_addr a
    addr_from_py(client, &a, "client")
    cl_refused(eng, svc, <unsigned short>lport, &a, 0, <unsigned char>term)
