"""Prometheus metrics: the text exposition format at http://<metrics>/metrics.

Owner: metric names and the exposition text. Names follow HAProxy's exporter where they fit
(fastlb_backend_current_sessions, ..._sessions_total, ..._bytes_in_total, ..._bytes_out_total,
..._connection_errors_total, ..._check_failures_total, ..._status, ..._weight), labelled by
service and backend, plus per-service sums. Figures are summed over every worker's counter block
when scraped. The HTTP side is a minimal GET-only server on the supervisor's loop: metrics are
small, scrapes rare, and a dependency for it would be heavier than the 30 lines it replaces.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from fastlb.config import parse_address

log = logging.getLogger("fastlb")

# (name suffix, type, help, counter field or None)
BACKEND = [
    ("current_sessions", "gauge", "Open connections to the backend.", "active"),
    ("sessions_total", "counter", "Connections made to the backend.", "total"),
    ("bytes_in_total", "counter", "Bytes sent by clients to the backend.", "bytes_in"),
    ("bytes_out_total", "counter", "Bytes sent by the backend to clients.", "bytes_out"),
    ("connection_errors_total", "counter", "Failed connects to the backend (refused, timed out).",
     "connect_failures"),
    ("check_failures_total", "counter", "Failed active health checks.", "check_failures"),
    ("status", "gauge", "1 when the backend is up (health), else 0.", None),
    ("weight", "gauge", "The backend's configured weight.", None),
]
SERVICE = [s for s in BACKEND if s[3] is not None and s[0] != "check_failures_total"]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(stats: list[dict[str, Any]]) -> str:
    """The exposition text for the admin ``stats`` result."""
    out: list[str] = []
    for suffix, kind, help_, field in BACKEND:
        name = f"fastlb_backend_{suffix}"
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        for svc in stats:
            for b in svc["backends"]:
                if suffix == "status":
                    v = 1 if b["health"] == "up" else 0
                elif suffix == "weight":
                    v = b["weight"]
                else:
                    v = b[field]
                labels = f'service="{_label(svc["service"])}",backend="{_label(b["address"])}"'
                out.append(f"{name}{{{labels}}} {v}")
    for suffix, kind, help_, field in SERVICE:
        name = f"fastlb_service_{suffix}"
        out += [f"# HELP {name} {help_.replace('the backend', 'the service')}", f"# TYPE {name} {kind}"]
        for svc in stats:
            total = sum(b[field] for b in svc["backends"])
            out.append(f'{name}{{service="{_label(svc["service"])}"}} {total}')
    return "\n".join(out) + "\n"


async def serve_metrics(address: str, stats: Callable[[], list[dict[str, Any]]]) -> asyncio.AbstractServer:
    """Serve ``render(stats())`` at http://address/metrics on the running loop."""
    addr = parse_address(address)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            line = head.split(b"\r\n", 1)[0].split()
            if len(line) < 2 or line[0] != b"GET":
                status, body, ctype = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif line[1].split(b"?")[0] != b"/metrics":
                status, body, ctype = "404 Not Found", b"see /metrics\n", "text/plain"
            else:
                body = render(stats()).encode()
                status, ctype = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, addr.host, addr.port)
    log.info("metrics on http://%s/metrics", address)
    return server
