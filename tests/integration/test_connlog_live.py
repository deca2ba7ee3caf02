"""The connection log through `fastlb run` (one worker and two): one line per connection with
its backend, bytes, times and termination code; JSON and text; sampling; the file destination
reopened on SIGUSR1; syslog over UDP; a full ring drops and counts; the histograms in /metrics."""
import json
import os
import re
import signal
import socket
import struct
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import Blackhole, closed_port, free_port, metrics_text, service, start_backend, start_fastlb

WORKERS = pytest.mark.parametrize("workers", [1, 2])
LOG_JSON = '{ connections = true, format = "json" }'


@pytest.fixture
def refused():
    """Ports that refuse connections and stay so for the whole test: each is held by a bound,
    never listening socket, so no listener or outgoing connection of the test can take it
    (helpers.closed_port frees its port at once: a fastlb listener bound later may get it)."""
    held = []

    def port():
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        held.append(s)
        return s.getsockname()[1]
    yield port
    for s in held:
        s.close()


def ports_by_name(lb):
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"service (\S+): listening on \S+:(\d+)", lb.output)}


def records(lb, service_name=None):
    out = []
    for line in list(lb.lines):
        if line.startswith("{") and '"service"' in line:
            r = json.loads(line)
            if service_name is None or r["service"] == service_name:
                out.append(r)
    return out


def wait_records(lb, service_name, n, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        got = records(lb, service_name)
        if len(got) >= n:
            return got
        assert time.monotonic() < deadline, f"{len(got)} of {n} {service_name} lines:\n{lb.output}"
        time.sleep(0.05)


def session(port, payload=b"hello", expect=8):
    """A normal session: send, read ``expect`` bytes, half-close, read to the end."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        got = b""
        while len(got) < expect:
            got += s.recv(100)
        s.shutdown(socket.SHUT_WR)
        while s.recv(100):
            pass
    return got


@WORKERS
def test_one_line_per_connection_with_its_end(procs, workers, request, refused):
    _, good = start_backend(procs, "announce", name="b1")       # sends "b1\n", then echoes
    dead = refused()
    hole = Blackhole()                                          # connects to it time out
    request.addfinalizer(hole.close)
    cfg = (f"[global]\nworkers = {workers}\n"
           + service("web", [(good, 1)], log=LOG_JSON)
           # the heavy refused backend is picked first: a retry on the good one
           + service("retry", [(dead, 10), (good, 1)], log=LOG_JSON)
           + service("none", [(dead, 1)], log=LOG_JSON, retries=1)
           + service("empty", [], log=LOG_JSON)
           + service("idle", [(good, 1)], log=LOG_JSON, timeouts='{ idle = "300ms" }')
           + service("quiet", [(good, 1)], log='{ connections = true, sample = 0.0 }')
           + service("text", [(good, 1)], log="{ connections = true }")
           + service("slow", [(hole.port, 1)], log=LOG_JSON, retries=0,
                     timeouts='{ connect = "300ms" }')
           + service("abort", [(hole.port, 1)], log=LOG_JSON, timeouts='{ connect = "10s" }'))
    lb, _ = start_fastlb(procs, cfg)
    ports = ports_by_name(lb)

    for _ in range(3):                                    # normal sessions
        assert session(ports["web"]) == b"b1\nhello"
    session(ports["quiet"])
    assert session(ports["retry"]) == b"b1\nhello"
    with socket.create_connection(("127.0.0.1", ports["web"]), timeout=10) as s:   # client reset
        s.sendall(b"x")
        got = b""
        while len(got) < 4:
            got += s.recv(100)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    for name in ("none", "empty"):                        # no backend could take the client
        with socket.create_connection(("127.0.0.1", ports[name]), timeout=10) as s:
            assert s.recv(100) == b""
    with socket.create_connection(("127.0.0.1", ports["idle"]), timeout=10) as s:
        assert s.recv(100) == b"b1\n"
        t0 = time.monotonic()
        assert s.recv(100) == b""                         # closed by the idle timeout
        assert time.monotonic() - t0 >= 0.25
    session(ports["text"])
    with socket.create_connection(("127.0.0.1", ports["slow"]), timeout=10) as s:
        assert s.recv(100) == b""                         # the connect timed out
    with socket.create_connection(("127.0.0.1", ports["abort"]), timeout=10) as s:
        time.sleep(0.2)                                   # fastlb is connecting...
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    # two workers' lines may come out of order by up to one drain: their times order them
    web = sorted(wait_records(lb, "web", 4), key=lambda r: r["time"])
    normal, reset = web[:3], web[3]
    good_addr = f"127.0.0.1:{good}"
    for r in normal:
        assert (r["term"], r["backend"], r["retries"]) == ("--", good_addr, 0), web
        assert (r["bytes_in"], r["bytes_out"]) == (5, 8)
        assert r["client"] == "127.0.0.1" and r["listener_port"] == ports["web"]
        assert 0 <= r["queue_us"] <= r["total_us"] and 0 <= r["connect_us"] <= r["total_us"]
        assert 0 <= r["first_byte_us"] <= r["total_us"]
        assert r["time"] >= r["accept_time"] and re.match(r"\d{4}-\d\d-\d\dT", r["time"])
    assert (reset["term"], reset["bytes_in"], reset["bytes_out"]) == ("CD", 1, 4)
    (retry,) = wait_records(lb, "retry", 1)
    assert (retry["term"], retry["backend"], retry["retries"]) == ("--", good_addr, 1)
    (none,) = wait_records(lb, "none", 1)
    # its one backend refused; nothing left to retry on: the last one tried, one failure
    assert (none["term"], none["backend"], none["retries"]) == ("SC", f"127.0.0.1:{dead}", 1)
    assert none["connect_us"] == -1 and none["bytes_in"] == 0
    (empty,) = wait_records(lb, "empty", 1)
    assert (empty["term"], empty["backend"], empty["retries"]) == ("SC", None, 0)
    (idle,) = wait_records(lb, "idle", 1)
    assert idle["term"] == "cD" and idle["total_us"] >= 250_000 and idle["bytes_out"] == 3
    lb.wait_line(r" 127\.0\.0\.1:\d+ text:\d+ text/127\.0\.0\.1:\d+ [\d.]+/[\d.]+/[\d.]+/[\d.]+ 5/8 -- 0$")
    (slow,) = wait_records(lb, "slow", 1)
    assert (slow["term"], slow["retries"], slow["connect_us"]) == ("sC", 1, -1)
    assert slow["total_us"] >= 250_000
    (abort,) = wait_records(lb, "abort", 1)
    assert (abort["term"], abort["backend"], abort["connect_us"]) == ("CC", f"127.0.0.1:{hole.port}", -1)
    assert records(lb, "quiet") == []                     # sample = 0: nothing
    assert not [ln for ln in lb.lines if " quiet/" in ln]
    assert len(records(lb, "web")) == 4                   # one line per connection, no more


@WORKERS
def test_file_destination_reopened_on_sigusr1(procs, tmp_path, workers):
    _, good = start_backend(procs, "announce", name="b1")
    path = tmp_path / "conn.log"
    lb, ports = start_fastlb(procs, f'[global]\nworkers = {workers}\nconnlog = "file:{path}"\n'
                             + service("web", [(good, 1)], log="{ connections = true }"))
    session(ports[0])

    def lines_of(p, n):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if p.exists() and len(p.read_text().splitlines()) >= n:
                return p.read_text().splitlines()
            time.sleep(0.05)
        raise AssertionError(f"fewer than {n} lines in {p}: {p.read_text() if p.exists() else ''}")

    assert " web/127.0.0.1:" in lines_of(path, 1)[0]
    os.rename(path, tmp_path / "conn.log.1")               # logrotate's move
    lb.signal(signal.SIGUSR1)
    lb.wait_line(r"connection log: file:.* reopened")
    session(ports[0])
    session(ports[0])
    assert len(lines_of(path, 2)) == 2                     # the new lines in the new file
    assert len((tmp_path / "conn.log.1").read_text().splitlines()) == 1
    assert lb.popen.poll() is None


@WORKERS
def test_syslog_over_udp_is_rfc5424(procs, workers):
    _, good = start_backend(procs, "announce", name="b1")
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(10)
    try:
        lb, ports = start_fastlb(
            procs, f'[global]\nworkers = {workers}\nconnlog = "syslog:udp:127.0.0.1:{rx.getsockname()[1]}"\n'
            + service("web", [(good, 1)], log=LOG_JSON))
        session(ports[0])
        msg = rx.recv(65536).decode()
    finally:
        rx.close()
    m = re.fullmatch(r"<134>1 (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (\S+) fastlb (\d+) conn - (.*)",
                     msg)
    assert m, msg
    assert int(m.group(3)) == lb.pid
    assert json.loads(m.group(4))["term"] == "--"


def scrape(mport):
    body = metrics_text(mport)
    return {(s.name, s.labels.get("proxy"), s.labels.get("le")): s.value
            for fam in text_string_to_metric_families(body) for s in fam.samples}


@WORKERS
def test_full_ring_drops_and_counts_and_histograms_count_sessions(procs, workers):
    """A 4-record ring (FASTLB_TEST_CONNLOG_RING) and 40 sessions ending at once: what does not
    fit is dropped and counted, every session is in the histograms."""
    _, good = start_backend(procs, "announce", name="b1")
    mport = free_port()
    lb, ports = start_fastlb(procs, f'[global]\nworkers = {workers}\nmetrics = "127.0.0.1:{mport}"\n'
                             + service("web", [(good, 1)], log=LOG_JSON),
                             env={"FASTLB_TEST_CONNLOG_RING": "4"})
    n = 40
    clients = []
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", ports[0]), timeout=10)
        assert c.recv(10) == b"b1\n"
        clients.append(c)
    for c in clients:                                    # all end in one burst
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
    deadline = time.monotonic() + 15
    while True:
        m = scrape(mport)
        logged = len(records(lb, "web"))
        dropped = m.get(("fastlb_process_connlog_dropped_total", None, None), 0)
        if logged + dropped >= n:
            break
        assert time.monotonic() < deadline, (logged, dropped, lb.output)
        time.sleep(0.1)
    assert logged + dropped == n and dropped > 0 and 4 <= logged <= n - 1
    lb.wait_line(r"connection log: \d+ record\(s\) dropped, the ring was full")
    assert m[("fastlb_backend_session_duration_seconds_count", "web", None)] == n
    assert m[("fastlb_backend_session_duration_seconds_bucket", "web", "+Inf")] == n
    assert m[("fastlb_backend_connect_time_seconds_count", "web", None)] == n
    buckets = sorted((float(le), v) for (name, proxy, le), v in m.items()
                     if name == "fastlb_backend_connect_time_seconds_bucket" and le != "+Inf")
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)   # cumulative
    assert m[("fastlb_backend_session_duration_seconds_sum", "web", None)] > 0
    assert all(r["term"] == "CD" for r in records(lb, "web"))


@WORKERS
def test_log_level_at_run_time_through_the_admin(procs, tmp_path, workers, refused):
    """`fastlb ctl log-level` reads and sets the level of the supervisor and of every worker:
    at "error" a worker's connect-refused warning is not logged, back at "info" it is."""
    from fastlb.admin.client import AdminError
    from helpers import PY, Proc, admin_client
    a, b = refused(), refused()
    lb, _ = start_fastlb(procs, f'[global]\nworkers = {workers}\nadmin = "unix:{tmp_path}/admin.sock"\n'
                         + service("a", [(a, 1)], retries=0) + service("b", [(b, 1)], retries=0))
    ports = ports_by_name(lb)
    ctl = [PY, "-m", "fastlb", "ctl", "--socket", f"{tmp_path}/admin.sock", "log-level"]
    got = Proc(ctl, procs)
    assert got.wait() == 0 and got.wait_line(r"level=info")
    setp = Proc(ctl + ["error"], procs)
    assert setp.wait() == 0 and setp.wait_line(r"level=error previous=info")
    time.sleep(0.3)                                       # the workers take the message
    with socket.create_connection(("127.0.0.1", ports["a"]), timeout=10) as s:
        assert s.recv(10) == b""
    with admin_client(tmp_path) as c:
        assert c.call("log_level") == {"level": "error"}
        with pytest.raises(AdminError, match="bad_request: .*expected one of debug, info, warning, error"):
            c.call("log_level", level="loud")
        assert c.call("log_level", level="info") == {"level": "info", "previous": "error"}
    time.sleep(0.3)
    with socket.create_connection(("127.0.0.1", ports["b"]), timeout=10) as s:
        assert s.recv(10) == b""
    lb.wait_line(rf"WARNING .*service b: backend 127\.0\.0\.1:{b}: .*[Rr]efused")
    assert not re.search(rf"service a: backend 127\.0\.0\.1:{a}", lb.output)
    assert "log level error -> info (admin)" in lb.output


def test_reload_turns_the_log_on(procs):
    """The log's settings travel with the plan: a reload that turns it on logs the next
    connections (and the idle ones before it logged nothing)."""
    _, good = start_backend(procs, "announce", name="b1")
    off = "[global]\nworkers = 2\n" + service("web", [(good, 1)])
    lb, ports = start_fastlb(procs, off)
    session(ports[0])
    path = lb.popen.args[lb.popen.args.index("-c") + 1]
    with open(path, "w") as f:
        f.write(off + f"log = {LOG_JSON}\n")
    lb.signal(signal.SIGHUP)
    lb.wait_line(r"reloaded ")
    time.sleep(0.5)                                      # the workers ack the new plan
    session(ports[0])
    (r,) = wait_records(lb, "web", 1)
    assert r["term"] == "--"
    time.sleep(0.3)
    assert len(records(lb, "web")) == 1


def test_a_file_destination_that_cannot_be_opened_stops_the_start(procs, tmp_path):
    from helpers import PY, Proc
    cfg = tmp_path / "lb.toml"
    cfg.write_text(f'[global]\nconnlog = "file:{tmp_path}/no/such/dir/conn.log"\n'
                   + service("web", [(closed_port(), 1)], log="{ connections = true }"))
    p = Proc([PY, "-m", "fastlb", "run", "-c", str(cfg)], procs)
    assert p.wait(20) != 0
    p.wait_line(r"\[global\] connlog = 'file:.*/no/such/dir/conn\.log': cannot open it: "
                r"No such file or directory")


@WORKERS
def test_refusals_of_the_overload_and_access_rules_are_logged(procs, workers):
    """The close sites of issue 11 each give one line with their code: an ACL refusal and a
    per-source cap (PR), a full queue (PQ), a silent client (cR), and a PROXY header's source
    as the logged client; none of them names a backend."""
    _, good = start_backend(procs, "announce", name="b1")
    cfg = (f"[global]\nworkers = {workers}\n"
           + service("acl", [(good, 1)], log=LOG_JSON, acl='{ deny = ["127.0.0.2/32"] }')
           + service("src", [(good, 1)], log=LOG_JSON, limits="{ per_source_conns = 1 }")
           + service("capped", [(good, 1)], log=LOG_JSON).replace(
               "weight = 1 }", "weight = 1, max_conns = 1 }")
           + service("silent", [(good, 1)], log=LOG_JSON,
                     timeouts='{ client_first_byte = "300ms" }')
           + service("pp", [(good, 1)], log=LOG_JSON,
                     proxy_protocol='{ accept_from = ["127.0.0.1/32"] }'))
    lb, _ = start_fastlb(procs, cfg)
    ports = ports_by_name(lb)

    def closed_at_once(port, source="127.0.0.1"):
        with socket.socket() as s:
            s.settimeout(10)
            s.bind((source, 0))
            s.connect(("127.0.0.1", port))
            try:
                return s.recv(100) == b""
            except ConnectionResetError:
                return True

    assert closed_at_once(ports["acl"], "127.0.0.2")
    held = socket.create_connection(("127.0.0.1", ports["src"]), timeout=10)
    assert held.recv(100) == b"b1\n"
    assert closed_at_once(ports["src"])                   # the second from one source
    held2 = socket.create_connection(("127.0.0.1", ports["capped"]), timeout=10)
    assert held2.recv(100) == b"b1\n"
    assert closed_at_once(ports["capped"])                # its one backend at its cap, no queue
    with socket.create_connection(("127.0.0.1", ports["silent"]), timeout=10) as s:
        assert s.recv(100) == b""                         # closed after client_first_byte
    with socket.create_connection(("127.0.0.1", ports["pp"]), timeout=10) as s:
        s.sendall(b"PROXY TCP4 192.0.2.9 127.0.0.1 4000 80\r\nhi")
        got = b""
        while len(got) < 5:                               # "b1\n", then the echo of "hi"
            got += s.recv(100)
        assert got == b"b1\nhi"
    held.close()
    held2.close()

    (acl,) = wait_records(lb, "acl", 1)
    assert (acl["term"], acl["backend"], acl["client"]) == ("PR", None, "127.0.0.2")
    src = wait_records(lb, "src", 2)
    assert sorted(r["term"] for r in src) == ["--", "PR"]
    capped = wait_records(lb, "capped", 2)
    assert sorted(r["term"] for r in capped) == ["--", "PQ"]
    assert [r["backend"] for r in capped if r["term"] == "PQ"] == [None]
    (silent,) = wait_records(lb, "silent", 1)
    assert (silent["term"], silent["backend"]) == ("cR", None)
    assert silent["total_us"] >= 250_000
    (pp,) = wait_records(lb, "pp", 1)
    assert (pp["term"], pp["client"], pp["client_port"]) == ("--", "192.0.2.9", 4000)
