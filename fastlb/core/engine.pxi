# The data path's event loop: a Cython I/O engine on an epoll set of its own, watched by uvloop.
#
# Why not uvloop transports: profiling the transport + BufferedProtocol relay showed the time of a
# short connection going to machinery around it (a Task and coroutine for the connect, futures,
# a timer handle, two transports with their Python objects and memoryview slices per write),
# about 28 us of user time per connection against HAProxy's 6. Here uvloop still runs the process
# (timers, signals, the admin socket, health checks) and watches ONE file descriptor: this
# engine's epoll fd. When it is readable, Engine._on_ready drains up to MAX_EVENTS socket events
# and dispatches each in C to its Session (core/session.pxi); no Python object is created per
# event or per chunk.
#
# Owner of: the epoll fd, the listeners, every Session (Engine.sessions until closed), the pool
# of buffers, the per-slot passive failure streaks, and the one path by which the data path
# calls back into Python (_callback: a failing callback goes to the loop's exception handler).
# Event data is a Session/Listener pointer with a tag in its low bits. A Session is kept alive
# by Engine.sessions until closed, and by Engine.graveyard until the end of the batch in which it
# was closed, so a later event of the same batch never sees freed memory; a Listener likewise
# (unlisten puts it in the graveyard). A callback run inside a batch may close sessions, stop a
# listener or close the engine: the graveyard is only emptied outside a batch, and the batch
# stops at once when the engine was closed.

cdef extern from "_debug.h":
    enum:
        FLB_DBG_SESSIONS
        FLB_DBG_BUFFERS
        FLB_DBG_BUFFERS_IN_USE
        FLB_DBG_FDS
        FLB_DBG_ENGINES
    const bint FLB_DEBUG_COUNTS
    void flb_dbg_add(int what, long delta) noexcept nogil
    long flb_dbg_get(int what) noexcept nogil
    void flb_dbg_fail_epoll(long n) noexcept nogil
    bint flb_dbg_epoll_should_fail() noexcept nogil


def debug_counts():
    """Debug builds (FASTLB_DEBUG=1): the resources the engines of this process hold now, as
    {"sessions", "buffers", "buffers_in_use", "fds", "engines"}; after every engine's close()
    all are 0. A normal build counts nothing and returns None."""
    if not FLB_DEBUG_COUNTS:
        return None
    return {"sessions": flb_dbg_get(FLB_DBG_SESSIONS), "buffers": flb_dbg_get(FLB_DBG_BUFFERS),
            "buffers_in_use": flb_dbg_get(FLB_DBG_BUFFERS_IN_USE), "fds": flb_dbg_get(FLB_DBG_FDS),
            "engines": flb_dbg_get(FLB_DBG_ENGINES)}


def _debug_fail_epoll(long n):
    """Debug builds only (a test hook): make the next ``n`` epoll_ctl calls on sessions fail
    with ENOMEM, as the kernel may (ENOMEM, ENOSPC past max_user_watches)."""
    if not FLB_DEBUG_COUNTS:
        raise CoreArgumentError("_debug_fail_epoll needs a debug build (FASTLB_DEBUG=1)")
    flb_dbg_fail_epoll(n)


cdef inline void _close_fd(int fd) noexcept nogil:
    """Close an fd the engine opened (an accepted client, a backend socket, the epoll fd)."""
    close(fd)
    flb_dbg_add(FLB_DBG_FDS, -1)


cdef inline void _free_buffer(char *buf, bint in_use) noexcept nogil:
    if buf != NULL:
        munmap(buf, ENGINE_BUFSIZE)            # [mem] buffers are mappings (core/buffers.pxi)
        flb_dbg_add(FLB_DBG_BUFFERS, -1)
        if in_use:
            flb_dbg_add(FLB_DBG_BUFFERS_IN_USE, -1)


def _reraise(exc):
    raise exc


@cython.final
cdef class ServiceState:
    """What the data path needs of one service. Owner: the data-plane host (fastlb.dataplane), which
    swaps the backend set with set_backends() between connections; the engine only reads it."""
    cdef public object policy            # a Policy, or None: no backend at all
    cdef dict sockaddrs                  # slot -> packed struct sockaddr (bytes)
    cdef public dict addrs               # slot -> (host, port), as given
    cdef public int retries
    cdef public double connect_timeout
    cdef public double idle_timeout
    cdef public int hash_mode            # a value of HASH_MODES, or 0 (no key)
    cdef public object on_connect_error  # callable(slot, OSError) or None
    cdef public object on_no_backend     # callable() or None
    cdef public object on_passive_down   # callable(slot, failures, reason) or None
    cdef public int fall_passive         # consecutive failures that mark a backend down (0: off)
    cdef public str name
    cdef public int row                  # the service's Gauges row (-1: none)
    # -- connection limits and queues (issue 11, `limits`: core/limits.pxi) --
    cdef public int64_t maxconn          # service.maxconn over all workers (0: none)
    cdef public int queue_size           # service.queue.size over all workers (0: no queue)
    cdef public double queue_timeout     # service.queue.timeout, seconds
    cdef Session qhead                   # this worker's FIFO of clients waiting for a place
    cdef Session qtail
    cdef readonly int qlen
    cdef bint dequeuing                  # lim_dequeue is running (no re-entry)

    cdef public Admission adm            # [access] ACL, source limits, PROXY (None: none)
    cdef public TlsContext tls           # [tls] TLS termination (None: plain TCP)
    cdef public OrigContext orig         # [orig] TLS to the backends (None: plain TCP)
    # [mem] timers (seconds, 0: off; core/timers.pxi) and TCP keepalive (ka_idle 0: off)
    cdef public double client_fin
    cdef public double server_fin
    cdef public double max_duration
    cdef public double first_byte
    cdef public int ka_idle
    cdef public int ka_interval
    cdef public int ka_count
    cdef public unsigned long long log_sample  # [obs] connection log: sample x 2**32 (0: off)
    cdef long long tlsn[11]              # [tlsops] this service's TLS counts (tls.pxi TLSN_*)
    cdef public int splice               # [splice] SPLICE_AUTO (0), SPLICE_OFF, SPLICE_ON

    def __init__(self, str name):
        self.name = name
        self.policy = None
        self.addrs = {}
        self.sockaddrs = {}
        self.retries = 2
        self.connect_timeout = 2.0
        self.idle_timeout = 300.0
        self.hash_mode = HASH_NONE
        self.row = -1

    def set_backends(self, policy, dict addrs):
        """Swap the backend set (slot -> (ip, port)); takes effect for the next connection."""
        import socket as _socket
        import struct as _struct
        if policy is not None and not isinstance(policy, Policy):
            raise CoreTypeError(f"policy must be a Policy or None, got {type(policy).__name__}")
        packed = {}
        for slot, (host, port) in addrs.items():
            if ":" in host:
                packed[slot] = (_struct.pack("=H", AF_INET6) + _struct.pack("!HI", port, 0)
                                + _socket.inet_pton(_socket.AF_INET6, host) + _struct.pack("=I", 0))
            else:
                packed[slot] = (_struct.pack("=H", AF_INET) + _struct.pack("!H", port)
                                + _socket.inet_pton(_socket.AF_INET, host) + bytes(8))
        self.policy = policy
        self.addrs = dict(addrs)
        self.sockaddrs = packed


@cython.final
cdef class Listener:
    """A listening socket of one service in one engine (made by Engine.listen)."""
    cdef int fd
    cdef ServiceState svc
    cdef object sock                     # the socket.socket, kept open while listening
    cdef unsigned short port             # [obs] its local port (the connection log)
    cdef bint registered
    cdef uint32_t events                 # [limits] its epoll interest, to re-arm it after a pause
    cdef int paused                      # [limits] PAUSE_*: out of the epoll set (0: armed)
    cdef double paused_at                # [limits] coarse clock of the pause
    # [lean] (core/lean.pxi) the epoll set it is in (the engine's, or the event loop's with an
    # eventfd reader of its own), the event data it is registered with, TCP_NODELAY inherited
    cdef int lepfd
    cdef int lean_efd
    cdef uint64_t ldata
    cdef bint nodelay
    cdef int lean_spec                   # [lean] score of the read right after accept
    cdef bint deferred                   # [lean] TCP_DEFER_ACCEPT on: data comes with accept
    cdef public SniTable sni             # [sni] route by the ClientHello (None: lst.svc's)

    def __cinit__(self):
        self.lean_efd = -1


@cython.final
cdef class Engine:
    """The epoll-based I/O engine of one worker process. Owner of every Session and Listener it
    creates; driven by uvloop through one reader on its epoll fd."""
    cdef int epfd
    cdef object loop
    cdef Counters counters
    cdef readonly Gauges gauges          # shared limits and refusal counts (core/gauges.pxi)
    cdef public ConnLog connlog          # [obs] the connection log and histograms, or None
    cdef int block
    cdef public double now               # coarse clock, refreshed once per batch of events
    cdef public set sessions             # the open sessions
    cdef set connecting                  # the sessions waiting for a connect (swept)
    cdef list graveyard
    cdef dict listeners                  # fd -> Listener
    cdef char **pool
    cdef int npool
    cdef int *consec                     # per slot: consecutive passive failures
    cdef epoll_event events[MAX_EVENTS]
    cdef public object on_accept_error   # callable(OSError) or None
    cdef readonly long long epoll_errors # sessions closed because epoll_ctl failed
    cdef long long epoll_unreported      # of those, not yet reported
    cdef double epoll_reported_at        # coarse clock of the last report
    cdef bint alive                   # between __init__ and close()
    cdef bint in_batch                   # inside _on_ready: keep the graveyard
    # -- connection limits and queues (issue 11, `limits`: core/limits.pxi) --
    cdef public int64_t maxconn          # [global] maxconn over all workers (0: none)
    cdef int64_t *slot_cap               # per slot: backends[].max_conns (0: no cap)
    cdef list paused                     # Listeners out of the epoll set, to re-arm
    cdef int npaused                     # len(paused): one C test per session close
    cdef set queued                      # ServiceStates with clients in their queue
    cdef public object on_local_error    # callable(what, OSError, count) or None
    cdef long long local_unreported[2]   # local errors since the last report: accept, connect
    cdef double local_reported_at[2]
    # [mem] buffers (core/buffers.pxi) and timers (core/timers.pxi)
    cdef readonly int buffers_in_use     # buffers held by sessions now
    cdef readonly int buffers_peak       # the most held at once since the engine started
    cdef readonly int buffer_budget      # at most this many in use (0: no cap); set_buffer_budget
    cdef int buffer_reserve
    cdef readonly long long buffer_waits # times a direction waited for a buffer
    cdef int pool_low                    # lowest npool since the last trim
    cdef double next_trim
    cdef void *wait_first                # FIFOs of sessions waiting for a buffer (borrowed:
    cdef void *wait_first_tail           # a session leaves them before it is freed)
    cdef void *wait_second
    cdef void *wait_second_tail
    cdef readonly long long timeouts_fin        # sessions closed by client_fin/server_fin
    cdef readonly long long timeouts_duration   # by max_duration
    cdef readonly long long timeouts_first_byte # by first_byte
    # [tls] handshakes (core/tls.pxi): done, of which resumed; failed; past timeouts.handshake
    cdef readonly long long tls_handshakes, tls_resumed, tls_failures, tls_timeouts
    # [tls] stage 2: client certificates refused (missing, expired, untrusted); authz refusals
    cdef readonly long long tls_no_cert, tls_expired, tls_untrusted, tls_authz_denied
    # [lean] (core/lean.pxi) the event loop's epoll fd (-2: not looked for yet, -1: none);
    # listener events handled and connections accepted (wake-ups per connection)
    cdef int lean_loopfd
    cdef readonly long long accept_wakeups, accepted
    # [lean] per slot: the score of the send made right after connect; speculative reads and
    # sends that found their socket ready (hits) or not (misses)
    cdef int *lean_early
    cdef readonly long long spec_hits, spec_misses

    # [orig] TLS to backends (core/tls_orig.pxi): handshakes done, of which resumed; failed
    cdef readonly long long orig_handshakes, orig_resumed, orig_failures

    # [tlsops] the other failure reasons (a protocol error; the client left or sent an alert),
    # and the versions of the handshakes done
    cdef readonly long long tls_protocol, tls_other, tls_v12, tls_v13
    # [sni] passthrough routing (core/sni.pxi): routed by name; sent to the default; refused
    # for no route, for bytes that are not a ClientHello, for an oversized one; timed out
    cdef readonly long long sni_routed, sni_defaulted, sni_no_route, sni_bad, sni_oversize
    cdef readonly long long sni_timeouts
    # [splice] zero-copy bulk (core/splice.pxi): the pool of empty pipes ((read, write) fd
    # pairs, LIFO, malloc'ed at the first pipe), pipes held by sessions, counts
    cdef int *pipes
    cdef readonly int npipes              # free pipes in the pool
    cdef int pipes_low                   # lowest npipes since the last trim
    cdef int pipes_max                   # the cap (SPLICE_PIPES_MAX, or less: the fd limit)
    cdef readonly int pipes_in_use
    cdef readonly long long spliced_bytes    # bytes moved through pipes
    cdef readonly long long pipes_capped     # a pipe refused at SPLICE_PIPES_MAX (buffer used)
    cdef readonly long long pipe_failures    # pipe2() failed (fds): buffer used

    def __cinit__(self):
        self.epfd = -1
        self.lean_loopfd = -2             # [lean]

    def __init__(self, loop, Counters counters, int block=0, Gauges gauges=None):
        if block < 0 or block >= counters.nblocks:
            raise CoreArgumentError(f"block {block} out of range 0..{counters.nblocks - 1}")
        if gauges is None:                      # tests: a private set, a row per slot + global
            gauges = Gauges(bytearray(Gauges.size_for(counters.nslots + 1, counters.nblocks)),
                            counters.nslots + 1, counters.nblocks, block)
        elif gauges.block != block:
            raise CoreArgumentError(f"gauges: a view of block {gauges.block}, the engine writes "
                                    f"block {block}")
        elif gauges.nrows < counters.nslots + 1:
            raise CoreArgumentError(f"gauges: {gauges.nrows} rows, need {counters.nslots + 1} "
                                    f"(a row per slot and the global row)")
        self.gauges = gauges
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, strerror(errno).decode())
        flb_dbg_add(FLB_DBG_FDS, 1)
        self.loop = loop
        self.counters = counters
        self.block = block
        self.sessions = set()
        self.connecting = set()
        self.graveyard = []
        self.listeners = {}
        self.pool = <char **>malloc(BUFFER_POOL * sizeof(char *))
        self.consec = <int *>calloc(counters.nslots, sizeof(int))
        self.lean_early = <int *>calloc(counters.nslots, sizeof(int))     # [lean]
        if self.pool == NULL or self.consec == NULL or self.lean_early == NULL:
            raise MemoryError()
        lim_init(self)                    # [limits]
        self.npool = 0
        self.now = _coarse_now()
        self.epoll_reported_at = -1e9
        loop.add_reader(self.epfd, self._on_ready)
        self.alive = True
        flb_dbg_add(FLB_DBG_ENGINES, 1)

    def __dealloc__(self):
        free(self.consec)
        free(self.lean_early)             # [lean]
        free(self.slot_cap)               # [limits]
        self._free_pool()
        if self.epfd >= 0:
            _close_fd(self.epfd)
        if self.alive:
            flb_dbg_add(FLB_DBG_ENGINES, -1)

    cdef void _free_pool(self) noexcept:
        cdef int i
        spl_free_pool(self)                     # [splice] pooled pipes
        if self.pool != NULL:
            for i in range(self.npool):
                _free_buffer(self.pool[i], False)
            free(self.pool)
            self.pool = NULL
            self.npool = 0

    def close(self):
        """Abort every session, stop listening, leave the loop, free the buffers and the epoll
        fd. Idempotent; the engine is of no further use. A debug build then checks that this
        process's engines hold nothing any more (AssertionError naming what leaked)."""
        if not self.alive:
            return
        self.abort_all()
        for lst in list(self.listeners.values()):
            self.unlisten(lst)
        self.loop.remove_reader(self.epfd)
        self.alive = False
        flb_dbg_add(FLB_DBG_ENGINES, -1)
        self._free_pool()
        _close_fd(self.epfd)
        self.epfd = -1
        if FLB_DEBUG_COUNTS and not self.in_batch:  # in a batch, the graveyard still holds some
            counts = debug_counts()
            if counts["engines"] == 0 and any(counts.values()):
                raise AssertionError(f"engine teardown: resources still held: {counts}")

    # -- the one path from the data path back to Python -----------------------------------------
    cdef void _callback(self, ServiceState svc, str what, object fn, tuple args) noexcept:
        """Call ``fn(*args)``, a callback of the orchestration. An exception in it is a bug of
        the callback, not of the connection: it goes to the loop's exception handler (asyncio's
        default logs it with its traceback) and the data path goes on. KeyboardInterrupt and
        SystemExit are raised again from the loop's next iteration (as asyncio's Handle lets
        them through), never swallowed."""
        if fn is None:
            return
        try:
            fn(*args)
        except Exception as exc:
            self._report(svc, f"fastlb core: the {what} callback failed", exc)
        except BaseException as exc:
            self.loop.call_soon(_reraise, exc)

    cdef void _report(self, ServiceState svc, str message, object exc) noexcept:
        """Hand an error to the loop's exception handler (which logs it). If that fails too,
        Cython's unraisable hook prints it: nothing here is silent."""
        cdef dict ctx = {"message": message, "exception": exc, "engine": self}
        if svc is not None:
            ctx["service"] = svc.name
        self.loop.call_exception_handler(ctx)

    cdef void _epoll_failed(self, Session s, int err) noexcept:
        """epoll_ctl refused a session's interest change (ENOMEM; ENOSPC past max_user_watches):
        it could never be woken again, so it is closed now instead of stalling until its idle
        timeout. Counted in epoll_errors; reported through the exception handler at most once
        a second, with the count since the last report."""
        self.epoll_errors += 1
        self.epoll_unreported += 1
        s.term = TERM_ID if s.state == S_OPEN else TERM_IC     # [obs]
        s._close()
        if self.now - self.epoll_reported_at < 1.0:
            return
        self.epoll_reported_at = self.now
        cdef long long n = self.epoll_unreported
        self.epoll_unreported = 0
        self._report(s.svc, f"fastlb core: epoll_ctl failed: {n} session(s) closed",
                     OSError(err, strerror(err).decode()))

    cdef void _passive_failure(self, ServiceState svc, int slot, int err) noexcept:
        """A connect failure, or a reset before the backend's first byte: count it; at the
        service's fall_passive in a row, tell the health owner (once; the count restarts)."""
        self.consec[slot] += 1
        if svc.fall_passive <= 0 or self.consec[slot] < svc.fall_passive:
            return
        cdef int n = self.consec[slot]
        self.consec[slot] = 0
        self._callback(svc, "on_passive_down", svc.on_passive_down,
                       (slot, n, "connect timeouts" if err == 0 else strerror(err).decode().lower()))

    @property
    def global_row(self):
        """The Gauges row of the whole balancer ([global] maxconn)."""
        return self.gauges.nrows - 1

    def reset_passive(self, int slot):
        """Forget a slot's failure streak (a backend newly up, or a slot reused)."""
        if 0 <= slot < self.counters.nslots:
            self.consec[slot] = 0

    # -- buffers: a pool of ENGINE_BUFSIZE blocks ------------------------------------------------
    # (core/buffers.pxi holds the logic: budget, waiters, trimming)
    cdef char *_take_buffer(self) noexcept:
        return _buf_take(self)

    cdef void _give_buffer(self, char *buf) noexcept:
        _buf_give(self, buf)

    def set_buffer_budget(self, long long nbytes):
        """Cap the buffers in use at ``nbytes`` (whole buffers of BUFFER_SIZE bytes; 0: no cap)."""
        if nbytes < 0:
            raise CoreArgumentError(f"buffer budget must be >= 0, got {nbytes}")
        cdef long long n = nbytes // ENGINE_BUFSIZE
        if nbytes and n < BUFFER_RESERVE + 2:
            raise CoreArgumentError(f"buffer budget {nbytes} is less than {BUFFER_RESERVE + 2} "
                                    f"buffers of {ENGINE_BUFSIZE} bytes")
        self.buffer_budget = <int>min(n, 1 << 30)
        self.buffer_reserve = BUFFER_RESERVE if n else 0
        cdef char *buf
        while ((self.wait_second != NULL and _buf_allowed(self, 1))      # a raised cap:
               or (self.wait_first != NULL and _buf_allowed(self, 0))):  # serve the waiters
            buf = _buf_take(self)
            if buf == NULL:
                break
            _buf_give(self, buf)

    @property
    def buffers_pooled(self):
        """Free buffers kept for reuse now."""
        return self.npool

    # -- listeners ---------------------------------------------------------------------------------
    def listen(self, sock, ServiceState svc, bint shared=False):
        """Accept connections of ``svc`` on the listening socket ``sock`` (kept open). With
        ``shared`` (one socket, many worker processes) only one waiting worker is woken per
        connection (EPOLLEXCLUSIVE), not all of them."""
        cdef Listener lst = Listener.__new__(Listener)
        cdef epoll_event ev
        cdef int one = 1, err
        if not self.alive:
            raise CoreArgumentError("listen() on a closed Engine")
        sock.setblocking(False)
        lst.fd = sock.fileno()
        lst.svc = svc
        lst.sock = sock
        lst.port = sock.getsockname()[1]        # [obs]
        ev.events = EPOLLIN | (EPOLLEXCLUSIVE if shared else 0)
        ev.data.u64 = (<uint64_t><uintptr_t><void *>lst) | TAG_LISTENER
        lst.lepfd = self.epfd                   # [lean] in the loop's set when shared
        if shared:
            lean_listen_shared(self, lst, &ev)
        lst.nodelay = setsockopt(lst.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(int)) == 0
        lean_listener_opts(lst)                 # [lean] TCP_DEFER_ACCEPT: read at accept
        if epoll_ctl(lst.lepfd, EPOLL_CTL_ADD, lst.fd, &ev) < 0:
            err = errno
            lean_unlisten(self, lst)
            raise OSError(err, f"epoll_ctl(ADD) of listener fd {lst.fd}: {strerror(err).decode()}")
        lst.ldata = ev.data.u64                 # [lean]
        lst.registered = True
        lst.events = ev.events            # [limits] to re-arm it after a pause
        self.listeners[lst.fd] = lst
        return lst

    def refresh_listeners(self):
        """[lean] Read the listening sockets' options again (a reload may have changed
        `defer_accept` on a socket kept open)."""
        cdef Listener lst
        for lst in self.listeners.values():
            lean_listener_opts(lst)

    def unlisten(self, Listener lst):
        """Stop accepting on ``lst`` and close this process's socket object (new connects are
        refused once no process holds the socket)."""
        if lst.registered:
            epoll_ctl(lst.lepfd, EPOLL_CTL_DEL, lst.fd, NULL)  # (a socket other processes hold
            lean_unlisten(self, lst)                            # stays in a set: delete it)
            lst.registered = False
            self.listeners.pop(lst.fd, None)
            self.graveyard.append(lst)          # an event of this batch may still name it
            lst.sock.close()
            self._bury()

    cdef void _bury(self) noexcept:
        """Free what was closed, unless a batch of events may still name it."""
        if not self.in_batch and self.graveyard:
            self.graveyard.clear()

    # -- the loop ----------------------------------------------------------------------------------
    def _on_ready(self):
        cdef int n, i
        cdef uint64_t tag, u
        cdef Session s
        self.now = _coarse_now()
        n = epoll_wait(self.epfd, self.events, MAX_EVENTS, 0)
        self.in_batch = True
        for i in range(n):
            if not self.alive:                  # closed by a callback of this batch
                break
            u = self.events[i].data.u64
            tag = u & TAG_MASK
            if tag == TAG_LISTENER:
                if (<Listener><void *><uintptr_t>u).registered:
                    self._accept(<Listener><void *><uintptr_t>u)
                continue
            s = <Session><void *><uintptr_t>(u & ~(<uint64_t>TAG_MASK))
            if s.state == S_CLOSED:
                continue
            if tag == TAG_CLIENT:
                s.on_client(self.events[i].events)
            else:
                s.on_backend(self.events[i].events)
        self.in_batch = False
        self._bury()

    def _on_listener(self, Listener lst):
        """[lean] A shared listener's event, from the event loop's own epoll (core/lean.pxi)."""
        if not self.alive or not lst.registered:
            return
        self.now = _coarse_now()
        self.in_batch = True
        self._accept(lst)
        self.in_batch = False
        self._bury()

    cdef void _accept(self, Listener lst) noexcept:
        cdef int i, fd, err, one = 1
        cdef sockaddr_storage ss
        cdef socklen_t sslen
        cdef Session s
        cdef ServiceState svc = lst.svc
        self.accept_wakeups += 1                # [lean]
        for i in range(ACCEPT_BATCH):
            if not lst.registered or lst.paused:  # a callback of this batch stopped it
                return
            if not lim_admit(self, lst):        # [limits] a place under maxconn, or paused
                return
            sslen = sizeof(ss)
            fd = accept4(lst.fd, <sockaddr *>&ss, &sslen, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                err = errno
                lim_unadmit(self, svc)          # [limits] the place goes back
                if err == EINTR or err == ECONNABORTED:
                    continue
                if lim_accept_failed(self, lst, err):     # [limits] out of fds: paused
                    return
                if err != EAGAIN and self.on_accept_error is not None:
                    self._callback(svc, "on_accept_error", self.on_accept_error,
                                   (OSError(err, strerror(err).decode()),))
                return
            flb_dbg_add(FLB_DBG_FDS, 1)
            self.accepted += 1                  # [lean]
            if not lst.nodelay:                 # [lean] else inherited from the listener
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(int))
            _keepalive(fd, svc)                 # [mem]
            s = Session.__new__(Session)
            s.eng = self
            s.svc = svc
            s.cfd = fd
            s.last = self.now
            lim_admitted(self, s)               # [limits] the session holds its place
            s.born = self.now                   # [mem] max_duration
            cl_accept(s, lst.port, &ss)         # [obs] accept time, client, listener port
            if svc.hash_mode != HASH_NONE:
                s.key = _hash_peer(&ss, svc.hash_mode)
            self.sessions.add(s)
            if lst.sni is not None:             # [sni] the service is named by the ClientHello
                sni_start(s, lst.sni)
                continue
            if svc.adm is not None and adm_accept(s, &ss) != ADM_GO:    # [access]
                continue                        # refused (closed, counted), or waiting
            if svc.tls is not None:             # [tls] the handshake before the connect
                tls_start(s)
                continue
            lean_first_read(s, lst)             # [lean] what the client sent with its connect
            if s.state != S_CLOSED:
                s._connect()
            if s.state != S_CLOSED:
                s._update()                     # read what the client sends while we connect

    def sweep(self, bint idle=True):
        """Fail connects past their deadline (the few sessions still connecting) and, with
        ``idle``, close sessions idle for their service's idle timeout (all sessions: call it
        at the idle cadence), or past one of the timeouts of core/timers.pxi. Returns the
        number closed as idle. Trims the buffer pool once a second."""
        cdef Session s
        cdef int closed = 0
        cdef double now = _coarse_now()
        self.now = now
        for s in list(self.connecting):
            if s.state == S_CONNECTING and now >= s.deadline:
                s._connect_failed(0)
            elif s.state == S_WAITING and now >= s.deadline:     # [access] before connect
                adm_expired(s)
            elif s.state == S_HANDSHAKE and now >= s.deadline:   # [tls] timeouts.handshake
                tls_expired(s)
            elif s.state == S_SNI and now >= s.deadline:         # [sni] the ClientHello's time
                sni_expired(s)
        if idle:
            for s in list(self.sessions):
                if s.state == S_OPEN and now - s.last >= s.svc.idle_timeout:
                    s.term = TERM_cD            # [obs] idle timeout
                    s._close()
                    closed += 1
                elif _timers_expired(s, now):       # [mem] fin, max_duration, first_byte
                    s._close()
        if now >= self.next_trim:                   # [mem] give back what a burst left
            self.next_trim = now + 1.0
            _buf_trim(self)
            spl_trim(self)                          # [splice] pooled pipes nobody took
        self._bury()
        return closed

    def abort_all(self):
        """Close every session now."""
        cdef Session s
        for s in list(self.sessions):
            cl_kill(s)                          # [obs]
            s._close()
        self._bury()

    def close_backend(self, ServiceState svc, int slot):
        """Close the sessions of ``svc`` connected (or connecting) to backend ``slot`` (maint,
        drain timeout). Returns how many."""
        cdef Session s
        cdef int n = 0
        for s in list(self.sessions):
            if s.svc is svc and s.slot == slot and s.state != S_CLOSED:
                cl_kill(s)                      # [obs]
                s._close()
                n += 1
        self._bury()
        return n


def abort_where(Engine eng, ServiceState svc, int slot):
    """Deprecated name of ``eng.close_backend(svc, slot)``, kept for callers not yet moved."""
    return eng.close_backend(svc, slot)


cdef uint64_t _hash_peer(sockaddr_storage *ss, int mode) noexcept:
    """xxh64 of the client's address text, as key_of() computes it from Python."""
    cdef char text[80]
    cdef int n
    cdef unsigned short port
    if ss.ss_family == AF_INET6:
        inet_ntop(AF_INET6, &(<sockaddr_in6 *>ss).sin6_addr, text, 64)
        port = ntohs((<sockaddr_in6 *>ss).sin6_port)
    else:
        inet_ntop(AF_INET, &(<sockaddr_in *>ss).sin_addr, text, 64)
        port = ntohs((<sockaddr_in *>ss).sin_port)
    n = <int>strlen(text)
    if mode == HASH_SOURCE_IP_PORT:
        n += snprintf(text + n, 16, ":%u", port)
    return flb_xxh64(text, n, 0)
