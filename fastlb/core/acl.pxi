# L4 access lists: service.acl = { allow = [CIDRs], deny = [CIDRs] }.
#
# Owner of: the verdict for one client address. Rules (the issue's words, made exact):
#   - deny wins: an address in any deny CIDR is refused;
#   - an empty allow list admits everyone (not denied); a non-empty one admits only its CIDRs;
#   - IPv4 and IPv6 are separate spaces: IPv4 rules match IPv4 clients, including IPv4-mapped
#     IPv6 ones (::ffff:a.b.c.d, what a dual-stack listener reports); IPv6 rules never match an
#     IPv4 client. A rule written inside ::ffff:0:0/96 is refused at build: write it as IPv4.
#   - a client without an address (PROXY UNKNOWN/LOCAL on a unix listener...) matches no rule.
# Data structure: the verdict is a function of the address that is constant on intervals, so
# the build (cold, Python ints) computes, per family, the admitted set = allow (or everything)
# minus deny, as sorted, disjoint, non-adjacent inclusive intervals; the lookup is one binary
# search over them (O(log n), no allocation, no Python). IPv6 bounds are two uint64 (hi, lo);
# IPv4 bounds one. Thousands of CIDRs make a few thousand intervals at most (n_allow + n_deny + 1)
# and a lookup of at most log2(20001) ~ 15 probes. A trie would give O(prefix length) but
# chases pointers; sorted arrays stay in a few cache lines at the top of the search.

cdef int _ival_find4(const uint64_t *iv, Py_ssize_t n, uint64_t x) noexcept nogil:
    """1 when x lies in one of the n intervals iv[2i] <= x <= iv[2i+1] (sorted, disjoint)."""
    cdef Py_ssize_t lo = 0, hi = n, mid
    # invariant: every interval before lo starts <= x; every interval from hi starts > x
    while lo < hi:
        mid = (lo + hi) >> 1
        if iv[2 * mid] <= x:
            lo = mid + 1
        else:
            hi = mid
    return lo > 0 and x <= iv[2 * (lo - 1) + 1]


cdef inline bint _le128(uint64_t ah, uint64_t al, uint64_t bh, uint64_t bl) noexcept nogil:
    return ah < bh or (ah == bh and al <= bl)


cdef int _ival_find6(const uint64_t *iv, Py_ssize_t n, uint64_t xh, uint64_t xl) noexcept nogil:
    """The same over 128-bit bounds: interval i is (iv[4i], iv[4i+1]) .. (iv[4i+2], iv[4i+3])."""
    cdef Py_ssize_t lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if _le128(iv[4 * mid], iv[4 * mid + 1], xh, xl):
            lo = mid + 1
        else:
            hi = mid
    return lo > 0 and _le128(xh, xl, iv[4 * (lo - 1) + 2], iv[4 * (lo - 1) + 3])


cdef inline uint64_t _load_be64(const unsigned char *p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v = (v << 8) | p[i]
    return v


@cython.wraparound(True)
def _acl_intervals(rules, str what, int version):
    """The merged intervals [(first, last)] of the CIDRs of one family in ``rules``."""
    spans = sorted((int(net.network_address), int(net.broadcast_address))
                   for net in rules if net.version == version)
    merged = []
    for a, b in spans:
        if merged and a <= merged[-1][1] + 1:
            if b > merged[-1][1]:
                merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


def _acl_subtract(keep, remove):
    """Intervals of ``keep`` minus those of ``remove`` (both sorted, merged)."""
    out = []
    j = 0
    for a, b in keep:
        while j < len(remove) and remove[j][1] < a:
            j += 1
        k = j
        cur = a
        while k < len(remove) and remove[k][0] <= b:
            ra, rb = remove[k]
            if ra > cur:
                out.append((cur, ra - 1))
            cur = max(cur, rb + 1)
            k += 1
        if cur <= b:
            out.append((cur, b))
    return out


def _acl_parse(entries, str what):
    import ipaddress as _ip
    if isinstance(entries, (str, bytes)) or not hasattr(entries, "__iter__"):
        raise CoreTypeError(f"{what} must be a list of CIDR strings, got {type(entries).__name__}")
    mapped = _ip.IPv6Network("::ffff:0:0/96")
    nets = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, str):
            raise CoreTypeError(f"{what}[{i}] must be a CIDR string, got {type(entry).__name__}")
        try:
            net = _ip.ip_network(entry, strict=True)
        except ValueError as exc:
            hint = ""
            try:
                hint = f"; did you mean {_ip.ip_network(entry, strict=False)}?"
            except ValueError:
                hint = "; expected e.g. '10.0.0.0/8', '192.0.2.7', '2001:db8::/32'"
            raise CoreArgumentError(f"{what}[{i}] = {entry!r}: {exc}{hint}") from None
        if net.version == 6 and net.subnet_of(mapped):
            raise CoreArgumentError(
                f"{what}[{i}] = {entry!r}: an IPv4-mapped range; write it as IPv4 "
                f"({_ip.ip_network((int(net.network_address) & 0xffffffff, net.prefixlen - 96))})")
        nets.append(net)
    return nets


@cython.final
cdef class Acl:
    """An immutable access list: ``Acl(allow=[...], deny=[...])`` (CIDR strings, IPv4/IPv6).

    Built once (cold); ``admits(ip)`` from Python, ``admits_c(&addr)`` from the engine."""
    cdef uint64_t *v4          # 2 words per interval
    cdef uint64_t *v6          # 4 words per interval
    cdef readonly Py_ssize_t n4
    cdef readonly Py_ssize_t n6
    cdef readonly tuple allow
    cdef readonly tuple deny
    cdef bint open_to_all       # the allow list is empty

    def __cinit__(self, allow=(), deny=()):
        allow_nets = _acl_parse(allow, "acl.allow")
        deny_nets = _acl_parse(deny, "acl.deny")
        self.allow = tuple(str(n) for n in allow_nets)
        self.deny = tuple(str(n) for n in deny_nets)
        self.open_to_all = not allow_nets
        fams = {}
        for version, top in ((4, (1 << 32) - 1), (6, (1 << 128) - 1)):
            keep = _acl_intervals(allow_nets, "acl.allow", version) if allow_nets else [(0, top)]
            fams[version] = _acl_subtract(keep, _acl_intervals(deny_nets, "acl.deny", version))
        self.n4 = len(fams[4])
        self.n6 = len(fams[6])
        self.v4 = <uint64_t *>malloc(max(1, self.n4) * 2 * sizeof(uint64_t))
        self.v6 = <uint64_t *>malloc(max(1, self.n6) * 4 * sizeof(uint64_t))
        if self.v4 == NULL or self.v6 == NULL:
            raise MemoryError()
        cdef Py_ssize_t i
        cdef uint64_t m64 = 0xFFFFFFFFFFFFFFFF
        for i, (a, b) in enumerate(fams[4]):
            self.v4[2 * i] = a
            self.v4[2 * i + 1] = b
        for i, (a, b) in enumerate(fams[6]):
            self.v6[4 * i] = a >> 64
            self.v6[4 * i + 1] = a & m64
            self.v6[4 * i + 2] = b >> 64
            self.v6[4 * i + 3] = b & m64

    def __dealloc__(self):
        free(self.v4)
        free(self.v6)

    cdef bint admits_c(self, const flb_addr *a) noexcept nogil:
        """The verdict for one client address (any family; UNSPEC matches no rule)."""
        cdef uint64_t v
        if addr_is_v4(a):
            v = ((<uint64_t>a.ip[12] << 24) | (<uint64_t>a.ip[13] << 16)
                 | (<uint64_t>a.ip[14] << 8) | a.ip[15])
            return _ival_find4(self.v4, self.n4, v)
        if a.family == FLB_FAM_INET6:
            return _ival_find6(self.v6, self.n6, _load_be64(a.ip), _load_be64(a.ip + 8))
        return self.open_to_all

    def admits(self, str ip):
        """True when the client address ``ip`` (text, IPv4 or IPv6) is admitted."""
        cdef flb_addr a
        addr_from_text(ip, 0, &a, "Acl.admits")
        return self.admits_c(&a)

    def intervals(self):
        """The admitted set as {4: [(first, last)], 6: [...]} (ints), for tests and display."""
        cdef Py_ssize_t i
        return {
            4: [(self.v4[2 * i], self.v4[2 * i + 1]) for i in range(self.n4)],
            6: [(((<object>self.v6[4 * i]) << 64) | self.v6[4 * i + 1],
                 ((<object>self.v6[4 * i + 2]) << 64) | self.v6[4 * i + 3])
                for i in range(self.n6)],
        }

    def __repr__(self):
        return f"Acl(allow={list(self.allow)!r}, deny={list(self.deny)!r})"


def acl_admits_many(Acl acl, str ip, int count):
    """Benchmark helper: ``count`` lookups of one address through the cdef path, as the engine
    would call it; returns how many were admitted."""
    cdef flb_addr a
    cdef int i, n = 0
    addr_from_text(ip, 0, &a, "acl_admits_many")
    for i in range(count):
        a.ip[15] = <unsigned char>(a.ip[15] + i)
        n += acl.admits_c(&a)
    return n
