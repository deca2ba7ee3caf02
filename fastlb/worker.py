"""A worker process: a DataPlane (fastlb.dataplane) on its own core, fed by the supervisor.

Owner: nothing durable. It maps the shared memory (reads health, writes its counter block),
announces its version and layout (``hello``; the supervisor refuses a worker of another
installed version), accepts on the listening sockets it is given, applies each snapshot and
acknowledges it, and reports passive failures. SIGTERM or {"stop": "term"}: stop accepting,
let open connections finish for the grace period, exit 0. SIGINT or {"stop": "int"}: at once.
A closed control channel (the supervisor is gone) stops it at once.
Started by fastlb.pool.WorkerPool as ``python -m fastlb.worker --index N ...``; the channel's
messages are listed there. It imports the data plane, the plan types and the shared-memory
layout only: never the supervisor, admin, registry, health or state file.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import mmap
import os
import resource
import signal
import socket
import sys
from typing import Any

import msgpack

from fastlb import __version__
from fastlb.dataplane import DataPlane
from fastlb.plan import WIRE_VERSION, ListenKey, Snapshot
from fastlb.shm import LAYOUT_VERSION, connlog_view, source_table, views

log = logging.getLogger("fastlb")
CONTROL_BUFFER = 4 << 20      # the largest snapshot packet; SO_SNDBUF/SO_RCVBUF of the channel
MAX_LISTEN_FDS = 253          # SCM_MAX_FD: listening sockets one snapshot can carry
# Test hook: a worker announces this token instead of its own (a worker of another version).
TOKEN_ENV = "FASTLB_TEST_WORKER_TOKEN"


def token() -> str:
    """What must match between a worker and its supervisor: fastlb's version, the wire form
    and the shared-memory layout."""
    return f"fastlb {__version__} wire {WIRE_VERSION} layout {LAYOUT_VERSION}"


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one (as HAProxy does); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class WorkerProcess:
    def __init__(self, args: argparse.Namespace, loop: asyncio.AbstractEventLoop) -> None:
        self.args = args
        self.loop = loop
        self.mapping = mmap.mmap(args.shm, args.shm_size, flags=mmap.MAP_SHARED)
        health, counters, gauges = views(self.mapping, args.max_backends, args.nblocks, args.index)
        self.plane = DataPlane(loop, health, counters, args.index, self.report_passive,
                               shared_listeners=True, gauges=gauges,
                               sources=source_table(self.mapping, args.max_backends, args.nblocks),
                               connlog=connlog_view(self.mapping, args.max_backends, args.nblocks,
                                                    args.index))              # [obs]
        self.control = socket.socket(fileno=args.control)
        self.control.setblocking(False)
        self.sockets: dict[ListenKey, socket.socket] = {}
        self.stop_event = asyncio.Event()
        self.mode = "term"

    def on_control(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self.control, CONTROL_BUFFER, MAX_LISTEN_FDS)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        if not data:
            self.stop("int")                     # the supervisor is gone
            return
        msg = msgpack.unpackb(data, raw=False)
        if "gen" in msg:
            try:
                self.apply(Snapshot.from_wire(msg), fds)
            except Exception:  # noqa: BLE001 - a bug: a worker that cannot take a snapshot
                # would never ack it, and its slots would never be freed: exit, be replaced
                log.exception("worker %d: applying snapshot %s failed; exiting to be replaced",
                              self.args.index, msg.get("gen"))
                self.stop("int")
            return
        for fd in fds:
            os.close(fd)
        if "stop" in msg:
            self.stop(msg["stop"])
        elif "close" in msg:
            service, slot, why = msg["close"]
            self.plane.close_backend(service, slot, why)
        elif "log_level" in msg:                 # [obs] the admin's log_level
            logging.getLogger().setLevel(str(msg["log_level"]).upper())
        elif "tickets" in msg:                   # [tlsops] the shared session ticket keys
            self.plane.set_tickets({str(k): bytes(v) for k, v in msg["tickets"].items()})

    def apply(self, snapshot: Snapshot, fds: list[int]) -> None:
        for key, fd in zip(snapshot.listen, fds, strict=False):
            if key in self.sockets:
                os.close(fd)
            else:
                self.sockets[key] = socket.socket(fileno=fd)
        self.plane.apply(snapshot, self.sockets)
        for key in [k for k in self.sockets if k not in set(snapshot.listen)]:
            self.sockets.pop(key).close()
        self.send({"ack": snapshot.gen})

    def report_passive(self, service: str, address: str, failures: int, reason: str) -> None:
        self.send({"passive": [service, address, failures, reason]})

    async def report_memory(self) -> None:
        """[mem] Buffers and timer counts to the supervisor once a second (metrics)."""
        while True:
            await asyncio.sleep(1.0)
            self.send({"mem": self.plane.memory()})

    def send(self, msg: dict[str, Any]) -> None:
        try:
            self.control.send(msgpack.packb(msg, use_bin_type=True))
        except OSError:
            self.stop("int")

    def stop(self, mode: str) -> None:
        if self.stop_event.is_set():
            mode = "int"
        self.mode = mode
        self.plane.stop_accepting()
        self.stop_event.set()

    async def run(self) -> int:
        self.loop.add_signal_handler(signal.SIGTERM, self.stop, "term")
        self.loop.add_signal_handler(signal.SIGINT, self.stop, "int")
        self.loop.add_signal_handler(signal.SIGHUP, lambda: None)   # the supervisor reloads
        self.send({"hello": os.environ.get(TOKEN_ENV) or token(), "pid": os.getpid()})
        self.loop.add_reader(self.control.fileno(), self.on_control)
        reporter = self.loop.create_task(self.report_memory())      # [mem]
        await self.stop_event.wait()
        reporter.cancel()
        await self.plane.finish(self.args.grace if self.mode == "term" else 0.0,
                                lambda: self.mode == "int")
        self.loop.remove_reader(self.control.fileno())
        self.control.close()
        return 0


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)       # the supervisor's business, from line one
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)      # [obs] so is reopening the connection log
    p = argparse.ArgumentParser(prog="python -m fastlb.worker")
    for name in ("--index", "--control", "--shm", "--shm-size", "--max-backends", "--nblocks"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--grace", type=float, default=30.0)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    from fastlb import logs                                    # [obs] dated, text or JSON
    logs.setup(args.log_level, worker=args.index)              # [obs] format: the supervisor's
    import uvloop
    raise_fd_limit()

    async def run() -> int:
        return await WorkerProcess(args, asyncio.get_running_loop()).run()

    return uvloop.run(run())


if __name__ == "__main__":
    sys.exit(main())
