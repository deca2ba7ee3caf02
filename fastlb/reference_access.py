"""Slow, obviously correct pure-Python twins of the core's access pieces (tests only).

Owner: the definition of what the PROXY protocol codec (core/proxyproto.pxi), the access lists
(core/acl.pxi) and the per-source table (core/srclimit.pxi) must answer. Each mirrors the
contract of its fastlb._core counterpart, written the plainest way: the PROXY parser straight
from the specification's text (HAProxy doc/proxy-protocol.txt), the ACL as a linear scan with
``ipaddress``, the source table as a sequential model of the same rules. Clarity over speed.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from typing import Any

from fastlb.reference import xxh64

# -- PROXY protocol ----------------------------------------------------------------------------
DONE, NEED_MORE = 1, 0
NOT_PROXY, MALFORMED, UNSUPPORTED, TOO_LONG, CHECKSUM = -1, -2, -3, -4, -5
V1_MAX, V2_MAX = 107, 536
LOCAL, PROXY = 0, 1
FAM_UNSPEC, FAM_TCP4, FAM_TCP6, FAM_UNKNOWN = 0, 1, 2, 3
V1_SIG = b"PROXY "
V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"
# family/protocol byte -> address block length (spec 2.2, "the following protocol bytes")
V2_ADDR_LEN = {0x00: 0, 0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}
TYPE_AUTHORITY, TYPE_CRC32C, TYPE_SSL = 0x02, 0x03, 0x20
SUBTYPE_SSL_VERSION, SUBTYPE_SSL_CN = 0x21, 0x22

Addr = tuple[str, int] | None


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC32C bit by bit (reflected polynomial 0x82F63B78, RFC 4960 appendix B)."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def _header(length: int, version: int, command: int, family: int, raw_family: int = 0,
            src: Addr = None, dst: Addr = None, tlv_offset: int = 0,
            tlv_length: int = 0) -> dict[str, Any]:
    return {"length": length, "version": version, "command": command, "family": family,
            "raw_family": raw_family, "src": src, "dst": dst, "tlv_offset": tlv_offset,
            "tlv_length": tlv_length}


def _v1_port(text: bytes) -> int | None:
    if not (1 <= len(text) <= 5) or not all(48 <= b <= 57 for b in text):
        return None
    if len(text) > 1 and text[:1] == b"0":
        return None
    value = int(text)
    return value if value <= 65535 else None


def _v1_ip(text: bytes, v6: bool) -> str | None:
    if not text or len(text) > 45 or b"\0" in text:
        return None
    family = socket.AF_INET6 if v6 else socket.AF_INET
    try:
        raw = socket.inet_pton(family, text.decode("latin-1"))
    except (OSError, ValueError):
        return None
    return socket.inet_ntop(family, raw)


# What the line after "PROXY " may be so far (a prefix language): any byte that leaves it is
# refused at once, without waiting for the CRLF.
V1_PREFIX = re.compile(
    rb"(T(C(P([46]( [0-9A-Fa-f.: ]*)?)?)?)?|U(N(K(N(O(W(N( .*)?)?)?)?)?)?)?)?", re.S)


def _parse_v1(data: bytes) -> tuple[int, dict[str, Any] | None]:
    window = data[:V1_MAX]
    cr, lf = window.find(b"\r", 6), window.find(b"\n", 6)
    stop = min(p for p in (cr, lf, len(window)) if p != -1)
    if not V1_PREFIX.fullmatch(window[6:stop]):
        return MALFORMED, None
    if lf != -1 and (cr == -1 or lf < cr):
        return MALFORMED, None                      # a lone LF
    if cr == -1:
        return (TOO_LONG if len(data) >= V1_MAX else NEED_MORE), None
    if cr + 2 > V1_MAX:
        return TOO_LONG, None
    if cr + 1 >= len(data):
        return NEED_MORE, None
    if data[cr + 1:cr + 2] != b"\n":
        return MALFORMED, None                      # a lone CR
    line = data[6:cr]
    if line == b"UNKNOWN" or line.startswith(b"UNKNOWN "):
        return DONE, _header(cr + 2, 1, PROXY, FAM_UNKNOWN)
    if line[:5] not in (b"TCP4 ", b"TCP6 "):
        return MALFORMED, None
    v6 = line[3:4] == b"6"
    fields = line[5:].split(b" ")
    if len(fields) != 4:
        return MALFORMED, None
    src, dst = _v1_ip(fields[0], v6), _v1_ip(fields[1], v6)
    sport, dport = _v1_port(fields[2]), _v1_port(fields[3])
    if src is None or dst is None or sport is None or dport is None:
        return MALFORMED, None
    return DONE, _header(cr + 2, 1, PROXY, FAM_TCP6 if v6 else FAM_TCP4, 0,
                         (src, sport), (dst, dport))


def _parse_v2(data: bytes) -> tuple[int, dict[str, Any] | None]:
    if len(data) < 13:
        return NEED_MORE, None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2 or command not in (LOCAL, PROXY):
        return UNSUPPORTED, None
    if len(data) < 14:
        return NEED_MORE, None
    fam = data[13]
    if fam >> 4 > 3 or fam & 0x0F > 2:
        return MALFORMED, None
    if fam not in V2_ADDR_LEN:
        return UNSUPPORTED, None
    if len(data) < 16:
        return NEED_MORE, None
    total = 16 + int.from_bytes(data[14:16], "big")
    if total > V2_MAX:
        return TOO_LONG, None
    addr_len = V2_ADDR_LEN[fam]
    if total < 16 + addr_len:
        return MALFORMED, None
    if len(data) < total:
        return NEED_MORE, None
    family, src, dst = FAM_UNSPEC, None, None
    a = data[16:16 + addr_len]
    if command == PROXY and fam == 0x11:
        family = FAM_TCP4
        src = (socket.inet_ntop(socket.AF_INET, a[0:4]), int.from_bytes(a[8:10], "big"))
        dst = (socket.inet_ntop(socket.AF_INET, a[4:8]), int.from_bytes(a[10:12], "big"))
    elif command == PROXY and fam == 0x21:
        family = FAM_TCP6
        src = (socket.inet_ntop(socket.AF_INET6, a[0:16]), int.from_bytes(a[32:34], "big"))
        dst = (socket.inet_ntop(socket.AF_INET6, a[16:32]), int.from_bytes(a[34:36], "big"))
    tlvs = walk_tlvs(data, 16 + addr_len, total - 16 - addr_len)
    if tlvs is None:
        return MALFORMED, None
    crcs = [(off, value) for t, off, value in tlvs if t == TYPE_CRC32C]
    if len(crcs) > 1 or any(len(value) != 4 for _, value in crcs):
        return MALFORMED, None
    if crcs:
        off, value = crcs[0]
        zeroed = data[:off] + b"\0\0\0\0" + data[off + 4:total]
        if crc32c(zeroed) != int.from_bytes(value, "big"):
            return CHECKSUM, None
    return DONE, _header(total, 2, command, family, fam, src, dst, 16 + addr_len,
                         total - 16 - addr_len)


def walk_tlvs(data: bytes, offset: int, length: int) -> list[tuple[int, int, bytes]] | None:
    """[(type, value offset, value)] of the TLVs in data[offset:offset+length], or None when
    one overruns the region."""
    out = []
    end = offset + length
    while offset < end:
        if offset + 3 > end:
            return None
        size = int.from_bytes(data[offset + 1:offset + 3], "big")
        if offset + 3 + size > end:
            return None
        out.append((data[offset], offset + 3, bytes(data[offset + 3:offset + 3 + size])))
        offset += 3 + size
    return out


def parse_proxy(data: bytes) -> tuple[int, dict[str, Any] | None]:
    """The twin of _core.proxy_parse: ``(status, header or None)``."""
    data = bytes(data)
    if not data:
        return NEED_MORE, None
    for sig, parse in ((V1_SIG, _parse_v1), (V2_SIG, _parse_v2)):
        if data[:1] == sig[:1]:
            if not sig.startswith(data[:len(sig)]):
                return NOT_PROXY, None
            if len(data) < len(sig):
                return NEED_MORE, None
            return parse(data)
    return NOT_PROXY, None


def _ip(addr: Addr) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    return None if addr is None else ipaddress.ip_address(addr[0])


def build_v1(src: Addr, dst: Addr) -> bytes:
    s, d = _ip(src), _ip(dst)
    if src is None or dst is None or s is None or d is None:
        return b"PROXY UNKNOWN\r\n"
    if s.version == 4 and d.version == 4:
        return f"PROXY TCP4 {s} {d} {src[1]} {dst[1]}\r\n".encode()
    s6 = ipaddress.IPv6Address(f"::ffff:{s}") if s.version == 4 else s
    d6 = ipaddress.IPv6Address(f"::ffff:{d}") if d.version == 4 else d
    return (f"PROXY TCP6 {socket.inet_ntop(socket.AF_INET6, s6.packed)} "
            f"{socket.inet_ntop(socket.AF_INET6, d6.packed)} {src[1]} {dst[1]}\r\n").encode()


def _tlv(type_: int, value: bytes) -> bytes:
    return bytes([type_]) + len(value).to_bytes(2, "big") + value


def build_v2(src: Addr, dst: Addr, *, command: int = PROXY, authority: bytes | None = None,
             ssl: dict[str, Any] | None = None, crc: bool = False) -> bytes:
    s, d = _ip(src), _ip(dst)
    body = b""
    fam = 0x00
    if command == PROXY and src is not None and dst is not None and s and d:
        if s.version == 4 and d.version == 4:
            fam = 0x11
            body = s.packed + d.packed + src[1].to_bytes(2, "big") + dst[1].to_bytes(2, "big")
        else:
            fam = 0x21
            s6 = s.packed if s.version == 6 else b"\0" * 10 + b"\xff\xff" + s.packed
            d6 = d.packed if d.version == 6 else b"\0" * 10 + b"\xff\xff" + d.packed
            body = s6 + d6 + src[1].to_bytes(2, "big") + dst[1].to_bytes(2, "big")
    if authority:
        body += _tlv(TYPE_AUTHORITY, authority)
    if ssl is not None:
        value = bytes([ssl.get("client", 1)]) + ssl.get("verify", 0).to_bytes(4, "big")
        if ssl.get("version"):
            value += _tlv(SUBTYPE_SSL_VERSION, ssl["version"])
        if ssl.get("cn"):
            value += _tlv(SUBTYPE_SSL_CN, ssl["cn"])
        body += _tlv(TYPE_SSL, value)
    if crc:
        body += _tlv(TYPE_CRC32C, b"\0\0\0\0")
    header = V2_SIG + bytes([0x20 | command, fam]) + len(body).to_bytes(2, "big") + body
    if crc:
        header = header[:-4] + crc32c(header).to_bytes(4, "big")
    return header


# -- access lists ------------------------------------------------------------------------------
class RefAcl:
    """Deny wins; an empty allow admits everyone; IPv4-mapped IPv6 clients are IPv4."""

    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None:
        self.allow = [ipaddress.ip_network(c) for c in allow]
        self.deny = [ipaddress.ip_network(c) for c in deny]

    def admits(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if any(addr in net for net in self.deny if net.version == addr.version):
            return False
        if not self.allow:
            return True
        return any(addr in net for net in self.allow if net.version == addr.version)


# -- per-source table --------------------------------------------------------------------------
ADMIT, REFUSED_CONNS, REFUSED_RATE, TABLE_FULL = 0, 1, 2, 3
PROBE = 8
MAX_CONNS = 65535
SRC_SEED = 0x5352434C494D4954


def source_key_bytes(ip: str) -> bytes:
    """The 16 bytes a source is hashed by: an IPv4 address (mapped), or an IPv6 /64."""
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        return b"\0" * 10 + b"\xff\xff" + addr.packed
    if addr.ipv4_mapped is not None:
        return addr.packed
    return addr.packed[:8] + b"\0" * 8


class RefSourceTable:
    """The same rules as SourceTable, one process, entries as a list of [key, conns, tat]."""

    def __init__(self, entries: int) -> None:
        self.mask = entries - 1
        self.table = [[0, 0, 0] for _ in range(entries)]

    def _window(self, h: int) -> list[int]:
        return [(h + i) & self.mask for i in range(PROBE)]

    def acquire(self, ip: str, now_ms: int, max_conns: int = 0, rate: int = 0,
                burst: int = 1) -> tuple[int, int]:
        if max_conns == 0 and rate == 0:
            return ADMIT, -1
        h = xxh64(source_key_bytes(ip), SRC_SEED)
        key = (h >> 16) or 1
        now = now_ms * 1_000_000
        cap = max_conns if 0 < max_conns < MAX_CONNS else MAX_CONNS
        mine = [j for j in self._window(h) if self.table[j][0] == key]
        if mine:
            e = mine[0]
            if self.table[e][1] >= cap:
                return REFUSED_CONNS, -1
        else:
            free = [j for j in self._window(h)
                    if self.table[j][0] == 0 or (self.table[j][1] == 0 and self.table[j][2] <= now)]
            if not free:
                return TABLE_FULL, -1
            e = free[0]
            self.table[e][0], self.table[e][1] = key, 0
        self.table[e][1] += 1
        if rate:
            period = 1_000_000_000 // rate
            new_tat = max(self.table[e][2], now) + period
            if new_tat - now > period * max(burst, 1):
                self.table[e][1] -= 1
                return REFUSED_RATE, -1
            self.table[e][2] = new_tat
        return ADMIT, e

    def release(self, entry: int) -> None:
        if entry >= 0:
            assert self.table[entry][1] > 0, "released twice"
            self.table[entry][1] -= 1

    def conns(self, ip: str) -> int:
        h = xxh64(source_key_bytes(ip), SRC_SEED)
        key = (h >> 16) or 1
        return sum(self.table[j][1] for j in self._window(h) if self.table[j][0] == key)
