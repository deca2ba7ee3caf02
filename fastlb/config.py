"""Configuration: TOML text -> validated, frozen objects.

Owner: the meaning of every config key, its default and its validation. Nothing else reads TOML.
Rules: unknown keys are errors (a typo must not be ignored); every error is one ConfigError that
names the key path (``service[1].backends[0].weight``), the line when it can be found, what was
wrong and what is expected. Host names of listeners, admin and metrics are resolved here, once;
a backend's host name (or SRV name) is kept as written: fastlb.dns resolves it in the background,
again and again, and the data path only ever sees the IPs of its members.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
import tomllib
from dataclasses import dataclass, field
from typing import AbstractSet, Any, Iterable, TypedDict

from fastlb import _core, cpus
from fastlb.errors import ConfigError

# The core's names and limits, never copied here (fastlb/core/consts.pxi defines them).
POLICIES = tuple(_core.POLICIES)
HASH_KEYS = tuple(_core.HASH_MODES)
MAX_RETRIES = _core.MAX_RETRIES          # the core's tried list holds MAX_TRIED slots
MAX_WEIGHT = _core.MAX_WEIGHT
MAX_FAILS = _core.MAX_FAILS
MAX_BALANCE_FACTOR = _core.MAX_BALANCE_FACTOR
STATES = ("ready", "drain", "maint")
MAX_WORKERS = 64


class _Defaults(TypedDict):     # DEFAULTS's keys, each with its own type
    workers: int
    grace: float
    retries: int
    connect: float
    idle: float
    weight: int
    policy: str
    hash_key: str
    hash_balance_factor: int
    max_fails: int


DEFAULTS: _Defaults = {
    "workers": 1,
    "grace": 30.0,          # seconds SIGTERM lets open connections finish
    "retries": 2,           # extra backends tried after a failed connect (HAProxy: 3)
    "connect": 2.0,         # connect timeout, seconds
    "idle": 300.0,          # idle timeout, seconds (HAProxy's usual timeout client/server)
    "weight": 1,
    "policy": "round_robin",
    "hash_key": "source_ip",
    "hash_balance_factor": 0,   # maglev bounded load off (HAProxy's default too)
    "max_fails": 1,             # round robin: nginx's default
}

# [access] The per-source table (core/srclimit.pxi): 65536 entries of 16 bytes (1 MiB of shared
# memory, touched only as sources arrive) serve 16k sources at once at the 1/4 load its
# probing is sized for.
DEFAULT_SOURCE_TABLE = 65536

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True)
class Address:
    host: str            # an IP literal, or a backend's host name (or SRV name), as written
    port: int
    text: str            # as written, "host:port" (the backend's stable id)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """Active checks of a service (a backend may override the check keys), and the service's
    passive detection, slow start and panic settings."""
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    fastinter: float | None = None      # while a backend is changing state (default: interval)
    downinter: float | None = None      # while a backend is down (default: interval)
    jitter: float = 0.1                 # +- this fraction of each interval, so checks spread out
    kind: str = "tcp"                   # tcp | send_expect
    send: bytes = b""
    expect: bytes | None = None         # a substring the reply must contain
    expect_regex: str | None = None     # or a regex it must match (re.search, bytes)
    port: int | None = None             # check this port instead of the backend's
    initial: str = "up"                 # up | down until the first checks say otherwise
    fall_passive: int = 0               # consecutive data-path failures that mark down (0: off)
    slowstart: float = 0.0              # seconds to ramp a backend back to full weight (0: off)
    panic_threshold: float = 0.0        # % of backends up below which all are used (0: off)


HEALTH_CHECK_KEYS = {"interval", "timeout", "rise", "fall", "fastinter", "downinter", "jitter",
                     "kind", "send", "expect", "expect_regex", "port"}
HEALTH_SERVICE_KEYS = HEALTH_CHECK_KEYS | {"initial", "fall_passive", "slowstart", "panic_threshold"}


@dataclass(frozen=True, slots=True)
class Backend:
    address: Address
    weight: int = 1
    state: str = "ready"      # ready | drain (no new connections) | maint (none, maybe closed)
    health: HealthConfig | None = None   # the effective check config (service's + overrides)
    srv: bool = False         # [dns] address.text is an SRV name (`srv = "..."`), port 0
    max_conns: int = 0        # [limits] connections at once over every worker (0: no cap)
    proxy_protocol: str | None = None    # [access] "v1" | "v2": PROXY header sent (None: the service's)
    tls: OrigTls | None = None           # [orig] its own tls table, merged over the service's
    plain: bool = False                  # [orig] tls = false: plain TCP despite backend_tls


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """[dns] How backends given by host name or SRV record are re-resolved (fastlb.dns)."""
    refresh: float = 10.0                           # seconds between resolutions of a name
    nameservers: tuple[tuple[str, int], ...] = ()   # (IP, port); () = /etc/resolv.conf's
    timeout: float = 2.0                            # for one resolution, all tries included


@dataclass(frozen=True, slots=True)
class EtcdConfig:
    """[etcd] ``[discovery.etcd]``: where the members of ``discovery = "etcd"`` services are
    (fastlb.etcd)."""
    endpoints: tuple[str, ...] = ()       # "http://127.0.0.1:2379", ...
    prefix: str = "/fastlb/"
    ca: str | None = None                 # TLS: the CA to check etcd's certificate with
    cert: str | None = None               # TLS client certificate and key
    key: str | None = None
    user: str | None = None               # auth: a user and the file holding its password
    password_file: str | None = None


@dataclass(frozen=True, slots=True)
class Access:
    """[access] A service's ACL, per-source limits, PROXY protocol and client_first_byte
    (docs/config.md, "Access control, per-source limits, PROXY protocol")."""
    acl_allow: tuple[str, ...] = ()         # CIDRs; empty: everyone (not denied)
    acl_deny: tuple[str, ...] = ()          # CIDRs; deny wins
    per_source_conns: int = 0               # concurrent connections per source (0: no limit)
    per_source_rate: int = 0                # new connections per second per source (0: none)
    burst: int = 0                          # connections at once within the rate (0: = rate)
    pp_accept_from: tuple[str, ...] = ()    # peers that must send a PROXY header
    pp_timeout: float = 3.0                 # for the whole header
    pp_send: str | None = None              # "v1" | "v2": the backends' default
    client_first_byte: float = 0.0          # wait for the client's first byte (0: off)


@dataclass(frozen=True, slots=True)
class ConnLogConfig:
    """[obs] A service's connection log: ``log = { connections = true, format = "text",
    sample = 1.0 }`` (docs/connlog.md)."""
    connections: bool = False           # one line per connection when it ends
    format: str = "text"                # text | json
    sample: float = 1.0                 # the fraction of connections logged, 0.0 to 1.0


CONNLOG_FORMATS = ("text", "json")


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    listen: tuple[Address, ...]
    backends: tuple[Backend, ...]
    policy: str = DEFAULTS["policy"]
    hash_key: str = DEFAULTS["hash_key"]
    hash_balance_factor: int = DEFAULTS["hash_balance_factor"]   # maglev only, % (0: off)
    max_fails: int = DEFAULTS["max_fails"]                       # round_robin only
    retries: int = DEFAULTS["retries"]
    connect_timeout: float = DEFAULTS["connect"]
    idle_timeout: float = DEFAULTS["idle"]
    health: HealthConfig | None = None   # None: no active checks, backends stay up
    dns_refresh: float | None = None     # [dns] `dns = { refresh = "10s" }`; None: [global]'s
    # [limits] connection limits and the queue (docs/config.md, "Connection limits and queues")
    maxconn: int = 0                     # connections at once over every worker (0: none)
    queue_size: int = 0                  # clients waiting for a backend place (0: no queue)
    queue_timeout: float | None = None   # how long one may wait (None: the connect timeout)
    access: Access = Access()            # [access]
    # [mem] timeouts.client_fin/server_fin/max_duration/first_byte (seconds, 0: off) and
    # tcp_keepalive (idle, interval, count; 0: the kernel's default; None: off): _mem()
    client_fin: float = 0.0
    server_fin: float = 0.0
    max_duration: float = 0.0
    first_byte: float = 0.0
    tcp_keepalive: tuple[int, int, int] | None = None
    log: ConnLogConfig | None = None     # [obs] the connection log (None: off)
    registration: "Registration | None" = None   # [leases] None: the service refuses registrations
    discovery: str | None = None         # [etcd] "etcd": backends are keys in etcd (fastlb.etcd)
    tls: TlsConfig | None = None         # [tls] TLS termination (None: plain TCP)
    backend_tls: OrigTls | None = None   # [orig] TLS to every backend without its own tls
    # [sni] passthrough routing on a shared listen address (_sni): names (lowercase, "*.x" a
    # one-label wildcard; empty: the address's default or a service of its own) and the time
    # for the whole ClientHello (timeouts.handshake)
    sni: tuple[str, ...] = ()
    sni_handshake: float = 10.0
    splice: str | None = None            # [splice] "auto" | "on" | "off" (None: [global] splice)
    # [listenopts] TCP_DEFER_ACCEPT (seconds) and TCP_FASTOPEN (queue length) on its listening
    # sockets, 0: off (_listen_opts; docs/config.md, "Listener options")
    defer_accept: int = 0
    fastopen: int = 0


@dataclass(frozen=True, slots=True)
class GlobalConfig:
    workers: int = DEFAULTS["workers"]
    grace: float = DEFAULTS["grace"]
    admin: str | None = None               # "unix:/path/admin.sock" or "tcp:127.0.0.1:9000"
    metrics: str | None = None             # "127.0.0.1:9100": Prometheus text at /metrics
    admin_token_file: str | None = None    # required with a tcp admin
    state_file: str | None = None          # where acknowledged admin changes are kept
    log_format: str = "text"               # [obs] "text" or "json" (fastlb/logs.py)
    log_level: str = "info"                # [obs] debug | info | warning | error
    # [admin] the admin socket's defences (_admin_keys; docs/config.md, "The admin socket")
    admin_max_connections: int = 64
    admin_idle_timeout: float = 60.0
    admin_frame_timeout: float = 10.0
    admin_allow_remote: bool = False
    dns: DnsConfig = DnsConfig()           # [dns] `[global] dns = { refresh, nameservers, timeout }`
    maxconn: int = 0                       # [limits] 0: derived from RLIMIT_NOFILE (preflight)
    source_table_size: int = DEFAULT_SOURCE_TABLE   # [access] entries of the per-source table
    buffer_budget: int = 256 << 20         # [mem] bytes of connection buffers, all workers (_mem_global)
    connlog: str = "stderr"                # [obs] the connection log's destination (_connlog)
    admin_tls: "AdminTls | None" = None    # [tlsops] the TCP admin over TLS (_admin_tls)
    splice: str = "auto"                   # [splice] the services' default (_splice)


@dataclass(frozen=True, slots=True)
class Config:
    global_: GlobalConfig
    services: tuple[Service, ...]
    source: str = "config"
    max_backends: int = field(default=1024)
    # The text it was read from, for messages about its keys (fastlb.preflight): a config file
    # is read once (it may be a pipe), never again to find a line.
    text: str = field(default="", repr=False, compare=False)
    etcd: EtcdConfig | None = None        # [etcd] [discovery.etcd]


class _Checker:
    """Walks the parsed TOML, keeping the key path for messages and the text for line numbers."""

    def __init__(self, text: str, source: str) -> None:
        self.lines = text.splitlines()
        self.source = source

    def fail(self, path: str, message: str) -> ConfigError:
        return ConfigError(path, message, source=self.source, line=self.line_of(path))

    def line_of(self, path: str) -> int | None:
        """Best effort: the line of the key ``path`` names (tomllib gives no positions)."""
        parts = re.findall(r"([A-Za-z_]+)(?:\[(\d+)\])?", path)
        if not parts:
            return None
        start, end = 0, len(self.lines)
        table, index = parts[0]
        if table == "service" and index:
            headers = [i for i, ln in enumerate(self.lines) if re.match(r"^\s*\[\[\s*service\s*\]\]", ln)]
            if int(index) < len(headers):
                start = headers[int(index)]
                later = [h for h in headers if h > start]
                end = later[0] if later else end
                parts = parts[1:]
            else:
                return None
        elif table == "global":
            for i, ln in enumerate(self.lines):
                if re.match(r"^\s*\[\s*global\s*\]", ln):
                    start = i
                    break
            parts = parts[1:]
        line = start
        for name, idx in parts:
            found = None
            for i in range(line, end):
                if re.search(rf"(^|[{{,\s]){re.escape(name)}\s*=", self.lines[i]):
                    found = i
                    break
            if found is None:
                return start + 1 if line == start else line + 1
            line = found
            if idx and name == "backends":
                # the idx-th "address" (or "srv") after the backends key (one per inline table)
                hits = [i for i in range(line, end) if re.search(r"\b(address|srv)\s*=", self.lines[i])]
                if int(idx) < len(hits):
                    line = hits[int(idx)]
        return line + 1

    def table(self, value: Any, path: str, allowed: set[str],
              required: AbstractSet[str] = frozenset()) -> dict:
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a table, got {_kind(value)}")
        for key in value:
            if key not in allowed:
                hint = _closest(key, allowed)
                raise self.fail(f"{path}.{key}" if path else key,
                                f"unknown key{hint}; allowed: {', '.join(sorted(allowed))}")
        for key in sorted(required):
            if key not in value:
                raise self.fail(f"{path}.{key}" if path else key, "required key is missing")
        return value

    def integer(self, value: Any, path: str, lo: int, hi: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(path, f"expected an integer from {lo} to {hi}, got {_kind(value)}")
        if not lo <= value <= hi:
            raise self.fail(path, f"{value} is out of range; expected an integer from {lo} to {hi}")
        return value

    def duration(self, value: Any, path: str, lo: float = 0.001, hi: float = 7 * 86400) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str) and (m := _DURATION.match(value)):
            seconds = float(m.group(1)) * _UNITS[m.group(2)]
        else:
            raise self.fail(path, f"expected a duration like \"2s\", \"500ms\", \"5m\", got {value!r}")
        if not lo <= seconds <= hi:
            raise self.fail(path, f"{value!r} is out of range; expected {lo:g}s to {hi:g}s")
        return seconds

    def choice(self, value: Any, path: str, options: tuple[str, ...]) -> str:
        if value not in options:
            raise self.fail(path, f"{value!r} is not one of: {', '.join(options)}")
        return value

    def address(self, value: Any, path: str, *, resolve: bool) -> Address:
        if not isinstance(value, str):
            raise self.fail(path, f"expected \"host:port\", got {_kind(value)}")
        try:
            return parse_address(value, resolve=resolve)
        except ValueError as exc:
            raise self.fail(path, str(exc)) from None


def error_at(source: str, text: str, path: str, message: str) -> ConfigError:
    """A ConfigError for the key ``path`` of a config whose text is ``text`` (for its line)."""
    return _Checker(text, source).fail(path, message)


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__) + f" ({value!r})"


def _closest(key: str, allowed: set[str]) -> str:
    import difflib
    match = difflib.get_close_matches(key, sorted(allowed), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def parse_address(text: str, *, resolve: bool = True) -> Address:
    """``host:port`` or ``[v6]:port`` -> Address with an IP host. Raises ValueError."""
    m = re.match(r"^\[([^\]]+)\]:(\d+)$", text) or re.match(r"^([^:\[\]]+):(\d+)$", text)
    if not m:
        raise ValueError(f"{text!r} is not \"host:port\" (IPv6 as \"[::1]:8080\")")
    host, port = m.group(1), int(m.group(2))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} in {text!r} is out of range 0..65535")
    if "%" in host:
        raise ValueError(f"{text!r}: IPv6 zone ids (fe80::1%eth0) are not supported; "
                         f"use a global or unique-local address")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{host!r} in {text!r} is neither an IP address nor a host name "
                             f"(letters, digits, '-', '_', dot-separated labels)") from None
        if not resolve:
            return Address(host, port, text)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ValueError(f"cannot resolve host {host!r}: {exc.strerror}") from None
        host = str(infos[0][4][0])    # an IPv4 or IPv6 sockaddr: its host is a str
    return Address(host, port, text)


# A host name: dot-separated labels of letters, digits, '-' and '_' (SRV names start with '_'),
# at most 253 characters, an optional final dot.
_HOSTNAME = re.compile(r"(?=.{1,254}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
                       r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?")


def load(path: str) -> Config:
    """Read and validate a config file. Raises ConfigError (nothing is started on error)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError("", f"cannot read config: {exc.strerror}", source=path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"not UTF-8 text: {exc}", source=path) from None
    return loads(text, source=path)


def loads(text: str, source: str = "config", *, resolve: bool = True) -> Config:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+)", str(exc))
        raise ConfigError("", f"TOML syntax error: {exc}", source=source,
                          line=int(m.group(1)) if m else None) from None
    return from_dict(doc, source=source, text=text, resolve=resolve)


ADMIN_KEYS = {"admin_max_connections", "admin_idle_timeout", "admin_frame_timeout",
              "admin_allow_remote"}
ADMIN_KEYS |= {"admin_tls"}                                                    # [tlsops]


def _admin_keys(c: _Checker, g: dict) -> dict[str, Any]:
    """[global] admin_*: the admin socket's defences (fastlb.admin.server), and the rule that a
    TCP admin listens on loopback unless admin_allow_remote says otherwise. Defaults and why:
    docs/config.md, "The admin socket"."""
    d = GlobalConfig()
    out: dict[str, Any] = {
        "admin_max_connections": c.integer(g.get("admin_max_connections", d.admin_max_connections),
                                           "global.admin_max_connections", 1, 65536),
        "admin_idle_timeout": c.duration(g.get("admin_idle_timeout", d.admin_idle_timeout),
                                         "global.admin_idle_timeout", lo=0.01),
        "admin_frame_timeout": c.duration(g.get("admin_frame_timeout", d.admin_frame_timeout),
                                          "global.admin_frame_timeout", lo=0.01, hi=3600.0),
    }
    remote = g.get("admin_allow_remote", False)
    if not isinstance(remote, bool):
        raise c.fail("global.admin_allow_remote", f"expected true or false, got {_kind(remote)}")
    out["admin_allow_remote"] = remote
    admin = g.get("admin")
    if isinstance(admin, str) and admin.startswith("tcp:"):
        addr = c.address(admin[4:], "global.admin", resolve=True)
        hosts, name = {addr.host}, admin[4:].rpartition(":")[0].strip("[]")
        if name != addr.host:     # a name: the server binds every address it resolves to
            try:
                hosts |= {str(i[4][0]) for i in socket.getaddrinfo(name, addr.port,
                                                                   type=socket.SOCK_STREAM)}
            except OSError:
                pass
        outside = sorted(h for h in hosts if not ipaddress.ip_address(h).is_loopback)
        if outside and not remote and "admin_tls" not in g:     # [tlsops] TLS protects it
            raise c.fail("global.admin", f"tcp:{addr.text}: {', '.join(outside)} is not a loopback "
                         f"address, and the admin protocol has no encryption yet: the token and "
                         f"every change would cross the network in clear. Listen on 127.0.0.1 or "
                         f"[::1] (reach it through ssh), protect it with [global] admin_tls = "
                         f"{{ cert, key }}, or set [global] admin_allow_remote = true to accept "
                         f"that risk")
    return out



@dataclass(frozen=True, slots=True)
class AdminTls:
    """[tlsops] ``[global] admin_tls``: the TCP admin's certificate and key, and the CAs of the
    client certificates it asks for (None: no client certificate; the token authenticates)."""
    cert: str
    key: str
    client_ca: str | None = None
    verify_client: str = "required"


def admin_cert_only(g: dict) -> bool:
    """[tlsops] A client certificate is required (admin_tls.client_ca, verify_client
    "required"): it authenticates the admin's clients, and the token becomes optional."""
    t = g.get("admin_tls")
    return (isinstance(t, dict) and "client_ca" in t
            and t.get("verify_client", "required") == "required")


def _admin_tls(c: _Checker, g: dict) -> dict[str, Any]:
    """[tlsops] ``[global] admin_tls = { cert, key, client_ca, verify_client }``: the TCP admin
    speaks TLS (1.2 at least), and with client_ca asks for a client certificate signed by it
    (verify_client "required", the default: beside the token, or instead of it when
    admin_token_file is not set; "optional": the token still authenticates). A TLS admin may
    listen on other than loopback without admin_allow_remote. The files are loaded now: a bad
    one names its key. Relative paths: from the configuration file's directory."""
    import os
    import ssl
    if "admin_tls" not in g:
        return {}
    p = "global.admin_tls"
    t = c.table(g["admin_tls"], p, {"cert", "key", "client_ca", "verify_client"}, {"cert", "key"})
    admin = g.get("admin")
    if not (isinstance(admin, str) and admin.startswith("tcp:")):
        raise c.fail(p, "only for a tcp admin socket ([global] admin = \"tcp:HOST:PORT\"); a "
                        "unix socket is protected by its file mode")
    base = os.path.dirname(os.path.abspath(c.source)) if os.path.isfile(c.source) else ""
    paths: dict[str, str] = {}
    for k in ("cert", "key", "client_ca"):
        if k in t:
            if not isinstance(t[k], str) or not t[k]:
                raise c.fail(f"{p}.{k}", f"expected a file name, got {_kind(t[k])}")
            paths[k] = os.path.join(base, t[k]) if base else t[k]
            try:
                with open(paths[k], "rb"):
                    pass
            except OSError as exc:
                raise c.fail(f"{p}.{k}", f"cannot read {paths[k]}: {exc.strerror}") from None
    if "verify_client" in t and "client_ca" not in t:
        raise c.fail(f"{p}.verify_client", "only meaningful with client_ca")
    verify = c.choice(t.get("verify_client", "required"), f"{p}.verify_client",
                      ("required", "optional"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(paths["cert"], paths["key"])
    except (OSError, ssl.SSLError) as exc:
        raise c.fail(f"{p}.cert", f"{paths['cert']} / {paths['key']}: "
                                  f"{getattr(exc, 'reason', None) or exc} (a PEM "
                                  f"certificate and its unencrypted PEM key)") from None
    if "client_ca" in paths:
        try:
            ctx.load_verify_locations(cafile=paths["client_ca"])
        except (OSError, ssl.SSLError) as exc:
            raise c.fail(f"{p}.client_ca", f"cannot load {paths['client_ca']}: "
                                           f"{getattr(exc, 'reason', None) or exc.strerror or exc}"
                         ) from None
    return {"admin_tls": AdminTls(paths["cert"], paths["key"], paths.get("client_ca"), verify)}


def from_dict(doc: dict, *, source: str = "config", text: str = "", resolve: bool = True) -> Config:
    c = _Checker(text, source)
    c.table(doc, "", {"global", "service", "discovery"})                   # [etcd] discovery
    g = c.table(doc.get("global", {}), "global",
                {"workers", "grace", "admin", "admin_token_file", "state_file", "metrics",
                 "log_format", "log_level",                                   # [obs] logs
                 "dns", "maxconn", "source_table_size",                       # [dns] [limits] [access]
                 "buffer_budget", "connlog"}                                  # [mem] [obs]
                | {"splice"}                                                      # [splice]
                | ADMIN_KEYS)                                                     # [admin]
    workers = g.get("workers", DEFAULTS["workers"])
    if workers == "auto":
        workers = min(cpus.usable(), MAX_WORKERS)
    elif isinstance(workers, str):
        raise c.fail("global.workers", f"{workers!r}: expected \"auto\" or a number from 1 to {MAX_WORKERS}")
    else:
        workers = c.integer(workers, "global.workers", 1, MAX_WORKERS)
    metrics = g.get("metrics")
    if metrics is not None:
        c.address(metrics, "global.metrics", resolve=True)
    admin = g.get("admin")
    if admin is not None:
        if not isinstance(admin, str) or not re.match(r"^(unix:.+|tcp:.+:\d+)$", admin):
            raise c.fail("global.admin", f"{admin!r}: expected \"unix:/path/admin.sock\" or "
                                         f"\"tcp:127.0.0.1:9000\"")
        if admin.startswith("tcp:"):
            c.address(admin[4:], "global.admin", resolve=True)
            if "admin_token_file" not in g and not admin_cert_only(g):         # [tlsops]
                raise c.fail("global.admin", "a tcp admin socket needs admin_token_file "
                                             "(a file holding the token clients must send), or "
                                             "admin_tls with client_ca and verify_client = "
                                             "\"required\" (a client certificate instead)")
    for key in ("admin_token_file", "state_file"):
        if key in g and (not isinstance(g[key], str) or not g[key]):
            raise c.fail(f"global.{key}", f"expected a file path, got {_kind(g[key])}")
    glob = GlobalConfig(workers=workers, grace=c.duration(g.get("grace", DEFAULTS["grace"]),
                                                    "global.grace", lo=0.0),
                        admin=admin, admin_token_file=g.get("admin_token_file"),
                        state_file=g.get("state_file"), metrics=metrics,
                        log_format=c.choice(g.get("log_format", "text"), "global.log_format",   # [obs]
                                            ("text", "json")),                                  # [obs]
                        log_level=c.choice(g.get("log_level", "info"), "global.log_level",      # [obs]
                                           ("debug", "info", "warning", "error")),              # [obs]
                        dns=_dns(c, g.get("dns", {}), "global.dns", DnsConfig(), top=True),       # [dns]
                        **_admin_keys(c, g),                                                    # [admin]
                        **_global_limits(c, g),                                                 # [limits]
                        source_table_size=_source_table_size(c, g),                             # [access]
                        **_mem_global(c, g, workers),                                           # [mem]
                        connlog=_connlog_destination(c, g.get("connlog", "stderr")),            # [obs]
                        **_admin_tls(c, g),                                                     # [tlsops]
                        splice=_splice(c, g, "global") or "auto")                               # [splice]
    services_raw = doc.get("service", [])
    if not isinstance(services_raw, list):
        raise c.fail("service", "expected an array of tables ([[service]])")
    services: list[Service] = []
    names: set[str] = set()
    listens: dict[tuple[str, int], str] = {}     # (host, port): the service listening there
    for i, raw in enumerate(services_raw):
        svc = service_from_dict(raw, f"service[{i}]", c, resolve=resolve)
        svc = dataclasses.replace(svc, splice=svc.splice or glob.splice)             # [splice]
        if svc.name in names:
            raise c.fail(f"service[{i}].name", f"duplicate service name {svc.name!r}")
        names.add(svc.name)
        clash = sni_clash(services, svc)                                        # [sni]
        if clash is not None:
            raise c.fail(f"service[{i}].{clash[0]}", clash[1])
        for j, a in enumerate(svc.listen):
            if (a.host, a.port) in listens and a.port != 0 and not sni_shares([*services, svc], a):
                raise c.fail(f"service[{i}].listen[{j}]",
                             f"{a.text} is already a listener of service {listens[(a.host, a.port)]!r}")
            listens[(a.host, a.port)] = svc.name
        clash = listen_opts_clash(services, svc)                                # [listenopts]
        if clash is not None:
            raise c.fail(f"service[{i}].{clash[0]}", clash[1])
        services.append(svc)
    if not services:
        raise c.fail("service", "no [[service]] defined; fastlb needs at least one")
    return Config(global_=glob, services=tuple(services), source=source, text=text,
                  etcd=_etcd(c, doc, services_raw, services))                # [etcd]


SERVICE_KEYS = {"name", "listen", "policy", "hash_key", "hash_balance_factor", "max_fails", "retries",
                "timeouts", "backends", "health"}
SERVICE_KEYS |= {"dns"}                                                        # [dns]
SERVICE_KEYS |= {"maxconn", "queue"}                                           # [limits]
BACKEND_KEYS = {"address", "srv", "weight", "state", "health"}
BACKEND_KEYS |= {"max_conns"}                                                  # [limits]
SERVICE_KEYS |= {"acl", "limits", "proxy_protocol"}                  # [access]
TIMEOUT_KEYS = {"connect", "idle"}
TIMEOUT_KEYS |= {"client_first_byte"}                                # [access]
BACKEND_KEYS |= {"proxy_protocol"}                                   # [access]
SERVICE_KEYS |= {"discovery"}                                                  # [etcd]
SERVICE_KEYS |= {"tcp_keepalive"}                                             # [mem]
SERVICE_KEYS |= {"registration"}                                              # [leases]
SERVICE_KEYS |= {"tls", "authz"}; TIMEOUT_KEYS |= {"handshake"}  # noqa: E702     # [tls]
SERVICE_KEYS |= {"backend_tls"}; BACKEND_KEYS |= {"tls"}  # noqa: E702         # [orig]
SERVICE_KEYS |= {"sni"}                                                       # [sni]
SERVICE_KEYS |= {"splice"}                                                    # [splice]
SERVICE_KEYS |= {"defer_accept", "fastopen"}                                  # [listenopts]


def _dns(c: _Checker, raw: Any, path: str, base: DnsConfig, *, top: bool) -> DnsConfig:
    """[dns] ``dns = { refresh = "10s" }`` of a service, or ``[global] dns = { refresh,
    nameservers = ["127.0.0.1:53", ...], timeout }`` (top). Every DNS key is read here."""
    c.table(raw, path, {"refresh", "nameservers", "timeout"} if top else {"refresh"})
    kw: dict[str, Any] = {}
    if "refresh" in raw:
        kw["refresh"] = c.duration(raw["refresh"], f"{path}.refresh", lo=0.1, hi=86400)
    if "timeout" in raw:
        kw["timeout"] = c.duration(raw["timeout"], f"{path}.timeout", lo=0.01, hi=60)
    if "nameservers" in raw:
        ns = raw["nameservers"]
        if not isinstance(ns, list) or not ns:
            raise c.fail(f"{path}.nameservers", "expected a non-empty array of \"IP:port\" or \"IP\" "
                                               "(port 53), e.g. [\"127.0.0.1:53\", \"[::1]:5353\"]")
        servers = []
        for j, text in enumerate(ns):
            p = f"{path}.nameservers[{j}]"
            if not isinstance(text, str):
                raise c.fail(p, f"expected \"IP:port\", got {_kind(text)}")
            if _is_ip(text.strip("[]")):                         # a bare IP: port 53
                servers.append((text.strip("[]"), 53))
                continue
            try:
                a = parse_address(text, resolve=False)
            except ValueError:
                a = None
            if a is None or not _is_ip(a.host):
                raise c.fail(p, f"{text!r}: expected an IP address with an optional port, "
                                f"like \"127.0.0.1:53\" or \"[::1]:5353\" (no host names)")
            if a.port == 0:
                raise c.fail(p, "a nameserver needs a port from 1 to 65535")
            servers.append((a.host, a.port))
        kw["nameservers"] = tuple(servers)
    return dataclasses.replace(base, **kw)


# -- [access] ACL, per-source limits, PROXY protocol, client_first_byte --------------------------
_RATE = re.compile(r"^\s*(\d+)\s*/\s*s\s*$")
PROXY_VERSIONS = ("v1", "v2")


def _source_table_size(c: _Checker, g: dict) -> int:
    n = g.get("source_table_size", DEFAULT_SOURCE_TABLE)
    lo, hi = _core.SRC_MIN_ENTRIES, _core.SRC_MAX_ENTRIES
    if isinstance(n, bool) or not isinstance(n, int) or not lo <= n <= hi or n & (n - 1):
        raise c.fail("global.source_table_size",
                     f"{n!r}: expected a power of two from {lo} to {hi} (entries of the "
                     f"per-source table; 4 x the sources expected at once)")
    return n


def _cidrs(c: _Checker, value: Any, path: str) -> tuple[str, ...]:
    """A list of CIDR strings (IPv4 or IPv6, host bits zero), as the core's Acl takes them."""
    if not isinstance(value, list):
        raise c.fail(path, f"expected an array of CIDRs like [\"10.0.0.0/8\", \"2001:db8::/32\"], "
                           f"got {_kind(value)}")
    mapped = ipaddress.IPv6Network("::ffff:0:0/96")
    out = []
    for i, entry in enumerate(value):
        if not isinstance(entry, str):
            raise c.fail(f"{path}[{i}]", f"expected a CIDR string, got {_kind(entry)}")
        try:
            net = ipaddress.ip_network(entry, strict=True)
        except ValueError as exc:
            try:
                hint = f"; did you mean \"{ipaddress.ip_network(entry, strict=False)}\"?"
            except ValueError:
                hint = "; expected e.g. \"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\""
            raise c.fail(f"{path}[{i}]", f"{entry!r}: {exc}{hint}") from None
        if net.version == 6 and net.subnet_of(mapped):
            raise c.fail(f"{path}[{i}]", f"{entry!r}: an IPv4-mapped range; write it as IPv4")
        out.append(str(net))
    return tuple(out)


def _access(c: _Checker, raw: dict, path: str) -> tuple[Access, list[str | None]]:
    """The service's access keys, and each backend's proxy_protocol (None: the service's)."""
    kw: dict[str, Any] = {}
    if "acl" in raw:
        acl = c.table(raw["acl"], f"{path}.acl", {"allow", "deny"})
        kw["acl_allow"] = _cidrs(c, acl.get("allow", []), f"{path}.acl.allow")
        kw["acl_deny"] = _cidrs(c, acl.get("deny", []), f"{path}.acl.deny")
    if "limits" in raw:
        lim = c.table(raw["limits"], f"{path}.limits", {"per_source_conns", "per_source_rate", "burst"})
        if "per_source_conns" in lim:
            kw["per_source_conns"] = c.integer(lim["per_source_conns"], f"{path}.limits.per_source_conns",
                                               1, _core.SRC_MAX_CONNS)
        if "per_source_rate" in lim:
            r = lim["per_source_rate"]
            m = _RATE.match(r) if isinstance(r, str) else None
            if not m or not 1 <= int(m.group(1)) <= 1_000_000:
                raise c.fail(f"{path}.limits.per_source_rate",
                             f"{r!r}: expected new connections per second like \"20/s\" (1 to 1000000)")
            kw["per_source_rate"] = int(m.group(1))
        if "burst" in lim:
            if "per_source_rate" not in lim:
                raise c.fail(f"{path}.limits.burst", "only meaningful with per_source_rate")
            kw["burst"] = c.integer(lim["burst"], f"{path}.limits.burst", 1, 1_000_000)
    if "proxy_protocol" in raw:
        pp = c.table(raw["proxy_protocol"], f"{path}.proxy_protocol", {"accept_from", "timeout", "send"})
        if "accept_from" in pp:
            kw["pp_accept_from"] = _cidrs(c, pp["accept_from"], f"{path}.proxy_protocol.accept_from")
        if "timeout" in pp:
            if "accept_from" not in pp:
                raise c.fail(f"{path}.proxy_protocol.timeout", "only meaningful with accept_from")
            kw["pp_timeout"] = c.duration(pp["timeout"], f"{path}.proxy_protocol.timeout", hi=3600.0)
        if "send" in pp:
            kw["pp_send"] = c.choice(pp["send"], f"{path}.proxy_protocol.send", PROXY_VERSIONS)
    t = raw.get("timeouts", {})
    if isinstance(t, dict) and "client_first_byte" in t:
        kw["client_first_byte"] = c.duration(t["client_first_byte"],
                                             f"{path}.timeouts.client_first_byte", hi=3600.0)
    per_backend: list[str | None] = []
    backends = raw.get("backends", [])
    for j, b in enumerate(backends if isinstance(backends, list) else []):
        v = b.get("proxy_protocol") if isinstance(b, dict) else None
        if v is not None:
            v = c.choice(v, f"{path}.backends[{j}].proxy_protocol", PROXY_VERSIONS)
        per_backend.append(v)
    return Access(**kw), per_backend


def _access_summary(s: Service) -> str:
    """fastlb check's words for the keys of _access ("" when none is set)."""
    a, out = s.access, []
    if a.acl_allow or a.acl_deny:
        out.append(f"acl {len(a.acl_allow)} allow / {len(a.acl_deny)} deny")
    if a.per_source_conns or a.per_source_rate:
        out.append("per source " + ", ".join(
            ([f"{a.per_source_conns} conns"] if a.per_source_conns else [])
            + ([f"{a.per_source_rate}/s burst {a.burst or a.per_source_rate}"]
               if a.per_source_rate else [])))
    if a.pp_accept_from:
        out.append(f"PROXY from {len(a.pp_accept_from)} CIDR(s) within {a.pp_timeout:g}s")
    sends = {b.proxy_protocol or a.pp_send for b in s.backends} - {None}
    if sends:
        out.append("PROXY " + "/".join(sorted(str(v) for v in sends)) + " to backends")
    if a.client_first_byte:
        out.append(f"client_first_byte {a.client_first_byte:g}s")
    return "; " + "; ".join(out) if out else ""


def _access_to_dict(svc: Service, d: dict[str, Any], backends: list[dict[str, Any]]) -> None:
    """service_to_dict's part for the keys of _access (only those set)."""
    a = svc.access
    if a.acl_allow or a.acl_deny:
        d["acl"] = {"allow": list(a.acl_allow), "deny": list(a.acl_deny)}
    lim: dict[str, Any] = {}
    if a.per_source_conns:
        lim["per_source_conns"] = a.per_source_conns
    if a.per_source_rate:
        lim["per_source_rate"] = f"{a.per_source_rate}/s"
        if a.burst:
            lim["burst"] = a.burst
    if lim:
        d["limits"] = lim
    pp: dict[str, Any] = {}
    if a.pp_accept_from:
        pp["accept_from"] = list(a.pp_accept_from)
        pp["timeout"] = a.pp_timeout
    if a.pp_send:
        pp["send"] = a.pp_send
    if pp:
        d["proxy_protocol"] = pp
    if a.client_first_byte:
        d["timeouts"]["client_first_byte"] = a.client_first_byte
    for bd, b in zip(backends, svc.backends, strict=True):
        if b.proxy_protocol:
            bd["proxy_protocol"] = b.proxy_protocol


SERVICE_KEYS |= {"log"}                                                       # [obs] connlog
CONNLOG_KEYS = {"connections", "format", "sample"}


def _connlog(c: _Checker, raw: dict, path: str) -> ConnLogConfig | None:
    """[obs] A service's ``log`` table (None when absent). docs/config.md, Connection log."""
    if "log" not in raw:
        return None
    t = c.table(raw["log"], f"{path}.log", CONNLOG_KEYS)
    on = t.get("connections", False)
    if not isinstance(on, bool):
        raise c.fail(f"{path}.log.connections", f"expected true or false, got {_kind(on)}")
    fmt = c.choice(t.get("format", "text"), f"{path}.log.format", CONNLOG_FORMATS)
    sample = t.get("sample", 1.0)
    if not isinstance(sample, (int, float)) or isinstance(sample, bool) or not 0 <= sample <= 1:
        raise c.fail(f"{path}.log.sample", f"expected a number from 0.0 to 1.0 (the fraction of "
                                           f"connections logged), got {_kind(sample)}")
    return ConnLogConfig(connections=on, format=fmt, sample=float(sample))


def _connlog_destination(c: _Checker, value: Any) -> str:
    """[obs] ``[global] connlog``: stderr, file:/path, syslog:unix:/path, syslog:udp:host:port."""
    ok = isinstance(value, str) and (
        value == "stderr" or re.fullmatch(r"file:.+|syslog:unix:.+", value) is not None
        or re.fullmatch(r"syslog:udp:(\[[^\]]+\]|[^:\[\]]+):\d+", value) is not None)
    if not ok:
        raise c.fail("global.connlog", f"{value!r}: expected \"stderr\", \"file:/path\", "
                                       f"\"syslog:unix:/dev/log\" or \"syslog:udp:127.0.0.1:514\"")
    if value.startswith("syslog:udp:"):
        c.address(value[len("syslog:udp:"):], "global.connlog", resolve=True)
    return str(value)


def _health(c: _Checker, raw: Any, path: str, keys: set[str], base: HealthConfig) -> HealthConfig:
    c.table(raw, path, keys)
    kw: dict[str, Any] = {}
    for k in ("interval", "timeout", "fastinter", "downinter", "slowstart"):
        if k in raw:
            kw[k] = c.duration(raw[k], f"{path}.{k}", lo=0.0 if k == "slowstart" else 0.001)
    for k, lo, hi in (("rise", 1, 1000), ("fall", 1, 1000), ("fall_passive", 0, 1000)):
        if k in raw:
            kw[k] = c.integer(raw[k], f"{path}.{k}", lo, hi)
    if "port" in raw:
        kw["port"] = c.integer(raw["port"], f"{path}.port", 1, 65535)
    for k, top in (("jitter", 0.5), ("panic_threshold", 100.0)):
        if k in raw:
            v = raw[k]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= top:
                raise c.fail(f"{path}.{k}", f"expected a number from 0 to {top:g}, got {_kind(v)}")
            kw[k] = float(v)
    if "kind" in raw:
        kw["kind"] = c.choice(raw["kind"], f"{path}.kind", ("tcp", "send_expect"))
    if "initial" in raw:
        kw["initial"] = c.choice(raw["initial"], f"{path}.initial", ("up", "down"))
    for k in ("send", "expect"):
        if k in raw:
            if not isinstance(raw[k], str):
                raise c.fail(f"{path}.{k}", f"expected a string, got {_kind(raw[k])}")
            kw[k] = raw[k].encode("utf-8")
    if "expect_regex" in raw:
        import re as _re
        try:
            _re.compile(raw["expect_regex"].encode() if isinstance(raw["expect_regex"], str) else b"")
        except _re.error as exc:
            raise c.fail(f"{path}.expect_regex", f"not a valid regex: {exc}") from None
        if not isinstance(raw["expect_regex"], str):
            raise c.fail(f"{path}.expect_regex", f"expected a string, got {_kind(raw['expect_regex'])}")
        kw["expect_regex"] = raw["expect_regex"]
    h = dataclasses.replace(base, **kw)
    if h.kind == "send_expect" and h.expect is None and h.expect_regex is None:
        raise c.fail(f"{path}.kind", "send_expect needs expect or expect_regex")
    if h.expect is not None and h.expect_regex is not None:
        raise c.fail(f"{path}.expect_regex", "give expect or expect_regex, not both")
    if h.timeout > h.interval and "timeout" in raw:
        raise c.fail(f"{path}.timeout", f"{h.timeout:g}s is longer than the interval {h.interval:g}s")
    return h


def service_from_dict(raw: Any, path: str, c: _Checker | None = None, *,
                      resolve: bool = True) -> Service:
    """One ``[[service]]`` table -> Service (also used for services added at run time).
    ``resolve`` is kept for its callers: backend host names are never resolved here (fastlb.dns
    follows them), listen addresses always are."""
    c = c or _Checker("", "request")
    c.table(raw, path, SERVICE_KEYS, {"name", "listen"})
    name = raw["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise c.fail(f"{path}.name", f"{name!r}: expected 1-64 characters of A-Z a-z 0-9 _ . -")
    listen_raw = raw["listen"]
    if isinstance(listen_raw, str):
        listen_raw = [listen_raw]
    if not isinstance(listen_raw, list) or not listen_raw:
        raise c.fail(f"{path}.listen", "expected \"host:port\" or a non-empty array of them")
    listen = tuple(c.address(a, f"{path}.listen[{j}]", resolve=True) for j, a in enumerate(listen_raw))
    policy = c.choice(raw.get("policy", DEFAULTS["policy"]), f"{path}.policy", POLICIES)
    hash_key = c.choice(raw.get("hash_key", DEFAULTS["hash_key"]), f"{path}.hash_key", HASH_KEYS)
    if "hash_key" in raw and policy != "maglev":
        raise c.fail(f"{path}.hash_key", "only meaningful with policy = \"maglev\"")
    balance = c.integer(raw.get("hash_balance_factor", DEFAULTS["hash_balance_factor"]),
                        f"{path}.hash_balance_factor", 0, MAX_BALANCE_FACTOR)
    if "hash_balance_factor" in raw and policy != "maglev":
        raise c.fail(f"{path}.hash_balance_factor", "only meaningful with policy = \"maglev\"")
    if 0 < balance < 100:
        raise c.fail(f"{path}.hash_balance_factor",
                     f"{balance} would refuse every backend; expected 0 (off) or a percent "
                     f"from 100 to {MAX_BALANCE_FACTOR} (125 to 200 is usual)")
    max_fails = c.integer(raw.get("max_fails", DEFAULTS["max_fails"]), f"{path}.max_fails", 1,
                          MAX_FAILS)
    if "max_fails" in raw and policy != "round_robin":
        raise c.fail(f"{path}.max_fails", "only meaningful with policy = \"round_robin\"")
    retries = c.integer(raw.get("retries", DEFAULTS["retries"]), f"{path}.retries", 0, MAX_RETRIES)
    t = c.table(raw.get("timeouts", {}), f"{path}.timeouts", TIMEOUT_KEYS)
    connect = c.duration(t.get("connect", DEFAULTS["connect"]), f"{path}.timeouts.connect")
    idle = c.duration(t.get("idle", DEFAULTS["idle"]), f"{path}.timeouts.idle")
    health = None
    if "health" in raw:
        health = _health(c, raw["health"], f"{path}.health", HEALTH_SERVICE_KEYS, HealthConfig())
    dns_refresh = _dns(c, raw["dns"], f"{path}.dns", DnsConfig(), top=False).refresh \
        if "dns" in raw else None                                              # [dns]
    access, pp_backends = _access(c, raw, path)                       # [access]
    backend_tls, tls_backends = _orig(c, raw, path)                             # [orig]
    backends_raw = raw.get("backends", [])
    if not isinstance(backends_raw, list):
        raise c.fail(f"{path}.backends", "expected an array of { address = \"host:port\", weight = N }"
                                         " or { srv = \"_service._tcp.name\" }")
    backends, seen = [], set()
    for j, b in enumerate(backends_raw):
        bp = f"{path}.backends[{j}]"
        c.table(b, bp, BACKEND_KEYS)
        addr, key = _backend_address(c, b, bp)                                 # [dns]
        if addr.text in seen:
            raise c.fail(f"{bp}.{key}", f"duplicate backend {addr.text}")
        seen.add(addr.text)
        bhealth = health
        if "health" in b:
            if health is None:
                raise c.fail(f"{bp}.health", "a backend can override checks only of a service "
                                             "with a health table")
            bhealth = _health(c, b["health"], f"{bp}.health", HEALTH_CHECK_KEYS, health)
        backends.append(Backend(addr, c.integer(b.get("weight", DEFAULTS["weight"]),
                                                f"{bp}.weight", 1, MAX_WEIGHT),
                                c.choice(b.get("state", "ready"), f"{bp}.state", STATES),
                                bhealth, srv=key == "srv", proxy_protocol=pp_backends[j],
                                tls=tls_backends[j] or None, plain=tls_backends[j] is False,  # [orig]
                                **_backend_limits(c, b, bp)))
    return Service(name=name, listen=listen, backends=tuple(backends), policy=policy,
                   hash_key=hash_key, hash_balance_factor=balance, max_fails=max_fails,
                   retries=retries, connect_timeout=connect, idle_timeout=idle, health=health,
                   dns_refresh=dns_refresh, access=access, **_limits(c, raw, path),
                   **_mem(c, raw, path), log=_connlog(c, raw, path),        # [obs]
                   registration=_registration(c, raw, path),                   # [leases]
                   discovery=c.choice(raw["discovery"], f"{path}.discovery", ("etcd",))
                   if "discovery" in raw else None,                              # [etcd]
                   tls=_tls(c, raw, path),                                      # [tls]
                   backend_tls=backend_tls,                                     # [orig]
                   **_sni(c, raw, path, listen),                                # [sni]
                   splice=_splice(c, raw, path),                                # [splice]
                   **_listen_opts(c, raw, path))                                # [listenopts]


# -- [leases] self-registration (fastlb/leases.py) ----------------------------------------------
@dataclass(frozen=True, slots=True)
class Registration:
    """``registration = { token_file = "...", max_ttl = "60s" }``: the service takes
    registrations (admin ops register/renew/deregister). token_file: a token valid for this
    service's registrations only (read with the admin token's rules, at start and reload; None:
    only the operator may register); max_ttl: the longest lease an instance may ask."""
    token_file: str | None = None
    max_ttl: float = 60.0


def _registration(c: _Checker, raw: dict, path: str) -> Registration | None:
    if "registration" not in raw:
        return None
    p = f"{path}.registration"
    t = c.table(raw["registration"], p, {"token_file", "max_ttl"})
    token_file = t.get("token_file")
    if token_file is not None and (not isinstance(token_file, str) or not token_file):
        raise c.fail(f"{p}.token_file", f"expected the path of a file holding the token, got "
                                        f"{_kind(token_file)}")
    # 1 s to 1 day: the sweep's granularity (leases.MIN_TTL) up to etcd's practical maximum
    max_ttl = c.duration(t.get("max_ttl", 60.0), f"{p}.max_ttl", lo=1.0, hi=86400.0)
    return Registration(token_file=token_file, max_ttl=max_ttl)


def _backend_address(c: _Checker, b: dict, bp: str) -> tuple[Address, str]:
    """[dns] A backend entry's ``address = "host:port"`` (an IP, or a host name kept as written:
    never resolved here) or ``srv = "_service._proto.name"`` (port 0). Returns it and its key."""
    if ("address" in b) == ("srv" in b):
        raise c.fail(f"{bp}.address", "give address = \"host:port\" or srv = \"_service._tcp.name\""
                                      + (", not both" if "address" in b else ""))
    if "address" in b:
        addr = c.address(b["address"], f"{bp}.address", resolve=False)
        if addr.port == 0:
            raise c.fail(f"{bp}.address", "a backend needs a port from 1 to 65535")
        return addr, "address"
    name = b["srv"]
    if not isinstance(name, str) or not _HOSTNAME.fullmatch(name) or _is_ip(name):
        raise c.fail(f"{bp}.srv", f"expected an SRV name like \"_app._tcp.example.internal\", "
                                  f"got {_kind(name)}")
    return Address(name, 0, name), "srv"


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# -- [limits] connection limits and queues (docs/config.md) -------------------------------------
MAX_CONN = 1 << 24          # 16 Mi connections: far above what any fd limit allows
MAX_QUEUE = 1 << 20


def _global_limits(c: _Checker, g: dict) -> dict[str, Any]:
    """[global] maxconn (0 or absent: derived from the fd limit, fastlb.preflight)."""
    if "maxconn" not in g:
        return {}
    return {"maxconn": c.integer(g["maxconn"], "global.maxconn", 1, MAX_CONN)}


def _backend_limits(c: _Checker, b: dict, path: str) -> dict[str, Any]:
    """backends[].max_conns."""
    if "max_conns" not in b:
        return {}
    return {"max_conns": c.integer(b["max_conns"], f"{path}.max_conns", 1, MAX_CONN)}


def _limits(c: _Checker, raw: dict, path: str) -> dict[str, Any]:
    """service.maxconn and service.queue = { size = N, timeout = "5s" }."""
    out: dict[str, Any] = {}
    if "maxconn" in raw:
        out["maxconn"] = c.integer(raw["maxconn"], f"{path}.maxconn", 1, MAX_CONN)
    if "queue" in raw:
        q = c.table(raw["queue"], f"{path}.queue", {"size", "timeout"}, {"size"})
        out["queue_size"] = c.integer(q["size"], f"{path}.queue.size", 0, MAX_QUEUE)
        if "timeout" in q:
            out["queue_timeout"] = c.duration(q["timeout"], f"{path}.queue.timeout")
    return out


def _maxconn_summary(cfg: Config) -> str:
    """[global] maxconn as `fastlb run` will use it (derived: from this machine's fd limit)."""
    if cfg.global_.maxconn:
        return str(cfg.global_.maxconn)
    from fastlb import preflight           # it imports this module
    return f"{preflight.maxconn(cfg)} (from the fd limit {preflight.fd_limit()})"


def _limits_summary(svc: Service) -> str:
    """The [limits] part of a service's line in ``fastlb check``'s summary."""
    out = f"; maxconn {svc.maxconn}" if svc.maxconn else ""
    if svc.queue_size:
        timeout = svc.queue_timeout if svc.queue_timeout is not None else svc.connect_timeout
        out += f"; queue {svc.queue_size} for {timeout:g}s"
    return out


def _limits_to_dict(svc: Service, d: dict[str, Any]) -> None:
    """The [limits] keys of ``svc`` that differ from their defaults, into its table ``d``."""
    if svc.maxconn:
        d["maxconn"] = svc.maxconn
    if svc.queue_size or svc.queue_timeout is not None:
        d["queue"] = {"size": svc.queue_size}
        if svc.queue_timeout is not None:
            d["queue"]["timeout"] = svc.queue_timeout
    for b, bd in zip(svc.backends, d["backends"], strict=True):
        if b.max_conns:
            bd["max_conns"] = b.max_conns


# -- [mem] memory, timeouts and keepalive (docs/config.md, "Memory, timeouts and keepalive") ------
MEM_TIMEOUTS = {"client_fin", "server_fin", "max_duration", "first_byte"}
TIMEOUT_KEYS |= MEM_TIMEOUTS
KEEPALIVE_KEYS = {"idle": 32767, "interval": 32767, "count": 127}      # Linux's maxima
MIN_BUFFERS_PER_WORKER = 4                  # the core's reserve (2) and two to work with
_SIZE = re.compile(r"^\s*(\d+)\s*(?:([kmg])(?:i?b)?|b)?\s*$", re.I)


def parse_size(value: Any) -> int:
    """A size: bytes as an integer, or "64m", "256MiB", "1g", "512k" (k/m/g: powers of 1024, as
    HAProxy and nginx read them). Raises ValueError."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = _SIZE.match(value) if isinstance(value, str) else None
    if not m:
        raise ValueError(f"expected a size like \"256MiB\", \"64m\", \"512k\" or bytes as an "
                         f"integer, got {_kind(value)}")
    return int(m.group(1)) << {None: 0, "k": 10, "m": 20, "g": 30}[(m.group(2) or "").lower() or None]


def _mem_global(c: _Checker, g: dict, workers: int) -> dict[str, Any]:
    """[global] buffer_budget: all connection buffers of the balancer together, split evenly
    between the workers (each worker's engine caps its own share: no lock between them)."""
    if "buffer_budget" not in g:
        return {}
    try:
        budget = parse_size(g["buffer_budget"])
    except ValueError as exc:
        raise c.fail("global.buffer_budget", str(exc)) from None
    least = MIN_BUFFERS_PER_WORKER * _core.BUFFER_SIZE * workers
    if budget < least:
        raise c.fail("global.buffer_budget",
                     f"{budget} bytes is less than {MIN_BUFFERS_PER_WORKER} buffers of "
                     f"{_core.BUFFER_SIZE // 1024} KiB per worker ({workers} worker(s)): expected "
                     f"at least {least} ({least >> 20} MiB)")
    return {"buffer_budget": budget}


def _mem(c: _Checker, raw: dict, path: str) -> dict[str, Any]:
    """The [mem] keys of a service: timeouts.client_fin/server_fin/max_duration/first_byte
    (durations, 0: off, the default: HAProxy and nginx set none of them by default) and
    tcp_keepalive = { idle, interval, count } (off without the table)."""
    out: dict[str, Any] = {}
    t = raw.get("timeouts", {})
    for k in sorted(MEM_TIMEOUTS & set(t)):
        out[k] = c.duration(t[k], f"{path}.timeouts.{k}", lo=0.0)
    if "tcp_keepalive" in raw:
        ka = c.table(raw["tcp_keepalive"], f"{path}.tcp_keepalive", set(KEEPALIVE_KEYS))
        vals = []
        for k, top in KEEPALIVE_KEYS.items():
            if k not in ka:
                vals.append(0)                  # the kernel's net.ipv4.tcp_keepalive_* value
            elif k == "count":
                vals.append(c.integer(ka[k], f"{path}.tcp_keepalive.count", 1, top))
            else:
                secs = c.duration(ka[k], f"{path}.tcp_keepalive.{k}", lo=1.0, hi=float(top))
                if secs != int(secs):
                    raise c.fail(f"{path}.tcp_keepalive.{k}", f"{ka[k]!r}: expected whole seconds "
                                                              f"(TCP counts keepalive in seconds)")
                vals.append(int(secs))
        out["tcp_keepalive"] = (vals[0], vals[1], vals[2])
    return out


def _mem_to_dict(svc: Service, d: dict[str, Any]) -> None:
    for k in sorted(MEM_TIMEOUTS):
        if getattr(svc, k):
            d["timeouts"][k] = getattr(svc, k)
    if svc.tcp_keepalive is not None:
        d["tcp_keepalive"] = {k: v for k, v in zip(KEEPALIVE_KEYS, svc.tcp_keepalive, strict=True) if v}


def _health_to_dict(h: HealthConfig, keys: set[str], base: HealthConfig | None = None) -> dict:
    """The keys of h that differ from base (all set keys when base is None)."""
    out = {}
    for k in sorted(keys):
        v = getattr(h, k)
        if base is not None and getattr(base, k) == v:
            continue
        if v is None:
            continue
        out[k] = v.decode("utf-8") if isinstance(v, bytes) else v
    return out


def service_to_dict(svc: Service) -> dict:
    """The ``[[service]]`` table of a Service (service_from_dict's inverse), msgpack-ready."""
    backends = []
    for b in svc.backends:
        bd: dict[str, Any] = {"srv" if b.srv else "address": b.address.text, "weight": b.weight,
                              "state": b.state}
        if b.health is not None and svc.health is not None and b.health != svc.health:
            bd["health"] = _health_to_dict(b.health, HEALTH_CHECK_KEYS, svc.health)
        backends.append(bd)
    d: dict[str, Any] = {"name": svc.name, "listen": [a.text for a in svc.listen],
                         "policy": svc.policy, "retries": svc.retries,
                         "timeouts": {"connect": svc.connect_timeout, "idle": svc.idle_timeout},
                         "backends": backends}
    _mem_to_dict(svc, d)                                                      # [mem]
    if svc.splice is not None:                                                # [splice]
        d["splice"] = svc.splice
    if svc.policy == "maglev":
        d["hash_key"] = svc.hash_key
        if svc.hash_balance_factor:
            d["hash_balance_factor"] = svc.hash_balance_factor
    if svc.policy == "round_robin" and svc.max_fails != DEFAULTS["max_fails"]:
        d["max_fails"] = svc.max_fails
    if svc.health is not None:
        d["health"] = _health_to_dict(svc.health, HEALTH_SERVICE_KEYS)
    if svc.dns_refresh is not None:
        d["dns"] = {"refresh": svc.dns_refresh}                                # [dns]
    _limits_to_dict(svc, d)                                                     # [limits]
    _access_to_dict(svc, d, backends)                                 # [access]
    if svc.discovery is not None:                                             # [etcd]
        d["discovery"] = svc.discovery
    if svc.log is not None:                                                   # [obs]
        d["log"] = {"connections": svc.log.connections, "format": svc.log.format,
                    "sample": svc.log.sample}
    if svc.registration is not None:                                          # [leases]
        d["registration"] = {"max_ttl": svc.registration.max_ttl,
                             **({"token_file": svc.registration.token_file}
                                if svc.registration.token_file else {})}
    _orig_to_dict(svc, d, backends)                                           # [orig]
    if svc.tls is not None:                                                   # [tls]
        d["tls"], d["timeouts"]["handshake"] = svc.tls.to_dict(), svc.tls.handshake
        if svc.tls.identities:
            d["authz"] = {"identities": list(svc.tls.identities)}
    if svc.sni:                                                               # [sni]
        d["sni"], d["timeouts"]["handshake"] = list(svc.sni), svc.sni_handshake
    _listen_opts_to_dict(svc, d)                                              # [listenopts]
    return d


def _policy_options(s: Service) -> str:
    if s.policy == "maglev":
        return f" ({s.hash_key}" + (f", hash_balance_factor {s.hash_balance_factor}"
                                    if s.hash_balance_factor else "") + ")"
    if s.policy == "round_robin" and s.max_fails != DEFAULTS["max_fails"]:
        return f" (max_fails {s.max_fails})"
    return ""


def summary(cfg: Config) -> str:
    """A human summary for ``fastlb check``."""
    out = [f"{cfg.source}: OK, {len(cfg.services)} service(s), workers={cfg.global_.workers}, "
           f"grace={cfg.global_.grace:g}s, maxconn={_maxconn_summary(cfg)}"]
    for s in cfg.services:
        out.append(f"  service {s.name}: listen {', '.join(a.text for a in s.listen)}; "
                   f"policy {s.policy}" + _policy_options(s)
                   + f"; retries {s.retries}; connect {s.connect_timeout:g}s; idle {s.idle_timeout:g}s"
                   + _limits_summary(s)                                         # [limits]
                   + _access_summary(s)                                         # [access]
                   + _listen_opts_summary(s))                                   # [listenopts]
        refresh = s.dns_refresh or cfg.global_.dns.refresh
        for b in s.backends:
            out.append(f"    backend {b.address.text} weight {b.weight}"
                       + (f" max_conns {b.max_conns}" if b.max_conns else "")   # [limits]
                       + (f" ({b.state})" if b.state != "ready" else "")
                       + (f" (SRV, resolved every {refresh:g}s)" if b.srv else              # [dns]
                          f" (host name, resolved every {refresh:g}s)" if not _is_ip(b.address.host)
                          else ""))
    return "\n".join(out)


# -- [etcd] [discovery.etcd] and service.discovery (fastlb.etcd) -----------------------------------
def _etcd_tls_files(c: _Checker, t: dict) -> None:
    """[etcd] The CA and the client certificate load (as fastlb.etcd.tls_context loads them):
    a wrong path or a key that does not match fails here, naming the key, not at the first
    request."""
    import ssl
    try:
        ctx = ssl.create_default_context(cafile=t["ca"]) if "ca" in t else None
    except (OSError, ssl.SSLError) as exc:
        raise c.fail("discovery.etcd.ca", f"cannot load {t['ca']}: {exc}") from None
    if "cert" in t:
        try:
            (ctx or ssl.create_default_context()).load_cert_chain(t["cert"], t["key"])
        except (OSError, ssl.SSLError) as exc:
            raise c.fail("discovery.etcd.cert", f"cannot load {t['cert']} with {t['key']}: "
                                                f"{exc}") from None


ETCD_KEYS = {"endpoints", "prefix", "ca", "cert", "key", "user", "password_file"}


def _etcd(c: _Checker, doc: dict, services_raw: list, services: list[Service]) -> EtcdConfig | None:
    """``[discovery.etcd] endpoints = [...], prefix = "/fastlb/"`` (TLS: ca, cert, key; auth:
    user, password_file). A ``discovery = "etcd"`` service needs it, and takes its backends
    from etcd only (a backends array there would be ambiguous: refused)."""
    disc = c.table(doc.get("discovery", {}), "discovery", {"etcd"})
    cfg = None
    if "etcd" in disc:
        t = c.table(disc["etcd"], "discovery.etcd", ETCD_KEYS, {"endpoints"})
        eps = t["endpoints"]
        if isinstance(eps, str):
            eps = [eps]
        if not isinstance(eps, list) or not eps:
            raise c.fail("discovery.etcd.endpoints", "expected a non-empty array of URLs like "
                                                     "\"http://127.0.0.1:2379\"")
        for i, e in enumerate(eps):
            if not isinstance(e, str) or not re.match(r"^https?://[^/\s]+/?$", e):
                raise c.fail(f"discovery.etcd.endpoints[{i}]",
                             f"expected a URL like \"http://127.0.0.1:2379\", got {_kind(e)}")
        prefix = t.get("prefix", "/fastlb/")
        if not isinstance(prefix, str) or not prefix.startswith("/") or not prefix.endswith("/"):
            raise c.fail("discovery.etcd.prefix", f"expected a key prefix like \"/fastlb/\" (starting "
                                                  f"and ending with /), got {prefix!r}")
        for k in ("ca", "cert", "key", "user", "password_file"):
            if k in t and (not isinstance(t[k], str) or not t[k]):
                raise c.fail(f"discovery.etcd.{k}", f"expected a non-empty string, got {_kind(t[k])}")
        if ("cert" in t) != ("key" in t):
            raise c.fail("discovery.etcd.cert" if "key" in t else "discovery.etcd.key",
                         "cert and key go together (a TLS client certificate and its key)")
        if ("user" in t) != ("password_file" in t):
            raise c.fail("discovery.etcd.user" if "password_file" in t else "discovery.etcd.password_file",
                         "user and password_file go together")
        if any(e.startswith("http://") for e in eps) and ("ca" in t or "cert" in t):
            raise c.fail("discovery.etcd.endpoints", "TLS settings (ca, cert) need https:// endpoints")
        _etcd_tls_files(c, t)
        cfg = EtcdConfig(tuple(e.rstrip("/") for e in eps), prefix, t.get("ca"), t.get("cert"),
                         t.get("key"), t.get("user"), t.get("password_file"))
    for i, (raw, svc) in enumerate(zip(services_raw, services, strict=True)):
        if svc.discovery != "etcd":
            continue
        if cfg is None:
            raise c.fail(f"service[{i}].discovery", "\"etcd\" needs a [discovery.etcd] table "
                                                    "(endpoints = [\"http://127.0.0.1:2379\"])")
        if raw.get("backends"):
            raise c.fail(f"service[{i}].backends", "a service with discovery = \"etcd\" takes its "
                                                   "backends from etcd; remove this array")
    return cfg


# -- [tls] TLS termination (docs/config.md, "TLS") ------------------------------------------------
TLS_KEYS = {"cert", "key", "certs", "min_version", "alpn", "client_ca", "verify_client"}
TLS_KEYS |= {"ticket_lifetime", "ticket_keys"}                                # [tlsops]
# [tlsops] tls.ticket_lifetime's default: HAProxy's tune.ssl.lifetime and nginx's
# ssl_session_timeout are both 5 minutes
TICKET_LIFETIME = 300.0


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """[tls] ``service.tls``: the certificates (paths as written, and their PEM contents as read
    when the configuration was loaded: a reload reads them again), min_version, alpn, and
    ``timeouts.handshake``."""
    certs: tuple[tuple[str, str], ...]                      # (cert, key); the first: the default
    pems: tuple[tuple[bytes, bytes], ...] = field(default=(), repr=False, compare=True)
    min_version: str = "1.2"
    alpn: tuple[str, ...] = ()
    handshake: float = 10.0
    # stage 2: mutual TLS (the CA file and its PEM) and service.authz.identities
    client_ca: str | None = None
    ca_pem: bytes = field(default=b"", repr=False)
    verify_client: str = "required"
    identities: tuple[str, ...] = ()
    ticket_lifetime: float = TICKET_LIFETIME    # [tlsops] sessions' lifetime, keys' rotation
    ticket_keys: bytes = field(default=b"", repr=False)   # [tlsops] the file's last 3 keys
    ticket_keys_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"certs": [{"cert": c, "key": k} for c, k in self.certs],
                             "min_version": self.min_version}
        if self.alpn:
            d["alpn"] = list(self.alpn)
        if self.client_ca:
            d["client_ca"], d["verify_client"] = self.client_ca, self.verify_client
        if self.ticket_lifetime != TICKET_LIFETIME:                             # [tlsops]
            d["ticket_lifetime"] = self.ticket_lifetime
        if self.ticket_keys_file:
            d["ticket_keys"] = self.ticket_keys_file
        return d


def _tls(c: _Checker, raw: dict, path: str) -> TlsConfig | None:
    """[tls] ``tls = { cert, key }`` or ``tls = { certs = [{ cert, key }, ...] }``, min_version
    ("1.2", the default, as HAProxy's ssl-min-ver default; or "1.3"), alpn, and
    timeouts.handshake (10s, as HAProxy's `timeout client` covers it by default). The files are
    read and built into a context now: a bad certificate or key is refused here, naming its key
    path, and a reload keeps the running configuration. Relative paths are relative to the
    configuration file's directory."""
    import os
    t = raw.get("timeouts", {})
    if "tls" not in raw:
        if isinstance(t, dict) and "handshake" in t and "sni" not in raw:     # [sni] uses it too
            raise c.fail(f"{path}.timeouts.handshake", "only meaningful with a tls table")
        if "authz" in raw:
            raise c.fail(f"{path}.authz", "needs tls with client_ca (identities of verified clients)")
        return None
    p = f"{path}.tls"
    tls = c.table(raw["tls"], p, TLS_KEYS)
    if ("certs" in tls) == ("cert" in tls or "key" in tls):
        raise c.fail(p, "expected either cert and key, or certs = [{ cert, key }, ...]")
    if "certs" in tls:
        if not isinstance(tls["certs"], list) or not tls["certs"]:
            raise c.fail(f"{p}.certs", "expected a non-empty array of { cert = \"...\", key = \"...\" }")
        entries = [(c.table(e, f"{p}.certs[{j}]", {"cert", "key"}, {"cert", "key"}), f"{p}.certs[{j}]")
                   for j, e in enumerate(tls["certs"])]
    else:
        entries = [(c.table(tls, p, TLS_KEYS, {"cert", "key"}), p)]
    base = os.path.dirname(os.path.abspath(c.source)) if os.path.isfile(c.source) else ""
    certs, pems = [], []
    for e, ep in entries:
        pair = []
        for k in ("cert", "key"):
            if not isinstance(e[k], str) or not e[k]:
                raise c.fail(f"{ep}.{k}", f"expected a file name, got {_kind(e[k])}")
            fname = os.path.join(base, e[k]) if base else e[k]
            try:
                with open(fname, "rb") as f:
                    pair.append(f.read())
            except OSError as exc:
                raise c.fail(f"{ep}.{k}", f"cannot read {fname}: {exc.strerror}") from None
        certs.append((e["cert"], e["key"]))
        pems.append((pair[0], pair[1]))
        try:
            _core.TlsContext([(pair[0], pair[1])])
        except (ValueError, TypeError) as exc:
            msg = str(exc).split(": ", 1)[-1]
            raise c.fail(f"{ep}.cert", f"{e['cert']} / {e['key']}: {msg}") from None
    minv = c.choice(tls.get("min_version", "1.2"), f"{p}.min_version", ("1.2", "1.3"))
    alpn = tls.get("alpn", [])
    if not isinstance(alpn, list) or not all(isinstance(a, str) and 1 <= len(a.encode()) <= 255
                                             for a in alpn):
        raise c.fail(f"{p}.alpn", "expected an array of protocol names like [\"h2\", \"http/1.1\"]")
    hs = c.duration(t["handshake"], f"{path}.timeouts.handshake", hi=3600.0) \
        if isinstance(t, dict) and "handshake" in t else 10.0
    mtls: dict[str, Any] = {}
    if "client_ca" in tls:
        ca = tls["client_ca"]
        if not isinstance(ca, str) or not ca:
            raise c.fail(f"{p}.client_ca", f"expected a file name, got {_kind(ca)}")
        fname = os.path.join(base, ca) if base else ca
        try:
            with open(fname, "rb") as f:
                mtls["ca_pem"] = f.read()
        except OSError as exc:
            raise c.fail(f"{p}.client_ca", f"cannot read {fname}: {exc.strerror}") from None
        mtls["client_ca"] = ca
        mtls["verify_client"] = c.choice(tls.get("verify_client", "required"),
                                         f"{p}.verify_client", ("required", "optional"))
        try:
            _core.TlsContext([pems[0]], client_ca=mtls["ca_pem"])
        except (ValueError, TypeError) as exc:
            raise c.fail(f"{p}.client_ca", f"{ca}: {exc}") from None
    elif "verify_client" in tls:
        raise c.fail(f"{p}.verify_client", "only meaningful with client_ca")
    if "authz" in raw:
        az = c.table(raw["authz"], f"{path}.authz", {"identities"}, {"identities"})
        ids = az["identities"]
        if not isinstance(ids, list) or not ids or not all(
                isinstance(i, str) and i and i not in ("dns:", "cn:") for i in ids):
            raise c.fail(f"{path}.authz.identities", "expected a non-empty array like "
                         "[\"spiffe://corp/ns/web/*\", \"dns:api.internal\", \"cn:frontend\"]")
        if "client_ca" not in tls:
            raise c.fail(f"{path}.authz", "needs tls.client_ca (identities of verified clients)")
        mtls["identities"] = tuple(ids)
    return TlsConfig(tuple(certs), tuple(pems), minv, tuple(alpn), hs, **mtls,
                     **_tls_ops(c, tls, p))                                     # [tlsops]


# -- [orig] TLS origination (docs/config.md, "TLS to backends") ----------------------------------
ORIG_KEYS = {"ca", "sni", "verify", "cert", "key"}
_LABEL = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,62}"
_SNI_RX = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?")


@dataclass(frozen=True, slots=True)
class OrigTls:
    """[orig] ``backends[].tls`` / ``service.backend_tls``: connect to the backend over TLS.
    Paths as written; their PEM contents as read at load (a reload reads them again)."""
    ca: str | None = None            # None: the system's CA store
    sni: str | None = None           # the name sent and verified (None: the backend's host)
    verify: bool = True
    cert: str | None = None          # a client certificate for mTLS (with key)
    key: str | None = None
    ca_pem: bytes = field(default=b"", repr=False)
    cert_pem: bytes = field(default=b"", repr=False)
    key_pem: bytes = field(default=b"", repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k in ("ca", "sni", "verify", "cert", "key")
                if (v := getattr(self, k)) is not None}

    def profile(self) -> tuple[bytes, bool, bytes, bytes]:
        """What the data path builds a client context from (plan.orig_profiles)."""
        return (self.ca_pem, self.verify, self.cert_pem, self.key_pem)


def _orig(c: _Checker, raw: dict, path: str) -> tuple[OrigTls | None, list[Any]]:
    """[orig] ``service.backend_tls`` (the default of every backend, those added at run time
    too) and each ``backends[j].tls``: a table merged key by key over the service's (HAProxy's
    `default-server` and `server` lines), or ``false`` (plain TCP). Files are read and built
    into a context now: a bad one is refused naming its key path. Returns the default and, per
    backend, its own OrigTls, False (plain) or None (the default)."""
    base = _orig_table(c, raw["backend_tls"], f"{path}.backend_tls") \
        if "backend_tls" in raw else None
    out: list[Any] = []
    for j, b in enumerate(raw.get("backends", []) if isinstance(raw.get("backends"), list) else []):
        if not isinstance(b, dict) or "tls" not in b:
            out.append(None)
        elif b["tls"] is False:
            out.append(False)
        else:
            out.append(_orig_table(c, b["tls"], f"{path}.backends[{j}].tls",
                                   base, f"{path}.backend_tls"))
    return base, out


def _orig_table(c: _Checker, t: Any, p: str, base: OrigTls | None = None,
                bp: str = "") -> OrigTls:
    import logging
    import os
    if t is True:
        t = {}
    t = c.table(t, p, ORIG_KEYS)
    merged: dict[str, Any] = dict(base.to_dict()) if base is not None else {}
    merged.update(t)

    def at(k: str) -> str:
        return f"{p}.{k}" if k in t or base is None else f"{bp}.{k}"
    if not isinstance(merged.get("verify", True), bool):
        raise c.fail(at("verify"), f"expected true or false, got {_kind(merged['verify'])}")
    verify = merged.get("verify", True)
    sni = merged.get("sni")
    if sni is not None and (not isinstance(sni, str) or not _SNI_RX.fullmatch(sni)):
        raise c.fail(at("sni"), f"{sni!r}: expected a host name like \"api.internal\"")
    if ("cert" in merged) != ("key" in merged):
        k = "key" if "cert" in merged else "cert"
        raise c.fail(f"{p}.{k}", "cert and key go together (the client certificate fastlb "
                                 "presents to the backend)")
    src = os.path.dirname(os.path.abspath(c.source)) if os.path.isfile(c.source) else ""
    pems: dict[str, bytes] = {}
    for k in ("ca", "cert", "key"):
        if k not in merged:
            continue
        v = merged[k]
        if not isinstance(v, str) or not v:
            raise c.fail(at(k), f"expected a file name, got {_kind(v)}")
        fname = os.path.join(src, v) if src else v
        try:
            with open(fname, "rb") as f:
                pems[k] = f.read()
        except OSError as exc:
            raise c.fail(at(k), f"cannot read {fname}: {exc.strerror}") from None
    o = OrigTls(ca=merged.get("ca"), sni=sni, verify=verify, cert=merged.get("cert"),
                key=merged.get("key"), ca_pem=pems.get("ca", b""), cert_pem=pems.get("cert", b""),
                key_pem=pems.get("key", b""))
    try:
        _core.OrigContext([o.profile()])
    except (ValueError, TypeError) as exc:
        k, _, msg = str(exc).partition(": ")
        key = k if k in ("ca", "cert", "key") else "ca"
        raise c.fail(at(key), f"{merged.get(key)}: {msg or exc}") from None
    if not verify:
        logging.getLogger("fastlb.config").warning(
            "%s.verify = false: the backend's certificate is not checked (anyone on the path "
            "can impersonate it)", p if "verify" in t or base is None else bp)
    return o


def _orig_to_dict(svc: Service, d: dict[str, Any], backends: list[dict[str, Any]]) -> None:
    """[orig] service_to_dict's part: backend_tls, and each backend's own tls (or false)."""
    if svc.backend_tls is not None:
        d["backend_tls"] = svc.backend_tls.to_dict()
    for b, bd in zip(svc.backends, backends, strict=True):
        if b.plain:
            bd["tls"] = False
        elif b.tls is not None and b.tls != svc.backend_tls:
            bd["tls"] = b.tls.to_dict()


def orig_of(svc: Service, b: Backend) -> OrigTls | None:
    """[orig] The TLS a backend of ``svc`` is reached with (None: plain TCP)."""
    return None if b.plain else (b.tls or svc.backend_tls)


def _tls_ops(c: _Checker, tls: dict, p: str) -> dict[str, Any]:
    """[tlsops] tls.ticket_lifetime: how long a session (a ticket) may be resumed, and the
    period at which the shared ticket keys rotate (fastlb.tickets; a key decrypts for two
    periods). From 1 s to 7 days (TLS 1.3's ticket_lifetime limit, RFC 8446 4.6.1)."""
    import base64
    import binascii
    import os
    out: dict[str, Any] = {}
    if "ticket_lifetime" in tls:
        out["ticket_lifetime"] = c.duration(tls["ticket_lifetime"], f"{p}.ticket_lifetime",
                                            lo=1.0, hi=7 * 86400.0)
    if "ticket_keys" in tls:      # HAProxy's tls-ticket-keys file (its 80-byte, AES-256 keys)
        path = tls["ticket_keys"]
        if not isinstance(path, str) or not path:
            raise c.fail(f"{p}.ticket_keys", f"expected a file name, got {_kind(path)}")
        base = os.path.dirname(os.path.abspath(c.source)) if os.path.isfile(c.source) else ""
        fname = os.path.join(base, path) if base else path
        try:
            with open(fname) as f:
                lines = [ln.strip() for ln in f if ln.strip()]
            keys = [base64.b64decode(ln, validate=True) for ln in lines]
        except OSError as exc:
            raise c.fail(f"{p}.ticket_keys", f"cannot read {fname}: {exc.strerror}") from None
        except (binascii.Error, ValueError):
            keys = []
        if len(keys) < 3 or any(len(k) != 80 for k in keys):
            raise c.fail(f"{p}.ticket_keys", f"{fname}: expected at least 3 lines, each 80 "
                                             f"random bytes in base64 (openssl rand 80 | "
                                             f"openssl base64 -A); the last three are used, the "
                                             f"last but one encrypts")
        out["ticket_keys"], out["ticket_keys_file"] = b"".join(keys[-3:]), path
    return out


# -- [sni] SNI routing without termination on a shared listen address (core/sni.pxi) -------------
SNI_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")   # RFC 1123 (and "_", as seen)


def _sni(c: _Checker, raw: dict, path: str, listen: tuple[Address, ...]) -> dict[str, Any]:
    """``sni = ["a.example.com", "*.b.example.com"]``: the names this service takes on a listen
    address it shares with others (exact, or "*." and one label; case-insensitive: kept
    lowercase), and ``timeouts.handshake`` (10s, as for TLS termination) for the whole
    ClientHello. Refused with ``tls``: sni routes without terminating (certificates chosen by
    SNI are tls.certs)."""
    if "sni" not in raw:
        return {}
    p = f"{path}.sni"
    value = raw["sni"]
    if not isinstance(value, list) or not value:
        raise c.fail(p, "expected a non-empty array of host names, e.g. [\"a.example.com\", "
                        "\"*.b.example.com\"]")
    if "tls" in raw:
        raise c.fail(p, "sni routes the client's TLS to a backend untouched; it cannot be combined "
                        "with tls termination (for certificates chosen by SNI use tls.certs)")
    for j, a in enumerate(listen):
        if a.port == 0:
            raise c.fail(f"{path}.listen[{j}]", f"{a.text}: sni needs a fixed port to share (port 0 "
                                                f"gives each service a port of its own)")
    names: list[str] = []
    for j, name in enumerate(value):
        if not isinstance(name, str):
            raise c.fail(f"{p}[{j}]", f"expected a host name string, got {_kind(name)}")
        low = name.lower()
        labels = (low[2:] if low.startswith("*.") else low).split(".")
        if (len(low) > 253 or not all(SNI_LABEL.fullmatch(x) for x in labels)
                or (low.startswith("*.") and len(labels) < 2)):
            raise c.fail(f"{p}[{j}]", f"{name!r}: expected a host name (letters, digits, - and "
                                      f"_ in dot-separated labels, at most 253 characters), "
                                      f"optionally starting with \"*.\" and at least two labels "
                                      f"after it")
        if low in names:
            raise c.fail(f"{p}[{j}]", f"{name!r} is listed twice")
        names.append(low)
    t = raw.get("timeouts", {})
    hs = c.duration(t["handshake"], f"{path}.timeouts.handshake", hi=3600.0) \
        if isinstance(t, dict) and "handshake" in t else 10.0
    return {"sni": tuple(names), "sni_handshake": hs}


def sni_shares(services: Iterable[Service], a: Address) -> bool:
    """[sni] ``a`` is an address that services share by SNI: one of its services has ``sni``."""
    return any(s.sni and any((b.host, b.port) == (a.host, a.port) for b in s.listen)
               for s in services)


def sni_clash(services: Iterable[Service], svc: Service) -> tuple[str, str] | None:
    """[sni] Why ``svc`` may not join the listen addresses it shares with ``services``: (its
    key path, the message), or None. On a shared address every service but one (the default)
    has ``sni``, no name is routed twice, and none terminates TLS or waits for a PROXY header
    (both would need the bytes before the ClientHello, or the ClientHello itself). Two
    services without ``sni`` on one address is the plain "already a listener" case, left to
    the callers."""
    services = [s for s in services if s.name != svc.name]
    for j, a in enumerate(svc.listen):
        if a.port == 0:
            continue
        others = [s for s in services if any((b.host, b.port) == (a.host, a.port) for b in s.listen)]
        if not others or not (svc.sni or any(s.sni for s in others)):
            continue
        for s in [svc, *others]:
            if s.tls is not None:
                return (f"listen[{j}]", f"{a.text} is shared by SNI routing (services "
                        f"{', '.join(repr(x.name) for x in [svc, *others])}), which passes TLS "
                        f"through untouched; service {s.name!r} terminates TLS (tls): give it an "
                        f"address of its own")
            if s.access.pp_accept_from:
                return (f"listen[{j}]", f"{a.text} is shared by SNI routing; service {s.name!r} "
                        f"accepts a PROXY header (proxy_protocol.accept_from), which would come "
                        f"before the ClientHello: give it an address of its own")
        if not svc.sni:
            dflt = [s.name for s in others if not s.sni]
            if dflt:
                return (f"listen[{j}]", f"{a.text}: service {dflt[0]!r} is already its default "
                        f"(the service without sni); give one of them sni = [...] names")
            continue
        for k, name in enumerate(svc.sni):
            for s in others:
                if name in s.sni:
                    return (f"sni[{k}]", f"{name!r} is already routed to service {s.name!r} on "
                                         f"{a.text}")
    return None


# -- [splice] zero-copy bulk (docs/config.md, "Zero-copy bulk (splice)") --------------------------
SPLICE_MODES = tuple(_core.SPLICE_MODES)          # ("auto", "off", "on")


def _splice(c: _Checker, raw: dict, path: str) -> str | None:
    """``splice = "auto" | "on" | "off"`` of a service or of [global] (None: not set; a service
    then takes [global]'s, whose default is "auto", HAProxy's splice-auto)."""
    if "splice" not in raw:
        return None
    return c.choice(raw["splice"], f"{path}.splice", SPLICE_MODES)


# -- [listenopts] listener options: TCP_DEFER_ACCEPT and TCP_FASTOPEN (docs/config.md, "Listener
# options"); pure validation here, the setsockopt in fastlb.listeners ------------------------------
# defer_accept = true is 1 second, as HAProxy's `bind ... defer-accept` and nginx's `listen ...
# deferred` both set it: nginx's comment says why (ngx_configure_listening_sockets): there is no way
# to know how long a connection waited in the queue, and one may bypass it (SYN cookies), so a
# longer wait buys nothing certain. The kernel turns seconds into SYN-ACK retransmissions (1 s:
# one), after which a silent client's connection is accepted anyway. An hour is far past any client
# that will still speak; beyond it the kernel's half-open request sockets would only pile up.
DEFER_ACCEPT_TRUE = 1
MAX_DEFER_ACCEPT = 3600
# The TFO queue (pending Fast Open requests not yet accepted) is capped by the kernel at
# net.core.somaxconn; nginx's fastopen=N has no upper bound of its own, HAProxy's `tfo` uses the
# listener's backlog (fastlb's: fastlb.listeners.LISTEN_BACKLOG, 4096). 1 Mi is only a sanity bound.
MAX_FASTOPEN = 1 << 20


def _toml_text(value: Any) -> str:
    """A value as written in TOML (for "got ..." in messages)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (int, float)):
        return repr(value)
    return _kind(value)


def defer_accept_seconds(value: Any) -> int:
    """``defer_accept``: false (0, off), true (DEFER_ACCEPT_TRUE s) or whole seconds from 1 to
    MAX_DEFER_ACCEPT. Raises ValueError with the message (without the key path)."""
    if isinstance(value, bool):
        return DEFER_ACCEPT_TRUE if value else 0
    if isinstance(value, int) and 1 <= value <= MAX_DEFER_ACCEPT:
        return value
    if isinstance(value, int):
        raise ValueError(f"{value} is out of range; expected a boolean or whole seconds from 1 "
                         f"to {MAX_DEFER_ACCEPT} (false: off)")
    whole = " whole" if isinstance(value, float) else ""
    raise ValueError(f"expected a boolean or{whole} seconds > 0, got {_toml_text(value)}")


def fastopen_queue(value: Any) -> int:
    """``fastopen``: 0 (off) or the TFO queue length, 1 to MAX_FASTOPEN (nginx's fastopen=N).
    Raises ValueError with the message (without the key path)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_FASTOPEN:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(f"{value} is out of range; expected 0 (off) or a queue length from 1 "
                         f"to {MAX_FASTOPEN}")
    raise ValueError(f"expected 0 (off) or a queue length from 1 to {MAX_FASTOPEN} (as nginx's "
                     f"fastopen=N; 256 is usual), got {_toml_text(value)}")


def _listen_opts(c: _Checker, raw: dict, path: str) -> dict[str, Any]:
    """``defer_accept`` and ``fastopen`` of a [[service]] (or an add_service)."""
    out: dict[str, Any] = {}
    for key, parse in (("defer_accept", defer_accept_seconds), ("fastopen", fastopen_queue)):
        if key in raw:
            try:
                out[key] = parse(raw[key])
            except ValueError as exc:
                raise c.fail(f"{path}.{key}", str(exc)) from None
    return out


def _listen_opts_words(svc: Service, key: str) -> str:
    if key == "defer_accept":
        return f"{svc.defer_accept}s" if svc.defer_accept else "off"
    return str(svc.fastopen) if svc.fastopen else "off"


def listen_opts_clash(services: Iterable[Service], svc: Service) -> tuple[str, str] | None:
    """Why ``svc`` may not join the listen addresses it shares with ``services`` (SNI routing:
    one listening socket for the group): (its key path, the message), or None. The options are
    the socket's, so every service on it must ask for the same."""
    services = [s for s in services if s.name != svc.name]
    for a in svc.listen:
        if a.port == 0:
            continue
        for s in services:
            if not any((b.host, b.port) == (a.host, a.port) for b in s.listen):
                continue
            for key in ("defer_accept", "fastopen"):
                if getattr(s, key) != getattr(svc, key):
                    return (key, f"{a.text} is one listening socket shared with service "
                                 f"{s.name!r} (SNI routing), whose {key} is "
                                 f"{_listen_opts_words(s, key)} and this one's "
                                 f"{_listen_opts_words(svc, key)}: the services of one address "
                                 f"must set the same {key} (an option of the socket)")
    return None


def listen_opts_problem(services: Iterable[Service]) -> str | None:
    """The first service of ``services`` that disagrees with an earlier one on a shared
    address (listen_opts_clash), as "service NAME: KEY: message"; None when they agree."""
    seen: list[Service] = []
    for svc in services:
        clash = listen_opts_clash(seen, svc)
        if clash is not None:
            return f"service {svc.name!r}: {clash[0]}: {clash[1]}"
        seen.append(svc)
    return None


def _listen_opts_to_dict(svc: Service, d: dict[str, Any]) -> None:
    """service_to_dict's part (only what is set)."""
    if svc.defer_accept:
        d["defer_accept"] = svc.defer_accept
    if svc.fastopen:
        d["fastopen"] = svc.fastopen


def _listen_opts_summary(svc: Service) -> str:
    return ((f"; defer_accept {svc.defer_accept}s" if svc.defer_accept else "")
            + (f"; fastopen {svc.fastopen}" if svc.fastopen else ""))
