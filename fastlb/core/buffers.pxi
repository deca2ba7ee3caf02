# [mem] Bounded memory: the engine's buffers, their budget and the sessions waiting for one.
#
# A buffer (ENGINE_BUFSIZE bytes, a mapping of its own) belongs to a direction of a session only
# while it holds unsent bytes: _pump takes one when the source is readable and gives it back as
# soon as it is drained (sent, or nothing was read), so an idle connection holds none, whatever
# it exchanged before (HAProxy's model: its buffers are released when empty, b_free()).
#
# Budget (Engine.buffer_budget, in buffers; 0: none): when as many buffers are in use, a session
# that needs one is not given one: that direction leaves EPOLLIN (backpressure: its peer's
# kernel buffers fill, TCP tells it to slow down) and the session waits in a FIFO; each buffer
# given back goes straight to the first waiter, whose direction is then read again. Nothing is
# closed for it. Deadlock: a session that holds one buffer (its request waits for the backend)
# and needs a second (the backend's answer) must always get one eventually, or sessions holding
# one buffer each could wait on each other forever. So, as HAProxy's tune.buffers.reserve does,
# a session that holds no buffer may take one only while more than BUFFER_RESERVE are free, and
# waiters holding one buffer are served first: at most budget - BUFFER_RESERVE sessions hold
# any, so one of them can always get its second, finish its exchange and give both back.
#
# The pool: buffers given back are kept for reuse (LIFO, so the warm ones are reused first); the
# engine's sweep trims it once a second to what the last second used (the lowest pool level
# seen since the last trim is what nobody took: those buffers are unmapped), keeping at most
# BUFFER_POOL_KEEP cold ones. Measured (bench/idle_rss.py): MADV_FREE leaves the pages counted
# in RSS until the kernel is short of memory, and a madvise(MADV_DONTNEED) per give costs a page
# fault per 4 KiB on every reuse; unmapping only what stayed unused for a second costs nothing
# on a busy path and gives the memory back after a burst.

cdef enum:
    BUFFER_RESERVE = 2            # HAProxy's tune.buffers.reserve default
    BUFFER_POOL_KEEP = 4          # cold buffers a trim leaves in the pool (1 MiB)
    BUF_WAIT_C2B = 1              # Session.bwait bits: directions waiting for a buffer
    BUF_WAIT_B2C = 2


cdef inline char *_map_buffer() noexcept nogil:
    cdef void *p = mmap(NULL, ENGINE_BUFSIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                        -1, 0)
    if p == MAP_FAILED:
        return NULL
    flb_dbg_add(FLB_DBG_BUFFERS, 1)
    return <char *>p


cdef inline int _buf_held(Session s) noexcept:
    return (s.c2b.data != NULL) + (s.b2c.data != NULL)


cdef inline bint _buf_allowed(Engine eng, int held) noexcept:
    """May a session holding ``held`` buffers take one more now (the budget and its reserve)?"""
    if eng.buffer_budget <= 0:
        return True
    if held:
        return eng.buffers_in_use < eng.buffer_budget
    return eng.buffers_in_use < eng.buffer_budget - eng.buffer_reserve


cdef char *_buf_take(Engine eng) noexcept:
    """A buffer from the pool, or a new mapping (NULL: out of memory). Counts it in use."""
    cdef char *buf
    if eng.npool:
        eng.npool -= 1
        buf = eng.pool[eng.npool]
        if eng.npool < eng.pool_low:
            eng.pool_low = eng.npool
    else:
        buf = _map_buffer()
        if buf == NULL:
            return NULL
    eng.buffers_in_use += 1
    if eng.buffers_in_use > eng.buffers_peak:
        eng.buffers_peak = eng.buffers_in_use
    flb_dbg_add(FLB_DBG_BUFFERS_IN_USE, 1)
    return buf


cdef void _buf_give(Engine eng, char *buf) noexcept:
    """A buffer is free: to the first waiter that may have it, else to the pool."""
    cdef Session s
    if buf == NULL:
        return
    eng.buffers_in_use -= 1
    flb_dbg_add(FLB_DBG_BUFFERS_IN_USE, -1)
    while eng.wait_first != NULL or eng.wait_second != NULL:
        if eng.wait_second != NULL and _buf_allowed(eng, 1):
            s = <Session>eng.wait_second
        elif eng.wait_first != NULL and _buf_allowed(eng, 0):
            s = <Session>eng.wait_first
        else:
            break
        _buf_unwait(s)
        eng.buffers_in_use += 1
        flb_dbg_add(FLB_DBG_BUFFERS_IN_USE, 1)
        if s.bwait & BUF_WAIT_C2B and s.c2b.data == NULL:
            s.c2b.data = buf
            s.bwait &= ~BUF_WAIT_C2B
        else:
            s.b2c.data = buf
            s.bwait &= ~BUF_WAIT_B2C
        if s.bwait:                               # still waits for its other direction
            _buf_wait(s, 0)
        s._update()                               # read that direction again
        return
    if eng.pool != NULL and eng.npool < BUFFER_POOL:
        eng.pool[eng.npool] = buf
        eng.npool += 1
    else:
        _unmap_buffer(buf)


cdef inline void _unmap_buffer(char *buf) noexcept nogil:
    munmap(buf, ENGINE_BUFSIZE)
    flb_dbg_add(FLB_DBG_BUFFERS, -1)


cdef int _buf_get(Session s, Buf *b) noexcept:
    """Give direction ``b`` of ``s`` a buffer. 1: it has one; 0: none may be taken now (the
    direction waits, out of EPOLLIN, until _buf_give hands it one); -1: out of memory."""
    cdef Engine eng = s.eng
    cdef int bit = BUF_WAIT_C2B if b == &s.c2b else BUF_WAIT_B2C
    cdef int held
    if b.data != NULL:
        return 1
    held = _buf_held(s)
    if s.bwait == 0 and _buf_allowed(eng, held):
        b.data = _buf_take(eng)
        return 1 if b.data != NULL else -1
    if not (s.bwait & bit):
        s.bwait |= bit
        eng.buffer_waits += 1
        if not s.wlinked:
            _buf_wait(s, held)
    return 0


cdef inline void _buf_put(Session s, Buf *b) noexcept:
    """Give back direction b's buffer if it holds nothing (drained)."""
    if b.data != NULL and b.end == 0:
        _buf_give(s.eng, b.data)
        b.data = NULL


cdef void _buf_wait(Session s, int held) noexcept:
    """Append ``s`` to its wait list (held: the buffers it holds now)."""
    cdef Engine eng = s.eng
    cdef void **head
    cdef void **tail
    if held:
        head, tail = &eng.wait_second, &eng.wait_second_tail
    else:
        head, tail = &eng.wait_first, &eng.wait_first_tail
    s.wsecond = held != 0
    s.wnext = NULL
    s.wprev = tail[0]
    if tail[0] != NULL:
        (<Session>tail[0]).wnext = <void *>s
    else:
        head[0] = <void *>s
    tail[0] = <void *>s
    s.wlinked = True


cdef void _buf_unwait(Session s) noexcept:
    """Take ``s`` off its wait list (its bwait bits stay as they are)."""
    cdef Engine eng = s.eng
    cdef void **head
    cdef void **tail
    if not s.wlinked:
        return
    if s.wsecond:
        head, tail = &eng.wait_second, &eng.wait_second_tail
    else:
        head, tail = &eng.wait_first, &eng.wait_first_tail
    if s.wprev != NULL:
        (<Session>s.wprev).wnext = s.wnext
    else:
        head[0] = s.wnext
    if s.wnext != NULL:
        (<Session>s.wnext).wprev = s.wprev
    else:
        tail[0] = s.wprev
    s.wprev = NULL
    s.wnext = NULL
    s.wlinked = False


cdef void _buf_trim(Engine eng) noexcept:
    """Unmap the pool's buffers nobody took since the last trim (the bottom pool_low of the
    LIFO), keeping BUFFER_POOL_KEEP."""
    cdef int cold = eng.pool_low
    cdef int n, i
    if cold > eng.npool:
        cold = eng.npool
    n = cold - BUFFER_POOL_KEEP
    if n > 0:
        for i in range(n):
            _unmap_buffer(eng.pool[i])
        for i in range(n, eng.npool):
            eng.pool[i - n] = eng.pool[i]
        eng.npool -= n
    eng.pool_low = eng.npool
