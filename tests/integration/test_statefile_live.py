"""The state file through `fastlb run`: start when it cannot be written, fall back to the
previous generation, refuse when none is usable, upgrade a version-1 file."""
import os
import time

import msgpack
import pytest
from helpers import PY, Proc, fill, names_of, service, start_backend, start_fastlb
from helpers import admin_client as client

from fastlb import config, statefile
from fastlb.admin.client import AdminError
from fastlb.statefile import MAGIC, StateStore


def conf(tmp_path, state_file, body):
    return (f'[global]\nadmin = "unix:{tmp_path}/admin.sock"\nstate_file = "{state_file}"\n'
            + body)


def wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def state_lines(lb, level="ERROR"):
    return [line for line in lb.lines if f" {level} " in line and "state file" in line]


def check_unwritable_start(procs, tmp_path, state_path, words, fix):
    """fastlb starts and serves with a state file it cannot write; mutations are refused with
    persist_failed and change nothing; after fix() the retry writes the file and mutations work.
    The loud line is logged once, not once per try."""
    ports = {n: start_backend(procs, "announce", name=n)[1] for n in "ab"}
    body = service("web", [(ports["a"], 1), (ports["b"], 1)])
    lb, (port,) = start_fastlb(procs, conf(tmp_path, state_path, body))
    (line,) = state_lines(lb)
    assert f"state file {state_path} ([global] state_file): cannot write it: " in line
    for w in words + ["fastlb starts anyway", "persist_failed", "retrying every 5 s"]:
        assert w in line, (w, line)
    assert ".tmp" not in line and "[Errno" not in line
    assert sorted(names_of(port, 4)) == ["a", "a", "b", "b"]          # it serves
    with client(tmp_path) as c:
        before = c.call("backends", service="web")
        with pytest.raises(AdminError) as info:
            c.call("set_weight", service="web", address=f"127.0.0.1:{ports['a']}", weight=5)
        assert info.value.code == "persist_failed"
        assert f"state file {state_path} ([global] state_file)" in info.value.message
        assert info.value.message.endswith("nothing changed")
        assert c.call("backends", service="web") == before             # nothing changed
        time.sleep(5.5)                                                # at least one retry fails
        assert len(state_lines(lb)) == 1                               # and says nothing new
        fix()
        lb.wait_line("state file .* written again; admin changes are accepted again", timeout=15)
        registry, _ = StateStore(state_path).load()
        assert [b.weight for b in registry["web"].backends] == [1, 1]  # the retry wrote it
        c.call("set_weight", service="web", address=f"127.0.0.1:{ports['a']}", weight=5)
        registry, _ = StateStore(state_path).load()
        assert [b.weight for b in registry["web"].backends] == [5, 1]
    assert open(state_path, "rb").read().startswith(MAGIC)
    assert sorted(names_of(port, 6)) == ["a"] * 5 + ["b"]
    assert len(state_lines(lb)) == 1


def test_starts_serves_and_retries_while_the_state_directory_is_missing(procs, tmp_path):
    """The install issue's case; root cannot write into a directory that does not exist."""
    d = tmp_path / "lib" / "fastlb"
    check_unwritable_start(procs, tmp_path, str(d / "state.msgpack"),
                           [f"its directory {d} does not exist", f"mkdir -p {d}"],
                           lambda: d.mkdir(parents=True))


def test_starts_serves_and_retries_on_a_full_disk(procs, tmp_path, small_tmpfs):
    """A real full filesystem: a 256 KiB tmpfs filled to the last byte (root only)."""
    mnt = small_tmpfs
    try:
        fill(mnt)
        check_unwritable_start(procs, tmp_path, str(mnt / "state.msgpack"),
                               [f"no space left on the device of {mnt}", "free disk space"],
                               lambda: os.unlink(mnt / "filler"))
    finally:
        for p in procs:
            p.stop()


# -- fallback to the previous generation ------------------------------------------------------------

def two_generations(path, port_a):
    """current: a at weight 3; prev: a at weight 2 (written by the real StateStore)."""
    s = StateStore(path)
    for w in (2, 3):
        cfg = config.loads(service("web", [(port_a, w)]))
        svcs = {x.name: x for x in cfg.services}
        s.save(svcs, {x.name: x for x in config.loads(service("web", [(port_a, 1)])).services})


def flip_bytes(path):
    raw = bytearray(open(path, "rb").read())
    for i in (-1, -7, 60):
        raw[i] ^= 0xFF
    open(path, "wb").write(bytes(raw))


@pytest.mark.parametrize("damage,words", [
    (flip_bytes, "checksum does not match"),
    (lambda p: os.truncate(p, os.path.getsize(p) // 2), "torn or corrupt"),
    (os.unlink, "it is missing"),
])
def test_a_bad_current_file_starts_from_the_previous_generation(procs, tmp_path, damage, words):
    _, pa = start_backend(procs, "announce", name="a")
    path = str(tmp_path / "state.msgpack")
    two_generations(path, pa)
    damage(path)
    lb, _ = start_fastlb(procs, conf(tmp_path, path, service("web", [(pa, 1)])))
    (line,) = state_lines(lb)
    assert f"state file {path} ([global] state_file) is unusable: " in line and words in line
    assert f"starting from its previous generation {path}.prev" in line
    with client(tmp_path) as c:
        assert c.call("backends", service="web")[0]["weight"] == 2      # prev's value
        c.call("set_weight", service="web", address=f"127.0.0.1:{pa}", weight=4)
    assert [b.weight for b in StateStore(path).load()[0]["web"].backends] == [4]
    os.unlink(path)                                                      # prev: the start's write
    assert [b.weight for b in StateStore(path).load()[0]["web"].backends] == [2]


def test_both_generations_bad_refuses_to_start_naming_the_files(procs, tmp_path):
    _, pa = start_backend(procs, "announce", name="a")
    path = str(tmp_path / "state.msgpack")
    two_generations(path, pa)
    flip_bytes(path)
    os.truncate(path + ".prev", 10)
    cfg = tmp_path / "f.toml"
    cfg.write_text(conf(tmp_path, path, service("web", [(pa, 1)])))
    lb = Proc([PY, "-m", "fastlb", "run", "-c", str(cfg)], procs)
    assert lb.wait(15) == 2
    assert f"state file {path} ([global] state_file): corrupt: its SHA-256 checksum does not match" \
        in lb.output
    assert f"its previous generation {path}.prev is unusable too: torn" in lb.output
    assert "--ignore-state" in lb.output and "fastlb ready" not in lb.output


def test_a_version_1_file_is_read_and_rewritten_as_version_2(procs, tmp_path):
    _, pa = start_backend(procs, "announce", name="a")
    path = str(tmp_path / "state.msgpack")
    body = service("web", [(pa, 1)])
    reg = [config.service_to_dict(s) for s in config.loads(service("web", [(pa, 6)])).services]
    rec = [config.service_to_dict(s) for s in config.loads(body).services]
    v1 = msgpack.packb({"format": "fastlb-state", "version": 1, "registry": reg, "config": rec})
    open(path, "wb").write(v1)
    start_fastlb(procs, conf(tmp_path, path, body))
    with client(tmp_path) as c:
        assert c.call("backends", service="web")[0]["weight"] == 6
    assert open(path, "rb").read().startswith(MAGIC)
    assert open(path + ".prev", "rb").read() == v1
    assert statefile.load(path)[0]["web"].backends[0].weight == 6


def test_a_disk_that_fills_while_running_refuses_changes_until_freed(procs, tmp_path, small_tmpfs):
    mnt = small_tmpfs
    try:
        _, pa = start_backend(procs, "announce", name="a")
        path = str(mnt / "state.msgpack")
        lb, (port,) = start_fastlb(procs, conf(tmp_path, path, service("web", [(pa, 1)])))
        addr = f"127.0.0.1:{pa}"
        with client(tmp_path) as c:
            c.call("set_weight", service="web", address=addr, weight=2)
            fill(mnt)
            for w in (3, 4):                                     # two refusals, one log line
                with pytest.raises(AdminError) as info:
                    c.call("set_weight", service="web", address=addr, weight=w)
                assert info.value.code == "persist_failed"
                assert "no space left on the device" in info.value.message
            assert c.call("backends", service="web")[0]["weight"] == 2
            assert [b.weight for b in StateStore(path).load()[0]["web"].backends] == [2]
            (line,) = state_lines(lb)
            assert "Admin changes are refused (persist_failed)" in line and "free disk space" in line
            os.unlink(mnt / "filler")
            c.call("set_weight", service="web", address=addr, weight=5)
            lb.wait_line("written again")
        assert [b.weight for b in StateStore(path).load()[0]["web"].backends] == [5]
        assert names_of(port, 2) == ["a", "a"]
    finally:
        for p in procs:
            p.stop()
