"""etcd for fleets of balancers: a service's backends are the keys of an etcd prefix.

Owner: what an etcd-managed service's backends are (``service.discovery = "etcd"``), how they
are followed, and how an admin change to one reaches every balancer of the fleet. The layout:
``<prefix>services/<service>/<host:port>`` -> a JSON object ``{"weight": 3, "state": "ready"}``
(every field optional; weight 1 and state "ready" by default; other fields are kept as they
are). Instances put their key with an etcd lease (``fastlb register --etcd``), so it vanishes
when they stop renewing it.

The client is etcd's v3 JSON gateway (HTTP/1.1, base64 keys and values) through httpx, in the
supervisor only: the data path never sees it (docs/ARCHITECTURE.md, "etcd" says why not gRPC).
Pure parts (tests/unit/test_etcd_members.py): ``parse_key``, ``parse_value``, ``backends_of``,
``diff``. The I/O: ``Client`` (range, txn, put, delete, leases, watch) and ``Watcher``: list,
then watch from the next revision; after a compaction, list again; after a disconnect, resume
from the last revision with backoff (0.1 s doubling to 5 s), trying each endpoint in turn. While
etcd is unreachable the balancer keeps the last members (its registry, also in the state file),
and says so: the log (once, then on change), ``ctl stats`` and ``fastlb_discovery_etcd_up``.
HAProxy's and nginx's service discovery keep the last known servers the same way.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import signal
import ssl
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping

from fastlb.config import MAX_WEIGHT, STATES, Backend, EtcdConfig, Service, parse_address
from fastlb.errors import RegistryError

log = logging.getLogger("fastlb.etcd")

BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0
REQUEST_TIMEOUT = 5.0
# While a watch is open, a cheap request (maintenance status) every PROBE_INTERVAL, answered
# within REQUEST_TIMEOUT, vouches that etcd is alive. The watch stream alone cannot: etcd's
# progress notices come every 10 minutes by default, and an etcd that hangs (stopped, a dead
# disk, a partition that drops packets) keeps the TCP connection open and silent. etcd's own Go
# client does the same with HTTP/2 keepalive pings (DialKeepAliveTime / DialKeepAliveTimeout).
PROBE_INTERVAL = 5.0


# -- pure parts --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Entry:
    """One member key's value, parsed."""
    weight: int = 1
    state: str = "ready"
    raw: tuple[tuple[str, Any], ...] = ()      # the JSON object as read (written back, updated)
    mod_revision: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.raw)


def services_prefix(prefix: str) -> str:
    return f"{prefix}services/"


def member_key(prefix: str, service: str, address: str) -> str:
    return f"{services_prefix(prefix)}{service}/{address}"


def parse_key(prefix: str, key: str) -> tuple[str, str] | None:
    """``<prefix>services/<service>/<host:port>`` -> (service, address text); None for any
    other key (a deeper path, no port, an empty part)."""
    head = services_prefix(prefix)
    if not key.startswith(head):
        return None
    parts = key[len(head):].split("/")
    if len(parts) != 2 or not all(parts):
        return None
    try:
        addr = parse_address(parts[1], resolve=False)
    except ValueError:
        return None
    if addr.port == 0:
        return None
    return parts[0], parts[1]


def parse_value(text: bytes | str, mod_revision: int = 0) -> Entry:
    """A member key's value -> Entry. Raises ValueError naming what is wrong."""
    try:
        doc = json.loads(text or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"expected a JSON object like {{\"weight\": 3, \"state\": \"ready\"}}, "
                         f"got {type(doc).__name__}")
    weight = doc.get("weight", 1)
    if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight: expected an integer from 1 to {MAX_WEIGHT}, got {weight!r}")
    state = doc.get("state", "ready")
    if state not in STATES:
        raise ValueError(f"state: expected one of {', '.join(STATES)}, got {state!r}")
    return Entry(weight, state, tuple(doc.items()), mod_revision)


def backends_of(svc: Service, entries: Mapping[str, Entry]) -> tuple[Backend, ...]:
    """The backends of an etcd-managed service given its members (address -> Entry), sorted by
    address text, so every balancer of the fleet builds the same list."""
    return tuple(Backend(parse_address(a, resolve=False), e.weight, e.state, svc.health)
                 for a, e in sorted(entries.items()))


def diff(old: Mapping[str, Entry], new: Mapping[str, Entry]) -> tuple[list[str], list[str], list[str]]:
    """(added, removed, changed) addresses between two member maps (weight or state)."""
    added = sorted(new.keys() - old.keys())
    removed = sorted(old.keys() - new.keys())
    changed = sorted(a for a in new.keys() & old.keys()
                     if (new[a].weight, new[a].state) != (old[a].weight, old[a].state))
    return added, removed, changed


def _b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text or "")


def range_end(prefix: str) -> str:
    """etcd's range end of a prefix: the prefix with its last byte plus one."""
    b = bytearray(prefix.encode())
    b[-1] += 1
    return _b64(bytes(b))


# -- the client ---------------------------------------------------------------------------------
class Unreachable(Exception):
    """No endpoint answered (or one answered with an error)."""


class Compacted(Exception):
    """The watch's start revision was compacted: list again."""


def tls_context(cfg: EtcdConfig) -> ssl.SSLContext:
    """The client side of TLS to etcd: its CA (else the system's) and our certificate. Built
    here, not from httpx's ``verify=path, cert=(crt, key)``: httpx 0.28 took those and sent no
    client certificate, so an etcd with --client-cert-auth closed every request."""
    ctx = ssl.create_default_context(cafile=cfg.ca) if cfg.ca else ssl.create_default_context()
    if cfg.cert and cfg.key:
        ctx.load_cert_chain(cfg.cert, cfg.key)
    return ctx


class Client:
    """etcd's v3 JSON gateway over HTTP(S), one endpoint at a time (the next on failure)."""

    def __init__(self, cfg: EtcdConfig) -> None:
        import httpx
        self.cfg = cfg
        self.endpoints = list(cfg.endpoints)
        self.current = 0
        self.http = httpx.AsyncClient(verify=tls_context(cfg), timeout=httpx.Timeout(REQUEST_TIMEOUT))
        self.token: str | None = None

    @property
    def endpoint(self) -> str:
        return self.endpoints[self.current % len(self.endpoints)]

    def _next(self) -> None:
        self.current = (self.current + 1) % len(self.endpoints)

    async def close(self) -> None:
        await self.http.aclose()

    async def _auth(self) -> None:
        if self.cfg.user is None or self.token is not None:
            return
        with open(self.cfg.password_file or "", encoding="utf-8") as f:
            password = f.read().strip()
        got = await self._post("/v3/auth/authenticate", {"name": self.cfg.user, "password": password},
                               auth=False)
        self.token = got.get("token")

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self.token} if self.token else {}

    async def _post(self, path: str, body: dict[str, Any], *, auth: bool = True) -> dict[str, Any]:
        import httpx
        last: Exception | None = None
        for _ in range(len(self.endpoints)):
            try:
                if auth:
                    await self._auth()
                r = await self.http.post(self.endpoint + path, json=body, headers=self._headers())
            except (httpx.HTTPError, OSError) as exc:
                last = exc
                self._next()
                continue
            if r.status_code == 401 and auth and self.cfg.user:
                self.token = None                      # expired: authenticate again next time
            if r.status_code != 200:
                raise Unreachable(f"{self.endpoint}{path}: HTTP {r.status_code}: {r.text[:200]}")
            doc: dict[str, Any] = r.json()
            return doc
        raise Unreachable(f"{', '.join(self.endpoints)}: {type(last).__name__}: {last}")

    async def range(self, prefix: str) -> tuple[int, list[dict[str, Any]]]:
        """(revision, kvs) of every key under ``prefix``."""
        got = await self._post("/v3/kv/range", {"key": _b64(prefix), "range_end": range_end(prefix)})
        return int(got["header"]["revision"]), list(got.get("kvs", []))

    async def get(self, key: str) -> dict[str, Any] | None:
        got = await self._post("/v3/kv/range", {"key": _b64(key)})
        kvs = got.get("kvs", [])
        return kvs[0] if kvs else None

    async def put(self, key: str, value: str, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        got = await self._post("/v3/kv/put", body)
        return int(got["header"]["revision"])

    async def delete(self, key: str) -> None:
        await self._post("/v3/kv/deleterange", {"key": _b64(key)})

    async def cas(self, key: str, value: str, mod_revision: int, lease: int = 0) -> tuple[bool, int]:
        """Put ``value`` if the key's mod revision is still ``mod_revision`` (keeping its lease).
        Returns (succeeded, revision)."""
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = str(lease)
        got = await self._post("/v3/kv/txn", {
            "compare": [{"key": _b64(key), "target": "MOD", "result": "EQUAL",
                         "mod_revision": str(mod_revision)}],
            "success": [{"request_put": put}]})
        return bool(got.get("succeeded")), int(got["header"]["revision"])

    async def grant(self, ttl: int) -> int:
        got = await self._post("/v3/lease/grant", {"TTL": str(ttl)})
        return int(got["ID"])

    async def keepalive(self, lease: int) -> int:
        """Renew a lease; its TTL left (0 or less: it had expired)."""
        got = await self._post("/v3/lease/keepalive", {"ID": str(lease)})
        return int(got.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        await self._post("/v3/lease/revoke", {"ID": str(lease)})

    async def probe(self) -> None:
        """Raises Unreachable unless the current endpoint answers a status request within
        REQUEST_TIMEOUT (no failover here: the watch on this endpoint is what is in doubt)."""
        import httpx
        try:
            await self._auth()
            r = await self.http.post(self.endpoint + "/v3/maintenance/status", json={},
                                     headers=self._headers())
        except (httpx.HTTPError, OSError) as exc:
            self._next()
            raise Unreachable(f"{self.endpoint}: no answer to a status probe within "
                              f"{REQUEST_TIMEOUT:g} s ({type(exc).__name__})") from None
        if r.status_code != 200:
            self._next()
            raise Unreachable(f"{self.endpoint}/v3/maintenance/status: HTTP {r.status_code}")

    async def compact(self, revision: int) -> None:
        await self._post("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    async def watch(self, prefix: str, start: int) -> AsyncIterator[tuple[int, list[dict[str, Any]]]]:
        """(revision, events) from ``start`` on, as etcd sends them. Raises Compacted, or
        Unreachable when the stream breaks."""
        import httpx
        await self._auth()
        body = {"create_request": {"key": _b64(prefix), "range_end": range_end(prefix),
                                   "start_revision": str(start), "progress_notify": True}}
        try:
            async with self.http.stream("POST", self.endpoint + "/v3/watch", json=body,
                                        headers=self._headers(),
                                        timeout=httpx.Timeout(REQUEST_TIMEOUT, read=None)) as r:
                if r.status_code != 200:
                    raise Unreachable(f"{self.endpoint}/v3/watch: HTTP {r.status_code}")
                async for line in r.aiter_lines():
                    if not line.strip():
                        continue
                    msg = json.loads(line)
                    if "error" in msg:
                        raise Unreachable(f"watch: {msg['error']}")
                    res = msg.get("result", {})
                    if int(res.get("compact_revision", 0) or 0) > 0:
                        raise Compacted(f"revision {start} was compacted "
                                        f"(compact revision {res['compact_revision']})")
                    if res.get("canceled"):
                        raise Unreachable(f"watch canceled: {res.get('cancel_reason', '')}")
                    events = list(res.get("events", []))
                    # The header's revision is etcd's now, maybe ahead of the events still to
                    # come: only a progress notice (no event, not the creation) vouches for it.
                    progress = not events and not res.get("created")
                    yield int(res.get("header", {}).get("revision", 0)) if progress else 0, events
        except (httpx.HTTPError, OSError, ValueError) as exc:
            self._next()
            raise Unreachable(f"{type(exc).__name__}: {exc}") from None
        self._next()
        raise Unreachable("the watch stream ended")


# -- the watcher --------------------------------------------------------------------------------
OnChange = Callable[[str, dict[str, Entry]], Awaitable[None]]


@dataclass
class Status:
    up: bool = False
    revision: int = 0                  # the last revision seen
    since: float = 0.0                 # when up last changed (0: never known)
    error: str = ""
    lists: int = 0                     # full lists done (at start, after a compaction)


class Watcher:
    """Follows ``<prefix>services/``; hands each service's members to ``on_change`` whenever
    they change (the supervisor applies them through its change pipeline)."""

    def __init__(self, cfg: EtcdConfig, on_change: OnChange) -> None:
        self.cfg = cfg
        self.on_change = on_change
        self.client = Client(cfg)
        self.prefix = services_prefix(cfg.prefix)
        self.members: dict[str, dict[str, Entry]] = {}       # service -> address -> Entry
        self.leases: dict[tuple[str, str], int] = {}         # (service, address) -> lease
        self.bad: dict[str, str] = {}                        # key -> why skipped (logged once)
        self.status = Status()
        self.task: asyncio.Task[None] | None = None
        self.watched = False                                 # the watch gave something since the last failure

    def info(self) -> dict[str, Any]:
        """For ctl stats and /metrics."""
        s = self.status
        return {"up": s.up, "revision": s.revision, "since": s.since, "error": s.error,
                "lists": s.lists, "endpoints": list(self.cfg.endpoints)}

    def _set_up(self, up: bool, error: str = "") -> None:
        s = self.status
        if up != s.up or s.since == 0:              # once, then on change (each retry: debug)
            if up:
                if s.since:
                    log.warning("etcd: reachable again at %s (revision %d)", self.client.endpoint,
                                s.revision)
            else:
                log.error("etcd unreachable (%s): serving the last known members", error)
            s.up, s.since = up, time.time()
        elif not up and error != s.error:
            log.debug("etcd still unreachable: %s", error)
        s.error = error

    def _entry(self, kv: dict[str, Any]) -> tuple[str, str, Entry | None] | None:
        key = _unb64(kv.get("key")).decode(errors="replace")
        parsed = parse_key(self.cfg.prefix, key)
        if parsed is None:
            if key not in self.bad:
                self.bad[key] = "key"
                log.warning("etcd: key %r skipped: expected %s<service>/<host:port>", key, self.prefix)
            return None
        try:
            entry = parse_value(_unb64(kv.get("value")), int(kv.get("mod_revision", 0)))
        except ValueError as exc:
            if self.bad.get(key) != str(exc):
                self.bad[key] = str(exc)
                log.warning("etcd: key %r skipped: %s", key, exc)
            return parsed[0], parsed[1], None
        self.bad.pop(key, None)
        self.leases[parsed] = int(kv.get("lease", 0) or 0)
        return parsed[0], parsed[1], entry

    async def relist(self) -> None:
        """Read every member at once (at start, after a compaction) and hand over the changes."""
        rev, kvs = await self.client.range(self.prefix)
        members: dict[str, dict[str, Entry]] = {}
        for kv in kvs:
            got = self._entry(kv)
            if got is not None and got[2] is not None:
                members.setdefault(got[0], {})[got[1]] = got[2]
        self.status.revision = rev
        self.status.lists += 1
        old, self.members = self.members, members
        for service in sorted(old.keys() | members.keys()):
            if old.get(service, {}) != members.get(service, {}) or self.status.lists == 1:
                await self._hand(service)

    async def _hand(self, service: str) -> None:
        try:
            await self.on_change(service, dict(self.members.get(service, {})))
        except Exception:  # noqa: BLE001 - a bug there must not end the following
            log.exception("etcd: applying the members of service %s failed (a bug)", service)

    async def prime(self, timeout: float = 2.0) -> None:
        """One list before serving (members known at start); etcd down: the last known ones."""
        try:
            await asyncio.wait_for(self.relist(), timeout)
            self._set_up(True)
        except (Unreachable, asyncio.TimeoutError, OSError) as exc:
            self._set_up(False, str(exc) or "timeout")

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        await self.client.close()

    async def _run(self) -> None:
        backoff = BACKOFF_MIN
        need_list = self.status.lists == 0 or not self.status.up
        while True:
            try:
                if need_list:
                    await self.relist()
                    need_list = False
                    self._set_up(True)
                await self._watch_probed()
            except Compacted as exc:
                log.warning("etcd: %s: listing again", exc)
                need_list = True
                continue
            except (Unreachable, OSError) as exc:
                self._set_up(False, str(exc))
            if self.watched:                        # it worked a while: retry soon
                backoff, self.watched = BACKOFF_MIN, False
            await asyncio.sleep(backoff)
            backoff = min(BACKOFF_MAX, backoff * 2)

    async def _watch(self) -> None:
        async for rev, events in self.client.watch(self.prefix, self.status.revision + 1):
            self.watched = True
            self._set_up(True)
            await self._events(events)
            self.status.revision = max(self.status.revision, rev)

    async def _watch_probed(self) -> None:
        """The watch, with a status probe every PROBE_INTERVAL beside it: a probe without an
        answer ends the watch (Unreachable), as a broken stream does."""
        watch = asyncio.ensure_future(self._watch())
        try:
            while True:
                done, _ = await asyncio.wait({watch}, timeout=PROBE_INTERVAL)
                if done:
                    watch.result()                  # raises what ended it
                    raise Unreachable("the watch stream ended")
                await self.client.probe()
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)

    async def _events(self, events: list[dict[str, Any]]) -> None:
        touched: set[str] = set()
        for ev in events:
            kv = ev.get("kv", {})
            self.status.revision = max(self.status.revision, int(kv.get("mod_revision", 0) or 0))
            if ev.get("type") == "DELETE":
                key = _unb64(kv.get("key")).decode(errors="replace")
                parsed = parse_key(self.cfg.prefix, key)
                self.bad.pop(key, None)
                if parsed is not None and self.members.get(parsed[0], {}).pop(parsed[1], None) is not None:
                    touched.add(parsed[0])
                continue
            got = self._entry(kv)
            if got is None:
                continue
            service, address, entry = got
            have = self.members.setdefault(service, {})
            if entry is None:
                if have.pop(address, None) is not None:
                    touched.add(service)
            elif have.get(address) != entry:
                have[address] = entry
                touched.add(service)
        for service in sorted(touched):
            await self._hand(service)

    async def write(self, service: str, address: str, update: Mapping[str, Any]) -> None:
        """An admin change to a member, written to etcd with a compare-and-swap on the mod
        revision this balancer last saw (so a change made meanwhile by another balancer or
        instance is not overwritten). Raises RegistryError; nothing changes on a refusal."""
        entry = self.members.get(service, {}).get(address)
        if entry is None:
            raise RegistryError("unknown_backend", f"service {service!r} has no backend {address!r} "
                                                   f"in etcd")
        value = {**entry.as_dict(), **update}
        key = member_key(self.cfg.prefix, service, address)
        try:
            ok, rev = await self.client.cas(key, json.dumps(value, separators=(",", ":")),
                                            entry.mod_revision, self.leases.get((service, address), 0))
        except Unreachable as exc:
            raise RegistryError("etcd_unreachable", f"etcd: {exc}; nothing changed") from None
        if not ok:
            raise RegistryError("conflict", f"{key} was changed in etcd since revision "
                                            f"{entry.mod_revision} (by another balancer or the "
                                            f"instance); nothing changed: look again and retry")
        self.members[service][address] = parse_value(json.dumps(value), rev)


# -- `fastlb register --etcd ENDPOINTS SERVICE ADDRESS --ttl 10s` ---------------------------------
def add_register_options(r: Any) -> None:
    """[etcd] The options of ``fastlb register`` that register in etcd instead of a fastlb's
    admin (cli.py adds them to the one ``register`` subcommand)."""
    r.add_argument("--etcd", default=None, metavar="ENDPOINTS",
                   help="register in etcd instead: its endpoints, comma separated "
                        "(http://h:2379,...), with an etcd lease of --ttl")
    r.add_argument("--prefix", default="/fastlb/", help="with --etcd: the key prefix")
    r.add_argument("--state", choices=STATES, default=None, help="with --etcd: the member's state")


def register_main(args: Any) -> int:
    from fastlb import config
    try:
        ttl = max(1, round(config._Checker("", "command line").duration(args.ttl, "--ttl", lo=1)))
        parse_value(json.dumps(_value(args)))
        addr = parse_address(args.address, resolve=False)
        if addr.port == 0:
            raise ValueError("a port from 1 to 65535 is needed")
    except (ValueError, config.ConfigError) as exc:
        print(f"fastlb register: {exc}")
        return 2
    cfg = EtcdConfig(endpoints=tuple(e.strip().rstrip("/") for e in args.etcd.split(",")),
                     prefix=args.prefix)
    return asyncio.run(_register(cfg, args.service, args.address, ttl, _value(args)))


def _value(args: Any) -> dict[str, Any]:
    return {k: v for k, v in (("weight", args.weight), ("state", args.state)) if v is not None}


async def _register(cfg: EtcdConfig, service: str, address: str, ttl: int, value: dict[str, Any]) -> int:
    """Grant a lease, put the key with it, renew at a third of the TTL; a lost lease (etcd
    restarted, a long pause): grant and put again. SIGTERM/SIGINT: revoke (the key goes)."""
    client = Client(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    key = member_key(cfg.prefix, service, address)
    text = json.dumps(value, separators=(",", ":"))
    lease = 0
    try:
        while not stop.is_set():
            try:
                if lease == 0 or await client.keepalive(lease) <= 0:
                    lease = await client.grant(ttl)
                    await client.put(key, text, lease)
                    print(f"registered {key} with lease {lease:x} (ttl {ttl}s)", flush=True)
            except Unreachable as exc:
                print(f"etcd unreachable: {exc}; retrying", flush=True)
            try:
                await asyncio.wait_for(stop.wait(), ttl / 3)
            except asyncio.TimeoutError:
                pass
        if lease:
            try:
                await client.revoke(lease)
                print(f"deregistered {key}", flush=True)
            except Unreachable as exc:
                print(f"deregister failed ({exc}): the key goes when its lease expires", flush=True)
    finally:
        await client.close()
    return 0
