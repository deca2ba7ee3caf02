"""Proxy memory per idle connection: fastlb beside HAProxy and nginx stream, in one run.

    python3 bench/idle_rss.py [--conns 1000] [--runs 3] [--sizes 4096,262144]
                              [--only fastlb,haproxy,nginx] [--baseline PYTHON] [--json out.json]

Needs: apt-get install haproxy nginx libnginx-mod-stream (the configs are bench/e2e.py's:
HAProxy mode tcp nbthread 1 maxconn 9000, nginx stream with proxy_half_close on, one worker;
fastlb workers = 1). For each proxy and each exchange size, a fresh proxy is started pinned to
CPU 0 (taskset), a single-threaded echo backend and the clients run on CPU 1. After one warm-up
exchange and a pause, the proxy's RSS (VmRSS of the process and its children, /proc) is read;
then --conns connections are opened and each exchanges SIZE bytes both ways with the echo
backend (16 at a time), and all are left open and idle. "stuckSIZE": --stuck-conns connections
send SIZE at once and read only 2 s later through a 4 KiB receive buffer, so the proxy holds
the bytes in flight in its own buffers (issue 11's stuck connections); what its buffer pool
keeps after they drained shows (the peak RSS is reported too). After a pause of --settle seconds
(fastlb's sweep gives unused pooled buffers back once a second) the RSS is read again:
(after - before) / conns is the figure, in KiB per idle connection; medians over --runs runs.
With --baseline PYTHON, the fastlb that interpreter imports runs too ("fastlb-base"), for a
before/after table in one run. Every process is stopped by PID; all traffic is on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import e2e  # noqa: E402  (bench/e2e.py: the peers' configs, Stack, free_port, taskset)

PEERS = ["haproxy", "nginx", "fastlb"]


def echo_server(port: int) -> None:
    """A single-threaded echo backend for thousands of connections (selectors)."""
    sel = selectors.DefaultSelector()
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen(4096)
    lsock.setblocking(False)
    sel.register(lsock, selectors.EVENT_READ)
    pending: dict[socket.socket, bytearray] = {}
    while True:
        for key, events in sel.select():
            s = key.fileobj
            if s is lsock:
                try:
                    c, _ = lsock.accept()
                except BlockingIOError:
                    continue
                c.setblocking(False)
                pending[c] = bytearray()
                sel.register(c, selectors.EVENT_READ)
                continue
            assert isinstance(s, socket.socket)
            buf = pending[s]
            if events & selectors.EVENT_READ and not buf:
                try:
                    data = s.recv(262144)
                except (BlockingIOError, InterruptedError):
                    data = None
                except OSError:
                    data = b""
                if data == b"":
                    sel.unregister(s)
                    del pending[s]
                    s.close()
                    continue
                if data:
                    buf += data
            if buf:
                try:
                    n = s.send(buf)
                    del buf[:n]
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    sel.unregister(s)
                    del pending[s]
                    s.close()
                    continue
            sel.modify(s, selectors.EVENT_WRITE if buf else selectors.EVENT_READ)


def tree_rss_kib(pid: int) -> int:
    """VmRSS of pid and all its descendants, KiB."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
        todo.extend(children.get(p, []))
    return total


def exchange(sock: socket.socket, blob: bytes) -> None:
    sock.setblocking(True)
    sock.settimeout(60)
    sent = 0
    got = 0
    view = memoryview(blob)
    while got < len(blob):             # interleave, so neither side's buffers must hold it all
        if sent < len(blob):
            sent += sock.send(view[sent:sent + 65536])
        data = sock.recv(262144)
        if not data:
            raise RuntimeError("closed during the exchange")
        got += len(data)


def stuck(socks: list[socket.socket], blob: bytes, rss: Callable[[], int]) -> int:
    """Every connection sends ``blob`` at once and starts reading only 2 s later, through a
    4 KiB receive buffer: once the kernel's socket buffers are full the proxy holds the bytes
    in flight in its own buffers (the "stuck connections" of issue 11), then all drain."""
    import threading
    for s in socks:
        s.settimeout(120)                 # before any thread uses it
    senders = [threading.Thread(target=s.sendall, args=(blob,)) for s in socks]
    for t in senders:
        t.start()
    time.sleep(2.0)
    peak = rss()
    readers = [threading.Thread(target=_read, args=(s, len(blob))) for s in socks]
    for t in readers:
        t.start()
    for t in senders + readers:
        t.join()
    return peak


def _read(sock: socket.socket, n: int) -> None:
    while n > 0:
        data = sock.recv(min(n, 262144))
        if not data:
            raise RuntimeError("closed during the exchange")
        n -= len(data)


def connect(port: int, small_rcvbuf: bool) -> socket.socket:
    s = socket.socket()
    if small_rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    return s


def measure(stack: e2e.Stack, peer: str, backend: int, size: int, conns: int, settle: float,
            pattern: str = "interleaved") -> dict:
    p, port = e2e.start_peer(stack, peer, backend)
    assert p is not None
    try:
        blob = os.urandom(size)
        peak = 0
        with socket.create_connection(("127.0.0.1", port), timeout=10) as warm:
            exchange(warm, blob)
        time.sleep(settle)
        before = tree_rss_kib(p.pid)
        socks = [connect(port, pattern == "stuck") for _ in range(conns)]
        try:
            if pattern == "stuck":
                peak = stuck(socks, blob, lambda: tree_rss_kib(p.pid))
            else:
                with ThreadPoolExecutor(16) as pool:
                    list(pool.map(lambda s: exchange(s, blob), socks))
            time.sleep(settle)
            after = tree_rss_kib(p.pid)
        finally:
            for s in socks:
                s.close()
        return {"before_kib": before, "after_kib": after, "stuck_kib": peak,
                "per_conn_kib": round((after - before) / conns, 2)}
    finally:
        stack.stop(p)


def label(size: str) -> str:
    n = int(size.removeprefix("stuck")) // 1024
    return f"{n // 1024} MiB stuck" if size.startswith("stuck") else f"{n} KiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", default="4096,262144,stuck16777216",
                    help="bytes each way per connection; stuckN: --stuck-conns connections send "
                         "N at once and read 2 s later through a 4 KiB receive buffer")
    ap.add_argument("--stuck-conns", type=int, default=100)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--only", default=",".join(PEERS))
    ap.add_argument("--baseline", metavar="PYTHON")
    ap.add_argument("--json")
    ap.add_argument("--echo-server", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.echo_server:
        echo_server(a.echo_server)
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))      # the children inherit it
    os.sched_setaffinity(0, {int(e2e.CPU_LOAD)})                  # clients on the load CPU
    peers = a.only.split(",")
    if a.baseline:
        e2e.BASELINE_PYTHON = a.baseline
        peers.insert(peers.index("fastlb") if "fastlb" in peers else len(peers), "fastlb-base")
    sizes = a.sizes.split(",")
    results: dict[str, dict[str, list[dict]]] = {p: {s: [] for s in sizes} for p in peers}
    stack = e2e.Stack()
    try:
        bport = e2e.free_port()
        stack.start([sys.executable, os.path.abspath(__file__), "--echo-server", str(bport)],
                    e2e.CPU_LOAD)
        e2e.wait_port(bport)
        for run in range(a.runs):
            for size in sizes:
                for peer in peers:                      # interleaved: noise hits all alike
                    is_stuck = size.startswith("stuck")
                    r = measure(stack, peer, bport, int(size.removeprefix("stuck")),
                                a.stuck_conns if is_stuck else a.conns, a.settle,
                                "stuck" if is_stuck else "interleaved")
                    results[peer][size].append(r)
                    print(f"run {run + 1}/{a.runs} {label(size):<16} {peer:<12} "
                          f"{r['per_conn_kib']:>8.2f} KiB/conn  (RSS {r['before_kib']} -> "
                          f"{r['after_kib']} KiB" + (f", {r['stuck_kib']} KiB while stuck"
                                                      if is_stuck else "") + ")", flush=True)
    finally:
        stack.close()
    print(f"\nKiB of proxy RSS per idle connection, {a.conns} connections ({a.stuck_conns} for "
          f"stuck), median of {a.runs}:\n")
    print("| proxy | " + " | ".join(f"after {label(s)}" for s in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for peer in peers:
        cells = []
        for s in sizes:
            rs = results[peer][s]
            cell = f"{statistics.median(r['per_conn_kib'] for r in rs):.1f}"
            if s.startswith("stuck"):          # and the RSS while they were stuck, MiB
                cell += f" (stuck: {statistics.median(r['stuck_kib'] for r in rs) / 1024:.0f} MiB)"
            cells.append(cell)
        print(f"| {peer} | " + " | ".join(cells) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"conns": a.conns, "runs": a.runs, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
