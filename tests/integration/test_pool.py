"""The worker pool end to end: crash loops back off, workers of another version are refused,
pool operations run one at a time, a worker slow to exit blocks nothing. Faults are injected
from outside with a sitecustomize module on PYTHONPATH (the workers inherit it)."""
import os
import re
import socket
import threading
import time

from fastlb.admin.client import AdminClient, AdminError
from helpers import service, start_backend, start_fastlb


def head(tmp_path, workers=2):
    return f'[global]\nworkers = {workers}\nadmin = "unix:{tmp_path}/admin.sock"\ngrace = "5s"\n'


def admin(tmp_path):
    return AdminClient(socket_path=f"{tmp_path}/admin.sock", timeout=30)


def inject(tmp_path, code):
    """An environment whose worker processes (python -m fastlb.worker) run ``code`` at start."""
    d = tmp_path / "inject"
    d.mkdir()
    (d / "sitecustomize.py").write_text(
        "import sys\nif 'fastlb.worker' in sys.orig_argv:\n" + "".join(f"    {line}\n" for line in code))
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(d), os.environ.get("PYTHONPATH")]))}


def test_a_worker_that_dies_at_start_backs_off(procs, tmp_path):
    _, be = start_backend(procs, "echo")
    lb, _ = start_fastlb(procs, head(tmp_path) + service("web", [(be, 1)]),
                         env=inject(tmp_path, ["import os", "os._exit(3)"]))
    lb.wait_line("CRITICAL workers are crash-looping", timeout=20)     # the 5th failed start

    def starts():
        return len(re.findall(r"worker \d+ started", lb.output))
    at_limit = starts()
    time.sleep(2.0)
    assert at_limit <= 8 and starts() - at_limit <= 2, (at_limit, starts())   # not 25 a second
    assert "failed to start (exit 3" in lb.output
    assert lb.output.count("CRITICAL workers are crash-looping") == 1
    with admin(tmp_path) as c:
        assert c.call("ping") == "pong"                # the supervisor is fine


def test_a_worker_of_another_version_is_refused(procs, tmp_path):
    _, be = start_backend(procs, "echo")
    lb, _ = start_fastlb(procs, head(tmp_path) + service("web", [(be, 1)]),
                         env={"FASTLB_TEST_WORKER_TOKEN": "fastlb 0.0.1 wire 0 layout 0"})
    lb.wait_line(r"worker \d+ \(pid \d+\) refused: it runs 'fastlb 0.0.1 wire 0 layout 0'")
    time.sleep(1.5)
    assert len(re.findall(r"worker \d+ started", lb.output)) <= 10       # and backs off
    with admin(tmp_path) as c:
        assert c.call("workers") == [] or all(w["generation"] == 0 for w in c.call("workers"))


def test_concurrent_restart_workers_one_runs_the_other_is_refused(procs, tmp_path):
    _, be = start_backend(procs, "echo")
    start_fastlb(procs, head(tmp_path) + service("web", [(be, 1)]))
    results = []

    def restart():
        with admin(tmp_path) as c:
            try:
                results.append(c.call("restart_workers"))
            except AdminError as exc:
                results.append((exc.code, str(exc)))

    threads = [threading.Thread(target=restart) for _ in range(2)]
    threads[0].start()
    time.sleep(0.05)
    threads[1].start()
    for t in threads:
        t.join(60)
    assert {"restarted": 2} in results, results
    (refused,) = [r for r in results if r != {"restarted": 2}]
    assert refused[0] == "busy" and "restart-workers is under way" in refused[1]
    time.sleep(1.0)
    with admin(tmp_path) as c:
        assert len([w for w in c.call("workers") if not w["stopping"]]) == 2


def test_restart_after_an_upgrade_keeps_the_old_workers_serving(procs, tmp_path):
    """fastlb upgraded under a running supervisor, then restart-workers: the new workers are of
    another version and refused. The old ones must keep serving (before the fix each old worker
    was stopped anyway, and nothing served)."""
    _, be = start_backend(procs, "echo")
    marker = tmp_path / "upgraded"
    env = inject(tmp_path, ["import os",
                            f"if os.path.exists({str(marker)!r}):",
                            "    os.environ['FASTLB_TEST_WORKER_TOKEN'] = 'fastlb 9.9 wire 0 layout 0'"])
    lb, (port,) = start_fastlb(procs, head(tmp_path) + service("web", [(be, 1)]), env=env)
    with admin(tmp_path) as c:
        before = sorted(w["pid"] for w in c.call("workers") if not w["stopping"])
        assert len(before) == 2
        marker.write_text("")
        try:
            c.call("restart_workers")
            raise AssertionError("restart_workers succeeded with refused workers")
        except AdminError as exc:
            assert exc.code == "failed" and "0 of 2 worker(s) replaced" in exc.message
        time.sleep(1.0)                                      # a respawn must not add a worker
        serving = sorted(w["pid"] for w in c.call("workers") if not w["stopping"])
    assert serving == before
    lb.wait_line(r"refused: it runs 'fastlb 9.9 wire 0 layout 0'")
    for _ in range(20):                                      # and they still serve
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"


def test_a_worker_slow_to_exit_does_not_block_the_supervisor(procs, tmp_path):
    """Workers close their channel, then take 3 s to exit (an atexit hook): the supervisor
    keeps answering meanwhile (before the fix it sat in proc.wait(timeout=5) on its loop)."""
    _, be = start_backend(procs, "echo")
    linger = ["import atexit, os, time",
              "def linger(fd=int(sys.orig_argv[sys.orig_argv.index('--control') + 1])):",
              "    try:", "        os.close(fd)", "    except OSError:", "        pass", "    time.sleep(3)",
              "atexit.register(linger)"]
    start_fastlb(procs, head(tmp_path) + service("web", [(be, 1)]), env=inject(tmp_path, linger))
    stop, worst = threading.Event(), [0.0]

    def ping():
        with admin(tmp_path) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                assert c.call("ping") == "pong"
                worst[0] = max(worst[0], time.monotonic() - t0)
                time.sleep(0.05)

    t = threading.Thread(target=ping)
    t.start()
    with admin(tmp_path) as c:
        assert c.call("restart_workers") == {"restarted": 2}
    time.sleep(4.0)                                    # both old workers exit meanwhile
    stop.set()
    t.join(30)
    assert worst[0] < 2.0, worst                       # (before the fix: 3 s)
