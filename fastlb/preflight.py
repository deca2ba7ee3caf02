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
import resource
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
    _check_maxconn(cfg, fail)                                                   # [limits]
    if g.admin and g.admin.startswith("tcp:") and g.admin_token_file:
        _check_token_file(g.admin_token_file, fail)
    for i, svc in enumerate(cfg.services):                                      # [leases]
        if svc.registration is not None and svc.registration.token_file:
            _check_token_file(svc.registration.token_file, fail,
                              f"service[{i}].registration.token_file")
    if g.connlog.startswith("file:") and mode == "check":                       # [obs]
        _check_log_file(g.connlog[len("file:"):], fail)
    if g.state_file and mode == "check":     # run starts anyway, and retries the writes
        _check_state_file(g.state_file, fail, warn, writable=mode == "check",
                          load=not ignore_state and mode == "check")
    if g.admin and g.admin.startswith("unix:"):
        _check_unix_socket(g.admin[5:], fail, live=bind)
    _check_fastopen(cfg, warn)                                                  # [listenopts]
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


# -- [limits] the fd budget: [global] maxconn and RLIMIT_NOFILE ---------------------------------
# fastlb raises its soft RLIMIT_NOFILE to the hard limit at start (HAProxy does the same; nginx's
# worker_rlimit_nofile), so the hard limit is the budget. Every process must fit it on its own:
# with workers, one worker may hold every session (the kernel wakes whichever worker is idle).
#
#     reserve = FD_BASE + listeners + backends + 2 x workers + FD_METRICS (if metrics)
#               + FD_ADMIN (if an admin socket)
#     maxconn = (RLIMIT_NOFILE - reserve) // 2          (a session holds 2 fds: client, backend)
#
# FD_BASE covers stdio, the engine's and uvloop's epoll fds, uvloop's signal and wake-up fds,
# the shared-memory memfd, a worker's control channel and the log; each backend may have one
# health-check socket open; the supervisor holds a channel and a pidfd per worker; the metrics
# port serves up to httpapi.MAX_CONNECTIONS (64) clients but rarely more than a few at once,
# and the admin socket a few. HAProxy computes maxsock the same way (2 per connection plus the
# listeners, checks and its own fds) and refuses to start when setrlimit cannot give it.
FD_BASE = 32
FD_METRICS = 16
FD_ADMIN = 16
# With no fd limit at all (RLIM_INFINITY) the kernel still caps a process at fs.nr_open.
FD_UNLIMITED = 1 << 20


def fd_limit() -> int:
    """The open-files limit fastlb runs with: the hard RLIMIT_NOFILE (the soft one is raised
    to it at start)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return FD_UNLIMITED if hard == resource.RLIM_INFINITY else min(hard, FD_UNLIMITED)


def fd_reserve(cfg: Config) -> int:
    """The fds a process needs besides its sessions (the formula above)."""
    g = cfg.global_
    return (FD_BASE + sum(len(s.listen) for s in cfg.services)
            + sum(len(s.backends) for s in cfg.services) + 2 * g.workers
            + (FD_METRICS if g.metrics else 0) + (FD_ADMIN if g.admin else 0))


def maxconn(cfg: Config, nofile: int | None = None) -> int:
    """[global] maxconn as fastlb runs it: the configured value, or what the fd limit holds
    (at least 1; _check_maxconn refuses a limit too low for any session)."""
    if cfg.global_.maxconn:
        return cfg.global_.maxconn
    nofile = fd_limit() if nofile is None else nofile
    return max(1, (nofile - fd_reserve(cfg)) // 2)


def _check_maxconn(cfg: Config, fail: Report) -> None:
    """A maxconn the fd limit cannot hold is an error, not a warning: past it accept4 and
    socket() fail with EMFILE under load, which is what maxconn exists to prevent. (HAProxy
    refuses to start in that case too since 2.3, where `strict-limits` became the default.)"""
    nofile, reserve = fd_limit(), fd_reserve(cfg)
    fits = (nofile - reserve) // 2
    if cfg.global_.maxconn and cfg.global_.maxconn > fits:
        fail("global.maxconn",
             f"{cfg.global_.maxconn} connections need {2 * cfg.global_.maxconn + reserve} open "
             f"files (2 per connection + {reserve} reserved for listeners, health checks, "
             f"workers, admin and metrics), but the fd limit is {nofile}; raise the hard "
             f"limit (systemd: LimitNOFILE=; ulimit -Hn) or set maxconn to at most "
             f"{max(fits, 0)}")
    elif fits < 1:
        fail("global", f"the fd limit {nofile} leaves no room for a connection after the "
                       f"{reserve} fds reserved for listeners, health checks, workers, admin "
                       f"and metrics; raise the hard limit (systemd: LimitNOFILE=; ulimit -Hn)")


def _check_token_file(path: str, fail: Report, key: str = "global.admin_token_file") -> None:
    """Exists, is readable, is open to nobody else (no group/other bits), and holds a token of
    at least 32 characters (fastlb.admin.guard.read_token: the same rules at start and reload)."""
    from fastlb.admin.guard import TokenFileError, read_token
    try:
        read_token(path)
    except TokenFileError as exc:
        fail(key, str(exc))


def _check_log_file(path: str, fail: Report) -> None:
    """The connection log's file can be opened for appending (created if missing), as
    fastlb.connlog opens it at start; nothing is written."""
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        fail("global.connlog", f"cannot open {path} for appending: {exc.strerror or exc}")
        return
    if not existed:
        os.unlink(path)


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


def _check_fastopen(cfg: Config, warn: Report) -> None:
    """[listenopts] A service with fastopen on a machine whose net.ipv4.tcp_fastopen does not
    allow server TFO: a warning, not an error (fastlb serves; clients just do not save the
    round trip). `fastlb run` logs the same at start and reload (Listeners.configure)."""
    from fastlb.listeners import tfo_problem
    first = next((i for i, s in enumerate(cfg.services) if s.fastopen), None)
    if first is not None and (problem := tfo_problem()) is not None:
        warn(f"service[{first}].fastopen", problem)


def report(found: list[ConfigError]) -> str:
    return "\n".join(f"fastlb: {p}" for p in found)


__all__ = ["problems", "report", "ConfigError"]
