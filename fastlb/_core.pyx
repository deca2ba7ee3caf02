# cython: language_level=3
"""fastlb's Cython core: everything that runs per connection or per byte.

Owner of: the stable hash, the shared-memory views (health bitmap, counters), the balancing
policies and the data-path engine. It gets plain data and never imports orchestration
(registry, config, admin); only fastlb.errors, the leaf of the error hierarchy.
One extension module built from include files, as uvloop does (core/*.pxi), with the system
declarations in a .pxd (core/system.pxd).
"""
cimport cython
from libc.stdint cimport uint64_t, int64_t, uint32_t, uintptr_t
from libc.stdlib cimport malloc, calloc, free
from libc.errno cimport errno, EAGAIN, EINTR, EINPROGRESS, ECONNABORTED, ECONNREFUSED, ENOMEM
from libc.errno cimport EPIPE, ECONNRESET           # [tls]
from cpython.bytes cimport PyBytes_AS_STRING
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from cpython.long cimport PyLong_AsUnsignedLongLongMask
from cpython.bytearray cimport PyByteArray_FromStringAndSize

from fastlb.core.system cimport *          # epoll, sockets, time, strings: declarations only
from fastlb.core.openssl cimport *         # [tls] libssl and fastlb/_tls.h: declarations only

from fastlb.errors import CoreArgumentError, CoreTypeError

include "core/consts.pxi"
include "core/hash.pxi"
include "core/shm.pxi"
# the access pieces (before the engine, which will use their cdef APIs)
include "core/addr.pxi"
include "core/crc32c.pxi"
include "core/proxyproto.pxi"
include "core/proxyproto_build.pxi"
include "core/acl.pxi"
include "core/srclimit.pxi"
include "core/gauges.pxi"
include "core/connlog.pxi"                 # [obs] the connection log rings and histograms
# the policies: the interface first, one file per policy, the name -> class table last
include "core/policy.pxi"
include "core/round_robin.pxi"
include "core/weighted_random.pxi"
include "core/maglev.pxi"
include "core/policy_table.pxi"
include "core/engine.pxi"
include "core/session.pxi"
include "core/limits.pxi"      # connection limits, queues, local errors
include "core/lean.pxi"        # [lean] the lean connection path, one wake-up per connection

include "core/admission.pxi"         # [access] ACL, source limits, PROXY, client_first_byte
include "core/buffers.pxi"           # [mem] buffers, budget, pool trim
include "core/timers.pxi"            # [mem] fin/duration/first-byte timeouts, keepalive
include "core/tls.pxi"               # [tls] TLS termination: contexts, handshake, SSL I/O
include "core/tls_orig.pxi"          # [orig] TLS origination: client contexts, backend SSL I/O
include "core/sni.pxi"               # [sni] SNI routing without termination (passthrough)
include "core/splice.pxi"            # [splice] zero-copy bulk (pooled pipes), fairness budget
