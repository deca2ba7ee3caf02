# PROXY protocol v1 and v2 builders (HAProxy's doc/proxy-protocol.txt, sections 2.1 and 2.2).
#
# Owner of: the header fastlb sends to a backend: pp_build_v1/v2, the TLVs they append
# (pp_tlvs) and their Python side (proxy_build_v1/v2). Sans-IO: the engine hands them a buffer
# to fill before the first byte to a backend. The constants, signatures and rules are the
# parser's (proxyproto.pxi); what the builders write is always what that parser accepts.

ctypedef struct pp_tlvs:
    # What pp_build_v2 appends after the addresses; any pointer may be NULL with length 0.
    const unsigned char *authority
    size_t authority_len
    bint ssl                  # append a PP2_TYPE_SSL TLV
    unsigned char ssl_client  # PP2_CLIENT_* bits
    uint32_t ssl_verify       # 0: client certificate verified
    const unsigned char *ssl_version
    size_t ssl_version_len
    const unsigned char *ssl_cn
    size_t ssl_cn_len
    bint crc32c               # append a PP2_TYPE_CRC32C TLV (last) with the header's checksum
    const unsigned char *alpn # [tlsops] PP2_TYPE_ALPN: the negotiated protocol (first TLV)
    size_t alpn_len


# -- building ----------------------------------------------------------------------------------

cdef Py_ssize_t pp_build_v1(const flb_addr *src, const flb_addr *dst, char *out,
                            size_t cap) noexcept nogil:
    """Write a v1 line for (src, dst) into out[0:cap]. Both IPv4: TCP4; otherwise both as IPv6
    (IPv4 mapped): TCP6; either UNSPEC: "PROXY UNKNOWN\\r\\n". Returns its length (at most
    PP_V1_MAX), or -1 when cap is too small (nothing meaningful written)."""
    cdef char line[PP_V1_MAX + 1]
    cdef char s[48]
    cdef char d[48]
    cdef int n
    if src.family == FLB_FAM_UNSPEC or dst.family == FLB_FAM_UNSPEC:
        n = snprintf(line, sizeof(line), "PROXY UNKNOWN\r\n")
    elif src.family == FLB_FAM_INET and dst.family == FLB_FAM_INET:
        inet_ntop(AF_INET, &src.ip[12], s, sizeof(s))
        inet_ntop(AF_INET, &dst.ip[12], d, sizeof(d))
        n = snprintf(line, sizeof(line), "PROXY TCP4 %s %s %u %u\r\n", s, d,
                     <unsigned int>src.port, <unsigned int>dst.port)
    else:
        inet_ntop(AF_INET6, src.ip, s, sizeof(s))
        inet_ntop(AF_INET6, dst.ip, d, sizeof(d))
        n = snprintf(line, sizeof(line), "PROXY TCP6 %s %s %u %u\r\n", s, d,
                     <unsigned int>src.port, <unsigned int>dst.port)
    if n < 0 or <size_t>n > cap or n > PP_V1_MAX:
        return -1
    memcpy(out, line, n)
    return n


cdef inline unsigned char *_put16(unsigned char *p, unsigned int v) noexcept nogil:
    p[0] = (v >> 8) & 0xff
    p[1] = v & 0xff
    return p + 2


cdef Py_ssize_t pp_build_v2(int command, const flb_addr *src, const flb_addr *dst,
                            const pp_tlvs *tlvs, unsigned char *out, size_t cap) noexcept nogil:
    """Write a v2 header into out[0:cap]: ``command`` PP_CMD_PROXY or PP_CMD_LOCAL; addresses as
    TCP4 (both IPv4), TCP6 (otherwise, IPv4 mapped) or none (either UNSPEC, or LOCAL); then the
    TLVs of ``tlvs`` (may be NULL): AUTHORITY, SSL (client, verify, VERSION and CN sub-TLVs),
    CRC32C last. Returns the length, or -1 when it exceeds cap or PP_V2_MAX (what our own parser
    accepts) or a TLV exceeds 65535 bytes."""
    cdef size_t need = PP_V2_HEADER, ssl_len = 0
    cdef unsigned int fam = 0x00
    cdef unsigned char *p
    cdef uint32_t crc
    if command != PP_CMD_PROXY and command != PP_CMD_LOCAL:
        return -1
    if command == PP_CMD_PROXY and src.family != FLB_FAM_UNSPEC and dst.family != FLB_FAM_UNSPEC:
        fam = 0x11 if (src.family == FLB_FAM_INET and dst.family == FLB_FAM_INET) else 0x21
    need += 12 if fam == 0x11 else (36 if fam == 0x21 else 0)
    if tlvs != NULL:
        if tlvs.alpn_len:                                           # [tlsops]
            need += 3 + tlvs.alpn_len
        if tlvs.authority_len:
            need += 3 + tlvs.authority_len
        if tlvs.ssl:
            ssl_len = 5
            if tlvs.ssl_version_len:
                ssl_len += 3 + tlvs.ssl_version_len
            if tlvs.ssl_cn_len:
                ssl_len += 3 + tlvs.ssl_cn_len
            need += 3 + ssl_len
        if tlvs.crc32c:
            need += 7
    if need > cap or need > PP_V2_MAX:
        return -1
    memcpy(out, PP_V2_SIG, 12)
    out[12] = 0x20 | command
    out[13] = fam
    p = _put16(out + 14, <unsigned int>(need - PP_V2_HEADER))
    if fam == 0x11:
        memcpy(p, &src.ip[12], 4)
        memcpy(p + 4, &dst.ip[12], 4)
        p = _put16(_put16(p + 8, src.port), dst.port)
    elif fam == 0x21:
        memcpy(p, src.ip, 16)
        memcpy(p + 16, dst.ip, 16)
        p = _put16(_put16(p + 32, src.port), dst.port)
    if tlvs != NULL:
        if tlvs.alpn_len:                   # [tlsops] HAProxy's order: ALPN, then AUTHORITY
            p[0] = PP2_TYPE_ALPN
            p = _put16(p + 1, <unsigned int>tlvs.alpn_len)
            memcpy(p, tlvs.alpn, tlvs.alpn_len)
            p += tlvs.alpn_len
        if tlvs.authority_len:
            p[0] = PP2_TYPE_AUTHORITY
            p = _put16(p + 1, <unsigned int>tlvs.authority_len)
            memcpy(p, tlvs.authority, tlvs.authority_len)
            p += tlvs.authority_len
        if tlvs.ssl:
            p[0] = PP2_TYPE_SSL
            p = _put16(p + 1, <unsigned int>ssl_len)
            p[0] = tlvs.ssl_client
            p = _put16(_put16(p + 1, tlvs.ssl_verify >> 16), tlvs.ssl_verify & 0xffff)
            if tlvs.ssl_version_len:
                p[0] = PP2_SUBTYPE_SSL_VERSION
                p = _put16(p + 1, <unsigned int>tlvs.ssl_version_len)
                memcpy(p, tlvs.ssl_version, tlvs.ssl_version_len)
                p += tlvs.ssl_version_len
            if tlvs.ssl_cn_len:
                p[0] = PP2_SUBTYPE_SSL_CN
                p = _put16(p + 1, <unsigned int>tlvs.ssl_cn_len)
                memcpy(p, tlvs.ssl_cn, tlvs.ssl_cn_len)
                p += tlvs.ssl_cn_len
        if tlvs.crc32c:
            p[0] = PP2_TYPE_CRC32C
            p = _put16(p + 1, 4)
            memset(p, 0, 4)
            crc = crc32c_update(0, out, need)
            p = _put16(_put16(p, crc >> 16), crc & 0xffff)
    return need


# -- Python side (tests, tools; not the data path) ---------------------------------------------

def proxy_build_v1(src, dst):
    """The v1 line for ``src``/``dst`` ((ip, port) or None for UNKNOWN), as bytes."""
    cdef flb_addr s, d
    cdef char out[PP_V1_MAX]
    addr_from_py(src, &s, "src")
    addr_from_py(dst, &d, "dst")
    cdef Py_ssize_t n = pp_build_v1(&s, &d, out, sizeof(out))
    if n < 0:
        raise CoreArgumentError("PROXY v1 line longer than 107 bytes")  # cannot happen
    return out[:n]


def proxy_build_v2(src, dst, *, int command=PP_CMD_PROXY, authority=None, ssl=None,
                   bint crc32c=False):
    """The v2 header for ``src``/``dst`` ((ip, port) or None), as bytes. ``authority``: bytes
    (e.g. the SNI); ``ssl``: a dict with optional keys client (int, PP2_CLIENT_* bits), verify
    (int), version (bytes), cn (bytes); ``crc32c``: append a CRC32C TLV."""
    cdef flb_addr s, d
    cdef pp_tlvs t
    cdef unsigned char out[PP_V2_MAX]
    cdef bytes auth_b = b"", ver_b = b"", cn_b = b""
    if command != PP_CMD_PROXY and command != PP_CMD_LOCAL:
        raise CoreArgumentError(f"command {command}: must be PP_CMD_PROXY (1) or PP_CMD_LOCAL (0)")
    addr_from_py(src, &s, "src")
    addr_from_py(dst, &d, "dst")
    memset(&t, 0, sizeof(t))
    if ssl is not None and (not isinstance(ssl, dict)
                            or set(ssl) - {"client", "verify", "version", "cn"}):
        raise CoreArgumentError(
            f"ssl must be a dict with keys among client, verify, version, cn; got {ssl!r}")
    ssl_d = ssl or {}
    for name, value in (("authority", authority), ("ssl version", ssl_d.get("version")),
                        ("ssl cn", ssl_d.get("cn"))):
        if value is not None and not isinstance(value, (bytes, bytearray, memoryview)):
            raise CoreTypeError(f"{name} must be bytes (encode text as UTF-8), got "
                                f"{type(value).__name__}")
    if authority is not None:
        auth_b = bytes(authority)
        t.authority = <const unsigned char *>PyBytes_AS_STRING(auth_b)
        t.authority_len = len(auth_b)
    if ssl is not None:
        client, verify = ssl.get("client", PP2_CLIENT_SSL), ssl.get("verify", 0)
        if not (isinstance(client, int) and 0 <= client <= 255):
            raise CoreArgumentError(f"ssl client = {client!r}: PP2_CLIENT_* bits, 0..255")
        if not (isinstance(verify, int) and 0 <= verify <= 0xFFFFFFFF):
            raise CoreArgumentError(f"ssl verify = {verify!r}: a uint32 (0: verified)")
        t.ssl = True
        t.ssl_client = client
        t.ssl_verify = verify
        ver_b = bytes(ssl.get("version", b""))
        cn_b = bytes(ssl.get("cn", b""))
        t.ssl_version = <const unsigned char *>PyBytes_AS_STRING(ver_b)
        t.ssl_version_len = len(ver_b)
        t.ssl_cn = <const unsigned char *>PyBytes_AS_STRING(cn_b)
        t.ssl_cn_len = len(cn_b)
    t.crc32c = crc32c
    cdef Py_ssize_t n = pp_build_v2(command, &s, &d, &t, out, sizeof(out))
    if n < 0:
        raise CoreArgumentError(
            f"PROXY v2 header would exceed {PP_V2_MAX} bytes (PP_V2_MAX, what receivers here "
            f"accept); shorten the TLVs")
    return (<char *>out)[:n]
