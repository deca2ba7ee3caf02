"""The engine in-process on uvloop, with real sockets on 127.0.0.1: its one callback error path,
sessions that only the engine can make, close_backend and close()."""
import asyncio
import logging
import os
import socket

import pytest
import uvloop
from helpers import closed_port, start_backend

from fastlb import _core
from fastlb.errors import CoreArgumentError, CoreTypeError

NSLOTS = 8


class Rig:
    """An engine on a fresh uvloop, one service listening on a loopback port."""

    def __init__(self, backends, policy="round_robin"):
        self.loop = uvloop.new_event_loop()
        self.counters = _core.Counters(bytearray(_core.Counters.size_for(NSLOTS)), NSLOTS)
        self.health = _core.HealthBitmap(bytearray(_core.HealthBitmap.size_for(NSLOTS)), NSLOTS)
        for slot in backends:
            self.health.mark_up(slot)
        self.engine = _core.Engine(self.loop, self.counters, 0)
        self.svc = _core.ServiceState("t")
        self.svc.connect_timeout = 2.0
        pol = _core.make_policy(policy, list(backends), [1] * len(backends), self.health,
                                counters=self.counters) if backends else None
        self.svc.set_backends(pol, {s: ("127.0.0.1", port) for s, port in backends.items()})
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        self.engine.listen(sock, self.svc)
        self.errors = []
        self.loop.set_exception_handler(lambda loop, ctx: self.errors.append(ctx))

    def run(self, coro, timeout=10):
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    async def first_line(self):
        r, w = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            return await r.readline()
        finally:
            w.close()

    def close(self):
        self.engine.close()
        self.loop.close()


def test_a_failing_callback_goes_to_the_exception_handler_and_the_client_is_served(procs):
    _, port = start_backend(procs, "announce", name="b")
    rig = Rig({0: closed_port(), 1: port})
    try:
        rig.svc.on_connect_error = lambda slot, exc: 1 / 0     # a buggy logging callback
        assert rig.run(rig.first_line()) == b"b\n"             # failover still happened
        (ctx,) = rig.errors
        assert ctx["message"] == "fastlb core: the on_connect_error callback failed"
        assert isinstance(ctx["exception"], ZeroDivisionError)
        assert ctx["service"] == "t" and ctx["engine"] is rig.engine
        assert rig.counters.get(0, _core.CTR_CONNECT_FAILURES) == 1
    finally:
        rig.close()


def test_the_default_handler_logs_it(procs, caplog):
    rig = Rig({})
    rig.loop.set_exception_handler(None)                       # asyncio's default: the log
    try:
        def no_backend():
            raise RuntimeError("bug in on_no_backend")
        rig.svc.on_no_backend = no_backend
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            assert rig.run(rig.first_line()) == b""            # closed at once: no backend
        assert "fastlb core: the on_no_backend callback failed" in caplog.text
        assert "RuntimeError: bug in on_no_backend" in caplog.text
    finally:
        rig.close()


def test_keyboard_interrupt_in_a_callback_is_raised_from_the_loop_not_swallowed():
    rig = Rig({})
    try:
        def interrupted():
            raise KeyboardInterrupt
        rig.svc.on_no_backend = interrupted

        async def connect_and_wait():
            await rig.first_line()
            await asyncio.sleep(5)
        with pytest.raises(KeyboardInterrupt):
            rig.run(connect_and_wait())
        assert rig.errors == []
    finally:
        for task in asyncio.all_tasks(rig.loop):
            task.cancel()
        rig.close()


def test_session_cannot_be_built_from_python_and_owns_no_fd():
    with pytest.raises(CoreTypeError, match="made by its Engine"):
        _core.Session()
    before = os.fstat(0)
    s = _core.Session.__new__(_core.Session)                   # no __init__: still owns nothing
    del s
    assert os.fstat(0) == before                               # fd 0 not closed by its dealloc


def test_close_backend_counts_and_close_is_idempotent(procs):
    _, port = start_backend(procs, "echo")
    rig = Rig({0: port, 1: port})                              # two slots, one echo server
    try:
        async def scenario():
            conns = [await asyncio.open_connection("127.0.0.1", rig.port) for _ in range(4)]
            for r, w in conns:                                 # all four are established
                w.write(b"x")
                assert await r.readexactly(1) == b"x"
            assert rig.engine.close_backend(rig.svc, 0) == 2   # round robin: 0, 1, 0, 1
            for r, _w in conns[0::2]:
                assert await r.read() == b""
            for r, w in conns[1::2]:                           # slot 1's sessions go on
                w.write(b"y")
                assert await r.readexactly(1) == b"y"
            assert _core.abort_where(rig.engine, rig.svc, 1) == 2   # the old name, same thing
            for r, w in conns:
                assert await r.read() == b""
                w.close()
        rig.run(scenario())
        assert rig.counters.active(0) == rig.counters.active(1) == 0
        rig.engine.close()
        rig.engine.close()
        with pytest.raises(CoreArgumentError, match="closed Engine"):
            rig.engine.listen(socket.socket(), rig.svc)
    finally:
        rig.close()


def test_engine_block_out_of_range():
    counters = _core.Counters(bytearray(_core.Counters.size_for(4, 2)), 4, 2)
    loop = uvloop.new_event_loop()
    try:
        with pytest.raises(CoreArgumentError, match="block 2 out of range 0..1"):
            _core.Engine(loop, counters, 2)
    finally:
        loop.close()


def test_debug_counts_is_none_in_a_normal_build():
    if _core.debug_counts() is not None:
        pytest.skip("a debug build in place (make debug); test_core_debug covers it")
    with pytest.raises(CoreArgumentError, match="needs a debug build"):
        _core._debug_fail_epoll(1)


HOT = ("on_client", "on_backend", "_pump", "_flush", "_update", "_shut_if_done", "_watch")
# Reference counting macros are not calls into the interpreter; _pump has one INCREF/DECREF
# pair around the passive-failure report on its recv-error path.
NOT_CALLS = {"__Pyx_INCREF", "__Pyx_DECREF", "__Pyx_XDECREF", "__Pyx_RefNannySetupContext",
             "__Pyx_RefNannyFinishContext", "__Pyx_RefNannyDeclarations"}


def test_per_event_functions_make_no_python_c_api_call():
    """docs/ARCHITECTURE.md's claim, checked in the C that Cython generated for this build."""
    import re
    path = os.path.join(os.path.dirname(_core.__file__), "_core.c")
    if not os.path.exists(path):
        pytest.skip("no generated _core.c next to the extension (built out of tree)")
    with open(path) as f:
        src = f.read()
    if "__Pyx_TraceLine(" in src:
        pytest.skip("a line-traced debug build (make debug) calls the tracer on every line")
    for name in HOT:
        m = re.search(rf"\nstatic [^\n;]*__pyx_f_6fastlb_5_core_7Session_{name}\([^;{{]*\)\s*\{{", src)
        assert m, f"Session.{name} not found in _core.c"
        i, depth = m.end(), 1
        while depth:
            depth += (src[i] == "{") - (src[i] == "}")
            i += 1
        code = re.sub(r"/\*.*?\*/", "", src[m.end():i], flags=re.DOTALL)
        calls = set(re.findall(r"\b((?:_?Py|__Pyx_)\w*)\s*\(", code)) - NOT_CALLS
        assert not calls, f"Session.{name} calls the Python C-API: {sorted(calls)}"


def test_callbacks_may_close_sessions_listeners_or_the_engine_in_the_middle_of_a_batch():
    rig = Rig({0: closed_port()})
    try:
        calls = []

        def close_everything():                 # runs inside _on_ready, other events pending
            calls.append(1)
            rig.engine.close_backend(rig.svc, 0)
            rig.engine.abort_all()
            rig.engine.close()
        rig.svc.on_no_backend = close_everything
        rig.svc.retries = 0

        async def many():
            async def one():
                try:
                    r, w = await asyncio.open_connection("127.0.0.1", rig.port)
                except OSError:
                    return b""
                try:
                    return await r.read()
                except OSError:
                    return b""
                finally:
                    w.close()
            return await asyncio.gather(*(one() for _ in range(20)))
        assert rig.run(many()) == [b""] * 20
        assert calls == [1]                     # the first closed the engine; no crash after
        assert rig.errors == []
    finally:
        rig.close()
