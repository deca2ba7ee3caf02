"""etcd for fleets of balancers, through `fastlb run` against a real etcd (Debian's etcd-server)
that each test starts on private loopback ports with a tmp data directory, stopped by its PID:
keys put and deleted reach traffic; a compaction then a change is still seen (the watcher lists
again); etcd killed then restarted: the last members serve, the state is reported (log, ctl
stats, /metrics), then the watcher resyncs; two balancers converge within a second and pick the
same backend for the same client under maglev; admin changes are written to etcd (a conflicting
concurrent write is refused); an instance registered with a lease vanishes when it expires.
Skipped only where `etcd` is absent and FASTLB_REQUIRE_ETCD is not set (CI sets it)."""
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
from helpers import PY, Proc, free_port, start_backend, start_fastlb

from fastlb.admin.client import AdminClient
from fastlb.errors import AdminError

ETCD = shutil.which("etcd")
if not ETCD and os.environ.get("FASTLB_REQUIRE_ETCD") != "1":
    pytest.skip("etcd is not installed (apt-get install etcd-server)", allow_module_level=True)


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class Etcd:
    """One etcd on loopback: a client port, a peer port, a data directory kept across restarts."""

    def __init__(self, procs, tmp_path) -> None:
        assert ETCD, "etcd is required here (FASTLB_REQUIRE_ETCD=1): apt-get install etcd-server"
        self.procs = procs
        self.dir = str(tmp_path / "etcd-data")
        self.port, self.peer = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Proc | None = None
        self.start()

    def start(self) -> None:
        self.proc = Proc([ETCD, "--name", "t", "--data-dir", self.dir,
                          "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                          "--listen-peer-urls", f"http://127.0.0.1:{self.peer}",
                          "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer}",
                          "--initial-cluster", f"t=http://127.0.0.1:{self.peer}",
                          "--log-level", "warn"], self.procs)
        wait_for(self._up, 20, "etcd to answer")

    def _up(self) -> bool:
        try:
            self.post("/v3/kv/range", {"key": b64("x")})
            return True
        except OSError:
            return False

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.stop()                     # SIGKILL, by PID

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def put(self, key: str, value: dict, lease: int = 0) -> int:
        body = {"key": b64(key), "value": b64(json.dumps(value))}
        if lease:
            body["lease"] = str(lease)
        return int(self.post("/v3/kv/put", body)["header"]["revision"])

    def get(self, key: str) -> dict | None:
        kvs = self.post("/v3/kv/range", {"key": b64(key)}).get("kvs", [])
        return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None

    def delete(self, key: str) -> None:
        self.post("/v3/kv/deleterange", {"key": b64(key)})

    def compact(self) -> int:
        rev = int(self.post("/v3/kv/range", {"key": b64("x")})["header"]["revision"])
        self.post("/v3/kv/compaction", {"revision": str(rev), "physical": True})
        return rev


class SecureEtcd(Etcd):
    """etcd over TLS that requires a client certificate (--client-cert-auth) and, once
    ``enable_auth`` ran, a user's token: the setup [discovery.etcd] ca/cert/key/user are for."""

    def __init__(self, procs, tmp_path) -> None:
        trustme = pytest.importorskip("trustme")
        import ssl
        self.tmp = tmp_path
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(tmp_path / "etcd-ca.pem"))
        for name, leaf in (("etcd-server", ca.issue_cert("127.0.0.1")),
                           ("etcd-client", ca.issue_cert("fastlb-client"))):
            leaf.private_key_pem.write_to_path(str(tmp_path / f"{name}.key"))
            leaf.cert_chain_pems[0].write_to_path(str(tmp_path / f"{name}.crt"))
        self.ssl = ssl.create_default_context(cafile=str(tmp_path / "etcd-ca.pem"))
        self.ssl.load_cert_chain(str(tmp_path / "etcd-client.crt"), str(tmp_path / "etcd-client.key"))
        self.token: str | None = None
        super().__init__(procs, tmp_path)

    def start(self) -> None:
        self.url = self.url.replace("http://", "https://")
        t = self.tmp
        self.proc = Proc([ETCD, "--name", "t", "--data-dir", self.dir,
                          "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                          "--listen-peer-urls", f"http://127.0.0.1:{self.peer}",
                          "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer}",
                          "--initial-cluster", f"t=http://127.0.0.1:{self.peer}",
                          "--cert-file", str(t / "etcd-server.crt"),
                          "--key-file", str(t / "etcd-server.key"),
                          "--trusted-ca-file", str(t / "etcd-ca.pem"), "--client-cert-auth",
                          "--log-level", "warn"], self.procs)
        wait_for(self._up, 20, "etcd to answer")

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": self.token} if self.token else {})
        with urllib.request.urlopen(req, timeout=5, context=self.ssl) as r:
            return json.loads(r.read())

    def enable_auth(self, password: str) -> None:
        self.post("/v3/auth/user/add", {"name": "root", "password": password})
        self.post("/v3/auth/user/grant", {"user": "root", "role": "root"})
        self.post("/v3/auth/enable", {})
        self.token = self.post("/v3/auth/authenticate", {"name": "root", "password": password})["token"]


def test_etcd_over_tls_with_a_client_certificate_and_a_user(procs, tmp_path):
    """[discovery.etcd] ca, cert, key, user and password_file against an etcd that requires
    all of them: members reach traffic; a wrong password is reported, not served blindly."""
    etcd = SecureEtcd(procs, tmp_path)
    etcd.enable_auth("s3cret-pw")
    with pytest.raises(urllib.error.HTTPError):                  # auth is really on
        urllib.request.urlopen(urllib.request.Request(
            etcd.url + "/v3/kv/put", data=json.dumps({"key": b64("x"), "value": b64("y")}).encode(),
            method="POST"), timeout=5, context=etcd.ssl)
    _, pa = start_backend(procs, "announce", name="a")
    _, pb = start_backend(procs, "announce", name="b")
    etcd.put(key("app", pa), {})
    (tmp_path / "etcd-pw").write_text("s3cret-pw\n")
    secure = (f'ca = "{tmp_path}/etcd-ca.pem"\ncert = "{tmp_path}/etcd-client.crt"\n'
              f'key = "{tmp_path}/etcd-client.key"\nuser = "root"\n')
    text = lb_config(etcd, f"{tmp_path}/admin.sock").replace(
        'prefix = "/fastlb/"\n', f'prefix = "/fastlb/"\n{secure}password_file = "{tmp_path}/etcd-pw"\n')
    lb, (port,) = start_fastlb(procs, text)
    assert names(port) == {"a"}, lb.output
    etcd.put(key("app", pb), {})
    wait_for(lambda: names(port) == {"a", "b"}, timeout=15, what="b through the TLS watch")
    assert AdminClient(socket_path=f"{tmp_path}/admin.sock").call("stats")[0]["etcd"]["up"] is True
    lb.stop()
    (tmp_path / "etcd-pw").write_text("wrong\n")
    (tmp_path / "admin.sock").unlink(missing_ok=True)
    (tmp_path / "lb2.toml").write_text(text)
    lb2 = Proc([PY, "-m", "fastlb", "run", "-c", str(tmp_path / "lb2.toml")], procs)
    lb2.wait_line(r"etcd unreachable \(.*authentication failed", timeout=20)
    # a client certificate that does not load is a config error naming the key
    (tmp_path / "lb3.toml").write_text(text.replace("etcd-client.key", "etcd-server.key"))
    out = subprocess.run([PY, "-m", "fastlb", "check", "-c", str(tmp_path / "lb3.toml")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "discovery.etcd.cert: cannot load" in out.stderr, out.stderr


@pytest.fixture
def etcd(procs, tmp_path):
    return Etcd(procs, tmp_path)


def key(service: str, port: int) -> str:
    return f"/fastlb/services/{service}/127.0.0.1:{port}"


def lb_config(etcd: Etcd, admin: str, policy: str = "round_robin", metrics: str = "") -> str:
    extra = f'metrics = "{metrics}"\n' if metrics else ""
    return (f'[global]\nadmin = "unix:{admin}"\n{extra}\n'
            f'[discovery.etcd]\nendpoints = ["{etcd.url}"]\nprefix = "/fastlb/"\n\n'
            f'[[service]]\nname = "app"\nlisten = ["127.0.0.1:0"]\npolicy = "{policy}"\n'
            f'discovery = "etcd"\n')


def name_of(port: int, source: str | None = None) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0) if source else None) as s:
        s.settimeout(10)
        try:
            return s.recv(100).decode().strip()
        except ConnectionResetError:
            return ""


def names(port: int, n: int = 12) -> set[str]:
    return {name_of(port) for _ in range(n)}


def backends(admin: AdminClient) -> dict[str, tuple[int, str]]:
    return {b["address"]: (b["weight"], b["state"]) for b in admin.call("backends", service="app")}


def test_put_and_delete_reach_traffic(procs, etcd, tmp_path):
    _, pa = start_backend(procs, "announce", name="a")
    _, pb = start_backend(procs, "announce", name="b")
    etcd.put(key("app", pa), {"weight": 1})
    etcd.put("/fastlb/services/app/not-an-address", {})            # skipped, logged once
    lb, (port,) = start_fastlb(procs, lb_config(etcd, f"{tmp_path}/admin.sock"))
    assert names(port) == {"a"}
    etcd.put(key("app", pb), {"weight": 2, "state": "ready"})
    wait_for(lambda: names(port) == {"a", "b"}, what="b to take traffic")
    etcd.put(key("app", pa), {"state": "maint"})
    wait_for(lambda: names(port) == {"b"}, what="a in maint")
    etcd.put(key("app", pa), {"weight": "heavy"})                # malformed: skipped (a leaves)
    lb.wait_line(r"key '/fastlb/services/app/127\.0\.0\.1:\d+' skipped: weight")
    etcd.put(key("app", pa), {})
    wait_for(lambda: names(port) == {"a", "b"}, what="a back")
    etcd.delete(key("app", pb))
    wait_for(lambda: names(port) == {"a"}, what="b deleted")
    assert "not-an-address' skipped" in lb.output


def test_compaction_then_change_is_seen(procs, etcd, tmp_path):
    """fastlb paused while etcd restarts and the history it would resume from is compacted:
    its watch from the next revision is refused (compacted), so it lists again."""
    _, pa = start_backend(procs, "announce", name="a")
    _, pb = start_backend(procs, "announce", name="b")
    etcd.put(key("app", pa), {})
    lb, (port,) = start_fastlb(procs, lb_config(etcd, f"{tmp_path}/admin.sock"))
    assert names(port) == {"a"}
    lb.signal(signal.SIGSTOP)
    try:
        etcd.kill()
        etcd.start()
        etcd.put(key("app", pb), {})
        etcd.delete(key("app", pa))
        etcd.put("/fastlb/other", {})
        etcd.compact()
    finally:
        lb.signal(signal.SIGCONT)
    lb.wait_line(r"compacted.*listing again", timeout=15)
    wait_for(lambda: names(port) == {"b"}, what="the change made before the compaction")


def test_etcd_down_serves_last_members_then_resyncs(procs, etcd, tmp_path):
    _, pa = start_backend(procs, "announce", name="a")
    _, pb = start_backend(procs, "announce", name="b")
    etcd.put(key("app", pa), {})
    mport = free_port()
    lb, (port,) = start_fastlb(procs, lb_config(etcd, f"{tmp_path}/admin.sock",
                                                metrics=f"127.0.0.1:{mport}"))
    admin = AdminClient(socket_path=f"{tmp_path}/admin.sock", timeout=20)

    def metric(name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        raise AssertionError(f"no {name}")

    assert admin.call("stats")[0]["etcd"]["up"] is True
    assert metric("fastlb_discovery_etcd_up") == 1
    etcd.kill()
    lb.wait_line(r"etcd unreachable .*serving the last known members", timeout=10)
    assert names(port) == {"a"}                         # the last members serve
    stats = admin.call("stats")[0]
    assert stats["etcd"]["up"] is False and stats["etcd"]["error"]
    assert metric("fastlb_discovery_etcd_up") == 0
    assert metric("fastlb_discovery_etcd_revision") >= 2
    time.sleep(1.0)
    assert lb.output.count("etcd unreachable") <= 2     # once (then on change), not per retry
    etcd.start()
    etcd.put(key("app", pb), {})
    wait_for(lambda: names(port) == {"a", "b"}, timeout=15, what="the resync")
    lb.wait_line(r"etcd: reachable again")
    assert admin.call("stats")[0]["etcd"]["up"] is True
    assert metric("fastlb_discovery_etcd_up") == 1


def test_a_hung_etcd_is_detected_by_the_probe_and_the_watch_resumes(procs, etcd, tmp_path):
    """An etcd that stops answering but keeps its connections open (SIGSTOP: a hang, a dead
    disk) is reported unreachable within the probe interval plus its timeout; the last
    members serve; after SIGCONT the watch resumes and sees a change made meanwhile."""
    _, pa = start_backend(procs, "announce", name="a")
    _, pb = start_backend(procs, "announce", name="b")
    etcd.put(key("app", pa), {})
    lb, (port,) = start_fastlb(procs, lb_config(etcd, f"{tmp_path}/admin.sock"))
    admin = AdminClient(socket_path=f"{tmp_path}/admin.sock", timeout=20)
    assert admin.call("stats")[0]["etcd"]["up"] is True
    assert etcd.proc is not None
    os.kill(etcd.proc.pid, signal.SIGSTOP)
    try:
        lb.wait_line(r"etcd unreachable \(.*status probe.*\): serving the last known members",
                     timeout=20)
        assert names(port) == {"a"}
        assert admin.call("stats")[0]["etcd"]["up"] is False
    finally:
        os.kill(etcd.proc.pid, signal.SIGCONT)
    etcd.put(key("app", pb), {})
    wait_for(lambda: names(port) == {"a", "b"}, timeout=20, what="the watch to resume")
    lb.wait_line(r"etcd: reachable again")


def test_restart_with_etcd_down_serves_the_state_files_members(procs, etcd, tmp_path):
    """The members are registry backends, kept in the state file: a fastlb restarted while etcd
    is down serves the last ones it knew; once etcd is back, keys deleted meanwhile leave."""
    _, pa = start_backend(procs, "announce", name="a")
    _, pb = start_backend(procs, "announce", name="b")
    etcd.put(key("app", pa), {})
    etcd.put(key("app", pb), {"weight": 2})
    text = lb_config(etcd, f"{tmp_path}/admin.sock").replace(
        "[global]\n", f'[global]\nstate_file = "{tmp_path}/state"\n')
    lb, (port,) = start_fastlb(procs, text)
    wait_for(lambda: names(port) == {"a", "b"})
    lb.signal(signal.SIGTERM)
    lb.wait()
    etcd.kill()
    lb2, (port,) = start_fastlb(procs, text)
    lb2.wait_line(r"etcd unreachable")
    assert names(port) == {"a", "b"}
    admin = AdminClient(socket_path=f"{tmp_path}/admin.sock", timeout=20)
    assert backends(admin) == {f"127.0.0.1:{pa}": (1, "ready"), f"127.0.0.1:{pb}": (2, "ready")}
    etcd.start()
    etcd.delete(key("app", pa))
    wait_for(lambda: names(port) == {"b"}, timeout=15, what="the resync after the restart")


def two_balancers(procs, etcd, tmp_path, policy="round_robin"):
    out = []
    for i in (1, 2):
        sock = f"{tmp_path}/admin{i}.sock"
        lb, (port,) = start_fastlb(procs, lb_config(etcd, sock, policy))
        out.append((lb, port, AdminClient(socket_path=sock, timeout=20)))
    return out


def test_two_balancers_converge_and_agree_under_maglev(procs, etcd, tmp_path):
    ports = {}
    for n in "abcd":
        _, ports[n] = start_backend(procs, "announce", name=n)
    for n in "abc":
        etcd.put(key("app", ports[n]), {})
    (_, p1, a1), (_, p2, a2) = two_balancers(procs, etcd, tmp_path, "maglev")
    sources = [f"127.0.0.{x}" for x in range(2, 42)]

    def picks(port):
        return [name_of(port, s) for s in sources]
    first = picks(p1)
    assert first == picks(p2)
    assert len(set(first)) == 3                          # the clients spread over a, b, c
    addr = {n: f"127.0.0.1:{p}" for n, p in ports.items()}
    for change, want in ((lambda: etcd.put(key("app", ports["d"]), {"weight": 2}), "abcd"),
                         (lambda: etcd.delete(key("app", ports["a"])), "bcd")):
        change()
        t0 = time.monotonic()
        wait_for(lambda w=want: set(backends(a1)) == set(backends(a2)) == {addr[n] for n in w},
                 timeout=5, what="both balancers to see the change")
        converged = time.monotonic() - t0
        print(f"converged in {converged * 1000:.0f} ms")
        assert converged < 1.0, f"converged in {converged:.3f}s"
        assert picks(p1) == picks(p2)
    assert "a" not in picks(p1)


def test_admin_changes_written_through_etcd_conflict_refused(procs, etcd, tmp_path):
    _, pa = start_backend(procs, "announce", name="a")
    _, pb = start_backend(procs, "announce", name="b")
    etcd.put(key("app", pa), {"weight": 1, "zone": "x"})
    etcd.put(key("app", pb), {})
    (_, p1, a1), (_, p2, a2) = two_balancers(procs, etcd, tmp_path)
    addr = f"127.0.0.1:{pa}"
    a1.call("set_weight", service="app", address=addr, weight=5)
    assert etcd.get(key("app", pa)) == {"weight": 5, "zone": "x"}     # other fields kept
    wait_for(lambda: backends(a2)[addr] == (5, "ready"), what="the weight on the other balancer")
    a2.call("set_state", service="app", address=addr, state="maint")
    wait_for(lambda: backends(a1)[addr] == (5, "maint"), what="maint on the first balancer")
    wait_for(lambda: names(p1) == {"b"} and names(p2) == {"b"})
    a1.call("set_state", service="app", address=addr, state="ready")
    with pytest.raises(AdminError) as e:                 # etcd owns the member list
        a1.call("remove_backend", service="app", address=addr)
    assert e.value.code == "etcd_managed"
    # Concurrent writes of the same key from both balancers: each compares the revision it
    # saw; when both saw the same one, exactly one wins and the other is refused.
    conflicts = 0
    for rnd in range(30):
        results: dict[int, object] = {}
        wait_for(lambda: backends(a1) == backends(a2))
        go = threading.Barrier(2)

        def send(i, admin, weight, results=results, go=go):
            go.wait()
            try:
                results[i] = admin.call("set_weight", service="app", address=addr, weight=weight)
            except AdminError as exc:
                results[i] = exc
        ts = [threading.Thread(target=send, args=(i, a, 10 + 2 * rnd + i)) for i, a in ((0, a1), (1, a2))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(20)
        errors = [r for r in results.values() if isinstance(r, AdminError)]
        assert len(errors) < 2                          # never both refused
        if errors:
            assert errors[0].code == "conflict" and "nothing changed" in errors[0].message
            winner = next(10 + 2 * rnd + i for i, r in results.items() if not isinstance(r, AdminError))
            assert etcd.get(key("app", pa))["weight"] == winner
            wait_for(lambda w=winner: backends(a1)[addr][0] == w == backends(a2)[addr][0],
                     what="both balancers on the winner's weight")
            conflicts += 1
            if conflicts >= 2:
                break
    print(f"{conflicts} conflict(s) in {rnd + 1} round(s)")
    assert conflicts >= 1, "no concurrent write was ever refused"


def test_registered_instance_vanishes_when_its_lease_expires(procs, etcd, tmp_path):
    _, pa = start_backend(procs, "announce", name="a")
    _, pb = start_backend(procs, "announce", name="b")
    etcd.put(key("app", pa), {})
    lb, (port,) = start_fastlb(procs, lb_config(etcd, f"{tmp_path}/admin.sock"))
    reg = Proc([PY, "-m", "fastlb", "register", "--etcd", etcd.url, "--ttl", "2s", "--weight", "3",
                "app", f"127.0.0.1:{pb}"], procs)
    reg.wait_line(r"registered /fastlb/services/app/127\.0\.0\.1:\d+ with lease")
    wait_for(lambda: names(port) == {"a", "b"}, what="the registered instance")
    time.sleep(3)                                        # renewed past its TTL
    assert names(port) == {"a", "b"}
    reg.stop()                                           # SIGKILL: no deregistration, no renewal
    t0 = time.monotonic()
    wait_for(lambda: names(port) == {"a"}, timeout=10, what="the lease to expire")
    assert time.monotonic() - t0 < 2 + 2.5               # TTL + etcd's expiry sweep + the watch
    # SIGTERM: the helper revokes its lease, the key goes at once
    reg2 = Proc([PY, "-m", "fastlb", "register", "--etcd", etcd.url, "--ttl", "30s",
                 "app", f"127.0.0.1:{pb}"], procs)
    reg2.wait_line(r"registered")
    wait_for(lambda: names(port) == {"a", "b"})
    reg2.signal(signal.SIGTERM)
    reg2.wait_line(r"deregistered")
    wait_for(lambda: names(port) == {"a"}, timeout=3, what="deregistration")
