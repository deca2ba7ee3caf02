"""Config validation: every mistake gives one clear error naming the key path and line."""
import subprocess
import sys

import pytest

from fastlb import config
from fastlb.errors import ConfigError

GOOD = """
[global]
workers = 1
grace = "5s"

[[service]]
name = "web"
listen = ["127.0.0.1:8080", "[::1]:8080"]
policy = "maglev"
hash_key = "source_ip_port"
retries = 3
timeouts = { connect = "500ms", idle = "2m" }
backends = [
  { address = "127.0.0.1:9001", weight = 5 },
  { address = "localhost:9002" },
]
"""


def test_good_config_becomes_frozen_typed_objects():
    cfg = config.loads(GOOD)
    (svc,) = cfg.services
    assert cfg.global_.grace == 5.0
    assert [a.text for a in svc.listen] == ["127.0.0.1:8080", "[::1]:8080"]
    assert svc.listen[1].host == "::1"
    assert (svc.policy, svc.hash_key, svc.retries) == ("maglev", "source_ip_port", 3)
    assert (svc.connect_timeout, svc.idle_timeout) == (0.5, 120.0)
    assert [(b.address.text, b.address.host, b.weight) for b in svc.backends] == [
        ("127.0.0.1:9001", "127.0.0.1", 5), ("localhost:9002", "localhost", 1)]   # kept: fastlb.dns
    with pytest.raises(AttributeError):
        svc.retries = 5


def test_defaults():
    svc = config.loads('[[service]]\nname = "a"\nlisten = "127.0.0.1:1"\n').services[0]
    assert (svc.policy, svc.retries, svc.connect_timeout, svc.idle_timeout) == ("round_robin", 2, 2.0, 300.0)
    assert svc.backends == ()


BAD = [
    ("x = = 1", 1, "", "TOML syntax error"),
    ("[[service]]\nname='a'\nlisten='127.0.0.1:1'\npolcy='random'", 4, "service[0].polcy",
     "unknown key (did you mean 'policy'?)"),
    ("[[service]]\nname='a'\nlisten='127.0.0.1:1'\n\n[[service]]\nname='b'\nlisten='127.0.0.1:2'\n"
     "backends = [\n  { address = '127.0.0.1:5' },\n  { address = '127.0.0.1:6', weight = 0 },\n]",
     10, "service[1].backends[1].weight", "0 is out of range; expected an integer from 1 to 1000000"),
    ("[[service]]\nname='a'\nlisten='127.0.0.1:1'\nbackends=[{address='127.0.0.1:5', weight='5'}]",
     4, "service[0].backends[0].weight", "expected an integer"),
    ("[[service]]\nname='a'\nlisten='127.0.0.1:1'\npolicy='fastest'", 4, "service[0].policy",
     "'fastest' is not one of: round_robin, random, least_conn, maglev"),
    ("[[service]]\nname='a'\nlisten='nohost'", 3, "service[0].listen[0]", "is not \"host:port\""),
    ("[[service]]\nname='a'\nlisten='127.0.0.1:70000'", 3, "service[0].listen[0]", "out of range"),
    ("[[service]]\nname='a'\nlisten='127.0.0.1:1'\ntimeouts={connect='2 parsecs'}", 4,
     "service[0].timeouts.connect", "expected a duration"),
    ("[[service]]\nname='a'\nlisten='127.0.0.1:1'\nretries=99", 4, "service[0].retries", "from 0 to 31"),
    ("[[service]]\nname='a'\nlisten='127.0.0.1:1'\nhash_key='source_ip'", 4, "service[0].hash_key",
     "only meaningful with policy = \"maglev\""),
    ("[[service]]\nname='a'\nlisten='127.0.0.1:1'\n[[service]]\nname='a'\nlisten='127.0.0.1:2'", 5,
     "service[1].name", "duplicate service name 'a'"),
    ("[[service]]\nname='a'\nlisten='127.0.0.1:1'\n[[service]]\nname='b'\nlisten='127.0.0.1:1'", 6,
     "service[1].listen[0]", "already a listener of service 'a'"),
    ("[[service]]\nname='a'\nlisten='127.0.0.1:1'\nbackends=[{address='127.0.0.1:5'},{address='127.0.0.1:5'}]",
     4, "service[0].backends[1].address", "duplicate backend"),
    ("[[service]]\nlisten='127.0.0.1:1'", 1, "service[0].name", "required key is missing"),
    ("[global]\nworkers = 0\n[[service]]\nname='a'\nlisten='127.0.0.1:1'", 2, "global.workers",
     "expected an integer from 1 to 64"),
    ("[global]\nworkers = 'many'\n[[service]]\nname='a'\nlisten='127.0.0.1:1'", 2, "global.workers",
     "expected \"auto\" or a number"),
    ("[global]\nverbose = true", 2, "global.verbose", "unknown key"),
    ("[[service]]\nname='a'\nlisten='127.0.0.1:1'\nhash_balance_factor=150", 4,
     "service[0].hash_balance_factor", "only meaningful with policy = \"maglev\""),
    ("[[service]]\nname='a'\nlisten='127.0.0.1:1'\npolicy='maglev'\nhash_balance_factor=50", 5,
     "service[0].hash_balance_factor", "50 would refuse every backend; expected 0 (off) or a percent "
     "from 100 to 10000"),
    ("[[service]]\nname='a'\nlisten='127.0.0.1:1'\npolicy='maglev'\nhash_balance_factor=1.5", 5,
     "service[0].hash_balance_factor", "expected an integer from 0 to 10000, got a float"),
    ("[[service]]\nname='a'\nlisten='127.0.0.1:1'\npolicy='maglev'\nmax_fails=3", 5,
     "service[0].max_fails", "only meaningful with policy = \"round_robin\""),
    ("[[service]]\nname='a'\nlisten='127.0.0.1:1'\nmax_fails=0", 4,
     "service[0].max_fails", "0 is out of range; expected an integer from 1 to 1000"),
    ("", None, "service", "no [[service]] defined"),
]


@pytest.mark.parametrize("text,line,path,message", BAD)
def test_bad_configs_name_the_key_line_and_expectation(text, line, path, message):
    with pytest.raises(ConfigError) as info:
        config.loads(text, source="bad.toml")
    err = info.value
    assert err.path == path
    assert message in str(err)
    if line is not None:
        assert err.line == line, str(err)
        assert str(err).startswith(f"bad.toml:{line}: ")


def test_a_backend_host_name_is_kept_as_written_never_resolved_here():
    """fastlb.dns follows it (issue 13): `check` and `run` accept a name that does not resolve."""
    svc = config.loads("[[service]]\nname='a'\nlisten='127.0.0.1:1'\n"
                       "backends=[{address='no-such-host.invalid:80'}]").services[0]
    assert svc.backends[0].address == config.Address("no-such-host.invalid", 80, "no-such-host.invalid:80")


DNS_BAD = [
    ("backends=[{address='bad host!:80'}]", "service[0].backends[0].address",
     "'bad host!' in 'bad host!:80' is neither an IP address nor a host name"),
    ("backends=[{srv='_a._tcp.x', address='a.x:1'}]", "service[0].backends[0].address",
     "give address = \"host:port\" or srv = \"_service._tcp.name\", not both"),
    ("backends=[{weight=2}]", "service[0].backends[0].address", "give address"),
    ("backends=[{srv=5}]", "service[0].backends[0].srv", "expected an SRV name"),
    ("backends=[{srv='10.0.0.1'}]", "service[0].backends[0].srv", "expected an SRV name"),
    ("backends=[{srv='_a._tcp.x'}, {srv='_a._tcp.x'}]", "service[0].backends[1].srv",
     "duplicate backend _a._tcp.x"),
    ("dns={refresh='0s'}", "service[0].dns.refresh", "out of range"),
    ("dns={timeout='1s'}", "service[0].dns.timeout", "unknown key"),
    ("[global]\ndns={nameservers=['dns.example:53']}", "global.dns.nameservers[0]",
     "expected an IP address with an optional port"),
    ("[global]\ndns={nameservers=[]}", "global.dns.nameservers", "expected a non-empty array"),
    ("[global]\ndns={nameservers=['127.0.0.1:0']}", "global.dns.nameservers[0]",
     "a nameserver needs a port"),
    ("[global]\ndns={refesh='1s'}", "global.dns.refesh", "did you mean 'refresh'?"),
    ("[global]\ndns={timeout='2m'}", "global.dns.timeout", "out of range"),
]


@pytest.mark.parametrize("extra,path,message", DNS_BAD)
def test_bad_dns_keys_name_the_key_path(extra, path, message):
    svc = "[[service]]\nname='a'\nlisten='127.0.0.1:1'\n"
    text = extra + "\n" + svc if extra.startswith("[global]") else svc + extra
    with pytest.raises(ConfigError) as info:
        config.loads(text)
    assert info.value.path == path, str(info.value)
    assert message in str(info.value)


def test_dns_keys_and_srv_entries():
    cfg = config.loads("[global]\ndns = { refresh = '3s', timeout = '500ms', nameservers = "
                       "['127.0.0.1:5353', '10.0.0.1', '[::1]:53', '::2'] }\n"
                       "[[service]]\nname='a'\nlisten='127.0.0.1:1'\ndns = { refresh = '200ms' }\n"
                       "backends=[{srv='_app._tcp.example.internal', weight=2}, {address='app.x:9'}]\n"
                       "[[service]]\nname='b'\nlisten='127.0.0.1:2'\n")
    assert cfg.global_.dns == config.DnsConfig(3.0, (("127.0.0.1", 5353), ("10.0.0.1", 53),
                                                     ("::1", 53), ("::2", 53)), 0.5)
    a, b = cfg.services
    assert (a.dns_refresh, b.dns_refresh) == (0.2, None)
    srv, host = a.backends
    assert srv.srv and srv.address == config.Address("_app._tcp.example.internal", 0,
                                                     "_app._tcp.example.internal")
    assert srv.weight == 2 and not host.srv
    assert config.loads("[[service]]\nname='a'\nlisten='127.0.0.1:1'\n").global_.dns == config.DnsConfig()
    # the state file's form and back (srv entries written as srv, the refresh kept)
    assert config.service_from_dict(config.service_to_dict(a), "s") == a
    summary = config.summary(cfg)
    assert "backend _app._tcp.example.internal weight 2 (SRV, resolved every 0.2s)" in summary
    assert "backend app.x:9 weight 1 (host name, resolved every 0.2s)" in summary


@pytest.mark.parametrize("text,message", [(t, m) for t, _, _, m in BAD[:6]])
def test_cli_refuses_bad_config_with_exit_2(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    for verb in ("check", "run"):
        out = subprocess.run([sys.executable, "-m", "fastlb", verb, "-c", str(path)],
                             capture_output=True, text=True, timeout=20)
        assert out.returncode == 2, out
        assert message in out.stderr and str(path) in out.stderr
        assert "Traceback" not in out.stderr


def test_cli_check_prints_a_summary(tmp_path):
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    out = subprocess.run([sys.executable, "-m", "fastlb", "check", "-c", str(path)],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0
    assert "service web: listen 127.0.0.1:8080, [::1]:8080; policy maglev (source_ip_port)" in out.stdout
    assert "backend localhost:9002 weight 1" in out.stdout


def test_cli_missing_file_and_version(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastlb", "check", "-c", str(tmp_path / "nope.toml")],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 2 and "cannot read config" in out.stderr
    out = subprocess.run([sys.executable, "-m", "fastlb", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("fastlb ")


def test_readme_config_example_is_valid_and_its_error_sample_is_real():
    import pathlib
    import re
    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    block = re.search(r"```toml\n(.*?)```", readme, re.S).group(1)
    cfg = config.loads(block, resolve=False)
    assert [s.name for s in cfg.services] == ["web", "sticky"]
    bad = block.replace('{ address = "app1.internal:9000" }',
                        '{ address = "app1.internal:9000", weight = 0 }')
    with pytest.raises(ConfigError) as info:
        config.loads(bad, source="fastlb.toml", resolve=False)
    assert f"fastlb: {info.value}" in readme


def test_readme_tls_example_is_valid(tmp_path):
    """The README's TLS / SNI / splice example loads as written, given its certificate files."""
    import pathlib
    import re
    trustme = pytest.importorskip("trustme")
    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    block = re.findall(r"```toml\n(.*?)```", readme, re.S)[1]
    ca = trustme.CA()
    leaf = ca.issue_cert("api.example.com")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "api.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "api.key"))
    lb = ca.issue_cert("lb.internal")
    lb.cert_chain_pems[0].write_to_path(str(tmp_path / "lb.pem"))
    lb.private_key_pem.write_to_path(str(tmp_path / "lb.key"))
    for name in ("clients.pem", "internal-ca.pem"):
        ca.cert_pem.write_to_path(str(tmp_path / name))
    (tmp_path / "fastlb.toml").write_text(block)
    cfg = config.load(str(tmp_path / "fastlb.toml"))
    assert [s.name for s in cfg.services] == ["api", "shop", "other"]
    api, shop, other = cfg.services
    assert api.tls is not None and api.backend_tls is not None
    assert shop.sni == ("shop.example.com", "*.shop.example.com") and other.splice == "auto"


def test_policy_options_defaults_round_trip_and_summary():
    base = "[[service]]\nname='a'\nlisten='127.0.0.1:1'\n"
    svc = config.loads(base).services[0]
    assert (svc.max_fails, svc.hash_balance_factor) == (1, 0)
    assert "max_fails" not in config.service_to_dict(svc)
    for extra, attr, value, shown in (
            ("policy='maglev'\nhash_balance_factor=125", "hash_balance_factor", 125,
             "policy maglev (source_ip, hash_balance_factor 125)"),
            ("max_fails=5", "max_fails", 5, "policy round_robin (max_fails 5)")):
        cfg = config.loads(base + extra)
        svc = cfg.services[0]
        assert getattr(svc, attr) == value
        d = config.service_to_dict(svc)
        assert d[attr] == value
        assert config.service_from_dict(d, "service[0]") == svc
        assert shown in config.summary(cfg)


def test_config_constants_come_from_the_core():
    from fastlb import _core
    assert config.POLICIES == tuple(_core.POLICIES)
    assert config.HASH_KEYS == tuple(_core.HASH_MODES)
    assert (config.MAX_RETRIES, config.MAX_WEIGHT) == (_core.MAX_RETRIES, _core.MAX_WEIGHT)
