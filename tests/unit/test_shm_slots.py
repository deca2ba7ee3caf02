"""Slot lifecycle in the shared state: a freed slot is reused only when safe."""
from fastlb.shm import SharedState


def test_released_slot_waits_for_acks_and_connections():
    shared = SharedState(8, nblocks=2)
    acked = [4]
    shared.acked = lambda: acked[0]
    s = shared.slot_for("web", "10.0.0.1:80")
    shared.health.mark_up(s)
    shared.counters.add(1, s, 0, 1)            # worker 1 has a connection open on it
    shared.counters.add(1, s, 1, 7)            # and 7 in total
    shared.release("web", "10.0.0.1:80", generation=5)
    assert not shared.health.is_up(s)
    others = {shared.slot_for("web", f"10.0.1.{i}:80") for i in range(7)}
    assert s not in others                     # every other slot first...
    acked[0] = 5                               # every worker runs the snapshot without it
    shared.reap()
    assert s not in shared._free               # ...but a connection still uses it
    shared.counters.add(1, s, 0, -1)
    shared.reap()
    assert shared._free == [s]
    assert shared.slot_for("api", "10.0.0.9:80") == s
    assert shared.counters.slot_stats(s)["total"] == 0   # the new backend starts from zero


def test_slots_are_stable_per_backend():
    shared = SharedState(4)
    a = shared.slot_for("web", "x:1")
    assert shared.slot_for("web", "x:1") == a
    assert shared.slot_for("api", "x:1") != a
