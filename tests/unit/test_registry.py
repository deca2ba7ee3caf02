"""Registry mutations (two-phase), reconcile rules, and the state file."""
import os

import msgpack
import pytest

from fastlb import config, statefile
from fastlb.registry import Registry, RegistryError, reconcile

BASE = """
[[service]]
name = "web"
listen = ["127.0.0.1:8080"]
backends = [ { address = "127.0.0.1:9001", weight = 2 }, { address = "127.0.0.1:9002" } ]
[[service]]
name = "db"
listen = ["127.0.0.1:5432"]
backends = [ { address = "127.0.0.1:6001" } ]
"""


def services(text=BASE):
    return {s.name: s for s in config.loads(text).services}


def backends(svc):
    return [(b.address.text, b.weight, b.state) for b in svc.backends]


def test_plan_changes_nothing_until_commit():
    r = Registry(services())
    before = r.snapshot
    nxt, ev = r.plan("set_weight", {"service": "web", "address": "127.0.0.1:9002", "weight": 5})
    assert ev == {"op": "set_weight", "service": "web", "address": "127.0.0.1:9002", "weight": 5}
    assert r.snapshot is before and backends(r.snapshot["web"])[1] == ("127.0.0.1:9002", 1, "ready")
    assert r.commit(nxt) == 1
    assert backends(r.snapshot["web"])[1] == ("127.0.0.1:9002", 5, "ready")
    assert r.snapshot["db"] is before["db"]               # untouched services are shared


def test_every_mutation():
    r = Registry(services())
    for op, args in [
        ("add_backend", {"service": "web", "address": "127.0.0.1:9003", "weight": 4, "state": "drain"}),
        ("set_state", {"service": "web", "address": "127.0.0.1:9001", "state": "maint"}),
        ("remove_backend", {"service": "web", "address": "127.0.0.1:9002"}),
        ("add_service", {"service": {"name": "new", "listen": "127.0.0.1:7000",
                                     "backends": [{"address": "127.0.0.1:7001"}]}}),
        ("remove_service", {"service": "db"}),
    ]:
        r.commit(r.plan(op, args)[0])
    assert sorted(r.snapshot) == ["new", "web"]
    assert backends(r.snapshot["web"]) == [("127.0.0.1:9001", 2, "maint"), ("127.0.0.1:9003", 4, "drain")]


@pytest.mark.parametrize("op,args,code,msg", [
    ("set_weight", {"service": "nope", "address": "x:1", "weight": 1}, "unknown_service",
     "no service 'nope'"),
    ("set_weight", {"service": "web", "address": "127.0.0.1:1", "weight": 1}, "unknown_backend",
     "no backend"),
    ("add_backend", {"service": "web", "address": "127.0.0.1:9001"}, "exists", "already has backend"),
    ("add_backend", {"service": "web", "address": "nonsense"}, "invalid", "is not \"host:port\""),
    ("add_backend", {"service": "web", "address": "127.0.0.1:0"}, "invalid", "needs a port"),
    ("add_service", {"service": {"name": "web", "listen": "127.0.0.1:1"}}, "exists", "already exists"),
    ("add_service", {"service": {"name": "x", "listen": "127.0.0.1:8080"}}, "exists", "already a listener"),
    ("add_service", {"service": {"name": "x", "listen": "127.0.0.1:1", "polcy": "random"}}, "invalid",
     "did you mean 'policy'"),
    ("remove_service", {"service": "nope"}, "unknown_service", "no service"),
])
def test_errors_leave_the_registry_unchanged(op, args, code, msg):
    r = Registry(services())
    before = dict(r.snapshot)
    with pytest.raises(RegistryError) as info:
        r.plan(op, args)
    assert info.value.code == code and msg in info.value.message
    assert dict(r.snapshot) == before and r.generation == 0


def test_reconcile_keeps_admin_changes_the_config_did_not_touch():
    old_cfg = services()
    current = dict(old_cfg)
    r = Registry(current)
    for op, args in [("set_weight", {"service": "web", "address": "127.0.0.1:9001", "weight": 9}),
                     ("add_backend", {"service": "web", "address": "127.0.0.1:9005"}),
                     ("remove_backend", {"service": "web", "address": "127.0.0.1:9002"})]:
        r.commit(r.plan(op, args)[0])
    # the config adds a backend, changes retries, drops service db, adds service api
    new_text = BASE.replace('{ address = "127.0.0.1:9002" } ]',
                            '{ address = "127.0.0.1:9002" }, { address = "127.0.0.1:9010", weight = 3 } ]')
    new_text = new_text.replace('listen = ["127.0.0.1:8080"]', 'listen = ["127.0.0.1:8080"]\nretries = 5')
    new_text = new_text.split("[[service]]\nname = \"db\"")[0] + \
        '[[service]]\nname = "api"\nlisten = ["127.0.0.1:7000"]\n'
    out = reconcile(r.snapshot, old_cfg, services(new_text))
    assert sorted(out) == ["api", "web"]
    assert out["web"].retries == 5
    assert backends(out["web"]) == [("127.0.0.1:9001", 9, "ready"),      # admin weight kept
                                    ("127.0.0.1:9005", 1, "ready"),      # admin add kept
                                    ("127.0.0.1:9010", 3, "ready")]      # config add; 9002 stays removed


def test_reconcile_config_change_wins_for_what_it_touches():
    old_cfg = services()
    r = Registry(old_cfg)
    r.commit(r.plan("set_weight", {"service": "web", "address": "127.0.0.1:9001", "weight": 9})[0])
    new = services(BASE.replace("weight = 2", "weight = 4"))
    assert backends(reconcile(r.snapshot, old_cfg, new)["web"])[0] == ("127.0.0.1:9001", 4, "ready")
    assert reconcile(r.snapshot, old_cfg, old_cfg) == dict(r.snapshot)   # no config change: no-op


def test_state_file_round_trip_and_atomic_replace(tmp_path):
    path = str(tmp_path / "state.msgpack")
    assert statefile.load(path) is None
    reg, cfg = services(), services()
    r = Registry(reg)
    r.commit(r.plan("set_state", {"service": "db", "address": "127.0.0.1:6001", "state": "drain"})[0])
    statefile.save(path, r.snapshot, cfg)
    assert statefile.load(path) == (dict(r.snapshot), cfg)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    # a torn temp file from a crash mid-write is ignored
    (tmp_path / ".state.msgpack.tmp").write_bytes(b"\x85\xa6torn")
    assert statefile.load(path) == (dict(r.snapshot), cfg)
    statefile.save(path, cfg, cfg)                                        # and replaced next time
    assert statefile.load(path)[0] == cfg


@pytest.mark.parametrize("content,msg", [
    (b"\x93garbage", "not valid msgpack"),
    (b"\xc1garbage", "torn: 8 bytes, shorter than the 56-byte header"),   # v2's first byte
    (msgpack.packb([1, 2]), "not a fastlb state file"),
    (msgpack.packb({"format": "fastlb-state", "version": 99, "registry": [], "config": []}),
     "unknown version 99"),
    (msgpack.packb({"format": "fastlb-state", "version": 1, "registry": {}, "config": []}),
     "\"registry\" is not a list"),
    (msgpack.packb({"format": "fastlb-state", "version": 1, "config": [],
                    "registry": [{"name": "a", "listen": "127.0.0.1:1", "backends": [{"address": "x"}]}]}),
     "registry[0].backends[0].address"),
])
def test_corrupt_state_file_is_refused_clearly(tmp_path, content, msg):
    path = tmp_path / "state.msgpack"
    path.write_bytes(content)
    with pytest.raises(statefile.StateFileError) as info:
        statefile.load(str(path))
    assert str(path) in str(info.value) and msg in str(info.value)
    assert "--ignore-state" in str(info.value)
