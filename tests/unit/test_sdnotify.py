"""sd_notify datagrams on real unix datagram sockets: a path and the abstract namespace."""
import os
import socket
import time

from fastlb import sdnotify


def _listener(addr):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(addr)
    s.settimeout(5)
    return s


def test_sends_to_a_path(tmp_path):
    path = str(tmp_path / "notify")
    with _listener(path) as s:
        assert sdnotify.notify("READY=1", "STATUS=hi", env={"NOTIFY_SOCKET": path})
        assert s.recv(4096) == b"READY=1\nSTATUS=hi"


def test_sends_to_the_abstract_namespace():
    name = f"fastlb-test-{os.getpid()}-{time.monotonic_ns()}"
    with _listener("\0" + name) as s:
        assert sdnotify.notify("STOPPING=1", env={"NOTIFY_SOCKET": "@" + name})
        assert s.recv(4096) == b"STOPPING=1"


def test_reloading_carries_the_monotonic_clock_in_microseconds(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    with _listener(path) as s:
        before = time.monotonic_ns() // 1000
        assert sdnotify.reloading("re\nloading")
        fields = dict(f.split("=", 1) for f in s.recv(4096).decode().split("\n"))
    assert fields["RELOADING"] == "1" and fields["STATUS"] == "re loading"
    assert before <= int(fields["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000


def test_nothing_without_a_socket_and_no_error_when_nobody_listens(tmp_path):
    assert not sdnotify.notify("READY=1", env={})
    assert not sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": "vsock:2:9"})
    assert not sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "absent")})
