"""[sni] SNI routing without termination through `fastlb run` (issue 12): services sharing one
listen address, each backend a TLS server of its own (Python ssl, trustme certificates) that
completes the handshake with the client through fastlb. Routing by exact name, by a one-label
wildcard, to the default; refusals without a default (no SNI, garbage), a ClientHello split
byte by byte, one larger than the bound, a stalled one; the routed session as its service's
(ACL); a reload adding a service on the shared address with a connection held open."""
import json
import os
import socket
import ssl
import threading
import time
import urllib.request

import pytest

from helpers import free_port, made_and_closed, start_backend, start_fastlb
from tlshelpers import TlsBackend, client_ctx, client_hello, connect

pytest.importorskip("trustme")


@pytest.fixture
def backends(ca):
    def make(name, *names):
        """A TLS backend that says ``name`` after the handshake, then echoes; its certificate
        issued by ``ca`` for ``names``."""
        return TlsBackend(ca.issue_cert(*names), mode="hello", name=name)
    yield from made_and_closed(make)


def svc(name, port, backend_port, sni=None, extra=""):
    return (f'[[service]]\nname = "{name}"\nlisten = ["127.0.0.1:{port}"]\n'
            + (f"sni = {json.dumps(sni)}\n" if sni is not None else "") + extra
            + f'backends = [ {{ address = "127.0.0.1:{backend_port}" }} ]\n')


def start(procs, tmp_path, services, glob=""):
    mport = free_port()
    (tmp_path / "mport").write_text(str(mport))
    text = f'[global]\nmetrics = "127.0.0.1:{mport}"\n{glob}\n' + "".join(services)
    cfg = tmp_path / "lb.toml"
    cfg.write_text(text)
    p, _ = start_fastlb(procs, text)
    return p


def api(tmp_path):
    mport = int((tmp_path / "mport").read_text())
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{mport}/api/stats",
                                             timeout=10).read())


def counts(tmp_path):
    m = api(tmp_path)["memory"]
    return {k: v for k, v in m.items() if k.startswith("sni_")}


def hello_of(port, ctx, name, timeout=10.0):
    """Connect with SNI ``name`` (None: no SNI, no hostname check), verify the certificate
    against the CA (and ``name``); return (the backend's announced name, the certificate's
    DNS names, the TLS socket)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if name is None:
        ctx.check_hostname = False
    s = ctx.wrap_socket(raw, server_hostname=name)
    line = b""
    while not line.endswith(b"\n"):
        data = s.recv(100)
        if not data:
            break
        line += data
    sans = [v for _, v in s.getpeercert()["subjectAltName"]]
    return line.decode().strip(), sans, s


def routed(port, ctx, name):
    got, sans, s = hello_of(port, ctx, name)
    s.sendall(b"ping")
    assert s.recv(4) == b"ping"
    s.close()
    return got, sans


def greeting(port, ca, name, timeout=5.0):
    """The first bytes a client with SNI ``name`` gets (its backend's name line), its
    certificate verified against ``ca`` but not its name (it may be the default's)."""
    with connect(port, client_ctx(ca, check_hostname=False), name, timeout) as s:
        return s.recv(100)


def routed_counts(tmp_path, n):
    """The SNI counts once ``n`` connections were routed (the workers report each second)."""
    deadline = time.monotonic() + 5
    while counts(tmp_path)["sni_routed"] < n:
        assert time.monotonic() < deadline, counts(tmp_path)
        time.sleep(0.1)
    return counts(tmp_path)


def closed_without_reply(sock, timeout=5.0):
    """The peer closes without sending anything (reset counts as closed)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def test_routes_by_exact_name_wildcard_and_default_each_backend_completes_the_handshake(
        procs, tmp_path, ca, backends):
    """Three services on one port: SNI a.example.com -> A (the client verifies A's own
    certificate through fastlb), x.b.example.com -> B by its wildcard, no SNI and unmatched
    names (one label too deep, a sibling) -> the default D; upper case matches. Counted by
    outcome, and each session counted in its own service's row."""
    a = backends("A", "a.example.com")
    b = backends("B", "*.b.example.com")
    d = backends("D", "default.test")
    port = free_port()
    start(procs, tmp_path, [svc("a", port, a.port, ["a.example.com"]),
                            svc("b", port, b.port, ["*.b.example.com"]),
                            svc("d", port, d.port)])
    ctx = client_ctx(ca)
    assert routed(port, ctx, "a.example.com") == ("A", ["a.example.com"])
    assert routed(port, ctx, "A.Example.COM") == ("A", ["a.example.com"])
    assert routed(port, ctx, "x.b.example.com") == ("B", ["*.b.example.com"])
    got, sans, s = hello_of(port, client_ctx(ca), None)
    s.close()
    assert (got, sans) == ("D", ["default.test"])
    for name in ("y.x.b.example.com", "b.example.com", "c.example.com"):
        assert greeting(port, ca, name, 10) == b"D\n", name
    assert routed_counts(tmp_path, 3) == {"sni_routed": 3, "sni_defaulted": 4, "sni_no_route": 0,
                                "sni_bad_hello": 0, "sni_oversize": 0, "sni_timeouts": 0}
    assert (a.done, b.done, d.done) == (2, 1, 4)
    totals = {s["name"]: s["limits"].get("total") for s in api(tmp_path)["services"]}
    assert totals == {"a": 2, "b": 1, "d": 4}, totals


def test_without_a_default_no_sni_garbage_oversized_and_stalled_hellos_are_closed_and_counted(
        procs, tmp_path, ca):
    """No default service: a hello without SNI, an unknown name, an HTTP request instead of a
    hello, a 20 KiB hello (over the 16 KiB bound) are closed at once; a client that stops
    half-way through its hello is closed at timeouts.handshake (400 ms). None reaches the
    backend (it announces itself on connect); each outcome counted."""
    _, bport = start_backend(procs, "announce", name="BACKEND")
    port = free_port()
    p = start(procs, tmp_path, [svc("a", port, bport, ["a.example.com"],
                                    extra='timeouts = { handshake = "400ms" }\n'
                                          'log = { connections = true }\n')])
    for data in (client_hello(None), client_hello("nope.example.com"),
                 b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n", client_hello("a.example.com", 20000)):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            t0 = time.monotonic()
            try:
                s.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert closed_without_reply(s), data[:40]
            assert time.monotonic() - t0 < 0.35            # at once, not at the timeout
    hello = client_hello("a.example.com")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(hello[:len(hello) // 2])
        t0 = time.monotonic()
        assert closed_without_reply(s)
        assert 0.3 < time.monotonic() - t0 < 3.0
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:    # still routes
        s.sendall(hello)
        assert s.recv(100).startswith(b"BACKEND")
    assert routed_counts(tmp_path, 1) == {"sni_routed": 1, "sni_defaulted": 0, "sni_no_route": 2,
                                "sni_bad_hello": 1, "sni_oversize": 1, "sni_timeouts": 1}
    mport = int((tmp_path / "mport").read_text())
    body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
    for outcome, n in (("routed", 1), ("no_route", 2), ("bad_hello", 1), ("oversize", 1),
                       ("timeout", 1), ("default", 0)):
        assert f'fastlb_sni_connections_total{{outcome="{outcome}"}} {n}.0' in body, body
    # the connection log: refusals before routing name no service (HAProxy logs its frontend)
    p.wait_line(rf"<sni>:{port} <sni>/<NOSRV> .* cR ")
    assert len([x for x in p.lines if f"<sni>:{port} <sni>/<NOSRV>" in x and " PR " in x]) == 4, p.output
    assert len([x for x in p.lines if f" a:{port} a/" in x]) == 1, p.output    # the routed one


def test_a_hello_split_byte_by_byte_is_still_routed_and_the_handshake_completes(
        procs, tmp_path, ca, backends):
    """The client's first flight sent one byte at a time (1 ms apart): fastlb waits for the
    whole hello, routes it, and forwards every byte it read untouched (the handshake with B,
    whose Finished covers the transcript, succeeds; the certificate is B's)."""
    a = backends("A", "a.example.com")
    b = backends("B", "b.example.com")
    port = free_port()
    start(procs, tmp_path, [svc("a", port, a.port), svc("b", port, b.port, ["b.example.com"])])
    obj = client_ctx(ca).wrap_bio(inc := ssl.MemoryBIO(), out := ssl.MemoryBIO(),
                                  server_hostname="b.example.com")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        first = True
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            data = out.read()
            if first:
                for i in range(len(data)):
                    s.sendall(data[i:i + 1])
                    time.sleep(0.001)
                first = False
            elif data:
                s.sendall(data)
            got = s.recv(65536)
            assert got, "closed during the handshake"
            inc.write(got)
        s.sendall(out.read())
        assert [v for _, v in obj.getpeercert()["subjectAltName"]] == ["b.example.com"]
        line = b""
        while not line.endswith(b"\n"):
            try:
                line += obj.read(100)
            except ssl.SSLWantReadError:
                inc.write(s.recv(65536))
        assert line == b"B\n"


def test_the_routed_session_is_its_services_own_acl(procs, tmp_path, ca, backends):
    """A service that denies the client's address refuses it once routed there (counted in its
    row), while the other service on the same port serves the same client."""
    a = backends("A", "a.example.com")
    b = backends("B", "b.example.com")
    port = free_port()
    start(procs, tmp_path, [svc("a", port, a.port, ["a.example.com"],
                                extra='acl = { deny = ["127.0.0.1/32"] }\n'),
                            svc("b", port, b.port, ["b.example.com"])])
    ctx = client_ctx(ca)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
            ctx.wrap_socket(raw, server_hostname="a.example.com")
    assert routed(port, ctx, "b.example.com")[0] == "B"
    assert a.done == 0
    rows = {s["name"]: s["limits"] for s in api(tmp_path)["services"]}
    assert rows["a"].get("denied_acl") == 1 and not rows["b"].get("denied_acl"), rows


def test_a_reload_adding_a_third_sni_service_keeps_an_open_connection(procs, tmp_path, ca, backends):
    """A connection routed to A stays open across a reload that adds service c on the shared
    port (one listening socket, its table swapped): it still echoes afterwards; new clients
    reach c by its name. Then a reload removing b: b's names go to the default."""
    a = backends("A", "a.example.com")
    b = backends("B", "b.example.com")
    c = backends("C", "c.example.com")
    port = free_port()
    mport = free_port()
    head = f'[global]\nmetrics = "127.0.0.1:{mport}"\n'
    two = [svc("a", port, a.port), svc("b", port, b.port, ["b.example.com"])]
    cfg = tmp_path / "lb.toml"
    cfg.write_text(head + "".join(two))
    from helpers import PY, Proc
    p = Proc([PY, "-m", "fastlb", "run", "-c", str(cfg)], procs)
    p.wait_line("fastlb ready")
    ctx = client_ctx(ca)
    got, _, held = hello_of(port, client_ctx(ca), None)
    assert got == "A"
    held.sendall(b"one")
    assert held.recv(3) == b"one"
    cfg.write_text(head + "".join(two) + svc("c", port, c.port, ["c.example.com"]))
    p.signal(1)                                                     # SIGHUP
    p.wait_line(r"reload", timeout=15)
    deadline = time.monotonic() + 10
    while True:
        try:
            if routed(port, ctx, "c.example.com")[0] == "C":
                break
        except (ssl.SSLError, OSError):
            pass
        assert time.monotonic() < deadline, p.output
        time.sleep(0.1)
    held.sendall(b"two")
    assert held.recv(3) == b"two"
    assert routed(port, ctx, "b.example.com")[0] == "B"
    cfg.write_text(head + svc("a", port, a.port) + svc("c", port, c.port, ["c.example.com"]))
    p.signal(1)
    deadline = time.monotonic() + 10
    while True:
        if greeting(port, ca, "b.example.com") == b"A\n":
            break
        assert time.monotonic() < deadline, p.output
        time.sleep(0.1)
    held.sendall(b"three")
    assert held.recv(5) == b"three"
    held.close()
    assert "Traceback" not in p.output and "a bug" not in p.output, p.output
    assert os.path.exists(cfg)


def test_a_plain_service_gaining_sni_neighbours_keeps_its_socket_and_connections_two_workers(
        procs, tmp_path, ca, backends):
    """With 2 worker processes: service a alone on its port (no sni); a reload adds b with sni
    on the same port. The address changes hands (a's socket becomes the group's: the same
    socket, never closed): a connection held open keeps echoing, no connect is refused
    meanwhile, clients without SNI still reach a and b.example.com reaches b. Removing b gives
    the port back to a alone."""
    a = backends("A", "a.example.com")
    b = backends("B", "b.example.com")
    port = free_port()
    head = f'[global]\nworkers = 2\nmetrics = "127.0.0.1:{free_port()}"\n'
    cfg = tmp_path / "lb.toml"
    cfg.write_text(head + svc("a", port, a.port))
    from helpers import PY, Proc
    p = Proc([PY, "-m", "fastlb", "run", "-c", str(cfg)], procs)
    p.wait_line("fastlb ready")
    got, _, held = hello_of(port, client_ctx(ca), None)
    assert got == "A"
    stop = threading.Event()
    failures = []

    def hammer():                       # plain TCP connects all along: none may be refused
        while not stop.is_set():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            except OSError as exc:
                failures.append(exc)
            time.sleep(0.005)
    t = threading.Thread(target=hammer)
    t.start()
    try:
        for text, name, want in ((head + svc("a", port, a.port) + svc("b", port, b.port, ["b.example.com"]),
                                  "b.example.com", "B"),
                                 (head + svc("a", port, a.port), "b.example.com", "A")):
            cfg.write_text(text)
            p.signal(1)                                             # SIGHUP
            deadline = time.monotonic() + 15
            while True:
                try:
                    if greeting(port, ca, name).decode().strip() == want:
                        break
                except (ssl.SSLError, OSError):
                    pass
                assert time.monotonic() < deadline, p.output
                time.sleep(0.1)
            time.sleep(0.5)                                         # both workers have it
            for _ in range(6):
                got, _, s = hello_of(port, client_ctx(ca), None)
                s.close()
                assert got == "A"
            held.sendall(b"still")
            assert held.recv(5) == b"still"
    finally:
        stop.set()
        t.join()
    held.close()
    assert not failures, failures[:3]
    assert "Traceback" not in p.output and "a bug" not in p.output, p.output


def test_admin_adds_and_removes_sni_services_on_a_live_port_with_the_state_file(procs, tmp_path, ca,
                                                                               backends):
    """Through the admin socket: add_service b (sni) on plain service a's port, then c, while
    a connection to a is held open; a clash is refused with its key path and changes nothing;
    the state file keeps the sni names across a restart; remove_service b sends its names to
    the default; the held connection echoes throughout."""
    from fastlb.admin.client import AdminError
    from helpers import PY, Proc
    from helpers import admin_client as client
    a = backends("A", "a.example.com")
    b = backends("B", "b.example.com")
    c = backends("C", "c.example.com")
    port = free_port()
    head = (f'[global]\nadmin = "unix:{tmp_path}/admin.sock"\n'
            f'state_file = "{tmp_path}/state.msgpack"\n')
    cfg = tmp_path / "lb.toml"
    cfg.write_text(head + svc("a", port, a.port))
    p = Proc([PY, "-m", "fastlb", "run", "-c", str(cfg)], procs)
    p.wait_line("fastlb ready")
    ctx = client_ctx(ca)
    got, _, held = hello_of(port, client_ctx(ca), None)
    assert got == "A"

    def echo(word):
        held.sendall(word)
        assert held.recv(len(word)) == word

    def reaches(name):
        return greeting(port, ca, name).decode().strip()
    with client(tmp_path) as cl:
        cl.call("add_service", service={"name": "b", "listen": [f"127.0.0.1:{port}"],
                                        "sni": ["b.example.com"],
                                        "backends": [{"address": f"127.0.0.1:{b.port}"}]})
        echo(b"one")
        assert routed(port, ctx, "b.example.com")[0] == "B"
        with pytest.raises(AdminError) as err:
            cl.call("add_service", service={"name": "x", "listen": [f"127.0.0.1:{port}"],
                                            "sni": ["B.example.com"],
                                            "backends": [{"address": f"127.0.0.1:{c.port}"}]})
        assert "service.sni[0]" in str(err.value) and "already routed to service 'b'" in str(err.value)
        cl.call("add_service", service={"name": "c", "listen": [f"127.0.0.1:{port}"],
                                        "sni": ["*.c.example.com"],
                                        "backends": [{"address": f"127.0.0.1:{c.port}"}]})
        assert reaches("x.c.example.com") == "C"
        echo(b"two")
        cl.call("remove_service", service="b")
        assert reaches("b.example.com") == "A"
        echo(b"three")
    held.close()
    p.signal(15)
    p.wait(15)
    p2 = Proc([PY, "-m", "fastlb", "run", "-c", str(cfg)], procs)   # the state file's services
    p2.wait_line("fastlb ready")
    assert reaches("x.c.example.com") == "C" and reaches("a.example.com") == "A"
