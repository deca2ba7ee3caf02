"""The admin socket's defences, sans-IO (fastlb.admin.guard), the audit line's summary
(fastlb.handlers) and the codec's count of a message under way (fastlb.admin.protocol)."""
from __future__ import annotations

import logging
import os

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from fastlb import handlers
from fastlb.admin import guard, protocol
from fastlb.admin.guard import Backoff, LogLimiter, TokenFileError, read_token, source_key
from fastlb.admin.protocol import Request
from fastlb.errors import RegistryError


# -- the token file ------------------------------------------------------------------------------
def token_file(tmp_path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "token"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_a_good_token_file_is_read_stripped(tmp_path):
    assert read_token(token_file(tmp_path, "a" * 44 + "\n")) == "a" * 44
    assert read_token(token_file(tmp_path, "b" * 32, 0o400)) == "b" * 32


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o660, 0o610, 0o601])
def test_a_token_file_open_to_group_or_others_is_refused_with_the_chmod_to_run(tmp_path, mode):
    path = token_file(tmp_path, "a" * 44, mode)
    with pytest.raises(TokenFileError) as e:
        read_token(path)
    assert f"the token file {path} has mode {mode:04o}" in str(e.value)
    assert f"run `chmod 600 {path}`" in str(e.value)


@pytest.mark.parametrize("text, words", [
    ("", "is empty"), ("  \n", "is empty"), ("x", "is 1 characters long; it must be at least 32"),
    ("y" * 31, "is 31 characters long; it must be at least 32"),
    ("z" * 1025, "at most 1024"), ("w" * 5000, "larger than 4096 bytes")])
def test_a_short_empty_or_huge_token_is_refused(tmp_path, text, words):
    with pytest.raises(TokenFileError, match=words):
        read_token(token_file(tmp_path, text))


def test_a_missing_or_unreadable_token_file_says_what_to_do(tmp_path):
    with pytest.raises(TokenFileError, match=r"does not exist; create it .*chmod 600"):
        read_token(str(tmp_path / "nope"))
    with pytest.raises(TokenFileError, match="is not a regular file"):
        read_token(str(tmp_path))
    if os.geteuid() != 0:                     # root reads a mode-000 file
        path = token_file(tmp_path, "a" * 44, 0o000)
        with pytest.raises(TokenFileError, match="cannot read"):
            read_token(path)


def test_the_longest_token_fits_in_the_first_message():
    hello = protocol.encode({"id": 1, "op": "ping", "token": "t" * protocol.TOKEN_MAX})
    assert len(hello) < protocol.PRE_AUTH_MAX
    assert protocol.Decoder(protocol.PRE_AUTH_MAX, protocol.PRE_AUTH_LIMITS).feed(hello)


# -- backoff per source --------------------------------------------------------------------------
def test_backoff_starts_at_the_third_failure_doubles_and_is_capped():
    b = Backoff(after=3, first=1.0, cap=8.0)
    assert b.failure("a", 0.0) == 0.0 and b.failure("a", 0.1) == 0.0
    assert b.blocked("a", 0.2) == 0.0                          # two typos cost nothing
    assert b.failure("a", 0.2) == 1.0                          # the third: 1 s
    assert b.blocked("a", 0.7) == pytest.approx(0.5)
    assert b.blocked("a", 1.3) == 0.0
    assert [b.failure("a", t) for t in (2.0, 5.0, 10.0, 20.0, 40.0)] == [2.0, 4.0, 8.0, 8.0, 8.0]
    assert b.blocked("b", 40.0) == 0.0                         # per source


def test_a_success_clears_a_source_and_an_old_one_is_forgotten():
    b = Backoff(after=2, first=1.0, cap=100.0, forget=60.0)
    b.failure("a", 0.0)
    b.success("a")
    assert b.failure("a", 1.0) == 0.0                          # counting starts again
    assert b.failure("a", 2.0) == 1.0
    assert b.failure("a", 3.5) == 2.0
    assert b.failure("a", 100.0) == 0.0                        # 96.5 s later: forgotten
    b.failure("c", 0.0)
    b.failure("c", 0.0)
    assert b.blocked("c", 61.0) == 0.0 and len(b) == 1         # expired on lookup too


def test_the_backoff_table_is_bounded_and_drops_the_least_recent_source():
    b = Backoff(after=1, first=10.0, size=100)
    for i in range(1000):
        b.failure(f"s{i}", float(i) / 1000)
    assert len(b) == 100
    assert b.blocked("s999", 1.0) > 0 and b.blocked("s0", 1.0) == 0.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.floats(0, 5), st.booleans()), max_size=60))
def test_backoff_invariants(events):
    """Never more sources than its size, never a penalty over the cap or a negative wait."""
    b = Backoff(after=3, first=0.5, cap=4.0, size=4)
    now = 0.0
    for source, dt, ok in events:
        now += dt
        if ok:
            b.success(source)
        else:
            assert 0.0 <= b.failure(source, now) <= 4.0
        assert 0.0 <= b.blocked(source, now) <= 4.0
        assert len(b) <= 4


def test_source_keys():
    assert source_key("127.0.0.2") == "127.0.0.2"
    assert source_key("::ffff:10.0.0.1") == "10.0.0.1"
    assert source_key("2001:db8:1:2:3:4:5:6") == source_key("2001:db8:1:2::9") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")


# -- rate-limited log lines ----------------------------------------------------------------------
def test_the_log_limiter_logs_the_first_then_counts_the_rest_per_window():
    lim = LogLimiter(10.0)
    assert lim.hit(0.0, "one") is True
    assert [lim.hit(t, f"e{t}") for t in (1.0, 2.0, 9.0)] == [False, False, False]
    assert lim.flush(10.0) == (3, "e9.0")                      # "3 more in the last 10 s"
    assert lim.hit(11.0) is False                              # a flood: still one line / window
    assert lim.flush(20.0) == (1, "")
    assert lim.flush(30.0) == (0, "")                          # quiet: nothing to say
    assert lim.hit(31.0) is True                               # and the next is logged at once


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 3), min_size=1, max_size=400))
def test_a_flood_gives_at_most_two_lines_per_window(gaps):
    """hit() then flush() at each window's end, as the server's glue does: the lines logged
    over any run are at most 2 per interval (+1), and every event is logged or counted."""
    lim = LogLimiter(10.0)
    now, lines, counted = 0.0, 0, 0
    for gap in gaps:
        now += gap
        while lim.suppressed and now >= lim.window_end:        # the glue's timer
            n, _ = lim.flush(lim.window_end)
            lines, counted = lines + 1, counted + n
        if lim.hit(now):
            lines, counted = lines + 1, counted + 1
    if lim.suppressed:
        n, _ = lim.flush(lim.window_end)
        lines, counted = lines + 1, counted + n
    assert counted == len(gaps)
    assert lines <= 2 * (now / 10.0 + 1) + 1


# -- the codec: a message under way --------------------------------------------------------------
def test_the_decoder_counts_the_bytes_of_a_message_under_way():
    d = protocol.Decoder()
    one, two = msgpack.packb({"id": 1, "op": "ping"}), msgpack.packb({"id": 2, "op": "ping"})
    d.push(one + two[:5])
    assert [m["id"] for m in d] == [1]
    assert (d.consumed, d.pending) == (len(one), 5)
    d.push(two[5:])
    assert [m["id"] for m in d] == [2] and d.pending == 0


def test_the_first_message_is_bounded_before_authentication():
    d = protocol.Decoder(protocol.PRE_AUTH_MAX, protocol.PRE_AUTH_LIMITS)
    with pytest.raises(protocol.AdminProtocolError, match="an array of 17 elements"):
        d.feed(msgpack.packb({"id": 1, "op": "ping", "token": list(range(17))}))
    with pytest.raises(protocol.AdminProtocolError, match="larger than the 4096-byte limit"):
        protocol.Decoder(protocol.PRE_AUTH_MAX, protocol.PRE_AUTH_LIMITS).push(b"\xda" + b"x" * 5000)


# -- the audit trail's line ----------------------------------------------------------------------
def test_summaries_are_one_bounded_line_with_no_control_characters():
    assert handlers.summarize("set_weight", {"service": "web", "address": "10.0.0.2:80",
                                             "weight": 3}) == \
        "set_weight service=web address=10.0.0.2:80 weight=3"
    line = handlers.summarize("add_service", {"service": {"name": "a\nb", "backends": [{}] * 3}})
    assert line == "add_service service={name='a\\nb', 3 backends}"
    long = handlers.summarize("remove_backend", {"service": "s" * 1000, "address": "x y\x1b[31m"})
    assert "\n" not in long and "\x1b" not in long and len(long) < 250
    assert "...(1000 chars)" in long and "address='x y\\x1b[31m'" in long
    assert handlers.summarize("set_state", {"state": "drain", "timeout": 2.5, "close": True}) == \
        "set_state state=drain timeout=2.5 close=True"


class _Ctx:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    async def mutate(self, op, args):
        if self.fail:
            raise RegistryError("unknown_backend", "service 'web' has no backend '1.2.3.4:5'")
        return {"op": op, **args, "generation": 7}


def test_dispatch_audits_changes_with_who_and_result_and_never_the_token(caplog):
    import asyncio
    req = Request(1, "set_weight", {"service": "web", "address": "1.2.3.4:5", "weight": 2},
                  token="SECRET-TOKEN", who="tcp 127.0.0.1:4242")
    caplog.set_level(logging.DEBUG)
    asyncio.run(handlers.dispatch(_Ctx(), req))
    with pytest.raises(RegistryError):
        asyncio.run(handlers.dispatch(_Ctx(fail=True), req))
    audit = [r for r in caplog.records if r.name == "fastlb.audit"]
    assert [r.getMessage() for r in audit] == [
        "audit: tcp 127.0.0.1:4242: set_weight service=web address=1.2.3.4:5 weight=2 -> ok "
        "generation=7",
        "audit: tcp 127.0.0.1:4242: set_weight service=web address=1.2.3.4:5 weight=2 -> error "
        "unknown_backend: service 'web' has no backend '1.2.3.4:5'"]
    assert "SECRET-TOKEN" not in caplog.text
    caplog.clear()
    read = Request(2, "ping", {}, who="unix uid=0 pid=1")
    assert asyncio.run(handlers.dispatch(_Ctx(), read)) == "pong"
    ours = [(r.name, r.levelno) for r in caplog.records if r.name.startswith("fastlb")]
    assert ours == [("fastlb.admin", logging.DEBUG)]                  # a read: debug only


def test_the_audit_logger_is_on_at_any_log_level():
    assert logging.getLogger("fastlb.audit").getEffectiveLevel() == logging.INFO
    assert guard.TOKEN_MIN_LENGTH == 32
