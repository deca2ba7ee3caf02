# [splice] Zero-copy bulk and fairness (issue 15): splice(2) through a pipe between the two
# sockets of a plain-TCP session, and a per-wake-up byte budget per direction.
#
# Owner of: the engine's pool of empty pipes, a direction's pipe while it holds bytes, the auto
# mode's streak counts, the fairness budget. Hooks:
#   Session._pump   spl_wanted/spl_pump   a streaming direction is spliced instead of recv'd;
#                   spl_after_recv        after a buffered read: the streak, the budget;
#   Session._flush  spl_flush             a direction whose bytes are in a pipe;
#   Session._close  spl_close             its pipes back to the pool (or closed if not empty);
#   Engine.sweep    spl_trim              pipes nobody took for a second are closed;
#   Engine._free_pool  spl_free_pool      every pooled pipe closed (close() and dealloc).
#
# The model is HAProxy's (src/raw_sock.c raw_sock_to_pipe/raw_sock_from_pipe, src/pipe.c):
#   - A pipe is a buffer the kernel holds. It obeys the buffer invariant of core/session.pxi:
#     while a direction holds unsent bytes (in its Buf or in its pipe) its source is not read
#     and its destination is watched for writability. So Buf.end counts the bytes in the pipe
#     (start 0, data NULL) and every test of session.pxi on a direction's emptiness, EPOLLIN,
#     EPOLLOUT and the half-close (EOF passed on once the pipe is drained) holds unchanged.
#     One reason more: splice() from a socket into a full pipe and from an empty socket both
#     say EAGAIN (HAProxy's comment in raw_sock_to_pipe); reading only into an empty pipe makes
#     EAGAIN mean "the socket is empty".
#   - A direction holds a pipe only while the pipe holds bytes: taken from the engine's pool
#     when a splice starts, given back as soon as it is drained (HAProxy's put_pipe when
#     pipe->data is 0), so an idle connection holds none. A pipe that still holds bytes when
#     its session closes is closed, not pooled (HAProxy's kill_pipe).
#   - At most SPLICE_PIPES_MAX pipes per worker (HAProxy's tune.maxpipes), and no more than
#     the worker's buffer budget holds at SPLICE_PIPE_SIZE each (so what pipes hold is bounded
#     as the buffers are: [global] buffer_budget bounds each); past it, or when pipe2() fails
#     (fds), the direction simply uses its buffer for that wake-up.
#   - splice is never used for a TLS session (the client's bytes are OpenSSL's) nor while a
#     direction's buffer holds bytes (what the client sent while connecting, a PROXY or SNI
#     peek): _pump, the only caller, runs with the direction empty.
#   - Modes (service.splice, default [global] splice, default "auto"): "off"; "on": every
#     read of a plain session's established directions is a splice; "auto" (HAProxy's
#     splice-auto, which splices once a channel is a CF_STREAMER_FAST: a buffer filled by one
#     read three times in a row; it stops after small reads): a direction starts splicing after
#     SPLICE_AUTO_AFTER consecutive reads that fill its 256 KiB buffer (HAProxy's buffers are
#     16 KiB: 2 x 256 KiB is 32 of its full reads) and goes back to recv/send after
#     SPLICE_AUTO_SMALL consecutive wake-ups that spliced less than SPLICE_SMALL bytes. Request
#     and response traffic of a few KiB therefore never splices (forced splicing of small
#     messages costs HAProxy about 15% of its keep-alive rate).
#   - Byte counts are made when bytes are read from the source (spliced into the pipe), as
#     for a buffered read: CTR_BYTES_IN/OUT, the log's nbin/nbout, the first backend byte
#     (b_seen, t_first, the passive success), `last`; `first_sent` when the first client byte
#     leaves the pipe for the backend (first_byte's clock). Engine.spliced_bytes counts what
#     went through pipes (a test and an operator can see that splicing really happens).
#
# Fairness: epoll is level-triggered, so a direction that stops reading while its source is
# still readable is simply served again at the engine's next round, after every other ready
# session. _pump (buffered or spliced) stops after FAIR_BUDGET bytes in one wake-up (HAProxy
# stops its receive loop after a few reads: MAX_READ_POLL_LOOPS, tune.recv_enough). Measured
# in bench/splice_bench.py (bench/README.md, "Zero-copy bulk and fairness").
#
# The per-event functions (spl_wanted, spl_pump, spl_flush, spl_after_recv, spl_take,
# spl_give, spl_close) make no Python C-API call (tests/unit/test_splice_generated_c.py).

cdef extern from "<fcntl.h>" nogil:
    ssize_t splice(int fd_in, long long *off_in, int fd_out, long long *off_out, size_t len,
                   unsigned int flags)
    int pipe2(int *fds, int flags)
    int fcntl(int fd, int cmd, ...)
    enum:
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK
        F_SETPIPE_SZ
        F_GETPIPE_SZ
        O_NONBLOCK
        O_CLOEXEC

cdef extern from "<sys/resource.h>" nogil:
    ctypedef unsigned long rlim_t
    cdef struct rlimit:
        rlim_t rlim_cur
        rlim_t rlim_max
    int getrlimit(int resource, rlimit *rlim)
    enum:
        RLIMIT_NOFILE

from libc.errno cimport ENOSYS, EINVAL, EBADF

cdef enum:
    # ServiceState.splice; 0 is the config's default so that a ServiceState made without a
    # plan (tests) behaves as a configured one does.
    SPLICE_AUTO = 0
    SPLICE_OFF = 1
    SPLICE_ON = 2
    # Buf.spl bits
    SPL_STREAM = 1              # auto: this direction streams, splice it
    SPL_REFUSED = 2             # splice() refused this socket (EINVAL...): never again
    # spl_pump: no pipe could be had (cap, fds) or the socket refuses splice: use the buffer
    SPL_NO_PIPE = 2
    # Pipes per worker at most (HAProxy's tune.maxpipes, default maxconn / 4), and at most a
    # sixteenth of the fd limit (2 fds each: an eighth of the fds), so that pipes can never
    # take the fds maxconn counts on (fastlb.preflight derives maxconn from the fd limit and
    # does not count pipes; should they be short anyway, accept4 fails with EMFILE and the
    # listener pauses, core/limits.pxi). A pipe is held only while bytes are in flight, so this
    # caps the bulk transfers spliced at once per worker; the others use their buffers.
    SPLICE_PIPES_MAX = 256
    SPLICE_FDS_SHARE = 16
    # Free pipes a trim leaves in the pool (a pooled pipe costs 2 fds and no memory: the
    # kernel frees a pipe's pages as they are consumed).
    SPLICE_POOL_KEEP = 4
    # The auto mode's streaks (above)
    SPLICE_AUTO_AFTER = 2
    SPLICE_AUTO_SMALL = 3
    SPLICE_SMALL = 16384

# The capacity asked of each pipe (F_SETPIPE_SZ; the kernel's default is 64 KiB), and the most
# one direction moves in one wake-up before it yields. Chosen by measurement (bench/README.md,
# "Zero-copy bulk and fairness"); module variables so that the bench can try others
# (_splice_tune), constants otherwise.
cdef int SPLICE_PIPE_SIZE = 1048576
cdef Py_ssize_t FAIR_BUDGET = 262144


def _splice_tune(int pipe_size=-1, long long budget=-1):
    """Bench and tests only: the pipe capacity asked for new pipes (bytes; 0: the kernel's
    default) and the fairness budget per wake-up (bytes). -1 keeps a value. Returns the values
    now in force, as (pipe_size, budget)."""
    global SPLICE_PIPE_SIZE, FAIR_BUDGET
    if pipe_size >= 0:
        SPLICE_PIPE_SIZE = pipe_size
    if budget > 0:
        FAIR_BUDGET = <Py_ssize_t>budget
    return SPLICE_PIPE_SIZE, FAIR_BUDGET


SPLICE_MODES = {"auto": SPLICE_AUTO, "off": SPLICE_OFF, "on": SPLICE_ON}
globals().update(SPLICE_PIPES_MAX=int(SPLICE_PIPES_MAX))


# -- the pool ---------------------------------------------------------------------------------
cdef int spl_take(Engine eng, Buf *b) noexcept:
    """Give direction ``b`` an empty pipe: from the pool, or a new one under the cap. 1, or 0
    (the cap is reached or pipe2 failed: the caller reads into its buffer this time)."""
    cdef int fds[2]
    cdef rlimit lim
    if eng.buffer_budget > 0 and ((eng.pipes_in_use + 1) * <long long>(SPLICE_PIPE_SIZE or 65536)
                                  > eng.buffer_budget * <long long>ENGINE_BUFSIZE):
        eng.pipes_capped += 1                   # what pipes hold stays within the budget too
        return 0
    if eng.npipes:
        eng.npipes -= 1
        b.pr = eng.pipes[2 * eng.npipes]
        b.pw = eng.pipes[2 * eng.npipes + 1]
        if eng.npipes < eng.pipes_low:
            eng.pipes_low = eng.npipes
    else:
        if eng.pipes == NULL:                   # the first pipe: the pool and the cap
            eng.pipes = <int *>malloc(2 * SPLICE_PIPES_MAX * sizeof(int))
            if eng.pipes == NULL:
                eng.pipe_failures += 1
                return 0
            eng.pipes_max = SPLICE_PIPES_MAX
            if getrlimit(RLIMIT_NOFILE, &lim) == 0 and lim.rlim_cur // SPLICE_FDS_SHARE < <rlim_t>SPLICE_PIPES_MAX:
                eng.pipes_max = <int>(lim.rlim_cur // SPLICE_FDS_SHARE)
        if eng.pipes_in_use >= eng.pipes_max:
            eng.pipes_capped += 1
            return 0
        if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
            eng.pipe_failures += 1
            return 0
        flb_dbg_add(FLB_DBG_FDS, 2)
        if SPLICE_PIPE_SIZE > 0:
            fcntl(fds[0], F_SETPIPE_SZ, SPLICE_PIPE_SIZE)   # refused (limits): the default
        b.pr = fds[0]
        b.pw = fds[1]
    b.piped = True
    eng.pipes_in_use += 1
    return 1


cdef void spl_give(Engine eng, Buf *b) noexcept:
    """Direction ``b``'s pipe back: to the pool when empty, else closed (its bytes are lost
    with the session: HAProxy's kill_pipe)."""
    if not b.piped:
        return
    b.piped = False
    eng.pipes_in_use -= 1
    if b.end == 0 and eng.pipes != NULL and eng.npipes < eng.pipes_max:
        eng.pipes[2 * eng.npipes] = b.pr
        eng.pipes[2 * eng.npipes + 1] = b.pw
        eng.npipes += 1
    else:
        _close_fd(b.pr)
        _close_fd(b.pw)


cdef void spl_trim(Engine eng) noexcept:
    """Close the pooled pipes nobody took since the last trim, keeping SPLICE_POOL_KEEP (the
    buffers' rule, core/buffers.pxi: the lowest pool level seen is what nobody needed)."""
    cdef int cold = eng.pipes_low
    cdef int n, i
    if cold > eng.npipes:
        cold = eng.npipes
    n = cold - SPLICE_POOL_KEEP
    if n > 0:
        for i in range(n):
            _close_fd(eng.pipes[2 * i])
            _close_fd(eng.pipes[2 * i + 1])
        for i in range(2 * n, 2 * eng.npipes):
            eng.pipes[i - 2 * n] = eng.pipes[i]
        eng.npipes -= n
    eng.pipes_low = eng.npipes


cdef void spl_free_pool(Engine eng) noexcept:
    cdef int i
    if eng.pipes != NULL:
        for i in range(2 * eng.npipes):
            _close_fd(eng.pipes[i])
        free(eng.pipes)
        eng.pipes = NULL
        eng.npipes = 0
        eng.pipes_low = 0


# -- a session's directions -------------------------------------------------------------------
cdef inline bint spl_wanted(Session s, Buf *b) noexcept:
    """Should this read of direction ``b`` (empty, established) be a splice?"""
    cdef int mode = s.svc.splice
    if s.ssl != NULL or s.bssl != NULL or mode == SPLICE_OFF or b.spl & SPL_REFUSED:  # [tls] [orig] OpenSSL
        return False
    return mode == SPLICE_ON or (b.spl & SPL_STREAM) != 0


cdef bint spl_after_recv(Session s, Buf *b, Py_ssize_t r, Py_ssize_t moved) noexcept:
    """After a buffered read of ``r`` bytes, forwarded whole (``moved`` in this wake-up): 1 when
    _pump stops reading now (the source is likely drained, the direction became a streamer
    and will be spliced from the next wake-up, or the fairness budget is spent)."""
    if r < ENGINE_BUFSIZE:                  # drained, most likely: let epoll say more
        b.large = 0
        return True
    if b.large < 255:
        b.large += 1
    if (s.svc.splice == SPLICE_AUTO and b.large >= SPLICE_AUTO_AFTER and s.ssl == NULL and s.bssl == NULL
            and not (b.spl & SPL_REFUSED)):
        b.spl |= SPL_STREAM
        b.small = 0
        return True
    return moved >= FAIR_BUDGET


cdef int spl_pump(Session s, int src, int dst, Buf *b, int field, bint *eof) noexcept:
    """_pump for a spliced direction: splice src into a pipe and the pipe into dst until src
    would block, dst would block, EOF, or FAIR_BUDGET bytes. Precondition: b is empty (no
    buffer, no pipe). 0, -1 (closed), or SPL_NO_PIPE before anything was read (no pipe to be
    had, or the socket refuses splice: the caller reads into the buffer)."""
    cdef Engine eng = s.eng
    cdef ssize_t r
    cdef Py_ssize_t moved = 0
    cdef int size
    _buf_put(s, b)                          # [mem] a buffer given while it waited: not needed
    while True:
        if not b.piped and not spl_take(eng, b):
            return SPL_NO_PIPE if moved == 0 else 0
        size = SPLICE_PIPE_SIZE if SPLICE_PIPE_SIZE > 0 else 65536
        r = splice(src, NULL, b.pw, NULL, size, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
        if r > 0:
            # as _pump's buffered read: the first backend byte, activity, byte counts
            if src == s.bfd and not s.b_seen:
                s.b_seen = True
                eng.consec[s.slot] = 0
                s.t_first = _mono_ns()          # [obs] Tr ends
            s.last = eng.now
            if src == s.cfd:
                s.nbin += r
            else:
                s.nbout += r
            eng.counters.add_c(eng.block, s.slot, field, r)
            eng.spliced_bytes += r
            b.start = 0
            b.end = r
            moved += r
            if spl_flush(s, b, dst) <= 0:
                return -1 if s.state == S_CLOSED else 0
            if moved >= FAIR_BUDGET:
                break
        elif r == 0:
            eof[0] = True
            spl_give(eng, b)
            break
        elif errno == EINTR:
            continue
        elif errno == EAGAIN:                   # the pipe is empty: the socket is
            spl_give(eng, b)
            break
        elif errno == EINVAL or errno == ENOSYS or errno == EBADF:
            spl_give(eng, b)                    # this socket cannot be spliced: recv/send
            b.spl = SPL_REFUSED
            return SPL_NO_PIPE if moved == 0 else 0
        else:
            spl_give(eng, b)
            if src == s.bfd and not s.b_seen:
                eng._passive_failure(s.svc, s.slot, errno)
            s.term = TERM_CD if src == s.cfd else TERM_SD     # [obs]
            s._close()
            return -1
    if moved < SPLICE_SMALL:                    # auto: small wake-ups end the streak
        if b.small < 255:
            b.small += 1
        if b.small >= SPLICE_AUTO_SMALL:
            b.spl &= ~SPL_STREAM
            b.small = 0
            b.large = 0
    else:
        b.small = 0
    return 0


cdef int spl_flush(Session s, Buf *b, int dst) noexcept:
    """_flush for a direction whose bytes are in its pipe (b.end of them). 1: all sent (the
    pipe is given back), 0: would block, -1: error (closed)."""
    cdef ssize_t w
    if dst == s.bfd and s.lean_nd != LEAN_ND_SET:
        lean_before_send(s)                 # [lean] TCP_NODELAY from the 2nd send on
    while b.end > 0:
        w = splice(b.pr, NULL, dst, NULL, b.end, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
        if w > 0:
            b.end -= w
            s.last = s.eng.now
            if s.first_sent == 0 and dst == s.bfd:
                s.first_sent = s.eng.now        # [mem] first_byte's clock starts
        elif w < 0 and errno == EINTR:
            continue
        elif w == 0 or errno == EAGAIN:         # (0: HAProxy's raw_sock_from_pipe, as EAGAIN)
            return 0
        else:
            s.term = TERM_CD if dst == s.cfd else TERM_SD     # [obs]
            s._close()
            return -1
    b.start = 0
    spl_give(s.eng, b)
    return 1


cdef void spl_close(Session s) noexcept:
    """The session closes: its pipes back (closed if they still hold bytes)."""
    if s.c2b.piped:
        spl_give(s.eng, &s.c2b)
        s.c2b.end = 0
    if s.b2c.piped:
        spl_give(s.eng, &s.b2c)
        s.b2c.end = 0


cdef void spl_dealloc(Session s) noexcept:
    """A session freed without _close (its engine freed first): close what it still holds."""
    if s.c2b.piped:
        _close_fd(s.c2b.pr)
        _close_fd(s.c2b.pw)
    if s.b2c.piped:
        _close_fd(s.b2c.pr)
        _close_fd(s.b2c.pw)
