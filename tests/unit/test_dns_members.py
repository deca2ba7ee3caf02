"""fastlb.dns: the pure parts (members, ids, SRV priorities and weights, answers -> members,
compute_plan over members, the log said once per change), and the resolver against a DNS server
on loopback (tests/dnsserver.py)."""
import asyncio
import dataclasses
import logging

import pytest
from dnsserver import DnsServer

from fastlb import config, dns
from fastlb.dns import Answer, Member
from fastlb.runtime import compute_plan

SVC = config.loads('''
[[service]]
name = "web"
listen = "127.0.0.1:8080"
backends = [ { address = "10.0.0.1:80", weight = 2 }, { address = "app.test:9000", weight = 3 },
             { srv = "_app._tcp.test" }, { address = "off.test:1", state = "maint" } ]
''').services[0]
IP, HOST, SRV, OFF = SVC.backends
A = (Member(0, "10.0.1.1", 9000), Member(0, "fd00::1", 9000))
S = (Member(1, "10.0.2.1", 80, 10), Member(1, "10.0.2.2", 81, 0), Member(2, "10.0.2.3", 80, 5))
MEMBERS = {"app.test:9000": A, "_app._tcp.test": S, "off.test:1": (Member(0, "10.0.3.1", 1),)}


def test_ids_follows_and_targets():
    assert [dns.follows(b) for b in SVC.backends] == [False, True, True, True]
    assert dns.member_id("app.test:9000", A[1]) == "app.test:9000=[fd00::1]:9000"
    ids = [t.id for t in dns.targets(SVC, MEMBERS)]
    assert ids == ["10.0.0.1:80", "app.test:9000=10.0.1.1:9000", "app.test:9000=[fd00::1]:9000",
                   "_app._tcp.test=10.0.2.1:80", "_app._tcp.test=10.0.2.2:81",
                   "_app._tcp.test=10.0.2.3:80", "off.test:1=10.0.3.1:1"]
    assert [t.id for t in dns.targets(SVC, {})] == ["10.0.0.1:80"]          # pending: no target


def test_weights_priorities_and_diff():
    assert dns.member_weight(HOST, A[0]) == 3                      # the entry's
    assert [dns.member_weight(SRV, m) for m in S] == [10, 1, 5]    # SRV's; 0 counts as 1
    big = config.Backend(SRV.address, weight=1000, srv=True)
    assert dns.member_weight(big, Member(1, "10.0.0.1", 1, 65535)) == config.MAX_WEIGHT
    up = {S[0], S[2]}.__contains__
    assert dns.active_group(S, up) == S[:2]                        # priority 1 has one up
    assert dns.active_group(S, {S[2]}.__contains__) == S[2:]       # only 2 has: fail over
    assert dns.active_group(S, lambda m: False) == S[:2]           # none: the lowest group
    assert dns.active_group(A, lambda m: False) == A               # one group: all of it
    assert dns.diff(S[:2], S[1:]) == ((S[2],), (S[0],))


def test_an_answer_after_the_last_members():
    assert Answer(A, "resolved").after(None) == A
    assert Answer((), "NXDOMAIN").after(A) == ()                   # gone: members leave
    assert Answer(None, "timeout after 2s").after(A) == A          # no answer: kept
    assert Answer(None, "timeout after 2s").after(None) == ()      # never resolved: pending


def slots():
    ids = [t.id for t in dns.targets(SVC, MEMBERS)] + [""]
    return {k: i for i, k in enumerate(ids)}


def test_compute_plan_over_members_is_pure_and_follows_priorities():
    table = slots()
    up = set(table.values())
    p = compute_plan(SVC, table.__getitem__, up.__contains__, {}, 1.0, MEMBERS)
    assert [(b.address, b.weight, b.host, b.port) for b in p.backends] == [
        ("10.0.0.1:80", 2, "10.0.0.1", 80),
        ("app.test:9000=10.0.1.1:9000", 3, "10.0.1.1", 9000),
        ("app.test:9000=[fd00::1]:9000", 3, "fd00::1", 9000),
        ("_app._tcp.test=10.0.2.1:80", 10, "10.0.2.1", 80),
        ("_app._tcp.test=10.0.2.2:81", 1, "10.0.2.2", 81)]       # priority 1; maint: none
    assert [a for _, a in p.names][-1] == "off.test:1=10.0.3.1:1"  # every member, for logs
    assert compute_plan(SVC, table.__getitem__, up.__contains__, {}, 1.0, MEMBERS) == p
    down = up - {table["_app._tcp.test=10.0.2.1:80"], table["_app._tcp.test=10.0.2.2:81"]}
    p2 = compute_plan(SVC, table.__getitem__, down.__contains__, {}, 1.0, MEMBERS)
    assert [b.address for b in p2.backends][-1:] == ["_app._tcp.test=10.0.2.3:80"]   # failover
    pending = compute_plan(SVC, table.__getitem__, up.__contains__, {}, 1.0)
    assert [b.address for b in pending.backends] == ["10.0.0.1:80"]


class Quiet:
    async def resolve(self, b):           # never called: _take is fed by hand
        raise AssertionError


def test_the_log_says_a_failure_once_then_each_change(caplog):
    async def on_change(service, entry, members):
        return True
    w = dns.Watcher(config.DnsConfig(), on_change, resolver=Quiet())
    key = ("web", "app.test:9000")
    feed = [Answer((), "NXDOMAIN"), Answer((), "NXDOMAIN"), Answer(None, "timeout after 2s"),
            Answer(None, "timeout after 2s"), Answer(A, "resolved"), Answer(A, "resolved"),
            Answer(None, "timeout after 2s"), Answer(None, "timeout after 2s"), Answer(A, "resolved"),
            Answer(A[:1], "resolved"), Answer((), "NXDOMAIN"), Answer((), "NXDOMAIN")]
    with caplog.at_level(logging.INFO, logger="fastlb.dns"):
        got = [w._take(key, a, 10.0) for a in feed]
    assert got[-3:] == [A[:1], (), ()]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "service web: backend app.test:9000: cannot resolve (NXDOMAIN): pending (no member, no "
        "traffic), retrying every 10s",
        "service web: backend app.test:9000: cannot resolve (timeout after 2s): pending (no member, "
        "no traffic), retrying every 10s",
        "service web: backend app.test:9000 resolved: 10.0.1.1:9000, [fd00::1]:9000",
        "service web: backend app.test:9000: timeout after 2s; keeping its 2 member(s), retrying every 10s",
        "service web: backend app.test:9000: resolved again: 10.0.1.1:9000, [fd00::1]:9000",
        "service web: backend app.test:9000: members now 10.0.1.1:9000 (+ none; - [fd00::1]:9000, "
        "draining)",
        "service web: backend app.test:9000: NXDOMAIN: its member(s) 10.0.1.1:9000 leave (draining); "
        "retrying every 10s"]


def test_hosts_file_first(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# comment\n127.0.0.2 App.Test alias  # trailing\n::1 app.test\nbad line\n"
                     "127.0.0.9 other.test\n")
    assert dns.hosts_lookup("app.test.", str(hosts)) == ["127.0.0.2", "::1"]
    assert dns.hosts_lookup("nope.test", str(hosts)) == []
    assert dns.hosts_lookup("x", str(tmp_path / "missing")) == []


def test_the_resolver_against_a_loopback_server(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.7 pinned.test\n")

    async def main(server):
        cfg = config.DnsConfig(nameservers=(("127.0.0.1", server.port),), timeout=0.3)
        r = dns.Resolver(cfg, hosts=str(hosts))
        b = config.Backend(config.Address("app.test", 80, "app.test:80"))
        server.set("app.test", A=["127.0.0.2", "127.0.0.3"], AAAA=["::1"])
        assert await r.resolve(b) == Answer((Member(0, "127.0.0.2", 80), Member(0, "127.0.0.3", 80),
                                             Member(0, "::1", 80)), "resolved")
        server.set("app.test", TXT=["x"])
        assert await r.resolve(b) == Answer((), "no A or AAAA record")
        server.nxdomain("app.test")
        assert await r.resolve(b) == Answer((), "NXDOMAIN")
        pinned = config.Backend(config.Address("pinned.test", 1, "pinned.test:1"))
        assert await r.resolve(pinned) == Answer((Member(0, "127.0.0.7", 1),), "resolved")
        srv = config.Backend(config.Address("_x._tcp.test", 0, "_x._tcp.test"), srv=True)
        server.set("_x._tcp.test", SRV=[(2, 0, 81, "a.test"), (1, 7, 80, "a.test"), (1, 1, 82, "gone.test"),
                                        (3, 1, 83, "pinned.test")])
        server.set("a.test", A=["127.0.0.4"])
        assert await r.resolve(srv) == Answer((Member(1, "127.0.0.4", 80, 7), Member(2, "127.0.0.4", 81, 0),
                                               Member(3, "127.0.0.7", 83, 1)), "resolved")
        server.nxdomain("_x._tcp.test")
        assert await r.resolve(srv) == Answer((), "NXDOMAIN")
        server.set("_x._tcp.test", A=["127.0.0.1"])
        assert await r.resolve(srv) == Answer((), "no SRV record")
        server.silent = True
        assert await r.resolve(b) == Answer(None, "timeout after 0.3s")
        assert await r.resolve(srv) == Answer(None, "timeout after 0.3s")

    with DnsServer() as server:
        asyncio.run(asyncio.wait_for(main(server), 20))


def test_entry_info_shows_members_under_the_entry():
    class View:
        def slot(self, service, address):
            return {"app.test:9000=10.0.1.1:9000": 1, "app.test:9000=[fd00::1]:9000": 2}.get(address)

        def is_up(self, slot):
            return slot == 1

        def counters(self, slot):
            return {"total": 10 * slot, "active": slot}

        def check(self, service, address):
            return (slot := self.slot(service, address)) and (slot, f"reason {slot}")

        def gauges(self, service, address):
            slot = self.slot(service, address)
            return {"cur": slot, "max": 4 * slot}

    info = dns.entry_info(View(), "web", HOST, A, "resolved", True, ("total", "active"))
    # the gauges: connections now summed, each member's own cap and peak beside its counters
    assert (info["cur"], info["max"], info["limit"]) == (3, 12, HOST.max_conns)
    assert [(m["cur"], m["max"], m["limit"]) for m in info["members"]] == [
        (1, 4, HOST.max_conns), (2, 8, HOST.max_conns)]
    assert {k: info[k] for k in ("address", "weight", "state", "health", "total", "active",
                                 "check_failures", "health_reason", "dns")} == {
        "address": "app.test:9000", "weight": 3, "state": "ready", "health": "up", "total": 30,
        "active": 3, "check_failures": 3, "health_reason": "1 of 2 member(s) up", "dns": "resolved"}
    assert [(m["address"], m["health"], m["total"]) for m in info["members"]] == [
        ("10.0.1.1:9000", "up", 10), ("[fd00::1]:9000", "down", 20)]
    pending = dns.entry_info(View(), "web", HOST, (), "NXDOMAIN", False, ())
    assert (pending["health"], pending["members"], pending["dns"]) == ("down", [], "NXDOMAIN")


@pytest.mark.parametrize("text", ["a.test:1", "_x._tcp.test"])
def test_followed_entries_never_reach_the_data_path_as_names(text):
    key = "srv" if text.startswith("_") else "address"
    svc = config.loads(f'[[service]]\nname="s"\nlisten="127.0.0.1:1"\n'
                       f'backends=[{{ {key} = "{text}" }}]').services[0]
    p = compute_plan(svc, lambda a: 0, lambda s: True, {}, 0.0)
    assert p.backends == () and p.names == ()


def test_the_watcher_offers_a_refused_change_again_and_stops_following_removed_entries():
    """A change the supervisor refuses (no free slot) is offered again at the next refresh,
    though DNS answers the same; an entry removed from the services is no longer resolved."""
    answers = [Answer(A, "resolved")] * 3 + [Answer(A[:1], "resolved")] * 100

    class Scripted:
        calls = 0

        async def resolve(self, b):
            Scripted.calls += 1
            return answers[min(Scripted.calls - 1, len(answers) - 1)]

    offered = []

    async def on_change(service, entry, members):
        offered.append(members)
        return len(offered) > 1                 # the first offer is refused

    async def main():
        w = dns.Watcher(config.DnsConfig(refresh=0.01), on_change, resolver=Scripted())
        w.sync({"web": dataclasses.replace(SVC, backends=(IP, HOST))})
        for _ in range(400):
            await asyncio.sleep(0.01)
            if len(offered) >= 3:
                break
        assert offered[:3] == [A, A, A[:1]]     # refused, offered again, then the change
        assert set(w.tasks) == {("web", "app.test:9000")}
        w.sync({"web": dataclasses.replace(SVC, backends=(IP,))})
        assert w.tasks == {} and w.members == {}
        before = Scripted.calls
        await asyncio.sleep(0.05)
        assert Scripted.calls == before
        w.stop()

    asyncio.run(asyncio.wait_for(main(), 20))
