"""bench/e2e.py's parsers and tables, on real outputs of wrk, iperf3 and strace captured on this
project's machine (tests/unit/bench_outputs/), and the fastlb config it writes."""
import importlib.util
import json
import os
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "bench")
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_outputs")
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(BENCH, "e2e.py")),
                                reason="needs the source checkout")


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("bench_e2e", os.path.join(BENCH, "e2e.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_e2e"] = mod               # dataclasses look their module up
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("bench_e2e", None)


def _read(name):
    with open(os.path.join(OUT, name)) as f:
        return f.read()


def test_wrk_report(e2e):
    r = e2e.parse_wrk(_read("wrk-keepalive.txt"))
    assert r == {"value": 6014.55, "count": 6379, "p50_ms": 11.70, "p99_ms": 31.74, "errors": 0}
    r = e2e.parse_wrk(_read("wrk-close.txt"))
    assert (r["value"], r["count"], r["p50_ms"], r["p99_ms"]) == (334.80, 363, 168.08, 294.30)


def test_wrk_errors_are_counted_and_a_report_without_rate_is_an_error(e2e):
    r = e2e.parse_wrk(_read("wrk-errors.txt"))       # wrk against a port that is not HTTP
    assert r["value"] == 0.0 and r["count"] == 0 and r["errors"] == 64
    assert r["p99_ms"] == 0.0
    with pytest.raises(RuntimeError, match="wrk reported no rate"):
        e2e.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_iperf_report(e2e):
    for name in ("iperf-up.json", "iperf-down.json"):
        got = json.loads(_read(name))["end"]["sum_received"]
        r = e2e.parse_iperf(_read(name))
        assert r["value"] == got["bits_per_second"] / 1e9 and r["count"] == got["bytes"] / 1e6
        # the rate is the bytes over the receiver's seconds: both figures describe one transfer
        assert r["count"] * 8e6 / got["seconds"] == pytest.approx(r["value"] * 1e9)
    with pytest.raises(RuntimeError, match="Connection refused"):
        e2e.parse_iperf(_read("iperf-refused.json"))


def test_strace_summary(e2e):
    calls = e2e.parse_strace(_read("strace-haproxy-close.txt"))
    assert calls["total"] == 6939 and calls["connect"] == 372 and calls["recvfrom"] == 1459
    assert calls["total"] == sum(v for k, v in calls.items() if k != "total")
    calls = e2e.parse_strace(_read("strace-haproxy-splice-on-bulk.txt"))
    assert calls["splice"] == 51309 and calls["total"] == 51703
    # the trailing "strace: Process N detached" lines are not syscalls
    calls = e2e.parse_strace(_read("strace-fastlb-2w-close.txt"))
    assert calls["total"] == 22909 and calls["getsockopt"] == 1130 and "Process" not in calls
    with pytest.raises(RuntimeError, match="no strace summary"):
        e2e.parse_strace("strace: attach: ptrace(PTRACE_SEIZE, 1): Operation not permitted\n")


def test_tables_divide_by_cpu_and_by_the_round_s_work(e2e):
    """Per core is the median of (figure / CPU share); syscalls per connection is the strace
    round's total over its wrk's request count."""
    fl = e2e.parse_wrk(_read("wrk-fastlb-close.txt"))
    ha = e2e.parse_wrk(_read("wrk-close.txt"))
    samples = {("close", "haproxy"): [dict(ha, cpu_pct=50.0), dict(ha, cpu_pct=25.0)],
               ("close", "fastlb-2w"): [dict(fl, cpu_pct=80.0)]}
    sysc = {("close", "haproxy"): {"calls": e2e.parse_strace(_read("strace-haproxy-close.txt")),
                                   "count": ha["count"], "value": ha["value"]},
            ("close", "fastlb-2w"): {"calls": e2e.parse_strace(_read("strace-fastlb-2w-close.txt")),
                                     "count": fl["count"], "value": fl["value"]}}
    md = e2e.tables(["close"], ["haproxy", "fastlb-2w"], samples, sysc,
                    {"haproxy": {"per_conn_kib": 3.25}})
    per_load = md.split("**close**")[1].split("**syscalls")[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")]
            for line in per_load.splitlines() if line.startswith("| ")}
    ha_core = (334.80 * 2 + 334.80 * 4) / 2                    # median of 669.6 and 1339.2
    fl_core = 1087.35 / 0.8
    summary = md.split("\n\n")[0].splitlines()
    assert summary[0].startswith("| proxy | close per core (conn/s) | syscalls per connection")
    assert summary[2] == f"| haproxy | {ha_core:,.0f} | {6939 / 363:.1f} | 3.2 |"
    assert summary[3] == (f"| fastlb-2w | {fl_core:,.0f} ({fl_core / ha_core:.2f}x) | "
                          f"{22909 / 1090:.1f} | - |")
    assert rows["fastlb-2w"][1] == "1,087" and rows["fastlb-2w"][2] == f"{1087.35 / 334.80:.2f}x"
    # the breakdown: per connection, the most frequent first, and what is left in "other"
    head = next(line for line in md.splitlines() if line.startswith("| proxy | total |"))
    # recvfrom: 1459 / 363 + 4417 / 1090 per connection, over both; epoll_ctl 1235 / 363 + 4530 / 1090
    assert [c.strip() for c in head.split("|")[3:5]] == ["recvfrom", "epoll_ctl"]
    assert f"| fastlb-2w | {22909 / 1090:.1f} | {4417 / 1090:.2f} | {4530 / 1090:.2f} |" in md


def test_fastlb_config_keys_are_set_in_one_place(e2e):
    glob, svc = {}, {}
    e2e.fastlb_set("splice=off", glob, svc)                    # a bare word: a string
    e2e.fastlb_set("service.splice=\"on\"", glob, svc)
    e2e.fastlb_set("global.buffer_budget=1048576", glob, svc)
    assert glob == {"splice": '"off"', "buffer_budget": "1048576"} and svc == {"splice": '"on"'}
    doc = tomllib.loads(e2e.fastlb_config([(1001, 2001), (1002, 2002)], 2, glob, svc))
    assert doc["global"] == {"workers": 2, "splice": "off", "buffer_budget": 1048576}
    assert [(s["listen"], s["backends"][0]["address"], s["splice"]) for s in doc["service"]] == [
        (["127.0.0.1:1001"], "127.0.0.1:2001", "on"), (["127.0.0.1:1002"], "127.0.0.1:2002", "on")]
    with pytest.raises(ValueError, match="KEY=VALUE"):
        e2e.fastlb_set("splice", glob, svc)


def test_the_config_the_bench_writes_is_one_fastlb_accepts(e2e):
    from fastlb import config
    for name in ("fastlb", "fastlb-2w", "fastlb-acl", "fastlb-2w-log"):
        workers, glob, svc = e2e.fastlb_variant(name)
        cfg = config.loads(e2e.fastlb_config([(1001, 2001), (1002, 2002)], workers, glob, svc))
        assert len(cfg.services) == 2


def test_peer_line_up(e2e):
    a = e2e.parse_args(["--workers", "1,2", "--acl", "--connlog",
                        "--fastlb-peer", "fastlb-nosplice:splice=off"])
    peers = e2e.peer_list(a)
    assert peers == ["haproxy", "haproxy-acl", "haproxy-splice-auto", "haproxy-splice-on",
                     "nginx", "fastlb", "fastlb-log", "fastlb-2w", "fastlb-2w-log", "fastlb-acl",
                     "asyncio-protocol", "fastlb-nosplice"]
    assert e2e.fastlb_variant("fastlb-nosplice") == (1, {"splice": '"off"'}, {})
    assert e2e.DEFAULT_LOADS == ["keepalive", "close", "bulk_up", "bulk_down", "mixed"]
    with pytest.raises(SystemExit, match="unknown peer 'varnish'"):
        e2e.peer_list(e2e.parse_args(["--only", "varnish"]))


def test_other_benches_register_loads_peers_and_backends(e2e, tmp_path, monkeypatch):
    """A module named in PLUGINS (bench/e2e_tls.py, say) adds its load, its peer and its backend;
    the tables and the tool check take them in; a missing plugin is skipped."""
    (tmp_path / "e2e_fake_plugin.py").write_text(
        "import e2e\n"
        "e2e.BACKENDS['fake'] = lambda stack: 1\n"
        "e2e.TOOLS['fake'] = ['fake-tool']\n"
        "e2e.PEER_STARTERS['fake-proxy'] = lambda stack, backends: (None, backends)\n"
        "e2e.register_load(e2e.Load('fake_load', 'hs/s', ('fake',), lambda ports, d, o: {},\n"
        "                           per='handshake', title='fake handshakes'), default=False)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "e2e", e2e)
    monkeypatch.setattr(e2e, "PLUGINS", ["e2e_no_such_plugin", "e2e_fake_plugin"])
    try:
        e2e.load_plugins()
        assert "fake_load" in e2e.LOADS and "fake_load" not in e2e.DEFAULT_LOADS
        a = e2e.parse_args(["--only", "fake-proxy,fastlb", "--loads", "fake_load"])
        peers = e2e.peer_list(a)
        assert "fake-tool" in e2e.required_tools(a, peers, ["fake_load"])
        md = e2e.tables(["fake_load"], ["fake-proxy"],
                        {("fake_load", "fake-proxy"): [{"value": 900.0, "cpu_pct": 50.0}]}, {}, {})
        assert "| fake-proxy | 1,800 |" in md and "**fake_load** (fake handshakes; hs/s)" in md
    finally:
        e2e.LOADS.pop("fake_load", None)
        e2e.PEER_STARTERS.pop("fake-proxy", None)
        e2e.BACKENDS.pop("fake", None)
        e2e.TOOLS.pop("fake", None)
        sys.modules.pop("e2e_fake_plugin", None)
