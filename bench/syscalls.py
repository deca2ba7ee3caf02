"""The cost of one proxied short connection: syscalls, wake-ups, CPU, rate and p99, for fastlb
(1 and 2 workers) beside HAProxy (mode tcp, nbthread 1), side by side in one run (issue 15).

    python3 bench/syscalls.py [--rounds 2] [--duration 4] [--only haproxy,fastlb,fastlb-2w]

Peers: haproxy, fastlb, fastlb-2w (two workers), and with TCP_DEFER_ACCEPT on the listener
haproxy-da (`bind ... defer-accept`) and fastlb-da (`defer_accept = true`), each -da compared
with haproxy-da; fastlb-2w-cpu0: two workers both pinned to the proxy's core, so that the CPU
per connection of two workers is not mixed with the load generator's core (this machine has
no spare core).

Method: an nginx HTTP backend and wrk (`-H 'Connection: close'`: one connection per request)
pinned to CPU 1; the proxy pinned to CPU 0 (fastlb with 2 workers gets both CPUs, as in
bench/e2e.py). Each round and peer:
  1. rate: wrk for --duration seconds; connections/s, p99, the proxy's CPU seconds (utime+stime
     of its process tree from /proc) per connection, and connections per proxy core (rate /
     CPU share);
  2. syscalls: `strace -c -f` attached to every process of the proxy during a shorter wrk run;
     syscalls per connection = calls / connections accepted (accept4 calls minus its errors),
     epoll_wait apart (it counts wake-ups, not work);
  3. wake-ups per connection on the listener, at a light load (one connection at a time, a few
     ms apart, so that each arrives while the processes sleep): accept4 calls that found
     nothing (EAGAIN) per connection accepted, over all the proxy's processes, under strace.
     A process woken for a connection accepts until EAGAIN (one EAGAIN per wake-up), and a
     process woken for nothing makes one EAGAIN and no accept: 1.0 is one wake-up per
     connection, 2.0 both of two workers woken for each.
segs_per_conn: TCP segments sent on the machine during the rate run (/proc/net/snmp OutSegs,
all sides) per connection: keep the machine otherwise idle for it to mean anything.
Medians over the rounds. Needs: apt-get install haproxy nginx wrk strace.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

from e2e import CPU_LB, CPU_LOAD, NGINX_HTTP, Stack, free_port, tree_pids, wait_port

TICK = os.sysconf("SC_CLK_TCK")

HAPROXY = """
global
  nbthread 1
  maxconn 9000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend f
  bind 127.0.0.1:{port}{bind}
  default_backend b
backend b
  server s1 127.0.0.1:{backend}
"""

FASTLB = """
[global]
workers = {workers}
[[service]]
name = "bench"
listen = ["127.0.0.1:{port}"]
backends = [ {{ address = "127.0.0.1:{backend}" }} ]
{service}"""


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICK
        except OSError:
            pass
    return total


def out_segments() -> int:
    """TCP segments this machine sent so far (/proc/net/snmp OutSegs; loopback counts once)."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    return int(rows[1][rows[0].index("OutSegs")])


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(port: int, duration: float, conns: int) -> dict:
    cmd = ["taskset", "-c", CPU_LOAD, "wrk", "-t1", f"-c{conns}", f"-d{duration:g}s", "--latency",
           "-H", "Connection: close", f"http://127.0.0.1:{port}/"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30).stdout
    found = re.search(r"(\d+) requests in", out)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None or rate is None:
        raise RuntimeError(f"wrk reported no rate: {out.strip()[-200:]!r}")
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"requests": int(found.group(1)), "rate": float(rate.group(1)),
            "p99_ms": _ms(*p99.groups()) if p99 else float("nan"),
            "errors": sum(map(int, errors.groups())) if errors else 0}


def parse_strace(path: str) -> dict[str, tuple[int, int]]:
    """strace -c's table: syscall -> (calls, errors)."""
    out: dict[str, tuple[int, int]] = {}
    for line in open(path):
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and not line.startswith("100.00"):
            name = parts[-1]
            calls = int(parts[3])
            errors = int(parts[4]) if len(parts) == 6 else 0
            out[name] = (calls, errors)
    return out


def start_peer(stack: Stack, name: str, backend: int) -> tuple[subprocess.Popen, int, int]:
    """(process, port, workers)."""
    port = free_port()
    deferred = name.endswith("-da")         # TCP_DEFER_ACCEPT on the listener (both proxies)
    fmt = dict(port=port, backend=backend)
    if name.startswith("haproxy"):
        cfg = HAPROXY.format(bind=" defer-accept" if deferred else "", **fmt)
        p = stack.start(["haproxy", "-db", "-f", stack.write(f"{name}.cfg", cfg)], CPU_LB)
        workers = 1
    else:
        m = re.search(r"-(\d+)w", name)
        workers = int(m.group(1)) if m else 1
        cmd = [sys.executable, "-m", "fastlb", "run", "-c",
               stack.write(f"{name}.toml", FASTLB.format(
                   workers=workers, service="defer_accept = true\n" if deferred else "", **fmt))]
        one_cpu = workers == 1 or name.endswith("-cpu0")    # fastlb-2w-cpu0: both on the proxy's
        p = stack.start(cmd, CPU_LB if one_cpu else f"{CPU_LB}-{os.cpu_count() - 1}")   # core
    wait_port(port)
    time.sleep(0.5 * workers)                   # every worker has taken its snapshot
    return p, port, workers


def measure(stack: Stack, peer: str, backend: int, args: argparse.Namespace) -> dict:
    p, port, workers = start_peer(stack, peer, backend)
    try:
        run_wrk(port, 1, args.connections)      # warm-up
        pids = tree_pids(p.pid)                      # (taskset execs the proxy: same pid)
        cpu0, t0, seg0 = cpu_seconds(pids), time.monotonic(), out_segments()
        res = run_wrk(port, args.duration, args.connections)
        wall = time.monotonic() - t0
        cpu = cpu_seconds(tree_pids(p.pid)) - cpu0
        out = {"rate": res["rate"], "p99_ms": res["p99_ms"], "errors": res["errors"],
               "cpu_us_per_conn": 1e6 * cpu / max(res["requests"], 1),
               "per_core": res["rate"] / max(cpu / wall, 1e-9),
               # every TCP segment of the machine (client, proxy, backend sides) per connection
               "segs_per_conn": (out_segments() - seg0) / max(res["requests"], 1)}
        if args.strace:
            # the data path's processes: with workers, the workers (the supervisor accepts nothing)
            procs = tree_pids(p.pid)
            target = procs if workers == 1 else [q for q in procs if _is_worker(q)]
            trace = os.path.join(stack.tmp, f"{peer}.strace")
            st = subprocess.Popen(["strace", "-c", "-f", "-o", trace]
                                  + [a for q in target for a in ("-p", str(q))],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            run_wrk(port, args.strace_duration, args.connections)
            st.send_signal(signal.SIGINT)
            st.wait(10)
            table = parse_strace(trace)
            calls, errs = table.get("accept4", (0, 0))
            accepted = max(calls - errs, 1)
            work = {k: v[0] for k, v in table.items() if k not in ("epoll_wait", "epoll_pwait")}
            out["syscalls_per_conn"] = sum(work.values()) / accepted
            out["by_call"] = {k: v / accepted for k, v in sorted(work.items(), key=lambda kv: -kv[1])}
            out["wakeups_per_conn"] = errs / accepted
            out["epoll_wait_per_conn"] = sum(table.get(k, (0, 0))[0]
                                             for k in ("epoll_wait", "epoll_pwait")) / accepted
            st = subprocess.Popen(["strace", "-c", "-f", "-o", trace + ".light"]
                                  + [a for q in target for a in ("-p", str(q))],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            paced(port, args.light)
            st.send_signal(signal.SIGINT)
            st.wait(10)
            calls, errs = parse_strace(trace + ".light").get("accept4", (0, 0))
            out["wakeups_light"] = errs / max(calls - errs, 1)
        return out
    finally:
        stack.stop(p)


def paced(port: int, n: int, gap: float = 0.005) -> None:
    """n requests, one connection each, one at a time, ``gap`` seconds apart."""
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            while c.recv(4096):
                pass
        time.sleep(gap)


def _is_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"fastlb.worker" in f.read()
    except OSError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=float, default=4)
    ap.add_argument("--strace-duration", type=float, default=2)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--light", type=int, default=300, help="connections of the light load")
    ap.add_argument("--only", default="haproxy,fastlb,fastlb-2w")
    ap.add_argument("--no-strace", dest="strace", action="store_false")
    args = ap.parse_args()
    for tool in ("haproxy", "nginx", "wrk", "taskset") + (("strace",) if args.strace else ()):
        if shutil.which(tool) is None:
            sys.exit(f"missing {tool}: apt-get install haproxy nginx wrk strace")
    peers = args.only.split(",")
    stack = Stack()
    results: dict[str, list[dict]] = {p: [] for p in peers}
    try:
        backend = free_port()
        stack.start(["nginx", "-p", stack.tmp, "-g", "daemon off;", "-c",
                     stack.write("http.conf", NGINX_HTTP.format(port=backend, tmp=stack.tmp))],
                    CPU_LOAD)
        wait_port(backend)
        print(f"load: {open('/proc/loadavg').read().strip()}", flush=True)
        for r in range(args.rounds):
            for peer in peers:
                res = measure(stack, peer, backend, args)
                results[peer].append(res)
                print(f"round {r + 1} {peer}: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in res.items() if isinstance(v, float)), flush=True)
                if "by_call" in res:
                    print("   " + ", ".join(f"{k} {v:.2f}" for k, v in res["by_call"].items()
                                            if v >= 0.05), flush=True)
    finally:
        stack.close()
    keys = ["rate", "per_core", "p99_ms", "cpu_us_per_conn", "segs_per_conn", "syscalls_per_conn",
            "wakeups_per_conn", "wakeups_light", "epoll_wait_per_conn"]
    print("\n| peer | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for peer in peers:
        cells = []
        for k in keys:
            vals = [r[k] for r in results[peer] if k in r]
            cells.append(f"{statistics.median(vals):.2f}" if vals else "-")
        print(f"| {peer} | " + " | ".join(cells) + " |")
    for peer in peers:                  # each against HAProxy with the same listener options
        ref = "haproxy-da" if peer.endswith("-da") else "haproxy"
        base = results.get(ref)
        if peer.startswith("haproxy") or not base:
            continue
        pc = statistics.median(r["per_core"] for r in results[peer])
        p99 = statistics.median(r["p99_ms"] for r in results[peer])
        pc0 = statistics.median(r["per_core"] for r in base)
        p990 = statistics.median(r["p99_ms"] for r in base)
        print(f"{peer}: new connections per proxy core {pc / pc0:.2f}x {ref}'s, "
              f"p99 {p99 / p990:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
