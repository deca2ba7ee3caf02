"""The state file's bytes: encoding and decoding of versions 1, 2 and 3 (no file handling).

Owner: the on-disk format. Version 2 is a 56-byte header (magic ``\xc1fastlb-state\r\n``,
whose first byte msgpack never uses, so it cannot be mistaken for version 1; version; body
length; SHA-256 of header and body) and a msgpack body ``{"registry": [...], "config": [...]}``
of ``[[service]]`` tables (config.service_to_dict). Version 1 (a bare msgpack map with
``"format": "fastlb-state"``) is still read. Version 3 ([leases]) is version 2 with a third
list in the body, ``"leases"`` (fastlb.leases.Lease.to_wire: id, service, address, weight, ttl,
metadata); a version 3 file is written, 1 and 2 are read (with no leases). Why a new version
rather than a new key: a fastlb that does not know leases would keep the registered backends
forever; it refuses the file instead, loudly. fastlb.statefile writes and reads the files.
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from fastlb import config
from fastlb.config import Service
from fastlb.errors import ConfigError, StateUnusable
from fastlb.unpacking import Limits, depth, limit_error

FORMAT = "fastlb-state"       # version 1's "format" value
VERSION = 3                                # [leases] 3: + "leases"; 2 is still read
READS = (2, 3)                             # the versions with the header
MAGIC = b"\xc1fastlb-state\r\n"
_HEAD = struct.Struct(">15sBQ")            # magic, version, body length
HEADER_SIZE = _HEAD.size + 32              # + SHA-256
# A service table nests 5 deep inside the body (body > registry > service > backends > backend
# > health); 16 leaves room for new fields and keeps error messages (repr) from recursing.
MAX_DEPTH = 16

Tables = dict[str, Service]


Unusable = StateUnusable          # the name both state file modules use


def encode(registry: Mapping[str, Service], cfg: Mapping[str, Service],
           leases: Sequence[Mapping[str, Any]] = ()) -> bytes:
    """The version-3 bytes of a state file."""
    body: bytes = msgpack.packb({"registry": [config.service_to_dict(s) for s in registry.values()],
                                 "config": [config.service_to_dict(s) for s in cfg.values()],
                                 "leases": [dict(x) for x in leases]},                # [leases]
                                use_bin_type=True)
    head = _HEAD.pack(MAGIC, VERSION, len(body))
    digest = hashlib.sha256(head)
    digest.update(body)
    return head + digest.digest() + body


def _limits(size: int) -> Limits:
    # No array, map or string can hold more elements or bytes than the body has bytes (each
    # element takes at least one), so these refuse only headers that cannot be true; with them
    # an array header is refused before msgpack preallocates for it, which keeps the decoder
    # under 8x the file.
    return Limits(max_buffer=size, max_array=size, max_map=size, max_str=size, max_bin=size,
                  max_ext=size, max_depth=MAX_DEPTH)


def _unpack(body: bytes) -> object:
    lim = _limits(max(len(body), 1))
    try:
        doc = lim.unpackb(body)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types for bad input
        words = limit_error(exc) or f"{type(exc).__name__}: {exc}"
        raise Unusable(f"not valid msgpack ({words})") from None
    if depth(doc, MAX_DEPTH) > MAX_DEPTH:
        raise Unusable(f"corrupt: values nested deeper than {MAX_DEPTH}")
    return doc


def decode(raw: bytes) -> tuple[Tables, Tables]:
    """(registry, config) from the bytes of a state file of version 1, 2 or 3; raises Unusable."""
    registry, cfg, _ = decode_all(raw)
    return registry, cfg


def decode_all(raw: bytes) -> tuple[Tables, Tables, list[dict[str, Any]]]:
    """(registry, config, leases) from the bytes of a state file; raises Unusable. Files
    before version 3 hold no leases ([])."""
    if not raw:
        raise Unusable("it is empty (0 bytes): torn")
    if raw.startswith(MAGIC[:1]):
        if len(raw) < HEADER_SIZE:
            raise Unusable(f"torn: {len(raw)} bytes, shorter than the {HEADER_SIZE}-byte header")
        magic, version, length = _HEAD.unpack_from(raw)
        if magic != MAGIC:
            raise Unusable("corrupt: its header does not start with the fastlb-state magic")
        if len(raw) != HEADER_SIZE + length:
            raise Unusable(f"torn or corrupt: its header announces {length} bytes of data, the file "
                            f"holds {len(raw) - HEADER_SIZE}")
        digest = hashlib.sha256(raw[:_HEAD.size])
        digest.update(memoryview(raw)[HEADER_SIZE:])
        if digest.digest() != raw[_HEAD.size:HEADER_SIZE]:
            raise Unusable("corrupt: its SHA-256 checksum does not match its contents")
        if version not in READS:
            raise Unusable(f"version {version}, which this fastlb does not read (it reads 1 to "
                            f"{VERSION}): a newer fastlb wrote it")
        doc = _unpack(raw[HEADER_SIZE:])
        if not isinstance(doc, dict):
            raise Unusable("corrupt: its body is not a map")
    else:                                               # version 1: a bare msgpack map
        doc = _unpack(raw)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise Unusable("not a fastlb state file (no fastlb-state header, and not a "
                            "version-1 map with \"format\": \"fastlb-state\")")
        if doc.get("version") != 1:
            raise Unusable(f"unknown version {doc.get('version')!r} (this fastlb reads versions "
                            f"1 to {VERSION})")
    out = []
    for part in ("registry", "config"):
        tables = doc.get(part)
        if not isinstance(tables, list):
            raise Unusable(f"\"{part}\" is not a list")
        services: Tables = {}
        for i, table in enumerate(tables):
            try:
                svc = config.service_from_dict(table, f"{part}[{i}]")
            except ConfigError as exc:
                raise Unusable(str(exc)) from None
            services[svc.name] = svc
        out.append(services)
    try:                                                                       # [leases]
        from fastlb.leases import from_wire
        leases = from_wire(doc.get("leases", []), "\"leases\"")
    except ValueError as exc:
        raise Unusable(f"corrupt: {exc}") from None
    return out[0], out[1], leases
