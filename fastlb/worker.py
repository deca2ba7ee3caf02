"""A worker process: the data path on its own core, fed by the supervisor.

Owner: nothing durable. It maps the shared memory (reads health, writes its counter block),
accepts on the listening sockets it is given, applies the plans of each snapshot and
acknowledges it, and reports passive failures. SIGTERM or {"stop": "term"}: stop accepting,
let open connections finish for the grace period, exit 0. SIGINT or {"stop": "int"}: at once.
A closed control channel (the supervisor is gone) stops it at once.
Started by fastlb.workers.WorkerPool as ``python -m fastlb.worker --index N ...``.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import mmap
import os
import signal
import socket
import sys

import msgpack

from fastlb import _core
from fastlb.dataplane import DataService, sweep_forever

log = logging.getLogger("fastlb")


class WorkerProcess:
    def __init__(self, args: argparse.Namespace, loop: asyncio.AbstractEventLoop) -> None:
        self.args = args
        self.loop = loop
        self.mapping = mmap.mmap(args.shm, args.shm_size, flags=mmap.MAP_SHARED)
        from fastlb.proxy import views
        self.health, self.counters = views(self.mapping, args.max_backends, args.nblocks)
        self.engine = _core.Engine(loop, self.counters, args.index)
        self.control = socket.socket(fileno=args.control)
        self.control.setblocking(False)
        self.sockets: dict[tuple[str, str, int], socket.socket] = {}
        self.services: dict[str, DataService] = {}
        self.stop_event = asyncio.Event()
        self.mode = "term"

    def socket_for(self, service: str, key: tuple[str, int]) -> socket.socket:
        return self.sockets[(service, *key)].dup()

    def on_control(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self.control, 4 << 20, 253)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        if not data:
            self.stop("int")                     # the supervisor is gone
            return
        msg = msgpack.unpackb(data, raw=False)
        if "stop" in msg or "close" in msg:
            for fd in fds:
                os.close(fd)
            if "stop" in msg:
                self.stop(msg["stop"])
            else:
                service, slot = msg["close"]
                ds = self.services.get(service)
                if ds is not None:
                    n = _core.abort_where(self.engine, ds.state, slot)
                    log.info("service %s: closed %d connection(s) of slot %d", service, n, slot)
            return
        self.apply(msg, fds)

    def apply(self, msg: dict, fds: list[int]) -> None:
        keys = [tuple(k) for k in msg["listen"]]
        for key, fd in zip(keys, fds):
            if key in self.sockets:
                os.close(fd)
            else:
                self.sockets[key] = socket.socket(fileno=fd)
        plans = {p["name"]: p for p in msg["plans"]}
        for name in list(self.services):
            if name not in plans:
                self.services.pop(name).stop_accepting()
        for name, plan in plans.items():
            ds = self.services.get(name)
            if ds is None:
                ds = self.services[name] = DataService(
                    name, self.engine, self.health, self.counters,
                    lambda key, n=name: self.socket_for(n, key), self.report_passive,
                    shared_listeners=True)
            ds.apply(plan)
        for key in [k for k in self.sockets if k not in set(keys)]:
            self.sockets.pop(key).close()
        self.send({"ack": msg["gen"]})

    def report_passive(self, service: str, address: str, failures: int, reason: str) -> None:
        self.send({"passive": [service, address, failures, reason]})

    def send(self, msg: dict) -> None:
        try:
            self.control.send(msgpack.packb(msg, use_bin_type=True))
        except OSError:
            self.stop("int")

    def stop(self, mode: str) -> None:
        if self.stop_event.is_set():
            mode = "int"
        self.mode = mode
        self.stop_event.set()

    async def run(self) -> int:
        self.loop.add_reader(self.control.fileno(), self.on_control)
        self.loop.add_signal_handler(signal.SIGTERM, self.stop, "term")
        self.loop.add_signal_handler(signal.SIGINT, self.stop, "int")
        self.loop.add_signal_handler(signal.SIGHUP, lambda: None)   # the supervisor reloads
        sweeper = self.loop.create_task(sweep_forever(self.engine, self.timeouts))
        await self.stop_event.wait()
        for ds in self.services.values():
            ds.stop_accepting()
        if self.mode == "term":
            deadline = self.loop.time() + self.args.grace
            while self.engine.sessions and self.loop.time() < deadline and self.mode == "term":
                await asyncio.sleep(0.05)
        self.engine.close()
        sweeper.cancel()
        return 0

    def timeouts(self) -> list[tuple[float, float]]:
        return [(ds.state.connect_timeout, ds.state.idle_timeout) for ds in self.services.values()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastlb.worker")
    for name in ("--index", "--control", "--shm", "--shm-size", "--max-backends", "--nblocks"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--grace", type=float, default=30.0)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    from fastlb import logs                                    # [obs] dated, text or JSON
    logs.setup(args.log_level, worker=args.index)              # [obs] format: the supervisor's
    import uvloop
    from fastlb.proxy import raise_fd_limit
    raise_fd_limit()

    async def run() -> int:
        return await WorkerProcess(args, asyncio.get_running_loop()).run()

    return uvloop.run(run())


if __name__ == "__main__":
    sys.exit(main())
