"""The supervisor: the lifecycle of ``fastlb run``.

Owner: the registry and the change pipeline, the listening sockets (fastlb.listeners), the
running services (fastlb.runtime), the health checker, the state file, the admin socket and
metrics, signals, and the one DataPath (fastlb.plan) it feeds: in-process with ``workers = 1``
(fastlb.dataplane.LocalDataPath), else worker processes (fastlb.pool.WorkerPool). Which one is
chosen once, in ``make_datapath``; nothing else here asks. Admin ops are fastlb.handlers.

A change (admin mutation, reload) follows STYLE.md point 9, strictly:
  1. validate: Registry.plan / reconcile (in a thread: it may resolve host names);
  2. prepare: everything that can fail, before anything is kept: free slots, binding new
     listeners, packing addresses and building policies (DataPath.check);
     a failure replies with its error and changes nothing, anywhere;
  3. persist (StateStore.save_async, fsynced, in a thread so the data path keeps running);
  4. commit (one assignment), apply (to the data path: for the next connection), then a
     reload's pool resize (best effort: processes started cannot be un-started), reply.
Applying is not expected to fail; if it does (a bug), the error is logged and the data path
keeps its previous snapshot: the supervisor goes on serving every other request.
SIGTERM stops accepting in every mode at once (the listening sockets are shut), lets open
connections finish for ``grace`` seconds, then closes them; SIGINT closes everything at once;
SIGHUP reloads the config. Signals received while starting are acted on once started.
Backends given by host name or SRV record are followed by fastlb.dns (a Watcher, primed before
the services start): their members are derived state, applied under the same lock as a change
(``_on_members``: prepare, apply; never persisted: a restart asks DNS again).
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import signal
import socket
import time
from typing import Any, Mapping

from fastlb import _core, config, dns, leases, preflight, sdnotify, signals, statefile
from fastlb import tickets                                                     # [tlsops]
from fastlb.admin.protocol import Request
from fastlb.admin.server import AdminServer, admin_token, clear_stale_socket
from fastlb.admin.server import load_tls, tls_context                          # [tlsops]
from fastlb.config import Config, Service
from fastlb.dataplane import LocalDataPath
from fastlb.errors import ConfigError, FastLBError, RegistryError, StateFileError
from fastlb.handlers import audit, dispatch, stats
from fastlb.health import HealthChecker
from fastlb.listeners import Listeners, fmt, listen_opts                     # [listenopts]
from fastlb.plan import SNI_GROUP, DataPath, ListenKey, Snapshot, sni_addresses
from fastlb.registry import Registry, reconcile
from fastlb.runtime import ServiceRuntime, budget_per_worker, compute_plan
from fastlb.shm import SERVICE_ROW, SharedState, blocks_for
from fastlb.worker import raise_fd_limit

log = logging.getLogger("fastlb")


def initial_registry(cfg: Config, ignore_state: bool = False,
                     store: statefile.StateStore | None = None) -> dict[str, Service]:
    """The registry to start with: the config, overlaid by the state file (see README)."""
    services = {s.name: s for s in cfg.services}
    if store is None or ignore_state:
        return services
    loaded = store.load()                  # raises StateFileError: refuse to start
    if loaded is None:
        return services
    registry, recorded_config = loaded
    return reconcile(registry, recorded_config, services)


def _slot_or_none(slots: Mapping[tuple[str, str], int], service: str, address: str) -> int:
    return slots.get((service, address), -1)          # -1: a backend the change adds


def what_changed(before: Mapping[str, Service], after: Mapping[str, Service]) -> str:
    """A reload's log words: services added, removed and changed (with the backends added and
    removed of each), or "nothing changed"."""
    added = sorted(after.keys() - before.keys())
    removed = sorted(before.keys() - after.keys())
    changed = []
    for name in sorted(after.keys() & before.keys()):
        if after[name] == before[name]:
            continue
        old = {b.address.text for b in before[name].backends}
        new = {b.address.text for b in after[name].backends}
        parts = [f"+{a}" for a in sorted(new - old)] + [f"-{a}" for a in sorted(old - new)]
        changed.append(f"{name} ({', '.join(parts) if parts else 'settings'})")
    words = ([f"added {', '.join(added)}"] if added else []) + \
        ([f"removed {', '.join(removed)}"] if removed else []) + \
        ([f"changed {'; '.join(changed)}"] if changed else [])
    return "; ".join(words) or "nothing changed"


def wanted_listeners(services: Mapping[str, Service],
                     among: Mapping[str, Service] | None = None) -> set[ListenKey]:
    """The listening sockets ``services`` need; an address shared by SNI routing (in
    ``among``, default ``services``) is one socket of the group (plan.SNI_GROUP)."""
    shared = sni_addresses((among if among is not None else services).values())     # [sni]
    return {(SNI_GROUP if (a.host, a.port) in shared else s.name, a.host, a.port)
            for s in services.values() for a in s.listen}


def make_datapath(cfg: Config, loop: asyncio.AbstractEventLoop, shared: SharedState,
                  on_passive: Any, log_level: str) -> DataPath:
    """The one place that looks at the mode."""
    if cfg.global_.workers == 1:
        return LocalDataPath(loop, shared.health, shared.counters, on_passive, shared.gauges,
                             sources=shared.sources, connlog=shared.connlog)   # [access] [obs]
    from fastlb.pool import WorkerPool
    return WorkerPool(loop, shared.fd, shared.size, shared.max_backends, shared.counters, shared.gauges,
                      workers=cfg.global_.workers, grace=cfg.global_.grace, log_level=log_level,
                      on_passive=on_passive)


class View:
    """The handlers' read-only view of slots, health and counters (handlers.StatsView)."""
    maxconn = 0           # [limits] [global] maxconn as resolved (fastlb.preflight.maxconn)
    etcd_info: Any = None  # [etcd] () -> the etcd watcher's state (handlers.stats), None: no etcd

    def __init__(self, shared: SharedState, health: HealthChecker,
                 runtimes: Mapping[str, ServiceRuntime] | None = None,
                 watcher: dns.Watcher | None = None) -> None:
        self.shared, self.health = shared, health
        self.runtimes = runtimes if runtimes is not None else {}
        self.watcher = watcher

    def dns_entry(self, service: str, b: config.Backend, stats: bool) -> dict[str, Any] | None:
        """[dns] A backend given by host name or SRV: the entry with its members under it
        (handlers.backend_info asks; None for an IP-literal backend)."""
        if not dns.follows(b):
            return None
        rt = self.runtimes.get(service)
        members = rt.members.get(b.address.text, ()) if rt else ()
        status = (self.watcher.status.get((service, b.address.text), "not resolved yet")
                  if self.watcher else "not followed")
        return dns.entry_info(self, service, b, members, status, stats, _core.COUNTER_FIELDS)

    def slot(self, service: str, address: str) -> int | None:
        return self.shared.slots.get((service, address))

    def is_up(self, slot: int) -> bool:
        return bool(self.shared.health.is_up(slot))

    def counters(self, slot: int) -> dict[str, int]:
        return dict(self.shared.counters.slot_stats(slot))

    def check(self, service: str, address: str) -> tuple[int, str] | None:
        hs = self.health.state(service, address)
        return (hs.check_failures, hs.reason) if hs else None

    leases: leases.LeaseTable | None = None       # [leases] the supervisor's table

    def lease_info(self, service: str, address: str) -> dict[str, Any] | None:
        """[leases] A registered backend's lease (handlers.backend_info asks); None: not one."""
        lease = self.leases.of_backend(service, address) if self.leases is not None else None
        return self.leases.info(lease, time.monotonic()) if lease is not None and \
            self.leases is not None else None

    def gauges(self, service: str | None, address: str = SERVICE_ROW) -> dict[str, int]:
        """[limits] The Gauges row of a backend, of a service (address SERVICE_ROW) or, with
        service None, of the whole balancer."""
        g = self.shared.gauges
        row = g.nrows - 1 if service is None else self.shared.slots.get((service, address))
        return g.row(row) if row is not None else dict.fromkeys(_core.GAUGE_FIELDS, 0)


class Supervisor:
    """``run()`` returns the process exit code."""

    def __init__(self, cfg: Config, loop: asyncio.AbstractEventLoop, *, config_path: str | None = None,
                 ignore_state: bool = False, log_level: str = "info") -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.loop = loop
        self.cfg_services = {s.name: s for s in cfg.services}
        # The state file: loaded with fallback to its previous generation; written before every
        # acknowledgement; retried in the background when it cannot be written at start.
        self.state = statefile.StateStore(cfg.global_.state_file) if cfg.global_.state_file else None
        self.registry = Registry(initial_registry(cfg, ignore_state, self.state))
        # [leases] registered backends' leases: from the state file, each with a grace of one
        # TTL to be renewed (a restart must not drop instances that renew every ttl/3)
        self.leases = leases.LeaseTable()
        if self.state is not None and not ignore_state and self.state.leases:
            kept, dropped = self.leases.restore(self.state.leases, self.registry.snapshot,
                                                time.monotonic())
            log.info("leases: %d restored from the state file, each due for renewal within its "
                     "TTL%s", kept, f"; {dropped} dropped (their backend is no longer "
                     f"configured)" if dropped else "")
        total = sum(1 + len(s.backends) for s in self.registry.snapshot.values())   # + its row
        self.shared = SharedState(max(cfg.max_backends, 2 * total), blocks_for(cfg.global_.workers),
                                  cfg.global_.source_table_size)                      # [access]
        self.health = HealthChecker(self.shared.health, self._on_health)
        self.runtimes: dict[str, ServiceRuntime] = {}
        self.dns = dns.Watcher(cfg.global_.dns, self._on_members)   # host names and SRV entries
        self.view = View(self.shared, self.health, self.runtimes, self.dns)
        self.view.leases = self.leases                                         # [leases]
        self.etcd = self._etcd_watcher(cfg)                                    # [etcd]
        self.view.maxconn = preflight.maxconn(cfg)                              # [limits]
        log.info("maxconn %d%s", self.view.maxconn, "" if cfg.global_.maxconn else
                 f" (derived from the fd limit {preflight.fd_limit()})")
        self.listeners = Listeners()
        self.gen = 0                               # of the last snapshot pushed
        self.datapath = make_datapath(cfg, loop, self.shared, self._on_passive, log_level)
        self.tickets = tickets.TicketKeys(time.monotonic)   # [tlsops] shared ticket keys
        self.shared.acked = self.datapath.acked
        self.admin_server: AdminServer | None = None
        self.metrics_server: Any = None          # fastlb.httpapi's server on [global] metrics
        self._mutation = asyncio.Lock()
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        # [leases] registrations waiting for the next batch (_register), and its runner
        self._reg_queue: list[tuple[dict[str, Any], str | None, asyncio.Future[dict[str, Any]]]] = []
        self._reg_runner: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._mode = "term"
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = False                       # signals before it are queued in _early
        self.connlog: Any = None                  # [obs] fastlb.connlog.Drainer, once running
        self._early: list[int] = []

    @property
    def snapshot(self) -> Mapping[str, Service]:
        return self.registry.snapshot

    # -- the change pipeline --------------------------------------------------------------------
    def _members(self, name: str) -> Mapping[str, dns.Members]:
        """[dns] The members of a service's followed entries: its runtime's, else the watcher's."""
        rt = self.runtimes.get(name)
        return rt.members if rt is not None else self.dns.of(name)

    def _trial(self, services: Mapping[str, Service],
               members: Mapping[str, Mapping[str, dns.Members]] | None = None) -> Snapshot:
        """The snapshot ``services`` would give (new backends without a slot yet: -1), with
        ``members[service]`` instead of the members a service has now, when given."""
        now = time.monotonic()
        plans = []
        slots, health = self.shared.slots, self.shared.health
        for svc in services.values():
            rt = self.runtimes.get(svc.name)
            plans.append(compute_plan(svc, functools.partial(_slot_or_none, slots, svc.name),
                                      lambda slot: slot >= 0 and bool(health.is_up(slot)),
                                      rt.ramp if rt else {}, now,
                                      members[svc.name] if members and svc.name in members
                                      else self._members(svc.name),
                                      buffer_budget=budget_per_worker(self.cfg.global_)))   # [mem]
        return Snapshot(self.gen + 1, tuple(plans), tuple(sorted(wanted_listeners(services))),
                        maxconn=self.view.maxconn)                              # [limits]

    def _need(self, svc: Service, members: Mapping[str, dns.Members]) -> int:
        """Slots ``svc`` with ``members`` would take that it has not now."""
        keys = [SERVICE_ROW, *(t.id for t in dns.targets(svc, members))]
        return sum(1 for key in keys if (svc.name, key) not in self.shared.slots)

    def _prepare(self, nxt: Mapping[str, Service]) -> dict[ListenKey, socket.socket]:
        """Everything that can fail, before anything is kept. Returns the new listening
        sockets (to adopt on commit, or discard). Raises FastLBError: nothing changed."""
        need = sum(self._need(s, self._members(s.name)) for s in nxt.values())
        self.shared.can_take(need)
        wanted = wanted_listeners(nxt)
        new = self.listeners.bind(wanted, opts=listen_opts(wanted, nxt))           # [listenopts]
        try:
            self.datapath.check(self._trial(nxt))
        except BaseException:
            self.listeners.discard(new)
            raise
        return new

    async def _change(self, nxt: dict[str, Service], cfg_services: Mapping[str, Service] | None = None,
                      workers: int | None = None,
                      lease_wire: list[dict[str, Any]] | None = None) -> None:
        """Prepare, persist, commit, apply. Caller holds self._mutation. ``lease_wire``: the
        leases to persist ([leases]; default: the table's, less those whose backend goes)."""
        new = self._prepare(nxt)
        try:
            if self.state is not None:
                try:    # in a thread (fsync), in call order with the start-up retry
                    await self.state.save_async(
                        nxt, cfg_services if cfg_services is not None else self.cfg_services,
                        lease_wire if lease_wire is not None else self.leases.wire(nxt))
                except StateFileError as exc:
                    raise RegistryError("persist_failed", f"{exc}; nothing changed") from None
        except BaseException:
            self.listeners.discard(new)
            raise
        self.registry.commit(nxt)
        if cfg_services is not None:
            self.cfg_services = dict(cfg_services)
        for lease in self.leases.orphans(nxt):     # [leases] its backend was removed: it goes
            self.leases.remove(lease.id)
            log.info("lease %s (service %s, backend %s) dropped: its backend was removed",
                     lease.id, lease.service, lease.address)
        self._apply(nxt, new)
        if workers is not None:
            # After the commit, best effort: starting or stopping processes cannot be undone,
            # so it must not run before a step that can still refuse the change. The worker
            # count is not in the state file; the next reload tries again.
            try:
                if await self.datapath.resize(workers):
                    g = dataclasses.replace(self.cfg.global_, workers=workers)
                    self.cfg = dataclasses.replace(self.cfg, global_=g)
            except (FastLBError, OSError) as exc:
                log.error("reload: workers = %d not applied (the services were): %s", workers, exc)

    def _apply(self, snapshot: Mapping[str, Service], new: Mapping[ListenKey, socket.socket]) -> None:
        if self._stopping:            # a change that was persisting when SIGTERM came: no new
            self.listeners.discard(new)   # listener may open once the others are shut
            new = {}
        try:
            for name in list(self.runtimes):
                if name not in snapshot:
                    self.runtimes.pop(name).remove()
                    log.info("service %s removed", name)
            for name, svc in snapshot.items():
                rt = self.runtimes.get(name)
                if rt is None:
                    self.runtimes[name] = ServiceRuntime(svc, self.shared, self.health, lambda: self.gen + 1,
                                                         self.dns.of(name),
                                                         budget_per_worker(self.cfg.global_))   # [mem]
                elif rt.config != svc:
                    rt.configure(svc)
            self.dns.sync(snapshot)                   # follow added entries, forget removed ones
            self._etcd_sync(snapshot)                 # [etcd] a service added: its members
            self.listeners.adopt(new)
            wanted = wanted_listeners(snapshot)                                 # [listenopts] a
            self.listeners.configure(listen_opts(wanted, snapshot))             # change: in place
            for key, sock in sorted(new.items()):
                if key[0] == SNI_GROUP:                                           # [sni]
                    log.info("listening on %s, routed by SNI", fmt(sock.getsockname()))
                    continue
                svc = snapshot[key[0]]
                log.info("service %s: listening on %s (%s, %d backends)", key[0], fmt(sock.getsockname()),
                         svc.policy, len(svc.backends))
        except Exception:  # noqa: BLE001 - a bug: keep serving, say so
            log.exception("applying a committed change failed (a bug); serving goes on")
        self.push()

    def push(self) -> None:
        """Send every service's current plan to the data path (the next snapshot). Never raises."""
        if self._stopping:
            return                        # the data path no longer accepts; nothing to tell it
        try:
            now = time.monotonic()
            plans = []
            for rt in self.runtimes.values():
                plan = rt.plan(now)
                rt.tick(plan, now)
                plans.append(plan)
            wanted = wanted_listeners({name: rt.svc for name, rt in self.runtimes.items()})
            if self.tickets.sync({p.name: p.tls_ticket_lifetime for p in plans if p.tls_certs},
                                 {n: rt.svc.tls.ticket_keys for n, rt in self.runtimes.items()
                                  if rt.svc.tls is not None and rt.svc.tls.ticket_keys}):
                self.datapath.set_tickets(self.tickets.wire())                  # [tlsops]
            self.gen += 1
            self.datapath.apply(Snapshot(self.gen, tuple(plans), tuple(sorted(wanted)),
                                         maxconn=self.view.maxconn),            # [limits]
                                self.listeners.socks)
            self.listeners.close_unwanted(wanted)
        except Exception:  # noqa: BLE001 - a bug: the data path keeps its previous snapshot
            log.exception("pushing a snapshot to the data path failed (a bug)")

    async def mutate(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        async with self._mutation:
            nxt, ev = await asyncio.to_thread(self.registry.plan, op, args)
            await self._change(nxt)
            ev["generation"] = self.registry.generation
            self._after(op, args)
            if op in ("add_service", "remove_service"):
                self._refresh_tokens()                                         # [leases]
            self.publish(ev)
            return ev

    # -- [leases] self-registration (fastlb/leases.py) ---------------------------------------------
    async def lease(self, op: str, args: dict[str, Any], scope: str | None) -> dict[str, Any]:
        """The admin ops register/renew/deregister (handlers dispatches them here, with the
        connection's scope: the service of its registration token, None for the operator)."""
        if op == "renew":       # a deadline in memory only: no persist, no lock, no generation
            lease = self.leases.renew(args["lease"], time.monotonic(), scope)
            return {"lease": lease.id, "ttl": lease.ttl}
        async with self._mutation:
            if op == "deregister":
                lease = self.leases.get(args["lease"], scope)
                gen = await self._drop_leases([lease])
                return {"op": "deregister", "lease": lease.id, "service": lease.service,
                        "address": lease.address, "generation": gen}
        return await self._register(args, scope)

    async def _register(self, args: dict[str, Any], scope: str | None) -> dict[str, Any]:
        """Queue a registration for the next batch and wait for its outcome. Registrations
        that arrive while a change is under way are applied together, in one change and one
        state file write (a group commit: a fleet that starts at once costs a few fsyncs and
        plan rebuilds, not one per instance, and the data path sharing this process with
        workers = 1 is not held up by a thousand of them)."""
        fut: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self._reg_queue.append((args, scope, fut))
        if self._reg_runner is None or self._reg_runner.done():
            self._reg_runner = self.loop.create_task(self._register_batches())
        return await fut

    async def _register_batches(self) -> None:
        while self._reg_queue:
            async with self._mutation:
                batch, self._reg_queue = self._reg_queue, []
                try:
                    await self._register_batch(batch)
                finally:                  # cancelled at shutdown, or a bug: nobody waits forever
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_exception(RegistryError("stopping", "fastlb is stopping"))

    def _plan_register(self, services: dict[str, Service], args: dict[str, Any],
                       scope: str | None, planned: dict[tuple[str, str], leases.Lease]
                       ) -> tuple[dict[str, Service], leases.Lease]:
        """One registration on top of ``services`` (the snapshot with the batch's earlier
        ones): (next services, its lease); raises RegistryError, changing nothing."""
        name, address = args["service"], args["address"]
        if scope is not None and scope != name:         # before the registry: no name leaks
            raise leases.forbidden(scope, f"cannot register into service {name!r}")
        if name not in services:
            self.registry.service(name)                 # raises unknown_service
        svc = services[name]
        weight = args.get("weight", 1)
        pending = sum(1 for (s, a) in planned if s == name and not self.leases.of_backend(s, a))
        lease = self.leases.plan(name, address, weight, float(args["ttl"]), args.get("metadata", {}),
                                 max_ttl=svc.registration.max_ttl if svc.registration else None,
                                 scope=scope, pending=pending)
        held = self.leases.of_backend(name, address) is not None or (name, address) in planned
        if held:
            # The instance registers again (it restarted, or lost its reply): the new lease
            # replaces the old one, with the weight it asks now (Consul: a re-registration of
            # a service id replaces it; etcd: the key is put again under the new lease).
            backends = tuple(dataclasses.replace(b, weight=weight) if b.address.text == address
                             else b for b in svc.backends)
            return {**services, name: dataclasses.replace(svc, backends=backends)}, lease
        if any(b.address.text == address for b in svc.backends):
            raise RegistryError("exists", f"service {name!r} already has backend {address!r} "
                                f"from the config or the operator; a registration cannot "
                                f"take it over")
        try:
            # [dns] a host name is kept as written (fastlb.dns follows it), as add_backend does
            addr = config.parse_address(address, resolve=False)
        except ValueError as exc:
            raise RegistryError("invalid", f"address: {exc}") from None
        if addr.port == 0:
            raise RegistryError("invalid", "address: a backend needs a port from 1 to 65535")
        # the service's checks, as a configured backend gets (service_from_dict) and add_backend
        backends = (*svc.backends, config.Backend(addr, weight, "ready", svc.health))
        return {**services, name: dataclasses.replace(svc, backends=backends)}, lease

    async def _register_batch(self, batch: list[tuple[dict[str, Any], str | None,
                                                      asyncio.Future[dict[str, Any]]]]) -> None:
        """Plan every registration of the batch (a refused one fails alone), then one change
        for the others. Caller holds self._mutation."""
        services = dict(self.registry.snapshot)
        planned: dict[tuple[str, str], leases.Lease] = {}
        granted: list[tuple[leases.Lease, asyncio.Future[dict[str, Any]]]] = []
        for args, scope, fut in batch:
            try:
                services, lease = self._plan_register(services, args, scope, planned)
            except Exception as exc:  # noqa: BLE001 - refused (or a bug): this one fails alone
                fut.set_exception(exc)
                continue
            planned[(lease.service, lease.address)] = lease
            granted.append((lease, fut))
        if not granted:
            return
        try:
            await self._change(services, lease_wire=self.leases.wire(
                services, adds=[lease for lease, _ in granted]))
        except Exception as exc:   # noqa: BLE001 - refused (persist_failed, full...): each is told
            for _, fut in granted:
                if not fut.done():
                    fut.set_exception(exc)
            return
        now = time.monotonic()
        for lease, fut in granted:
            self.leases.add(lease, now)
            ev = {"op": "register", "service": lease.service, "address": lease.address,
                  "lease": lease.id, "ttl": lease.ttl, "weight": lease.weight,
                  "generation": self.registry.generation}
            self.publish(ev)
            if not fut.done():
                fut.set_result(ev)

    async def _drop_leases(self, gone: list[leases.Lease]) -> int:
        """Remove these leases and their backends, as remove_backend does (open connections go
        on, no new ones): persisted, then applied. Caller holds self._mutation. Returns the
        generation; raises (nothing changed, the leases stay) when the change is refused."""
        ids = {lease.id for lease in gone}
        self.leases.closing |= ids
        try:
            nxt = leases.without(self.registry.snapshot, gone)
            await self._change(nxt, lease_wire=self.leases.wire(nxt, drop=ids))
        finally:
            self.leases.closing -= ids
        for lease in gone:
            self.leases.remove(lease.id)
            self.publish({"op": "deregister", "service": lease.service, "address": lease.address,
                          "lease": lease.id, "generation": self.registry.generation})
        return self.registry.generation

    async def _lease_loop(self) -> None:
        """The expiry sweep: every leases.SWEEP_INTERVAL, the leases past their deadline go
        (their backends removed in one change, one state file write), each with an audit line."""
        while True:
            await asyncio.sleep(leases.SWEEP_INTERVAL)
            if self._stopping or not self.leases.expired(time.monotonic()):
                continue
            async with self._mutation:
                due = self.leases.expired(time.monotonic())      # a renewal may have come
                if not due or self._stopping:
                    continue
                try:
                    gen = await self._drop_leases(due)
                except FastLBError as exc:
                    log.error("leases: %d expired lease(s) not removed yet (retrying): %s",
                              len(due), getattr(exc, "message", exc))
                    continue
                except Exception:  # noqa: BLE001 - a bug: say so; the sweep goes on
                    log.exception("leases: removing %d expired lease(s) failed (a bug)", len(due))
                    continue
                for lease in due:
                    audit("lease expiry", "deregister", {"lease": lease.id, "service": lease.service,
                          "address": lease.address, "ttl": lease.ttl}, {"generation": gen})

    def _registration_tokens(self, services: Any, strict: bool) -> dict[str, str]:
        operator = self.admin_server.token if self.admin_server is not None else None
        tokens, problems = leases.read_tokens(services, operator, strict=strict)
        for p in problems:
            log.error("%s; that service takes registrations from the operator only", p)
        return tokens

    def _refresh_tokens(self) -> None:
        """[leases] The registration tokens of the services now (after add/remove_service)."""
        if self.admin_server is not None and self.admin_server.token is not None:
            self.admin_server.set_registration_tokens(
                self._registration_tokens(self.registry.snapshot.values(), strict=False))

    def _after(self, op: str, args: dict[str, Any]) -> None:
        """Effects on open connections: maint with close, drain with a timeout."""
        if op != "set_state":
            return
        key = (args["service"], args["address"])
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        if args["state"] == "maint" and args.get("close"):
            self._close_backend(*key, "maint")
        elif args["state"] == "drain" and "timeout" in args:
            self._timers[key] = self.loop.call_later(args["timeout"], self._drain_expired, *key)

    def _drain_expired(self, service: str, address: str) -> None:
        self._timers.pop((service, address), None)
        svc = self.registry.snapshot.get(service)
        if svc and any(b.address.text == address and b.state == "drain" for b in svc.backends):
            self._close_backend(service, address, "drain timeout")

    def _close_backend(self, service: str, address: str, why: str) -> None:
        rt = self.runtimes.get(service)
        for key in rt.ids_of(address) if rt is not None else [address]:   # [dns] its members
            slot = self.shared.slots.get((service, key))
            if slot is not None:
                self.datapath.close_backend(service, slot, why)   # each data path logs its count

    async def _on_members(self, service: str, entry: str, members: dns.Members) -> bool:
        """[dns] A followed entry's members changed. Derived state, so not persisted and no
        registry generation: prepared (slots, the data path's check) and applied under the
        change lock, like a change. Leavers drain as a removed backend does. Returns False
        when refused (logged; the watcher offers them again at its next refresh)."""
        async with self._mutation:
            rt = self.runtimes.get(service)
            if self._stopping or rt is None or not any(
                    b.address.text == entry and dns.follows(b) for b in rt.svc.backends):
                return True                            # gone meanwhile: nothing to apply
            nxt = {**rt.members, entry: members}
            try:
                self.shared.can_take(self._need(rt.svc, nxt))
                self.datapath.check(self._trial(self.registry.snapshot, {service: nxt}))
            except FastLBError as exc:
                log.error("service %s: backend %s: DNS members %s not applied: %s", service, entry,
                          ", ".join(m.hostport for m in members), getattr(exc, "message", exc))
                return False
            rt.set_members(entry, members)
            self.push()
            self.publish({"op": "dns", "service": service, "address": entry,
                          "members": [m.hostport for m in members]})
            return True

    # -- [etcd] services whose backends are keys in etcd (fastlb.etcd) ---------------------------
    def _etcd_watcher(self, cfg: Config) -> Any:
        if cfg.etcd is None:
            return None
        from fastlb import etcd
        w = etcd.Watcher(cfg.etcd, self._on_etcd)
        self.view.etcd_info = w.info
        return w

    def _etcd_sync(self, snapshot: Mapping[str, Service]) -> None:
        """[etcd] Services whose backends differ from what etcd says (added by a reload or the
        admin; loaded from the state file with keys deleted meanwhile): apply etcd's, soon
        (under the change lock). Nothing before the first list (the state file's serve)."""
        if self.etcd is None or self.etcd.status.lists == 0:
            return
        from fastlb import etcd
        for name, svc in snapshot.items():
            entries = self.etcd.members.get(name, {})
            if svc.discovery == "etcd" and etcd.backends_of(svc, entries) != svc.backends:
                task = self.loop.create_task(self._on_etcd(name, dict(entries)))
                self._tasks.append(task)                  # referenced until done
                task.add_done_callback(self._tasks.remove)

    async def _on_etcd(self, service: str, entries: Mapping[str, Any]) -> None:
        """[etcd] A service's members in etcd changed: its backends become them, through the
        change pipeline (validated, persisted: a restart with etcd down serves the last known
        members, committed, applied). Leavers drain as a removed backend does."""
        from fastlb import etcd
        async with self._mutation:
            svc = self.registry.snapshot.get(service)
            if self._stopping or svc is None or svc.discovery != "etcd":
                return
            if self.etcd is not None and self.etcd.status.lists:
                entries = self.etcd.members.get(service, {})        # the newest, under the lock
            backends = etcd.backends_of(svc, entries)
            if backends == svc.backends:
                return
            old = {b.address.text: b for b in svc.backends}
            nxt = {**self.registry.snapshot, service: dataclasses.replace(svc, backends=backends)}
            try:
                await self._change(nxt)
            except FastLBError as exc:
                log.error("service %s: etcd members not applied: %s", service, getattr(exc, "message", exc))
                return
            words = [f"+{b.address.text}" for b in backends if b.address.text not in old] + \
                [f"-{a}" for a in sorted(old.keys() - {b.address.text for b in backends})] + \
                [f"{b.address.text} weight {b.weight} {b.state}" for b in backends
                 if b.address.text in old and old[b.address.text] != b]
            log.info("service %s: etcd: %s (revision %d)", service, ", ".join(words),
                     self.etcd.status.revision if self.etcd else 0)
            self.publish({"op": "etcd", "service": service, "generation": self.registry.generation,
                          "backends": [b.address.text for b in backends]})

    async def etcd_write(self, op: str, args: dict[str, Any]) -> None:
        """[etcd] handlers' hook before a mutation: a weight or state change of an etcd-managed
        service is written to etcd first (compare-and-swap: a concurrent change is refused and
        nothing changes here); adding or removing its backends is etcd's business."""
        if op == "add_service" and isinstance(args.get("service"), dict) \
                and args["service"].get("discovery") == "etcd" and self.etcd is None:
            raise RegistryError("invalid", "service.discovery: \"etcd\" needs a [discovery.etcd] "
                                           "table in the config (at the next start)")
        if op not in ("set_weight", "set_state", "add_backend", "remove_backend", "set_max_conns"):
            return                                    # add_service carries a table
        svc = self.registry.snapshot.get(args["service"])
        if svc is None or svc.discovery != "etcd":
            return
        if op == "set_max_conns":                     # [limits] not in etcd's value: an etcd
            raise RegistryError("etcd_managed",       # change would silently undo it
                                f"service {svc.name!r} takes its backends from etcd: its "
                                f"backends' max_conns come from the service's config")
        if op in ("add_backend", "remove_backend"):
            raise RegistryError("etcd_managed", f"service {svc.name!r} takes its backends from etcd: "
                                                f"put or delete its key in etcd instead")
        if self.etcd is None:
            raise RegistryError("etcd_unreachable", "no [discovery.etcd] in this config")
        update = {"weight": args["weight"]} if op == "set_weight" else {"state": args["state"]}
        await self.etcd.write(svc.name, args["address"], update)

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file and apply what changed in it (see registry.reconcile)."""
        if not self.config_path:
            raise RegistryError("no_config", "fastlb was started without a config file")
        async with self._mutation:
            try:
                new_cfg = await asyncio.to_thread(config.load, self.config_path)
            except ConfigError as exc:
                raise RegistryError("invalid", f"reload refused, nothing changed: {exc}") from None
            token = self._reload_token(new_cfg)                   # [admin] before any change
            new_services = {s.name: s for s in new_cfg.services}
            nxt = reconcile(self.registry.snapshot, self.cfg_services, new_services)
            if (problem := config.listen_opts_problem(nxt.values())) is not None:  # [listenopts]
                raise RegistryError("invalid", f"reload refused, nothing changed: {problem} "
                                               f"(a service added through the admin shares it)")
            reg_tokens = None                                     # [leases] before any change
            if self.admin_server is not None and self.admin_server.token is not None:
                try:
                    reg_tokens, _ = leases.read_tokens(nxt.values(), token or self.admin_server.token)
                except FastLBError as exc:
                    raise RegistryError("invalid", f"reload refused, nothing changed: {exc}") from None
            g_old, g_new = self.cfg.global_, new_cfg.global_
            if dataclasses.replace(g_new, workers=0) != dataclasses.replace(g_old, workers=0):
                log.warning("reload: [global] changes other than workers take effect at the next start")
            before = dict(self.registry.snapshot)
            await self._change(nxt, new_services, g_new.workers if g_new.workers != g_old.workers else None)
            if token is not None and self.admin_server is not None:   # [admin] rotated
                self.admin_server.token = token
            self._reload_admin_tls(new_cfg)                               # [tlsops]
            if reg_tokens is not None and self.admin_server is not None:    # [leases]
                self.admin_server.set_registration_tokens(reg_tokens)
            ev = {"op": "reload", "generation": self.registry.generation, "services": sorted(nxt)}
            self.publish(ev)
            log.info("reloaded %s: %d service(s); %s", self.config_path, len(nxt),
                     what_changed(before, nxt))
            return ev

    def _reload_token(self, new_cfg: Config) -> str | None:
        """[admin] A reload re-reads the token file (with the rules of fastlb check): a bad one
        refuses the reload, a good one replaces the token once the reload is applied (rotation
        without a restart). None when the running admin is not TCP or its address changes (a
        [global] change, for the next start)."""
        if self.admin_server is None or self.admin_server.token is None \
                or new_cfg.global_.admin != self.cfg.global_.admin:
            return None
        try:
            return admin_token(new_cfg)
        except FastLBError as exc:
            raise RegistryError("invalid", f"reload refused, nothing changed: {exc}") from None

    def _reload_admin_tls(self, new_cfg: Config) -> None:
        """[tlsops] The admin's certificate files read again (renewed in place), when the
        running admin is TLS and admin_tls names the same files; never fails the reload (the
        files were checked when the configuration was read)."""
        srv, t = self.admin_server, new_cfg.global_.admin_tls
        if srv is None or srv.tls is None or t is None or t != self.cfg.global_.admin_tls:
            return
        try:
            load_tls(srv.tls, t)
        except (OSError, ValueError) as exc:
            log.error("reload: [global] admin_tls: %s; the admin keeps its certificate", exc)

    def publish(self, ev: dict[str, Any]) -> None:
        if self.admin_server is not None:
            self.admin_server.publish(ev)

    async def admin(self, req: Request) -> Any:
        return await dispatch(self, req)

    def stats(self) -> list[dict[str, Any]]:
        return stats(self.registry.snapshot, self.view)

    # -- events and loops ------------------------------------------------------------------------
    def _on_health(self, service: str, address: str, up: bool, reason: str) -> None:
        rt = self.runtimes.get(service)
        if rt is not None:
            rt.health_changed(address, up)
            self.push()
        self.publish({"op": "health", "service": service, "address": address,
                      "health": "up" if up else "down", "reason": reason})

    def _on_passive(self, service: str, address: str, failures: int, reason: str) -> None:
        self.health.passive_down(service, address, failures, reason)

    async def _ramp_loop(self) -> None:
        # Slow start: push new plans for services with ramping backends, in small steps.
        while True:
            steps = [rt.svc.health.slowstart / 20 for rt in self.runtimes.values()
                     if rt.ramp and rt.svc.health]
            await asyncio.sleep(max(0.05, min([1.0] + steps)))
            if any(rt.ramp for rt in self.runtimes.values()):
                self.push()

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.shared.reap()

    # -- running ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Bind and check each service on its own: one that cannot start is left out, loudly,
        and the others serve. Raises FastLBError when none can."""
        keep: dict[str, Service] = {}
        new: dict[ListenKey, socket.socket] = {}
        opts = listen_opts(wanted_listeners(self.registry.snapshot), self.registry.snapshot)
        for name, svc in self.registry.snapshot.items():
            try:
                got = self.listeners.bind(wanted_listeners({name: svc}, self.registry.snapshot)
                                          - new.keys(), change=False,     # [sni] a group's once
                                          opts=opts)                               # [listenopts]
                try:
                    self.datapath.check(self._trial({name: svc}))
                except BaseException:
                    self.listeners.discard(got)
                    raise
            except FastLBError as exc:
                log.error("service %s not started: %s", name, getattr(exc, "message", exc))
                continue
            keep[name] = svc
            new.update(got)
        if self.registry.snapshot and not keep:
            raise FastLBError("no service could start (see above)")
        if len(keep) != len(self.registry.snapshot):
            self.registry = Registry(keep)
        for lease in self.leases.orphans(self.registry.snapshot):    # [leases] service left out
            self.leases.remove(lease.id)
        self._apply(self.registry.snapshot, new)
        self._tasks = [self.loop.create_task(self._ramp_loop()), self.loop.create_task(self._reap_loop()),
                       self.loop.create_task(self._lease_loop())]                  # [leases]
        self._tasks.append(self.loop.create_task(self._ticket_loop()))                  # [tlsops]
        if self.state is not None and not self.state.save_at_start(
                self.registry.snapshot, self.cfg_services, self.leases.wire(self.registry.snapshot)):
            # logged loudly; fastlb serves, and admin changes are refused until a write works
            self._tasks.append(self.loop.create_task(
                self.state.retry(lambda: (self.registry.snapshot, self.cfg_services,
                                          self.leases.wire(self.registry.snapshot)))))

    async def _ticket_loop(self) -> None:
        """[tlsops] Turn the ticket key rings whose tls.ticket_lifetime is over (fastlb.
        tickets) and give the keys to the data paths; checked once a second."""
        while True:
            await asyncio.sleep(1.0)
            if self.tickets.turn_due():
                self.datapath.set_tickets(self.tickets.wire())

    def rotate_tickets(self, service: str | None = None) -> dict[str, Any]:
        """[tlsops] The admin's rotate_tickets: turn one service's ring (or every one) now,
        as HAProxy's `set ssl tls-key` pushes a key: tickets of the key dropped are refused."""
        names = [service] if service is not None else list(self.tickets.rings)
        if service is not None and service not in self.tickets.rings:
            raise RegistryError("unknown_service", f"no TLS service {service!r}; TLS services: "
                                f"{', '.join(sorted(self.tickets.rings)) or '(none)'}")
        if service is not None and self.tickets.rings[service].fixed:
            raise RegistryError("invalid", f"service {service!r} takes its ticket keys from "
                                f"tls.ticket_keys: append a key to the file and reload")
        names = [n for n in names if not self.tickets.rings[n].fixed]
        for name in names:
            self.tickets.turn(name)
        self.datapath.set_tickets(self.tickets.wire())
        return {"rotated": names}

    def request_stop(self, mode: str) -> None:
        if self._stop.is_set():
            mode = "int"                  # a second signal: stop at once
            self.datapath.stop_accepting("int")
        self._mode = mode
        self._stop.set()

    def _on_hup(self) -> None:
        async def run() -> None:
            sdnotify.reloading()                  # the service manager waits for READY=1
            why = "reloaded"
            try:
                audit("signal SIGHUP", "reload", {}, await self.reload())    # [admin] audit
            except FastLBError as exc:
                audit("signal SIGHUP", "reload", {}, error=exc)             # [admin] audit
                log.error("SIGHUP: %s", exc)
                why = f"reload failed, previous config serving: {exc}"
            except Exception as exc:  # noqa: BLE001 - a bug: say so; the supervisor goes on
                audit("signal SIGHUP", "reload", {}, error=exc)             # [admin] audit
                log.exception("SIGHUP: reload failed")
                why = f"reload failed (a bug, logged): {type(exc).__name__}"
            finally:
                sdnotify.ready(f"{why}; {self._status_line()}")
        self._tasks.append(self.loop.create_task(run()))     # referenced until shutdown

    # -- [obs] the connection log's reader (fastlb/connlog.py) ------------------------------------
    def _start_connlog(self, destination: str) -> Any:
        from fastlb import connlog

        def names() -> connlog.Names:
            formats = {s.name: s.log.format for s in self.registry.snapshot.values() if s.log}
            return connlog.names_from(self.shared.slots, formats, SERVICE_ROW)
        try:
            drainer = connlog.Drainer(self.shared.connlog, destination, names, self.loop)
        except OSError as exc:
            raise FastLBError(f"[global] connlog = {destination!r}: cannot open it: "
                              f"{exc.strerror or exc}") from None
        drainer.start()
        return drainer

    def _histograms(self) -> dict[str, Any]:
        from fastlb import connlog
        rows = {name: slot for (name, address), slot in self.shared.slots.items()
                if address == SERVICE_ROW}
        return connlog.histograms(self.shared.connlog, rows)

    def _status_line(self) -> str:
        """sd_notify's STATUS= (systemctl status shows it)."""
        return (f"serving {len(self.runtimes)} service(s) with {self.cfg.global_.workers} "
                f"worker(s), {self.datapath.connections()} connection(s) open")

    def _on_signal(self, sig: int) -> None:
        if not self._ready:
            self._early.append(sig)       # acted on once ready (after READY=1), in order
            return
        if sig == signal.SIGHUP:
            self._on_hup()
        elif sig == signal.SIGUSR1:               # [obs] logrotate: reopen the connection log
            if self.connlog is not None:
                self.connlog.reopen()
        else:
            self.request_stop("term" if sig == signal.SIGTERM else "int")

    async def run(self) -> int:
        for sig in signals.DEFERRED:
            self.loop.add_signal_handler(sig, self._on_signal, sig)
        early = signals.take()                # received while starting: acted on once started
        if self.cfg.global_.admin:
            clear_stale_socket(self.cfg.global_.admin)   # a live one: refuse before touching state
        # [leases] the services' registration tokens (TCP admin only: the unix socket is the
        # owner's, with full rights); a bad token file refuses the start, as the admin's does
        reg_tokens = leases.read_tokens(self.registry.snapshot.values(), admin_token(self.cfg))[0] \
            if self.cfg.global_.admin and self.cfg.global_.admin.startswith("tcp:") else {}
        self.connlog = self._start_connlog(self.cfg.global_.connlog)         # [obs] first: may refuse
        await self.dns.prime(self.registry.snapshot)   # host names' members before serving
        self.start()
        await self.datapath.start()
        if self.etcd is not None:                    # [etcd] list, then watch (fastlb.etcd)
            await self.etcd.prime()
            self._etcd_sync(self.registry.snapshot)   # services without any key: none now
            self.etcd.start()
        g = self.cfg.global_
        if g.admin:
            self.admin_server = AdminServer(               # [admin] its defences: config keys
                g.admin, self.admin, token=admin_token(self.cfg),
                max_connections=g.admin_max_connections, idle_timeout=g.admin_idle_timeout,
                frame_timeout=g.admin_frame_timeout, tls=tls_context(self.cfg))   # [tlsops]
            self.admin_server.set_registration_tokens(reg_tokens)             # [leases]
            await self.admin_server.start()
        if g.metrics:   # the metrics port: Prometheus, JSON API, status page (fastlb.httpapi)
            from fastlb import httpapi, observe
            self.metrics_server = await httpapi.serve_http(g.metrics, observe.Sources(
                stats=self.stats, services=lambda: self.registry.snapshot,
                health=self.health.state, memory=self.datapath.memory,     # [mem]
                histograms=self._histograms,      # [obs] histograms
                admin=lambda: self.admin_server.counts if self.admin_server else {}))  # [admin]
        log.info("fastlb ready: %d service(s), %d worker(s), pid %d", len(self.runtimes),
                 g.workers, os.getpid())
        sdnotify.ready(self._status_line())
        self._ready = True
        # Signals received while starting, before the loop took them (signals.take) and after
        # (queued by _on_signal until ready): acted on now, in order.
        for signum in early + self._early:
            log.info("%s received while starting: acting on it now", signal.Signals(signum).name)
            self._on_signal(signum)
        self._early.clear()
        await self._stop.wait()
        how = (f"SIGTERM, up to {self.cfg.global_.grace:g}s grace" if self._mode == "term"
               else "at once")
        sdnotify.stopping(f"stopping ({how}), {self.datapath.connections()} connection(s) open")
        return await self.shutdown()

    async def shutdown(self) -> int:
        if self.admin_server is not None:
            self.admin_server.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        self._stopping = True
        self.datapath.stop_accepting(self._mode)
        self.listeners.shutdown()             # refused from now on, in every process
        grace = self.cfg.global_.grace if self._mode == "term" else 0.0
        log.info("%s: stopped accepting; %d connection(s) open%s", "SIGTERM" if self._mode == "term"
                 else "SIGINT", self.datapath.connections(),
                 f", waiting up to {grace:g}s" if grace else "")
        await self.datapath.finish(self._mode, grace)
        self.dns.stop()
        if self.etcd is not None:                                              # [etcd]
            await self.etcd.stop()
        if self.connlog is not None:              # [obs] the last lines, once workers are gone
            self.connlog.close()
        self.health.stop()
        for t in self._tasks:
            t.cancel()
        log.info("fastlb stopped")
        return 0


def run(cfg: Config, *, config_path: str | None = None, ignore_state: bool = False,
        log_level: str = "info") -> int:
    """Run the balancer on uvloop until SIGTERM/SIGINT. Returns the exit code."""
    import uvloop

    raise_fd_limit()

    async def main() -> int:
        sup = Supervisor(cfg, asyncio.get_running_loop(), config_path=config_path,
                         ignore_state=ignore_state, log_level=log_level)
        return await sup.run()

    return uvloop.run(main())
