"""TLS test helpers shared by the TLS tests (test_tls, test_tls_orig, test_tls_ops, test_sni,
test_sni_core) and the debug-build scenarios (test_core_debug.run_scenario puts this folder on
their path): certificate files, clients (verified, pumping, looping, refused), a first
ClientHello's bytes, and loopback servers (a TLS backend, one that stalls). Standard library
only at import (trustme certificates are passed in), so a scenario of the debug build imports it
without pulling in the tree's fastlb."""
from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import ssl
import struct
import threading
import time
import urllib.request


# -- certificates -----------------------------------------------------------------------------------
def write_cert(directory, name, cert):
    """cert (a trustme LeafCert) as name.crt (leaf then chain) and name.key; the paths."""
    crt, key = os.path.join(directory, f"{name}.crt"), os.path.join(directory, f"{name}.key")
    with open(crt + ".tmp", "wb") as f:
        f.write(b"".join(p.bytes() for p in cert.cert_chain_pems))
    with open(key + ".tmp", "wb") as f:
        f.write(cert.private_key_pem.bytes())
    os.replace(crt + ".tmp", crt)               # whole files: a reload never reads half of one
    os.replace(key + ".tmp", key)
    return crt, key


def write_pems(directory, pems):
    """Each (file name, PEM bytes) of ``pems`` written in ``directory``; the paths, in order."""
    paths = []
    for name, pem in pems:
        (directory / name).write_bytes(pem)
        paths.append(str(directory / name))
    return paths


def uri_cert(ca, uri, tmp_path, name):
    """A client certificate with a URI SAN (a SPIFFE id; trustme makes DNS/IP ones only),
    signed by trustme's ``ca``; (cert path, key path)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "workload")]))
            .issuer_name(ca._certificate.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca._private_key, hashes.SHA256()))
    crt, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(crt), str(key_path)


# -- fastlb with a metrics port ---------------------------------------------------------------------
def start(procs, tmp_path, text):
    """fastlb on ``text``, with its metrics port (/api/stats, /metrics) put in for ``{mport}``
    and noted in tmp_path."""
    from helpers import free_port, start_fastlb
    mport = free_port()
    (tmp_path / "mport").write_text(str(mport))
    return start_fastlb(procs, text.replace("{mport}", str(mport)))


def http_get(tmp_path, path):
    """GET ``path`` on the metrics port noted in tmp_path (by start); the body."""
    mport = int((tmp_path / "mport").read_text())
    return urllib.request.urlopen(f"http://127.0.0.1:{mport}{path}", timeout=10).read().decode()


# -- clients ----------------------------------------------------------------------------------------
def client_ctx(ca, **kw):
    """A client context trusting ``ca`` (trustme), with ``kw`` set on it."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


def connect(port, ctx, name="edge.test", timeout=10.0):
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return ctx.wrap_socket(raw, server_hostname=name)


def echo_loop(port, ctx, size, stop, failures, done):
    """Until ``stop``: a TLS connection, ``size`` bytes echoed back whole, closed; counts each
    in ``done[0]`` and every failure (repr) in ``failures`` (the reload-under-load tests)."""
    while not stop.is_set():
        try:
            with connect(port, ctx) as s:
                s.sendall(b"z" * size)
                got = b""
                while len(got) < size:
                    data = s.recv(size)
                    assert data
                    got += data
            done[0] += 1
        except Exception as exc:          # noqa: BLE001 - every failure counts
            failures.append(repr(exc))


def pump(s, payload, timeout=60.0):
    """Send ``payload`` and read until EOF at once (one thread, non-blocking), half-closing
    the TCP connection (a FIN without close_notify: a client that just stops) once all is
    sent. Returns what was read."""
    s.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    view, sent, got, shut = memoryview(payload), 0, [], False
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, f"stalled: sent {sent}, got {sum(map(len, got))}"
        sel.select(0.5)
        if sent < len(payload):
            try:
                sent += s.send(view[sent:sent + 65536])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                pass
        elif not shut:
            socket.socket.shutdown(s, socket.SHUT_WR)      # the TCP level, under the TLS
            shut = True
            sel.modify(s, selectors.EVENT_READ)
        try:
            while True:
                data = s.recv(262144)
                if not data:
                    sel.close()
                    return b"".join(got)
                got.append(data)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            pass


def read_to_eof(sock):
    """All the peer sends until it closes (a reset ends it too: a refused client may get one)."""
    out = []
    try:
        while data := sock.recv(65536):
            out.append(data)
    except ConnectionResetError:
        pass
    return b"".join(out)


def refused_at_once(port, payload, *, shut=True, reset=False, timeout=10.0):
    """A client that sends ``payload`` instead of a handshake (None: it leaves before a byte),
    then half-closes (``shut``), and reads until the server closes; the bytes it got (an alert,
    or nothing). ``reset``: its own close is a reset (SO_LINGER 0: no TIME_WAIT left behind)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        if reset:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if payload is None:
            return b""
        try:
            s.sendall(payload)
            if shut:
                s.shutdown(socket.SHUT_WR)      # then EOF: half a ClientHello goes no further
        except OSError:                         # already refused (reset, not connected)
            return b""
        return read_to_eof(s)


def client_hello(name, pad=0):
    """A ClientHello made by Python's ssl (SNI ``name``; None: no SNI), its first flight's
    bytes; ``pad``: that many more bytes in a padding extension (RFC 7685), the lengths fixed
    up."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:                 # waiting for the server's flight, as it must
        pass
    else:
        raise AssertionError("a handshake done without a server")
    data = out.read()
    if not pad:
        return data
    body = data[9:]                              # after the record and handshake headers
    ext = struct.pack("!HH", 21, pad) + bytes(pad)
    # the extensions block is the tail: its length is the 2 bytes before it; find it by walking
    pos = 34
    pos += 1 + body[pos]
    pos += 2 + int.from_bytes(body[pos:pos + 2], "big")
    pos += 1 + body[pos]
    elen = int.from_bytes(body[pos:pos + 2], "big")
    body = body[:pos] + struct.pack("!H", elen + len(ext)) + body[pos + 2:] + ext
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    out_records = b""
    for i in range(0, len(hs), 16384):           # records of at most 2^14
        chunk = hs[i:i + 16384]
        out_records += b"\x16\x03\x01" + struct.pack("!H", len(chunk)) + chunk
    return out_records


# -- servers ----------------------------------------------------------------------------------------
class TlsBackend:
    """A TLS server on a loopback thread (one thread per connection), its certificate ``leaf``
    (trustme). ``mode``: "echo" (every byte back until EOF), "hello" (``name`` and a newline,
    then echo), "identity" (the client certificate's SANs as JSON), "name" (``name``); then
    close_notify and close. Records the SNI names it saw, the handshakes it completed (done),
    those that failed, and the closes where its close_notify was answered (clean)."""

    def __init__(self, leaf, mode="echo", name="B", client_ca=None):
        self.mode, self.name = mode, name
        self.sni, self.done, self.failed = [], 0, []
        self.clean = 0                          # closes where our close_notify was answered
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        leaf.configure_cert(self.ctx)
        if client_ca is not None:
            self.ctx.verify_mode = ssl.CERT_REQUIRED
            client_ca.configure_trust(self.ctx)
        self.ctx.sni_callback = lambda _sock, name, _ctx: (self.sni.append(name) if name else None)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        with contextlib.suppress(OSError):     # until close(): accept fails
            while True:
                raw, _ = self.sock.accept()
                threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw):
        raw.settimeout(60)
        try:
            conn = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.failed.append(str(exc))
            raw.close()
            return
        self.done += 1
        try:
            if self.mode == "identity":
                conn.sendall(json.dumps(conn.getpeercert().get("subjectAltName", [])).encode())
            elif self.mode == "name":
                conn.sendall(self.name.encode())
            else:
                if self.mode == "hello":
                    conn.sendall(self.name.encode() + b"\n")
                while data := conn.recv(262144):
                    conn.sendall(data)
            try:
                conn.unwrap()                   # close_notify, then the FIN below
                self.clean += 1                 # ... and the proxy's close_notify came back
            except (ssl.SSLError, OSError):
                pass
        except (ssl.SSLError, OSError) as exc:
            self.failed.append(str(exc))
        finally:
            conn.close()

    def close(self):
        self.sock.close()


def stall_server(backlog=512):
    """A loopback server that accepts and never answers (a handshake that stalls); (its
    listening socket, the list its accepted (socket, address) pairs go to)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(backlog)
    held = []
    threading.Thread(target=lambda: held.extend(iter(srv.accept, None)), daemon=True).start()
    return srv, held
