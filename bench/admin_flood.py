"""The data path while the TCP admin is flooded (issue 11, "a hardened admin").

fastlb with workers = 1 (the admin shares the data path's process) and a TCP admin; a client
makes 64-byte round trips through the proxy to an echo backend for --seconds without an attack,
then as long again while attackers flood the admin: one thread pipelines wrong-token requests
on a connection (opening a new one whenever the server closes it), others open connections and
guess. Prints the round-trip median and 99th percentile, and the log lines fastlb wrote, per
phase. Run it against two checkouts (PYTHONPATH=/path/to/checkout) to compare.

    python3 bench/admin_flood.py --seconds 6
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time

import msgpack
from _probe import round_trips, start, wait_for

TOKEN = "bench-" + "b" * 40


def flood(aport: int, stop: threading.Event, source: str) -> None:
    batch = b"".join(msgpack.packb({"id": i, "op": "ping", "token": f"guess{i}"}) for i in range(500))
    while not stop.is_set():
        try:
            s = socket.socket()
            s.bind((source, 0))
            s.connect(("127.0.0.1", aport))
            s.setblocking(False)
            while not stop.is_set():
                try:
                    s.send(batch)
                except BlockingIOError:
                    time.sleep(0.001)
                try:
                    if s.recv(1 << 20) == b"":
                        break
                except BlockingIOError:
                    pass
            s.close()
        except OSError:
            time.sleep(0.001)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--attackers", type=int, default=3)
    a = ap.parse_args()
    env = dict(os.environ)
    tmp = tempfile.mkdtemp(prefix="admin-flood-")
    token = os.path.join(tmp, "token")
    with open(token, "w") as f:
        f.write(TOKEN)
    os.chmod(token, 0o600)
    backend, blines = start([sys.executable, "-m", "fastlb.devservers", "echo", "--port", "0"], env)
    bport = int(wait_for(blines, r"READY (\d+)").group(1))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        aport = s.getsockname()[1]
    cfg = os.path.join(tmp, "fastlb.toml")
    with open(cfg, "w") as f:
        f.write(f'[global]\nworkers = 1\nadmin = "tcp:127.0.0.1:{aport}"\n'
                f'admin_token_file = "{token}"\n[[service]]\nname = "web"\n'
                f'listen = ["127.0.0.1:0"]\nbackends = [ {{ address = "127.0.0.1:{bport}" }} ]\n')
    lb, lines = start([sys.executable, "-m", "fastlb", "run", "-c", cfg], env)
    try:
        wait_for(lines, "fastlb ready")
        port = int(wait_for(lines, r"listening on \S+:(\d+)").group(1))
        import fastlb
        print(f"fastlb from {os.path.dirname(fastlb.__file__)}, workers = 1, {a.seconds:g} s per phase")
        for phase in ("quiet", "admin flooded"):
            stop = threading.Event()
            threads = [threading.Thread(target=flood, args=(aport, stop, f"127.0.0.{2 + i}"),
                                        daemon=True)
                       for i in range(a.attackers if phase != "quiet" else 0)]
            for t in threads:
                t.start()
            before = len(lines)
            rtt = round_trips(port, a.seconds)
            stop.set()
            for t in threads:
                t.join(10)
            time.sleep(0.5)
            q = statistics.quantiles(rtt, n=100)
            print(f"{phase:>14}: {len(rtt):6d} round trips, median {statistics.median(rtt) * 1e3:.3f} ms, "
                  f"p99 {q[98] * 1e3:.3f} ms, max {max(rtt) * 1e3:.1f} ms; "
                  f"{len(lines) - before} log lines")
    finally:
        lb.kill()
        backend.kill()
        lb.wait()
        backend.wait()


if __name__ == "__main__":
    main()
