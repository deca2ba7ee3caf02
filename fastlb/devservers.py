"""Small TCP servers for the demo, the tests and the benchmarks (never for production).

Owner: the behaviour of fake backends. Run one as a process:
    python -m fastlb.devservers MODE --port 0 [--name NAME] [--host 127.0.0.1]
It prints ``READY <port>`` once listening, then serves until killed; with --delay S each
connection waits S seconds before it is served. Modes:
  announce  send "NAME\\n", then echo until the client's EOF, then close
  echo      echo everything; close after the client's EOF
  reply     read until the client's EOF, then send --size bytes (pattern) and close
  source    send --size bytes (pattern) as fast as the client takes them, then close
  trickle   send --size bytes in 10 pieces over about 1.5 s, then close
  http      minimal keep-alive HTTP/1.1: "GET ..." -> 200 with a small body (for wrk)
Threads, blocking sockets: simple and independent of the event loop under test.
"""
from __future__ import annotations

import argparse
import socket
import sys
import threading

PATTERN = bytes(range(256)) * 256           # 64 KiB of a recognisable pattern


def _announce(conn: socket.socket, name: str, size: int) -> None:
    conn.sendall(name.encode() + b"\n")
    _echo(conn, name, size)


def _echo(conn: socket.socket, name: str, size: int) -> None:
    while data := conn.recv(262144):
        conn.sendall(data)


def _reply(conn: socket.socket, name: str, size: int) -> None:
    while conn.recv(262144):
        pass
    _send_pattern(conn, size)


def _source(conn: socket.socket, name: str, size: int) -> None:
    _send_pattern(conn, size)


def _send_pattern(conn: socket.socket, size: int) -> None:
    while size > 0:
        chunk = PATTERN[: min(size, len(PATTERN))]
        conn.sendall(chunk)
        size -= len(chunk)


def _trickle(conn: socket.socket, name: str, size: int) -> None:
    import time
    piece = max(1, size // 10)
    for _ in range(10):
        conn.sendall(PATTERN[:piece] if piece <= len(PATTERN) else b"x" * piece)
        time.sleep(0.15)


def _http(conn: socket.socket, name: str, size: int) -> None:
    body = (name.encode() + b"\n") * max(1, size // (len(name) + 1))
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: text/plain\r\n\r\n%s" % (len(body), body)
    buf = b""
    while True:
        data = conn.recv(65536)
        if not data:
            return
        buf += data
        while (end := buf.find(b"\r\n\r\n")) >= 0:
            buf = buf[end + 4:]
            conn.sendall(resp)


MODES = {"announce": _announce, "echo": _echo, "reply": _reply, "source": _source, "trickle": _trickle,
         "http": _http}


def _serve_one(conn: socket.socket, handler, name: str, size: int) -> None:
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        handler(conn, name, size)
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        conn.close()


def serve(mode: str, host: str, port: int, name: str, size: int, ready=None,
          delay: float = 0.0) -> None:
    handler = MODES[mode]
    if delay:
        import time

        def handler(conn, name, size, _inner=handler):   # noqa: F811 - a slow variant
            time.sleep(delay)
            _inner(conn, name, size)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    lsock = socket.socket(family, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, port))
    lsock.listen(1024)
    if ready is not None:
        ready(lsock.getsockname()[1])
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=_serve_one, args=(conn, handler, name, size), daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fastlb.devservers")
    p.add_argument("mode", choices=sorted(MODES))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--name", default="backend")
    p.add_argument("--size", type=int, default=1 << 20)
    p.add_argument("--delay", type=float, default=0.0, help="wait this long before serving")
    a = p.parse_args(argv)

    def ready(port: int) -> None:
        print(f"READY {port}", flush=True)

    try:
        serve(a.mode, a.host, a.port, a.name, a.size, ready, a.delay)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
