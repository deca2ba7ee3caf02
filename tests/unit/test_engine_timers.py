"""[mem] The engine's first_byte timer in process: a backend that accepts and never answers is
closed on, counted (Engine.timeouts_first_byte, the service row's G_FIRST_BYTE_TIMEOUT) and
reported as a passive failure; an answering backend is not."""
import asyncio
import socket

import uvloop

from fastlb import _core

NSLOTS = 8
ROW = 5


def test_first_byte_timeout_counts_in_the_service_row_and_as_a_passive_failure():
    loop = uvloop.new_event_loop()
    counters = _core.Counters(bytearray(_core.Counters.size_for(NSLOTS)), NSLOTS)
    health = _core.HealthBitmap(bytearray(_core.HealthBitmap.size_for(NSLOTS)), NSLOTS)
    mute = socket.socket()                 # accepts (in the kernel's backlog), never answers
    mute.bind(("127.0.0.1", 0))
    mute.listen(16)
    health.mark_up(0)
    engine = _core.Engine(loop, counters, 0)
    svc = _core.ServiceState("t")
    svc.set_backends(_core.make_policy("round_robin", [0], [1], health),
                     {0: ("127.0.0.1", mute.getsockname()[1])})
    svc.first_byte = 0.3
    svc.fall_passive = 1
    svc.row = ROW
    downs = []
    svc.on_passive_down = lambda slot, n, reason: downs.append((slot, n, reason))
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    engine.listen(lsock, svc)

    async def scenario():
        async def sweeper():
            while True:
                await asyncio.sleep(0.05)
                engine.sweep(True)
        task = asyncio.ensure_future(sweeper())
        r, w = await asyncio.open_connection("127.0.0.1", lsock.getsockname()[1])
        await asyncio.sleep(0.1)
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", lsock.getsockname()[1])
        w.write(b"hello")                  # the clock starts once this reaches the backend
        t0 = loop.time()
        assert await asyncio.wait_for(r.read(), 3) == b""
        took = loop.time() - t0
        still_open = len(engine.sessions)   # the client that sent nothing: no first_byte clock
        task.cancel()
        w.close()
        idle_w.close()
        return took, still_open

    try:
        took, still_open = loop.run_until_complete(scenario())
        assert 0.25 <= took < 2.0
        assert still_open == 1
        assert engine.timeouts_first_byte == 1
        assert engine.gauges.get(ROW, _core.G_FIRST_BYTE_TIMEOUT) == 1
        assert downs == [(0, 1, "connection timed out")]
    finally:
        engine.close()
        loop.close()
        mute.close()
