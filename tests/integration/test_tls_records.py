"""[tlsbench] TLS records of every size, many in one TCP segment, through `fastlb run`.

_tls_recv (core/tls.pxi) returns after a record shorter than the maximum instead of reading on
to EAGAIN (one syscall less per request): what follows it in the socket must still be read,
reported again by level-triggered epoll. Here thousands of small records are written back to
back (the kernel queues many per read), mixed with full 16 KiB ones and a half-close; every
byte must come back from an echo backend, in order. Certificates made by trustme in the test."""
import hashlib
import os
import random
import selectors
import socket
import ssl
import time

import pytest

from helpers import start_backend, start_fastlb

trustme = pytest.importorskip("trustme")


def test_small_records_back_to_back_all_arrive_in_order(procs, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("edge.test")
    crt, key = tmp_path / "edge.crt", tmp_path / "edge.key"
    crt.write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    _, bport = start_backend(procs, "echo")
    _, (port,) = start_fastlb(procs, (
        f'[[service]]\nname = "edge"\nlisten = ["127.0.0.1:0"]\n'
        f'tls = {{ cert = "{crt}", key = "{key}" }}\n'
        f'backends = [ {{ address = "127.0.0.1:{bport}" }} ]\n'))
    rnd = random.Random(12)
    sizes = [rnd.choice((1, 2, 17, 100, 1000, 16383, 16384, 16385)) for _ in range(3000)]
    blob = os.urandom(sum(sizes))
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                        server_hostname="edge.test")
    s.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    got, i, off, shut = [], 0, 0, False
    deadline = time.monotonic() + 60
    try:
        while True:
            assert time.monotonic() < deadline, f"stalled: {i} of {len(sizes)} records sent"
            sel.select(0.5)
            while i < len(sizes):               # one send = one record (up to 16 KiB)
                try:
                    s.send(blob[off:off + sizes[i]])
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                    break
                off += sizes[i]
                i += 1
            if i == len(sizes) and not shut:
                socket.socket.shutdown(s, socket.SHUT_WR)
                shut = True
                sel.modify(s, selectors.EVENT_READ)
            try:
                data = s.recv(262144)
                while data:
                    got.append(data)
                    data = s.recv(262144)
                break                           # EOF: fastlb's, after the last byte
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                pass
    finally:
        sel.close()
        s.close()
    back = b"".join(got)
    assert len(back) == len(blob)
    assert hashlib.sha256(back).digest() == hashlib.sha256(blob).digest()
