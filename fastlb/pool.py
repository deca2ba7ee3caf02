"""The worker pool: the DataPath (fastlb.plan) of ``workers > 1``. Starts, feeds, watches and
restarts worker processes (fastlb.worker).

Owner: worker processes and their control channels. A worker is ``python -m fastlb.worker``,
started with exec (no event-loop state inherited through a fork) and given: the shared-memory
memfd, its counter block index, and one end of a SOCK_SEQPACKET socketpair. Over that channel,
one message per packet (msgpack maps):

  worker -> supervisor   {"hello": token, "pid": n}   first; a token (fastlb version, wire
                                                      form, memory layout) other than ours is
                                                      refused: the worker is killed, unfed
                         {"ack": n}                       it runs snapshot n
                         {"passive": [service, address, failures, reason]}
  supervisor -> worker   Snapshot.to_wire(): {"gen", "plans", "listen"}, with the listening
                         sockets attached (SCM_RIGHTS) in "listen" order; sent once the hello
                         checked out, then on every change
                         {"stop": "term" | "int"}
                         {"close": [service, slot, why]}   close that backend's connections
                         {"tickets": {service: keys}}  [tlsops] the session ticket keys (fastlb.
                                                      tickets): before the first snapshot, then
                                                      at every rotation

A worker that dies is restarted on the same counter block once it has exited (its active counts
zeroed: its connections are gone; its totals stay). One that dies before running its first
snapshot is a failed start: restarts back off from 0.1 s, doubling, up to 30 s, and after
CRASH_LOOP_LIMIT failed starts in a row one critical line says so. The exit is watched with a
pidfd: nothing here blocks the event loop. Pool operations (restart, resize) run one at a time;
another one is refused while one runs.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Mapping

import msgpack

from fastlb import _core, spawn
from fastlb.dataplane import check_plans, sum_memory
from fastlb.errors import RegistryError
from fastlb.plan import ListenKey, Plan, Snapshot
from fastlb.shm import zero_active
from fastlb.worker import CONTROL_BUFFER, MAX_LISTEN_FDS, token

log = logging.getLogger("fastlb")
BACKOFF_FIRST = 0.1           # seconds before restarting a worker that failed to start...
BACKOFF_MAX = 30.0            # ...doubling per failed start in a row, up to this
CRASH_LOOP_LIMIT = 5          # failed starts in a row that make a crash loop (one critical line)
EXIT_WAIT = 5.0               # a worker whose channel closed is killed if not gone by then


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    acked: int = 0
    verified: bool = False     # its hello checked out: it gets snapshots
    ready: bool = False        # it ran a snapshot
    stopping: bool = False
    exited: asyncio.Future[int | None] = field(default_factory=asyncio.Future)
    mem: dict[str, int] = field(default_factory=dict)   # [mem] its last report (DataPlane.memory)


class WorkerPool:
    def __init__(self, loop: asyncio.AbstractEventLoop, shm_fd: int, shm_size: int,
                 max_backends: int, counters: _core.Counters, gauges: _core.Gauges, *,
                 workers: int, grace: float,
                 log_level: str,
                 on_passive: Callable[[str, str, int, str], None]) -> None:
        self.loop = loop
        self.shm_fd, self.shm_size = shm_fd, shm_size
        self.max_backends = max_backends
        self.counters = counters
        self.gauges = gauges
        self.grace = grace
        self.log_level = log_level
        self.on_passive = on_passive
        self.size = workers
        self.workers: list[Worker] = []       # alive, channel open
        self.exiting: list[Worker] = []       # channel closed, process not reaped yet
        self.free_blocks = list(range(counters.nblocks - 1, -1, -1))
        self.snapshot: tuple[bytes, list[int]] | None = None
        self.tickets: dict[str, bytes] = {}         # [tlsops] the last session ticket keys
        self.plans: dict[str, Plan] = {}       # of the last snapshot
        self.generation = 0
        self.closing = False
        self.failures = 0                     # failed starts in a row
        self.token = token()
        self._op: str | None = None           # the pool operation under way

    # -- lifecycle ------------------------------------------------------------------------------
    def spawn(self) -> Worker:
        if self.closing:
            raise RegistryError("stopping", "fastlb is stopping: no new worker")
        if not self.free_blocks:
            raise RegistryError("busy", f"no free counter block: {len(self.exiting)} old worker(s) "
                                        f"still finishing their connections; try again later")
        index = self.free_blocks.pop()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (parent, child):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CONTROL_BUFFER)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CONTROL_BUFFER)
        os.set_inheritable(child.fileno(), True)
        os.set_inheritable(self.shm_fd, True)
        try:
            # the same fastlb package as ours, never the current directory's (fastlb.spawn)
            proc = subprocess.Popen(
                spawn.command("fastlb.worker", "--index", str(index),
                              "--control", str(child.fileno()), "--shm", str(self.shm_fd),
                              "--shm-size", str(self.shm_size),
                              "--max-backends", str(self.max_backends),
                              "--nblocks", str(self.counters.nblocks), "--grace", str(self.grace),
                              "--log-level", self.log_level),
                pass_fds=(child.fileno(), self.shm_fd), env=spawn.environment())
        except OSError:
            self.free_blocks.append(index)
            parent.close()
            raise
        finally:
            child.close()
        parent.setblocking(False)
        w = Worker(index, proc, parent, exited=self.loop.create_future())
        self.workers.append(w)
        self.loop.add_reader(parent.fileno(), self._on_message, w)
        log.info("worker %d started, pid %d", index, proc.pid)
        return w

    def _closed(self, w: Worker) -> None:
        """Its channel closed: watch the process exit without blocking the loop (a pidfd)."""
        if w not in self.workers:
            return
        self.workers.remove(w)
        self.exiting.append(w)
        self.loop.remove_reader(w.sock.fileno())
        w.sock.close()
        try:
            pidfd = os.pidfd_open(w.proc.pid)
        except OSError:                          # already reaped: no process to wait for
            self._reaped(w, None)
            return
        kill = self.loop.call_later(EXIT_WAIT, w.proc.kill)

        def exited() -> None:
            self.loop.remove_reader(pidfd)
            os.close(pidfd)
            kill.cancel()
            self._reaped(w, w.proc.wait())       # it has exited: does not block
        self.loop.add_reader(pidfd, exited)

    def _reaped(self, w: Worker, code: int | None) -> None:
        self.exiting.remove(w)
        zero_active(self.counters, w.index, self.gauges)   # its connections are gone; totals stay
        self.free_blocks.append(w.index)
        if not w.exited.done():
            w.exited.set_result(code)
        if w.stopping or self.closing:
            log.info("worker %d (pid %d) stopped", w.index, w.proc.pid)
            return
        if w.ready:
            self.failures = 0
            log.error("worker %d (pid %d) died (exit %s); starting a new one", w.index, w.proc.pid, code)
            self._respawn()
            return
        self.failures += 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.failures - 1))
        log.error("worker %d (pid %d) failed to start (exit %s, %d in a row); next start in %.1fs",
                  w.index, w.proc.pid, code, self.failures, delay)
        if self.failures == CRASH_LOOP_LIMIT:
            log.critical("workers are crash-looping: %d failed starts in a row; still retrying, "
                         "at most every %gs (see the lines above for why)", self.failures, BACKOFF_MAX)
        self.loop.call_later(delay, self._respawn)

    def _respawn(self) -> None:
        if self.closing or len([w for w in self.workers if not w.stopping]) >= self.size:
            return                  # stopping, or a resize or restart has filled the pool since
        try:
            self.spawn()
        except (RegistryError, OSError) as exc:
            log.error("cannot start a worker: %s", exc)

    # -- the channel ----------------------------------------------------------------------------
    def check(self, snapshot: Snapshot) -> None:
        check_plans(snapshot, self.plans)
        if len(snapshot.listen) > MAX_LISTEN_FDS:
            raise RegistryError("invalid", f"more than {MAX_LISTEN_FDS} listeners; nothing changed")
        if len(msgpack.packb(snapshot.to_wire(), use_bin_type=True)) > CONTROL_BUFFER:
            raise RegistryError("invalid", "the snapshot would be larger than the control channel's "
                                           f"{CONTROL_BUFFER} byte packet limit; nothing changed")

    def apply(self, snapshot: Snapshot, sockets: Mapping[ListenKey, Any]) -> None:
        data = msgpack.packb(snapshot.to_wire(), use_bin_type=True)
        fds = [sockets[k].fileno() for k in snapshot.listen]
        self.generation = snapshot.gen
        self.snapshot = (data, fds)
        self.plans = {p.name: p for p in snapshot.plans}
        for w in list(self.workers):
            if w.verified:
                self._send(w, data, fds)

    def _send(self, w: Worker, data: bytes, fds: list[int]) -> None:
        try:
            socket.send_fds(w.sock, [data], fds)
        except OSError as exc:          # a full channel or a dead worker: replace it
            log.error("worker %d: control channel: %s; restarting it", w.index, exc)
            w.proc.kill()

    def _on_message(self, w: Worker) -> None:
        try:
            data = w.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._closed(w)
            return
        try:
            msg = msgpack.unpackb(data, raw=False)
        except Exception:  # noqa: BLE001 - a worker is ours; a garbled packet is a bug, log it
            log.exception("worker %d: bad control message", w.index)
            return
        if not w.verified:
            if msg.get("hello") != self.token:
                log.error("worker %d (pid %d) refused: it runs %r, this supervisor %r (fastlb was "
                          "upgraded under a running supervisor? restart fastlb)",
                          w.index, w.proc.pid, msg.get("hello"), self.token)
                w.proc.kill()
                return
            w.verified = True
            if self.tickets:                                # [tlsops] before its first contexts
                with contextlib.suppress(OSError):
                    w.sock.send(msgpack.packb({"tickets": self.tickets}, use_bin_type=True))
            if self.snapshot is not None:
                self._send(w, *self.snapshot)
        elif "ack" in msg:
            w.acked = msg["ack"]
            if not w.ready:
                w.ready = True
                self.failures = 0
        elif "passive" in msg:
            self.on_passive(*msg["passive"])
        elif "mem" in msg:                                  # [mem] sent once a second
            w.mem = {str(k): int(v) for k, v in msg["mem"].items()}

    def set_log_level(self, level: str) -> None:
        """[obs] The admin's log_level: every worker now, and those started later."""
        self.log_level = level
        self.tell_all({"log_level": level})

    def set_tickets(self, keys: Mapping[str, bytes]) -> None:
        """[tlsops] The session ticket keys: every worker now, and those started later."""
        self.tickets = dict(keys)
        self.tell_all({"tickets": self.tickets})

    def tell_all(self, msg: dict[str, Any]) -> None:
        data = msgpack.packb(msg, use_bin_type=True)
        for w in list(self.workers):
            with contextlib.suppress(OSError):
                w.sock.send(data)

    def acked(self) -> int:
        """The lowest snapshot generation all live workers run (every snapshot, if none)."""
        live = [w.acked for w in self.workers if not w.stopping and w.verified]
        return min(live) if live else self.generation

    def close_backend(self, service: str, slot: int, why: str) -> None:
        self.tell_all({"close": [service, slot, why]})

    def connections(self) -> int:
        return sum(self.counters.active(s) for s in range(self.counters.nslots))

    def memory(self) -> dict[str, int]:
        """[mem] The live workers' last reports (at most a second old), summed."""
        return sum_memory([w.mem for w in self.workers if w.verified and not w.stopping])

    async def wait_acked(self, w: Worker, timeout: float = 10.0) -> bool:
        deadline = self.loop.time() + timeout
        while w.acked < self.generation and self.loop.time() < deadline and w in self.workers:
            await asyncio.sleep(0.01)
        return w.acked >= self.generation

    async def start(self) -> None:
        """The first workers, each running the current snapshot (or given up on)."""
        for w in [self.spawn() for _ in range(self.size)]:
            await self.wait_acked(w)

    # -- operations of the pool: one at a time ---------------------------------------------------
    @contextlib.asynccontextmanager
    async def _operation(self, name: str) -> AsyncIterator[None]:
        if self._op is not None:
            raise RegistryError("busy", f"{self._op} is under way; {name} refused, try again when "
                                        f"it has finished")
        self._op = name
        try:
            yield
        finally:
            self._op = None

    def _stop_one(self, w: Worker, mode: str) -> None:
        w.stopping = True
        try:
            w.sock.send(msgpack.packb({"stop": mode}))
        except OSError:
            if w.proc.poll() is not None:
                return              # already gone
            w.proc.send_signal(signal.SIGTERM if mode == "term" else signal.SIGINT)

    async def resize(self, n: int) -> bool:
        """Start or (gracefully) stop workers until ``n`` run."""
        if n == 1:
            log.warning("reload: switching between 1 and several workers needs a restart")
            return False
        if 2 * n > self.counters.nblocks:
            log.warning("reload: at most %d workers without a restart", self.counters.nblocks // 2)
            return False
        async with self._operation("a worker resize"):
            live = [w for w in self.workers if not w.stopping]
            for _ in range(n - len(live)):
                new = self.spawn()
                if not await self.wait_acked(new):
                    self._stop_one(new, "int")
                    self.size = len([w for w in self.workers if not w.stopping])
                    log.error("worker %d did not start serving (see above); the pool stays at %d "
                              "worker(s)", new.index, self.size)
                    return False
            self.size = n
            for w in live[n:]:
                self._stop_one(w, "term")
        return True

    async def restart(self) -> int:
        """Replace every worker: a new one is serving before an old one stops accepting. A new
        one that does not come up (refused by the version check, dead, no ack in time) is
        stopped, and the old ones not yet replaced keep serving: RegistryError("failed")."""
        async with self._operation("restart-workers"):
            old = [w for w in self.workers if not w.stopping]
            for done, w in enumerate(old):
                new = self.spawn()
                if not await self.wait_acked(new):
                    self._stop_one(new, "int")
                    raise RegistryError("failed", f"worker {new.index} did not start serving (see "
                                                  f"fastlb's log); {done} of {len(old)} worker(s) "
                                                  f"replaced, the others keep serving")
                self._stop_one(w, "term")
            return len(old)

    def stop_accepting(self, mode: str) -> None:
        self.closing = True
        for w in list(self.workers):
            self._stop_one(w, mode)

    async def finish(self, mode: str, grace: float) -> None:
        waits = [w.exited for w in self.workers + self.exiting]
        if waits:
            done, pending = await asyncio.wait(waits, timeout=(grace if mode == "term" else 0) + 5)
            for w in self.workers + self.exiting:
                if w.exited in pending:
                    w.proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=5)

    def info(self) -> list[dict[str, Any]]:
        return [{"index": w.index, "pid": w.proc.pid, "generation": w.acked, "stopping": w.stopping,
                 "connections": sum(self.counters.get_block(w.index, s, _core.CTR_TOTAL)
                                    for s in range(self.counters.nslots))}
                for w in self.workers]
