"""[access] The config keys of ACLs, per-source limits, PROXY protocol and client_first_byte,
their plan fields (wire round trip) and the core's Admission built from them."""
import dataclasses

import msgpack
import pytest

from fastlb import _core, config, dataplane
from fastlb.errors import ConfigError, CoreArgumentError
from fastlb.plan import Plan
from fastlb.runtime import compute_plan

HEAD = "[[service]]\nname = 'a'\nlisten = '127.0.0.1:1'\n"

FULL = HEAD + """acl = { allow = ["10.0.0.0/8", "::1/128"], deny = ["10.1.0.0/16"] }
limits = { per_source_conns = 3, per_source_rate = "5/s", burst = 2 }
proxy_protocol = { accept_from = ["127.0.0.2"], timeout = "2s", send = "v2" }
timeouts = { client_first_byte = "1500ms" }
backends = [ { address = "127.0.0.1:10", proxy_protocol = "v1" }, { address = "127.0.0.1:11" },
             { address = "127.0.0.1:12", state = "drain" } ]
"""


def test_every_key_parsed_and_round_tripped_through_service_to_dict():
    svc = config.loads(FULL).services[0]
    a = svc.access
    assert a.acl_allow == ("10.0.0.0/8", "::1/128") and a.acl_deny == ("10.1.0.0/16",)
    assert (a.per_source_conns, a.per_source_rate, a.burst) == (3, 5, 2)
    assert a.pp_accept_from == ("127.0.0.2/32",) and a.pp_timeout == 2.0 and a.pp_send == "v2"
    assert a.client_first_byte == 1.5
    assert [b.proxy_protocol for b in svc.backends] == ["v1", None, None]
    assert config.service_from_dict(config.service_to_dict(svc), "x") == svc


def test_check_summary_names_the_access_rules():
    text = config.summary(config.loads(FULL))
    assert ("acl 2 allow / 1 deny; per source 3 conns, 5/s burst 2; PROXY from 1 CIDR(s) "
            "within 2s; PROXY v1/v2 to backends; client_first_byte 1.5s") in text
    assert "acl" not in config.summary(config.loads(HEAD))


def test_defaults_change_nothing():
    svc = config.loads(HEAD).services[0]
    assert svc.access == config.Access()
    assert "acl" not in config.service_to_dict(svc)
    assert config.loads(HEAD).global_.source_table_size == config.DEFAULT_SOURCE_TABLE


BAD = [
    ("acl = { allow = ['10.0.0.1/8'] }", "service[0].acl.allow[0]", 'did you mean "10.0.0.0/8"'),
    ("acl = { deny = ['nope'] }", "service[0].acl.deny[0]", "expected e.g."),
    ("acl = { deny = '10.0.0.0/8' }", "service[0].acl.deny", "expected an array of CIDRs"),
    ("acl = { deny = ['::ffff:10.0.0.0/104'] }", "service[0].acl.deny[0]", "write it as IPv4"),
    ("acl = { alow = [] }", "service[0].acl.alow", "did you mean 'allow'"),
    ("limits = { per_source_conns = 0 }", "service[0].limits.per_source_conns",
     "expected an integer from 1 to 65535"),
    ("limits = { per_source_rate = 5 }", "service[0].limits.per_source_rate", '"20/s"'),
    ("limits = { per_source_rate = '5/m' }", "service[0].limits.per_source_rate", '"20/s"'),
    ("limits = { burst = 3 }", "service[0].limits.burst", "only meaningful with per_source_rate"),
    ("proxy_protocol = { send = 'v3' }", "service[0].proxy_protocol.send", "not one of: v1, v2"),
    ("proxy_protocol = { timeout = '1s' }", "service[0].proxy_protocol.timeout",
     "only meaningful with accept_from"),
    ("proxy_protocol = { accept_from = ['127.0.0.1/33'] }",
     "service[0].proxy_protocol.accept_from[0]", "127.0.0.1/33"),
    ("timeouts = { client_first_byte = 'soon' }", "service[0].timeouts.client_first_byte",
     "expected a duration"),
    ("backends = [ { address = '127.0.0.1:2', proxy_protocol = 'v9' } ]",
     "service[0].backends[0].proxy_protocol", "not one of: v1, v2"),
]


@pytest.mark.parametrize("text,path,message", BAD)
def test_bad_access_keys_name_the_key_path_and_expectation(text, path, message):
    with pytest.raises(ConfigError) as info:
        config.loads(HEAD + text + "\n", source="bad.toml")
    assert info.value.path == path
    assert message in str(info.value)


@pytest.mark.parametrize("n", [1000, 8, 0, True, 1 << 25, "'big'"])
def test_source_table_size_must_be_a_power_of_two_in_range(n):
    text = f"[global]\nsource_table_size = {str(n).lower()}\n" + HEAD
    with pytest.raises(ConfigError, match="power of two") as info:
        config.loads(text)
    assert info.value.path == "global.source_table_size"
    good = "[global]\nsource_table_size = 1024\n" + HEAD
    assert config.loads(good).global_.source_table_size == 1024


def test_plan_fields_wire_round_trip_and_backend_versions_by_slot():
    svc = config.loads(FULL).services[0]
    slots = {"127.0.0.1:10": 4, "127.0.0.1:11": 5, "127.0.0.1:12": 6, "": 1}
    p = compute_plan(svc, slots.__getitem__, lambda s: True, {}, 0.0)
    assert p.pp_send == ((4, 1), (5, 2), (6, 2))        # own key wins, else the service's send
    assert (p.src_conns, p.src_rate, p.src_burst) == (3, 5, 2)
    assert p.acl_allow == svc.access.acl_allow and p.client_first_byte == 1.5
    wire = msgpack.unpackb(msgpack.packb(p.to_wire(), use_bin_type=True), raw=False)
    assert Plan.from_wire(wire) == p
    old = {k: v for k, v in p.to_wire().items() if k != "access"}     # an older supervisor
    assert Plan.from_wire(old).access_key() == Plan.from_wire(
        compute_plan(config.loads(HEAD).services[0], lambda a: 1, lambda s: True, {},
                     0.0).to_wire()).access_key()


def test_burst_defaults_to_one_second_of_the_rate():
    svc = config.loads(HEAD + "limits = { per_source_rate = '7/s' }\n").services[0]
    p = compute_plan(svc, lambda a: 1, lambda s: True, {}, 0.0)
    assert (p.src_rate, p.src_burst) == (7, 7)


def test_admission_built_only_when_something_is_configured_and_acls_reused():
    table = _core.SourceTable(bytearray(_core.SourceTable.size_for(16)), 16)
    svc = config.loads(FULL).services[0]
    p = compute_plan(svc, {"127.0.0.1:10": 4, "127.0.0.1:11": 5, "127.0.0.1:12": 6,
                           "": 1}.__getitem__, lambda s: True, {}, 0.0)
    cache: dict = {}
    adm = dataplane.build_admission(p, table, cache)
    assert adm.acl.admits("10.2.3.4") and not adm.acl.admits("10.1.2.3")
    assert adm.pp_from.admits("127.0.0.2") and not adm.pp_from.admits("127.0.0.3")
    assert [adm.pp_version(s) for s in (3, 4, 5, 6, 7, -1)] == [0, 1, 2, 2, 0, 0]
    assert adm.srctab is table and (adm.src_conns, adm.src_rate, adm.src_burst) == (3, 5, 2)
    assert adm.salt == 2                               # the row (1) + 1
    again = dataplane.build_admission(dataclasses.replace(p, retries=0), table, cache)
    assert again.acl is adm.acl                        # thousands of CIDRs are not rebuilt
    plain = compute_plan(config.loads(HEAD).services[0], lambda a: 1, lambda s: True, {}, 0.0)
    assert dataplane.build_admission(plain, table) is None


def test_admission_refuses_what_the_engine_could_not_use():
    with pytest.raises(CoreArgumentError, match="SourceTable"):
        _core.Admission(conns=3)
    with pytest.raises(CoreArgumentError, match="pp_send"):
        _core.Admission(pp_send={1: 3})


def test_salted_sources_do_not_share_counts():
    table = _core.SourceTable(bytearray(_core.SourceTable.size_for(64)), 64)
    assert table.py_acquire("192.0.2.1", 0, 1, salt=1)[0] == _core.SRC_ADMIT
    assert table.py_acquire("192.0.2.1", 0, 1, salt=1)[0] == _core.SRC_REFUSED_CONNS
    assert table.py_acquire("192.0.2.1", 0, 1, salt=2)[0] == _core.SRC_ADMIT
    assert table.conns("192.0.2.1", salt=1) == table.conns("192.0.2.1", salt=2) == 1
    assert table.conns("192.0.2.1") == 0               # salt 0: the twin's hash, not counted
