"""DNS that follows changes: backends given by host name or SRV record, re-resolved in the background.

Owner: what a followed backend entry stands for now (its members), how a name is resolved, how
often, and what is logged about it. A backend entry whose address is a host name
(``{ address = "app.internal:9000" }``) or an SRV name (``{ srv = "_app._tcp.example.internal" }``)
is *followed*: every ``dns.refresh`` it is resolved again, and every address of the answer is a
**member** with its own slot (health bit, counters, gauges row), health check and ramp, keyed in
the slot table by its **member id** ``"<entry text>=<ip>:<port>"``. The entry (its text as
written) stays the backend's id for the registry, the admin and the state file; members are
derived state, never persisted (a restart asks DNS again), and the supervisor applies their
changes through its change lock, like any change (fastlb.supervisor._on_members).

Pure parts (no I/O; tests/unit/test_dns_members.py): ``Member``, ``member_id``, ``follows``,
``targets`` (a service's slot-table ids), ``member_weight``, ``active_group`` (SRV priorities),
``diff`` and ``Answer.after`` (what an answer does to the last members), ``entry_info`` (stats).
The I/O: ``Resolver`` (one resolution of a name: /etc/hosts first, then DNS with dnspython's
asyncio resolver, never blocking the loop) and ``Watcher`` (one task per followed entry).

What an answer does (HAProxy's resolvers and nginx's ``resolve`` keep serving the last good
addresses while DNS fails; both drop them on an authoritative "no such name"):
  - addresses: they are the members; those that leave drain (no new connections, open ones go on);
  - NXDOMAIN or no A/AAAA (SRV) record: the name has no member (pending: no traffic);
  - timeout, SERVFAIL, REFUSED, no nameserver: the last members are kept (none at start: pending).
The TTL is not used: the period is ``dns.refresh`` (HAProxy's ``hold valid`` does the same).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator, Mapping, NamedTuple, Sequence

from fastlb.config import MAX_WEIGHT, Backend, DnsConfig, Service

if TYPE_CHECKING:
    import dns.asyncresolver

log = logging.getLogger("fastlb.dns")

HOSTS = "/etc/hosts"          # read first, on every resolution, as glibc does ("files dns")


@dataclass(frozen=True, slots=True, order=True)
class Member:
    """One address a followed entry resolves to now."""
    priority: int             # SRV priority, lower first; 0 for an A/AAAA answer
    host: str                 # an IP literal
    port: int
    weight: int = -1          # SRV weight 0..65535; -1 for an A/AAAA answer (the entry's weight)

    @property
    def hostport(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


Members = tuple[Member, ...]


def member_id(entry: str, m: Member) -> str:
    """A member's key in the slot table and the health checker: the entry's text (the backend's
    id as written), '=', the member's address. No IP-literal backend id contains '='."""
    return f"{entry}={m.hostport}"


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def follows(b: Backend) -> bool:
    """An entry given by host name or SRV name (resolved here, again and again)."""
    return b.srv or not is_ip(b.address.host)


class Target(NamedTuple):
    """One slot of a service: an IP-literal backend (id = its text) or a member of a followed
    entry (id = member_id)."""
    id: str
    host: str
    port: int
    backend: Backend
    member: Member | None


def targets(svc: Service, members: Mapping[str, Members]) -> Iterator[Target]:
    for b in svc.backends:
        if not follows(b):
            yield Target(b.address.text, b.address.host, b.address.port, b, None)
            continue
        for m in members.get(b.address.text, ()):
            yield Target(member_id(b.address.text, m), m.host, m.port, b, m)


def member_weight(b: Backend, m: Member) -> int:
    """The entry's weight for an A/AAAA member. For an SRV member the record's weight times the
    entry's (1 by default; an admin weight scales the whole entry), 0 counted as 1 (RFC 2782:
    weight 0 gets a very small share). HAProxy maps SRV weights to 1..256 by dividing by 256,
    which makes 10 and 30 equal; ours keep their ratio (MAX_WEIGHT is a million)."""
    if m.weight < 0:
        return b.weight
    return min(MAX_WEIGHT, b.weight * max(1, m.weight))


def active_group(members: Members, is_up: Callable[[Member], bool]) -> Members:
    """SRV priorities: the members of the lowest priority that has a member up; a higher
    priority is used only when every lower one has none up. With nothing up anywhere, the
    lowest group (so the data path behaves as with any service whose backends are all down;
    panic mode, if set, applies to it). Health moves a plan from one group to the next:
    priority failover needs health checks (or fall_passive) to see the first group down."""
    groups = sorted({m.priority for m in members})
    if len(groups) <= 1:
        return members
    for p in groups:
        group = tuple(m for m in members if m.priority == p)
        if any(is_up(m) for m in group):
            return group
    return tuple(m for m in members if m.priority == groups[0])


def diff(old: Members, new: Members) -> tuple[Members, Members]:
    """(added, removed) between two member sets."""
    o, n = set(old), set(new)
    return tuple(sorted(n - o)), tuple(sorted(o - n))


@dataclass(frozen=True, slots=True)
class Answer:
    """One resolution of a followed entry."""
    members: Members | None   # None: no usable answer (timeout, SERVFAIL, ...): keep the last
    status: str               # "resolved", "NXDOMAIN", "no A or AAAA record", "timeout after 2s", ...

    def after(self, last: Members | None) -> Members:
        """The members once this answer is taken, given the last ones (None: never resolved)."""
        if self.members is not None:
            return self.members
        return last or ()


def _text(members: Members) -> str:
    return ", ".join(m.hostport + (f" (priority {m.priority}, weight {m.weight})" if m.weight >= 0 else "")
                     for m in members) or "none"


def hosts_lookup(name: str, path: str = HOSTS) -> list[str]:
    """The addresses /etc/hosts gives ``name`` (as glibc's files module: every line naming it)."""
    want = name.rstrip(".").lower()
    out: list[str] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split("#", 1)[0].split()
                if len(fields) >= 2 and want in (n.lower() for n in fields[1:]) and is_ip(fields[0]):
                    if fields[0] not in out:
                        out.append(fields[0])
    except OSError:
        return []
    return out


class _Failed(Exception):
    """No usable answer: keep the last members."""


class Resolver:
    """Resolves followed entries without blocking the loop: /etc/hosts, then DNS (dnspython's
    asyncio resolver: UDP, TCP on truncation) over [global] dns.nameservers or
    /etc/resolv.conf's, each resolution bounded by dns.timeout."""

    def __init__(self, cfg: DnsConfig, hosts: str = HOSTS) -> None:
        import dns.asyncresolver
        import dns.nameserver
        import dns.resolver
        self.hosts = hosts
        self.timeout = cfg.timeout
        if cfg.nameservers:
            r = dns.asyncresolver.Resolver(configure=False)
            r.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in cfg.nameservers]
        else:
            try:
                r = dns.asyncresolver.Resolver()           # /etc/resolv.conf, read once
            except dns.resolver.NoResolverConfiguration:
                r = dns.asyncresolver.Resolver(configure=False)   # none: every name fails
                log.warning("no nameserver in /etc/resolv.conf and no [global] dns.nameservers: "
                            "host names resolve through /etc/hosts only")
        r.timeout = cfg.timeout        # per try
        r.lifetime = cfg.timeout       # in all
        r.cache = None                 # every refresh asks again
        self.r: dns.asyncresolver.Resolver = r

    async def _query(self, name: str, rdtype: str) -> list[Any] | str:
        """The records, or "NXDOMAIN" / "NODATA"; raises _Failed."""
        import dns.exception
        import dns.resolver
        try:
            answer = await self.r.resolve(name, rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN:
            return "NXDOMAIN"
        except dns.resolver.NoNameservers as exc:
            raise _Failed("no nameserver answered (SERVFAIL or REFUSED)"
                          if self.r.nameservers else "no nameserver configured") from exc
        except dns.exception.Timeout as exc:
            raise _Failed(f"timeout after {self.timeout:g}s") from exc
        except dns.exception.DNSException as exc:
            raise _Failed(f"DNS error: {type(exc).__name__}") from exc
        if answer.rrset is None:
            return "NODATA"
        return list(answer.rrset)

    async def addresses(self, name: str) -> list[str] | str:
        """IPs of ``name`` (A and AAAA, at once), or "NXDOMAIN" / "no A or AAAA record"."""
        found = hosts_lookup(name, self.hosts)
        if found:
            return found
        a, aaaa = await asyncio.gather(self._query(name, "A"), self._query(name, "AAAA"))
        ips = [r.address for part in (a, aaaa) if isinstance(part, list) for r in part]
        if ips:
            return ips
        return "NXDOMAIN" if "NXDOMAIN" in (a, aaaa) else "no A or AAAA record"

    async def resolve(self, b: Backend) -> Answer:
        try:
            if b.srv:
                return await self._srv(b.address.text)
            got = await self.addresses(b.address.host)
        except _Failed as exc:
            return Answer(None, str(exc))
        if isinstance(got, str):
            return Answer((), got)
        return Answer(tuple(sorted({Member(0, ip, b.address.port) for ip in got})), "resolved")

    async def _srv(self, name: str) -> Answer:
        records = await self._query(name, "SRV")
        if isinstance(records, str):
            return Answer((), "no SRV record" if records == "NODATA" else records)
        live = [r for r in records if r.target.to_text(omit_final_dot=True) not in ("", ".")]
        # RFC 2782: a target of "." means the service is not available at this domain.
        got = await asyncio.gather(*(self.addresses(r.target.to_text(omit_final_dot=True))
                                     for r in live))
        best: dict[tuple[str, int], Member] = {}
        for r, ips in zip(live, got, strict=True):
            for ip in ips if isinstance(ips, list) else ():
                m = Member(int(r.priority), ip, int(r.port), int(r.weight))
                if (ip, m.port) not in best or m < best[(ip, m.port)]:
                    best[(ip, m.port)] = m          # one address under two records: the first
        if not best:
            return Answer((), "SRV targets have no A or AAAA record")
        return Answer(tuple(sorted(best.values())), "resolved")


Key = tuple[str, str]                                   # (service, entry text)
OnChange = Callable[[str, str, Members], Awaitable[bool]]    # False: refused, offer again


class Watcher:
    """One task per followed entry: resolve every refresh; hand member changes to ``on_change``
    (the supervisor applies them); log a failure once and every change once."""

    def __init__(self, cfg: DnsConfig, on_change: OnChange, resolver: Resolver | None = None) -> None:
        self.cfg = cfg
        self.on_change = on_change
        self.resolver = resolver or Resolver(cfg)
        self.members: dict[Key, Members] = {}
        self.status: dict[Key, str] = {}
        self.tasks: dict[Key, tuple[asyncio.Task[None], Backend, float]] = {}

    def entries(self, services: Mapping[str, Service]) -> dict[Key, tuple[Backend, float]]:
        return {(s.name, b.address.text): (b, s.dns_refresh or self.cfg.refresh)
                for s in services.values() for b in s.backends if follows(b)}

    def of(self, service: str) -> dict[str, Members]:
        """A service's followed entries -> their members now."""
        return {e: m for (s, e), m in self.members.items() if s == service}

    async def prime(self, services: Mapping[str, Service]) -> None:
        """Resolve every followed entry once, at once (before serving): members known at start."""
        wanted = self.entries(services)
        answers = await asyncio.gather(*(self._resolve(b) for b, _ in wanted.values()))
        for (key, (_, refresh)), answer in zip(wanted.items(), answers, strict=True):
            self._take(key, answer, refresh)

    def sync(self, services: Mapping[str, Service]) -> None:
        """Follow the entries of ``services``: start tasks for new ones, stop those gone (their
        members are forgotten: the runtime released their slots with the entry)."""
        wanted = self.entries(services)
        for key in self.members.keys() - wanted.keys():     # a service that did not start
            self.members.pop(key, None)
            self.status.pop(key, None)
        for key in list(self.tasks):
            task, b, refresh = self.tasks[key]
            # what is resolved and how often; a new weight or state of the entry is no reason
            if key not in wanted or (wanted[key][0].srv, wanted[key][1]) != (b.srv, refresh):
                task.cancel()
                del self.tasks[key]
                if key not in wanted:
                    self.members.pop(key, None)
                    self.status.pop(key, None)
        for key, (b, refresh) in wanted.items():
            if key not in self.tasks:
                task = asyncio.get_running_loop().create_task(self._run(key, b, refresh, key in self.status))
                self.tasks[key] = (task, b, refresh)

    def stop(self) -> None:
        for task, _, _ in self.tasks.values():
            task.cancel()
        self.tasks.clear()

    async def _run(self, key: Key, b: Backend, refresh: float, resolved: bool) -> None:
        applied = self.members.get(key, ())   # what the supervisor runs (it took them at start)
        if resolved:                       # primed (or followed before a reload): wait first
            await asyncio.sleep(refresh)
        while True:
            new = self._take(key, await self._resolve(b), refresh)
            if new != applied:
                try:
                    if await self.on_change(key[0], key[1], new):
                        applied = new
                except Exception:  # noqa: BLE001 - a bug there must not end the following
                    log.exception("service %s: backend %s: applying DNS members failed", *key)
            await asyncio.sleep(refresh)

    async def _resolve(self, b: Backend) -> Answer:
        """The resolver's answer; an unexpected error (a bug, or one dnspython does not wrap)
        is logged with its traceback and counts as no answer: the last members stay."""
        try:
            return await self.resolver.resolve(b)
        except Exception as exc:  # noqa: BLE001 - following must go on; said loudly
            log.exception("resolving %s failed unexpectedly", b.address.text)
            return Answer(None, f"resolver error: {type(exc).__name__}")

    def _take(self, key: Key, answer: Answer, refresh: float) -> Members:
        """Record an answer; log once per change of outcome. Returns the members now."""
        last = self.members.get(key)
        new = answer.after(last)
        before = self.status.get(key)
        self.members[key] = new
        self.status[key] = answer.status
        where = f"service {key[0]}: backend {key[1]}"
        if answer.members is None:                          # no usable answer
            if before != answer.status:
                if new:
                    log.warning("%s: %s; keeping its %d member(s), retrying every %gs", where,
                                answer.status, len(new), refresh)
                else:
                    log.warning("%s: cannot resolve (%s): pending (no member, no traffic), "
                                "retrying every %gs", where, answer.status, refresh)
        elif not new:
            if last:
                log.warning("%s: %s: its member(s) %s leave (draining); retrying every %gs", where,
                            answer.status, _text(last), refresh)
            elif before != answer.status:
                log.warning("%s: cannot resolve (%s): pending (no member, no traffic), "
                            "retrying every %gs", where, answer.status, refresh)
        elif not last:                                      # first answer, or pending until now
            log.info("%s resolved: %s", where, _text(new))
        elif new != last:
            added, removed = diff(last, new)
            log.info("%s: members now %s (+ %s; - %s, draining)", where, _text(new), _text(added),
                     _text(removed))
        elif before != "resolved":
            log.info("%s: resolved again: %s", where, _text(new))
        return new


# -- stats: an entry with its members under it (handlers.backend_info calls this) --------------
def entry_info(view: Any, service: str, b: Backend, members: Members, status: str,
               stats: bool, counter_fields: Sequence[str]) -> dict[str, Any]:
    """A followed entry as ``backends``/``stats`` show it: the entry's id, weight and state; its
    health (up when a member is up) and counters (summed over its members); the DNS status; and
    each member with its own address, slot-level health, counters and check state."""
    rows = []
    for m in members:
        mid = member_id(b.address.text, m)
        slot = view.slot(service, mid)
        row: dict[str, Any] = {"address": m.hostport, "id": mid, "weight": member_weight(b, m),
                               "health": "up" if slot is not None and view.is_up(slot) else "down"}
        if m.weight >= 0:
            row["priority"] = m.priority
        if stats:
            row.update(view.counters(slot) if slot is not None else dict.fromkeys(counter_fields, 0))
            g = view.gauges(service, mid)                                       # [limits]
            row.update(cur=g["cur"], max=g["max"], limit=b.max_conns)
            check = view.check(service, mid)
            row["check_failures"] = check[0] if check else 0
            row["health_reason"] = check[1] if check else "no checks"
        rows.append(row)
    up = sum(1 for r in rows if r["health"] == "up")
    info: dict[str, Any] = {"address": b.address.text, "weight": b.weight, "state": b.state,
                            "health": "up" if up else "down"}
    if stats:
        for f in counter_fields:
            info[f] = sum(r[f] for r in rows)
        # [limits] connections now over the members; max: the sum of each member's highest (an
        # upper bound of the entry's own peak); limit: each member's cap (max_conns applies to
        # every member alone, as to a server of a HAProxy server-template)
        info["cur"] = sum(r["cur"] for r in rows)
        info["max"] = sum(r["max"] for r in rows)
        info["limit"] = b.max_conns
        info["check_failures"] = sum(r["check_failures"] for r in rows)
        info["health_reason"] = (f"{up} of {len(rows)} member(s) up" if rows
                                 else f"no member: DNS {status}")
    info["dns"] = status
    info["members"] = rows
    return info
