"""Typed plans: the wire round trip, and compute_plan as a pure function."""
import dataclasses

import msgpack
import pytest

from fastlb import config
from fastlb.plan import Plan, PlanBackend, Snapshot
from fastlb.runtime import compute_plan

SVC = config.loads('''
[[service]]
name = "web"
listen = ["127.0.0.1:8080", "[::1]:8080"]
policy = "maglev"
hash_key = "source_ip_port"
health = { slowstart = "10s", panic_threshold = 50, fall_passive = 3 }
backends = [ { address = "10.0.0.1:80", weight = 5 }, { address = "10.0.0.2:80", weight = 2 },
             { address = "[2001:db8::1]:80" }, { address = "10.0.0.4:80", state = "drain" } ]
''', resolve=False).services[0]
SLOTS = {"10.0.0.1:80": 7, "10.0.0.2:80": 3, "[2001:db8::1]:80": 9, "10.0.0.4:80": 0,
         "": 11}                                 # "": the service's own row (shm.SERVICE_ROW)


def plan(up=frozenset({7, 3, 9, 0}), ramps=None, now=100.0):
    return compute_plan(SVC, SLOTS.__getitem__, up.__contains__, ramps or {}, now)


def test_plan_types_are_frozen_and_slotted():
    p = plan()
    for obj in (p, p.backends[0], Snapshot(1, (p,), (("web", "127.0.0.1", 8080),))):
        assert not hasattr(obj, "__dict__") and type(obj).__slots__
        field = dataclasses.fields(obj)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, field, getattr(obj, field))


def test_wire_round_trip_through_msgpack():
    p = dataclasses.replace(plan(ramps={"10.0.0.2:80": 97.5}), options=(("max_fails", 2),))
    snap = Snapshot(42, (p, dataclasses.replace(p, name="api", backends=())),
                    (("api", "::1", 8080), ("web", "127.0.0.1", 8080)))
    wire = msgpack.unpackb(msgpack.packb(snap.to_wire(), use_bin_type=True), raw=False)
    assert Snapshot.from_wire(wire) == snap
    assert Plan.from_wire(p.to_wire()) == p
    assert PlanBackend.from_wire(p.backends[0].to_wire()) == p.backends[0]


def test_plan_content():
    p = plan()
    assert [(b.slot, b.weight, b.address) for b in p.backends] == \
        [(7, 5, "10.0.0.1:80"), (3, 2, "10.0.0.2:80"), (9, 1, "[2001:db8::1]:80")]   # drain: no new
    assert p.names == ((7, "10.0.0.1:80"), (3, "10.0.0.2:80"), (9, "[2001:db8::1]:80"), (0, "10.0.0.4:80"))
    assert p.listen == (("127.0.0.1", 8080), ("::1", 8080)) and p.hash_mode == 2
    assert p.fall_passive == 3 and not p.panic
    assert plan(up=frozenset({7})).panic                   # 1 of 3 up, under 50 %
    ramped = plan(ramps={"10.0.0.2:80": 95.0})             # half way through 10 s
    assert [b.weight for b in ramped.backends] == [500, 100, 100]
    assert plan(ramps={"10.0.0.2:80": 80.0}) == plan()     # a finished ramp counts as none


def test_compute_plan_is_pure():
    ramps = {"10.0.0.2:80": 95.0}
    up = frozenset({7, 3})
    before = (dict(ramps), SVC)
    first = compute_plan(SVC, SLOTS.__getitem__, up.__contains__, ramps, 100.0)
    again = compute_plan(SVC, SLOTS.__getitem__, up.__contains__, ramps, 100.0)
    assert first == again and hash(first) == hash(again)
    assert (dict(ramps), SVC) == before                    # nothing changed, not even expired ramps
    compute_plan(SVC, SLOTS.__getitem__, up.__contains__, ramps, 1000.0)
    assert ramps == {"10.0.0.2:80": 95.0}
