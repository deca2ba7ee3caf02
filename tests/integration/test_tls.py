"""[tls] TLS termination through `fastlb run` (issue 12, stage 1): round trips (SHA-256, 32 MiB
each way, half-close), SNI, ALPN, TLS 1.3, min_version, resumption, the handshake timeout,
garbage instead of a ClientHello, the counts in ctl stats and /metrics, and certificates
reloaded under load without a failed connection (a bad new one refused, the old one kept).
Certificates are made by trustme in each test (nothing committed that expires)."""
import hashlib
import json
import os
import signal
import socket
import ssl
import threading
import time

import pytest

from helpers import start_backend
from tlshelpers import (client_ctx, connect, echo_loop, http_get, pump, refused_at_once, start,
                        uri_cert, write_cert)

trustme = pytest.importorskip("trustme")

MIB = 1 << 20


def tls_service(backend_port, tls, extra="", timeouts=""):
    return (f'[global]\nmetrics = "127.0.0.1:{{mport}}"\n[[service]]\nname = "edge"\n'
            f'listen = ["127.0.0.1:0"]\ntls = {tls}\n{extra}\n'
            + (f"timeouts = {{ {timeouts} }}\n" if timeouts else "")
            + f'backends = [ {{ address = "127.0.0.1:{backend_port}" }} ]\n')


def stats(tmp_path):
    """The TLS counts of /api/stats (summed over the data paths, with the [mem] ones)."""
    return json.loads(http_get(tmp_path, "/api/stats"))["memory"]


def reload_until_new_test(p, tmp_path, ca, sans):
    """The certificate files replaced by one for edge.test and new.test, then SIGHUP; returns
    once ``sans()`` (a new client's certificate names) has new.test (15 s at most)."""
    write_cert(tmp_path, "edge", ca.issue_cert("edge.test", "new.test"))
    p.signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while "new.test" not in sans():
        assert time.monotonic() < deadline, p.output
        time.sleep(0.1)


def test_round_trip_32mib_each_way_with_half_close(procs, tmp_path, ca):
    """32 MiB of random bytes each way through TLS to an echo backend: the same SHA-256 back;
    the client's half-close reaches the backend (which then closes), and fastlb's reaches the
    client (EOF after the last byte). TLS 1.3 by default."""
    _, bport = start_backend(procs, "echo")
    crt, key = write_cert(tmp_path, "edge", ca.issue_cert("edge.test"))
    _, (port,) = start(procs, tmp_path, tls_service(bport, f'{{ cert = "{crt}", key = "{key}" }}'))
    blob = os.urandom(32 * MIB)
    with connect(port, client_ctx(ca)) as s:
        assert s.version() == "TLSv1.3"
        back = pump(s, blob)
    assert len(back) == len(blob)
    assert hashlib.sha256(back).hexdigest() == hashlib.sha256(blob).hexdigest()
    assert stats(tmp_path)["tls_handshakes"] == 1


def test_workers_get_the_certificates_over_their_channel_and_a_reload(procs, tmp_path, ca):
    """With 2 worker processes: the PEM rides the plan to each worker, which builds its own
    contexts; a reload with a new certificate reaches every worker (all new clients get it)."""
    _, bport = start_backend(procs, "echo")
    crt, key = write_cert(tmp_path, "edge", ca.issue_cert("edge.test", "old.test"))
    text = tls_service(bport, f'{{ cert = "{crt}", key = "{key}" }}').replace(
        "[global]\n", "[global]\nworkers = 2\n")
    p, (port,) = start(procs, tmp_path, text)
    ctx = client_ctx(ca)

    def sans():
        with connect(port, ctx) as s:
            s.sendall(b"w")
            assert s.recv(1) == b"w"
            return [v for _, v in s.getpeercert()["subjectAltName"]]
    assert all("old.test" in sans() for _ in range(10))
    reload_until_new_test(p, tmp_path, ca, sans)
    time.sleep(1.0)
    assert all("new.test" in sans() for _ in range(20))
    deadline = time.monotonic() + 5                 # workers report their counts each second
    while stats(tmp_path)["tls_handshakes"] < 31:
        assert time.monotonic() < deadline, stats(tmp_path)
        time.sleep(0.2)


def test_backend_half_close_reaches_the_client_after_its_last_byte(procs, tmp_path, ca):
    """A backend that reads until EOF, then sends 4 MiB and closes: the client gets all of it,
    then EOF (close_notify and FIN)."""
    _, bport = start_backend(procs, "reply", size=4 * MIB)
    crt, key = write_cert(tmp_path, "edge", ca.issue_cert("edge.test"))
    _, (port,) = start(procs, tmp_path, tls_service(bport, f'{{ cert = "{crt}", key = "{key}" }}'))
    with connect(port, client_ctx(ca)) as s:
        back = pump(s, b"q" * 100000)
    assert len(back) == 4 * MIB


def test_sni_picks_the_certificate_alpn_and_versions(procs, tmp_path, ca):
    """certs chosen by SNI: an exact name, a wildcard of one label, the first (the default)
    otherwise; ALPN negotiated from our list; min_version 1.2 lets a TLS 1.2 client in."""
    _, bport = start_backend(procs, "echo")
    a = write_cert(tmp_path, "a", ca.issue_cert("a.example.com"))
    b = write_cert(tmp_path, "b", ca.issue_cert("*.b.example.com"))
    certs = (f'{{ certs = [{{ cert = "{a[0]}", key = "{a[1]}" }}, '
             f'{{ cert = "{b[0]}", key = "{b[1]}" }}], alpn = ["h2", "http/1.1"] }}')
    _, (port,) = start(procs, tmp_path, tls_service(bport, certs))

    def served_name(name, **kw):
        ctx = client_ctx(ca, check_hostname=False)
        ctx.set_alpn_protocols(kw.pop("alpn", ["http/1.1"]))
        for k, v in kw.items():
            setattr(ctx, k, v)
        with connect(port, ctx, name) as s:
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"
            cert = s.getpeercert()
            return ([v for k, v in cert["subjectAltName"]], s.selected_alpn_protocol(), s.version())

    assert served_name("a.example.com") == (["a.example.com"], "http/1.1", "TLSv1.3")
    assert served_name("x.b.example.com", alpn=["spdy", "h2", "http/1.1"])[:2] == (["*.b.example.com"], "h2")
    assert served_name("A.Example.COM")[0] == ["a.example.com"]          # names: any case
    assert served_name("y.x.b.example.com")[0] == ["a.example.com"]      # one label only
    assert served_name("unknown.test")[0] == ["a.example.com"]            # the default
    assert served_name("a.example.com", alpn=["spdy"])[1] is None         # no common protocol
    old = served_name("a.example.com", maximum_version=ssl.TLSVersion.TLSv1_2)
    assert old[2] == "TLSv1.2"


def test_min_version_13_refuses_a_tls12_client_and_counts_it(procs, tmp_path, ca):
    _, bport = start_backend(procs, "echo")
    crt, key = write_cert(tmp_path, "edge", ca.issue_cert("edge.test"))
    _, (port,) = start(procs, tmp_path, tls_service(
        bport, f'{{ cert = "{crt}", key = "{key}", min_version = "1.3" }}'))
    with pytest.raises(ssl.SSLError):
        connect(port, client_ctx(ca, maximum_version=ssl.TLSVersion.TLSv1_2))
    with connect(port, client_ctx(ca)) as s:
        s.sendall(b"x")
        assert s.recv(1) == b"x"
    m = stats(tmp_path)
    assert (m["tls_handshake_failures"], m["tls_handshakes"]) == (1, 1)


def test_sessions_resume_with_tickets(procs, tmp_path, ca):
    _, bport = start_backend(procs, "echo")
    crt, key = write_cert(tmp_path, "edge", ca.issue_cert("edge.test"))
    _, (port,) = start(procs, tmp_path, tls_service(bport, f'{{ cert = "{crt}", key = "{key}" }}'))
    ctx = client_ctx(ca)
    with connect(port, ctx) as s:
        s.sendall(b"x")
        assert s.recv(1) == b"x"             # the tickets came before this byte
        session = s.session
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname="edge.test", session=session) as s:
        s.sendall(b"y")
        assert s.recv(1) == b"y"
        assert s.session_reused
    m = stats(tmp_path)
    assert (m["tls_handshakes"], m["tls_resumed"]) == (2, 1)


def test_handshake_timeout_and_garbage_are_closed_counted_and_never_reach_a_backend(procs, tmp_path, ca):
    """A client silent after connecting is closed at timeouts.handshake; one sending an HTTP
    request instead of a ClientHello is closed at once; neither reaches the backend (which
    announces itself on connect); both counted, in ctl stats and /metrics."""
    _, bport = start_backend(procs, "announce", name="BACKEND")
    crt, key = write_cert(tmp_path, "edge", ca.issue_cert("edge.test"))
    text = tls_service(bport, f'{{ cert = "{crt}", key = "{key}" }}', timeouts='handshake = "400ms"')
    p, ports = start(procs, tmp_path, text)
    port = ports[0]
    silent = socket.create_connection(("127.0.0.1", port), timeout=5)
    t0 = time.monotonic()
    try:
        got = silent.recv(100)
    except ConnectionResetError:
        got = b""
    assert got == b"" and 0.3 < time.monotonic() - t0 < 3.0
    silent.close()
    out = refused_at_once(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", shut=False, timeout=5)
    assert b"BACKEND" not in out and out[:1] in (b"", b"\x15")       # nothing, or a TLS alert
    m = stats(tmp_path)
    assert (m["tls_handshake_timeouts"], m["tls_handshake_failures"], m["tls_handshakes"]) == (1, 1, 0)
    body = http_get(tmp_path, "/metrics")
    assert "fastlb_tls_handshake_timeouts_total 1.0" in body
    assert "fastlb_tls_handshake_failures_total 1.0" in body


def test_certificate_reload_under_load_drops_nothing_and_refuses_a_bad_one(procs, tmp_path, ca):
    """Clients connect and exchange bytes in a loop while the certificate files are replaced
    and fastlb gets SIGHUP: no connection fails (open ones keep going: one held across the
    reload still echoes), new ones get the new certificate. Then a key that does not match is
    written: the reload is refused with a clear error and the last good certificate stays."""
    _, bport = start_backend(procs, "echo")
    crt, key = write_cert(tmp_path, "edge", ca.issue_cert("edge.test", "old.test"))
    p, (port,) = start(procs, tmp_path, tls_service(bport, f'{{ cert = "{crt}", key = "{key}" }}'))
    ctx = client_ctx(ca, check_hostname=False)

    def sans():
        with connect(port, ctx) as s:
            return [v for _, v in s.getpeercert()["subjectAltName"]]

    stop, failures, done = threading.Event(), [], [0]

    held = connect(port, ctx)
    threads = [threading.Thread(target=echo_loop, args=(port, ctx, 1000, stop, failures, done))
               for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        reload_until_new_test(p, tmp_path, ca, sans)
        time.sleep(0.5)
        held.sendall(b"still here")
        assert held.recv(100) == b"still here"
        # a key of another certificate: refused, the running one stays
        other = ca.issue_cert("bad.test")
        with open(key, "wb") as f:
            f.write(other.private_key_pem.bytes())
        p.signal(signal.SIGHUP)
        p.wait_line(r"tls.*(does not match|mismatch)", timeout=15)
        time.sleep(0.3)
        assert "new.test" in sans()
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        held.close()
    assert failures == [] and done[0] > 20, (failures[:5], done[0])


# -- stage 2: mutual TLS and authorization by identity -------------------------------------------
def mtls_attempt(port, ca, leaf=None, files=None):
    """True when a client (with ``leaf``, a trustme cert, or ``files``) gets its bytes echoed;
    False when it is refused (in TLS 1.3 the client's handshake ends before the server has
    checked its certificate: the refusal shows as an alert or EOF at the first read)."""
    ctx = client_ctx(ca)
    if leaf is not None:
        leaf.configure_cert(ctx)
    if files is not None:
        ctx.load_cert_chain(*files)
    try:
        with connect(port, ctx) as s:
            s.sendall(b"hi")
            return s.recv(2) == b"hi"
    except (ssl.SSLError, OSError):
        return False


def test_mtls_refusals_counted_per_reason_and_authz_by_identity(procs, tmp_path, ca):
    """client_ca with verify_client required (the default) and authz identities: no
    certificate, a foreign CA, an expired certificate, valid ones with forbidden identities
    (a DNS SAN, a URI SAN outside the prefix) are each refused and counted by reason; valid
    ones matching a URI prefix, a dns: name or a cn: are admitted."""
    import datetime
    _, bport = start_backend(procs, "echo")
    server = write_cert(tmp_path, "edge", ca.issue_cert("edge.test"))
    clients, foreign = trustme.CA(), trustme.CA()
    clients.cert_pem.write_to_path(str(tmp_path / "clients.pem"))
    tls = f'{{ cert = "{server[0]}", key = "{server[1]}", client_ca = "clients.pem" }}'
    extra = 'authz = { identities = ["spiffe://corp/ns/web/*", "dns:api.internal", "cn:ops"] }'
    text = tls_service(bport, tls, extra=extra).replace('"clients.pem"', f'"{tmp_path}/clients.pem"')
    _, (port,) = start(procs, tmp_path, text)
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
    assert not mtls_attempt(port, ca)                                          # no certificate
    assert not mtls_attempt(port, ca, foreign.issue_cert("api.internal"))      # a foreign CA
    assert not mtls_attempt(port, ca, clients.issue_cert(
        "api.internal", not_before=past - datetime.timedelta(days=1), not_after=past))  # expired
    assert not mtls_attempt(port, ca, clients.issue_cert("db.internal", common_name="db"))
    assert not mtls_attempt(port, ca, files=uri_cert(clients, "spiffe://corp/ns/db/sa/x", tmp_path, "db"))
    assert mtls_attempt(port, ca, clients.issue_cert("api.internal"))
    assert mtls_attempt(port, ca, clients.issue_cert("x.internal", common_name="ops"))
    assert mtls_attempt(port, ca, files=uri_cert(clients, "spiffe://corp/ns/web/sa/frontend",
                                                 tmp_path, "web"))
    m = stats(tmp_path)
    assert (m["tls_client_no_cert"], m["tls_client_untrusted"], m["tls_client_expired"],
            m["tls_authz_denied"]) == (1, 1, 1, 2), m
    assert (m["tls_handshakes"], m["tls_handshake_failures"]) == (5, 3), m


def test_verify_client_optional_admits_a_client_without_a_certificate_not_a_bad_one(procs, tmp_path, ca):
    _, bport = start_backend(procs, "echo")
    server = write_cert(tmp_path, "edge", ca.issue_cert("edge.test"))
    clients = trustme.CA()
    clients.cert_pem.write_to_path(str(tmp_path / "clients.pem"))
    tls = (f'{{ cert = "{server[0]}", key = "{server[1]}", client_ca = "{tmp_path}/clients.pem", '
           f'verify_client = "optional" }}')
    _, (port,) = start(procs, tmp_path, tls_service(bport, tls))
    assert mtls_attempt(port, ca)                                              # none: admitted
    assert mtls_attempt(port, ca, clients.issue_cert("anyone.internal"))        # a valid one
    assert not mtls_attempt(port, ca, trustme.CA().issue_cert("anyone.internal"))   # foreign
    m = stats(tmp_path)
    assert (m["tls_handshakes"], m["tls_client_untrusted"], m["tls_client_no_cert"]) == (2, 1, 0), m


# -- stage 3: the identity to the backend in PROXY v2 TLVs ---------------------------------------
def tlv_backend():
    """A backend that reads a PROXY v2 header, parses its TLVs itself (doc/proxy-protocol.txt
    2.2, independently of fastlb's code), answers them as JSON and closes. (port, stop)."""
    import struct
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.2)
    stop = threading.Event()

    def parse(hdr):
        assert hdr[:12] == b"\r\n\r\n\x00\r\nQUIT\n" and hdr[12] == 0x21, hdr[:16]
        fam, length = hdr[13], struct.unpack("!H", hdr[14:16])[0]
        body = hdr[16:16 + length]
        tlvs, i = body[12 if fam == 0x11 else 36:], 0
        out = {}
        while i < len(tlvs):
            t, n = tlvs[i], struct.unpack("!H", tlvs[i + 1:i + 3])[0]
            v = tlvs[i + 3:i + 3 + n]
            if t == 0x01:                      # [tlsops] PP2_TYPE_ALPN
                out["alpn"] = v.decode()
            elif t == 0x02:
                out["authority"] = v.decode()
            elif t == 0x20:
                out["client"], out["verify"] = v[0], struct.unpack("!I", v[1:5])[0]
                j = 5
                while j < len(v):
                    st, sn = v[j], struct.unpack("!H", v[j + 1:j + 3])[0]
                    out[{0x21: "version", 0x22: "cn"}.get(st, str(st))] = v[j + 3:j + 3 + sn].decode()
                    j += 3 + sn
            i += 3 + n
        return out

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(5)
                hdr = b""
                while len(hdr) < 16 or len(hdr) < 16 + struct.unpack("!H", hdr[14:16])[0]:
                    hdr += conn.recv(4096)
                conn.sendall(json.dumps(parse(hdr)).encode())
        srv.close()
    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1], stop


def test_proxy_v2_tlvs_carry_sni_version_and_client_cn(procs, tmp_path, ca):
    """With proxy_protocol send = "v2" on a TLS service: the backend gets PP2_TYPE_AUTHORITY =
    the SNI and PP2_TYPE_SSL (client bits, verify, version, the client certificate's CN);
    without a client certificate: no CN, verify non-zero, no CERT bits. [tlsops] PP2_TYPE_ALPN
    carries the protocol ALPN negotiated, and is absent when the client offered none."""
    bport, stop = tlv_backend()
    server = write_cert(tmp_path, "edge", ca.issue_cert("edge.test"))
    clients = trustme.CA()
    clients.cert_pem.write_to_path(str(tmp_path / "clients.pem"))
    tls = (f'{{ cert = "{server[0]}", key = "{server[1]}", client_ca = "{tmp_path}/clients.pem", '
           f'verify_client = "optional", alpn = ["h2", "http/1.1"] }}')
    _, (port,) = start(procs, tmp_path, tls_service(bport, tls, extra='proxy_protocol = { send = "v2" }'))

    def tlvs(leaf=None, alpn=None):
        ctx = client_ctx(ca)
        if alpn:
            ctx.set_alpn_protocols(alpn)
        if leaf is not None:
            leaf.configure_cert(ctx)
        with connect(port, ctx, "edge.test") as s:
            got = b""
            while data := s.recv(4096):
                got += data
        return json.loads(got)
    try:
        assert tlvs(clients.issue_cert("frontend.internal", common_name="frontend")) == {
            "authority": "edge.test", "client": 0x07, "verify": 0, "version": "TLSv1.3",
            "cn": "frontend"}
        assert tlvs() == {"authority": "edge.test", "client": 0x01, "verify": 1,
                          "version": "TLSv1.3"}
        assert tlvs(alpn=["spdy/1", "http/1.1"]) == {"alpn": "http/1.1", "authority": "edge.test",
                                                     "client": 0x01, "verify": 1, "version": "TLSv1.3"}
    finally:
        stop.set()


def test_hostile_client_hellos_split_byte_by_byte_or_oversized(procs, tmp_path, ca):
    """A ClientHello sent one byte per segment still completes the handshake (OpenSSL waits for
    the rest, WANT_READ); a record announcing more than TLS allows (2^14 + 256 bytes) is refused
    at once, without waiting for its body; both counted."""
    _, bport = start_backend(procs, "echo")
    crt, key = write_cert(tmp_path, "edge", ca.issue_cert("edge.test"))
    _, (port,) = start(procs, tmp_path, tls_service(bport, f'{{ cert = "{crt}", key = "{key}" }}'))
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_ctx(ca).wrap_bio(inc, out, server_hostname="edge.test")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = out.read()
    assert hello[0] == 0x16 and len(hello) > 100
    for i in range(len(hello)):
        sock.sendall(hello[i:i + 1])
        time.sleep(0.001)
    while True:
        inc.write(sock.recv(65536))
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
    sock.sendall(out.read())
    obj.write(b"ping")
    sock.sendall(out.read())
    got = b""
    while got != b"ping":
        inc.write(sock.recv(65536))
        try:
            got += obj.read(4)
        except ssl.SSLWantReadError:
            pass
    sock.close()
    t0 = time.monotonic()
    refused_at_once(port, b"\x16\x03\x01\xff\xff" + b"\x01" * 1000, shut=False, timeout=5)
    assert time.monotonic() - t0 < 2.0              # refused at once, not at the timeout
    m = stats(tmp_path)
    assert (m["tls_handshakes"], m["tls_handshake_failures"]) == (1, 1), m
