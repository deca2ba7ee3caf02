"""fastlb top in a real terminal (tmux): it draws every backend, counts traffic, shows a killed
backend going DOWN with the health event, and q quits. The tmux server is private to the test
(its own -L socket) and the pane's process is stopped by its PID."""
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time

import pytest

from fastlb import spawn
from helpers import service, start_backend, start_fastlb

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.skipif(not TMUX, reason="needs tmux")


def tmux(server, *args):
    return subprocess.run([TMUX, "-L", server, *args], capture_output=True, text=True,
                          timeout=10, check=False)


def screen(server):
    return tmux(server, "capture-pane", "-p", "-t", "top").stdout


def wait_screen(server, pred, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        text = screen(server)
        if pred(text):
            return text
        assert time.monotonic() < deadline, f"screen never matched:\n{text}"
        time.sleep(0.2)


def row(text, address):
    return next((line.split() for line in text.splitlines() if line.startswith(address)), [])


def test_top_under_tmux(procs, tmp_path):
    a, b = (start_backend(procs, "announce", name=n) for n in "ab")
    health = '{ interval = "200ms", timeout = "200ms", rise = 1, fall = 1 }'
    sock = f"{tmp_path}/admin.sock"
    lb, (port,) = start_fastlb(procs, f'[global]\nadmin = "unix:{sock}"\n'
                               + service("web", [(a[1], 2), (b[1], 1)], health=health))
    addr_a, addr_b = f"127.0.0.1:{a[1]}", f"127.0.0.1:{b[1]}"
    server = f"fastlb-test-{os.getpid()}"
    env = spawn.environment()
    cmd = " ".join(shlex.quote(c) for c in ["env", f"PYTHONPATH={env.get('PYTHONPATH', '')}",
                                              *spawn.command("fastlb", "top", "--socket", sock,
                                                             "--interval", "0.3")])
    started = tmux(server, "new-session", "-d", "-s", "top", "-x", "160", "-y", "40", cmd)
    assert started.returncode == 0, started.stderr
    pid = int(tmux(server, "display", "-p", "-t", "top", "#{pane_pid}").stdout)
    try:
        # (the pane may start at 80 columns before tmux gives it 160: top redraws at each size)
        text = wait_screen(server, lambda t: row(t, addr_a)[1:2] == ["UP"] and row(t, addr_b)[1:2] == ["UP"]
                           and "backends up 2/2" in t and "CHKFAIL REASON" in t)
        assert text.startswith("fastlb top") and "\nweb\n" in text
        for _ in range(9):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.recv(100)
        # TOTAL (8th column) reaches 6 for a (weight 2) and 3 for b
        wait_screen(server, lambda t: row(t, addr_a)[7:8] == ["6"] and row(t, addr_b)[7:8] == ["3"])
        b[0].signal(signal.SIGKILL)
        text = wait_screen(server, lambda t: row(t, addr_b)[1:2] == ["DOWN"]
                           and f"web/{addr_b} DOWN: 1 check failed" in t)
        assert "backends up 1/2" in text
        tmux(server, "send-keys", "-t", "top", "q")
        deadline = time.monotonic() + 10
        while tmux(server, "has-session", "-t", "top").returncode == 0:   # q ended top, and so the pane
            assert time.monotonic() < deadline, "q did not quit fastlb top"
            time.sleep(0.1)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        tmux(server, "kill-server")
    lb.signal(signal.SIGTERM)
    assert lb.wait() == 0
