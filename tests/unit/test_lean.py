"""The lean connection path (core/lean.pxi, issue 15), in-process on uvloop with real sockets:
TCP_NODELAY inherited from the listener and set on the backend before its second send, connect
refusals learned from the event still retried and counted, a shared listener registered in the
event loop's own epoll set (one wake-up per connection) that still pauses and resumes at
maxconn, and no Python call in the new per-event functions."""
import asyncio
import os
import socket

import pytest
from generated_c import needs_c, python_calls
from helpers import closed_port, start_backend
from test_engine import Rig

from fastlb import _core


def _nodelay_of_peer(port: int) -> list[int]:
    """TCP_NODELAY of this process's TCP sockets connected to 127.0.0.1:``port``."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            s = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        try:
            if s.type == socket.SOCK_STREAM and s.family == socket.AF_INET:
                if s.getpeername()[1] == port:
                    out.append(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        except OSError:
            pass
        finally:
            s.close()
    return out


def test_this_kernel_copies_tcp_nodelay_from_the_listener_to_accepted_sockets():
    """The engine relies on it to save a setsockopt per connection."""
    with socket.socket() as lst:
        lst.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        lst.bind(("127.0.0.1", 0))
        lst.listen()
        with socket.create_connection(lst.getsockname()) as c:
            a, _ = lst.accept()
            with a:
                assert a.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            del c


def test_nodelay_on_the_client_from_the_listener_and_on_the_backend_before_its_second_send(procs):
    _, be = start_backend(procs, "echo")
    rig = Rig({0: be})

    async def scenario():
        r, w = await asyncio.open_connection("127.0.0.1", rig.port)
        w.write(b"a")
        assert await r.readexactly(1) == b"a"
        client_port = w.get_extra_info("sockname")[1]
        assert _nodelay_of_peer(client_port) == [1]     # the accepted socket: inherited
        assert _nodelay_of_peer(be) == [0]               # one send: Nagle cannot hold it
        w.write(b"b")
        assert await r.readexactly(1) == b"b"
        assert _nodelay_of_peer(be) == [1]               # set before the second send
        w.close()
    try:
        rig.run(scenario())
    finally:
        rig.close()


def test_a_refused_connect_learned_from_the_event_is_retried_and_counted(procs):
    _, port = start_backend(procs, "announce", name="b")
    rig = Rig({0: closed_port(), 1: port})
    try:
        for _ in range(4):          # round robin: every other client meets the refusal first
            assert rig.run(rig.first_line()) == b"b\n"
        assert rig.counters.get(0, _core.CTR_CONNECT_FAILURES) == 2
        assert rig.counters.get(0, _core.CTR_RETRIES) == 2
        assert rig.counters.get(1, _core.CTR_TOTAL) == 4
        assert rig.counters.get(0, _core.CTR_TOTAL) == 0
    finally:
        rig.close()


def _shared_rig(backends, maxconn=0):
    """A Rig whose listener is added as a shared one once the loop has polled (as a worker's)."""
    rig = Rig(backends)                          # (its own listener stays, not shared)
    rig.run(asyncio.sleep(0.01))                 # the loop polls: the engine's fd is in its set
    rig.engine.maxconn = maxconn
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    rig.shared_port = sock.getsockname()[1]
    rig.shared = rig.engine.listen(sock, rig.svc, True)
    return rig


def test_a_shared_listener_in_the_loops_epoll_wakes_once_per_connection(procs):
    _, port = start_backend(procs, "announce", name="b")
    rig = _shared_rig({0: port})

    async def one():
        r, w = await asyncio.open_connection("127.0.0.1", rig.shared_port)
        line = await r.readline()
        w.close()
        return line
    try:
        w0, a0 = rig.engine.accept_wakeups, rig.engine.accepted
        for _ in range(20):
            assert rig.run(one()) == b"b\n"
            rig.run(asyncio.sleep(0.005))
        assert rig.engine.accepted - a0 == 20
        assert rig.engine.accept_wakeups - w0 == 20       # each connection: one wake-up
        assert _exclusive_sets(), "the listener is in no epoll set with EPOLLEXCLUSIVE"
        rig.engine.unlisten(rig.shared)
        assert not _exclusive_sets()                       # left the loop's set
        rig.run(asyncio.sleep(0.05))                       # and the loop neither spins nor fails
        assert rig.run(rig.first_line()) == b"b\n"         # the other listener still serves
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", rig.shared_port), timeout=2).close()
    finally:
        rig.close()


def _exclusive_sets() -> list[int]:
    """This process's epoll fds holding an item with EPOLLEXCLUSIVE (1 << 28)."""
    import re
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") != "anon_inode:[eventpoll]":
                continue
            text = open(f"/proc/self/fdinfo/{name}").read()
        except OSError:
            continue
        if any(int(e, 16) & (1 << 28) for e in re.findall(r"events:\s*([0-9a-fA-F]+)", text)):
            out.append(int(name))
    return out


def test_a_shared_listener_pauses_at_maxconn_and_resumes_in_the_loops_set(procs):
    _, port = start_backend(procs, "announce", name="b")
    rig = _shared_rig({0: port}, maxconn=1)

    async def scenario():
        r1, w1 = await asyncio.open_connection("127.0.0.1", rig.shared_port)
        assert await r1.readline() == b"b\n"
        r2, w2 = await asyncio.open_connection("127.0.0.1", rig.shared_port)  # in the backlog
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(r2.readline(), 0.3)
        w1.close()                                          # a place frees: re-armed
        assert await asyncio.wait_for(r2.readline(), 5) == b"b\n"
        w2.close()
    try:
        rig.run(scenario())
    finally:
        rig.close()


@needs_c
@pytest.mark.parametrize("name", ["lean_connect_error", "lean_before_send", "lean_saw",
                                  "lean_eof_after", "lean_interest", "lean_close_both"])
def test_the_lean_per_event_functions_make_no_python_call(name):
    assert python_calls(name) == set()
