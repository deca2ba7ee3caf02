"""1,000 instances registering and renewing every second against one fastlb, and the data
path's latency beside it (issue 13, "Tests and figures").

fastlb with workers = 1 (the admin and the lease sweep share the data path's process: the worst
case; --workers 2 puts the data path in worker processes), a TCP admin, a state file, and two
services: "data" (an echo backend) and "reg" (with a registration table). A client makes 64-byte
round trips through "data" for --seconds (quiet); then --instances asyncio clients (in another
process), each on its own admin connection authenticated by the registration token, start
spread over one second, register an address in "reg" (in the state file before the reply) and
renew every --every seconds; the round trips go on while they register, then for --seconds
while they renew. Prints, per phase, the round trips' median and 99th percentile, the
registrations' wall time and the renewals' reply latency.

    python3 bench/leases_load.py --instances 1000 --seconds 10 [--workers 2]
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time
from typing import Any

import msgpack
from _probe import round_trips, start, summary, wait_for

TOKEN = "bench-" + "o" * 40
REG_TOKEN = "bench-reg-" + "r" * 36


class Instance:
    def __init__(self, aport: int, port: int) -> None:
        self.aport, self.port = aport, port
        self.ids = 0
        self.unpacker = msgpack.Unpacker(raw=False)

    async def call(self, op: str, **fields: object) -> dict:
        self.ids += 1
        self.writer.write(msgpack.packb({"id": self.ids, "op": op, **fields}))
        while True:
            for msg in self.unpacker:
                if msg.get("id") == self.ids:
                    if not msg.get("ok"):
                        raise RuntimeError(f"{op}: {msg['error']}")
                    return msg["result"]
            data = await self.reader.read(65536)
            if not data:
                raise RuntimeError("admin connection closed")
            self.unpacker.feed(data)

    async def run(self, every: float, stop: asyncio.Event, renew_lat: list[float],
                  delay: float, done: list[int], all_in: Any, n: int) -> float:
        await asyncio.sleep(delay)            # a fleet starting: spread over the first second
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.aport)
        self.ids += 1
        self.writer.write(msgpack.packb({"id": self.ids, "op": "ping", "token": REG_TOKEN}))
        t0 = time.perf_counter()
        lease = (await self.call("register", service="reg", address=f"127.0.0.2:{self.port}",
                                 ttl=10))["lease"]
        took = time.perf_counter() - t0
        done.append(1)
        if len(done) == n:
            all_in.set()
        while not stop.is_set():
            await asyncio.sleep(every)
            t = time.perf_counter()
            await self.call("renew", lease=lease)
            renew_lat.append(time.perf_counter() - t)
        self.writer.close()
        return took


async def instances(aport: int, n: int, every: float, all_in: Any,
                    finish: Any, out: dict[str, object]) -> None:
    stop = asyncio.Event()
    renew_lat: list[float] = []
    done: list[int] = []
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(Instance(aport, 20000 + i).run(every, stop, renew_lat, i / n,
                                                                 done, all_in, n))
             for i in range(n)]
    while not all_in.is_set():
        await asyncio.sleep(0.05)
    out["registered_in"] = time.perf_counter() - t0
    del renew_lat[:]                         # renewals counted from here: the steady state
    while not finish.is_set():
        await asyncio.sleep(0.05)
    stop.set()
    took = await asyncio.gather(*tasks)
    out.update(slowest_register=max(took), renewals=renew_lat)


def run_instances(aport: int, n: int, every: float, all_in: Any, finish: Any, results: Any) -> None:
    out: dict[str, object] = {}
    asyncio.run(instances(aport, n, every, all_in, finish, out))
    results.put(out)


def main() -> None:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))     # 1,000 admin connections
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--every", type=float, default=1.0, help="seconds between renewals")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=1, help="fastlb's [global] workers")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    for name, tok in (("token", TOKEN), ("reg.token", REG_TOKEN)):
        with open(f"{tmp}/{name}", "w") as f:
            f.write(tok)
        os.chmod(f"{tmp}/{name}", 0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        aport = s.getsockname()[1]
    be, be_lines = start([sys.executable, "-m", "fastlb.devservers", "echo"])
    bport = int(wait_for(be_lines, r"READY (\d+)").group(1))
    cfg = (f'[global]\nworkers = {a.workers}\nadmin = "tcp:127.0.0.1:{aport}"\n'
           f'admin_token_file = "{tmp}/token"\n'
           f'admin_max_connections = {a.instances + 16}\nstate_file = "{tmp}/state"\n'
           f'[[service]]\nname = "data"\nlisten = "127.0.0.1:0"\n'
           f'backends = [{{ address = "127.0.0.1:{bport}" }}]\n'
           f'[[service]]\nname = "reg"\nlisten = "127.0.0.1:0"\nbackends = []\n'
           f'registration = {{ token_file = "{tmp}/reg.token", max_ttl = "30s" }}\n')
    with open(f"{tmp}/fastlb.toml", "w") as f:
        f.write(cfg)
    lb, lines = start([sys.executable, "-m", "fastlb", "run", "-c", f"{tmp}/fastlb.toml",
                       "--log-level", "info"])
    try:
        port = int(wait_for(lines, r"service data: listening on \S+:(\d+)").group(1))
        wait_for(lines, "fastlb ready")
        quiet = round_trips(port, a.seconds)
        # the instances run in their own process: not sharing a GIL with the round trips
        ctx = multiprocessing.get_context("fork")
        all_in, finish, results = ctx.Event(), ctx.Event(), ctx.Queue()
        th = ctx.Process(target=run_instances, args=(aport, a.instances, a.every, all_in, finish,
                                                     results))
        th.start()
        registering: list[float] = []
        while not all_in.is_set():
            registering += round_trips(port, 0.2)
        renewing = round_trips(port, a.seconds)
        finish.set()
        out = results.get(timeout=60)
        th.join(30)
        renewals = sorted(out["renewals"])                      # type: ignore[arg-type]
        print("| phase | round trips | median | p99 |\n|---|---|---|---|")
        print(f"| quiet | {summary(quiet)} |")
        print(f"| {a.instances} instances registering (starts spread over 1 s) | "
              f"{summary(registering)} |")
        print(f"| {a.instances} instances renewing every {a.every:g} s | {summary(renewing)} |")
        print(f"\nregistrations: all {a.instances} leases granted {out['registered_in']:.2f} s "
              f"after the first start; the slowest reply took {out['slowest_register']:.2f} s "
              f"(each is in the state file, fsynced, before its reply)")
        print(f"renewals: {len(renewals):,}, reply median "
              f"{statistics.median(renewals) * 1e3:.2f} ms, p99 "
              f"{renewals[int(len(renewals) * 0.99)] * 1e3:.1f} ms")
        errors = [x for x in lines if "ERROR" in x or "Traceback" in x or "WARNING" in x]
        print(f"fastlb error lines: {len(errors)}" + (f" (first: {errors[0].strip()})" if errors else ""))
    finally:
        lb.terminate()
        be.terminate()
        lb.wait(30)
        be.wait(5)


if __name__ == "__main__":
    main()
