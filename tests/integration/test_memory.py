"""Bounded memory through `fastlb run` (issue 11): an idle connection holds no buffer after
any exchange (RSS per idle connection, the buffers-in-use gauge), and [global] buffer_budget
caps the buffers of many concurrent transfers (backpressure, nothing closed, byte-exact)."""
import hashlib
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from helpers import free_port, metrics_text, service, start_backend, start_fastlb


def metrics(port):
    """{name: value} of the unlabelled samples of /metrics."""
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^(fastlb_\w+) (\S+)$", metrics_text(port), re.M)}


def wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


def start(procs, backend, glob="", **opts):
    mport = free_port()
    cfg = f'[global]\nmetrics = "127.0.0.1:{mport}"\n{glob}\n' + service("web", [(backend, 1)], **opts)
    lb, (port,) = start_fastlb(procs, cfg)
    return lb, port, mport


def exchange(sock, size):
    """Send ``size`` bytes and read as many back (an echo backend), while both move."""
    blob = os.urandom(size)
    t = threading.Thread(target=sock.sendall, args=(blob,))
    t.start()
    got = bytearray()
    while len(got) < size:
        chunk = sock.recv(size - len(got))
        assert chunk, "closed in the middle of an exchange"
        got += chunk
    t.join()
    assert bytes(got) == blob


def test_an_idle_connection_holds_no_buffer_after_a_256k_exchange(procs):
    """Old code: each connection kept both of its 256 KiB buffers until it closed (about 262
    KiB of RSS per idle connection, buffers in use = 2 per connection)."""
    _, be = start_backend(procs, "echo")
    lb, port, mport = start(procs, be)
    n = 300
    socks = []
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as warm:   # code paths
            exchange(warm, 256 << 10)
        time.sleep(2.5)
        before = lb.rss_kib()
        socks = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(n)]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda s: exchange(s, 256 << 10), socks))
        # idle now: nothing holds a buffer; the sweep (once a second) unmaps what the pool
        # did not use in the last second
        time.sleep(2.5)
        after = lb.rss_kib()
        per_conn = (after - before) / n
        assert per_conn < 32, f"{per_conn:.1f} KiB of RSS per idle connection ({before} -> {after} KiB)"
        assert metrics(mport)["fastlb_buffers_in_use"] == 0
        for s in socks[:10]:                                  # still open, still working
            exchange(s, 4096)
    finally:
        for s in socks:
            s.close()


def test_a_small_buffer_budget_caps_many_concurrent_transfers_byte_exact(procs):
    """16 buffers (4 MiB) for 32 connections each echoing 8 MiB both ways at once, read
    slowly at first (so buffers stay held and the budget is reached): every
    transfer completes intact, none is closed, and the engine never held more than 16
    buffers at once (fastlb_buffers_in_use_max, the engine's exact peak). Old code: no
    buffer_budget key (fastlb refuses the config)."""
    _, be = start_backend(procs, "echo")
    # [splice] buffers are what this measures: bulk stays buffered (not spliced)
    lb, port, mport = start(procs, be, glob='buffer_budget = "4MiB"\nsplice = "off"')
    assert metrics(mport)["fastlb_buffer_budget_bytes"] == 4 << 20
    size, n = 8 << 20, 32
    seen = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            seen.append(metrics(mport).get("fastlb_buffers_in_use", -1))
            time.sleep(0.05)

    def one(i):
        blob = os.urandom(size)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            t = threading.Thread(target=lambda: (s.sendall(blob), s.shutdown(socket.SHUT_WR)))
            t.start()
            time.sleep(1.0)             # a slow reader: fastlb's buffers fill and stay held
            h, got = hashlib.sha256(), 0
            while chunk := s.recv(1 << 20):
                h.update(chunk)
                got += len(chunk)
            t.join()
        return got == size and h.digest() == hashlib.sha256(blob).digest()

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(one, range(n)))
    finally:
        stop.set()
        sampler.join()
    assert all(results), f"{results.count(False)} of {n} transfers incomplete or corrupt"
    m = metrics(mport)
    assert 12 <= m["fastlb_buffers_in_use_max"] <= 16, m          # reached, never passed
    assert seen and max(seen) <= 16, seen
    assert wait_for(lambda: metrics(mport)["fastlb_buffers_in_use"] == 0)


def test_the_budget_is_split_between_workers_and_reported_over_all_of_them(procs):
    """workers = 2: each engine caps its half; /metrics sums the workers' reports (sent once
    a second over the control channel)."""
    _, be = start_backend(procs, "echo")
    lb, port, mport = start(procs, be, glob='workers = 2\nbuffer_budget = "8MiB"\nsplice = "off"')  # [splice]
    assert wait_for(lambda: metrics(mport).get("fastlb_buffer_budget_bytes") == 8 << 20, 10), \
        metrics(mport)
    for _ in range(4):                         # traffic through whichever worker accepts
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            exchange(s, 256 << 10)
    assert wait_for(lambda: metrics(mport).get("fastlb_buffers_in_use_max", 0) > 0, 10)
    assert metrics(mport)["fastlb_buffers_in_use"] == 0
