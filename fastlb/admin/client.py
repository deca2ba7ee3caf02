"""A small blocking admin client, for ``fastlb ctl`` and for programs.

    from fastlb.admin.client import AdminClient
    with AdminClient(socket_path="/run/fastlb/admin.sock") as c:
        c.call("set_weight", service="web", address="10.0.0.2:80", weight=3)
"""
from __future__ import annotations

import itertools
import socket
from typing import Any, Iterator

from fastlb.admin import protocol
from fastlb.errors import AdminError

__all__ = ["AdminClient", "AdminError"]


class AdminClient:
    def __init__(self, socket_path: str | None = None, tcp: tuple[str, int] | None = None,
                 token: str | None = None, timeout: float = 30.0) -> None:
        if (socket_path is None) == (tcp is None):
            raise ValueError("give exactly one of socket_path and tcp")
        if socket_path is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(socket_path)
        else:
            assert tcp is not None      # exactly one of the two, checked above
            self.sock = socket.create_connection(tcp, timeout=timeout)
        self.token = token
        self.decoder = protocol.Decoder(protocol.REPLY_LIMITS.max_buffer, protocol.REPLY_LIMITS)
        self.pending: list[Any] = []
        self.ids = itertools.count(1)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "AdminClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_message(self) -> Any:
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the admin socket closed the connection")
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request, return the raw reply map."""
        rid = next(self.ids)
        msg = {"id": rid, "op": op, **fields}
        if self.token is not None:
            msg["token"] = self.token
        self.sock.sendall(protocol.encode(msg))
        while True:
            reply = self._next_message()
            if isinstance(reply, dict) and reply.get("id") in (rid, None) and "event" not in reply:
                return reply

    def call(self, op: str, **fields: Any) -> Any:
        """Send one request; return its result or raise AdminError."""
        reply = self.request(op, **fields)
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise AdminError(err.get("code", "?"), err.get("message", "?"))
        return reply.get("result")

    def events(self) -> Iterator[dict[str, Any]]:
        """Subscribe, then yield events until the connection closes."""
        self.call("subscribe")
        self.sock.settimeout(None)
        while True:
            try:
                msg = self._next_message()
            except ConnectionError:
                return
            if isinstance(msg, dict) and "event" in msg:
                yield msg["event"]
