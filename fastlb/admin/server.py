"""The admin socket server: thin glue between a stream and the protocol codec.

Owner: listening (a Unix socket created with mode 0600, or TCP with a token compared in constant
time), reading, one reply per request in order, subscriptions. What a request does is the
``handler``'s business (fastlb.proxy.Balancer.admin). Nothing a client sends can stop the
server: protocol errors get error replies, a broken stream is closed, a handler failure is
logged and answered as an internal error.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
from typing import Any, Awaitable, Callable

from fastlb.admin import protocol
from fastlb.admin.protocol import Request
from fastlb.errors import AdminProtocolError, FastLBError

log = logging.getLogger("fastlb.admin")

Handler = Callable[[Request], Awaitable[Any]]
# A subscriber whose unread events pass this many bytes is dropped rather than buffered forever.
SUBSCRIBER_BACKLOG = 4 << 20


class AdminServer:
    def __init__(self, address: str, handler: Handler, *, token: str | None = None,
                 max_size: int = protocol.MAX_MESSAGE) -> None:
        self.address = address
        self.handler = handler
        self.token = token
        self.max_size = max_size
        self.server: asyncio.AbstractServer | None = None
        self.subscribers: dict[asyncio.StreamWriter, int] = {}

    async def start(self) -> None:
        try:
            await self._start()
        except OSError as exc:
            raise FastLBError(f"admin socket {self.address}: {exc.strerror or exc}") from None

    async def _start(self) -> None:
        if self.address.startswith("unix:"):
            path = self.address[5:]
            if os.path.exists(path):
                os.unlink(path)                      # a stale socket of a previous run
            old = os.umask(0o177)                    # born 0600: no window for others
            try:
                self.server = await asyncio.start_unix_server(self._client, path)
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
        else:
            host, _, port = self.address[4:].rpartition(":")
            self.server = await asyncio.start_server(self._client, host.strip("[]"), int(port))
        log.info("admin socket on %s", self.address)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in list(self.subscribers):
            w.close()
        if self.address.startswith("unix:"):
            try:
                os.unlink(self.address[5:])
            except FileNotFoundError:
                pass

    def publish(self, ev: dict) -> None:
        """Send an event to every subscriber (dropping those that do not keep up)."""
        for w, rid in list(self.subscribers.items()):
            if w.is_closing() or w.transport.get_write_buffer_size() > SUBSCRIBER_BACKLOG:
                self.subscribers.pop(w, None)
                w.close()
                continue
            w.write(protocol.event(rid, ev))

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = protocol.Decoder(self.max_size)
        try:
            while data := await reader.read(65536):
                try:
                    decoder.push(data)
                    for obj in decoder:              # requests before a bad value are answered
                        writer.write(await self._one(obj, writer))
                except AdminProtocolError as exc:
                    writer.write(protocol.error(None, exc.code, exc.message))
                    break                            # the stream's framing is lost
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.subscribers.pop(writer, None)
            writer.close()

    async def _one(self, obj: Any, writer: asyncio.StreamWriter) -> bytes:
        try:
            req = protocol.parse_request(obj)
        except AdminProtocolError as exc:
            return protocol.error(exc.id, exc.code, exc.message)
        if self.token is not None and not hmac.compare_digest(
                (req.token or "").encode(), self.token.encode()):
            peer = writer.get_extra_info("peername")
            log.warning("admin: request %s from %s refused: missing or wrong token", req.op, peer)
            return protocol.error(req.id, "unauthorized", "missing or wrong token")
        if req.op == "subscribe":
            self.subscribers[writer] = req.id
            return protocol.ok(req.id, {"subscribed": True})
        try:
            return protocol.ok(req.id, await self.handler(req))
        except AdminProtocolError as exc:
            return protocol.error(req.id, exc.code, exc.message)
        except FastLBError as exc:
            return protocol.error(req.id, getattr(exc, "code", "failed"), str(exc))
        except Exception as exc:                     # a bug: say so, keep serving
            log.exception("admin: %s failed", req.op)
            return protocol.error(req.id, "internal", f"{type(exc).__name__}: {exc}")
