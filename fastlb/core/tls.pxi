# [tls] TLS termination in the data path (issue 12, stage 1): the engine drives OpenSSL itself,
# non-blocking, on the session's own client fd (SSL_do_handshake / SSL_read / SSL_write); no
# uvloop transport, no Python per event.
#
# Owner of: TlsContext (one per service: the SSL_CTXs built by the data plane from the plan's
# PEM certificates when they change, never per connection; their SNI table and ALPN list), the
# handshake phase of a Session (state S_HANDSHAKE) and the client side of its I/O once TLS is on.
# The engine and the session call in at a few one-line hooks:
#   Engine._accept / _adm_go  tls_start(s)       after admission said go: the handshake, before
#                                                any backend connect (HAProxy too: the stream
#                                                starts once the handshake is done);
#   Session.on_client         tls_on_handshake   while S_HANDSHAKE;
#   Engine.sweep              tls_expired(s)     past timeouts.handshake (counted);
#   Session._pump/_flush/on_client  _tls_recv / _tls_send  instead of recv/send on the client;
#   Session._update           tls_interest(s)    what OpenSSL asked for the other direction;
#   Session._shut_if_done     tls_shut_wr(s)     close_notify, then shutdown(SHUT_WR);
#   Session._close            tls_close(s)       SSL_free, once.
# Rules:
#   - Buffers (core/buffers.pxi) as for plain TCP: _tls_recv reads whole records into the
#     direction's buffer, taken when the client is readable and given back when drained. A read
#     is only made with room for a whole record (TLS_RECORD), so OpenSSL never holds decrypted
#     bytes we did not take (SSL_pending stays 0) and level-triggered epoll on the socket stays
#     the truth: without read_ahead OpenSSL reads no further than the record it decrypts.
#   - WANT_READ / WANT_WRITE: an SSL_read that wants the socket writable (a TLS 1.3 KeyUpdate
#     answer) sets TLSW_OUT, an SSL_write that wants it readable sets TLSW_IN; _update adds that
#     interest and the next client event retries both directions (each guarded by its state).
#   - SSL_CTX options are HAProxy's (ssl_sock.c): no renegotiation, no compression, server
#     cipher preference, partial writes with moving buffers, buffers released when idle; an
#     unexpected EOF is an EOF (SSL_OP_IGNORE_UNEXPECTED_EOF), as a TCP FIN.
#   - SNI: exact names, then wildcards of one label; no match or no SNI: the first certificate
#     (HAProxy's default certificate). ALPN: the first of our list the client offers.
#   - Session tickets: on. [tlsops] Keys made by the supervisor and shared by every worker
#     (fastlb/tickets.py -> TlsContext.set_ticket_keys -> flb_ticket_cb in _tls.h), rotated
#     every tls.ticket_lifetime (also the sessions' timeout); the session id context is the
#     service's (dataplane.tls_ops_args): a session resumes only where it was made.
#   - A session keeps a reference to its TlsContext: a reload builds a new one for new clients
#     while open connections keep theirs (and its SNI table, the callback's argument).
#   - Counted per engine (Engine.tls_*; summed over workers in ctl stats and /metrics):
#     handshakes done, resumed, failed, timed out; [tlsops] failures by reason (protocol, other
#     beside the certificate ones), versions. No Gauges field: the Gauges' 16 are taken.
# The per-event functions (tls_on_handshake, _tls_recv, _tls_send, tls_interest, tls_shut_wr)
# make no Python C-API call (tests/unit/test_tls_generated_c.py).


from libc.string cimport strncpy

cdef enum:
    S_HANDSHAKE = 5          # [tls] the TLS handshake with the client (before connect)
    TLSW_IN = 1              # an SSL_write wants the client readable
    TLSW_OUT = 2             # an SSL_read wants the client writable
    TLS_RECORD = 16384       # the most plaintext of one TLS record (RFC 8446 5.1)

TLS_VERSIONS = {"1.2": TLS1_2_VERSION, "1.3": TLS1_3_VERSION}

# [tlsops] the per-service TLS counts (ServiceState.tlsn, 11 of them; the engine's tls_* are the
# balancer-wide ones): handshakes done, resumed, per version; refusals per reason
cdef enum:
    TLSN_HANDSHAKES, TLSN_RESUMED, TLSN_V12, TLSN_V13, TLSN_TIMEOUT, TLSN_NO_CERT, TLSN_EXPIRED
    TLSN_UNTRUSTED, TLSN_IDENTITY, TLSN_PROTOCOL, TLSN_OTHER
TLSN_NAMES = ("handshakes", "resumed", "v1_2", "v1_3", "timeout", "no_client_cert", "expired",
              "untrusted", "identity_refused", "protocol", "other")


def tls_counts(ServiceState st):
    """[tlsops] A service's TLS counts in this engine: {name: count} (TLSN_NAMES)."""
    return {n: st.tlsn[i] for i, n in enumerate(TLSN_NAMES)}


@cython.final
cdef class TlsContext:
    """A service's TLS termination as the engine applies it; immutable once built. ``certs``:
    (cert PEM, key PEM) pairs, the certificate's chain after it; the first is the default."""
    cdef flb_sni sni
    cdef SSL_CTX **ctxs
    cdef int nctx
    cdef readonly double handshake_timeout
    cdef readonly tuple names            # per certificate: its DNS names (SAN, else the CN)
    cdef readonly str min_version
    cdef readonly tuple alpn
    # stage 2: mutual TLS and authorization by identity
    cdef readonly str verify_client     # "" (no client certificate asked), "required", "optional"
    cdef readonly tuple identities      # service.authz.identities (empty: any verified client)
    cdef bytes authz                    # the identities, NUL-separated, an empty one last
    # [tlsops] tls.ticket_lifetime (the sessions' lifetime; the keys rotate at this period)
    cdef readonly double ticket_lifetime

    def __init__(self, certs, *, str min_version="1.2", alpn=(), double handshake_timeout=10.0,
                 bytes client_ca=None, str verify_client="required", identities=(),
                 double ticket_lifetime=300.0, bytes session_context=b"fastlb"):
        cdef char err[512]
        cdef char buf[8192]
        cdef int i, n, k
        cdef SSL_CTX *ctx
        cdef bytes cert, key, wire, nm
        if not certs:
            raise CoreArgumentError("tls: at least one certificate")
        if min_version not in TLS_VERSIONS:
            raise CoreArgumentError(f"tls.min_version {min_version!r}: expected \"1.2\" or \"1.3\"")
        if handshake_timeout <= 0:
            raise CoreArgumentError("tls: the handshake timeout must be > 0 (seconds)")
        protos = [a.encode() for a in alpn]
        if any(not 1 <= len(p) <= 255 for p in protos):
            raise CoreArgumentError("tls.alpn: each protocol name is 1 to 255 bytes")
        wire = b"".join(bytes([len(p)]) + p for p in protos)
        if len(wire) > 255:
            raise CoreArgumentError("tls.alpn: the list is longer than 255 bytes in wire form")
        memcpy(self.sni.alpn, <const char *>wire, len(wire))
        self.sni.alpn_len = <unsigned int>len(wire)
        self.handshake_timeout = handshake_timeout
        self.min_version = min_version
        self.alpn = tuple(alpn)
        if verify_client not in ("required", "optional"):
            raise CoreArgumentError(f"tls.verify_client {verify_client!r}: expected \"required\" "
                                    f"or \"optional\"")
        if identities and not client_ca:
            raise CoreArgumentError("authz.identities need tls.client_ca (a verified client)")
        self.verify_client = verify_client if client_ca else ""
        self.identities = tuple(identities)
        self.authz = b"".join(i.encode() + b"\0" for i in identities) + b"\0"
        if ticket_lifetime < 1 or not 1 <= len(session_context) <= 32:     # [tlsops]
            raise CoreArgumentError("tls: ticket_lifetime >= 1 s, a session context of 1-32 bytes")
        self.ticket_lifetime = ticket_lifetime
        self.ctxs = <SSL_CTX **>calloc(len(certs), sizeof(SSL_CTX *))
        if self.ctxs == NULL:
            raise MemoryError()
        names = []
        for i, (cert, key) in enumerate(certs):
            err[0] = 0
            ctx = flb_ctx_new(cert, <int>len(cert), key, <int>len(key),
                              TLS_VERSIONS[min_version], &self.sni, err, sizeof(err))
            if ctx == NULL:
                raise CoreArgumentError(f"certificate {i + 1}: {err.decode(errors='replace')}")
            self.ctxs[i] = ctx
            self.nctx = i + 1
            flb_ctx_ops(ctx, &self.sni, <long>ticket_lifetime, session_context,    # [tlsops]
                        <unsigned int>len(session_context))
            if client_ca and flb_ctx_client_ca(ctx, client_ca, <int>len(client_ca),
                                               verify_client == "required", err, sizeof(err)) < 0:
                raise CoreArgumentError(f"tls.client_ca: {err.decode(errors='replace')}")
            n = flb_ctx_names(ctx, buf, sizeof(buf))
            names.append(tuple(x.decode(errors="replace").lower()
                               for x in buf[:n].split(b"\0") if x))
        self.names = tuple(names)
        entries = [(nm_, i) for i, ns in enumerate(names) for nm_ in ns if len(nm_) < 250]
        self.sni.e = <flb_sni_entry *>calloc(max(len(entries), 1), sizeof(flb_sni_entry))
        if self.sni.e == NULL:
            raise MemoryError()
        for k, (name, i) in enumerate(entries):
            wild = name.startswith("*.")
            nm = (name[1:] if wild else name).encode()
            strncpy(self.sni.e[k].name, nm, 255)
            self.sni.e[k].wildcard = wild
            self.sni.e[k].ctx = self.ctxs[i]
        self.sni.n = len(entries)

    def __dealloc__(self):
        cdef int i
        if self.ctxs != NULL:
            for i in range(self.nctx):
                SSL_CTX_free(self.ctxs[i])      # sessions' SSLs hold their own references
            free(self.ctxs)
        free(self.sni.e)

    def set_ticket_keys(self, bytes keys):
        """[tlsops] The service's session ticket keys (fastlb/tickets.py: previous, current,
        next; 80 bytes each), shared by every worker: a ticket one worker issued resumes on
        another. Before the first call OpenSSL's own per-context keys serve."""
        if len(keys) != 240:
            raise CoreArgumentError("ticket keys: 3 keys of 80 bytes (name, AES key, HMAC key)")
        flb_tickets_set(&self.sni, self.ctxs, self.nctx, keys)

    def pick(self, str server_name):
        """The index of the certificate a client naming ``server_name`` gets (SNI)."""
        cdef SSL_CTX *ctx = flb_sni_pick(&self.sni, server_name.lower().encode())
        cdef int i
        for i in range(self.nctx):
            if self.ctxs[i] == ctx:
                return i
        return 0


# -- the handshake (S_HANDSHAKE) ---------------------------------------------------------------
cdef void tls_start(Session s) noexcept:
    """Admission said go: start the handshake (once per connection). The session waits in the
    engine's connecting set, swept against timeouts.handshake like the other before-connect
    waits (core/admission.pxi's S_WAITING)."""
    cdef TlsContext t = s.svc.tls
    s.tlsctx = t
    s.ssl = SSL_new(t.ctxs[0])
    if s.ssl == NULL or SSL_set_fd(s.ssl, s.cfd) != 1:
        ERR_clear_error()
        s.term = TERM_RC                    # [obs] a local resource (memory)
        s._close()
        return
    SSL_set_accept_state(s.ssl)
    s.state = S_HANDSHAKE
    s.deadline = s.eng.now + t.handshake_timeout
    s.eng.connecting.add(s)
    tls_on_handshake(s, EPOLLIN)            # the ClientHello may be there already


cdef void tls_on_handshake(Session s, uint32_t events) noexcept:
    """A client event during the handshake (per event: no Python C-API call here)."""
    cdef int r = SSL_do_handshake(s.ssl)
    cdef int e
    cdef uint32_t want
    if r == 1:
        _tls_established(s)
        return
    e = SSL_get_error(s.ssl, r)
    if e == SSL_ERROR_WANT_READ:
        want = EPOLLIN
    elif e == SSL_ERROR_WANT_WRITE:
        want = EPOLLOUT
    else:                                   # a bad ClientHello, no shared version, EOF...
        e = flb_verify_reason(s.ssl)        # stage 2: a client certificate refused, and why
        if e == 1:
            s.eng.tls_no_cert += 1
            s.svc.tlsn[TLSN_NO_CERT] += 1
        elif e == 2:
            s.eng.tls_expired += 1
            s.svc.tlsn[TLSN_EXPIRED] += 1
        elif e == 3:
            s.eng.tls_untrusted += 1
            s.svc.tlsn[TLSN_UNTRUSTED] += 1
        elif e == 4:                        # [tlsops] not TLS, a bad or oversized message...
            s.eng.tls_protocol += 1
            s.svc.tlsn[TLSN_PROTOCOL] += 1
        else:                               # [tlsops] the client left, or sent an alert
            s.eng.tls_other += 1
            s.svc.tlsn[TLSN_OTHER] += 1
        ERR_clear_error()
        s.eng.tls_failures += 1
        s.term = TERM_CC                    # [obs] the client failed before connecting
        s._close()
        return
    if s._watch(s.cfd, &s.cev, want, TAG_CLIENT) < 0:
        s.eng._epoll_failed(s, errno)


cdef void _tls_established(Session s) noexcept:
    """The handshake is done (once per connection): connect, as a plain session does."""
    s.eng.tls_handshakes += 1
    s.svc.tlsn[TLSN_HANDSHAKES] += 1        # [tlsops] per service too
    if SSL_session_reused(s.ssl):
        s.eng.tls_resumed += 1
        s.svc.tlsn[TLSN_RESUMED] += 1
    if SSL_version(s.ssl) == TLS1_3_VERSION:   # [tlsops] min_version is 1.2: 1.2 or 1.3
        s.eng.tls_v13 += 1
        s.svc.tlsn[TLSN_V13] += 1
    else:
        s.eng.tls_v12 += 1
        s.svc.tlsn[TLSN_V12] += 1
    if s.tlsctx.identities and not flb_authz(s.ssl, s.tlsctx.authz):   # stage 2: authz
        s.eng.tls_authz_denied += 1         # a valid certificate, no allowed identity: closed
        s.svc.tlsn[TLSN_IDENTITY] += 1
        s.term = TERM_DENY_ACL              # [obs] refused before connecting (PR)
        s._close()
        return
    s.eng.connecting.discard(s)
    s.state = S_CONNECTING
    s.last = s.eng.now
    s._update()                             # read what the client sends while we connect
    if s.state != S_CLOSED:
        s._connect()


cdef void tls_expired(Session s) noexcept:
    """The sweep found a handshake past timeouts.handshake."""
    s.eng.tls_timeouts += 1
    s.svc.tlsn[TLSN_TIMEOUT] += 1           # [tlsops]
    s.term = TERM_cR                        # [obs] the client did not finish in time
    s._close()


# -- I/O on the client once TLS is on ----------------------------------------------------------
cdef ssize_t _tls_recv(Session s, char *buf, size_t n) noexcept:
    """recv() for the client through OpenSSL: whole records into buf while it has room for
    one. > 0: bytes; 0: EOF (close_notify, or a FIN); -1 with errno (EAGAIN: nothing now)."""
    cdef int r, e
    cdef size_t total = 0
    while n - total >= TLS_RECORD:
        r = SSL_read(s.ssl, buf + total, <int>(n - total))
        if r > 0:
            total += <size_t>r
            # [tlsbench] a record short of the maximum usually ends what the client sent (a
            # request): return without the read() that would only say EAGAIN; level-triggered
            # epoll reports what follows, OpenSSL holding nothing (the rules above). Full
            # records (bulk) go on. HAProxy and nginx read on to EAGAIN: one syscall more.
            if r < TLS_RECORD and not SSL_has_pending(s.ssl):
                return <ssize_t>total
            continue
        if total:                           # what we have first; the rest at the next event
            return <ssize_t>total
        e = SSL_get_error(s.ssl, r)
        if e == SSL_ERROR_WANT_READ:
            flb_set_errno(EAGAIN)
        elif e == SSL_ERROR_WANT_WRITE:
            s.tls_want |= TLSW_OUT
            flb_set_errno(EAGAIN)
        elif e == SSL_ERROR_ZERO_RETURN:
            return 0
        else:
            ERR_clear_error()
            flb_errno_or(ECONNRESET)
        return -1
    if total == 0:                          # no room for a record: nothing read (not EOF)
        flb_set_errno(EAGAIN)
        return -1
    return <ssize_t>total


cdef ssize_t _tls_send(Session s, const char *buf, size_t n) noexcept:
    """send() to the client through OpenSSL (partial writes on). > 0: bytes taken; -1 with
    errno (EAGAIN: the socket is full, or OpenSSL needs a read first: TLSW_IN)."""
    cdef int r, e
    if n > 0x40000000:
        n = 0x40000000
    r = SSL_write(s.ssl, buf, <int>n)
    if r > 0:
        return r
    e = SSL_get_error(s.ssl, r)
    if e == SSL_ERROR_WANT_WRITE:
        flb_set_errno(EAGAIN)
    elif e == SSL_ERROR_WANT_READ:
        s.tls_want |= TLSW_IN
        flb_set_errno(EAGAIN)
    else:
        ERR_clear_error()
        flb_errno_or(EPIPE)
    return -1


cdef inline uint32_t tls_interest(Session s) noexcept:
    """The client interest OpenSSL asked for beyond the session's own."""
    return ((EPOLLIN if s.tls_want & TLSW_IN else 0)
            | (EPOLLOUT if s.tls_want & TLSW_OUT else 0))


cdef inline Py_ssize_t tls_fill_cap(Session s) noexcept:
    """How far c2b may be filled before connect: room for a whole record with TLS."""
    return ENGINE_BUFSIZE - TLS_RECORD if s.ssl != NULL else ENGINE_BUFSIZE


cdef inline void tls_shut_wr(Session s) noexcept:
    """Before shutdown(SHUT_WR) of the client: our close_notify (best effort: the direction is
    flushed, so the socket takes the alert; TLS 1.3 lets the client go on sending)."""
    if s.ssl != NULL and s.state != S_HANDSHAKE:
        if SSL_shutdown(s.ssl) < 0:
            ERR_clear_error()


cdef inline void tls_close(Session s) noexcept:
    """At close: the SSL freed (its fd is the session's, closed by _close), the context
    released; out of the swept set if still handshaking."""
    if s.state == S_HANDSHAKE:
        s.eng.connecting.discard(s)
    if s.ssl != NULL:
        SSL_free(s.ssl)
        s.ssl = NULL
    s.tlsctx = None


# -- stage 3: the client's identity to the backend in PROXY v2 TLVs ------------------------------
cdef enum:
    PP2_CLIENT_CERT_CONN = 0x02          # doc/proxy-protocol.txt 2.2.5
    PP2_CLIENT_CERT_SESS = 0x04
    TLS_PP_CN_MAX = 65                   # X.509's ub-common-name (64) and a NUL


cdef const pp_tlvs *tls_pp_tlvs(Session s, pp_tlvs *t, char *cn) noexcept:
    """The TLVs HAProxy's send-proxy-v2-ssl-cn sends, for a TLS session (NULL: plain TCP):
    PP2_TYPE_AUTHORITY = the SNI; PP2_TYPE_SSL with the client bits, verify (0: a client
    certificate was presented and verified), the version, and the client certificate's CN.
    ``cn``: TLS_PP_CN_MAX bytes of scratch the TLVs point into (once per backend connect)."""
    cdef const char *name
    cdef const char *ver
    cdef int n, verified = 0
    cdef unsigned int alen
    if s.ssl == NULL:
        return NULL
    memset(t, 0, sizeof(pp_tlvs))
    t.alpn = flb_alpn_of(s.ssl, &alen)      # [tlsops] PP2_TYPE_ALPN when ALPN was negotiated
    t.alpn_len = alen
    name = SSL_get_servername(s.ssl, TLSEXT_NAMETYPE_host_name)
    if name != NULL:
        t.authority = <const unsigned char *>name
        t.authority_len = min(strlen(name), 255)
    t.ssl = True
    t.ssl_client = PP2_CLIENT_SSL
    ver = SSL_get_version(s.ssl)
    t.ssl_version = <const unsigned char *>ver
    t.ssl_version_len = strlen(ver)
    n = flb_peer_cn(s.ssl, cn, TLS_PP_CN_MAX, &verified)
    if n >= 0:                              # a certificate in the session (HAProxy's bits:
        t.ssl_client |= PP2_CLIENT_CERT_SESS    # connection.c, SRV_PP_V2_SSL), presented on
        if not SSL_session_reused(s.ssl):   # this connection unless it was resumed
            t.ssl_client |= PP2_CLIENT_CERT_CONN
        t.ssl_cn = <const unsigned char *>cn
        t.ssl_cn_len = <size_t>n
    # verify: 0 when a certificate was presented and verified, else non-zero (the spec's words;
    # HAProxy leaves 0 when there is no certificate at all)
    t.ssl_verify = 0 if verified else 1
    return t
