"""Access control through `fastlb run` (issue 11, part "access"): ACLs, per-source limits,
PROXY protocol (send and accept) and timeouts.client_first_byte. Other clients are other
loopback sources (127.0.0.2, ...): a client socket is bound to its source before connect."""
import ipaddress
import socket
import threading
import time

import pytest

from fastlb import _core
from fastlb import reference_access as ref
from helpers import made_and_closed, start_backend, start_fastlb

MARK = b"hello through fastlb\n"


def svc(name, backends, listen="127.0.0.1:0", extra="", backend_extra=None):
    """A [[service]] table; ``extra`` is TOML lines of the service, ``backend_extra`` inline keys
    for each backend (e.g. 'proxy_protocol = "v1"')."""
    be = ", ".join(f'{{ address = "{h}:{p}"' + (f", {backend_extra}" if backend_extra else "")
                   + " }" for h, p in backends)
    return (f'[[service]]\nname = "{name}"\nlisten = ["{listen}"]\n{extra}\n'
            f"backends = [ {be} ]\n")


def client(port, source="127.0.0.1", host="127.0.0.1", timeout=5.0):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect((host, port))
    return s


def served(port, source="127.0.0.1", host="127.0.0.1"):
    """True when the echo backend answers through fastlb; False when fastlb closes the client
    without a byte (a refusal)."""
    s = client(port, source, host)
    try:
        try:
            s.sendall(MARK)
        except OSError:
            return False
        got = b""
        try:
            while len(got) < len(MARK):
                data = s.recv(100)
                if not data:
                    break
                got += data
        except (ConnectionResetError, socket.timeout):
            return False
        assert got in (b"", MARK), got
        return got == MARK
    finally:
        s.close()


def refused_at_once(port, source="127.0.0.1", host="127.0.0.1", within=2.0):
    """fastlb closes the client without sending anything, without the client sending first."""
    s = client(port, source, host, timeout=within)
    try:
        try:
            return s.recv(100) == b""
        except ConnectionResetError:
            return True
    finally:
        s.close()


class Recorder:
    """A backend that records what each connection sends until it closes (the PROXY tests)."""

    def __init__(self, host="127.0.0.1", reply=b""):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.conns = []            # bytes received per connection, in accept order
        self.accepted = 0
        self.lock = threading.Lock()
        self.stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        self.sock.settimeout(0.2)
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            with self.lock:
                self.accepted += 1
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        c.settimeout(10)
        buf = b""
        try:
            if self.reply:
                c.sendall(self.reply)
            while data := c.recv(65536):
                buf += data
        except OSError:
            pass
        finally:
            c.close()
            with self.lock:
                self.conns.append(buf)

    def wait(self, n, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.conns) >= n:
                    return list(self.conns)
            time.sleep(0.02)
        raise AssertionError(f"{len(self.conns)} connection(s) ended, expected {n}")

    def close(self):
        self.stop = True
        self.sock.close()


@pytest.fixture
def recorder():
    yield from made_and_closed(Recorder)


def shared_memory(proc, workers=1):
    """The running fastlb ``proc``'s shared mapping, through /proc/PID/fd (the memfd named
    fastlb-shm), and its layout arguments (fastlb.shm)."""
    import mmap
    import os
    from fastlb import shm
    fd_dir = f"/proc/{proc.pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue
        if target.startswith("/memfd:fastlb-shm"):
            break
    else:
        raise AssertionError("no fastlb-shm memfd in the fastlb process")
    with open(f"{fd_dir}/{name}", "r+b") as f:
        m = mmap.mmap(f.fileno(), 0)
    return m, 1024, shm.blocks_for(workers)           # Config.max_backends: 1024 by default


def active_by_worker(proc, workers):
    """Open connections per worker (counter block), over every slot."""
    from fastlb import shm
    mapping, max_backends, nblocks = shared_memory(proc, workers)
    _, counters, _ = shm.views(mapping, max_backends, nblocks)
    return [sum(counters.get_block(b, s, _core.CTR_ACTIVE) for s in range(8))
            for b in range(nblocks)]


def source_conns(proc, workers=1):
    """Connections counted now in the balancer's per-source table (every service, source)."""
    from fastlb import shm
    return shm.source_table(*shared_memory(proc, workers)).total_conns()


def refusals(proc, workers=1):
    """The refusal counts of the running fastlb ``proc``, summed over the Gauges rows, read from
    its shared memory (the memfd named fastlb-shm, mapped through /proc/PID/fd, the layout of
    fastlb.shm). The service rows are the only ones refusals are counted in."""
    from fastlb import shm
    _, _, gauges = shm.views(*shared_memory(proc, workers))
    fields = {f: getattr(_core, f"G_{f.upper()}") for f in
              ("deny_acl", "deny_src_conns", "deny_src_rate", "deny_src_table", "proxy_errors",
               "client_silent")}
    out = {f: sum(gauges.get(r, i) for r in range(gauges.nrows)) for f, i in fields.items()}
    del gauges
    return out


def wait_until(pred, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- ACL ------------------------------------------------------------------------------------------

def test_acl_allow_and_deny_ipv4_deny_wins_outsider_refused(procs):
    _, be = start_backend(procs, "echo")
    cfg = svc("web", [("127.0.0.1", be)],
              extra='acl = { allow = ["127.0.0.0/29"], deny = ["127.0.0.3/32"] }')
    lb, (port,) = start_fastlb(procs, cfg)
    assert served(port, "127.0.0.1")
    assert served(port, "127.0.0.2")
    assert refused_at_once(port, "127.0.0.3")           # allowed by the /29, denied: deny wins
    assert refused_at_once(port, "127.0.0.9")           # outside the allow list
    assert served(port, "127.0.0.2")                    # nothing sticky
    assert refusals(lb)["deny_acl"] == 2


def test_acl_ipv6_loopback(procs):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    _, be = start_backend(procs, "echo")
    cfg = (svc("six", [("127.0.0.1", be)], listen="[::1]:0",
               extra='acl = { allow = ["::1/128"] }')
           + svc("six-deny", [("127.0.0.1", be)], listen="[::1]:0",
                 extra='acl = { deny = ["::/0"] }'))
    lb, (p_allow, p_deny) = start_fastlb(procs, cfg)
    assert served(p_allow, "::1", "::1")
    assert refused_at_once(p_deny, "::1", "::1")
    assert refusals(lb)["deny_acl"] == 1


def test_acl_change_by_reload_takes_effect_for_the_next_connection(procs, tmp_path):
    import signal
    from helpers import PY, Proc, closed_port
    _, be = start_backend(procs, "echo")
    port = closed_port()
    path = tmp_path / "f.toml"
    text = svc("web", [("127.0.0.1", be)], listen=f"127.0.0.1:{port}",
               extra='acl = { deny = ["127.0.0.2/32"] }')
    path.write_text(text)
    lb = Proc([PY, "-m", "fastlb", "run", "-c", str(path)], procs)
    lb.wait_line("fastlb ready")
    held = hold(port, "127.0.0.3", 1)
    assert refused_at_once(port, "127.0.0.2")
    path.write_text(text.replace('deny = ["127.0.0.2/32"]', 'deny = ["127.0.0.3/32"]'))
    lb.signal(signal.SIGHUP)
    lb.wait_line("reloaded")
    assert served(port, "127.0.0.2")
    assert refused_at_once(port, "127.0.0.3")
    held[0].sendall(MARK)                            # an open session is not cut by the reload
    assert held[0].recv(100) == MARK
    held[0].close()


def test_acl_of_a_thousand_cidrs(procs):
    _, be = start_backend(procs, "echo")
    # 1,000 /32s across 10.0.0.0/8 (not loopback) plus the one source admitted
    allow = [f"10.{i // 250}.{i % 250}.{i % 7}/32" for i in range(999)] + ["127.0.0.2/32"]
    deny = [f"192.168.{i}.0/24" for i in range(200)]
    acl = "acl = { allow = [" + ", ".join(f'"{c}"' for c in allow) + "], deny = [" + \
        ", ".join(f'"{c}"' for c in deny) + "] }"
    lb, (port,) = start_fastlb(procs, svc("big", [("127.0.0.1", be)], extra=acl))
    assert served(port, "127.0.0.2")
    assert refused_at_once(port, "127.0.0.1")
    assert refused_at_once(port, "127.0.0.3")
    assert refusals(lb)["deny_acl"] == 2


# -- per-source limits ------------------------------------------------------------------------------

def hold(port, source, n):
    """n connections from ``source`` that were served (each echoed MARK), kept open."""
    out = []
    for _ in range(n):
        s = client(port, source)
        s.sendall(MARK)
        assert s.recv(100) == MARK
        out.append(s)
    return out


def test_per_source_conns_hold_across_two_workers_other_sources_unaffected(procs):
    _, be = start_backend(procs, "echo")
    cfg = "[global]\nworkers = 2\n" + svc("web", [("127.0.0.1", be)],
                                           extra="limits = { per_source_conns = 3 }")
    lb, (port,) = start_fastlb(procs, cfg)
    held = hold(port, "127.0.0.2", 3)
    # the 3 places must be held by both workers, so that the cap is shown to hold in total.
    # [lean] One idle worker is woken per connection (EPOLLEXCLUSIVE, the first registered
    # while it sleeps), so connections one at a time all go to it: connect 3 at once, so that
    # the second arrives while the first worker is busy and wakes the other.
    for _ in range(20):
        if sum(1 for n in active_by_worker(lb, 2) if n) == 2:
            break
        for s in held:
            s.close()
        time.sleep(0.2)
        socks = [client(port, "127.0.0.2") for _ in range(3)]
        for s in socks:
            s.sendall(MARK)
            assert s.recv(100) == MARK
        held = socks
    assert sorted(active_by_worker(lb, 2), reverse=True)[:2] in ([2, 1], [1, 2]), \
        active_by_worker(lb, 2)
    try:
        # many tries, so both workers take some: every one is refused while 3 are open
        for _ in range(12):
            assert not served(port, "127.0.0.2")
        others = hold(port, "127.0.0.3", 3)           # another source has its own count
        for s in others:
            s.close()
    finally:
        for s in held:
            s.close()
    # released on close (whatever the path): the source has its 3 places back
    time.sleep(0.5)                                   # the closes reach fastlb
    again = hold(port, "127.0.0.2", 3)
    for s in again:
        s.close()
    counts = refusals(lb, workers=2)
    assert counts["deny_src_conns"] == 12
    assert counts["deny_src_rate"] == counts["deny_src_table"] == counts["deny_acl"] == 0


def test_per_source_rate_across_two_workers(procs):
    _, be = start_backend(procs, "echo")
    cfg = "[global]\nworkers = 2\n" + svc(
        "web", [("127.0.0.1", be)], extra='limits = { per_source_rate = "1/s", burst = 4 }')
    lb, (port,) = start_fastlb(procs, cfg)
    t0 = time.monotonic()
    results = [served(port, "127.0.0.2") for _ in range(10)]
    elapsed = time.monotonic() - t0
    # a bucket of 4, refilled at 1/s: at most 4 + elapsed admitted, over both workers
    assert 4 <= sum(results) <= 4 + int(elapsed) + 1, (results, elapsed)
    assert served(port, "127.0.0.3")                   # another source: a bucket of its own
    counts = refusals(lb, workers=2)
    assert counts["deny_src_rate"] == results.count(False)
    assert counts["deny_src_conns"] == 0


def test_per_source_limits_of_two_services_are_counted_apart(procs):
    _, be = start_backend(procs, "echo")
    cfg = (svc("a", [("127.0.0.1", be)], extra="limits = { per_source_conns = 1 }")
           + svc("b", [("127.0.0.1", be)], extra="limits = { per_source_conns = 1 }"))
    _, (pa, pb) = start_fastlb(procs, cfg)
    held = hold(pa, "127.0.0.2", 1)
    try:
        assert not served(pa, "127.0.0.2")
        assert served(pb, "127.0.0.2")                 # the same source, another service
    finally:
        for s in held:
            s.close()


def test_per_source_entry_released_exactly_once_on_every_close_path(procs):
    from helpers import closed_port
    _, be = start_backend(procs, "echo")
    dead = closed_port()
    limits = 'limits = { per_source_conns = 5, per_source_rate = "1000/s" }\n'
    cfg = (svc("a-live", [("127.0.0.1", be)],
               extra=limits + 'timeouts = { client_first_byte = "500ms" }')
           + svc("b-dead", [("127.0.0.1", dead)], extra=limits + "retries = 0"))   # sorted by name
    lb, (live, gone) = start_fastlb(procs, cfg)
    held = hold(live, "127.0.0.2", 2)
    silent = client(live, "127.0.0.2")                 # closed by client_first_byte
    reset = client(live, "127.0.0.2")                  # the client resets after its first byte
    reset.sendall(MARK)
    assert reset.recv(100) == MARK
    wait_until(lambda: source_conns(lb) == 4, what="4 connections counted")
    reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    reset.close()
    for _ in range(3):                                 # no backend: closed by fastlb
        assert not served(gone, "127.0.0.2")
    assert silent.recv(10) == b""
    silent.close()
    wait_until(lambda: source_conns(lb) == 2, what="the closed ones released")
    for s in held:
        s.close()
    wait_until(lambda: source_conns(lb) == 0, what="every entry released")
    time.sleep(0.3)
    assert source_conns(lb) == 0                       # not below: released once, not twice
    assert refusals(lb)["client_silent"] == 1


# -- PROXY send ---------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_send_header_byte_exact_then_payload(procs, recorder, version):
    rec = recorder()
    cfg = svc("pp", [("127.0.0.1", rec.port)], backend_extra=f'proxy_protocol = "{version}"')
    _, (port,) = start_fastlb(procs, cfg)
    s = client(port, "127.0.0.2")
    src = s.getsockname()
    s.sendall(b"payload-1")
    time.sleep(0.05)
    s.sendall(b"payload-2")
    s.shutdown(socket.SHUT_WR)
    s.recv(10)
    s.close()
    (got,) = rec.wait(1)
    build = ref.build_v1 if version == "v1" else ref.build_v2
    header = build((src[0], src[1]), ("127.0.0.1", port))
    assert got == header + b"payload-1payload-2"


def test_proxy_send_service_default_and_backend_override_and_every_retry(procs, recorder):
    from helpers import closed_port
    rec = recorder()
    dead = closed_port()
    # the service sends v2; the live backend overrides with v1; a refused backend first
    cfg = svc("pp", [("127.0.0.1", dead), ("127.0.0.1", rec.port)],
              extra='proxy_protocol = { send = "v2" }\nretries = 3')
    cfg = cfg.replace(f'address = "127.0.0.1:{rec.port}"',
                      f'address = "127.0.0.1:{rec.port}", proxy_protocol = "v1"')
    _, (port,) = start_fastlb(procs, cfg)
    for i in range(4):
        s = client(port, "127.0.0.2")
        src = s.getsockname()
        s.sendall(b"x%d" % i)
        s.shutdown(socket.SHUT_WR)
        s.recv(10)
        s.close()
        got = rec.wait(i + 1)[i]
        assert got == ref.build_v1(src, ("127.0.0.1", port)) + b"x%d" % i


# -- PROXY accept ---------------------------------------------------------------------------------

def pp_config(be_port, extra="", acl=""):
    return svc("edge", [("127.0.0.1", be_port)],
               extra='proxy_protocol = { accept_from = ["127.0.0.5/32"], timeout = "1s" }\n' + acl
               + extra)


def pp_trusted_client(procs, recorder, version, pp):
    """A recorder behind service edge, which accepts PROXY headers from 127.0.0.5 (``pp``: more
    proxy_protocol keys); (the recorder, ``version``'s header builder, a client from 127.0.0.5)."""
    rec = recorder()
    cfg = svc("edge", [("127.0.0.1", rec.port)],
              extra=f'proxy_protocol = {{ accept_from = ["127.0.0.5/32"], {pp} }}')
    _, (port,) = start_fastlb(procs, cfg)
    return rec, (ref.build_v1 if version == "v1" else ref.build_v2), client(port, "127.0.0.5")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_accept_from_trusted_source_header_consumed_payload_kept(procs, recorder, version):
    rec, build, s = pp_trusted_client(procs, recorder, version, 'timeout = "1s", send = "v2"')
    s.sendall(build(("192.0.2.7", 4321), ("198.51.100.1", 443)) + b"GET / after the header")
    s.shutdown(socket.SHUT_WR)
    s.recv(10)
    s.close()
    (got,) = rec.wait(1)
    # the header we send carries the client and destination of the header we accepted
    assert got == ref.build_v2(("192.0.2.7", 4321), ("198.51.100.1", 443)) + b"GET / after the header"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_accept_a_header_in_pieces_then_payload(procs, recorder, version):
    rec, build, s = pp_trusted_client(procs, recorder, version, 'timeout = "2s"')
    header = build(("2001:db8::7", 4321), ("2001:db8::1", 443))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for piece in (header[:7], header[7:20], header[20:] + b"after"):
        s.sendall(piece)
        time.sleep(0.15)
    s.sendall(b" more")
    s.shutdown(socket.SHUT_WR)
    s.recv(10)
    s.close()
    assert rec.wait(1) == [b"after more"]


def test_proxy_accept_header_address_is_the_client_for_the_acl(procs):
    _, be = start_backend(procs, "echo")
    cfg = pp_config(be, acl='acl = { allow = ["127.0.0.5/32", "192.0.2.0/24"], '
                            'deny = ["192.0.2.66/32"] }\n')
    lb, (port,) = start_fastlb(procs, cfg)

    def via_header(src_ip):
        s = client(port, "127.0.0.5")
        try:
            s.sendall(ref.build_v1((src_ip, 1000), ("127.0.0.1", port)) + MARK)
            try:
                return s.recv(100) == MARK
            except ConnectionResetError:
                return False
        finally:
            s.close()
    assert via_header("192.0.2.1")           # allowed by the header's address
    assert not via_header("192.0.2.66")      # denied by it, although the real peer is allowed
    assert not via_header("203.0.113.9")     # not in the allow list, real peer is
    s = client(port, "127.0.0.5")            # LOCAL (a health check): the real peer counts
    s.sendall(ref.build_v2(None, None, command=ref.LOCAL) + MARK)
    assert s.recv(100) == MARK
    s.close()
    assert refusals(lb) == dict(refusals(lb), deny_acl=2, proxy_errors=0)


def test_proxy_accept_header_address_is_the_maglev_key(procs):
    _, b1 = start_backend(procs, "announce", name="one")
    _, b2 = start_backend(procs, "announce", name="two")
    _, b3 = start_backend(procs, "announce", name="three")
    cfg = svc("edge", [("127.0.0.1", b1), ("127.0.0.1", b2), ("127.0.0.1", b3)],
              extra='policy = "maglev"\nproxy_protocol = { accept_from = ["127.0.0.5/32"] }')
    _, (port,) = start_fastlb(procs, cfg)

    def name_for(src_ip):
        s = client(port, "127.0.0.5")
        try:
            s.sendall(ref.build_v2((src_ip, 1000), ("127.0.0.1", port)))
            return s.recv(100).decode().strip()
        finally:
            s.close()
    # each header's client goes to one backend whatever the real peer's port; the header
    # addresses spread over the backends (a key of the real peer would give one name only)
    names = {}
    for i in range(24):
        ip = f"198.51.100.{i}"
        names[ip] = name_for(ip)
        assert name_for(ip) == names[ip]
    assert len(set(names.values())) >= 2, names


@pytest.mark.parametrize("data, why", [
    (b"GET / HTTP/1.0\r\n\r\n", "missing"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n", "malformed"),
    (b"PROXY TCP4 1.2.3.4", "slow"),            # never finished within the timeout
    (b"", "silent"),
])
def test_proxy_accept_missing_malformed_slow_header_closed_without_backend(procs, recorder,
                                                                          data, why):
    rec = recorder()
    lb, (port,) = start_fastlb(procs, pp_config(rec.port))
    s = client(port, "127.0.0.5", timeout=5.0)
    t0 = time.monotonic()
    if data:
        s.sendall(data)
    try:
        assert s.recv(100) == b""
    except ConnectionResetError:
        pass
    took = time.monotonic() - t0
    s.close()
    if why in ("slow", "silent"):
        assert 0.8 <= took < 4.0, took           # the 1s timeout, swept
    time.sleep(0.2)
    assert rec.accepted == 0                     # no backend connection at all
    assert refusals(lb)["proxy_errors"] == 1


def test_proxy_from_an_untrusted_source_is_taken_as_is(procs, recorder):
    rec = recorder()
    lb, (port,) = start_fastlb(procs, pp_config(rec.port))
    header = ref.build_v1(("192.0.2.7", 4321), ("198.51.100.1", 443))
    s = client(port, "127.0.0.6")
    s.sendall(header + b"rest")
    s.shutdown(socket.SHUT_WR)
    s.recv(10)
    s.close()
    (got,) = rec.wait(1)
    assert got == header + b"rest"              # payload, not a header: passed on untouched
    assert refusals(lb)["proxy_errors"] == 0


# -- client_first_byte ------------------------------------------------------------------------------

def _fd_budget():
    """This test process's fd limit, raised to the hard limit (at most 4096) for the clients."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard if hard != resource.RLIM_INFINITY else 4096, 4096)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    return soft


def test_slowloris_silent_clients_open_no_backend_connection(procs, recorder):
    rec = recorder()
    cfg = svc("web", [("127.0.0.1", rec.port)], extra='timeouts = { client_first_byte = "1s" }')
    lb, (port,) = start_fastlb(procs, cfg)
    # 2,000 silent clients, or what this process's fd limit allows (fastlb raises its own)
    n = min(2000, _fd_budget() - 200)
    assert n >= 200
    silent = []
    for i in range(n):
        s = socket.socket()
        s.bind((f"127.0.1.{1 + i % 250}", 0))
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        silent.append(s)
    time.sleep(0.5)
    talker = client(port, "127.0.0.2")
    talker.sendall(b"speaks")
    talker.shutdown(socket.SHUT_WR)
    assert rec.wait(1)[0] == b"speaks"                 # a speaking client is served meanwhile
    talker.close()
    # after the timeout every silent client was closed by fastlb ...
    deadline = time.monotonic() + 10
    open_left = n
    while open_left and time.monotonic() < deadline:
        open_left = 0
        for s in silent:
            try:
                if s.recv(1) == b"":
                    continue
            except BlockingIOError:
                open_left += 1
            except ConnectionResetError:
                pass
        time.sleep(0.1)
    for s in silent:
        s.close()
    assert open_left == 0
    assert rec.accepted == 1                          # ... and none reached the backend
    assert refusals(lb)["client_silent"] == n


def test_without_client_first_byte_silent_clients_are_connected_as_before(procs, recorder):
    rec = recorder()
    _, (port,) = start_fastlb(procs, svc("web", [("127.0.0.1", rec.port)]))
    silent = [client(port, "127.0.0.2") for _ in range(20)]
    wait_until(lambda: rec.accepted == 20, what="a backend connection per silent client")
    for s in silent:
        s.close()


def test_client_first_byte_off_by_default_server_speaks_first(procs):
    _, be = start_backend(procs, "announce", name="smtp-like")
    _, (port,) = start_fastlb(procs, svc("web", [("127.0.0.1", be)]))
    s = client(port)
    assert s.recv(100).decode().strip() == "smtp-like"   # the backend speaks first, unchanged
    s.close()


def test_client_first_byte_payload_forwarded(procs):
    _, be = start_backend(procs, "echo")
    cfg = svc("web", [("127.0.0.1", be)], extra='timeouts = { client_first_byte = "2s" }')
    _, (port,) = start_fastlb(procs, cfg)
    s = client(port)
    time.sleep(0.3)                                   # silent for a while, within the timeout
    s.sendall(MARK)
    assert s.recv(100) == MARK
    s.close()


def test_reference_builders_match_the_core():
    # the tests above compare with the reference builder: it is the core's own twin
    src, dst = ("127.0.0.2", 40000), ("127.0.0.1", 8080)
    assert ref.build_v1(src, dst) == _core.proxy_build_v1(src, dst)
    assert ref.build_v2(src, dst) == _core.proxy_build_v2(src, dst)
    assert ipaddress.ip_address(src[0])
