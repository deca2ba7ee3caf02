# SNI routing without termination (issue 12, part `sni`): several services share one listening
# socket; the engine reads the client's ClientHello (without consuming anything it does not
# forward), picks the service by its server_name, and from then on the session is that
# service's: its limits, ACL and per-source limits, policy, counters and connection log. The
# bytes read are forwarded untouched to the backend first; the backend does the TLS.
# nginx's ssl_preread and HAProxy's `req.ssl_sni` + use_backend do the same.
#
# Owner of: SniTable (one per shared address: names -> ServiceState, built by the data plane
# from the plans, swapped on the Listener in one assignment; a session waiting for its hello
# keeps the table it started with) and the "before routing" phase of a Session (state S_SNI).
# Hooks, one line each:
#   Engine._accept       sni_start(s, lst.sni)   a listener with a table: wait for the hello
#   Session.on_client    sni_on_client(s, ev)    while S_SNI: read, parse, route
#   Engine.sweep         sni_expired(s)          past timeouts.handshake
#   Session._close       sni_close(s)            the scratch freed, out of the swept set
# Rules:
#   - Bounds: at most SNI_MAX bytes are read before a decision (records included), as nginx's
#     preread_buffer_size (16k) and HAProxy's tune.bufsize (16k) bound theirs; the hello may
#     span several TLS records (nginx reassembles them too; HAProxy reads only the first). A
#     hello that does not fit is closed and counted (sni_oversize), whatever the default.
#   - Time: the group's timeouts.handshake (the largest of its services', default 10 s), one
#     deadline from the accept, swept with the connecting sessions; past it: closed, counted
#     (sni_timeouts, termination cR as HAProxy's "client timeout while waiting for request").
#   - Matching: exact names, then `*.` wildcards covering exactly one label, case-insensitive
#     (names are lowercased at parse and in the table); exact beats wildcard, as nginx's
#     server_name and HAProxy's crt-list order them.
#   - No SNI in a complete hello, a name that matches nothing, or bytes that are not a TLS
#     handshake record: the default service (the one without `sni`) if there is one, as
#     HAProxy's default_backend with an empty req.ssl_sni and nginx's map default; else closed
#     and counted (sni_no_route / sni_bad), termination PR.
#   - The bytes read wait in a malloc'ed scratch of SNI_MAX (no data buffer is held while a
#     client dawdles); at routing they move into the session's c2b buffer and the session goes
#     on as a freshly accepted one of that service (S_CONNECTING, what the client sends
#     meanwhile appended), so _established sends them first.
#   - PROXY protocol accept and TLS termination cannot share an address with SNI routing (the
#     config refuses them: a PROXY header would precede the hello; terminating needs the hello
#     in OpenSSL): the routed session only runs the ACL and per-source limits.
# The per-event functions sni_on_client and sni_parse make no Python C-API call
# (tests/unit/test_sni_core.py); routing and refusing are once per connection.

cdef enum:
    S_SNI = 9                # [sni] reading the ClientHello (before the service is known)
    SNI_MAX = 16384          # bytes read before a decision: nginx preread_buffer_size, HAProxy bufsize
    SNI_NAME_MAX = 255       # RFC 6066 3: a HostName is at most 2^8-1 bytes... of a DNS name
    SNI_MORE = 0             # sni_parse: incomplete, read more
    SNI_FOUND = 1            # a host_name (lowercased into name)
    SNI_NONE = 2             # a complete ClientHello without server_name
    SNI_BAD = 3              # not a TLS handshake record carrying a ClientHello, or malformed
    SNI_TOOBIG = 4           # the ClientHello does not fit in SNI_MAX bytes

# Termination codes of the connection log (core/connlog.pxi), as HAProxy names them.
cdef enum:
    TERM_SNI_TIMEOUT = TERM_cR           # the hello did not come within timeouts.handshake
    TERM_SNI_REFUSED = TERM_PR           # no route, not TLS, oversized, the service at maxconn

SNI_STATUS = ("more", "found", "none", "bad", "toobig")


cdef inline int _sni_hdr_ok(const unsigned char *p, Py_ssize_t avail) noexcept nogil:
    """The first ``avail`` (<= 3) bytes of a record header can start a TLS handshake record:
    type 22, major version 3 (SSL 3.0 to TLS 1.3 all say 3)."""
    if avail >= 1 and p[0] != 22:
        return 0
    if avail >= 2 and p[1] != 3:
        return 0
    return 1


cdef int sni_parse(const unsigned char *p, Py_ssize_t n, char *name, int *nlen) noexcept nogil:
    """Parse the first ``n`` bytes a client sent as TLS records holding a ClientHello
    (RFC 8446 4.1.2 / 5.1, RFC 5246 7.4.1.2, RFC 6066 3). Returns SNI_* ; with SNI_FOUND the
    host_name, lowercased, is in ``name`` (SNI_NAME_MAX + 1 bytes) and its length in nlen.
    Every length is checked against what is there before use (h11's and HAProxy's rule).
    Cost: a walk over the record headers per call; the hello is reassembled and parsed once,
    when complete."""
    cdef Py_ssize_t off = 0, rlen, take, hs_have = 0, hlen, i, pos, end, e_end, l_end
    cdef unsigned char hdr[4]
    cdef unsigned char hs[SNI_MAX]
    cdef unsigned int etype, elen, llen, ntype, nl
    cdef unsigned char ch
    # Pass 1: the record headers; the handshake header's 4 bytes as they come.
    while off < n:
        if n - off < 5:
            if not _sni_hdr_ok(p + off, n - off):
                return SNI_BAD
            break
        if not _sni_hdr_ok(p + off, 2):
            return SNI_BAD
        rlen = (<Py_ssize_t>p[off + 3] << 8) | p[off + 4]
        if rlen == 0 or rlen > 16384:           # RFC 8446 5.1: no empty handshake fragment; 2^14
            return SNI_BAD
        take = min(rlen, n - off - 5)
        i = 0
        while i < take and hs_have + i < 4:
            hdr[hs_have + i] = p[off + 5 + i]
            i += 1
        hs_have += take
        if take < rlen:
            break
        off += 5 + rlen
        if hs_have >= 4 and hs_have >= 4 + ((<Py_ssize_t>hdr[1] << 16) | (hdr[2] << 8) | hdr[3]):
            break
    if hs_have >= 1 and hdr[0] != 1:            # handshake type 1: client_hello
        return SNI_BAD
    if hs_have < 4:
        return SNI_TOOBIG if n >= SNI_MAX else SNI_MORE
    hlen = (<Py_ssize_t>hdr[1] << 16) | (hdr[2] << 8) | hdr[3]
    if 4 + hlen + 5 > SNI_MAX:                  # cannot fit with even one record header
        return SNI_TOOBIG
    if hs_have < 4 + hlen:
        return SNI_TOOBIG if n >= SNI_MAX else SNI_MORE
    # Pass 2: reassemble the handshake message (it may span records).
    off = 0
    i = 0
    while i < 4 + hlen:
        rlen = (<Py_ssize_t>p[off + 3] << 8) | p[off + 4]
        take = min(rlen, 4 + hlen - i)
        memcpy(hs + i, p + off + 5, take)
        i += take
        off += 5 + rlen
    # Pass 3: the ClientHello body: version(2) random(32) session_id<0..32>
    # cipher_suites<2..2^16-2> compression_methods<1..2^8-1> [extensions<0..2^16-1>]
    end = 4 + hlen
    pos = 4 + 34
    if pos + 1 > end:
        return SNI_BAD
    if hs[pos] > 32:
        return SNI_BAD
    pos += 1 + hs[pos]
    if pos + 2 > end:
        return SNI_BAD
    pos += 2 + ((<Py_ssize_t>hs[pos] << 8) | hs[pos + 1])
    if pos + 1 > end:
        return SNI_BAD
    pos += 1 + hs[pos]
    if pos > end:
        return SNI_BAD
    if pos == end:
        return SNI_NONE                         # no extensions at all (TLS 1.0 style)
    if pos + 2 > end:
        return SNI_BAD
    e_end = pos + 2 + ((<Py_ssize_t>hs[pos] << 8) | hs[pos + 1])
    if e_end > end:
        return SNI_BAD
    pos += 2
    while pos + 4 <= e_end:
        etype = (<unsigned int>hs[pos] << 8) | hs[pos + 1]
        elen = (<unsigned int>hs[pos + 2] << 8) | hs[pos + 3]
        pos += 4
        if pos + elen > e_end:
            return SNI_BAD
        if etype == 0:                          # server_name: ServerNameList<1..2^16-1>
            if elen < 2:
                return SNI_BAD
            llen = (<unsigned int>hs[pos] << 8) | hs[pos + 1]
            l_end = pos + 2 + llen
            if l_end > pos + elen:
                return SNI_BAD
            pos += 2
            while pos + 3 <= l_end:
                ntype = hs[pos]
                nl = (<unsigned int>hs[pos + 1] << 8) | hs[pos + 2]
                pos += 3
                if pos + nl > l_end:
                    return SNI_BAD
                if ntype == 0:                  # host_name: the first one counts
                    if nl == 0 or nl > SNI_NAME_MAX:
                        return SNI_BAD
                    for i in range(nl):
                        ch = hs[pos + i]
                        if ch == 0:
                            return SNI_BAD
                        name[i] = <char>(ch + 32 if 65 <= ch <= 90 else ch)
                    name[nl] = 0
                    nlen[0] = <int>nl
                    return SNI_FOUND
                pos += nl
            return SNI_NONE
        pos += elen
    return SNI_NONE


def sni_parse_bytes(data):
    """sni_parse on ``data`` (bytes, at most SNI_MAX are looked at): (status, name or None),
    status one of "more", "found", "none", "bad", "toobig". For tests and tools."""
    cdef bytes b = bytes(data[:SNI_MAX])
    cdef char name[SNI_NAME_MAX + 1]
    cdef int nlen = 0
    cdef int st = sni_parse(<const unsigned char *>PyBytes_AS_STRING(b), len(b), name, &nlen)
    return SNI_STATUS[st], (name[:nlen].decode("latin-1") if st == SNI_FOUND else None)


# -- the routing table -----------------------------------------------------------------------------
cdef struct sni_entry:
    uint64_t h
    int len                                # 0: an empty cell
    int idx                                # index into SniTable.svcs
    char name[SNI_NAME_MAX + 1]


cdef sni_entry *_sni_build(list names, uint32_t *mask) except? NULL:
    """An open-addressed table (linear probing, load <= 1/2) of (name bytes, idx)."""
    cdef uint32_t cap = 4, j
    cdef sni_entry *t
    cdef bytes b
    while cap < 2 * len(names):
        cap <<= 1
    t = <sni_entry *>calloc(cap, sizeof(sni_entry))
    if t == NULL:
        raise MemoryError()
    for b, idx in names:
        h = flb_xxh64(<const char *>b, len(b), 0)
        j = <uint32_t>h & (cap - 1)
        while t[j].len:
            j = (j + 1) & (cap - 1)
        t[j].h = h
        t[j].len = len(b)
        t[j].idx = idx
        memcpy(t[j].name, <const char *>b, len(b))
    mask[0] = cap - 1
    return t


cdef inline int _sni_find(sni_entry *t, uint32_t mask, const char *name, int n) noexcept nogil:
    cdef uint64_t h = flb_xxh64(name, n, 0)
    cdef uint32_t j = <uint32_t>h & mask
    while t[j].len:
        if t[j].h == h and t[j].len == n and memcmp(t[j].name, name, n) == 0:
            return t[j].idx
        j = (j + 1) & mask
    return -1


@cython.final
cdef class SniTable:
    """The services of one shared listen address, by SNI; immutable once built. Made by the
    data plane (fastlb.dataplane) when a plan of the group changes, never per connection.
    ``routes``: [(names, ServiceState)], names lowercased, "*.x.y" a one-label wildcard;
    ``default``: the service without `sni` (None: refuse what matches nothing); ``timeout``:
    seconds for the whole ClientHello."""
    cdef sni_entry *exact
    cdef uint32_t emask
    cdef sni_entry *wild
    cdef uint32_t wmask
    cdef readonly tuple svcs
    cdef readonly ServiceState default
    cdef readonly double timeout

    def __init__(self, routes, ServiceState default=None, double timeout=10.0):
        if timeout <= 0:
            raise CoreArgumentError(f"timeout must be > 0 seconds, got {timeout}")
        svcs, exact, wild, seen = [], [], [], set()
        for names, svc in routes:
            if not isinstance(svc, ServiceState):
                raise CoreTypeError(f"routes: expected ServiceState, got {type(svc).__name__}")
            idx = len(svcs)
            svcs.append(svc)
            for name in names:
                key = name.lower()
                wc = key.startswith("*.")
                b = (key[2:] if wc else key).encode("ascii")
                if not b or len(b) > SNI_NAME_MAX or (wc, b) in seen:
                    raise CoreArgumentError(f"routes: bad or duplicate name {name!r}")
                seen.add((wc, b))
                (wild if wc else exact).append((b, idx))
        self.svcs = tuple(svcs)
        self.default = default
        self.timeout = timeout
        self.exact = _sni_build(exact, &self.emask)
        self.wild = _sni_build(wild, &self.wmask)

    def __dealloc__(self):
        free(self.exact)
        free(self.wild)

    cdef int lookup(self, const char *name, int n) noexcept nogil:
        """The index of the service for ``name`` (lowercase), or -1: exact first, then the
        wildcard of its parent (one label: "a.b.c" tries "*.b.c" only)."""
        cdef int r = _sni_find(self.exact, self.emask, name, n)
        cdef int i
        if r >= 0:
            return r
        for i in range(n):
            if name[i] == 46:                   # '.'
                if i + 1 < n:
                    return _sni_find(self.wild, self.wmask, name + i + 1, n - i - 1)
                return -1
        return -1

    def match(self, str name):
        """The ServiceState ``name`` routes to (None: the default's business). For tests."""
        b = name.lower().encode("ascii")
        cdef int r = self.lookup(b, len(b))
        return self.svcs[r] if r >= 0 else None


# -- the session's phase before routing (S_SNI) --------------------------------------------------
cdef void sni_start(Session s, SniTable t) noexcept:
    """At accept, for a listener with a table (s is in Engine.sessions, holds the global place
    only): wait for the ClientHello, swept against the table's timeout."""
    s.sni = t
    s.sni_buf = <unsigned char *>malloc(SNI_MAX)
    if s.sni_buf == NULL:
        s.term = TERM_RC                        # [obs] a local resource (memory)
        s._close()
        return
    s.sni_have = 0
    s.state = S_SNI
    s.deadline = s.eng.now + t.timeout
    s.eng.connecting.add(s)
    sni_on_client(s, EPOLLIN)                   # the hello may be there already


cdef void sni_on_client(Session s, uint32_t events) noexcept:
    """A client event while S_SNI (per event: no Python C-API call here)."""
    cdef ssize_t r
    cdef int st, nlen = 0, idx
    cdef char name[SNI_NAME_MAX + 1]
    while True:
        r = recv(s.cfd, s.sni_buf + s.sni_have, SNI_MAX - s.sni_have, 0)
        if r > 0:
            s.sni_have += <int>r
            break
        if r == 0:
            s.term = TERM_CC                    # [obs] the client left before its hello
            s._close()
            return
        if errno == EINTR:
            continue
        if errno == EAGAIN:
            if s._watch(s.cfd, &s.cev, EPOLLIN, TAG_CLIENT) < 0:
                s.eng._epoll_failed(s, errno)
            return
        s.term = TERM_CC
        s._close()
        return
    s.last = s.eng.now
    st = sni_parse(s.sni_buf, s.sni_have, name, &nlen)
    if st == SNI_MORE:
        if s._watch(s.cfd, &s.cev, EPOLLIN, TAG_CLIENT) < 0:
            s.eng._epoll_failed(s, errno)
        return
    if st == SNI_TOOBIG:
        s.eng.sni_oversize += 1
        sni_refuse(s)
        return
    idx = s.sni.lookup(name, nlen) if st == SNI_FOUND else -1
    if idx >= 0:
        s.eng.sni_routed += 1
        sni_route(s, idx)
    elif s.sni.default is not None:
        s.eng.sni_defaulted += 1
        sni_route(s, -1)
    else:
        if st == SNI_BAD:
            s.eng.sni_bad += 1
        else:
            s.eng.sni_no_route += 1
        sni_refuse(s)


cdef void sni_refuse(Session s) noexcept:
    s.term = TERM_SNI_REFUSED                   # [obs]
    s._close()


cdef void sni_expired(Session s) noexcept:
    """The sweep found a session past its deadline without a whole ClientHello."""
    s.eng.sni_timeouts += 1
    s.term = TERM_SNI_TIMEOUT                   # [obs]
    s._close()


cdef void sni_route(Session s, int idx) noexcept:
    """The hello names service ``idx`` of the table (-1: the default). The session becomes that
    service's: its place under its maxconn (refused and counted at the limit: the listener is
    shared, it is not paused), its key, its ACL and per-source limits; then it connects with
    the bytes read waiting in c2b. Once per connection."""
    cdef Engine eng = s.eng
    cdef ServiceState svc = <ServiceState>(s.sni.svcs[idx] if idx >= 0 else s.sni.default)
    cdef int got
    if not eng.gauges.take_field(svc.row, G_CUR, svc.maxconn):
        eng.gauges.add(svc.row, G_MAXCONN_REACHED, 1)
        sni_refuse(s)
        return
    eng.gauges.give(s.srow)                     # the router's row (none: -1)
    s.srow = svc.row
    lim_count(eng, s.srow, G_TOTAL)
    lim_note_max(eng, s.srow)
    s.svc = svc
    _keepalive(s.cfd, svc)                      # [mem] the service's tcp_keepalive, as at accept
    if svc.hash_mode != HASH_NONE:
        s.key = _hash_addr(&s.client, svc.hash_mode)
    got = _buf_get(s, &s.c2b)
    if got <= 0:                                # no buffer now: refuse rather than hold the hello
        s.term = TERM_NO_BUFFER                 # [obs]
        s._close()
        return
    memcpy(s.c2b.data, s.sni_buf, s.sni_have)
    s.c2b.start = 0
    s.c2b.end = s.sni_have
    free(s.sni_buf)
    s.sni_buf = NULL
    s.sni = None
    eng.connecting.discard(s)
    s.state = S_CONNECTING
    if svc.adm is not None and _adm_check(s, svc.adm) < 0:     # [access] ACL, source limits
        return
    if svc.tls is not None:                     # the config refuses it (see the header)
        s.term = TERM_IC
        s._close()
        return
    s._update()                                 # read what the client sends while we connect
    if s.state != S_CLOSED:
        s._connect()


cdef inline void sni_close(Session s) noexcept:
    """At close: the scratch freed, out of the swept set if still waiting for the hello."""
    if s.state == S_SNI:
        s.eng.connecting.discard(s)
    if s.sni_buf != NULL:
        free(s.sni_buf)
        s.sni_buf = NULL
    s.sni = None
