"""Policy options end to end through `fastlb run`: maglev's hash_balance_factor (HAProxy's
hash-balance-factor) and round robin's max_fails (nginx's), with real backends on 127.0.0.1."""
import collections
import re
import socket
import time

from helpers import closed_port, service, start_backend, start_fastlb

from fastlb import reference
from fastlb.admin.client import AdminClient


def ports_by_service(lb):
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"service (\S+): listening on \S+:(\d+)", lb.output)}


def hold_connections(port, count):
    """Open ``count`` connections one after the other and keep them open; the backend names."""
    socks, names = [], []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        names.append(s.recv(16).decode().strip())   # established before the next one is picked
        socks.append(s)
    return socks, names


def test_maglev_balance_factor_spreads_a_hot_key(procs, tmp_path):
    ports = [start_backend(procs, "announce", name=n)[1] for n in "abc"]
    backends = [(p, 1) for p in ports]
    lb, _ = start_fastlb(procs, (
        service("plain", backends, policy='"maglev"')
        + service("bounded", backends, policy='"maglev"', hash_balance_factor=125)))
    plain, bounded = ports_by_service(lb)["plain"], ports_by_service(lb)["bounded"]
    socks, names = hold_connections(plain, 30)        # one client address: one key
    assert len(set(names)) == 1, names                # without a bound they all pile on one
    for s in socks:
        s.close()
    time.sleep(0.2)
    socks, names = hold_connections(bounded, 30)
    counts = collections.Counter(names)
    # (active + 1) x 3 x 100 <= 125 x (total + 1) x 1 for the 30th: at most 12 on any backend
    assert len(counts) == 3 and max(counts.values()) <= 12, counts
    for s in socks:
        s.close()


def test_round_robin_max_fails_sets_how_far_a_failing_backend_drops(procs, tmp_path):
    _, good = start_backend(procs, "announce", name="a")
    dead = closed_port()
    backends = [(good, 10), (dead, 10)]
    text = f'[global]\nadmin = "unix:{tmp_path}/admin.sock"\n'
    for name, max_fails in (("mf1", 1), ("mf3", 3), ("mf1000", 1000)):
        text += service(name, backends, max_fails=max_fails)
    lb, _ = start_fastlb(procs, text)
    n = 40
    for port in ports_by_service(lb).values():
        for _ in range(n):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                assert s.recv(16) == b"a\n"               # failover hides the dead backend
    time.sleep(0.2)
    with AdminClient(socket_path=f"{tmp_path}/admin.sock") as c:
        stats = {svc["service"]: svc for svc in c.call("stats")}
    for name, max_fails in (("mf1", 1), ("mf3", 3), ("mf1000", 1000)):
        # the exact count nginx's rule gives, from the reference twin driven like the engine
        rr = reference.RefRoundRobin([0, 1], [10, 10], reference.RefHealth([0, 1]),
                                     max_fails=max_fails)
        expected = 0
        for _ in range(n):
            tried = []
            while rr.pick(0, tried) == 1:
                rr.report_failure(1)
                tried.append(1)
                expected += 1
        (dead_stats,) = [b for b in stats[name]["backends"] if b["address"] == f"127.0.0.1:{dead}"]
        assert dead_stats["connect_failures"] == expected, (name, dead_stats, expected)
    # max_fails = 1000 (weight // 1000 = 0): no drop, the dead backend is tried every other time
    assert stats["mf1000"]["backends"][1]["connect_failures"] == n // 2
    assert (stats["mf1"]["backends"][1]["connect_failures"]
            < stats["mf3"]["backends"][1]["connect_failures"] < n // 2)
