"""The supervisor's lifecycle end to end: changes that fail change nothing, listeners that
cannot bind, SIGTERM in every mode, signals while starting. Real processes, real sockets."""
import os
import signal
import socket
import threading
import time

import pytest

from fastlb import statefile
from fastlb.admin.client import AdminError
from helpers import Proc, PY, names_of, recv_all, service, start_backend, start_fastlb
from helpers import admin_client as client


def taken_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


HEALTH = 'health = { interval = "100ms", timeout = "80ms", rise = 1, fall = 1, jitter = 0 }\n'



def run_config(procs, tmp_path, text):
    """``fastlb run`` on ``text`` written to tmp_path/f.toml (kept, for a later reload): the
    process, the config's path, the first listening port."""
    cfg = tmp_path / "f.toml"
    cfg.write_text(text)
    lb = Proc([PY, "-m", "fastlb", "run", "-c", str(cfg)], procs)
    lb.wait_line("fastlb ready")
    return lb, cfg, int(lb.wait_line(r"listening on \S+:(\d+)").group(1))

def test_add_service_on_a_port_in_use_changes_nothing_and_poisons_nothing(procs, tmp_path):
    backs = {n: start_backend(procs, "announce", name=n) for n in "ab"}
    addr = {n: f"127.0.0.1:{p}" for n, (_, p) in backs.items()}
    text = (f'[global]\nadmin = "unix:{tmp_path}/admin.sock"\nstate_file = "{tmp_path}/state.msgpack"\n'
            + service("web", [(p, 1) for _, p in backs.values()]) + HEALTH)
    lb, cfg, port = run_config(procs, tmp_path, text)
    taken, tport = taken_port()
    with client(tmp_path) as c:
        with pytest.raises(AdminError) as err:
            c.call("add_service", service={"name": "api", "listen": [f"127.0.0.1:{tport}"],
                                           "backends": [{"address": addr["a"]}]})
        assert err.value.code == "listen_failed"
        assert f"cannot listen on 127.0.0.1:{tport}: Address already in use" in str(err.value)
        assert [s["name"] for s in c.call("services")] == ["web"]
        registry, _ = statefile.load(f"{tmp_path}/state.msgpack")
        assert list(registry) == ["web"]                           # not persisted either
        # later changes work and take effect
        c.call("set_state", service="web", address=addr["b"], state="maint")
        assert set(names_of(port, 4)) == {"a"}
        c.call("set_state", service="web", address=addr["b"], state="ready")
        # the health checks are alive: a killed backend goes down, traffic moves
        backs["a"][0].signal(signal.SIGKILL)
        lb.wait_line(rf"{addr['a']} DOWN")
        time.sleep(0.1)
        assert set(names_of(port, 4)) == {"b"}
    assert "internal" not in lb.output and "Traceback" not in lb.output
    lb.signal(signal.SIGTERM)
    assert lb.wait(10) == 0
    lb2 = Proc([PY, "-m", "fastlb", "run", "-c", str(cfg)], procs)   # and it starts again
    lb2.wait_line("fastlb ready")
    taken.close()


def test_ipv6_zone_address_is_refused_and_changes_nothing(procs, tmp_path):
    _, be = start_backend(procs, "announce", name="a")
    text = f'[global]\nadmin = "unix:{tmp_path}/admin.sock"\n' + service("web", [(be, 1)])
    lb, (port,) = start_fastlb(procs, text)
    with client(tmp_path) as c:
        with pytest.raises(AdminError) as err:
            c.call("add_backend", service="web", address="[fe80::1%lo]:80")
        assert err.value.code == "invalid" and "fe80::1%lo" in str(err.value)
        assert [b["address"] for b in c.call("backends", service="web")] == [f"127.0.0.1:{be}"]
        c.call("set_weight", service="web", address=f"127.0.0.1:{be}", weight=3)
        assert c.call("backends", service="web")[0]["weight"] == 3
    assert names_of(port, 2) == ["a", "a"]
    assert "internal" not in lb.output


def test_a_listener_that_cannot_bind_at_start_fails_only_its_service(procs, tmp_path):
    _, be = start_backend(procs, "announce", name="a")
    taken, tport = taken_port()
    text = (f'[global]\nadmin = "unix:{tmp_path}/admin.sock"\n' + service("web", [(be, 1)])
            + service("api", [(be, 1)], listen=f"127.0.0.1:{tport}"))
    lb, (port,) = start_fastlb(procs, text)
    lb.wait_line(rf"ERROR service api not started: cannot listen on 127.0.0.1:{tport}: "
                 r"Address already in use")
    assert names_of(port, 2) == ["a", "a"]
    with client(tmp_path) as c:
        assert [s["name"] for s in c.call("services")] == ["web"]
    taken.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_refuses_new_clients_at_once_in_every_mode(procs, workers):
    _, be = start_backend(procs, "trickle", size=1 << 20)
    lb, (port,) = start_fastlb(procs, f'[global]\nworkers = {workers}\ngrace = "10s"\n'
                                      + service("web", [(be, 1)]))
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    first = s.recv(1000)
    lb.signal(signal.SIGTERM)
    lb.wait_line("stopped accepting|stopping 2 worker")
    time.sleep(0.2)
    with pytest.raises(ConnectionRefusedError):
        c = socket.create_connection(("127.0.0.1", port), timeout=2)
        c.settimeout(1)
        c.recv(1)                                 # (before the fix: a handshake, then nothing)
    rest = recv_all(s)
    s.close()
    assert len(first) + len(rest) == (1 << 20) // 10 * 10   # the open one finished
    assert lb.wait(10) == 0


def test_sighup_while_starting_is_deferred_not_fatal(procs, tmp_path):
    """A FIFO as the config file holds fastlb in config loading while the SIGHUP arrives."""
    _, be = start_backend(procs, "announce", name="a")
    fifo = tmp_path / "f.toml"
    os.mkfifo(fifo)
    text = service("web", [(be, 1)])
    lb = Proc([PY, "-m", "fastlb", "run", "-c", str(fifo)], procs)
    with open(fifo, "w") as f:                    # returns once fastlb opened it: it is loading
        lb.signal(signal.SIGHUP)
        time.sleep(0.2)
        f.write(text)
    lb.wait_line("fastlb ready")
    lb.wait_line("SIGHUP received while starting")
    writer = threading.Thread(target=lambda: fifo.write_text(text))   # the reload reads it again
    writer.start()
    lb.wait_line("reloaded .*; nothing changed$")      # the same text: the log says so
    writer.join(10)
    port = int(lb.wait_line(r"listening on \S+:(\d+)").group(1))
    assert names_of(port, 1) == ["a"]
    lb.signal(signal.SIGTERM)
    assert lb.wait(10) == 0


def test_sigterm_while_starting_stops_gracefully(procs, tmp_path):
    _, be = start_backend(procs, "announce", name="a")
    fifo = tmp_path / "f.toml"
    os.mkfifo(fifo)
    lb = Proc([PY, "-m", "fastlb", "run", "-c", str(fifo)], procs)
    with open(fifo, "w") as f:
        lb.signal(signal.SIGTERM)
        time.sleep(0.2)
        f.write(service("web", [(be, 1)]))
    assert lb.wait(10) == 0
    assert "SIGTERM received while starting" in lb.output and "fastlb stopped" in lb.output


def test_reload_with_a_listener_that_cannot_bind_is_refused_whole(procs, tmp_path):
    _, be = start_backend(procs, "announce", name="a")
    text = f'[global]\nadmin = "unix:{tmp_path}/admin.sock"\n' + service("web", [(be, 1)])
    lb, cfg, port = run_config(procs, tmp_path, text)
    taken, tport = taken_port()
    cfg.write_text(text.replace("weight = 1 } ]", "weight = 2 } ]")
                   + service("api", [(be, 1)], listen=f"127.0.0.1:{tport}"))
    with client(tmp_path) as c:
        with pytest.raises(AdminError) as err:
            c.call("reload")
        assert err.value.code == "listen_failed" and "nothing changed" in str(err.value)
        assert [s["name"] for s in c.call("services")] == ["web"]
        assert c.call("backends", service="web")[0]["weight"] == 1      # not half applied
        taken.close()
        assert c.call("reload")["services"] == ["api", "web"]           # the port is free now
        assert c.call("backends", service="web")[0]["weight"] == 2
    assert names_of(tport, 1) == ["a"] and names_of(port, 1) == ["a"]



def test_debug_says_what_the_data_path_and_the_checks_do(procs, tmp_path):
    """--log-level debug adds the lines an operator needs to follow a problem: each generation
    a data path applies (usable backends per service, in every worker) and each health
    check's result; at info, neither."""
    _, be = start_backend(procs, "announce", name="a")
    path = tmp_path / "lb.toml"
    path.write_text("[global]\nworkers = 2\n"
                    + service("web", [(be, 1)], health='{ interval = "100ms", timeout = "50ms" }'))
    for level, shown in (("debug", True), ("info", False)):
        lb = Proc([PY, "-m", "fastlb", "run", "-c", str(path), "--log-level", level], procs)
        lb.wait_line("fastlb ready")
        if shown:
            lb.wait_line(rf"web/127\.0\.0\.1:{be}: check passed \(connected\)")
            lb.wait_line(r"data path \(pid \d+\): generation \d+ applied: web 1/1 backend\(s\) usable")
        else:
            time.sleep(0.5)                       # five check intervals
        lb.signal(signal.SIGTERM)
        assert lb.wait(10) == 0
        if not shown:
            assert "check passed" not in lb.output and " applied: " not in lb.output
