"""Connection limits, queues and fd exhaustion through `fastlb run` (issue 11, part `limits`).

Every test runs the real balancer on loopback; the backend is a thread server that counts the
connections it holds at once, so a limit is checked where it matters: at the backend.
"""
from __future__ import annotations

import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time

import pytest

from fastlb import spawn
from helpers import PY, Proc, ThreadedServer, admin_client, start_fastlb

HZ = os.sysconf("SC_CLK_TCK")
# A fault check, not a speed test: a paused listener costs about 1% of a core here; the old
# spinning engine took all the CPU it could get (36-43% of a core on this 2-core machine
# shared with other builds, 94-100% on an idle one).
IDLE_CPU = 0.15


class CountingBackend(ThreadedServer):
    """Accepts, sends "NAME <n>\\n" (n: its accept order), then echoes until EOF; counts the
    connections it holds now and the most it held at once."""

    def __init__(self, name: str = "b") -> None:
        self.name = name
        self.lock = threading.Lock()
        self.cur = self.max = self.accepted = 0
        super().__init__(backlog=1024)

    def accepted_one(self, c: socket.socket) -> tuple:
        with self.lock:
            self.accepted += 1
            self.cur += 1
            self.max = max(self.max, self.cur)
            return (self.accepted,)

    def serve(self, c: socket.socket, n: int) -> None:
        try:
            c.sendall(f"{self.name} {n}\n".encode())
            while data := c.recv(65536):
                c.sendall(data)
        except OSError:
            pass
        finally:
            with self.lock:
                self.cur -= 1
            c.close()

    def close(self) -> None:
        self.sock.close()
        with self.lock:
            for c in self.conns:
                try:
                    c.close()
                except OSError:
                    pass


@pytest.fixture
def backend():
    b = CountingBackend()
    yield b
    b.close()


def wait_for(cond, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def clients(port: int, n: int) -> list[socket.socket]:
    """``n`` connections to ``port``, opened without waiting for the balancer to accept."""
    out = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        out.append(s)
    return out


def greeting(s: socket.socket, timeout: float) -> str | None:
    """The backend's first line on ``s`` within ``timeout``; None if none (or closed)."""
    s.settimeout(timeout)
    try:
        data = s.recv(100)
    except (TimeoutError, socket.timeout, BlockingIOError):
        return None
    except OSError:
        return ""
    return data.decode()


def read_until(s: socket.socket, end: bytes, timeout: float) -> bytes:
    """Bytes from ``s`` up to and including ``end`` (read one at a time)."""
    s.settimeout(timeout)
    out = b""
    while not out.endswith(end):
        byte = s.recv(1)
        if not byte:
            break
        out += byte
    return out


def closed_by_peer(s: socket.socket, timeout: float) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True
    except (TimeoutError, socket.timeout):
        return False


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])          # utime + stime, in ticks
    return total / HZ


def busiest_cpu(pids: list[int], seconds: float = 2.0) -> float:
    out = _busiest_cpu(pids, seconds)
    print(f"busiest CPU share over {seconds}s: {out:.3f}")
    return out


def _busiest_cpu(pids: list[int], seconds: float = 2.0) -> float:
    """The CPU share (of one core) of the busiest of ``pids`` over ``seconds``."""
    before = [cpu_seconds([p]) for p in pids]
    time.sleep(seconds)
    after = [cpu_seconds([p]) for p in pids]
    return max(a - b for a, b in zip(after, before, strict=True)) / seconds


def config(tmp_path, services: str, **glob) -> str:
    lines = ["[global]", f'admin = "unix:{tmp_path}/admin.sock"']
    lines += [f"{k} = {v}" for k, v in glob.items()]
    return "\n".join(lines) + "\n\n" + services


def svc(name: str, ports: list[int], extra: str = "", backend_extra: str = "") -> str:
    bs = ", ".join(f'{{ address = "127.0.0.1:{p}"{backend_extra} }}' for p in ports)
    return (f'[[service]]\nname = "{name}"\nlisten = "127.0.0.1:0"\n{extra}\n'
            f"backends = [ {bs} ]\n")


CHECKED = ('health = { interval = "200ms", timeout = "150ms", rise = 1, fall = 2, '
           'fall_passive = 1 }')


def run_limited(procs, tmp_path, text: str, nofile: int) -> tuple[Proc, list[int]]:
    """`fastlb run` under RLIMIT_NOFILE ``nofile`` (soft and hard), as a systemd unit's
    LimitNOFILE= or `ulimit -n` would start it."""
    path = tmp_path / "fastlb.toml"
    path.write_text(text)
    setlimit = ("import os, resource, sys; "
                f"resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile})); "
                "os.execv(sys.executable, sys.argv[1:])")
    args = [PY, "-c", setlimit, *spawn.command("fastlb", "run", "-c", str(path))]
    p = Proc(args, procs, env={"PYTHONPATH": spawn.environment().get("PYTHONPATH", "")})
    p.wait_line(r"fastlb ready")
    return p, [int(m) for m in re.findall(r"listening on \S+:(\d+)", p.output)]


def stats_of(tmp_path) -> list[dict]:
    with admin_client(tmp_path) as c:
        return c.call("stats")


# -- the fd-limit fault ----------------------------------------------------------------------
def test_fd_limit_64_with_200_clients_stays_idle_blames_nobody_and_recovers(procs, tmp_path, backend):
    """Under RLIMIT_NOFILE 64 the default maxconn fits the fd limit: with 200 clients fastlb
    holds that many sessions, the rest wait in the kernel's backlog with the listener out of
    the epoll set. (Old code: the level-triggered listener spun at 100% CPU on EMFILE, and
    socket() failing for the backend side marked healthy backends DOWN.)"""
    p, (port,) = run_limited(procs, tmp_path, config(tmp_path, svc("web", [backend.port], CHECKED)),
                             nofile=64)
    cs = clients(port, 200)
    try:
        wait_for(lambda: backend.cur >= 1, what="first sessions")
        time.sleep(0.5)
        cpu = busiest_cpu([p.pid])
        held = backend.cur
        (web,) = stats_of(tmp_path)
        assert web["backends"][0]["health"] == "up"
        assert web["backends"][0]["connect_failures"] == 0
        assert "DOWN" not in p.output
        assert cpu < IDLE_CPU
        limit = web["global"]["limit"]
        assert 1 <= held <= limit < 32                   # (64 - reserve) // 2
        assert web["global"]["cur"] == held
        assert web["global"]["maxconn_reached"] >= 1
    finally:
        for s in cs:
            s.close()
    wait_for(lambda: backend.cur == 0, what="the sessions to end")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:     # served again
        assert greeting(s, 5).startswith("b ")
    (web,) = stats_of(tmp_path)
    assert web["backends"][0]["health"] == "up" and web["backends"][0]["connect_failures"] == 0
    assert "Traceback" not in p.output


def _workers_of(tmp_path) -> list[int]:
    with admin_client(tmp_path) as c:
        return [w["pid"] for w in c.call("workers")]


@pytest.mark.parametrize("workers", [1, 2])
def test_fd_exhaustion_pauses_the_listener_and_blames_no_backend(procs, tmp_path, backend, workers):
    """The fd limit lowered under a running fastlb, below what its maxconn needs. With no fd
    left, accept4 fails with EMFILE: the listener is paused and retried every 100 ms (old code:
    the level-triggered listener spun at 100% CPU). With one fd left, accept4 succeeds and the
    backend's socket() fails: a local error, the client is closed and counted, one log line
    (from the worker too: workers log to fastlb's stderr), and the backend is neither failed
    nor marked DOWN (old code: a connect failure, then DOWN "too many open files"). Once fds
    are back, new clients are served."""
    passive = 'health = { interval = "60s", fall_passive = 1 }'      # checks out of the way
    p, (port,) = start_fastlb(procs, config(tmp_path, svc("web", [backend.port], passive),
                                            workers=workers))
    pids = [p.pid] if workers == 1 else _workers_of(tmp_path)
    limits = {pid: resource.prlimit(pid, resource.RLIMIT_NOFILE) for pid in pids}
    nfds = {pid: len(os.listdir(f"/proc/{pid}/fd")) for pid in pids}
    cs = []
    try:
        for pid in pids:                                 # not one fd left
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (nfds[pid], limits[pid][1]))
        cs += clients(port, 50)
        time.sleep(0.5)
        assert busiest_cpu(pids) < IDLE_CPU
        for pid in pids:                                 # one fd: accept4 works, socket() not
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (nfds[pid] + 1, limits[pid][1]))
        cs += clients(port, 50)
        p.wait_line(r"local error on connect: Too many open files", timeout=10)
        time.sleep(0.5)
        assert busiest_cpu(pids) < IDLE_CPU
    finally:
        for pid, lim in limits.items():
            resource.prlimit(pid, resource.RLIMIT_NOFILE, lim)
    try:
        (web,) = stats_of(tmp_path)
        assert web["backends"][0]["health"] == "up"
        assert web["backends"][0]["connect_failures"] == 0
        assert "DOWN" not in p.output
        assert web["limits"]["local_errors"] >= 1 and web["global"]["local_errors"] >= 1
    finally:
        for s in cs:
            s.close()
    wait_for(lambda: backend.cur == 0, what="the sessions to end")
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            assert greeting(s, 5).startswith("b ")
    assert "DOWN" not in p.output


# -- maxconn ---------------------------------------------------------------------------------
def test_global_maxconn_holds_across_two_workers(procs, tmp_path, backend):
    p, (port,) = start_fastlb(procs, config(tmp_path, svc("web", [backend.port]), workers=2,
                                            maxconn=5))
    cs = clients(port, 20)
    try:
        wait_for(lambda: backend.cur == 5, what="5 sessions")
        time.sleep(0.5)
        assert backend.cur == 5 and backend.max == 5
        served = [s for s in cs if greeting(s, 0.2)]
        assert len(served) == 5
        for s in served[:3]:                             # 3 leave: 3 more are admitted
            s.close()
        wait_for(lambda: backend.accepted == 8, what="3 more sessions")
        time.sleep(0.3)
        assert backend.max == 5
        (web,) = stats_of(tmp_path)
        assert web["global"]["limit"] == 5 and web["global"]["cur"] == 5
        assert web["global"]["max"] == 5 and web["global"]["maxconn_reached"] >= 1
    finally:
        for s in cs:
            s.close()


def test_service_maxconn_holds_across_two_workers_and_spares_other_services(procs, tmp_path,
                                                                              backend):
    other = CountingBackend("o")
    try:
        text = config(tmp_path, svc("web", [backend.port], "maxconn = 3")
                      + svc("api", [other.port]), workers=2)
        p, _ = start_fastlb(procs, text)
        ports = dict(re.findall(r"service (\S+): listening on \S+:(\d+)", p.output))
        web_port, api_port = int(ports["web"]), int(ports["api"])
        cs = clients(web_port, 12)
        try:
            wait_for(lambda: backend.cur == 3, what="3 sessions")
            time.sleep(0.5)
            assert backend.cur == 3 and backend.max == 3
            with socket.create_connection(("127.0.0.1", api_port), timeout=5) as s:
                assert greeting(s, 5).startswith("o ")   # the other service is not limited
            web = {s["service"]: s for s in stats_of(tmp_path)}["web"]
            assert (web["limits"]["limit"], web["limits"]["cur"], web["limits"]["max"]) == (3, 3, 3)
            assert web["limits"]["maxconn_reached"] >= 1
        finally:
            for s in cs:
                s.close()
        wait_for(lambda: backend.cur == 0, what="the sessions to end")
    finally:
        other.close()


# -- max_conns and the queue -------------------------------------------------------------------
def test_max_conns_queue_serves_in_order_and_refuses_when_full(procs, tmp_path, backend):
    text = config(tmp_path, svc("web", [backend.port], 'queue = { size = 3, timeout = "20s" }',
                                ", max_conns = 2"))
    p, (port,) = start_fastlb(procs, text)
    first = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    assert [greeting(s, 5) for s in first] == ["b 1\n", "b 2\n"]
    queued = []
    for _ in range(3):
        queued.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(0.1)                                  # accepted in this order
    extra = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        assert closed_by_peer(extra, 5)                  # the queue is full: closed at once
        assert all(greeting(s, 0.3) is None for s in queued)
        assert backend.max == 2
        queued[2].sendall(b"ping")                       # kept while it waits, sent once served
        (web,) = stats_of(tmp_path)
        assert web["limits"]["queued"] == 3 and web["limits"]["queue_full"] == 1
        assert web["backends"][0]["cur"] == 2 and web["backends"][0]["limit"] == 2
        for i, s in enumerate(queued):                   # each place freed serves the next one
            first[i % 2].close() if i < 2 else queued[0].close()
            assert read_until(s, b"\n", 5) == f"b {3 + i}\n".encode()
        assert read_until(queued[2], b"ping", 5) == b"ping"
        assert backend.max == 2
        (web,) = stats_of(tmp_path)
        assert web["limits"]["queued"] == 0
        assert web["backends"][0]["connect_failures"] == 0
    finally:
        for s in first + queued + [extra]:
            s.close()


def test_max_conns_changed_by_the_admin_is_persisted_and_serves_the_queue(procs, tmp_path, backend):
    """ctl max-conns: a raised cap serves the queued client (the limits sweep), a lowered one
    closes nothing, a bad value is refused and changes nothing, the change is in the state file
    before the reply (a restart keeps it)."""
    text = config(tmp_path, svc("web", [backend.port], 'queue = { size = 4, timeout = "20s" }',
                                ", max_conns = 1"), state_file=f'"{tmp_path}/state.msgpack"')
    p, (port,) = start_fastlb(procs, text)
    addr = f"127.0.0.1:{backend.port}"
    first = socket.create_connection(("127.0.0.1", port), timeout=5)
    waiting = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        assert greeting(first, 5) == "b 1\n"
        assert greeting(waiting, 0.5) is None                   # queued behind the cap of 1
        with admin_client(tmp_path) as c:
            with pytest.raises(Exception, match="max_conns -1 out of range"):
                c.call("set_max_conns", service="web", address=addr, max_conns=-1)
            assert stats_of(tmp_path)[0]["backends"][0]["limit"] == 1     # nothing changed
            ev = c.call("set_max_conns", service="web", address=addr, max_conns=2)
            assert ev["max_conns"] == 2
        assert greeting(waiting, 5) == "b 2\n"                 # the raised cap served it
        out = subprocess.run([PY, "-m", "fastlb", "ctl", "--socket", f"{tmp_path}/admin.sock",
                              "max-conns", "web", addr, "1"], capture_output=True, text=True,
                             timeout=20)
        assert out.returncode == 0, out.stderr
        (web,) = stats_of(tmp_path)
        assert web["backends"][0]["limit"] == 1 and web["backends"][0]["cur"] == 2  # none closed
        first.sendall(b"ping")
        assert read_until(first, b"ping", 5) == b"ping"
    finally:
        first.close()
        waiting.close()
    p.stop()
    p, _ = start_fastlb(procs, text)                            # the state file keeps it
    assert stats_of(tmp_path)[0]["backends"][0]["limit"] == 1


def test_queue_size_and_max_conns_hold_across_two_workers(procs, tmp_path, backend):
    """The queue's size and a backend's cap are shared by the workers (the gauges): a place
    freed in one worker reaches a client queued in the other within the 100 ms sweep."""
    text = config(tmp_path, svc("web", [backend.port], 'queue = { size = 2, timeout = "20s" }',
                                ", max_conns = 1"), workers=2)
    p, (port,) = start_fastlb(procs, text)
    first = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert greeting(first, 5) == "b 1\n"
    queued = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    time.sleep(0.3)
    extra = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        assert closed_by_peer(extra, 5)                  # 2 queued over both workers: full
        (web,) = stats_of(tmp_path)
        assert web["limits"]["queued"] == 2 and web["limits"]["queue_full"] == 1
        first.close()
        served = None
        deadline = time.monotonic() + 5
        while served is None and time.monotonic() < deadline:
            served = next((s for s in queued if greeting(s, 0.1)), None)
        assert served is not None
        served.close()
        (rest,) = [s for s in queued if s is not served]
        assert greeting(rest, 5).startswith("b ")
        assert backend.max == 1 and backend.accepted == 3
    finally:
        for s in [first, extra, *queued]:
            s.close()


def test_queue_timeout_closes_and_counts(procs, tmp_path, backend):
    text = config(tmp_path, svc("web", [backend.port], 'queue = { size = 5, timeout = "500ms" }',
                                ", max_conns = 1"))
    p, (port,) = start_fastlb(procs, text)
    held = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        assert greeting(held, 5) == "b 1\n"
        waiting = socket.create_connection(("127.0.0.1", port), timeout=5)
        t0 = time.monotonic()
        assert closed_by_peer(waiting, 5)
        assert 0.4 <= time.monotonic() - t0 < 3
        (web,) = stats_of(tmp_path)
        assert web["limits"]["queue_timeout"] == 1 and web["limits"]["queued"] == 0
        assert web["global"]["queue_timeout"] == 1
        assert backend.accepted == 1
        waiting.close()
    finally:
        held.close()


def test_no_queue_by_default_closes_at_once_and_counts(procs, tmp_path, backend):
    p, (port,) = start_fastlb(procs, config(tmp_path, svc("web", [backend.port], "",
                                                          ", max_conns = 1")))
    held = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        assert greeting(held, 5) == "b 1\n"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            assert closed_by_peer(s, 2)
        (web,) = stats_of(tmp_path)
        assert web["limits"]["queue_full"] == 1 and web["backends"][0]["connect_failures"] == 0
    finally:
        held.close()


def test_capped_backend_is_skipped_not_failed(procs, tmp_path, backend):
    """A backend at its max_conns is passed over for the others, without a failure."""
    other = CountingBackend("o")
    try:
        text = config(tmp_path, svc("web", [backend.port, other.port], "retries = 0",
                                    ", max_conns = 2"))
        p, (port,) = start_fastlb(procs, text)
        cs = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(4)]
        try:
            names = sorted(greeting(s, 5).split()[0] for s in cs)
            assert names == ["b", "b", "o", "o"]
            (web,) = stats_of(tmp_path)
            assert all(b["connect_failures"] == 0 for b in web["backends"])
            assert web["limits"]["queue_full"] == 0 and web["limits"]["no_backend"] == 0
            # the peak is exact: a place taken before accept4 that found nothing is no session
            assert web["limits"]["max"] == 4 and web["global"]["max"] == 4
        finally:
            for s in cs:
                s.close()
    finally:
        other.close()


def test_maxconn_above_the_fd_limit_is_refused_by_check(tmp_path):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard >= 1 << 23:
        pytest.skip("no finite fd limit below maxconn's range")
    path = tmp_path / "c.toml"
    path.write_text(f"[global]\nmaxconn = {hard}\n\n" + svc("web", [9]))
    import subprocess
    r = subprocess.run(spawn.command("fastlb", "check", "--no-bind", "-c", str(path)),
                       capture_output=True, text=True, env=spawn.environment(), timeout=60)
    assert r.returncode == 2
    assert "global.maxconn" in r.stderr and "fd limit" in r.stderr and "at most" in r.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-x", "-q"]))


def test_a_killed_workers_places_are_given_back(procs, tmp_path, backend):
    """A worker killed while holding sessions never gives their places back itself: the pool
    reclaims them (Gauges.reclaim), so the service is not left at its maxconn forever."""
    text = config(tmp_path, svc("web", [backend.port], "maxconn = 2"), workers=2)
    p, ports = start_fastlb(procs, text)
    cs = clients(ports[0], 2)
    wait_for(lambda: backend.cur == 2, what="2 sessions")
    pids = [int(m) for m in re.findall(r"worker \d+ started, pid (\d+)", p.output)]
    assert len(pids) == 2
    for pid in pids:
        os.kill(pid, 9)                       # the held places die with them
    for s in cs:
        s.close()
    p.wait_line(r"worker \d+ \(pid \d+\) died", timeout=10)
    wait_for(lambda: len(re.findall(r"worker \d+ started, pid (\d+)", p.output)) >= 4,
             what="two new workers")
    wait_for(lambda: {s["service"]: s for s in stats_of(tmp_path)}["web"]["limits"]["cur"] == 0,
             what="the places given back")
    more = clients(ports[0], 2)               # served again: not stuck at maxconn
    try:
        for s in more:
            assert greeting(s, 5) is not None
    finally:
        for s in more:
            s.close()
