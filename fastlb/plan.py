"""The supervisor -> data path contract: typed plans and snapshots, and the data path protocol.

Owner: the shape of what the supervisor tells a data path, in-process or over a worker's
control channel. Rules:
  - ``Plan`` (one service) and ``Snapshot`` (every service, numbered) are frozen, slotted
    dataclasses; ``to_wire()`` gives plain msgpack-able lists and dicts and ``from_wire()``
    rebuilds the same value (a unit test holds them to the round trip). Nothing else in fastlb
    reads the wire form.
  - ``WIRE_VERSION`` changes with the wire form, ``LAYOUT_VERSION`` (fastlb.shm) with the
    shared-memory layout; a worker announces both with its fastlb version (``hello``) and the
    supervisor refuses one that differs (an upgrade under a running supervisor).
  - ``DataPath`` is the one object the supervisor holds for the data path; it never asks
    which mode it runs in (fastlb.dataplane.LocalDataPath: ``workers = 1``;
    fastlb.pool.WorkerPool: worker processes).
No I/O and no fastlb import here: the worker process loads this module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol, Sequence

WIRE_VERSION = 1

ListenKey = tuple[str, str, int]          # (service, host, port): one listening socket
# [sni] the ListenKey "service" of an address shared by SNI routing: one socket for the group
# (no service name can start with "*": config names are [A-Za-z0-9_.-])
SNI_GROUP = "*sni"


def sni_addresses(plans: Iterable[Any]) -> set[tuple[str, int]]:
    """[sni] The listen addresses shared by SNI routing: those where a service (a Plan, or a
    config Service: both have .sni and .listen) declares sni names."""
    out: set[tuple[str, int]] = set()
    for p in plans:
        if p.sni:
            out.update((a[0], a[1]) if isinstance(a, tuple) else (a.host, a.port) for a in p.listen)
    return {a for a in out if a[1] != 0}          # (config refuses sni on port 0)


@dataclass(frozen=True, slots=True)
class PlanBackend:
    """A backend that may take new connections (state ready), with its effective weight."""
    slot: int
    weight: int
    address: str          # the backend's id, "host:port" as written
    host: str             # an IP literal
    port: int

    def to_wire(self) -> list[Any]:
        return [self.slot, self.weight, self.address, self.host, self.port]

    @classmethod
    def from_wire(cls, w: Sequence[Any]) -> PlanBackend:
        slot, weight, address, host, port = w
        return cls(int(slot), int(weight), str(address), str(host), int(port))


@dataclass(frozen=True, slots=True)
class Plan:
    """One service as a data path runs it. Equal plans build equal policies: a data path
    rebuilds a service's policy only when its plan changed."""
    name: str
    listen: tuple[tuple[str, int], ...]
    policy: str
    hash_mode: int
    retries: int
    connect_timeout: float
    idle_timeout: float
    fall_passive: int
    panic: bool
    backends: tuple[PlanBackend, ...]               # ready ones, for new connections
    names: tuple[tuple[int, str], ...]              # every backend (slot, address), for logs
    options: tuple[tuple[str, int], ...] = ()       # policy options (fastlb.runtime.policy_options)
    row: int = -1                                   # the service's Gauges row (fastlb.shm)
    # [limits] service.maxconn, service.queue, backends[].max_conns as (slot, cap) of capped ones
    maxconn: int = 0
    queue_size: int = 0
    queue_timeout: float = 0.0
    max_conns: tuple[tuple[int, int], ...] = ()
    # [access] ACL, per-source limits, PROXY protocol, client_first_byte (config.Access); the
    # data path builds the service's _core.Admission from them when they change.
    acl_allow: tuple[str, ...] = ()                 # CIDRs
    acl_deny: tuple[str, ...] = ()
    src_conns: int = 0                              # per_source_conns (0: none)
    src_rate: int = 0                               # per_source_rate, per second (0: none)
    src_burst: int = 0
    pp_accept_from: tuple[str, ...] = ()            # CIDRs that must send a PROXY header
    pp_timeout: float = 3.0
    client_first_byte: float = 0.0                  # seconds (0: off)
    pp_send: tuple[tuple[int, int], ...] = ()       # (slot, 1 | 2): PROXY v1/v2 to that backend

    def access_key(self) -> tuple[Any, ...]:
        """[access] What the service's Admission is built from (rebuilt only when it changes)."""
        return (self.acl_allow, self.acl_deny, self.src_conns, self.src_rate, self.src_burst,
                self.pp_accept_from, self.pp_timeout, self.client_first_byte, self.pp_send)
    # [mem] timers (seconds, 0: off), keepalive (idle, interval, count; 0: kernel default;
    # None: off) and this data path's share of [global] buffer_budget (bytes; 0: no cap)
    client_fin: float = 0.0
    server_fin: float = 0.0
    max_duration: float = 0.0
    first_byte: float = 0.0
    tcp_keepalive: tuple[int, int, int] | None = None
    buffer_budget: int = 0
    log_sample: int = 0                             # [obs] connection log: sample x 2**32, 0 off
    # [tls] TLS termination (config.TlsConfig): (cert PEM, key PEM) pairs, the first the default
    # (empty: plain TCP); the data path builds the service's _core.TlsContext when they change.
    tls_certs: tuple[tuple[bytes, bytes], ...] = ()
    tls_min_version: str = "1.2"
    tls_alpn: tuple[str, ...] = ()
    tls_handshake: float = 10.0
    tls_client_ca: bytes = b""                      # stage 2: PEM CAs of client certificates
    tls_verify: str = "required"                    # "required" | "optional"
    tls_identities: tuple[str, ...] = ()            # service.authz.identities
    tls_ticket_lifetime: float = 300.0              # [tlsops] tls.ticket_lifetime (fastlb.tickets)
    # [sni] passthrough routing: the names this service takes on a shared listen address
    # (empty: the address's default, or a service alone on it) and the ClientHello's time
    sni: tuple[str, ...] = ()
    sni_handshake: float = 10.0
    splice: str = "auto"                            # [splice] "auto" | "on" | "off"

    def tls_key(self) -> tuple[Any, ...]:
        """[tls] What the service's TlsContext is built from."""
        return (self.tls_certs, self.tls_min_version, self.tls_alpn, self.tls_handshake,
                self.tls_client_ca, self.tls_verify, self.tls_identities,
                self.tls_ticket_lifetime, self.name)                       # [tlsops]
    # [orig] TLS to backends (config.OrigTls): the distinct profiles (ca PEM, verify, client
    # cert PEM, key PEM) and (slot, profile index, name verified and sent as SNI) per TLS slot;
    # the data path builds the service's _core.OrigContext when they change.
    orig_profiles: tuple[tuple[bytes, bool, bytes, bytes], ...] = ()
    orig_slots: tuple[tuple[int, int, str], ...] = ()
    # [listenopts] service.defer_accept (seconds) and service.fastopen (queue length), 0: off.
    # The supervisor sets them on the listening sockets it owns (fastlb.listeners); a data path
    # has nothing to do with them: here so that a plan shows what its service runs with.
    defer_accept: int = 0
    fastopen: int = 0

    def orig_key(self) -> tuple[Any, ...]:
        """[orig] What the service's OrigContext is built from."""
        return (self.orig_profiles, self.orig_slots)

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "listen": [list(a) for a in self.listen],
                "policy": self.policy, "hash_mode": self.hash_mode, "retries": self.retries,
                "connect_timeout": self.connect_timeout, "idle_timeout": self.idle_timeout,
                "fall_passive": self.fall_passive, "panic": self.panic,
                "backends": [b.to_wire() for b in self.backends],
                "names": [list(n) for n in self.names],
                "options": [list(o) for o in self.options], "row": self.row,
                "maxconn": self.maxconn, "queue_size": self.queue_size,             # [limits]
                "queue_timeout": self.queue_timeout,
                "max_conns": [list(m) for m in self.max_conns],
                "access": [list(self.acl_allow), list(self.acl_deny), self.src_conns,     # [access]
                           self.src_rate, self.src_burst, list(self.pp_accept_from),
                           self.pp_timeout, self.client_first_byte,
                           [list(x) for x in self.pp_send]],
                "client_fin": self.client_fin, "server_fin": self.server_fin,        # [mem]
                "max_duration": self.max_duration, "first_byte": self.first_byte,
                "tcp_keepalive": list(self.tcp_keepalive) if self.tcp_keepalive else None,
                "buffer_budget": self.buffer_budget,
                "log_sample": self.log_sample,                                    # [obs]
                "tls": ([[list(p) for p in self.tls_certs], self.tls_min_version,  # [tls]
                         list(self.tls_alpn), self.tls_handshake, self.tls_client_ca,
                         self.tls_verify, list(self.tls_identities)]
                        if self.tls_certs else None),
                "orig": ([[list(p) for p in self.orig_profiles],                     # [orig]
                          [list(x) for x in self.orig_slots]] if self.orig_slots else None),
                "tls_tickets": self.tls_ticket_lifetime,                           # [tlsops]
                "sni": [list(self.sni), self.sni_handshake] if self.sni else None,   # [sni]
                "splice": self.splice,                                            # [splice]
                "listen_opts": [self.defer_accept, self.fastopen]}                # [listenopts]

    @classmethod
    def from_wire(cls, w: Mapping[str, Any]) -> Plan:
        return cls(name=str(w["name"]),
                   listen=tuple((str(h), int(p)) for h, p in w["listen"]),
                   policy=str(w["policy"]), hash_mode=int(w["hash_mode"]),
                   retries=int(w["retries"]), connect_timeout=float(w["connect_timeout"]),
                   idle_timeout=float(w["idle_timeout"]), fall_passive=int(w["fall_passive"]),
                   panic=bool(w["panic"]),
                   backends=tuple(PlanBackend.from_wire(b) for b in w["backends"]),
                   names=tuple((int(s), str(a)) for s, a in w["names"]),
                   options=tuple((str(k), int(v)) for k, v in w.get("options", ())),
                   row=int(w.get("row", -1)),
                   maxconn=int(w.get("maxconn", 0)), queue_size=int(w.get("queue_size", 0)),
                   queue_timeout=float(w.get("queue_timeout", 0.0)),
                   max_conns=tuple((int(s), int(n)) for s, n in w.get("max_conns", ())),
                   **_access_from_wire(w.get("access")),                            # [access]
                   **_mem_from_wire(w),                                              # [mem]
                   log_sample=int(w.get("log_sample", 0)),                           # [obs]
                   **_tls_from_wire(w.get("tls")),                                   # [tls]
                   **_orig_from_wire(w.get("orig")),                                 # [orig]
                   tls_ticket_lifetime=float(w.get("tls_tickets", 300.0)),          # [tlsops]
                   **_sni_from_wire(w.get("sni")),                                   # [sni]
                   splice=str(w.get("splice", "auto")),                              # [splice]
                   **_listen_opts_from_wire(w.get("listen_opts")))                   # [listenopts]


def _listen_opts_from_wire(o: Sequence[Any] | None) -> dict[str, Any]:
    """[listenopts] Plan's listener options from their wire list (absent: off)."""
    if not o:
        return {}
    return {"defer_accept": int(o[0]), "fastopen": int(o[1])}


def _orig_from_wire(o: Sequence[Any] | None) -> dict[str, Any]:
    """[orig] Plan's origination fields from their wire list (absent: plain TCP)."""
    if not o:
        return {}
    profiles, slots = o
    return {"orig_profiles": tuple((bytes(ca), bool(v), bytes(c), bytes(k))
                                   for ca, v, c, k in profiles),
            "orig_slots": tuple((int(s), int(i), str(n)) for s, i, n in slots)}



def _sni_from_wire(t: Sequence[Any] | None) -> dict[str, Any]:
    """[sni] Plan's SNI fields from their wire list (absent: none)."""
    if not t:
        return {}
    return {"sni": tuple(str(n) for n in t[0]), "sni_handshake": float(t[1])}


def _tls_from_wire(t: Sequence[Any] | None) -> dict[str, Any]:
    """[tls] Plan's TLS fields from their wire list (absent: plain TCP)."""
    if not t:
        return {}
    certs, minv, alpn, hs, ca, verify, ids = (list(t) + [b"", "required", []])[:7]
    return {"tls_certs": tuple((bytes(c), bytes(k)) for c, k in certs),
            "tls_min_version": str(minv), "tls_alpn": tuple(str(a) for a in alpn),
            "tls_handshake": float(hs), "tls_client_ca": bytes(ca), "tls_verify": str(verify),
            "tls_identities": tuple(str(i) for i in ids)}


def _access_from_wire(a: Sequence[Any] | None) -> dict[str, Any]:
    """[access] Plan's access fields from their wire list (absent: the defaults)."""
    if not a:
        return {}
    allow, deny, conns, rate, burst, pp_from, pp_timeout, first_byte, pp_send = a
    return {"acl_allow": tuple(str(x) for x in allow), "acl_deny": tuple(str(x) for x in deny),
            "src_conns": int(conns), "src_rate": int(rate), "src_burst": int(burst),
            "pp_accept_from": tuple(str(x) for x in pp_from), "pp_timeout": float(pp_timeout),
            "client_first_byte": float(first_byte),
            "pp_send": tuple((int(s), int(v)) for s, v in pp_send)}


def _mem_from_wire(w: Mapping[str, Any]) -> dict[str, Any]:
    ka = w.get("tcp_keepalive")
    return {"client_fin": float(w.get("client_fin", 0.0)),
            "server_fin": float(w.get("server_fin", 0.0)),
            "max_duration": float(w.get("max_duration", 0.0)),
            "first_byte": float(w.get("first_byte", 0.0)),
            "tcp_keepalive": (int(ka[0]), int(ka[1]), int(ka[2])) if ka else None,
            "buffer_budget": int(w.get("buffer_budget", 0))}


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every service's plan at generation ``gen``, and the listening sockets they use (in
    this order the sockets ride along a worker's snapshot message, SCM_RIGHTS)."""
    gen: int
    plans: tuple[Plan, ...]
    listen: tuple[ListenKey, ...]
    maxconn: int = 0          # [limits] [global] maxconn as resolved (fastlb.preflight); 0: none

    def to_wire(self) -> dict[str, Any]:
        return {"gen": self.gen, "plans": [p.to_wire() for p in self.plans],
                "listen": [list(k) for k in self.listen], "maxconn": self.maxconn}

    @classmethod
    def from_wire(cls, w: Mapping[str, Any]) -> Snapshot:
        return cls(gen=int(w["gen"]), plans=tuple(Plan.from_wire(p) for p in w["plans"]),
                   listen=tuple((str(s), str(h), int(p)) for s, h, p in w["listen"]),
                   maxconn=int(w.get("maxconn", 0)))


class DataPath(Protocol):
    """What the supervisor needs of the data path, whatever runs it.

    ``check`` raises FastLBError when a snapshot could not be applied (an address that does
    not pack, a policy that does not build, a message over the channel's limit): it is the
    prepare step's, before anything is persisted; ``apply`` is then not expected to fail.
    Stopping has two steps because the supervisor owns the listening sockets: it shuts them
    between ``stop_accepting`` and ``finish``, so every mode refuses new clients at once.
    """

    def check(self, snapshot: Snapshot) -> None: ...
    def apply(self, snapshot: Snapshot, sockets: Mapping[ListenKey, Any]) -> None: ...
    def acked(self) -> int: ...                  # the lowest generation every data path runs
    def close_backend(self, service: str, slot: int, why: str) -> None: ...
    def connections(self) -> int: ...
    def memory(self) -> dict[str, int]: ...      # [mem] buffers and timer counts, summed
    def set_tickets(self, keys: Mapping[str, bytes]) -> None: ...   # [tlsops] fastlb.tickets
    def info(self) -> list[dict[str, Any]]: ...
    async def start(self) -> None: ...           # serve the snapshot applied (workers: spawn)
    async def resize(self, n: int) -> bool: ...  # True: n data paths run now
    async def restart(self) -> int: ...
    def stop_accepting(self, mode: str) -> None: ...
    async def finish(self, mode: str, grace: float) -> None: ...
