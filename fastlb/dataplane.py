"""A service on a data path: the part that runs in every worker (or in the single process).

Owner: one service's ServiceState and listeners in one Engine. It gets *plans* from the
supervisor (plain msgpack-able dicts, see ``plan()`` in fastlb.proxy) and never reads the
registry or config. A plan:

    {"name", "listen": [[host, port]], "policy", "hash_mode", "retries", "connect_timeout",
     "idle_timeout", "fall_passive", "panic", "options": {the policy's options},
     "backends": [[slot, effective weight, id, host, port]],    # ready ones, for new connections
     "names": [[slot, address]]}                                  # all, for logs and reports

Applying a plan swaps the policy (for the next connection) and diffs the listeners: a listener
whose address did not change is never closed. Listening sockets belong to the supervisor; a
data service listens on a duplicate, so closing its copy never refuses a connection while
another process still accepts on the socket.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Callable

from fastlb import _core

log = logging.getLogger("fastlb")

# Connect errors of one backend are logged at most once per this many seconds, with a count.
ERROR_LOG_INTERVAL = 10.0

SocketFor = Callable[[tuple[str, int]], socket.socket]        # a fresh duplicate to listen on
PassiveReport = Callable[[str, str, int, str], None]          # (service, address, n, reason)


class DataService:
    def __init__(self, name: str, engine: _core.Engine, health: _core.HealthBitmap,
                 counters: _core.Counters, socket_for: SocketFor, on_passive: PassiveReport,
                 *, shared_listeners: bool = False) -> None:
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
        self.plan: dict | None = None
        self.was_up: dict[int, bool] = {}       # slot -> health seen at the last plan

    def apply(self, plan: dict) -> None:
        """Take a plan. An unchanged plan (the supervisor pushes all services when one changes)
        keeps the policy as it is; only the health bookkeeping below runs."""
        old = self.plan
        for slot, _ in plan["names"]:           # back up: its failure streak starts over
            up = self.health.is_up(slot)
            if up and not self.was_up.get(slot, True):
                self.engine.reset_passive(slot)
            self.was_up[slot] = up
        if plan == old:
            return
        self.plan = plan
        st = self.state
        st.retries = plan["retries"]
        st.connect_timeout = plan["connect_timeout"]
        st.idle_timeout = plan["idle_timeout"]
        st.hash_mode = plan["hash_mode"]
        st.fall_passive = plan["fall_passive"]
        self.names = {slot: address for slot, address in plan["names"]}
        if old is not None:
            for slot, address in old["names"]:
                if slot not in self.names:
                    self.engine.reset_passive(slot)
        self.was_up = {s: u for s, u in self.was_up.items() if s in self.names}
        backends = plan["backends"]
        bitmap = self.health
        if plan["panic"]:                       # every ready backend counts as up
            for b in backends:
                self.all_up.mark_up(b[0])
            bitmap = self.all_up
        policy = None
        if backends:
            policy = _core.make_policy(plan["policy"], [b[0] for b in backends],
                                       [b[1] for b in backends], bitmap,
                                       counters=self.counters, ids=[b[2] for b in backends],
                                       seed=int.from_bytes(os.urandom(8), "little"),
                                       options=plan.get("options"))
        st.set_backends(policy, {b[0]: (b[3], b[4]) for b in backends})
        self.listen({(h, p) for h, p in plan["listen"]})

    def listen(self, want: set[tuple[str, int]]) -> None:
        for key in list(self.listeners):
            if key not in want:
                self.engine.unlisten(self.listeners.pop(key))
        for key in sorted(want - self.listeners.keys()):
            sock = self.socket_for(key)
            self.listeners[key] = self.engine.listen(sock, self.state, self.shared_listeners)

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


async def sweep_forever(engine: _core.Engine, timeouts: Callable[[], list[tuple[float, float]]]) -> None:
    """Connect and idle timeouts without a timer per connection: connect deadlines (only the
    sessions still connecting) every tenth of the shortest connect timeout, idle stamps (every
    session) every tenth of the shortest idle timeout; each between 10 ms and 1 s.
    ``timeouts()`` gives the (connect, idle) timeouts of the services now served."""
    import asyncio

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
