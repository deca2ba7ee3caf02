"""Health bitmap and counters over shared memory, across real forked processes."""
import mmap
import os

import pytest

from fastlb import _core
from fastlb.errors import CoreArgumentError, CoreTypeError


def shared(size):
    return mmap.mmap(-1, size, flags=mmap.MAP_SHARED)


def bitmap(nslots=128):
    return _core.HealthBitmap(shared(_core.HealthBitmap.size_for(nslots)), nslots)


def fork_run(fn):
    """Run fn() in a forked child; return its exit code (0 = fn returned True)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if fn() else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_bits_and_generation():
    h = bitmap(70)
    assert h.up_slots() == []
    g = h.generation
    assert h.mark_up(69) is True and h.mark_up(69) is False
    assert h.mark_up(3)
    assert h.up_slots() == [3, 69]
    assert h.generation == g + 2          # bumped per real change only
    assert h.mark_down(69) and not h.mark_down(69)
    assert h.up_slots() == [3] and h.generation == g + 3


def test_bits_set_by_forked_child_are_seen_by_parent():
    h = bitmap(200)
    assert fork_run(lambda: all(h.mark_up(s) for s in (0, 63, 64, 199))) == 0
    assert h.up_slots() == [0, 63, 64, 199]
    assert h.generation == 4


def _toggle_own_bit(h, slot, rounds, racy, start_flag):
    """Set/clear our bit `rounds` times; count times our bit was not what we last wrote."""
    while start_flag[0] == 0:     # spin until both processes run, so they really overlap
        pass
    wrong = 0
    for _ in range(rounds):
        if racy:
            h._racy_mark(slot, True)
        else:
            h.mark_up(slot)
        if not h.is_up(slot):
            wrong += 1
        if racy:
            h._racy_mark(slot, False)
        else:
            h.mark_down(slot)
        if h.is_up(slot):
            wrong += 1
    return wrong


def _race(racy, rounds=100_000):
    h = bitmap(64)
    flag = shared(mmap.PAGESIZE)
    results = shared(mmap.PAGESIZE)
    view = memoryview(results).cast("q")
    # The two writers on two different CPUs, so that they can overlap whatever else runs.
    cpus = sorted(os.sched_getaffinity(0))
    pid = os.fork()
    if pid == 0:
        try:
            os.sched_setaffinity(0, {cpus[-1]})
            view[1] = _toggle_own_bit(h, 1, rounds, racy, flag)
        finally:
            os._exit(0)
    os.sched_setaffinity(0, {cpus[0]})
    try:
        flag[0] = 1
        view[0] = _toggle_own_bit(h, 0, rounds, racy, flag)
    finally:
        os.sched_setaffinity(0, cpus)
    os.waitpid(pid, 0)
    lost = view[0] + view[1]
    gen = h.generation
    view.release()
    return lost, gen, h.up_slots()


def test_two_processes_toggling_one_word_lose_no_update():
    lost, gen, up = _race(racy=False)
    assert lost == 0
    assert gen == 4 * 100_000  # every set and clear was a real change, none lost
    assert up == []


def test_the_race_check_catches_a_non_atomic_read_modify_write():
    # The same check against the known-bad twin must see lost updates, or it proves nothing.
    # Overlap depends on scheduling, so give it a few tries before calling the check blind.
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs to overlap the two writers")
    for _ in range(8):
        lost, _, _ = _race(racy=True, rounds=300_000)
        if lost:
            return
    pytest.fail("a racy read-modify-write lost no update in 8 tries: the race check is blind")


def test_counters_sum_blocks_across_processes():
    nslots, nblocks = 16, 3
    c = _core.Counters(shared(_core.Counters.size_for(nslots, nblocks)), nslots, nblocks)

    def child(block):
        def run():
            for _ in range(1000):
                c.add(block, 5, 0, 1)      # active
                c.add(block, 5, 2, 100)    # bytes_in
            return True
        return run

    assert all(fork_run(child(b)) == 0 for b in range(nblocks))
    assert c.active(5) == 3000
    assert c.slot_stats(5) == {"active": 3000, "total": 0, "bytes_in": 300_000,
                               "bytes_out": 0, "connect_failures": 0, "retries": 0}
    assert c.get_block(1, 5, 0) == 1000
    c.zero(1)
    assert c.active(5) == 2000


def test_zero_one_slot_some_fields_or_a_whole_block():
    nslots, nblocks = 8, 2
    c = _core.Counters(bytearray(_core.Counters.size_for(nslots, nblocks)), nslots, nblocks)
    assert _core.COUNTER_FIELDS == _core.Counters.FIELDS
    for b in range(nblocks):
        for s in range(nslots):
            for f in range(len(_core.COUNTER_FIELDS)):
                c.add(b, s, f, 10 * b + f + 1)
    c.zero(0, 3, [_core.CTR_ACTIVE])                   # a dead worker's active count of slot 3
    assert c.get_block(0, 3, _core.CTR_ACTIVE) == 0
    assert c.get_block(0, 3, _core.CTR_TOTAL) == 2     # totals stay
    assert c.get_block(1, 3, _core.CTR_ACTIVE) == 11   # other blocks untouched
    c.zero(1, 4)                                       # every field of one slot
    assert [c.get_block(1, 4, f) for f in range(5)] == [0] * 5
    assert c.get_block(1, 5, _core.CTR_BYTES_OUT) == 14
    c.zero(1, fields=(_core.CTR_ACTIVE, _core.CTR_CONNECT_FAILURES))   # all slots of a block
    assert all(c.get_block(1, s, f) == 0 for s in range(nslots) for f in (0, 4))
    assert c.get_block(1, 7, _core.CTR_TOTAL) == 12
    with pytest.raises(CoreArgumentError, match="field 6 out of range 0..5"):
        c.zero(0, 1, [6])
    with pytest.raises(CoreArgumentError, match="slot 8 out of range"):
        c.zero(0, 8)
    with pytest.raises(CoreArgumentError, match="block 2 out of range"):
        c.zero(2)
    with pytest.raises(CoreTypeError, match="'active' is not a field index"):
        c.zero(0, fields=["active"])
    with pytest.raises(CoreTypeError, match="fields must be an iterable"):
        c.zero(0, fields=3)


def test_limits_and_enums_are_exported_as_plain_values():
    assert (_core.MAX_WEIGHT, _core.MAX_TRIED, _core.MAX_RETRIES, _core.MAX_SLOTS) == (
        1_000_000, 32, 31, 65536)
    assert _core.HASH_MODES == {"source_ip": 1, "source_ip_port": 2}
    assert [_core.CTR_ACTIVE, _core.CTR_TOTAL, _core.CTR_BYTES_IN, _core.CTR_BYTES_OUT,
            _core.CTR_CONNECT_FAILURES] == [0, 1, 2, 3, 4]
    for name in ("MAX_WEIGHT", "MAX_TRIED", "MAX_RETRIES", "MAX_SLOTS", "CTR_ACTIVE"):
        assert type(getattr(_core, name)) is int, name


@pytest.mark.parametrize("buf,err,msg", [
    (b"\0" * 4096, CoreTypeError, "read-only bytes"),
    (memoryview(b"\0" * 4096), CoreTypeError, "writable"),
    (bytearray(8), CoreArgumentError, "too small"),
    (12345, CoreTypeError, "got int"),
])
def test_bad_buffers(buf, err, msg):
    with pytest.raises(err, match=msg):
        _core.HealthBitmap(buf, 64)


def test_bad_slot_counts_and_indices():
    with pytest.raises(CoreArgumentError, match="nslots = 0"):
        _core.HealthBitmap(bytearray(4096), 0)
    h = bitmap(10)
    with pytest.raises(CoreArgumentError, match="slot 10 out of range 0..9"):
        h.mark_up(10)
    with pytest.raises(ValueError):
        h.is_up(-1)
