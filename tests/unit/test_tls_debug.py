"""[tls] The handshake phase in the debug build of the core (FASTLB_DEBUG=1): thousands of
failed handshakes (garbage instead of a ClientHello, a ClientHello cut short then a close,
clients gone before a byte, handshakes past the timeout) leave no session, buffer or fd behind,
and the process's fds and RSS do not grow with them (an SSL object leaked per failure would be
tens of MB); served clients still round-trip. The build fixture is test_core_debug's."""
import textwrap

import pytest

from test_core_debug import debug_build, run_scenario  # noqa: F401  (the module-scoped build fixture)
from tlshelpers import write_pems

pytest.importorskip("trustme")

SCENARIO = textwrap.dedent('''
    cert, key, cafile = (open(p, "rb").read() for p in sys.argv[2:5])

    GARBAGE = [b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n",
               bytes.fromhex("16030100a1010000"),           # a ClientHello's start, then gone
               None]                                        # gone before a byte

    def garbage(port, i):
        refused_at_once(port, GARBAGE[i % 3], shut=i % 3 == 1, timeout=5)

    def good(port):
        ctx = ssl.create_default_context(cadata=cafile.decode())
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                             server_hostname="edge.test") as s:
            s.sendall(b"ping")
            return s.recv(4)

    async def main():
        loop = asyncio.get_running_loop()
        counters, health, engine = new_engine(loop, 4)
        svc = _core.ServiceState("edge")
        svc.set_backends(_core.make_policy("round_robin", [0], [1], health),
                         {0: ("127.0.0.1", echo_server())})
        svc.tls = _core.TlsContext([(cert, key)], handshake_timeout=0.2)
        lsock = socket.socket(); lsock.bind(("127.0.0.1", 0)); lsock.listen(512)
        port = lsock.getsockname()[1]
        engine.listen(lsock, svc)
        sweeper = sweeping(engine)

        def burst(k):
            for i in range(k):
                garbage(port, i)
        out = {"good": []}
        out["good"].append((await run(good, port)).decode())
        await run(burst, 1500)                      # warm: pools, OpenSSL's tables
        gc.collect()
        out["fds0"], out["rss0"] = nfds(), rss()
        await run(burst, 6000)
        silent = [await run(socket.create_connection, ("127.0.0.1", port)) for _ in range(50)]
        await asyncio.sleep(0.6)                    # past the handshake timeout
        for s in silent:
            s.close()
        await asyncio.sleep(0.1)
        gc.collect()
        out["fds1"], out["rss1"] = nfds(), rss()
        out["good"].append((await run(good, port)).decode())
        out["counts"] = [engine.tls_handshakes, engine.tls_failures, engine.tls_timeouts]
        stuck = [await run(socket.create_connection, ("127.0.0.1", port)) for _ in range(3)]
        await asyncio.sleep(0.05)
        out["open"] = _core.debug_counts()
        close_engine(engine, sweeper, stuck)
        del engine, svc
        return counts_after(out)
''')


def test_failed_handshakes_leave_nothing_behind(debug_build, tmp_path, ca):  # noqa: F811
    root, _ = debug_build
    leaf = ca.issue_cert("edge.test")
    paths = write_pems(tmp_path, (("c.pem", b"".join(p.bytes() for p in leaf.cert_chain_pems)),
                                  ("k.pem", leaf.private_key_pem.bytes()), ("ca.pem", ca.cert_pem.bytes())))
    res = run_scenario(root, "tls_scenario.py", SCENARIO, *paths, timeout=240)
    assert res["good"] == ["ping", "ping"]
    handshakes, failures, timeouts = res["counts"]
    assert handshakes == 2 and timeouts == 50 and failures >= 7500 - 3    # (resets may race)
    assert res["fds1"] <= res["fds0"] + 2, res
    assert res["rss1"] - res["rss0"] < 4096, res          # KiB: 6000 leaked SSLs would be > 20 MiB
    assert res["open"]["sessions"] >= 3
    assert res["after"] == {"sessions": 0, "buffers": 0, "buffers_in_use": 0, "fds": 0,
                            "engines": 0}
