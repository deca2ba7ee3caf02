# [mem] Timeouts beyond connect and idle, and TCP keepalive, without a timer per connection:
# Engine.sweep (called at the idle cadence by fastlb.dataplane.sweep_forever) asks
# _timers_expired of each open session; each check compares a few stamps the session already
# keeps (born, last, first_sent) with its service's settings (0: off).
#
#   client_fin / server_fin  after the client's (server's) EOF, the half-closed connection is
#       closed once it has been this long without traffic: HAProxy's timeout client-fin /
#       server-fin, an inactivity timeout that replaces the idle one once a side is shut, so a
#       download after the client's EOF goes on as long as bytes move.
#   max_duration  a session's whole life, from accept (no HAProxy equivalent; nginx has none).
#   first_byte  the backend's first byte must come within this after the first client byte
#       was sent to it. HAProxy arms its server read timeout once it has forwarded request data
#       (timeout server), not at connect: a clock from the connect would blame the backend for
#       a client slow to speak. Protocols where the server speaks first are not covered (the
#       client waits, nothing is sent): the idle timeout covers those. A backend past it is a
#       passive failure (fall_passive in a row mark it down), counted in
#       Engine.timeouts_first_byte.

from libc.errno cimport ETIMEDOUT


cdef int _timers_expired(Session s, double now) noexcept:
    """1 when ``s`` (open) is past one of its service's timers of this file (counted), else 0."""
    cdef ServiceState svc = s.svc
    if s.state != S_OPEN:
        return 0
    if svc.max_duration > 0 and now - s.born >= svc.max_duration:
        s.eng.timeouts_duration += 1
        s.term = TERM_MAX_DURATION            # [obs]
        return 1
    # A side's FIN time counts once its direction is drained: [lean] _pump may know the EOF
    # while the last bytes still wait for a slow reader, and those are not to be cut off.
    cdef bint cfin = (s.c_eof and s.c2b.end == 0 and svc.client_fin > 0
                      and now - s.last >= svc.client_fin)
    cdef bint sfin = (s.b_eof and s.b2c.end == 0 and svc.server_fin > 0
                      and now - s.last >= svc.server_fin)
    if cfin or sfin:
        s.eng.timeouts_fin += 1
        s.term = TERM_FIN_CLIENT if cfin else TERM_FIN_SERVER   # [obs]
        return 1
    if (svc.first_byte > 0 and not s.b_seen and not s.b_eof and s.first_sent > 0
            and now - s.first_sent >= svc.first_byte):   # (an EOF is an answer, not silence)
        s.eng.timeouts_first_byte += 1
        s.term = TERM_FIRST_BYTE_TIMEOUT      # [obs]
        _first_byte_timeout(s)
        return 1
    return 0


cdef void _first_byte_timeout(Session s) noexcept:
    """A passive failure of the backend (as a reset before its first byte is)."""
    s.eng.gauges.add(s.svc.row, G_FIRST_BYTE_TIMEOUT, 1)     # the service's row (-1: none)
    s.eng._passive_failure(s.svc, s.slot, ETIMEDOUT)


cdef void _keepalive(int fd, ServiceState svc) noexcept:
    """SO_KEEPALIVE with the service's idle/interval/count on a client or backend socket."""
    cdef int one = 1
    if svc.ka_idle == 0:                      # off; -1: on, the kernel's idle time
        return
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(int))
    if svc.ka_idle > 0:
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &svc.ka_idle, sizeof(int))
    if svc.ka_interval > 0:                   # 0: the kernel's (net.ipv4.tcp_keepalive_*)
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &svc.ka_interval, sizeof(int))
    if svc.ka_count > 0:
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &svc.ka_count, sizeof(int))
