"""The health state machine (pure), and single checks against real loopback sockets."""
import asyncio
import os
import socket
import threading

import pytest

from fastlb.config import HealthConfig
from fastlb.health import HealthChecker, HealthState, check_once
from helpers import Blackhole, closed_port


def test_fall_then_rise_with_reasons():
    st = HealthState(HealthConfig(rise=2, fall=3))
    assert [st.on_check(False, "refused") for _ in range(2)] == [None, None] and st.up
    assert st.on_check(False, "refused") == "3 checks failed (refused)" and not st.up
    assert st.on_check(True) is None and not st.up
    assert st.on_check(False, "x") is None              # a failure restarts the rise count
    assert st.on_check(True) is None
    assert st.on_check(True) == "2 checks passed" and st.up
    assert st.check_failures == 4


def test_passive_down_then_checks_bring_it_back():
    st = HealthState(HealthConfig(rise=1, fall=3))
    assert st.on_passive(3, "connection refused") == \
        "3 consecutive failures on client connections (connection refused)"
    assert not st.up and st.on_passive(3, "x") is None
    assert st.on_check(True) == "1 check passed"


def test_intervals_fastinter_while_changing_downinter_while_down():
    st = HealthState(HealthConfig(interval=2, fastinter=0.5, downinter=5, fall=2, rise=2))
    assert st.next_interval() == 2
    st.on_check(False, "x")
    assert st.next_interval() == 0.5                     # going down
    st.on_check(False, "x")
    assert st.next_interval() == 5                       # down
    st.on_check(True)
    assert st.next_interval() == 0.5                     # coming back


class Server:
    """A loopback server answering each connection with `reply` after `delay` seconds."""

    def __init__(self, reply: bytes, delay: float = 0.0) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.reply, self.delay = reply, delay
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import time
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                conn.recv(100)
                time.sleep(self.delay)
                conn.sendall(self.reply)
            except OSError:
                pass
            finally:
                conn.close()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@pytest.mark.parametrize("reply,delay,cfg,ok,detail", [
    (b"+PONG\r\n", 0, dict(expect=b"+PONG"), True, "expected reply"),
    (b"-ERR nope\r\n", 0, dict(expect=b"+PONG"), False, "unexpected reply b'-ERR nope\\r\\n'"),
    (b"HTTP/1.1 200 OK\r\n", 0, dict(expect_regex=r"^HTTP/1\.[01] 2\d\d"), True, "expected reply"),
    (b"HTTP/1.1 503 Busy\r\n", 0, dict(expect_regex=r"^HTTP/1\.[01] 2\d\d"), False, "unexpected reply"),
    (b"+PONG\r\n", 0.5, dict(expect=b"+PONG", timeout=0.2), False, "timeout after 0.2s"),
])
def test_send_expect(reply, delay, cfg, ok, detail):
    srv = Server(reply, delay)
    try:
        got = asyncio.run(check_once("127.0.0.1", srv.port, HealthConfig(kind="send_expect", send=b"PING\r\n",
                                                                          **cfg)))
        assert got[0] is ok and detail in got[1]
    finally:
        srv.close()


def test_tcp_check_refused_and_timeout():
    assert asyncio.run(check_once("127.0.0.1", closed_port(), HealthConfig()))[0] is False
    hole = Blackhole()
    try:
        ok, detail = asyncio.run(check_once("127.0.0.1", hole.port, HealthConfig(timeout=0.2)))
        assert not ok and "timeout" in detail
    finally:
        hole.close()


def test_a_thousand_check_cycles_leave_no_fds_or_tasks():
    from fastlb import _core

    async def main():
        health = _core.HealthBitmap(bytearray(_core.HealthBitmap.size_for(4)), 4)
        checker = HealthChecker(health, lambda *a: None)
        fds_before = len(os.listdir("/proc/self/fd"))
        tasks_before = len(asyncio.all_tasks())
        hole = Blackhole()
        cfg = HealthConfig(interval=0.001, timeout=0.005, jitter=0.0, rise=1, fall=1)
        checker.track("s", "dead", 0, "127.0.0.1", closed_port(), cfg)
        checker.track("s", "hole", 1, "127.0.0.1", hole.port, cfg)
        deadline = asyncio.get_running_loop().time() + 60
        while (min(st.check_failures for st in checker.states.values()) < 1000
               and asyncio.get_running_loop().time() < deadline):
            await asyncio.sleep(0.05)
        counts = [st.check_failures for st in checker.states.values()]
        checker.stop()
        await asyncio.sleep(0.05)
        hole.close()
        return counts, fds_before, len(os.listdir("/proc/self/fd")), tasks_before, len(asyncio.all_tasks())

    counts, fds0, fds1, tasks0, tasks1 = asyncio.run(main())
    assert min(counts) >= 1000
    assert fds1 <= fds0 and tasks1 == tasks0


def test_transitions_counted_with_change_time_and_downtime():
    import time
    st = HealthState(HealthConfig(rise=1, fall=1), since=time.monotonic())
    assert (st.downs, st.changed_at, st.downtime_now()) == (0, 0.0, 0.0)
    before = time.time()
    st.on_check(False, "refused")
    assert st.downs == 1 and before <= st.changed_at <= time.time()
    time.sleep(0.05)
    assert st.downtime_now() >= 0.05
    st.on_check(True)
    assert st.downtime >= 0.05 and st.downtime_now() == st.downtime
    st.on_passive(3, "reset")
    assert st.downs == 2


def test_a_check_that_fails_for_a_local_reason_gives_no_verdict(tmp_path):
    """Out of fds, a check cannot even make its socket: that says nothing about the backend
    (no verdict, the state stays), as the data path does not blame a backend for EMFILE."""
    import subprocess
    import sys
    script = tmp_path / "emfile_check.py"
    script.write_text(
        "import asyncio, os, resource, socket, sys\n"
        "from fastlb.config import HealthConfig\n"
        "from fastlb.health import check_once\n"
        "srv = socket.create_server(('127.0.0.1', 0))\n"
        "port = srv.getsockname()[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "async def main():\n"
        "    print(await check_once('127.0.0.1', port, HealthConfig()))\n"   # fds left: passes
        "    held = []\n"
        "    try:\n"
        "        while True:\n"
        "            held.append(os.open(os.devnull, os.O_RDONLY))\n"
        "    except OSError:\n"
        "        pass\n"
        "    print(await check_once('127.0.0.1', port, HealthConfig()))\n"
        "    for fd in held:\n"
        "        os.close(fd)\n"
        "asyncio.run(main())\n")
    from fastlb import spawn
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                         env=spawn.environment())
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first.startswith("(True,")
    assert second.startswith("(None,") and "local error" in second
