# The data path: a Cython I/O engine on an epoll set of its own, watched by uvloop.
#
# Why not uvloop transports: profiling the transport + BufferedProtocol relay showed the time of a
# short connection going to machinery around it (a Task and coroutine for the connect, futures,
# a timer handle, two transports with their Python objects and memoryview slices per write),
# about 28 us of user time per connection against HAProxy's 6. Here uvloop still runs the process
# (timers, signals, the admin socket, health checks) and watches ONE file descriptor: this
# engine's epoll fd. When it is readable, Engine._on_ready drains up to MAX_EVENTS socket events
# and dispatches each in C; no Python object is created per event or per chunk.
#
# One connection (a Session), following DESIGN.md section 1:
#   accept4 (batched, non-blocking) -> register the client for reads -> pick (the policy's cdef
#   pick_c) -> non-blocking connect -> [refused/timeout: count, report to the policy, add to
#   tried, pick again up to retries; none left: close the client] -> established -> pump both
#   directions -> EOF one way: shutdown(SHUT_WR) the other side once its buffer is flushed ->
#   both ways shut: close; any socket error: close both.
#
# A direction (client->backend "c2b", backend->client "b2c") owns one buffer. Invariant: while a
# direction's buffer holds unsent bytes, its source is not read and its destination is watched
# for writability; so memory per connection is bounded by its two buffers, whatever the peers
# do (HAProxy's model). Before the backend is up the client is read into c2b until it is full.
#
# epoll is level-triggered. A socket the engine wants nothing from is removed from the set
# (EPOLLHUP/EPOLLERR are reported even with no events asked, which would spin).
# Event data is a Session/Listener pointer with a tag in its low bits. The Session is kept alive
# by Engine.sessions until closed, and by Engine.graveyard until the end of the batch in which it
# was closed, so a later event of the same batch never sees freed memory.

from libc.stdint cimport uintptr_t
from cpython.bytes cimport PyBytes_AS_STRING
from libc.stdlib cimport malloc, free
from libc.errno cimport errno, EAGAIN, EINTR, EINPROGRESS, ECONNABORTED, ECONNREFUSED

cdef extern from "<sys/epoll.h>" nogil:
    cdef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64
    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum:
        EPOLL_CLOEXEC
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLEXCLUSIVE

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    cdef struct sockaddr:
        unsigned short sa_family
    cdef struct sockaddr_storage:
        unsigned short ss_family
    int socket(int domain, int type, int protocol)
    int connect(int fd, const sockaddr *addr, socklen_t len)
    int accept4(int fd, sockaddr *addr, socklen_t *len, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int shutdown(int fd, int how)
    int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
    int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
    enum:
        AF_INET
        AF_INET6
        SOCK_STREAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        SOL_SOCKET
        SO_ERROR
        SO_LINGER
        SHUT_WR
        MSG_NOSIGNAL
    cdef struct linger:
        int l_onoff
        int l_linger

cdef extern from "<netinet/in.h>" nogil:
    enum:
        IPPROTO_TCP
    cdef struct in_addr:
        uint32_t s_addr
    cdef struct sockaddr_in:
        unsigned short sin_family
        unsigned short sin_port
        in_addr sin_addr
    cdef struct in6_addr:
        unsigned char s6_addr[16]
    cdef struct sockaddr_in6:
        unsigned short sin6_family
        unsigned short sin6_port
        in6_addr sin6_addr
    unsigned short ntohs(unsigned short)

cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY

cdef extern from "<arpa/inet.h>" nogil:
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)

cdef extern from "<unistd.h>" nogil:
    int close(int fd)

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *ts)
    enum:
        CLOCK_MONOTONIC_COARSE

cdef extern from "<stdio.h>" nogil:
    int snprintf(char *buf, size_t size, const char *fmt, ...)

cdef extern from "<string.h>" nogil:
    const char *strerror(int errnum)
    size_t strlen(const char *s)

cdef enum:
    # Per-direction buffer. Measured on the transport relay here: 64 KiB chunks cost 97% of a
    # core for 9 Gbit/s, 256 KiB 69% for 16; pages are touched only by data actually read.
    ENGINE_BUFSIZE = 262144
    # Events handled per wake-up, and connections accepted per listener event: large enough to
    # batch under load, small enough that one busy listener cannot starve the others.
    MAX_EVENTS = 256
    ACCEPT_BATCH = 64
    # Freed buffers kept for reuse: saves a malloc/free pair (often mmap/munmap) per connection.
    # 512 x 256 KiB bounds what a past burst keeps resident at 128 MiB.
    BUFFER_POOL = 512
    TAG_LISTENER = 0
    TAG_CLIENT = 1
    TAG_BACKEND = 2
    TAG_MASK = 3
    S_CONNECTING = 0
    S_OPEN = 1
    S_CLOSED = 2

cdef enum:
    HASH_NONE = 0
    HASH_SOURCE_IP = 1
    HASH_SOURCE_IP_PORT = 2


cdef inline double _coarse_now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef struct Buf:
    char *data
    Py_ssize_t start        # first unsent byte
    Py_ssize_t end          # one past the last byte read


@cython.final
cdef class ServiceState:
    """What the data path needs of one service. Owner: the orchestration (fastlb.proxy), which
    swaps the backend set with set_backends() between connections; the engine only reads it."""
    cdef public object policy            # a Policy, or None: no backend at all
    cdef dict sockaddrs                  # slot -> packed struct sockaddr (bytes)
    cdef public dict addrs               # slot -> (host, port), as given
    cdef public int retries
    cdef public double connect_timeout
    cdef public double idle_timeout
    cdef public int hash_mode
    cdef public object on_connect_error  # callable(slot, OSError) or None
    cdef public object on_no_backend     # callable() or None
    cdef public object on_passive_down   # callable(slot, failures, reason) or None
    cdef public int fall_passive         # consecutive failures that mark a backend down (0: off)
    cdef public str name

    def __init__(self, str name):
        self.name = name
        self.policy = None
        self.addrs = {}
        self.sockaddrs = {}
        self.retries = 2
        self.connect_timeout = 2.0
        self.idle_timeout = 300.0
        self.hash_mode = HASH_NONE

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
    cdef int fd
    cdef ServiceState svc
    cdef object sock                     # the socket.socket, kept open while listening
    cdef bint registered


@cython.final
cdef class Session:
    """One proxied connection. All fields are owned by the Engine that created it."""
    cdef Engine eng
    cdef ServiceState svc
    cdef int cfd
    cdef int bfd
    cdef int state
    cdef Buf c2b
    cdef Buf b2c
    cdef bint c_eof                      # the client sent EOF
    cdef bint b_eof                      # the backend sent EOF
    cdef bint c2b_shut                   # we shut down writing to the backend
    cdef bint b2c_shut                   # we shut down writing to the client
    cdef bint b_seen                     # the backend has sent a byte (a passive success)
    cdef uint32_t cev                    # epoll interest registered for cfd (0: not in the set)
    cdef uint32_t bev
    cdef public int slot
    cdef int tried[MAX_TRIED]
    cdef int ntried
    cdef int attempts
    cdef uint64_t key
    cdef public double deadline          # connect deadline (coarse clock)
    cdef public double last              # last activity (coarse clock)
    cdef bint counted

    def abort(self):
        """Close both sides now (shutdown, idle timeout)."""
        self._close()

    # -- epoll interest ----------------------------------------------------------------------
    cdef inline void _watch(self, int fd, uint32_t *cur, uint32_t want, int tag) noexcept:
        cdef epoll_event ev
        if want == cur[0] or fd < 0:
            return
        ev.events = want
        ev.data.u64 = (<uint64_t><uintptr_t><void *>self) | <uint64_t>tag
        if want == 0:
            epoll_ctl(self.eng.epfd, EPOLL_CTL_DEL, fd, &ev)
        elif cur[0] == 0:
            epoll_ctl(self.eng.epfd, EPOLL_CTL_ADD, fd, &ev)
        else:
            epoll_ctl(self.eng.epfd, EPOLL_CTL_MOD, fd, &ev)
        cur[0] = want

    cdef void _update(self) noexcept:
        """Register exactly the interest the state asks for (see the header's invariant)."""
        cdef uint32_t cw = 0, bw = 0
        if self.state == S_CLOSED:
            return
        if not self.c_eof and self.c2b.end == 0:
            cw |= EPOLLIN                       # c2b empty: read the client
        elif (not self.c_eof and self.state == S_CONNECTING
                and self.c2b.end < ENGINE_BUFSIZE):
            cw |= EPOLLIN                       # before connect: fill c2b
        if self.b2c.end > self.b2c.start:
            cw |= EPOLLOUT                      # unsent bytes for the client
        if self.state == S_CONNECTING:
            bw = EPOLLOUT
        else:
            if not self.b_eof and self.b2c.end == 0:
                bw |= EPOLLIN
            if self.c2b.end > self.c2b.start:
                bw |= EPOLLOUT
        self._watch(self.cfd, &self.cev, cw, TAG_CLIENT)
        self._watch(self.bfd, &self.bev, bw, TAG_BACKEND)

    # -- moving bytes -------------------------------------------------------------------------
    cdef inline char *_buf(self, Buf *b) noexcept:
        if b.data == NULL:
            b.data = self.eng._take_buffer()
        return b.data

    cdef int _flush(self, Buf *b, int dst) noexcept:
        """Send b's unsent bytes to dst. 1: all sent, 0: would block, -1: error (closed)."""
        cdef ssize_t w
        while b.end > b.start:
            w = send(dst, b.data + b.start, b.end - b.start, MSG_NOSIGNAL)
            if w > 0:
                b.start += w
                self.last = self.eng.now
            elif errno == EINTR:
                continue
            elif errno == EAGAIN:
                return 0
            else:
                self._close()
                return -1
        b.start = 0
        b.end = 0
        return 1

    cdef int _pump(self, int src, int dst, Buf *b, int field, bint *eof) noexcept:
        """Read src and forward to dst until src would block, dst would block, or EOF.
        Precondition: b is empty. Returns -1 when the session was closed."""
        cdef ssize_t r
        cdef char *data = self._buf(b)
        if data == NULL:
            self._close()
            return -1
        while True:
            r = recv(src, data, ENGINE_BUFSIZE, 0)
            if r > 0:
                if src == self.bfd and not self.b_seen:
                    self.b_seen = True
                    self.eng.consec[self.slot] = 0
                self.last = self.eng.now
                self.eng.counters.add_c(self.eng.block, self.slot, field, r)
                b.start = 0
                b.end = r
                if self._flush(b, dst) <= 0:
                    return -1 if self.state == S_CLOSED else 0
                if r < ENGINE_BUFSIZE:          # drained, most likely: let epoll say more
                    return 0
            elif r == 0:
                eof[0] = True
                return 0
            elif errno == EINTR:
                continue
            elif errno == EAGAIN:
                return 0
            else:
                if src == self.bfd and not self.b_seen:
                    self.eng._passive_failure(self.svc, self.slot, errno)
                self._close()
                return -1

    cdef void _shut_if_done(self) noexcept:
        """Pass an EOF on once its direction is flushed; close when both directions are shut."""
        if self.c_eof and not self.c2b_shut and self.state == S_OPEN and self.c2b.end == 0:
            shutdown(self.bfd, SHUT_WR)
            self.c2b_shut = True
        if self.b_eof and not self.b2c_shut and self.b2c.end == 0:
            shutdown(self.cfd, SHUT_WR)
            self.b2c_shut = True
        if self.c2b_shut and self.b2c_shut:
            self._close()

    # -- events --------------------------------------------------------------------------------
    cdef void on_client(self, uint32_t events) noexcept:
        cdef ssize_t r
        if events & (EPOLLOUT | EPOLLERR | EPOLLHUP) and self.b2c.end > self.b2c.start:
            if self._flush(&self.b2c, self.cfd) < 0:
                return
        if events & (EPOLLIN | EPOLLERR | EPOLLHUP) and not self.c_eof:
            if self.state == S_OPEN:
                if self.c2b.end == 0:
                    if self._pump(self.cfd, self.bfd, &self.c2b, CTR_BYTES_IN, &self.c_eof) < 0:
                        return
            elif self.c2b.end < ENGINE_BUFSIZE:  # connecting: keep what the client sends
                if self._buf(&self.c2b) == NULL:
                    self._close()
                    return
                r = recv(self.cfd, self.c2b.data + self.c2b.end, ENGINE_BUFSIZE - self.c2b.end, 0)
                if r > 0:
                    self.c2b.end += r
                elif r == 0:
                    self.c_eof = True
                elif errno != EAGAIN and errno != EINTR:
                    self._close()
                    return
        self._shut_if_done()
        self._update()

    cdef void on_backend(self, uint32_t events) noexcept:
        cdef int err = 0
        cdef socklen_t elen = sizeof(int)
        if self.state == S_CONNECTING:
            if getsockopt(self.bfd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0:
                err = errno
            if err == 0 and not (events & EPOLLERR):
                self._established()
            else:
                self._connect_failed(err or ECONNREFUSED)
            return
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
        """Connect to the next pick; on immediate failure try the next; none left: close."""
        cdef ServiceState svc = self.svc
        cdef int slot, fd, one = 1
        cdef bytes sa
        cdef const char *sap
        while self.attempts <= svc.retries and svc.policy is not None:
            self.attempts += 1
            slot = (<Policy>svc.policy).pick_c(self.key, self.tried, self.ntried)
            if slot < 0:
                break
            sa = svc.sockaddrs.get(slot)
            if sa is None:
                break
            sap = PyBytes_AS_STRING(sa)
            self.slot = slot
            fd = socket((<const sockaddr *>sap).sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
            if fd < 0:
                self._failed_attempt(errno)
                continue
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(int))
            self.bfd = fd
            self.bev = 0
            if connect(fd, <const sockaddr *>sap, <socklen_t>len(sa)) == 0:
                self._established()
                return
            if errno == EINPROGRESS:
                self.state = S_CONNECTING
                self.deadline = self.eng.now + svc.connect_timeout
                self.eng.connecting.add(self)
                self._update()
                return
            self._failed_attempt(errno)
        self._give_up()

    cdef void _failed_attempt(self, int err) noexcept:
        cdef ServiceState svc = self.svc
        cdef int slot = self.slot
        if self.bfd >= 0:
            close(self.bfd)                     # also leaves the epoll set
            self.bfd = -1
            self.bev = 0
        self.eng.counters.add_c(self.eng.block, slot, CTR_CONNECT_FAILURES, 1)
        self.eng._passive_failure(svc, slot, err)
        if self.ntried < MAX_TRIED:
            self.tried[self.ntried] = slot
            self.ntried += 1
        try:
            if svc.policy is not None:
                svc.policy.report_failure(slot)
            if svc.on_connect_error is not None:
                svc.on_connect_error(slot, OSError(err, strerror(err).decode()) if err else TimeoutError("connect timeout"))
        except BaseException:
            pass                                # a logging failure must not break the data path

    cdef void _connect_failed(self, int err) noexcept:
        self.eng.connecting.discard(self)
        self.state = S_CONNECTING
        self._failed_attempt(err)
        self._connect()

    def _timed_out(self):
        """The connect deadline passed (called by Engine.sweep)."""
        if self.state == S_CONNECTING:
            self._connect_failed(0)

    cdef void _give_up(self) noexcept:
        try:
            if self.svc.on_no_backend is not None:
                self.svc.on_no_backend()
        except BaseException:
            pass
        self._close()

    cdef void _established(self) noexcept:
        self.eng.connecting.discard(self)
        self.state = S_OPEN
        self.counted = True
        self.eng.counters.add_c(self.eng.block, self.slot, CTR_ACTIVE, 1)
        self.eng.counters.add_c(self.eng.block, self.slot, CTR_TOTAL, 1)
        if self.c2b.end > 0:                    # what the client sent meanwhile
            self.eng.counters.add_c(self.eng.block, self.slot, CTR_BYTES_IN, self.c2b.end)
            if self._flush(&self.c2b, self.bfd) < 0:
                return
        self._shut_if_done()
        self._update()

    # -- the end ---------------------------------------------------------------------------------
    cdef void _close(self) noexcept:
        if self.state == S_CLOSED:
            return
        cdef Engine eng = self.eng
        if self.state == S_CONNECTING:
            eng.connecting.discard(self)
        self.state = S_CLOSED
        eng.graveyard.append(self)              # alive until this batch of events is done
        eng.sessions.discard(self)
        if self.counted:
            self.counted = False
            eng.counters.add_c(eng.block, self.slot, CTR_ACTIVE, -1)
        if self.cfd >= 0:
            close(self.cfd)
            self.cfd = -1
        if self.bfd >= 0:
            close(self.bfd)
            self.bfd = -1
        eng._give_buffer(self.c2b.data)
        eng._give_buffer(self.b2c.data)
        self.c2b.data = NULL
        self.b2c.data = NULL

    def __dealloc__(self):
        # Only reached for a session that was never closed (engine torn down): free its fds.
        if self.cfd >= 0:
            close(self.cfd)
        if self.bfd >= 0:
            close(self.bfd)
        free(self.c2b.data)
        free(self.b2c.data)


@cython.final
cdef class Engine:
    """The epoll-based I/O engine of one worker process. Owner of every Session and Listener it
    creates; driven by uvloop through one reader on its epoll fd."""
    cdef int epfd
    cdef object loop
    cdef Counters counters
    cdef int block
    cdef public double now               # coarse clock, refreshed once per batch of events
    cdef public set sessions
    cdef public set connecting
    cdef list graveyard
    cdef dict listeners                  # fd -> Listener
    cdef char **pool
    cdef int npool
    cdef int *consec                     # per slot: consecutive passive failures
    cdef epoll_event events[MAX_EVENTS]
    cdef public object on_accept_error   # callable(OSError) or None

    def __cinit__(self):
        self.epfd = -1

    def __init__(self, loop, Counters counters, int block=0):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, strerror(errno).decode())
        self.loop = loop
        self.counters = counters
        self.block = block
        self.sessions = set()
        self.connecting = set()
        self.graveyard = []
        self.listeners = {}
        self.pool = <char **>malloc(BUFFER_POOL * sizeof(char *))
        self.consec = <int *>calloc(counters.nslots, sizeof(int))
        if self.pool == NULL or self.consec == NULL:
            raise MemoryError()
        self.npool = 0
        self.now = _coarse_now()
        loop.add_reader(self.epfd, self._on_ready)

    def __dealloc__(self):
        cdef int i
        free(self.consec)
        if self.pool != NULL:
            for i in range(self.npool):
                free(self.pool[i])
            free(self.pool)
        if self.epfd >= 0:
            close(self.epfd)

    def close(self):
        """Abort every session, stop listening, leave the loop."""
        self.abort_all()
        for lst in list(self.listeners.values()):
            self.unlisten(lst)
        if self.epfd >= 0:
            self.loop.remove_reader(self.epfd)

    cdef void _passive_failure(self, ServiceState svc, int slot, int err) noexcept:
        """A connect failure, or a reset before the backend's first byte: count it; at the
        service's fall_passive in a row, tell the health owner (once; the count restarts)."""
        self.consec[slot] += 1
        if svc.fall_passive <= 0 or self.consec[slot] < svc.fall_passive:
            return
        cdef int n = self.consec[slot]
        self.consec[slot] = 0
        if svc.on_passive_down is not None:
            try:
                svc.on_passive_down(slot, n, "connect timeouts" if err == 0 else strerror(err).decode().lower())
            except BaseException:
                pass

    def reset_passive(self, int slot):
        """Forget a slot's failure streak (a backend newly up, or a slot reused)."""
        if 0 <= slot < self.counters.nslots:
            self.consec[slot] = 0

    cdef char *_take_buffer(self) noexcept:
        if self.npool:
            self.npool -= 1
            return self.pool[self.npool]
        return <char *>malloc(ENGINE_BUFSIZE)

    cdef void _give_buffer(self, char *buf) noexcept:
        if buf == NULL:
            return
        if self.npool < BUFFER_POOL:
            self.pool[self.npool] = buf
            self.npool += 1
        else:
            free(buf)

    def listen(self, sock, ServiceState svc, bint shared=False):
        """Accept connections of ``svc`` on the listening socket ``sock`` (kept open). With
        ``shared`` (one socket, many worker processes) only one waiting worker is woken per
        connection (EPOLLEXCLUSIVE), not all of them."""
        cdef Listener lst = Listener.__new__(Listener)
        cdef epoll_event ev
        sock.setblocking(False)
        lst.fd = sock.fileno()
        lst.svc = svc
        lst.sock = sock
        ev.events = EPOLLIN | (EPOLLEXCLUSIVE if shared else 0)
        ev.data.u64 = (<uint64_t><uintptr_t><void *>lst) | TAG_LISTENER
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, lst.fd, &ev) < 0:
            raise OSError(errno, strerror(errno).decode())
        lst.registered = True
        self.listeners[lst.fd] = lst
        return lst

    def unlisten(self, Listener lst):
        """Stop accepting on ``lst`` and close this process's socket object (new connects are
        refused once no process holds the socket)."""
        if lst.registered:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, lst.fd, NULL)
            lst.registered = False
            self.listeners.pop(lst.fd, None)
            lst.sock.close()

    def _on_ready(self):
        cdef int n, i
        cdef uint64_t tag, u
        cdef Session s
        self.now = _coarse_now()
        n = epoll_wait(self.epfd, self.events, MAX_EVENTS, 0)
        for i in range(n):
            u = self.events[i].data.u64
            tag = u & TAG_MASK
            if tag == TAG_LISTENER:
                self._accept(<Listener><void *><uintptr_t>u)
                continue
            s = <Session><void *><uintptr_t>(u & ~(<uint64_t>TAG_MASK))
            if s.state == S_CLOSED:
                continue
            if tag == TAG_CLIENT:
                s.on_client(self.events[i].events)
            else:
                s.on_backend(self.events[i].events)
        if self.graveyard:
            self.graveyard.clear()

    cdef void _accept(self, Listener lst) noexcept:
        cdef int i, fd, one = 1
        cdef sockaddr_storage ss
        cdef socklen_t sslen
        cdef Session s
        cdef ServiceState svc = lst.svc
        for i in range(ACCEPT_BATCH):
            sslen = sizeof(ss)
            fd = accept4(lst.fd, <sockaddr *>&ss, &sslen, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                if errno == EINTR or errno == ECONNABORTED:
                    continue
                if errno != EAGAIN and self.on_accept_error is not None:
                    try:
                        self.on_accept_error(OSError(errno, strerror(errno).decode()))
                    except BaseException:
                        pass
                return
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(int))
            s = Session.__new__(Session)
            s.eng = self
            s.svc = svc
            s.cfd = fd
            s.bfd = -1
            s.slot = -1
            s.last = self.now
            if svc.hash_mode != HASH_NONE:
                s.key = _hash_peer(&ss, svc.hash_mode)
            self.sessions.add(s)
            s._update()                         # read what the client sends while we connect
            s._connect()

    def sweep(self, bint idle=True):
        """Fail connects past their deadline (the few sessions still connecting) and, with
        ``idle``, close sessions idle for their service's idle timeout (all sessions: call it
        at the idle cadence). Returns the number closed as idle."""
        cdef Session s
        cdef int closed = 0
        cdef double now = _coarse_now()
        self.now = now
        for s in list(self.connecting):
            if s.state == S_CONNECTING and now >= s.deadline:
                s._connect_failed(0)
        if idle:
            for s in list(self.sessions):
                if s.state == S_OPEN and now - s.last >= s.svc.idle_timeout:
                    s._close()
                    closed += 1
        self.graveyard.clear()
        return closed

    def abort_all(self):
        cdef Session s
        for s in list(self.sessions):
            s._close()
        self.graveyard.clear()


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


def _abort_where(Engine eng, ServiceState svc, int slot):
    """Close the sessions of ``svc`` connected to backend ``slot`` (maint, drain timeout)."""
    cdef Session s
    cdef int n = 0
    for s in list(eng.sessions):
        if s.svc is svc and s.slot == slot and s.state != S_CLOSED:
            s._close()
            n += 1
    eng.graveyard.clear()
    return n


abort_where = _abort_where
