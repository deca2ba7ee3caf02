"""Configuration: TOML text -> validated, frozen objects.

Owner: the meaning of every config key, its default and its validation. Nothing else reads TOML.
Rules: unknown keys are errors (a typo must not be ignored); every error is one ConfigError that
names the key path (``service[1].backends[0].weight``), the line when it can be found, what was
wrong and what is expected. Host names are resolved here, once, so the data path only sees IPs.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
import tomllib
from dataclasses import dataclass, field
from typing import AbstractSet, Any, TypedDict

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

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True)
class Address:
    host: str            # an IP literal after resolution
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
    log: ConnLogConfig | None = None     # [obs] the connection log (None: off)


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
    connlog: str = "stderr"                # [obs] the connection log's destination (_connlog)


@dataclass(frozen=True, slots=True)
class Config:
    global_: GlobalConfig
    services: tuple[Service, ...]
    source: str = "config"
    max_backends: int = field(default=1024)
    # The text it was read from, for messages about its keys (fastlb.preflight): a config file
    # is read once (it may be a pipe), never again to find a line.
    text: str = field(default="", repr=False, compare=False)


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
                # the idx-th "address" after the backends key (one backend per inline table)
                hits = [i for i in range(line, end) if "address" in self.lines[i]]
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
        if not resolve:
            return Address(host, port, text)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ValueError(f"cannot resolve host {host!r}: {exc.strerror}") from None
        host = str(infos[0][4][0])    # an IPv4 or IPv6 sockaddr: its host is a str
    return Address(host, port, text)


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


def from_dict(doc: dict, *, source: str = "config", text: str = "", resolve: bool = True) -> Config:
    c = _Checker(text, source)
    c.table(doc, "", {"global", "service"})
    g = c.table(doc.get("global", {}), "global",
                {"workers", "grace", "admin", "admin_token_file", "state_file", "metrics",
                 "log_format", "log_level", "connlog"})                       # [obs] logs
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
            if "admin_token_file" not in g:
                raise c.fail("global.admin", "a tcp admin socket needs admin_token_file "
                                             "(a file holding the token clients must send)")
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
                        connlog=_connlog_destination(c, g.get("connlog", "stderr")))            # [obs]
    services_raw = doc.get("service", [])
    if not isinstance(services_raw, list):
        raise c.fail("service", "expected an array of tables ([[service]])")
    services, names = [], set()
    listens: dict[tuple[str, int], str] = {}     # (host, port): the service listening there
    for i, raw in enumerate(services_raw):
        svc = service_from_dict(raw, f"service[{i}]", c, resolve=resolve)
        if svc.name in names:
            raise c.fail(f"service[{i}].name", f"duplicate service name {svc.name!r}")
        names.add(svc.name)
        for j, a in enumerate(svc.listen):
            if (a.host, a.port) in listens and a.port != 0:
                raise c.fail(f"service[{i}].listen[{j}]",
                             f"{a.text} is already a listener of service {listens[(a.host, a.port)]!r}")
            listens[(a.host, a.port)] = svc.name
        services.append(svc)
    if not services:
        raise c.fail("service", "no [[service]] defined; fastlb needs at least one")
    return Config(global_=glob, services=tuple(services), source=source, text=text)


SERVICE_KEYS = {"name", "listen", "policy", "hash_key", "hash_balance_factor", "max_fails", "retries",
                "timeouts", "backends", "health"}
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
    """One ``[[service]]`` table -> Service (also used for services added at run time)."""
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
    t = c.table(raw.get("timeouts", {}), f"{path}.timeouts", {"connect", "idle"})
    connect = c.duration(t.get("connect", DEFAULTS["connect"]), f"{path}.timeouts.connect")
    idle = c.duration(t.get("idle", DEFAULTS["idle"]), f"{path}.timeouts.idle")
    health = None
    if "health" in raw:
        health = _health(c, raw["health"], f"{path}.health", HEALTH_SERVICE_KEYS, HealthConfig())
    backends_raw = raw.get("backends", [])
    if not isinstance(backends_raw, list):
        raise c.fail(f"{path}.backends", "expected an array of { address = \"host:port\", weight = N }")
    backends, seen = [], set()
    for j, b in enumerate(backends_raw):
        bp = f"{path}.backends[{j}]"
        c.table(b, bp, {"address", "weight", "state", "health"}, {"address"})
        addr = c.address(b["address"], f"{bp}.address", resolve=resolve)
        if addr.port == 0:
            raise c.fail(f"{bp}.address", "a backend needs a port from 1 to 65535")
        if addr.text in seen:
            raise c.fail(f"{bp}.address", f"duplicate backend {addr.text}")
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
                                bhealth))
    return Service(name=name, listen=listen, backends=tuple(backends), policy=policy,
                   hash_key=hash_key, hash_balance_factor=balance, max_fails=max_fails,
                   retries=retries, connect_timeout=connect, idle_timeout=idle, health=health,
                   log=_connlog(c, raw, path))                                # [obs]


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
        bd: dict[str, Any] = {"address": b.address.text, "weight": b.weight, "state": b.state}
        if b.health is not None and svc.health is not None and b.health != svc.health:
            bd["health"] = _health_to_dict(b.health, HEALTH_CHECK_KEYS, svc.health)
        backends.append(bd)
    d: dict[str, Any] = {"name": svc.name, "listen": [a.text for a in svc.listen],
                         "policy": svc.policy, "retries": svc.retries,
                         "timeouts": {"connect": svc.connect_timeout, "idle": svc.idle_timeout},
                         "backends": backends}
    if svc.policy == "maglev":
        d["hash_key"] = svc.hash_key
        if svc.hash_balance_factor:
            d["hash_balance_factor"] = svc.hash_balance_factor
    if svc.policy == "round_robin" and svc.max_fails != DEFAULTS["max_fails"]:
        d["max_fails"] = svc.max_fails
    if svc.health is not None:
        d["health"] = _health_to_dict(svc.health, HEALTH_SERVICE_KEYS)
    if svc.log is not None:                                                   # [obs]
        d["log"] = {"connections": svc.log.connections, "format": svc.log.format,
                    "sample": svc.log.sample}
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
           f"grace={cfg.global_.grace:g}s"]
    for s in cfg.services:
        out.append(f"  service {s.name}: listen {', '.join(a.text for a in s.listen)}; "
                   f"policy {s.policy}" + _policy_options(s)
                   + f"; retries {s.retries}; connect {s.connect_timeout:g}s; idle {s.idle_timeout:g}s")
        for b in s.backends:
            out.append(f"    backend {b.address.text} weight {b.weight}"
                       + (f" ({b.state})" if b.state != "ready" else ""))
    return "\n".join(out)
