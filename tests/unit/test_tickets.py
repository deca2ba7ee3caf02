"""[tlsops] fastlb.tickets: the supervisor's ticket key rings, sans-IO (a fake clock and random
source): HAProxy's previous/current/next turn, rings following the TLS services, the timer."""
import itertools

from fastlb.tickets import KEY_SIZE, TicketKeys


def keys_of(n):
    """A random source that numbers its keys: key i is bytes([i]) * 80."""
    counter = itertools.count()
    return lambda size: bytes([next(counter) % 256]) * size


def test_a_turn_drops_the_previous_key_and_adds_a_next_one():
    clock = [0.0]
    t = TicketKeys(lambda: clock[0], keys_of(0))
    assert t.sync({"edge": 60.0})
    assert t.wire()["edge"] == bytes([0]) * KEY_SIZE + bytes([1]) * KEY_SIZE + bytes([2]) * KEY_SIZE
    t.turn("edge")              # the old current (1) is now the previous one: it still decrypts
    assert t.wire()["edge"] == bytes([1]) * KEY_SIZE + bytes([2]) * KEY_SIZE + bytes([3]) * KEY_SIZE
    t.turn("edge")              # two turns: key 1 (current at the start) is gone
    assert bytes([1]) * KEY_SIZE not in t.wire()["edge"]
    assert t.info() == {"edge": {"ticket_lifetime": 60.0, "rotations": 2}}


def test_rings_follow_the_services_and_the_timer():
    clock = [100.0]
    t = TicketKeys(lambda: clock[0], keys_of(0))
    assert t.sync({"a": 10.0, "b": 30.0})
    first = t.wire()
    assert not t.sync({"a": 10.0, "b": 30.0})           # nothing new: the keys stay
    assert t.wire() == first
    assert t.next_due() == 110.0
    clock[0] = 109.9
    assert not t.turn_due()
    clock[0] = 110.0
    assert t.turn_due() and t.wire()["a"] != first["a"] and t.wire()["b"] == first["b"]
    assert t.next_due() == 120.0
    assert not t.sync({"a": 5.0, "b": 30.0})             # a shorter period: due sooner
    assert t.next_due() == 115.0
    assert t.sync({"b": 30.0}) and set(t.wire()) == {"b"}  # a service without TLS any more
    assert t.sync({"b": 30.0, "c": 1.0}) and len(t.wire()["c"]) == 3 * KEY_SIZE


def test_the_users_keys_are_the_ring_and_never_turn_by_themselves():
    clock = [0.0]
    t = TicketKeys(lambda: clock[0], keys_of(100))
    given = bytes([7]) * KEY_SIZE + bytes([8]) * KEY_SIZE + bytes([9]) * KEY_SIZE
    assert t.sync({"edge": 1.0}, {"edge": given})
    assert t.wire()["edge"] == given and t.next_due() == float("inf")
    clock[0] = 1e9
    assert not t.turn_due() and t.wire()["edge"] == given
    assert not t.sync({"edge": 1.0}, {"edge": given})            # the same file: no change
    assert t.info()["edge"]["keys"] == "file"
    assert t.sync({"edge": 1.0})                                  # the file dropped: random keys
    assert t.wire()["edge"] != given and t.next_due() == 1e9 + 1.0
