"""A small blocking admin client, for ``fastlb ctl`` and for programs.

    from fastlb.admin.client import AdminClient
    with AdminClient(socket_path="/run/fastlb/admin.sock") as c:
        c.call("set_weight", service="web", address="10.0.0.2:80", weight=3)

Over TCP the connection authenticates once, with its first message: the client sends a ``ping``
carrying the token in front of its first request (pipelined: no extra round trip). A connection
the server closed while it was idle ([global] admin_idle_timeout) is opened again, and
authenticated again, before the next request.

[tlsops] ``tls``: an ssl.SSLContext for a TCP admin with [global] admin_tls (its CA, and the
client certificate when the admin asks for one); ``server_hostname`` the name its certificate
is checked against (default: the host given). With a client certificate the token may be None.
"""
from __future__ import annotations

import itertools
import select
import socket
import ssl
from typing import Any, Iterator

from fastlb.admin import protocol
from fastlb.errors import AdminError

__all__ = ["AdminClient", "AdminError"]


class AdminClient:
    def __init__(self, socket_path: str | None = None, tcp: tuple[str, int] | None = None,
                 token: str | None = None, timeout: float = 30.0,
                 tls: ssl.SSLContext | None = None, server_hostname: str | None = None) -> None:
        if (socket_path is None) == (tcp is None):
            raise ValueError("give exactly one of socket_path and tcp")
        self.socket_path, self.tcp, self.timeout = socket_path, tcp, timeout
        self.tls, self.server_hostname = tls, server_hostname        # [tlsops]
        self.token = token
        self.ids = itertools.count(1)
        self._open()

    def _open(self) -> None:
        if self.socket_path is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(self.timeout)
            try:
                self.sock.connect(self.socket_path)
            except OSError:
                self.sock.close()
                raise
        else:
            assert self.tcp is not None      # exactly one of the two, checked in __init__
            self.sock = socket.create_connection(self.tcp, timeout=self.timeout)
            if self.tls is not None:                                  # [tlsops]
                try:
                    self.sock = self.tls.wrap_socket(
                        self.sock, server_hostname=self.server_hostname or self.tcp[0])
                except BaseException:
                    self.sock.close()
                    raise
        self.decoder = protocol.Decoder(protocol.REPLY_LIMITS.max_buffer, protocol.REPLY_LIMITS)
        self.pending: list[Any] = []
        self.authenticated = self.token is None
        self.used = False                    # a request was sent on this connection

    def _closed_by_server(self) -> bool:
        """True when the server has closed this connection (idle timeout): EOF, or only an
        error with a nil id (its notice) before it. Looks without waiting."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if not readable:
                return False
            if isinstance(self.sock, ssl.SSLSocket):   # [tlsops] no peeking under TLS: the
                return True                            # server spoke first (its notice): reopen
            data = self.sock.recv(65536, socket.MSG_PEEK)
        except OSError:
            return True
        if not data:
            return True
        try:
            notices = protocol.Decoder(protocol.REPLY_LIMITS.max_buffer, protocol.REPLY_LIMITS
                                       ).feed(data)
        except protocol.AdminProtocolError:
            return False
        return bool(notices) and all(isinstance(m, dict) and m.get("id") is None
                                     and m.get("ok") is False for m in notices)

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
        if self.used and not self.pending and self._closed_by_server():
            self.sock.close()
            self._open()
        self.used = True
        hello_id = None
        data = b""
        if not self.authenticated:
            # The first message of a TCP connection must carry the token and be small (the
            # server reads at most 4 KiB before authentication): a ping, then the request.
            hello_id = next(self.ids)
            data = protocol.encode({"id": hello_id, "op": "ping", "token": self.token})
        rid = next(self.ids)
        msg = {"id": rid, "op": op, **fields}
        self.sock.sendall(data + protocol.encode(msg))
        while True:
            reply = self._next_message()
            if not isinstance(reply, dict) or "event" in reply:
                continue
            if hello_id is not None and reply.get("id") in (hello_id, None):
                if not reply.get("ok"):
                    return reply                 # unauthorized, backoff, busy: the reason
                self.authenticated = True
                hello_id = None
                continue
            if reply.get("id") in (rid, None):
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
