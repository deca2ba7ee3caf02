"""What the admin and lease benchmarks share: start a process and read its output, wait for a
line, and probe the data path with 64-byte round trips."""
from __future__ import annotations

import re
import socket
import statistics
import subprocess
import threading
import time


def start(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], list[str]]:
    """Start ``args`` with stdout and stderr merged; its lines are appended to the list."""
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(x) for x in p.stdout or []], daemon=True).start()
    return p, lines


def wait_for(lines: list[str], pattern: str, timeout: float = 20.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(lines):
            if m := re.search(pattern, line):
                return m
        time.sleep(0.05)
    raise SystemExit(f"no {pattern!r} in:\n" + "".join(lines))


def round_trips(port: int, seconds: float) -> list[float]:
    """64-byte round trips through 127.0.0.1:port (an echo behind it), one a millisecond."""
    out = []
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            c.sendall(b"x" * 64)
            got = 0
            while got < 64:
                got += len(c.recv(64 - got))
            out.append(time.perf_counter() - t0)
            time.sleep(0.001)
    return out


def p99(xs: list[float]) -> float:
    return sorted(xs)[int(len(xs) * 0.99)]


def summary(xs: list[float]) -> str:
    """``count | median | p99`` (a markdown row's cells)."""
    return f"{len(xs):,} | {statistics.median(xs) * 1e3:.3f} ms | {p99(xs) * 1e3:.1f} ms"
