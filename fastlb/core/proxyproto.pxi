# PROXY protocol v1 and v2 (HAProxy's doc/proxy-protocol.txt): a sans-IO parser and builders.
# This file: the constants and structs both directions share, and the parser with its Python
# side; the builders are in proxyproto_build.pxi, the CRC32C both use in crc32c.pxi.
#
# Owner of: the wire format of the PROXY header, both directions. No I/O: the engine hands
# pp_parse the bytes received so far and acts on the verdict (wait, close and count, or skip
# pp_header.length bytes and use the addresses); it hands pp_build_v1/v2 a buffer to fill before
# the first byte to a backend. Written from the specification; the bounding discipline (every
# length checked against what was received before it is used) follows HAProxy's
# conn_recv_proxy() in src/connection.c. Rules:
#   - pp_parse never reads buf[i] for i >= n nor for i >= PP_MAX; it never writes the buffer.
#   - NEED_MORE only while the header could still become valid within its bound; any byte that
#     cannot start/continue a header is an error at once ("abort as soon as possible", spec 2.1):
#     the signatures byte by byte, and in v1 the protocol token and the characters of the
#     address/port fields (_v1_byte_ok) as they arrive.
#   - v1: the whole line, CRLF included, is at most 107 bytes (spec 2.1); a lone CR or LF is
#     malformed; numbers have no leading zeros; addresses are decoded by inet_pton (glibc's
#     rejects leading zeros in IPv4 too).
#   - v2: version 2 only; commands LOCAL and PROXY; the 7 family/protocol bytes of spec 2.2;
#     the ones we do not serve (UDP, UNIX) fall back to UNSPEC as the spec requires; address
#     block length checked against the family; the TLV walk must end exactly at the header's
#     end; a CRC32C TLV is verified (spec 2.2.3: a receiver that supports it MUST).
#   - LOCAL and UNSPEC/UNKNOWN give no addresses (family PP_FAM_UNSPEC/UNKNOWN): the engine
#     keeps the real peer's.

cdef enum:
    # pp_parse verdicts
    PP_DONE = 1
    PP_NEED_MORE = 0
    PP_ERR_NOT_PROXY = -1     # neither signature: no PROXY header at all (the "missing" case)
    PP_ERR_MALFORMED = -2     # a PROXY header that breaks the grammar or its own lengths
    PP_ERR_UNSUPPORTED = -3   # valid shape, but a version/command/family we must drop
    PP_ERR_TOO_LONG = -4      # v1 without CRLF in 107 bytes; v2 longer than PP_V2_MAX
    PP_ERR_CHECKSUM = -5      # v2 CRC32C TLV present and wrong
    # Bounds. v1: the spec's worst case line (UNKNOWN with two full IPv6 addresses).
    PP_V1_MAX = 107
    # v2: the spec designs both formats to fit the smallest segment every TCP host must accept
    # (576 - 40 = 536 bytes, section 2), and senders must send the header at once. 536 holds the
    # largest address block (UNIX, 16 + 216) plus 304 bytes of TLVs: an AUTHORITY (SNI, at most
    # 255), a UNIQUE_ID (at most 128) or an SSL TLV with version and CN, and a CRC32C. A
    # header beyond it (a client certificate TLV) is refused as TOO_LONG: it would make us buffer
    # an unbounded amount before the first byte of payload.
    PP_V2_MAX = 536
    PP_MAX = 536              # the most pp_parse ever looks at
    PP_V2_HEADER = 16
    # pp_header.command / family
    PP_CMD_LOCAL = 0
    PP_CMD_PROXY = 1
    PP_FAM_UNSPEC = 0         # v2 UNSPEC, LOCAL, or a family we do not serve (UDP, UNIX)
    PP_FAM_TCP4 = 1
    PP_FAM_TCP6 = 2
    PP_FAM_UNKNOWN = 3        # v1 "PROXY UNKNOWN"
    # TLV types (spec 2.2)
    PP2_TYPE_ALPN = 0x01
    PP2_TYPE_AUTHORITY = 0x02
    PP2_TYPE_CRC32C = 0x03
    PP2_TYPE_NOOP = 0x04
    PP2_TYPE_UNIQUE_ID = 0x05
    PP2_TYPE_SSL = 0x20
    PP2_SUBTYPE_SSL_VERSION = 0x21
    PP2_SUBTYPE_SSL_CN = 0x22
    PP2_CLIENT_SSL = 0x01

ctypedef struct pp_header:
    size_t length             # bytes of the header (the payload starts there)
    int version               # 1 or 2
    int command               # PP_CMD_*
    int family                # PP_FAM_*
    unsigned char raw_family  # v2: the 14th byte as received (0 for v1)
    flb_addr src
    flb_addr dst
    size_t tlv_offset         # v2: the TLV region [tlv_offset, tlv_offset + tlv_length)
    size_t tlv_length

cdef unsigned char PP_V1_SIG[6]
cdef unsigned char PP_V2_SIG[12]
memcpy(PP_V1_SIG, b"PROXY ", 6)
memcpy(PP_V2_SIG, b"\r\n\r\n\x00\r\nQUIT\n", 12)


cdef inline unsigned int _be16(const unsigned char *p) noexcept nogil:
    return (<unsigned int>p[0] << 8) | p[1]


# -- parsing -----------------------------------------------------------------------------------

cdef int _v1_port(const unsigned char *p, size_t n, unsigned short *out) noexcept nogil:
    """A decimal port 0..65535, no leading zero, exactly n bytes. 0 or -1."""
    cdef unsigned long v = 0
    cdef size_t i
    if n == 0 or n > 5 or (n > 1 and p[0] == b'0'):
        return -1
    for i in range(n):
        if p[i] < b'0' or p[i] > b'9':
            return -1
        v = v * 10 + (p[i] - 48)    # 48: '0'
    if v > 65535:
        return -1
    out[0] = <unsigned short>v
    return 0


cdef int _v1_addr(const unsigned char *p, size_t n, bint v6, flb_addr *out) noexcept nogil:
    """An address field of exactly n bytes, decoded by inet_pton. 0 or -1."""
    cdef char text[48]
    cdef unsigned char raw[16]
    cdef size_t i
    if n == 0 or n > 45:          # 45: the longest IPv6 text (with an embedded IPv4)
        return -1
    for i in range(n):            # a NUL would end the text early for inet_pton
        if p[i] == 0:
            return -1
    memcpy(text, p, n)
    text[n] = 0
    if inet_pton(AF_INET6 if v6 else AF_INET, text, raw) != 1:
        return -1
    if v6:
        addr_set_v6(out, raw, 0)
    else:
        addr_set_v4(out, raw, 0)
    return 0


cdef bint _v1_byte_ok(const unsigned char *buf, size_t i) noexcept nogil:
    """Whether byte i (>= 6, not CR/LF) can continue the line buf[6:i]: a prefix of "TCP4 " or
    "TCP6 " then only [0-9A-Fa-f.: ], or of "UNKNOWN" then a space and anything. Checked as
    bytes arrive, so that junk or a stalled wrong header is refused at its first wrong byte."""
    cdef size_t k = i - 6
    cdef unsigned char c = buf[i]
    if k == 0:
        return c == b'T' or c == b'U'
    if buf[6] == b'U':
        if k < 7:
            return c == (<const unsigned char *>b"UNKNOWN")[k]
        return k > 7 or c == b' '
    if k < 3:
        return c == (<const unsigned char *>b"TCP")[k]
    if k == 3:
        return c == b'4' or c == b'6'
    if k == 4:
        return c == b' '
    return ((b'0' <= c <= b'9') or (b'a' <= c <= b'f') or (b'A' <= c <= b'F')
            or c == b'.' or c == b':' or c == b' ')


cdef int _pp_parse_v1(const unsigned char *buf, size_t n, pp_header *h) noexcept nogil:
    cdef size_t lim = n if n < PP_V1_MAX else PP_V1_MAX
    cdef size_t i, end = 0, start, k
    cdef bint found = False
    cdef bint v6
    cdef size_t fs[4]
    cdef size_t fe[4]
    # The line ends at the first CR, which must be followed by LF; a lone LF is malformed.
    for i in range(6, lim):
        if buf[i] == b'\n':
            return PP_ERR_MALFORMED
        if buf[i] == b'\r':
            if i + 1 >= PP_V1_MAX:
                return PP_ERR_TOO_LONG
            if i + 1 >= n:
                return PP_NEED_MORE
            if buf[i + 1] != b'\n':
                return PP_ERR_MALFORMED
            end = i
            found = True
            break
        if not _v1_byte_ok(buf, i):
            return PP_ERR_MALFORMED
    if not found:
        return PP_ERR_TOO_LONG if n >= PP_V1_MAX else PP_NEED_MORE
    h.version = 1
    h.command = PP_CMD_PROXY
    h.length = end + 2
    # "UNKNOWN", then optionally anything up to the CRLF (ignored, spec 2.1).
    if end - 6 >= 7 and memcmp(buf + 6, b"UNKNOWN", 7) == 0 and (end == 13 or buf[13] == b' '):
        h.family = PP_FAM_UNKNOWN
        return PP_DONE
    if end - 6 < 5 or memcmp(buf + 6, b"TCP", 3) != 0 or buf[10] != b' ' or (
            buf[9] != b'4' and buf[9] != b'6'):
        return PP_ERR_MALFORMED
    v6 = buf[9] == b'6'
    h.family = PP_FAM_TCP6 if v6 else PP_FAM_TCP4
    # Exactly four fields, each separated by exactly one space, none empty.
    start = 11
    k = 0
    for i in range(11, end + 1):
        if i == end or buf[i] == b' ':
            if k == 4 or i == start:
                return PP_ERR_MALFORMED
            fs[k] = start
            fe[k] = i
            k += 1
            start = i + 1
    if k != 4:
        return PP_ERR_MALFORMED
    if (_v1_addr(buf + fs[0], fe[0] - fs[0], v6, &h.src) < 0
            or _v1_addr(buf + fs[1], fe[1] - fs[1], v6, &h.dst) < 0
            or _v1_port(buf + fs[2], fe[2] - fs[2], &h.src.port) < 0
            or _v1_port(buf + fs[3], fe[3] - fs[3], &h.dst.port) < 0):
        return PP_ERR_MALFORMED
    return PP_DONE


cdef int _pp_parse_v2(const unsigned char *buf, size_t n, pp_header *h) noexcept nogil:
    cdef unsigned int cmd, fam, hi, lo, addrlen, total, off, tlen
    cdef long crc_at = -1
    cdef uint32_t want, got
    if n < 13:
        return PP_NEED_MORE
    if (buf[12] >> 4) != 2:
        return PP_ERR_UNSUPPORTED
    cmd = buf[12] & 0x0f
    if cmd != PP_CMD_LOCAL and cmd != PP_CMD_PROXY:
        return PP_ERR_UNSUPPORTED
    if n < 14:
        return PP_NEED_MORE
    fam = buf[13]
    hi = fam >> 4
    lo = fam & 0x0f
    if hi > 3 or lo > 2:
        return PP_ERR_MALFORMED          # "must be rejected as invalid" (spec 2.2)
    if fam == 0x00:
        addrlen = 0
    elif fam == 0x11 or fam == 0x12:
        addrlen = 12
    elif fam == 0x21 or fam == 0x22:
        addrlen = 36
    elif fam == 0x31 or fam == 0x32:
        addrlen = 216
    else:
        return PP_ERR_UNSUPPORTED        # a family without a protocol or the reverse
    if n < PP_V2_HEADER:
        return PP_NEED_MORE
    total = PP_V2_HEADER + _be16(buf + 14)
    if total > PP_V2_MAX:
        return PP_ERR_TOO_LONG
    if total < PP_V2_HEADER + addrlen:
        return PP_ERR_MALFORMED
    if n < total:
        return PP_NEED_MORE
    h.version = 2
    h.command = cmd
    h.raw_family = fam
    h.length = total
    h.family = PP_FAM_UNSPEC
    if cmd == PP_CMD_PROXY and fam == 0x11:
        h.family = PP_FAM_TCP4
        addr_set_v4(&h.src, buf + 16, _be16(buf + 24))
        addr_set_v4(&h.dst, buf + 20, _be16(buf + 26))
    elif cmd == PP_CMD_PROXY and fam == 0x21:
        h.family = PP_FAM_TCP6
        addr_set_v6(&h.src, buf + 16, _be16(buf + 48))
        addr_set_v6(&h.dst, buf + 32, _be16(buf + 50))
    h.tlv_offset = PP_V2_HEADER + addrlen
    h.tlv_length = total - h.tlv_offset
    # TLV walk: every TLV header and value inside [tlv_offset, total), ending exactly there.
    off = h.tlv_offset
    while off < total:
        if off + 3 > total:
            return PP_ERR_MALFORMED
        tlen = _be16(buf + off + 1)
        if off + 3 + tlen > total:
            return PP_ERR_MALFORMED
        if buf[off] == PP2_TYPE_CRC32C:
            if tlen != 4 or crc_at >= 0:
                return PP_ERR_MALFORMED
            crc_at = off + 3
        off += 3 + tlen
    if crc_at >= 0:
        want = ((<uint32_t>buf[crc_at] << 24) | (<uint32_t>buf[crc_at + 1] << 16)
                | (<uint32_t>buf[crc_at + 2] << 8) | buf[crc_at + 3])
        got = crc32c_update(0, buf, <size_t>crc_at)
        got = crc32c_update(got, <const unsigned char *>b"\0\0\0\0", 4)
        got = crc32c_update(got, buf + crc_at + 4, total - crc_at - 4)
        if got != want:
            return PP_ERR_CHECKSUM
    return PP_DONE


cdef int pp_parse(const unsigned char *buf, size_t n, pp_header *h) noexcept nogil:
    """Parse a PROXY header (v1 or v2) from the first ``n`` bytes received on a connection.

    Returns PP_DONE (``h`` filled: the payload starts at h.length <= n), PP_NEED_MORE (call
    again with more bytes; n < PP_MAX), or a PP_ERR_* code (close the connection). Reads only
    buf[0 .. min(n, PP_MAX)); never writes it; no allocation, no Python."""
    cdef size_t k, m
    memset(h, 0, sizeof(pp_header))
    if n == 0:
        return PP_NEED_MORE
    if buf[0] == b'P':
        m = n if n < 6 else 6
        for k in range(m):
            if buf[k] != PP_V1_SIG[k]:
                return PP_ERR_NOT_PROXY
        if n < 6:
            return PP_NEED_MORE
        return _pp_parse_v1(buf, n, h)
    if buf[0] == b'\r':
        m = n if n < 12 else 12
        for k in range(m):
            if buf[k] != PP_V2_SIG[k]:
                return PP_ERR_NOT_PROXY
        return _pp_parse_v2(buf, n, h)
    return PP_ERR_NOT_PROXY


cdef int pp_tlv_find(const unsigned char *buf, size_t offset, size_t length, unsigned char type,
                     size_t *value_offset, size_t *value_length) noexcept nogil:
    """Find the first TLV of ``type`` in buf[offset, offset + length) (a region pp_parse
    validated, or an SSL TLV's sub-TLVs after its 5 fixed bytes). 1 (found, the value's place
    in *value_offset/length), 0 (absent) or -1 (a TLV overruns the region)."""
    cdef size_t off = offset, end = offset + length, tlen
    while off < end:
        if off + 3 > end:
            return -1
        tlen = _be16(buf + off + 1)
        if off + 3 + tlen > end:
            return -1
        if buf[off] == type:
            value_offset[0] = off + 3
            value_length[0] = tlen
            return 1
        off += 3 + tlen
    return 0


# -- Python side (tests, tools; not the data path) ---------------------------------------------

PROXY_ERRORS = {
    PP_ERR_NOT_PROXY: "not_proxy", PP_ERR_MALFORMED: "malformed",
    PP_ERR_UNSUPPORTED: "unsupported", PP_ERR_TOO_LONG: "too_long",
    PP_ERR_CHECKSUM: "checksum",
}


def proxy_parse(data):
    """Parse a PROXY header at the start of the bytes-like ``data``.

    Returns ``(status, header)``: status PP_DONE with header a dict (length, version, command,
    family, raw_family, src, dst as (ip, port) or None, tlv_offset, tlv_length); PP_NEED_MORE or
    a PP_ERR_* code (see PROXY_ERRORS) with header None. ``data`` is read in place."""
    cdef Py_buffer view
    cdef pp_header h
    cdef int rc
    if isinstance(data, str):
        raise CoreTypeError("proxy_parse() takes bytes-like data, not str")
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        rc = pp_parse(<const unsigned char *>view.buf, <size_t>view.len, &h)
    finally:
        PyBuffer_Release(&view)
    if rc != PP_DONE:
        return rc, None
    return rc, {
        "length": h.length, "version": h.version, "command": h.command, "family": h.family,
        "raw_family": h.raw_family, "src": addr_to_py(&h.src), "dst": addr_to_py(&h.dst),
        "tlv_offset": h.tlv_offset, "tlv_length": h.tlv_length,
    }


def proxy_tlv_find(data, Py_ssize_t offset, Py_ssize_t length, int type):
    """The (offset, length) of the first TLV of ``type`` in data[offset:offset+length], None
    when absent; CoreArgumentError when a TLV overruns the region or the region the data."""
    cdef Py_buffer view
    cdef size_t voff = 0, vlen = 0
    cdef int rc
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if offset < 0 or length < 0 or offset + length > view.len:
            raise CoreArgumentError(
                f"TLV region [{offset}, {offset + length}) outside the data (0..{view.len})")
        if not 0 <= type <= 255:
            raise CoreArgumentError(f"TLV type {type} out of range 0..255")
        rc = pp_tlv_find(<const unsigned char *>view.buf, offset, length, <unsigned char>type,
                         &voff, &vlen)
    finally:
        PyBuffer_Release(&view)
    if rc < 0:
        raise CoreArgumentError(f"a TLV overruns the region [{offset}, {offset + length})")
    return (voff, vlen) if rc else None


globals().update(
    PP_DONE=int(PP_DONE), PP_NEED_MORE=int(PP_NEED_MORE), PP_ERR_NOT_PROXY=int(PP_ERR_NOT_PROXY),
    PP_ERR_MALFORMED=int(PP_ERR_MALFORMED), PP_ERR_UNSUPPORTED=int(PP_ERR_UNSUPPORTED),
    PP_ERR_TOO_LONG=int(PP_ERR_TOO_LONG), PP_ERR_CHECKSUM=int(PP_ERR_CHECKSUM),
    PP_V1_MAX=int(PP_V1_MAX), PP_V2_MAX=int(PP_V2_MAX), PP_MAX=int(PP_MAX),
    PP_CMD_LOCAL=int(PP_CMD_LOCAL), PP_CMD_PROXY=int(PP_CMD_PROXY),
    PP_FAM_UNSPEC=int(PP_FAM_UNSPEC), PP_FAM_TCP4=int(PP_FAM_TCP4),
    PP_FAM_TCP6=int(PP_FAM_TCP6), PP_FAM_UNKNOWN=int(PP_FAM_UNKNOWN),
    PP2_TYPE_ALPN=int(PP2_TYPE_ALPN), PP2_TYPE_AUTHORITY=int(PP2_TYPE_AUTHORITY),
    PP2_TYPE_CRC32C=int(PP2_TYPE_CRC32C), PP2_TYPE_NOOP=int(PP2_TYPE_NOOP),
    PP2_TYPE_UNIQUE_ID=int(PP2_TYPE_UNIQUE_ID), PP2_TYPE_SSL=int(PP2_TYPE_SSL),
    PP2_SUBTYPE_SSL_VERSION=int(PP2_SUBTYPE_SSL_VERSION),
    PP2_SUBTYPE_SSL_CN=int(PP2_SUBTYPE_SSL_CN), PP2_CLIENT_SSL=int(PP2_CLIENT_SSL),
)
