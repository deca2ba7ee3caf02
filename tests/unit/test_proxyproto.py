"""PROXY protocol v1/v2 codec (core/proxyproto.pxi) against the specification
(HAProxy doc/proxy-protocol.txt) and against its pure-Python twin (fastlb/reference_access.py).

h11's discipline: every header whole, byte by byte and with trailing payload; a fuzz invariant
(parses or returns an error code, never crashes, never consumes or reads past the buffer)."""
import ctypes
import ipaddress
import mmap
import os
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastlb import _core
from fastlb import reference_access as ref
from fastlb.errors import CoreArgumentError, CoreTypeError

parse = _core.proxy_parse
SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(cmd_fam: bytes, body: bytes, length=None) -> bytes:
    return SIG + cmd_fam + struct.pack("!H", len(body) if length is None else length) + body


def both(data):
    """The core's verdict, checked equal to the twin's."""
    got = parse(data)
    assert got == ref.parse_proxy(data), data
    return got


def assert_incremental(header: bytes, trailing: bytes = b"PAYLOAD"):
    """NEED_MORE for every proper prefix, DONE for the whole, trailing bytes left alone."""
    for i in range(len(header)):
        assert both(header[:i]) == (_core.PP_NEED_MORE, None), (i, header[:i])
    status, h = both(header)
    assert status == _core.PP_DONE and h["length"] == len(header)
    status2, h2 = both(header + trailing)
    assert status2 == _core.PP_DONE and h2 == h
    return h


# -- v1: the specification's examples and rules ------------------------------------------------

def test_v1_tcp4_example():
    line = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"
    assert len(line) == 56                     # the spec's TCP/IPv4 maximum
    h = assert_incremental(line)
    assert (h["version"], h["command"], h["family"]) == (1, _core.PP_CMD_PROXY, _core.PP_FAM_TCP4)
    assert h["src"] == ("255.255.255.255", 65535) and h["dst"] == ("255.255.255.255", 65535)
    h = assert_incremental(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
                           b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n")
    assert h["src"] == ("192.168.0.1", 56324) and h["dst"] == ("192.168.0.11", 443)
    assert h["length"] == 47


def test_v1_tcp6_maximum_and_unknown_worst_case():
    full = "ffff:" * 7 + "ffff"
    line = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    assert len(line) == 104                    # the spec's TCP/IPv6 maximum
    h = assert_incremental(line)
    assert h["family"] == _core.PP_FAM_TCP6 and h["src"] == (str(ipaddress.ip_address(full)), 65535)
    worst = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()
    assert len(worst) == 107 == _core.PP_V1_MAX   # the spec's worst case, accepted
    h = assert_incremental(worst)
    assert h["family"] == _core.PP_FAM_UNKNOWN and h["src"] is None and h["dst"] is None


def test_v1_unknown_short_form_ignores_the_rest():
    h = assert_incremental(b"PROXY UNKNOWN\r\n")
    assert h["family"] == _core.PP_FAM_UNKNOWN and h["length"] == 15
    assert both(b"PROXY UNKNOWN anything at all, ignored\r\n")[0] == _core.PP_DONE
    assert both(b"PROXY UNKNOWNX\r\n")[0] == _core.PP_ERR_MALFORMED


def test_v1_too_long_without_crlf_in_107_bytes():
    assert both(b"PROXY UNKNOWN " + b"x" * 92)[0] == _core.PP_NEED_MORE   # 106 bytes
    assert both(b"PROXY UNKNOWN " + b"x" * 93)[0] == _core.PP_ERR_TOO_LONG  # 107, no CRLF
    assert both(b"PROXY UNKNOWN " + b"x" * 92 + b"\r")[0] == _core.PP_ERR_TOO_LONG  # LF would be 108th
    assert both(b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n")[0] == _core.PP_DONE      # 107 with CRLF


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",          # lone LF
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",         # lone CR
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n\r",
    b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",       # heading zero in an address
    b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",       # heading zero in a port
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",    # port out of range
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n",
    b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",       # two spaces
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",       # trailing space
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",          # a field missing
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",      # a field too many
    b"PROXY TCP4 ::1 ::1 1 2\r\n",                # family mismatch
    b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP6 ::1::2 ::1 1 2\r\n",             # two double colons
    b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4\x00 5.6.7.8 1 2\r\n",    # NUL inside an address
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY \r\n",
    b"PROXY TCP4\r\n",
])
def test_v1_malformed(line):
    assert both(line) == (_core.PP_ERR_MALFORMED, None)
    assert both(line + b"payload") == (_core.PP_ERR_MALFORMED, None)


@pytest.mark.parametrize("partial,status", [
    (b"PROXY TCQ", _core.PP_ERR_MALFORMED),
    (b"PROXY TCP5", _core.PP_ERR_MALFORMED),
    (b"PROXY TCP4-", _core.PP_ERR_MALFORMED),
    (b"PROXY TCP4 1.2.3.4 x", _core.PP_ERR_MALFORMED),    # refused before any CRLF arrives
    (b"PROXY TCP6 ::1 \x00", _core.PP_ERR_MALFORMED),
    (b"PROXY UNKNOWNX", _core.PP_ERR_MALFORMED),
    (b"PROXY X", _core.PP_ERR_MALFORMED),
    (b"PROXY TCP4 1.2.3.4 5.6", _core.PP_NEED_MORE),
    (b"PROXY TCP6 fe80::AB:cd", _core.PP_NEED_MORE),
    (b"PROXY UNK", _core.PP_NEED_MORE),
    (b"PROXY UNKNOWN \x00\xff anything", _core.PP_NEED_MORE),
])
def test_v1_wrong_bytes_are_refused_as_they_arrive(partial, status):
    assert both(partial) == (status, None)


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00", b"PROXX",
                                  b"proxy TCP4", b"PROXYTCP4", b"\r\n\r\n\x00\r\nQUIX\n",
                                  b"\r\n\r\x0d", b"\x00"])
def test_not_a_proxy_header_is_refused_at_the_first_wrong_byte(data):
    assert both(data) == (_core.PP_ERR_NOT_PROXY, None)


def test_empty_and_signature_prefixes_need_more():
    for data in (b"", b"P", b"PROX", b"PROXY", b"\r", b"\r\n\r\n\x00\r\nQUI", SIG, SIG + b"\x21"):
        assert both(data) == (_core.PP_NEED_MORE, None)


# -- v2 ----------------------------------------------------------------------------------------

def test_v2_tcp4_and_tcp6_addresses():
    body = socket.inet_aton("10.1.2.3") + socket.inet_aton("10.9.8.7") + struct.pack("!HH", 4000, 443)
    h = assert_incremental(v2(b"\x21\x11", body))
    assert (h["version"], h["command"], h["family"], h["raw_family"]) == (2, 1, 1, 0x11)
    assert h["src"] == ("10.1.2.3", 4000) and h["dst"] == ("10.9.8.7", 443)
    assert (h["tlv_offset"], h["tlv_length"]) == (28, 0)
    s6, d6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1"), socket.inet_pton(socket.AF_INET6, "::1")
    h = assert_incremental(v2(b"\x21\x21", s6 + d6 + struct.pack("!HH", 1, 65535)))
    assert h["family"] == _core.PP_FAM_TCP6
    assert h["src"] == ("2001:db8::1", 1) and h["dst"] == ("::1", 65535)
    assert h["length"] == 16 + 36


def test_v2_local_ignores_family_and_addresses_but_skips_them():
    body = socket.inet_aton("10.1.2.3") * 2 + struct.pack("!HH", 1, 2)
    h = assert_incremental(v2(b"\x20\x11", body))
    assert (h["command"], h["family"], h["src"], h["dst"]) == (_core.PP_CMD_LOCAL, 0, None, None)
    assert h["length"] == 28 and h["tlv_offset"] == 28
    h = assert_incremental(v2(b"\x20\x00", b""))          # what a health check sends
    assert h["length"] == 16 and h["family"] == _core.PP_FAM_UNSPEC


def test_v2_unspec_and_unserved_families_fall_back_to_unspec():
    h = assert_incremental(v2(b"\x21\x00", b"\x04\x00\x02ab"))  # PROXY + UNSPEC, a NOOP TLV
    assert h["family"] == _core.PP_FAM_UNSPEC and h["src"] is None
    assert (h["tlv_offset"], h["tlv_length"]) == (16, 5)
    for fam, alen in ((0x12, 12), (0x22, 36), (0x31, 216), (0x32, 216)):
        h = assert_incremental(v2(bytes([0x21, fam]), bytes(alen)))
        assert h["family"] == _core.PP_FAM_UNSPEC and h["raw_family"] == fam
        assert h["src"] is None and h["length"] == 16 + alen


@pytest.mark.parametrize("data,code", [
    (v2(b"\x11\x11", bytes(12)), _core.PP_ERR_UNSUPPORTED),       # version 1 in a v2 header
    (v2(b"\x31\x11", bytes(12)), _core.PP_ERR_UNSUPPORTED),       # version 3
    (v2(b"\x22\x11", bytes(12)), _core.PP_ERR_UNSUPPORTED),       # command 2
    (v2(b"\x21\x41", bytes(12)), _core.PP_ERR_MALFORMED),         # family 4
    (v2(b"\x21\x13", bytes(12)), _core.PP_ERR_MALFORMED),         # protocol 3
    (v2(b"\x21\x10", bytes(12)), _core.PP_ERR_UNSUPPORTED),       # AF_INET without protocol
    (v2(b"\x21\x01", bytes(12)), _core.PP_ERR_UNSUPPORTED),
    (v2(b"\x21\x11", bytes(11)), _core.PP_ERR_MALFORMED),         # shorter than its addresses
    (v2(b"\x21\x21", bytes(35)), _core.PP_ERR_MALFORMED),
    (v2(b"\x20\x31", bytes(200)), _core.PP_ERR_MALFORMED),
    (v2(b"\x21\x11", bytes(12) + b"\x04\x00"), _core.PP_ERR_MALFORMED),           # TLV header cut
    (v2(b"\x21\x11", bytes(12) + b"\x04\x00\x05abcd"), _core.PP_ERR_MALFORMED),   # value overruns
    (v2(b"\x21\x11", bytes(12) + b"\x03\x00\x03abc"), _core.PP_ERR_MALFORMED),    # CRC not 4 bytes
])
def test_v2_rejections(data, code):
    assert both(data) == (code, None)


def test_v2_errors_are_reported_before_the_body_arrives():
    assert both(SIG + b"\x11")[0] == _core.PP_ERR_UNSUPPORTED
    assert both(SIG + b"\x21\x51")[0] == _core.PP_ERR_MALFORMED
    assert both(SIG + b"\x21\x11\x00\x05")[0] == _core.PP_ERR_MALFORMED   # len < 12
    assert both(SIG + b"\x21\x11\x02\x09")[0] == _core.PP_ERR_TOO_LONG     # 16 + 521 > 536


def test_v2_length_bound():
    assert _core.PP_V2_MAX == 536
    biggest = v2(b"\x21\x11", bytes(12) + b"\x04" + struct.pack("!H", 536 - 16 - 12 - 3)
                 + bytes(536 - 16 - 12 - 3))
    assert len(biggest) == 536 and both(biggest)[0] == _core.PP_DONE
    assert both(v2(b"\x21\x00", b"", length=521))[0] == _core.PP_ERR_TOO_LONG
    assert both(v2(b"\x21\x00", b"", length=65535))[0] == _core.PP_ERR_TOO_LONG


def test_v2_crc32c():
    assert _core.crc32c(b"123456789") == ref.crc32c(b"123456789") == 0xE3069283  # RFC 3720 check
    good = _core.proxy_build_v2(("192.0.2.1", 1234), ("192.0.2.2", 443), crc32c=True)
    h = assert_incremental(good)
    found = _core.proxy_tlv_find(good, h["tlv_offset"], h["tlv_length"], _core.PP2_TYPE_CRC32C)
    assert found == (len(good) - 4, 4)
    bad = good[:-1] + bytes([good[-1] ^ 1])
    assert both(bad) == (_core.PP_ERR_CHECKSUM, None)
    flipped = bytearray(good)
    flipped[20] ^= 0x80                          # an address bit: the checksum catches it
    assert both(bytes(flipped)) == (_core.PP_ERR_CHECKSUM, None)
    twice = v2(b"\x21\x11", bytes(12) + b"\x03\x00\x04abcd" * 2)
    assert both(twice) == (_core.PP_ERR_MALFORMED, None)


def test_v2_tlvs_built_and_found():
    hdr = _core.proxy_build_v2(("2001:db8::7", 50000), ("2001:db8::1", 443),
                               authority=b"example.com",
                               ssl={"client": 0x05, "verify": 7, "version": b"TLSv1.3",
                                    "cn": b"client.example"}, crc32c=True)
    assert hdr == ref.build_v2(("2001:db8::7", 50000), ("2001:db8::1", 443),
                               authority=b"example.com",
                               ssl={"client": 0x05, "verify": 7, "version": b"TLSv1.3",
                                    "cn": b"client.example"}, crc=True)
    h = assert_incremental(hdr)
    off, length = h["tlv_offset"], h["tlv_length"]
    a = _core.proxy_tlv_find(hdr, off, length, _core.PP2_TYPE_AUTHORITY)
    assert hdr[a[0]:a[0] + a[1]] == b"example.com"
    s_off, s_len = _core.proxy_tlv_find(hdr, off, length, _core.PP2_TYPE_SSL)
    assert hdr[s_off] == 0x05 and struct.unpack("!I", hdr[s_off + 1:s_off + 5]) == (7,)
    v = _core.proxy_tlv_find(hdr, s_off + 5, s_len - 5, _core.PP2_SUBTYPE_SSL_VERSION)
    c = _core.proxy_tlv_find(hdr, s_off + 5, s_len - 5, _core.PP2_SUBTYPE_SSL_CN)
    assert hdr[v[0]:v[0] + v[1]] == b"TLSv1.3" and hdr[c[0]:c[0] + c[1]] == b"client.example"
    assert _core.proxy_tlv_find(hdr, off, length, _core.PP2_TYPE_UNIQUE_ID) is None
    assert [t for t, _, _ in ref.walk_tlvs(hdr, off, length)] == [0x02, 0x20, 0x03]
    with pytest.raises(CoreArgumentError, match="overruns"):
        _core.proxy_tlv_find(b"\x04\x00\x09ab", 0, 5, 1)
    with pytest.raises(CoreArgumentError, match="outside the data"):
        _core.proxy_tlv_find(b"abc", 1, 5, 1)


def test_builders_refuse_what_receivers_would_refuse():
    with pytest.raises(CoreArgumentError, match="exceed 536"):
        _core.proxy_build_v2(("1.2.3.4", 1), ("1.2.3.4", 2), authority=b"x" * 600)
    with pytest.raises(CoreArgumentError, match="src: 'nope' is not an IPv4 or IPv6"):
        _core.proxy_build_v1(("nope", 1), ("1.2.3.4", 2))
    with pytest.raises(CoreArgumentError, match="dst: port 70000 out of range"):
        _core.proxy_build_v1(("1.2.3.4", 1), ("1.2.3.4", 70000))
    with pytest.raises(CoreTypeError, match="expected \\(ip, port\\) or None"):
        _core.proxy_build_v2("1.2.3.4", None)
    with pytest.raises(CoreTypeError):
        parse("PROXY TCP4")
    with pytest.raises(CoreTypeError, match="authority must be bytes"):
        _core.proxy_build_v2(None, None, authority="example.com")
    with pytest.raises(CoreTypeError, match="ssl cn must be bytes"):
        _core.proxy_build_v2(None, None, ssl={"cn": "x"})
    with pytest.raises(CoreArgumentError, match="ssl client = 256"):
        _core.proxy_build_v2(None, None, ssl={"client": 256})
    with pytest.raises(CoreArgumentError, match="ssl verify = -1"):
        _core.proxy_build_v2(None, None, ssl={"verify": -1})
    with pytest.raises(CoreArgumentError, match="must be a dict"):
        _core.proxy_build_v2(None, None, ssl=["cn"])


def test_builders_unknown_local_and_mixed_families():
    assert _core.proxy_build_v1(None, ("1.2.3.4", 1)) == b"PROXY UNKNOWN\r\n"
    assert _core.proxy_build_v1(("1.2.3.4", 1), ("::1", 2)) == b"PROXY TCP6 ::ffff:1.2.3.4 ::1 1 2\r\n"
    local = _core.proxy_build_v2(("1.2.3.4", 1), ("1.2.3.4", 2), command=_core.PP_CMD_LOCAL)
    assert local == SIG + b"\x20\x00\x00\x00"
    assert _core.proxy_build_v2(None, None) == SIG + b"\x21\x00\x00\x00"


def test_sockaddr_conversion():
    sin = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 8080) + socket.inet_aton("192.0.2.9")
    assert _core._addr_from_sockaddr(sin) == ("192.0.2.9", 8080)
    sin6 = (struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", 443, 0)
            + socket.inet_pton(socket.AF_INET6, "2001:db8::2") + struct.pack("=I", 0))
    assert _core._addr_from_sockaddr(sin6) == ("2001:db8::2", 443)
    assert _core._addr_from_sockaddr(struct.pack("=H", socket.AF_UNIX)) is None


# -- round trips and fuzz ------------------------------------------------------------------------

ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
ipv6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1))
port = st.integers(0, 65535)
endpoint = st.one_of(st.tuples(ipv4, port), st.tuples(ipv6, port))


def _canonical(addr, as_v6):
    if addr is None:
        return None
    ip = ipaddress.ip_address(addr[0])
    if as_v6 and ip.version == 4:
        return (socket.inet_ntop(socket.AF_INET6, b"\0" * 10 + b"\xff\xff" + ip.packed), addr[1])
    return (socket.inet_ntop(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, ip.packed),
            addr[1])


@settings(max_examples=300, deadline=None)
@given(endpoint, endpoint, st.booleans(), st.binary(max_size=20))
def test_round_trip_v1(src, dst, _unused, payload):
    line = _core.proxy_build_v1(src, dst)
    assert line == ref.build_v1(src, dst)
    status, h = both(line + payload)
    assert status == _core.PP_DONE and h["length"] == len(line)
    as_v6 = ":" in src[0] or ":" in dst[0]
    assert h["family"] == (_core.PP_FAM_TCP6 if as_v6 else _core.PP_FAM_TCP4)
    assert h["src"] == _canonical(src, as_v6) and h["dst"] == _canonical(dst, as_v6)


@settings(max_examples=300, deadline=None)
@given(endpoint, endpoint, st.one_of(st.none(), st.binary(min_size=1, max_size=255)),
       st.one_of(st.none(), st.fixed_dictionaries({"version": st.binary(max_size=20),
                                                   "cn": st.binary(max_size=64)})),
       st.booleans(), st.binary(max_size=20))
def test_round_trip_v2(src, dst, authority, ssl, crc, payload):
    hdr = _core.proxy_build_v2(src, dst, authority=authority, ssl=ssl, crc32c=crc)
    assert hdr == ref.build_v2(src, dst, authority=authority, ssl=ssl, crc=crc)
    status, h = both(hdr + payload)
    assert status == _core.PP_DONE and h["length"] == len(hdr)
    as_v6 = ":" in src[0] or ":" in dst[0]
    assert h["src"] == _canonical(src, as_v6) and h["dst"] == _canonical(dst, as_v6)
    tlvs = ref.walk_tlvs(hdr, h["tlv_offset"], h["tlv_length"])
    assert [t for t, _, _ in tlvs] == ([0x02] if authority else []) + ([0x20] if ssl else []) + (
        [0x03] if crc else [])


def _valid_headers():
    return st.one_of(
        st.builds(_core.proxy_build_v1, endpoint, endpoint),
        st.builds(lambda s, d, a, c: _core.proxy_build_v2(s, d, authority=a, crc32c=c),
                  endpoint, endpoint, st.one_of(st.none(), st.binary(min_size=1, max_size=40)),
                  st.booleans()),
        st.just(b"PROXY UNKNOWN\r\n"), st.just(v2(b"\x20\x00", b"")),
    )


@st.composite
def mutated(draw):
    data = bytearray(draw(_valid_headers()) + draw(st.binary(max_size=8)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "set"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[i:i + draw(st.integers(1, 4))]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=3))
        elif data:
            data[i] = draw(st.sampled_from([0, 0x0D, 0x0A, 0x20, 0xFF, ord("0"), ord(":")]))
    return bytes(data)


def _fuzz_invariant(data):
    status, h = both(data)
    assert status in (_core.PP_DONE, _core.PP_NEED_MORE, _core.PP_ERR_NOT_PROXY,
                      _core.PP_ERR_MALFORMED, _core.PP_ERR_UNSUPPORTED, _core.PP_ERR_TOO_LONG,
                      _core.PP_ERR_CHECKSUM)
    if status == _core.PP_DONE:
        assert 0 < h["length"] <= min(len(data), _core.PP_MAX)
        assert h["tlv_offset"] + h["tlv_length"] <= h["length"]
        # the header alone parses the same: nothing after it was looked at
        assert both(data[:h["length"]]) == (status, h)
    if status == _core.PP_NEED_MORE:
        assert len(data) < _core.PP_MAX


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=600), st.binary(max_size=40).map(lambda b: b"PROXY " + b),
                 st.binary(max_size=80).map(lambda b: SIG + b)))
def test_fuzz_random_bytes(data):
    _fuzz_invariant(data)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_fuzz_mutated_valid_headers(data):
    _fuzz_invariant(data)


def _guarded_parse_child(samples):
    """In a child: put each sample flush against a PROT_NONE page and parse it. A read past the
    buffer is a SIGSEGV, which the parent sees as the child's death by signal."""
    page = mmap.PAGESIZE
    area = mmap.mmap(-1, 2 * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(area))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mprotect(ctypes.c_void_p(base + page), page, 0) != 0:
        os._exit(3)
    view = memoryview(area)
    for data in samples:
        start = page - len(data)
        view[start:page] = data
        parse(view[start:page])
    os._exit(0)


def test_parser_never_reads_past_the_buffer():
    samples = []
    full = _core.proxy_build_v2(("2001:db8::7", 1), ("2001:db8::1", 2), authority=b"a" * 40,
                                crc32c=True)
    for header in (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n", full,
                   b"PROXY UNKNOWN " + b"f" * 100, v2(b"\x21\x11", bytes(12), length=200)):
        samples += [header[:i] for i in range(len(header) + 1)]
    pid = os.fork()
    if pid == 0:
        try:
            _guarded_parse_child(samples)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (
        f"child died: {os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)}")
