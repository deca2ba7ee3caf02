"""The admin codec, sans-IO: whole, byte by byte, with trailing bytes, and every error."""
import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from fastlb.admin import protocol
from fastlb.admin.protocol import AdminProtocolError, Decoder, parse_request

REQS = [{"id": 1, "op": "ping"},
        {"id": 2, "op": "set_weight", "service": "web", "address": "10.0.0.1:80", "weight": 7},
        {"id": 3, "op": "add_service", "service": {"name": "x", "listen": ["127.0.0.1:1"]}}]
STREAM = b"".join(msgpack.packb(r) for r in REQS)


def test_whole_stream():
    assert Decoder().feed(STREAM) == REQS


def test_byte_by_byte():
    d = Decoder()
    out = []
    for i in range(len(STREAM)):
        out += d.feed(STREAM[i:i + 1])
    assert out == REQS


def test_trailing_partial_message_waits_for_the_rest():
    d = Decoder()
    extra = msgpack.packb({"id": 9, "op": "stats"})
    assert d.feed(STREAM + extra[:3]) == REQS
    assert d.feed(extra[3:]) == [{"id": 9, "op": "stats"}]


def test_parse_valid_requests():
    r = parse_request(REQS[1])
    assert (r.id, r.op, r.args) == (2, "set_weight",
                                    {"service": "web", "address": "10.0.0.1:80", "weight": 7})
    assert parse_request({"id": 5, "op": "ping", "token": "t"}).token == "t"


@pytest.mark.parametrize("obj,code,rid,msg", [
    ([1, 2], "bad_request", None, "must be a map, got an array"),
    ({"op": "ping"}, "bad_request", None, "\"id\" must be an integer, got nil"),
    ({"id": "1", "op": "ping"}, "bad_request", None, "\"id\" must be an integer, got a string"),
    ({"id": True, "op": "ping"}, "bad_request", None, "\"id\" must be an integer"),
    ({"id": 1}, "bad_request", 1, "\"op\" must be a string, got nil"),
    ({"id": 1, "op": "fly"}, "unknown_op", 1, "unknown op 'fly'"),
    ({"id": 1, "op": "ping", "x": 1}, "bad_request", 1, "ping: unknown field 'x'"),
    ({"id": 1, "op": "backends"}, "bad_request", 1, "backends: missing field \"service\""),
    ({"id": 1, "op": "backends", "service": 3}, "bad_request", 1,
     "\"service\" must be a string, got an integer"),
    ({"id": 1, "op": "set_weight", "service": "a", "address": "b:1", "weight": 0}, "bad_request", 1,
     "weight 0 out of range"),
    ({"id": 1, "op": "set_weight", "service": "a", "address": "b:1", "weight": 1.5}, "bad_request", 1,
     "\"weight\" must be an integer, got a float"),
    ({"id": 1, "op": "set_weight", "service": "a", "address": "b:1", "weight": True}, "bad_request", 1,
     "\"weight\" must be an integer, got a boolean"),
    ({"id": 1, "op": "set_state", "service": "a", "address": "b:1", "state": "gone"}, "bad_request", 1,
     "state 'gone' is not one of ready, drain, maint"),
    ({"id": 1, "op": "set_state", "service": "a", "address": "b:1", "state": "drain", "timeout": -1},
     "bad_request", 1, "timeout must be"),
    ({"id": 1, "op": "add_service", "service": "x"}, "bad_request", 1, "\"service\" must be a map"),
    ({"id": 1, "op": "ping", "token": 5}, "bad_request", 1, "\"token\" must be a string"),
])
def test_bad_requests(obj, code, rid, msg):
    with pytest.raises(AdminProtocolError) as info:
        parse_request(obj)
    assert (info.value.code, info.value.id, info.value.fatal) == (code, rid, False)
    assert msg in info.value.message


def test_bytes_that_are_not_msgpack_are_fatal():
    with pytest.raises(AdminProtocolError) as info:
        Decoder().feed(b"\xc1")                      # a byte msgpack never uses
    assert info.value.code == "bad_msgpack" and info.value.fatal


def test_invalid_utf8_string_is_fatal():
    with pytest.raises(AdminProtocolError) as info:
        Decoder().feed(b"\xa2\xff\xfe")
    assert info.value.fatal


def test_message_over_the_cap_is_fatal_even_when_sent_slowly():
    d = Decoder(max_size=1024)
    big = msgpack.packb({"id": 1, "op": "ping", "pad": "x" * 2000})
    with pytest.raises(AdminProtocolError) as info:
        for i in range(0, len(big), 100):
            d.feed(big[i:i + 100])
    assert info.value.code == "too_large" and info.value.fatal


def test_replies_encode():
    assert msgpack.unpackb(protocol.ok(3, {"a": 1})) == {"id": 3, "ok": True, "result": {"a": 1}}
    assert msgpack.unpackb(protocol.error(None, "bad_request", "m")) == {
        "id": None, "ok": False, "error": {"code": "bad_request", "message": "m"}}


@settings(max_examples=300, deadline=None)
def _feed_in_chunks(d: Decoder, data: bytes, chunk: int) -> AdminProtocolError | None:
    """Feed ``data`` in pieces of ``chunk`` and parse every message: a request that does not
    parse raises the non-fatal protocol error; the stream's own error (returned) is fatal."""
    try:
        for i in range(0, len(data), chunk):
            for obj in d.feed(data[i:i + chunk]):
                try:
                    parse_request(obj)
                except AdminProtocolError as exc:
                    assert not exc.fatal
    except AdminProtocolError as exc:
        return exc
    return None


@given(st.binary(max_size=300), st.integers(1, 50))
def test_fuzz_decode_parses_or_raises_the_protocol_error(data, chunk):
    """The h11 invariant: any bytes decode, or raise AdminProtocolError; never anything else."""
    exc = _feed_in_chunks(Decoder(max_size=256), data, chunk)
    assert exc is None or exc.fatal


values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                      lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                      max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "op", "service", "address", "weight", "state",
                                        "timeout", "close", "token", "x"]),
                       values | st.sampled_from(list(protocol.OPS)), max_size=6))
def test_fuzz_random_maps_parse_or_raise_non_fatal(obj):
    try:
        req = parse_request(obj)
    except AdminProtocolError as exc:
        assert not exc.fatal and exc.code in ("bad_request", "unknown_op")
    else:
        assert req.op in protocol.OPS


# -- limits (fastlb/unpacking.py): refused at the header, fatal, with words for the limit ------

HOSTILE = [
    (b"\xdd\x00\x0f\x42\x40", "an array of 1000000 elements, over the limit of 4096"),
    (b"\xdf\x00\x0f\x42\x40", "a map of 1000000 entries, over the limit of 256"),
    (msgpack.packb("x" * 70000), "a string of 70000 bytes, over the limit of 65536"),
    (msgpack.packb(b"x" * 70000), "binary data of 70000 bytes, over the limit of 65536"),
    (msgpack.packb(msgpack.ExtType(5, b"x" * 40)), "an extension value of"),
    (b"\x91" * 1100 + b"\x00", "values nested more than 1024 deep"),
]


@pytest.mark.parametrize("data,words", HOSTILE)
def test_values_over_the_limits_are_fatal_with_the_limit_named(data, words):
    with pytest.raises(AdminProtocolError) as info:
        Decoder().feed(msgpack.packb({"id": 1, "op": "ping"}) + data)
    assert info.value.code == "too_large" and info.value.fatal
    assert words in info.value.message


@pytest.mark.parametrize("data,words", HOSTILE)
def test_values_over_the_limits_byte_by_byte(data, words):
    d = Decoder()
    with pytest.raises(AdminProtocolError) as info:
        for i in range(len(data)):
            d.feed(data[i:i + 1])
    assert words in info.value.message and info.value.fatal


def test_a_huge_array_header_is_refused_before_its_elements_arrive():
    d = Decoder()
    assert d.feed(b"\xdd\x00\x0f") == []             # the header's length is not complete yet
    with pytest.raises(AdminProtocolError, match="1000000 elements"):
        d.feed(b"\x42\x40")                          # 5 bytes in all: no element sent at all


def test_values_at_the_limits_decode():
    lim = protocol.REQUEST_LIMITS
    backends = [{"address": f"10.0.{i // 250}.{i % 250}:80"} for i in range(lim.max_array)]
    req = {"id": 1, "op": "add_service", "service": {"name": "big", "listen": ["127.0.0.1:1"],
                                                     "backends": backends}}
    data = msgpack.packb(req)
    assert len(data) < protocol.MAX_MESSAGE
    assert Decoder().feed(data) == [req]
    assert parse_request(req).args["service"]["backends"] == backends
    assert Decoder().feed(msgpack.packb({str(i): i for i in range(lim.max_map)}))
    assert Decoder().feed(msgpack.packb("x" * lim.max_str)) == ["x" * lim.max_str]


def test_nesting_deeper_than_a_request_needs_is_a_non_fatal_bad_request():
    deep: object = 1
    for _ in range(protocol.REQUEST_LIMITS.max_depth):
        deep = [deep]
    obj = {"id": 4, "op": "add_service", "service": {"name": deep}}     # 17 deep in all
    d = Decoder()
    (got,) = d.feed(msgpack.packb(obj))
    with pytest.raises(AdminProtocolError) as info:
        parse_request(got)
    assert (info.value.code, info.value.id, info.value.fatal) == ("bad_request", 4, False)
    assert "more than 16 deep" in info.value.message
    assert d.feed(msgpack.packb({"id": 5, "op": "ping"})) == [{"id": 5, "op": "ping"}]  # goes on


def test_a_request_at_the_nesting_limit_gets_past_the_depth_check():
    deep: object = 1
    for _ in range(protocol.REQUEST_LIMITS.max_depth - 2):
        deep = [deep]
    with pytest.raises(AdminProtocolError) as info:                # 16 deep: a type error, not depth
        parse_request({"id": 1, "op": "add_service", "service": {"name": deep}, "x": 1})
    assert "unknown field 'x'" in info.value.message


# Pieces a hostile client would send: huge headers of every kind, deep nesting, junk.
PIECES = st.sampled_from([b"\xdd\xff\xff\xff\xff", b"\xdd\x00\x00\x10\x01", b"\xdc\x10\x01",
                          b"\xdf\x00\x01\x00\x00", b"\xde\x01\x01", b"\xdb\x00\x01\x00\x01",
                          b"\xc6\xff\xff\xff\xff", b"\xc9\x00\x00\x01\x00\x05", b"\xd4\x05\x00",
                          b"\x91" * 20, b"\x81\xa1a", b"\x81\xa2id\x01", b"\x82\xa2id\x01\xa2op",
                          b"\xa4ping", b"\x00", b"\xc1", b"\xc0", b"\x90", b"\x80"])


@settings(max_examples=400, deadline=None)
@given(st.lists(PIECES | st.binary(max_size=6), max_size=40), st.integers(1, 64))
def test_fuzz_hostile_pieces_parse_or_raise_the_protocol_error(pieces, chunk):
    """The h11 invariant, with the limits in play: decode, or AdminProtocolError, nothing else."""
    data = b"".join(pieces)
    exc = _feed_in_chunks(Decoder(), data, chunk)
    assert exc is None or (exc.fatal and exc.code in ("too_large", "bad_msgpack"))


def test_push_and_iterate_give_the_values_before_a_bad_one():
    d = Decoder()
    d.push(STREAM + b"\xdd\x00\x0f\x42\x40")
    got = []
    with pytest.raises(AdminProtocolError, match="1000000 elements"):
        for obj in d:
            got.append(obj)
    assert got == REQS


def test_errors_are_importable_from_their_old_modules():
    from fastlb import errors, statefile
    from fastlb.admin import client
    assert protocol.AdminProtocolError is errors.AdminProtocolError
    assert client.AdminError is errors.AdminError
    assert statefile.StateFileError is errors.StateFileError


def test_depth_is_checked_after_the_cheap_checks():
    """Junk is refused by the schema before anything walks it (a 1 MiB array costs nothing)."""
    junk = {"id": 1, "op": "ping", "x": [[0] * 4000 for _ in range(250)]}
    with pytest.raises(AdminProtocolError, match="ping: unknown field 'x'"):
        parse_request(junk)
