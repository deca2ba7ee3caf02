"""The pure parts of self-registration (issue 13, part 1): the lease table and its rules, the
registration config table, the admin protocol's new ops, the state file's version 3, ttl text.
Each fails on the code before leases (the modules, ops, keys and version did not exist)."""
from __future__ import annotations

import pytest

from fastlb import config, leases, stateformat
from fastlb.admin import protocol
from fastlb.errors import AdminProtocolError, ConfigError, RegistryError
from fastlb.register import parse_ttl


def svc_table(**extra) -> dict:
    return {"name": "web", "listen": "127.0.0.1:0",
            "backends": [{"address": "127.0.0.1:8001"}, {"address": "127.0.0.1:8002"}], **extra}


SERVICES = {"web": config.service_from_dict(svc_table(), "service")}


def test_register_renew_expire_and_replace():
    t = leases.LeaseTable()
    lease = t.plan("web", "127.0.0.1:8001", 2, 10.0, {"zone": "a"}, max_ttl=60.0, scope=None)
    assert len(lease.id) == 31 and lease.id.startswith("l")
    assert len(t) == 0                                     # plan changes nothing
    t.add(lease, now=100.0)
    assert t.of_backend("web", "127.0.0.1:8001") == lease
    assert t.expired(109.9) == [] and t.expired(110.0) == [lease]
    t.renew(lease.id, 105.0, scope="web")
    assert t.expired(114.9) == [] and t.expired(115.0) == [lease]
    again = t.plan("web", "127.0.0.1:8001", 1, 5.0, {}, max_ttl=60.0, scope=None)
    assert t.add(again, 120.0) == lease                    # a re-registration replaces it
    assert t.of_backend("web", "127.0.0.1:8001") == again and len(t) == 1
    with pytest.raises(RegistryError) as err:
        t.renew(lease.id, 121.0, None)
    assert err.value.code == "unknown_lease"
    t.closing.add(again.id)                                # being removed: no renewal
    assert t.expired(1000.0) == []
    with pytest.raises(RegistryError):
        t.renew(again.id, 121.0, None)


def test_plan_refusals():
    t = leases.LeaseTable()
    codes = []
    for kw in [dict(max_ttl=None, scope=None), dict(max_ttl=5.0, scope=None),
               dict(max_ttl=60.0, scope="api")]:
        with pytest.raises(RegistryError) as err:
            t.plan("web", "127.0.0.1:8001", 1, 10.0, {}, **kw)
        codes.append(err.value.code)
    assert codes == ["registration_disabled", "ttl_too_long", "forbidden"]
    lease = t.plan("api", "127.0.0.1:1", 1, 10.0, {}, max_ttl=60.0, scope=None)
    t.add(lease, 0.0)
    with pytest.raises(RegistryError) as err:
        t.get(lease.id, "web")
    assert err.value.code == "forbidden"


def test_the_cap_per_service(monkeypatch):
    monkeypatch.setattr(leases, "MAX_LEASES_PER_SERVICE", 2)
    t = leases.LeaseTable()
    for port in (1, 2):
        t.add(t.plan("web", f"127.0.0.1:{port}", 1, 5.0, {}, max_ttl=60.0, scope=None), 0.0)
    with pytest.raises(RegistryError) as err:
        t.plan("web", "127.0.0.1:3", 1, 5.0, {}, max_ttl=60.0, scope=None)
    assert err.value.code == "too_many_leases"
    t.plan("web", "127.0.0.1:2", 1, 5.0, {}, max_ttl=60.0, scope=None)   # replacing: allowed
    t.plan("api", "127.0.0.1:3", 1, 5.0, {}, max_ttl=60.0, scope=None)   # another service


def test_wire_restore_grace_and_orphans():
    t = leases.LeaseTable()
    a = t.plan("web", "127.0.0.1:8001", 1, 4.0, {"k": "v"}, max_ttl=60.0, scope=None)
    ghost = t.plan("web", "127.0.0.1:9999", 1, 4.0, {}, max_ttl=60.0, scope=None)
    t.add(a, 0.0)
    t.add(ghost, 0.0)
    wire = t.wire(SERVICES)
    assert [w["id"] for w in wire] == [a.id]               # its backend is gone: not persisted
    assert t.orphans(SERVICES) == [ghost]
    assert t.wire(SERVICES, drop=[a.id]) == []
    b = t.plan("web", "127.0.0.1:8002", 1, 3.0, {}, max_ttl=60.0, scope=None)
    assert {w["id"] for w in t.wire(SERVICES, adds=[b])} == {a.id, b.id}
    fresh = leases.LeaseTable()
    assert fresh.restore(t.wire(SERVICES, adds=[b]) + [ghost.to_wire()], SERVICES, 500.0) == (2, 1)
    assert fresh.expired(503.9) == [fresh.leases[b.id]]   # one TTL from the restart
    assert fresh.expired(502.9) == []
    assert fresh.leases[a.id].metadata == {"k": "v"}


def test_without_removes_the_backends_of_leases():
    t = leases.LeaseTable()
    a = t.plan("web", "127.0.0.1:8001", 1, 4.0, {}, max_ttl=60.0, scope=None)
    gone = t.plan("nope", "127.0.0.1:1", 1, 4.0, {}, max_ttl=60.0, scope=None)
    out = leases.without(SERVICES, [a, gone])
    assert [b.address.text for b in out["web"].backends] == ["127.0.0.1:8002"]
    assert SERVICES["web"].backends[0].address.text == "127.0.0.1:8001"     # not mutated


@pytest.mark.parametrize("meta, words", [
    ({f"k{i}": "v" for i in range(33)}, "33 keys; at most 32"),
    ({"k": 1}, "must be strings"),
    ({"": "v"}, "keys are 1-64 characters"),
    ({"k": "v" * 513}, "values at most 512"),
    ({f"k{i}": "v" * 200 for i in range(25)}, "at most 4096"),
])
def test_metadata_limits(meta, words):
    with pytest.raises(AdminProtocolError, match=words):
        leases.check_metadata("register", meta)


def test_protocol_register_ops():
    req = protocol.parse_request({"id": 1, "op": "register", "service": "web",
                                  "address": "127.0.0.1:1", "ttl": 10, "metadata": {"a": "b"}})
    assert req.args["ttl"] == 10 and req.scope is None
    for bad, words in [({"ttl": 0.5}, "ttl 0.5 out of range"), ({"ttl": "10s"}, "must be a number"),
                       ({"ttl": 5, "weight": 0}, "weight 0 out of range"),
                       ({"ttl": 5, "metadata": {"k": "v" * 600}}, "values at most 512")]:
        with pytest.raises(AdminProtocolError, match=words) as err:
            protocol.parse_request({"id": 2, "op": "register", "service": "web",
                                    "address": "127.0.0.1:1", **bad})
        assert err.value.id == 2
    with pytest.raises(AdminProtocolError, match="1-64 characters"):
        protocol.parse_request({"id": 3, "op": "renew", "lease": "x" * 65})
    assert protocol.SCOPED_OPS == {"ping", "register", "renew", "deregister"}
    assert {"register", "deregister"} <= protocol.CHANGES and "renew" not in protocol.CHANGES


def test_registration_config_and_round_trip():
    svc = config.service_from_dict(svc_table(registration={"token_file": "/t", "max_ttl": "2m"}),
                                   "service")
    assert svc.registration == config.Registration("/t", 120.0)
    assert config.service_from_dict(config.service_to_dict(svc), "s") == svc
    assert config.service_from_dict(svc_table(registration={}), "s").registration.max_ttl == 60.0
    for bad, words in [({"max_ttl": "0.5s"}, "service.registration.max_ttl"),
                       ({"token": "/t"}, "service.registration.token: unknown key"),
                       ({"token_file": 3}, "service.registration.token_file")]:
        with pytest.raises(ConfigError, match=words):
            config.service_from_dict(svc_table(registration=bad), "service")


def test_state_file_version_3_holds_leases_and_2_still_reads():
    t = leases.LeaseTable()
    lease = t.plan("web", "127.0.0.1:8001", 3, 7.0, {"z": "1"}, max_ttl=60.0, scope=None)
    raw = stateformat.encode(SERVICES, SERVICES, [lease.to_wire()])
    assert raw[15] == 3
    registry, cfg, wire = stateformat.decode_all(raw)
    assert registry == SERVICES and wire == [lease.to_wire()]
    assert stateformat.decode(raw) == (SERVICES, SERVICES)
    import hashlib
    import msgpack
    body = msgpack.packb({"registry": [config.service_to_dict(s) for s in SERVICES.values()],
                          "config": []})
    head = stateformat._HEAD.pack(stateformat.MAGIC, 2, len(body))
    v2 = head + hashlib.sha256(head + body).digest() + body
    assert stateformat.decode_all(v2)[2] == []
    bad = stateformat.encode(SERVICES, SERVICES, [{"id": 1}])
    with pytest.raises(stateformat.Unusable, match="leases"):
        stateformat.decode_all(bad)


def test_read_tokens(tmp_path):
    def tok(name, text, mode=0o600):
        p = tmp_path / name
        p.write_text(text)
        p.chmod(mode)
        return str(p)

    def svc(name, path):
        return config.service_from_dict({**svc_table(registration={"token_file": path}),
                                         "name": name}, "s")

    good, other = tok("a", "a" * 40), tok("b", "b" * 40)
    tokens, problems = leases.read_tokens([svc("web", good), svc("api", other)], "o" * 40)
    assert tokens == {"web": "a" * 40, "api": "b" * 40} and problems == []
    from fastlb.errors import FastLBError
    with pytest.raises(FastLBError, match="service 'api': registration.token_file: .*same token"):
        leases.read_tokens([svc("web", good), svc("api", tok("c", "a" * 40))], None)
    with pytest.raises(FastLBError, match="operator's token"):
        leases.read_tokens([svc("web", good)], "a" * 40)
    tokens, problems = leases.read_tokens([svc("web", tok("d", "a" * 40, 0o644))], None,
                                          strict=False)
    assert tokens == {} and "chmod 600" in problems[0]


def test_parse_ttl():
    assert parse_ttl("10s") == 10.0 and parse_ttl("1m") == 60.0 and parse_ttl("2.5") == 2.5
    assert parse_ttl("500ms") == 0.5
    with pytest.raises(ValueError, match="expected a duration"):
        parse_ttl("ten")
