"""`fastlb demo` runs the main job end to end and exits cleanly, quickly."""
import re
import subprocess
import sys
import time


def test_demo_runs_clean_and_shows_failover():
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "fastlb", "demo", "--connections", "120"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert time.monotonic() - t0 < 30
    text = out.stdout
    for policy in ("round_robin", "random", "least_conn", "maglev"):
        assert re.search(rf"^  {policy}\s", text, re.M)
    after = text.split("dead:")[1]
    # charlie is dead: it serves nobody, and nobody saw an error
    for line in re.findall(r"^  (?!policy)\w+ .*$", after, re.M):
        assert re.search(r"\s0 \(\s*0%\)\s+0$", line), line
    assert re.search(r"maglev affinity: (\d+) of \1 clients", text)
