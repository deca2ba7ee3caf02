"""[limits] Config keys of connection limits and queues, the fd budget, the plan fields."""
import resource

import pytest

from fastlb import config, preflight
from fastlb.errors import ConfigError
from fastlb.plan import Plan, Snapshot
from fastlb.runtime import compute_plan

BASE = """
[global]
{glob}

[[service]]
name = "web"
listen = "127.0.0.1:8080"
{svc}
backends = [ {{ address = "127.0.0.1:9001"{b} }}, {{ address = "127.0.0.1:9002" }} ]
"""


def load(glob="", svc="", b=""):
    return config.loads(BASE.format(glob=glob, svc=svc, b=b))


def test_keys_parse_and_round_trip():
    cfg = load("maxconn = 500", 'maxconn = 100\nqueue = { size = 20, timeout = "750ms" }',
               ", max_conns = 7")
    s = cfg.services[0]
    assert cfg.global_.maxconn == 500
    assert (s.maxconn, s.queue_size, s.queue_timeout) == (100, 20, 0.75)
    assert [b.max_conns for b in s.backends] == [7, 0]
    d = config.service_to_dict(s)
    assert d["maxconn"] == 100 and d["queue"] == {"size": 20, "timeout": 0.75}
    assert d["backends"][0]["max_conns"] == 7 and "max_conns" not in d["backends"][1]
    assert config.service_from_dict(d, "service[0]") == s
    plain = load().services[0]
    assert (plain.maxconn, plain.queue_size, plain.queue_timeout) == (0, 0, None)
    assert "maxconn" not in config.service_to_dict(plain) and "queue" not in config.service_to_dict(plain)


@pytest.mark.parametrize("glob, svc, b, path, words", [
    ("maxconn = 0", "", "", "global.maxconn", "from 1 to"),
    ('maxconn = "lots"', "", "", "global.maxconn", "expected an integer"),
    ("", "maxconn = -1", "", "service[0].maxconn", "out of range"),
    ("", "queue = { timeout = \"5s\" }", "", "service[0].queue.size", "required key is missing"),
    ("", "queue = { size = 3, wait = \"5s\" }", "", "service[0].queue.wait", "unknown key"),
    ("", "queue = { size = 3, timeout = \"soon\" }", "", "service[0].queue.timeout", "duration"),
    ("", "queue = 5", "", "service[0].queue", "expected a table"),
    ("", "", ", max_conns = 0", "service[0].backends[0].max_conns", "from 1 to"),
    ("", "", ", max_conn = 3", "service[0].backends[0].max_conn", "did you mean 'max_conns'"),
])
def test_bad_limits_name_the_key(glob, svc, b, path, words):
    with pytest.raises(ConfigError) as e:
        load(glob, svc, b)
    assert path in str(e.value) and words in str(e.value)


def test_default_maxconn_fits_the_fd_limit():
    cfg = load()
    reserve = preflight.fd_reserve(cfg)
    assert reserve == preflight.FD_BASE + 1 + 2 + 2          # 1 listener, 2 backends, 1 worker
    assert preflight.maxconn(cfg, nofile=64) == (64 - reserve) // 2
    assert preflight.maxconn(cfg, nofile=1 << 20) == ((1 << 20) - reserve) // 2
    assert preflight.maxconn(load("maxconn = 9"), nofile=64) == 9      # configured: as given
    with_all = load('workers = 2\nmetrics = "127.0.0.1:0"\nadmin = "unix:/tmp/x.sock"')
    assert preflight.fd_reserve(with_all) == reserve + 2 + preflight.FD_METRICS + preflight.FD_ADMIN


def test_maxconn_over_the_fd_limit_is_an_error_naming_the_key():
    hard = preflight.fd_limit()
    reserve = preflight.fd_reserve(load())
    fits = (hard - reserve) // 2
    assert preflight.problems(load(f"maxconn = {fits}"), bind=False) == []
    (err,) = preflight.problems(load(f"maxconn = {fits + 1}"), bind=False)
    assert "global.maxconn" in str(err) and f"at most {fits}" in str(err)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[1] in (hard, resource.RLIM_INFINITY)


def test_plan_carries_the_limits_over_the_wire():
    svc = load("", 'maxconn = 4\nqueue = { size = 2 }', ", max_conns = 3").services[0]
    slots = {"127.0.0.1:9001": 5, "127.0.0.1:9002": 6, "": 9}
    plan = compute_plan(svc, lambda a: slots[a], lambda s: True, {}, 0.0)
    assert (plan.maxconn, plan.queue_size, plan.max_conns) == (4, 2, ((5, 3),))
    assert plan.queue_timeout == svc.connect_timeout          # HAProxy: timeout queue = connect
    assert Plan.from_wire(plan.to_wire()) == plan
    snap = Snapshot(1, (plan,), (), maxconn=77)
    assert Snapshot.from_wire(snap.to_wire()) == snap
    old = plan.to_wire()
    for k in ("maxconn", "queue_size", "queue_timeout", "max_conns"):
        del old[k]
    assert Plan.from_wire(old).max_conns == () and Plan.from_wire(old).maxconn == 0
