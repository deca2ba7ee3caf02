# [lean] issue 15: a leaner connection path, and one wake-up per connection across workers.
#
# Syscalls of one proxied short connection (measured with bench/syscalls.py, strace -c over a
# `Connection: close` load; docs/ARCHITECTURE.md, "A leaner connection path"). What this file
# takes out of the path, each as HAProxy does it:
#   - getsockopt(SO_ERROR) after a connect: the connect result comes with the event. EPOLLOUT
#     without EPOLLERR/EPOLLHUP is a connected socket; only a failure asks SO_ERROR for its errno
#     (lean_connect_error). HAProxy's sock_conn_check() likewise trusts the poller's flags.
#   - TCP_NODELAY on every accepted socket: set once on the listening socket, the accepted ones
#     inherit it (Linux copies the listener's tcp_sock; tests/unit/test_lean.py checks this
#     kernel). A listener where that setsockopt fails keeps the per-accept call.
#   - TCP_NODELAY on every backend socket: Nagle only holds a small segment back while earlier
#     data is unacknowledged, so the first send of a connection never waits; the option is set
#     just before the second send to the backend (lean_before_send), in time for anything
#     that could wait. A short request/response connection sends once and never pays for it.
#   - the recv() that returns 0 after the last data: with EPOLLRDHUP in the interest, an event
#     that says the peer's FIN is in and a read shorter than asked mean the FIN comes next
#     (TCP delivers in order, the read stopped at it): EOF without another recv (HAProxy's
#     raw_sock_to_buf: "ret < try" and FD_POLL_HUP -> read0).
#   - shutdown(SHUT_WR) before a close() that ends both directions: once both peers have sent
#     their EOF and both buffers are flushed, close() alone sends the FINs, after what the kernel
#     still holds (no unread data is left on either socket, so close() sends no RST).
#
# One wake-up per connection across workers. The listening socket is shared by the workers and
# registered with EPOLLEXCLUSIVE. The kernel honours "exclusive" only where a task sleeps in
# epoll_wait on that very epoll set (ep_poll_callback counts an exclusive wake only when the
# set's own wait queue has a waiter); the engine's epoll set is itself watched by the event
# loop's epoll (nested), so nobody sleeps on it directly, and every worker's loop was woken for
# each connection (measured: docs/ARCHITECTURE.md). So a shared listener is registered in the
# EVENT LOOP's own epoll set, with EPOLLEXCLUSIVE, its event data naming a private eventfd that
# is never written and that the loop watches with add_reader: libuv (and asyncio's selector)
# dispatch an epoll event by the fd in its data, so the exclusive wake-up lands on that reader,
# which accepts (Engine._on_listener). The loop's epoll fd is found once, as the set that holds
# the engine's own epoll fd (/proc/self/fdinfo). Where it cannot be found (a loop that has not
# polled yet), the listener goes into the engine's set as before.
#
# Counters: Engine.accept_wakeups (listener events handled) and Engine.accepted (connections
# accepted); their ratio is the wake-ups per connection (stats "memory": accept_wakeups,
# accepted, summed over the workers).

cdef extern from "<sys/epoll.h>" nogil:
    enum:
        EPOLLRDHUP

cdef extern from "<sys/eventfd.h>" nogil:
    enum:
        EFD_CLOEXEC
        EFD_NONBLOCK
    int eventfd(unsigned int initval, int flags)

cdef enum:
    # Session.lean_nd: TCP_NODELAY on the backend socket
    LEAN_ND_NONE = 0        # nothing sent yet (the first send cannot wait on Nagle)
    LEAN_ND_ONE = 1         # one send done: set it before the next
    LEAN_ND_SET = 2         # set (or not wanted: a caller that sets it itself puts SET)
    # Session.lean_fin: the peer's FIN was seen in an event (EPOLLRDHUP) of
    LEAN_FIN_C = 1          # the client socket
    LEAN_FIN_B = 2          # the backend socket


cdef inline int lean_connect_error(Session s, uint32_t events) noexcept:
    """The outcome of a non-blocking connect, from its event (the backend socket is watched for
    EPOLLOUT only while connecting): 0 connected, else the errno. SO_ERROR is asked on failure
    only (an error with no errno reported counts as a refusal, as before)."""
    cdef int err = 0
    cdef socklen_t elen = sizeof(int)
    if not (events & (EPOLLERR | EPOLLHUP)):
        return 0
    if getsockopt(s.bfd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0:
        err = errno
    return err if err != 0 else ECONNREFUSED


cdef inline void lean_before_send(Session s) noexcept:
    """Before a send() to the backend: from the second send on, TCP_NODELAY (see the header)."""
    cdef int one = 1
    if s.lean_nd == LEAN_ND_NONE:
        s.lean_nd = LEAN_ND_ONE
    elif s.lean_nd == LEAN_ND_ONE:
        setsockopt(s.bfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(int))
        s.lean_nd = LEAN_ND_SET


cdef inline void lean_nodelay_now(Session s) noexcept:
    """[orig] A backend spoken to through OpenSSL sends several records (the handshake's, then
    data right after its Finished): TCP_NODELAY at once, as main did for every backend."""
    cdef int one = 1
    if s.lean_nd != LEAN_ND_SET:
        setsockopt(s.bfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(int))
        s.lean_nd = LEAN_ND_SET


cdef inline void lean_saw(Session s, uint32_t events, int which) noexcept:
    """An event of one socket: remember a FIN it reports (EPOLLRDHUP is for good once set)."""
    if events & EPOLLRDHUP:
        s.lean_fin |= which


cdef inline bint lean_eof_after(Session s, int src, bint short) noexcept:
    """_pump forwarded what it read from ``src`` (``short``: fewer bytes than asked): is the
    EOF next? Plain TCP: a short read with the peer's FIN seen (EPOLLRDHUP). Through OpenSSL:
    the peer's close_notify was read with the data (SSL_read reads on to it when records follow
    one another), and nothing would report it again: the socket may stay open, and quiet."""
    if src == s.cfd:
        if s.ssl != NULL:                                               # [tls]
            return (SSL_get_shutdown(s.ssl) & SSL_RECEIVED_SHUTDOWN) != 0
        return short and (s.lean_fin & LEAN_FIN_C) != 0
    if s.bssl != NULL:                                                  # [orig]
        return (SSL_get_shutdown(s.bssl) & SSL_RECEIVED_SHUTDOWN) != 0
    return short and (s.lean_fin & LEAN_FIN_B) != 0


cdef inline int lean_more(Session s, Buf *b) noexcept:
    """The flags of a plain send() of direction ``b``: MSG_MORE when its source has sent its EOF,
    so these are its last bytes and our FIN follows at once (shutdown(SHUT_WR), or close() in
    lean_close_both, both right after the flush): the kernel holds the last partial segment and
    the FIN rides on it, one segment and one ACK instead of two of each (the peer is woken once).
    _shut_if_done runs after every flush of a direction whose source sent EOF, so nothing waits
    corked: a send that would block leaves the rest to a later flush, made with MSG_MORE too."""
    if b == &s.b2c:
        return MSG_MORE if s.b_eof else 0
    return MSG_MORE if s.c_eof else 0


cdef inline uint32_t lean_interest(uint32_t want) noexcept:
    """The interest to register: EPOLLRDHUP with every EPOLLIN (a FIN is then reported as such)."""
    return want | EPOLLRDHUP if want & EPOLLIN else want


cdef inline bint lean_close_both(Session s) noexcept:
    """Both directions are done (each peer sent its EOF and what it sent is flushed, or the
    direction is shut already): close without shutdown(); close() sends the FINs. True: closed."""
    if not (s.c2b_shut or (s.c_eof and s.state == S_OPEN and s.c2b.end == 0)):
        return False
    if not (s.b2c_shut or (s.b_eof and s.b2c.end == 0)):
        return False
    if not s.b2c_shut:
        tls_shut_wr(s)                      # [tls] close_notify before the FIN
    if not s.c2b_shut:
        orig_shut_wr(s)                     # [orig] the TLS backend's close_notify too
    s.c2b_shut = True                       # [obs] a normal end (connlog's TERM_NORMAL)
    s.b2c_shut = True
    s._close()
    return True


# -- listeners: the wake-up arrangement -----------------------------------------------------------
def _loop_epoll_fd(int engine_epfd):
    """The epoll fd of this process that watches ``engine_epfd`` with it as event data (the
    event loop's: libuv and asyncio's selector register fds so), or -1. Cold path: once."""
    import os
    import re
    pattern = re.compile(r"tfd:\s*(\d+)\s+events:\s*[0-9a-fA-F]+\s+data:\s*([0-9a-fA-F]+)")
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd == engine_epfd:
            continue
        try:
            if os.readlink(f"/proc/self/fd/{name}") != "anon_inode:[eventpoll]":
                continue
            with open(f"/proc/self/fdinfo/{name}") as f:
                text = f.read()
        except OSError:
            continue
        for m in pattern.finditer(text):
            if int(m.group(1)) == engine_epfd and int(m.group(2), 16) & 0xffffffff == engine_epfd:
                return fd
    return -1


cdef void lean_listen_shared(Engine eng, Listener lst, epoll_event *ev):
    """A listener shared by worker processes: register it in the event loop's epoll set with
    EPOLLEXCLUSIVE, its events carried to a reader of its own (see the header). Leaves ``lst``
    on the engine's set when the loop's set is not found. Raises OSError (nothing kept)."""
    if eng.lean_loopfd == -2:
        eng.lean_loopfd = _loop_epoll_fd(eng.epfd)
    if eng.lean_loopfd < 0:
        return
    cdef int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
    if efd < 0:
        raise OSError(errno, f"eventfd for listener fd {lst.fd}: {strerror(errno).decode()}")
    try:
        eng.loop.add_reader(efd, eng._on_listener, lst)
    except BaseException:
        close(efd)
        raise
    lst.lean_efd = efd
    lst.lepfd = eng.lean_loopfd
    ev.data.u64 = <uint64_t>efd             # libuv/asyncio read data.fd: the reader's fd


cdef void lean_unlisten(Engine eng, Listener lst):
    """After the listener left its epoll set: drop its reader and eventfd."""
    if lst.lean_efd >= 0:
        eng.loop.remove_reader(lst.lean_efd)
        close(lst.lean_efd)
        lst.lean_efd = -1


# -- the first exchange: read at accept, send right after connect ------------------------------
# On loopback (and wherever the SYN-ACK is processed before connect() returns: the kernel runs
# the local peer's handshake inside the connect call) the backend socket is established when
# connect() says EINPROGRESS. With the client's first bytes in hand at that moment, the first
# exchange needs no epoll round (HAProxy's speculative I/O: it tries its send right after
# connect):
#   accept4, recv (the request), socket, connect, send (the request), epoll_ctl ADD x 2
# instead of
#   accept4, epoll_ctl ADD client, socket, connect, epoll_ctl ADD backend (EPOLLOUT),
#   [wake] recv, [wake] send, epoll_ctl MOD backend (EPOLLIN).
# And with the bytes in hand, TCP_DEFER_ACCEPT on the CONNECTING socket makes its kernel hold the
# handshake's last ACK for a moment (tcp_rcv_synsent_state_process, "Save one ACK") so that it
# rides on the request: one segment fewer per connection, on this core.
#
# The bytes are in hand at accept only where the listener has TCP_DEFER_ACCEPT (the service's
# `defer_accept`): the kernel then hands over a connection once it has data. Without it, the read
# right after accept found nothing in 80% of the connections of a `Connection: close` load
# (measured: wrk connects, and writes only once its own poll says the socket is writable, after
# we accepted), a wasted syscall each: so it is not made there.
#
# A guess that misses costs one syscall (a recv or send that says EAGAIN: a defer_accept timeout
# that handed over a silent client, a remote backend still connecting). Each listener and each
# backend slot keeps a score: hits raise it (up to LEAN_SPEC_MAX), a miss lowers it by
# LEAN_SPEC_MISS, and below 0 the guess is skipped, the score rising by one per skipped
# connection. A backend that always misses (not local) costs one send every LEAN_SPEC_MISS + 1
# connections; one that hits keeps guessing through occasional misses. Counters:
# Engine.spec_hits and spec_misses (fastlb_process_speculative_io_total, ..._misses_total).

cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_DEFER_ACCEPT

cdef enum:
    LEAN_SPEC_MAX = 32
    LEAN_SPEC_MISS = 8


cdef inline bint lean_try(int *score) noexcept:
    """Guess now (a listener's or a slot's score)? A skipped guess moves the score back up."""
    if score[0] >= 0:
        return True
    score[0] += 1
    return False


cdef inline void lean_scored(Engine eng, int *score, bint hit) noexcept:
    if hit:
        eng.spec_hits += 1
        if score[0] < LEAN_SPEC_MAX:
            score[0] += 1
    else:
        eng.spec_misses += 1
        score[0] -= LEAN_SPEC_MISS


cdef void lean_first_read(Session s, Listener lst) noexcept:
    """Right after accept on a TCP_DEFER_ACCEPT listener (plain TCP, nothing to wait for before
    the connect): read what the client sent into c2b, so that lean_early_send can pass it on with
    the connect. No buffer is waited for: without one the session reads when epoll says so."""
    cdef ssize_t r
    if not lst.deferred or not lean_try(&lst.lean_spec):
        return
    if s.bwait or not _buf_allowed(s.eng, _buf_held(s)):
        return
    if _buf_get(s, &s.c2b) < 0:             # out of memory: the normal path will say so
        return
    r = recv(s.cfd, s.c2b.data, ENGINE_BUFSIZE, 0)
    if r > 0:
        s.c2b.end = r
        s.last = s.eng.now
        lean_scored(s.eng, &lst.lean_spec, True)
        return
    if r == 0:
        s.c_eof = True                      # connect, then EOF: passed on once connected
    elif errno == EAGAIN:
        lean_scored(s.eng, &lst.lean_spec, False)
    elif errno != EINTR:
        s.term = TERM_CC                    # [obs] the client aborted at once
        _buf_put(s, &s.c2b)
        s._close()
        return
    _buf_put(s, &s.c2b)


cdef inline bint lean_early_ok(Session s) noexcept:
    """May the first bytes go to the backend right after connect? Plain TCP to the backend (a
    TLS backend handshakes first), no PROXY header to send first, bytes in c2b's buffer."""
    if s.c2b.end <= s.c2b.start or s.c2b.piped or s.c2b.data == NULL:
        return False
    if s.svc.orig is not None:
        return False
    if s.svc.adm is not None and _adm_pp_version(s.svc.adm, s.slot) != 0:
        return False
    return True


cdef inline void lean_before_connect(Session s, int fd) noexcept:
    """Before connect(): with bytes to send right after it, TCP_DEFER_ACCEPT on the connecting
    socket, so the handshake's last ACK waits for them (see the header). Also for a slot whose
    early sends miss (a remote backend): its kernel still wakes us for EPOLLOUT when the SYN-ACK
    comes, and the ACK leaves with the bytes we send then (at the latest after TCP_DELACK_MAX,
    200 ms, were nothing sent)."""
    cdef int one = 1
    if lean_early_ok(s):
        setsockopt(fd, IPPROTO_TCP, TCP_DEFER_ACCEPT, &one, sizeof(int))


cdef int lean_early_send(Session s) noexcept:
    """After a connect() that said EINPROGRESS: send c2b's bytes now. 1: sent, so connected (the
    session is established); 0: not tried, or not connected yet (wait for EPOLLOUT as usual);
    -errno: the connect failed (refused, unreachable): the caller tries the next backend."""
    cdef ssize_t w
    cdef int err
    cdef int *score
    if not lean_early_ok(s):
        return 0
    score = &s.eng.lean_early[s.slot]
    if not lean_try(score):
        return 0
    w = send(s.bfd, s.c2b.data + s.c2b.start, s.c2b.end - s.c2b.start,
             MSG_NOSIGNAL | lean_more(s, &s.c2b))
    if w < 0:
        err = errno
        if err == EAGAIN or err == EINTR:
            lean_scored(s.eng, score, False)
            return 0
        return -err
    lean_scored(s.eng, score, True)
    s.c2b.start += w
    s.lean_nd = LEAN_ND_ONE                 # one send made: TCP_NODELAY before the next
    s.last = s.eng.now
    s.first_sent = s.eng.now                # [mem] first_byte's clock starts
    s._established()
    return 1



cdef void lean_listener_opts(Listener lst) noexcept:
    """What the listening socket's options mean for the accept path: TCP_DEFER_ACCEPT (set by
    the supervisor from `defer_accept`) means data comes with each accepted connection. Read at
    listen() and again at each plan change (Engine.refresh_listeners: a reload may turn it)."""
    cdef int val = 0
    cdef socklen_t vlen = sizeof(int)
    lst.deferred = (getsockopt(lst.fd, IPPROTO_TCP, TCP_DEFER_ACCEPT, &val, &vlen) == 0
                    and val > 0)
    if not lst.deferred:
        lst.lean_spec = 0
