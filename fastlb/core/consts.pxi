# Tunables and enums of the core, in one place (uvloop's includes/consts.pxi style).
# The ones Python needs are exported at the bottom as plain ints/dicts/tuples: Python imports
# them from fastlb._core and never keeps a copy of its own (config, proxy, workers).
cdef enum:
    # Slots per health bitmap / counter block: 64 Ki backends per balancer is far above any
    # fleet we target and keeps every index an int.
    MAX_SLOTS = 65536
    # A connection retries at most this many backends (config retries <= MAX_TRIED - 1); the
    # tried list is scanned linearly, which beats any set at this size.
    MAX_TRIED = 32
    MAX_RETRIES = MAX_TRIED - 1
    # Weights are 1..MAX_WEIGHT. nginx and HAProxy accept up to 256 or so; a million leaves room
    # for weights derived from capacities, and weight * n stays far inside 64 bits.
    MAX_WEIGHT = 1000000
    # Maglev: the paper's default size, and the bound on how far we raise it automatically.
    MAGLEV_DEFAULT_M = 65537
    MAGLEV_MAX_M = 16777259
    # Maglev bounded load (HAProxy's hash-balance-factor, a percent): 0 is off; below 100 no
    # backend could ever take a key; 100 x the average is already no bound in practice.
    MAX_BALANCE_FACTOR = 10000
    # Round robin: nginx's max_fails range (its effective weight drops by weight // max_fails).
    MAX_FAILS = 1000
    # Shared memory is laid out in cache lines so that two writers never share one.
    CACHE_LINE = 64
    # Counter fields: one cache line (CTR_LINE x int64) per (worker block, slot), of which the
    # first CTR_NFIELDS are used (COUNTER_FIELDS names them, in this order).
    CTR_ACTIVE = 0
    CTR_TOTAL = 1
    CTR_BYTES_IN = 2
    CTR_BYTES_OUT = 3
    CTR_CONNECT_FAILURES = 4
    CTR_RETRIES = 5          # attempts on another backend after this one failed (HAProxy's wretr)
    CTR_NFIELDS = 6
    CTR_LINE = 8

# The engine. Per-direction buffer: measured on the transport relay here, 64 KiB chunks cost 97%
# of a core for 9 Gbit/s, 256 KiB 69% for 16; pages are touched only by data actually read.
cdef enum:
    ENGINE_BUFSIZE = 262144
    # Events handled per wake-up, and connections accepted per listener event: large enough to
    # batch under load, small enough that one busy listener cannot starve the others.
    MAX_EVENTS = 256
    ACCEPT_BATCH = 64
    # Freed buffers kept for reuse: saves an mmap/munmap pair per connection. 512 x 256 KiB
    # bounds what a burst keeps resident at 128 MiB, for at most a second: the sweep unmaps
    # what the last second did not use (core/buffers.pxi).
    BUFFER_POOL = 512
    # epoll event data: a Session/Listener pointer with one of these tags in its low bits.
    TAG_LISTENER = 0
    TAG_CLIENT = 1
    TAG_BACKEND = 2
    TAG_MASK = 3
    # Session states.
    S_CONNECTING = 0
    S_OPEN = 1
    S_CLOSED = 2
    S_QUEUED = 4            # [limits] waiting in its service's queue for a backend place
                            # (3 is `access`'s S_WAITING, core/admission.pxi)

# Connection limits (core/limits.pxi): why a listener is out of the epoll set.
cdef enum:
    PAUSE_NONE = 0
    PAUSE_LIMIT = 1         # [global] maxconn or service.maxconn reached (HAProxy's limit_listener)
    PAUSE_FDS = 2           # accept4/socket failed for lack of fds or memory (EMFILE, ENFILE...)

# Connection limits: how long a listener paused for lack of fds stays out of the epoll set, and
# the period of the limits sweep (resume paused listeners, expire and retry queued clients).
# HAProxy retries a listener limited by a resource after 100 ms (its `limit_listener` timer when
# no session is known to close soon); nginx re-enables accept events after 500 ms
# (ngx_event_accept: NGX_ACCEPT_DISABLED's timer). 100 ms keeps waiting clients' delay small and
# costs at most ten failed accept4 calls a second.
cdef double LIMITS_RETRY = 0.1
# Local errors (socket()/connect()/accept4 out of fds, memory or ports) reach Python at most once
# per this many seconds, with the count since the last report.
cdef double LOCAL_ERROR_REPORT = 1.0

# How a session's consistent-hashing key is made from the client address (Maglev only).
cdef enum:
    HASH_NONE = 0
    HASH_SOURCE_IP = 1
    HASH_SOURCE_IP_PORT = 2


# -- the Python view of the above (plain ints; a cdef enum name cannot be re-bound at module
# level in Cython, so they are set through the module dict, once, at import) ------------------
COUNTER_FIELDS = ("active", "total", "bytes_in", "bytes_out", "connect_failures", "retries")
HASH_MODES = {"source_ip": HASH_SOURCE_IP, "source_ip_port": HASH_SOURCE_IP_PORT}
globals().update(
    MAX_SLOTS=int(MAX_SLOTS), MAX_TRIED=int(MAX_TRIED), MAX_RETRIES=int(MAX_RETRIES),
    MAX_WEIGHT=int(MAX_WEIGHT), MAX_BALANCE_FACTOR=int(MAX_BALANCE_FACTOR),
    MAX_FAILS=int(MAX_FAILS), LIMITS_RETRY=LIMITS_RETRY, BUFFER_SIZE=int(ENGINE_BUFSIZE),
    CTR_ACTIVE=int(CTR_ACTIVE), CTR_TOTAL=int(CTR_TOTAL), CTR_BYTES_IN=int(CTR_BYTES_IN),
    CTR_BYTES_OUT=int(CTR_BYTES_OUT), CTR_CONNECT_FAILURES=int(CTR_CONNECT_FAILURES),
    CTR_RETRIES=int(CTR_RETRIES),
)
