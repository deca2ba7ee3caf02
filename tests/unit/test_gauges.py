"""Gauges: shared limits exact across processes, and a dead process's places given back."""
import mmap
import multiprocessing as mp

import pytest

from fastlb import _core
from fastlb.errors import CoreArgumentError

ROWS, BLOCKS = 4, 4


def _mapping():
    m = mmap.mmap(-1, _core.Gauges.size_for(ROWS, BLOCKS))
    return m


def _hammer(m, block, limit, rounds, out):
    g = _core.Gauges(m, ROWS, BLOCKS, block)
    taken = 0
    peak_seen = 0
    for _ in range(rounds):
        if g.py_take(1, limit):
            taken += 1
            peak_seen = max(peak_seen, g.get(1, _core.G_CUR))
            g.py_give(1)
    out.put((taken, peak_seen))


def test_take_respects_the_limit_and_keeps_the_max():
    g = _core.Gauges(bytearray(_core.Gauges.size_for(ROWS)), ROWS)
    assert [g.py_take(0, 3) for _ in range(5)] == [True, True, True, False, False]
    g.py_give(0)
    assert g.get(0, _core.G_CUR) == 2 and g.get(0, _core.G_MAX) == 3
    assert g.py_take(0, 0)                     # 0: no limit
    assert g.py_take(2, 1, _core.G_QUEUED) and not g.py_take(2, 1, _core.G_QUEUED)
    g.py_add(3, _core.G_DENY_ACL, 5)
    assert g.row(3)["denied_acl"] == 5
    assert g.global_row == ROWS - 1


def test_limit_is_exact_across_processes():
    """Four processes take and give on one row with limit 2: the count never passes 2, and
    every take is given back (a lost update would leave G_CUR off zero)."""
    m = _mapping()
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(m, b, 2, 20000, out)) for b in range(BLOCKS)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    g = _core.Gauges(m, ROWS, BLOCKS, 0)
    assert all(peak <= 2 for _, peak in results)
    assert g.get(1, _core.G_MAX) <= 2
    assert g.get(1, _core.G_CUR) == 0
    assert sum(t for t, _ in results) > 0


def test_reclaim_gives_back_a_dead_blocks_places():
    m = _mapping()
    dead = _core.Gauges(m, ROWS, BLOCKS, 2)
    live = _core.Gauges(m, ROWS, BLOCKS, 1)
    for _ in range(3):
        assert dead.py_take(0, 10)
    assert dead.py_take(0, 10, _core.G_QUEUED)
    assert live.py_take(0, 10)
    assert live.get(0, _core.G_CUR) == 4 and dead.held_by(2, 0) == (3, 1)
    sup = _core.Gauges(m, ROWS, BLOCKS, 0)
    assert sup.reclaim(2) == 3
    assert sup.get(0, _core.G_CUR) == 1 and sup.get(0, _core.G_QUEUED) == 0
    assert sup.held_by(2, 0) == (0, 0) and sup.held_by(1, 0) == (1, 0)
    sup.zero(0)
    assert sup.row(0)["cur"] == 0 and sup.held_by(1, 0) == (0, 0)


def test_bad_arguments_are_refused():
    buf = bytearray(_core.Gauges.size_for(ROWS, 2))
    with pytest.raises(CoreArgumentError):
        _core.Gauges(buf, ROWS, 2, 2)
    g = _core.Gauges(buf, ROWS, 2, 0)
    with pytest.raises(CoreArgumentError):
        g.get(ROWS, 0)
    with pytest.raises(CoreArgumentError):
        g.get(0, _core.G_NFIELDS)
    with pytest.raises(CoreArgumentError):
        g.reclaim(5)
    with pytest.raises(CoreArgumentError):
        _core.Gauges(bytearray(16), ROWS)
