"""[orig] Backend TLS in the debug build of the core (FASTLB_DEBUG=1): thousands of failed
backend handshakes (a certificate from a foreign CA) and stalled ones (past the connect
timeout) leave no session, buffer or fd behind, the fds and RSS do not grow with them (an SSL
leaked per failure would be tens of MB), and good backends still round-trip, resuming their
cached session. The build fixture is test_core_debug's."""
import textwrap

import pytest

from test_core_debug import debug_build, run_scenario  # noqa: F401  (the module-scoped build fixture)
from tlshelpers import write_pems

trustme = pytest.importorskip("trustme")

SCENARIO = textwrap.dedent('''
    good_c, good_k, bad_c, bad_k, cafile = (open(p, "rb").read() for p in sys.argv[2:7])

    def tls_server(cert, key):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        d = sys.argv[1]
        open(d + "/c.pem", "wb").write(cert); open(d + "/k.pem", "wb").write(key)
        ctx.load_cert_chain(d + "/c.pem", d + "/k.pem")
        srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(512)
        def serve(raw):
            try:
                with ctx.wrap_socket(raw, server_side=True) as conn:
                    while data := conn.recv(65536):
                        conn.sendall(data)
                    conn.unwrap()   # a clean close: OpenSSL servers drop the session otherwise
            except OSError:
                pass
        def accept():
            while True:
                raw, _ = srv.accept()
                raw.settimeout(5)
                threading.Thread(target=serve, args=(raw,), daemon=True).start()
        threading.Thread(target=accept, daemon=True).start()
        return srv.getsockname()[1]

    def ask(port):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            s.sendall(b"ping")
            s.shutdown(socket.SHUT_WR)
            out = b""
            while data := s.recv(4096):
                out += data
            return out
        except OSError:
            return b"reset"
        finally:
            s.close()

    async def main():
        loop = asyncio.get_running_loop()
        counters, health, engine = new_engine(loop, 4, range(3))
        stall, held = stall_server()
        ports = {0: tls_server(bad_c, bad_k), 1: tls_server(good_c, good_k), 2: stall.getsockname()[1]}
        prof = (cafile, True, b"", b"")
        listen = {}
        for name, slot in (("bad", 0), ("good", 1), ("stall", 2)):
            svc = _core.ServiceState(name)
            svc.retries = 0
            svc.connect_timeout = 0.2
            svc.set_backends(_core.make_policy("round_robin", [slot], [1], health),
                             {slot: ("127.0.0.1", ports[slot])})
            svc.orig = _core.OrigContext([prof], [(slot, 0, "127.0.0.1")])
            lsock = socket.socket(); lsock.bind(("127.0.0.1", 0)); lsock.listen(512)
            engine.listen(lsock, svc)
            listen[name] = (lsock.getsockname()[1], svc)
        sweeper = sweeping(engine)

        def burst(k):
            return [ask(listen["bad"][0]) for _ in range(k)]
        out = {"good": [(await run(ask, listen["good"][0])).decode() for _ in range(3)]}
        out["cached"] = listen["good"][1].orig.cached(1)
        await run(burst, 500)                       # warm: pools, OpenSSL's tables
        gc.collect()
        out["fds0"], out["rss0"] = nfds(), rss()
        answers = await run(burst, 2500)
        out["answered"] = sum(1 for a in answers if a not in (b"", b"reset"))
        out["stalled"] = await asyncio.gather(*(run(ask, listen["stall"][0]) for _ in range(20)))
        out["stalled"] = [a.decode() for a in out["stalled"]]
        await asyncio.sleep(0.1)
        gc.collect()
        out["fds1"], out["rss1"] = nfds() - len(held), rss()   # held: the stall server's own
        out["good"].append((await run(ask, listen["good"][0])).decode())
        out["counts"] = [engine.orig_handshakes, engine.orig_resumed, engine.orig_failures]
        out["open"] = _core.debug_counts()
        close_engine(engine, sweeper, [c for c, _ in held])
        del engine, listen
        return counts_after(out)
''')


def test_failed_backend_handshakes_leave_nothing_behind(debug_build, tmp_path, ca):  # noqa: F811
    root, _ = debug_build
    good, bad = ca.issue_cert("127.0.0.1"), trustme.CA().issue_cert("127.0.0.1")
    paths = write_pems(tmp_path, (("g.pem", good.cert_chain_pems[0].bytes()),
                                  ("gk.pem", good.private_key_pem.bytes()),
                                  ("b.pem", bad.cert_chain_pems[0].bytes()),
                                  ("bk.pem", bad.private_key_pem.bytes()), ("ca.pem", ca.cert_pem.bytes())))
    res = run_scenario(root, "orig_scenario.py", SCENARIO, *paths, timeout=240)
    assert res["good"] == ["ping"] * 4 and res["cached"]
    assert res["answered"] == 0 and res["stalled"] == [""] * 20
    handshakes, resumed, failures = res["counts"]
    assert handshakes == 4 and resumed >= 2 and failures == 3000
    assert res["fds1"] <= res["fds0"] + 2, res
    assert res["rss1"] - res["rss0"] < 4096, res          # KiB: 2500 leaked SSLs would be > 10 MiB
    assert res["after"] == {"sessions": 0, "buffers": 0, "buffers_in_use": 0, "fds": 0,
                            "engines": 0}
