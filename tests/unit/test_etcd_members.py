"""fastlb.etcd's pure parts: key and value parsing, the backends a member map gives, member
diffs, the range end of a prefix; and the [discovery.etcd] / service.discovery config keys."""
import base64

import pytest

from fastlb import config, etcd
from fastlb.errors import ConfigError


def test_parse_key():
    p = "/fastlb/"
    assert etcd.parse_key(p, "/fastlb/services/app/127.0.0.1:9000") == ("app", "127.0.0.1:9000")
    assert etcd.parse_key(p, "/fastlb/services/app/[::1]:9000") == ("app", "[::1]:9000")
    assert etcd.parse_key(p, "/fastlb/services/app/db.internal:5432") == ("app", "db.internal:5432")
    for bad in ("/fastlb/services/app/127.0.0.1", "/fastlb/services/app/", "/fastlb/services//1.2.3.4:5",
                "/fastlb/services/app/x/1.2.3.4:5", "/other/services/app/1.2.3.4:5", "/fastlb/app",
                "/fastlb/services/app/1.2.3.4:0", "/fastlb/services/app/1.2.3.4:70000"):
        assert etcd.parse_key(p, bad) is None, bad
    assert etcd.member_key(p, "app", "1.2.3.4:5") == "/fastlb/services/app/1.2.3.4:5"


def test_parse_value():
    e = etcd.parse_value(b'{"weight": 3, "state": "drain", "zone": "x"}', 7)
    assert (e.weight, e.state, e.mod_revision) == (3, "drain", 7)
    assert e.as_dict() == {"weight": 3, "state": "drain", "zone": "x"}
    assert (etcd.parse_value(b"{}").weight, etcd.parse_value(b"").state) == (1, "ready")
    for bad, words in ((b"[1]", "JSON object"), (b"{", "not JSON"), (b'{"weight": 0}', "weight"),
                       (b'{"weight": "3"}', "weight"), (b'{"weight": true}', "weight"),
                       (b'{"state": "up"}', "state"), (b"\xff", "not JSON")):
        with pytest.raises(ValueError, match=words):
            etcd.parse_value(bad)


def test_backends_of_is_sorted_and_carries_health():
    svc = config.service_from_dict({"name": "app", "listen": "127.0.0.1:0", "discovery": "etcd",
                                    "health": {"interval": "1s"}}, "s")
    got = etcd.backends_of(svc, {"127.0.0.2:80": etcd.Entry(2, "maint"),
                                 "127.0.0.1:80": etcd.Entry()})
    assert [(b.address.text, b.weight, b.state) for b in got] == [
        ("127.0.0.1:80", 1, "ready"), ("127.0.0.2:80", 2, "maint")]
    assert all(b.health == svc.health for b in got)


def test_diff():
    old = {"a:1": etcd.Entry(1), "b:1": etcd.Entry(2), "c:1": etcd.Entry(1, "ready", mod_revision=3)}
    new = {"b:1": etcd.Entry(3), "c:1": etcd.Entry(1, "ready", mod_revision=9), "d:1": etcd.Entry()}
    assert etcd.diff(old, new) == (["d:1"], ["a:1"], ["b:1"])   # a new revision alone: no change


def test_range_end():
    assert base64.b64decode(etcd.range_end("/fastlb/services/")) == b"/fastlb/services0"


E = '[discovery.etcd]\nendpoints = ["http://h:1"]\n'
BASE = '[[service]]\nname = "app"\nlisten = "127.0.0.1:0"\ndiscovery = "etcd"\n'


def test_config():
    cfg = config.loads('[discovery.etcd]\nendpoints = ["http://127.0.0.1:2379/"]\n' + BASE)
    assert cfg.etcd == config.EtcdConfig(("http://127.0.0.1:2379",), "/fastlb/")
    assert cfg.services[0].discovery == "etcd"
    svc = cfg.services[0]
    assert config.service_from_dict(config.service_to_dict(svc), "s") == svc   # the state file
    assert config.loads(BASE.replace('discovery = "etcd"\n', "")).etcd is None


@pytest.mark.parametrize("text, path, words", [
    (BASE, "service[0].discovery", "needs a [discovery.etcd]"),
    (E + BASE.replace("discovery = \"etcd\"", "discovery = \"dns\""),
     "service[0].discovery", "not one of"),
    (E + BASE + 'backends = [{ address = "127.0.0.1:1" }]\n',
     "service[0].backends", "takes its backends from etcd"),
    ('[discovery.etcd]\nendpoints = []\n' + BASE, "discovery.etcd.endpoints", "non-empty"),
    ('[discovery.etcd]\nendpoints = ["h:1"]\n' + BASE, "discovery.etcd.endpoints[0]", "URL"),
    (E + 'prefix = "fastlb"\n' + BASE, "discovery.etcd.prefix", "ending with /"),
    (E + 'user = "u"\n' + BASE, "discovery.etcd.password_file", "together"),
    ('[discovery.etcd]\nendpoints = ["https://h:1"]\ncert = "c"\n' + BASE, "discovery.etcd.key", "together"),
    (E + 'ca = "c"\n' + BASE, "discovery.etcd.endpoints", "https"),
    ('[discovery.etcd]\nendpoint = ["http://h:1"]\n' + BASE, "discovery.etcd.endpoint", "unknown key"),
    ('[discovery.consul]\n' + BASE, "discovery.consul", "unknown key"),
])
def test_config_errors(text, path, words):
    with pytest.raises(ConfigError) as e:
        config.loads(text)
    assert e.value.path == path and words in str(e.value)
