"""The state file on real files: format v2 and v1, the previous generation, fallback, temp
files, failed writes in words, retry, and kill -9 in the middle of saves."""
import asyncio
import errno
import logging
import os
import signal
import struct
import subprocess
import sys
import time

import msgpack
import pytest

from helpers import fill

from fastlb import config, statefile
from fastlb.errors import StateFileError, StateWriteError
from fastlb.statefile import HEADER_SIZE, MAGIC, MAX_FILE, StateStore

PY = sys.executable


def services(weight: int = 1, name: str = "web") -> dict:
    cfg = config.loads(f'[[service]]\nname = "{name}"\nlisten = ["127.0.0.1:0"]\n'
                       f'backends = [{{ address = "127.0.0.1:1", weight = {weight} }}]\n')
    return {s.name: s for s in cfg.services}


def weight_of(loaded) -> int:
    registry, _ = loaded
    return registry["web"].backends[0].weight


def v1_bytes(weight: int) -> bytes:
    """A file as fastlb wrote it before version 2 (the old statefile.save)."""
    s = services(weight)
    return msgpack.packb({"format": "fastlb-state", "version": 1,
                          "registry": [config.service_to_dict(x) for x in s.values()],
                          "config": [config.service_to_dict(x) for x in s.values()]}, use_bin_type=True)


@pytest.fixture
def store(tmp_path):
    return StateStore(str(tmp_path / "state.msgpack"))


def two_generations(store):
    store.save(services(2), services(2))
    store.save(services(3), services(3))
    return store


def error_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# -- format ---------------------------------------------------------------------------------------

def test_round_trip_and_header(store):
    assert store.load() is None                                  # neither file: first start
    store.save(services(5), services(1))
    raw = open(store.path, "rb").read()
    magic, version, length = struct.unpack_from(">15sBQ", raw)
    assert (magic, version, length) == (MAGIC, 3, len(raw) - HEADER_SIZE)
    registry, cfg = StateStore(store.path).load()
    assert registry["web"].backends[0].weight == 5 and cfg["web"].backends[0].weight == 1
    assert oct(os.stat(store.path).st_mode & 0o777) == "0o600"


def test_version_1_loads_and_is_rewritten_as_version_2(store):
    open(store.path, "wb").write(v1_bytes(7))
    assert weight_of(store.load()) == 7
    store.save(services(8), services(8))
    assert open(store.path, "rb").read().startswith(MAGIC)
    assert open(store.prev_path, "rb").read() == v1_bytes(7)     # the v1 file is the previous one
    assert weight_of(StateStore(store.path).load()) == 8


def test_each_save_keeps_the_generation_before_it(store):
    for w in range(1, 5):
        store.save(services(w), services(w))
        assert weight_of(statefile.StateStore(store.path).load()) == w
        if w > 1:
            os.rename(store.path, store.path + ".x")             # look at prev alone
            assert weight_of(StateStore(store.path).load()) == w - 1
            os.rename(store.path + ".x", store.path)
    assert sorted(os.listdir(os.path.dirname(store.path))) == ["state.msgpack", "state.msgpack.prev"]


# -- fallback to the previous generation -------------------------------------------------------------

def flip(path, offset):
    raw = bytearray(open(path, "rb").read())
    raw[offset % len(raw)] ^= 0x40
    open(path, "wb").write(bytes(raw))


@pytest.mark.parametrize("damage,words", [
    (lambda p: flip(p, 3), "does not start with the fastlb-state magic"),
    (lambda p: flip(p, 15), "checksum does not match"),                # version byte
    (lambda p: flip(p, 20), "header announces"),                       # length
    (lambda p: flip(p, 40), "checksum does not match"),                # the digest itself
    (lambda p: flip(p, -5), "checksum does not match"),                # the body
    (lambda p: os.truncate(p, os.path.getsize(p) - 10), "torn or corrupt"),
    (lambda p: os.truncate(p, 30), "shorter than the 56-byte header"),
    (lambda p: os.truncate(p, 0), "empty"),
    (lambda p: os.unlink(p), "it is missing"),
    (lambda p: open(p, "wb").write(b"\x93garbage"), "not valid msgpack"),
    (lambda p: open(p, "wb").write(b"\x81\xa1a\x01"), "not a fastlb state file"),
])
def test_an_unusable_current_falls_back_to_prev_with_one_loud_line(store, caplog, damage, words):
    two_generations(store)
    damage(store.path)
    caplog.set_level(logging.INFO, "fastlb")
    assert weight_of(StateStore(store.path).load()) == 2          # the previous generation
    (line,) = error_lines(caplog)
    assert store.path in line and store.prev_path in line and words in line
    assert "[global] state_file" in line


def test_a_newer_version_is_unusable_and_falls_back(store, caplog):
    two_generations(store)
    raw = open(store.path, "rb").read()
    body = raw[HEADER_SIZE:]
    import hashlib
    head = struct.pack(">15sBQ", MAGIC, 4, len(body))
    open(store.path, "wb").write(head + hashlib.sha256(head + body).digest() + body)
    assert weight_of(StateStore(store.path).load()) == 2
    assert "version 4, which this fastlb does not read" in error_lines(caplog)[0]


def test_both_unusable_refuses_naming_both(store):
    two_generations(store)
    flip(store.path, -1)
    os.truncate(store.prev_path, 20)
    with pytest.raises(StateFileError) as info:
        StateStore(store.path).load()
    msg = str(info.value)
    assert msg.startswith(f"state file {store.path} ([global] state_file): corrupt")
    assert f"its previous generation {store.prev_path} is unusable too: torn" in msg
    assert "--ignore-state" in msg


def test_unusable_current_without_prev_refuses(store):
    open(store.path, "wb").write(b"\x93garbage")
    with pytest.raises(StateFileError, match="there is no previous generation"):
        store.load()


def sparse_huge(path):
    with open(path, "wb") as f:
        f.truncate(MAX_FILE + 1)                                  # sparse: no disk used


@pytest.mark.parametrize("make", [os.mkdir, sparse_huge])
def test_an_unreadable_current_without_prev_refuses(store, make):
    make(store.path)
    with pytest.raises(StateFileError) as info:
        store.load()
    assert ("it is a directory" in str(info.value) or "more than the 256 MiB" in str(info.value))
    assert "there is no previous generation" in str(info.value)


def test_missing_current_with_an_unusable_prev_refuses(store):
    two_generations(store)
    os.unlink(store.path)
    flip(store.prev_path, -1)
    with pytest.raises(StateFileError, match="it is missing; its previous generation .* unusable too"):
        store.load()


def test_after_a_fallback_the_next_save_keeps_prev_and_sets_the_bad_file_aside(store):
    two_generations(store)
    flip(store.path, -1)
    bad = open(store.path, "rb").read()
    s = StateStore(store.path)
    assert weight_of(s.load()) == 2
    s.save(services(4), services(4))
    assert open(store.corrupt_path, "rb").read() == bad
    assert weight_of(StateStore(store.path).load()) == 4
    os.unlink(store.path)
    assert weight_of(StateStore(store.path).load()) == 2          # prev was not replaced by junk


def test_ignore_state_keeps_a_valid_current_as_prev(store):
    two_generations(store)
    s = StateStore(store.path)                                   # never loaded: --ignore-state
    s.save(services(9), services(9))
    os.unlink(store.path)
    assert weight_of(StateStore(store.path).load()) == 3


def test_hostile_headers_in_a_version_1_file_are_refused_not_allocated(store):
    open(store.path, "wb").write(b"\x81\xa8registry\xdd\x7f\xff\xff\xff")
    with pytest.raises(StateFileError, match="an array of 2147483647 elements, over the limit"):
        store.load()
    open(store.path, "wb").write(b"\x81\xa8registry" + b"\x91" * 100 + b"\x00")
    with pytest.raises(StateFileError, match="nested deeper than 16"):
        store.load()


# -- temp files -------------------------------------------------------------------------------------

def test_stale_temps_are_removed_and_others_left_alone(store, tmp_path):
    d = tmp_path
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([PY, "-c", "import time; time.sleep(30)"])
    try:
        names = {
            f".state.msgpack.{dead.pid}.0123456789abcdef.tmp": False,    # its writer is gone
            f".state.msgpack.{os.getpid()}.0123456789abcdef.tmp": False,  # ours, before any save
            f".state.msgpack.{live.pid}.0123456789abcdef.tmp": True,     # a live writer's
            f".state.msgpack.{live.pid}.fedcba9876543210.tmp": False,    # ... but 2 hours old
            ".state.msgpack.tmp": False,                                 # version 1's fixed name
            f".other.msgpack.{dead.pid}.0123456789abcdef.tmp": True,     # another file's
            "state.msgpack.notes": True,
        }
        for name in names:
            (d / name).write_bytes(b"x")
        old = time.time() - 7200
        os.utime(d / f".state.msgpack.{live.pid}.fedcba9876543210.tmp", (old, old))
        victim = d / "victim"
        victim.write_bytes(b"keep")
        os.symlink(victim, d / f".state.msgpack.{dead.pid}.1111111111111111.tmp")
        assert store.load() is None
        left = set(os.listdir(d))
        for name, kept in names.items():
            assert (name in left) == kept, name
        assert f".state.msgpack.{dead.pid}.1111111111111111.tmp" in left   # a symlink: not ours
        assert victim.read_bytes() == b"keep"
    finally:
        live.kill()
        live.wait()


def test_a_symlink_at_the_old_fixed_temp_name_is_not_written_through(store, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    os.symlink(victim, tmp_path / ".state.msgpack.tmp")
    store.save(services(2), services(2))
    assert victim.read_bytes() == b"keep"
    assert weight_of(StateStore(store.path).load()) == 2


# -- failed writes, in words -------------------------------------------------------------------------

def assert_words(exc, path, *words):
    msg = str(exc)
    assert msg.startswith(f"state file {path} ([global] state_file): cannot write it: "), msg
    for w in words:
        assert w in msg, (w, msg)
    assert ".tmp" not in msg and "[Errno" not in msg, msg
    assert isinstance(exc, OSError) and exc.strerror == msg       # old `except OSError` callers


def test_missing_directory(tmp_path):
    path = str(tmp_path / "missing" / "state.msgpack")
    with pytest.raises(StateWriteError) as info:
        StateStore(path).save(services(), services())
    assert info.value.errno == errno.ENOENT
    assert_words(info.value, path, f"its directory {tmp_path}/missing does not exist",
                 f"mkdir -p {tmp_path}/missing")


def test_a_directory_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    path = str(tmp_path / "file" / "state.msgpack")
    with pytest.raises(StateWriteError) as info:
        StateStore(path).save(services(), services())
    assert_words(info.value, path, "is not a directory")


def test_state_file_path_is_a_directory(tmp_path):
    (tmp_path / "state.msgpack").mkdir()
    path = str(tmp_path / "state.msgpack")
    with pytest.raises(StateWriteError) as info:
        StateStore(path).save(services(), services())
    assert_words(info.value, path, f"{path} is a directory", "path of a file")
    assert os.listdir(tmp_path) == ["state.msgpack"]             # no temp file left behind


def test_full_disk_changes_nothing_on_disk(small_tmpfs):
    s = StateStore(str(small_tmpfs / "state.msgpack"))
    s.save(services(2), services(2))
    s.save(services(3), services(3))
    fill(small_tmpfs)
    with pytest.raises(StateWriteError) as info:
        s.save(services(4), services(4))
    assert_words(info.value, s.path, "no space left on the device", "free disk space")
    assert s.writable is False
    assert sorted(os.listdir(small_tmpfs)) == ["filler", "state.msgpack", "state.msgpack.prev"]
    assert weight_of(StateStore(s.path).load()) == 3
    os.unlink(small_tmpfs / "filler")
    s.save(services(4), services(4))
    assert s.writable is True and weight_of(StateStore(s.path).load()) == 4


def test_immutable_directory(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode:
        pytest.skip("chattr +i is not supported here")
    try:
        path = str(d / "state.msgpack")
        with pytest.raises(StateWriteError) as info:
            StateStore(path).save(services(), services())
        if os.geteuid() == 0:
            assert info.value.errno == errno.EPERM                # root cannot bypass +i
        assert_words(info.value, path, f"permission denied in {d}", f"lsattr -d {d}")
    finally:
        subprocess.run(["chattr", "-i", str(d)], check=False)


# -- retry: one line per change of state, never an older state over a newer one ------------------

def test_retry_logs_once_and_writes_when_the_directory_appears(tmp_path, caplog):
    caplog.set_level(logging.INFO, "fastlb")
    path = tmp_path / "later" / "state.msgpack"
    s = StateStore(str(path))
    current = {"v": services(1)}

    async def main():
        assert not s.save_at_start(current["v"], current["v"])
        task = asyncio.create_task(s.retry(lambda: (current["v"], current["v"]), interval=0.01))
        await asyncio.sleep(0.2)                                  # ~20 failed tries
        assert not task.done() and s.writable is False
        async with s._order:            # as an admin change would: no attempt in flight that
            current["v"] = services(6)  # read the old state (retry reads current() under it)
        (tmp_path / "later").mkdir()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    assert weight_of(StateStore(str(path)).load()) == 6
    errors = error_lines(caplog)
    assert len(errors) == 1 and "retrying every 5 s" in errors[0] and "fastlb starts anyway" in errors[0]
    assert sum("written again" in r.getMessage() for r in caplog.records) == 1


def test_a_retry_never_writes_over_a_newer_acknowledged_save(tmp_path):
    (tmp_path / "file").write_text("x")                           # the directory is a file: fails
    path = tmp_path / "d" / "state.msgpack"
    s = StateStore(str(path))

    async def main():
        assert not s.save_at_start(services(1), services(1))
        stale = services(1)                                       # what the retry would write
        task = asyncio.create_task(s.retry(lambda: (stale, stale), interval=0.01))
        await asyncio.sleep(0.05)
        (tmp_path / "d").mkdir()
        await s.save_async(services(7), services(7))              # an acknowledged change
        await asyncio.wait_for(task, 5)                           # it ends without writing

    asyncio.run(main())
    assert weight_of(StateStore(str(path)).load()) == 7


# -- kill -9 in the middle of saves --------------------------------------------------------------

SAVER = """
import sys
from fastlb import config, statefile
cfg = config.loads('[[service]]\\nname = "web"\\nlisten = ["127.0.0.1:0"]\\n'
                   'backends = [{ address = "127.0.0.1:1", weight = 1 }]\\n')
import dataclasses
svc = cfg.services[0]
s = statefile.StateStore(sys.argv[1])
s.load()
for n in range(1, 1_000_000):
    b = dataclasses.replace(svc.backends[0], weight=n)
    one = {"web": dataclasses.replace(svc, backends=(b,))}
    s.save(one, one)
    print(n, flush=True)                       # acknowledged
"""


def test_kill_9_during_saves_leaves_the_last_acknowledged_generation(tmp_path):
    path = str(tmp_path / "state.msgpack")
    for round_ in range(8):
        p = subprocess.Popen([PY, "-c", SAVER, path], stdout=subprocess.PIPE, text=True)
        acked = 0
        deadline = time.monotonic() + 10
        while acked < 20 + 7 * round_ and time.monotonic() < deadline:
            acked = int(p.stdout.readline())
        os.kill(p.pid, signal.SIGKILL)
        rest = p.stdout.read().split()
        p.wait()
        acked = int(rest[-1]) if rest else acked
        got = weight_of(StateStore(path).load())                 # (removes the crash's temps)
        assert got in (acked, acked + 1), (round_, got, acked)   # acked, or the one in flight
        assert sorted(os.listdir(tmp_path)) == ["state.msgpack", "state.msgpack.prev"]


@pytest.mark.parametrize("had_state", [True, False])
def test_a_failed_directory_fsync_after_the_rename_leaves_nothing_changed(tmp_path, monkeypatch,
                                                                          had_state):
    """An I/O error on the fsync of the directory, after the new file was renamed in: the save
    is reported failed ("nothing changed"), so what loads afterwards must be what loaded before
    (before the fix, the refused change was in place and a restart loaded it)."""
    path = str(tmp_path / "state.msgpack")
    if had_state:
        StateStore(path).save(services(2), services(2))
    s = StateStore(path)
    before = s.load()
    real = statefile._fsync_dir
    calls = []

    def failing_after_the_rename(directory):
        calls.append(directory)
        # a save fsyncs the directory after keeping prev (if current was valid), then after
        # the rename: fail the last one
        if len(calls) == (2 if had_state else 1):
            raise OSError(errno.EIO, "Input/output error")
        real(directory)

    monkeypatch.setattr(statefile, "_fsync_dir", failing_after_the_rename)
    with pytest.raises(StateWriteError):
        s.save(services(7), services(7))
    monkeypatch.setattr(statefile, "_fsync_dir", real)
    after = StateStore(path).load()
    if had_state:
        assert weight_of(after) == weight_of(before) == 2
    else:
        assert before is None and after is None
