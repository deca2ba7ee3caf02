"""The balancer process: listeners, per-service data-path state, idle sweeps, signals.

Owner: the running balancer (one process, ``workers = 1``). It turns a Config into listening
sockets and ServiceStates (fastlb._core), gives each backend a stable slot in the shared health
bitmap and counters, and stops cleanly: SIGTERM stops accepting, lets open connections finish
for ``grace`` seconds, then closes them; SIGINT closes everything at once.
The per-connection work is all in the core's Engine; nothing here runs per connection or byte.
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

from fastlb import _core
from fastlb.config import Address, Config, Service

log = logging.getLogger("fastlb")

HASH_MODES = {"source_ip": 1, "source_ip_port": 2}
# Connect errors of one backend are logged at most once per this many seconds, with a count.
ERROR_LOG_INTERVAL = 10.0
LISTEN_BACKLOG = 4096


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
    """The shared-memory mapping: health bitmap + counters, and the slot table of backends."""

    def __init__(self, max_backends: int, nblocks: int = 1) -> None:
        self.max_backends = max_backends
        hsize = _core.HealthBitmap.size_for(max_backends)
        csize = _core.Counters.size_for(max_backends, nblocks)
        self.mapping = mmap.mmap(-1, hsize + csize, flags=mmap.MAP_SHARED)
        view = memoryview(self.mapping)
        self.health = _core.HealthBitmap(view[:hsize], max_backends)
        self.counters = _core.Counters(view[hsize:], max_backends, nblocks)
        self.slots: dict[tuple[str, str], int] = {}   # (service, backend id) -> slot
        self._free = list(range(max_backends - 1, -1, -1))

    def slot_for(self, service: str, backend_id: str) -> int:
        key = (service, backend_id)
        if key not in self.slots:
            if not self._free:
                raise RuntimeError(f"more than {self.max_backends} backends")
            self.slots[key] = self._free.pop()
        return self.slots[key]


class ServiceRuntime:
    """One configured service: its ServiceState (read by the data path) and its listeners."""

    def __init__(self, svc: Service, shared: SharedState, engine: _core.Engine) -> None:
        self.config = svc
        self.shared = shared
        self.engine = engine
        self.state = _core.ServiceState(svc.name)
        self.state.retries = svc.retries
        self.state.connect_timeout = svc.connect_timeout
        self.state.idle_timeout = svc.idle_timeout
        self.state.hash_mode = HASH_MODES[svc.hash_key] if svc.policy == "maglev" else 0
        self.state.on_connect_error = self._on_connect_error
        self.state.on_no_backend = self._on_no_backend
        self.listeners: list = []
        self._last_log: dict[object, tuple[float, int]] = {}
        self.apply_backends()

    def apply_backends(self) -> None:
        svc = self.config
        slots, weights, ids, addrs = [], [], [], {}
        for b in svc.backends:
            slot = self.shared.slot_for(svc.name, b.address.text)
            self.shared.health.mark_up(slot)   # up until health checks say otherwise
            slots.append(slot)
            weights.append(b.weight)
            ids.append(b.address.text)
            addrs[slot] = (b.address.host, b.address.port)
        self.slot_names = {s: i for s, i in zip(slots, ids)}
        policy = None
        if slots:
            policy = _core.make_policy(svc.policy, slots, weights, self.shared.health,
                                       counters=self.shared.counters, ids=ids,
                                       seed=int.from_bytes(os.urandom(8), "little"))
        self.state.set_backends(policy, addrs)

    def start(self) -> None:
        for addr in self.config.listen:
            sock = listen_socket(addr)
            bound = sock.getsockname()
            self.listeners.append(self.engine.listen(sock, self.state))
            log.info("service %s: listening on %s (%s, %d backends)", self.config.name,
                     _fmt(bound), self.config.policy, len(self.config.backends))

    def stop_accepting(self) -> None:
        for lst in self.listeners:
            self.engine.unlisten(lst)
        self.listeners.clear()

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
            log.warning("service %s: backend %s: %s%s", self.config.name,
                        self.slot_names.get(slot, slot), reason,
                        f" ({n} failures in the last {ERROR_LOG_INTERVAL:g}s)" if n > 1 else "")

    def _on_no_backend(self) -> None:
        n = self._rate_limited("none")
        if n is not None:
            log.error("service %s: no backend could take a client, connection closed%s",
                      self.config.name, f" ({n} times in the last {ERROR_LOG_INTERVAL:g}s)" if n > 1 else "")


def _fmt(sockaddr: tuple) -> str:
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Balancer:
    """Runs a Config until a signal. ``run()`` returns the process exit code."""

    def __init__(self, cfg: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.cfg = cfg
        self.loop = loop
        total = sum(len(s.backends) for s in cfg.services)
        self.shared = SharedState(max(cfg.max_backends, total))
        self.engine = _core.Engine(loop, self.shared.counters, 0)
        self.engine.on_accept_error = self._on_accept_error
        self.services = [ServiceRuntime(s, self.shared, self.engine) for s in cfg.services]
        self._stop = asyncio.Event()
        self._mode = "term"
        self._last_accept_error = 0.0

    def start(self) -> None:
        for rt in self.services:
            rt.start()
        self._sweeper = self.loop.create_task(self._sweep_loop())

    async def _sweep_loop(self) -> None:
        # Connect and idle timeouts without a timer per connection: connect deadlines (only the
        # sessions still connecting) every tenth of the shortest connect timeout, idle stamps
        # (every session) every tenth of the shortest idle timeout; each between 10 ms and 1 s.
        def tenth(x: float) -> float:
            return max(0.01, min(1.0, x / 10))
        period = tenth(min(s.config.connect_timeout for s in self.services))
        idle_period = max(period, tenth(min(s.config.idle_timeout for s in self.services)))
        next_idle = self.loop.time() + idle_period
        while True:
            await asyncio.sleep(period)
            now = self.loop.time()
            check_idle = now >= next_idle
            if check_idle:
                next_idle = now + idle_period
            self.engine.sweep(check_idle)

    def _on_accept_error(self, exc: OSError) -> None:
        now = time.monotonic()
        if now - self._last_accept_error >= ERROR_LOG_INTERVAL:
            self._last_accept_error = now
            log.error("accept failed: %s (connections wait in the backlog)", exc)

    def request_stop(self, mode: str) -> None:
        self._mode = mode
        self._stop.set()

    def open_connections(self) -> int:
        return len(self.engine.sessions)

    async def run(self) -> int:
        self.loop.add_signal_handler(signal.SIGTERM, self.request_stop, "term")
        self.loop.add_signal_handler(signal.SIGINT, self.request_stop, "int")
        self.start()
        log.info("fastlb ready: %d service(s), pid %d", len(self.services), os.getpid())
        await self._stop.wait()
        for rt in self.services:
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
        self.engine.close()
        self._sweeper.cancel()
        log.info("fastlb stopped")
        return 0


def run(cfg: Config) -> int:
    """Run the balancer on uvloop until SIGTERM/SIGINT. Returns the exit code."""
    import uvloop

    raise_fd_limit()

    async def main() -> int:
        # A second SIGTERM/SIGINT while draining switches to an immediate stop.
        balancer = Balancer(cfg, asyncio.get_running_loop())
        return await balancer.run()

    return uvloop.run(main())
