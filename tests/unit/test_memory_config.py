"""[mem] keys: [global] buffer_budget, timeouts.client_fin/server_fin/max_duration/first_byte,
tcp_keepalive: parsing, defaults, errors naming the key path, the round trip through
service_to_dict, the plan's wire form, and the engine's budget argument."""
import asyncio
import dataclasses

import pytest

from fastlb import _core, config
from fastlb.errors import ConfigError, CoreArgumentError
from fastlb.plan import Plan
from fastlb.runtime import budget_per_worker, compute_plan

BACKEND = 'backends = [ { address = "127.0.0.1:9" } ]\n'


def load(glob="", svc=""):
    return config.loads(f"[global]\n{glob}\n[[service]]\nname = \"web\"\n"
                        f"listen = \"127.0.0.1:0\"\n{svc}\n{BACKEND}")


def test_defaults_are_off_and_the_budget_is_256_mib():
    cfg = load()
    s = cfg.services[0]
    assert (s.client_fin, s.server_fin, s.max_duration, s.first_byte) == (0, 0, 0, 0)
    assert s.tcp_keepalive is None
    assert cfg.global_.buffer_budget == 256 << 20


@pytest.mark.parametrize("text,want", [("256MiB", 256 << 20), ("64m", 64 << 20), ("1g", 1 << 30),
                                       ("4096k", 4 << 20), ("8 MB", 8 << 20), (1 << 24, 1 << 24)])
def test_buffer_budget_sizes(text, want):
    value = f'"{text}"' if isinstance(text, str) else str(text)
    assert load(f"buffer_budget = {value}").global_.buffer_budget == want


@pytest.mark.parametrize("value,msg", [('"lots"', "expected a size"), ("-1", "expected a size"),
                                       ('"512k"', "less than 4 buffers"), ("true", "expected a size")])
def test_bad_buffer_budget_names_the_key(value, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        load(f"buffer_budget = {value}")
    assert "global.buffer_budget" in str(e.value)


def test_the_budget_is_split_between_workers_each_keeping_four_buffers():
    cfg = load('workers = 4\nbuffer_budget = "64m"')
    assert budget_per_worker(cfg.global_) == 16 << 20
    with pytest.raises(ConfigError, match="per worker"):
        load('workers = 4\nbuffer_budget = "2m"')


def test_timeouts_and_keepalive_parse_and_round_trip():
    s = load(svc='timeouts = { client_fin = "1s", server_fin = "500ms", max_duration = "1h", '
                 'first_byte = 2 }\ntcp_keepalive = { idle = "60s", interval = "10s", count = 6 }'
             ).services[0]
    assert (s.client_fin, s.server_fin, s.max_duration, s.first_byte) == (1.0, 0.5, 3600.0, 2.0)
    assert s.tcp_keepalive == (60, 10, 6)
    assert config.service_from_dict(config.service_to_dict(s), "x") == s
    partial = load(svc='tcp_keepalive = { idle = "2m" }').services[0]
    assert partial.tcp_keepalive == (120, 0, 0)               # 0: the kernel's value
    assert config.service_from_dict(config.service_to_dict(partial), "x") == partial


@pytest.mark.parametrize("svc,path", [
    ('timeouts = { client_fin = "soon" }', "service[0].timeouts.client_fin"),
    ('timeouts = { first_bite = "1s" }', "service[0].timeouts.first_bite"),
    ('tcp_keepalive = { idle = "1.5s" }', "service[0].tcp_keepalive.idle"),
    ('tcp_keepalive = { count = 0 }', "service[0].tcp_keepalive.count"),
    ('tcp_keepalive = { interval = "10h" }', "service[0].tcp_keepalive.interval"),
    ('tcp_keepalive = { probes = 3 }', "service[0].tcp_keepalive.probes"),
    ('tcp_keepalive = true', "service[0].tcp_keepalive"),
])
def test_bad_timer_and_keepalive_keys_name_the_path(svc, path):
    with pytest.raises(ConfigError) as e:
        load(svc=svc)
    assert path in str(e.value)


def test_the_plan_carries_them_over_the_wire():
    cfg = load('buffer_budget = "16m"', 'timeouts = { client_fin = "1s", first_byte = "3s" }\n'
                                        'tcp_keepalive = { idle = "30s", count = 4 }')
    p = compute_plan(cfg.services[0], lambda a: 0, lambda s: True, {}, 0.0,
                     buffer_budget=budget_per_worker(cfg.global_))
    assert (p.client_fin, p.first_byte, p.tcp_keepalive, p.buffer_budget) == \
        (1.0, 3.0, (30, 0, 4), 16 << 20)
    assert Plan.from_wire(p.to_wire()) == p
    old = p.to_wire()
    for k in ("client_fin", "server_fin", "max_duration", "first_byte", "tcp_keepalive",
              "buffer_budget"):
        del old[k]                                 # a plan of an older supervisor: defaults
    assert Plan.from_wire(old) == dataclasses.replace(p, client_fin=0.0, first_byte=0.0,
                                                      tcp_keepalive=None, buffer_budget=0)


def test_engine_buffer_budget_argument():
    loop = asyncio.new_event_loop()
    try:
        eng = _core.Engine(loop, _core.Counters(bytearray(_core.Counters.size_for(4)), 4))
        assert eng.buffer_budget == 0 and eng.buffers_in_use == 0
        eng.set_buffer_budget(16 * _core.BUFFER_SIZE + 5)
        assert eng.buffer_budget == 16
        with pytest.raises(CoreArgumentError, match="less than 4 buffers"):
            eng.set_buffer_budget(_core.BUFFER_SIZE)
        eng.set_buffer_budget(0)
        assert eng.buffer_budget == 0
        eng.close()
    finally:
        loop.close()
