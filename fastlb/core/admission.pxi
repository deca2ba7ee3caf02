# Admission of a connection (part "access" of issue 11): ACL, per-source limits, the PROXY
# header (accept and send) and timeouts.client_first_byte, wired into the engine's data path.
#
# Owner of: Admission (one per service: what the data plane built from the plan, once per plan
# change: Acl objects, the shared SourceTable, the PROXY settings), and the "before connect"
# phase of a Session (state S_WAITING). The engine calls in at four places, each a one-line hook:
#   Engine._accept   adm_accept(s, &ss)      after accept4: ACL and per-source limits on the
#                                            real peer, or enter S_WAITING (PROXY header from a
#                                            trusted peer, or client_first_byte);
#   Session.on_client  adm_on_client(s, ev)  while S_WAITING: read the header / see a byte;
#   Engine.sweep       adm_expired(s)        a waiting session past its deadline;
#   Session._established  adm_send_header(s) the PROXY header to the backend, first;
#   Session._close     adm_close(s)          the source entry released, exactly once.
# Rules:
#   - A refusal closes the client at once (no backend connect) and counts the reason in the
#     service's Gauges row: G_DENY_ACL, G_DENY_SRC_CONNS / _RATE / _TABLE, G_PROXY_ERRORS (a
#     missing, malformed or slow header from a trusted peer), G_CLIENT_SILENT (no first byte
#     within client_first_byte). HAProxy's "tcp-request connection reject" does the same (close,
#     no response); nginx's stream access module too.
#   - The client of a session (ACL, source limits, Maglev's key, PROXY send) is the real peer,
#     or the source of an accepted PROXY header (command PROXY, TCP4/TCP6); LOCAL, UNKNOWN and
#     UNSPEC keep the real peer (the spec's rule for LOCAL; HAProxy does the same for UNKNOWN).
#   - PROXY accept peeks (MSG_PEEK) at most PP_MAX bytes and parses them; once the header is
#     complete exactly its bytes are read out of the socket, so the payload after it stays in
#     the kernel and is forwarded as any client byte (no data buffer is taken for the header).
#     epoll is level-triggered: while the header is incomplete, the bytes seen (all of them a
#     header prefix, or pp_parse would have refused them) are read out into a PP_MAX scratch
#     (Session.pp_buf, malloc'ed only then, freed at close) so the socket stops being readable
#     until more arrives; the spec has senders send the header at once, so this is rare.
#   - client_first_byte peeks one byte (MSG_PEEK): no buffer is held while a client is silent,
#     and nothing is consumed. A client that closes without a byte is closed (no backend).
#   - One deadline for the whole phase (Session.deadline, swept with the connecting sessions):
#     the PROXY timeout while the header is expected, then client_first_byte from the end of
#     the header if the header brought no payload.
#   - PROXY send: the header goes to the backend in one send() right after the connect
#     succeeds, before any client byte, on every attempt (a retry connects again, and sends it
#     again). A fresh socket's send buffer (>= 4 KiB) always takes the <= 536 bytes whole; a
#     short or failed send closes the session (the backend would see a broken header).
#   - Per-source limits are keyed by (service row, source): the row is mixed into the source
#     hash (SourceTable.acquire's salt), so services never share counts in the one table.
# The per-event function adm_on_client makes no Python C-API call
# (tests/unit/test_access_generated_c.py); the transitions it calls are once per connection.

cdef extern from "<sys/socket.h>" nogil:
    int getsockname(int fd, sockaddr *addr, socklen_t *len)
    int getpeername(int fd, sockaddr *addr, socklen_t *len)
    enum:
        MSG_PEEK
        MSG_MORE

cdef enum:
    S_WAITING = 3            # before connect: a PROXY header and/or the client's first byte
    ADM_GO = 0               # adm_accept: connect now, as without admission
    ADM_HELD = 1             # refused (closed, counted) or waiting: nothing more to do here


@cython.final
cdef class Admission:
    """A service's access rules as the engine applies them; immutable once built. Made by the
    data plane (fastlb.dataplane) when the plan's access fields change, never per connection."""
    cdef readonly Acl acl                # None: everyone (before per-source limits)
    cdef readonly Acl pp_from            # peers that must send a PROXY header; None: nobody
    cdef readonly double pp_timeout      # seconds for the whole header
    cdef readonly double first_byte      # timeouts.client_first_byte; 0: off
    cdef readonly SourceTable srctab     # the balancer's one table; None: no per-source limit
    cdef readonly uint32_t src_conns     # per_source_conns (0: none)
    cdef readonly uint32_t src_rate      # per_source_rate, per second (0: none)
    cdef readonly uint32_t src_burst
    cdef readonly uint64_t salt          # the service's row + 1, mixed into the source hash
    cdef bytes pp_send                   # byte [slot]: 0 none, 1 v1, 2 v2 (PROXY send)

    def __init__(self, *, Acl acl=None, Acl pp_from=None, double pp_timeout=3.0,
                 double first_byte=0.0, SourceTable srctab=None, uint32_t conns=0,
                 uint32_t rate=0, uint32_t burst=0, int row=-1, dict pp_send=None):
        if pp_timeout <= 0 or first_byte < 0:
            raise CoreArgumentError("pp_timeout must be > 0 and first_byte >= 0 (seconds)")
        if (conns or rate) and srctab is None:
            raise CoreArgumentError("per-source limits need the balancer's SourceTable")
        if conns > SRC_MAX_CONNS:
            raise CoreArgumentError(f"per_source_conns = {conns}: at most {SRC_MAX_CONNS}")
        self.acl = acl
        self.pp_from = pp_from
        self.pp_timeout = pp_timeout
        self.first_byte = first_byte
        self.srctab = srctab if (conns or rate) else None
        self.src_conns = conns
        self.src_rate = rate
        self.src_burst = burst if burst else 1
        self.salt = <uint64_t>(row + 1)
        sends = pp_send or {}
        top = max(sends, default=-1)
        table = bytearray(top + 1)
        for slot, version in sends.items():
            if slot < 0 or version not in (0, 1, 2):
                raise CoreArgumentError(f"pp_send: slot {slot} -> {version!r}: expected a "
                                        f"slot >= 0 and 0 (none), 1 (v1) or 2 (v2)")
            table[slot] = version
        self.pp_send = bytes(table)

    def pp_version(self, int slot):
        """The PROXY version sent to backend ``slot`` (0: none)."""
        return _adm_pp_version(self, slot)


cdef inline int _adm_pp_version(Admission adm, int slot) noexcept:
    if slot < 0 or slot >= len(adm.pp_send):
        return 0
    return (<const unsigned char *>PyBytes_AS_STRING(adm.pp_send))[slot]


cdef inline void _adm_count(Session s, int field) noexcept:
    """A refusal, in the service's Gauges row (ServiceState.row; -1: not counted)."""
    s.eng.gauges.add(s.svc.row, field, 1)


cdef uint64_t _hash_addr(const flb_addr *a, int mode) noexcept:
    """xxh64 of an address's text, as _hash_peer computes it from a sockaddr (and key_of() in
    Python): the Maglev key of a client known by its PROXY header."""
    cdef char text[80]
    cdef int n
    if a.family == FLB_FAM_INET:
        inet_ntop(AF_INET, &a.ip[12], text, 64)
    else:
        inet_ntop(AF_INET6, a.ip, text, 64)
    n = <int>strlen(text)
    if mode == HASH_SOURCE_IP_PORT:
        n += snprintf(text + n, 16, ":%u", <unsigned int>a.port)
    return flb_xxh64(text, n, 0)


cdef int _adm_check(Session s, Admission adm) noexcept:
    """ACL, then per-source limits, on s.client. 0: admitted (the source entry kept in the
    session); otherwise counted and the session closed: -1."""
    cdef int r
    cdef Py_ssize_t e
    if adm.acl is not None and not adm.acl.admits_c(&s.client):
        _adm_count(s, G_DENY_ACL)
        s.term = TERM_DENY_ACL                  # [obs]
        s._close()
        return -1
    if adm.srctab is not None:
        r = adm.srctab.acquire_salted(&s.client, <int64_t>(s.eng.now * 1000.0), adm.src_conns,
                                      adm.src_rate, adm.src_burst, adm.salt, &e)
        if r != SRC_ADMIT:
            _adm_count(s, G_DENY_SRC_CONNS if r == SRC_REFUSED_CONNS else
                       (G_DENY_SRC_RATE if r == SRC_REFUSED_RATE else G_DENY_SRC_TABLE))
            s.term = TERM_DENY_SRC              # [obs]
            s._close()
            return -1
        if e >= 0:
            s.srctab = adm.srctab
            s.src_entry = e
    return 0


cdef int _adm_wait(Session s, double seconds) noexcept:
    """Enter (or stay in) the before-connect phase, until ``seconds`` from now. -1 if closed."""
    if s.state != S_WAITING:
        s.state = S_WAITING
        s.eng.connecting.add(s)
    s.deadline = s.eng.now + seconds
    if s._watch(s.cfd, &s.cev, EPOLLIN, TAG_CLIENT) < 0:
        s.eng._epoll_failed(s, errno)
        return -1
    return 0


cdef void _adm_go(Session s) noexcept:
    """Leave the before-connect phase: connect, as a session without admission does."""
    if s.state == S_WAITING:
        s.eng.connecting.discard(s)
        s.state = S_CONNECTING
    if s.svc.tls is not None and s.ssl == NULL:     # [tls] the handshake first
        tls_start(s)
        return
    s._update()                             # read what the client sends while we connect
    if s.state != S_CLOSED:
        s._connect()


cdef int adm_accept(Session s, sockaddr_storage *ss) noexcept:
    """At accept (s is in Engine.sessions): ADM_GO to connect now; ADM_HELD when the session
    was refused (closed, counted) or waits for a PROXY header or its first byte."""
    cdef Admission adm = s.svc.adm
    addr_from_sockaddr(<sockaddr *>ss, &s.client)
    if adm.pp_from is not None and adm.pp_from.admits_c(&s.client):
        s.pp_wait = True
        _adm_wait(s, adm.pp_timeout)
        return ADM_HELD
    if _adm_check(s, adm) < 0:
        return ADM_HELD
    if adm.first_byte > 0:
        _adm_wait(s, adm.first_byte)
        return ADM_HELD
    return ADM_GO


cdef void _adm_header_done(Session s, pp_header *h, bint more) noexcept:
    """A whole PROXY header was taken out of the socket (``more``: payload follows it): take its
    addresses, then admit and go on (or wait for the first byte)."""
    cdef Admission adm = s.svc.adm
    if h.command == PP_CMD_PROXY and (h.family == PP_FAM_TCP4 or h.family == PP_FAM_TCP6):
        s.client = h.src
        s.local = h.dst
        if s.svc.hash_mode != HASH_NONE:
            s.key = _hash_addr(&s.client, s.svc.hash_mode)
    s.pp_wait = False
    _adm_free_scratch(s)
    if _adm_check(s, adm) < 0:
        return
    if adm.first_byte > 0 and not more:
        _adm_wait(s, adm.first_byte)
        return
    _adm_go(s)


cdef inline void _adm_free_scratch(Session s) noexcept:
    if s.pp_buf != NULL:
        free(s.pp_buf)
        s.pp_buf = NULL
    s.pp_have = 0


cdef bint _adm_take(Session s, unsigned char *dst, size_t n) noexcept:
    """Read exactly ``n`` bytes the socket is known to hold (they were peeked)."""
    cdef ssize_t r
    while n:
        r = recv(s.cfd, dst, n, 0)
        if r > 0:
            dst += r
            n -= <size_t>r
        elif r < 0 and errno == EINTR:
            continue
        else:
            return False
    return True


cdef void _adm_refuse(Session s, int field) noexcept:
    _adm_count(s, field)
    s.term = TERM_CLIENT_SILENT if field == G_CLIENT_SILENT else TERM_PROXY_ERROR   # [obs]
    s._close()


cdef void adm_on_client(Session s, uint32_t events) noexcept:
    """A client event in S_WAITING (per event: no Python C-API call here)."""
    cdef ssize_t r
    cdef int rc
    cdef pp_header h
    cdef char one
    cdef unsigned char peek[PP_MAX]
    cdef unsigned char *seen                # the header so far: scratch (taken) + socket (peeked)
    cdef size_t have = <size_t>s.pp_have, need
    if not (events & (EPOLLIN | EPOLLERR | EPOLLHUP)):
        return
    if not s.pp_wait:                       # client_first_byte: is there a byte?
        r = recv(s.cfd, &one, 1, MSG_PEEK)
        if r > 0:
            _adm_go(s)
        elif r == 0 or (errno != EAGAIN and errno != EINTR):
            s.term = TERM_CC                # [obs] the client left before connecting
            s._close()                      # gone without a byte: no backend for it
        return
    seen = s.pp_buf if have else peek
    r = recv(s.cfd, seen + have, PP_MAX - have, MSG_PEEK)
    if r < 0 and (errno == EAGAIN or errno == EINTR):
        return
    if r <= 0:
        _adm_refuse(s, G_PROXY_ERRORS)      # EOF or an error before the header's end
        return
    rc = pp_parse(seen, have + <size_t>r, &h)
    if rc == PP_DONE:
        need = h.length - have              # the header's bytes still in the socket (<= r)
        if not _adm_take(s, peek, need):
            _adm_refuse(s, G_PROXY_ERRORS)
            return
        _adm_header_done(s, &h, <size_t>r > need)
    elif rc == PP_NEED_MORE:                # all a header prefix: take it out of the socket
        if s.pp_buf == NULL:
            s.pp_buf = <unsigned char *>malloc(PP_MAX)
            if s.pp_buf == NULL:
                s._close()
                return
        if not _adm_take(s, s.pp_buf + have, <size_t>r):
            _adm_refuse(s, G_PROXY_ERRORS)
            return
        s.pp_have += <int>r
    else:
        _adm_refuse(s, G_PROXY_ERRORS)      # malformed, or no header at all


cdef void adm_expired(Session s) noexcept:
    """The sweep found a waiting session past its deadline: a slow or missing header, or a
    silent client."""
    _adm_refuse(s, G_PROXY_ERRORS if s.pp_wait else G_CLIENT_SILENT)


cdef int adm_send_header(Session s) noexcept:
    """At connect: the PROXY header to the backend, if its slot wants one. 0, or -1 (closed)."""
    cdef Admission adm = s.svc.adm
    cdef int version = _adm_pp_version(adm, s.slot)
    cdef unsigned char out[PP_MAX]
    cdef Py_ssize_t n
    cdef ssize_t w
    cdef sockaddr_storage ss
    cdef socklen_t sslen = sizeof(ss)
    cdef flb_addr dst
    cdef pp_tlvs tlvs                       # [tls] stage 3: the client's TLS identity
    cdef char cn[TLS_PP_CN_MAX]
    if version == 0:
        return 0
    if s.local.family != FLB_FAM_UNSPEC:    # the destination a PROXY header told us
        dst = s.local
    elif getsockname(s.cfd, <sockaddr *>&ss, &sslen) < 0 or addr_from_sockaddr(<sockaddr *>&ss, &dst) < 0:
        memset(&dst, 0, sizeof(dst))        # unknown: the builders send UNKNOWN / no address
    if s.client.family == FLB_FAM_UNSPEC:  # admission came with a plan after this accept
        sslen = sizeof(ss)
        if getpeername(s.cfd, <sockaddr *>&ss, &sslen) == 0:
            addr_from_sockaddr(<sockaddr *>&ss, &s.client)
    if version == 1:
        n = pp_build_v1(&s.client, &dst, <char *>out, sizeof(out))
    else:
        n = pp_build_v2(PP_CMD_PROXY, &s.client, &dst, tls_pp_tlvs(s, &tlvs, cn), out, sizeof(out))
    if n < 0:
        s._close()
        return -1
    lean_before_send(s)                      # [lean] a send to the backend (TCP_NODELAY)
    while True:
        w = send(s.bfd, out, <size_t>n, MSG_NOSIGNAL | (MSG_MORE if s.c2b.end > s.c2b.start else 0))
        if w < 0 and errno == EINTR:
            continue
        break
    if w != n:
        s._close()
        return -1
    return 0


cdef inline void adm_close(Session s) noexcept:
    """At close: the source entry back, exactly once (_close runs once per session); the
    PROXY scratch freed (Session.__dealloc__ frees it too, for a session never closed)."""
    _adm_free_scratch(s)
    if s.src_entry >= 0:
        s.srctab.release(s.src_entry)
        s.src_entry = -1
        s.srctab = None
