# Connection limits, queues and local resource errors (issue 11, part `limits`).
#
# Owner of: [global] maxconn and service.maxconn at the listener, backends[].max_conns at the
# pick, the service's bounded FIFO queue, and the local errors (out of fds, memory or ports) of
# accept4/socket/connect. The engine and the session call these cdef functions from small
# hooks (marked [limits] in engine.pxi and session.pxi); everything shared between workers is in
# the Gauges (core/gauges.pxi): G_CUR of the global row, of the service's row and of a backend's
# slot row are the connections over every worker, taken with a CAS against the limit, so a
# limit holds exactly across processes.
#
# Listener limits (HAProxy's limit_listener, nginx's ngx_disable_accept_events): a place is taken
# in the global and the service row BEFORE accept4, and given back when accept4 finds nothing
# (EAGAIN) or fails. When a limit is reached the listener leaves this engine's epoll set
# (PAUSE_LIMIT): clients wait in the kernel's backlog, costing nothing here, instead of the
# level-triggered listener waking us in a loop. It is re-armed when a session of this engine
# closes (lim_closed) or, for a close in another worker, by the limits sweep every LIMITS_RETRY.
# accept4 failing with EMFILE/ENFILE/ENOBUFS/ENOMEM pauses it too (PAUSE_FDS): re-armed by the
# next close here (which frees fds) or after LIMITS_RETRY. Either way at most a few failed
# accept4 a second, never a spin.
#
# Backend caps: a pick at its cap is skipped for this connection like a tried backend, without
# counting a failure (HAProxy: a server at maxconn is not eligible). When the pick runs out and
# a backend was skipped at its cap, the client waits in the service's queue (bounded across
# workers by G_QUEUED of the service row, FIFO in this worker), or is closed at once and counted
# G_QUEUE_FULL. A session that gives a place at a backend back (its close) retries this worker's
# queue from its head; the sweep does the same (a place freed in another worker) and closes
# clients whose wait passed service.queue.timeout (G_QUEUE_TIMEOUT). A head that still finds
# no place keeps its place at the head.
#
# Local errors: socket() or connect() failing with EMFILE, ENFILE, ENOBUFS, ENOMEM,
# EADDRNOTAVAIL or EAGAIN (no local port) are this host's, not the backend's: no connect
# failure is counted, no passive streak, no policy on_failure; the client is closed (keeping it
# would hold the fds we are short of; HAProxy answers SF_ERR_RESOURCE the same way, without
# blaming the server), G_LOCAL_ERRORS is counted, this engine's listeners are paused as for
# EMFILE on accept, and Engine.on_local_error is called at most once per LOCAL_ERROR_REPORT
# with the count since the last call (the data plane logs it; workers log to the supervisor's
# stderr).
from libc.errno cimport EMFILE, ENFILE, ENOBUFS, EADDRNOTAVAIL


cdef void lim_init(Engine eng) noexcept:
    eng.slot_cap = <int64_t *>calloc(eng.counters.nslots, sizeof(int64_t))
    if eng.slot_cap == NULL:
        raise MemoryError()
    eng.paused = []
    eng.queued = set()
    eng.local_reported_at[0] = eng.local_reported_at[1] = -1e9


cdef inline int lim_global(Engine eng) noexcept:
    """The whole balancer's Gauges row (the last one: Engine.global_row)."""
    return eng.gauges.nrows - 1


cdef inline void lim_count(Engine eng, int row, int field) noexcept:
    """Count one event of ``field`` in a service's ``row`` and for the whole balancer."""
    eng.gauges.add(row, field, 1)
    eng.gauges.add(lim_global(eng), field, 1)


# -- listeners ---------------------------------------------------------------------------------
cdef void lim_pause(Engine eng, Listener lst, int why) noexcept:
    """Take ``lst`` out of the epoll set: clients wait in the kernel's backlog."""
    if lst.paused or not lst.registered:
        return
    epoll_ctl(lst.lepfd, EPOLL_CTL_DEL, lst.fd, NULL)     # [lean] its set
    lst.paused = why
    lst.paused_at = eng.now
    eng.paused.append(lst)
    eng.npaused += 1


cdef inline bint lim_room(Engine eng, ServiceState svc) noexcept:
    """A place is free under [global] maxconn and service.maxconn (over every worker)."""
    return ((eng.maxconn <= 0 or eng.gauges.get_c(lim_global(eng), G_CUR) < eng.maxconn)
            and (svc.maxconn <= 0 or eng.gauges.get_c(svc.row, G_CUR) < svc.maxconn))


cdef void lim_resume(Engine eng, bint closed) noexcept:
    """Re-arm the paused listeners that may accept again: a limit with room, a lack of fds
    after a close here (``closed``) or after LIMITS_RETRY."""
    cdef Listener lst
    cdef list keep = []
    cdef epoll_event ev
    cdef bint ok
    for lst in eng.paused:
        if not lst.registered:              # unlistened meanwhile
            continue
        if lst.paused == PAUSE_FDS:
            ok = closed or eng.now - lst.paused_at >= LIMITS_RETRY
        else:
            ok = lim_room(eng, lst.svc)
        if ok:
            ev.events = lst.events
            ev.data.u64 = lst.ldata                 # [lean] its set and data
            ok = epoll_ctl(lst.lepfd, EPOLL_CTL_ADD, lst.fd, &ev) == 0
        if ok:
            lst.paused = PAUSE_NONE
        else:
            keep.append(lst)
    eng.paused = keep
    eng.npaused = len(keep)


cdef bint lim_admit(Engine eng, Listener lst) noexcept:
    """Take a place for the next accept4 in the global and the service row. At a limit:
    pause ``lst``, count G_MAXCONN_REACHED on the row whose limit it is, and return False."""
    if not eng.gauges.take_field(lim_global(eng), G_CUR, eng.maxconn):
        eng.gauges.add(lim_global(eng), G_MAXCONN_REACHED, 1)
        lim_pause(eng, lst, PAUSE_LIMIT)
        return False
    if not eng.gauges.take_field(lst.svc.row, G_CUR, lst.svc.maxconn):
        eng.gauges.give(lim_global(eng))
        eng.gauges.add(lst.svc.row, G_MAXCONN_REACHED, 1)
        lim_pause(eng, lst, PAUSE_LIMIT)
        return False
    return True


cdef inline void lim_unadmit(Engine eng, ServiceState svc) noexcept:
    """accept4 took nothing: give the places of lim_admit back."""
    eng.gauges.give(svc.row)
    eng.gauges.give(lim_global(eng))


cdef inline void lim_note_max(Engine eng, int row) noexcept:
    """Raise G_MAX of ``row`` to its G_CUR, as Gauges.take does. (Added here, not in
    gauges.pxi: the admission takes its places with take_field before accept4 and notes the
    peak only once a client was accepted, so a place given back on EAGAIN leaves no false
    peak in `max`.)"""
    cdef int64_t *base
    cdef int64_t cur, m
    if row < 0:
        return
    base = eng.gauges.rows + <Py_ssize_t>row * GAUGE_LINE
    cur = flb_load_relaxed_i64(base + G_CUR)
    m = flb_load_relaxed_i64(base + G_MAX)
    while cur > m:
        if _cas_i64(base + G_MAX, &m, cur):
            break


cdef inline void lim_admitted(Engine eng, Session s) noexcept:
    s.admitted = True
    s.srow = s.svc.row
    lim_count(eng, s.srow, G_TOTAL)
    lim_note_max(eng, s.srow)
    lim_note_max(eng, lim_global(eng))


cdef inline bint lim_out_of_resources(int err) noexcept:
    return err == EMFILE or err == ENFILE or err == ENOBUFS or err == ENOMEM


cdef void lim_report(Engine eng, ServiceState svc, int where, int err) noexcept:
    """A local error of accept4 (``where`` 0) or of the backend's socket()/connect() (1):
    count it, and tell Python at most once per LOCAL_ERROR_REPORT for each place."""
    cdef long long n
    lim_count(eng, svc.row, G_LOCAL_ERRORS)
    eng.local_unreported[where] += 1
    if (eng.on_local_error is None
            or eng.now - eng.local_reported_at[where] < LOCAL_ERROR_REPORT):
        return
    eng.local_reported_at[where] = eng.now
    n = eng.local_unreported[where]
    eng.local_unreported[where] = 0
    eng._callback(svc, "on_local_error", eng.on_local_error,
                  ("connect" if where else "accept", OSError(err, strerror(err).decode()), n))


cdef bint lim_accept_failed(Engine eng, Listener lst, int err) noexcept:
    """accept4 failed with ``err``. Out of fds or memory: pause the listener, report, True."""
    if not lim_out_of_resources(err):
        return False
    lim_pause(eng, lst, PAUSE_FDS)
    lim_report(eng, lst.svc, 0, err)
    return True


cdef void lim_pause_all(Engine eng, int why) noexcept:
    cdef Listener lst
    for lst in list(eng.listeners.values()):
        lim_pause(eng, lst, why)


# -- sessions ----------------------------------------------------------------------------------
cdef int lim_take_backend(Session s, int slot) noexcept:
    """Take a place at backend ``slot`` (its max_conns over every worker). 1: taken; 0: at
    its cap, remembered as tried for this pick (no failure counted), pick again; -1: at its
    cap and the tried list is full (stop picking)."""
    if s.eng.gauges.take(slot, s.eng.slot_cap[slot]):
        s.slot_taken = True
        return 1
    if s.ntried >= MAX_TRIED:
        s.capmask |= 1                      # something was at its cap: the queue applies
        return -1
    s.capmask |= (<uint32_t>1) << s.ntried
    s.tried[s.ntried] = slot
    s.ntried += 1
    s.attempts -= 1                         # a skip is not an attempt
    return 0


cdef inline void lim_give_backend(Session s) noexcept:
    if s.slot_taken:
        s.slot_taken = False
        s.eng.gauges.give(s.slot)


cdef bint lim_local_error(Session s, int err) noexcept:
    """A connect attempt failed with ``err``. When it is a local error (out of fds, memory or
    local ports): count and report it, pause the listeners if fds ran out, close the client,
    and return True: nothing is held against the backend."""
    cdef Engine eng = s.eng
    if not (lim_out_of_resources(err) or err == EADDRNOTAVAIL or err == EAGAIN):
        return False
    lim_report(eng, s.svc, 1, err)
    s.term = TERM_LOCAL_ERROR               # [obs]
    s._close()
    if lim_out_of_resources(err):           # after the close, whose re-arm would undo it
        lim_pause_all(eng, PAUSE_FDS)
    return True


cdef void lim_unlink(Session s) noexcept:
    cdef ServiceState svc = s.svc
    if not s.inqueue:
        return
    if s.qprev is not None:
        s.qprev.qnext = s.qnext
    else:
        svc.qhead = s.qnext
    if s.qnext is not None:
        s.qnext.qprev = s.qprev
    else:
        svc.qtail = s.qprev
    s.qprev = None
    s.qnext = None
    s.inqueue = False
    svc.qlen -= 1
    s.eng.gauges.give_field(svc.row, G_QUEUED)


cdef bint lim_queue(Session s) noexcept:
    """The pick ran out. If a backend was skipped at its cap, the client waits in the queue
    (or keeps its place there), or is closed when the queue is full: True. Otherwise False
    (the ordinary "no backend" path)."""
    cdef ServiceState svc = s.svc
    cdef Engine eng = s.eng
    if s.capmask == 0:
        return False
    if s.attempts > 0:
        s.attempts -= 1                     # the pick that found nothing was no attempt
    if s.inqueue:                           # a retry from the queue: still no place
        s.state = S_QUEUED
        return True
    if (svc.queue_size <= 0 or svc.qlen >= svc.queue_size
            or not eng.gauges.take_field(svc.row, G_QUEUED, svc.queue_size)):
        lim_count(eng, svc.row, G_QUEUE_FULL)
        s.term = TERM_QUEUE_FULL            # [obs]
        s._close()
        return True
    s.inqueue = True
    s.qprev = svc.qtail
    s.qnext = None
    if svc.qtail is not None:
        svc.qtail.qnext = s
    else:
        svc.qhead = s
    svc.qtail = s
    svc.qlen += 1
    eng.queued.add(svc)
    s.state = S_QUEUED
    s.qdeadline = eng.now + svc.queue_timeout
    s._update()                             # keep reading what the client sends meanwhile
    return True


cdef void lim_forget_caps(Session s) noexcept:
    """Drop the backends skipped at their cap from ``tried``: they may have a place now."""
    cdef int i, n = 0
    for i in range(s.ntried):
        if i < 32 and (s.capmask >> i) & 1:
            continue
        s.tried[n] = s.tried[i]
        n += 1
    s.ntried = n
    s.capmask = 0


cdef void lim_dequeue(ServiceState svc) noexcept:
    """Serve this worker's queue of ``svc`` from its head until a head finds no place."""
    cdef Session s
    if svc.dequeuing:
        return
    svc.dequeuing = True
    while svc.qhead is not None:
        s = svc.qhead
        lim_forget_caps(s)
        s._connect()
        if s.state == S_QUEUED:             # still no place: it keeps the head
            break
        lim_unlink(s)                       # connecting or open (a closed one is unlinked)
    svc.dequeuing = False


cdef bint lim_release(Session s) noexcept:
    """At close: leave the queue, give every place back. True when a backend place was freed
    (the service's queue may move)."""
    cdef bint freed = s.slot_taken
    if s.inqueue:
        lim_unlink(s)
    lim_give_backend(s)
    if s.admitted:
        s.admitted = False
        s.eng.gauges.give(s.srow)
        s.eng.gauges.give(s.eng.gauges.nrows - 1)    # the global row
    return freed


cdef inline void lim_closed(Engine eng, ServiceState svc, bint freed) noexcept:
    """After a close (its fds are closed): re-arm paused listeners; move the service's queue."""
    if eng.npaused:
        lim_resume(eng, True)
    if freed and svc.qhead is not None:
        lim_dequeue(svc)


cdef void lim_sweep(Engine eng) noexcept:
    """Every LIMITS_RETRY: re-arm listeners (a place freed in another worker, fds back),
    close queued clients past their timeout, retry queue heads (a place freed elsewhere)."""
    cdef ServiceState svc
    cdef Session s, nxt
    if eng.npaused == 0 and not eng.queued:
        return
    eng.now = _coarse_now()
    if eng.npaused:
        lim_resume(eng, False)
    for svc in list(eng.queued):
        s = svc.qhead
        while s is not None:
            nxt = s.qnext
            if eng.now >= s.qdeadline:
                lim_count(eng, svc.row, G_QUEUE_TIMEOUT)
                s.term = TERM_QUEUE_TIMEOUT     # [obs]
                s._close()
            s = nxt
        if svc.qhead is not None:
            lim_dequeue(svc)
        if svc.qhead is None:
            eng.queued.discard(svc)


# -- the Python face (cold: the data plane and tests) ------------------------------------------
def limits_sweep(Engine eng):
    """Run the limits sweep now (the data plane calls it every LIMITS_RETRY seconds)."""
    if eng.alive:
        lim_sweep(eng)
        eng._bury()


def set_max_conns(Engine eng, int slot, int64_t cap):
    """backends[].max_conns of the backend in ``slot`` (0: no cap), over every worker."""
    if not 0 <= slot < eng.counters.nslots:
        raise CoreArgumentError(f"slot {slot} out of range 0..{eng.counters.nslots - 1}")
    if cap < 0:
        raise CoreArgumentError(f"max_conns {cap} must be 0 (no cap) or more")
    eng.slot_cap[slot] = cap


def limits_info(Engine eng):
    """This engine's view of its limits: paused listeners by reason, queued clients (for
    tests and introspection)."""
    cdef Listener lst
    cdef ServiceState svc
    cdef int limit = 0, fds = 0, queued = 0
    for lst in eng.paused:
        if lst.paused == PAUSE_LIMIT:
            limit += 1
        elif lst.paused == PAUSE_FDS:
            fds += 1
    for svc in eng.queued:
        queued += svc.qlen
    return {"paused_limit": limit, "paused_fds": fds, "queued": queued}
