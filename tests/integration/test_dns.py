"""DNS that follows changes, through `fastlb run`: backends given by host name or SRV record,
re-resolved in the background against a DNS server the test runs on loopback (tests/dnsserver.py),
members that appear, change (the leaver drains), disappear, SRV priority failover, a name that
does not resolve at start; and the two regressions of issue 13 (identity by configured text)."""
import os
import shutil
import socket
import subprocess
import time

import pytest
from dnsserver import DnsServer
from helpers import Proc, start_backend
from helpers import admin_client as client

from fastlb import config, spawn, statefile


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def name_of(port: int, host: str = "127.0.0.1") -> str:
    """The name the backend of one new connection announces ("" when the balancer closes it)."""
    with socket.create_connection((host, port), timeout=10) as s:
        s.settimeout(10)
        try:
            return s.recv(100).decode().strip()
        except ConnectionResetError:
            return ""


def listen_port(lb: Proc) -> int:
    import re
    return int(re.search(r"listening on \S+:(\d+)", lb.output).group(1))


def write_config(tmp_path, text: str) -> str:
    path = tmp_path / "fastlb.toml"
    path.write_text(text)
    return str(path)


# -- the regressions: backends are identified by their configured text ------------------------
def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount --bind /etc/hosts /etc/hosts"],
                       capture_output=True)
    return r.returncode == 0


def start_with_hosts(procs, hosts_file, config_path) -> Proc:
    """`fastlb run` in a private mount namespace whose /etc/hosts is ``hosts_file``: the test
    controls what the system resolver (and fastlb's resolver, which reads /etc/hosts first,
    as glibc does) answers, without a DNS key in the config (so the test runs on old code too)."""
    cmd = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts_file),
           *spawn.command("fastlb", "run", "-c", config_path)]
    lb = Proc(cmd, procs, spawn.environment())
    lb.wait_line("fastlb ready", timeout=20)
    return lb


def test_a_reload_that_resolves_a_new_ip_keeps_the_state_set_through_admin(procs, tmp_path):
    """Old code resolved host names in the config and compared resolved addresses on reload:
    a new IP made the entry 'changed', and a backend put in maint came back ready."""
    if not _can_unshare():
        pytest.skip("needs unshare -m and mount (root)")
    _, pa = start_backend(procs, "announce", name="a", host="127.0.0.2")
    start_backend(procs, "announce", name="b", host="127.0.0.3", port=pa)
    _, pc = start_backend(procs, "announce", name="c")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n127.0.0.2 app.test\n")
    path = write_config(tmp_path, f'[global]\nadmin = "unix:{tmp_path}/admin.sock"\n'
                        f'[[service]]\nname = "web"\nlisten = "127.0.0.1:0"\n'
                        f'backends = [{{ address = "app.test:{pa}" }}, {{ address = "127.0.0.1:{pc}" }}]\n')
    lb = start_with_hosts(procs, hosts, path)
    port = listen_port(lb)
    wait_for(lambda: "a" in {name_of(port) for _ in range(4)}, what="app.test serving")
    with client(tmp_path) as c:
        c.call("set_state", service="web", address=f"app.test:{pa}", state="maint")
        assert {name_of(port) for _ in range(6)} == {"c"}
        with open(hosts, "w") as f:                      # in place: the bind mount keeps the inode
            f.write("127.0.0.1 localhost\n127.0.0.3 app.test\n")
        lb.signal(__import__("signal").SIGHUP)
        lb.wait_line("reloaded ")
        (b,) = [b for b in c.call("backends", service="web") if b["address"] == f"app.test:{pa}"]
        assert b["state"] == "maint"
    assert {name_of(port) for _ in range(6)} == {"c"}


def test_the_state_file_loads_while_dns_is_down(procs, tmp_path):
    """Old code resolved every host name of the state file while loading it: with DNS down it
    found the file unusable and refused to start. The entry is kept as text, weight and all."""
    _, pc = start_backend(procs, "announce", name="c")
    body = (f'[[service]]\nname = "web"\nlisten = "127.0.0.1:0"\n'
            f'backends = [{{ address = "127.0.0.1:{pc}" }}]\n')
    state = str(tmp_path / "state")
    recorded = {s.name: s for s in config.loads(body).services}
    web = recorded["web"]
    added = config.Backend(config.Address("app.invalid", 9000, "app.invalid:9000"), weight=7)
    statefile.save(state, {"web": config.dataclasses.replace(web, backends=(*web.backends, added))},
                   recorded)
    path = write_config(tmp_path, f'[global]\nadmin = "unix:{tmp_path}/admin.sock"\n'
                                  f'state_file = "{state}"\n' + body)
    lb = Proc(spawn.command("fastlb", "run", "-c", path), procs, spawn.environment())
    lb.wait_line("fastlb ready", timeout=20)
    with client(tmp_path) as c:
        got = {b["address"]: b for b in c.call("backends", service="web")}
    assert got["app.invalid:9000"]["weight"] == 7
    assert {name_of(listen_port(lb)) for _ in range(4)} == {"c"}
    assert os.path.exists(state)


# -- following a DNS server that the test runs ------------------------------------------------


def dns_config(tmp_path, dns_server, backends: str, refresh: str = "200ms", extra: str = "",
               timeout: str = "500ms", workers: int = 1) -> str:
    return (f'[global]\nworkers = {workers}\nadmin = "unix:{tmp_path}/admin.sock"\n'
            f'dns = {{ nameservers = ["{dns_server.address}"], timeout = "{timeout}" }}\n'
            f'[[service]]\nname = "web"\nlisten = "127.0.0.1:0"\ndns = {{ refresh = "{refresh}" }}\n'
            f'{extra}backends = [ {backends} ]\n')


def start(procs, tmp_path, text: str) -> tuple[Proc, int]:
    lb = Proc(spawn.command("fastlb", "run", "-c", write_config(tmp_path, text)), procs,
              spawn.environment())
    lb.wait_line("fastlb ready", timeout=20)
    return lb, listen_port(lb)


def entry(tmp_path, address: str) -> dict:
    with client(tmp_path) as c:
        (svc,) = c.call("stats")
    (b,) = [b for b in svc["backends"] if b["address"] == address]
    return b


@pytest.mark.parametrize("workers", [1, 2])
def test_members_appear_change_and_the_leaver_drains(procs, tmp_path, workers):
    _, p = start_backend(procs, "announce", name="a", host="127.0.0.2")
    start_backend(procs, "announce", name="b", host="127.0.0.3", port=p)
    start_backend(procs, "announce", name="v6", host="::1", port=p)
    with DnsServer() as dns:
        dns.set("app.test", A=["127.0.0.2"])
        lb, port = start(procs, tmp_path, dns_config(
            tmp_path, dns, f'{{ address = "app.test:{p}", weight = 3 }}', workers=workers))
        assert {name_of(port) for _ in range(4)} == {"a"}          # resolved before serving
        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert held.recv(100) == b"a\n"
        # change: a leaves (drains: the open connection goes on), b and ::1 (AAAA) arrive
        dns.set("app.test", A=["127.0.0.3"], AAAA=["::1"])
        wait_for(lambda: "a" not in {name_of(port) for _ in range(4)}, what="a to leave")
        assert {name_of(port) for _ in range(8)} == {"b", "v6"}
        held.sendall(b"still here")
        assert held.recv(100) == b"still here"                   # the leaver's connection goes on
        held.close()
        lb.wait_line(r"backend app.test:\d+: members now 127.0.0.3:\d+, \[::1\]:\d+ "
                     r"\(\+ 127.0.0.3:\d+, \[::1\]:\d+; - 127.0.0.2:\d+, draining\)")
        b = entry(tmp_path, f"app.test:{p}")
        assert (b["weight"], b["state"], b["health"], b["dns"]) == (3, "ready", "up", "resolved")
        assert sorted((m["address"], m["weight"], m["health"]) for m in b["members"]) == [
            (f"127.0.0.3:{p}", 3, "up"), (f"[::1]:{p}", 3, "up")]
        assert b["members"][0]["id"] == f"app.test:{p}={b['members'][0]['address']}"
        assert b["total"] == sum(m["total"] for m in b["members"]) > 0
        out = subprocess.run(spawn.command("fastlb", "ctl", "stats", "--socket",
                                           f"{tmp_path}/admin.sock"),
                             env=spawn.environment(), capture_output=True, text=True, timeout=30)
        backends_table = out.stdout.split("\n\n")[0]          # the limits table follows
        rows = [ln.split() for ln in backends_table.splitlines()]
        assert ["web", f"app.test:{p}", "ready", "up", "(DNS", "resolved)", "3"] == rows[1][:7]
        assert [r[:5] for r in rows[2:]] == [["web", f"127.0.0.3:{p}", "member", "up", "3"],
                                              ["web", f"[::1]:{p}", "member", "up", "3"]]
        # an admin weight on the entry applies to every member; the entry is the admin id
        with client(tmp_path) as c:
            c.call("set_weight", service="web", address=f"app.test:{p}", weight=5)
        assert {m["weight"] for m in entry(tmp_path, f"app.test:{p}")["members"]} == {5}
        # maint with close closes the connections of every member of the entry
        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert held.recv(100) in (b"b\n", b"v6\n")
        with client(tmp_path) as c:
            c.call("set_state", service="web", address=f"app.test:{p}", state="maint", close=True)
        held.settimeout(10)
        assert held.recv(100) == b""
        held.close()


def test_a_name_that_disappears_takes_its_members_and_a_silent_server_keeps_them(procs, tmp_path):
    _, p = start_backend(procs, "announce", name="a", host="127.0.0.2")
    _, pc = start_backend(procs, "announce", name="c")
    with DnsServer() as dns:
        dns.set("app.test", A=["127.0.0.2"])
        lb, port = start(procs, tmp_path, dns_config(
            tmp_path, dns, f'{{ address = "app.test:{p}" }}, {{ address = "127.0.0.1:{pc}" }}'))
        assert {name_of(port) for _ in range(6)} == {"a", "c"}
        dns.silent = True                                        # timeouts: the members stay
        lb.wait_line(r"backend app.test:\d+: timeout after 0.5s; keeping its 1 member\(s\)")
        time.sleep(1.0)
        assert {name_of(port) for _ in range(6)} == {"a", "c"}
        assert entry(tmp_path, f"app.test:{p}")["dns"] == "timeout after 0.5s"
        dns.silent = False
        dns.nxdomain("app.test")                                 # gone: its member leaves
        lb.wait_line(r"backend app.test:\d+: NXDOMAIN: its member\(s\) 127.0.0.2:\d+ leave")
        assert {name_of(port) for _ in range(6)} == {"c"}
        b = entry(tmp_path, f"app.test:{p}")
        assert (b["members"], b["health"], b["dns"]) == ([], "down", "NXDOMAIN")
        assert lb.output.count("timeout after 0.5s; keeping") == 1      # said once


def test_unresolvable_at_start_is_pending_then_serves(procs, tmp_path):
    _, p = start_backend(procs, "announce", name="a", host="127.0.0.2")
    _, pc = start_backend(procs, "announce", name="c")
    with DnsServer() as dns:
        text = dns_config(tmp_path, dns, f'{{ address = "late.test:{p}" }}, {{ address = "127.0.0.1:{pc}" }}')
        path = write_config(tmp_path, text)
        out = subprocess.run(spawn.command("fastlb", "check", "-c", path), env=spawn.environment(),
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert f"backend late.test:{p} weight 1 (host name, resolved every 0.2s)" in out.stdout
        lb, port = start(procs, tmp_path, text)
        assert {name_of(port) for _ in range(6)} == {"c"}         # pending: no traffic, no error
        time.sleep(1.0)                                          # several retries...
        pending = [ln for ln in lb.lines if "late.test" in ln]
        assert len(pending) == 1, pending                        # ...said once
        assert "cannot resolve (NXDOMAIN): pending (no member, no traffic), retrying every 0.2s" in pending[0]
        assert entry(tmp_path, f"late.test:{p}")["health_reason"] == "no member: DNS NXDOMAIN"
        dns.set("late.test", A=["127.0.0.2"])
        lb.wait_line(rf"backend late.test:{p} resolved: 127.0.0.2:{p}")
        assert "a" in {name_of(port) for _ in range(6)}
        # a host name added through the admin is followed too
        _, pb = start_backend(procs, "announce", name="b", host="127.0.0.3")
        dns.set("added.test", A=["127.0.0.3"])
        with client(tmp_path) as c:
            c.call("set_state", service="web", address=f"127.0.0.1:{pc}", state="maint")
            c.call("set_state", service="web", address=f"late.test:{p}", state="maint")
            c.call("add_backend", service="web", address=f"added.test:{pb}")
        lb.wait_line(rf"backend added.test:{pb} resolved: 127.0.0.3:{pb}")
        assert {name_of(port) for _ in range(4)} == {"b"}


def test_srv_priorities_fail_over_to_the_next_group(procs, tmp_path):
    a, pa = start_backend(procs, "announce", name="a")
    b, pb = start_backend(procs, "announce", name="b", host="127.0.0.2")
    _, pc = start_backend(procs, "announce", name="c", host="127.0.0.3")
    with DnsServer() as dns:
        dns.set("_app._tcp.test", SRV=[(1, 10, pa, "one.test"), (1, 30, pb, "two.test"),
                                       (2, 5, pc, "three.test")])
        dns.set("one.test", A=["127.0.0.1"])
        dns.set("two.test", A=["127.0.0.2"])
        dns.set("three.test", A=["127.0.0.3"])
        health = 'health = { interval = "100ms", timeout = "100ms", rise = 1, fall = 1 }\n'
        lb, port = start(procs, tmp_path, dns_config(tmp_path, dns, '{ srv = "_app._tcp.test" }',
                                                     extra=health))
        got = [name_of(port) for _ in range(40)]
        assert set(got) == {"a", "b"}                            # priority 1 only
        assert 20 <= got.count("b") <= 40                        # weights 10:30 -> 3:1
        b_entry = entry(tmp_path, "_app._tcp.test")
        assert sorted((m["address"], m["priority"], m["weight"]) for m in b_entry["members"]) == [
            (f"127.0.0.1:{pa}", 1, 10), (f"127.0.0.2:{pb}", 1, 30), (f"127.0.0.3:{pc}", 2, 5)]
        a.stop()                                                 # b (priority 1) still up: kept
        wait_for(lambda: {name_of(port) for _ in range(4)} == {"b"}, what="a down")
        b.stop()                                                 # priority 1 has nothing up
        wait_for(lambda: {name_of(port) for _ in range(4)} == {"c"}, what="failover to priority 2")
        back, _ = start_backend(procs, "announce", name="a2", port=pa)   # priority 1 again
        wait_for(lambda: {name_of(port) for _ in range(4)} == {"a2"}, what="back to priority 1")
        back.stop()
