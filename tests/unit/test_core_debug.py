"""The debug build of the core (FASTLB_DEBUG=1), as uvloop's DEBUG build: it counts the engine's
live sessions, buffers and fds, and after engine.close() every count must be back to zero.

The debug variant is built from a copy of the package in a temporary directory (the tree's own
fastlb/_core.c and .so stay the optimised ones) and driven in a subprocess through a small real
scenario on 127.0.0.1: echoed connections, a half-close, a refused backend, a client reset, two
epoll_ctl failures injected by the debug build's hook, and sessions still open at close().
"""
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What every debug-build scenario (this file's, test_access_debug's, test_tls_debug's,
# test_tls_orig_debug's) starts with: its imports (tlshelpers' clients and servers too), the
# check that it runs the debug build, an echo backend, a closed port, the process's RSS and open
# fds, and the pieces of a scenario's main(): an engine, its sweeps, a client in a thread, the
# close and the counts after it. The scenario defines main(); EPILOGUE runs it.
PRELUDE = textwrap.dedent('''
    import asyncio, gc, json, os, resource, socket, ssl, struct, sys, threading
    import uvloop
    from fastlb import _core
    from tlshelpers import read_to_eof, refused_at_once, stall_server

    assert _core.__file__.startswith(sys.argv[1]), _core.__file__   # the debug build, not the tree's

    def echo_server():
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)
        def serve(conn):
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)
        def accept():
            while True:
                conn, _ = srv.accept()
                threading.Thread(target=serve, args=(conn,), daemon=True).start()
        threading.Thread(target=accept, daemon=True).start()
        return srv.getsockname()[1]

    def closed_port():
        s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
        return port

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

    def nfds():
        return len(os.listdir("/proc/self/fd"))

    def new_engine(loop, n, up=(0,)):
        """An engine over n backend slots: (counters, health bitmap with ``up`` marked up, engine)."""
        counters = _core.Counters(bytearray(_core.Counters.size_for(n)), n)
        health = _core.HealthBitmap(bytearray(_core.HealthBitmap.size_for(n)), n)
        for slot in up:
            health.mark_up(slot)
        return counters, health, _core.Engine(loop, counters, 0)

    def sweeping(engine, every=0.03):
        """A task running the engine's sweep (its timeouts) every ``every`` s, as the data plane."""
        async def sweep():
            while True:
                await asyncio.sleep(every)
                engine.sweep(False)
        return asyncio.get_running_loop().create_task(sweep())

    def run(f, *args):
        """f(*args) in a thread (a blocking client), awaitable."""
        return asyncio.get_running_loop().run_in_executor(None, f, *args)

    def close_engine(engine, sweeper, clients=()):
        """The sweeps stopped, the engine closed (a debug build raises AssertionError if anything
        leaked), then the clients still open."""
        sweeper.cancel()
        engine.close()
        for c in clients:
            c.close()

    def counts_after(out):
        """``out`` with the debug counts once the engine is collected (the caller dropped it)."""
        gc.collect()
        out["after"] = _core.debug_counts()
        return out
''')
EPILOGUE = "\nprint(json.dumps(uvloop.run(main())))\n"


def run_scenario(root, name: str, body: str, *args: str, timeout: float = 60) -> dict:
    """PRELUDE + body (defining main()) + EPILOGUE as ``name`` in the debug build's directory, run
    against that build (then tests/, for tlshelpers) with ``root`` and ``args`` as its argv; what
    main() returned (its last stdout line, parsed as JSON)."""
    (root / name).write_text(PRELUDE + body + EPILOGUE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), TESTS]))
    out = subprocess.run([sys.executable, name, str(root), *args], cwd=root, env=env,
                         capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


SCENARIO = textwrap.dedent('''
    async def main():
        loop = asyncio.get_running_loop()
        errors = []
        loop.set_exception_handler(lambda l, ctx: errors.append(ctx["message"]))
        n = 8
        counters, health, engine = new_engine(loop, n, range(n))
        ports = {}
        for name, backends, retries in (("echo", {0: echo_server()}, 2),
                                        ("refused", {1: closed_port()}, 0),
                                        ("capped", {2: echo_server()}, 0)):
            svc = _core.ServiceState(name)
            svc.retries = retries
            if name == "capped":
                _core.set_max_conns(engine, 2, 1)
                svc.row, svc.queue_size, svc.queue_timeout = 3, 2, 30.0
                capped_svc = svc
            svc.set_backends(_core.make_policy("round_robin", list(backends), [1] * len(backends),
                                               health), {s: ("127.0.0.1", p) for s, p in backends.items()})
            lsock = socket.socket(); lsock.bind(("127.0.0.1", 0)); lsock.listen(128)
            ports[name] = lsock.getsockname()[1]
            engine.listen(lsock, svc)
        out = {"before": _core.debug_counts()}
        conn = lambda name: asyncio.open_connection("127.0.0.1", ports[name])

        # echoed connections, each ended by a half-close from the client
        for i in range(20):
            r, w = await conn("echo")
            w.write(b"x" * (1000 * i + 1))
            await r.readexactly(1000 * i + 1)
            w.write_eof()
            assert await r.read() == b""
            w.close()
        # a refused backend: the client is closed at once
        r, w = await conn("refused")
        assert await r.read() == b""
        w.close()
        # a client reset (RST by SO_LINGER 0) in the middle of a session
        def reset():
            s = socket.create_connection(("127.0.0.1", ports["echo"]), timeout=5)
            s.sendall(b"hello"); assert s.recv(5) == b"hello"
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        await loop.run_in_executor(None, reset)
        # epoll_ctl failing when a new client is registered: closed at once, not stalled
        _core._debug_fail_epoll(1)
        r, w = await conn("echo")
        assert await asyncio.wait_for(r.read(), 2) == b""
        w.close()
        # ... and when an established session changes interest (the client's half-close)
        r, w = await conn("echo")
        w.write(b"ping"); assert await r.readexactly(4) == b"ping"
        _core._debug_fail_epoll(1)
        w.write_eof()
        assert await asyncio.wait_for(r.read(), 2) == b""
        w.close()
        out["epoll_errors"] = engine.epoll_errors
        # [limits] a backend capped at 1 with a queue of 2: one served, two queued, one refused
        r1, w1 = await conn("capped")
        w1.write(b"a"); assert await r1.readexactly(1) == b"a"
        queued = [await conn("capped") for _ in range(2)]
        await asyncio.sleep(0.05)
        r4, w4 = await conn("capped")
        assert await asyncio.wait_for(r4.read(), 2) == b""       # the queue is full
        w4.close()
        w1.close()                                               # its place goes to the head
        r2, w2 = queued[0]
        w2.write(b"b"); assert await asyncio.wait_for(r2.readexactly(1), 2) == b"b"
        w2.write_eof(); assert await r2.read() == b""; w2.close()
        await asyncio.sleep(0.05)
        out["capped"] = capped_svc.qlen                          # the last one: connected now
        queued.append(await conn("capped"))                      # queued at close()
        await asyncio.sleep(0.05)
        # [limits] a local error: accept4 takes the last fd, the backend's socket() fails
        local = []
        engine.on_local_error = lambda what, exc, n: local.append((what, exc.errno, n))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        client = socket.socket(); client.setblocking(False)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(map(int, os.listdir("/proc/self/fd"))) + 1, hard))
        fillers = []
        try:
            while True:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        os.close(fillers.pop())                                  # one fd left
        client.connect_ex(("127.0.0.1", ports["echo"]))
        await asyncio.sleep(0.2)
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        client.setblocking(True); client.settimeout(2)
        assert client.recv(1) == b""                             # closed, not served
        client.close()
        out["local"] = local
        out["paused"] = _core.limits_info(engine)["paused_fds"]  # every listener, for 100 ms
        await asyncio.sleep(0.15)
        _core.limits_sweep(engine)                               # the data plane's 100 ms tick
        out["resumed"] = _core.limits_info(engine)
        # sessions still open at close()
        held = [await conn("echo") for _ in range(5)]
        for r, w in held:
            w.write(b"y"); await r.readexactly(1)
        await asyncio.sleep(0.1)
        out["open"] = _core.debug_counts()
        engine.close()                 # a debug build raises AssertionError if anything leaked
        for r, w in held + queued[1:]:
            assert await r.read() == b""
            w.close()
        del engine
        counts_after(out)
        out["errors"] = errors
        out["totals"] = counters.slot_stats(0)
        return out
''')


@pytest.fixture(scope="module")
def debug_build(tmp_path_factory):
    """fastlb copied to a temp dir and built there with FASTLB_DEBUG=1; (dir, seconds)."""
    root = tmp_path_factory.mktemp("debug-build")
    shutil.copytree(os.path.join(REPO, "fastlb"), root / "fastlb",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "*.html", "__pycache__"))
    shutil.copy(os.path.join(REPO, "setup.py"), root)
    env = dict(os.environ, FASTLB_DEBUG="1", FASTLB_FORCE="1")
    start = time.monotonic()
    out = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return root, time.monotonic() - start


def test_every_resource_is_released_at_engine_teardown(debug_build):
    root, seconds = debug_build
    got = run_scenario(root, "scenario.py", SCENARIO)
    assert got["before"] == {"sessions": 0, "buffers": 0, "buffers_in_use": 0, "fds": 1, "engines": 1}
    opened = got["open"]
    # idle sessions hold no buffer (given back when drained); the pool keeps the freed ones
    assert opened["sessions"] >= 5 and opened["fds"] >= 1 + 2 * 5 and opened["buffers_in_use"] == 0
    assert opened["buffers"] >= 1
    assert got["after"] == {"sessions": 0, "buffers": 0, "buffers_in_use": 0, "fds": 0, "engines": 0}
    assert got["epoll_errors"] == 2
    assert got["errors"] == ["fastlb core: epoll_ctl failed: 1 session(s) closed"], got["errors"]
    assert got["totals"]["active"] == 0 and got["totals"]["total"] >= 27
    assert got["capped"] == 0 and got["local"] == [["connect", errno.EMFILE, 1]]
    assert got["paused"] == 3
    assert got["resumed"] == {"paused_limit": 0, "paused_fds": 0, "queued": 1}
    print(f"debug build: {seconds:.1f}s to compile")
