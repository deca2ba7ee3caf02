"""The admin socket server: thin glue between a stream and the protocol codec.

Owner: listening (a Unix socket created with mode 0600, or TCP with a token compared in constant
time), reading, one reply per request in order, subscriptions, and the defences of the socket
(their rules are in fastlb.admin.guard, sans-IO). What a request does is the ``handler``'s
business (fastlb.handlers.dispatch, through the supervisor, which writes the audit trail).
Nothing a client sends can stop the server: protocol errors get error replies, a broken stream
is closed, a handler failure is logged and answered as an internal error.

Defences (docs/admin-protocol.md, "Connections"):
  - TCP: a connection authenticates once, with its first message (at most PRE_AUTH_MAX bytes,
    within ``frame_timeout`` of the connect). A missing or wrong token, or anything else as the
    first message, gets one error reply and the connection is closed: one guess per connection.
    The failure counts against the peer's address (guard.Backoff): a source with too many is
    refused at once, for a penalty that grows.
  - Every connection: a message begun must be whole within ``frame_timeout``; a connection with
    no message under way is closed after ``idle_timeout`` (subscribers excepted: they wait for
    events); at most ``max_connections`` at once, others are closed at once.
  - Refusals are logged at most once per LOG_INTERVAL per kind, with the count of the others
    (guard.LogLimiter): a flood of bad connections writes a few lines, not one each.
The unix socket (mode 0600: its owner only) needs no token, as the file's mode is the check.
[tlsops] A TCP admin may speak TLS ([global] admin_tls: ``tls_context``), and ask for a client
certificate: beside the token, or instead of it (no admin_token_file: the verified certificate
is the authentication, and its subject names the client in the audit trail).
"""
from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import socket
import ssl
import stat
import struct
from typing import Any, Awaitable, Callable, Mapping

from fastlb.admin import guard, protocol
from fastlb.admin.protocol import Request
from fastlb.config import Config, GlobalConfig
from fastlb.errors import AdminProtocolError, FastLBError

log = logging.getLogger("fastlb.admin")

Handler = Callable[[Request], Awaitable[Any]]
# A subscriber whose unread events pass this many bytes is dropped rather than buffered forever.
SUBSCRIBER_BACKLOG = 4 << 20
# How long the probe of an existing admin socket waits: a live fastlb accepts at once (the
# kernel completes a unix connect while the listener's backlog has room).
STALE_PROBE_TIMEOUT = 2.0

# Defaults: those of the [global] admin_* keys (fastlb.config.GlobalConfig; why: docs/config.md,
# "The admin socket"): 64 connections (HAProxy's stats socket: maxconn 10; here ctl, top and a
# few programs), 60 s idle (nginx keepalive_timeout 75 s, HAProxy's stats timeout 10 s), 10 s for
# a message (at most 1 MiB, sent by a program: whole in well under a second; sshd's
# LoginGraceTime is 120 s, for people typing).
_DEFAULTS = GlobalConfig()
MAX_CONNECTIONS = _DEFAULTS.admin_max_connections
IDLE_TIMEOUT = _DEFAULTS.admin_idle_timeout
FRAME_TIMEOUT = _DEFAULTS.admin_frame_timeout
# After a refusal (a bad first message, a broken stream): the reply, our FIN, then the peer's
# further bytes are read and dropped for up to this long (and this many bytes) before the
# close, so the reply is not lost to a reset (nginx's lingering_close, lingering_time).
LINGER = 0.5
LINGER_BYTES = 4 << 20          # a whole 1 MiB message and more; 1-2 ms of copying
# Refusal log lines: at most one per this many seconds per kind, then a count.
LOG_INTERVAL = 10.0


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


def admin_token(cfg: Config) -> str | None:
    """The token of a TCP admin (None for a unix one), read with guard.read_token's rules.
    Raises FastLBError naming the key and the file."""
    g = cfg.global_
    if not g.admin or not g.admin.startswith("tcp:"):
        return None
    if not g.admin_token_file and g.admin_tls is not None:     # [tlsops] client certificates
        return None
    try:
        return guard.read_token(g.admin_token_file or "")
    except guard.TokenFileError as exc:
        raise FastLBError(f"[global] admin_token_file: {exc}") from None


def tls_context(cfg: Config) -> ssl.SSLContext | None:
    """[tlsops] The TCP admin's server context from [global] admin_tls (None: plain TCP):
    TLS 1.2 at least, and with client_ca a client certificate asked for (required, or
    optional). The files were checked when the configuration was read."""
    t = cfg.global_.admin_tls
    if t is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    load_tls(ctx, t)
    return ctx


def load_tls(ctx: ssl.SSLContext, t: Any) -> None:
    """[tlsops] admin_tls's files into ``ctx`` (at start, and again at a reload: a renewed
    certificate serves the next handshakes; CAs are added, none removed until a restart)."""
    ctx.load_cert_chain(t.cert, t.key)
    if t.client_ca:
        ctx.load_verify_locations(cafile=t.client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if t.verify_client == "required" else ssl.CERT_OPTIONAL


class AdminServer:
    def __init__(self, address: str, handler: Handler, *, token: str | None = None,
                 max_size: int = protocol.MAX_MESSAGE, max_connections: int = MAX_CONNECTIONS,
                 idle_timeout: float = IDLE_TIMEOUT, frame_timeout: float = FRAME_TIMEOUT,
                 tls: ssl.SSLContext | None = None) -> None:
        self.address = address
        self.tls = tls                  # [tlsops] TLS on the TCP admin (None: plain)
        self.handler = handler
        self.token = token
        # [leases] sha256(registration token) -> its service: a connection authenticated by one
        # may only register/renew/deregister in that service (Request.scope; fastlb.handlers)
        self.scopes: dict[bytes, str] = {}
        self.max_size = max_size
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.frame_timeout = frame_timeout
        self.server: asyncio.AbstractServer | None = None
        self.subscribers: dict[asyncio.StreamWriter, int] = {}
        self.connections = 0
        # Connections refused or closed by the server since start, by reason.
        self.counts: dict[str, int] = dict.fromkeys(
            ("over_cap", "backoff", "unauthorized", "timeout", "idle", "preauth_cap"), 0)
        # Connections not yet authenticated, per source address: at most preauth_per_source()
        # each, so that one source cannot hold every place while the operator's connection
        # (from elsewhere) waits (nginx's limit_conn per address; sshd's MaxStartups is global).
        self.preauth: dict[str, int] = {}
        self.backoff = guard.Backoff()
        self._limiters: dict[str, guard.LogLimiter] = {}
        self._flush_timers: dict[str, asyncio.TimerHandle] = {}

    @property
    def token(self) -> str | None:
        return self._token

    @token.setter
    def token(self, value: str | None) -> None:
        """Set (or rotate, at a reload) the token; compared as digests, in constant time."""
        self._token = value
        self._digest = hashlib.sha256(value.encode()).digest() if value is not None else b""

    def set_registration_tokens(self, tokens: Mapping[str, str]) -> None:
        """[leases] service -> its registration token (set at start, replaced at a reload)."""
        self.scopes = {hashlib.sha256(t.encode()).digest(): svc for svc, t in tokens.items()}

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
            self.server = await asyncio.start_server(                   # [tlsops] ssl
                self._client, host.strip("[]"), int(port), ssl=self.tls,
                ssl_handshake_timeout=self.frame_timeout if self.tls is not None else None)
            bound = [str(s.getsockname()[0]) for s in self.server.sockets]
            if self.tls is None and any(not ipaddress.ip_address(h.partition("%")[0]).is_loopback
                                        for h in bound):
                # only with [global] admin_allow_remote = true (fastlb.config refuses it else)
                log.warning("admin socket %s is reachable from other machines and not encrypted "
                            "(admin_allow_remote = true): the token and every change cross the "
                            "network in clear", self.address)
        log.info("admin socket on %s", self.address)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in list(self.subscribers):
            w.close()
        for t in self._flush_timers.values():
            t.cancel()
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

    # -- refusals: counted, logged rate-limited ---------------------------------------------------
    def _refuse(self, reason: str, text: str) -> None:
        """Count a refusal; log it, or count it into the next summary line of its kind."""
        self.counts[reason] += 1
        loop = asyncio.get_running_loop()
        lim = self._limiters.setdefault(reason, guard.LogLimiter(LOG_INTERVAL))
        if lim.hit(loop.time(), text):
            log.warning("admin: %s", text)
        elif lim.suppressed == 1:                # the first one held back: report at window end
            self._flush_timers[reason] = loop.call_at(lim.window_end, self._flush, reason)

    def _turn_away(self, writer: asyncio.StreamWriter, reason: str, text: str, code: str,
                   reply: str) -> None:
        """Refuse a new connection before its first frame: counted and logged as ``reason``
        (``text``), answered with one error frame (``code``, ``reply``), closed."""
        self._refuse(reason, text)
        writer.write(protocol.error(None, code, reply))
        writer.close()

    def _flush(self, reason: str) -> None:
        self._flush_timers.pop(reason, None)
        lim = self._limiters[reason]
        n, last = lim.flush(asyncio.get_running_loop().time())
        if n:
            log.warning("admin: %d more %s in the last %g s (the last: %s)", n,
                        _PLURAL[reason], lim.interval, last)

    # -- one connection ---------------------------------------------------------------------------
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tcp = not self.address.startswith("unix:")  # [tlsops] may have no token (certificates)
        who, source = _who(writer, tcp)
        if self.tls is not None:
            who = _with_cert(writer, who)
        loop = asyncio.get_running_loop()
        if tcp and (left := math.ceil(self.backoff.blocked(source, loop.time()))):
            self._turn_away(writer, "backoff", f"connection from {who} refused: too many failed "
                                               f"authentications from {source}, {left} s of "
                                               f"backoff left",
                            "backoff", f"too many failed authentications from {source}; retry "
                                       f"in {left} s")
            return
        if self.connections >= self.max_connections:
            self._turn_away(writer, "over_cap", f"connection from {who} refused: "
                                                f"{self.connections} admin connections open, the "
                                                f"cap ([global] admin_max_connections)",
                            "busy", f"{self.connections} admin connections are open, the cap; "
                                    f"retry later")
            return
        if tcp and self.token is not None and \
                self.preauth.get(source, 0) >= preauth_per_source(self.max_connections):
            self._turn_away(writer, "preauth_cap", f"connection from {who} refused: {source} "
                                                   f"already has {self.preauth[source]} admin "
                                                   f"connections not yet authenticated",
                            "busy", f"{source} has {self.preauth[source]} admin connections not "
                                    f"yet authenticated, the most one address may; retry later")
            return
        self.connections += 1
        try:
            rest = b""
            scope = None
            if tcp and self.token is not None:
                self.preauth[source] = self.preauth.get(source, 0) + 1
                try:
                    first = await self._authenticate(reader, writer, who, source)
                finally:
                    if (n := self.preauth[source] - 1) > 0:
                        self.preauth[source] = n
                    else:
                        del self.preauth[source]
                if first is None:
                    return
                rest, scope = first
                if scope is not None:                   # [leases] for the audit trail
                    who = f"{who} (registration token of {scope})"
            await self._serve(reader, writer, who, rest, scope)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.connections -= 1
            self.subscribers.pop(writer, None)
            writer.close()

    async def _authenticate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            who: str, source: str) -> tuple[bytes, str | None] | None:
        """Read the first message (bounded in size and time) and check its token. Returns the
        bytes read: the first message and what followed it (requests pipelined behind it), to be
        served as the rest, with the scope ([leases] the service of a registration token;
        None: the operator token); or None when the connection was refused (replied to, counted,
        closed) or closed by the peer before a whole first message."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.frame_timeout
        decoder = protocol.Decoder(protocol.PRE_AUTH_MAX, protocol.PRE_AUTH_LIMITS)
        buf = bytearray()
        code, why, rid = "unauthorized", "", None
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    data = await reader.read(protocol.PRE_AUTH_MAX - len(buf))
            except TimeoutError:
                code, why = "timeout", (f"no whole first message within {self.frame_timeout:g} s "
                                        f"([global] admin_frame_timeout)")
                break
            if not data:
                return None                      # closed before a word: nothing to count
            buf += data
            try:
                decoder.push(data)
                obj = next(decoder)
            except StopIteration:
                if len(buf) < protocol.PRE_AUTH_MAX:
                    continue
                why = (f"the first message is larger than {protocol.PRE_AUTH_MAX} bytes (it must "
                       f"authenticate: send a ping with the token first)")
                break
            except AdminProtocolError as exc:
                why = f"the first message is not a request ({exc.message})"
                break
            token = obj.get("token") if isinstance(obj, dict) else None
            rid = obj.get("id") if isinstance(obj, dict) else None
            rid = rid if isinstance(rid, int) and not isinstance(rid, bool) else None
            digest = hashlib.sha256(token.encode()).digest() if isinstance(token, str) else b""
            # [leases] a registration token: looked up by its SHA-256 (a dict lookup on a
            # digest tells a guesser nothing about the tokens: it cannot aim at a prefix)
            scope = self.scopes.get(digest) if digest else None
            if digest and (hmac.compare_digest(digest, self._digest) or scope is not None):
                self.backoff.success(source)
                log.debug("admin: %s authenticated%s", who,
                          f" (registration token of service {scope})" if scope else "")
                # the first message is served as any other: it is put back in front of the rest
                return bytes(buf), scope
            why = "wrong token" if isinstance(token, str) else "missing token"
            break
        penalty = self.backoff.failure(source, loop.time())
        then = f"; {source} is refused for {penalty:g} s" if penalty else ""
        self._refuse("timeout" if code == "timeout" else "unauthorized",
                     f"connection from {who} refused: {why}{then}")
        message = (why if code == "timeout" else
                   f"authentication failed: {why}; the first message of a TCP admin connection "
                   f"must carry the token (at most {protocol.PRE_AUTH_MAX} bytes)")
        await self._linger(reader, writer, protocol.error(rid, code, message))
        return None

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      reply: bytes) -> None:
        """Send a last reply and close, reading what the peer still sends (and dropping it) for
        a short, bounded while, so the reply reaches it rather than a reset."""
        try:
            writer.write(reply)
            if writer.can_write_eof():
                writer.write_eof()
            dropped = 0
            async with asyncio.timeout(LINGER):
                while dropped < LINGER_BYTES and (data := await reader.read(65536)):
                    dropped += len(data)
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     who: str, data: bytes, scope: str | None = None) -> None:
        """Requests until the peer closes, its stream breaks or a deadline passes."""
        loop = asyncio.get_running_loop()
        decoder = protocol.Decoder(self.max_size)
        deadline = 0.0                           # of the message under way, if any
        while True:
            if data:
                taken = decoder.consumed
                try:
                    decoder.push(data)
                    for obj in decoder:          # requests before a bad value are answered
                        writer.write(await self._one(obj, writer, who, scope))
                except AdminProtocolError as exc:
                    await self._linger(reader, writer, protocol.error(None, exc.code, exc.message))
                    return                       # the stream's framing is lost
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        await writer.drain()     # a peer that does not read its replies
                except TimeoutError:
                    self._refuse("timeout", f"{who}: closed, it read no reply for "
                                            f"{self.idle_timeout:g} s")
                    writer.transport.abort()
                    return
                if decoder.pending and (decoder.consumed != taken or not deadline):
                    deadline = loop.time() + self.frame_timeout   # a new message began
                elif not decoder.pending:
                    deadline = 0.0
            if deadline:
                when: float | None = deadline
            elif writer in self.subscribers:
                when = None                      # waits for events; read only to see it close
            else:
                when = loop.time() + self.idle_timeout
            try:
                async with asyncio.timeout_at(when):
                    data = await reader.read(65536)
            except TimeoutError:
                if deadline:
                    self._refuse("timeout", f"{who}: closed, a message of {decoder.pending} bytes "
                                            f"was not whole within {self.frame_timeout:g} s")
                    writer.write(protocol.error(None, "timeout", f"a message was not whole "
                                                f"within {self.frame_timeout:g} s ([global] "
                                                f"admin_frame_timeout); closing"))
                else:
                    self.counts["idle"] += 1
                    log.debug("admin: %s: closed after %g s idle", who, self.idle_timeout)
                    writer.write(protocol.error(None, "idle_timeout", f"no request for "
                                                f"{self.idle_timeout:g} s ([global] "
                                                f"admin_idle_timeout); closing"))
                return
            if not data:
                return

    async def _one(self, obj: Any, writer: asyncio.StreamWriter, who: str,
                   scope: str | None = None) -> bytes:
        try:
            req = protocol.parse_request(obj)
        except AdminProtocolError as exc:
            return protocol.error(exc.id, exc.code, exc.message)
        req = dataclasses.replace(req, who=who, scope=scope)
        if req.op == "subscribe" and scope is None:     # [leases] a scoped one: the handler refuses
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


def preauth_per_source(max_connections: int) -> int:
    """Connections one source address may have open before they authenticate: an eighth of
    admin_max_connections (8 of the default 64), at least 1."""
    return max(1, max_connections // 8)


_PLURAL = {"over_cap": "connections refused over the cap", "backoff": "connections refused "
           "during a backoff", "unauthorized": "connections refused: failed authentication",
           "timeout": "connections closed at a deadline", "idle": "idle connections closed",
           "preauth_cap": "connections refused: too many not yet authenticated from one address"}
_PEERCRED = struct.Struct("3i")          # struct ucred: pid, uid, gid


def _with_cert(writer: asyncio.StreamWriter, who: str) -> str:
    """[tlsops] who, with the verified client certificate's subject CN when there is one."""
    cert = writer.get_extra_info("peercert")
    if not cert:
        return who
    cn = next((v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"), None)
    return f"{who} (certificate CN={cn})" if cn else f"{who} (client certificate)"


def _who(writer: asyncio.StreamWriter, tcp: bool) -> tuple[str, str]:
    """(who, source) of a connection: "unix uid=N pid=M" (SO_PEERCRED: the kernel's word, not
    the client's) or "tcp HOST:PORT"; source: the backoff table's key (guard.source_key)."""
    if not tcp:
        sock = writer.get_extra_info("socket")
        try:
            pid, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                           _PEERCRED.size))
        except (OSError, AttributeError, struct.error):
            return "unix", "unix"
        return f"unix uid={uid} pid={pid}", "unix"
    peer = writer.get_extra_info("peername")
    host, port = (str(peer[0]), peer[1]) if isinstance(peer, tuple) and len(peer) >= 2 else ("?", 0)
    text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"tcp {text}", guard.source_key(host)
