"""The data-plane host: one Engine and its services, run by a worker process or, wrapped in
LocalDataPath, by the single process (``workers = 1``). The same code in every mode.

Owner: the Engine, one ServiceState and its listeners per service, the sweeper of timeouts,
and the drain on stop. It takes numbered snapshots of typed plans (fastlb.plan) and never
reads the registry or config. Applying a plan swaps the policy (for the next connection) and
diffs the listeners: a listener whose address did not change is never closed. Listening
sockets belong to the supervisor; a service listens on a duplicate, so closing its copy never
refuses a connection while another process still accepts on the socket.

The places that will use the core's new API after the merge are one function each:
``build_policy`` (make_policy(..., options=)) and ``abort_backend`` (Engine.close_backend).
"""
from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import logging
import os
import socket
import time
from typing import Any, Callable, Mapping

from fastlb import _core
from fastlb.errors import RegistryError
from fastlb.plan import SNI_GROUP, ListenKey, Plan, Snapshot, sni_addresses

log = logging.getLogger("fastlb")

# Connect errors of one backend, and accept errors, are logged at most once per this many
# seconds, with a count.
ERROR_LOG_INTERVAL = 10.0

SocketFor = Callable[[tuple[str, int]], socket.socket]        # a fresh duplicate to listen on
PassiveReport = Callable[[str, str, int, str], None]          # (service, address, n, reason)


def build_policy(plan: Plan, bitmap: _core.HealthBitmap, counters: _core.Counters | None) -> Any:
    """The one place a policy is built from a plan (None: no backend to pick)."""
    if not plan.backends:
        return None
    return _core.make_policy(plan.policy, [b.slot for b in plan.backends],
                             [b.weight for b in plan.backends], bitmap, counters=counters,
                             ids=[b.address for b in plan.backends],
                             seed=int.from_bytes(os.urandom(8), "little"),
                             options=dict(plan.options))


def build_admission(plan: Plan, sources: _core.SourceTable | None,
                    acls: dict[tuple[Any, ...], Any] | None = None) -> Any:
    """[access] The service's _core.Admission from its plan (None: no access rule, the data
    path runs as without one). Built when the plan's access fields change, never per
    connection; ``acls`` caches the Acl objects of the last build (thousands of CIDRs)."""
    want = (plan.acl_allow or plan.acl_deny or plan.pp_accept_from or plan.src_conns
            or plan.src_rate or plan.client_first_byte or plan.pp_send)
    if not want:
        return None
    cache = acls if acls is not None else {}

    def acl(allow: tuple[str, ...], deny: tuple[str, ...]) -> Any:
        key = (allow, deny)
        if key not in cache:
            cache[key] = _core.Acl(allow=allow, deny=deny)
        return cache[key]
    return _core.Admission(
        acl=acl(plan.acl_allow, plan.acl_deny) if plan.acl_allow or plan.acl_deny else None,
        pp_from=acl(plan.pp_accept_from, ()) if plan.pp_accept_from else None,
        pp_timeout=plan.pp_timeout, first_byte=plan.client_first_byte,
        srctab=sources if plan.src_conns or plan.src_rate else None,
        conns=plan.src_conns, rate=plan.src_rate, burst=plan.src_burst, row=plan.row,
        pp_send={slot: v for slot, v in plan.pp_send if slot >= 0})


def build_tls(plan: Plan) -> Any:
    """[tls] The service's _core.TlsContext from its plan (None: plain TCP). Built when the
    plan's TLS fields change (a reload that read new certificates), never per connection; the
    open connections keep the context they started with."""
    if not plan.tls_certs:
        return None
    return _core.TlsContext(list(plan.tls_certs), min_version=plan.tls_min_version,
                            alpn=plan.tls_alpn, handshake_timeout=plan.tls_handshake,
                            client_ca=plan.tls_client_ca or None, verify_client=plan.tls_verify,
                            identities=plan.tls_identities,
                            **tls_ops_args(plan))                                  # [tlsops]


def tls_ops_args(plan: Plan) -> dict[str, Any]:
    """[tlsops] The TlsContext's ticket lifetime and session id context: a hash of the
    service's name and client verification, so a session resumes only in the service (and
    the client CAs) it was made for, whatever keys the tickets share."""
    import hashlib
    sid = hashlib.sha256(b"\0".join([plan.name.encode(), plan.tls_client_ca, plan.tls_verify.encode(),
                                     *(i.encode() for i in plan.tls_identities)])).digest()
    return {"ticket_lifetime": plan.tls_ticket_lifetime, "session_context": sid}


def build_orig(plan: Plan) -> Any:
    """[orig] The service's _core.OrigContext (TLS to its backends) from its plan (None: plain
    TCP). Built when the plan's origination fields change, never per connection; the open
    connections keep the context they started with."""
    if not plan.orig_slots:
        return None
    # a plan being checked before its slots are taken names them -1 (as pp_send's)
    return _core.OrigContext(list(plan.orig_profiles), [x for x in plan.orig_slots if x[0] >= 0])


def abort_backend(engine: _core.Engine, state: _core.ServiceState, slot: int) -> int:
    """Close the open connections of one backend; the count."""
    return int(engine.close_backend(state, slot))


def check_plan(plan: Plan) -> None:
    """Raise FastLBError if ``plan`` could not be applied: an address the data path cannot
    pack, a policy that does not build. Run in the prepare step, before anything is kept."""
    for b in plan.backends:
        family = socket.AF_INET6 if ":" in b.host else socket.AF_INET
        try:
            socket.inet_pton(family, b.host)
        except OSError:
            raise RegistryError("invalid", f"service {plan.name}: backend {b.address}: {b.host!r} "
                                           f"is not an IP address the data path can connect to "
                                           f"(IPv6 zone ids are not supported)") from None
    if plan.backends:
        n = len(plan.backends)
        scratch = _core.HealthBitmap(bytearray(_core.HealthBitmap.size_for(n)), n)
        dry = dataclasses.replace(plan, backends=tuple(dataclasses.replace(b, slot=i)
                                                       for i, b in enumerate(plan.backends)))
        counters = _core.Counters(bytearray(_core.Counters.size_for(n)), n)
        try:
            build_policy(dry, scratch, counters)
        except (ValueError, TypeError) as exc:
            raise RegistryError("invalid", f"service {plan.name}: policy {plan.policy}: {exc}") from None
    try:                                                                       # [access]
        build_admission(plan, _core.SourceTable(bytearray(_core.SourceTable.size_for(16)), 16))
    except (ValueError, TypeError) as exc:
        raise RegistryError("invalid", f"service {plan.name}: {exc}") from None
    try:                                                                       # [tls]
        build_tls(plan)
    except (ValueError, TypeError) as exc:
        raise RegistryError("invalid", f"service {plan.name}: tls: {exc}") from None
    try:                                                                       # [orig]
        build_orig(plan)
    except (ValueError, TypeError) as exc:
        raise RegistryError("invalid", f"service {plan.name}: backend tls: {exc}") from None


def check_plans(snapshot: Snapshot, running: Mapping[str, Plan]) -> None:
    """check_plan for each plan of ``snapshot`` that differs from the one running (a change
    of one service builds that service's policy once more, not every service's)."""
    for plan in snapshot.plans:
        if running.get(plan.name) != plan:
            check_plan(plan)


class DataService:
    """One service in one Engine."""

    def __init__(self, name: str, engine: _core.Engine, health: _core.HealthBitmap,
                 counters: _core.Counters, socket_for: SocketFor, on_passive: PassiveReport,
                 *, shared_listeners: bool = False,
                 sources: _core.SourceTable | None = None) -> None:
        self.name = name
        self.engine = engine
        self.health = health
        self.counters = counters
        self.socket_for = socket_for
        self.on_passive = on_passive
        self.shared_listeners = shared_listeners
        self.state = _core.ServiceState(name)
        self.state.on_connect_error = self._on_connect_error
        self.state.on_no_backend = self._on_no_backend
        self.state.on_passive_down = self._on_passive_down
        self.listeners: dict[tuple[str, int], Any] = {}
        self.names: dict[int, str] = {}
        self.all_up = _core.HealthBitmap(bytearray(_core.HealthBitmap.size_for(health.nslots)),
                                         health.nslots)
        self._last_log: dict[object, tuple[float, int]] = {}
        self.plan: Plan | None = None
        self.was_up: dict[int, bool] = {}       # slot -> health seen at the last plan
        self.sources = sources                                                 # [access]
        self.access: tuple[Any, ...] | None = None    # what state.adm was built from
        self.acls: dict[tuple[Any, ...], Any] = {}
        self.tls: tuple[Any, ...] | None = None       # [tls] what state.tls was built from
        self.orig: tuple[Any, ...] | None = None      # [orig] what state.orig was built from
        self.grouped: set[tuple[str, int]] = set()    # [sni] addresses its SNI group listens on

    def apply(self, plan: Plan) -> None:
        """Take a plan. An unchanged plan (the supervisor pushes all services when one changes)
        keeps the policy as it is; only the health bookkeeping below runs."""
        old = self.plan
        for slot, _ in plan.names:              # back up: its failure streak starts over
            up = self.health.is_up(slot)
            if up and not self.was_up.get(slot, True):
                self.engine.reset_passive(slot)
            self.was_up[slot] = up
        if plan == old:
            return
        st = self.state
        st.retries = plan.retries
        st.connect_timeout = plan.connect_timeout
        st.idle_timeout = plan.idle_timeout
        st.hash_mode = plan.hash_mode
        st.fall_passive = plan.fall_passive
        st.row = plan.row
        self.apply_access(plan)                                                 # [access]
        if plan.tls_key() != self.tls:                                          # [tls]
            self.state.tls, self.tls = build_tls(plan), plan.tls_key()
        if plan.orig_key() != self.orig:                                        # [orig]
            self.state.orig, self.orig = build_orig(plan), plan.orig_key()
        apply_mem(self.engine, st, plan)                                    # [mem]
        st.splice = _core.SPLICE_MODES[plan.splice]                         # [splice]
        st.log_sample = plan.log_sample                 # [obs] the connection log's sampling
        self.names = dict(plan.names)
        if old is not None:
            for slot, _ in old.names:
                if slot not in self.names:
                    self.engine.reset_passive(slot)
        self.was_up = {s: u for s, u in self.was_up.items() if s in self.names}
        apply_limits(self.engine, st, plan)                                # [limits]
        bitmap = self.health
        if plan.panic:                          # every ready backend counts as up
            for b in plan.backends:
                self.all_up.mark_up(b.slot)
            bitmap = self.all_up
        st.set_backends(build_policy(plan, bitmap, self.counters),
                        {b.slot: (b.host, b.port) for b in plan.backends})
        self.listen(set(plan.listen) - self.grouped)                           # [sni]
        self.plan = plan          # last: a plan that failed half-way is tried again next push

    def apply_access(self, plan: Plan) -> None:
        """[access] Rebuild the service's Admission only when its fields (or row) changed."""
        key = (plan.access_key(), plan.row)
        if key != self.access:
            acls = {k: v for k, v in self.acls.items()
                    if k in ((plan.acl_allow, plan.acl_deny), (plan.pp_accept_from, ()))}
            self.state.adm = build_admission(plan, self.sources, acls)
            self.acls, self.access = acls, key

    def waits(self) -> list[float]:
        """[access] The before-connect timeouts the sweep must see (PROXY header, first byte)."""
        p = self.plan
        if p is None:
            return []
        return ([p.pp_timeout] if p.pp_accept_from else []) + (
            [p.client_first_byte] if p.client_first_byte else []) + (
            [p.tls_handshake] if p.tls_certs else [])                          # [tls]

    def listen(self, want: set[tuple[str, int]]) -> None:
        for key in list(self.listeners):
            if key not in want:
                self.engine.unlisten(self.listeners.pop(key))
        for key in sorted(want - self.listeners.keys()):
            sock = self.socket_for(key)
            try:
                self.listeners[key] = self.engine.listen(sock, self.state, self.shared_listeners)
            except BaseException:
                sock.close()                # our duplicate; the supervisor keeps the socket
                raise

    def stop_accepting(self) -> None:
        self.listen(set())

    def _rate_limited(self, key: object) -> int | None:
        """None to stay quiet, else the number of events since the last line."""
        now = time.monotonic()
        last, count = self._last_log.get(key, (0.0, 0))
        if now - last >= ERROR_LOG_INTERVAL:
            self._last_log[key] = (now, 0)
            return count + 1
        self._last_log[key] = (last, count + 1)
        return None

    def _on_connect_error(self, slot: int, exc: BaseException) -> None:
        n = self._rate_limited(slot)
        if n is not None:
            reason = "connect timeout" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            log.warning("service %s: backend %s: %s%s", self.name, self.names.get(slot, slot), reason,
                        f" ({n} failures in the last {ERROR_LOG_INTERVAL:g}s)" if n > 1 else "")

    def _on_no_backend(self) -> None:
        n = self._rate_limited("none")
        if n is not None:
            log.error("service %s: no backend could take a client, connection closed%s", self.name,
                      f" ({n} times in the last {ERROR_LOG_INTERVAL:g}s)" if n > 1 else "")

    def _on_passive_down(self, slot: int, failures: int, reason: str) -> None:
        address = self.names.get(slot)
        if address is not None:
            self.on_passive(self.name, address, failures, reason)


class SniRouter:
    """[sni] The listener of one address shared by SNI routing, and the key of its table."""
    __slots__ = ("state", "listener", "table", "key")

    def __init__(self, state: _core.ServiceState, listener: Any) -> None:
        self.state = state              # accepts for the group: the global maxconn only (row -1)
        self.listener = listener
        self.table: _core.SniTable | None = None
        self.key: tuple[Any, ...] | None = None

    def update(self, group: list[Plan], services: Mapping[str, DataService]) -> None:
        routes = [(p.sni, services[p.name].state) for p in group if p.sni]
        dflt = next((services[p.name].state for p in group if not p.sni), None)
        timeout = max((p.sni_handshake for p in group if p.sni), default=10.0)
        key = (tuple((names, id(st)) for names, st in routes), id(dflt), timeout)
        # unrouted refusals are logged when any service of the group logs
        self.state.log_sample = max((p.log_sample for p in group), default=0)
        if key != self.key:
            self.table = _core.SniTable(routes, dflt, timeout)
            self.listener.sni = self.table
            self.key = key


class DataPlane:
    """The data path of one process: an Engine writing counter block ``block``, its services,
    the timeout sweeper, accept-error logging, and the drain on stop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, health: _core.HealthBitmap,
                 counters: _core.Counters, block: int, on_passive: PassiveReport, *,
                 shared_listeners: bool, gauges: _core.Gauges | None = None,
                 sources: _core.SourceTable | None = None,
                 connlog: _core.ConnLog | None = None) -> None:
        self.loop = loop
        self.sources = sources                                                  # [access]
        self.health = health
        self.counters = counters
        self.on_passive = on_passive
        self.shared_listeners = shared_listeners
        self.engine = _core.Engine(loop, counters, block, gauges)
        self.engine.on_accept_error = self._on_accept_error
        self.engine.on_local_error = self._on_local_error                       # [limits]
        self._local_log: dict[str, tuple[float, int]] = {}                      # [limits]
        self._limits = loop.create_task(limits_forever(self.engine))            # [limits]
        self.engine.connlog = connlog                   # [obs] None: no log, no histograms
        self.services: dict[str, DataService] = {}
        self.sockets: Mapping[ListenKey, socket.socket] = {}
        self.routers: dict[tuple[str, int], SniRouter] = {}                    # [sni]
        self.gen = 0
        self.stopping = False
        self._last_accept_error = 0.0
        self._sweeper = loop.create_task(sweep_forever(self.engine, self.timeouts))
        self.tickets: dict[str, bytes] = {}     # [tlsops] service -> its ticket keys (fastlb.tickets)

    def apply(self, snapshot: Snapshot, sockets: Mapping[ListenKey, socket.socket]) -> None:
        """Run ``snapshot``; ``sockets`` holds this process's listening socket of each key."""
        if self.stopping:
            return
        self.sockets = sockets
        self.engine.maxconn = snapshot.maxconn                                  # [limits]
        plans = {p.name: p for p in snapshot.plans}
        shared = sni_addresses(snapshot.plans)                                  # [sni]
        for name in list(self.services):
            if name not in plans:
                self.services.pop(name).stop_accepting()
        for name, plan in plans.items():
            ds = self.services.get(name)
            if ds is None:
                ds = self.services[name] = DataService(
                    name, self.engine, self.health, self.counters,
                    functools.partial(self._socket_for, name), self.on_passive,
                    shared_listeners=self.shared_listeners, sources=self.sources)
            ds.grouped = shared                                                 # [sni]
            ds.apply(plan)
            ds.listen(set(plan.listen) - shared)    # [sni] an unchanged plan, a changed group
        self.route(snapshot.plans, shared)                                      # [sni]
        self.engine.refresh_listeners()     # [lean] defer_accept may have turned on a kept socket
        self.gen = snapshot.gen
        self.set_tickets(self.tickets)                                          # [tlsops]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("data path (pid %d): generation %d applied: %s", os.getpid(), snapshot.gen,
                      "; ".join(f"{p.name} {len(p.backends)}/{len(p.names)} backend(s) usable"
                                f"{' (panic)' if p.panic else ''}" for p in snapshot.plans) or "no service")

    def route(self, plans: tuple[Plan, ...], shared: set[tuple[str, int]]) -> None:
        """[sni] One listener per address shared by SNI routing, its table rebuilt when its
        services' names, default or timeout changed and swapped in one assignment: sessions
        keep the table and the service they started with, so no open connection is touched."""
        for addr in [a for a in self.routers if a not in shared]:
            self.engine.unlisten(self.routers.pop(addr).listener)
        for addr in sorted(shared):
            group = [p for p in plans if addr in p.listen and p.name in self.services]
            r = self.routers.get(addr)
            if r is None:
                sock = self.sockets[(SNI_GROUP, *addr)].dup()
                state = _core.ServiceState(f"sni {addr[0]}:{addr[1]}")
                try:
                    lst = self.engine.listen(sock, state, self.shared_listeners)
                except BaseException:
                    sock.close()
                    raise
                r = self.routers[addr] = SniRouter(state, lst)
            r.update(group, self.services)

    def _socket_for(self, service: str, key: tuple[str, int]) -> socket.socket:
        return self.sockets[(service, *key)].dup()

    def close_backend(self, service: str, slot: int, why: str) -> int:
        ds = self.services.get(service)
        if ds is None:
            return 0
        n = abort_backend(self.engine, ds.state, slot)
        log.info("service %s: backend %s: %s, closed %d connection(s)", service,
                 ds.names.get(slot, f"slot {slot}"), why, n)
        return n

    def connections(self) -> int:
        return len(self.engine.sessions)

    def set_tickets(self, keys: Mapping[str, bytes]) -> None:
        """[tlsops] The supervisor's ticket keys (service -> 240 bytes) onto the services'
        current TLS contexts (a context built later gets them at the end of apply)."""
        self.tickets = dict(keys)
        for name, ds in self.services.items():
            if ds.state.tls is not None and name in self.tickets:
                ds.state.tls.set_ticket_keys(self.tickets[name])

    def memory(self) -> dict[str, int]:
        """[mem] This engine's buffers and timer counts (MEMORY_FIELDS)."""
        e = self.engine
        return {"buffers_in_use": e.buffers_in_use, "buffers_peak": e.buffers_peak,
                "buffers_pooled": e.buffers_pooled, "buffer_waits": e.buffer_waits,
                "buffer_budget_bytes": e.buffer_budget * _core.BUFFER_SIZE,
                "timeouts_fin": e.timeouts_fin, "timeouts_duration": e.timeouts_duration,
                "timeouts_first_byte": e.timeouts_first_byte,
                "tls_handshakes": e.tls_handshakes, "tls_resumed": e.tls_resumed,   # [tls]
                "tls_handshake_failures": e.tls_failures,
                "tls_handshake_timeouts": e.tls_timeouts,
                "tls_client_no_cert": e.tls_no_cert, "tls_client_expired": e.tls_expired,
                "tls_client_untrusted": e.tls_untrusted, "tls_authz_denied": e.tls_authz_denied,
                "accept_wakeups": e.accept_wakeups, "accepted": e.accepted,     # [lean]
                "speculative_hits": e.spec_hits, "speculative_misses": e.spec_misses,
                "tls_backend_handshakes": e.orig_handshakes,                        # [orig]
                "tls_backend_resumed": e.orig_resumed,
                "tls_backend_failures": e.orig_failures,
                "tls_protocol_errors": e.tls_protocol, "tls_other_failures": e.tls_other,  # [tlsops]
                "tls_v1_2": e.tls_v12, "tls_v1_3": e.tls_v13, **self.tls_by_service(),
                "sni_routed": e.sni_routed, "sni_defaulted": e.sni_defaulted,       # [sni]
                "sni_no_route": e.sni_no_route, "sni_bad_hello": e.sni_bad,
                "sni_oversize": e.sni_oversize, "sni_timeouts": e.sni_timeouts,
                **splice_memory(e)}                                                 # [splice]


    def tls_by_service(self) -> dict[str, int]:
        """[tlsops] Each TLS service's counts as "tls.SERVICE.NAME" keys (summed over workers
        by sum_memory like the others; read back by promex and handlers)."""
        return {f"tls.{name}.{k}": int(v) for name, ds in self.services.items()
                if ds.state.tls is not None for k, v in _core.tls_counts(ds.state).items()}

    def timeouts(self) -> list[tuple[float, float]]:
        """(connect, shortest of the timeouts that need a scan of every session) per service;
        the connect figure also covers the before-connect waits ([access])."""
        return [(min([ds.state.connect_timeout, *ds.waits()]), scan_timeout(ds.state))
                for ds in self.services.values()] + [
                (r.table.timeout, scan_timeout(r.state)) for r in self.routers.values()
                if r.table is not None]                                         # [sni]

    def stop_accepting(self) -> None:
        self.stopping = True
        for ds in self.services.values():
            ds.stop_accepting()
        for r in self.routers.values():                                         # [sni]
            self.engine.unlisten(r.listener)
        self.routers.clear()

    async def finish(self, grace: float, now: Callable[[], bool]) -> None:
        """Let open connections end for ``grace`` seconds (less once ``now()``), then close."""
        self.stop_accepting()
        deadline = self.loop.time() + grace
        while self.engine.sessions and self.loop.time() < deadline and not now():
            await asyncio.sleep(0.05)
        left = len(self.engine.sessions)
        if left:
            log.info("closing %d connection(s)", left)
        self.close()

    def close(self) -> None:
        self.engine.close()
        self._sweeper.cancel()
        self._limits.cancel()                                                   # [limits]

    def _on_local_error(self, what: str, exc: OSError, count: int) -> None:
        """[limits] accept4/socket/connect ran out of fds, memory or local ports (the core
        calls this at most once a second): one line per ERROR_LOG_INTERVAL, with the count."""
        now = time.monotonic()
        last, pending = self._local_log.get(what, (-ERROR_LOG_INTERVAL, 0))
        pending += count
        if now - last < ERROR_LOG_INTERVAL:
            self._local_log[what] = (last, pending)
            return
        self._local_log[what] = (now, 0)
        remedy = (" (raise the fd limit: LimitNOFILE=, ulimit -n; or lower [global] maxconn)"
                  if exc.errno in (errno.EMFILE, errno.ENFILE) else "")
        log.error("local error on %s: %s: %d connection(s) refused or closed since the last "
                  "report, no backend blamed; listeners paused %gs%s", what, exc.strerror or exc,
                  pending, _core.LIMITS_RETRY, remedy)

    def _on_accept_error(self, exc: OSError) -> None:
        if exc.errno == errno.EINVAL:            # the listener was shut (stopping): not an error
            return
        now = time.monotonic()
        if now - self._last_accept_error >= ERROR_LOG_INTERVAL:
            self._last_accept_error = now
            log.error("accept failed: %s (connections wait in the backlog)", exc)


def apply_limits(engine: _core.Engine, st: _core.ServiceState, plan: Plan) -> None:
    """[limits] A plan's connection limits into the service's state and the engine's caps."""
    st.maxconn = plan.maxconn
    st.queue_size = plan.queue_size
    st.queue_timeout = plan.queue_timeout
    caps = {s: n for s, n in plan.max_conns if s >= 0}
    for slot, _ in plan.names:
        if slot >= 0:
            _core.set_max_conns(engine, slot, caps.get(slot, 0))


async def limits_forever(engine: _core.Engine) -> None:
    """[limits] Every LIMITS_RETRY: re-arm paused listeners (a place freed in another worker,
    fds back), expire queued clients and retry queue heads (core/limits.pxi)."""
    while True:
        await asyncio.sleep(_core.LIMITS_RETRY)
        _core.limits_sweep(engine)


def sum_memory(reports: list[dict[str, int]]) -> dict[str, int]:
    """[mem] DataPlane.memory() of several data paths, summed (buffers_peak: the sum of each
    one's peak, an upper bound of the balancer's)."""
    out: dict[str, int] = {}
    for r in reports:
        for k, v in r.items():
            out[k] = out.get(k, 0) + v
    return out


def apply_mem(engine: _core.Engine, st: _core.ServiceState, plan: Plan) -> None:
    """[mem] A plan's timers, keepalive and buffer budget onto the engine and the service."""
    st.client_fin, st.server_fin = plan.client_fin, plan.server_fin
    st.max_duration, st.first_byte = plan.max_duration, plan.first_byte
    # ka_idle -1: keepalive on with the kernel's idle time
    st.ka_idle, st.ka_interval, st.ka_count = ((plan.tcp_keepalive[0] or -1, *plan.tcp_keepalive[1:])
                                               if plan.tcp_keepalive else (0, 0, 0))
    if plan.buffer_budget != engine.buffer_budget * _core.BUFFER_SIZE:
        engine.set_buffer_budget(plan.buffer_budget)


def scan_timeout(st: _core.ServiceState) -> float:
    """The shortest timeout the sweep checks by a scan of every session (idle, and the timers
    of core/timers.pxi that are on)."""
    return min([st.idle_timeout] + [t for t in (st.client_fin, st.server_fin, st.max_duration,
                                                st.first_byte) if t > 0])



async def sweep_forever(engine: _core.Engine, timeouts: Callable[[], list[tuple[float, float]]]) -> None:
    """Connect and idle timeouts without a timer per connection: connect deadlines (only the
    sessions still connecting) every tenth of the shortest connect timeout, idle stamps (every
    session) every tenth of the shortest idle timeout; each between 10 ms and 1 s.
    ``timeouts()`` gives the (connect, idle) timeouts of the services now served."""
    def tenth(x: float) -> float:
        return max(0.01, min(1.0, x / 10))
    next_idle = 0.0
    loop = asyncio.get_running_loop()
    while True:
        pairs = timeouts() or [(10.0, 10.0)]
        period = tenth(min(c for c, _ in pairs))
        idle_period = max(period, tenth(min(i for _, i in pairs)))
        await asyncio.sleep(period)
        now = loop.time()
        check_idle = now >= next_idle
        if check_idle:
            next_idle = now + idle_period
        engine.sweep(check_idle)


class LocalDataPath:
    """The DataPath of ``workers = 1``: a DataPlane in the supervisor's own process."""

    def __init__(self, loop: asyncio.AbstractEventLoop, health: _core.HealthBitmap,
                 counters: _core.Counters, on_passive: PassiveReport,
                 gauges: _core.Gauges | None = None, *,
                 sources: _core.SourceTable | None = None,
                 connlog: _core.ConnLog | None = None) -> None:
        self.plane = DataPlane(loop, health, counters, 0, on_passive, shared_listeners=False,
                               gauges=gauges, sources=sources, connlog=connlog)
        self._now = False

    def check(self, snapshot: Snapshot) -> None:
        check_plans(snapshot, {n: ds.plan for n, ds in self.plane.services.items() if ds.plan})

    def apply(self, snapshot: Snapshot, sockets: Mapping[ListenKey, Any]) -> None:
        self.plane.apply(snapshot, sockets)

    def acked(self) -> int:
        return self.plane.gen

    def close_backend(self, service: str, slot: int, why: str) -> None:
        self.plane.close_backend(service, slot, why)

    def connections(self) -> int:
        return self.plane.connections()

    def memory(self) -> dict[str, int]:
        return self.plane.memory()

    def set_tickets(self, keys: Mapping[str, bytes]) -> None:                  # [tlsops]
        self.plane.set_tickets(keys)

    def info(self) -> list[dict[str, Any]]:
        return [{"index": 0, "pid": os.getpid(), "generation": self.plane.gen, "stopping": False,
                 "connections": sum(self.plane.counters.get_block(0, s, _core.CTR_TOTAL)
                                    for s in range(self.plane.counters.nslots))}]

    async def start(self) -> None:
        pass

    async def resize(self, n: int) -> bool:
        if n != 1:
            log.warning("reload: switching between 1 and several workers needs a restart")
        return n == 1

    async def restart(self) -> int:
        raise RegistryError("single_process", "workers = 1: there is no worker to restart")

    def stop_accepting(self, mode: str) -> None:
        if mode == "int":
            self._now = True
        self.plane.stop_accepting()

    async def finish(self, mode: str, grace: float) -> None:
        if mode == "int":
            self._now = True
        await self.plane.finish(grace, lambda: self._now)



def splice_memory(e: _core.Engine) -> dict[str, int]:
    """[splice] This engine's pipes and the bytes they moved (core/splice.pxi), for memory()."""
    return {"spliced_bytes": e.spliced_bytes, "pipes_in_use": e.pipes_in_use,
            "pipes_pooled": e.npipes, "pipes_capped": e.pipes_capped,
            "pipe_failures": e.pipe_failures}
