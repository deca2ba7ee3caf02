# One client/server address as the access pieces see it (PROXY protocol, ACLs, source limits).
#
# Owner of: flb_addr, the one packed address type of those pieces, and its conversions. IPv4 is
# stored IPv4-mapped (::ffff:a.b.c.d) so that every address is 16 bytes and an IPv4-mapped
# IPv6 client (a dual-stack listener's view of an IPv4 peer) is the same bytes as the IPv4
# client: ACLs and source limits treat both as IPv4 (addr_is_v4). ``family`` keeps what was
# given, for building PROXY headers. Plain C: the engine fills one from accept()'s sockaddr or
# from a parsed PROXY header, without Python.
from libc.string cimport memcpy, memcmp, memset

cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char *src, void *dst)

cdef enum:
    FLB_FAM_UNSPEC = 0     # no address (PROXY UNKNOWN / UNSPEC / LOCAL): use the real peer
    FLB_FAM_INET = 4
    FLB_FAM_INET6 = 6

ctypedef struct flb_addr:
    unsigned char ip[16]   # network order; IPv4 as ::ffff:a.b.c.d
    unsigned short port    # host order
    unsigned char family   # FLB_FAM_*


cdef inline bint addr_is_v4(const flb_addr *a) noexcept nogil:
    """True for an IPv4 address, given as IPv4 or as IPv4-mapped IPv6 (::ffff:a.b.c.d)."""
    cdef int i
    if a.family == FLB_FAM_UNSPEC:
        return False
    for i in range(10):
        if a.ip[i] != 0:
            return False
    return a.ip[10] == 0xff and a.ip[11] == 0xff


cdef inline void addr_set_v4(flb_addr *a, const unsigned char *ip4,
                             unsigned short port) noexcept nogil:
    memset(a.ip, 0, 10)
    a.ip[10] = 0xff
    a.ip[11] = 0xff
    memcpy(&a.ip[12], ip4, 4)
    a.port = port
    a.family = FLB_FAM_INET


cdef inline void addr_set_v6(flb_addr *a, const unsigned char *ip6,
                             unsigned short port) noexcept nogil:
    memcpy(a.ip, ip6, 16)
    a.port = port
    a.family = FLB_FAM_INET6


cdef int addr_from_sockaddr(const sockaddr *sa, flb_addr *out) noexcept nogil:
    """Fill ``out`` from an AF_INET/AF_INET6 sockaddr (accept()'s peer). Returns 0, or -1 (and
    an UNSPEC address) for any other family. Precondition: ``sa`` is as long as its family."""
    memset(out, 0, sizeof(flb_addr))
    if sa.sa_family == AF_INET:
        addr_set_v4(out, <const unsigned char *>&(<const sockaddr_in *>sa).sin_addr,
                    ntohs((<const sockaddr_in *>sa).sin_port))
        return 0
    if sa.sa_family == AF_INET6:
        addr_set_v6(out, (<const sockaddr_in6 *>sa).sin6_addr.s6_addr,
                    ntohs((<const sockaddr_in6 *>sa).sin6_port))
        return 0
    return -1


# -- Python side (cold paths and tests only) ---------------------------------------------------

cdef int addr_from_text(object ip, int port, flb_addr *out, str what) except -1:
    """Fill ``out`` from an address text (IPv4 or IPv6) and a port; CoreArgumentError naming
    ``what`` otherwise."""
    import socket as _socket
    if not isinstance(ip, str):
        raise CoreTypeError(f"{what}: an address must be a str, got {type(ip).__name__}")
    if not 0 <= port <= 65535:
        raise CoreArgumentError(f"{what}: port {port} out of range 0..65535")
    memset(out, 0, sizeof(flb_addr))
    cdef bytes raw
    try:
        raw = _socket.inet_pton(_socket.AF_INET, ip)
        addr_set_v4(out, <const unsigned char *>PyBytes_AS_STRING(raw), <unsigned short>port)
        return 0
    except OSError:
        pass
    try:
        raw = _socket.inet_pton(_socket.AF_INET6, ip)
    except (OSError, ValueError):
        raise CoreArgumentError(
            f"{what}: {ip!r} is not an IPv4 or IPv6 address (e.g. '192.0.2.1', '2001:db8::1')"
        ) from None
    addr_set_v6(out, <const unsigned char *>PyBytes_AS_STRING(raw), <unsigned short>port)
    return 0


cdef int addr_from_py(object pair, flb_addr *out, str what) except -1:
    """``None`` (no address: UNSPEC) or ``(ip_text, port)``."""
    if pair is None:
        memset(out, 0, sizeof(flb_addr))
        return 0
    try:
        ip, port = pair
    except (TypeError, ValueError):
        raise CoreTypeError(f"{what}: expected (ip, port) or None, got {pair!r}") from None
    if not isinstance(port, int):
        raise CoreTypeError(f"{what}: port must be an int, got {type(port).__name__}")
    return addr_from_text(ip, port, out, what)


cdef object addr_to_py(const flb_addr *a):
    """``(ip_text, port)``, IPv4 as dotted quad when the family is IPv4; None when UNSPEC."""
    import socket as _socket
    if a.family == FLB_FAM_UNSPEC:
        return None
    if a.family == FLB_FAM_INET:
        return (_socket.inet_ntop(_socket.AF_INET, (<char *>a.ip)[12:16]), a.port)
    return (_socket.inet_ntop(_socket.AF_INET6, (<char *>a.ip)[:16]), a.port)


def _addr_from_sockaddr(data):
    """Test helper for addr_from_sockaddr: a packed struct sockaddr_in/sockaddr_in6 (bytes, as
    ServiceState packs them) -> (ip, port), or None for another family."""
    cdef flb_addr a
    cdef bytes b = bytes(data)
    if len(b) < 28:                       # sizeof(struct sockaddr_in6); pad a sockaddr_in
        b = b + bytes(28 - len(b))
    if addr_from_sockaddr(<const sockaddr *>PyBytes_AS_STRING(b), &a) < 0:
        return None
    return addr_to_py(&a)
