"""The admin protocol, sans-IO: bytes in, requests out; replies to bytes. Documented for other
programs in docs/admin-protocol.md.

Owner: the wire format and the shape of every request. Rules:
  - Messages are msgpack maps written back to back on a stream, no length prefix (msgpack-rpc's
    framing), read with msgpack's streaming Unpacker; one message may be at most ``max_size``
    bytes (default 1 MiB).
  - A request is {"id": int, "op": str, ...fields}; each gets exactly one reply,
    {"id": id, "ok": true, "result": ...} or {"id": id, "ok": false, "error": {"code", "message"}}.
  - Bytes that are not msgpack, or a message over the cap: one error reply (id nil) and the
    stream is closed (its framing is lost). A msgpack value that is not a valid request: an
    error reply, and the stream goes on.
  - Unknown fields are errors (a typo must not be ignored), as in the config.
The one error type at this boundary is AdminProtocolError; anything else escaping is a bug.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from fastlb.config import MAX_WEIGHT, STATES
from fastlb.errors import FastLBError

PROTOCOL_VERSION = 1
MAX_MESSAGE = 1 << 20

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
    "set_state": {"service": (_STR, True), "address": (_STR, True), "state": (_STR, True),
                  "timeout": (_NUM, False), "close": (_BOOL, False)},
    "add_service": {"service": (_MAP, True)},
    "remove_service": {"service": (_STR, True)},
    "stats": {},
    "subscribe": {},
    "reload": {},
    "workers": {},
    "restart_workers": {},
}
MUTATIONS = frozenset({"add_backend", "remove_backend", "set_weight", "set_state",
                       "add_service", "remove_service"})


class AdminProtocolError(FastLBError):
    """A request (or the stream) is invalid. ``fatal``: the stream cannot go on."""

    def __init__(self, code: str, message: str, *, id: int | None = None, fatal: bool = False):
        self.code = code
        self.message = message
        self.id = id
        self.fatal = fatal
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)
    token: str | None = None


class Decoder:
    """Feed bytes, get decoded msgpack values. Raises a fatal AdminProtocolError on bytes that
    are not msgpack or a message larger than ``max_size``."""

    def __init__(self, max_size: int = MAX_MESSAGE) -> None:
        self.max_size = max_size
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max_size,
                                          strict_map_key=False)

    def feed(self, data: bytes) -> list[Any]:
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull:
            raise AdminProtocolError("too_large", f"a message is larger than the "
                                     f"{self.max_size}-byte limit", fatal=True) from None
        out = []
        try:
            for obj in self._unpacker:
                out.append(obj)
        except msgpack.BufferFull:
            raise AdminProtocolError("too_large", f"a message is larger than the "
                                     f"{self.max_size}-byte limit", fatal=True) from None
        except Exception as exc:  # msgpack signals malformed input with several types
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise AdminProtocolError("bad_msgpack", f"the stream is not valid msgpack ({detail})",
                                     fatal=True) from None
        return out


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
        args[key] = value
    for key, (_, required) in schema.items():
        if required and key not in args:
            raise AdminProtocolError("bad_request", f"{op}: missing field \"{key}\"", id=rid)
    if "weight" in args and not 1 <= args["weight"] <= MAX_WEIGHT:
        raise AdminProtocolError("bad_request", f"{op}: weight {args['weight']} out of range; "
                                 f"expected 1 to {MAX_WEIGHT}", id=rid)
    if "state" in args and op != "remove_service" and isinstance(args["state"], str) \
            and args["state"] not in STATES:
        raise AdminProtocolError("bad_request", f"{op}: state {args['state']!r} is not one of "
                                 f"{', '.join(STATES)}", id=rid)
    if "timeout" in args and not 0 < args["timeout"] <= 86400 * 7:
        raise AdminProtocolError("bad_request", f"{op}: timeout must be from 0 to 604800 seconds",
                                 id=rid)
    return Request(rid, op, args, token)


def encode(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def ok(rid: int | None, result: Any) -> bytes:
    return encode({"id": rid, "ok": True, "result": result})


def error(rid: int | None, code: str, message: str) -> bytes:
    return encode({"id": rid, "ok": False, "error": {"code": code, "message": message}})


def event(rid: int, ev: dict) -> bytes:
    """A message of a subscription: the subscribe request's id and one event."""
    return encode({"id": rid, "event": ev})
