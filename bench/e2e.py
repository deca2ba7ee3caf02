"""End-to-end benchmark of cost: fastlb beside HAProxy, nginx stream and a naive uvloop proxy,
on this machine, in one run: throughput, latency, CPU, throughput per proxy core, syscalls per
request / connection / MB, RSS per idle connection and the keep-alive tail under a bulk load.

    python3 bench/e2e.py                     # about 10 minutes: tables + charts in bench/results/
    python3 bench/e2e.py --charts bench/charts --md bench/results/e2e.md    # for bench/README.md

Needs: apt-get install haproxy nginx libnginx-mod-stream wrk iperf3 strace (strace for the
syscall round: --strace 0 skips it); the charts need matplotlib (pip install -e '.[bench]').

Method. The proxy under test is pinned to CPU 0 (taskset), the load generator and the backends
to CPU 1 (fastlb-2w, two workers, gets both CPUs: its second worker shares CPU 1 with the load).
Every proxy is started fresh for every sample, with one listener per route it needs (routes:
"http", an nginx serving a 23-byte body, and "iperf", one iperf3 server), and stopped by PID.
Loads (a table, LOADS: name -> Load; others register theirs with register_load):
- keepalive: `wrk -t1 -c64 --latency`, small requests on kept-alive connections (req/s, p50/p99)
- close: the same with "Connection: close", a new connection per request (conn/s, p50/p99)
- bulk_up / bulk_down: iperf3 through the proxy to one iperf3 server (its control and data
  connections must reach the same server), client to server and reverse (Gbit/s)
- mixed: the keepalive load while an iperf3 bulk (client to server) runs through the same proxy
  (req/s, p50/p99 of the keep-alive requests: the tail a bulk transfer inflicts)
Each figure is the median of --runs runs; runs interleave the peers so that machine noise hits
them alike. CPU: utime+stime of the proxy's processes (/proc/PID/stat) over the load, % of one
core; "per core" is the median over runs of (figure / CPU share): what one core of the proxy
buys. Then, once per peer and load (--strace SECONDS, default 2): an extra round with
`strace -c -f -p PIDS` attached to every process and thread of the proxy, whose summary is
divided by the round's requests (keepalive), connections (close) or MB of 10^6 bytes moved
(bulk); strace slows the proxy, so these rounds are not in the throughput figures. Last, once
per peer (--rss-conns N, default 1000): bench/idle_rss.py's method, RSS growth per idle
connection after N connections each exchanged 4 KiB both ways through the proxy.

Other peers and variants: --only picks among PEERS and the variants below; "direct" is the load
without a proxy, "asyncio-streams" a naive streams proxy. --workers 1,2 adds fastlb-2w.
--fastlb-set [service.]KEY=VALUE sets a key in every fastlb's [global] (or [[service]]) table,
VALUE a TOML value (a bare word is taken as a string); --fastlb-peer NAME:[service.]KEY=VALUE
adds a fastlb variant NAME (repeat for more keys) measured beside the others.
With --acl, fastlb and HAProxy are also measured with a 1,000-CIDR ACL (the client's 127.0.0.1
among 999 others, and 200 denied /24s) and per-source limits on every connection, set high
enough never to refuse the load ("fastlb-acl", "haproxy-acl": HAProxy with `src -f` lists and a
stick table tracking conn_cur and conn_rate).
With --baseline PYTHON, a second fastlb ("fastlb-base": the fastlb that interpreter imports,
e.g. a venv with an older commit installed) runs beside the current one in the same run.
With --connlog [DEST], fastlb is also measured with its connection log on for every
connection ("fastlb-log", and "fastlb-Nw-log" for each --workers N: `log = { connections =
true, sample = 1.0 }`, lines to DEST, default stderr, which the bench sends to a file).
Every process started is stopped by PID; all traffic stays on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_LB, CPU_LOAD = "0", "1"
TICK = os.sysconf("SC_CLK_TCK")
# the default line-up: the peers (direct and asyncio-streams stay available with --only)
PEERS = ["haproxy", "haproxy-splice-auto", "haproxy-splice-on", "nginx", "fastlb", "asyncio-protocol"]
HAPROXY_MAXCONN = 7000       # fds: 2 per connection + maxconn/4 pipes of 2 with splice: < 20000


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


def _proc_table() -> tuple[dict[int, list[int]], dict[int, list[str]]]:
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
    return children, stats


def tree_pids(pid: int) -> list[int]:
    """pid and all its descendants."""
    children, stats = _proc_table()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime of pid and all its descendants."""
    children, stats = _proc_table()
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


# ---------------------------------------------------------------------------------------------
# Backends: name -> starter(stack) -> port, started once per run, only if a chosen load routes
# to them. Loads name the backends they need (Load.routes); each proxy gets one listener per
# route, in that order.

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


def _backend_http(stack: Stack) -> int:
    port = free_port()
    stack.start(["nginx", "-p", stack.tmp, "-g", "daemon off;", "-c",
                 stack.write("http.conf", NGINX_HTTP.format(port=port, tmp=stack.tmp))], CPU_LOAD)
    wait_port(port)
    return port


def _backend_iperf(stack: Stack) -> int:
    port = free_port()
    stack.start(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)], CPU_LOAD)
    wait_port(port)
    return port


def _backend_echo(stack: Stack) -> int:
    port = free_port()
    stack.start([sys.executable, os.path.join(HERE, "idle_rss.py"), "--echo-server", str(port)],
                CPU_LOAD)
    wait_port(port)
    return port


BACKENDS: dict[str, Callable[[Stack], int]] = {
    "http": _backend_http, "iperf": _backend_iperf, "echo": _backend_echo}


# ---------------------------------------------------------------------------------------------
# Peers: the proxies. PEER_STARTERS: name -> starter(stack, backend ports) -> (process, listen
# ports, one per backend); fastlb's variants are FASTLB_VARIANTS entries.

NGINX_STREAM = """
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
error_log {tmp}/stream-error.log;
pid {tmp}/stream.pid;
events {{ worker_connections 16384; }}
stream {{
{servers}
}}
"""
NGINX_STREAM_ROUTE = """  upstream b{i} {{ server 127.0.0.1:{backend}; }}
  server {{ listen 127.0.0.1:{port} backlog=4096; proxy_pass b{i}; proxy_half_close on; }}
"""

HAPROXY = """
global
  nbthread 1
  maxconn {maxconn}
{glob}
defaults
  mode tcp
{defaults}
  timeout connect 5s
  timeout client 60s
  timeout server 60s
"""
HAPROXY_ROUTE = """frontend f{i}
  bind 127.0.0.1:{port}{bind}
{frontend}
  default_backend b{i}
backend b{i}
  server s1 127.0.0.1:{backend}
"""

# --acl: 1,000 allowed CIDRs with the client's address among them, 200 denied ones, per-source
# limits that never refuse this load (one source: the load generator's 127.0.0.1).
ACL_ALLOW = [f"10.{i // 250}.{i % 250}.0/24" for i in range(999)] + ["127.0.0.1/32"]
ACL_DENY = [f"192.168.{i}.0/24" for i in range(200)]
SRC_CONNS, SRC_RATE = 50000, 1000000
HAPROXY_ACL_FRONTEND = """\
  stick-table type ip size 100k expire 30s store conn_cur,conn_rate(1s)
  tcp-request connection reject if !{{ src -f {tmp}/allow.lst }} || {{ src -f {tmp}/deny.lst }}
  tcp-request connection track-sc0 src
  tcp-request connection reject if {{ sc0_conn_cur gt {conns} }} || {{ sc0_conn_rate gt {rate} }}"""


def haproxy_config(routes: list[tuple[int, int]], glob: str = "", defaults: str = "",
                   frontend: str = "", bind: str = "") -> str:
    """HAProxy mode tcp, one thread, one frontend per (listen port, backend port)."""
    text = HAPROXY.format(maxconn=HAPROXY_MAXCONN, glob=glob, defaults=defaults)
    for i, (port, backend) in enumerate(routes):
        text += HAPROXY_ROUTE.format(i=i, port=port, backend=backend, frontend=frontend, bind=bind)
    return "\n".join(line for line in text.splitlines() if line.strip()) + "\n"


# fastlb's config in one place: FASTLB_GLOBAL / FASTLB_SERVICE hold TOML values (as text) of
# every fastlb peer's [global] / [[service]] tables (--fastlb-set); FASTLB_VARIANTS: peer name
# -> (global, service) keys added for that peer only (--fastlb-peer, --acl, --connlog).
FASTLB_GLOBAL: dict[str, str] = {}
FASTLB_SERVICE: dict[str, str] = {}
FASTLB_VARIANTS: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
CONNLOG_DEST = "stderr"                # --connlog: the destination of fastlb-log's lines
BASELINE_PYTHON: str | None = None     # --baseline


def toml_value(text: str) -> str:
    """``text`` if it is a TOML value, else ``text`` as a TOML string (``off`` -> ``"off"``)."""
    try:
        tomllib.loads(f"v = {text}")
        return text
    except tomllib.TOMLDecodeError:
        return json.dumps(text)


def fastlb_set(spec: str, glob: dict[str, str], svc: dict[str, str]) -> None:
    """Parse ``[global.|service.]KEY=VALUE`` into ``glob`` or ``svc``."""
    key, sep, value = spec.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"expected [service.]KEY=VALUE, got {spec!r}")
    table = glob
    if key.startswith("service."):
        table, key = svc, key.removeprefix("service.")
    table[key.removeprefix("global.")] = toml_value(value.strip())


def fastlb_config(routes: list[tuple[int, int]], workers: int = 1,
                  glob: dict[str, str] | None = None, svc: dict[str, str] | None = None) -> str:
    """fastlb's TOML: one service per (listen port, backend port); ``glob`` / ``svc`` add keys
    (TOML values as text) to [global] / every [[service]], after FASTLB_GLOBAL / FASTLB_SERVICE."""
    g = {"workers": str(workers), **FASTLB_GLOBAL, **(glob or {})}
    s = {**FASTLB_SERVICE, **(svc or {})}
    text = "[global]\n" + "".join(f"{k} = {v}\n" for k, v in g.items())
    for i, (port, backend) in enumerate(routes):
        text += (f'\n[[service]]\nname = "bench{i}"\nlisten = ["127.0.0.1:{port}"]\n'
                 f'backends = [ {{ address = "127.0.0.1:{backend}" }} ]\n'
                 + "".join(f"{k} = {v}\n" for k, v in s.items()))
    tomllib.loads(text)                # a bad --fastlb-set fails here, before anything starts
    return text


def _listen(stack: Stack, p: subprocess.Popen, ports: list[int]) -> tuple[subprocess.Popen, list[int]]:
    for port in ports:
        wait_port(port)
    return p, ports


def _start_haproxy(stack: Stack, backends: list[int], name: str, defaults: str = "",
                   frontend: str = "", bind: str = "") -> tuple[subprocess.Popen, list[int]]:
    ports = [free_port() for _ in backends]
    cfg = haproxy_config(list(zip(ports, backends, strict=True)), defaults=defaults,
                         frontend=frontend, bind=bind)
    p = stack.start(["haproxy", "-db", "-f", stack.write(f"{name}.cfg", cfg)], CPU_LB)
    return _listen(stack, p, ports)


def _start_nginx(stack: Stack, backends: list[int]) -> tuple[subprocess.Popen, list[int]]:
    ports = [free_port() for _ in backends]
    servers = "".join(NGINX_STREAM_ROUTE.format(i=i, port=port, backend=backend)
                      for i, (port, backend) in enumerate(zip(ports, backends, strict=True)))
    p = stack.start(["nginx", "-p", stack.tmp, "-g", "daemon off;", "-c",
                     stack.write("stream.conf", NGINX_STREAM.format(tmp=stack.tmp, servers=servers))],
                    CPU_LB)
    return _listen(stack, p, ports)


def _start_naive(script: str) -> Callable[[Stack, list[int]], tuple[subprocess.Popen, list[int]]]:
    def start(stack: Stack, backends: list[int]) -> tuple[subprocess.Popen, list[int]]:
        ports = [free_port() for _ in backends]
        args = [a for port, backend in zip(ports, backends, strict=True)
                for a in (str(port), "127.0.0.1", str(backend))]
        p = stack.start([sys.executable, os.path.join(HERE, "peers", script)] + args, CPU_LB)
        return _listen(stack, p, ports)
    return start


def _start_haproxy_acl(stack: Stack, backends: list[int]) -> tuple[subprocess.Popen, list[int]]:
    stack.write("allow.lst", "\n".join(ACL_ALLOW) + "\n")
    stack.write("deny.lst", "\n".join(ACL_DENY) + "\n")
    return _start_haproxy(stack, backends, "haproxy-acl", frontend=HAPROXY_ACL_FRONTEND.format(
        tmp=stack.tmp, conns=SRC_CONNS, rate=SRC_RATE))


PEER_STARTERS: dict[str, Callable[[Stack, list[int]], tuple[subprocess.Popen, list[int]]]] = {
    "haproxy": lambda stack, b: _start_haproxy(stack, b, "haproxy"),
    # HAProxy's splice(2) where its heuristic deems it worth it (a channel that filled its
    # buffer in one read 3 times running), like fastlb's default splice = "auto" ...
    "haproxy-splice-auto": lambda stack, b: _start_haproxy(stack, b, "haproxy-splice-auto",
                                                           defaults="  option splice-auto"),
    # ... and forced both ways (HAProxy 2.6's -auto did not splice in our runs: bench/README.md)
    "haproxy-splice-on": lambda stack, b: _start_haproxy(
        stack, b, "haproxy-splice-on", defaults="  option splice-request\n  option splice-response"),
    "haproxy-acl": _start_haproxy_acl,
    # TCP_DEFER_ACCEPT on the listener (`bind ... defer-accept`), beside fastlb with
    # `--fastlb-peer fastlb-da:service.defer_accept=true` (bench/README.md)
    "haproxy-da": lambda stack, b: _start_haproxy(stack, b, "haproxy-da", bind=" defer-accept"),
    "nginx": _start_nginx,
    "asyncio-streams": _start_naive("streams_proxy.py"),
    "asyncio-protocol": _start_naive("protocol_proxy.py"),
}


def fastlb_variant(name: str) -> tuple[int, dict[str, str], dict[str, str]] | None:
    """(workers, [global] keys, [[service]] keys) of a fastlb peer name, None if not one:
    fastlb, fastlb-Nw, their -log variants (--connlog), fastlb-acl, FASTLB_VARIANTS' names."""
    if name in FASTLB_VARIANTS:
        glob, svc = FASTLB_VARIANTS[name]
        return int(glob.get("workers", "1")), dict(glob), dict(svc)
    m = re.fullmatch(r"fastlb(?:-(\d+)w)?(-log|-acl)?", name)
    if m is None:
        return None
    glob, svc = {}, {}
    if m.group(2) == "-log":          # --connlog: every connection logged
        glob["connlog"] = json.dumps(CONNLOG_DEST)
        svc["log"] = "{ connections = true, sample = 1.0 }"
    elif m.group(2) == "-acl":
        svc["acl"] = ("{ allow = [" + ", ".join(f'"{c}"' for c in ACL_ALLOW) + "], deny = ["
                      + ", ".join(f'"{c}"' for c in ACL_DENY) + "] }")
        svc["limits"] = f'{{ per_source_conns = {SRC_CONNS}, per_source_rate = "{SRC_RATE}/s" }}'
    return int(m.group(1) or 1), glob, svc


def start_proxy(stack: Stack, name: str, backends: list[int]) -> tuple[subprocess.Popen | None, list[int]]:
    """Start peer ``name`` with one listener per backend port; (process, listen ports)."""
    if name == "direct":
        return None, list(backends)
    if name in PEER_STARTERS:
        return PEER_STARTERS[name](stack, backends)
    python = sys.executable
    if name == "fastlb-base":
        assert BASELINE_PYTHON is not None
        # -P: the baseline interpreter's own fastlb, never the checkout we stand in
        variant: tuple[int, dict[str, str], dict[str, str]] | None = (1, {}, {})
        python_args = [BASELINE_PYTHON, "-P"]
    else:
        variant = fastlb_variant(name)
        python_args = [python]
        if variant is None:
            raise ValueError(f"unknown peer {name!r}")
    assert variant is not None
    workers, glob, svc = variant
    ports = [free_port() for _ in backends]
    text = fastlb_config(list(zip(ports, backends, strict=True)), workers, glob, svc)
    cmd = python_args + ["-m", "fastlb", "run", "-c", stack.write(f"{name}.toml", text)]
    # more workers than one core: the balancer gets every CPU and shares CPU 1 with the load
    p = stack.start(cmd, CPU_LB if workers == 1 else f"{CPU_LB}-{(os.cpu_count() or 2) - 1}")
    _listen(stack, p, ports)
    if workers > 1:
        time.sleep(0.5 * workers)            # every worker has taken its snapshot
    return p, ports


def start_peer(stack: Stack, name: str, backend: int) -> tuple[subprocess.Popen | None, int]:
    """One route: (process, listen port) (bench/idle_rss.py's interface)."""
    p, ports = start_proxy(stack, name, [backend])
    return p, ports[0]


# ---------------------------------------------------------------------------------------------
# Load tools and the parsers of their outputs (tests/unit/test_bench_e2e.py runs these on
# captured outputs).

def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def parse_wrk(out: str) -> dict:
    """wrk --latency's report -> value (req/s), count (requests), p50_ms, p99_ms, errors."""
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise RuntimeError(f"wrk reported no rate: {out.strip()[-200:]!r}")
    count = re.search(r"(\d+) requests in ", out)
    pct = {q: _ms(v, u) for q, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"value": float(found.group(1)), "count": int(count.group(1)) if count else None,
            "p50_ms": pct.get("50"), "p99_ms": pct.get("99"),
            "errors": (sum(map(int, errors.groups())) if errors else 0)
                      + (int(non2xx.group(1)) if non2xx else 0)}


def parse_iperf(out: str) -> dict:
    """iperf3 -J's report -> value (Gbit/s received), count (MB of 10^6 bytes received)."""
    data = json.loads(out)
    if "error" in data:
        raise RuntimeError(f"iperf3: {data['error']}")
    got = data["end"]["sum_received"]
    return {"value": got["bits_per_second"] / 1e9, "count": got["bytes"] / 1e6,
            "p50_ms": None, "p99_ms": None, "errors": 0}


def parse_strace(out: str) -> dict[str, int]:
    """``strace -c``'s summary -> calls per syscall, and "total"."""
    calls: dict[str, int] = {}
    for line in out.splitlines():
        parts = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(parts) in (5, 6) and parts[3].isdigit() and re.fullmatch(r"[\d.]+", parts[0]):
            calls[parts[-1]] = int(parts[3])
    if "total" not in calls:
        raise RuntimeError(f"no strace summary: {out.strip()[-200:]!r}")
    return calls


def wrk_cmd(port: int, close: bool, duration: float, conns: int) -> list[str]:
    cmd = ["taskset", "-c", CPU_LOAD, "wrk", "-t1", f"-c{conns}", f"-d{duration:g}s", "--latency"]
    if close:
        cmd += ["-H", "Connection: close"]
    return cmd + [f"http://127.0.0.1:{port}/"]


def run_wrk(port: int, close: bool, duration: float, conns: int) -> dict:
    out = subprocess.run(wrk_cmd(port, close, duration, conns), capture_output=True, text=True,
                         timeout=duration + 30).stdout
    return parse_wrk(out)


def iperf_cmd(port: int, reverse: bool, duration: float) -> list[str]:
    cmd = ["taskset", "-c", CPU_LOAD, "iperf3", "-c", "127.0.0.1", "-p", str(port),
           "-t", f"{duration:g}", "-J"]
    return cmd + (["-R"] if reverse else [])


def run_iperf(port: int, reverse: bool, duration: float) -> dict:
    out = subprocess.run(iperf_cmd(port, reverse, duration), capture_output=True, text=True,
                         timeout=duration + 30).stdout
    try:
        return parse_iperf(out)
    except RuntimeError:
        # iperf3's one-test-at-a-time server now and then drops a control connection right
        # after the previous peer's test (seen for every proxy): try once more
        time.sleep(1.0)
        out = subprocess.run(iperf_cmd(port, reverse, duration), capture_output=True, text=True,
                             timeout=duration + 30).stdout
        return parse_iperf(out)


# ---------------------------------------------------------------------------------------------
# Loads: name -> Load. A load's run(ports, duration, opts) makes one round against the proxy's
# listeners (ports: route -> port) and returns a sample: value (in unit), count (requests,
# connections or MB in the round, for the syscall figures), p50_ms, p99_ms, errors.

@dataclass
class Load:
    name: str
    unit: str                                      # of the figure: "req/s", "Gbit/s", ...
    routes: tuple[str, ...]                        # BACKENDS the proxy must reach, in order
    run: Callable[[dict[str, int], float, argparse.Namespace], dict]
    warmup: Callable[[dict[str, int], argparse.Namespace], None] | None = None
    per: str | None = None                         # syscalls per: "request", "connection", "MB"
    title: str = ""
    refs: tuple[str, ...] = ("haproxy",)           # peers the ratios are taken against
    extra: dict = field(default_factory=dict)


LOADS: dict[str, Load] = {}
DEFAULT_LOADS: list[str] = []


def register_load(load: Load, default: bool = True) -> None:
    LOADS[load.name] = load
    if default and load.name not in DEFAULT_LOADS:
        DEFAULT_LOADS.append(load.name)


def _wrk_load(close: bool) -> Callable[[dict[str, int], float, argparse.Namespace], dict]:
    return lambda ports, duration, opts: run_wrk(ports["http"], close, duration, opts.connections)


def _wrk_warmup(close: bool) -> Callable[[dict[str, int], argparse.Namespace], None]:
    def warm(ports: dict[str, int], opts: argparse.Namespace) -> None:
        run_wrk(ports["http"], close, 1, opts.connections)
    return warm


def _iperf_load(reverse: bool) -> Callable[[dict[str, int], float, argparse.Namespace], dict]:
    return lambda ports, duration, opts: run_iperf(ports["iperf"], reverse, duration)


def run_mixed(ports: dict[str, int], duration: float, opts: argparse.Namespace) -> dict:
    """wrk keep-alive while an iperf3 bulk (client to server) runs through the same proxy."""
    ramp = 0.7
    bulk = subprocess.Popen(iperf_cmd(ports["iperf"], False, duration + 2 * ramp),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(ramp)                      # the bulk transfer is in full flow
        res = run_wrk(ports["http"], False, duration, opts.connections)
        out, _ = bulk.communicate(timeout=duration + 30)
    finally:
        if bulk.poll() is None:
            bulk.kill()
            bulk.wait()
    try:
        res["bulk_gbps"] = parse_iperf(out)["value"]
    except (RuntimeError, ValueError):
        res["bulk_gbps"] = None               # the keep-alive figures stand; the table says so
    return res


SPLICE_REFS = ("haproxy", "haproxy-splice-auto", "haproxy-splice-on")
register_load(Load("keepalive", "req/s", ("http",), _wrk_load(False), _wrk_warmup(False),
                   per="request", title="keep-alive requests"))
register_load(Load("close", "conn/s", ("http",), _wrk_load(True), _wrk_warmup(True),
                   per="connection", title="a new connection per request"))
register_load(Load("bulk_up", "Gbit/s", ("iperf",), _iperf_load(False), per="MB",
                   title="bulk, client to server", refs=SPLICE_REFS))
register_load(Load("bulk_down", "Gbit/s", ("iperf",), _iperf_load(True), per="MB",
                   title="bulk, server to client", refs=SPLICE_REFS))
register_load(Load("mixed", "req/s", ("http", "iperf"), run_mixed, _wrk_warmup(False),
                   title="keep-alive while a bulk transfer runs through the same proxy"))


# Other benches' loads, peers and backends: a module of bench/ named here is imported by main()
# (after this one is importable as ``e2e``), and registers into LOADS (register_load, default=
# False to stay out of the default run), PEER_STARTERS, BACKENDS and TOOLS. Missing: skipped.
# (bench/e2e_tls.py runs its TLS loads on its own instead: --tls, the hook in main().)
PLUGINS: list[str] = []


def load_plugins() -> None:
    import importlib
    for name in PLUGINS:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


# ---------------------------------------------------------------------------------------------
# Measuring

def measure(stack: Stack, peer: str, load: Load, backends: dict[str, int],
            opts: argparse.Namespace) -> dict:
    """One sample: a fresh proxy, the warm-up, the load; the proxy's CPU over the load."""
    proc, ports = start_proxy(stack, peer, [backends[r] for r in load.routes])
    try:
        routes = dict(zip(load.routes, ports, strict=True))
        if load.warmup:
            load.warmup(routes, opts)
        cpu0, t0 = (tree_cpu_seconds(proc.pid) if proc else 0.0), time.monotonic()
        res = load.run(routes, opts.duration, opts)
        wall = time.monotonic() - t0
        res["cpu_pct"] = 100 * (tree_cpu_seconds(proc.pid) - cpu0) / wall if proc else None
        return res
    finally:
        if proc:
            stack.stop(proc)


def _traced(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("TracerPid:") and line.split()[1] != "0" for line in f)
    except OSError:
        return True                           # gone: nothing to wait for


def strace_round(stack: Stack, peer: str, load: Load, backends: dict[str, int],
                 opts: argparse.Namespace) -> dict | None:
    """An extra round with ``strace -c -f`` attached to every thread of the proxy: the calls
    per syscall, divided by the round's requests / connections / MB."""
    proc, ports = start_proxy(stack, peer, [backends[r] for r in load.routes])
    if proc is None:
        return None
    out = os.path.join(stack.tmp, f"strace-{peer}-{load.name}.txt")
    tracer = None
    try:
        routes = dict(zip(load.routes, ports, strict=True))
        if load.warmup:
            load.warmup(routes, opts)
        tids = [int(t) for p in tree_pids(proc.pid) for t in os.listdir(f"/proc/{p}/task")]
        cmd = ["taskset", "-c", CPU_LB, "strace", "-c", "-f", "-o", out]
        for t in tids:
            cmd += ["-p", str(t)]
        # strace shares the proxy's CPU: a traced process waits for its tracer at every call
        tracer = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not all(_traced(t) for t in tids) and time.monotonic() < deadline:
            time.sleep(0.02)
        res = load.run(routes, opts.strace, opts)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
        with open(out) as f:
            calls = parse_strace(f.read())
        return {"calls": calls, "count": res["count"], "value": res["value"]}
    finally:
        if tracer is not None and tracer.poll() is None:
            tracer.kill()
            tracer.wait()
        stack.stop(proc)


def rss_round(stack: Stack, peer: str, echo: int, opts: argparse.Namespace) -> dict:
    """bench/idle_rss.py's method: RSS growth per connection left idle after an exchange."""
    import idle_rss
    return idle_rss.measure(stack, peer, echo, 4096, opts.rss_conns, opts.rss_settle)


def per_unit(s: dict) -> float | None:
    """Syscalls per request / connection / MB of one strace round."""
    return s["calls"]["total"] / s["count"] if s and s.get("count") else None


# ---------------------------------------------------------------------------------------------
# Tables

def _num(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "Gbit/s" or abs(v) < 100:
        return f"{v:.2f}" if abs(v) < 10 or unit == "Gbit/s" else f"{v:.1f}"
    return f"{v:,.0f}"


def _ratio(v: float | None, base: float | None) -> str:
    return f" ({v / base:.2f}x)" if v is not None and base else ""


def per_core(rs: list[dict]) -> float | None:
    """Median over samples of (figure / the proxy's CPU share in that sample)."""
    xs = [r["value"] * 100 / r["cpu_pct"] for r in rs if r.get("cpu_pct")]
    return statistics.median(xs) if xs else None


def medians(samples: dict[tuple[str, str], list[dict]]) -> dict[tuple[str, str], dict]:
    med = {}
    for key, rs in samples.items():
        m: dict[str, float | None] = {}
        for f in ("value", "p50_ms", "p99_ms", "cpu_pct", "errors", "bulk_gbps"):
            xs = [r[f] for r in rs if r.get(f) is not None]
            m[f] = statistics.median(xs) if xs else None
        m["per_core"] = per_core(rs)
        med[key] = m
    return med


def tables(loads: list[str], peers: list[str], samples: dict[tuple[str, str], list[dict]],
           sysc: dict[tuple[str, str], dict], rss: dict[str, dict]) -> str:
    """The markdown tables: a summary of cost per proxy, one table per load, the syscalls."""
    med = medians(samples)
    lines: list[str] = []
    ref = "haproxy"

    def get(load: str, peer: str, f: str) -> float | None:
        return med.get((load, peer), {}).get(f)

    # 1. the summary: per proxy core and per unit of work
    cols = []
    for name in loads:
        load = LOADS[name]
        if name == "mixed":
            cols.append(("mixed: keep-alive p99 under bulk (ms)", name))
        else:
            cols.append((f"{name} per core ({load.unit})", name))
    sys_cols = [n for n in loads if LOADS[n].per and any((n, p) in sysc for p in peers)]
    lines.append("| proxy | " + " | ".join(c for c, _ in cols)
                 + "".join(f" | syscalls per {LOADS[n].per} ({n})" for n in sys_cols)
                 + (" | KiB per idle conn" if rss else "") + " |")
    lines.append("|---" * (1 + len(cols) + len(sys_cols) + (1 if rss else 0)) + "|")
    for peer in peers:
        cells = []
        for _, name in cols:
            if name == "mixed":              # the tail: lower is better
                v, base = get(name, peer, "p99_ms"), get(name, ref, "p99_ms")
                cells.append(_num(v) + ("" if peer == ref else _ratio(v, base)))
            else:
                v, base = get(name, peer, "per_core"), get(name, ref, "per_core")
                cells.append(_num(v, LOADS[name].unit) + ("" if peer == ref else _ratio(v, base)))
        for name in sys_cols:
            v = per_unit(sysc.get((name, peer), {}))
            cells.append(_num(v))
        if rss:
            r = rss.get(peer)
            cells.append(f"{r['per_conn_kib']:.1f}" if r else "-")
        lines.append(f"| {peer} | " + " | ".join(cells) + " |")

    # 2. one table per load
    for name in loads:
        load = LOADS[name]
        refs = [r for r in load.refs if r in peers]
        latency = any(get(name, p, "p99_ms") is not None for p in peers)
        lines += ["", f"**{name}** ({load.title}; {load.unit})", ""]
        head = ["proxy", load.unit] + [f"x {r}" for r in refs[:1]]
        head += (["p50 ms", "p99 ms"] if latency else []) + ["cpu %", "per core"]
        head += [f"per core x {r}" for r in refs]
        if name == "mixed":
            head += [f"p99 x {r}" for r in refs] + ["p99 x its own keepalive p99",
                                                     "bulk Gbit/s meanwhile"]
        traced = load.per and any((name, p) in sysc for p in peers)
        if traced:
            head += [f"syscalls per {load.per}"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|---" * len(head) + "|")
        for peer in peers:
            m = med.get((name, peer))
            if m is None:
                lines.append(f"| {peer} | failed" + " |" * (len(head) - 1))
                continue
            row = [peer, _num(m["value"], load.unit)]
            row += [_ratio(m["value"], get(name, r, "value")).strip(" ()") or "-" for r in refs[:1]]
            row += [_num(m["p50_ms"]), _num(m["p99_ms"])] if latency else []
            row += [_num(m["cpu_pct"]), _num(m["per_core"], load.unit)]
            row += [_ratio(m["per_core"], get(name, r, "per_core")).strip(" ()") or "-"
                    for r in refs]
            if name == "mixed":
                row += [_ratio(m["p99_ms"], get(name, r, "p99_ms")).strip(" ()") or "-" for r in refs]
                row += [_ratio(m["p99_ms"], get("keepalive", peer, "p99_ms")).strip(" ()") or "-",
                        _num(m["bulk_gbps"], "Gbit/s")]
            if traced:
                row += [_num(per_unit(sysc.get((name, peer), {})))]
            if m["errors"]:
                row[1] += f" ({m['errors']:.0f} errors)"
            lines.append("| " + " | ".join(row) + " |")

    # 3. what a variant costs (--connlog, --acl): its figure per core against its plain peer's,
    # per sample (figure / the CPU it took), then the median: steadier than a ratio of medians on
    # a shared machine, where another process's load moves both at once
    variants = [(p, p.rsplit("-", 1)[0]) for p in peers
                if p.endswith(("-log", "-acl")) and p.rsplit("-", 1)[0] in peers]
    if variants:
        lines += ["", "**variants** (figure per proxy core, with / without)", ""]
        lines += ["| load | variant | without | with | ratio |", "|---|---|---|---|---|"]
        for name in loads:
            for p, plain in variants:
                on, off = get(name, p, "per_core"), get(name, plain, "per_core")
                if on and off:
                    lines.append(f"| {name} | {p} | {_num(off, LOADS[name].unit)} | "
                                 f"{_num(on, LOADS[name].unit)} | {on / off:.2f}x |")

    # 4. the syscalls of the strace rounds, per unit, the most frequent first
    for name in sys_cols:
        per = LOADS[name].per
        top: dict[str, float] = {}
        for peer in peers:
            s = sysc.get((name, peer))
            if s and s["count"]:
                for call, n in s["calls"].items():
                    if call != "total":           # summed over the proxies: what most make
                        top[call] = top.get(call, 0.0) + n / s["count"]
        names = [c for c, v in sorted(top.items(), key=lambda kv: -kv[1]) if v >= 0.05][:12]
        lines += ["", f"**syscalls per {per}, {name}** (strace -c; the 12 most frequent over "
                  "all the proxies)", ""]
        lines.append("| proxy | total | " + " | ".join(names) + " | other |")
        lines.append("|---" * (len(names) + 3) + "|")
        for peer in peers:
            s = sysc.get((name, peer))
            if not s or not s["count"]:
                continue
            c, n = s["calls"], s["count"]
            other = c["total"] - sum(c.get(x, 0) for x in names)
            lines.append(f"| {peer} | {_num(c['total'] / n)} | "
                         + " | ".join(_num(c.get(x, 0) / n) for x in names)
                         + f" | {_num(other / n)} |")
    return "\n".join(lines) + "\n"


def tables_from_json(data: dict) -> str:
    """The tables of a results file (bench/README.md's are those of bench/e2e-readme.json)."""
    def split(d: dict) -> dict:
        return {tuple(k.split("/", 1)): v for k, v in d.items()}
    return tables(data["loads"], data["peers"], split(data["samples"]),
                  split(data.get("syscalls", {})), data.get("rss", {}))


def report(data: dict) -> str:
    """The markdown of a results file: a line saying when, how long and how loaded, the tables."""
    info = data.get("machine", {})
    strace, conns = data.get("strace", 0), data.get("rss_conns", 0)
    head = (f"{info.get('date', '?')}, {data['runs']} runs x {data['duration']:g} s, medians; "
            + (f"strace rounds of {strace:g} s; " if strace else "no strace round; ")
            + (f"RSS after {conns} idle connections; " if conns else "no RSS round; ")
            + f"load average {info.get('loadavg', '?')} before, "
            f"{info.get('loadavg_after', '?')} after, {info.get('cpus', '?')} CPUs; "
            f"{info.get('minutes', 0):.1f} minutes")
    return head + "\n\n" + tables_from_json(data)


def machine() -> dict:
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "loadavg": " ".join(load), "cpus": os.cpu_count()}


# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--only", default=",".join(PEERS),
                    help="peers: " + ", ".join(["direct", *PEER_STARTERS, "fastlb"]))
    ap.add_argument("--workers", default="1,2",
                    help="fastlb worker counts to measure, e.g. 1,2 (each is a peer: fastlb, fastlb-2w)")
    ap.add_argument("--loads", default=None, help="default: " + ",".join(DEFAULT_LOADS))
    ap.add_argument("--strace", type=float, default=2.0, metavar="SECONDS",
                    help="the strace round's length per peer and load (0: no syscall figures)")
    ap.add_argument("--rss-conns", type=int, default=1000,
                    help="connections of the idle RSS round (0: skip it)")
    ap.add_argument("--rss-settle", type=float, default=2.5, help=argparse.SUPPRESS)
    ap.add_argument("--fastlb-set", action="append", default=[], metavar="[service.]KEY=VALUE",
                    help="a key of every fastlb's [global] (or [[service]]) table; VALUE is TOML")
    ap.add_argument("--fastlb-peer", action="append", default=[],
                    metavar="NAME:[service.]KEY=VALUE",
                    help="also measure fastlb variant NAME with this key (repeat for more keys)")
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
    ap.add_argument("--md", default=os.path.join(HERE, "results", "e2e.md"),
                    help="where the markdown tables go")
    ap.add_argument("--charts", default=os.path.join(HERE, "results", "charts"),
                    help="where the PNG charts go ('' for none)")
    ap.add_argument("--report", metavar="JSON",
                    help="measure nothing: write the tables (--md) of this results file")
    return ap.parse_args(argv)


def peer_list(a: argparse.Namespace) -> list[str]:
    """The peers of a run, in order, from --only and the options that add variants."""
    global BASELINE_PYTHON, CONNLOG_DEST
    peers = [p for p in a.only.split(",") if p]
    for spec in a.fastlb_set:
        fastlb_set(spec, FASTLB_GLOBAL, FASTLB_SERVICE)
    for spec in a.fastlb_peer:
        name, sep, kv = spec.partition(":")
        if not sep or not name:
            raise SystemExit(f"--fastlb-peer: expected NAME:[service.]KEY=VALUE, got {spec!r}")
        glob, svc = FASTLB_VARIANTS.setdefault(name, ({}, {}))
        fastlb_set(kv, glob, svc)
        if name not in peers:
            peers.append(name)
    if a.baseline:
        BASELINE_PYTHON = a.baseline
        at = peers.index("fastlb") if "fastlb" in peers else len(peers)
        peers.insert(at, "fastlb-base")
    if a.acl:
        for plain in ("haproxy", "fastlb"):
            if plain in peers:
                peers.insert(peers.index(plain) + 1, f"{plain}-acl")
    extra = [f"fastlb-{n.strip()}w" for n in a.workers.split(",") if n.strip() not in ("", "1")]
    if extra and "fastlb" in peers:
        at = peers.index("fastlb") + 1
        peers[at:at] = [p for p in extra if p not in peers]
    if a.connlog:
        CONNLOG_DEST = a.connlog
        for p in [p for p in peers if p == "fastlb" or re.fullmatch(r"fastlb-\d+w", p)]:
            peers.insert(peers.index(p) + 1, f"{p}-log")
    for p in peers:
        if p not in ("direct", "fastlb-base") and p not in PEER_STARTERS and fastlb_variant(p) is None:
            raise SystemExit(f"unknown peer {p!r}")
    return peers


# the tools a backend, a load or a peer needs (others' registrations add theirs)
TOOLS = {"http": ["nginx", "wrk"], "iperf": ["iperf3"], "haproxy": ["haproxy"], "nginx": ["nginx"]}


def required_tools(a: argparse.Namespace, peers: list[str], loads: list[str]) -> list[str]:
    names = {r for n in loads for r in LOADS[n].routes} | {p.split("-")[0] for p in peers}
    tools = ["taskset"] + (["strace"] if a.strace else [])
    return tools + [t for n in sorted(names) for t in TOOLS.get(n, [])]


def main(argv: list[str] | None = None) -> int:
    sys.modules.setdefault("e2e", sys.modules[__name__])   # idle_rss imports us: one module
    sys.path.insert(0, HERE)
    load_plugins()
    a = parse_args(argv)
    if a.report:
        with open(a.report) as f:
            md = report(json.load(f))
        with open(a.md, "w") as f:
            f.write(md)
        print(md)
        return 0
    loads = (a.loads or ",".join(DEFAULT_LOADS)).split(",")
    if a.tls or any(x.startswith("tls_") for x in loads):   # [tlsbench] bench/e2e_tls.py's
        try:
            import e2e_tls
        except ModuleNotFoundError as exc:
            if exc.name != "e2e_tls":
                raise
            raise SystemExit("the TLS loads are bench/e2e_tls.py's, missing here") from None
        return e2e_tls.run(a, [x for x in loads if x.startswith("tls_")] or e2e_tls.LOADS)
    peers = peer_list(a)
    for name in loads:
        if name not in LOADS:
            raise SystemExit(f"unknown load {name!r}: one of {', '.join(LOADS)}")
    for p in peers:                    # a bad --fastlb-set or --fastlb-peer fails before a run
        v = fastlb_variant(p)
        if v:
            fastlb_config([(1, 2)], *v)
    for tool in required_tools(a, peers, loads):
        if not shutil.which(tool):
            sys.exit(f"missing {tool}: apt-get install haproxy nginx libnginx-mod-stream wrk "
                     "iperf3 strace")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))        # the children inherit it
    info = machine()
    print(f"{info['date']}, load average {info['loadavg']} on {info['cpus']} CPUs; peers "
          f"{','.join(peers)}; loads {','.join(loads)}", flush=True)
    stack = Stack()
    samples: dict[tuple[str, str], list[dict]] = {}
    sysc: dict[tuple[str, str], dict] = {}
    rss: dict[str, dict] = {}
    t_start = time.monotonic()
    try:
        needed = {r for name in loads for r in LOADS[name].routes}
        backends = {name: BACKENDS[name](stack) for name in BACKENDS if name in needed}
        for run in range(a.runs):
            for name in loads:
                for peer in peers:
                    try:
                        r = measure(stack, peer, LOADS[name], backends, a)
                    except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
                        # a failed sample is reported, not a dead run
                        print(f"run {run + 1}/{a.runs} {name:<10} {peer:<17} FAILED: {exc}", flush=True)
                        continue
                    samples.setdefault((name, peer), []).append(r)
                    print(f"run {run + 1}/{a.runs} {name:<10} {peer:<17} {r['value']:>12.2f}"
                          + (f"  p50 {r['p50_ms']:.2f} ms" if r.get("p50_ms") is not None else "")
                          + (f"  p99 {r['p99_ms']:.2f} ms" if r.get("p99_ms") is not None else "")
                          + (f"  cpu {r['cpu_pct']:.0f}%" if r["cpu_pct"] is not None else "")
                          + (f"  bulk {r['bulk_gbps']:.2f} Gbit/s" if r.get("bulk_gbps") else "")
                          + (f"  errors {r['errors']}" if r["errors"] else ""), flush=True)
        if a.strace:
            for name in [n for n in loads if LOADS[n].per]:
                for peer in peers:
                    try:
                        s = strace_round(stack, peer, LOADS[name], backends, a)
                    except (RuntimeError, OSError, subprocess.TimeoutExpired,
                            json.JSONDecodeError) as exc:
                        print(f"strace {name:<10} {peer:<17} FAILED: {exc}", flush=True)
                        continue
                    if s is not None:
                        sysc[(name, peer)] = s
                        print(f"strace {name:<10} {peer:<17} {per_unit(s) or 0:>8.2f} syscalls "
                              f"per {LOADS[name].per}", flush=True)
        if a.rss_conns:
            echo = BACKENDS["echo"](stack)
            keep = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {int(CPU_LOAD)})              # the clients on the load CPU
            try:
                for peer in [p for p in peers if p != "direct"]:
                    try:
                        rss[peer] = rss_round(stack, peer, echo, a)
                    except (RuntimeError, OSError) as exc:
                        print(f"rss {peer:<17} FAILED: {exc}", flush=True)
                        continue
                    print(f"rss {peer:<17} {rss[peer]['per_conn_kib']:>8.2f} KiB per idle "
                          f"connection", flush=True)
            finally:
                os.sched_setaffinity(0, keep)
    finally:
        stack.close()

    info["loadavg_after"] = machine()["loadavg"]
    info["minutes"] = round((time.monotonic() - t_start) / 60, 1)
    med = medians(samples)
    data = {"runs": a.runs, "duration": a.duration, "connections": a.connections,
            "strace": a.strace, "rss_conns": a.rss_conns, "machine": info, "peers": peers,
            "loads": loads, "units": {n: LOADS[n].unit for n in loads},
            "titles": {n: LOADS[n].title for n in loads},
            "per": {n: LOADS[n].per for n in loads if LOADS[n].per},
            "medians": {f"{load}/{p}": v for (load, p), v in med.items()},
            "samples": {f"{load}/{p}": v for (load, p), v in samples.items()},
            "syscalls": {f"{load}/{p}": v for (load, p), v in sysc.items()},
            "rss": rss}
    md = report(data)
    print("\n" + md)
    for path in (a.json, a.md):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(a.md, "w") as f:
        f.write(md)
    with open(a.json, "w") as f:
        json.dump(data, f, indent=1)
    print(f"markdown: {a.md}\nJSON: {a.json}")
    if a.charts:
        try:
            import plot
        except ImportError:
            plot = None
        try:
            for path in plot.plot(a.json, a.charts) if plot else []:
                print(f"chart: {path}")
        except ImportError:
            print("no charts: matplotlib is missing (pip install -e '.[bench]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
