# Tunables of the core, in one place (uvloop's includes/consts.pxi style).
cdef enum:
    # Slots per health bitmap / counter block: 64 Ki backends per balancer is far above any
    # fleet we target and keeps every index an int.
    MAX_SLOTS = 65536
    # A connection retries at most this many backends (config retries <= MAX_TRIED - 1); the
    # tried list is scanned linearly, which beats any set at this size.
    MAX_TRIED = 32
    # Weights are 1..MAX_WEIGHT. nginx and HAProxy accept up to 256 or so; a million leaves room
    # for weights derived from capacities, and weight * n stays far inside 64 bits.
    MAX_WEIGHT = 1000000
    # Maglev: the paper's default size, and the bound on how far we raise it automatically.
    MAGLEV_DEFAULT_M = 65537
    MAGLEV_MAX_M = 16777259
    # Shared memory is laid out in cache lines so that two writers never share one.
    CACHE_LINE = 64
    # Counter fields: one cache line (8 x int64) per (worker block, slot).
    CTR_ACTIVE = 0
    CTR_TOTAL = 1
    CTR_BYTES_IN = 2
    CTR_BYTES_OUT = 3
    CTR_CONNECT_FAILURES = 4
    CTR_FIELDS = 8
