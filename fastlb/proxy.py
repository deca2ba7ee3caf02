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
import dataclasses
import logging
import mmap
import os
import resource
import signal
import socket
import time
from typing import Any, Callable, Mapping

from fastlb import __version__, _core, config, sdnotify, statefile   # [obs] sdnotify
from fastlb.admin import protocol
from fastlb.admin.protocol import AdminProtocolError, Request
from fastlb.admin.server import AdminServer
from fastlb.config import Address, Config, Service
from fastlb.dataplane import DataService, sweep_forever
from fastlb.errors import ConfigError, FastLBError
from fastlb.health import HealthChecker
from fastlb.registry import Registry, RegistryError, reconcile
from fastlb.workers import WorkerPool

log = logging.getLogger("fastlb")

HASH_MODES = {"source_ip": 1, "source_ip_port": 2}
ERROR_LOG_INTERVAL = 10.0   # accept errors: at most one line per this many seconds
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


def listen_socket(addr: Address) -> socket.socket:
    """A listening socket, owned by the supervisor and shared by the data paths."""
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((addr.host, addr.port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {addr.text}: {exc.strerror}") from None
    return sock


class SharedState:
    """The shared-memory mapping: health bitmap + counters (one block per worker), and the slot
    table of backends.

    The mapping is a memfd, so worker processes started with exec map the same memory. A slot
    belongs to one (service, backend address). A released slot is reused only once no
    connection uses it (its active count is back to zero) and every worker has acknowledged
    the snapshot generation that removed it: see reap().
    """

    def __init__(self, max_backends: int, nblocks: int = 1) -> None:
        self.max_backends = max_backends
        self.nblocks = nblocks
        self.size = layout_size(max_backends, nblocks)
        self.fd = os.memfd_create("fastlb-shm", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.mapping = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED)
        self.health, self.counters = views(self.mapping, max_backends, nblocks)
        self.slots: dict[tuple[str, str], int] = {}   # (service, backend address) -> slot
        self._free = list(range(max_backends - 1, -1, -1))
        self._released: list[tuple[int, int]] = []     # (slot, generation that removed it)
        self.acked = lambda: 1 << 62                   # lowest generation every worker runs

    def slot_for(self, service: str, backend_id: str) -> int:
        key = (service, backend_id)
        if key not in self.slots:
            self.reap()
            if not self._free:
                raise RegistryError("full", f"all {self.max_backends} backend slots are in use")
            self.slots[key] = self._free.pop()
        return self.slots[key]

    def release(self, service: str, backend_id: str, generation: int) -> None:
        slot = self.slots.pop((service, backend_id), None)
        if slot is not None:
            self.health.mark_down(slot)
            self._released.append((slot, generation))

    def reap(self) -> None:
        """Free released slots no connection and no worker's snapshot uses any more. A freed
        slot starts again from zero counters (its totals are not the next backend's)."""
        busy, acked = [], self.acked()
        for slot, gen in self._released:
            if self.counters.active(slot) or gen > acked:
                busy.append((slot, gen))
                continue
            for block in range(self.nblocks):
                for field in range(len(_core.Counters.FIELDS)):
                    self.counters.add(block, slot, field, -self.counters.get_block(block, slot, field))
            self._free.append(slot)
        self._released = busy


def layout_size(max_backends: int, nblocks: int) -> int:
    return _core.HealthBitmap.size_for(max_backends) + _core.Counters.size_for(max_backends, nblocks)


def views(mapping: mmap.mmap, max_backends: int, nblocks: int) -> tuple[_core.HealthBitmap, _core.Counters]:
    """The health bitmap and the counters over the shared mapping (same in every process)."""
    hsize = _core.HealthBitmap.size_for(max_backends)
    view = memoryview(mapping)
    return (_core.HealthBitmap(view[:hsize], max_backends),
            _core.Counters(view[hsize:], max_backends, nblocks))


class ServiceRuntime:
    """One service as the supervisor sees it: its config, slots, health tracking, slow-start
    ramps and panic state, turned into a plan (see fastlb.dataplane) for the data path."""

    def __init__(self, svc: Service, shared: SharedState, health: HealthChecker,
                 generation: Callable[[], int]) -> None:
        self.shared = shared
        self.health = health
        self.generation = generation
        self.config: Service | None = None
        self.ramp: dict[str, float] = {}          # address -> when its slow start began
        self.panic = False
        self.configure(svc)

    def configure(self, svc: Service) -> None:
        old = self.config
        self.config = svc
        if old is not None:
            keep = {x.address.text for x in svc.backends}
            for b in old.backends:
                if b.address.text not in keep:
                    self.health.untrack(svc.name, b.address.text)
                    self.ramp.pop(b.address.text, None)
                    self.shared.release(svc.name, b.address.text, self.generation())
        slowstart = svc.health.slowstart if svc.health else 0.0
        old_addresses = {b.address.text for b in old.backends} if old else set()
        for b in svc.backends:
            slot = self.shared.slot_for(svc.name, b.address.text)
            if old is not None and b.address.text not in old_addresses and slowstart > 0:
                self.ramp[b.address.text] = time.monotonic()       # added: eased in
            self.health.track(svc.name, b.address.text, slot, b.address.host, b.address.port, b.health)

    def remove(self) -> None:
        assert self.config is not None
        for b in self.config.backends:
            self.health.untrack(self.config.name, b.address.text)
            self.shared.release(self.config.name, b.address.text, self.generation())

    def health_changed(self, address: str, up: bool) -> None:
        """Slow start begins when a backend comes back up. (Its passive failure streak is reset
        by each data path, which sees the bit go up: DataService.apply.)"""
        assert self.config is not None
        if up and self.config.health and self.config.health.slowstart > 0:
            self.ramp[address] = time.monotonic()

    def plan(self) -> dict:
        """The data path's view of this service now: ready backends with their effective
        weights (slow start), and whether panic mode is on."""
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
        backends = []
        for b in ready:
            slot = self.shared.slots[(svc.name, b.address.text)]
            w = b.weight * scale
            since = self.ramp.get(b.address.text)
            if since is not None and h is not None:
                w = max(1, int(w * (now - since) / h.slowstart))
            backends.append([slot, w, b.address.text, b.address.host, b.address.port])
        up = sum(1 for b in backends if self.shared.health.is_up(b[0]))
        panic = bool(h and h.panic_threshold > 0 and backends
                     and 100 * up / len(backends) < h.panic_threshold)
        if panic != self.panic:
            self.panic = panic
            log.warning("service %s: %s panic mode: %d of %d backends up (threshold %g%%)",
                        svc.name, "entering" if panic else "leaving", up, len(backends),
                        h.panic_threshold if h else 0)
        return {"name": svc.name, "listen": [[a.host, a.port] for a in svc.listen],
                "policy": svc.policy,
                "hash_mode": HASH_MODES[svc.hash_key] if svc.policy == "maglev" else 0,
                "retries": svc.retries, "connect_timeout": svc.connect_timeout,
                "idle_timeout": svc.idle_timeout,
                "fall_passive": h.fall_passive if h else 0, "panic": panic, "backends": backends,
                "names": [[self.shared.slots[(svc.name, b.address.text)], b.address.text]
                          for b in svc.backends]}


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
    """The supervisor: owns the registry, admin socket, health checks, listening sockets and
    the data path (in-process with ``workers = 1``, else a WorkerPool). ``run()`` returns the
    process exit code."""

    def __init__(self, cfg: Config, loop: asyncio.AbstractEventLoop, *, config_path: str | None = None,
                 ignore_state: bool = False, log_level: str = "info") -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.loop = loop
        self.log_level = log_level
        self.cfg_services = {s.name: s for s in cfg.services}
        self.registry = Registry(initial_registry(cfg, ignore_state))
        total = sum(len(s.backends) for s in self.registry.snapshot.values())
        self.nworkers = cfg.global_.workers
        nblocks = 1 if self.nworkers == 1 else 2 * max(self.nworkers, os.cpu_count() or 1)
        self.shared = SharedState(max(cfg.max_backends, 2 * total), nblocks)
        self.health = HealthChecker(self.shared.health, self._on_health)
        self.services: dict[str, ServiceRuntime] = {}
        self.listen_socks: dict[tuple[str, str, int], socket.socket] = {}
        self.engine: _core.Engine | None = None
        self.pool: WorkerPool | None = None
        self.data: dict[str, DataService] = {}
        self.snapshot_gen = 0
        if self.nworkers == 1:
            self.engine = _core.Engine(loop, self.shared.counters, 0)
            self.engine.on_accept_error = self._on_accept_error
            self.shared.acked = lambda: self.snapshot_gen
        else:
            self.pool = WorkerPool(loop, self.shared.fd, self.shared.size, self.shared.max_backends,
                                   self.shared.counters, grace=cfg.global_.grace,
                                   log_level=log_level, on_passive=self._on_passive)
            self.shared.acked = self.pool.acked_min
        self.admin_server: AdminServer | None = None
        self.metrics_server: Any = None          # [obs] fastlb.httpapi.HTTPServer
        self._mutation = asyncio.Lock()
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._stop = asyncio.Event()
        self._mode = "term"
        self._last_accept_error = 0.0

    # -- registry -> plans -> data path ---------------------------------------------------------
    def apply(self, snapshot: Mapping[str, Service]) -> None:
        for name in list(self.services):
            if name not in snapshot:
                self.services.pop(name).remove()
                log.info("service %s removed", name)
        for name, svc in snapshot.items():
            rt = self.services.get(name)
            if rt is None:
                self.services[name] = ServiceRuntime(svc, self.shared, self.health,
                                                     lambda: self.snapshot_gen + 1)
            elif rt.config != svc:
                rt.configure(svc)
        self.push()

    def push(self) -> None:
        """Send every service's current plan to the data path (the next snapshot)."""
        plans = [rt.plan() for rt in self.services.values()]
        wanted = {(p["name"], h, port) for p in plans for h, port in p["listen"]}
        for key in sorted(wanted - self.listen_socks.keys()):
            name, host, port = key
            sock = listen_socket(config.Address(host, port, f"{host}:{port}"))
            self.listen_socks[key] = sock
            rt = self.services[name]
            log.info("service %s: listening on %s (%s, %d backends)", name, _fmt(sock.getsockname()),
                     rt.config.policy if rt.config else "?", len(rt.config.backends) if rt.config else 0)
        self.snapshot_gen += 1
        if self.pool is not None:
            keys = sorted(self.listen_socks)
            self.pool.broadcast(plans, keys, [self.listen_socks[k].fileno() for k in keys])
        else:
            assert self.engine is not None
            names = {p["name"] for p in plans}
            for name in list(self.data):
                if name not in names:
                    self.data.pop(name).stop_accepting()
            for plan in plans:
                ds = self.data.get(plan["name"])
                if ds is None:
                    ds = self.data[plan["name"]] = DataService(
                        plan["name"], self.engine, self.shared.health, self.shared.counters,
                        lambda key, n=plan["name"]: self.listen_socks[(n, *key)].dup(),
                        self._on_passive)
                ds.apply(plan)
        for key in [k for k in self.listen_socks if k not in wanted]:
            self.listen_socks.pop(key).close()       # the data path already let go of it

    def start(self) -> None:
        self.apply(self.registry.snapshot)
        if self.cfg.global_.state_file:
            statefile.save(self.cfg.global_.state_file, self.registry.snapshot, self.cfg_services)
        self._tasks = [self.loop.create_task(self._ramp_loop()), self.loop.create_task(self._reap_loop())]
        if self.engine is not None:
            self._tasks.append(self.loop.create_task(sweep_forever(self.engine, self._timeouts)))

    def _timeouts(self) -> list[tuple[float, float]]:
        return [(rt.config.connect_timeout, rt.config.idle_timeout)
                for rt in self.services.values() if rt.config]

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.shared.reap()

    def _on_health(self, service: str, address: str, up: bool, reason: str) -> None:
        rt = self.services.get(service)
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
            ramping = [rt for rt in self.services.values() if rt.ramp]
            steps = [rt.config.health.slowstart / 20 for rt in ramping if rt.config and rt.config.health]
            await asyncio.sleep(max(0.05, min([1.0] + steps)))
            if any(rt.ramp for rt in self.services.values()):
                self.push()

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
        slot = self.shared.slots.get((service, address))
        ds = self.data.get(service)
        if slot is None:
            return 0
        if ds is not None and self.engine is not None:
            return _core.abort_where(self.engine, ds.state, slot)
        if self.pool is not None:
            self.pool.tell_all({"close": [service, slot]})
        return -1                          # counted by the workers

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
            g_old, g_new = self.cfg.global_, new_cfg.global_
            if g_new.workers != g_old.workers:
                if self.pool is None or g_new.workers == 1:
                    log.warning("reload: switching between 1 and several workers needs a restart")
                elif 2 * g_new.workers > self.shared.nblocks:
                    log.warning("reload: at most %d workers without a restart", self.shared.nblocks // 2)
                else:
                    await self.pool.resize(g_new.workers)
                    self.cfg = dataclasses.replace(self.cfg, global_=dataclasses.replace(g_old, workers=g_new.workers))
            if dataclasses.replace(g_new, workers=0) != dataclasses.replace(g_old, workers=0):
                log.warning("reload: [global] changes other than workers take effect at the next start")
            await self._change(nxt, new_services)
            ev = {"op": "reload", "generation": self.registry.generation, "services": sorted(nxt)}
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
            return self.stats()
        if op == "workers":
            if self.pool is None:
                return [{"index": 0, "pid": os.getpid(), "generation": self.snapshot_gen,
                         "stopping": False, "connections": sum(
                             self.shared.counters.get_block(0, s, 1) for s in range(self.shared.max_backends))}]
            return self.pool.info()
        if op == "restart_workers":
            if self.pool is None:
                raise RegistryError("single_process", "workers = 1: there is no worker to restart")
            return {"restarted": await self.pool.rolling_restart()}
        if op == "reload":
            return await self.reload()
        raise AdminProtocolError("unknown_op", f"op {op!r} is not served here", id=req.id)

    def stats(self) -> list[dict]:
        """Per service, per backend: counters summed over workers, health, weight, state."""
        return [{"service": s.name, "backends": [self._backend_info(s, b, stats=True)
                                                 for b in s.backends]}
                for s in self.registry.snapshot.values()]

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
            if self.pool is not None:
                self.pool.tell_all({"stop": "int"})
        self._mode = mode
        self._stop.set()

    def _on_hup(self) -> None:
        async def run() -> None:
            sdnotify.reloading()                                    # [obs] service manager
            why = "reloaded"                                        # [obs]
            try:
                await self.reload()
            except FastLBError as exc:
                log.error("SIGHUP: %s", exc)
                why = f"reload failed, previous config serving: {exc}"   # [obs]
            sdnotify.ready(f"{why}; {self._status_line()}")           # [obs]
        self.loop.create_task(run())

    def _status_line(self) -> str:                                  # [obs] sd_notify STATUS=
        return (f"serving {len(self.services)} service(s) with {self.nworkers} worker(s), "
                f"{self.open_connections()} connection(s) open")

    def open_connections(self) -> int:
        if self.engine is not None:
            return len(self.engine.sessions)
        return sum(self.shared.counters.active(s) for s in range(self.shared.max_backends))

    async def run(self) -> int:
        self.loop.add_signal_handler(signal.SIGTERM, self.request_stop, "term")
        self.loop.add_signal_handler(signal.SIGINT, self.request_stop, "int")
        self.loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        self.start()
        if self.pool is not None:
            workers = [self.pool.spawn() for _ in range(self.nworkers)]
            for w in workers:
                await self.pool.wait_acked(w)
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
        if g.metrics:   # [obs] the metrics port: Prometheus, JSON API, status page (fastlb/httpapi.py)
            from fastlb import httpapi, observe
            self.metrics_server = await httpapi.serve_http(g.metrics, observe.Sources(
                stats=self.stats, services=lambda: self.registry.snapshot, health=self.health.state))
        log.info("fastlb ready: %d service(s), %d worker(s), pid %d", len(self.services),
                 self.nworkers, os.getpid())
        sdnotify.ready(self._status_line())                         # [obs] service manager
        await self._stop.wait()
        how = f"SIGTERM, up to {self.cfg.global_.grace:g}s grace" if self._mode == "term" else "at once"  # [obs]
        sdnotify.stopping(f"stopping ({how}), {self.open_connections()} connection(s) open")  # [obs]
        if self.admin_server is not None:
            self.admin_server.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.pool is not None:
            log.info("%s: stopping %d worker(s)", "SIGTERM" if self._mode == "term" else "SIGINT",
                     len(self.pool.workers))
            await self.pool.stop(self._mode)
            for sock in self.listen_socks.values():
                sock.close()
        else:
            for ds in self.data.values():
                ds.stop_accepting()
            for sock in self.listen_socks.values():
                sock.close()
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
            assert self.engine is not None
            self.engine.close()
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
        balancer = Balancer(cfg, asyncio.get_running_loop(), config_path=config_path,
                            ignore_state=ignore_state, log_level=log_level)
        return await balancer.run()

    return uvloop.run(main())
