"""The connection log's core pieces (core/connlog.pxi) against pure-Python twins: the ring
(single writer, single reader, drops when full), the histograms (bucket placement, sums over
blocks), the sampling; the engine's record of real sessions on loopback; the formats."""
import bisect
import json
import mmap
import multiprocessing as mp
import re
import socket
import struct
import time

import pytest
from generated_c import no_python_call_test
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlb import _core, config, connlog
from fastlb.errors import ConfigError, CoreArgumentError

EDGES = _core.HISTOGRAM_EDGES_US


# -- the twins ----------------------------------------------------------------------------------
class RingTwin:
    """What the ring must do: a bounded FIFO that drops (and counts) what does not fit."""

    def __init__(self, capacity):
        self.capacity, self.items, self.drops = capacity, [], 0

    def push(self, rec):
        if len(self.items) >= self.capacity:
            self.drops += 1
            return False
        self.items.append(rec)
        return True

    def drain(self, limit):
        out, self.items = self.items[:limit], self.items[limit:]
        return out


def bucket_twin(us):
    """The le-bucket of a value: the first upper bound >= it (the last: +Inf)."""
    return bisect.bisect_left(EDGES, max(0, us))


def rec(i, client=("127.0.0.1", 40000), row=1, slot=2, term=1):
    return (1_700_000_000_000_000_000 + i, 1_699_999_999_000_000_000 + i, 1, 2, 3, 4 + i, 10 * i,
            20 * i, client, 8080, i % 3, row, slot, term)


def make(capacity=8, nrows=4, nblocks=2, block=0, buf=None):
    size = _core.ConnLog.size_for(nrows, nblocks, capacity)
    buf = buf if buf is not None else bytearray(size)
    return _core.ConnLog(buf, nrows, nblocks, block, capacity, 12345), buf


# -- the ring -------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.tuples(st.just("push"), st.integers(0, 1000)),
                          st.tuples(st.just("drain"), st.integers(0, 12))), max_size=80),
       st.sampled_from([2, 4, 8]))
def test_ring_matches_its_twin(ops, capacity):
    cl, _ = make(capacity)
    twin = RingTwin(capacity)
    for op, n in ops:
        if op == "push":
            assert cl.py_push(rec(n)) == twin.push(rec(n))
        else:
            assert cl.drain(0, n) == twin.drain(n)
        assert cl.pending(0) == len(twin.items)
        assert cl.dropped(0) == twin.drops
    assert cl.pending(1) == 0 and cl.dropped(1) == 0      # block 1's ring is its own


def test_record_round_trip_ipv6_and_unknown_client():
    cl, _ = make()
    for client in (("2001:db8::7", 65535), ("10.1.2.3", 1), None):
        cl.py_push(rec(1, client=client, row=3, slot=-1, term=_core.TERM_NCODES - 1))
    got = cl.drain(0)
    assert [g[8] for g in got] == [("2001:db8::7", 65535), ("10.1.2.3", 1), None]
    assert all(g[11:] == (3, -1, _core.TERM_NCODES - 1) for g in got)


def test_arguments_are_checked():
    with pytest.raises(CoreArgumentError, match="power of two"):
        _core.ConnLog.size_for(4, 1, 6)
    with pytest.raises(CoreArgumentError, match="block 2 out of range"):
        make(block=2)
    cl, _ = make()
    with pytest.raises(CoreArgumentError, match="row 4 out of range"):
        cl.histogram(4, _core.H_CONNECT)
    with pytest.raises(CoreArgumentError, match="block 5"):
        cl.drain(5)


def _writer(m, n, out):
    cl = _core.ConnLog(m, 4, 2, 1, 16, 1)
    pushed = sum(1 for i in range(n) if cl.py_push(rec(i)))
    out.put(pushed)


def test_one_writer_one_reader_in_two_processes_lose_nothing_but_drops():
    """A writer process fills a 16-record ring while this process drains it: every record
    pushed is read once, in order, whole; the rest are counted as drops."""
    n = 20000
    m = mmap.mmap(-1, _core.ConnLog.size_for(4, 2, 16))
    reader = _core.ConnLog(m, 4, 2, 0, 16, 1)
    q = mp.get_context("fork").Queue()
    p = mp.get_context("fork").Process(target=_writer, args=(m, n, q))
    p.start()
    got = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        got.extend(reader.drain(1))
        if not p.is_alive() and not reader.pending(1):
            break
    p.join(10)
    pushed = q.get(timeout=10)
    assert len(got) == pushed and pushed + reader.dropped(1) == n
    ids = [g[0] - 1_700_000_000_000_000_000 for g in got]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(g == rec(i) for g, i in zip(got, ids, strict=True))    # no torn record


# -- the histograms --------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(-5, 5 * 10 ** 9)), max_size=60))
def test_histograms_match_their_twin_and_sum_over_blocks(values):
    nrows, nblocks = 3, 2
    buf = bytearray(_core.ConnLog.size_for(nrows, nblocks, 2))
    views = [_core.ConnLog(buf, nrows, nblocks, b, 2, 0) for b in range(nblocks)]
    want = [[0] * _core.HB_BUCKETS for _ in range(2)]
    sums = [0, 0]
    for i, (block, us) in enumerate(values):
        kind = i % 2
        views[block].py_observe(1, kind, us)
        want[kind][bucket_twin(us)] += 1
        sums[kind] += max(0, us)
    for kind in (_core.H_CONNECT, _core.H_DURATION):
        assert views[0].histogram(1, kind) == (want[kind], sums[kind])
        assert views[1].histogram(0, kind) == ([0] * _core.HB_BUCKETS, 0)
    views[0].py_observe(-1, 0, 5)                       # no row: nothing
    views[1].zero(1)
    assert views[0].histogram(1, 0) == ([0] * _core.HB_BUCKETS, 0)


def test_bucket_edges_are_inclusive_upper_bounds():
    cl, _ = make(nblocks=1)
    for e in EDGES[:3]:
        cl.py_observe(0, 0, e)
        cl.py_observe(0, 0, e + 1)
    counts, _ = cl.histogram(0, 0)
    assert counts[:4] == [1, 2, 2, 1]


def test_sampling_thresholds():
    cl, _ = make()
    assert not any(cl.py_sampled(0) for _ in range(1000))
    assert all(cl.py_sampled(1 << 32) for _ in range(1000))
    half = sum(cl.py_sampled(1 << 31) for _ in range(20000))
    assert 8000 < half < 12000


# -- the engine writes a record per session (in process, real sockets) -------------------------
def _engine_with_log(loop, sample=1 << 32):
    nslots = 8
    counters = _core.Counters(bytearray(_core.Counters.size_for(nslots)), nslots)
    health = _core.HealthBitmap(bytearray(_core.HealthBitmap.size_for(nslots)), nslots)
    eng = _core.Engine(loop, counters)
    cl = _core.ConnLog(bytearray(_core.ConnLog.size_for(nslots + 1, 1, 64)), nslots + 1, 1, 0, 64, 7)
    eng.connlog = cl
    svc = _core.ServiceState("web")
    svc.row = 5
    svc.log_sample = sample
    return eng, cl, svc, health


def test_engine_writes_one_record_per_session_with_its_fields():
    import asyncio

    async def main():
        loop = asyncio.get_running_loop()
        eng, cl, svc, health = _engine_with_log(loop)
        backend = socket.socket()
        backend.bind(("127.0.0.1", 0))
        backend.listen(8)
        backend.setblocking(False)
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        refused_port = closed.getsockname()[1]
        closed.close()
        health.mark_up(1)
        health.mark_up(2)
        svc.set_backends(_core.make_policy("round_robin", [2, 1], [1, 1], health),
                         {1: ("127.0.0.1", backend.getsockname()[1]),
                          2: ("127.0.0.1", refused_port)})
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(8)
        lport = lsock.getsockname()[1]
        eng.listen(lsock, svc)
        c = socket.socket()
        c.setblocking(False)
        await loop.sock_connect(c, ("127.0.0.1", lport))
        await loop.sock_sendall(c, b"ping!")
        b, _ = await loop.sock_accept(backend)
        assert await loop.sock_recv(b, 5) == b"ping!"
        await loop.sock_sendall(b, b"pong")
        assert await loop.sock_recv(c, 4) == b"pong"
        c.shutdown(socket.SHUT_WR)
        assert await loop.sock_recv(b, 5) == b""
        b.close()
        assert await loop.sock_recv(c, 5) == b""
        for _ in range(100):
            if cl.pending(0):
                break
            await asyncio.sleep(0.01)
        (r,) = cl.drain(0)
        c.close()
        eng.close()
        backend.close()
        return r, lport, cl

    r, lport, cl = asyncio.run(main())
    end_ns, accept_ns, tw, tc, tr, tt, bin_, bout, client, port, retries, row, slot, term = r
    assert _core.TERM_CODES[term] == "--" and (bin_, bout) == (5, 4)
    assert client[0] == "127.0.0.1" and port == lport and row == 5 and slot == 1
    assert retries in (0, 1)                    # round robin may try the refused one first
    assert 0 <= tw <= tt and 0 <= tc <= tt and 0 <= tr <= tt
    assert end_ns - accept_ns == tt * 1000 or abs(end_ns - accept_ns - tt * 1000) < 1000
    assert abs(end_ns / 1e9 - time.time()) < 60
    counts, total = cl.histogram(5, _core.H_DURATION)
    assert sum(counts) == 1 and total == tt
    assert sum(cl.histogram(5, _core.H_CONNECT)[0]) == 1


def test_a_connection_refused_before_its_session_is_logged_with_its_code():
    """cl_refused, for the close sites of the access and overload work (ACL, source limits at
    the accept): a record with the code, the client and no backend, when sampled."""
    import asyncio

    async def main():
        eng, cl, svc, _ = _engine_with_log(asyncio.get_running_loop())
        _core._cl_refused(eng, svc, 8080, ("192.0.2.7", 5555), _core.TERM_PR)
        svc.log_sample = 0
        _core._cl_refused(eng, svc, 8080, ("192.0.2.8", 5555), _core.TERM_PR)   # not sampled
        got = cl.drain(0)
        eng.close()
        return got

    (r,) = asyncio.run(main())
    assert r[8:] == (("192.0.2.7", 5555), 8080, 0, 5, -1, _core.TERM_PR)
    assert r[2:4] == (-1, -1) and r[6:8] == (0, 0) and r[5] >= 0


# -- formats and config --------------------------------------------------------------------------
NAMES = ({1: ("web", "text"), 3: ("api", "json")}, {2: "10.0.0.1:80"})


def test_text_and_json_lines():
    line = connlog.format_record(rec(1), NAMES, 0)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d 127\.0\.0\.1:40000 "
                        r"web:8080 web/10\.0\.0\.1:80 0\.001/0\.002/0\.003/0\.005 10/20 -- 1",
                        line), line
    nosrv = connlog.format_record(rec(2, client=("::1", 5), slot=-1, term=_core.TERM_SC), NAMES, 0)
    assert " [::1]:5 " in nosrv and "web/<NOSRV>" in nosrv and " SC " in nosrv
    js = json.loads(connlog.format_record(rec(3, row=3), NAMES, 1))
    assert js["service"] == "api" and js["backend"] == "10.0.0.1:80" and js["worker"] == 1
    assert js["total_us"] == 7 and js["bytes_out"] == 60 and js["term"] == "--"


records = st.tuples(
    st.integers(0, 4 * 10**18), st.integers(0, 4 * 10**18),
    *[st.integers(-1, 10**12)] * 4, *[st.integers(0, 2**64 - 1)] * 2,
    st.one_of(st.none(), st.tuples(st.ip_addresses().map(str), st.integers(0, 65535))),
    st.integers(0, 65535), st.integers(0, 31), st.sampled_from([-1, 0, 1, 3]),
    st.sampled_from([-1, 0, 2, 5]), st.integers(0, _core.TERM_NCODES - 1))


@settings(max_examples=300, deadline=None)
@given(st.lists(records, min_size=1, max_size=6), st.sampled_from(["text", "json"]),
       st.integers(0, 1))
def test_c_formatter_matches_the_python_twin(recs, fmt, block):
    """The drain's C formatter gives, byte for byte, the lines of the Python twin (a row or
    slot missing from the names too: row<N>, slot<N>, as text)."""
    names = ({0: ("web", fmt), 3: ('a"b\\c', fmt)}, {0: "10.0.0.1:80", 2: "[::1]:8080"})
    fast, _ = make(capacity=8, block=block)
    twin, _ = make(capacity=8, block=block)
    for r in recs:
        assert fast.py_push(r) and twin.py_push(r)
    rows, slots = connlog.c_tables(names)
    data, n = fast.format(block, rows, slots)
    want = [connlog.format_record(r, names, block) for r in twin.drain(block)]
    assert n == len(recs) and data.decode().split("\n") == want + [""]
    for line, r in zip(want, recs, strict=True):
        if fmt == "json" and r[11] in names[0]:
            assert json.loads(line)["term"] == connlog.TERM_CODES[r[13]]
    assert fast.pending(block) == 0


def test_syslog_frame_is_rfc5424():
    frame = connlog.syslog_frame("hello world", "host1", 42, now=0.5).decode()
    assert frame == "<134>1 1970-01-01T00:00:00.500000Z host1 fastlb 42 conn - hello world"


def test_names_from_the_slot_table():
    rows, addrs = connlog.names_from({("web", ""): 4, ("web", "10.0.0.1:80"): 5}, {"web": "json"}, "")
    assert rows == {4: ("web", "json"), -1: ("<sni>", "json")} and addrs == {5: "10.0.0.1:80"}
    # [sni] row -1: connections refused before SNI routing named a service


BASE = '[[service]]\nname = "web"\nlisten = "127.0.0.1:0"\nbackends = [{ address = "127.0.0.1:1" }]\n'


def test_config_log_table_and_destination():
    cfg = config.loads(BASE + 'log = { connections = true, format = "json", sample = 0.25 }\n')
    assert cfg.services[0].log == config.ConnLogConfig(True, "json", 0.25)
    assert cfg.global_.connlog == "stderr"
    assert config.service_from_dict(config.service_to_dict(cfg.services[0]), "s").log == cfg.services[0].log
    for dest in ("file:/tmp/x.log", "syslog:unix:/dev/log", "syslog:udp:127.0.0.1:514"):
        assert config.loads(f'[global]\nconnlog = "{dest}"\n' + BASE).global_.connlog == dest
    for bad, where in (('log = { connections = "yes" }', "service[0].log.connections"),
                       ('log = { sample = 2 }', "service[0].log.sample"),
                       ('log = { format = "xml" }', "service[0].log.format"),
                       ('log = { connection = true }', "service[0].log.connection")):
        with pytest.raises(ConfigError) as e:
            config.loads(BASE + bad + "\n")
        assert where in str(e.value)
    with pytest.raises(ConfigError, match="global.connlog.*syslog:udp"):
        config.loads('[global]\nconnlog = "syslog:tcp:1.2.3.4:5"\n' + BASE)


def test_plan_carries_the_sampling_threshold():
    from fastlb import runtime
    svc = config.loads(BASE + 'log = { connections = true, sample = 0.5 }\n').services[0]
    assert runtime.log_sample(svc) == 1 << 31
    off = config.loads(BASE + 'log = { connections = false }\n').services[0]
    assert runtime.log_sample(off) == 0
    assert struct.calcsize("=q") == 8


# -- the hooks run per connection: no Python C-API call (ARCHITECTURE.md, STYLE point 5) --------
PER_CONNECTION = ["cl_accept", "cl_attempt", "cl_failed", "cl_established", "cl_close", "cl_kill",
                  "cl_refused", "hb_bucket", "7ConnLog_observe", "7ConnLog_sampled", "7ConnLog_reserve",
                  "7ConnLog_commit"]


test_per_connection_hooks_make_no_python_call = no_python_call_test(PER_CONNECTION)


def test_syslog_unix_sink_frames_each_line_and_waits_for_the_daemon(tmp_path):
    path = str(tmp_path / "log.sock")
    sink = connlog.Sink(f"syslog:unix:{path}")            # no daemon yet: not an error
    with pytest.raises(OSError):
        sink.write(b"lost\n")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(path)
    rx.settimeout(5)
    try:
        sink.write(b"one\ntwo\n")                          # reconnects with the batch
        got = [rx.recv(4096).decode(), rx.recv(4096).decode()]
    finally:
        rx.close()
        sink.close()
    assert [g.rsplit(" - ", 1)[1] for g in got] == ["one", "two"]
    assert all(re.match(r"<134>1 \S+Z \S+ fastlb \d+ conn - ", g) for g in got)


def test_the_region_follows_the_gauges_in_the_shared_mapping():
    """shm's layout: the connection log after the gauges, no overlap, the same in a worker's
    view; a freed slot's histograms start from zero."""
    from fastlb import shm
    st_ = shm.SharedState(16, 2)
    worker = shm.connlog_view(st_.mapping, 16, 2, 1)
    last = st_.gauges.global_row
    for f in range(len(_core.GAUGE_FIELDS)):
        st_.gauges.py_add(last, f, 7)
    worker.py_observe(16, _core.H_DURATION, 30)          # the last row of the region
    assert worker.py_push(rec(1))
    assert st_.connlog.histogram(16, _core.H_DURATION)[1] == 30
    assert st_.connlog.drain(1) == [rec(1)] and st_.connlog.pending(0) == 0
    assert all(v == 7 for v in st_.gauges.row(last).values())
    # the per-source table ([access]) follows the connection log, to the end of the mapping
    assert shm.layout_size(16, 2) == st_.size - _core.SourceTable.size_for(st_.sources.entries) == (
        _core.HealthBitmap.size_for(16) + _core.Counters.size_for(16, 2)
        + _core.Gauges.size_for(17, 2) + _core.ConnLog.size_for(17, 2, shm.connlog_capacity()))
    worker.py_observe(3, _core.H_CONNECT, 5)
    shm.zero_slot(st_.counters, 3, st_.gauges, st_.connlog)
    assert st_.connlog.histogram(3, _core.H_CONNECT) == ([0] * _core.HB_BUCKETS, 0)


def test_the_drainer_survives_a_failing_drain_and_reports_drops(tmp_path, caplog):
    """A bug in a drain is logged and the next drain runs; drops are reported once per
    interval with their count; close() drains what is left."""
    import asyncio
    import logging
    out = tmp_path / "conn.log"
    cl, _ = make(capacity=2, nblocks=1)
    broken = [True]

    def names():
        if broken[0]:
            raise RuntimeError("boom")
        return ({1: ("web", "text")}, {2: "10.0.0.1:80"})

    async def main():
        d = connlog.Drainer(cl, f"file:{out}", names, asyncio.get_running_loop())
        d.start()
        for i in range(3):                                # the third is dropped
            cl.py_push(rec(i))
        await asyncio.sleep(0.25)
        broken[0] = False
        await asyncio.sleep(0.25)
        cl.py_push(rec(9))
        d.close()
        return d

    with caplog.at_level(logging.WARNING, logger="fastlb"):
        d = asyncio.run(main())
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and d.written == 3 and " web/10.0.0.1:80 " in lines[0]
    assert "connection log: the drain failed" in caplog.text
    assert "connection log: 1 record(s) dropped, the ring was full (1 since the start)" in caplog.text
    assert cl.dropped(0) == 1
