"""The balancer process: registry, listeners, data-path state, admin socket, sweeps, signals.

Owner: the running balancer (one process, ``workers = 1``). It turns the registry's snapshots
into listening sockets and ServiceStates (fastlb._core), gives each backend a stable slot in the
shared health bitmap and counters, serves the admin socket, persists acknowledged changes and
stops cleanly: SIGTERM stops accepting, lets open connections finish for ``grace`` seconds, then
closes them; SIGINT closes everything at once; SIGHUP reloads the config.
The per-connection work is all in the core's Engine; nothing here runs per connection or byte.

A registry change follows STYLE.md point 9: validate (Registry.plan), persist (statefile.save,
fsynced, in a thread so the data path keeps running), swap (Registry.commit), apply (to the
data path: for the next connection; no open connection is touched unless asked), reply.
"""
from __future__ import annotations

import asyncio
import logging
import mmap
import os
import resource
import signal
import socket
import time
from typing import Any, Mapping

from fastlb import __version__, _core, config, statefile
from fastlb.admin import protocol
from fastlb.admin.protocol import AdminProtocolError, Request
from fastlb.admin.server import AdminServer
from fastlb.config import Address, Config, Service
from fastlb.errors import ConfigError, FastLBError
from fastlb.health import HealthChecker
from fastlb.registry import Registry, RegistryError, reconcile

log = logging.getLogger("fastlb")

HASH_MODES = {"source_ip": 1, "source_ip_port": 2}
# Connect errors of one backend are logged at most once per this many seconds, with a count.
ERROR_LOG_INTERVAL = 10.0
LISTEN_BACKLOG = 4096
# Slow start scales weights by this during a ramp, for a fine-grained ramp with integer weights
# (smooth WRR is scale-invariant: the rotation of steady backends does not change).
RAMP_SCALE = 100


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one (as HAProxy does); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def listen_socket(addr: Address, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((addr.host, addr.port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class SharedState:
    """The shared-memory mapping: health bitmap + counters, and the slot table of backends.

    A slot belongs to one (service, backend address). A released slot is reused only once no
    connection uses it any more (its active count is back to zero): see reap().
    """

    def __init__(self, max_backends: int, nblocks: int = 1) -> None:
        self.max_backends = max_backends
        hsize = _core.HealthBitmap.size_for(max_backends)
        csize = _core.Counters.size_for(max_backends, nblocks)
        self.mapping = mmap.mmap(-1, hsize + csize, flags=mmap.MAP_SHARED)
        view = memoryview(self.mapping)
        self.health = _core.HealthBitmap(view[:hsize], max_backends)
        self.counters = _core.Counters(view[hsize:], max_backends, nblocks)
        self.slots: dict[tuple[str, str], int] = {}   # (service, backend address) -> slot
        self._free = list(range(max_backends - 1, -1, -1))
        self._released: list[int] = []

    def slot_for(self, service: str, backend_id: str) -> int:
        key = (service, backend_id)
        if key not in self.slots:
            self.reap()
            if not self._free:
                raise RegistryError("full", f"all {self.max_backends} backend slots are in use")
            slot = self._free.pop()
            # A reused slot starts from zero, not from its previous backend's totals.
            for field in range(5):
                self.counters.add(0, slot, field, -self.counters.get_block(0, slot, field))
            self.slots[key] = slot
        return self.slots[key]

    def release(self, service: str, backend_id: str) -> None:
        slot = self.slots.pop((service, backend_id), None)
        if slot is not None:
            self.health.mark_down(slot)
            self._released.append(slot)

    def reap(self) -> None:
        """Free released slots whose connections have all ended."""
        busy = []
        for slot in self._released:
            (busy if self.counters.active(slot) else self._free).append(slot)
        self._released = busy


class ServiceRuntime:
    """One service on the data path: its ServiceState, its listeners, and its policy, rebuilt
    when the backend set, a health state (panic mode) or a slow-start ramp changes."""

    def __init__(self, svc: Service, shared: SharedState, engine: _core.Engine,
                 health: HealthChecker) -> None:
        self.shared = shared
        self.engine = engine
        self.health = health
        self.state = _core.ServiceState(svc.name)
        self.state.on_connect_error = self._on_connect_error
        self.state.on_no_backend = self._on_no_backend
        self.state.on_passive_down = self._on_passive_down
        self.listeners: dict[tuple[str, int], Any] = {}
        self._last_log: dict[object, tuple[float, int]] = {}
        self.config: Service | None = None
        self.ramp: dict[str, float] = {}          # address -> when its slow start began
        self.panic = False
        self.all_up = _core.HealthBitmap(bytearray(_core.HealthBitmap.size_for(shared.max_backends)),
                                         shared.max_backends)
        self.configure(svc)

    def configure(self, svc: Service) -> None:
        """Take a (new version of the) service: settings, backends, checks, listeners."""
        old = self.config
        self.config = svc
        st = self.state
        st.retries = svc.retries
        st.connect_timeout = svc.connect_timeout
        st.idle_timeout = svc.idle_timeout
        st.hash_mode = HASH_MODES[svc.hash_key] if svc.policy == "maglev" else 0
        st.fall_passive = svc.health.fall_passive if svc.health else 0
        if old is not None:
            keep = {x.address.text for x in svc.backends}
            for b in old.backends:
                if b.address.text not in keep:
                    self.health.untrack(svc.name, b.address.text)
                    self.ramp.pop(b.address.text, None)
                    self.shared.release(svc.name, b.address.text)
        self.slot_names: dict[int, str] = {}
        slowstart = svc.health.slowstart if svc.health else 0.0
        old_addresses = {b.address.text for b in old.backends} if old else set()
        for b in svc.backends:
            slot = self.shared.slot_for(svc.name, b.address.text)
            self.slot_names[slot] = b.address.text
            if old is not None and b.address.text not in old_addresses:
                self.engine.reset_passive(slot)
                if slowstart > 0:
                    self.ramp[b.address.text] = time.monotonic()   # added: eased in
            self.health.track(svc.name, b.address.text, slot, b.address.host, b.address.port, b.health)
        self.rebuild()
        if old is not None:
            self.listen()

    def rebuild(self) -> None:
        """Build the policy: ready backends, ramp weights, panic mode. For the next connection."""
        svc = self.config
        assert svc is not None
        h = svc.health
        now = time.monotonic()
        ready = [b for b in svc.backends if b.state == "ready"]   # drain/maint: no new connection
        for address, since in list(self.ramp.items()):
            if h is None or now - since >= h.slowstart:
                del self.ramp[address]
        scale = RAMP_SCALE if self.ramp and all(b.weight * RAMP_SCALE <= config.MAX_WEIGHT
                                                for b in ready) else 1
        slots, weights, ids, addrs = [], [], [], {}
        for b in ready:
            slot = self.shared.slots[(svc.name, b.address.text)]
            w = b.weight * scale
            since = self.ramp.get(b.address.text)
            if since is not None and h is not None:
                w = max(1, int(w * (now - since) / h.slowstart))
            slots.append(slot)
            weights.append(w)
            ids.append(b.address.text)
            addrs[slot] = (b.address.host, b.address.port)
        bitmap = self.shared.health
        up = sum(1 for s in slots if bitmap.is_up(s))
        panic = bool(h and h.panic_threshold > 0 and slots and 100 * up / len(slots) < h.panic_threshold)
        if panic != self.panic:
            self.panic = panic
            log.warning("service %s: %s panic mode: %d of %d backends up (threshold %g%%)",
                        svc.name, "entering" if panic else "leaving", up, len(slots),
                        h.panic_threshold if h else 0)
        if panic:
            for s in slots:
                self.all_up.mark_up(s)
            bitmap = self.all_up
        policy = None
        if slots:
            policy = _core.make_policy(svc.policy, slots, weights, bitmap,
                                       counters=self.shared.counters, ids=ids,
                                       seed=int.from_bytes(os.urandom(8), "little"))
        self.state.set_backends(policy, addrs)

    def health_changed(self, address: str, up: bool) -> None:
        assert self.config is not None
        slot = self.shared.slots.get((self.config.name, address))
        if slot is not None:
            self.engine.reset_passive(slot)
        if up and self.config.health and self.config.health.slowstart > 0:
            self.ramp[address] = time.monotonic()
        self.rebuild()

    def slot(self, address: str) -> int | None:
        assert self.config is not None
        return self.shared.slots.get((self.config.name, address))

    def listen(self) -> None:
        """Listen on every configured address not yet listened on; stop the others.
        A listener whose address did not change is never closed."""
        assert self.config is not None
        want = {(a.host, a.port): a for a in self.config.listen}
        for key in list(self.listeners):
            if key not in want:
                self.engine.unlisten(self.listeners.pop(key))
        for key, addr in want.items():
            if key not in self.listeners:
                sock = listen_socket(addr)
                bound = sock.getsockname()
                self.listeners[key] = self.engine.listen(sock, self.state)
                log.info("service %s: listening on %s (%s, %d backends)", self.config.name,
                         _fmt(bound), self.config.policy, len(self.config.backends))

    def stop_accepting(self) -> None:
        for lst in self.listeners.values():
            self.engine.unlisten(lst)
        self.listeners.clear()

    def remove(self) -> None:
        """The service is gone: stop accepting; its open connections finish on their own."""
        self.stop_accepting()
        assert self.config is not None
        for b in self.config.backends:
            self.health.untrack(self.config.name, b.address.text)
            self.shared.release(self.config.name, b.address.text)

    def _on_passive_down(self, slot: int, failures: int, reason: str) -> None:
        assert self.config is not None
        address = self.slot_names.get(slot)
        if address is not None:
            self.health.passive_down(self.config.name, address, failures, reason)

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
            log.warning("service %s: backend %s: %s%s", self.state.name,
                        self.slot_names.get(slot, slot), reason,
                        f" ({n} failures in the last {ERROR_LOG_INTERVAL:g}s)" if n > 1 else "")

    def _on_no_backend(self) -> None:
        n = self._rate_limited("none")
        if n is not None:
            log.error("service %s: no backend could take a client, connection closed%s",
                      self.state.name, f" ({n} times in the last {ERROR_LOG_INTERVAL:g}s)" if n > 1 else "")


def _fmt(sockaddr: tuple) -> str:
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def initial_registry(cfg: Config, ignore_state: bool = False) -> dict[str, Service]:
    """The registry to start with: the config, overlaid by the state file (see README)."""
    services = {s.name: s for s in cfg.services}
    path = cfg.global_.state_file
    if path is None or ignore_state:
        return services
    loaded = statefile.load(path)          # raises StateFileError: refuse to start
    if loaded is None:
        return services
    registry, recorded_config = loaded
    return reconcile(registry, recorded_config, services)


class Balancer:
    """Runs a Config until a signal. ``run()`` returns the process exit code."""

    def __init__(self, cfg: Config, loop: asyncio.AbstractEventLoop, *, config_path: str | None = None,
                 ignore_state: bool = False) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.loop = loop
        self.cfg_services = {s.name: s for s in cfg.services}
        self.registry = Registry(initial_registry(cfg, ignore_state))
        total = sum(len(s.backends) for s in self.registry.snapshot.values())
        self.shared = SharedState(max(cfg.max_backends, 2 * total))
        self.engine = _core.Engine(loop, self.shared.counters, 0)
        self.engine.on_accept_error = self._on_accept_error
        self.health = HealthChecker(self.shared.health, self._on_health)
        self.services: dict[str, ServiceRuntime] = {}
        self.admin_server: AdminServer | None = None
        self._mutation = asyncio.Lock()
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._stop = asyncio.Event()
        self._mode = "term"
        self._last_accept_error = 0.0

    # -- applying the registry to the data path --------------------------------------------------
    def apply(self, snapshot: Mapping[str, Service]) -> None:
        for name in list(self.services):
            if name not in snapshot:
                self.services.pop(name).remove()
                log.info("service %s removed", name)
        for name, svc in snapshot.items():
            rt = self.services.get(name)
            if rt is None:
                rt = self.services[name] = ServiceRuntime(svc, self.shared, self.engine, self.health)
                rt.listen()
            elif rt.config != svc:
                rt.configure(svc)

    def start(self) -> None:
        self.apply(self.registry.snapshot)
        if self.cfg.global_.state_file:
            statefile.save(self.cfg.global_.state_file, self.registry.snapshot, self.cfg_services)
        self._sweeper = self.loop.create_task(self._sweep_loop())
        self._ramper = self.loop.create_task(self._ramp_loop())

    async def _sweep_loop(self) -> None:
        # Connect and idle timeouts without a timer per connection: connect deadlines (only the
        # sessions still connecting) every tenth of the shortest connect timeout, idle stamps
        # (every session) every tenth of the shortest idle timeout; each between 10 ms and 1 s.
        def tenth(x: float) -> float:
            return max(0.01, min(1.0, x / 10))
        next_idle = 0.0
        while True:
            svcs = [rt.config for rt in self.services.values()] or [config.Service("", (), ())]
            period = tenth(min(s.connect_timeout for s in svcs))
            idle_period = max(period, tenth(min(s.idle_timeout for s in svcs)))
            await asyncio.sleep(period)
            now = self.loop.time()
            check_idle = now >= next_idle
            if check_idle:
                next_idle = now + idle_period
                self.shared.reap()
            self.engine.sweep(check_idle)

    def _on_health(self, service: str, address: str, up: bool, reason: str) -> None:
        rt = self.services.get(service)
        if rt is not None:
            rt.health_changed(address, up)
        self.publish({"op": "health", "service": service, "address": address,
                      "health": "up" if up else "down", "reason": reason})

    async def _ramp_loop(self) -> None:
        # Slow start: rebuild the policies of services with ramping backends in small steps.
        while True:
            ramping = [rt for rt in self.services.values() if rt.ramp]
            steps = [rt.config.health.slowstart / 20 for rt in ramping if rt.config and rt.config.health]
            await asyncio.sleep(max(0.05, min([1.0] + steps)))
            for rt in ramping:
                rt.rebuild()

    def _on_accept_error(self, exc: OSError) -> None:
        now = time.monotonic()
        if now - self._last_accept_error >= ERROR_LOG_INTERVAL:
            self._last_accept_error = now
            log.error("accept failed: %s (connections wait in the backlog)", exc)

    # -- changes --------------------------------------------------------------------------------
    async def _change(self, nxt: dict[str, Service], cfg_services: Mapping[str, Service] | None = None) -> None:
        """Persist, swap, apply. Caller holds self._mutation."""
        path = self.cfg.global_.state_file
        if path:
            try:
                await asyncio.to_thread(statefile.save, path, nxt,
                                        cfg_services if cfg_services is not None else self.cfg_services)
            except OSError as exc:
                raise RegistryError("persist_failed", f"could not write the state file {path}: "
                                    f"{exc.strerror}; nothing changed") from None
        self.registry.commit(nxt)
        if cfg_services is not None:
            self.cfg_services = dict(cfg_services)
        self.apply(nxt)

    async def mutate(self, op: str, args: dict[str, Any]) -> dict:
        async with self._mutation:
            # plan() may resolve a host name: in a thread, so the data path keeps running
            nxt, ev = await asyncio.to_thread(self.registry.plan, op, args)
            await self._change(nxt)
            ev["generation"] = self.registry.generation
            self._after(op, args)
            self.publish(ev)
            return ev

    def _after(self, op: str, args: dict[str, Any]) -> None:
        """Effects on open connections: maint with close, drain with a timeout."""
        if op != "set_state":
            return
        key = (args["service"], args["address"])
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        if args["state"] == "maint" and args.get("close"):
            self._close_backend(*key)
        elif args["state"] == "drain" and "timeout" in args:
            self._timers[key] = self.loop.call_later(args["timeout"], self._drain_expired, *key)

    def _drain_expired(self, service: str, address: str) -> None:
        self._timers.pop((service, address), None)
        svc = self.registry.snapshot.get(service)
        if svc and any(b.address.text == address and b.state == "drain" for b in svc.backends):
            n = self._close_backend(service, address)
            log.info("service %s: backend %s: drain timeout, closed %d connection(s)", service, address, n)

    def _close_backend(self, service: str, address: str) -> int:
        rt = self.services.get(service)
        slot = rt.slot(address) if rt else None
        if rt is None or slot is None:
            return 0
        return _core.abort_where(self.engine, rt.state, slot)

    async def reload(self) -> dict:
        """Re-read the config file and apply what changed in it (see registry.reconcile)."""
        if not self.config_path:
            raise RegistryError("no_config", "fastlb was started without a config file")
        async with self._mutation:
            try:
                new_cfg = await asyncio.to_thread(config.load, self.config_path)
            except ConfigError as exc:
                raise RegistryError("invalid", f"reload refused, nothing changed: {exc}") from None
            new_services = {s.name: s for s in new_cfg.services}
            nxt = reconcile(self.registry.snapshot, self.cfg_services, new_services)
            if new_cfg.global_ != self.cfg.global_:
                log.warning("reload: [global] changes take effect at the next start")
            await self._change(nxt, new_services)
            ev = {"op": "reload", "generation": self.registry.generation,
                  "services": sorted(nxt)}
            self.publish(ev)
            log.info("reloaded %s: %d service(s)", self.config_path, len(nxt))
            return ev

    def publish(self, ev: dict) -> None:
        if self.admin_server is not None:
            self.admin_server.publish(ev)

    # -- the admin handler ----------------------------------------------------------------------
    async def admin(self, req: Request) -> Any:
        op, args = req.op, req.args
        if op in protocol.MUTATIONS:
            return await self.mutate(op, args)
        if op == "ping":
            return "pong"
        if op == "version":
            return {"version": __version__, "protocol": protocol.PROTOCOL_VERSION}
        if op == "services":
            return [{"name": s.name, "listen": [a.text for a in s.listen], "policy": s.policy,
                     "backends": len(s.backends)} for s in self.registry.snapshot.values()]
        if op == "backends":
            svc = self.registry.service(args["service"])
            return [self._backend_info(svc, b) for b in svc.backends]
        if op == "stats":
            return [{"service": s.name, "backends": [self._backend_info(s, b, stats=True)
                                                     for b in s.backends]}
                    for s in self.registry.snapshot.values()]
        if op == "reload":
            return await self.reload()
        raise AdminProtocolError("unknown_op", f"op {op!r} is not served here", id=req.id)

    def _backend_info(self, svc: Service, b: config.Backend, stats: bool = False) -> dict:
        slot = self.shared.slots.get((svc.name, b.address.text))
        info: dict[str, Any] = {"address": b.address.text, "weight": b.weight, "state": b.state,
                                "health": "up" if slot is not None and self.shared.health.is_up(slot) else "down"}
        hs = self.health.state(svc.name, b.address.text)
        if stats:
            info.update(self.shared.counters.slot_stats(slot) if slot is not None else
                        dict.fromkeys(_core.Counters.FIELDS, 0))
            info["check_failures"] = hs.check_failures if hs else 0
            info["health_reason"] = hs.reason if hs else "no checks"
        return info

    # -- running -----------------------------------------------------------------------------------
    def request_stop(self, mode: str) -> None:
        if self._stop.is_set():
            mode = "int"                  # a second signal: stop at once
        self._mode = mode
        self._stop.set()

    def _on_hup(self) -> None:
        async def run() -> None:
            try:
                await self.reload()
            except FastLBError as exc:
                log.error("SIGHUP: %s", exc)
        self.loop.create_task(run())

    def open_connections(self) -> int:
        return len(self.engine.sessions)

    async def run(self) -> int:
        self.loop.add_signal_handler(signal.SIGTERM, self.request_stop, "term")
        self.loop.add_signal_handler(signal.SIGINT, self.request_stop, "int")
        self.loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        self.start()
        g = self.cfg.global_
        if g.admin:
            token = None
            if g.admin.startswith("tcp:"):
                with open(g.admin_token_file) as f:
                    token = f.read().strip()
                if not token:
                    raise FastLBError(f"admin token file {g.admin_token_file} is empty")
            self.admin_server = AdminServer(g.admin, self.admin, token=token)
            await self.admin_server.start()
        log.info("fastlb ready: %d service(s), pid %d", len(self.services), os.getpid())
        await self._stop.wait()
        if self.admin_server is not None:
            self.admin_server.close()
        for rt in self.services.values():
            rt.stop_accepting()
        if self._mode == "term" and self.open_connections():
            grace = self.cfg.global_.grace
            log.info("SIGTERM: stopped accepting; %d connection(s) open, waiting up to %gs",
                     self.open_connections(), grace)
            deadline = self.loop.time() + grace
            while self.open_connections() and self.loop.time() < deadline and self._mode == "term":
                await asyncio.sleep(0.05)
        left = self.open_connections()
        if left:
            log.info("closing %d connection(s)", left)
        self.health.stop()
        self.engine.close()
        self._sweeper.cancel()
        self._ramper.cancel()
        log.info("fastlb stopped")
        return 0


def run(cfg: Config, *, config_path: str | None = None, ignore_state: bool = False) -> int:
    """Run the balancer on uvloop until SIGTERM/SIGINT. Returns the exit code."""
    import uvloop

    raise_fd_limit()

    async def main() -> int:
        balancer = Balancer(cfg, asyncio.get_running_loop(), config_path=config_path,
                            ignore_state=ignore_state)
        return await balancer.run()

    return uvloop.run(main())
