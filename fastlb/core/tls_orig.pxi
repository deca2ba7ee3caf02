# [orig] TLS origination (issue 12): fastlb connects to a backend over TLS, driven from the
# engine like termination (core/tls.pxi) but in client mode, on the session's backend fd:
# non-blocking SSL_do_handshake / SSL_read / SSL_write, no Python per event.
#
# Owner of: OrigContext (one per service: the client SSL_CTXs of its distinct TLS profiles
# (ca, verify, client certificate), the slot -> profile / verified name table, and the cache of
# one SSL_SESSION per slot for resumption), the backend handshake of a Session and the backend
# side of its I/O once TLS is on. The session calls in at a few one-line hooks:
#   Session._established   orig_begin(s)        after the TCP connect (and the PROXY header,
#                                               which HAProxy too sends in clear first): the
#                                               handshake; _established runs again once done;
#   Session.on_backend     orig_on_handshake    while s.bhs (state stays S_CONNECTING, so the
#                                               sweep's connect deadline covers the handshake);
#   Session._update        s.bhs_want / orig_interest(s)   the backend interest OpenSSL asks;
#   Session._pump/_flush   _orig_recv / _orig_send         instead of recv/send on the backend;
#   Session._shut_if_done  orig_shut_wr(s)      close_notify, then shutdown(SHUT_WR);
#   Session._failed_attempt / _close   orig_drop(s)        SSL_free before the fd is closed.
# Rules:
#   - A failed handshake (refused verification, a protocol error, an EOF, or no handshake by
#     timeouts.connect from the connect's start) is a failed connect: counted per slot
#     (CTR_CONNECT_FAILURES), passive failure, retried on another backend, termination code SC
#     (sC for the timeout) in the connection log: HAProxy counts an SSL handshake failure to a
#     server as a connect error (SF_ERR_SRVCL / "SSL handshake failure" on a retry).
#   - Verification: SSL_VERIFY_PEER against `ca` (else the system store), the name checked by
#     SSL_set1_host (an IP by X509_VERIFY_PARAM_set1_ip_asc): `sni` when given, else the
#     backend's host as written. SNI: the same name, never an IP (RFC 6066).
#   - Buffers and WANT_READ/WANT_WRITE as in core/tls.pxi (whole records, BTLSW_* flags).
#   - Sessions: one per slot (OpenSSL's new-session callback, fastlb/_tls_orig.h), offered at
#     the next connect to that slot, forgotten when a handshake fails. The cache lives in the
#     OrigContext: a plan changing the service's TLS backends or their slots starts a new one.
#   - Counted per engine: Engine.orig_handshakes, orig_resumed, orig_failures.
# Per-event functions (orig_on_handshake, _orig_recv, _orig_send, orig_interest, orig_shut_wr)
# make no Python C-API call (tests/unit/test_tls_generated_c.py).

cdef extern from "_tls_orig.h" nogil:
    ctypedef struct SSL_SESSION:
        pass
    void SSL_SESSION_free(SSL_SESSION *sess)
    SSL_CTX *flb_orig_ctx_new(const char *ca, int calen, int verify, const char *cert,
                              int certlen, const char *key, int keylen, char *err, int errlen)
    int flb_orig_setup(SSL *ssl, int fd, const char *name, int is_ip, int verify,
                       SSL_SESSION **cell)
    void flb_orig_forget(SSL_SESSION **cell)
    void *SSL_get_app_data(const SSL *ssl)
    long SSL_get_verify_result(const SSL *ssl)
    const char *X509_verify_cert_error_string(long n)

from libc.errno cimport EPROTO

cdef struct orig_slot:
    int prof                     # index into OrigContext.ctxs; -1: plain TCP
    int is_ip                    # name is an IP address (verified, not sent as SNI)
    char name[256]               # verified and sent as SNI ("": none)
    SSL_SESSION *sess            # the last session of this backend (NULL: none)


@cython.final
cdef class OrigContext:
    """A service's TLS toward its backends, as the engine applies it; immutable once built.
    ``profiles``: (ca PEM (b"": the system store), verify, client cert PEM (b"": none), key
    PEM); ``slots``: (slot, profile index, name to verify and send as SNI)."""
    cdef SSL_CTX **ctxs
    cdef int nctx
    cdef int *verify
    cdef orig_slot *slots
    cdef int nslots
    cdef readonly tuple profiles

    def __init__(self, profiles, slots=()):
        cdef char err[512]
        cdef int i, n
        cdef bytes ca, cert, key, nm
        self.profiles = tuple(profiles)
        self.ctxs = <SSL_CTX **>calloc(max(len(profiles), 1), sizeof(SSL_CTX *))
        self.verify = <int *>calloc(max(len(profiles), 1), sizeof(int))
        if self.ctxs == NULL or self.verify == NULL:
            raise MemoryError()
        for i, (ca, verify, cert, key) in enumerate(profiles):
            if bool(cert) != bool(key):
                raise CoreArgumentError("tls: cert and key go together")
            err[0] = 0
            self.ctxs[i] = flb_orig_ctx_new(ca, <int>len(ca), bool(verify), cert, <int>len(cert),
                                            key, <int>len(key), err, sizeof(err))
            if self.ctxs[i] == NULL:
                raise CoreArgumentError(err.decode(errors="replace"))
            self.nctx = i + 1
            self.verify[i] = bool(verify)
        n = max([s for s, _, _ in slots], default=-1) + 1
        self.slots = <orig_slot *>calloc(max(n, 1), sizeof(orig_slot))
        if self.slots == NULL:
            raise MemoryError()
        self.nslots = n
        for i in range(n):
            self.slots[i].prof = -1
        import ipaddress
        for slot, prof, name in slots:
            if not 0 <= prof < self.nctx or slot < 0:
                raise CoreArgumentError(f"tls: slot {slot}: no profile {prof}")
            nm = name.encode()
            if len(nm) > 255:
                raise CoreArgumentError(f"tls: the name {name!r} is longer than 255 bytes")
            memcpy(self.slots[slot].name, <const char *>nm, len(nm))
            self.slots[slot].name[len(nm)] = 0
            try:
                ipaddress.ip_address(name)
                self.slots[slot].is_ip = 1
            except ValueError:
                self.slots[slot].is_ip = 0
            self.slots[slot].prof = prof

    def __dealloc__(self):
        cdef int i
        if self.slots != NULL:
            for i in range(self.nslots):
                flb_orig_forget(&self.slots[i].sess)
            free(self.slots)
        if self.ctxs != NULL:
            for i in range(self.nctx):
                SSL_CTX_free(self.ctxs[i])     # the sessions' SSLs hold their own references
            free(self.ctxs)
        free(self.verify)

    def uses_tls(self, int slot):
        """Whether connections to ``slot`` go over TLS."""
        return 0 <= slot < self.nslots and self.slots[slot].prof >= 0

    def cached(self, int slot):
        """Whether a session of ``slot`` is kept for resumption (tests, ctl)."""
        return 0 <= slot < self.nslots and self.slots[slot].sess != NULL


# -- the handshake with the backend (s.bhs, state S_CONNECTING) ----------------------------------
cdef bint orig_begin(Session s) noexcept:
    """Session._established's first step (once per connected attempt): if the slot's backend
    takes TLS and no handshake was made yet, send the PROXY header (in clear, first, as HAProxy
    does) and start the handshake. True: the session is handshaking (or was closed); False: go
    on establishing (plain TCP, or the handshake is done)."""
    cdef OrigContext o = s.svc.orig
    cdef orig_slot *sl
    s.btls_failed = False
    if o is None or s.bssl != NULL or s.slot < 0 or s.slot >= o.nslots:
        return False
    sl = &o.slots[s.slot]
    if sl.prof < 0:
        return False
    if s.svc.adm is not None and adm_send_header(s) < 0:     # [access] PROXY first
        return True
    s.bssl = SSL_new(o.ctxs[sl.prof])
    if s.bssl == NULL or flb_orig_setup(s.bssl, s.bfd, sl.name, sl.is_ip, o.verify[sl.prof],
                                        &sl.sess) < 0:
        ERR_clear_error()
        s.term = TERM_RC                    # [obs] a local resource (memory)
        s._close()
        return True
    s.origctx = o
    lean_nodelay_now(s)                     # [lean] handshake records, then data at once
    if s.bev == 0:                          # connected at once: the deadline starts now
        s.deadline = s.eng.now + s.svc.connect_timeout
    s.state = S_CONNECTING
    s.eng.connecting.add(s)
    s.bhs = True
    orig_on_handshake(s, EPOLLOUT)
    return True


cdef void orig_on_handshake(Session s, uint32_t events) noexcept:
    """A backend event during the handshake (per event: no Python C-API call here)."""
    cdef int r = SSL_do_handshake(s.bssl)
    cdef int e
    if r == 1:
        s.bhs = False
        s.bhs_want = 0
        s.eng.orig_handshakes += 1
        if SSL_session_reused(s.bssl):
            s.eng.orig_resumed += 1
        s._established()                    # orig_begin lets it through now (s.bssl set)
        return
    e = SSL_get_error(s.bssl, r)
    if e == SSL_ERROR_WANT_READ:
        s.bhs_want = EPOLLIN
    elif e == SSL_ERROR_WANT_WRITE:
        s.bhs_want = EPOLLOUT
    else:                                   # refused verification, no shared version, EOF...
        ERR_clear_error()
        s.eng.orig_failures += 1
        s.btls_failed = True                # for the error report (orig_exc)
        s.bverify = SSL_get_verify_result(s.bssl)
        flb_orig_forget(<SSL_SESSION **>SSL_get_app_data(s.bssl))
        s._connect_failed(EPROTO)           # counted, retried on another backend
        return
    s._update()


cdef object orig_exc(Session s, int err):
    """The on_connect_error report of a failed backend handshake (an error path: Python)."""
    s.btls_failed = False
    if s.bverify != 0:
        why = "certificate refused: " + X509_verify_cert_error_string(s.bverify).decode()
    else:
        why = "no shared version or cipher, or the backend closed"
    return OSError(err, f"TLS handshake failed ({why})")


cdef inline void orig_drop(Session s) noexcept:
    """Before the backend fd is closed (a failed attempt, the session's end): the SSL freed."""
    if s.bssl != NULL:
        SSL_free(s.bssl)
        s.bssl = NULL
    s.bhs = False
    s.bhs_want = 0
    s.btls_want = 0


# -- I/O on the backend once TLS is on ---------------------------------------------------------
cdef ssize_t _orig_recv(Session s, char *buf, size_t n) noexcept:
    """recv() from the backend through OpenSSL (core/tls.pxi's _tls_recv, on s.bssl)."""
    cdef int r, e
    cdef size_t total = 0
    while n - total >= TLS_RECORD:
        r = SSL_read(s.bssl, buf + total, <int>(n - total))
        if r > 0:
            total += <size_t>r
            continue
        if total:
            return <ssize_t>total
        e = SSL_get_error(s.bssl, r)
        if e == SSL_ERROR_WANT_READ:
            flb_set_errno(EAGAIN)
        elif e == SSL_ERROR_WANT_WRITE:
            s.btls_want |= TLSW_OUT
            flb_set_errno(EAGAIN)
        elif e == SSL_ERROR_ZERO_RETURN:
            return 0
        else:
            ERR_clear_error()
            flb_errno_or(ECONNRESET)
        return -1
    if total == 0:
        flb_set_errno(EAGAIN)
        return -1
    return <ssize_t>total


cdef ssize_t _orig_send(Session s, const char *buf, size_t n) noexcept:
    """send() to the backend through OpenSSL (core/tls.pxi's _tls_send, on s.bssl)."""
    cdef int r, e
    if n > 0x40000000:
        n = 0x40000000
    r = SSL_write(s.bssl, buf, <int>n)
    if r > 0:
        return r
    e = SSL_get_error(s.bssl, r)
    if e == SSL_ERROR_WANT_WRITE:
        flb_set_errno(EAGAIN)
    elif e == SSL_ERROR_WANT_READ:
        s.btls_want |= TLSW_IN
        flb_set_errno(EAGAIN)
    else:
        ERR_clear_error()
        flb_errno_or(EPIPE)
    return -1


cdef inline uint32_t orig_interest(Session s) noexcept:
    """The backend interest OpenSSL asked for beyond the session's own."""
    return ((EPOLLIN if s.btls_want & TLSW_IN else 0)
            | (EPOLLOUT if s.btls_want & TLSW_OUT else 0))


cdef inline void orig_shut_wr(Session s) noexcept:
    """Before shutdown(SHUT_WR) of the backend: our close_notify (the direction is flushed)."""
    if s.bssl != NULL and not s.bhs:
        if SSL_shutdown(s.bssl) < 0:
            ERR_clear_error()
