"""[orig] TLS origination through `fastlb run` (issue 12): fastlb connects to its backends over
TLS from the engine (backends[].tls, service.backend_tls). Round trips (SHA-256, 32 MiB each
way, half-close) with a plain and a TLS client; verification against `ca` (a foreign CA refused,
counted, retried on a good backend); the name verified (the backend's host, or `sni`) and sent;
a client certificate for mTLS (the backend sees fastlb's identity; refuses it without one);
session resumption per backend; backends added at run time get the service's default; health
checks over the same TLS (a backend failing verification is marked down); bad configuration
refused naming the key. Backends are Python ssl servers on loopback threads; certificates are
made by trustme in each test (nothing committed that expires)."""
import hashlib
import json
import os
import signal
import socket
import threading
import time

import pytest

from helpers import admin_client, free_port, made_and_closed, start_fastlb
from tlshelpers import (TlsBackend, client_ctx, connect, http_get, pump, read_to_eof, stall_server,
                        uri_cert, write_cert)

trustme = pytest.importorskip("trustme")

MIB = 1 << 20


@pytest.fixture
def backends():
    yield from made_and_closed(TlsBackend)


def config(tmp_path, backends, *, service_extra="", global_extra=""):
    """One service "web" with an admin socket and a metrics port; ``backends`` as TOML text."""
    mport = free_port()
    (tmp_path / "mport").write_text(str(mport))
    return (f'[global]\nadmin = "unix:{tmp_path}/admin.sock"\nmetrics = "127.0.0.1:{mport}"\n'
            f'{global_extra}\n[[service]]\nname = "web"\nlisten = ["127.0.0.1:0"]\n'
            f'{service_extra}\nbackends = [ {backends} ]\n')


def ca_file(tmp_path, ca):
    """``ca``'s certificate as tmp_path/ca.pem; its path."""
    crt = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(crt))
    return crt


def good_and_bad(backends, ca):
    """Two "name" backends, GOOD with a certificate of ``ca`` and BAD with one of a foreign CA;
    (good, bad, the two as the service's backends: bad first)."""
    good = backends(ca.issue_cert("127.0.0.1"), mode="name", name="GOOD")
    bad = backends(trustme.CA().issue_cert("127.0.0.1"), mode="name", name="BAD")
    return good, bad, f'{{ address = "127.0.0.1:{bad.port}" }}, {{ address = "127.0.0.1:{good.port}" }}'


def memory(tmp_path):
    return json.loads(http_get(tmp_path, "/api/stats"))["memory"]


def backend_stats(tmp_path):
    with admin_client(tmp_path) as c:
        return {b["address"]: b for s in c.call("stats") for b in s["backends"]}


def ask(port, payload=b"", timeout=10.0):
    """A plain client: send payload, half-close, read to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        if payload:
            s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return read_to_eof(s)


def plain_pump(port, payload, timeout=60.0):
    """tlshelpers.pump's plain twin: send and read at once, half-close when all is sent."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    got, err = [], []

    def reader():
        try:
            while data := s.recv(262144):
                got.append(data)
        except OSError as exc:
            err.append(exc)
    t = threading.Thread(target=reader)
    t.start()
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    t.join(timeout)
    s.close()
    assert not t.is_alive() and not err, f"stalled or failed: {err}"
    return b"".join(got)


def test_round_trip_32mib_each_way_plain_client_tls_backend(procs, tmp_path, ca, backends):
    """A plain client, a TLS echo backend: 32 MiB each way with the same SHA-256; the client's
    half-close reaches the backend (as close_notify: it ends its echo) and the backend's end
    reaches the client after its last byte. One handshake with the backend, verified against
    `ca` and the name in `sni` (sent as SNI)."""
    b = backends(ca.issue_cert("echo.internal"))
    crt = ca_file(tmp_path, ca)
    _, (port,) = start_fastlb(procs, config(
        tmp_path, f'{{ address = "127.0.0.1:{b.port}", tls = {{ ca = "{crt}", sni = "echo.internal" }} }}'))
    blob = os.urandom(32 * MIB)
    back = plain_pump(port, blob)
    assert len(back) == len(blob)
    assert hashlib.sha256(back).hexdigest() == hashlib.sha256(blob).hexdigest()
    assert b.sni == ["echo.internal"] and b.done == 1 and not b.failed
    assert memory(tmp_path)["tls_backend_handshakes"] == 1


def test_backend_that_ends_first_gets_close_notify_when_the_client_ends(procs, tmp_path, ca,
                                                                           backends):
    """The backend sends its answer and its close_notify first; the client reads to EOF, then
    ends too: fastlb's close of the backend carries a close_notify (found by review: the lean
    close-without-shutdown path sent a bare FIN to a TLS backend)."""
    b = backends(ca.issue_cert("127.0.0.1"), mode="name", name="done")
    crt = ca_file(tmp_path, ca)
    _, (port,) = start_fastlb(procs, config(tmp_path, f'{{ address = "127.0.0.1:{b.port}" }}',
                                            service_extra=f'backend_tls = {{ ca = "{crt}" }}'))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        got = b""
        while data := s.recv(100):
            got += data
        assert got == b"done"                  # and EOF: the backend's end reached the client
        s.shutdown(socket.SHUT_WR)              # now the client ends
        time.sleep(0.3)
    deadline = time.monotonic() + 5
    while b.clean < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b.clean == 1, b.failed


def test_round_trip_termination_and_origination(procs, tmp_path, ca, backends):
    """TLS on both sides (service.tls and service.backend_tls): 32 MiB each way, SHA-256
    checked, half-close through both TLS layers."""
    b = backends(ca.issue_cert("echo.internal"))
    crt = ca_file(tmp_path, ca)
    ecrt, ekey = write_cert(tmp_path, "edge", ca.issue_cert("edge.test"))
    _, (port,) = start_fastlb(procs, config(
        tmp_path, f'{{ address = "127.0.0.1:{b.port}" }}',
        service_extra=f'tls = {{ cert = "{ecrt}", key = "{ekey}" }}\n'
                      f'backend_tls = {{ ca = "{crt}", sni = "echo.internal" }}'))
    blob = os.urandom(32 * MIB)
    with connect(port, client_ctx(ca)) as s:
        back = pump(s, blob)
    assert hashlib.sha256(back).hexdigest() == hashlib.sha256(blob).hexdigest()
    m = memory(tmp_path)
    assert m["tls_handshakes"] == 1 and m["tls_backend_handshakes"] == 1
    assert b.done == 1 and not b.failed


def test_foreign_ca_refused_counted_and_retried_on_a_good_backend(procs, tmp_path, ca, backends):
    """Two backends under one service default: one's certificate comes from another CA. Every
    client reaches the good one (the refused handshake is a failed connect, retried); the bad
    one's refusals are counted as connect failures and as backend TLS failures; its handshakes
    never complete."""
    good, bad, both = good_and_bad(backends, ca)
    crt = ca_file(tmp_path, ca)
    p, (port,) = start_fastlb(procs, config(
        tmp_path, both,
        service_extra=f'backend_tls = {{ ca = "{crt}" }}\nretries = 2'))
    answers = [ask(port) for _ in range(6)]
    assert answers == [b"GOOD"] * 6
    p.wait_line(rf"backend 127\.0\.0\.1:{bad.port}: .*TLS handshake failed \(certificate refused: "
                r"unable to get local issuer certificate\)")
    st = backend_stats(tmp_path)
    failures = st[f"127.0.0.1:{bad.port}"]["connect_failures"]
    assert failures >= 1 and st[f"127.0.0.1:{good.port}"]["connect_failures"] == 0
    assert memory(tmp_path)["tls_backend_failures"] == failures
    assert bad.done == 0 and good.done == 6
    assert not bad.sni and not good.sni                 # an IP is verified, never sent as SNI


def test_hostname_verified_unless_sni_names_the_certificate(procs, tmp_path, ca, backends):
    """The backend's certificate names api.internal only. Reached by its IP (no sni), the name
    does not match: refused (the client gets nothing, no retry left). With sni = "api.internal"
    the same backend is accepted, and it sees that SNI."""
    b = backends(ca.issue_cert("api.internal"), mode="name", name="API")
    crt = ca_file(tmp_path, ca)
    p, (port,) = start_fastlb(procs, config(
        tmp_path, f'{{ address = "127.0.0.1:{b.port}" }}',
        service_extra=f'backend_tls = {{ ca = "{crt}" }}\nretries = 0\n'
                      f'log = {{ connections = true, format = "json" }}'))
    assert ask(port) == b""
    assert b.done == 0 and memory(tmp_path)["tls_backend_failures"] == 1
    p.wait_line(r"TLS handshake failed \(certificate refused: IP address mismatch\)")
    rec = json.loads(p.wait_line(r'^\{.*"service".*\}$').group(0))
    assert (rec["term"], rec["backend"]) == ("SC", f"127.0.0.1:{b.port}")   # as a refused connect
    p.stop()
    _, (port,) = start_fastlb(procs, config(
        tmp_path, f'{{ address = "127.0.0.1:{b.port}" }}',
        service_extra=f'backend_tls = {{ ca = "{crt}", sni = "api.internal" }}\nretries = 0'))
    assert ask(port) == b"API"
    assert b.sni == ["api.internal"]


def test_mtls_backend_sees_fastlb_identity_and_refuses_without_a_certificate(procs, tmp_path, ca,
                                                                             backends):
    """A backend requiring a client certificate from its own CA: fastlb presents `cert`/`key`
    and the backend reads its identity (a URI SAN); a service without a client certificate is
    refused by that backend (the client gets no identity)."""
    client_ca = trustme.CA()
    b = backends(ca.issue_cert("127.0.0.1"), mode="identity", client_ca=client_ca)
    crt = ca_file(tmp_path, ca)
    mcrt, mkey = uri_cert(client_ca, "spiffe://corp/ns/edge/sa/fastlb", tmp_path, "fastlb")
    p, (port,) = start_fastlb(procs, config(
        tmp_path, f'{{ address = "127.0.0.1:{b.port}" }}',
        service_extra=f'backend_tls = {{ ca = "{crt}", cert = "{mcrt}", key = "{mkey}" }}'))
    assert json.loads(ask(port)) == [["URI", "spiffe://corp/ns/edge/sa/fastlb"]]
    assert b.done == 1
    p.stop()
    _, (port,) = start_fastlb(procs, config(
        tmp_path, f'{{ address = "127.0.0.1:{b.port}" }}',
        service_extra=f'backend_tls = {{ ca = "{crt}" }}\nretries = 0'))
    assert ask(port) == b""
    deadline = time.monotonic() + 10
    while not b.failed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b.done == 1 and b.failed                  # refused: no certificate from fastlb


def test_sessions_resume_per_backend(procs, tmp_path, ca, backends):
    """The backend's session is kept per slot: later connections resume it (counted)."""
    b = backends(ca.issue_cert("127.0.0.1"))
    crt = ca_file(tmp_path, ca)
    _, (port,) = start_fastlb(procs, config(
        tmp_path, f'{{ address = "127.0.0.1:{b.port}", tls = {{ ca = "{crt}" }} }}'))
    for _ in range(4):
        assert ask(port, b"ping") == b"ping"
    m = memory(tmp_path)
    assert m["tls_backend_handshakes"] == 4 and m["tls_backend_resumed"] >= 2


def test_backend_added_at_run_time_gets_the_service_default_and_false_opts_out(
        procs, tmp_path, ca, backends):
    """add_backend through the admin: the new backend is reached over TLS (backend_tls), as
    the configured one; a configured backend with tls = false is plain TCP."""
    from helpers import start_backend
    tlsb = backends(ca.issue_cert("127.0.0.1"), mode="name", name="ADDED")
    _, plain = start_backend(procs, "announce", name="PLAIN")
    crt = ca_file(tmp_path, ca)
    _, (port,) = start_fastlb(procs, config(
        tmp_path, f'{{ address = "127.0.0.1:{plain}", tls = false }}',
        service_extra=f'backend_tls = {{ ca = "{crt}" }}'))
    assert ask(port).strip() == b"PLAIN"
    with admin_client(tmp_path) as c:
        c.call("add_backend", service="web", address=f"127.0.0.1:{tlsb.port}")
        c.call("set_state", service="web", address=f"127.0.0.1:{plain}", state="maint")
    assert ask(port) == b"ADDED" and tlsb.done == 1


def test_health_check_marks_a_tls_failing_backend_down(procs, tmp_path, ca, backends):
    """Checks use the backend TLS settings: the backend whose certificate fails verification
    (a foreign CA) is marked down with the TLS reason; the good one stays up and takes every
    connection without a failed connect."""
    good, bad, both = good_and_bad(backends, ca)
    crt = ca_file(tmp_path, ca)
    p, (port,) = start_fastlb(procs, config(
        tmp_path, both,
        service_extra=f'backend_tls = {{ ca = "{crt}" }}\n'
                      f'health = {{ interval = "300ms", timeout = "300ms", fall = 1, rise = 1 }}'))
    p.wait_line(rf"127\.0\.0\.1:{bad.port} DOWN: .*TLS: unable to get local issuer", timeout=20)
    assert [ask(port) for _ in range(4)] == [b"GOOD"] * 4
    with admin_client(tmp_path) as c:
        health = {b["address"]: b["health"] for b in c.call("backends", service="web")}
    assert health == {f"127.0.0.1:{bad.port}": "down", f"127.0.0.1:{good.port}": "up"}
    assert backend_stats(tmp_path)[f"127.0.0.1:{bad.port}"]["connect_failures"] == 0


def test_verify_false_is_allowed_and_warned(procs, tmp_path, backends):
    """verify = false connects to a backend with any certificate, and says so at load."""
    b = backends(trustme.CA().issue_cert("whatever.test"), mode="name", name="ANY")
    p, (port,) = start_fastlb(procs, config(
        tmp_path, f'{{ address = "127.0.0.1:{b.port}", tls = {{ verify = false }} }}'))
    assert ask(port) == b"ANY"
    p.wait_line(r"service\[0\]\.backends\[0\]\.tls\.verify = false: the backend's certificate "
                r"is not checked")


def test_bad_configuration_is_refused_naming_the_key(tmp_path, ca):
    """Each bad origination setting is refused with its key path and what is expected."""
    from fastlb import config as cfg
    from fastlb.errors import ConfigError
    good = ca_file(tmp_path, ca)
    (tmp_path / "junk.pem").write_bytes(b"not a certificate\n")
    crt, key = write_cert(tmp_path, "c", ca.issue_cert("c.test"))
    _, other_key = write_cert(tmp_path, "o", ca.issue_cert("o.test"))

    def refused(tls, where="backend_tls", match=""):
        text = ('[[service]]\nname = "web"\nlisten = ["127.0.0.1:0"]\n'
                + (f"backend_tls = {tls}\nbackends = [ {{ address = \"127.0.0.1:1\" }} ]\n"
                   if where == "backend_tls" else
                   f"backends = [ {{ address = \"127.0.0.1:1\", tls = {tls} }} ]\n"))
        with pytest.raises(ConfigError, match=match):
            cfg.loads(text)
    refused(f'{{ ca = "{tmp_path}/missing.pem" }}', match=r"service\[0\]\.backend_tls\.ca.*cannot read")
    refused(f'{{ ca = "{tmp_path}/junk.pem" }}', match=r"backend_tls\.ca.*no PEM certificate")
    refused(f'{{ ca = "{good}", cert = "{crt}" }}', match=r"backend_tls\.key.*cert and key go together")
    refused(f'{{ cert = "{crt}", key = "{other_key}" }}', where="backend",
            match=r"service\[0\]\.backends\[0\]\.tls\.key.*does not match")
    refused('{ verify = "yes" }', match=r"backend_tls\.verify.*expected true or false")
    refused('{ sni = "not a name" }', where="backend", match=r"backends\[0\]\.tls\.sni.*host name")
    refused('{ cafile = "x" }', match=r"backend_tls.*cafile")
    ok = cfg.loads(f'[[service]]\nname = "web"\nlisten = ["127.0.0.1:0"]\n'
                   f'backend_tls = {{ ca = "{good}" }}\n'
                   f'backends = [ {{ address = "127.0.0.1:1", tls = {{ sni = "a.internal" }} }},'
                   f' {{ address = "127.0.0.1:2" }} ]\n')
    s = ok.services[0]
    assert s.backends[0].tls.sni == "a.internal" and s.backends[0].tls.ca == str(good)   # merged
    assert s.backends[1].tls is None and s.backend_tls.ca == str(good)
    assert cfg.service_from_dict(cfg.service_to_dict(s), "service[0]") == s


def test_reload_with_a_bad_ca_keeps_the_running_configuration(procs, tmp_path, ca, backends):
    """SIGHUP with the CA file now garbage: refused (the key named in the log), the old
    contexts stay and clients still get through."""
    b = backends(ca.issue_cert("127.0.0.1"), mode="name", name="OK")
    crt = ca_file(tmp_path, ca)
    p, (port,) = start_fastlb(procs, config(
        tmp_path, f'{{ address = "127.0.0.1:{b.port}" }}', service_extra=f'backend_tls = {{ ca = "{crt}" }}'))
    assert ask(port) == b"OK"
    crt.write_bytes(b"garbage\n")
    p.signal(signal.SIGHUP)
    p.wait_line(r"backend_tls\.ca.*no PEM certificate", timeout=10)
    assert ask(port) == b"OK"


def test_workers_build_their_own_contexts_from_the_plan(procs, tmp_path, ca, backends):
    """workers = 2: the PEM rides the plan to each worker, which builds its own context and
    session cache; every connection is verified and carried."""
    b = backends(ca.issue_cert("127.0.0.1"))
    crt = ca_file(tmp_path, ca)
    _, (port,) = start_fastlb(procs, config(
        tmp_path, f'{{ address = "127.0.0.1:{b.port}" }}', global_extra="workers = 2",
        service_extra=f'backend_tls = {{ ca = "{crt}" }}'))
    for i in range(8):
        assert ask(port, b"x%d" % i) == b"x%d" % i
    assert b.done == 8 and not b.failed


def test_a_stalled_backend_handshake_times_out_under_the_connect_timeout(procs, tmp_path, ca,
                                                                         backends):
    """A backend that accepts TCP and never answers the ClientHello: the attempt fails at
    timeouts.connect (a connect timeout, counted) and the client is carried by the next one."""
    good = backends(ca.issue_cert("127.0.0.1"), mode="name", name="GOOD")
    stall, held = stall_server()
    crt = ca_file(tmp_path, ca)
    try:
        p, (port,) = start_fastlb(procs, config(
            tmp_path, f'{{ address = "127.0.0.1:{stall.getsockname()[1]}" }}, '
                      f'{{ address = "127.0.0.1:{good.port}" }}',
            service_extra=f'backend_tls = {{ ca = "{crt}" }}\ntimeouts = {{ connect = "500ms" }}'))
        t0 = time.monotonic()
        assert [ask(port) for _ in range(2)] == [b"GOOD"] * 2
        assert time.monotonic() - t0 < 10
        p.wait_line(rf"backend 127\.0\.0\.1:{stall.getsockname()[1]}: connect timeout")
        st = backend_stats(tmp_path)
        assert st[f"127.0.0.1:{stall.getsockname()[1]}"]["connect_failures"] >= 1
        assert memory(tmp_path)["tls_backend_handshakes"] == 2
    finally:
        stall.close()
        for c in held:
            c[0].close()


def test_without_ca_the_system_store_decides(procs, tmp_path, ca, backends):
    """tls = true (no ca): the backend's certificate must chain to the system's CAs; a private
    CA's certificate is refused (and the client closed: no retry left)."""
    b = backends(ca.issue_cert("127.0.0.1"), mode="name", name="PRIVATE")
    _, (port,) = start_fastlb(procs, config(
        tmp_path, f'{{ address = "127.0.0.1:{b.port}", tls = true }}',
        service_extra="retries = 0"))
    assert ask(port) == b""
    assert b.done == 0 and memory(tmp_path)["tls_backend_failures"] == 1
