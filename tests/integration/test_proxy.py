"""The proxy end to end: real fastlb, real backends, real sockets on 127.0.0.1."""
import asyncio
import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from helpers import (Blackhole, closed_port, recv_all, service, start_backend, start_fastlb)


def connect(port, timeout=10.0):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def names_of(port, count):
    out = []
    for _ in range(count):
        with connect(port) as s:
            out.append(s.recv(100).decode().strip())
    return out


def echo_exchange(port, payload_chunks):
    """Send chunks (in a thread) while reading; return (sha sent, sha received, bytes)."""
    s = connect(port)
    sent = hashlib.sha256()

    def writer():
        for chunk in payload_chunks:
            sent.update(chunk)
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=writer)
    t.start()
    got = hashlib.sha256()
    n = 0
    s.settimeout(60)
    while data := s.recv(262144):
        got.update(data)
        n += len(data)
    t.join()
    s.close()
    return sent.hexdigest(), got.hexdigest(), n


def test_integrity_32_mib_each_way_at_once(procs):
    _, be = start_backend(procs, "echo")
    _, (port,) = start_fastlb(procs, service("web", [(be, 1)]))
    blob = os.urandom(32 << 20)
    chunks = [blob[i:i + (1 << 20)] for i in range(0, len(blob), 1 << 20)]
    sent, got, n = echo_exchange(port, chunks)
    assert n == 32 << 20
    assert sent == got


def test_integrity_many_small_writes(procs):
    _, be = start_backend(procs, "echo")
    _, (port,) = start_fastlb(procs, service("web", [(be, 1)]))
    rnd = random.Random(5)
    chunks = [os.urandom(rnd.randint(1, 300)) for _ in range(20_000)]
    sent, got, n = echo_exchange(port, chunks)
    assert n == sum(map(len, chunks))
    assert sent == got


def test_round_robin_rotation_is_nginx_sequence(procs):
    ports = [start_backend(procs, "announce", name=n)[1] for n in "abc"]
    _, (port,) = start_fastlb(procs, service("web", list(zip(ports, [5, 1, 1], strict=False))))
    assert "".join(names_of(port, 21)) == "aabacaa" * 3


def test_half_close_reply_arrives_after_client_shutdown(procs):
    _, be = start_backend(procs, "reply", size=3 << 20)
    _, (port,) = start_fastlb(procs, service("web", [(be, 1)]))
    s = connect(port)
    s.sendall(b"GET /big\r\n" * 100)
    s.shutdown(socket.SHUT_WR)               # request done; the reply comes after our EOF
    reply = recv_all(s)
    s.close()
    assert len(reply) == 3 << 20
    assert reply[:256] == bytes(range(256))


def test_one_thousand_concurrent_connections(procs):
    _, be = start_backend(procs, "echo")
    _, (port,) = start_fastlb(procs, service("web", [(be, 1)]))

    async def one(i, start):
        await start.wait()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        msg = (b"%06d" % i) * 200
        w.write(msg)
        await w.drain()
        got = await r.readexactly(len(msg))
        w.close()
        return got == msg

    async def main():
        start = asyncio.Event()
        tasks = [asyncio.create_task(one(i, start)) for i in range(1000)]
        await asyncio.sleep(0.1)
        start.set()
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)

    results = asyncio.run(main())
    errors = [r for r in results if r is not True]
    assert not errors, errors[:5]


def test_backpressure_slow_reader_bounds_memory(procs):
    size = 256 << 20
    _, be = start_backend(procs, "source", size=size)
    lb, (port,) = start_fastlb(procs, service("web", [(be, 1)]))
    base = lb.rss_kib()
    s = connect(port, timeout=60)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    got, peak = 0, base
    while data := s.recv(65536):
        got += len(data)
        if got % (8 << 20) < 65536:
            peak = max(peak, lb.rss_kib())
            time.sleep(0.02)                 # the client reads slowly
    s.close()
    assert got == size
    assert (peak - base) < 64 * 1024, f"RSS grew by {(peak - base) // 1024} MiB"


def test_failover_when_one_backend_port_is_closed(procs):
    live = [start_backend(procs, "announce", name=n)[1] for n in "ab"]
    dead = closed_port()
    _, (port,) = start_fastlb(procs, service("web", [(live[0], 1), (dead, 1), (live[1], 1)]))
    got = names_of(port, 100)
    assert len(got) == 100 and set(got) == {"a", "b"}


def test_all_backends_refusing_closes_client_promptly(procs):
    _, (port,) = start_fastlb(procs, service("web", [(closed_port(), 1), (closed_port(), 1)],
                                             retries=3))
    s = connect(port)
    t0 = time.monotonic()
    with _closed():
        assert s.recv(10) == b""
    assert time.monotonic() - t0 < 1.0


class _closed:
    """Accept either an orderly EOF or a reset as 'the client was closed'."""
    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        return et is not None and issubclass(et, (ConnectionResetError, ConnectionAbortedError))


def test_all_backends_timing_out_close_client_within_bound(procs):
    holes = [Blackhole(), Blackhole()]
    try:
        ct, retries = 0.3, 2
        cfg = service("web", [(h.port, 1) for h in holes], retries=retries,
                      timeouts='{ connect = "300ms" }')
        _, (port,) = start_fastlb(procs, cfg)
        s = connect(port)
        t0 = time.monotonic()
        with _closed():
            assert s.recv(10) == b""
        elapsed = time.monotonic() - t0
        assert ct * 2 <= elapsed < ct * (retries + 1) + 0.5   # it did wait for the timeouts
    finally:
        for h in holes:
            h.close()


def test_backend_killed_mid_stream_closes_client(procs):
    bproc, be = start_backend(procs, "echo")
    _, (port,) = start_fastlb(procs, service("web", [(be, 1)]))
    s = connect(port)
    s.sendall(b"x" * 1000)
    assert len(s.recv(1000)) > 0
    bproc.signal(signal.SIGKILL)
    t0 = time.monotonic()
    s.settimeout(5)
    with _closed():
        while s.recv(65536):
            pass
    assert time.monotonic() - t0 < 2.0


def test_client_reset_closes_backend_connection(procs):
    closed_at = []
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)

    def backend():
        conn, _ = lsock.accept()
        conn.settimeout(10)
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass
        closed_at.append(time.monotonic())
        conn.close()

    t = threading.Thread(target=backend, daemon=True)
    t.start()
    _, (port,) = start_fastlb(procs, service("web", [(lsock.getsockname()[1], 1)]))
    s = connect(port)
    s.sendall(b"hello")
    time.sleep(0.2)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    t0 = time.monotonic()
    s.close()                                       # RST
    t.join(5)
    lsock.shutdown(socket.SHUT_RDWR)
    lsock.close()
    assert closed_at and closed_at[0] - t0 < 1.0


def test_idle_timeout_closes_silent_connections_only(procs):
    _, be = start_backend(procs, "echo")
    _, (port,) = start_fastlb(procs, service("web", [(be, 1)], timeouts='{ idle = "600ms" }'))
    quiet, busy = connect(port), connect(port)
    quiet.sendall(b"hi")
    assert quiet.recv(10) == b"hi"
    t0 = time.monotonic()
    for _ in range(8):                              # busy talks every 200 ms for 1.6 s
        busy.sendall(b"ping")
        assert busy.recv(10) == b"ping"
        time.sleep(0.2)
    quiet.settimeout(0.1)
    with _closed():
        assert quiet.recv(10) == b""               # closed by the idle timeout meanwhile
    busy.sendall(b"still")
    assert busy.recv(10) == b"still"
    assert time.monotonic() - t0 > 0.6


def test_sigterm_lets_inflight_finish_and_refuses_new(procs):
    _, be = start_backend(procs, "trickle", size=1 << 20)
    lb, (port,) = start_fastlb(procs, "[global]\ngrace = \"10s\"\n" + service("web", [(be, 1)]))
    s = connect(port)
    first = s.recv(1000)
    lb.signal(signal.SIGTERM)
    lb.wait_line("stopped accepting")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    rest = recv_all(s)
    s.close()                                       # our side done too: the session ends
    assert len(first) + len(rest) == (1 << 20) // 10 * 10
    assert lb.wait(5) == 0


def open_echo_session(procs, grace):
    """fastlb with the given grace in front of an echo backend, and one live connection."""
    _, be = start_backend(procs, "echo")
    lb, (port,) = start_fastlb(procs, f'[global]\ngrace = "{grace}"\n' + service("web", [(be, 1)]))
    s = connect(port)
    s.sendall(b"x")
    assert s.recv(1) == b"x"
    return lb, s


def test_sigterm_grace_expires_and_closes(procs):
    lb, s = open_echo_session(procs, "500ms")
    t0 = time.monotonic()
    lb.signal(signal.SIGTERM)
    assert lb.wait(5) == 0
    assert 0.4 < time.monotonic() - t0 < 2.0
    s.settimeout(2)
    with _closed():
        assert s.recv(10) == b""


def test_sigint_stops_at_once(procs):
    lb, s = open_echo_session(procs, "30s")
    t0 = time.monotonic()
    lb.signal(signal.SIGINT)
    assert lb.wait(5) == 0
    assert time.monotonic() - t0 < 1.5


@pytest.mark.parametrize("hash_key", ["source_ip", "source_ip_port"])
def test_maglev_affinity_matches_the_core_prediction(procs, hash_key):
    from fastlb import _core

    names = "abcd"
    weights = [1, 2, 3, 4]
    ports = [start_backend(procs, "announce", name=n)[1] for n in names]
    _, (port,) = start_fastlb(procs, service("web", list(zip(ports, weights, strict=False)),
                                             policy='"maglev"', hash_key=f'"{hash_key}"'))
    ids = [f"127.0.0.1:{p}" for p in ports]
    health = _core.HealthBitmap(bytearray(_core.HealthBitmap.size_for(4)), 4)
    for s in range(4):
        health.mark_up(s)
    table = _core.Maglev(range(4), weights, health, ids=ids)
    for i in range(2, 42):
        ip = f"127.0.0.{i}"
        got = []
        for _ in range(2):
            s = socket.socket()
            s.bind((ip, 0))
            s.connect(("127.0.0.1", port))
            src_port = s.getsockname()[1]
            got.append(s.recv(10).decode().strip())
            s.close()
            key = ip if hash_key == "source_ip" else f"{ip}:{src_port}"
            assert got[-1] == names[table.pick(_core.key_of(key))]
        if hash_key == "source_ip":
            assert got[0] == got[1]           # one client, one backend


def test_startup_errors_name_what_and_where(procs, tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    for text, want in [
        (f'[[service]]\nname = "web"\nlisten = ["127.0.0.1:{port}"]\n',
         f"cannot listen on 127.0.0.1:{port}: Address already in use"),
        (f'[global]\nadmin = "unix:{tmp_path}/no/such/dir/a.sock"\n'
         f'[[service]]\nname = "web"\nlisten = ["127.0.0.1:0"]\n',
         f"global.admin: the admin socket's directory {tmp_path}/no/such/dir does not exist"),
    ]:
        path = tmp_path / "f.toml"
        path.write_text(text)
        out = subprocess.run([sys.executable, "-m", "fastlb", "run", "-c", str(path)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode != 0 and want in out.stderr, out.stderr
    taken.close()
