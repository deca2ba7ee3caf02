# The data path: one Relay (client side, owns the session) and one BackendSide per connection.
#
#   client --accept--> Relay.connection_made: compute the hash key, start the connect loop (_connect: pick -> connect with timeout -> on failure count it, report it to
#   the policy, add the slot to `tried`, pick again, up to retries) -> BackendSide.connection_made
#   links both sides and resumes client reads -> bytes flow -> both EOFs or an error -> close.
#
# Before the backend is up the client side reads at most one buffer: uvloop starts reading
# right after connection_made (a pause_reading there is overridden), so what arrives is kept in
# the Relay's buffer (`pending`), reads pause only if it fills, and _link hands it, and an EOF
# that came with it, to the backend. (Pausing at once cost two epoll operations per connection.)
#
# Buffers: each side reads into its own preallocated buffer and writes a memoryview slice of it
# straight to the peer transport. uvloop keeps a slice of that buffer when a write is partial
# (it does not copy), so every transport runs with a write high-water mark of 0: any queued byte
# calls pause_writing, which pauses the *other* side's reads, and resume_writing comes only when
# the queue is empty. The buffer is thus never overwritten while referenced, and the memory of a
# connection is bounded by its two buffers whatever the peers do (HAProxy's model).
import asyncio

cdef object _CancelledError = asyncio.CancelledError
cdef object _ConnectErrors = (OSError, TimeoutError)

cdef enum:
    # Per-direction buffer. Bulk throughput measured here (iperf3 through fastlb on one core):
    # 64 KiB 9.0 Gbit/s at 97% CPU, 256 KiB 16.3 at 69%, 1 MiB 15.8 at 64%. Pages are touched
    # only by data actually read, so small-message connections cost far less than the size.
    # (A second buffer per side, to keep reading while a partial write drains, measured no
    # gain: 4.31 vs 4.24 CPU-% per Gbit/s; not worth doubling the memory bound.)
    RELAY_BUFSIZE = 262144
    HASH_NONE = 0
    HASH_SOURCE_IP = 1
    HASH_SOURCE_IP_PORT = 2


@cython.final
cdef class ServiceState:
    """What the data path needs of one service. Owner: the orchestration (fastlb.proxy), which
    swaps ``policy``/``addrs`` together between connections; the relay only reads them."""
    cdef public object loop
    cdef public object policy            # a Policy, or None: no backend at all
    cdef public dict addrs               # slot -> (host, port)
    cdef public int retries
    cdef public double connect_timeout
    cdef public int hash_mode
    cdef public Counters counters
    cdef public int block                # this worker's counter block
    cdef public set conns                # open Relays, for idle sweeps and shutdown
    cdef public object on_connect_error  # callable(slot, exc) or None
    cdef public object on_no_backend     # callable() or None
    cdef public str name

    def __init__(self, loop, str name, Counters counters, int block=0):
        self.loop = loop
        self.name = name
        self.counters = counters
        self.block = block
        self.policy = None
        self.addrs = {}
        self.retries = 2
        self.connect_timeout = 2.0
        self.hash_mode = HASH_NONE
        self.conns = set()

    def set_backends(self, policy, dict addrs):
        """Swap the backend set; takes effect for the next connection."""
        if policy is not None and not isinstance(policy, Policy):
            raise CoreTypeError(f"policy must be a Policy or None, got {type(policy).__name__}")
        self.policy = policy
        self.addrs = addrs

    def __call__(self):
        """Protocol factory for the listener: one Relay per accepted connection."""
        cdef Relay r = Relay.__new__(Relay)
        r.svc = self
        r.slot = -1
        return r


cdef inline object _new_buffer():
    # Uninitialised bytearray: no memset, pages are touched only by data actually read.
    return memoryview(PyByteArray_FromStringAndSize(NULL, RELAY_BUFSIZE))


@cython.final
cdef class Relay:
    """The client side of a proxied connection, and the session both sides share."""
    cdef ServiceState svc
    cdef object transport
    cdef object view
    cdef BackendSide backend
    cdef object btransport
    cdef object task
    cdef bint timed_out                  # the connect timer fired (vs the client going away)
    cdef uint64_t key
    cdef int tried[MAX_TRIED]
    cdef int ntried
    cdef Py_ssize_t pending              # bytes read before the backend was up
    cdef public int slot
    cdef public bint client_eof
    cdef public bint backend_eof
    cdef public bint closed
    cdef bint counted
    cdef public int touched              # set on every chunk; the idle sweep clears it
    cdef public double last_active       # owned by the idle sweep

    # -- client transport callbacks ----------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(0)
        self.svc.conns.add(self)
        self.last_active = self.svc.loop.time()
        if self.svc.hash_mode != HASH_NONE:
            peer = transport.get_extra_info("peername")
            if self.svc.hash_mode == HASH_SOURCE_IP:
                self.key = hash_str(peer[0])
            else:
                self.key = hash_str(f"{peer[0]}:{peer[1]}")
        self.task = self.svc.loop.create_task(self._connect())

    def get_buffer(self, Py_ssize_t hint):
        if self.view is None:
            self.view = _new_buffer()
        if self.pending:                          # before the backend is up: append
            return self.view[self.pending:]
        return self.view

    def buffer_updated(self, Py_ssize_t n):
        if self.btransport is None:               # no backend yet: keep it; pause only when full
            self.pending += n
            if self.pending == RELAY_BUFSIZE:
                self.transport.pause_reading()
            return
        self.btransport.write(self.view[:n])
        self.touched = 1
        self.svc.counters.add_c(self.svc.block, self.slot, CTR_BYTES_IN, n)

    def eof_received(self):
        self.client_eof = True
        if self.btransport is None:               # _link passes it on
            return True
        if self.backend_eof:
            self._close(None)
        elif not self.btransport.is_closing():
            self.btransport.write_eof()
        return True

    def pause_writing(self):                     # the client is slow: stop reading the backend
        if self.btransport is not None:
            self.btransport.pause_reading()

    def resume_writing(self):
        if self.btransport is not None and not self.btransport.is_closing():
            self.btransport.resume_reading()

    def connection_lost(self, exc):
        self._close(exc)

    # -- the connect loop: pick, connect, retry elsewhere ---------------------------------------
    async def _connect(self):
        cdef ServiceState svc = self.svc
        cdef int slot, attempt
        cdef BackendSide be
        for attempt in range(svc.retries + 1):
            if svc.policy is None:
                break
            slot = (<Policy>svc.policy).pick_c(self.key, self.tried, self.ntried)
            if slot < 0:
                break
            host, port = svc.addrs[slot]
            be = BackendSide.__new__(BackendSide)
            be.relay = self
            be.slot = slot
            # A plain timer that cancels this task: asyncio.timeout() costs three getpid()
            # syscalls per connection (get_running_loop) and a context manager.
            self.timed_out = False
            timer = svc.loop.call_later(svc.connect_timeout, self._connect_timed_out)
            try:
                await svc.loop.create_connection(lambda: be, host, port)
                timer.cancel()
                return
            except _CancelledError:
                timer.cancel()
                if not self.timed_out:
                    raise                        # the client went away
                exc = TimeoutError("connect timeout")
            except _ConnectErrors as e:
                timer.cancel()
                exc = e
            if self.backend is be:           # timed out right after connection_made
                self._unlink_backend()
            if self.closed:
                return
            svc.counters.add_c(svc.block, slot, CTR_CONNECT_FAILURES, 1)
            if svc.policy is not None:
                svc.policy.report_failure(slot)
            if svc.on_connect_error is not None:
                svc.on_connect_error(slot, exc)
            if self.ntried < MAX_TRIED:
                self.tried[self.ntried] = slot
                self.ntried += 1
        if not self.closed:
            if svc.on_no_backend is not None:
                svc.on_no_backend()
            self.transport.abort()

    def _connect_timed_out(self):
        self.timed_out = True
        self.task.cancel()

    cdef void _unlink_backend(self):
        self.backend = None
        tr = self.btransport
        self.btransport = None
        if tr is not None:
            tr.abort()

    cdef _link(self, BackendSide be, object tr):
        self.backend = be
        self.btransport = tr
        self.slot = be.slot
        self.counted = True
        self.svc.counters.add_c(self.svc.block, be.slot, CTR_ACTIVE, 1)
        self.svc.counters.add_c(self.svc.block, be.slot, CTR_TOTAL, 1)
        if not self.client_eof:
            self.transport.resume_reading()
        cdef Py_ssize_t n = self.pending
        if n:
            self.pending = 0
            self.svc.counters.add_c(self.svc.block, be.slot, CTR_BYTES_IN, n)
            tr.write(self.view[:n])               # may pause client reads again: that's right
        if self.client_eof:
            tr.write_eof()

    cdef _close(self, exc):
        """End the session: called once per side; closes (or on error aborts) both transports."""
        if not self.closed:
            self.closed = True
            self.svc.conns.discard(self)
            if self.task is not None and not self.task.done():
                self.task.cancel()
            if self.counted:
                self.counted = False
                self.svc.counters.add_c(self.svc.block, self.slot, CTR_ACTIVE, -1)
        for tr in (self.transport, self.btransport):
            if tr is not None and not tr.is_closing():
                if exc is None:
                    tr.close()                      # flushes what is queued
                else:
                    tr.abort()

    def abort(self):
        """Close both sides now (shutdown, idle timeout)."""
        self._close(ConnectionAbortedError())


@cython.final
cdef class BackendSide:
    """The backend side of a proxied connection."""
    cdef Relay relay
    cdef object view
    cdef int slot

    def connection_made(self, transport):
        cdef Relay r = self.relay
        if r.closed:
            transport.abort()
            return
        transport.set_write_buffer_limits(0)
        r._link(self, transport)

    def get_buffer(self, Py_ssize_t hint):
        if self.view is None:
            self.view = _new_buffer()
        return self.view

    def buffer_updated(self, Py_ssize_t n):
        cdef Relay r = self.relay
        r.transport.write(self.view[:n])
        r.touched = 1
        r.svc.counters.add_c(r.svc.block, self.slot, CTR_BYTES_OUT, n)

    def eof_received(self):
        cdef Relay r = self.relay
        r.backend_eof = True
        if r.client_eof:
            r._close(None)
        elif not r.transport.is_closing():
            r.transport.write_eof()
        return True

    def pause_writing(self):                      # the backend is slow: stop reading the client
        self.relay.transport.pause_reading()

    def resume_writing(self):
        if not self.relay.transport.is_closing():
            self.relay.transport.resume_reading()

    def connection_lost(self, exc):
        if self.relay.backend is self:
            self.relay._close(exc)
