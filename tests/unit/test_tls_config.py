"""[tls] The config keys of TLS termination (service.tls, timeouts.handshake): parsed,
round-tripped through service_to_dict, carried in the plan (wire round trip), built into the
core's TlsContext; a bad certificate or key refused naming the key path."""
import dataclasses

import msgpack
import pytest

from fastlb import _core, config, dataplane
from fastlb.errors import ConfigError, CoreArgumentError, RegistryError
from fastlb.plan import Plan
from fastlb.runtime import compute_plan

trustme = pytest.importorskip("trustme")

HEAD = "[[service]]\nname = 'a'\nlisten = '127.0.0.1:1'\nbackends = [ { address = '127.0.0.1:10' } ]\n"


@pytest.fixture
def certs(tmp_path):
    ca = trustme.CA()
    out = {}
    for name, hosts in (("a", ["a.example.com"]), ("b", ["*.b.example.com", "b.example.com"])):
        leaf = ca.issue_cert(*hosts)
        (tmp_path / f"{name}.crt").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
        (tmp_path / f"{name}.key").write_bytes(leaf.private_key_pem.bytes())
        out[name] = (str(tmp_path / f"{name}.crt"), str(tmp_path / f"{name}.key"))
    return out


def load(text, tmp_path):
    path = tmp_path / "fastlb.toml"
    path.write_text(text)
    return config.load(str(path))


def test_every_key_parsed_round_tripped_planned_and_built(certs, tmp_path):
    (a_crt, a_key), (b_crt, b_key) = certs["a"], certs["b"]
    text = HEAD + (f'tls = {{ certs = [{{ cert = "{a_crt}", key = "{a_key}" }}, '
                   f'{{ cert = "b.crt", key = "b.key" }}], min_version = "1.3", alpn = ["h2"] }}\n'
                   'timeouts = { handshake = "2500ms" }\n')
    svc = load(text, tmp_path).services[0]                # b.*: relative to the config's dir
    t = svc.tls
    assert t.certs == ((a_crt, a_key), ("b.crt", "b.key")) and t.min_version == "1.3"
    assert t.alpn == ("h2",) and t.handshake == 2.5
    assert t.pems[1][0] == open(b_crt, "rb").read()
    again = config.service_from_dict(config.service_to_dict(
        dataclasses.replace(svc, tls=dataclasses.replace(t, certs=((a_crt, a_key), (b_crt, b_key))))), "x")
    assert again.tls.pems == t.pems and again.tls.handshake == 2.5
    plan = compute_plan(svc, lambda k: 0, lambda s: True, {}, 0.0)
    assert plan.tls_certs == t.pems and plan.tls_handshake == 2.5
    wire = msgpack.unpackb(msgpack.packb(plan.to_wire(), use_bin_type=True), raw=False)
    assert Plan.from_wire(wire) == plan
    ctx = dataplane.build_tls(plan)
    assert ctx.names == (("a.example.com",), ("*.b.example.com", "b.example.com"))
    assert [ctx.pick(n) for n in ("a.example.com", "x.b.example.com", "b.example.com", "zz")] == [0, 1, 1, 0]
    assert (ctx.min_version, ctx.alpn, ctx.handshake_timeout) == ("1.3", ("h2",), 2.5)


def test_mtls_keys_round_trip_and_build(certs, tmp_path):
    crt, key = certs["a"]
    text = HEAD + (f'tls = {{ cert = "{crt}", key = "{key}", client_ca = "{crt}", '
                   f'verify_client = "optional" }}\n'
                   'authz = { identities = ["spiffe://corp/*", "dns:api.internal", "cn:ops"] }\n')
    svc = load(text, tmp_path).services[0]
    t = svc.tls
    assert (t.client_ca, t.verify_client) == (crt, "optional") and t.ca_pem == open(crt, "rb").read()
    assert t.identities == ("spiffe://corp/*", "dns:api.internal", "cn:ops")
    assert config.service_from_dict(config.service_to_dict(svc), "x") == svc
    plan = compute_plan(svc, lambda k: 0, lambda s: True, {}, 0.0)
    wire = msgpack.unpackb(msgpack.packb(plan.to_wire(), use_bin_type=True), raw=False)
    assert Plan.from_wire(wire) == plan and plan.tls_identities == t.identities
    ctx = dataplane.build_tls(plan)
    assert (ctx.verify_client, ctx.identities) == ("optional", t.identities)
    with pytest.raises(CoreArgumentError, match="need tls.client_ca"):
        _core.TlsContext(list(plan.tls_certs), identities=["cn:x"])


def test_defaults(certs, tmp_path):
    crt, key = certs["a"]
    svc = load(HEAD + f'tls = {{ cert = "{crt}", key = "{key}" }}\n', tmp_path).services[0]
    assert (svc.tls.min_version, svc.tls.alpn, svc.tls.handshake) == ("1.2", (), 10.0)
    plain = config.loads(HEAD).services[0]
    assert plain.tls is None and "tls" not in config.service_to_dict(plain)
    p = compute_plan(plain, lambda k: 0, lambda s: True, {}, 0.0)
    assert p.tls_certs == () and dataplane.build_tls(p) is None
    assert Plan.from_wire(p.to_wire()) == p


def bad_cases(certs, tmp_path):
    (a_crt, a_key), (_, b_key) = certs["a"], certs["b"]
    (tmp_path / "junk.crt").write_text("not a certificate\n")
    return [
        (f'tls = {{ cert = "{a_crt}", key = "{b_key}" }}', "service[0].tls.cert",
         "does not match the certificate"),
        (f'tls = {{ cert = "{tmp_path}/junk.crt", key = "{a_key}" }}', "service[0].tls.cert",
         "not a PEM certificate"),
        (f'tls = {{ cert = "{tmp_path}/none.crt", key = "{a_key}" }}', "service[0].tls.cert",
         "cannot read"),
        (f'tls = {{ cert = "{a_crt}" }}', "service[0].tls.key", "required key is missing"),
        (f'tls = {{ cert = "{a_crt}", key = "{a_key}", certs = [] }}', "service[0].tls",
         "either cert and key, or certs"),
        ('tls = { certs = [] }', "service[0].tls.certs", "non-empty array"),
        (f'tls = {{ certs = [{{ cert = "{a_crt}", key = "{b_key}" }}] }}', "service[0].tls.certs[0].cert",
         "does not match"),
        (f'tls = {{ cert = "{a_crt}", key = "{a_key}", min_version = "1.1" }}',
         "service[0].tls.min_version", "not one of: 1.2, 1.3"),
        (f'tls = {{ cert = "{a_crt}", key = "{a_key}", alpn = "h2" }}', "service[0].tls.alpn",
         "expected an array"),
        (f'tls = {{ cert = "{a_crt}", key = "{a_key}", sni = 1 }}', "service[0].tls.sni", "unknown key"),
        ('timeouts = { handshake = "1s" }', "service[0].timeouts.handshake", "only meaningful with a tls"),
        # stage 2
        (f'tls = {{ cert = "{a_crt}", key = "{a_key}", client_ca = "{tmp_path}/none.pem" }}',
         "service[0].tls.client_ca", "cannot read"),
        (f'tls = {{ cert = "{a_crt}", key = "{a_key}", client_ca = "{tmp_path}/junk.crt" }}',
         "service[0].tls.client_ca", "no PEM certificate"),
        (f'tls = {{ cert = "{a_crt}", key = "{a_key}", client_ca = "{a_crt}", verify_client = "yes" }}',
         "service[0].tls.verify_client", "not one of: required, optional"),
        (f'tls = {{ cert = "{a_crt}", key = "{a_key}", verify_client = "optional" }}',
         "service[0].tls.verify_client", "only meaningful with client_ca"),
        (f'tls = {{ cert = "{a_crt}", key = "{a_key}" }}\nauthz = {{ identities = ["cn:x"] }}',
         "service[0].authz", "needs tls.client_ca"),
        ('authz = { identities = ["cn:x"] }', "service[0].authz", "needs tls with client_ca"),
        (f'tls = {{ cert = "{a_crt}", key = "{a_key}", client_ca = "{a_crt}" }}\n'
         'authz = { identities = [] }',
         "service[0].authz.identities", "non-empty array"),
        (f'tls = {{ cert = "{a_crt}", key = "{a_key}", client_ca = "{a_crt}" }}\n'
         'authz = { ids = [] }',
         "service[0].authz.ids", "unknown key"),
    ]


def test_bad_tls_keys_name_the_key_path_and_expectation(certs, tmp_path):
    for line, path, message in bad_cases(certs, tmp_path):
        with pytest.raises(ConfigError) as e:
            load(HEAD + line + "\n", tmp_path)
        assert path in str(e.value) and message in str(e.value), (line, str(e.value))


def test_the_core_refuses_bad_contexts_and_check_plan_names_the_service(certs):
    crt, key = (open(p, "rb").read() for p in certs["a"])
    other_key = open(certs["b"][1], "rb").read()
    with pytest.raises(CoreArgumentError, match="does not match"):
        _core.TlsContext([(crt, other_key)])
    with pytest.raises(CoreArgumentError, match="min_version"):
        _core.TlsContext([(crt, key)], min_version="1.0")
    with pytest.raises(CoreArgumentError, match="alpn"):
        _core.TlsContext([(crt, key)], alpn=["x" * 300])
    plan = Plan("web", (), "round_robin", 0, 2, 1.0, 1.0, 0, False, (), (),
                tls_certs=((crt, other_key),))
    with pytest.raises(RegistryError, match="service web: tls: certificate 1"):
        dataplane.check_plan(plan)
