"""[listenopts] service.defer_accept and service.fastopen through `fastlb run` (issue 15), on
loopback with a counting backend of the test's own. The supervisor's listening socket cannot be
asked from here (getsockopt needs the socket), so behaviour is asserted: with defer_accept, a
client that connects and says nothing is not handed to fastlb (its backend sees no connection),
one that speaks is proxied at once; a reload turns it on and off on the same socket (the same
inode in /proc/net/tcp, no connect refused, a held connection kept), with 2 workers; fastopen:
clients' data in the SYN is taken (the kernel's TCPFastOpenPassive counter grows only for the
service that asks for it); bad values and a disagreeing SNI group are refused, by `fastlb run`
(exit 2, nothing listening) and by the admin's add_service (nothing changes); an SNI group's
one socket changes for the whole group, and a reload that would split the group is refused."""
import os
import socket
import subprocess
import threading
import time

import pytest

from helpers import PY, Proc, ThreadedServer, admin_client, free_port

TFO_SYSCTL = "/proc/sys/net/ipv4/tcp_fastopen"


class CountingBackend(ThreadedServer):
    """An echo server on loopback (threads) that counts the connections it accepted."""

    @property
    def accepted(self):
        return len(self.conns)

    def serve(self, c):
        c.settimeout(60)
        try:
            while data := c.recv(65536):
                c.sendall(data)
        except OSError:
            pass
        finally:
            c.close()

    def wait_accepted(self, n, timeout=5.0):
        deadline = time.monotonic() + timeout
        while self.accepted < n:
            assert time.monotonic() < deadline, f"the backend saw {self.accepted} connections, not {n}"
            time.sleep(0.02)


@pytest.fixture
def backend():
    made = []

    def make():
        b = CountingBackend()
        made.append(b)
        return b
    yield make
    for b in made:
        b.close()


def svc(name, port, backend_port, extra=""):
    return (f'[[service]]\nname = "{name}"\nlisten = ["127.0.0.1:{port}"]\n{extra}\n'
            f'backends = [ {{ address = "127.0.0.1:{backend_port}" }} ]\n')


def run(procs, cfg):
    p = Proc([PY, "-m", "fastlb", "run", "-c", str(cfg)], procs)
    p.wait_line("fastlb ready", timeout=20)
    return p


def echo(sock, word):
    sock.sendall(word)
    got = b""
    while len(got) < len(word):
        data = sock.recv(len(word) - len(got))
        assert data, f"EOF after {got!r}"
        got += data
    assert got == word


def talk(port, word=b"hello"):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        echo(s, word)


def listen_inode(port):
    """The inode of the socket listening on 127.0.0.1:port (/proc/net/tcp, state 0A)."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
                return int(fields[9])
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def assert_silent_client_held(port, b, wait=0.5, valid=0.9):
    """A client that connects and sends nothing is not passed to the backend within ``wait``;
    it is proxied once it speaks. Returns after its echo (the backend counted it). The kernel
    hands a silent client over anyway once defer_accept is over (1 s with true): a look later
    than ``valid`` after the connect proves nothing, and is taken again (a stalled test)."""
    for attempt in range(3):
        base = b.accepted
        silent = socket.create_connection(("127.0.0.1", port), timeout=5)   # handshake done
        t0 = time.monotonic()
        time.sleep(wait)
        seen = b.accepted
        if time.monotonic() - t0 < valid or attempt == 2:
            break
        echo(silent, b"stalled")            # inconclusive: settle it, then look again
        silent.close()
    try:
        assert seen == base, "a client that sent nothing reached the backend"
        talk(port, b"speaks")                                  # one that speaks: proxied at once
        assert b.accepted == base + 1
        echo(silent, b"late")                                  # and the silent one, once it speaks
        assert b.accepted == base + 2
    finally:
        silent.close()


def assert_silent_client_passed(port, b):
    """Without defer_accept: the silent client's connection reaches the backend at once."""
    base = b.accepted
    with socket.create_connection(("127.0.0.1", port), timeout=5) as silent:
        b.wait_accepted(base + 1, timeout=3)
        echo(silent, b"x")


def test_defer_accept_holds_silent_clients_and_proxies_those_that_speak(procs, tmp_path, backend):
    """Service d has defer_accept = true, service p not (the control, same fastlb): a silent
    client of p reaches p's backend at once, one of d does not within 0.5 s; a client of d that
    sends data is proxied normally, and the silent one too once it speaks."""
    bd, bp = backend(), backend()
    pd, pp = free_port(), free_port()
    cfg = tmp_path / "lb.toml"
    cfg.write_text(svc("d", pd, bd.port, "defer_accept = true") + svc("p", pp, bp.port))
    p = run(procs, cfg)
    assert_silent_client_passed(pp, bp)
    assert_silent_client_held(pd, bd)
    for _ in range(5):
        talk(pd)
    assert "Traceback" not in p.output, p.output


def test_a_reload_turns_defer_accept_on_and_off_on_the_same_socket(procs, tmp_path, backend):
    """With 2 workers: a reload sets defer_accept on the listening socket held (the same inode:
    not bound again), then clears it; a connection held open echoes throughout and no connect
    is refused meanwhile; both workers accept with the new value."""
    b = backend()
    port = free_port()
    head = "[global]\nworkers = 2\n"
    cfg = tmp_path / "lb.toml"
    cfg.write_text(head + svc("a", port, b.port))
    p = run(procs, cfg)
    inode = listen_inode(port)
    held = socket.create_connection(("127.0.0.1", port), timeout=5)
    echo(held, b"one")
    assert_silent_client_passed(port, b)
    stop, refused = threading.Event(), []

    def hammer():                          # clients that speak, all along: none may be refused
        while not stop.is_set():
            try:
                talk(port, b"h")
            except OSError as exc:
                refused.append(exc)
            time.sleep(0.01)

    def reload(text, n):
        cfg.write_text(text)
        t = threading.Thread(target=hammer)
        stop.clear()
        t.start()
        try:
            p.signal(1)                                           # SIGHUP
            deadline = time.monotonic() + 15
            while p.output.count("reloaded ") < n:
                assert time.monotonic() < deadline, p.output
                time.sleep(0.05)
            time.sleep(0.2)
        finally:
            stop.set()
            t.join()

    reload(head + svc("a", port, b.port, "defer_accept = 2"), 1)
    assert "has defer_accept 2s, fastopen off now" in p.output, p.output
    assert listen_inode(port) == inode
    echo(held, b"two")
    for _ in range(4):                     # whichever worker accepts
        assert_silent_client_held(port, b, wait=0.3)
    reload(head + svc("a", port, b.port), 2)
    assert "has defer_accept off, fastopen off now" in p.output, p.output
    assert listen_inode(port) == inode
    for _ in range(4):
        assert_silent_client_passed(port, b)
    echo(held, b"three")
    held.close()
    assert not refused, refused[:3]
    assert "Traceback" not in p.output and "a bug" not in p.output, p.output


def tfo_passive():
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        if names.startswith("TcpExt:"):
            return dict(zip(names.split()[1:], map(int, values.split()[1:]),
                            strict=True))["TCPFastOpenPassive"]
    raise AssertionError("no TcpExt in /proc/net/netstat")


@pytest.fixture
def tfo_sysctl():
    """net.ipv4.tcp_fastopen with server TFO (bit 0x2) and client TFO (0x1) for the test: set
    for its duration when running as root (restored after), else the test is skipped."""
    try:
        with open(TFO_SYSCTL) as f:
            old = f.read().strip()
    except OSError as exc:
        pytest.skip(f"no {TFO_SYSCTL}: {exc}")
    if int(old) & 3 == 3:
        yield
        return
    try:
        with open(TFO_SYSCTL, "w") as f:
            f.write(str(int(old) | 3))
    except OSError as exc:
        pytest.skip(f"net.ipv4.tcp_fastopen = {old} does not allow server TFO and cannot be set "
                    f"here ({exc.strerror}): run as root, or sysctl -w net.ipv4.tcp_fastopen=3")
    try:
        yield
    finally:
        with open(TFO_SYSCTL, "w") as f:
            f.write(old)


def tfo_round(port, n=4):
    """``n`` clients that send their request in the SYN (MSG_FASTOPEN; the first of a fresh
    cookie cache only asks for a cookie): each is echoed whole."""
    for i in range(n):
        with socket.socket() as s:
            word = f"tfo-{i}".encode()
            # blocking (loopback: refused or done at once): with a timeout the socket is
            # non-blocking underneath, and a connect without a cookie yet gives EINPROGRESS
            s.sendto(word, socket.MSG_FASTOPEN, ("127.0.0.1", port))
            s.settimeout(5)
            got = b""
            while len(got) < len(word):
                data = s.recv(64)
                assert data, got
                got += data
            assert got == word


def test_fastopen_takes_the_data_in_the_syn(procs, tmp_path, backend, tfo_sysctl):
    """Service f has fastopen = 64, service p not (same fastlb): TFO clients are proxied by
    both; the kernel counts passive Fast Opens (data accepted in the SYN) for f's and not for
    p's (the counter is the network namespace's: nothing else here listens with TFO)."""
    bf, bp = backend(), backend()
    pf, pp = free_port(), free_port()
    cfg = tmp_path / "lb.toml"
    cfg.write_text(svc("f", pf, bf.port, "fastopen = 64") + svc("p", pp, bp.port))
    p = run(procs, cfg)
    tfo_round(pf, 1)                       # a cookie for 127.0.0.1, if the cache had none
    before = tfo_passive()
    tfo_round(pp)
    with open(TFO_SYSCTL) as f:
        every_listener = int(f.read()) & 0x400        # TFO_SERVER_WO_SOCKOPT1: TFO without asking
    assert every_listener or tfo_passive() == before, "a listener without fastopen took data in the SYN"
    tfo_round(pf)
    assert tfo_passive() >= before + 3, (before, tfo_passive())
    assert bf.accepted == 5 and bp.accepted == 4
    assert "net.ipv4.tcp_fastopen" not in p.output, p.output       # no warning: it is allowed


def test_fastopen_warns_naming_the_sysctl_when_it_does_not_allow_it(procs, tmp_path, backend):
    """`fastlb check` and `fastlb run` warn (and do not fail) when net.ipv4.tcp_fastopen lacks
    bit 0x2; the service serves. The sysctl is cleared of 0x2 for the test when root."""
    with open(TFO_SYSCTL) as f:
        old = f.read().strip()
    if int(old) & 2:
        try:
            with open(TFO_SYSCTL, "w") as f:
                f.write(str(int(old) & ~2))
        except OSError as exc:
            pytest.skip(f"net.ipv4.tcp_fastopen = {old} allows server TFO and cannot be changed "
                        f"here ({exc.strerror})")
    try:
        b = backend()
        port = free_port()
        cfg = tmp_path / "lb.toml"
        cfg.write_text(svc("f", port, b.port, "fastopen = 64"))
        r = subprocess.run([PY, "-m", "fastlb", "check", "-c", str(cfg)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "warning" in r.stderr and "service[0].fastopen: net.ipv4.tcp_fastopen = " in r.stderr
        assert "does not allow server TCP Fast Open (bit 0x2)" in r.stderr, r.stderr
        p = run(procs, cfg)
        p.wait_line(r"fastopen \(services f\): net\.ipv4\.tcp_fastopen = \d+ does not allow")
        talk(port)
    finally:
        with open(TFO_SYSCTL, "w") as f:
            f.write(old)


@pytest.mark.parametrize("extra, path, words", [
    ('defer_accept = "x"', "service[0].defer_accept", 'expected a boolean or seconds > 0, got "x"'),
    ("defer_accept = -1", "service[0].defer_accept", "-1 is out of range"),
    ("fastopen = -1", "service[0].fastopen", "-1 is out of range"),
    ("fastopen = true", "service[0].fastopen", "expected 0 (off) or a queue length"),
    ("SNI", "service[1].fastopen", "whose fastopen is 16 and this one's off"),
])
def test_bad_config_is_refused_and_nothing_starts(tmp_path, extra, path, words):
    port = free_port()
    cfg = tmp_path / "lb.toml"
    if extra == "SNI":
        cfg.write_text(svc("a", port, 9, 'sni = ["a.example.com"]\nfastopen = 16') + svc("b", port, 9))
    else:
        cfg.write_text(svc("a", port, 9, extra))
    r = subprocess.run([PY, "-m", "fastlb", "run", "-c", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)      # as any config error
    assert f"{path}: " in r.stderr and words in r.stderr, r.stderr
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_admin_add_service_with_options_refusals_and_the_state_file(procs, tmp_path, backend):
    """Through the admin: add_service with a bad value or disagreeing with its SNI group is
    refused (services and listeners unchanged); one with defer_accept = true holds silent
    clients; the state file keeps it across a restart."""
    from fastlb.admin.client import AdminError
    a, b = backend(), backend()
    pa, pb = free_port(), free_port()
    head = f'[global]\nadmin = "unix:{tmp_path}/admin.sock"\nstate_file = "{tmp_path}/state.msgpack"\n'
    cfg = tmp_path / "lb.toml"
    cfg.write_text(head + svc("a", pa, a.port, 'sni = ["a.example.com"]\nfastopen = 16'))
    p = run(procs, cfg)
    new_b = {"name": "b", "listen": [f"127.0.0.1:{pb}"], "backends": [{"address": f"127.0.0.1:{b.port}"}]}
    with admin_client(tmp_path) as cl:
        before = cl.call("services")
        for extra, words in (({"defer_accept": "x"}, 'service.defer_accept: expected a boolean or '
                                                     'seconds > 0, got "x"'),
                             ({"fastopen": -1}, "service.fastopen: -1 is out of range"),
                             ({"listen": [f"127.0.0.1:{pa}"], "sni": ["b.example.com"]},
                              "service.fastopen: 127.0.0.1:" + str(pa) + " is one listening socket "
                              "shared with service 'a' (SNI routing), whose fastopen is 16")):
            with pytest.raises(AdminError) as err:
                cl.call("add_service", service={**new_b, **extra})
            assert words in str(err.value), str(err.value)
            assert cl.call("services") == before
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", pb), timeout=5).close()
        cl.call("add_service", service={**new_b, "defer_accept": True})
    assert_silent_client_held(pb, b)
    p.signal(15)
    p.wait(15)
    p2 = run(procs, cfg)                    # b comes back from the state file, with defer_accept
    assert_silent_client_held(pb, b)
    assert "Traceback" not in p.output + p2.output
    assert os.path.exists(tmp_path / "state.msgpack")


def test_an_sni_group_changes_its_options_together_and_a_reload_splitting_it_is_refused(
        procs, tmp_path, backend):
    """Services a (sni) and d (the default) share one socket; b (sni) joins through the admin.
    A reload giving a and d defer_accept while b (not in the config) keeps none is refused,
    naming b, the key and the address, and changes nothing; once b is removed the same reload
    sets it on the group's socket, the same one (inode)."""
    from fastlb.admin.client import AdminError
    be = backend()
    port = free_port()
    head = f'[global]\nadmin = "unix:{tmp_path}/admin.sock"\n'
    group = (svc("a", port, be.port, 'sni = ["a.example.com"]') + svc("d", port, be.port))
    cfg = tmp_path / "lb.toml"
    cfg.write_text(head + group)
    p = run(procs, cfg)
    inode = listen_inode(port)
    with admin_client(tmp_path) as cl:
        cl.call("add_service", service={"name": "b", "listen": [f"127.0.0.1:{port}"],
                                        "sni": ["b.example.com"],
                                        "backends": [{"address": f"127.0.0.1:{be.port}"}]})
        cfg.write_text(head + group.replace('backends', 'defer_accept = true\nbackends'))
        with pytest.raises(AdminError) as err:
            cl.call("reload")
        assert (f"reload refused, nothing changed: service 'b': defer_accept: 127.0.0.1:{port} is "
                f"one listening socket shared with service ") in str(err.value), str(err.value)
        assert "whose defer_accept is 1s and this one's off" in str(err.value)
        assert "has defer_accept" not in p.output
        assert sorted(s["name"] for s in cl.call("services")) == ["a", "b", "d"]
        cl.call("remove_service", service="b")
        cl.call("reload")
    p.wait_line(rf"SNI routing: the listening socket of 127\.0\.0\.1:{port} has defer_accept 1s, "
                rf"fastopen off now")
    assert listen_inode(port) == inode
    assert "Traceback" not in p.output and "a bug" not in p.output, p.output
