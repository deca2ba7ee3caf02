"""Test helpers: real processes on loopback, each stopped by its PID at the end of the test."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from fastlb import spawn

PY = sys.executable


class Proc:
    """A child process with its stderr/stdout collected by a thread. ``[PY, "-m", module, ...]``
    runs through fastlb.spawn, so the child runs the fastlb package under test (the installed
    one, in CI's installed-wheel run), whatever the current directory."""

    def __init__(self, args: list[str], registry: list, env: dict | None = None) -> None:
        full_env = None if env is None else {**os.environ, **env}
        if args[:2] == [PY, "-m"]:
            args, full_env = spawn.command(*args[2:]), spawn.environment(full_env)
        self.popen = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, bufsize=1, env=full_env)
        self.pid = self.popen.pid
        self.lines: list[str] = []
        self._cond = threading.Condition()
        registry.append(self)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, pattern: str, timeout: float = 10.0) -> re.Match:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if m := rx.search(line):
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and seen == len(self.lines)):
                    raise AssertionError(f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines))
                self._cond.wait(min(left, 0.1))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float = 10.0) -> int:
        return self.popen.wait(timeout)

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(5)

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")


def start_backend(procs: list, mode: str, name: str = "backend", size: int = 1 << 20,
                  host: str = "127.0.0.1", port: int = 0, delay: float = 0.0) -> tuple[Proc, int]:
    p = Proc([PY, "-m", "fastlb.devservers", mode, "--name", name, "--size", str(size),
              "--host", host, "--port", str(port), "--delay", str(delay)], procs)
    return p, int(p.wait_line(r"READY (\d+)").group(1))


def start_fastlb(procs: list, config: str, env: dict | None = None) -> tuple[Proc, list[int]]:
    """Run `fastlb run` on a config text; return it and the ports it listens on, in order.
    ``env``: extra environment variables (for the workers too)."""
    fd, path = tempfile.mkstemp(suffix=".toml")
    with os.fdopen(fd, "w") as f:
        f.write(config)
    p = Proc([PY, "-m", "fastlb", "run", "-c", path], procs, env)
    p.wait_line(r"fastlb ready")
    ports = [int(m) for m in re.findall(r"listening on \S+:(\d+)", p.output)]
    return p, ports


def service(name: str, backends: list[tuple[int, int]], listen: str = "127.0.0.1:0", **opts) -> str:
    lines = ["[[service]]", f'name = "{name}"', f'listen = ["{listen}"]']
    for k, v in opts.items():
        lines.append(f"{k} = {v}")
    bs = ", ".join(f'{{ address = "127.0.0.1:{port}", weight = {w} }}' for port, w in backends)
    lines.append(f"backends = [ {bs} ]")
    return "\n".join(lines) + "\n"


def closed_port() -> int:
    """A loopback port with nothing listening (connects are refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def free_port() -> int:
    """A loopback port free for a listener of the test (the same as closed_port: nothing listens)."""
    return closed_port()


def metrics_text(port: int) -> str:
    """The body of GET /metrics on 127.0.0.1:port."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        s.settimeout(10)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.partition(b"\r\n\r\n")[2].decode()


class ThreadedServer:
    """A loopback listening socket whose connections are each served by ``self.serve(conn,
    *extra)`` in a thread of their own, ``extra`` being what ``self.accepted_one(conn)`` returns
    (in the accept thread: counts); subclasses define serve, and set their own attributes before
    calling this __init__. ``conns``: every connection accepted; ``close()`` stops accepting
    and closes them all."""

    def __init__(self, backlog: int = 128) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=backlog)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:                   # closed: the server stops
                return
            self.conns.append(c)
            extra = self.accepted_one(c)
            threading.Thread(target=self.serve, args=(c, *extra), daemon=True).start()

    def accepted_one(self, c: socket.socket) -> tuple:
        return ()

    def serve(self, c: socket.socket, *extra: object) -> None:
        raise NotImplementedError

    def close(self) -> None:
        try:                                  # wakes the accept() blocked in the thread (a
            self.sock.shutdown(socket.SHUT_RDWR)    # close() alone leaves it listening)
        except OSError:
            pass
        self.sock.close()
        for c in self.conns:
            c.close()


class Blackhole:
    """A loopback port whose SYNs are dropped (a full accept queue): connects time out."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        for _ in range(3):            # backlog 0 still queues one or two; fill them
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(c)
        time.sleep(0.1)

    def close(self) -> None:
        for c in self.fillers:
            c.close()
        self.sock.close()


def recv_all(sock: socket.socket, limit: float = 30.0) -> bytes:
    sock.settimeout(limit)
    chunks = []
    while data := sock.recv(262144):
        chunks.append(data)
    return b"".join(chunks)


def admin_client(tmp_path):
    """A client of the admin socket that the tests' configs put at tmp_path/admin.sock."""
    from fastlb.admin.client import AdminClient
    return AdminClient(socket_path=f"{tmp_path}/admin.sock", timeout=20)


def names_of(port: int, count: int) -> list[str]:
    """The names announced by the backends of ``count`` new connections to ``port``."""
    out = []
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            out.append(s.recv(100).decode().strip())
    return out


def fill(directory) -> None:
    """Fill the filesystem of ``directory`` to its last byte (with a file named filler)."""
    import errno
    fd = os.open(os.path.join(directory, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)



def made_and_closed(factory):
    """A fixture's body (``yield from``): the test gets a function that calls ``factory`` and
    keeps what it made; each is closed when the test ends."""
    made = []

    def make(*args, **kw):
        made.append(factory(*args, **kw))
        return made[-1]
    yield make
    for thing in made:
        thing.close()
