"""The state file: acknowledged registry changes, durable across crashes and disk trouble.

Owner: the on-disk format, its atomic replacement, the previous generation kept beside it, and
what fastlb does when the file cannot be read (fall back, or refuse to start) or written (say
so in words, refuse admin changes, retry). ``StateStore`` is the one object that touches the
files; fastlb.supervisor holds one when ``[global] state_file`` is set.

Format, version 3 (version 1, the plain msgpack map, and version 2, without leases, are still
read, and rewritten as version 3 at the next save):

    offset  size  field
    0       15    magic b"\\xc1fastlb-state\\r\\n": 0xc1 is the one byte msgpack never uses, so
                  no version-1 file starts like a version-2 one; "\\r\\n" catches a text-mode copy
    15      1     version (3; 2 has no "leases")
    16      8     body length n, big-endian
    24      32    SHA-256 of bytes 0-23 followed by the body
    56      n     body: msgpack map {"registry": [service table, ...],  # as last acknowledged
                                     "config":   [service table, ...],  # what it was reconciled with
                                     "leases":   [lease, ...]}          # [leases] fastlb.leases
Service tables have the keys of a ``[[service]]`` table (config.service_to_dict). The checksum
is SHA-256 from hashlib: in the standard library (no dependency on our extension to read a
file), checkable with standard tools, and its cost is nothing at state-file sizes (KiB to a
few MiB, well under a millisecond per save next to the fsyncs). A CRC or xxh64 would do as
well against bit rot; none is faster where it matters.

Files: ``<path>`` (current), ``<path>.prev`` (the generation before it), temp files named
``.<name>.<pid>.<16 hex>.tmp`` in the same directory (created O_EXCL|O_NOFOLLOW, mode 0600).

Saving generation N+1 while current holds N and prev N-1:
  1. write N+1 to a new temp file, fsync it;
  2. hard-link current (N) to a second temp name and rename that over prev, fsync the
     directory: prev = N (on a filesystem without hard links, a copy, fsynced);
  3. rename the first temp over current, fsync the directory: current = N+1. Only now is N+1
     acknowledged (the admin reply is sent after save() returns).
A crash at any point leaves current a complete, valid generation holding every acknowledged
change: current is only ever replaced by the rename of a file that was completely written and
fsynced first (step 3), rename is atomic, so current is N or N+1, never torn, and N+1 was not
acknowledged before it was in place. Prev is N-1 or N; a crash leaves stray temp files at
worst, removed at the next start (remove_stale_temps).
So falling back to prev is never needed after a crash. It is needed only when current was
damaged by something else: disk or filesystem corruption, a write cache that lies about fsync,
a person. Then prev lacks what current's generation added: the last acknowledged change. Our
write order makes losing it impossible by a crash, possible under disk corruption only.

Loading (load): current valid -> use it. Current missing, torn or corrupt and prev valid ->
use prev, with one ERROR line naming both files and the problem (the unusable current is set
aside as ``<path>.corrupt`` at the next save, never used as a previous generation). Both
unusable (or current unusable and no prev) -> StateFileError: fastlb refuses to start rather
than silently drop acknowledged changes; ``--ignore-state`` is the way out. Neither file ->
no state yet (first start).

Writing fails (missing directory, read-only, full disk...): save() raises StateWriteError,
whose message names the file, ``[global] state_file``, the problem in words and the remedy, and
nothing on disk changed. At start fastlb does not stop for it (save_at_start): it serves from
what it has, refuses admin changes (they must be on disk before their reply), and retry()
writes again every RETRY_INTERVAL seconds until a write succeeds. One log line per change of
state (failing, failing differently, written again), not per try.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any


from fastlb import stateformat
from fastlb.config import Service
from fastlb.errors import StateFileError, StateWriteError

__all__ = [
    "MAGIC",
    "PREV_SUFFIX",
    "RETRY_INTERVAL",
    "VERSION",
    "StateFileError",
    "StateStore",
    "StateWriteError",
    "decode",
    "encode",
    "load",
    "save",
]

log = logging.getLogger("fastlb")

# A backend takes about 60 bytes in each of "registry" and "config": 256 MiB is over a million
# backends, far past any slot table. A bigger file is not one we wrote.
MAX_FILE = 256 << 20
PREV_SUFFIX = ".prev"
CORRUPT_SUFFIX = ".corrupt"
RETRY_INTERVAL = 5.0          # seconds between writes while the file cannot be written
# A temp file of a process that is still running is left alone unless it is this old (seconds):
# an in-flight save lasts as long as a write and two fsyncs.
STALE_TEMP_AGE = 3600.0

# The format (fastlb.stateformat), re-exported: encode/decode are part of this module's API.
Tables = stateformat.Tables
Unusable = stateformat.Unusable
FORMAT, VERSION, MAGIC, HEADER_SIZE = (stateformat.FORMAT, stateformat.VERSION, stateformat.MAGIC,
                                       stateformat.HEADER_SIZE)
encode, decode = stateformat.encode, stateformat.decode
Leases = Sequence[Mapping[str, Any]]      # [leases] fastlb.leases.Lease.to_wire() dicts


# -- errors in words --------------------------------------------------------------------------------

def _write_words(exc: OSError, path: str, directory: str) -> tuple[str, str]:
    """(problem, remedy) for a failed write, in words; never the temp file's name."""
    e = exc.errno
    elsewhere = "or set [global] state_file to a path where fastlb can write"
    if e == errno.ENOENT:
        return (f"its directory {directory} does not exist",
                f"create it (mkdir -p {directory}) {elsewhere}")
    if e == errno.ENOTDIR:
        return (f"a part of {directory} is not a directory",
                f"fix that path {elsewhere}")
    if e in (errno.EACCES, errno.EPERM):
        return (f"permission denied in {directory}",
                f"let the user fastlb runs as (uid {os.geteuid()}) write there: check the "
                f"directory's owner and mode, and `lsattr -d {directory}` for the immutable flag, "
                f"{elsewhere}")
    if e == errno.EROFS:
        return (f"{directory} is on a read-only filesystem", f"remount it read-write {elsewhere}")
    if e == errno.ENOSPC:
        return (f"no space left on the device of {directory}", "free disk space there")
    if e == errno.EDQUOT:
        return (f"the disk quota on {directory} is exhausted", "free space or raise the quota")
    if e == errno.EISDIR:
        return (f"{path} is a directory", "set [global] state_file to the path of a file")
    if e == errno.EIO:
        return (f"an I/O error on the device of {directory}", "check the disk (dmesg)")
    name = errno.errorcode.get(e or 0, "?")
    return (f"{(exc.strerror or str(exc)).lower()} ({name})", f"fix the cause {elsewhere}")


def _read_words(exc: OSError) -> str:
    if exc.errno == errno.EISDIR:
        return "cannot read it: it is a directory"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"cannot read it: permission denied for uid {os.geteuid()}"
    if exc.errno == errno.EIO:
        return "cannot read it: an I/O error on its device (check the disk: dmesg)"
    return f"cannot read it: {(exc.strerror or str(exc)).lower()}"


# -- file operations ---------------------------------------------------------------------------------

def _read(path: str) -> bytes | None:
    """The file's bytes; None when it does not exist; raises Unusable when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise Unusable(_read_words(exc)) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise Unusable("it is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise Unusable("not a regular file")
        if st.st_size > MAX_FILE:
            raise Unusable(f"{st.st_size} bytes, more than the {MAX_FILE >> 20} MiB a state "
                            f"file can be: not one fastlb wrote")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            if sum(map(len, chunks)) > MAX_FILE:
                raise Unusable(f"more than the {MAX_FILE >> 20} MiB a state file can be")
        return b"".join(chunks)
    except OSError as exc:
        raise Unusable(_read_words(exc)) from None
    finally:
        os.close(fd)


def _fsync_dir(directory: str) -> None:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the store -----------------------------------------------------------------------------------------

class StateStore:
    """The state file at ``path`` and its previous generation: load with fallback, save in the
    crash-safe order of the module docstring, and the bookkeeping of a disk that cannot be
    written. save() is thread-safe; save_async() and retry() also keep saves in call order."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.prev_path = path + PREV_SUFFIX
        self.corrupt_path = path + CORRUPT_SUFFIX
        self.directory = os.path.dirname(os.path.abspath(path))
        self._temp_rx = re.compile(rf"^\.{re.escape(os.path.basename(path))}\.(\d+)\.[0-9a-f]{{16}}\.tmp$")
        self._legacy_temp = f".{os.path.basename(path)}.tmp"       # version 1's fixed name
        # None until the first write; then whether the last write succeeded.
        self.writable: bool | None = None
        self._problem: str | None = None        # the failure last logged (one line per change)
        self._current: bytes | None = None      # bytes of current, when known to be valid
        self._current_known = False             # whether _current reflects the file
        self._lock = threading.Lock()           # one save's file operations at a time
        self._order = asyncio.Lock()            # save_async/retry: saves in call order
        self.leases: list[dict[str, Any]] = []            # [leases] those of the generation load() used

    # -- loading -----------------------------------------------------------------------------------
    def load(self) -> tuple[Tables, Tables] | None:
        """(registry, config) from current, or from prev when current is unusable (one ERROR
        line); None when neither file exists. Raises StateFileError when no generation is
        usable. Removes stale temp files of a crashed save first."""
        self.remove_stale_temps()
        self._current_known = True
        missing = False
        try:
            raw = _read(self.path)
            if raw is not None:
                registry, cfg, self.leases = stateformat.decode_all(raw)
                self._current = raw
                return registry, cfg
            missing, problem = True, "it is missing"
        except Unusable as exc:
            problem = str(exc)
        try:
            prev = _read(self.prev_path)
            if prev is None:
                if missing:
                    return None                 # neither file: no state yet
                raise StateFileError(self.path, f"{problem}; there is no previous generation "
                                                f"({self.prev_path}) to fall back on")
            registry, cfg, self.leases = stateformat.decode_all(prev)
            loaded = (registry, cfg)
        except Unusable as exc:
            raise StateFileError(self.path, f"{problem}; its previous generation {self.prev_path} "
                                            f"is unusable too: {exc}") from None
        aside = "" if missing else f"; the unusable file is set aside as {self.corrupt_path} " \
                                   f"at the next write"
        log.error("state file %s ([global] state_file) is unusable: %s; starting from its previous "
                  "generation %s, which lacks the last acknowledged change if something outside "
                  "fastlb damaged the file (check the disk)%s", self.path, problem, self.prev_path,
                  aside)
        return loaded

    def inspect(self) -> tuple[str | None, str | None]:
        """What load() would find, changing nothing (for ``fastlb check``): (error, warning).
        error: no generation is usable, so `fastlb run` would refuse to start. warning: the
        current file is unusable and run would start from the previous generation."""
        try:
            raw = _read(self.path)
            if raw is not None:
                decode(raw)
                return None, None
            missing, problem = True, "it is missing"
        except (Unusable, StateFileError) as exc:
            missing, problem = False, str(exc)
        try:
            prev = _read(self.prev_path)
            if prev is None:
                if missing:
                    return None, None
                return (f"state file {self.path}: {problem}; there is no previous generation "
                        f"({self.prev_path}) to fall back on; fix or move it away, or start with "
                        f"--ignore-state to start from the config alone"), None
            decode(prev)
        except (Unusable, StateFileError) as exc:
            return (f"state file {self.path}: {problem}; its previous generation "
                    f"{self.prev_path} is unusable too: {exc}; start with --ignore-state to "
                    f"start from the config alone"), None
        return None, (f"state file {self.path} is unusable ({problem}); fastlb run would start "
                      f"from its previous generation {self.prev_path}")

    def remove_stale_temps(self) -> int:
        """Remove temp files of this state file left by a crashed save: those of a process that
        is not running (or of this pid: none of ours exists before our first save, and a
        container's fastlb is pid 1 at every start), or older than STALE_TEMP_AGE. Only
        regular files with our exact name pattern; symlinks and anything else are left alone."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return 0
        removed = 0
        for name in names:
            m = self._temp_rx.match(name)
            if m is None and name != self._legacy_temp:
                continue
            full = os.path.join(self.directory, name)
            try:
                st = os.lstat(full)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            pid = int(m.group(1)) if m else None
            stale = (pid is None or pid == os.getpid() or not _pid_running(pid)
                     or time.time() - st.st_mtime > STALE_TEMP_AGE)
            if stale:
                try:
                    os.unlink(full)
                    removed += 1
                except OSError:
                    pass
        if removed:
            log.info("state file %s: removed %d temp file(s) left by an interrupted save",
                     self.path, removed)
        return removed

    # -- saving -----------------------------------------------------------------------------------
    def save(self, registry: Mapping[str, Service], cfg: Mapping[str, Service],
             leases: Leases = ()) -> None:
        """Write a new generation (module docstring: the order and why it is crash-safe).
        Raises StateWriteError (in words, with the remedy) when it cannot; then nothing on disk
        changed that load() would prefer over the last acknowledged generation."""
        self._save(registry, cfg, leases, at_start=False)

    def save_at_start(self, registry: Mapping[str, Service], cfg: Mapping[str, Service],
                      leases: Leases = ()) -> bool:
        """The write at start. A failure does not stop fastlb: it logs one ERROR line (the
        file, the key, the problem, the remedy) and returns False; the caller then runs
        retry(). True when the write succeeded."""
        try:
            self._save(registry, cfg, leases, at_start=True)
        except StateWriteError:
            return False
        return True

    async def save_async(self, registry: Mapping[str, Service], cfg: Mapping[str, Service],
                         leases: Leases = ()) -> None:
        """save() in a thread (the event loop keeps running during the fsyncs), in call order."""
        async with self._order:
            await asyncio.to_thread(self.save, registry, cfg, leases)

    async def retry(self, current: Callable[[], tuple[Any, ...]],
                    interval: float = RETRY_INTERVAL) -> None:
        """While the last write failed: every ``interval`` seconds, write ``current()`` (the
        registry and config now). Returns once a write succeeded, this one's or a
        save_async()'s. ``current`` is called under the same ordering lock as save_async, so a
        retry never writes an older state over a newer acknowledged one."""
        while self.writable is False:
            await asyncio.sleep(interval)
            async with self._order:
                if self.writable is not False:
                    break
                registry, cfg, *leases = current()     # [leases] (registry, cfg[, leases])
                try:
                    await asyncio.to_thread(self.save, registry, cfg, *leases)
                except StateWriteError:
                    pass                        # logged by save() when the problem changed

    # -- internals ------------------------------------------------------------------------------------
    def _save(self, registry: Mapping[str, Service], cfg: Mapping[str, Service],
              leases: Leases, *, at_start: bool) -> None:
        blob = encode(registry, cfg, leases)
        with self._lock:
            try:
                self._replace(blob)
            except OSError as exc:
                problem, remedy = _write_words(exc, self.path, self.directory)
                err = StateWriteError(self.path, f"cannot write it: {problem}", remedy, exc.errno)
                self._note_failure(err, at_start)
                raise err from None
            self._current, self._current_known = blob, True
            if self.writable is False:
                log.warning("state file %s ([global] state_file) written again; admin changes are "
                            "accepted again", self.path)
            self.writable, self._problem = True, None

    def _note_failure(self, err: StateWriteError, at_start: bool) -> None:
        self.writable = False
        if err.problem == self._problem:
            return                              # already said; one line per change of state
        self._problem = err.problem
        if at_start:
            log.error("%s. fastlb starts anyway and serves from the config and the state it read; "
                      "admin changes are refused (persist_failed) until the file can be written; "
                      "retrying every %g s", err, RETRY_INTERVAL)
        else:
            log.error("%s. Admin changes are refused (persist_failed) until the file can be "
                      "written", err)

    def _new_temp(self, blob: bytes) -> str:
        """A new, unique temp file in the state file's directory holding blob, fsynced."""
        name = os.path.join(self.directory, f".{os.path.basename(self.path)}.{os.getpid()}."
                                            f"{secrets.token_hex(8)}.tmp")
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            try:
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            _unlink_quietly(name)
            raise
        return name

    def _replace(self, blob: bytes) -> None:
        tmp = self._new_temp(blob)                                      # 1
        try:
            self._keep_previous()                                       # 2
            os.rename(tmp, self.path)                                   # 3
        except BaseException:
            _unlink_quietly(tmp)
            raise
        try:
            _fsync_dir(self.directory)
        except OSError:
            # The new file is in place but not known to be durable, and the caller will reply
            # that nothing changed: make that true, so that a restart cannot load the refused
            # change. Put the last acknowledged generation back (prev holds it when current was
            # valid), or, with none, remove the new file (load then finds what it found before).
            with contextlib.suppress(OSError):
                if self._current is not None:
                    os.replace(self.prev_path, self.path)
                else:
                    os.unlink(self.path)
            raise

    def _keep_previous(self) -> None:
        """Make prev the generation current holds now, if current is valid (step 2)."""
        if not self._current_known:             # never looked (--ignore-state, module save())
            try:
                raw = _read(self.path)
                self._current = raw if raw is not None and decode(raw) else None
            except Unusable:
                self._current = None
            self._current_known = True
        if self._current is None:
            # No valid current: prev (if any) is the best generation there is; keep it. An
            # unusable current is set aside for a person to look at, never made prev.
            try:
                regular = stat.S_ISREG(os.lstat(self.path).st_mode)
            except (FileNotFoundError, NotADirectoryError):
                regular = False
            if regular:                         # (a directory or a symlink is not ours to move)
                os.replace(self.path, self.corrupt_path)
                log.warning("state file %s: the unusable file is kept as %s for inspection",
                            self.path, self.corrupt_path)
            return
        link = os.path.join(self.directory, f".{os.path.basename(self.path)}.{os.getpid()}."
                                            f"{secrets.token_hex(8)}.tmp")
        try:
            os.link(self.path, link, follow_symlinks=False)
        except FileNotFoundError:
            return                              # current was removed behind our back
        except OSError:
            link = self._new_temp(self._current)    # no hard links here: a copy
        try:
            os.rename(link, self.prev_path)
        except BaseException:
            _unlink_quietly(link)
            raise
        _fsync_dir(self.directory)


# -- the old functions, for callers that keep no store ------------------------------------------------

def load(path: str) -> tuple[Tables, Tables] | None:
    """StateStore(path).load(): (registry, config), None without a file, or StateFileError."""
    return StateStore(path).load()


def save(path: str, registry: Mapping[str, Service], cfg: Mapping[str, Service]) -> None:
    """StateStore(path).save(...): raises StateWriteError (an OSError too) when it cannot."""
    StateStore(path).save(registry, cfg)
