"""Timeouts and keepalive through `fastlb run` (issue 11): timeouts.client_fin, server_fin,
max_duration and first_byte each close what they should and nothing else; tcp_keepalive is
set on both of a session's sockets (read back from the kernel with `ss`)."""
import re
import shutil
import socket
import subprocess
import threading
import time

import pytest

from helpers import ThreadedServer, made_and_closed, start_fastlb


class Scripted(ThreadedServer):
    """A backend (threads, blocking sockets) that does what the client's first line asks:
      echo      echo until the client's EOF, then stay open, silent, until fastlb closes
      bye       send "bye", shut its write side, then read until fastlb closes (recorded)
      trickle   send "." every 0.3 s, 10 times, then close
      stream    send 1 KiB every 0.1 s until the connection breaks
    Records the modes whose connection fastlb closed (EOF or error) in ``closed``."""

    def __init__(self, silent=False):
        self.silent = silent                  # accept, read, never send a byte
        self.closed = []
        self.lock = threading.Lock()
        super().__init__()

    def _readline(self, c):
        line = b""
        while not line.endswith(b"\n"):
            b = c.recv(1)
            if not b:
                return None
            line += b
        return line.decode().strip()

    def serve(self, c):
        try:
            if self.silent:
                while c.recv(65536):
                    pass
                return
            mode = self._readline(c)
            if mode == "echo":
                while data := c.recv(65536):
                    c.sendall(data)
                while c.recv(65536):             # hold the half-closed connection
                    pass
            elif mode == "bye":
                c.sendall(b"bye")
                c.shutdown(socket.SHUT_WR)
                while c.recv(65536):
                    pass
            elif mode == "trickle":
                for _ in range(10):
                    c.sendall(b".")
                    time.sleep(0.3)
                return
            elif mode == "stream":
                while True:
                    c.sendall(b"x" * 1024)
                    time.sleep(0.1)
            with self.lock:
                self.closed.append(mode)
        except OSError:
            with self.lock:
                self.closed.append(mode if not self.silent else "silent")
        finally:
            c.close()


@pytest.fixture
def scripted():
    yield from made_and_closed(Scripted)


def config(backends, timeouts, extra=""):
    bs = ", ".join(f'{{ address = "127.0.0.1:{p}" }}' for p in backends)
    return (f'[[service]]\nname = "web"\nlisten = ["127.0.0.1:0"]\n'
            f'timeouts = {{ {timeouts} }}\n{extra}backends = [ {bs} ]\n')


def client(port, mode):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(mode.encode() + b"\n")
    return s


def alive(s):
    """The session still relays: an echo round trip."""
    s.sendall(b"ping")
    return s.recv(4) == b"ping"


def wait_eof(s, timeout):
    """Seconds until the peer closed ``s`` (EOF or reset), reading what comes meanwhile."""
    start = time.monotonic()
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def wait_for(pred, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not pred():
        time.sleep(0.05)
    return pred()


def test_client_fin_closes_a_silent_half_closed_connection_only(procs, scripted):
    be = scripted()
    _, (port,) = start_fastlb(procs, config([be.port], 'client_fin = "1s"'))
    half = client(port, "echo")
    assert alive(half)
    half.shutdown(socket.SHUT_WR)                 # the client is done; the backend holds on
    busy = client(port, "trickle")                # half-closed too, but bytes keep moving
    busy.shutdown(socket.SHUT_WR)
    full = client(port, "echo")                   # never half-closed, silent: idle rules
    assert alive(full)
    t0 = time.monotonic()
    took = wait_eof(half, 8)
    assert took < 4, f"half-closed silent connection lived {took:.1f}s past client_fin 1s"
    got = b""
    busy.settimeout(8)
    while data := busy.recv(100):                 # all 10 dots over 3 s: not cut at 1 s
        got += data
    assert got == b"." * 10 and time.monotonic() - t0 > 2.5
    assert alive(full)                            # no EOF from anyone: untouched
    assert wait_for(lambda: "echo" in be.closed, 5)


def test_server_fin_closes_a_silent_half_closed_connection_only(procs, scripted):
    be = scripted()
    _, (port,) = start_fastlb(procs, config([be.port], 'server_fin = "1s"'))
    bye = client(port, "bye")
    assert bye.recv(3) == b"bye"
    bye.settimeout(5)
    assert bye.recv(10) == b""                    # the backend's EOF, passed on
    talk = client(port, "bye")                    # half-closed by the backend, client talks
    assert talk.recv(3) == b"bye"
    sent = threading.Event()

    def chatter():                                # 3 s of traffic, 3 x server_fin
        for _ in range(10):
            talk.sendall(b"more")
            time.sleep(0.3)
        sent.set()
    threading.Thread(target=chatter, daemon=True).start()
    full = client(port, "echo")
    assert alive(full)
    # the silent half-closed one is closed by fastlb: the backend sees it
    assert wait_for(lambda: be.closed.count("bye") >= 1, 4), be.closed
    assert sent.wait(6)                           # every send went through: still open
    assert be.closed.count("bye") == 1
    assert alive(full)
    assert wait_for(lambda: be.closed.count("bye") == 2, 4)   # ... until it falls silent


def test_max_duration_ends_a_long_transfer_and_spares_younger_sessions(procs, scripted):
    be = scripted()
    _, (port,) = start_fastlb(procs, config([be.port], 'max_duration = "3s"'))
    t0 = time.monotonic()
    long = client(port, "stream")                 # bytes every 100 ms: never idle
    time.sleep(2.0)
    young = client(port, "echo")
    assert alive(young)
    took = wait_eof(long, 8)
    assert 2.9 <= time.monotonic() - t0 <= 5.5, took
    assert alive(young)                           # about 1 s old: not touched
    assert wait_eof(young, 6) < 5                 # its own 3 s later


def test_first_byte_timeout_marks_a_silent_backend_down_and_spares_the_others(procs, scripted):
    mute = scripted(silent=True)
    good = scripted()
    health = 'health = { fall_passive = 1, interval = "30s", timeout = "1s" }\n'
    lb, (port,) = start_fastlb(procs, config([mute.port, good.port], 'first_byte = "1s"', health))
    conns = [client(port, "echo") for _ in range(2)]   # round robin: one on each backend
    time.sleep(0.3)
    answered = []
    for s in conns:
        s.sendall(b"ping")
        s.settimeout(0.5)
        try:
            answered.append(s.recv(4) == b"ping")
        except socket.timeout:
            answered.append(False)
    assert sorted(answered) == [False, True]
    silent = conns[answered.index(False)]
    kept = conns[answered.index(True)]
    assert wait_eof(silent, 6) < 5                # closed for its silent backend
    lb.wait_line(rf"web/127\.0\.0\.1:{mute.port} DOWN: 1 consecutive failures? on client "
                 rf"connections \(connection timed out\)", timeout=5)
    time.sleep(1.5)
    assert alive(kept)                            # idle past first_byte after its answer: kept
    for _ in range(4):                            # new clients all go to the good backend
        s = client(port, "echo")
        s.settimeout(3)
        assert alive(s)
        s.close()
    assert not re.search(rf"127\.0\.0\.1:{good.port} DOWN", lb.output)


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs iproute2's ss")
def test_tcp_keepalive_on_the_client_and_the_backend_socket(procs, scripted):
    be = scripted()
    ka = 'tcp_keepalive = { idle = "60s", interval = "10s", count = 6 }\n'
    _, (port,) = start_fastlb(procs, config([be.port], 'idle = "300s"', ka))
    c = client(port, "echo")
    assert alive(c)
    mine = c.getsockname()[1]
    out = subprocess.run(["ss", "-tnoH", "state", "established"], capture_output=True,
                         text=True, timeout=10, check=True).stdout
    lines = [ln for ln in out.splitlines() if "127.0.0.1" in ln]
    # fastlb's side of the client connection: local = the listener, peer = our port
    front = [ln for ln in lines if re.search(rf"127\.0\.0\.1:{port}\s+127\.0\.0\.1:{mine}\b", ln)]
    # fastlb's backend socket: peer = the backend's port (its local port is fastlb's)
    back = [ln for ln in lines if re.search(rf"127\.0\.0\.1:\d+\s+127\.0\.0\.1:{be.port}\b", ln)]
    assert len(front) == 1 and len(back) == 1, lines
    for ln in front + back:
        m = re.search(r"timer:\(keepalive,([\d.]+)(min|sec|ms),(\d+)\)", ln)
        assert m, ln
        secs = float(m.group(1)) * {"min": 60, "sec": 1, "ms": 0.001}[m.group(2)]
        assert 50 <= secs <= 60, ln               # the idle time: 60 s, counting down
    # our own client socket has no keepalive: the timer is fastlb's
    ours = [ln for ln in lines if re.search(rf"127\.0\.0\.1:{mine}\s+127\.0\.0\.1:{port}\b", ln)]
    assert ours and "keepalive" not in ours[0]
