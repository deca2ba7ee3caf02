"""TLS loads of the end-to-end benchmark (issue 12, Performance): fastlb terminating TLS
(`service.tls`) beside HAProxy 2.6 (`bind ... ssl crt`, `mode tcp`, `nbthread 1`) and a naive
uvloop SSL-transport proxy (bench/peers/naive_ssl.py), per proxy core, as ratios to HAProxy.

    python3 bench/e2e.py --tls [--runs 5] [--duration 4] [--only haproxy,fastlb,naive-ssl]
    python3 bench/e2e.py --loads tls_close,tls_keepalive --baseline OLD_VENV/bin/python

bench/e2e.py hands its TLS loads (`tls_*`, or all three with --tls) to `run()` here. Same
method as e2e.py: the proxy pinned to CPU 0, wrk and the backend (nginx, plain HTTP) to CPU 1;
the proxy's CPU from /proc/PID/stat; runs interleave the peers; medians over runs. One ECDSA
P-256 certificate, made at start with `openssl` in the bench's temporary directory, serves
every peer; every peer accepts TLS 1.3 only (wrk's OpenSSL offers X25519 first: every peer
does the same key exchange).

Loads (wrk -t1, HTTPS to the proxy, plain HTTP from the proxy to nginx):
- tls_keepalive: small requests on 64 kept-alive connections (req/s, p99).
- tls_close: the same with `Connection: close`: one TLS handshake per request. wrk would
  resume: it closes with SSL_shutdown + SSL_clear, which keeps the SSL's session, so its next
  SSL_connect offers the ticket the server sent (measured: about 2x the handshakes/s of full
  ones). To measure FULL handshakes a tiny LD_PRELOAD shim (built at start with cc) drops that
  session after each SSL_clear; the run prints fastlb's own count of resumptions
  (tls_resumptions_total) to show it is 0.
- tls_bulk: an 8 MiB body (a file nginx sends) on 8 kept-alive connections (Gbit/s of body
  received by wrk).
The TLS loads run alone (plain loads named beside them are not run). The table it prints last
(markdown; the samples also go to results/e2e_tls.json) is bench/README.md's TLS table: per
proxy core is the median over runs of (figure / the proxy's CPU share in that run); a ratio is
the median over runs of (figure / HAProxy's figure in the same run), paired by run.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request

import e2e

HERE = os.path.dirname(os.path.abspath(__file__))
LOADS = ["tls_keepalive", "tls_close", "tls_bulk"]
PEERS = ["haproxy", "fastlb", "naive-ssl"]
UNITS = {"tls_keepalive": "req/s", "tls_close": "handshakes/s", "tls_bulk": "Gbit/s"}
BULK_MIB, BULK_CONNS = 8, 8

NGINX_HTTP = """
worker_processes 1;
error_log {tmp}/tls-http-error.log;
pid {tmp}/tls-http.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  sendfile on;
  client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};
  uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location = / {{ return 200 "hello from the backend\\n"; }}
    location /big {{ root {tmp}/www; default_type application/octet-stream; }}
  }}
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
  bind 127.0.0.1:{port} ssl crt {pem} ssl-min-ver TLSv1.3
  default_backend b
backend b
  server s1 127.0.0.1:{backend}
"""

FASTLB = """
[global]
workers = 1
metrics = "127.0.0.1:{mport}"
[[service]]
name = "bench"
listen = ["127.0.0.1:{port}"]
tls = {{ cert = "{crt}", key = "{key}", min_version = "1.3" }}
backends = [ {{ address = "127.0.0.1:{backend}" }} ]
"""

# LD_PRELOAD for wrk: no session to offer, so every handshake is a full one (see tls_close)
NO_RESUME_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
typedef struct ssl_st SSL;
typedef struct ssl_session_st SSL_SESSION;
int SSL_set_session(SSL *s, SSL_SESSION *session);
int SSL_clear(SSL *s) {          /* wrk's ssl_close: SSL_shutdown, then SSL_clear */
    static int (*real)(SSL *);
    int r;
    if (!real) real = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_clear");
    r = real(s);
    SSL_set_session(s, NULL);
    return r;
}
"""


class Tls:
    """What the TLS loads share in one run: the certificate, the backend, the wrk shim."""

    def __init__(self, stack: e2e.Stack) -> None:
        t = stack.tmp
        self.crt, self.key, self.pem = (os.path.join(t, n) for n in ("bench.crt", "bench.key", "bench.pem"))
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                        "/CN=bench.test", "-addext", "subjectAltName=DNS:bench.test",
                        "-keyout", self.key, "-out", self.crt], check=True, capture_output=True)
        with open(self.pem, "wb") as f:
            for p in (self.crt, self.key):
                with open(p, "rb") as src:
                    f.write(src.read())
        os.makedirs(os.path.join(t, "www", "big"))
        with open(os.path.join(t, "www", "big", "body"), "wb") as f:
            f.write(os.urandom(BULK_MIB << 20))
        self.shim = os.path.join(t, "noresume.so")
        src = stack.write("noresume.c", NO_RESUME_C)
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", self.shim, src, "-ldl"], check=True)
        self.backend = e2e.free_port()
        stack.start(["nginx", "-p", t, "-g", "daemon off;", "-c",
                     stack.write("tls-http.conf", NGINX_HTTP.format(port=self.backend, tmp=t))],
                    e2e.CPU_LOAD)
        e2e.wait_port(self.backend)


def start_peer(stack: e2e.Stack, tls: Tls, name: str) -> tuple[subprocess.Popen, int, int | None]:
    """The peer, listening: (process, port, its metrics port when it is a fastlb)."""
    port, mport = e2e.free_port(), None
    fmt = dict(port=port, backend=tls.backend, crt=tls.crt, key=tls.key, pem=tls.pem)
    if name == "haproxy":
        cmd = ["haproxy", "-db", "-f", stack.write("haproxy-tls.cfg", HAPROXY.format(**fmt))]
    elif name in ("fastlb", "fastlb-base"):
        mport = e2e.free_port()
        py = e2e.BASELINE_PYTHON if name == "fastlb-base" else sys.executable
        assert py is not None
        # -P: the baseline interpreter's own fastlb, never the checkout we stand in
        cmd = [py, "-P", "-m", "fastlb", "run", "-c",
               stack.write(f"{name}-tls.toml", FASTLB.format(mport=mport, **fmt))]
        if name == "fastlb":
            cmd.remove("-P")
    elif name == "naive-ssl":
        cmd = [sys.executable, os.path.join(HERE, "peers", "naive_ssl.py"), str(port),
               "127.0.0.1", str(tls.backend), tls.crt, tls.key]
    else:
        raise RuntimeError(f"no TLS peer {name!r} (TLS peers: {', '.join(PEERS)}, fastlb-base)")
    p = stack.start(cmd, e2e.CPU_LB)
    e2e.wait_port(port)
    return p, port, mport


_SIZE = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def run_wrk(tls: Tls, port: int, load: str, duration: float, conns: int) -> dict:
    close, bulk = load == "tls_close", load == "tls_bulk"
    cmd = ["taskset", "-c", e2e.CPU_LOAD, "wrk", "-t1", f"-c{BULK_CONNS if bulk else conns}",
           f"-d{duration:g}s", "--latency"]
    if close:
        cmd += ["-H", "Connection: close"]
    cmd.append(f"https://127.0.0.1:{port}/" + ("big/body" if bulk else ""))
    env = dict(os.environ, LD_PRELOAD=tls.shim) if close else None
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30, env=env).stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise RuntimeError(f"wrk reported no rate: {out.strip()[-200:]!r}")
    value = float(found.group(1))
    if bulk:
        rate = re.search(r"Transfer/sec:\s+([\d.]+)(B|KB|MB|GB|TB)", out)
        if rate is None:
            raise RuntimeError(f"wrk reported no transfer rate: {out.strip()[-200:]!r}")
        value = float(rate.group(1)) * _SIZE[rate.group(2)] * 8 / 1e9
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"value": value, "p99_ms": e2e._ms(*p99.groups()) if p99 and not bulk else None,
            "errors": (sum(map(int, errors.groups())) if errors else 0)
                      + (int(non2xx.group(1)) if non2xx else 0)}


def fastlb_counts(mport: int) -> dict[str, float]:
    """fastlb's TLS counters from its /metrics (handshakes, resumptions)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r"^fastlb_(tls_handshakes_total|tls_resumptions_total)\S*\s+(\S+)$", text, re.M)}


def measure(stack: e2e.Stack, tls: Tls, peer: str, load: str, duration: float, conns: int) -> dict:
    proc, port, mport = start_peer(stack, tls, peer)
    try:
        run_wrk(tls, port, load, 1, conns)                       # warm-up
        cpu0, t0 = e2e.tree_cpu_seconds(proc.pid), time.monotonic()
        res = run_wrk(tls, port, load, duration, conns)
        wall = time.monotonic() - t0
        res["cpu_pct"] = 100 * (e2e.tree_cpu_seconds(proc.pid) - cpu0) / wall
        if mport is not None and load == "tls_close":
            time.sleep(1.1)                                      # workers report once a second
            try:
                c = fastlb_counts(mport)
                res["resumed"] = c.get("tls_resumptions_total", 0.0)
                res["handshakes"] = c.get("tls_handshakes_total", 0.0)
            except OSError:
                pass
        return res
    finally:
        stack.stop(proc)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run(a, loads: list[str]) -> int:
    """The TLS loads for bench/e2e.py's arguments ``a`` (runs, duration, connections, only,
    baseline); prints each sample and then the markdown table."""
    for tool in ("haproxy", "nginx", "wrk", "taskset", "openssl", "cc"):
        if not shutil.which(tool):
            sys.exit(f"missing {tool}: apt-get install haproxy nginx wrk openssl gcc")
    only = [p for p in a.only.split(",") if p in PEERS]
    peers = only if a.only != ",".join(e2e.PEERS) and only else list(PEERS)
    if a.baseline:
        e2e.BASELINE_PYTHON = a.baseline
        peers.insert(peers.index("fastlb") if "fastlb" in peers else len(peers), "fastlb-base")
    load_before = uptime()
    stack = e2e.Stack()
    samples: dict[tuple[str, str], list[dict]] = {}
    try:
        tls = Tls(stack)
        for run_no in range(a.runs):
            for load in loads:
                for peer in peers:
                    try:
                        r = measure(stack, tls, peer, load, a.duration, a.connections)
                    except RuntimeError as exc:
                        print(f"run {run_no + 1}/{a.runs} {load:<13} {peer:<11} FAILED: {exc}", flush=True)
                        continue
                    r["run"] = run_no
                    samples.setdefault((load, peer), []).append(r)
                    print(f"run {run_no + 1}/{a.runs} {load:<13} {peer:<11} {r['value']:>10.2f}"
                          + (f"  p99 {r['p99_ms']:.2f} ms" if r["p99_ms"] is not None else "")
                          + f"  cpu {r['cpu_pct']:.0f}%  per core {r['value'] * 100 / r['cpu_pct']:,.1f}"
                          + (f"  errors {r['errors']}" if r["errors"] else "")
                          + (f"  (fastlb: {r['handshakes']:.0f} handshakes, {r['resumed']:.0f} resumed)"
                             if "resumed" in r else ""), flush=True)
    finally:
        stack.close()
    print(table(samples, peers, loads, a, load_before, uptime()))
    path = os.path.join(os.path.dirname(a.json), "e2e_tls.json")   # beside e2e.py's JSON
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"runs": a.runs, "duration": a.duration, "uptime": [load_before, uptime()],
                   "samples": {f"{load}/{p}": v for (load, p), v in samples.items()}}, f, indent=1)
    print(f"\nJSON: {path}")
    return 0


def paired(samples: dict, load: str, peer: str, key) -> float | None:
    """The median over runs of key(peer's sample) / key(HAProxy's sample of the same run):
    machine noise that moves between runs hits both sides of each ratio alike."""
    base = {r["run"]: r for r in samples.get((load, "haproxy"), [])}
    ratios = [key(r) / key(base[r["run"]]) for r in samples.get((load, peer), []) if r["run"] in base]
    return statistics.median(ratios) if ratios else None


def table(samples: dict, peers: list[str], loads: list[str], a, before: str, after: str) -> str:
    def fmt(load: str, v: float) -> str:
        return f"{v:.2f}" if UNITS[load] == "Gbit/s" else f"{v:,.0f}"

    def value(r: dict) -> float:
        return r["value"]

    def core(r: dict) -> float:
        return r["value"] * 100 / r["cpu_pct"]

    lines = [f"\nTLS, medians of {a.runs} runs x {a.duration:g} s; (ratio) = the median over runs "
             f"of figure / HAProxy's figure in the same run", f"command: {' '.join(sys.argv)}",
             f"uptime before: {before}", f"uptime after:  {after}", "",
             "| load | " + " | ".join(peers) + " |", "|---" * (len(peers) + 1) + "|"]
    for load in loads:
        cells, cores = [], []
        for peer in peers:
            rs = samples.get((load, peer), [])
            if not rs:
                cells.append("failed")
                cores.append("-")
                continue
            cell = fmt(load, statistics.median(map(value, rs)))
            per_core = fmt(load, statistics.median(map(core, rs)))
            ratio, core_ratio = paired(samples, load, peer, value), paired(samples, load, peer, core)
            if peer != "haproxy" and ratio is not None and core_ratio is not None:
                cell += f" ({ratio:.2f}x)"
                per_core = f"**{per_core} ({core_ratio:.2f}x)**"
            if rs[0]["p99_ms"] is not None:
                cell += f", p99 {statistics.median(r['p99_ms'] for r in rs):.2f} ms"
            cell += f", cpu {statistics.median(r['cpu_pct'] for r in rs):.0f}%"
            cells.append(cell)
            cores.append(per_core)
        lines.append(f"| {load} ({UNITS[load]}) | " + " | ".join(cells) + " |")
        lines.append(f"| {load}, per proxy core | " + " | ".join(cores) + " |")
    return "\n".join(lines)
