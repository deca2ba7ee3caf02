# Stable, seedless hashing (xxh64): the key of a client for consistent hashing must be the same
# in every worker, every fastlb instance and every run, so never Python's salted hash().

cdef extern from "_xxh64.h":
    uint64_t flb_xxh64(const void *data, size_t length, uint64_t seed) noexcept nogil


def xxh64(data, uint64_t seed=0):
    """XXH64 of a bytes-like object, as an int in [0, 2**64)."""
    cdef Py_buffer view
    if isinstance(data, str):
        raise CoreTypeError("xxh64() takes bytes-like data, not str; encode it first")
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return flb_xxh64(view.buf, <size_t>view.len, seed)
    finally:
        PyBuffer_Release(&view)


cdef inline uint64_t hash_str(str s) except? 0:
    """xxh64 of the UTF-8 of s. ASCII strings (addresses) are read in place, no allocation."""
    cdef Py_ssize_t size
    cdef const char *p = PyUnicode_AsUTF8AndSize(s, &size)
    return flb_xxh64(p, <size_t>size, 0)


def key_of(str address):
    """The consistent-hashing key of a client address text (``"10.0.0.1"`` or ``"10.0.0.1:5555"``)."""
    return hash_str(address)
