"""[splice] Zero-copy bulk and fairness, side by side in one run (issue 15): fastlb (splice
off / auto / on, optionally other pipe sizes and fairness budgets) beside HAProxy (default,
`option splice-auto`, forced `option splice-request` + `splice-response`).

    python3 bench/splice_bench.py [--runs 2] [--duration 4] [--only ...] [--loads ...]
                                  [--tune 65536:262144,1048576:1048576] [--json out.json]

Loads: iperf3 bulk up and down through the proxy (Gbit/s, and Gbit/s per proxy core: the
figure / the proxy's CPU share, from /proc/PID/stat); wrk keep-alive small requests (req/s,
p99, per core); "mixed": wrk keep-alive (p99) while an iperf3 bulk transfer runs through the
same proxy process (another service / frontend), the fairness figure. The proxy is pinned to
CPU 0, load generators and backends to CPU 1 (bench/e2e.py's method, whose helpers this
reuses). --tune PIPE:BUDGET adds fastlb peers "fastlb-auto-PIPE-BUDGET" that set the pipe
size and the per-wake-up budget through _core._splice_tune (bench only). Every process is
stopped by PID.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import (CPU_LB, CPU_LOAD, NGINX_HTTP, Stack, free_port, run_iperf,  # noqa: E402
                 run_wrk, tree_cpu_seconds, wait_port)

HAPROXY = """
global
  nbthread 1
  maxconn 4000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  {option}
frontend f
  bind 127.0.0.1:{port}
  default_backend b
frontend f2
  bind 127.0.0.1:{port2}
  default_backend b2
backend b
  server s1 127.0.0.1:{backend}
backend b2
  server s2 127.0.0.1:{backend2}
"""
HAPROXY_OPTIONS = {"haproxy": "", "haproxy-splice-auto": "option splice-auto",
                   "haproxy-splice": "option splice-request\n  option splice-response"}

FASTLB = """
[global]
workers = 1
splice = "{mode}"
[[service]]
name = "a"
listen = ["127.0.0.1:{port}"]
backends = [ {{ address = "127.0.0.1:{backend}" }} ]
[[service]]
name = "b"
listen = ["127.0.0.1:{port2}"]
backends = [ {{ address = "127.0.0.1:{backend2}" }} ]
"""
# fastlb with _core._splice_tune(pipe, budget) called first (the same process runs the engine)
TUNED = ("import sys; from fastlb import _core; _core._splice_tune({pipe}, {budget}); "
         "from fastlb.cli import main; sys.exit(main(['run', '-c', {path!r}]))")

PEERS = ["haproxy", "haproxy-splice-auto", "haproxy-splice", "fastlb-off", "fastlb-auto",
         "fastlb-on"]
LOADS = ["bulk_up", "bulk_down", "keepalive", "mixed"]


def start_peer(stack: Stack, name: str, backend: int, backend2: int) -> tuple[subprocess.Popen, int, int]:
    """The proxy ``name``: port -> backend, port2 -> backend2."""
    port, port2 = free_port(), free_port()
    fmt = dict(port=port, port2=port2, backend=backend, backend2=backend2)
    if name in HAPROXY_OPTIONS:
        cmd = ["haproxy", "-db", "-f", stack.write(f"{name}.cfg", HAPROXY.format(
            option=HAPROXY_OPTIONS[name], **fmt))]
    else:
        parts = name.split("-")          # fastlb-MODE or fastlb-MODE-PIPE-BUDGET
        path = stack.write(f"{name}.toml", FASTLB.format(mode=parts[1], **fmt))
        if len(parts) == 4:
            cmd = [sys.executable, "-c", TUNED.format(pipe=int(parts[2]), budget=int(parts[3]),
                                                      path=path)]
        else:
            cmd = [sys.executable, "-m", "fastlb", "run", "-c", path]
    p = stack.start(cmd, CPU_LB)
    wait_port(port)
    wait_port(port2)
    return p, port, port2


def measure(stack: Stack, peer: str, http: int, iperf: int, load: str, duration: float,
            conns: int) -> dict:
    proc, port, port2 = start_peer(stack, peer, http, iperf)
    try:
        if load in ("keepalive", "mixed"):
            run_wrk(port, False, 1, conns)                      # warm-up
        bulk = None
        if load == "mixed":                                     # bulk down through service b
            bulk = subprocess.Popen(["taskset", "-c", CPU_LOAD, "iperf3", "-c", "127.0.0.1", "-p",
                                     str(port2), "-t", f"{duration + 2:g}", "-R", "-J"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            time.sleep(1.0)
        cpu0, t0 = tree_cpu_seconds(proc.pid), time.monotonic()
        if load in ("keepalive", "mixed"):
            res = run_wrk(port, False, duration, conns)
        else:
            for attempt in (1, 2):
                try:
                    res = run_iperf(port2, load == "bulk_down", duration)
                    break
                except RuntimeError as exc:       # iperf3 drops a control connection now and then
                    if attempt == 2:
                        raise
                    print(f"  {peer} {load}: iperf3: {exc}; retrying once", flush=True)
                    time.sleep(1.0)
                    cpu0, t0 = tree_cpu_seconds(proc.pid), time.monotonic()
        wall = time.monotonic() - t0
        res["cpu_pct"] = 100 * (tree_cpu_seconds(proc.pid) - cpu0) / wall
        if bulk is not None:
            out, _ = bulk.communicate(timeout=duration + 30)
            try:
                res["bulk_gbps"] = json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
            except (ValueError, KeyError):
                res["bulk_gbps"] = None
        return res
    finally:
        stack.stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--duration", type=float, default=4)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--only", default=",".join(PEERS))
    ap.add_argument("--loads", default=",".join(LOADS))
    ap.add_argument("--tune", default="", help="PIPE:BUDGET,... extra fastlb-auto peers")
    ap.add_argument("--json")
    args = ap.parse_args()
    peers = args.only.split(",")
    for t in filter(None, args.tune.split(",")):
        pipe, budget = t.split(":")
        peers.append(f"fastlb-auto-{pipe}-{budget}")
    loads = args.loads.split(",")
    results: dict[str, dict[str, list[dict]]] = {p: {ld: [] for ld in loads} for p in peers}
    print(f"load average before: {os.getloadavg()}", flush=True)
    stack = Stack()
    try:
        http, iperf = free_port(), free_port()
        stack.start(["nginx", "-p", stack.tmp, "-g", "daemon off;", "-c",
                     stack.write("http.conf", NGINX_HTTP.format(port=http, tmp=stack.tmp))], CPU_LOAD)
        stack.start(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(iperf)], CPU_LOAD)
        wait_port(http)
        wait_port(iperf)
        for run in range(args.runs):
            for load in loads:
                for peer in peers:                  # interleaved: noise hits all alike
                    r = measure(stack, peer, http, iperf, load, args.duration, args.connections)
                    results[peer][load].append(r)
                    print(f"run {run + 1} {load:9s} {peer:28s} {r['value']:12.2f} "
                          f"cpu {r['cpu_pct']:5.1f}% p99 {r.get('p99_ms')} "
                          f"bulk {r.get('bulk_gbps')}", flush=True)
    finally:
        stack.close()
    print(f"load average after: {os.getloadavg()}")

    def med(peer: str, load: str, key: str) -> float | None:
        vals = [r[key] for r in results[peer][load] if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    table = {}
    print(f"\n{'peer':28s} " + " ".join(f"{ld:>26s}" for ld in loads))
    for peer in peers:
        row = {}
        cells = []
        for load in loads:
            v, cpu, p99 = med(peer, load, "value"), med(peer, load, "cpu_pct"), med(peer, load, "p99_ms")
            per_core = v / (cpu / 100) if v and cpu else None
            row[load] = {"value": v, "cpu_pct": cpu, "per_core": per_core, "p99_ms": p99,
                         "bulk_gbps": med(peer, load, "bulk_gbps")}
            if load.startswith("bulk"):
                cells.append(f"{v:6.1f}G {per_core:6.1f}G/core {cpu:4.0f}%")
            elif load == "keepalive":
                cells.append(f"{v:7.0f}/s {per_core:7.0f}/core p99 {p99:5.2f}")
            else:
                cells.append(f"p99 {p99:6.2f}ms {v:7.0f}/s bulk {row[load]['bulk_gbps'] or 0:5.1f}G")
        table[peer] = row
        print(f"{peer:28s} " + " ".join(f"{c:>26s}" for c in cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "table": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
