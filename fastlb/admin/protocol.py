"""The admin protocol, sans-IO: bytes in, requests out; replies to bytes. Documented for other
programs in docs/admin-protocol.md.

Owner: the wire format and the shape of every request. Rules:
  - Messages are msgpack maps written back to back on a stream, no length prefix (msgpack-rpc's
    framing), read with msgpack's streaming Unpacker; one message may be at most ``max_size``
    bytes (default 1 MiB).
  - A request is {"id": int, "op": str, ...fields}; each gets exactly one reply,
    {"id": id, "ok": true, "result": ...} or {"id": id, "ok": false, "error": {"code", "message"}}.
  - Bytes that are not msgpack, a message over the cap, or a value over REQUEST_LIMITS (an
    array, map, string... longer than any request needs): one error reply (id nil) and the
    stream is closed (its framing is lost). A msgpack value that is not a valid request
    (including one nested deeper than REQUEST_LIMITS.max_depth): an error reply, and the
    stream goes on.
  - Unknown fields are errors (a typo must not be ignored), as in the config.
  - TCP: the first message of a connection authenticates it ("token"), within PRE_AUTH_LIMITS
    (the server's glue enforces it: fastlb.admin.server).
The one error type at this boundary is AdminProtocolError; anything else escaping is a bug.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import msgpack

from fastlb.config import MAX_CONN, MAX_WEIGHT, STATES
from fastlb.errors import AdminProtocolError
from fastlb.unpacking import Limits, depth, limit_error

__all__ = [
    "REPLY_LIMITS",
    "REQUEST_LIMITS",
    "AdminProtocolError",
    "Decoder",
    "Request",
    "encode",
    "error",
    "event",
    "ok",
    "parse_request",
]

PROTOCOL_VERSION = 1
MAX_MESSAGE = 1 << 20

# What one request may hold; a value over these is refused at its header, before the unpacker
# allocates for it (fastlb/unpacking.py has the memory arithmetic).
REQUEST_LIMITS = Limits(
    max_buffer=MAX_MESSAGE,
    # The longest array a request holds is a service's backends (add_service). 4096 is 4x the
    # default slot table (1024 backends in all), so any service that fits the table fits one
    # request; bigger services belong in the config file. Worst stalled message:
    # 1024 nested headers x 4096 x 8 B = 32 MiB of (zeroed, mostly not resident) memory.
    max_array=4096,
    # A request map has at most 8 keys, a service table 8, a health table 15: 256 is room for
    # growth, and maps are not preallocated (a map costs only the bytes that arrived).
    max_map=256,
    # The longest legitimate string is a health check's send/expect text (bytes, not KiB);
    # 64 KiB is far above it and far below the 1 MiB message, so the error names the string.
    max_str=64 << 10,
    max_bin=64 << 10,          # no request carries binary; same bound so it gets a plain error
    max_ext=16,                # no request carries an extension; the largest standard one
                               # (timestamp 96) is 12 bytes
    # A request nests 5 deep at most (request > service > backends > backend > health).
    max_depth=16,
)
# The first message of a TCP connection, before it is authenticated: a request with a token
# (the client sends {"id", "op": "ping", "token"}: about 60 bytes with a 44-character token).
# Small enough that an unauthenticated peer costs little: 4 KiB of buffer, and at most
# 1024 x 16 x 8 = 128 KiB of preallocated (mostly not resident) arrays.
PRE_AUTH_MAX = 4096
TOKEN_MAX = 1024                 # characters in a token (fastlb.admin.guard.read_token)
PRE_AUTH_LIMITS = Limits(max_buffer=PRE_AUTH_MAX, max_array=16, max_map=16, max_str=TOKEN_MAX,
                         max_bin=16, max_ext=16, max_depth=16)
# What a reply may hold (fastlb.admin.client): the client trusts the server it chose, but a
# stats reply lists every backend of a service (up to the slot table, which grows with the
# config), so its bounds are wide; they still stop a runaway header.
REPLY_LIMITS = Limits(max_buffer=64 << 20, max_array=1 << 20, max_map=4096, max_str=1 << 20,
                      max_bin=1 << 20, max_ext=16, max_depth=1024)

# op -> {field: (type or types, required)}; every request may also carry "token" (TCP admin).
_STR, _INT, _NUM, _BOOL, _MAP = str, int, (int, float), bool, dict
OPS: dict[str, dict[str, tuple[Any, bool]]] = {
    "ping": {},
    "version": {},
    "services": {},
    "backends": {"service": (_STR, True)},
    "add_backend": {"service": (_STR, True), "address": (_STR, True), "weight": (_INT, False),
                    "state": (_STR, False)},
    "remove_backend": {"service": (_STR, True), "address": (_STR, True)},
    "set_weight": {"service": (_STR, True), "address": (_STR, True), "weight": (_INT, True)},
    # [limits] backends[].max_conns at run time (0: no cap), HAProxy's `set maxconn server`
    "set_max_conns": {"service": (_STR, True), "address": (_STR, True), "max_conns": (_INT, True)},
    "set_state": {"service": (_STR, True), "address": (_STR, True), "state": (_STR, True),
                  "timeout": (_NUM, False), "close": (_BOOL, False)},
    "add_service": {"service": (_MAP, True)},
    "remove_service": {"service": (_STR, True)},
    "stats": {},
    "subscribe": {},
    "reload": {},
    "workers": {},
    "restart_workers": {},
    "log_level": {"level": (_STR, False)},          # [obs] get (no level) or set
    # [leases] self-registration (fastlb/leases.py): ttl in seconds, metadata a map of strings
    "register": {"service": (_STR, True), "address": (_STR, True), "weight": (_INT, False),
                 "ttl": (_NUM, True), "metadata": (_MAP, False)},
    "renew": {"lease": (_STR, True)},
    "deregister": {"lease": (_STR, True)},
}
MUTATIONS = frozenset({"add_backend", "remove_backend", "set_weight", "set_state",
                       "add_service", "remove_service", "set_max_conns"})
# What the audit trail logs (fastlb.handlers.dispatch): every op that changes something.
CHANGES = MUTATIONS | {"reload", "restart_workers"}
CHANGES |= {"register", "deregister"}     # [leases] renew is not a change (1 line/s per instance)
# [leases] What a connection authenticated by a service's registration token may send (its
# first message is a ping carrying the token); any other op is refused with "forbidden".
SCOPED_OPS = frozenset({"ping", "register", "renew", "deregister"})


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)
    token: str | None = None
    # Who sent it, for the audit trail: "unix uid=N pid=M" or "tcp HOST:PORT" (set by the
    # server's glue, never by the client).
    who: str = ""
    # [leases] The service whose registration token authenticated the connection (set by the
    # server's glue); None: full rights (the operator token, or the owner-only unix socket).
    scope: str | None = None


class Decoder:
    """Feed bytes, get decoded msgpack values. Raises a fatal AdminProtocolError on bytes that
    are not msgpack, a message larger than ``max_size``, or a value over ``limits`` (the
    stream's framing is lost in each case)."""

    def __init__(self, max_size: int = MAX_MESSAGE, limits: Limits = REQUEST_LIMITS) -> None:
        self.max_size = max_size
        self.limits = limits
        self._unpacker = dataclasses.replace(limits, max_buffer=max_size).unpacker()
        self.fed = 0                 # bytes pushed so far
        # Bytes of the stream taken by the values returned so far (msgpack's tell() also counts
        # the part of a value it has parsed ahead, so it is read only after a whole value).
        self.consumed = 0

    @property
    def pending(self) -> int:
        """Bytes buffered that are not yet a whole value (a message under way)."""
        return self.fed - self.consumed

    def _too_large(self) -> AdminProtocolError:
        return AdminProtocolError("too_large", f"a message is larger than the "
                                  f"{self.max_size}-byte limit", fatal=True)

    def push(self, data: bytes) -> None:
        """Add bytes to the buffer; take the values out with ``next()`` / iteration."""
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull:
            raise self._too_large() from None
        self.fed += len(data)

    def __iter__(self) -> "Decoder":
        return self

    def __next__(self) -> Any:
        """The next whole value, StopIteration when the buffer holds none yet, or a fatal
        AdminProtocolError when the next value is bad (the values before it came out first)."""
        try:
            value = next(self._unpacker)
            self.consumed = self._unpacker.tell()
            return value
        except StopIteration:
            raise
        except msgpack.BufferFull:
            raise self._too_large() from None
        except Exception as exc:  # msgpack signals malformed input with several types
            if (words := limit_error(exc)) is not None:
                raise AdminProtocolError("too_large", f"a message holds {words}",
                                         fatal=True) from None
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise AdminProtocolError("bad_msgpack", f"the stream is not valid msgpack ({detail})",
                                     fatal=True) from None

    def feed(self, data: bytes) -> list[Any]:
        """push() and every whole value now in the buffer. On an error the values before the
        bad one are lost: a server that answers them uses push() and iteration."""
        self.push(data)
        return list(self)


def _kind(value: Any) -> str:
    return {dict: "a map", list: "an array", str: "a string", bytes: "binary", bool: "a boolean",
            int: "an integer", float: "a float", type(None): "nil"}.get(type(value), type(value).__name__)


def parse_request(obj: Any) -> Request:
    """A decoded msgpack value -> Request, or a (non-fatal) AdminProtocolError."""
    if not isinstance(obj, dict):
        raise AdminProtocolError("bad_request", f"a request must be a map, got {_kind(obj)}")
    rid = obj.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool):
        raise AdminProtocolError("bad_request", f"\"id\" must be an integer, got {_kind(rid)}")
    op = obj.get("op")
    if not isinstance(op, str):
        raise AdminProtocolError("bad_request", f"\"op\" must be a string, got {_kind(op)}", id=rid)
    if op not in OPS:
        raise AdminProtocolError("unknown_op", f"unknown op {op!r}; ops: {', '.join(OPS)}", id=rid)
    schema = OPS[op]
    token = obj.get("token")
    if token is not None and not isinstance(token, str):
        raise AdminProtocolError("bad_request", f"\"token\" must be a string, got {_kind(token)}", id=rid)
    args = {}
    for key, value in obj.items():
        if key in ("id", "op", "token"):
            continue
        if key not in schema:
            allowed = ", ".join(schema) or "none"
            raise AdminProtocolError("bad_request", f"{op}: unknown field {key!r}; fields: {allowed}",
                                     id=rid)
        want = schema[key][0]
        if not isinstance(value, want) or (isinstance(value, bool) and want is not _BOOL):
            name = {_STR: "a string", _INT: "an integer", _NUM: "a number", _BOOL: "a boolean",
                    _MAP: "a map"}[want]
            raise AdminProtocolError("bad_request", f"{op}: \"{key}\" must be {name}, got "
                                     f"{_kind(value)}", id=rid)
        # A map field is the only way to nest (the request is level 1): bound it before any
        # code walks or formats it. Checked after the cheap checks, so junk is refused cheaply.
        if isinstance(value, dict) and depth(value, REQUEST_LIMITS.max_depth) >= REQUEST_LIMITS.max_depth:
            raise AdminProtocolError("bad_request", f"{op}: \"{key}\" nests arrays and maps more than "
                                     f"{REQUEST_LIMITS.max_depth} deep in the request; none needs "
                                     f"more than 5", id=rid)
        args[key] = value
    for key, (_, required) in schema.items():
        if required and key not in args:
            raise AdminProtocolError("bad_request", f"{op}: missing field \"{key}\"", id=rid)
    if "weight" in args and not 1 <= args["weight"] <= MAX_WEIGHT:
        raise AdminProtocolError("bad_request", f"{op}: weight {args['weight']} out of range; "
                                 f"expected 1 to {MAX_WEIGHT}", id=rid)
    if "max_conns" in args and not 0 <= args["max_conns"] <= MAX_CONN:
        raise AdminProtocolError("bad_request", f"{op}: max_conns {args['max_conns']} out of "
                                 f"range; expected 0 (no cap) to {MAX_CONN}", id=rid)
    if "state" in args and op != "remove_service" and isinstance(args["state"], str) \
            and args["state"] not in STATES:
        raise AdminProtocolError("bad_request", f"{op}: state {args['state']!r} is not one of "
                                 f"{', '.join(STATES)}", id=rid)
    if "timeout" in args and not 0 < args["timeout"] <= 86400 * 7:
        raise AdminProtocolError("bad_request", f"{op}: timeout must be from 0 to 604800 seconds",
                                 id=rid)
    if op in ("register", "renew", "deregister"):                            # [leases]
        from fastlb.leases import check_register_args
        try:
            check_register_args(args)
        except AdminProtocolError as exc:
            raise AdminProtocolError(exc.code, exc.message, id=rid) from None
    return Request(rid, op, args, token)


def encode(message: dict[str, Any]) -> bytes:
    data: bytes = msgpack.packb(message, use_bin_type=True)
    return data


def ok(rid: int | None, result: Any) -> bytes:
    return encode({"id": rid, "ok": True, "result": result})


def error(rid: int | None, code: str, message: str) -> bytes:
    return encode({"id": rid, "ok": False, "error": {"code": code, "message": message}})


def event(rid: int, ev: dict[str, Any]) -> bytes:
    """A message of a subscription: the subscribe request's id and one event."""
    return encode({"id": rid, "event": ev})
