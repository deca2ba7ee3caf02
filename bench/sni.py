"""[sni] SNI routing without termination: proxy CPU per short connection, fastlb against HAProxy
(`req.ssl_sni` + use_backend, the documented way) and fastlb routing no SNI (the plain path), in
one run, side by side. Each client connection sends a ClientHello made by Python's ssl (about
500 bytes, SNI a.example.com), reads the backend's one-line answer and closes; the backend
answers any bytes (it does no TLS: the figure is the proxy's routing and relaying, not
crypto). The proxies are pinned to CPU 0 (taskset), clients and backend to the other CPUs;
CPU is read from /proc/PID/stat (utime + stime, every process of the proxy).

    python bench/sni.py [--seconds 5] [--rounds 3] [--conc 32]

Prints a table and one JSON line. Figures are noisy on a shared machine: compare ratios from
one run only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

HZ = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_hello(name: str | None) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    out = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total


def tree(pid: int) -> list[int]:
    out = [pid]
    try:
        kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
    except OSError:
        kids = []
    for k in kids:
        out += tree(int(k))
    return out


BACKEND = """
import asyncio, sys
async def h(r, w):
    try:
        await r.read(65536)
        w.write(b"A\\n")
        await w.drain()
    finally:
        w.close()
async def main():
    s = await asyncio.start_server(h, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    print("READY", flush=True)
    await s.serve_forever()
asyncio.run(main())
"""


async def load(port: int, data: bytes, seconds: float, conc: int) -> int:
    done = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(data)
            line = await r.readline()
            w.close()
            if line == b"A\n":
                done += 1
    await asyncio.gather(*(worker() for _ in range(conc)))
    return done


def start(cmd: list[str], cpu: str, ready: str | None = None) -> subprocess.Popen:
    log = tempfile.NamedTemporaryFile("w+", prefix="sni-bench-", suffix=".log")
    p = subprocess.Popen(["taskset", "-c", cpu, *cmd], stdout=log, stderr=subprocess.STDOUT,
                         text=True)
    p.log = log                             # type: ignore[attr-defined]
    if ready:
        deadline = time.monotonic() + 30
        while ready not in open(log.name).read():
            if p.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{cmd[0]} did not start: {open(log.name).read()}")
            time.sleep(0.05)
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conc", type=int, default=32)
    a = ap.parse_args()
    ncpu = os.cpu_count() or 2
    rest = f"1-{ncpu - 1}" if ncpu > 2 else "1"
    bport = free_port()
    backend = start([sys.executable, "-c", BACKEND, str(bport)], rest, "READY")
    tmp = tempfile.mkdtemp()
    procs: dict[str, tuple[subprocess.Popen, int]] = {}
    # fastlb: two services on one port (a by SNI, d the default)
    fport, pport = free_port(), free_port()
    cfg = os.path.join(tmp, "fastlb.toml")
    with open(cfg, "w") as f:
        f.write(f'[global]\nworkers = 1\n'
                f'[[service]]\nname = "a"\nlisten = ["127.0.0.1:{fport}"]\nsni = ["a.example.com"]\n'
                f'backends = [ {{ address = "127.0.0.1:{bport}" }} ]\n'
                f'[[service]]\nname = "d"\nlisten = ["127.0.0.1:{fport}"]\n'
                f'backends = [ {{ address = "127.0.0.1:{bport}" }} ]\n'
                f'[[service]]\nname = "plain"\nlisten = ["127.0.0.1:{pport}"]\n'
                f'backends = [ {{ address = "127.0.0.1:{bport}" }} ]\n')
    procs["fastlb"] = (start([sys.executable, "-m", "fastlb", "run", "-c", cfg], "0", "fastlb ready"), fport)
    # HAProxy: req.ssl_sni after the hello is in (inspect-delay), as its documentation shows
    hport = free_port()
    hcfg = os.path.join(tmp, "haproxy.cfg")
    with open(hcfg, "w") as f:
        f.write(f"""global
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:{hport}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    use_backend a if {{ req.ssl_sni -i a.example.com }}
    default_backend d
backend a
    server s1 127.0.0.1:{bport}
backend d
    server s1 127.0.0.1:{bport}
""")
    procs["haproxy"] = (start(["haproxy", "-db", "-f", hcfg], "0"), hport)
    time.sleep(1.0)
    hello = client_hello("a.example.com")
    procs["fastlb-plain"] = (procs["fastlb"][0], pport)    # the same process, no SNI routing
    loads = [("fastlb", hello), ("haproxy", hello), ("fastlb-plain", hello)]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in loads}
    try:
        for _ in range(a.rounds):
            for name, data in loads:
                p, port = procs[name]
                pids = tree(p.pid)
                c0 = cpu_ticks(pids)
                t0 = time.monotonic()
                try:
                    n = asyncio.run(load(port, data, a.seconds, a.conc))
                except OSError as exc:
                    out = open(p.log.name).read()   # type: ignore[attr-defined]
                    raise SystemExit(f"{name}: {exc}; {out}") from None
                dt = time.monotonic() - t0
                cpu = (cpu_ticks(pids) - c0) / HZ
                results[name].append((n / dt, cpu / max(n, 1) * 1e6))
    finally:
        for p, _ in procs.values():
            if p.poll() is None:
                p.kill()
        backend.kill()
    print(f"load: {os.getloadavg()[0]:.2f}; {a.rounds} rounds of {a.seconds:g}s, {a.conc} clients")
    print(f"{'proxy':16} {'conn/s':>10} {'CPU us/conn':>12}")
    out = {}
    for name, rows in results.items():
        rate = statistics.median(r for r, _ in rows)
        us = statistics.median(u for _, u in rows)
        out[name] = {"conn_per_s": round(rate), "cpu_us_per_conn": round(us, 1)}
        print(f"{name:16} {rate:10.0f} {us:12.1f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
