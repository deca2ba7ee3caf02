"""Leases: backends that service instances register themselves, kept while they renew.

Owner: the lease table and its rules, sans-IO (times are given, never read): what a
registration may ask (ttl bounds, metadata size, a cap per service), lease ids, renewals,
which leases have expired at a time, the grace after a restart, and the leases' wire form in
the state file. The supervisor runs the changes (register/deregister/expiry go through its
change pipeline: persisted before the reply) and the sweep; the admin server gives a
connection authenticated by a service's registration token that service as its scope.

What others do, and what this does:
  - Consul's agent: a check with ``ttl`` that the service must pass within it, else critical,
    and ``DeregisterCriticalServiceAfter`` to remove it; etcd: a lease granted with a TTL,
    ``KeepAlive`` renews it, keys attached to it vanish when it expires, the lease id is the
    handle. Here: the etcd model (register -> lease id; renew by id; expiry removes the
    backend), with the TTL asked by the instance and bounded by the service's ``max_ttl``.
  - etcd, after a leader change, extends every lease by its TTL (leases are not lost to a
    restart of the cluster). Here: leases are in the state file (without their deadlines, which
    are monotonic times), and on start each one gets a grace of one TTL to be renewed.
  - An expired lease removes the backend as ``remove_backend`` does (HAProxy's ``del server``
    after ``disable``: open connections go on, no new ones).
"""
from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastlb.errors import AdminProtocolError, RegistryError

__all__ = ["LEASE_OPS", "Lease", "LeaseTable", "check_register_args", "DEFAULT_MAX_TTL"]

LEASE_OPS = frozenset({"register", "renew", "deregister"})
# Registrations a service may hold at once. The slot table bounds backends anyway (each lease is
# a backend with a slot); this bounds what one registration token can take of it. 4096 is the
# largest service one admin request can describe (protocol.REQUEST_LIMITS.max_array).
MAX_LEASES_PER_SERVICE = 4096
# TTL bounds: the sweep runs every SWEEP_INTERVAL, so a shorter TTL means nothing; max_ttl
# (service.registration.max_ttl, default 60 s) bounds it from above, itself at most MAX_TTL.
MIN_TTL = 1.0
DEFAULT_MAX_TTL = 60.0
MAX_TTL = 86400.0
SWEEP_INTERVAL = 0.5
# Metadata: a flat map of strings, for the operator's eyes (`ctl backends --json`); small,
# since it is in every state file write and every instance may send it.
META_KEYS = 32
META_KEY_LEN = 64
META_VALUE_LEN = 512
META_BYTES = 4096           # keys and values together
LEASE_ID_LEN = 64           # a lease id we issue is 26 characters; longer is not ours


def new_id() -> str:
    """A lease id: 120 random bits (as an etcd lease id is a handle, this one also cannot be
    guessed: a registration token of another service cannot renew what it cannot name)."""
    return "l" + secrets.token_hex(15)


@dataclass(frozen=True, slots=True)
class Lease:
    id: str
    service: str
    address: str
    weight: int
    ttl: float
    metadata: Mapping[str, str] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "service": self.service, "address": self.address,
                "weight": self.weight, "ttl": self.ttl, "metadata": dict(self.metadata)}


def check_metadata(op: str, meta: Any) -> dict[str, str]:
    """The metadata map of a registration, or AdminProtocolError(bad_request) saying why."""
    if not isinstance(meta, dict):
        raise AdminProtocolError("bad_request", f"{op}: \"metadata\" must be a map of strings")
    if len(meta) > META_KEYS:
        raise AdminProtocolError("bad_request", f"{op}: metadata has {len(meta)} keys; at most "
                                                f"{META_KEYS}")
    total = 0
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise AdminProtocolError("bad_request", f"{op}: metadata keys and values must be "
                                                    f"strings (key {k!r})")
        if not 1 <= len(k) <= META_KEY_LEN or len(v) > META_VALUE_LEN:
            raise AdminProtocolError("bad_request", f"{op}: metadata {k[:META_KEY_LEN]!r}: keys are "
                                     f"1-{META_KEY_LEN} characters, values at most {META_VALUE_LEN}")
        total += len(k) + len(v)
    if total > META_BYTES:
        raise AdminProtocolError("bad_request", f"{op}: metadata holds {total} characters; at most "
                                                f"{META_BYTES}")
    return dict(meta)


def check_register_args(args: Mapping[str, Any]) -> None:
    """The protocol-level checks of register/renew/deregister fields (types are checked by
    protocol.parse_request): ttl bounds, metadata shape, lease id length."""
    if "ttl" in args and not MIN_TTL <= args["ttl"] <= MAX_TTL:
        raise AdminProtocolError("bad_request", f"register: ttl {args['ttl']!r} out of range; "
                                 f"expected {MIN_TTL:g} to {MAX_TTL:g} seconds (and at most the "
                                 f"service's registration.max_ttl)")
    if "metadata" in args:
        check_metadata("register", args["metadata"])
    if "lease" in args and not 1 <= len(args["lease"]) <= LEASE_ID_LEN:
        raise AdminProtocolError("bad_request", f"\"lease\" must be 1-{LEASE_ID_LEN} characters")


def forbidden(scope: str, what: str) -> RegistryError:
    return RegistryError("forbidden", f"the registration token of service {scope!r} {what}; "
                                      f"the operator token can")


class LeaseTable:
    """Leases by id, their deadlines (monotonic seconds) and the backend each holds."""

    def __init__(self) -> None:
        self.leases: dict[str, Lease] = {}
        self.deadline: dict[str, float] = {}
        self._by_backend: dict[tuple[str, str], str] = {}
        # Leases being removed (expiry or deregister persisting): a renewal is refused, so that
        # no renewal is acknowledged for a lease that is going
        self.closing: set[str] = set()

    def __len__(self) -> int:
        return len(self.leases)

    def of_backend(self, service: str, address: str) -> Lease | None:
        lid = self._by_backend.get((service, address))
        return self.leases.get(lid) if lid is not None else None

    def count(self, service: str) -> int:
        return sum(1 for (s, _) in self._by_backend if s == service)

    def get(self, lid: str, scope: str | None) -> Lease:
        """The lease ``lid``, as a connection of ``scope`` (None: the operator) may see it."""
        lease = self.leases.get(lid)
        if lease is None or lid in self.closing:
            raise RegistryError("unknown_lease", f"no lease {lid!r} (expired, deregistered, or "
                                                 f"never granted): register again")
        if scope is not None and lease.service != scope:
            raise forbidden(scope, f"cannot touch a lease of service {lease.service!r}")
        return lease

    def plan(self, service: str, address: str, weight: int, ttl: float,
             metadata: Mapping[str, str], *, max_ttl: float | None, scope: str | None,
             pending: int = 0) -> Lease:
        """A new lease for a registration, checked, changing nothing. ``max_ttl`` None: the
        service takes no registrations. ``pending``: new leases of the service planned with
        it (a batch), counted against the cap."""
        if scope is not None and scope != service:
            raise forbidden(scope, f"cannot register into service {service!r}")
        if max_ttl is None:
            raise RegistryError("registration_disabled", f"service {service!r} takes no "
                                f"registrations: it has no registration table "
                                f"(service.registration = {{ token_file = \"...\", max_ttl = \"60s\" }})")
        if ttl > max_ttl:
            raise RegistryError("ttl_too_long", f"ttl {ttl:g} s is longer than service "
                                f"{service!r}'s registration.max_ttl ({max_ttl:g} s)")
        if self.of_backend(service, address) is None and \
                self.count(service) + pending >= MAX_LEASES_PER_SERVICE:
            raise RegistryError("too_many_leases", f"service {service!r} holds "
                                f"{MAX_LEASES_PER_SERVICE} leases, the cap per service")
        return Lease(new_id(), service, address, weight, ttl, dict(metadata))

    def add(self, lease: Lease, now: float) -> Lease | None:
        """Insert a lease (due at now + ttl); the lease it replaces on the same backend, if any."""
        key = (lease.service, lease.address)
        old_id = self._by_backend.get(key)
        old = self.remove(old_id) if old_id is not None else None
        self.leases[lease.id] = lease
        self.deadline[lease.id] = now + lease.ttl
        self._by_backend[key] = lease.id
        return old

    def renew(self, lid: str, now: float, scope: str | None) -> Lease:
        lease = self.get(lid, scope)
        self.deadline[lid] = now + lease.ttl
        return lease

    def remove(self, lid: str) -> Lease | None:
        lease = self.leases.pop(lid, None)
        self.closing.discard(lid)
        if lease is not None:
            self.deadline.pop(lid, None)
            if self._by_backend.get((lease.service, lease.address)) == lid:
                del self._by_backend[(lease.service, lease.address)]
        return lease

    def expired(self, now: float) -> list[Lease]:
        """Leases whose deadline has passed (in deadline order)."""
        due = sorted((d, lid) for lid, d in self.deadline.items()
                     if d <= now and lid not in self.closing)
        return [self.leases[lid] for _, lid in due]

    def orphans(self, services: Mapping[str, Any]) -> list[Lease]:
        """Leases whose backend is not in ``services`` any more (the operator removed it or its
        service, or a reload did)."""
        have = _backends(services)
        return [lease for lease in self.leases.values() if (lease.service, lease.address) not in have]

    def wire(self, services: Mapping[str, Any], adds: Iterable[Lease] = (),
             drop: Iterable[str] = ()) -> list[dict[str, Any]]:
        """The state file's "leases": the table with ``adds`` in (each replacing the lease of
        its backend; the last of a backend wins), ``drop`` out, and only leases whose backend
        is in ``services``."""
        gone = set(drop)
        new: dict[tuple[str, str], Lease] = {}
        for add in adds:
            new[(add.service, add.address)] = add
            if old := self._by_backend.get((add.service, add.address)):
                gone.add(old)
        have = _backends(services)
        out = [lease.to_wire() for lid, lease in self.leases.items()
               if lid not in gone and (lease.service, lease.address) in have]
        out += [add.to_wire() for key, add in new.items() if key in have]
        return out

    def restore(self, wire: Iterable[Mapping[str, Any]], services: Mapping[str, Any],
                now: float) -> tuple[int, int]:
        """Leases read from the state file, each due one TTL from ``now`` (the grace of a
        restart). Those whose backend is not in ``services`` are dropped. (kept, dropped)"""
        kept = dropped = 0
        have = _backends(services)
        for d in wire:
            lease = Lease(str(d["id"]), str(d["service"]), str(d["address"]), int(d["weight"]),
                          float(d["ttl"]), dict(d.get("metadata") or {}))
            if (lease.service, lease.address) in have:
                self.add(lease, now)
                kept += 1
            else:
                dropped += 1
        return kept, dropped

    def info(self, lease: Lease, now: float) -> dict[str, Any]:
        return {"lease": lease.id, "ttl": lease.ttl,
                "expires_in": round(max(0.0, self.deadline.get(lease.id, now) - now), 3),
                "metadata": dict(lease.metadata)}


def _backends(services: Mapping[str, Any]) -> set[tuple[str, str]]:
    """Every (service, address) of ``services``: one pass, so a table of n leases against n
    backends costs O(n), not O(n^2)."""
    return {(name, b.address.text) for name, svc in services.items() if svc is not None
            for b in svc.backends}


def from_wire(raw: Any, where: str) -> list[dict[str, Any]]:
    """The "leases" list of a state file, checked (raises ValueError naming the entry)."""
    if not isinstance(raw, list):
        raise ValueError(f"{where} is not a list")
    out = []
    for i, d in enumerate(raw):
        ok = (isinstance(d, dict) and isinstance(d.get("id"), str) and isinstance(d.get("service"), str)
              and isinstance(d.get("address"), str) and isinstance(d.get("weight"), int)
              and isinstance(d.get("ttl"), (int, float)) and isinstance(d.get("metadata", {}), dict))
        if not ok:
            raise ValueError(f"{where}[{i}] is not a lease (id, service, address, weight, ttl, "
                             f"metadata)")
        out.append(dict(d))
    return out




def without(services: Mapping[str, Any], leases: Iterable[Lease]) -> dict[str, Any]:
    """``services`` without the backends these leases hold (a backend already gone is no
    error: the lease just goes)."""
    out = dict(services)
    for lease in leases:
        svc = out.get(lease.service)
        if svc is None:
            continue
        kept = tuple(b for b in svc.backends if b.address.text != lease.address)
        if len(kept) != len(svc.backends):
            out[lease.service] = dataclasses.replace(svc, backends=kept)
    return out


def read_tokens(services: Iterable[Any], operator: str | None,
                strict: bool = True) -> tuple[dict[str, str], list[str]]:
    """The registration token of each service with ``registration.token_file`` (read with the
    admin token's rules: fastlb.admin.guard.read_token). Returns (service -> token, problems).
    strict: the first problem raises FastLBError (at start and reload: refuse); else a service
    whose token cannot be read is left out (it takes only the operator's registrations) and
    its problem returned. A token that is another service's, or the operator's, is a problem:
    it would be ambiguous which rights a connection has."""
    from fastlb.admin import guard
    from fastlb.errors import FastLBError
    tokens: dict[str, str] = {}
    owner: dict[str, str] = {}
    problems: list[str] = []
    for svc in services:
        reg = getattr(svc, "registration", None)
        if reg is None or not reg.token_file:
            continue
        where = f"service {svc.name!r}: registration.token_file"
        try:
            token = guard.read_token(reg.token_file)
            if operator is not None and token == operator:
                raise guard.TokenFileError(f"{reg.token_file} holds the operator's token "
                                           f"([global] admin_token_file); a registration token "
                                           f"must be its own")
            if token in owner:
                raise guard.TokenFileError(f"{reg.token_file} holds the same token as service "
                                           f"{owner[token]!r}'s; each service needs its own")
        except guard.TokenFileError as exc:
            if strict:
                raise FastLBError(f"{where}: {exc}") from None
            problems.append(f"{where}: {exc}")
            continue
        tokens[svc.name] = token
        owner[token] = svc.name
    return tokens, problems
