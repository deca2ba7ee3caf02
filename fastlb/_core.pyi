"""Type stub for fastlb._core: what Python sees of the Cython core."""
import socket
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction
from typing import Any, ClassVar

from _typeshed import WriteableBuffer, ReadableBuffer

def xxh64(data: ReadableBuffer, seed: int = 0) -> int: ...
def key_of(address: str) -> int: ...
def next_prime(m: int) -> int: ...

MAGLEV_SEED_OFFSET: int
MAGLEV_SEED_SKIP: int

# Limits and enums of the core (fastlb/core/consts.pxi), plain ints; Python never copies them.
MAX_SLOTS: int
MAX_TRIED: int
MAX_RETRIES: int          # MAX_TRIED - 1
MAX_WEIGHT: int
MAX_FAILS: int            # round_robin's max_fails range is 1..MAX_FAILS
BUFFER_SIZE: int          # [mem] bytes of one connection buffer (one direction)
MAX_BALANCE_FACTOR: int   # maglev's hash_balance_factor is 0 or 100..MAX_BALANCE_FACTOR
HASH_MODES: dict[str, int]  # "source_ip" -> 1, "source_ip_port" -> 2; 0 is no key
COUNTER_FIELDS: tuple[str, ...]
CTR_ACTIVE: int
CTR_TOTAL: int
CTR_BYTES_IN: int
CTR_BYTES_OUT: int
CTR_CONNECT_FAILURES: int
CTR_RETRIES: int

class HealthBitmap:
    nslots: int
    def __init__(self, buffer: WriteableBuffer, nslots: int) -> None: ...
    @staticmethod
    def size_for(nslots: int) -> int: ...
    def is_up(self, slot: int) -> bool: ...
    def mark_up(self, slot: int) -> bool: ...
    def mark_down(self, slot: int) -> bool: ...
    @property
    def generation(self) -> int: ...
    def up_slots(self) -> list[int]: ...

class Counters:
    FIELDS: ClassVar[tuple[str, ...]]
    nslots: int
    nblocks: int
    def __init__(self, buffer: WriteableBuffer, nslots: int, nblocks: int = 1) -> None: ...
    @staticmethod
    def size_for(nslots: int, nblocks: int = 1) -> int: ...
    def add(self, block: int, slot: int, field: int, delta: int) -> None: ...
    def get(self, slot: int, field: int) -> int: ...
    def get_block(self, block: int, slot: int, field: int) -> int: ...
    def active(self, slot: int) -> int: ...
    def slot_stats(self, slot: int) -> dict[str, int]: ...
    def zero(self, block: int, slot: int = -1, fields: Iterable[int] | None = None) -> None: ...

# -- shared gauges (core/gauges.pxi): limits and refusal counts, exact across workers -----------
GAUGE_FIELDS: tuple[str, ...]
G_CUR: int
G_MAX: int
G_QUEUED: int
G_TOTAL: int
G_DENY_ACL: int
G_DENY_SRC_CONNS: int
G_DENY_SRC_RATE: int
G_DENY_SRC_TABLE: int
G_PROXY_ERRORS: int
G_QUEUE_FULL: int
G_QUEUE_TIMEOUT: int
G_CLIENT_SILENT: int
G_LOCAL_ERRORS: int
G_NO_BACKEND: int
G_MAXCONN_REACHED: int
G_FIRST_BYTE_TIMEOUT: int
G_NFIELDS: int

class Gauges:
    FIELDS: ClassVar[tuple[str, ...]]
    nrows: int
    nblocks: int
    block: int
    def __init__(self, buffer: WriteableBuffer, nrows: int, nblocks: int = 1, block: int = 0) -> None: ...
    @staticmethod
    def size_for(nrows: int, nblocks: int = 1) -> int: ...
    @property
    def global_row(self) -> int: ...
    def get(self, row: int, field: int) -> int: ...
    def row(self, row: int) -> dict[str, int]: ...
    def py_take(self, row: int, limit: int = 0, field: int = ...) -> bool: ...
    def py_give(self, row: int, field: int = ...) -> None: ...
    def py_add(self, row: int, field: int, v: int) -> None: ...
    def held_by(self, block: int, row: int) -> tuple[int, int]: ...
    def reclaim(self, block: int) -> int: ...
    def zero(self, row: int) -> None: ...

# [obs] the connection log rings and the histograms (core/connlog.pxi)
ConnLogRecord = tuple[int, int, int, int, int, int, int, int, tuple[str, int] | None, int, int,
                      int, int, int]

class ConnLog:
    nrows: int
    nblocks: int
    block: int
    capacity: int
    def __init__(self, buffer: WriteableBuffer, nrows: int, nblocks: int = 1, block: int = 0,
                 capacity: int = ..., seed: int = 0) -> None: ...
    @staticmethod
    def size_for(nrows: int, nblocks: int = 1, capacity: int = ...) -> int: ...
    def pending(self, block: int) -> int: ...
    def dropped(self, block: int) -> int: ...
    def drain(self, block: int, limit: int = ...) -> list[ConnLogRecord]: ...
    def format(self, block: int, rows: dict[int, tuple[bytes, bytes, bool]],
               slots: dict[int, tuple[bytes, bytes]], limit: int = ...) -> tuple[bytes, int]: ...
    def histogram(self, row: int, kind: int) -> tuple[list[int], int]: ...
    def zero(self, row: int) -> None: ...
    def py_observe(self, row: int, kind: int, us: int) -> None: ...
    def py_sampled(self, threshold: int) -> bool: ...
    def py_push(self, rec: ConnLogRecord) -> bool: ...

def _cl_refused(eng: Engine, svc: ServiceState, lport: int, client: tuple[str, int] | None,
                term: int) -> None: ...

H_CONNECT: int
H_DURATION: int
HB_BUCKETS: int
CL_DEFAULT_CAPACITY: int
CL_MAX_CAPACITY: int
TERM_NCODES: int
TERM_CODES: tuple[str, ...]
TERM_UNSET: int
TERM_NORMAL: int
TERM_CC: int
TERM_CD: int
TERM_SC: int
TERM_sC: int
TERM_SD: int
TERM_cD: int
TERM_sD: int
TERM_cR: int
TERM_PR: int
TERM_PQ: int
TERM_sQ: int
TERM_RC: int
TERM_RD: int
TERM_ID: int
TERM_IC: int
TERM_KC: int
TERM_KD: int
TERM_PD: int
TERM_cL: int
TERM_sL: int
HISTOGRAM_EDGES_US: tuple[int, ...]

class Policy:
    """One constructor for every policy; each uses what it needs and refuses unknown options."""
    NAME: ClassVar[str | None]
    OPTIONS: ClassVar[tuple[str, ...]]
    name: str
    def __init__(self, slots: Sequence[int], weights: Sequence[int], health: HealthBitmap, *,
                 counters: Counters | None = None, ids: Sequence[str | bytes] | None = None,
                 seed: int = 0, options: dict[str, Any] | None = None) -> None: ...
    def pick(self, key: int = 0, tried: Iterable[int] = ()) -> int: ...
    def report_failure(self, slot: int) -> None: ...
    @property
    def members(self) -> tuple[tuple[int, int], ...]: ...

class RoundRobin(Policy):
    max_fails: int
    def state(self) -> list[tuple[int, int]]: ...

class WeightedRandom(Policy):
    def probabilities(self) -> dict[int, Fraction]: ...

class LeastConn(WeightedRandom): ...

class Maglev(Policy):
    table_size: int
    balance_factor: int
    ids: tuple[bytes, ...]
    def table_slots(self) -> list[int]: ...

POLICIES: dict[str, type[Policy]]

def make_policy(name: str, slots: Sequence[int], weights: Sequence[int], health: HealthBitmap, *,
                counters: Counters | None = None, ids: Sequence[str | bytes] | None = None,
                seed: int = 0, options: dict[str, Any] | None = None) -> Policy: ...

def __getattr__(name: str) -> Any: ...
def pick_many(policy: Policy, count: int, key_step: int = ...) -> int: ...

class ServiceState:
    policy: Policy | None
    addrs: dict[int, tuple[str, int]]
    retries: int
    connect_timeout: float
    idle_timeout: float
    hash_mode: int
    on_connect_error: Callable[[int, OSError], None] | None
    on_no_backend: Callable[[], None] | None
    name: str
    fall_passive: int
    on_passive_down: Callable[[int, int, str], None] | None
    row: int
    # [limits] connection limits and the queue (core/limits.pxi)
    maxconn: int
    queue_size: int
    queue_timeout: float
    qlen: int
    adm: Admission | None                 # [access] core/admission.pxi
    tls: TlsContext | None                # [tls] core/tls.pxi
    orig: OrigContext | None              # [orig] core/tls_orig.pxi
    # [mem] core/timers.pxi (seconds, 0: off) and keepalive (ka_idle 0: off, -1: kernel's)
    client_fin: float
    server_fin: float
    max_duration: float
    first_byte: float
    ka_idle: int
    ka_interval: int
    ka_count: int
    log_sample: int   # [obs]
    splice: int       # [splice] a value of SPLICE_MODES
    def __init__(self, name: str) -> None: ...
    def set_backends(self, policy: Policy | None, addrs: dict[int, tuple[str, int]]) -> None: ...

class Listener:
    sni: SniTable | None                 # [sni]

class Session:
    """Made only by an Engine; Session() raises CoreTypeError."""

class Engine:
    now: float
    sessions: set[Session]
    on_accept_error: Callable[[OSError], None] | None
    epoll_errors: int
    gauges: Gauges
    # [limits] [global] maxconn; local errors (what, error, count since the last call)
    maxconn: int
    on_local_error: Callable[[str, OSError, int], None] | None
    connlog: ConnLog | None   # [obs]
    def __init__(self, loop: Any, counters: Counters, block: int = 0,
                 gauges: Gauges | None = None) -> None: ...
    @property
    def global_row(self) -> int: ...
    # [mem] core/buffers.pxi, core/timers.pxi (read-only)
    buffers_in_use: int
    buffers_peak: int
    buffer_budget: int               # in buffers of BUFFER_SIZE (0: no cap)
    buffer_waits: int
    buffers_pooled: int
    timeouts_fin: int
    timeouts_duration: int
    timeouts_first_byte: int
    tls_handshakes: int                  # [tls] core/tls.pxi: done, resumed, failed, timed out
    tls_resumed: int
    tls_failures: int
    tls_timeouts: int
    sni_routed: int                      # [sni]
    sni_defaulted: int
    sni_no_route: int
    sni_bad: int
    sni_oversize: int
    sni_timeouts: int
    tls_no_cert: int
    tls_expired: int
    tls_untrusted: int
    tls_authz_denied: int
    accept_wakeups: int                  # [lean] core/lean.pxi: listener wake-ups, accepts
    accepted: int
    spec_hits: int                       # [lean] reads at accept / sends at connect: ready
    spec_misses: int                     # ... or not (EAGAIN)

    orig_handshakes: int                  # [orig] core/tls_orig.pxi
    orig_resumed: int
    orig_failures: int

    tls_protocol: int                    # [tlsops] the other failure reasons; versions
    tls_other: int
    tls_v12: int
    tls_v13: int
    # [splice] core/splice.pxi (read-only)
    npipes: int                          # free pipes in the pool
    pipes_in_use: int
    spliced_bytes: int
    pipes_capped: int
    pipe_failures: int
    def set_buffer_budget(self, nbytes: int) -> None: ...
    def listen(self, sock: socket.socket, svc: ServiceState, shared: bool = False) -> Listener: ...
    def refresh_listeners(self) -> None: ...
    def unlisten(self, lst: Listener) -> None: ...
    def reset_passive(self, slot: int) -> None: ...
    def sweep(self, idle: bool = True) -> int: ...
    def abort_all(self) -> None: ...
    def close_backend(self, svc: ServiceState, slot: int) -> int: ...
    def close(self) -> None: ...

# [limits] core/limits.pxi
LIMITS_RETRY: float
def limits_sweep(eng: Engine) -> None: ...
def set_max_conns(eng: Engine, slot: int, cap: int) -> None: ...
def limits_info(eng: Engine) -> dict[str, int]: ...
def abort_where(eng: Engine, svc: ServiceState, slot: int) -> int: ...   # = eng.close_backend
def debug_counts() -> dict[str, int] | None: ...
def _debug_fail_epoll(n: int) -> None: ...

# -- access pieces: PROXY protocol (core/proxyproto.pxi) -----------------------------------------
PP_DONE: int
PP_NEED_MORE: int
PP_ERR_NOT_PROXY: int
PP_ERR_MALFORMED: int
PP_ERR_UNSUPPORTED: int
PP_ERR_TOO_LONG: int
PP_ERR_CHECKSUM: int
PROXY_ERRORS: dict[int, str]
PP_V1_MAX: int            # 107
PP_V2_MAX: int            # 536
PP_MAX: int
PP_CMD_LOCAL: int
PP_CMD_PROXY: int
PP_FAM_UNSPEC: int
PP_FAM_TCP4: int
PP_FAM_TCP6: int
PP_FAM_UNKNOWN: int
PP2_TYPE_ALPN: int
PP2_TYPE_AUTHORITY: int
PP2_TYPE_CRC32C: int
PP2_TYPE_NOOP: int
PP2_TYPE_UNIQUE_ID: int
PP2_TYPE_SSL: int
PP2_SUBTYPE_SSL_VERSION: int
PP2_SUBTYPE_SSL_CN: int
PP2_CLIENT_SSL: int

Endpoint = tuple[str, int]

def proxy_parse(data: ReadableBuffer) -> tuple[int, dict[str, Any] | None]: ...
def proxy_tlv_find(data: ReadableBuffer, offset: int, length: int,
                   type: int) -> tuple[int, int] | None: ...
def proxy_build_v1(src: Endpoint | None, dst: Endpoint | None) -> bytes: ...
def proxy_build_v2(src: Endpoint | None, dst: Endpoint | None, *, command: int = ...,
                   authority: bytes | None = None, ssl: dict[str, Any] | None = None,
                   crc32c: bool = False) -> bytes: ...
def crc32c(data: ReadableBuffer, crc: int = 0) -> int: ...
def _addr_from_sockaddr(data: bytes) -> Endpoint | None: ...

# -- access lists (core/acl.pxi) ---------------------------------------------------------------
class Acl:
    """Immutable: deny wins, an empty allow admits everyone, IPv4-mapped clients are IPv4."""
    allow: tuple[str, ...]
    deny: tuple[str, ...]
    n4: int
    n6: int
    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None: ...
    def admits(self, ip: str) -> bool: ...
    def intervals(self) -> dict[int, list[tuple[int, int]]]: ...

def acl_admits_many(acl: Acl, ip: str, count: int) -> int: ...

# -- per-source limits (core/srclimit.pxi) -----------------------------------------------------
SRC_ADMIT: int
SRC_REFUSED_CONNS: int
SRC_REFUSED_RATE: int
SRC_TABLE_FULL: int
SRC_PROBE: int
SRC_MAX_CONNS: int
SRC_MIN_ENTRIES: int
SRC_MAX_ENTRIES: int
SOURCE_REASONS: tuple[str, ...]   # indexed by the SRC_* codes

class SourceTable:
    entries: int
    def __init__(self, buffer: WriteableBuffer, entries: int) -> None: ...
    @staticmethod
    def size_for(entries: int) -> int: ...
    def py_acquire(self, ip: str, now_ms: int, max_conns: int = 0, rate: int = 0,
                   burst: int = 1, salt: int = 0) -> tuple[int, int]: ...
    def py_release(self, entry: int) -> None: ...
    def conns(self, ip: str, salt: int = 0) -> int: ...
    def entry(self, i: int) -> tuple[int, int, int]: ...
    def total_conns(self) -> int: ...
    def _racy_acquire(self, ip: str, max_conns: int) -> tuple[int, int]: ...
    def _racy_release(self, entry: int) -> None: ...

def source_acquire_many(table: SourceTable, ip: str, count: int, max_conns: int, rate: int,
                        burst: int) -> int: ...

# -- admission in the data path (core/admission.pxi) -------------------------------------------
class Admission:
    """A service's ACL, per-source limits and PROXY settings as the engine applies them."""
    acl: Acl | None
    pp_from: Acl | None
    pp_timeout: float
    first_byte: float
    srctab: SourceTable | None
    src_conns: int
    src_rate: int
    src_burst: int
    salt: int
    def __init__(self, *, acl: Acl | None = None, pp_from: Acl | None = None,
                 pp_timeout: float = 3.0, first_byte: float = 0.0,
                 srctab: SourceTable | None = None, conns: int = 0, rate: int = 0,
                 burst: int = 0, row: int = -1, pp_send: dict[int, int] | None = None) -> None: ...
    def pp_version(self, slot: int) -> int: ...
class TlsContext:
    """[tls] A service's TLS termination (core/tls.pxi): certificates chosen by SNI."""
    handshake_timeout: float
    names: tuple[tuple[str, ...], ...]
    min_version: str
    alpn: tuple[str, ...]
    verify_client: str
    identities: tuple[str, ...]
    def __init__(self, certs: Sequence[tuple[bytes, bytes]], *, min_version: str = "1.2",
                 alpn: Sequence[str] = (), handshake_timeout: float = 10.0,
                 client_ca: bytes | None = None, verify_client: str = "required",
                 identities: Sequence[str] = (), ticket_lifetime: float = 300.0,
                 session_context: bytes = b"fastlb") -> None: ...
    ticket_lifetime: float                                # [tlsops]
    def set_ticket_keys(self, keys: bytes) -> None: ...   # [tlsops] fastlb.tickets
    def pick(self, server_name: str) -> int: ...


class OrigContext:
    """[orig] A service's TLS to its backends (core/tls_orig.pxi): client contexts by profile
    (ca PEM, verify, client cert PEM, key PEM), and per slot (slot, profile, name)."""
    profiles: tuple[tuple[bytes, bool, bytes, bytes], ...]
    def __init__(self, profiles: Sequence[tuple[bytes, bool, bytes, bytes]],
                 slots: Sequence[tuple[int, int, str]] = ...) -> None: ...
    def uses_tls(self, slot: int) -> bool: ...
    def cached(self, slot: int) -> bool: ...

def tls_counts(st: ServiceState) -> dict[str, int]: ...   # [tlsops] a service's TLS counts
# [sni] SNI routing without termination (core/sni.pxi)
SNI_STATUS: tuple[str, ...]

def sni_parse_bytes(data: bytes) -> tuple[str, str | None]: ...

class SniTable:
    """The services of one shared listen address, by SNI."""
    svcs: tuple[ServiceState, ...]
    default: ServiceState | None
    timeout: float
    def __init__(self, routes: Any, default: ServiceState | None = ..., timeout: float = ...) -> None: ...
    def match(self, name: str) -> ServiceState | None: ...
# [splice] core/splice.pxi
SPLICE_MODES: dict[str, int]   # "auto" -> 0, "off" -> 1, "on" -> 2
SPLICE_PIPES_MAX: int
def _splice_tune(pipe_size: int = -1, budget: int = -1) -> tuple[int, int]: ...
