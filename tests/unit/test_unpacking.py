"""Bounded msgpack decoding: the facts about msgpack the limits rely on, and the depth walk."""
import msgpack
import pytest

from fastlb.unpacking import MSGPACK_STACK, Limits, depth, limit_error


def test_msgpack_nests_at_most_its_stack_deep():
    """unpacking.py's memory arithmetic assumes this ceiling; a msgpack that changes it fails here."""
    assert msgpack.unpackb(b"\x91" * MSGPACK_STACK + b"\x00") is not None
    with pytest.raises(msgpack.StackError) as info:
        msgpack.unpackb(b"\x91" * (MSGPACK_STACK + 1) + b"\x00")
    assert limit_error(info.value) == f"values nested more than {MSGPACK_STACK} deep"


def test_limit_errors_in_words():
    lim = Limits(max_buffer=1 << 20, max_array=3, max_map=2, max_str=4, max_bin=4, max_ext=4,
                 max_depth=4)
    for value, words in [([1, 2, 3, 4], "an array of 4 elements, over the limit of 3"),
                         ({"a": 1, "b": 2, "c": 3}, "a map of 3 entries, over the limit of 2"),
                         ("hello", "a string of 5 bytes, over the limit of 4"),
                         (b"hello", "binary data of 5 bytes, over the limit of 4")]:
        with pytest.raises(ValueError) as info:
            lim.unpackb(msgpack.packb(value))
        assert limit_error(info.value) == words
        u = lim.unpacker()
        u.feed(msgpack.packb(value))
        with pytest.raises(ValueError) as info:
            list(u)
        assert limit_error(info.value) == words
    assert limit_error(ValueError("something else")) is None
    assert lim.worst_case_bytes() == (1 << 20) + MSGPACK_STACK * 3 * 8


@pytest.mark.parametrize("value,want", [(1, 0), ("s", 0), ([], 1), ({}, 1), ([1, [2]], 2),
                                        ({"a": [{"b": 1}]}, 3), ([[], [[[]]], []], 4)])
def test_depth(value, want):
    assert depth(value, 16) == want


def test_depth_of_a_very_deep_value_stops_early_and_never_recurses():
    v: object = 0
    for _ in range(100_000):
        v = [v]
    assert depth(v, 16) == 17
