"""The metrics port: Prometheus, a read-only JSON API, a health endpoint and the status page.

Owner: the HTTP/1.1 server on ``[global] metrics`` and its limits. Routes (GET and HEAD only):

    /            the status page (fastlb/status.html: one self-contained file, no external asset)
    /metrics     Prometheus text (fastlb/promex.py)
    /healthz     200 "ok" while fastlb is up and serving (the port closes when it stops)
    /api/stats   JSON: observe.snapshot (every service and backend with counters and health)
    /api/services JSON: the registry's services (name, listen, policy, timeouts, backends)

Rules: the request head is parsed by ``parse_head`` (no I/O: bytes in, a Request or HTTPError
out) and bounded by MAX_HEAD; a client must send its head within HEAD_TIMEOUT; at most
MAX_CONNECTIONS connections at once (one over the cap gets a 503 and is closed); keep-alive for
HTTP/1.1 unless the client says close, up to KEEPALIVE_REQUESTS requests, closed after
IDLE_TIMEOUT of silence. A request body is refused (nothing here takes one). No framework: this
runs on the supervisor's loop, and the whole server is this file.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastlb import observe, promex
from fastlb.errors import HTTPError

log = logging.getLogger("fastlb")

# Limits, chosen for a port that scrapers, curl and a browser tab use: a browser's request head
# is under 2 KiB, so 8 KiB leaves room for cookies and refuses a flood of headers; 5 s is ample
# on a LAN and bounds a slowloris; 64 connections cover many scrapers and tabs while capping the
# supervisor's memory for this port at a few hundred KiB.
MAX_HEAD = 8192
HEAD_TIMEOUT = 5.0
IDLE_TIMEOUT = 5.0
WRITE_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
KEEPALIVE_REQUESTS = 100
ROUTES = ("/", "/metrics", "/healthz", "/api/stats", "/api/services")


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str               # without the query string
    version: str            # "HTTP/1.0" or "HTTP/1.1"
    headers: dict[str, str]  # lower-case names

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return conn == "keep-alive"
        return conn != "close"


def parse_head(head: bytes) -> Request:
    """Parse a request head (request line and headers, ending with the empty line)."""
    if len(head) > MAX_HEAD:
        raise HTTPError(431, f"request head over {MAX_HEAD} bytes")
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:          # pragma: no cover - latin-1 decodes every byte
        raise HTTPError(400, "undecodable request") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1].startswith("/"):
        raise HTTPError(400, "bad request line")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HTTPError(505, f"{version!r} is not supported; HTTP/1.0 or HTTP/1.1")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HTTPError(400, f"bad header line {line[:40]!r}")
        headers[name.lower()] = value.strip()
    if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
        raise HTTPError(413, "no endpoint here takes a request body")
    return Request(method, target.split("?", 1)[0], version, headers)


def response(status: int, body: bytes, ctype: str, *, head_only: bool = False,
             keep_alive: bool = False, extra: dict[str, str] | None = None) -> bytes:
    """A complete response. Content-Length is the body's, also for HEAD (which sends none)."""
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
              408: "Request Timeout", 413: "Content Too Large",
              431: "Request Header Fields Too Large", 500: "Internal Server Error",
              503: "Service Unavailable", 505: "HTTP Version Not Supported"}[status]
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {ctype}",
             f"Content-Length: {len(body)}", "Cache-Control: no-store",
             "X-Content-Type-Options: nosniff",
             f"Connection: {'keep-alive' if keep_alive else 'close'}"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else body)


def services_json(src: observe.Sources) -> list[dict[str, Any]]:
    """The registry's services, as ``/api/services`` shows them."""
    out = []
    for s in src.services().values():
        out.append({"name": s.name, "listen": [a.text for a in s.listen], "policy": s.policy,
                    "hash_key": s.hash_key if s.policy == "maglev" else None,
                    "retries": s.retries, "connect_timeout": s.connect_timeout,
                    "idle_timeout": s.idle_timeout, "health_checks": s.health is not None,
                    "backends": [{"address": b.address.text, "weight": b.weight, "state": b.state}
                                 for b in s.backends]})
    return out


def status_page() -> bytes:
    return resources.files("fastlb").joinpath("status.html").read_bytes()


class HTTPServer:
    """The metrics port's server on the supervisor's loop."""

    def __init__(self, address: str, sources: observe.Sources,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.address = address
        self.sources = sources
        self.max_connections = max_connections
        self.registry = promex.registry(sources)
        self.connections = 0
        self.server: asyncio.Server | None = None
        self._page: bytes | None = None

    async def start(self) -> None:
        host, _, port = self.address.rpartition(":")
        self.server = await asyncio.start_server(self._handle, host.strip("[]"), int(port),
                                                 limit=MAX_HEAD + 4)
        bound = self.server.sockets[0].getsockname()
        shown = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
        log.info("metrics port on http://%s/ (/metrics, /healthz, /api/stats, /api/services)",
                 shown)
        if not ipaddress.ip_address(bound[0].split("%")[0]).is_loopback:
            log.warning("metrics port %s is reachable from other machines and has no "
                        "authentication; bind it to 127.0.0.1 unless a scraper elsewhere needs it",
                        shown)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def route(self, req: Request) -> tuple[int, bytes, str]:
        """(status, body, content type) for a parsed request (GET or HEAD)."""
        if req.path == "/metrics":
            return 200, promex.render(self.registry), promex.CONTENT_TYPE
        if req.path == "/healthz":
            return 200, b"ok\n", "text/plain; charset=utf-8"
        if req.path == "/api/stats":
            return 200, _json(observe.snapshot(self.sources)), "application/json"
        if req.path == "/api/services":
            return 200, _json(services_json(self.sources)), "application/json"
        if req.path == "/":
            if self._page is None:
                self._page = status_page()
            return 200, self._page, "text/html; charset=utf-8"
        return 404, f"not found; try {', '.join(ROUTES)}\n".encode(), "text/plain; charset=utf-8"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= self.max_connections:
            writer.write(response(503, b"too many connections to the metrics port\n",
                                  "text/plain; charset=utf-8"))
            await self._close(writer)
            return
        self.connections += 1
        try:
            for n in range(KEEPALIVE_REQUESTS):
                if not await self._one(reader, writer, first=n == 0,
                                       last=n == KEEPALIVE_REQUESTS - 1):
                    break
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self.connections -= 1
            await self._close(writer)

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   first: bool, last: bool) -> bool:
        """Serve one request; True to keep the connection for another."""
        text = "text/plain; charset=utf-8"
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"),
                                          HEAD_TIMEOUT if first else IDLE_TIMEOUT)
            req = parse_head(head[:-4])
        except asyncio.IncompleteReadError:
            return False                                      # the client closed
        except asyncio.LimitOverrunError:
            writer.write(response(431, f"request head over {MAX_HEAD} bytes\n".encode(), text))
            return False
        except TimeoutError:
            if first:
                writer.write(response(408, b"request head not received in time\n", text))
            return False
        except HTTPError as exc:
            writer.write(response(exc.status, exc.message.encode() + b"\n", text))
            return False
        keep = req.keep_alive and not last
        if req.method not in ("GET", "HEAD"):
            writer.write(response(405, b"read-only: GET or HEAD\n", text, keep_alive=keep,
                                  extra={"Allow": "GET, HEAD"}))
        else:
            try:
                status, body, ctype = self.route(req)
            except Exception:                                 # a bug: say so, keep serving
                log.exception("metrics port: %s %s failed", req.method, req.path)
                status, body, ctype, keep = 500, b"internal error (logged)\n", text, False
            writer.write(response(status, body, ctype, head_only=req.method == "HEAD",
                                  keep_alive=keep))
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        return keep

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except (TimeoutError, ConnectionError):
            pass
        writer.close()


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


async def serve_http(address: str, sources: observe.Sources) -> HTTPServer:
    """Start the metrics port; ``close()`` the result to stop it."""
    server = HTTPServer(address, sources)
    await server.start()
    return server
