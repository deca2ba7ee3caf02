"""The four policies: Cython against the pure-Python reference, and their own guarantees."""
import collections
import mmap
import os

import pytest
from hypothesis import given, settings, strategies as st

from fastlb import _core, reference
from fastlb.errors import CoreArgumentError, CoreTypeError

NSLOTS = 256


class World:
    """A health bitmap (Cython) and its reference twin, moved together."""

    def __init__(self, nslots=NSLOTS):
        self.health = _core.HealthBitmap(bytearray(_core.HealthBitmap.size_for(nslots)), nslots)
        self.ref = reference.RefHealth()
        self.counters = _core.Counters(bytearray(_core.Counters.size_for(nslots)), nslots)

    def set(self, slot, up):
        (self.health.mark_up if up else self.health.mark_down)(slot)
        self.ref.set(slot, up)

    def active(self, slot):
        return self.counters.active(slot)


def world_with(slots, nslots=NSLOTS):
    w = World(nslots)
    for s in slots:
        w.set(s, True)
    return w


# -- round robin ------------------------------------------------------------------------------

def test_round_robin_5_1_1_is_nginx_sequence():
    w = world_with([0, 1, 2])
    rr = _core.RoundRobin([0, 1, 2], [5, 1, 1], w.health)
    assert "".join("abc"[rr.pick()] for _ in range(14)) == "aabacaa" * 2


ops = st.lists(st.one_of(
    st.tuples(st.just("pick"), st.integers(0, 5)),          # pick with a few slots tried
    st.tuples(st.just("flip"), st.integers(0, 19)),
    st.tuples(st.just("fail"), st.integers(0, 19)),
), max_size=300)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 1000), min_size=1, max_size=20), ops, st.randoms(),
       st.one_of(st.none(), st.integers(1, _core.MAX_FAILS)))
def test_round_robin_matches_reference(weights, script, rnd, max_fails):
    slots = list(range(len(weights)))
    w = world_with(slots)
    options = None if max_fails is None else {"max_fails": max_fails}
    fast = _core.RoundRobin(slots, weights, w.health, options=options)
    slow = reference.RefRoundRobin(slots, weights, w.ref, max_fails=max_fails or 1)
    for op, arg in script:
        if op == "pick":
            tried = rnd.sample(slots, min(arg, len(slots)))
            assert fast.pick(0, tried) == slow.pick(0, tried)
        elif op == "flip" and arg < len(slots):
            w.set(arg, not w.ref.is_up(arg))
        elif op == "fail" and arg < len(slots):
            fast.report_failure(arg)
            slow.report_failure(arg)
    assert fast.state() == list(zip(slow.current, slow.effective, strict=False))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=12))
def test_round_robin_exact_counts_in_every_window(weights):
    slots = list(range(len(weights)))
    rr = _core.RoundRobin(slots, weights, world_with(slots).health)
    total = sum(weights)
    seq = [rr.pick() for _ in range(3 * total)]
    for start in range(2 * total + 1):        # every sliding window of sum(weights) picks
        counts = collections.Counter(seq[start:start + total])
        assert [counts[s] for s in slots] == weights


def test_round_robin_failure_lowers_effective_weight_then_recovers():
    w = world_with([0, 1])
    rr = _core.RoundRobin([0, 1], [4, 4], w.health)
    rr.report_failure(0)
    assert rr.state()[0][1] == 0                      # max_fails = 1: weight // 1 removed
    picks = [rr.pick() for _ in range(8)]
    assert picks.count(1) > picks.count(0)            # eased back in, not at full share at once
    assert rr.state()[0][1] == 4                      # one step per round, back to full


def test_round_robin_max_fails_scales_the_drop():
    w = world_with([0, 1])
    rr = _core.make_policy("round_robin", [0, 1], [10, 10], w.health, options={"max_fails": 4})
    assert rr.max_fails == 4
    rr.report_failure(0)
    assert rr.state()[0][1] == 10 - 10 // 4           # nginx: weight // max_fails per failure
    rr.report_failure(0)
    rr.report_failure(0)
    assert rr.state()[0][1] == 10 - 3 * (10 // 4)
    rr.report_failure(0)
    rr.report_failure(0)
    assert rr.state()[0][1] == 0                      # floored at 0


def test_failures_through_the_engine_path_match_the_reference():
    # what Session._failed_attempt does per failed connect: pick, on_failure, retry with tried
    w = world_with([0, 1, 2])
    for max_fails in (1, 3, 1000):
        fast = _core.RoundRobin([0, 1, 2], [6, 3, 1], w.health, options={"max_fails": max_fails})
        slow = reference.RefRoundRobin([0, 1, 2], [6, 3, 1], w.ref, max_fails=max_fails)
        seq = []
        for _ in range(60):
            tried = []
            while (s := fast.pick(0, tried)) == 1:     # backend 1 refuses every connect
                assert slow.pick(0, tried) == 1
                fast.report_failure(1)
                slow.report_failure(1)
                tried.append(1)
            assert slow.pick(0, tried) == s
            seq.append(s)
        assert fast.state() == list(zip(slow.current, slow.effective, strict=False))

# -- random and least_conn ---------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 1000), min_size=1, max_size=30), ops, st.integers(0, 2**64 - 1),
       st.randoms())
def test_random_matches_reference(weights, script, seed, rnd):
    slots = list(range(len(weights)))
    w = world_with(slots)
    fast = _core.WeightedRandom(slots, weights, w.health, seed=seed)
    slow = reference.RefWeightedRandom(slots, weights, w.ref, seed=seed)
    for op, arg in script:
        if op == "pick":
            tried = rnd.sample(slots, min(arg, len(slots)) if rnd.random() < 0.3 else 0)
            got = fast.pick(0, tried)
            assert got == slow.pick(0, tried)
            assert got == -1 or (w.ref.is_up(got) and got not in tried)
        elif op == "flip" and arg < len(slots):
            w.set(arg, not w.ref.is_up(arg))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 1000), min_size=1, max_size=40), st.sets(st.integers(0, 39)))
def test_random_alias_table_is_exact(weights, down):
    from fractions import Fraction
    slots = list(range(len(weights)))
    w = world_with(slots)
    for s in down & set(slots):
        w.set(s, False)
    up = [s for s in slots if s not in down]
    total = sum(weights[s] for s in up)
    fast = _core.WeightedRandom(slots, weights, w.health)
    assert fast.probabilities() == {s: Fraction(weights[s], total) for s in up}


def test_random_draws_follow_weights():
    w = world_with([0, 1, 2])
    r = _core.WeightedRandom([0, 1, 2], [1, 2, 7], w.health, seed=42)
    counts = collections.Counter(r.pick() for _ in range(100_000))
    for slot, share in ((0, 0.1), (1, 0.2), (2, 0.7)):
        assert abs(counts[slot] / 100_000 - share) < 0.01


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 100), min_size=1, max_size=20),
       st.lists(st.tuples(st.sampled_from(["pick", "open", "close", "flip"]),
                          st.integers(0, 19)), max_size=300),
       st.integers(0, 2**64 - 1))
def test_least_conn_matches_reference(weights, script, seed):
    slots = list(range(len(weights)))
    w = world_with(slots)
    fast = _core.LeastConn(slots, weights, w.health, counters=w.counters, seed=seed)
    slow = reference.RefLeastConn(slots, weights, w.ref, w.active, seed=seed)
    for op, arg in script:
        if arg >= len(slots):
            continue
        if op == "pick":
            assert fast.pick() == slow.pick()
        elif op == "open":
            w.counters.add(0, arg, 0, 1)
        elif op == "close" and w.active(arg) > 0:
            w.counters.add(0, arg, 0, -1)
        elif op == "flip":
            w.set(arg, not w.ref.is_up(arg))


def test_least_conn_balances_open_connections():
    w = world_with(range(4))
    lc = _core.LeastConn(range(4), [1, 1, 1, 1], w.health, counters=w.counters, seed=7)
    for _ in range(400):                   # connections that never close
        w.counters.add(0, lc.pick(), 0, 1)
    active = [w.active(s) for s in range(4)]
    assert max(active) - min(active) <= 10   # P2C keeps them within a few of each other


# -- maglev -------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 20), min_size=1, max_size=8), st.sets(st.integers(0, 7)),
       st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=50), st.randoms())
def test_maglev_matches_reference(weights, down, keys, rnd):
    slots = [3 * i + 1 for i in range(len(weights))]
    w = world_with(slots)
    m = reference.RefMaglev(slots, weights, w.ref, table_size=1009).m
    fast = _core.Maglev(slots, weights, w.health, options={"table_size": m})
    slow = reference.RefMaglev(slots, weights, w.ref, table_size=m)
    assert fast.table_slots() == slow.table_slots()
    for i in down:
        if i < len(slots):
            w.set(slots[i], False)
    for k in keys:
        tried = rnd.sample(slots, rnd.randint(0, len(slots)))
        assert fast.pick(k) == slow.pick(k)
        assert fast.pick(k, tried) == slow.pick(k, tried)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 10), min_size=2, max_size=8),
       st.lists(st.tuples(st.integers(0, 7), st.integers(-1, 3)), max_size=40),
       st.one_of(st.sampled_from([100, 125, 200]), st.integers(100, _core.MAX_BALANCE_FACTOR)))
def test_maglev_bounded_load_matches_reference(weights, script, factor):
    slots = list(range(len(weights)))
    w = world_with(slots)
    fast = _core.Maglev(slots, weights, w.health, counters=w.counters,
                        options={"table_size": 1009, "hash_balance_factor": factor})
    slow = reference.RefMaglev(slots, weights, w.ref, table_size=1009, balance_factor=factor,
                               active=w.active)
    for key, (i, delta) in enumerate(script):
        if i < len(slots) and w.active(i) + delta >= 0:
            w.counters.add(0, i, 0, delta)
        got = fast.pick(key * 7919)
        assert got == slow.pick(key * 7919)
        w.counters.add(0, got, 0, 1)


def test_maglev_bounded_load_caps_a_hot_key():
    w = world_with(range(5))
    mg = _core.make_policy("maglev", range(5), [1] * 5, w.health, counters=w.counters,
                           options={"hash_balance_factor": 125})
    for _ in range(500):                                 # one client key, 500 open connections
        w.counters.add(0, mg.pick(12345), 0, 1)
    assert max(w.active(s) for s in range(5)) <= 1.25 * 500 / 5 + 1


def test_maglev_without_a_balance_factor_piles_a_hot_key_on_one_backend():
    w = world_with(range(5))
    mg = _core.make_policy("maglev", range(5), [1] * 5, w.health, counters=w.counters)
    for _ in range(50):
        w.counters.add(0, mg.pick(12345), _core.CTR_ACTIVE, 1)
    assert sorted(w.active(s) for s in range(5)) == [0, 0, 0, 0, 50]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 1000), min_size=1, max_size=100))
def test_maglev_shares_follow_weights(weights):
    slots = list(range(len(weights)))
    mg = _core.Maglev(slots, weights, world_with(slots).health)
    assert mg.table_size == 65537
    counts = collections.Counter(mg.table_slots())
    total = sum(weights)
    for s, wt in zip(slots, weights, strict=False):
        ideal = 65537 * wt / total
        # within 1% of the ideal share; integer granularity allows +-2 entries for tiny shares
        assert abs(counts[s] - ideal) <= max(0.01 * ideal, 2), (s, counts[s], ideal)


@pytest.mark.parametrize("n", [10, 37, 100])
def test_maglev_flap_moves_only_the_flapping_backends_keys(n):
    slots = list(range(n))
    w = world_with(slots)
    mg = _core.Maglev(slots, [1 + (s % 5) for s in slots], w.health)
    keys = range(0, 2**64 - 1, (2**64 - 1) // 70_001)   # spread over the whole key space
    before = [mg.pick(k) for k in keys]
    victim = n // 2
    w.set(victim, False)
    during = [mg.pick(k) for k in keys]
    for b, d in zip(before, during, strict=False):
        assert d == b if b != victim else d != victim
    w.set(victim, True)
    assert [mg.pick(k) for k in keys] == before


@pytest.mark.parametrize("n", [10, 100])
def test_maglev_membership_change_moves_at_most_twice_the_ideal(n):
    health = world_with(range(n)).health
    ids = [f"10.0.{i // 250}.{i % 250}:80" for i in range(n)]
    full = _core.Maglev(range(n), [1] * n, health, ids=ids).table_slots()
    gone = n // 3
    rest = [s for s in range(n) if s != gone]
    less = _core.Maglev(rest, [1] * (n - 1), health, ids=[ids[s] for s in rest]).table_slots()
    moved = sum(1 for a, b in zip(full, less, strict=False) if a != b)
    assert moved / len(full) <= 2 / n


def test_maglev_table_size_is_raised_for_many_backends():
    n = 700
    mg = _core.Maglev(range(n), [1] * n, world_with(range(n), nslots=1024).health)
    assert mg.table_size > 100 * n and _core.next_prime(mg.table_size) == mg.table_size


def test_maglev_table_built_in_a_child_is_identical():
    slots = list(range(50))
    weights = [1 + s % 7 for s in slots]
    ids = [f"backend-{s}" for s in slots]
    health = world_with(slots).health
    parent = _core.Maglev(slots, weights, health, ids=ids).table_slots()
    shm = mmap.mmap(-1, 4 * 65537, flags=mmap.MAP_SHARED)
    pid = os.fork()
    if pid == 0:
        try:
            child = _core.Maglev(slots, weights, health, ids=ids).table_slots()
            memoryview(shm).cast("i")[:] = memoryview(bytearray(4 * 65537)).cast("i")
            out = memoryview(shm).cast("i")
            for p, s in enumerate(child):
                out[p] = s
            out.release()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert list(memoryview(shm).cast("i")) == parent


# -- the common interface ------------------------------------------------------------------------

def all_policies(slots, weights, w):
    return [_core.make_policy(name, slots, weights, w.health, counters=w.counters, seed=1)
            for name in _core.POLICIES]


def test_every_policy_returns_minus_one_when_nothing_is_usable():
    w = world_with([0, 1, 2])
    for p in all_policies([0, 1, 2], [1, 2, 3], w):
        assert p.pick(99, [0, 1, 2]) == -1, p.name
        for s in (0, 1, 2):
            w.set(s, False)
        assert p.pick(99) == -1, p.name
        for s in (0, 1, 2):
            w.set(s, True)


def test_every_policy_skips_down_and_tried_slots():
    w = world_with(range(6))
    w.set(4, False)
    for p in all_policies(range(6), [3, 1, 4, 1, 5, 9], w):
        picks = {p.pick(k, [0, 2]) for k in range(0, 2**64 - 1, 2**58)}
        assert picks <= {1, 3, 5}, p.name


@pytest.mark.parametrize("kwargs,err,msg", [
    (dict(slots=[], weights=[]), CoreArgumentError, "empty backend set"),
    (dict(slots=[0, 1], weights=[1]), CoreArgumentError, "2 slots but 1 weights"),
    (dict(slots=[0, 1], weights=[1, 0]), CoreArgumentError, r"weights\[1\] = 0"),
    (dict(slots=[0, 1], weights=[-3, 1]), CoreArgumentError, r"weights\[0\] = -3"),
    (dict(slots=[0, 1], weights=[1, 1.5]), CoreTypeError, r"weights\[1\] must be an int"),
    (dict(slots=[0, 0], weights=[1, 1]), CoreArgumentError, "duplicate slot"),
    (dict(slots=[0, 999], weights=[1, 1]), CoreArgumentError, r"slots\[1\] = 999: out of range"),
])
@pytest.mark.parametrize("name", list(_core.POLICIES))
def test_bad_backend_sets_are_refused(name, kwargs, err, msg):
    w = World()
    with pytest.raises(err, match=msg):
        _core.make_policy(name, health=w.health, counters=w.counters, **kwargs)


@pytest.mark.parametrize("size,msg", [(65536, "not prime"), (101, "too small"), (1.5, "must be an int")])
def test_bad_maglev_table_sizes(size, msg):
    w = world_with([0, 1])
    with pytest.raises((CoreArgumentError, CoreTypeError), match=msg):
        _core.Maglev([0, 1], [1, 1], w.health, options={"table_size": size})


def test_bad_health_and_counters_types():
    w = World()
    with pytest.raises(CoreTypeError, match="HealthBitmap"):
        _core.RoundRobin([0], [1], object())
    with pytest.raises(CoreTypeError, match="Counters"):
        _core.LeastConn([0], [1], w.health, counters=None)
    with pytest.raises(CoreArgumentError, match="unknown policy 'fastest'"):
        _core.make_policy("fastest", [0], [1], w.health)


@pytest.mark.parametrize("name,options,err,msg", [
    ("round_robin", {"max_fails": 0}, CoreArgumentError, r"round_robin: option max_fails = 0: "
                                                         r"expected an integer from 1 to 1000"),
    ("round_robin", {"max_fails": 1001}, CoreArgumentError, "max_fails = 1001"),
    ("round_robin", {"max_fails": 2.0}, CoreTypeError, "max_fails must be an int"),
    ("round_robin", {"hash_balance_factor": 150}, CoreArgumentError,
     "round_robin: unknown option 'hash_balance_factor'; round_robin takes max_fails"),
    ("random", {"max_fails": 2}, CoreArgumentError, "random takes no option"),
    ("maglev", {"hash_balance_factor": 99}, CoreArgumentError,
     r"hash_balance_factor = 99: expected 0 \(off\) or an integer from 100 to 10000"),
    ("maglev", {"hash_balance_factor": True}, CoreTypeError, "must be an int, got bool"),
    ("maglev", [("table_size", 1009)], CoreTypeError, "options must be a dict"),
])
def test_bad_options_are_refused_naming_policy_and_option(name, options, err, msg):
    w = world_with([0, 1])
    with pytest.raises(err, match=msg):
        _core.make_policy(name, [0, 1], [1, 1], w.health, counters=w.counters, options=options)


def test_maglev_balance_factor_needs_counters():
    w = world_with([0, 1])
    with pytest.raises(CoreTypeError, match="maglev with a hash_balance_factor needs counters"):
        _core.make_policy("maglev", [0, 1], [1, 1], w.health, options={"hash_balance_factor": 150})
    mg = _core.make_policy("maglev", [0, 1], [1, 1], w.health, options={"hash_balance_factor": 0})
    assert mg.balance_factor == 0


def test_one_table_one_constructor():
    assert list(_core.POLICIES) == ["round_robin", "random", "least_conn", "maglev"]
    w = world_with([0, 1])
    for name, cls in _core.POLICIES.items():
        p = cls([0, 1], [2, 1], w.health, counters=w.counters, ids=["a", "b"], seed=3)
        assert p.name == name and type(_core.make_policy(name, [0, 1], [2, 1], w.health,
                                                         counters=w.counters)) is cls
    with pytest.raises(CoreTypeError, match="Policy is the interface"):
        _core.Policy([0], [1], w.health)
