# CRC32C (Castagnoli, reflected polynomial 0x82F63B78, RFC 4960 appendix B): the checksum of
# the PROXY protocol v2 CRC32C TLV (spec 2.2.3), verified by the parser (proxyproto.pxi) and
# appended by the builder (proxyproto_build.pxi). Owner of: the table, crc32c_update and its
# Python face crc32c(). Included before both.

cdef uint32_t _crc32c_table[256]

cdef void _crc32c_init() noexcept nogil:
    cdef uint32_t c
    cdef int i, k
    for i in range(256):
        c = <uint32_t>i
        for k in range(8):
            if c & 1:
                c = (c >> 1) ^ <uint32_t>0x82F63B78
            else:
                c = c >> 1
        _crc32c_table[i] = c

_crc32c_init()


cdef inline uint32_t crc32c_update(uint32_t crc, const unsigned char *p, size_t n) noexcept nogil:
    """Continue a CRC32C: start with crc32c_update(0, ...); chunks may be chained."""
    cdef size_t i
    crc = ~crc
    for i in range(n):
        crc = _crc32c_table[(crc ^ p[i]) & 0xff] ^ (crc >> 8)
    return ~crc


def crc32c(data, uint32_t crc=0):
    """CRC32C (Castagnoli) of a bytes-like object; pass a previous result to chain."""
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return crc32c_update(crc, <const unsigned char *>view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
