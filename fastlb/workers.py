"""The supervisor's worker pool: start, feed, watch and restart worker processes.

Owner: worker processes and their control channels. A worker is ``python -m fastlb.worker``,
started with exec (no event-loop state inherited through a fork) and given: the shared-memory
memfd, its counter block index, and one end of a SOCK_SEQPACKET socketpair. Over that channel,
one message per packet (msgpack maps):

  supervisor -> worker   {"gen": n, "plans": [plan, ...], "listen": [[service, host, port]]}
                         with the listening sockets attached (SCM_RIGHTS), in "listen" order;
                         {"stop": "term" | "int"}
                         {"close": [service, slot]}   close that backend's connections
  worker -> supervisor   {"ack": n}                       it runs snapshot n
                         {"passive": [service, address, failures, reason]}

A worker that dies is restarted on the same counter block after its active counts are zeroed
(its connections are gone); its totals stay. Slots freed by the registry wait until every worker
acknowledged the snapshot that stopped using them.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

import msgpack

from fastlb import _core

log = logging.getLogger("fastlb")
CONTROL_BUFFER = 4 << 20      # the largest snapshot packet; SO_SNDBUF/SO_RCVBUF of the channel
MAX_LISTEN_FDS = 253          # SCM_MAX_FD: listening sockets one snapshot can carry


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen
    sock: socket.socket
    acked: int = 0
    stopping: bool = False
    exited: asyncio.Future = field(default=None)  # type: ignore[assignment]


class WorkerPool:
    def __init__(self, loop: asyncio.AbstractEventLoop, shm_fd: int, shm_size: int,
                 max_backends: int, counters: _core.Counters, *, grace: float, log_level: str,
                 on_passive: Callable[[str, str, int, str], None]) -> None:
        self.loop = loop
        self.shm_fd, self.shm_size = shm_fd, shm_size
        self.max_backends = max_backends
        self.counters = counters
        self.grace = grace
        self.log_level = log_level
        self.on_passive = on_passive
        self.workers: list[Worker] = []
        self.free_blocks = list(range(counters.nblocks - 1, -1, -1))
        self.snapshot: tuple[bytes, list[int]] | None = None
        self.generation = 0
        self.closing = False

    # -- lifecycle ------------------------------------------------------------------------------
    def spawn(self) -> Worker:
        if not self.free_blocks:
            raise RuntimeError(f"no free counter block (at most {self.counters.nblocks} workers at once)")
        index = self.free_blocks.pop()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (parent, child):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CONTROL_BUFFER)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CONTROL_BUFFER)
        os.set_inheritable(child.fileno(), True)
        os.set_inheritable(self.shm_fd, True)
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastlb.worker", "--index", str(index),
             "--control", str(child.fileno()), "--shm", str(self.shm_fd),
             "--shm-size", str(self.shm_size), "--max-backends", str(self.max_backends),
             "--nblocks", str(self.counters.nblocks), "--grace", str(self.grace),
             "--log-level", self.log_level],
            pass_fds=(child.fileno(), self.shm_fd))
        child.close()
        parent.setblocking(False)
        w = Worker(index, proc, parent, exited=self.loop.create_future())
        self.workers.append(w)
        self.loop.add_reader(parent.fileno(), self._on_message, w)
        log.info("worker %d started, pid %d", index, proc.pid)
        if self.snapshot is not None:
            self._send(w, *self.snapshot)
        return w

    def _exited(self, w: Worker) -> None:
        if w not in self.workers:
            return
        self.workers.remove(w)
        self.loop.remove_reader(w.sock.fileno())
        w.sock.close()
        try:
            code = w.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            code = w.proc.wait()
        # Its connections are gone: no stuck active counts. Totals and bytes stay.
        self.counters.zero(w.index, fields=(_core.CTR_ACTIVE,))
        self.free_blocks.append(w.index)
        if not w.exited.done():
            w.exited.set_result(code)
        if w.stopping or self.closing:
            log.info("worker %d (pid %d) stopped", w.index, w.proc.pid)
            return
        log.error("worker %d (pid %d) died (exit %s); starting a new one", w.index, w.proc.pid, code)
        self.spawn()

    # -- the channel ----------------------------------------------------------------------------
    def broadcast(self, plans: list[dict], listen: list[tuple[str, str, int]], fds: list[int]) -> None:
        if len(fds) > MAX_LISTEN_FDS:
            raise RuntimeError(f"more than {MAX_LISTEN_FDS} listeners")
        self.generation += 1
        data = msgpack.packb({"gen": self.generation, "plans": plans,
                              "listen": [list(k) for k in listen]}, use_bin_type=True)
        if len(data) > CONTROL_BUFFER:
            raise RuntimeError("snapshot larger than the control channel's packet limit")
        self.snapshot = (data, list(fds))
        for w in list(self.workers):
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
            self._exited(w)
            return
        try:
            msg = msgpack.unpackb(data, raw=False)
        except Exception:  # noqa: BLE001 - a worker is ours; a garbled packet is a bug, log it
            log.exception("worker %d: bad control message", w.index)
            return
        if "ack" in msg:
            w.acked = msg["ack"]
        elif "passive" in msg:
            self.on_passive(*msg["passive"])

    def tell_all(self, msg: dict) -> None:
        data = msgpack.packb(msg, use_bin_type=True)
        for w in list(self.workers):
            try:
                w.sock.send(data)
            except OSError:
                pass

    def acked_min(self) -> int:
        """The lowest snapshot generation all live workers run (every snapshot, if none)."""
        live = [w.acked for w in self.workers if not w.stopping]
        return min(live) if live else self.generation

    async def wait_acked(self, w: Worker, timeout: float = 10.0) -> bool:
        deadline = self.loop.time() + timeout
        while w.acked < self.generation and self.loop.time() < deadline and w in self.workers:
            await asyncio.sleep(0.01)
        return w.acked >= self.generation

    # -- changes of the pool ----------------------------------------------------------------------
    def _stop_one(self, w: Worker, mode: str) -> None:
        w.stopping = True
        try:
            w.sock.send(msgpack.packb({"stop": mode}))
        except OSError:
            w.proc.send_signal(signal.SIGTERM if mode == "term" else signal.SIGINT)

    async def resize(self, n: int) -> None:
        """Start or (gracefully) stop workers until ``n`` run."""
        live = [w for w in self.workers if not w.stopping]
        for _ in range(n - len(live)):
            await self.wait_acked(self.spawn())
        for w in live[n:]:
            self._stop_one(w, "term")

    async def rolling_restart(self) -> int:
        """Replace every worker: a new one is serving before an old one stops accepting."""
        old = [w for w in self.workers if not w.stopping]
        for w in old:
            new = self.spawn()
            await self.wait_acked(new)
            self._stop_one(w, "term")
        return len(old)

    async def stop(self, mode: str) -> None:
        self.closing = True
        for w in list(self.workers):
            self._stop_one(w, mode)
        waits = [w.exited for w in list(self.workers)]
        if waits:
            done, pending = await asyncio.wait(waits, timeout=(self.grace if mode == "term" else 0) + 5)
            for w in list(self.workers):
                if w.exited in pending:
                    w.proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=5)

    def info(self) -> list[dict]:
        return [{"index": w.index, "pid": w.proc.pid, "generation": w.acked, "stopping": w.stopping,
                 "connections": sum(self.counters.get_block(w.index, s, _core.CTR_TOTAL)
                                    for s in range(self.counters.nslots))}
                for w in self.workers]
