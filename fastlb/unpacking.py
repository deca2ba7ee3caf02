"""Bounded msgpack decoding: the limits every decoder of outside bytes uses (the admin socket,
the state file), and the words for a value that breaks one.

Owner: the arithmetic of what a hostile or corrupt input can cost before it is refused. Rules:
  - msgpack's C unpacker preallocates an array when it reads its header (``PyList_New(n)``:
    8 bytes per element, before any element arrived); maps and strings grow only with bytes that
    did arrive. So ``max_array_len`` is what bounds memory, together with the unpacker's fixed
    stack of 1024 nested containers (msgpack 1.x; 1025 raise StackError, checked by a test):
    one stalled half-message holds at most 1024 x max_array_len x 8 bytes.
  - msgpack has no depth limit of its own below that 1024; ``depth`` measures a decoded value
    (iteratively) so callers refuse values nested deeper than they ever need, before code that
    recurses or formats them (``repr`` of a 1000-deep list raises RecursionError).
No I/O here; callers turn ``limit_error`` into their own error type.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgpack

# msgpack's own nesting ceiling (the C unpacker's fixed stack): a value nested deeper raises
# msgpack.StackError whatever the limits below say (tests/unit/test_unpacking.py checks it).
MSGPACK_STACK = 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-value bounds for msgpack.Unpacker (all counts are elements, lengths bytes)."""
    max_buffer: int        # one message, whole
    max_array: int
    max_map: int
    max_str: int
    max_bin: int
    max_ext: int
    max_depth: int         # checked on the decoded value by ``depth``; <= MSGPACK_STACK

    def unpacker(self) -> msgpack.Unpacker:
        return msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=self.max_buffer,
                                max_array_len=self.max_array, max_map_len=self.max_map,
                                max_str_len=self.max_str, max_bin_len=self.max_bin,
                                max_ext_len=self.max_ext)

    def unpackb(self, data: bytes) -> Any:
        """One whole value; raises what msgpack raises (see ``limit_error``)."""
        return msgpack.unpackb(data, raw=False, strict_map_key=True,
                               max_array_len=self.max_array, max_map_len=self.max_map,
                               max_str_len=self.max_str, max_bin_len=self.max_bin,
                               max_ext_len=self.max_ext)

    def worst_case_bytes(self) -> int:
        """What one half-received message can make the unpacker hold (see the module rules)."""
        return self.max_buffer + MSGPACK_STACK * self.max_array * 8


_KINDS = {"array": "an array of {n} elements", "map": "a map of {n} entries",
          "str": "a string of {n} bytes", "bin": "binary data of {n} bytes",
          "ext": "an extension value of {n} bytes"}
_LIMIT_RX = re.compile(r"(\d+) exceeds max_(array|map|str|bin|ext)_len\((\d+)\)")


def limit_error(exc: BaseException) -> str | None:
    """Words for an exception of msgpack that is one of our limits, else None."""
    if isinstance(exc, msgpack.StackError):
        return f"values nested more than {MSGPACK_STACK} deep"
    m = _LIMIT_RX.search(str(exc))
    if m is None:
        return None
    n, kind, limit = m.groups()
    return f"{_KINDS[kind].format(n=n)}, over the limit of {limit}"


_CONTAINERS = (list, tuple, dict)


def depth(value: Any, limit: int) -> int:
    """How deeply ``value`` nests arrays and maps (a scalar is 0, ``[]`` is 1), counting no
    further than ``limit + 1``: enough to say it is too deep. Level by level, no recursion, so
    any depth is safe; about 30 ns per element (a 1 MiB message of small ints: 30 ms)."""
    level = [value] if type(value) in _CONTAINERS else []
    d = 0
    while level:
        d += 1
        if d > limit:
            return d
        below: list[Any] = []
        for v in level:
            below += [c for c in (v.values() if type(v) is dict else v) if type(c) in _CONTAINERS]
        level = below
    return d
