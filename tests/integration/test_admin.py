"""The admin socket end to end: real fastlb, real sockets, real processes."""
import hashlib
import os
import signal
import socket
import threading
import time

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fastlb import config
from fastlb.admin.client import AdminClient, AdminError
from fastlb.registry import Registry
from helpers import Proc, PY, names_of, service, start_backend, start_fastlb
from helpers import admin_client as client


def admin_config(tmp_path, body, state=True, extra=""):
    g = f'[global]\nadmin = "unix:{tmp_path}/admin.sock"\n'
    if state:
        g += f'state_file = "{tmp_path}/state.msgpack"\n'
    return g + extra + body


@pytest.fixture
def lb3(procs, tmp_path):
    """fastlb with service web (round_robin) over backends a, b; c started but not added."""
    ports = {n: start_backend(procs, "announce", name=n)[1] for n in "abc"}
    lb, (port,) = start_fastlb(procs, admin_config(tmp_path,
                                                   service("web", [(ports["a"], 1), (ports["b"], 1)])))
    return lb, port, {n: f"127.0.0.1:{p}" for n, p in ports.items()}


def test_socket_is_private(lb3, tmp_path):
    assert oct(os.stat(f"{tmp_path}/admin.sock").st_mode & 0o777) == "0o600"


def test_read_ops(lb3, tmp_path):
    lb, port, addr = lb3
    with client(tmp_path) as c:
        assert c.call("ping") == "pong"
        assert c.call("version")["protocol"] == 1
        assert c.call("services") == [{"name": "web", "listen": ["127.0.0.1:0"], "policy": "round_robin",
                                       "backends": 2}]
        assert c.call("backends", service="web") == [
            {"address": addr["a"], "weight": 1, "state": "ready", "health": "up"},
            {"address": addr["b"], "weight": 1, "state": "ready", "health": "up"}]
        with pytest.raises(AdminError, match="unknown_service: no service 'nope'"):
            c.call("backends", service="nope")


def test_add_weight_drain_maint_ready_remove_change_traffic(lb3, tmp_path):
    lb, port, addr = lb3
    with client(tmp_path) as c:
        c.call("add_backend", service="web", address=addr["c"], weight=2)
        assert "".join(names_of(port, 8)) == "cabccabc"         # SWRR over {1,1,2}, a full round twice
        c.call("set_weight", service="web", address=addr["a"], weight=3)
        assert sorted(names_of(port, 12)) == sorted("aaaaaabbcccc")
        c.call("set_state", service="web", address=addr["a"], state="drain")
        assert "a" not in names_of(port, 9)
        c.call("set_state", service="web", address=addr["b"], state="maint")
        assert set(names_of(port, 6)) == {"c"}
        c.call("set_state", service="web", address=addr["a"], state="ready")
        c.call("remove_backend", service="web", address=addr["c"])
        assert set(names_of(port, 6)) == {"a"}
        assert [b["address"] for b in c.call("backends", service="web")] == [addr["a"], addr["b"]]


def connection_on_a(c, port, addr):
    """Open a connection that lands on backend a (b is in maint meanwhile)."""
    c.call("set_state", service="web", address=addr["b"], state="maint")
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert s.recv(10) == b"a\n"
    return s


def test_drain_keeps_open_connections_and_drain_timeout_closes_them(lb3, tmp_path):
    lb, port, addr = lb3
    with client(tmp_path) as c:
        s = connection_on_a(c, port, addr)
        c.call("set_state", service="web", address=addr["b"], state="ready")
        c.call("set_state", service="web", address=addr["a"], state="drain")
        s.sendall(b"still here")
        assert s.recv(100) == b"still here"                     # drained, not dropped
        c.call("set_state", service="web", address=addr["a"], state="drain", timeout=0.3)
        s.settimeout(3)
        t0 = time.monotonic()
        assert s.recv(100) == b""                               # closed by the drain timeout
        assert 0.2 < time.monotonic() - t0 < 2


def test_maint_with_close_closes_open_connections(lb3, tmp_path):
    lb, port, addr = lb3
    with client(tmp_path) as c:
        s = connection_on_a(c, port, addr)
        c.call("set_state", service="web", address=addr["a"], state="maint", close=True)
        assert s.recv(10) == b""


def test_add_and_remove_service_with_listener(lb3, tmp_path):
    lb, port, addr = lb3
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        new_port = probe.getsockname()[1]
    with client(tmp_path) as c:
        c.call("add_service", service={"name": "api", "listen": [f"127.0.0.1:{new_port}"],
                                       "policy": "maglev", "backends": [{"address": addr["c"]}]})
        assert names_of(new_port, 3) == ["c"] * 3
        assert names_of(port, 2) != []                          # the other service carries on
        c.call("remove_service", service="api")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", new_port), timeout=2)


def test_stats_match_a_known_workload(lb3, tmp_path):
    lb, port, addr = lb3
    with client(tmp_path) as c:
        c.call("set_state", service="web", address=addr["b"], state="maint")
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                assert s.recv(2) == b"a\n"
                s.sendall(b"x" * 1000)
                got = 0
                while got < 1000:
                    got += len(s.recv(4096))
        time.sleep(0.2)
        (web,) = c.call("stats")
        a = web["backends"][0]
        assert (a["address"], a["total"], a["active"], a["bytes_in"], a["bytes_out"]) == \
            (addr["a"], 5, 0, 5000, 5 * (2 + 1000))


def test_subscribe_streams_events(lb3, tmp_path):
    lb, port, addr = lb3
    events = []
    sub = client(tmp_path)
    t = threading.Thread(target=lambda: [events.append(e) for e in sub.events()], daemon=True)
    t.start()
    time.sleep(0.2)
    with client(tmp_path) as c:
        c.call("set_weight", service="web", address=addr["a"], weight=4)
        c.call("remove_backend", service="web", address=addr["b"])
    deadline = time.monotonic() + 5
    while len(events) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    sub.close()
    assert [(e["op"], e["address"]) for e in events] == [("set_weight", addr["a"]),
                                                         ("remove_backend", addr["b"])]
    assert events[1]["generation"] == events[0]["generation"] + 1


def test_reload_applies_the_config_difference(procs, tmp_path):
    ports = {n: start_backend(procs, "announce", name=n)[1] for n in "ab"}
    path = tmp_path / "fastlb.toml"
    text = admin_config(tmp_path, service("web", [(ports["a"], 1)]))
    path.write_text(text)
    lb = Proc([PY, "-m", "fastlb", "run", "-c", str(path)], procs)
    lb.wait_line("fastlb ready")
    port = int(lb.wait_line(r"listening on \S+:(\d+)").group(1))
    path.write_text(text.replace('weight = 1 } ]',
                                 f'weight = 1 }}, {{ address = "127.0.0.1:{ports["b"]}" }} ]'))
    with client(tmp_path) as c:
        assert c.call("reload")["services"] == ["web"]
        assert sorted(names_of(port, 4)) == ["a", "a", "b", "b"]
        path.write_text("this is not toml")
        with pytest.raises(AdminError, match="reload refused, nothing changed"):
            c.call("reload")
        assert len(c.call("backends", service="web")) == 2
    path.write_text(text)                                       # SIGHUP reloads too
    lb.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while lb.output.count("reloaded") < 2 and time.monotonic() < deadline:   # the admin one was 1st
        time.sleep(0.05)
    assert set(names_of(port, 4)) == {"a"}


def test_hostile_frames_get_an_error_and_the_balancer_keeps_serving(lb3, tmp_path):
    """Headers that would make msgpack allocate (an array of 10^6 elements announced in 5 bytes,
    on 20 connections at once, each left open): each gets its error and is closed; the
    registry, the other clients and the proxied traffic are untouched."""
    lb, port, addr = lb3
    path = f"{tmp_path}/admin.sock"
    with client(tmp_path) as c:
        before = c.call("backends", service="web")
        socks = []
        for _ in range(20):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(path)
            s.sendall(msgpack.packb({"id": 1, "op": "ping"}) + b"\xdd\x00\x0f\x42\x40")
            socks.append(s)
        for s in socks:
            u = msgpack.Unpacker(raw=False)
            replies: list = []
            while len(replies) < 2:
                data = s.recv(65536)
                assert data
                u.feed(data)
                replies += list(u)
            assert replies[0] == {"id": 1, "ok": True, "result": "pong"}
            assert replies[1]["id"] is None and replies[1]["error"]["code"] == "too_large"
            assert "an array of 1000000 elements, over the limit of 4096" in replies[1]["error"]["message"]
            assert s.recv(10) == b""                            # closed: its framing is lost
            s.close()
        deep = {"id": 9, "op": "add_service", "service": {"name": [[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]}}
        with pytest.raises(AdminError, match="bad_request: add_service: \"service\" nests arrays and maps "
                                             "more than 16 deep"):
            c.call(deep.pop("op"), **{k: v for k, v in deep.items() if k != "id"})
        assert c.call("backends", service="web") == before      # the registry is unchanged
        assert c.call("ping") == "pong"                         # the same client goes on
    assert set(names_of(port, 4)) == {"a", "b"}                 # and traffic flows
    assert lb.popen.poll() is None


def test_bad_input_gets_errors_and_hurts_nothing(lb3, tmp_path):
    lb, port, addr = lb3
    path = f"{tmp_path}/admin.sock"
    with client(tmp_path) as c:
        before = c.call("backends", service="web")
        for raw, code in [(msgpack.packb([1]), "bad_request"),
                          (msgpack.packb({"id": 4, "op": "x"}), "unknown_op"),
                          (msgpack.packb({"id": 5, "op": "set_weight", "service": "web",
                                          "address": addr["a"], "weight": "9"}), "bad_request")]:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.sendall(raw + msgpack.packb({"id": 77, "op": "ping"}))
            u = msgpack.Unpacker(raw=False)
            replies = []
            while len(replies) < 2:
                u.feed(s.recv(65536))
                replies += list(u)
            assert replies[0]["error"]["code"] == code and replies[1]["result"] == "pong"  # stream goes on
            s.close()
        for raw, code in [(b"\xc1\x00\x00", "bad_msgpack"),
                          (msgpack.packb({"id": 1, "op": "ping", "p": "x" * (2 << 20)}), "too_large"),
                          (b"\xdd\x00\x0f\x42\x40", "too_large"),          # a 1,000,000-element array header
                          (b"\x91" * 2000, "too_large")]:                    # nested past msgpack's stack
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            try:
                s.sendall(raw)
            except OSError:
                pass
            reply = msgpack.unpackb(s.recv(65536), raw=False)
            assert reply["error"]["code"] == code and reply["id"] is None
            assert s.recv(10) == b""                            # and the stream is closed
            s.close()
        assert c.call("backends", service="web") == before      # the registry is unchanged
        assert c.call("ping") == "pong"                         # this client was not disturbed
    assert set(names_of(port, 4)) == {"a", "b"}                 # nor was proxied traffic


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(
    st.binary(max_size=400),
    st.builds(lambda m: msgpack.packb(m), st.dictionaries(
        st.sampled_from(["id", "op", "service", "address", "weight", "state", "timeout", "close", "zz"]),
        st.one_of(st.integers(-5, 10**7), st.text(max_size=20), st.booleans(), st.none(), st.floats(),
                  st.sampled_from(["set_weight", "remove_backend", "set_state", "add_backend", "web",
                                   "drain", "ready", "127.0.0.1:1"])), max_size=6))))
def test_fuzz_live_server_answers_or_closes_and_keeps_its_registry(fuzz_lb, data):
    path, before = fuzz_lb
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(path)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        u = msgpack.Unpacker(raw=False)
        while chunk := s.recv(65536):
            u.feed(chunk)
        for reply in u:
            assert set(reply) >= {"id", "ok"}
            if reply["ok"]:
                continue
            assert set(reply["error"]) == {"code", "message"}
    finally:
        s.close()
    with AdminClient(socket_path=path) as c:
        assert c.call("ping") == "pong"
        # mutations that parse and name real things may apply; anything else leaves it alone
        now = c.call("backends", service="web")
        assert [b["address"] for b in now if b["address"] != "127.0.0.1:1"] == [b["address"] for b in before]


@pytest.fixture(scope="module")
def fuzz_lb(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    procs = []
    _, be = start_backend(procs, "echo")
    start_fastlb(procs, admin_config(tmp, service("web", [(be, 1)])))
    with AdminClient(socket_path=f"{tmp}/admin.sock") as c:
        before = c.call("backends", service="web")
    yield f"{tmp}/admin.sock", before
    for p in procs:
        p.stop()


def test_live_changes_under_load_drop_nothing(procs, tmp_path):
    names = "abcd"
    ports = {n: start_backend(procs, "announce", name=n)[1] for n in names}
    addr = {n: f"127.0.0.1:{p}" for n, p in ports.items()}
    lb, (port,) = start_fastlb(procs, admin_config(tmp_path,
                                                   service("web", [(ports["a"], 1), (ports["b"], 1)])))
    stop = threading.Event()
    log, errors = [], []                                  # (start time, backend) per connection

    def short_connections():
        while not stop.is_set():
            t = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    name = s.recv(2).decode().strip()
                    s.sendall(b"ping")
                    assert s.recv(4) == b"ping"
                log.append((t, name))
            except Exception as exc:                      # noqa: BLE001 - any failure counts
                errors.append(repr(exc))

    def long_stream(results):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.recv(2)
                sent, got = hashlib.sha256(), hashlib.sha256()
                for _ in range(400):
                    chunk = os.urandom(4096)
                    sent.update(chunk)
                    s.sendall(chunk)
                    n = 0
                    while n < len(chunk):
                        data = s.recv(65536)
                        assert data
                        got.update(data)
                        n += len(data)
                    time.sleep(0.005)
                results.append(sent.hexdigest() == got.hexdigest())
        except Exception as exc:                          # noqa: BLE001
            errors.append("stream: " + repr(exc))

    streams: list = []
    threads = [threading.Thread(target=short_connections) for _ in range(3)]
    threads += [threading.Thread(target=long_stream, args=(streams,)) for _ in range(4)]
    for t in threads:
        t.start()
    drained = []                                          # (backend, ack time, ready-again time)
    with client(tmp_path) as c:
        ops = 0
        while ops < 200:
            for step in [("add_backend", {"address": addr["c"]}),
                         ("add_backend", {"address": addr["d"], "weight": 3}),
                         ("set_weight", {"address": addr["a"], "weight": 2}),
                         ("set_state", {"address": addr["b"], "state": "drain"}),
                         ("set_weight", {"address": addr["c"], "weight": 4}),
                         ("set_state", {"address": addr["b"], "state": "ready"}),
                         ("remove_backend", {"address": addr["d"]}),
                         ("set_weight", {"address": addr["a"], "weight": 1}),
                         ("remove_backend", {"address": addr["c"]})]:
                c.call(step[0], service="web", **step[1])
                now = time.monotonic()
                if step[0] == "set_state" and step[1]["state"] == "drain":
                    drained.append(["b", now, None])
                elif step[0] == "set_state":
                    drained[-1][2] = now
                ops += 1
                time.sleep(0.005)
        stop.set()
        for t in threads:
            t.join(60)
        assert not errors, errors[:5]
        assert streams == [True] * 4
        assert len(log) > 200
        for backend, since, until in drained:             # drained: no connection begun after the ack
            assert not [t for t, n in log if n == backend and since < t < until]
        # final weights: a 1, b 2, c 3 (d gone); a full SWRR window is exact
        c.call("add_backend", service="web", address=addr["c"], weight=3)
        c.call("set_weight", service="web", address=addr["b"], weight=2)
    got = names_of(port, 60)
    assert (got.count("a"), got.count("b"), got.count("c"), got.count("d")) == (10, 20, 30, 0)


def test_twenty_concurrent_admin_clients_end_in_the_acknowledged_order(procs, tmp_path):
    _, be = start_backend(procs, "echo")
    text = service("web", [(be, 1)])
    start_fastlb(procs, admin_config(tmp_path, text))
    pool = [f"127.0.0.1:{20000 + i}" for i in range(8)]
    acked, lock = [], threading.Lock()

    def worker(seed):
        import random
        rnd = random.Random(seed)
        with client(tmp_path) as c:
            for _ in range(100):
                address = rnd.choice(pool)
                op, args = rnd.choice([
                    ("add_backend", {"weight": rnd.randint(1, 9)}), ("remove_backend", {}),
                    ("set_weight", {"weight": rnd.randint(1, 9)}),
                    ("set_state", {"state": rnd.choice(["ready", "drain", "maint"])})])
                try:
                    ev = c.call(op, service="web", address=address, **args)
                except AdminError as exc:
                    assert exc.code in ("exists", "unknown_backend")
                    continue
                with lock:
                    acked.append((ev["generation"], op, {"service": "web", "address": address, **args}))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    gens = sorted(g for g, _, _ in acked)
    assert gens == list(range(1, len(gens) + 1))          # one generation per acknowledged op
    replay = Registry({s.name: s for s in config.loads(text).services})
    for _, op, args in sorted(acked, key=lambda a: a[0]):
        replay.commit(replay.plan(op, args, resolve=False)[0])
    want = [{"address": b.address.text, "weight": b.weight, "state": b.state}
            for b in replay.snapshot["web"].backends]
    with client(tmp_path) as c:
        got = [{k: b[k] for k in ("address", "weight", "state")} for b in c.call("backends", service="web")]
    assert got == want


def test_kill_9_after_acknowledged_changes_loses_none(procs, tmp_path):
    ports = {n: start_backend(procs, "announce", name=n)[1] for n in "ab"}
    body = service("web", [(ports["a"], 1)])
    lb, _ = start_fastlb(procs, admin_config(tmp_path, body))
    with client(tmp_path) as c:
        c.call("add_backend", service="web", address=f"127.0.0.1:{ports['b']}", weight=7)
        for w in range(2, 12):
            c.call("set_weight", service="web", address=f"127.0.0.1:{ports['a']}", weight=w)
        c.call("set_state", service="web", address=f"127.0.0.1:{ports['b']}", state="drain")
    lb.signal(signal.SIGKILL)                              # right after the last acknowledgement
    lb.wait(5)
    lb2, _ = start_fastlb(procs, admin_config(tmp_path, body))
    with client(tmp_path) as c:
        got = [(b["weight"], b["state"]) for b in c.call("backends", service="web")]
        assert got == [(11, "ready"), (7, "drain")]


def test_corrupt_state_file_refuses_to_start_unless_told(procs, tmp_path):
    _, be = start_backend(procs, "echo")
    (tmp_path / "state.msgpack").write_bytes(b"\x93garbage")
    cfg = tmp_path / "f.toml"
    cfg.write_text(admin_config(tmp_path, service("web", [(be, 1)])))
    lb = Proc([PY, "-m", "fastlb", "run", "-c", str(cfg)], procs)
    assert lb.wait(10) == 2
    assert f"state file {tmp_path}/state.msgpack" in lb.output and "--ignore-state" in lb.output
    lb2 = Proc([PY, "-m", "fastlb", "run", "-c", str(cfg), "--ignore-state"], procs)
    lb2.wait_line("fastlb ready")


def test_tcp_admin_needs_the_token(procs, tmp_path):
    _, be = start_backend(procs, "echo")
    secret = "s3cret-" + "x" * 32                 # at least 32 characters, owner-only file
    (tmp_path / "token").write_text(secret + "\n")
    (tmp_path / "token").chmod(0o600)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        aport = probe.getsockname()[1]
    text = (f'[global]\nadmin = "tcp:127.0.0.1:{aport}"\nadmin_token_file = "{tmp_path}/token"\n'
            + service("web", [(be, 1)]))
    lb, _ = start_fastlb(procs, text)
    with AdminClient(tcp=("127.0.0.1", aport), token=secret) as c:
        assert c.call("ping") == "pong"
    for token in (None, "wrong"):
        with AdminClient(tcp=("127.0.0.1", aport), token=token) as c:
            with pytest.raises(AdminError, match="unauthorized"):
                c.call("set_weight", service="web", address=f"127.0.0.1:{be}", weight=5)
    lb.wait_line("refused: missing token")
    with AdminClient(tcp=("127.0.0.1", aport), token=secret) as c:
        assert c.call("backends", service="web")[0]["weight"] == 1


def test_ctl_cli_tables_json_and_errors(lb3, tmp_path):
    import json
    import subprocess
    lb, port, addr = lb3
    ctl = [PY, "-m", "fastlb", "ctl", "--socket", f"{tmp_path}/admin.sock"]
    out = subprocess.run(ctl + ["backends", "web"], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0
    assert out.stdout.splitlines()[0].split() == ["ADDRESS", "WEIGHT", "STATE", "HEALTH"]
    out = subprocess.run(ctl + ["weight", "web", addr["a"], "4"], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0
    out = subprocess.run(ctl + ["--json", "backends", "web"], capture_output=True, text=True, timeout=20)
    assert json.loads(out.stdout)[0]["weight"] == 4
    out = subprocess.run(ctl + ["drain", "web", "127.0.0.1:1"], capture_output=True, text=True, timeout=20)
    assert out.returncode == 1 and "unknown_backend" in out.stderr
    out = subprocess.run([PY, "-m", "fastlb", "ctl", "--socket", f"{tmp_path}/nope.sock", "ping"],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 2 and "cannot reach the admin socket" in out.stderr


def test_a_second_fastlb_refuses_to_steal_a_live_admin_socket(procs, tmp_path):
    _, be = start_backend(procs, "announce", name="a")
    first, (port,) = start_fastlb(procs, admin_config(tmp_path, service("web", [(be, 1)])))
    with client(tmp_path) as c:
        c.call("set_weight", service="web", address=f"127.0.0.1:{be}", weight=3)
    state = (tmp_path / "state.msgpack").read_bytes()
    cfg = tmp_path / "second.toml"
    cfg.write_text(admin_config(tmp_path, service("web", [(be, 1)])))   # same admin, state, port 0
    second = Proc([PY, "-m", "fastlb", "run", "-c", str(cfg)], procs)
    assert second.wait(15) == 2
    assert (f"admin socket {tmp_path}/admin.sock ([global] admin): a process accepts connections "
            f"there: another fastlb seems to run with this admin socket") in second.output
    assert "fastlb ready" not in second.output
    assert (tmp_path / "state.msgpack").read_bytes() == state        # it touched nothing
    with client(tmp_path) as c:                                       # the first one goes on
        assert c.call("ping") == "pong"
        assert c.call("backends", service="web")[0]["weight"] == 3
    assert names_of(port, 2) == ["a", "a"]


def test_a_stale_admin_socket_is_replaced_and_a_regular_file_is_never_removed(procs, tmp_path):
    _, be = start_backend(procs, "announce", name="a")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(f"{tmp_path}/admin.sock")                 # bound, never listening: refused
    stale.close()
    start_fastlb(procs, admin_config(tmp_path, service("web", [(be, 1)])))
    with client(tmp_path) as c:
        assert c.call("ping") == "pong"
    other = tmp_path / "other"
    other.mkdir()
    (other / "admin.sock").write_text("not a socket")
    cfg = tmp_path / "f.toml"
    cfg.write_text(admin_config(other, service("web", [(be, 1)])))
    lb = Proc([PY, "-m", "fastlb", "run", "-c", str(cfg)], procs)
    assert lb.wait(15) == 2
    assert (f"admin socket {other}/admin.sock ([global] admin): the path exists and is a regular "
            f"file, not a socket; fastlb never removes it") in lb.output
    assert (other / "admin.sock").read_text() == "not a socket"
