"""The admin socket server: thin glue between a stream and the protocol codec.

Owner: listening (a Unix socket created with mode 0600, or TCP with a token compared in constant
time), reading, one reply per request in order, subscriptions. What a request does is the
``handler``'s business (fastlb.handlers.dispatch, through the supervisor). Nothing a client
sends can stop the server: protocol errors get error replies, a broken stream is closed, a
handler failure is logged and answered as an internal error.
"""
from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import os
import socket
import stat
from typing import Any, Awaitable, Callable

from fastlb.admin import protocol
from fastlb.admin.protocol import Request
from fastlb.errors import AdminProtocolError, FastLBError

log = logging.getLogger("fastlb.admin")

Handler = Callable[[Request], Awaitable[Any]]
# A subscriber whose unread events pass this many bytes is dropped rather than buffered forever.
SUBSCRIBER_BACKLOG = 4 << 20
# How long the probe of an existing admin socket waits: a live fastlb accepts at once (the
# kernel completes a unix connect while the listener's backlog has room).
STALE_PROBE_TIMEOUT = 2.0


def admin_socket_problem(address: str) -> tuple[str | None, bool]:
    """For ``unix:PATH``, what stands at PATH, changing nothing: (problem, stale). problem: why
    fastlb must not take the path (naming the path, the key and what to do), else None. stale:
    a socket nobody listens on any more, which fastlb may remove. Nothing for a TCP address.

    Live: something accepts a connection there (another fastlb, most likely). Stale: the connect
    is refused. Used by clear_stale_socket and by ``fastlb check`` (fastlb.preflight)."""
    if not address.startswith("unix:"):
        return None, False
    path = address[5:]
    where = f"admin socket {path} ([global] admin)"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, False
    if not stat.S_ISSOCK(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else
                "a symbolic link" if stat.S_ISLNK(st.st_mode) else
                "a regular file" if stat.S_ISREG(st.st_mode) else "a special file")
        return (f"{where}: the path exists and is {kind}, not a socket; fastlb never removes "
                f"it: move it away or set [global] admin to another path"), False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(STALE_PROBE_TIMEOUT)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return None, True                        # stale: nobody listens there any more
    except FileNotFoundError:
        return None, False                       # gone meanwhile
    except (TimeoutError, BlockingIOError):
        pass                                     # its backlog is full: alive, just busy
    except OSError as exc:
        return (f"{where}: cannot tell whether a process still serves it "
                f"({(exc.strerror or str(exc)).lower()}); remove it if no fastlb runs there, "
                f"or set [global] admin to another path"), False
    finally:
        probe.close()
    return (f"{where}: a process accepts connections there: another fastlb seems to run with "
            f"this admin socket; stop it first, or give this one another [global] admin path "
            f"(fastlb never takes over a live socket)"), False


def clear_stale_socket(address: str) -> None:
    """Remove a socket a previous run left at the admin path, but never a live one and never
    anything that is not a socket (admin_socket_problem). Raises FastLBError naming the path,
    the key and what to do. Called by AdminServer.start, and by the supervisor before it touches
    anything (the state file), so a second fastlb stops before doing harm. A window remains
    between the refused connect and the bind (two fastlb starting in the same millisecond): not
    worth a lock file for a misconfiguration."""
    problem, stale = admin_socket_problem(address)
    if problem:
        raise FastLBError(problem)
    if stale:
        try:
            os.unlink(address[5:])
        except FileNotFoundError:
            return
        log.info("admin socket %s: removed the stale socket of a previous run", address[5:])


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
            raise FastLBError(f"admin socket {self.address} ([global] admin): "
                              f"{self._words(exc)}") from None

    def _words(self, exc: OSError) -> str:
        """What went wrong and what to do, for a socket that cannot be set up."""
        other = "or set [global] admin to another address"
        if self.address.startswith("unix:"):
            directory = os.path.dirname(os.path.abspath(self.address[5:]))
            if exc.errno == errno.ENOENT:
                return f"its directory {directory} does not exist; create it (mkdir -p {directory}) {other}"
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return f"cannot create a socket in {directory} ({exc.strerror}); fix that directory {other}"
        elif exc.errno == errno.EADDRINUSE:
            return f"the address is in use (another fastlb?); stop what listens there {other}"
        return f"{(exc.strerror or str(exc)).lower()}; fix the cause {other}"

    async def _start(self) -> None:
        if self.address.startswith("unix:"):
            path = self.address[5:]
            clear_stale_socket(self.address)
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

    def publish(self, ev: dict[str, Any]) -> None:
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
