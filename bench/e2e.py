"""End-to-end benchmark: fastlb beside HAProxy, nginx stream, naive Python proxies and a direct
connection, on this machine, in one run, as ratios to HAProxy.

    python3 bench/e2e.py [--runs 3] [--duration 5] [--only fastlb,haproxy] [--json out.json]

Needs: apt-get install haproxy nginx libnginx-mod-stream wrk iperf3.
Method: the balancer under test is pinned to CPU 0 (taskset), the load generator and the
backends to CPU 1. Loads: wrk keep-alive small requests (req/s, p99); wrk with
"Connection: close", a new connection per request (conn/s, p99); iperf3 bulk through the
balancer to one iperf3 server, both directions (Gbit/s). Each figure is the median of --runs
runs; runs interleave the peers so that machine noise hits them alike. The balancer's CPU time
comes from /proc/PID/stat (all its processes), shown as % of one core during the load.
With --workers 1,2 fastlb is also measured with 2 worker processes ("fastlb-2w"), pinned to
every CPU: on a 2-core machine its second worker shares CPU 1 with the load generator.
With --acl, fastlb and HAProxy are also measured with a 1,000-CIDR ACL (the client's 127.0.0.1
among 999 others, and 200 denied /24s) and per-source limits on every connection, set high
enough never to refuse the load ("fastlb-acl", "haproxy-acl": HAProxy with `src -f` lists and a
stick table tracking conn_cur and conn_rate): the cost of the checks, side by side with the
plain figures of the same run, also per proxy core (the figure / the balancer's CPU share).
With --baseline PYTHON, a second fastlb ("fastlb-base": the fastlb that interpreter imports,
e.g. a venv with an older commit installed) runs beside the current one in the same run, for
a regression check that the machine's noise hits alike.
With --connlog [DEST], fastlb is also measured with its connection log on for every
connection ("fastlb-log", and "fastlb-Nw-log" for each --workers N: `log = { connections =
true, sample = 1.0 }`, lines to DEST, default stderr, which the bench sends to a file), so
the logging cost is read side by side: new connections per proxy core, logged / not logged.
Every process started is stopped by PID; all traffic stays on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_LB, CPU_LOAD = "0", "1"
TICK = os.sysconf("SC_CLK_TCK")
PEERS = ["direct", "haproxy", "nginx", "fastlb", "asyncio-streams", "asyncio-protocol"]
LOADS = ["keepalive", "close", "bulk_up", "bulk_down"]


def free_port() -> int:
    """A port below the ephemeral range, so that no connection's local port (or its TIME_WAIT,
    plentiful after the close load) can hold it when a peer without SO_REUSEADDR binds it."""
    import random
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port below the ephemeral range")


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime of pid and all its descendants."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            p = int(entry)
            stats[p] = fields
            children.setdefault(int(fields[1]), []).append(p)
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            total += (int(stats[p][11]) + int(stats[p][12])) / TICK
        todo.extend(children.get(p, []))
    return total


class Stack:
    """Processes of one benchmark, stopped by PID."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.tmp = tempfile.mkdtemp(prefix="fastlb-bench-")

    def start(self, args: list[str], cpu: str) -> subprocess.Popen:
        log = open(os.path.join(self.tmp, f"{os.path.basename(args[0])}-{len(self.procs)}.log"), "w")
        p = subprocess.Popen(["taskset", "-c", cpu] + args, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        log.close()
        self.procs.append(p)
        return p

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)

    def close(self) -> None:
        for p in self.procs:
            self.stop(p)
        shutil.rmtree(self.tmp, ignore_errors=True)


NGINX_HTTP = """
worker_processes 1;
error_log {tmp}/http-error.log;
pid {tmp}/http.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};
  uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  server {{ listen 127.0.0.1:{port} backlog=4096; location / {{ return 200 "hello from the backend\\n"; }} }}
}}
"""

NGINX_STREAM = """
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
error_log {tmp}/stream-error.log;
pid {tmp}/stream.pid;
events {{ worker_connections 16384; }}
stream {{
  upstream b {{ server 127.0.0.1:{backend}; }}
  server {{ listen 127.0.0.1:{port} backlog=4096; proxy_pass b; proxy_half_close on; }}
}}
"""

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
  bind 127.0.0.1:{port}
  default_backend b
backend b
  server s1 127.0.0.1:{backend}
"""

FASTLB = """
[global]
workers = {workers}
{glob}
[[service]]
name = "bench"
listen = ["127.0.0.1:{port}"]
backends = [ {{ address = "127.0.0.1:{backend}" }} ]
{svc}
"""
CONNLOG_DEST = "stderr"                # --connlog: the destination of fastlb-log's lines


# --acl: 1,000 allowed CIDRs with the client's address among them, 200 denied ones, per-source
# limits that never refuse this load (one source: the load generator's 127.0.0.1).
ACL_ALLOW = [f"10.{i // 250}.{i % 250}.0/24" for i in range(999)] + ["127.0.0.1/32"]
ACL_DENY = [f"192.168.{i}.0/24" for i in range(200)]
SRC_CONNS, SRC_RATE = 50000, 1000000

FASTLB_ACL = FASTLB + """acl = {{ allow = [{allow}], deny = [{deny}] }}
limits = {{ per_source_conns = {conns}, per_source_rate = "{rate}/s" }}
"""

HAPROXY_ACL = HAPROXY.replace("""  default_backend b""", """\
  stick-table type ip size 100k expire 30s store conn_cur,conn_rate(1s)
  tcp-request connection reject if !{{ src -f {tmp}/allow.lst }} || {{ src -f {tmp}/deny.lst }}
  tcp-request connection track-sc0 src
  tcp-request connection reject if {{ sc0_conn_cur gt {conns} }} || {{ sc0_conn_rate gt {rate} }}
  default_backend b""")

BASELINE_PYTHON: str | None = None     # --baseline


def start_peer(stack: Stack, name: str, backend: int) -> tuple[subprocess.Popen | None, int]:
    if name == "direct":
        return None, backend
    port = free_port()
    fmt = dict(port=port, backend=backend, tmp=stack.tmp)
    if name == "fastlb-base":
        assert BASELINE_PYTHON is not None
        # -P: the baseline interpreter's own fastlb, never the checkout we stand in
        cmd = [BASELINE_PYTHON, "-P", "-m", "fastlb", "run", "-c",
               stack.write("fastlb-base.toml", FASTLB.format(workers=1, glob="", svc="", **fmt))]
        p = stack.start(cmd, CPU_LB)
        wait_port(port)
        return p, port
    if name == "haproxy-acl":
        stack.write("allow.lst", "\n".join(ACL_ALLOW) + "\n")
        stack.write("deny.lst", "\n".join(ACL_DENY) + "\n")
        cmd = ["haproxy", "-db", "-f", stack.write(
            "haproxy-acl.cfg", HAPROXY_ACL.format(conns=SRC_CONNS, rate=SRC_RATE, **fmt))]
    elif name == "fastlb-acl":
        text = FASTLB_ACL.format(workers=1, allow=", ".join(f'"{c}"' for c in ACL_ALLOW),
                                 deny=", ".join(f'"{c}"' for c in ACL_DENY), conns=SRC_CONNS,
                                 rate=SRC_RATE, **fmt)
        cmd = [sys.executable, "-m", "fastlb", "run", "-c", stack.write("fastlb-acl.toml", text)]
    elif name == "haproxy":
        cmd = ["haproxy", "-db", "-f", stack.write("haproxy.cfg", HAPROXY.format(**fmt))]
    elif name == "nginx":
        cmd = ["nginx", "-p", stack.tmp, "-g", "daemon off;", "-c",
               stack.write("stream.conf", NGINX_STREAM.format(**fmt))]
    elif name.startswith("fastlb"):
        m = re.search(r"-(\d+)w", name)
        workers = int(m.group(1)) if m else 1
        logged = name.endswith("-log")          # --connlog: every connection logged
        glob = f'connlog = "{CONNLOG_DEST}"' if logged else ""
        svc = "log = { connections = true, sample = 1.0 }" if logged else ""
        cmd = [sys.executable, "-m", "fastlb", "run", "-c",
               stack.write("fastlb.toml", FASTLB.format(workers=workers, glob=glob, svc=svc, **fmt))]
        if workers > 1:
            # more workers than one core: the balancer gets every CPU and shares CPU 1 with the load
            p = stack.start(cmd, f"{CPU_LB}-{os.cpu_count() - 1}")
            wait_port(port)
            time.sleep(0.5 * workers)            # every worker has taken its snapshot
            return p, port
    else:
        script = {"asyncio-streams": "streams_proxy.py", "asyncio-protocol": "protocol_proxy.py"}[name]
        cmd = [sys.executable, os.path.join(HERE, "peers", script), str(port), "127.0.0.1", str(backend)]
    p = stack.start(cmd, CPU_LB)
    wait_port(port)
    return p, port


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(port: int, close: bool, duration: float, conns: int) -> dict:
    cmd = ["taskset", "-c", CPU_LOAD, "wrk", "-t1", f"-c{conns}", f"-d{duration:g}s", "--latency",
           f"http://127.0.0.1:{port}/"]
    if close:
        cmd[6:6] = ["-H", "Connection: close"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30).stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise RuntimeError(f"wrk reported no rate: {out.strip()[-200:]!r}")
    rps = float(found.group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"value": rps, "p99_ms": _ms(*p99.groups()) if p99 else None,
            "errors": (sum(map(int, errors.groups())) if errors else 0)
                      + (int(non2xx.group(1)) if non2xx else 0)}


def run_iperf(port: int, reverse: bool, duration: float) -> dict:
    cmd = ["taskset", "-c", CPU_LOAD, "iperf3", "-c", "127.0.0.1", "-p", str(port),
           "-t", f"{duration:g}", "-J"]
    if reverse:
        cmd.append("-R")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30).stdout
    data = json.loads(out)
    if "error" in data:
        raise RuntimeError(data["error"])
    return {"value": data["end"]["sum_received"]["bits_per_second"] / 1e9, "p99_ms": None, "errors": 0}


def measure(stack: Stack, peer: str, backend: int, load: str, duration: float, conns: int) -> dict:
    proc, port = start_peer(stack, peer, backend)
    try:
        if load in ("keepalive", "close"):
            run_wrk(port, load == "close", 1, conns)          # warm-up
        cpu0, t0 = (tree_cpu_seconds(proc.pid) if proc else 0.0), time.monotonic()
        if load in ("keepalive", "close"):
            res = run_wrk(port, load == "close", duration, conns)
        else:
            try:
                res = run_iperf(port, load == "bulk_down", duration)
            except RuntimeError as exc:
                # iperf3's one-test-at-a-time server now and then drops a control connection
                # right after the previous peer's test (seen for every proxy): try once more,
                # and say so; a second failure stops the run.
                print(f"  {peer} {load}: iperf3: {exc}; retrying once", flush=True)
                time.sleep(1.0)
                cpu0, t0 = (tree_cpu_seconds(proc.pid) if proc else 0.0), time.monotonic()
                res = run_iperf(port, load == "bulk_down", duration)
        wall = time.monotonic() - t0
        res["cpu_pct"] = 100 * (tree_cpu_seconds(proc.pid) - cpu0) / wall if proc else None
        return res
    finally:
        if proc:
            stack.stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--only", default=",".join(PEERS))
    ap.add_argument("--workers", default="1",
                    help="fastlb worker counts to measure, e.g. 1,2 (each is a peer: fastlb, fastlb-2w)")
    ap.add_argument("--loads", default=",".join(LOADS))
    ap.add_argument("--baseline", metavar="PYTHON",
                    help="also run the fastlb this interpreter imports, as peer fastlb-base")
    ap.add_argument("--acl", action="store_true",
                    help="also fastlb-acl and haproxy-acl: a 1,000-CIDR ACL and per-source limits")
    ap.add_argument("--connlog", nargs="?", const="stderr", metavar="DEST",
                    help="also run fastlb with its connection log on (peers *-log), lines to DEST "
                         "(a [global] connlog value; default stderr)")
    ap.add_argument("--tls", action="store_true",  # [tlsbench] bench/e2e_tls.py
                    help="the TLS loads (tls_keepalive, tls_close, tls_bulk): fastlb, haproxy, naive-ssl")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "e2e.json"))
    a = ap.parse_args()
    peers, loads = a.only.split(","), a.loads.split(",")
    if a.tls or any(x.startswith("tls_") for x in loads):   # [tlsbench] bench/e2e_tls.py's
        import e2e_tls
        return e2e_tls.run(a, [x for x in loads if x.startswith("tls_")] or e2e_tls.LOADS)
    if a.baseline:
        global BASELINE_PYTHON
        BASELINE_PYTHON = a.baseline
        at = peers.index("fastlb") if "fastlb" in peers else len(peers)
        peers.insert(at, "fastlb-base")
    if a.acl:
        for plain in ("haproxy", "fastlb"):
            if plain in peers:
                peers.insert(peers.index(plain) + 1, f"{plain}-acl")
    extra = [f"fastlb-{n}w" for n in a.workers.split(",") if n.strip() != "1"]
    if extra:
        at = peers.index("fastlb") + 1 if "fastlb" in peers else len(peers)
        peers[at:at] = extra
    if a.connlog:
        global CONNLOG_DEST
        CONNLOG_DEST = a.connlog
        for p in [p for p in peers if p == "fastlb" or re.fullmatch(r"fastlb-\d+w", p)]:
            peers.insert(peers.index(p) + 1, f"{p}-log")
    for tool in ("haproxy", "nginx", "wrk", "iperf3", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"missing {tool}: apt-get install haproxy nginx libnginx-mod-stream wrk iperf3")
    stack = Stack()
    samples: dict[tuple[str, str], list[dict]] = {}
    try:
        http_port, iperf_port = free_port(), free_port()
        stack.start(["nginx", "-p", stack.tmp, "-g", "daemon off;", "-c",
                     stack.write("http.conf", NGINX_HTTP.format(port=http_port, tmp=stack.tmp))], CPU_LOAD)
        stack.start(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(iperf_port)], CPU_LOAD)
        wait_port(http_port)
        wait_port(iperf_port)
        for run in range(a.runs):
            for load in loads:
                backend = http_port if load in ("keepalive", "close") else iperf_port
                for peer in peers:
                    try:
                        r = measure(stack, peer, backend, load, a.duration, a.connections)
                    except RuntimeError as exc:   # a failed sample is reported, not a dead run
                        print(f"run {run + 1}/{a.runs} {load:<10} {peer:<17} FAILED: {exc}", flush=True)
                        continue
                    samples.setdefault((load, peer), []).append(r)
                    print(f"run {run + 1}/{a.runs} {load:<10} {peer:<17} {r['value']:>12.2f}"
                          + (f"  p99 {r['p99_ms']:.2f} ms" if r["p99_ms"] is not None else "")
                          + (f"  cpu {r['cpu_pct']:.0f}%" if r["cpu_pct"] is not None else "")
                          + (f"  errors {r['errors']}" if r["errors"] else ""), flush=True)
    finally:
        stack.close()

    med = {}
    for key, rs in samples.items():
        med[key] = {f: (statistics.median(r[f] for r in rs) if rs[0][f] is not None else None)
                    for f in ("value", "p99_ms", "cpu_pct", "errors")}
    units = {"keepalive": "req/s", "close": "conn/s", "bulk_up": "Gbit/s", "bulk_down": "Gbit/s"}
    print(f"\nmedians of {a.runs} runs x {a.duration:g}s; ratio = figure / HAProxy's figure")
    print("| load | " + " | ".join(peers) + " |")
    print("|---" * (len(peers) + 1) + "|")
    for load in loads:
        base = med.get((load, "haproxy"))
        cells = []
        for peer in peers:
            m = med.get((load, peer))
            if m is None:                         # every sample of it failed
                cells.append("failed")
                continue
            cell = f"{m['value']:,.0f}" if units[load] != "Gbit/s" else f"{m['value']:.2f}"
            if base and peer != "haproxy":
                cell += f" ({m['value'] / base['value']:.2f}x)"
            if m["p99_ms"] is not None:
                cell += f", p99 {m['p99_ms']:.2f} ms"
                if base and peer != "haproxy" and base["p99_ms"]:
                    cell += f" ({m['p99_ms'] / base['p99_ms']:.2f}x)"
            if m["cpu_pct"] is not None:
                cell += f", cpu {m['cpu_pct']:.0f}%"
            cells.append(cell)
        print(f"| {load} ({units[load]}) | " + " | ".join(cells) + " |")
        # per proxy core: the median over runs of (figure / the balancer's CPU share) of each run
        per_core = []
        for peer in peers:
            rs = [r for r in samples.get((load, peer), []) if r["cpu_pct"]]
            per_core.append(f"{statistics.median(r['value'] * 100 / r['cpu_pct'] for r in rs):,.0f}"
                            if rs else "-")
        print("| per core | " + " | ".join(per_core) + " |")
    if a.connlog:
        # per sample (figure / the CPU it took), then the median: steadier than a ratio of
        # medians on a shared machine, where another process's load moves both at once
        def per_core(key: tuple[str, str]) -> float | None:
            rs = [r["value"] / (r["cpu_pct"] / 100) for r in samples.get(key, []) if r["cpu_pct"]]
            return statistics.median(rs) if rs else None
        print("\nconnection log cost: figure per proxy core (median over samples of figure / "
              "cpu), logged vs not logged")
        for load in loads:
            for p in [p for p in peers if p.endswith("-log")]:
                on, off = per_core((load, p)), per_core((load, p[:-4]))
                if on and off:
                    print(f"  {load} {p[:-4]}: {off:,.0f} -> {on:,.0f} per core ({on / off:.2f}x)")
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"runs": a.runs, "duration": a.duration, "connections": a.connections,
                   "medians": {f"{load}/{p}": v for (load, p), v in med.items()},
                   "samples": {f"{load}/{p}": v for (load, p), v in samples.items()}}, f, indent=1)
    print(f"\nJSON: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
