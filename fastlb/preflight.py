"""Preflight: what a config needs from this machine, checked before anything binds.

Owner: the checks `fastlb check` runs and `fastlb run` runs first. Config validation
(fastlb.config) says whether a config is well-formed; this says whether this machine can run
it: files that must be readable or writable, directories that must exist, addresses that must
be free to bind (each is bound and released at once), an admin socket nobody else serves.
Every problem is one ConfigError naming the file and line, the config key, what is wrong and
the remedy.

``check`` mode reports everything. ``run`` mode leaves out what `fastlb run` survives by
itself, loudly: a listen address that cannot be bound fails only its own service, and a state
file that cannot be written at start (its directory missing, unwritable, a full disk) is retried
in the background while admin changes are refused; a state file that cannot be loaded is refused
by the supervisor's own load (fastlb.statefile), with the message check gives. So `run` never
refuses to start on something `check` passed, but for a race.
"""
from __future__ import annotations

import errno
import os
import socket
import stat
import tempfile
from typing import Callable, Literal

from fastlb.config import Address, Config, error_at, parse_address
from fastlb.errors import ConfigError

Mode = Literal["check", "run"]
# fail(key, message) and warn(key, message): how a check reports a problem (see problems())
Report = Callable[[str, str], None]

_BIND_REMEDY = {
    errno.EADDRINUSE: "another process listens there (`ss -ltnp` shows which; a running fastlb? "
                      "`fastlb check --no-bind` skips this check before a reload); stop it or "
                      "choose another port",
    errno.EADDRNOTAVAIL: "that IP is not an address of this machine; use one of its addresses, "
                         "or 0.0.0.0 / [::] for all",
    errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE (systemd: "
                  "AmbientCapabilities=CAP_NET_BIND_SERVICE); or use a port from 1024",
}


def problems(cfg: Config, *, mode: Mode = "check", bind: bool = True,
             ignore_state: bool = False,
             warnings: list[ConfigError] | None = None) -> list[ConfigError]:
    """Every problem found, in config order; [] when the config can run here. What run
    survives but an operator should know (a state file run would fall back from) is appended
    to ``warnings`` when given. In run mode the state file is loaded by the supervisor itself
    (StateStore.load), which refuses to start on what check reports here."""
    text = cfg.text
    out: list[ConfigError] = []

    def fail(key: str, message: str) -> None:
        out.append(error_at(cfg.source, text, key, message))

    def warn(key: str, message: str) -> None:
        if warnings is not None:
            warnings.append(error_at(cfg.source, text, key, message))

    g = cfg.global_
    if g.admin and g.admin.startswith("tcp:") and g.admin_token_file:
        _check_token_file(g.admin_token_file, fail)
    if g.state_file and mode == "check":     # run starts anyway, and retries the writes
        _check_state_file(g.state_file, fail, warn, writable=mode == "check",
                          load=not ignore_state and mode == "check")
    if g.admin and g.admin.startswith("unix:"):
        _check_unix_socket(g.admin[5:], fail, live=bind)
    if bind:
        if g.admin and g.admin.startswith("tcp:"):
            _check_bind(parse_address(g.admin[4:]), "global.admin", fail)
        if g.metrics:
            _check_bind(parse_address(g.metrics), "global.metrics", fail)
        if mode == "check":
            for i, svc in enumerate(cfg.services):
                for j, addr in enumerate(svc.listen):
                    _check_bind(addr, f"service[{i}].listen[{j}]", fail)
    return out


def _check_token_file(path: str, fail: Report) -> None:
    """Exists, is readable, is open to nobody else (no group/other bits), and holds a token of
    at least 32 characters (fastlb.admin.guard.read_token: the same rules at start and reload)."""
    from fastlb.admin.guard import TokenFileError, read_token
    try:
        read_token(path)
    except TokenFileError as exc:
        fail("global.admin_token_file", str(exc))


def _check_state_file(path: str, fail: Report, warn: Report, *, writable: bool, load: bool) -> None:
    key = "global.state_file"
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        fail(key, f"the state file's directory {directory} {what}; create it "
                  f"(mkdir -p {directory}) or point state_file elsewhere")
        return
    if os.path.exists(path) and not os.path.isfile(path):
        fail(key, f"{path} exists and is not a regular file; remove it or point state_file "
                  f"elsewhere")
        return
    if writable:
        try:   # a real write: access() would say yes to root on a read-only file system
            fd, probe = tempfile.mkstemp(prefix=".fastlb-check-", dir=directory)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            fail(key, f"cannot write in the state file's directory {directory}: "
                      f"{exc.strerror}; make it writable by the user fastlb runs as (or free "
                      f"disk space), or point state_file elsewhere")
            return
    if load:
        from fastlb import statefile
        error, warning = statefile.StateStore(path).inspect()   # reads only, changes nothing
        if error:
            fail(key, error)
        if warning:
            warn(key, warning)


def _check_unix_socket(path: str, fail: Report, *, live: bool) -> None:
    key = "global.admin"
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        fail(key, f"the admin socket's directory {directory} does not exist; create it "
                  f"(mkdir -p {directory}; systemd: RuntimeDirectory=fastlb) or choose "
                  f"another path")
        return
    if not os.access(directory, os.W_OK | os.X_OK):
        fail(key, f"cannot create the admin socket in {directory}: permission denied; make "
                  f"the directory writable by the user fastlb runs as")
        return
    if live:
        from fastlb.admin.server import admin_socket_problem
        problem, _ = admin_socket_problem("unix:" + path)   # probes, removes nothing
        if problem:
            fail(key, problem)
    elif os.path.lexists(path) and not stat.S_ISSOCK(os.lstat(path).st_mode):
        fail(key, f"admin socket {path}: the path exists and is not a socket; fastlb never "
                  f"removes it: move it away or set [global] admin to another path")


def _check_bind(addr: Address, key: str, fail: Report) -> None:
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the real listeners do
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr.host, addr.port))
        s.listen(1)
    except OSError as exc:
        remedy = _BIND_REMEDY.get(exc.errno or 0, "check the address")
        fail(key, f"cannot listen on {addr.text}: {exc.strerror}; {remedy}")
    finally:
        s.close()


def report(found: list[ConfigError]) -> str:
    return "\n".join(f"fastlb: {p}" for p in found)


__all__ = ["problems", "report", "ConfigError"]
