"""Services as the supervisor runs them: config snapshot + slots + health + ramps -> Plan.

Owner: each service's slots and health tracking (``ServiceRuntime.configure/remove``), its
slow-start ramps and its last logged panic state. ``compute_plan`` is a pure function of (the
service's config, its slots, the up slots, its ramps, now): same inputs, same Plan, nothing
changed. Time moves in ``tick`` (ramp expiry, panic transitions logged once), called by the
supervisor's ramp loop and after each change, never while a plan is computed.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Mapping

from fastlb import _core
from fastlb.config import MAX_WEIGHT, Service
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


def compute_plan(svc: Service, slot_of: Callable[[str], int], is_up: Callable[[int], bool],
                 ramps: Mapping[str, float], now: float) -> Plan:
    """The data path's view of ``svc`` at ``now``: ready backends with their effective weights
    (a ramp started at ``ramps[address]`` eases a backend in over health.slowstart), and panic
    mode (fewer than panic_threshold % of the ready backends up: all count as up). Pure."""
    h = svc.health
    slowstart = h.slowstart if h is not None else 0.0
    live = {a: since for a, since in ramps.items() if slowstart > 0 and now - since < slowstart}
    ready = [b for b in svc.backends if b.state == "ready"]   # drain/maint: no new connection
    scale = RAMP_SCALE if live and all(b.weight * RAMP_SCALE <= MAX_WEIGHT for b in ready) else 1
    backends = []
    for b in ready:
        w = b.weight * scale
        since = live.get(b.address.text)
        if since is not None:
            w = max(1, int(w * (now - since) / slowstart))
        backends.append(PlanBackend(slot_of(b.address.text), w, b.address.text, b.address.host,
                                    b.address.port))
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
                names=tuple((slot_of(b.address.text), b.address.text) for b in svc.backends),
                options=policy_options(svc),
                log_sample=log_sample(svc))                                    # [obs]


def log_sample(svc: Service) -> int:
    """[obs] The data path's sampling threshold: sample x 2**32 (2**32: every connection, 0:
    the log is off; core/connlog.pxi compares a 32-bit random number with it)."""
    if svc.log is None or not svc.log.connections:
        return 0
    return round(svc.log.sample * (1 << 32))


class ServiceRuntime:
    """One running service: its config, slots, health tracking, ramps and panic state."""

    def __init__(self, svc: Service, shared: SharedState, health: HealthChecker,
                 generation: Callable[[], int]) -> None:
        self.shared = shared
        self.health = health
        self.generation = generation
        self.config: Service | None = None
        self.ramp: dict[str, float] = {}          # address -> when its slow start began
        self.panic = False                        # as last logged
        self.configure(svc)

    @property
    def svc(self) -> Service:
        assert self.config is not None
        return self.config

    def configure(self, svc: Service) -> None:
        """Take a new config of this service: release the slots of removed backends, take
        slots for added ones (the prepare step checked there are enough), track health."""
        old = self.config
        self.config = svc
        if old is not None:
            keep = {x.address.text for x in svc.backends}
            for b in old.backends:
                if b.address.text not in keep:
                    self.health.untrack(svc.name, b.address.text)
                    self.ramp.pop(b.address.text, None)
                    self.shared.release(svc.name, b.address.text, self.generation())
        self.shared.slot_for(svc.name, SERVICE_ROW)        # the service's own Gauges row
        slowstart = svc.health.slowstart if svc.health else 0.0
        old_addresses = {b.address.text for b in old.backends} if old else set()
        for b in svc.backends:
            slot = self.shared.slot_for(svc.name, b.address.text)
            if old is not None and b.address.text not in old_addresses and slowstart > 0:
                self.ramp[b.address.text] = time.monotonic()       # added: eased in
            self.health.track(svc.name, b.address.text, slot, b.address.host, b.address.port, b.health)

    def remove(self) -> None:
        for b in self.svc.backends:
            self.health.untrack(self.svc.name, b.address.text)
            self.shared.release(self.svc.name, b.address.text, self.generation())
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
                            self.ramp, now)

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
