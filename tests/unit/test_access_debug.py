"""[access] The before-connect phase in the debug build of the core (FASTLB_DEBUG=1): sessions
refused by the ACL, PROXY headers accepted, malformed or late, silent clients closed by
client_first_byte, clients still waiting at close(): afterwards no session, buffer or fd is
left, and every per-source entry is released (the table's count back at 0, not below).
The build fixture is test_core_debug's (a copy of the package built in a temp dir)."""
import textwrap

from test_core_debug import debug_build, run_scenario  # noqa: F401  (the module-scoped build fixture)

SCENARIO = textwrap.dedent('''

    def client(port, source, data=b"", shut=False):
        s = socket.socket(); s.settimeout(5); s.bind((source, 0)); s.connect(("127.0.0.1", port))
        try:
            if data:
                s.sendall(data)
            if shut:
                s.shutdown(socket.SHUT_WR)
        except OSError:         # a refused client may be closed (reset) before it gets here
            pass
        return s

    def drain(s):
        with s:
            return read_to_eof(s)

    async def main():
        loop = asyncio.get_running_loop()
        counters, health, engine = new_engine(loop, 8)
        table = _core.SourceTable(bytearray(_core.SourceTable.size_for(64)), 64)
        svc = _core.ServiceState("edge")
        svc.row = 1
        svc.set_backends(_core.make_policy("round_robin", [0], [1], health),
                         {0: ("127.0.0.1", echo_server())})
        svc.adm = _core.Admission(acl=_core.Acl(deny=["127.0.0.3/32", "192.0.2.66/32"]),
                                  pp_from=_core.Acl(allow=["127.0.0.5/32"]), pp_timeout=0.3,
                                  first_byte=0.3, srctab=table, conns=50, row=1)
        lsock = socket.socket(); lsock.bind(("127.0.0.1", 0)); lsock.listen(128)
        port = lsock.getsockname()[1]
        engine.listen(lsock, svc)
        sweeper = sweeping(engine)
        hdr = _core.proxy_build_v1(("192.0.2.7", 1000), ("127.0.0.1", port))
        bad = _core.proxy_build_v1(("192.0.2.66", 1000), ("127.0.0.1", port))
        out = {"before": _core.debug_counts()}
        got = {}
        got["served"] = await run(lambda: drain(client(port, "127.0.0.2", b"a" * 5000, True)))
        got["acl"] = await run(lambda: drain(client(port, "127.0.0.3", b"x", True)))
        got["pp"] = await run(lambda: drain(client(port, "127.0.0.5", hdr + b"payload", True)))
        got["pp_acl"] = await run(lambda: drain(client(port, "127.0.0.5", bad + b"payload", True)))
        got["pp_bad"] = await run(lambda: drain(client(port, "127.0.0.5", b"PROXY TCP4 1\\r\\n")))
        got["pp_slow"] = await run(lambda: drain(client(port, "127.0.0.5", b"PROXY TCP4 ")))
        got["silent"] = await run(lambda: drain(client(port, "127.0.0.2")))
        waiting = [await run(client, port, "127.0.0.2") for _ in range(3)]   # still silent
        waiting += [await run(client, port, "127.0.0.5", hdr[:10]) for _ in range(2)]
        await asyncio.sleep(0.05)
        out["open"] = _core.debug_counts()
        out["conns_open"] = table.total_conns()
        close_engine(engine, sweeper, waiting)
        del engine
        counts_after(out)
        out["conns_after"] = table.total_conns()
        out["got"] = {k: v.decode("latin-1") for k, v in got.items()}
        return out
''')


def test_no_resource_left_by_the_before_connect_phase(debug_build):  # noqa: F811
    root, _ = debug_build
    res = run_scenario(root, "access_scenario.py", SCENARIO)
    got = res["got"]
    assert got["served"] == "a" * 5000 and got["pp"] == "payload"
    assert got["acl"] == got["pp_acl"] == got["pp_bad"] == got["pp_slow"] == got["silent"] == ""
    assert res["open"]["sessions"] >= 5 and res["conns_open"] == 3     # the 3 silent ones
    assert res["after"] == {"sessions": 0, "buffers": 0, "buffers_in_use": 0, "fds": 0,
                            "engines": 0}
    assert res["conns_after"] == 0
