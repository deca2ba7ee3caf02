# One proxied connection: the session state machine (DESIGN.md section 1). No event loop here:
# the Engine (core/engine.pxi) owns the epoll set and calls on_client/on_backend with the events
# of a session's two sockets; everything a session does is a syscall on its own fds, a write to
# the shared counters, or a call to the Engine for what is shared (buffers, the passive failure
# streaks, the callbacks of the orchestration).
#
#   accept4 (Engine) -> register the client for reads -> pick (the policy's cdef pick_c) ->
#   non-blocking connect -> [refused/timeout: count, tell the policy (on_failure), add to tried,
#   pick again up to retries; none left: close the client] -> established -> pump both
#   directions -> EOF one way: shutdown(SHUT_WR) the other side once its buffer is flushed ->
#   both ways shut: close; any socket error, or an epoll_ctl the kernel refuses: close both.
#
# A direction (client->backend "c2b", backend->client "b2c") owns one buffer. Invariant: while a
# direction's buffer holds unsent bytes, its source is not read and its destination is watched
# for writability; so memory per connection is bounded by its two buffers, whatever the peers
# do (HAProxy's model). Before the backend is up the client is read into c2b until it is full.
#
# epoll is level-triggered. A socket the session wants nothing from is removed from the set
# (EPOLLHUP/EPOLLERR are reported even with no events asked, which would spin).
#
# The per-event functions (on_client, on_backend, _pump, _flush, _update, _shut_if_done) make no
# Python C-API call: checked in the generated _core.c (docs/ARCHITECTURE.md). Python is touched
# once per connection (the object, its place in Engine.sessions) and on error paths only.


cdef inline double _coarse_now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef struct Buf:
    char *data
    Py_ssize_t start        # first unsent byte
    Py_ssize_t end          # one past the last byte read
    # [splice] (core/splice.pxi): while `piped`, the direction's bytes are in a pipe (data NULL,
    # start 0, end = the bytes in the pipe); the auto mode's streaks and flags (SPL_*)
    int pr, pw              # the pipe's read and write ends (valid while piped)
    bint piped
    unsigned char spl
    unsigned char large     # consecutive reads that filled the buffer
    unsigned char small     # consecutive spliced wake-ups under SPLICE_SMALL bytes


@cython.final
cdef class Session:
    """One proxied connection. Made only by Engine._accept; every field is owned by that
    Engine. Not constructible from Python (it would own no socket)."""
    cdef Engine eng
    cdef ServiceState svc
    cdef int cfd                         # client socket, -1 once closed
    cdef int bfd                         # backend socket, -1 when none
    cdef int state                       # S_CONNECTING, S_OPEN, S_CLOSED
    cdef Buf c2b
    cdef Buf b2c
    cdef bint c_eof                      # the client sent EOF
    cdef bint b_eof                      # the backend sent EOF
    cdef bint c2b_shut                   # we shut down writing to the backend
    cdef bint b2c_shut                   # we shut down writing to the client
    cdef bint b_seen                     # the backend has sent a byte (a passive success)
    cdef uint32_t cev                    # epoll interest registered for cfd (0: not in the set)
    cdef uint32_t bev
    cdef int slot                        # the backend picked last (-1: none yet)
    cdef int tried[MAX_TRIED]
    cdef int ntried
    cdef int attempts
    cdef uint64_t key                    # consistent-hashing key (HASH_NONE: 0)
    cdef double deadline                 # connect deadline (coarse clock)
    cdef double last                     # last activity (coarse clock)
    cdef bint counted                    # counted in CTR_ACTIVE of self.slot
    # -- connection limits and queues (issue 11, `limits`: core/limits.pxi) --
    cdef bint admitted                   # holds a place in the global and service G_CUR
    cdef int srow                        # the service row it holds that place in
    cdef bint slot_taken                 # holds a place in G_CUR of self.slot's row
    cdef uint32_t capmask                # bit i: tried[i] was skipped at its cap, not failed
    cdef bint inqueue                    # linked in svc's queue (qprev/qnext)
    cdef Session qprev
    cdef Session qnext
    cdef double qdeadline                # leave the queue by then (coarse clock)

    # [access] (core/admission.pxi): the client as ACLs, source limits, Maglev and PROXY send
    # see it (the real peer, or an accepted PROXY header's source), the header's destination
    # (UNSPEC: the listener's address), the source entry to release at close.
    cdef flb_addr client
    cdef flb_addr local
    cdef bint pp_wait                    # S_WAITING for a PROXY header
    cdef unsigned char *pp_buf           # a header's first bytes while incomplete (or NULL)
    cdef int pp_have                     # bytes in pp_buf
    cdef SourceTable srctab
    cdef Py_ssize_t src_entry            # -1: nothing to release

    # [mem] buffer waits (core/buffers.pxi) and timers (core/timers.pxi)
    cdef int bwait                       # directions waiting for a buffer (BUF_WAIT_*)
    cdef bint wlinked                    # in one of the engine's wait FIFOs
    cdef bint wsecond                    # ... the one of sessions holding a buffer
    cdef void *wprev
    cdef void *wnext
    cdef double born                     # accepted at (coarse clock)
    cdef double first_sent               # the first client byte reached the backend (0: not yet)

    # [obs] the connection log and histograms (core/connlog.pxi): times CLOCK_MONOTONIC ns;
    # the client is [access]'s `client` above (the accept peer, or the PROXY source)
    cdef unsigned short lport            # the listener's local port
    cdef unsigned char term              # TERM_* (core/connlog.pxi), set where it ends
    cdef int64_t t_acc, t_conn, t_est, t_first
    cdef uint64_t nbin, nbout            # bytes client -> backend, backend -> client

    # [tls] TLS termination (core/tls.pxi): the client side through OpenSSL (NULL: plain TCP)
    cdef SSL *ssl
    cdef TlsContext tlsctx               # its contexts (and SNI table) stay alive for it
    cdef unsigned char tls_want          # TLSW_*: what OpenSSL asked of the other direction

    # [lean] (core/lean.pxi) TCP_NODELAY on the backend (LEAN_ND_*), FINs seen (LEAN_FIN_*)
    cdef unsigned char lean_nd
    cdef unsigned char lean_fin

    # [orig] TLS origination (core/tls_orig.pxi): the backend side through OpenSSL (NULL: plain)
    cdef SSL *bssl
    cdef OrigContext origctx             # its contexts and session cache stay alive for it
    cdef bint bhs                        # the backend handshake runs (state S_CONNECTING)
    cdef uint32_t bhs_want               # ... and waits for this backend event
    cdef unsigned char btls_want         # TLSW_*: what OpenSSL asked of the backend
    cdef bint btls_failed                # the last attempt's handshake failed ...
    cdef long bverify                    # ... with this verify result (0: not verification)
    # [sni] routing by the ClientHello (core/sni.pxi): the table, the bytes read so far
    cdef SniTable sni
    cdef unsigned char *sni_buf
    cdef int sni_have

    def __cinit__(self):
        # Every Session starts owning nothing, even one made by Session.__new__ from Python,
        # so that freeing it can never close an fd it does not own (fd 0 of a zeroed object).
        self.cfd = -1
        self.bfd = -1
        self.slot = -1
        self.src_entry = -1
        flb_dbg_add(FLB_DBG_SESSIONS, 1)

    def __init__(self):
        raise CoreTypeError("a Session is made by its Engine when it accepts a connection; "
                            "it cannot be built from Python")

    # -- epoll interest ----------------------------------------------------------------------
    cdef inline int _watch(self, int fd, uint32_t *cur, uint32_t want, int tag) noexcept:
        """Make ``fd``'s registered interest ``want`` (0: out of the set). 0, or -1 with errno
        set when the kernel refused (the caller closes the session: it could never wake)."""
        cdef epoll_event ev
        cdef int op
        want = lean_interest(want)              # [lean] EPOLLRDHUP with EPOLLIN
        if want == cur[0] or fd < 0:
            return 0
        ev.events = want
        ev.data.u64 = (<uint64_t><uintptr_t><void *>self) | <uint64_t>tag
        if want == 0:
            op = EPOLL_CTL_DEL
        elif cur[0] == 0:
            op = EPOLL_CTL_ADD
        else:
            op = EPOLL_CTL_MOD
        if flb_dbg_epoll_should_fail():         # debug builds only: fault injection
            errno = ENOMEM
            return -1
        if epoll_ctl(self.eng.epfd, op, fd, &ev) < 0:
            return -1
        cur[0] = want
        return 0

    cdef void _update(self) noexcept:
        """Register exactly the interest the state asks for (see the header's invariant)."""
        cdef uint32_t cw = 0, bw = 0
        if self.state == S_CLOSED:
            return
        if self.bwait & BUF_WAIT_C2B:
            pass                                # [mem] no buffer to read into: wait
        elif not self.c_eof and self.c2b.end == 0:
            cw |= EPOLLIN                       # c2b empty: read the client
        elif (not self.c_eof and (self.state == S_CONNECTING or self.state == S_QUEUED)
                and self.c2b.end < tls_fill_cap(self)):     # [tls] room for a record
            cw |= EPOLLIN                       # before connect (or queued): fill c2b
        if self.b2c.end > self.b2c.start:
            cw |= EPOLLOUT                      # unsent bytes for the client
        if self.tls_want:
            cw |= tls_interest(self)            # [tls] OpenSSL needs the other direction
        if self.state == S_CONNECTING:
            bw = self.bhs_want if self.bhs else EPOLLOUT    # [orig] the backend handshake
        else:
            if not self.b_eof and self.b2c.end == 0 and not (self.bwait & BUF_WAIT_B2C):
                bw |= EPOLLIN
            if self.c2b.end > self.c2b.start:
                bw |= EPOLLOUT
            if self.btls_want:
                bw |= orig_interest(self)       # [orig] OpenSSL needs the other direction
        if (self._watch(self.cfd, &self.cev, cw, TAG_CLIENT) < 0
                or self._watch(self.bfd, &self.bev, bw, TAG_BACKEND) < 0):
            self.eng._epoll_failed(self, errno)

    # -- moving bytes -------------------------------------------------------------------------
    cdef int _flush(self, Buf *b, int dst) noexcept:
        """Send b's unsent bytes to dst. 1: all sent, 0: would block, -1: error (closed)."""
        cdef ssize_t w
        if b.piped:                             # [splice] the bytes are in a pipe
            return spl_flush(self, b, dst)
        while b.end > b.start:
            if dst == self.cfd and self.ssl != NULL:                # [tls]
                w = _tls_send(self, b.data + b.start, b.end - b.start)
            elif dst == self.bfd and self.bssl != NULL:             # [orig]
                w = _orig_send(self, b.data + b.start, b.end - b.start)
            else:
                if dst == self.bfd and self.lean_nd != LEAN_ND_SET:
                    lean_before_send(self)      # [lean] TCP_NODELAY from the 2nd send on
                w = send(dst, b.data + b.start, b.end - b.start, MSG_NOSIGNAL | lean_more(self, b))
            if w > 0:
                b.start += w
                self.last = self.eng.now
                if self.first_sent == 0 and dst == self.bfd:
                    self.first_sent = self.eng.now  # [mem] first_byte's clock starts
            elif errno == EINTR:
                continue
            elif errno == EAGAIN:
                return 0
            else:
                self.term = TERM_CD if dst == self.cfd else TERM_SD     # [obs]
                self._close()
                return -1
        b.start = 0
        b.end = 0
        _buf_put(self, b)                       # [mem] drained: back to the pool
        return 1

    cdef int _pump(self, int src, int dst, Buf *b, int field, bint *eof) noexcept:
        """Read src and forward to dst until src would block, dst would block, or EOF.
        Precondition: b is empty. Returns -1 when the session was closed."""
        cdef ssize_t r
        cdef int got
        cdef Py_ssize_t moved = 0               # [splice] this wake-up's bytes (fairness)
        if spl_wanted(self, b):                 # [splice] a bulk direction: zero-copy
            got = spl_pump(self, src, dst, b, field, eof)
            if got != SPL_NO_PIPE:
                return got
        while True:
            if b.data == NULL:                  # [mem] given back when drained: take one
                got = _buf_get(self, b)
                if got <= 0:                    # 0: waits for one (out of EPOLLIN)
                    if got < 0:
                        self.term = TERM_NO_BUFFER  # [obs]
                        self._close()
                    return got
            if src == self.cfd and self.ssl != NULL:                # [tls]
                r = _tls_recv(self, b.data, ENGINE_BUFSIZE)
            elif src == self.bfd and self.bssl != NULL:             # [orig]
                r = _orig_recv(self, b.data, ENGINE_BUFSIZE)
            else:
                r = recv(src, b.data, ENGINE_BUFSIZE, 0)
            if r > 0:
                if src == self.bfd and not self.b_seen:
                    self.b_seen = True
                    self.eng.consec[self.slot] = 0
                    self.t_first = _mono_ns()   # [obs] Tr ends
                self.last = self.eng.now
                if src == self.cfd:             # [obs] per-session bytes (the log)
                    self.nbin += r
                else:
                    self.nbout += r
                self.eng.counters.add_c(self.eng.block, self.slot, field, r)
                b.start = 0
                b.end = r
                if lean_eof_after(self, src, r < ENGINE_BUFSIZE):
                    eof[0] = True               # [lean] the EOF is next: no read for it, and
                if self._flush(b, dst) <= 0:    # the data goes with our FIN (lean_more)
                    return -1 if self.state == S_CLOSED else 0
                moved += r
                if spl_after_recv(self, b, r, moved) or eof[0]:    # [splice] drained, a
                    return 0                    # streamer, the budget; or the EOF
            elif r == 0:
                eof[0] = True
                _buf_put(self, b)               # [mem]
                return 0
            elif errno == EINTR:
                continue
            elif errno == EAGAIN:
                _buf_put(self, b)               # [mem] nothing read: hold no buffer
                return 0
            else:
                if src == self.bfd and not self.b_seen:
                    self.eng._passive_failure(self.svc, self.slot, errno)
                self.term = TERM_CD if src == self.cfd else TERM_SD     # [obs]
                self._close()
                return -1

    cdef void _shut_if_done(self) noexcept:
        """Pass an EOF on once its direction is flushed; close when both directions are shut."""
        if lean_close_both(self):               # [lean] both done: close, no shutdown()
            return
        if self.c_eof and not self.c2b_shut and self.state == S_OPEN and self.c2b.end == 0:
            orig_shut_wr(self)                  # [orig] close_notify first
            shutdown(self.bfd, SHUT_WR)
            self.c2b_shut = True
        if self.b_eof and not self.b2c_shut and self.b2c.end == 0:
            tls_shut_wr(self)                   # [tls] close_notify first
            shutdown(self.cfd, SHUT_WR)
            self.b2c_shut = True
        if self.c2b_shut and self.b2c_shut:
            self._close()

    # -- events --------------------------------------------------------------------------------
    cdef void on_client(self, uint32_t events) noexcept:
        cdef ssize_t r
        lean_saw(self, events, LEAN_FIN_C)      # [lean]
        if self.state == S_WAITING:             # [access] before connect
            adm_on_client(self, events)
            return
        if self.state == S_HANDSHAKE:           # [tls] before connect
            tls_on_handshake(self, events)
            return
        if self.state == S_SNI:                 # [sni] before the service is known
            sni_on_client(self, events)
            return
        if self.tls_want:                       # [tls] what OpenSSL waited for may be here:
            self.tls_want = 0                   # retry both directions
            events |= EPOLLIN | EPOLLOUT
        if events & (EPOLLOUT | EPOLLERR | EPOLLHUP) and self.b2c.end > self.b2c.start:
            if self._flush(&self.b2c, self.cfd) < 0:
                return
        if events & (EPOLLIN | EPOLLERR | EPOLLHUP) and not self.c_eof:
            if self.state == S_OPEN:
                if self.c2b.end == 0:
                    if self._pump(self.cfd, self.bfd, &self.c2b, CTR_BYTES_IN, &self.c_eof) < 0:
                        return
            elif self.c2b.end < tls_fill_cap(self):  # connecting: keep what the client sends
                r = _buf_get(self, &self.c2b)
                if r < 0:
                    self.term = TERM_NO_BUFFER      # [obs]
                    self._close()
                    return
                if r > 0:                       # [mem] 0: waits for a buffer
                    if self.ssl != NULL:        # [tls]
                        r = _tls_recv(self, self.c2b.data + self.c2b.end,
                                      ENGINE_BUFSIZE - self.c2b.end)
                    else:
                        r = recv(self.cfd, self.c2b.data + self.c2b.end,
                                 ENGINE_BUFSIZE - self.c2b.end, 0)
                    if r > 0:
                        self.c2b.end += r
                    elif r == 0:
                        self.c_eof = True
                    elif errno != EAGAIN and errno != EINTR:
                        self.term = TERM_CC         # [obs] the client aborted while connecting
                        self._close()
                        return
                    _buf_put(self, &self.c2b)   # [mem] nothing kept: hold no buffer
        self._shut_if_done()
        self._update()

    cdef void on_backend(self, uint32_t events) noexcept:
        cdef int err
        if self.bhs:                            # [orig] the backend handshake
            orig_on_handshake(self, events)
            return
        if self.btls_want:                      # [orig] what OpenSSL waited for may be here
            self.btls_want = 0
            events |= EPOLLIN | EPOLLOUT
        if self.state == S_CONNECTING:
            err = lean_connect_error(self, events)      # [lean] no getsockopt when connected
            if err == 0:
                self._established()
            else:
                self._connect_failed(err)
            return
        lean_saw(self, events, LEAN_FIN_B)      # [lean]
        if events & (EPOLLOUT | EPOLLERR | EPOLLHUP) and self.c2b.end > self.c2b.start:
            if self._flush(&self.c2b, self.bfd) < 0:
                return
        if events & (EPOLLIN | EPOLLERR | EPOLLHUP) and not self.b_eof and self.b2c.end == 0:
            if self._pump(self.bfd, self.cfd, &self.b2c, CTR_BYTES_OUT, &self.b_eof) < 0:
                return
        self._shut_if_done()
        self._update()

    # -- connecting ----------------------------------------------------------------------------
    cdef void _connect(self) noexcept:
        """Connect to the next pick; on immediate failure try the next; none left: close.
        A callback run on a failure may have closed the session (the loop stops then)."""
        cdef ServiceState svc = self.svc
        cdef int slot, fd, r
        cdef bytes sa
        cdef const char *sap
        while self.state != S_CLOSED and self.attempts <= svc.retries and svc.policy is not None:
            self.attempts += 1
            cl_attempt(self)                    # [obs] Tw ends, Tc starts
            slot = (<Policy>svc.policy).pick_c(self.key, self.tried, self.ntried)
            if slot < 0:
                break
            sa = svc.sockaddrs.get(slot)
            if sa is None:
                break
            r = lim_take_backend(self, slot)    # [limits] backends[].max_conns
            if r == 0:
                continue                        # at its cap: skipped for this pick
            if r < 0:
                break
            if self.slot >= 0:                  # a retry: the last backend tried failed
                self.eng.counters.add_c(self.eng.block, self.slot, CTR_RETRIES, 1)
            sap = PyBytes_AS_STRING(sa)
            self.slot = slot
            fd = socket((<const sockaddr *>sap).sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
            if fd < 0:
                self._failed_attempt(errno)
                continue
            flb_dbg_add(FLB_DBG_FDS, 1)
            self.lean_nd = LEAN_ND_NONE         # [lean] TCP_NODELAY before its 2nd send
            _keepalive(fd, svc)                 # [mem]
            lean_before_connect(self, fd)       # [lean] the handshake's ACK rides on the data
            self.bfd = fd
            self.bev = 0
            if connect(fd, <const sockaddr *>sap, <socklen_t>len(sa)) == 0:
                self._established()
                return
            if errno == EINPROGRESS:
                self.state = S_CONNECTING
                self.deadline = self.eng.now + svc.connect_timeout
                self.eng.connecting.add(self)
                r = lean_early_send(self)       # [lean] connected already? send at once
                if r == 0:
                    self._update()
                    return
                if r > 0 or self.state == S_CLOSED:
                    return
                self.eng.connecting.discard(self)
                self._failed_attempt(-r)        # refused: the next pick
                continue
            self._failed_attempt(errno)
        if self.state != S_CLOSED:
            self._give_up()

    cdef void _failed_attempt(self, int err) noexcept:
        """The connect to self.slot failed (err, or 0 for a timeout): count it, tell the policy
        and the orchestration, remember the slot as tried."""
        cdef ServiceState svc = self.svc
        cdef int slot = self.slot
        cl_failed(self, err)                    # [obs] SC / sC / RC unless a later one connects
        if lim_local_error(self, err):          # [limits] ours, not the backend's: closed
            return
        orig_drop(self)                         # [orig] the backend's SSL, before its fd
        if self.bfd >= 0:
            _close_fd(self.bfd)        # also leaves the epoll set
            self.bfd = -1
            self.bev = 0
        lim_give_backend(self)                  # [limits] its place at that backend
        self.eng.counters.add_c(self.eng.block, slot, CTR_CONNECT_FAILURES, 1)
        if self.ntried < MAX_TRIED:
            self.tried[self.ntried] = slot
            self.ntried += 1
        if svc.policy is not None:
            (<Policy>svc.policy).on_failure(slot)
        self.eng._passive_failure(svc, slot, err)
        if svc.on_connect_error is not None:
            self.eng._callback(svc, "on_connect_error", svc.on_connect_error,
                               (slot, orig_exc(self, err) if self.btls_failed     # [orig]
                                else OSError(err, strerror(err).decode()) if err
                                else TimeoutError("connect timeout")))

    cdef void _connect_failed(self, int err) noexcept:
        self.eng.connecting.discard(self)
        self.state = S_CONNECTING
        self._failed_attempt(err)
        self._connect()

    cdef void _give_up(self) noexcept:
        if lim_queue(self):                     # [limits] every usable backend at its cap
            return
        lim_count(self.eng, self.svc.row, G_NO_BACKEND)
        if self.term == TERM_UNSET:             # [obs] nothing to try: no backend
            self.term = TERM_SC
        if self.svc.on_no_backend is not None:
            self.eng._callback(self.svc, "on_no_backend", self.svc.on_no_backend, ())
        self._close()

    cdef void _established(self) noexcept:
        if orig_begin(self):                    # [orig] the TLS handshake with the backend first
            return
        self.eng.connecting.discard(self)
        self.state = S_OPEN
        cl_established(self)                    # [obs] Tc, the connect-time histogram
        self.counted = True
        self.eng.counters.add_c(self.eng.block, self.slot, CTR_ACTIVE, 1)
        self.eng.counters.add_c(self.eng.block, self.slot, CTR_TOTAL, 1)
        if (self.svc.adm is not None and self.bssl == NULL      # [orig] sent before TLS
                and adm_send_header(self) < 0):                 # [access] PROXY send
            return
        if self.c2b.end > 0:                    # what the client sent meanwhile
            self.eng.counters.add_c(self.eng.block, self.slot, CTR_BYTES_IN, self.c2b.end)
            self.nbin += self.c2b.end           # [obs]
            if self._flush(&self.c2b, self.bfd) < 0:
                return
        self._shut_if_done()
        self._update()

    # -- the end ---------------------------------------------------------------------------------
    cdef void _close(self) noexcept:
        """Close both sockets, give the buffers back, leave the engine's sets. Idempotent."""
        if self.state == S_CLOSED:
            return
        cdef Engine eng = self.eng
        cdef char *cbuf
        cdef char *bbuf
        cl_close(self)                          # [obs] termination code, histogram, log record
        if self.state == S_CONNECTING or self.state == S_WAITING:
            eng.connecting.discard(self)
        cdef bint freed = lim_release(self)     # [limits] queue, backend and service places

        adm_close(self)                         # [access] the source entry, once
        tls_close(self)                         # [tls] the SSL, once
        orig_drop(self)                         # [orig] the backend's SSL
        self.origctx = None
        sni_close(self)                         # [sni] the hello's scratch
        spl_close(self)                         # [splice] pipes back to the pool
        self.state = S_CLOSED
        eng.graveyard.append(self)              # alive until this batch of events is done
        eng.sessions.discard(self)
        if self.counted:
            self.counted = False
            eng.counters.add_c(eng.block, self.slot, CTR_ACTIVE, -1)
        if self.cfd >= 0:
            _close_fd(self.cfd)
            self.cfd = -1
        if self.bfd >= 0:
            _close_fd(self.bfd)
            self.bfd = -1
        _buf_unwait(self)                       # [mem] waits for no buffer any more
        self.bwait = 0
        cbuf = self.c2b.data
        bbuf = self.b2c.data
        self.c2b.data = NULL
        self.b2c.data = NULL
        eng._give_buffer(cbuf)                  # (may hand them to waiters at once)
        eng._give_buffer(bbuf)
        lim_closed(eng, self.svc, freed)        # [limits] re-arm listeners, serve the queue

    def __dealloc__(self):
        # Only a session never closed (its engine freed without close()) still owns anything.
        if self.cfd >= 0:
            close(self.cfd)
            flb_dbg_add(FLB_DBG_FDS, -1)
        if self.bfd >= 0:
            close(self.bfd)
            flb_dbg_add(FLB_DBG_FDS, -1)
        _free_buffer(self.c2b.data, True)
        _free_buffer(self.b2c.data, True)
        free(self.pp_buf)                       # [access] a PROXY header's scratch
        free(self.sni_buf)                      # [sni] a ClientHello's scratch
        spl_dealloc(self)                       # [splice] pipes it still holds
        if self.ssl != NULL:                    # [tls] a session never closed
            SSL_free(self.ssl)
        if self.bssl != NULL:                   # [orig]
            SSL_free(self.bssl)
        flb_dbg_add(FLB_DBG_SESSIONS, -1)
