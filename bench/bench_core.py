"""pick() per policy (rounds of 1,024 calls) at N = 4, 100, 1000 backends: Cython against the
pure-Python reference.

Run: python3 -m pytest bench/bench_core.py --benchmark-only --benchmark-group-by=param:n
(or `make bench`). `bench/core_table.py` turns the saved JSON into the ratio table.
"""
import pytest

from fastlb import _core, reference

POLICIES = list(_core.POLICIES)


class Setup:
    def __init__(self, n):
        self.n = n
        self.health = _core.HealthBitmap(bytearray(_core.HealthBitmap.size_for(n)), n)
        self.counters = _core.Counters(bytearray(_core.Counters.size_for(n)), n)
        self.ref_health = reference.RefHealth(range(n))
        self.slots = list(range(n))
        self.weights = [1 + (i * 7) % 10 for i in range(n)]
        for s in self.slots:
            self.health.mark_up(s)
            self.counters.add(0, s, 0, s % 13)     # some active connections

    def fast(self, name):
        return _core.make_policy(name, self.slots, self.weights, self.health,
                                 counters=self.counters, seed=1)

    def ref(self, name):
        active = self.counters.active
        return {
            "round_robin": lambda: reference.RefRoundRobin(self.slots, self.weights, self.ref_health),
            "random": lambda: reference.RefWeightedRandom(self.slots, self.weights, self.ref_health, 1),
            "least_conn": lambda: reference.RefLeastConn(self.slots, self.weights, self.ref_health,
                                                         active, 1),
            "maglev": lambda: reference.RefMaglev(self.slots, self.weights, self.ref_health),
        }[name]()


SETUPS = {n: Setup(n) for n in (4, 100, 1000)}
KEYS = [(i * 0x9E3779B97F4A7C15) & (2**64 - 1) for i in range(1024)]


def _picker(policy):
    """1,024 picks from Python per round, the same loop for both implementations."""
    pick = policy.pick

    def run():
        for k in KEYS:
            pick(k)
    return run


@pytest.mark.parametrize("n", [4, 100, 1000])
@pytest.mark.parametrize("policy", POLICIES)
def test_cython(benchmark, policy, n):
    benchmark.group = f"n={n}"
    benchmark.extra_info.update(impl="cython", policy=policy, n=n)
    benchmark(_picker(SETUPS[n].fast(policy)))


@pytest.mark.parametrize("n", [4, 100, 1000])
@pytest.mark.parametrize("policy", POLICIES)
def test_cython_cdef_path(benchmark, policy, n):
    """1,000 picks through the cdef method, as the data path calls it (reported per 1,000)."""
    benchmark.group = f"n={n}"
    benchmark.extra_info.update(impl="cython-cdef-x1000", policy=policy, n=n)
    p = SETUPS[n].fast(policy)
    benchmark(_core.pick_many, p, 1000)


@pytest.mark.parametrize("n", [4, 100, 1000])
@pytest.mark.parametrize("policy", POLICIES)
def test_reference(benchmark, policy, n):
    benchmark.group = f"n={n}"
    benchmark.extra_info.update(impl="reference", policy=policy, n=n)
    if policy == "maglev" and n == 1000:
        benchmark.extra_info["note"] = "table build is minutes in Python; skipped"
        pytest.skip("reference Maglev table build at N=1000 takes minutes")
    benchmark(_picker(SETUPS[n].ref(policy)))


# -- access lists: lookup cost against the number of CIDRs ------------------------------------
# Run: python3 -m pytest bench/bench_core.py -k acl --benchmark-only --benchmark-group-by=param:ncidrs
# The cdef path does 1,000 lookups per round (divide the median by 1,000 for ns per lookup).

def _acl_lists(n):
    """n CIDRs, half allow and half deny, IPv4 (/24 allows with /32 holes) and IPv6 (/48 allows
    with /64 holes), none merging away."""
    allow = [f"10.{(i // 256) % 256}.{i % 256}.0/24" for i in range(0, n, 4)]
    allow += [f"2001:db8:{i:x}::/48" for i in range(2, n, 4)]
    deny = [f"10.{(i // 256) % 256}.{i % 256}.{(i * 7) % 256}/32" for i in range(1, n, 4)]
    deny += [f"2001:db8:{i - 1:x}:{i:x}::/64" for i in range(3, n, 4)]
    return allow, deny


ACLS = {n: _core.Acl(*_acl_lists(n)) for n in (10, 1000, 10000)}
CLIENTS = {"v4": "10.0.4.9", "v6": "2001:db8:6:5::1"}


@pytest.mark.parametrize("family", ["v4", "v6"])
@pytest.mark.parametrize("ncidrs", [10, 1000, 10000])
def test_acl_cdef_path(benchmark, ncidrs, family):
    benchmark.group = f"acl ncidrs={ncidrs}"
    benchmark.extra_info.update(impl="cython-cdef-x1000", ncidrs=ncidrs, family=family,
                                intervals=ACLS[ncidrs].n4 + ACLS[ncidrs].n6)
    benchmark(_core.acl_admits_many, ACLS[ncidrs], CLIENTS[family], 1000)


@pytest.mark.parametrize("family", ["v4", "v6"])
@pytest.mark.parametrize("ncidrs", [10, 1000, 10000])
def test_acl_reference(benchmark, ncidrs, family):
    from fastlb.reference_access import RefAcl
    benchmark.group = f"acl ncidrs={ncidrs}"
    benchmark.extra_info.update(impl="reference-x1", ncidrs=ncidrs, family=family)
    benchmark(RefAcl(*_acl_lists(ncidrs)).admits, CLIENTS[family])


# -- per-source table: one acquire + release through the cdef path (1,000 per round) -----------

@pytest.mark.parametrize("limits", ["conns", "conns+rate"])
def test_source_table_cdef_path(benchmark, limits):
    benchmark.group = "source table"
    benchmark.extra_info.update(impl="cython-cdef-x1000", limits=limits)
    t = _core.SourceTable(bytearray(_core.SourceTable.size_for(1 << 16)), 1 << 16)
    rate = 1_000_000 if limits == "conns+rate" else 0
    benchmark(_core.source_acquire_many, t, "192.0.2.1", 1000, 100, rate, 1000)
