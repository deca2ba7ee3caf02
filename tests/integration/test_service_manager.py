"""fastlb run under a fake service manager: READY, RELOADING (+MONOTONIC_USEC), STOPPING, STATUS."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from fastlb import spawn
from helpers import service, start_backend, start_fastlb


def _fields(sock):
    return dict(f.split("=", 1) for f in sock.recv(4096).decode().split("\n"))


def test_ready_reloading_stopping_on_a_fake_notify_socket(procs, tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    bport = start_backend(procs, "announce", name="a")[1]
    lb, _ = start_fastlb(procs, service("web", [(bport, 1)]))
    ready = _fields(sock)
    assert ready["READY"] == "1" and ready["STATUS"].startswith("serving 1 service(s)")
    t0 = time.monotonic_ns() // 1000
    lb.signal(signal.SIGHUP)
    reloading = _fields(sock)
    assert reloading["RELOADING"] == "1"
    assert t0 <= int(reloading["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000
    again = _fields(sock)
    assert again["READY"] == "1" and again["STATUS"].startswith("reloaded; serving 1 service(s)")
    lb.signal(signal.SIGTERM)
    stopping = _fields(sock)
    assert stopping["STOPPING"] == "1" and "SIGTERM" in stopping["STATUS"]
    assert lb.wait() == 0
    sock.close()


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _unit() -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    with open(os.path.join(ROOT, "contrib", "fastlb.service")) as f:
        for line in f:
            if "=" in line and not line.startswith(("#", "[")):
                k, v = line.rstrip("\n").split("=", 1)
                keys.setdefault(k, []).append(v)
    return keys


def test_the_shipped_sample_config_passes_check(tmp_path):
    """`fastlb demo --print-config` prints the packaged sample; `fastlb check --no-bind` passes
    on it. Its admin socket and state file live in the directories systemd makes for the unit
    (/run/fastlb, /var/lib/fastlb): where they do not exist, the copy checked differs from the
    sample in those two directories only."""
    out = subprocess.run(spawn.command("fastlb", "demo", "--print-config"), env=spawn.environment(),
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert 'admin = "unix:/run/fastlb/admin.sock"' in text
    assert 'state_file = "/var/lib/fastlb/state.msgpack"' in text
    for directory in ("/run/fastlb", "/var/lib/fastlb"):
        if not os.path.isdir(directory):
            os.makedirs(tmp_path / directory.strip("/"))
            text = text.replace(f"{directory}/", f"{tmp_path}{directory}/")
    changed = [a for a, b in zip(out.stdout.splitlines(), text.splitlines(), strict=False) if a != b]
    assert len(changed) <= 2
    assert all(k in line for line, k in zip(changed, ("admin", "state_file"), strict=False))
    path = tmp_path / "fastlb.toml"
    path.write_text(text)
    check = subprocess.run(spawn.command("fastlb", "check", "--no-bind", "-c", str(path)),
                           env=spawn.environment(), capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode == 0, check.stderr
    assert "web" in check.stdout and "cache" in check.stdout


def test_the_systemd_unit_matches_the_sample_and_fastlbs_signals(tmp_path):
    unit = _unit()
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["RuntimeDirectory"] == ["fastlb"] and unit["StateDirectory"] == ["fastlb"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"] and unit["KillSignal"] == ["SIGTERM"]
    assert unit["ExecStart"] == ["/usr/local/bin/fastlb run -c /etc/fastlb/fastlb.toml"]
    for hardening in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp",
                      "RestrictAddressFamilies", "SystemCallFilter", "CapabilityBoundingSet"):
        assert hardening in unit, hardening
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        assert '"fastlb", "run", "-c", "/etc/fastlb/fastlb.toml"' in f.read()
    analyze = shutil.which("systemd-analyze")
    fastlb_bin = shutil.which("fastlb") or os.path.join(os.path.dirname(sys.executable), "fastlb")
    if analyze and os.path.exists(fastlb_bin):       # its syntax, as systemd reads it
        with open(os.path.join(ROOT, "contrib", "fastlb.service")) as f:
            text = f.read().replace("/usr/local/bin/fastlb", fastlb_bin)
        (tmp_path / "fastlb.service").write_text(text)
        out = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / "fastlb.service")],
                             capture_output=True, text=True, timeout=60, check=False)
        problems = [line for line in out.stderr.splitlines()
                    if "fastlb.service" in line and "User" not in line]
        assert not problems, out.stderr


def test_json_process_log_from_supervisor_and_workers(procs, tmp_path):
    import json
    from helpers import closed_port
    lb, (port,) = start_fastlb(procs, '[global]\nworkers = 2\nlog_format = "json"\nlog_level = "info"\n'
                               + service("web", [(closed_port(), 1)], retries=0))
    deadline = time.monotonic() + 15
    while not all(any(f'"worker": {i}' in line for line in lb.lines) for i in (0, 1)):
        assert time.monotonic() < deadline, lb.output       # refused connects: workers log them
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.recv(10)
    lb.signal(signal.SIGTERM)
    assert lb.wait() == 0
    lines = [json.loads(line) for line in lb.lines]            # every line is one JSON object
    assert any(x["message"].startswith("fastlb ready") and "worker" not in x for x in lines)
    assert {x.get("worker") for x in lines} >= {None, 0, 1}, lines      # the workers' lines too
    assert all(x["time"] and x["level"] in ("INFO", "WARNING", "ERROR") for x in lines)
