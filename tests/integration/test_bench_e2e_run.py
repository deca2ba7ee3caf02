"""bench/e2e.py end to end, tiny: fastlb alone, one keep-alive round of 1 s, its strace round and
its idle RSS round; the JSON and the markdown it writes hold the figures of that run."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
E2E = os.path.join(ROOT, "bench", "e2e.py")
NEEDS = ("wrk", "nginx", "strace", "taskset")
pytestmark = [
    pytest.mark.skipif(not os.path.exists(E2E), reason="needs the source checkout"),
    pytest.mark.skipif(not all(shutil.which(t) for t in NEEDS),
                       reason="needs " + ", ".join(t for t in NEEDS if not shutil.which(t))),
    pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="pins the proxy and the load to CPUs 0, 1"),
]


def _strace_can_attach():
    """strace -p needs ptrace rights over our own children (containers may deny them)."""
    sleeper = subprocess.Popen(["sleep", "10"])
    tracer = subprocess.Popen(["strace", "-o", os.devnull, "-p", str(sleeper.pid)],
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and tracer.poll() is None:
            with open(f"/proc/{sleeper.pid}/status") as f:
                if any(line.split() == ["TracerPid:", str(tracer.pid)] for line in f):
                    return True
            time.sleep(0.02)
        return False
    finally:
        for p in (tracer, sleeper):
            p.kill()
            p.wait()


def test_one_tiny_run(tmp_path):
    if not _strace_can_attach():
        pytest.skip("strace cannot attach to a process here (no ptrace rights)")
    out = tmp_path / "e2e.json"
    md = tmp_path / "e2e.md"
    proc = subprocess.run(
        [sys.executable, E2E, "--runs", "1", "--duration", "1", "--only", "fastlb", "--workers", "1",
         "--loads", "keepalive", "--strace", "1", "--rss-conns", "50", "--json", str(out),
         "--md", str(md), "--charts", ""],
        capture_output=True, text=True, timeout=90, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["peers"] == ["fastlb"] and data["loads"] == ["keepalive"]
    (sample,) = data["samples"]["keepalive/fastlb"]
    assert sample["value"] > 0 and sample["count"] > 0 and sample["errors"] == 0
    assert 0 < sample["p50_ms"] <= sample["p99_ms"] and sample["cpu_pct"] > 0
    sc = data["syscalls"]["keepalive/fastlb"]
    # every proxied request is at least one read and one write on each side's socket
    assert sc["count"] > 0 and sc["calls"]["total"] >= 2 * sc["count"]
    assert sc["calls"].get("recvfrom", 0) >= sc["count"] and sc["calls"].get("sendto", 0) >= sc["count"]
    assert "per_conn_kib" in data["rss"]["fastlb"]
    text = md.read_text()
    assert "| fastlb |" in text and "syscalls per request" in text and "KiB per idle conn" in text
