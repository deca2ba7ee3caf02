"""[sni] The ClientHello parser of core/sni.pxi against a slow, obviously correct pure-Python
twin (hypothesis: well-formed hellos split into records at random, truncated, mutated, and
plain garbage must get the same answer from both); whole, byte by byte, with trailing data
(h11's rule for parsers); the routing table's matching; the config's rules for a shared
address; the per-event functions free of Python C-API calls in the generated C."""
import os
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastlb import _core
from fastlb.config import ConfigError, loads
from generated_c import no_python_call_test
from tlshelpers import client_hello

SNI_MAX = 16384


# -- the reference -----------------------------------------------------------------------------
class Bad(Exception):
    pass


class Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, n):
        if self.pos + n > len(self.data):
            raise Bad
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self, n):
        return int.from_bytes(self.take(n), "big")

    def left(self):
        return len(self.data) - self.pos


def reference(data):
    """(status, name): RFC 5246 7.4.1.2 / RFC 8446 4.1.2 / RFC 6066 3 read naively."""
    data = bytes(data[:SNI_MAX])
    n = len(data)
    hs, off = b"", 0
    while off < n:                                      # the records, until the hello is whole
        hdr = data[off:off + 5]
        if hdr[:1] not in (b"", b"\x16") or (len(hdr) >= 2 and hdr[1] != 3):
            return "bad", None
        if len(hdr) < 5:
            break
        rlen = int.from_bytes(hdr[3:5], "big")
        if not 1 <= rlen <= 16384:
            return "bad", None
        frag = data[off + 5:off + 5 + rlen]
        hs += frag
        if len(frag) < rlen:
            break
        off += 5 + rlen
        if len(hs) >= 4 and len(hs) >= 4 + int.from_bytes(hs[1:4], "big"):
            break
    if hs and hs[0] != 1:
        return "bad", None
    if len(hs) < 4:
        return ("toobig" if n >= SNI_MAX else "more"), None
    hlen = int.from_bytes(hs[1:4], "big")
    if 4 + hlen + 5 > SNI_MAX:
        return "toobig", None
    if len(hs) < 4 + hlen:
        return ("toobig" if n >= SNI_MAX else "more"), None
    try:
        return _hello(Reader(hs[4:4 + hlen]))
    except Bad:
        return "bad", None


def _hello(r):
    r.take(34)                                          # legacy_version, random
    sid = r.int(1)
    if sid > 32:
        raise Bad
    r.take(sid)
    r.take(r.int(2))                                    # cipher_suites
    r.take(r.int(1))                                    # compression_methods
    if r.left() == 0:
        return "none", None
    exts = Reader(r.take(r.int(2)))
    while exts.left() >= 4:
        etype, body = exts.int(2), exts.take(exts.int(2))
        if etype != 0:
            continue
        e = Reader(body)
        names = Reader(e.take(e.int(2)))
        while names.left() >= 3:
            ntype, name = names.int(1), names.take(names.int(2))
            if ntype == 0:
                if not 1 <= len(name) <= 255 or b"\0" in name:
                    raise Bad
                return "found", name.lower().decode("latin-1")
        return "none", None
    return "none", None


# -- builders ----------------------------------------------------------------------------------
def ext(etype, body):
    return struct.pack("!HH", etype, len(body)) + body


def server_name(*entries):
    lst = b"".join(struct.pack("!BH", t, len(n)) + n for t, n in entries)
    return ext(0, struct.pack("!H", len(lst)) + lst)


def hello(exts=b"", sid=b"", suites=b"\x13\x01", comp=b"\x00", with_exts=True):
    body = (b"\x03\x03" + bytes(32) + bytes([len(sid)]) + sid + struct.pack("!H", len(suites))
            + suites + bytes([len(comp)]) + comp
            + (struct.pack("!H", len(exts)) + exts if with_exts else b""))
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(hs, sizes=(16384,)):
    out, i, k = b"", 0, 0
    while i < len(hs):
        size = sizes[k % len(sizes)]
        out += b"\x16\x03\x01" + struct.pack("!H", len(hs[i:i + size])) + hs[i:i + size]
        i += size
        k += 1
    return out


parse = _core.sni_parse_bytes


# -- examples ----------------------------------------------------------------------------------
def test_a_real_hello_whole_byte_by_byte_and_with_trailing_data():
    data = client_hello("Api.Example.COM")
    assert parse(data) == ("found", "api.example.com")
    for i in range(len(data)):                          # every prefix: wait for more
        assert parse(data[:i]) == ("more", None), i
    assert parse(data + b"\x17\x03\x03garbage") == ("found", "api.example.com")
    assert parse(client_hello(None)) == ("none", None)


def test_refusals_and_bounds():
    assert parse(b"GET / HTTP/1.1\r\n") == ("bad", None)
    assert parse(b"\x16\x02") == ("bad", None)                        # SSL 2 major
    assert parse(b"\x80\x2e\x01\x03\x01") == ("bad", None)           # SSLv2 hello
    assert parse(b"\x16\x03\x01\x00\x00") == ("bad", None)           # empty record
    assert parse(b"\x16\x03\x01\x40\x01") == ("bad", None)           # over 2^14
    assert parse(records(b"\x02" + hello()[1:])) == ("bad", None)   # ServerHello
    big = hello(server_name((0, b"a.example")) + ext(21, bytes(17000)))
    assert parse(records(big)[:100]) == ("toobig", None)             # known from its length
    assert parse(records(hello(sid=bytes(33)))) == ("bad", None)
    assert parse(records(hello(with_exts=False))) == ("none", None)   # TLS 1.0 style
    assert parse(records(hello(server_name((0, b""))))) == ("bad", None)
    assert parse(records(hello(server_name((0, b"a\0b"))))) == ("bad", None)
    assert parse(records(hello(server_name((1, b"x"), (0, b"B.Example"))))) == ("found", "b.example")


def test_a_hello_across_many_records():
    hs = hello(ext(21, bytes(3000)) + server_name((0, b"spread.example")))
    assert parse(records(hs, (1, 7, 100))) == ("found", "spread.example")


# -- the twin ----------------------------------------------------------------------------------
names = st.binary(min_size=0, max_size=300) | st.text(
    "abcXYZ019.-*", min_size=1, max_size=40).map(str.encode)
entries = st.lists(st.tuples(st.sampled_from([0, 0, 1, 255]), names), max_size=3)
extensions = st.lists(
    st.one_of(st.tuples(st.integers(1, 65535), st.binary(max_size=60)).map(lambda t: ext(*t)),
              entries.map(lambda e: server_name(*e)),
              st.binary(max_size=6)), max_size=5).map(b"".join)
hellos = st.builds(hello, extensions, st.binary(max_size=34), st.binary(max_size=8),
                   st.binary(min_size=1, max_size=3), st.booleans())


@st.composite
def streams(draw):
    data = records(draw(hellos), draw(st.lists(st.integers(1, 600), min_size=1, max_size=4)))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    if data and draw(st.booleans()):
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    return data + draw(st.binary(max_size=8))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams() | st.binary(max_size=64) | st.binary(max_size=40).map(lambda b: b"\x16\x03" + b))
def test_the_parser_agrees_with_its_pure_python_twin(data):
    assert parse(data) == reference(data)


@settings(max_examples=50, deadline=None)
@given(st.integers(16000, 17000), st.integers(1, 16384))
def test_large_hellos_agree_with_the_twin(pad, size):
    data = records(hello(ext(21, bytes(pad)) + server_name((0, b"late.example"))), (size,))
    assert parse(data) == reference(data)
    assert parse(data)[0] in ("toobig", "found")


# -- the table ---------------------------------------------------------------------------------
def test_matching_exact_beats_wildcard_one_label_case_insensitive():
    a, b, c = (_core.ServiceState(n) for n in "abc")
    t = _core.SniTable([(("a.example.com",), a), (("*.example.com", "X.Other.ORG"), b),
                        (("*.deep.example.com",), c)], None, 1.0)
    got = {n: (t.match(n).name if t.match(n) else None) for n in (
        "a.example.com", "A.EXAMPLE.COM", "b.example.com", "example.com", "y.b.example.com",
        "z.deep.example.com", "deep.example.com", "x.other.org", "other.org", "a.example.com.")}
    assert got == {"a.example.com": "a", "A.EXAMPLE.COM": "a", "b.example.com": "b",
                   "example.com": None, "y.b.example.com": None, "z.deep.example.com": "c",
                   "deep.example.com": "b", "x.other.org": "b", "other.org": None,
                   "a.example.com.": None}
    with pytest.raises(ValueError, match="duplicate"):
        _core.SniTable([(("a.x",), a), (("A.X",), b)])


# -- config ------------------------------------------------------------------------------------
def conf(*services):
    return "".join(f'[[service]]\nname = "{n}"\nlisten = ["{addr}"]\n{extra}\n'
                   f'backends = [{{ address = "127.0.0.1:9" }}]\n' for n, addr, extra in services)


def error(text):
    with pytest.raises(ConfigError) as e:
        loads(text)
    return str(e.value)


def test_config_shared_address_rules(tmp_path):
    ok = loads(conf(("a", "127.0.0.1:8443", 'sni = ["A.example.com", "*.b.example.com"]'),
                    ("b", "127.0.0.1:8443", 'sni = ["c.example.com"]\ntimeouts = { handshake = "2s" }'),
                    ("d", "127.0.0.1:8443", ""),
                    ("alone", "127.0.0.1:9443", 'sni = ["only.example.com"]')))
    assert [s.sni for s in ok.services] == [("a.example.com", "*.b.example.com"),
                                            ("c.example.com",), (), ("only.example.com",)]
    assert ok.services[1].sni_handshake == 2.0
    from fastlb.config import service_from_dict, service_to_dict
    for svc in ok.services:                                 # the state file's round trip
        assert service_from_dict(service_to_dict(svc), "service") == svc
    e = error(conf(("a", "127.0.0.1:8443", 'sni = ["a.x.y"]'), ("d", "127.0.0.1:8443", ""),
                   ("e", "127.0.0.1:8443", "")))
    assert "service[2].listen[0]" in e and "already its default" in e
    e = error(conf(("a", "127.0.0.1:8443", 'sni = ["a.x.y"]'),
                   ("b", "127.0.0.1:8443", 'sni = ["q.x.y", "A.X.Y"]')))
    assert "service[1].sni[1]" in e and "already routed to service 'a'" in e
    trustme = pytest.importorskip("trustme")
    leaf = trustme.CA().issue_cert("a.x.y")
    (tmp_path / "c.pem").write_bytes(leaf.cert_chain_pems[0].bytes())
    (tmp_path / "k.pem").write_bytes(leaf.private_key_pem.bytes())
    tls = f'tls = {{ cert = "{tmp_path}/c.pem", key = "{tmp_path}/k.pem" }}'
    e = error(conf(("a", "127.0.0.1:8443", tls))
              + conf(("b", "127.0.0.1:8443", 'sni = ["b.x.y"]')))
    assert "service[1].listen[0]" in e and "terminates TLS" in e
    pp = 'proxy_protocol = { accept_from = ["127.0.0.1"] }'
    e = error(conf(("a", "127.0.0.1:8443", f'sni = ["a.x.y"]\n{pp}'), ("b", "127.0.0.1:8443", "")))
    assert "service[1].listen[0]" in e and "PROXY header" in e
    for bad in ('["*"]', '["*.com"]', '["a..b"]', '["a.*.b"]', '["-a.b"]', '[]', '"a.b"', '[1]',
                '["a.b", "A.B"]', f'["{"a" * 64}.b"]'):
        e = error(conf(("a", "127.0.0.1:8443", f"sni = {bad}")))
        assert "service[0].sni" in e, (bad, e)
    e = error(conf(("a", "127.0.0.1:8443", f'sni = ["a.b"]\n{tls}')))
    assert "service[0].sni" in e and "tls.certs" in e
    e = error(conf(("a", "127.0.0.1:0", 'sni = ["a.b"]')))
    assert "service[0].listen[0]" in e and "fixed port" in e
    e = error(conf(("a", "127.0.0.1:8443", ""), ("b", "127.0.0.1:8443", "")))
    assert "already a listener of service 'a'" in e                   # no sni: as before


# -- the generated C -----------------------------------------------------------------------------
PER_EVENT = ["sni_on_client", "sni_parse", "_sni_hdr_ok", "_sni_find", "8SniTable_lookup",
             "sni_expired"]


test_no_python_call = no_python_call_test(PER_EVENT)


def test_admin_add_service_follows_the_same_rules():
    """The registry's add_service (admin, API) refuses what the config refuses, naming the key,
    and accepts an SNI service on the address of a plain one (which becomes the default)."""
    from fastlb.errors import RegistryError
    from fastlb.registry import Registry
    r = Registry({s.name: s for s in loads(conf(("web", "127.0.0.1:8443", ""))).services})
    nxt, _ = r.plan("add_service", {"service": {"name": "a", "listen": "127.0.0.1:8443",
                                                "sni": ["a.example.com"]}})
    r.commit(nxt)
    for svc, code, text in (
            ({"name": "b", "listen": "127.0.0.1:8443", "sni": ["A.example.com"]}, "invalid",
             "service.sni[0]: 'a.example.com' is already routed to service 'a'"),
            ({"name": "c", "listen": "127.0.0.1:8443"}, "invalid", "already its default"),
            ({"name": "d", "listen": "127.0.0.1:8443", "sni": ["*"]}, "invalid", "service.sni[0]")):
        with pytest.raises(RegistryError) as e:
            r.plan("add_service", {"service": svc})
        assert e.value.code == code and text in str(e.value), str(e.value)


# -- the engine in-process (uvloop, real loopback sockets) --------------------------------------
def test_thousands_of_refused_hellos_leave_no_session_fd_or_scratch(procs):
    """3,000 clients refused before routing (garbage, no SNI without a default, oversized, and
    some that leave half-way or stall past the timeout) leave no session and no fd; each
    outcome counted. A client routed meanwhile reaches its backend with its bytes first."""
    import asyncio

    import uvloop
    from helpers import start_backend
    _, bport = start_backend(procs, "echo")
    loop = uvloop.new_event_loop()
    counters = _core.Counters(bytearray(_core.Counters.size_for(4)), 4)
    health = _core.HealthBitmap(bytearray(_core.HealthBitmap.size_for(4)), 4)
    health.mark_up(0)
    engine = _core.Engine(loop, counters, 0)
    svc = _core.ServiceState("a")
    svc.set_backends(_core.make_policy("round_robin", [0], [1], health, counters=counters),
                     {0: ("127.0.0.1", bport)})
    router = _core.ServiceState("router")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    port = sock.getsockname()[1]
    lst = engine.listen(sock, router)
    lst.sni = _core.SniTable([(("a.example",), svc)], None, 0.2)
    good = records(hello(server_name((0, b"a.example"))))
    big = records(hello(ext(21, bytes(17000))))
    fds = len(os.listdir("/proc/self/fd"))

    async def sweep():
        while True:
            await asyncio.sleep(0.02)
            engine.sweep(False)

    async def one(data, close_early=False):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(data)
        if close_early:
            w.close()
            return b""
        try:
            return await r.read(100)
        except ConnectionResetError:
            return b""
        finally:
            w.close()

    async def main():
        sweeper = loop.create_task(sweep())
        kinds = [b"GET / HTTP/1.0\r\n\r\n", records(hello()), big, good[:30], good[:-3]]
        for i in range(0, 3000, 100):
            got = await asyncio.gather(*(one(kinds[(i + j) % 5], close_early=(j % 10 == 3))
                                         for j in range(100)))
            assert not any(got)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(good + b"ping")
        assert await r.readexactly(len(good) + 4) == good + b"ping"    # echoed: forwarded whole
        w.close()
        for _ in range(100):
            if not engine.sessions:
                break
            await asyncio.sleep(0.05)
        sweeper.cancel()
    try:
        loop.run_until_complete(asyncio.wait_for(main(), 60))
        assert not engine.sessions
        assert len(os.listdir("/proc/self/fd")) <= fds + 2        # + the asyncio client's
        assert engine.sni_routed == 1
        assert engine.sni_bad + engine.sni_no_route + engine.sni_oversize + engine.sni_timeouts > 2000
        assert min(engine.sni_bad, engine.sni_no_route, engine.sni_oversize, engine.sni_timeouts) > 0
    finally:
        engine.close()
        loop.close()
