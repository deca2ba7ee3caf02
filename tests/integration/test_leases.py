"""Self-registration with leases (issue 13, part 1), end to end: real `fastlb run`, real
backends and admin connections on loopback, `fastlb ctl`, `fastlb register` and
`fastlb.Registration`. Every test here fails on the code before leases (no register op)."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import pytest

import fastlb
from fastlb.admin.client import AdminClient, AdminError
from fastlb.leases import SWEEP_INTERVAL
from helpers import PY, Proc, free_port, names_of, service, start_backend, start_fastlb

OPERATOR = "op-" + "o" * 41
WEB_TOKEN = "web-" + "w" * 40
API_TOKEN = "api-" + "a" * 40


def token_file(tmp_path, name: str, token: str) -> str:
    path = tmp_path / name
    path.write_text(token + "\n")
    path.chmod(0o600)
    return str(path)


def config(tmp_path, aport: int, backend: int, state: bool = True, web_port: int = 0) -> str:
    g = (f'[global]\nadmin = "tcp:127.0.0.1:{aport}"\n'
         f'admin_token_file = "{token_file(tmp_path, "operator", OPERATOR)}"\n')
    if state:
        g += f'state_file = "{tmp_path}/state"\n'
    web = token_file(tmp_path, "web.token", WEB_TOKEN)
    api = token_file(tmp_path, "api.token", API_TOKEN)
    return (g + service("web", [(backend, 1)], listen=f"127.0.0.1:{web_port}",
                        registration=f'{{ token_file = "{web}", max_ttl = "30s" }}')
            + service("api", [(backend, 1)], registration=f'{{ token_file = "{api}" }}')
            + service("plain", [(backend, 1)]))


class Setup:
    def __init__(self, procs, tmp_path, state: bool = True) -> None:
        self.procs, self.tmp_path = procs, tmp_path
        _, self.a = start_backend(procs, "announce", name="a")
        _, self.b = start_backend(procs, "announce", name="b")
        self.aport = free_port()
        self.web_port = free_port()
        self.text = config(tmp_path, self.aport, self.a, state, self.web_port)
        self.start()

    def start(self) -> None:
        self.lb, _ = start_fastlb(self.procs, self.text)

    def restart(self, pause: float = 0.0) -> None:
        os.kill(self.lb.pid, signal.SIGTERM)
        self.lb.popen.wait(20)
        time.sleep(pause)
        self.start()

    def client(self, token: str = OPERATOR) -> AdminClient:
        return AdminClient(tcp=("127.0.0.1", self.aport), token=token, timeout=20)

    def backends(self, svc: str = "web") -> dict[str, dict]:
        with self.client() as c:
            return {b["address"]: b for b in c.call("backends", service=svc)}

    @property
    def b_addr(self) -> str:
        return f"127.0.0.1:{self.b}"

    def serves(self) -> set[str]:
        return set(names_of(self.web_port, 8))


def wait_for(cond, limit: float = 15.0, step: float = 0.1):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if (v := cond()):
            return v
        time.sleep(step)
    raise AssertionError("condition not met within the limit")


@pytest.fixture
def lb(procs, tmp_path):
    return Setup(procs, tmp_path)


def test_register_renew_deregister_and_traffic(lb):
    with lb.client(WEB_TOKEN) as c:
        res = c.call("register", service="web", address=lb.b_addr, ttl=10, weight=2,
                     metadata={"zone": "z1"})
        lease = res["lease"]
        assert res["service"] == "web" and res["ttl"] == 10
        info = lb.backends()[lb.b_addr]
        assert info["lease"] == lease and info["weight"] == 2 and info["metadata"] == {"zone": "z1"}
        assert 0 < info["expires_in"] <= 10
        wait_for(lambda: lb.serves() == {"a", "b"})           # traffic reaches the registered one
        assert c.call("renew", lease=lease) == {"lease": lease, "ttl": 10}
        out = c.call("deregister", lease=lease)
        assert out["address"] == lb.b_addr
        assert lb.b_addr not in lb.backends()
        assert lb.serves() == {"a"}                            # no new connection goes there
        with pytest.raises(AdminError) as err:
            c.call("renew", lease=lease)
        assert err.value.code == "unknown_lease"
    lb.lb.wait_line(r"audit: tcp 127\.0\.0\.1:\d+ \(registration token of web\): register "
                    rf"service=web address=127\.0\.0\.1:{lb.b} .*-> ok generation=\d+")
    lb.lb.wait_line(r"audit: .*\(registration token of web\): deregister lease=l[0-9a-f]+ -> ok")


def test_a_lease_not_renewed_expires_within_ttl_and_a_sweep(lb):
    with lb.client(WEB_TOKEN) as c:
        kept = c.call("register", service="web", address=lb.b_addr, ttl=1)["lease"]
        t0 = time.monotonic()
        # renewed every 0.3 s for 2.5 s: still there (renewals work, the sweep spares it)
        while time.monotonic() - t0 < 2.5:
            c.call("renew", lease=kept)
            time.sleep(0.3)
        assert lb.b_addr in lb.backends()
        assert "b" in wait_for(lambda: lb.serves() if "b" in lb.serves() else None)
        t1 = time.monotonic()
        c.call("renew", lease=kept)
        # not renewed any more: gone within TTL + one sweep (+ slack for a loaded machine)
        wait_for(lambda: lb.b_addr not in lb.backends(), limit=1 + SWEEP_INTERVAL + 3, step=0.05)
        assert time.monotonic() - t1 >= 1.0 - 0.05              # not before its TTL
    assert lb.serves() == {"a"}                                # traffic stops reaching it
    lb.lb.wait_line(rf"audit: lease expiry: deregister lease={kept} service=web "
                    rf"address=127\.0\.0\.1:{lb.b} ttl=1.0 -> ok generation=\d+")


def test_a_registration_token_is_scoped_to_its_service_and_ops(lb):
    def code(client, op, **fields):
        with pytest.raises(AdminError) as err:
            client.call(op, **fields)
        return err.value.code, err.value.message

    with lb.client(API_TOKEN) as api:
        api_lease = api.call("register", service="api", address=lb.b_addr, ttl=10)["lease"]
    with lb.client(WEB_TOKEN) as web:
        assert web.call("ping") == "pong"
        c, msg = code(web, "register", service="api", address=lb.b_addr, ttl=5)
        assert c == "forbidden" and "cannot register into service 'api'" in msg
        assert code(web, "register", service="plain", address=lb.b_addr, ttl=5)[0] == "forbidden"
        assert code(web, "renew", lease=api_lease)[0] == "forbidden"
        assert code(web, "deregister", lease=api_lease)[0] == "forbidden"
        for op, fields in [("stats", {}), ("backends", {"service": "web"}), ("services", {}),
                           ("add_backend", {"service": "web", "address": lb.b_addr}),
                           ("remove_backend", {"service": "web", "address": f"127.0.0.1:{lb.a}"}),
                           ("set_weight", {"service": "web", "address": f"127.0.0.1:{lb.a}", "weight": 9}),
                           ("reload", {}), ("subscribe", {}), ("workers", {})]:
            c, msg = code(web, op, **fields)
            assert c == "forbidden" and "needs the operator token" in msg, op
        # bounds of its own service: max_ttl, metadata size
        c, msg = code(web, "register", service="web", address=lb.b_addr, ttl=31)
        assert c == "ttl_too_long" and "registration.max_ttl (30 s)" in msg
        assert code(web, "register", service="web", address=lb.b_addr, ttl=5,
                    metadata={"k": "v" * 600})[0] == "bad_request"
        # a backend from the config cannot be taken over by a registration
        assert code(web, "register", service="web", address=f"127.0.0.1:{lb.a}", ttl=5)[0] == "exists"
    # nothing changed: the api lease is alive, web has its configured backend only
    assert lb.backends("api")[lb.b_addr]["lease"] == api_lease
    assert set(lb.backends("web")) == {f"127.0.0.1:{lb.a}"}
    with lb.client() as op:                                  # the operator can do everything...
        assert op.call("renew", lease=api_lease)["lease"] == api_lease
        # ...but a service without a registration table takes none
        assert code(op, "register", service="plain", address=lb.b_addr, ttl=5)[0] == \
            "registration_disabled"
        op.call("deregister", lease=api_lease)
    lb.lb.wait_line(r"audit: .*\(registration token of web\): stats -> error forbidden")


def test_leases_survive_a_restart_with_a_grace_of_one_ttl(lb):
    with lb.client(WEB_TOKEN) as c:
        renewed = c.call("register", service="web", address=lb.b_addr, ttl=2)["lease"]
    t0 = time.monotonic()
    lb.restart(pause=2.5)                  # down longer than the TTL: its deadline has passed
    assert time.monotonic() - t0 > 2
    info = lb.backends()[lb.b_addr]
    assert info["lease"] == renewed                          # from the state file, with a grace
    assert "b" in wait_for(lambda: lb.serves() if "b" in lb.serves() else None)
    lb.lb.wait_line(r"leases: 1 restored from the state file")
    with lb.client(WEB_TOKEN) as c:
        assert c.call("renew", lease=renewed)["lease"] == renewed     # renewable after restart
    # not renewed again: expires one TTL (+ a sweep) after its last renewal
    wait_for(lambda: lb.b_addr not in lb.backends(), limit=2 + SWEEP_INTERVAL + 3)
    lb.lb.wait_line(rf"audit: lease expiry: deregister lease={renewed}")


def test_fastlb_register_re_registers_after_a_restart_and_deregisters_on_sigterm(procs, tmp_path):
    lb = Setup(procs, tmp_path, state=False)                 # a restart forgets every lease
    helper = Proc([PY, "-m", "fastlb", "register", "web", lb.b_addr, "--ttl", "3s",
                   "--tcp", f"127.0.0.1:{lb.aport}", "--token-file", str(tmp_path / "web.token")],
                  procs)
    helper.wait_line(r"registered 127\.0\.0\.1:\d+ in service web: lease (l[0-9a-f]+)")
    first = lb.backends()[lb.b_addr]["lease"]
    lb.restart()
    assert lb.b_addr not in lb.backends() or lb.backends()[lb.b_addr]["lease"] != first
    lease = wait_for(lambda: lb.backends().get(lb.b_addr, {}).get("lease"), limit=15)
    assert lease != first
    helper.wait_line(rf"lease {first} of 127\.0\.0\.1:{lb.b} lost .*registering again")
    os.kill(helper.pid, signal.SIGTERM)
    assert helper.popen.wait(10) == 0
    helper.wait_line(rf"deregistered 127\.0\.0\.1:{lb.b} from service web \(lease {lease}\)")
    assert lb.b_addr not in lb.backends()


def test_ctl_register_renew_deregister(lb, tmp_path):
    base = [PY, "-m", "fastlb", "ctl", "--tcp", f"127.0.0.1:{lb.aport}",
            "--token-file", str(tmp_path / "web.token")]

    def ctl(*args):
        return subprocess.run(base + list(args), capture_output=True, text=True, timeout=60)

    out = ctl("register", "web", lb.b_addr, "--ttl", "10s", "--weight", "3")
    assert out.returncode == 0, out.stderr
    lease = out.stdout.strip()
    assert lease.startswith("l") and lb.backends()[lb.b_addr]["weight"] == 3
    assert ctl("renew", lease).returncode == 0
    assert ctl("deregister", lease).returncode == 0
    assert lb.b_addr not in lb.backends()
    bad = ctl("renew", lease)
    assert bad.returncode == 1 and "unknown_lease" in bad.stderr


def test_python_registration_api(lb):
    async def main() -> tuple[str, bool, bool]:
        async with fastlb.Registration("web", lb.b_addr, ttl=1.5, tcp=("127.0.0.1", lb.aport),
                                       token=WEB_TOKEN, metadata={"v": "1"}) as reg:
            assert reg.lease is not None
            await asyncio.sleep(3.5)          # past two TTLs: the renewals keep it
            held = (await asyncio.to_thread(lb.backends)).get(lb.b_addr, {}).get("lease")
            present = held == reg.lease and reg.registrations == 1
            lease = reg.lease
        gone = lb.b_addr not in await asyncio.to_thread(lb.backends)
        return lease, present, gone

    lease, present, gone = asyncio.run(main())
    assert present and gone
    lb.lb.wait_line(rf"deregister lease={lease} -> ok")


def test_health_checks_apply_to_registered_backends(procs, tmp_path):
    from helpers import closed_port
    _, a = start_backend(procs, "announce", name="a")
    aport, port = free_port(), free_port()
    text = (f'[global]\nadmin = "tcp:127.0.0.1:{aport}"\n'
            f'admin_token_file = "{token_file(tmp_path, "operator", OPERATOR)}"\n'
            + service("web", [(a, 1)], listen=f"127.0.0.1:{port}",
                      health='{ interval = "100ms", timeout = "100ms", rise = 1, fall = 1 }',
                      registration="{ max_ttl = \"30s\" }"))
    lb, _ = start_fastlb(procs, text)
    dead = f"127.0.0.1:{closed_port()}"
    with AdminClient(tcp=("127.0.0.1", aport), token=OPERATOR, timeout=20) as c:
        c.call("register", service="web", address=dead, ttl=30)

        def health() -> str:
            return {b["address"]: b for b in c.call("backends", service="web")}[dead]["health"]
        wait_for(lambda: health() == "down")
        # checked down: no client is sent to it (every connection reaches a)
        assert set(names_of(port, 10)) == {"a"}
        # the same holds for a backend the operator adds (it was never checked before)
        dead2 = f"127.0.0.1:{closed_port()}"
        c.call("add_backend", service="web", address=dead2)
        wait_for(lambda: {b["address"]: b for b in c.call("backends", service="web")}[dead2]
                 ["health"] == "down")
        assert set(names_of(port, 10)) == {"a"}


def test_a_reload_rotates_registration_tokens_and_refuses_a_bad_one(lb, tmp_path):
    new = "web-new-" + "n" * 36
    token_file(tmp_path, "web.token", new)
    with lb.client() as op:
        op.call("reload")
        with lb.client(new) as c:
            c.call("register", service="web", address=lb.b_addr, ttl=5)
        old = lb.client(WEB_TOKEN)
        with pytest.raises(AdminError) as err:
            old.call("ping")
        assert err.value.code == "unauthorized"
        old.close()
        (tmp_path / "web.token").chmod(0o644)              # open to others: refused
        with pytest.raises(AdminError) as err:
            op.call("reload")
        assert err.value.code == "invalid" and "registration.token_file" in err.value.message
        assert "chmod 600" in err.value.message
