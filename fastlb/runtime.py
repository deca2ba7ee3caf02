"""Services as the supervisor runs them: config snapshot + slots + health + ramps -> Plan.

Owner: each service's slots and health tracking (``ServiceRuntime.configure/remove``), its
slow-start ramps and its last logged panic state. ``compute_plan`` is a pure function of (the
service's config, its slots, the up slots, its ramps, now, and the members of its entries given
by host name or SRV record: fastlb.dns): same inputs, same Plan, nothing changed. A slot, a
health check and a ramp belong to a *target*: an IP-literal backend (keyed by its text) or a
member of a followed entry (keyed by its member id, ``"entry=ip:port"``). Time moves in
``tick`` (ramp expiry, panic transitions logged once), called by the supervisor's ramp loop and
after each change, never while a plan is computed.
"""
from __future__ import annotations

import logging
import time
from types import MappingProxyType
from typing import Any, Callable, Mapping

from fastlb import _core, dns
from fastlb.config import MAX_WEIGHT, Backend, GlobalConfig, Service, orig_of
from fastlb.health import HealthChecker
from fastlb.plan import Plan, PlanBackend
from fastlb.shm import SERVICE_ROW, SharedState

log = logging.getLogger("fastlb")

# Slow start scales weights by this during a ramp, for a fine-grained ramp with integer weights
# (smooth WRR is scale-invariant: the rotation of steady backends does not change).
RAMP_SCALE = 100
HASH_MODES: dict[str, int] = dict(_core.HASH_MODES)


def policy_options(svc: Service) -> tuple[tuple[str, int], ...]:
    """The options a plan carries to make_policy: only those of the service's policy (the core
    refuses an option its policy does not know)."""
    if svc.policy == "maglev":
        return (("hash_balance_factor", svc.hash_balance_factor),)
    if svc.policy == "round_robin":
        return (("max_fails", svc.max_fails),)
    return ()


NO_MEMBERS: Mapping[str, dns.Members] = MappingProxyType({})


def budget_per_worker(g: GlobalConfig) -> int:
    """[mem] Each data path's share of [global] buffer_budget: split evenly between the
    workers (config checked it leaves each at least 4 buffers)."""
    return g.buffer_budget // max(1, g.workers)


def compute_plan(svc: Service, slot_of: Callable[[str], int], is_up: Callable[[int], bool],
                 ramps: Mapping[str, float], now: float,
                 members: Mapping[str, dns.Members] = NO_MEMBERS, *, buffer_budget: int = 0) -> Plan:
    """The data path's view of ``svc`` at ``now``: ready backends with their effective weights
    (a ramp started at ``ramps[id]`` eases a backend in over health.slowstart), and panic
    mode (fewer than panic_threshold % of the ready backends up: all count as up). A ready
    entry given by host name or SRV stands for its ``members[entry text]`` (none: pending),
    each with its own slot; of an SRV entry only the active priority group
    (dns.active_group: the lowest with a member up). Pure."""
    h = svc.health
    slowstart = h.slowstart if h is not None else 0.0
    live = {a: since for a, since in ramps.items() if slowstart > 0 and now - since < slowstart}
    # (id, weight, host, port, its entry): an IP-literal backend, or each member of a followed one
    chosen: list[tuple[str, int, str, int, Backend]] = []
    for b in svc.backends:
        if b.state != "ready":                          # drain/maint: no new connection
            continue
        if not dns.follows(b):
            chosen.append((b.address.text, b.weight, b.address.host, b.address.port, b))
            continue
        text = b.address.text

        def member_up(m: dns.Member, text: str = text) -> bool:
            return is_up(slot_of(dns.member_id(text, m)))
        group = dns.active_group(members.get(text, ()), member_up)
        chosen += [(dns.member_id(text, m), dns.member_weight(b, m), m.host, m.port, b) for m in group]
    scale = RAMP_SCALE if live and all(c[1] * RAMP_SCALE <= MAX_WEIGHT for c in chosen) else 1
    backends = []
    for key, weight, host, port, _entry in chosen:
        w = weight * scale
        since = live.get(key)
        if since is not None:
            w = max(1, int(w * (now - since) / slowstart))
        backends.append(PlanBackend(slot_of(key), w, key, host, port))
    up = sum(1 for b in backends if is_up(b.slot))
    panic = bool(h and h.panic_threshold > 0 and backends
                 and 100 * up / len(backends) < h.panic_threshold)
    return Plan(name=svc.name, row=slot_of(SERVICE_ROW),
                listen=tuple((a.host, a.port) for a in svc.listen),
                policy=svc.policy,
                hash_mode=HASH_MODES[svc.hash_key] if svc.policy == "maglev" else 0,
                retries=svc.retries, connect_timeout=svc.connect_timeout,
                idle_timeout=svc.idle_timeout, fall_passive=h.fall_passive if h else 0,
                panic=panic, backends=tuple(backends),
                names=tuple((slot_of(t.id), t.id) for t in dns.targets(svc, members)),
                options=policy_options(svc),
                **limits_fields(svc, slot_of, members),                          # [limits]
                **access_fields(svc, slot_of, members),                          # [access]
                client_fin=svc.client_fin, server_fin=svc.server_fin,          # [mem]
                max_duration=svc.max_duration, first_byte=svc.first_byte,
                tcp_keepalive=svc.tcp_keepalive, buffer_budget=buffer_budget,
                log_sample=log_sample(svc),                                    # [obs]
                **tls_fields(svc),                                             # [tls]
                **orig_fields(svc, slot_of, members),                          # [orig]
                sni=svc.sni, sni_handshake=svc.sni_handshake,                  # [sni]
                splice=svc.splice or "auto",                                   # [splice]
                defer_accept=svc.defer_accept, fastopen=svc.fastopen)          # [listenopts]


def orig_fields(svc: Service, slot_of: Callable[[str], int],
                members: Mapping[str, dns.Members] = NO_MEMBERS) -> dict[str, Any]:
    """[orig] The plan's TLS-to-backends fields: each distinct profile once, and per slot of a
    TLS backend its profile and the name verified (``sni``, else the backend's host as written;
    an SRV member: its target's host)."""
    profiles: dict[tuple[bytes, bool, bytes, bytes], int] = {}
    slots = []
    for t in dns.targets(svc, members):
        o = orig_of(svc, t.backend)
        if o is None:
            continue
        idx = profiles.setdefault(o.profile(), len(profiles))
        name = o.sni or (t.host if t.backend.srv else t.backend.address.host)
        slots.append((slot_of(t.id), idx, name))
    if not slots:
        return {}
    return {"orig_profiles": tuple(profiles), "orig_slots": tuple(sorted(slots))}


def tls_fields(svc: Service) -> dict[str, Any]:
    """[tls] The plan's TLS termination fields (none: plain TCP)."""
    t = svc.tls
    if t is None:
        return {}
    return {"tls_certs": t.pems, "tls_min_version": t.min_version, "tls_alpn": t.alpn,
            "tls_handshake": t.handshake, "tls_client_ca": t.ca_pem,
            "tls_verify": t.verify_client, "tls_identities": t.identities,
            "tls_ticket_lifetime": t.ticket_lifetime}                          # [tlsops]


def limits_fields(svc: Service, slot_of: Callable[[str], int],
                  members: Mapping[str, dns.Members] = NO_MEMBERS) -> dict[str, Any]:
    """[limits] The plan's connection limits: service.maxconn, the queue (its timeout
    defaults to the connect timeout, as HAProxy's `timeout queue` does), backends' max_conns
    (an entry followed through DNS gives its cap to each of its members)."""
    timeout = svc.queue_timeout if svc.queue_timeout is not None else svc.connect_timeout
    return {"maxconn": svc.maxconn, "queue_size": svc.queue_size, "queue_timeout": timeout,
            "max_conns": tuple(sorted((slot_of(t.id), t.backend.max_conns)
                                      for t in dns.targets(svc, members) if t.backend.max_conns))}


def access_fields(svc: Service, slot_of: Callable[[str], int],
                  members: Mapping[str, dns.Members] = NO_MEMBERS) -> dict[str, Any]:
    """[access] The plan's access fields of ``svc`` (config.Access): each backend's PROXY
    version (its own key, else the service's proxy_protocol.send) by slot (an entry followed
    through DNS gives its version to each of its members)."""
    a = svc.access
    versions = {"v1": 1, "v2": 2}
    send = []
    for t in dns.targets(svc, members):
        v = t.backend.proxy_protocol or a.pp_send
        if v:
            send.append((slot_of(t.id), versions[v]))
    return {"acl_allow": a.acl_allow, "acl_deny": a.acl_deny, "src_conns": a.per_source_conns,
            "src_rate": a.per_source_rate,
            "src_burst": (a.burst or a.per_source_rate) if a.per_source_rate else 0,
            "pp_accept_from": a.pp_accept_from, "pp_timeout": a.pp_timeout,
            "client_first_byte": a.client_first_byte, "pp_send": tuple(sorted(send))}


def log_sample(svc: Service) -> int:
    """[obs] The data path's sampling threshold: sample x 2**32 (2**32: every connection, 0:
    the log is off; core/connlog.pxi compares a 32-bit random number with it)."""
    if svc.log is None or not svc.log.connections:
        return 0
    return round(svc.log.sample * (1 << 32))


class ServiceRuntime:
    """One running service: its config, slots, health tracking, ramps and panic state."""

    def __init__(self, svc: Service, shared: SharedState, health: HealthChecker,
                 generation: Callable[[], int], members: Mapping[str, dns.Members] = NO_MEMBERS,
                 buffer_budget: int = 0) -> None:
        self.shared = shared
        self.buffer_budget = buffer_budget        # [mem] budget_per_worker([global])
        self.health = health
        self.generation = generation
        self.config: Service | None = None
        self.ramp: dict[str, float] = {}          # target id -> when its slow start began
        self.panic = False                        # as last logged
        self.members: dict[str, dns.Members] = dict(members)   # followed entry -> its members
        self.targets: dict[str, dns.Target] = {}              # id -> target, as configured
        self.configure(svc)

    @property
    def svc(self) -> Service:
        assert self.config is not None
        return self.config

    def configure(self, svc: Service, members: Mapping[str, dns.Members] | None = None) -> None:
        """Take a new config of this service (and, given, new members of its followed entries):
        release the slots of removed targets (a backend removed, a DNS member gone: both drain
        the same way), take slots for added ones (the caller checked there are enough), track
        health."""
        old = self.config
        self.config = svc
        if members is not None:
            self.members = dict(members)
        followed = {b.address.text for b in svc.backends if dns.follows(b)}
        self.members = {e: m for e, m in self.members.items() if e in followed}
        new = {t.id: t for t in dns.targets(svc, self.members)}
        for key in self.targets.keys() - new.keys():
            self.health.untrack(svc.name, key)
            self.ramp.pop(key, None)
            self.shared.release(svc.name, key, self.generation())
        self.shared.slot_for(svc.name, SERVICE_ROW)        # the service's own Gauges row
        slowstart = svc.health.slowstart if svc.health else 0.0
        for key, t in new.items():
            slot = self.shared.slot_for(svc.name, key)
            if old is not None and key not in self.targets and slowstart > 0:
                self.ramp[key] = time.monotonic()           # added: eased in
            o = orig_of(svc, t.backend)                                         # [orig]
            self.health.track(svc.name, key, slot, t.host, t.port, t.backend.health, o,
                              t.host if t.backend.srv else t.backend.address.host)
        self.targets = new

    def set_members(self, entry: str, members: dns.Members) -> None:
        """A followed entry's members changed (fastlb.dns): leavers drain, newcomers get slots."""
        self.configure(self.svc, {**self.members, entry: members})

    def ids_of(self, entry: str) -> list[str]:
        """The slot-table ids of a backend entry: itself, or its members."""
        return [key for key, t in self.targets.items() if t.backend.address.text == entry]

    def remove(self) -> None:
        for key in self.targets:
            self.health.untrack(self.svc.name, key)
            self.shared.release(self.svc.name, key, self.generation())
        self.targets = {}
        self.shared.release(self.svc.name, SERVICE_ROW, self.generation())

    def health_changed(self, address: str, up: bool) -> None:
        """Slow start begins when a backend comes back up. (Its passive failure streak is reset
        by each data path, which sees the bit go up: DataService.apply.)"""
        h = self.svc.health
        if up and h and h.slowstart > 0:
            self.ramp[address] = time.monotonic()

    def plan(self, now: float) -> Plan:
        slots = self.shared.slots
        name = self.svc.name
        return compute_plan(self.svc, lambda a: slots.get((name, a), -1), self.shared.health.is_up,
                            self.ramp, now, self.members, buffer_budget=self.buffer_budget)

    def tick(self, plan: Plan, now: float) -> None:
        """Time moves: forget finished ramps; log a panic transition once."""
        h = self.svc.health
        for address, since in list(self.ramp.items()):
            if h is None or now - since >= h.slowstart:
                del self.ramp[address]
        if plan.panic != self.panic:
            self.panic = plan.panic
            up = sum(1 for b in plan.backends if self.shared.health.is_up(b.slot))
            log.warning("service %s: %s panic mode: %d of %d backends up (threshold %g%%)",
                        plan.name, "entering" if plan.panic else "leaving", up, len(plan.backends),
                        h.panic_threshold if h else 0)
