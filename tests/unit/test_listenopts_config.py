"""[listenopts] service.defer_accept and service.fastopen (issue 15): the pure validation (values,
key paths, an SNI group that must agree), their way through the state file's tables and the
plan, and fastlb.listeners' part on real loopback sockets: set before listening, changed on the
socket held (same descriptor, still listening), carried over when an address changes hands."""
import dataclasses
import socket

import pytest

from fastlb import config, listeners
from fastlb.errors import ConfigError
from fastlb.listeners import NO_OPTS, Listeners, listen_opts, tfo_problem, tfo_server_allowed
from fastlb.plan import SNI_GROUP, Plan
from fastlb.registry import Registry, RegistryError
from fastlb.runtime import compute_plan


def svc_text(name="web", listen="127.0.0.1:8080", extra=""):
    return (f'[[service]]\nname = "{name}"\nlisten = ["{listen}"]\n{extra}\n'
            f'backends = [ {{ address = "127.0.0.1:9001" }} ]\n')


@pytest.mark.parametrize("value, want", [("true", 1), ("false", 0), ("1", 1), ("5", 5),
                                         ("3600", 3600)])
def test_defer_accept_values(value, want):
    (svc,) = config.loads(svc_text(extra=f"defer_accept = {value}")).services
    assert svc.defer_accept == want and svc.fastopen == 0


@pytest.mark.parametrize("value, want", [("0", 0), ("1", 1), ("256", 256), (str(1 << 20), 1 << 20)])
def test_fastopen_values(value, want):
    (svc,) = config.loads(svc_text(extra=f"fastopen = {value}")).services
    assert svc.fastopen == want and svc.defer_accept == 0


def test_defaults_are_off():
    (svc,) = config.loads(svc_text()).services
    assert (svc.defer_accept, svc.fastopen) == (0, 0)


@pytest.mark.parametrize("line, path, words", [
    ('defer_accept = "x"', "service[0].defer_accept", 'expected a boolean or seconds > 0, got "x"'),
    ("defer_accept = -1", "service[0].defer_accept", "-1 is out of range; expected a boolean or "
                                                     "whole seconds from 1 to 3600"),
    ("defer_accept = 0", "service[0].defer_accept", "0 is out of range"),
    ("defer_accept = 3601", "service[0].defer_accept", "3601 is out of range"),
    ("defer_accept = 1.5", "service[0].defer_accept", "expected a boolean or whole seconds > 0, got 1.5"),
    ("defer_accept = [1]", "service[0].defer_accept", "got an array"),
    ("fastopen = -1", "service[0].fastopen", "-1 is out of range; expected 0 (off) or a queue length"),
    ("fastopen = true", "service[0].fastopen", "expected 0 (off) or a queue length from 1 to "
                                               "1048576 (as nginx's fastopen=N; 256 is usual), got true"),
    ('fastopen = "256"', "service[0].fastopen", 'got "256"'),
    ("fastopen = 2.5", "service[0].fastopen", "got 2.5"),
    (f"fastopen = {(1 << 20) + 1}", "service[0].fastopen", "out of range"),
])
def test_bad_values_name_the_key_path_and_line(line, path, words):
    with pytest.raises(ConfigError) as err:
        config.loads(svc_text(extra=line), source="lb.toml")
    assert err.value.path == path and words in err.value.message, str(err.value)
    assert str(err.value).startswith(f"lb.toml:4: {path}: ")


def sni_pair(a_extra="", b_extra="", port=8443):
    return (svc_text("a", f"127.0.0.1:{port}", 'sni = ["a.example.com"]\n' + a_extra)
            + svc_text("b", f"127.0.0.1:{port}", b_extra))


@pytest.mark.parametrize("a_extra, b_extra, path, words", [
    ("defer_accept = true", "", "service[1].defer_accept",
     "127.0.0.1:8443 is one listening socket shared with service 'a' (SNI routing), whose "
     "defer_accept is 1s and this one's off: the services of one address must set the same "
     "defer_accept"),
    ("", "fastopen = 16", "service[1].fastopen", "whose fastopen is off and this one's 16"),
    ("defer_accept = 2\nfastopen = 16", "defer_accept = 2\nfastopen = 8", "service[1].fastopen",
     "whose fastopen is 16 and this one's 8"),
])
def test_an_sni_group_must_agree(a_extra, b_extra, path, words):
    with pytest.raises(ConfigError) as err:
        config.loads(sni_pair(a_extra, b_extra))
    assert err.value.path == path and words in err.value.message, str(err.value)


def test_an_sni_group_that_agrees_and_services_apart_are_free():
    cfg = config.loads(sni_pair("defer_accept = true\nfastopen = 16", "defer_accept = 1\nfastopen = 16")
                       + svc_text("c", "127.0.0.1:8444", "fastopen = 99"))
    assert [(s.defer_accept, s.fastopen) for s in cfg.services] == [(1, 16), (1, 16), (0, 99)]
    assert config.listen_opts_problem(cfg.services) is None
    c = dataclasses.replace(cfg.services[1], fastopen=0)
    assert config.listen_opts_problem([cfg.services[0], c]) == (
        "service 'b': fastopen: 127.0.0.1:8443 is one listening socket shared with service 'a' "
        "(SNI routing), whose fastopen is 16 and this one's off: the services of one address "
        "must set the same fastopen (an option of the socket)")


def test_admin_add_service_same_validation_and_registry_unchanged():
    reg = Registry({s.name: s for s in config.loads(
        svc_text("a", "127.0.0.1:8443", 'sni = ["a.example.com"]\nfastopen = 16')).services})
    before = reg.snapshot
    base = {"name": "b", "listen": ["127.0.0.1:8443"], "sni": ["b.example.com"],
            "backends": [{"address": "127.0.0.1:9002"}]}
    for extra, words in (({"defer_accept": "x"},
                          'service.defer_accept: expected a boolean or seconds > 0, got "x"'),
                         ({"fastopen": -5}, "service.fastopen: -5 is out of range"),
                         ({"fastopen": 8}, "service.fastopen: 127.0.0.1:8443 is one listening socket "
                                           "shared with service 'a' (SNI routing), whose fastopen is "
                                           "16 and this one's 8")):
        with pytest.raises(RegistryError) as err:
            reg.plan("add_service", {"service": {**base, **extra}})
        assert err.value.code == "invalid" and words in str(err.value), str(err.value)
        assert reg.snapshot is before
    nxt, _ = reg.plan("add_service", {"service": {**base, "fastopen": 16}})
    assert (nxt["b"].defer_accept, nxt["b"].fastopen) == (0, 16)
    nxt, _ = reg.plan("add_service", {"service": {**base, "name": "c", "listen": ["127.0.0.1:8444"],
                                                  "defer_accept": True}})
    assert (nxt["c"].defer_accept, nxt["c"].fastopen) == (1, 0)


def test_state_table_and_plan_carry_them():
    (svc,) = config.loads(svc_text(extra="defer_accept = 7\nfastopen = 32")).services
    d = config.service_to_dict(svc)
    assert (d["defer_accept"], d["fastopen"]) == (7, 32)
    assert config.service_from_dict(d, "service") == svc
    off = dataclasses.replace(svc, defer_accept=0, fastopen=0)
    assert "defer_accept" not in config.service_to_dict(off) and "fastopen" not in config.service_to_dict(off)
    plan = compute_plan(svc, lambda key: 1, lambda slot: True, {}, 0.0)
    assert (plan.defer_accept, plan.fastopen) == (7, 32)
    assert Plan.from_wire(plan.to_wire()) == plan
    wire = plan.to_wire()
    del wire["listen_opts"]                                       # a plan from an older fastlb
    assert (Plan.from_wire(wire).defer_accept, Plan.from_wire(wire).fastopen) == (0, 0)
    assert "defer_accept 7s; fastopen 32" in config.summary(config.loads(
        svc_text(extra="defer_accept = 7\nfastopen = 32")))


def test_listen_opts_per_socket_and_for_an_sni_group():
    cfg = config.loads(sni_pair("defer_accept = 3", "defer_accept = 3")
                       + svc_text("c", "127.0.0.1:8444", "fastopen = 5"))
    services = {s.name: s for s in cfg.services}
    keys = [(SNI_GROUP, "127.0.0.1", 8443), ("c", "127.0.0.1", 8444), ("gone", "127.0.0.1", 1)]
    assert listen_opts(keys, services) == {keys[0]: (3, 0), keys[1]: (0, 5), keys[2]: NO_OPTS}


def test_tfo_sysctl_bits(tmp_path):
    assert not tfo_server_allowed(0) and not tfo_server_allowed(1) and not tfo_server_allowed(0x400)
    assert tfo_server_allowed(2) and tfo_server_allowed(3) and tfo_server_allowed(0x603)
    f = tmp_path / "tcp_fastopen"
    f.write_text("1\n")
    assert tfo_problem(str(f)).startswith("net.ipv4.tcp_fastopen = 1 does not allow server TCP "
                                          "Fast Open (bit 0x2)")
    assert "sysctl -w net.ipv4.tcp_fastopen=3" in tfo_problem(str(f))
    f.write_text("3\n")
    assert tfo_problem(str(f)) is None
    f.write_text("garbage")
    assert tfo_problem(str(f)) is None and tfo_problem(str(tmp_path / "missing")) is None


def opts_of(sock):
    return (sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN))


def test_listeners_bind_with_options_and_change_them_on_the_socket_held():
    ls = Listeners()
    key, plain = ("a", "127.0.0.1", 0), ("b", "127.0.0.1", 0)
    try:
        new = ls.bind([key, plain], opts={key: (1, 16)})
        ls.adopt(new)
        sock = ls.socks[key]
        fd = sock.fileno()
        assert opts_of(sock) == (1, 16) and opts_of(ls.socks[plain]) == (0, 0)
        ls.configure({key: (5, 0), plain: NO_OPTS})
        assert ls.socks[key] is sock and sock.fileno() == fd
        # the kernel keeps seconds as SYN-ACK retransmissions: 5 s reads back as 7 (1+2+4)
        assert opts_of(sock) == (7, 0) and ls.opts[key] == (5, 0)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        sock.settimeout(5)
        with socket.create_connection(sock.getsockname(), timeout=5) as c:    # still listening
            c.sendall(b"x")
            conn, _ = sock.accept()
            with conn:
                assert conn.recv(1) == b"x"
        ls.configure({key: NO_OPTS})
        assert opts_of(sock) == (0, 0)
        ls.close_unwanted({plain})
        assert key not in ls.opts
    finally:
        ls.shutdown()
    assert ls.opts == {}


def test_an_address_changing_hands_keeps_its_options_and_a_discard_forgets():
    ls = Listeners()
    with listeners.listen_socket("127.0.0.1", 0) as probe:
        port = probe.getsockname()[1]                               # free again once closed
    alone, group = ("a", "127.0.0.1", port), (SNI_GROUP, "127.0.0.1", port)
    try:
        ls.adopt(ls.bind([alone], opts={alone: (1, 0)}))
        new = ls.bind([alone, group], opts={group: (1, 0)})       # a joins an SNI group
        assert ls.opts[group] == (1, 0)                             # the same socket, its options
        ls.adopt(new)
        ls.configure({group: (2, 0)})
        assert opts_of(ls.socks[alone])[0] == opts_of(ls.socks[group])[0] == 3   # one socket
        other = ("c", "127.0.0.1", 0)
        got = ls.bind([other], opts={other: (0, 8)})
        ls.discard(got)
        assert other not in ls.opts
    finally:
        ls.shutdown()
