"""Several worker processes: shared health and counters, restarts, zero-drop reloads, metrics."""
import asyncio
import collections
import os
import signal
import socket
import threading
import time

from prometheus_client.parser import text_string_to_metric_families

from fastlb.admin.client import AdminClient
from helpers import PY, Proc, free_port, service, start_backend, start_fastlb


def head(tmp_path, workers=2, metrics=None):
    g = f'[global]\nworkers = {workers}\nadmin = "unix:{tmp_path}/admin.sock"\ngrace = "5s"\n'
    if metrics:
        g += f'metrics = "127.0.0.1:{metrics}"\n'
    return g


def admin(tmp_path):
    return AdminClient(socket_path=f"{tmp_path}/admin.sock", timeout=30)


async def _burst(port, n, payload=b""):
    async def one():
        r, w = await asyncio.open_connection("127.0.0.1", port)
        name = (await r.readline()).decode().strip()
        if payload:
            w.write(payload)
            await w.drain()
            await r.readexactly(len(payload))
        w.close()
        return name
    return await asyncio.gather(*(one() for _ in range(n)))


def test_two_workers_serve_and_counters_sum_exactly(procs, tmp_path):
    ports = [start_backend(procs, "announce", name=n)[1] for n in "ab"]
    lb, (port,) = start_fastlb(procs, head(tmp_path) + service("web", [(p, 1) for p in ports]))
    names = asyncio.run(_burst(port, 400, b"x" * 1000))
    seen = collections.Counter(names)
    assert abs(seen["a"] - 200) <= 2 and seen["a"] + seen["b"] == 400   # each worker rotates a, b
    time.sleep(0.3)
    with admin(tmp_path) as c:
        workers = c.call("workers")
        assert len(workers) == 2 and len({w["pid"] for w in workers}) == 2
        assert all(w["connections"] > 0 for w in workers), workers      # both served
        assert sum(w["connections"] for w in workers) == 400
        (web,) = c.call("stats")
        for name, b in zip("ab", web["backends"], strict=False):                     # summed over both blocks
            n = seen[name]
            assert (b["total"], b["active"], b["bytes_in"], b["bytes_out"]) == (n, 0, n * 1000, n * 1002)


def test_health_changes_reach_every_worker(procs, tmp_path):
    backs = {n: start_backend(procs, "announce", name=n) for n in "abc"}
    body = service("web", [(p, 1) for _, p in backs.values()],
                   health='{ interval = "100ms", timeout = "80ms", rise = 1, fall = 1, jitter = 0 }')
    lb, (port,) = start_fastlb(procs, head(tmp_path) + body)
    backs["c"][0].signal(signal.SIGKILL)
    backs["c"][0].wait()
    lb.wait_line("DOWN: 1 check failed")
    time.sleep(0.1)                                                     # one check interval
    names = asyncio.run(_burst(port, 300))
    assert "c" not in names and len(names) == 300
    with admin(tmp_path) as c:
        assert all(w["connections"] > 0 for w in c.call("workers"))
        (web,) = c.call("stats")
        assert sum(b["connect_failures"] for b in web["backends"]) == 0   # nobody tried c


class Load:
    """Steady new connections from a thread; counts every failure."""

    def __init__(self, port, payload=b"ping"):
        self.port, self.payload = port, payload
        self.ok = 0
        self.failed: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run) for _ in range(4)]
        for t in self.threads:
            t.start()

    def run(self):
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                    assert s.recv(2)
                    s.sendall(self.payload)
                    assert s.recv(10) == self.payload
                self.ok += 1
            except Exception as exc:                                    # noqa: BLE001
                self.failed.append(repr(exc))

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(30)


def test_sigkill_a_worker_under_load(procs, tmp_path):
    ports = [start_backend(procs, "announce", name=n)[1] for n in "ab"]
    lb, (port,) = start_fastlb(procs, head(tmp_path) + service("web", [(p, 1) for p in ports]))
    load = Load(port)
    time.sleep(0.5)
    with admin(tmp_path) as c:
        victim = c.call("workers")[0]
        os.kill(victim["pid"], signal.SIGKILL)
        lb.wait_line(rf"worker {victim['index']} \(pid {victim['pid']}\) died")
        before = load.ok
        time.sleep(1.0)
        assert load.ok > before + 50                                    # still serving
        failed_at_kill = len(load.failed)
        time.sleep(0.5)
        load.finish()
        assert len(load.failed) == failed_at_kill <= 4                  # only what the victim held
        workers = c.call("workers")
        assert len(workers) == 2 and victim["pid"] not in {w["pid"] for w in workers}
        time.sleep(0.2)
        (web,) = c.call("stats")
        assert sum(b["active"] for b in web["backends"]) == 0           # nothing stuck


def test_ten_reloads_under_load_drop_no_connection(procs, tmp_path):
    ports = {n: start_backend(procs, "announce", name=n)[1] for n in "abc"}
    path = tmp_path / "fastlb.toml"
    lport = free_port()

    def write(workers, names, weight):
        bs = [(ports[n], weight if n == "a" else 1) for n in names]
        path.write_text(head(tmp_path, workers) + service("web", bs, listen=f"127.0.0.1:{lport}"))

    write(2, "ab", 1)
    lb = Proc([PY, "-m", "fastlb", "run", "-c", str(path)], procs)
    lb.wait_line("fastlb ready")
    load = Load(lport)
    time.sleep(0.3)
    steps = [(3, "ab", 2), (3, "abc", 2), (2, "abc", 1), (2, "bc", 1), (3, "abc", 3),
             (2, "ab", 1), (3, "abc", 1), (2, "abc", 2), (3, "ac", 1), (2, "abc", 1)]
    with admin(tmp_path) as c:
        for i, (workers, names, weight) in enumerate(steps):
            write(workers, names, weight)
            if i % 3 == 2:
                c.call("reload")
                c.call("restart_workers")                               # and replace them all
            else:
                lb.signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while lb.output.count("reloaded") < i + 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.3)
        load.finish()
        assert load.failed == [] and load.ok > 200
        assert len([w for w in c.call("workers") if not w["stopping"]]) == 2
    assert lb.output.count("reloaded") == 10


def test_metrics_parse_and_match_a_known_workload(procs, tmp_path):
    mport = free_port()
    ports = [start_backend(procs, "announce", name=n)[1] for n in "ab"]
    lb, (port,) = start_fastlb(procs, head(tmp_path, metrics=mport) + service("web", [(p, 3) for p in ports]))
    seen = collections.Counter(asyncio.run(_burst(port, 100, b"y" * 500)))
    time.sleep(0.3)
    with socket.create_connection(("127.0.0.1", mport), timeout=5) as s:
        # HTTP/1.1 keeps the connection alive unless asked: ask, then read to EOF
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = b""
        while data := s.recv(65536):
            raw += data
    head_, body = raw.split(b"\r\n\r\n", 1)
    assert head_.startswith(b"HTTP/1.1 200") and b"text/plain; version=0.0.4" in head_
    samples = {}
    for fam in text_string_to_metric_families(body.decode()):
        for smp in fam.samples:
            samples[(smp.name, smp.labels.get("server"), smp.labels.get("state"))] = smp.value
    for name, p in zip("ab", ports, strict=False):       # HAProxy's names, summed over both workers' blocks
        b, n = f"127.0.0.1:{p}", seen[name]
        assert samples[("fastlb_server_sessions_total", b, None)] == n
        assert samples[("fastlb_server_bytes_in_total", b, None)] == n * 500
        assert samples[("fastlb_server_bytes_out_total", b, None)] == n * 502
        assert samples[("fastlb_server_current_sessions", b, None)] == 0
        assert samples[("fastlb_server_status", b, "UP")] == 1
        assert samples[("fastlb_server_status", b, "DOWN")] == 0
        assert samples[("fastlb_server_weight", b, None)] == 3
        assert samples[("fastlb_server_connection_errors_total", b, None)] == 0
    assert samples[("fastlb_backend_sessions_total", None, None)] == 100
    assert samples[("fastlb_backend_active_servers", None, None)] == 2
    with socket.create_connection(("127.0.0.1", mport), timeout=5) as s:
        s.sendall(b"GET /nope HTTP/1.1\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 404")
