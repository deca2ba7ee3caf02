"""`fastlb check` catches, before anything binds, what `fastlb run` would refuse; `run` refuses
the same things with the same messages; `fastlb ctl` says what it tried and what to check."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from helpers import PY, Proc, closed_port, start_backend

BACKEND = ('[[service]]\nname = "web"\nlisten = ["{listen}"]\n'
           'backends = [ {{ address = "127.0.0.1:{port}" }} ]\n')


def fastlb(*args: str, cwd=None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastlb", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def write(tmp_path, text: str) -> str:
    path = tmp_path / "fastlb.toml"
    path.write_text(text)
    return str(path)


def one_problem(out: subprocess.CompletedProcess, line: int, key: str, *needles: str) -> str:
    assert out.returncode == 2, out.stdout + out.stderr
    msgs = [m for m in out.stderr.splitlines() if m.startswith("fastlb: ")]
    assert len(msgs) == 1, out.stderr
    assert re.match(rf"fastlb: \S+fastlb\.toml:{line}: {re.escape(key)}: ", msgs[0]), msgs[0]
    for n in needles:
        assert n in msgs[0], msgs[0]
    return msgs[0]


def test_a_clean_config_passes_check(tmp_path):
    cfg = write(tmp_path, f'[global]\nstate_file = "{tmp_path}/state.msgpack"\n'
                          f'admin = "unix:{tmp_path}/admin.sock"\n'
                + BACKEND.format(listen="127.0.0.1:0", port=closed_port()))
    out = fastlb("check", "-c", cfg)
    assert out.returncode == 0, out.stderr
    assert "OK, 1 service(s)" in out.stdout
    assert os.listdir(tmp_path) == ["fastlb.toml"]            # it created nothing


@pytest.mark.parametrize("verb", ["check", "run"])
def test_missing_token_file(tmp_path, verb):
    cfg = write(tmp_path, f'[global]\nadmin = "tcp:127.0.0.1:{closed_port()}"\n'
                          f'admin_token_file = "{tmp_path}/token"\n'
                + BACKEND.format(listen="127.0.0.1:0", port=closed_port()))
    one_problem(fastlb(verb, "-c", cfg), 3, "global.admin_token_file", f"{tmp_path}/token",
                "does not exist", "create it")


def test_missing_registration_token_file(tmp_path):
    """A service's registration token file is read by the token rules, as run reads it."""
    cfg = write(tmp_path, BACKEND.format(listen="127.0.0.1:0", port=closed_port())
                + f'registration = {{ token_file = "{tmp_path}/reg-token" }}\n')
    one_problem(fastlb("check", "-c", cfg), 5, "service[0].registration.token_file",
                f"{tmp_path}/reg-token", "does not exist")


def test_unopenable_connection_log_file(tmp_path):
    # /sys/kernel refuses new files even to root
    cfg = write(tmp_path, '[global]\nconnlog = "file:/sys/kernel/fastlb-conn.log"\n'
                + BACKEND.format(listen="127.0.0.1:0", port=closed_port()))
    one_problem(fastlb("check", "-c", cfg), 2, "global.connlog", "/sys/kernel/fastlb-conn.log",
                "cannot open")
    log = tmp_path / "conn.log"
    cfg = write(tmp_path, f'[global]\nconnlog = "file:{log}"\n'
                + BACKEND.format(listen="127.0.0.1:0", port=closed_port()))
    out = fastlb("check", "-c", cfg)
    assert out.returncode == 0, out.stderr
    assert not log.exists()                                   # check created nothing


def test_missing_state_directory(tmp_path):
    """check reports it; run starts anyway and retries the writes (test_statefile_live)."""
    cfg = write(tmp_path, f'[global]\nstate_file = "{tmp_path}/nope/state.msgpack"\n'
                + BACKEND.format(listen="127.0.0.1:0", port=closed_port()))
    msg = one_problem(fastlb("check", "-c", cfg), 2, "global.state_file", "does not exist",
                      f"mkdir -p {tmp_path}/nope")
    assert ".tmp" not in msg and "Errno" not in msg


def test_unwritable_state_directory(tmp_path):
    # /sys/kernel refuses new files even to root (a read-only directory would not stop root).
    cfg = write(tmp_path, '[global]\nstate_file = "/sys/kernel/fastlb-state.msgpack"\n'
                + BACKEND.format(listen="127.0.0.1:0", port=closed_port()))
    one_problem(fastlb("check", "-c", cfg), 2, "global.state_file", "cannot write",
                "/sys/kernel", "writable")


def test_corrupt_state_file(tmp_path):
    (tmp_path / "state.msgpack").write_bytes(b"\xc1garbage")
    cfg = write(tmp_path, f'[global]\nstate_file = "{tmp_path}/state.msgpack"\n'
                + BACKEND.format(listen="127.0.0.1:0", port=closed_port()))
    one_problem(fastlb("check", "-c", cfg), 2, "global.state_file", f"{tmp_path}/state.msgpack",
                "--ignore-state")


@pytest.mark.parametrize("verb", ["check", "run"])
def test_missing_admin_socket_directory(tmp_path, verb):
    cfg = write(tmp_path, f'[global]\nadmin = "unix:{tmp_path}/run/admin.sock"\n'
                + BACKEND.format(listen="127.0.0.1:0", port=closed_port()))
    one_problem(fastlb(verb, "-c", cfg), 2, "global.admin", f"{tmp_path}/run",
                "does not exist", "RuntimeDirectory")


def test_admin_path_that_is_a_regular_file_is_never_removed(tmp_path):
    (tmp_path / "admin.sock").write_text("precious")
    cfg = write(tmp_path, f'[global]\nadmin = "unix:{tmp_path}/admin.sock"\n'
                + BACKEND.format(listen="127.0.0.1:0", port=closed_port()))
    for verb in ("check", "run"):
        one_problem(fastlb(verb, "-c", cfg), 2, "global.admin", "not a socket")
    assert (tmp_path / "admin.sock").read_text() == "precious"


def test_listen_address_in_use_or_not_local(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        cfg = write(tmp_path, BACKEND.format(listen=f"127.0.0.1:{port}", port=closed_port()))
        one_problem(fastlb("check", "-c", cfg), 3, "service[0].listen[0]",
                    f"cannot listen on 127.0.0.1:{port}", "Address already in use",
                    "another process listens there")
        assert fastlb("check", "--no-bind", "-c", cfg).returncode == 0
        # 192.0.2.1 (TEST-NET-1) is no address of this machine: bound nowhere, no traffic sent
        cfg = write(tmp_path, BACKEND.format(listen="192.0.2.1:8080", port=closed_port()))
        one_problem(fastlb("check", "-c", cfg), 3, "service[0].listen[0]",
                    "not an address of this machine")
    finally:
        busy.close()


def test_metrics_address_in_use(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        cfg = write(tmp_path, f'[global]\nmetrics = "127.0.0.1:{busy.getsockname()[1]}"\n'
                    + BACKEND.format(listen="127.0.0.1:0", port=closed_port()))
        for verb in ("check", "run"):
            one_problem(fastlb(verb, "-c", cfg), 2, "global.metrics", "Address already in use")
    finally:
        busy.close()


def test_check_reports_every_problem_at_once(tmp_path):
    cfg = write(tmp_path, f'[global]\nstate_file = "{tmp_path}/a/state"\n'
                          f'admin = "unix:{tmp_path}/b/admin.sock"\n'
                + BACKEND.format(listen="192.0.2.1:8080", port=closed_port()))
    out = fastlb("check", "-c", cfg)
    assert out.returncode == 2
    keys = re.findall(r"^fastlb: \S+?:\d+: (\S+):", out.stderr, re.M)
    assert keys == ["global.state_file", "global.admin", "service[0].listen[0]"], out.stderr


def test_a_live_admin_socket_is_not_stolen(tmp_path, procs):
    _, bport = start_backend(procs, "echo")
    cfg = write(tmp_path, f'[global]\nadmin = "unix:{tmp_path}/admin.sock"\n'
                + BACKEND.format(listen="127.0.0.1:0", port=bport))
    first = Proc([PY, "-m", "fastlb", "run", "-c", cfg], procs)
    first.wait_line("fastlb ready")
    out = fastlb("check", "-c", cfg)
    one_problem(out, 2, "global.admin", "a process accepts connections there")
    out = fastlb("run", "-c", cfg)
    one_problem(out, 2, "global.admin", "a process accepts connections there")
    ping = fastlb("ctl", "--socket", f"{tmp_path}/admin.sock", "ping")
    assert ping.returncode == 0 and ping.stdout.strip() == "pong"


def test_ctl_options_after_the_verb_and_json(tmp_path, procs):
    _, bport = start_backend(procs, "echo")
    sock = f"{tmp_path}/admin.sock"
    cfg = write(tmp_path, f'[global]\nadmin = "unix:{sock}"\n'
                + BACKEND.format(listen="127.0.0.1:0", port=bport))
    Proc([PY, "-m", "fastlb", "run", "-c", cfg], procs).wait_line("fastlb ready")
    before = fastlb("ctl", "--socket", sock, "--json", "backends", "web")
    after = fastlb("ctl", "backends", "web", "--json", "--socket", sock)
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    assert json.loads(before.stdout) == json.loads(after.stdout)
    assert json.loads(after.stdout)[0]["address"] == f"127.0.0.1:{bport}"
    mixed = fastlb("ctl", "--json", "stats", "--socket", sock)
    assert json.loads(mixed.stdout)[0]["service"] == "web"


def test_ctl_without_a_socket_names_the_path_and_the_config_key(tmp_path):
    out = fastlb("ctl", "ping", "--socket", f"{tmp_path}/none.sock")
    assert out.returncode == 2
    assert f"{tmp_path}/none.sock" in out.stderr and "[global] admin" in out.stderr
    assert "Traceback" not in out.stderr


def test_every_ctl_verb_has_a_help_line():
    out = fastlb("ctl", "--help")
    assert out.returncode == 0
    from fastlb.ctl import VERBS
    for verb, _, _ in VERBS:
        line = re.search(rf"^\s+{re.escape(verb)}\s+(\S.*)$", out.stdout, re.M)
        assert line, f"no help line for {verb}"
    assert "examples:" in out.stdout and "exit codes" in out.stdout
    top = fastlb("--help")
    assert "examples:" in top.stdout and top.stdout.rstrip().splitlines()[-2].startswith("exit codes")


def test_check_warns_of_a_state_fallback_and_touches_no_file(tmp_path, procs):
    """A corrupt current state file with a good previous generation: run would start from the
    previous one, so check passes with a warning; check itself moves or removes nothing."""
    from fastlb import config, statefile
    svc = config.loads(BACKEND.format(listen="127.0.0.1:0", port=closed_port()),
                       resolve=False).services[0]
    store = statefile.StateStore(str(tmp_path / "state.msgpack"))
    store.save({svc.name: svc}, {svc.name: svc})
    store.save({svc.name: svc}, {svc.name: svc})           # now .prev exists too
    (tmp_path / "state.msgpack").write_bytes(b"\xc1torn")
    cfg = write(tmp_path, f'[global]\nstate_file = "{tmp_path}/state.msgpack"\n'
                + BACKEND.format(listen="127.0.0.1:0", port=closed_port()))
    before = sorted(os.listdir(tmp_path))
    out = fastlb("check", "-c", cfg)
    assert out.returncode == 0, out.stderr
    assert "warning" in out.stderr and "previous generation" in out.stderr
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "state.msgpack").read_bytes() == b"\xc1torn"
