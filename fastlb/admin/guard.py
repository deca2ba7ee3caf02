"""The admin socket's defences, sans-IO: the token file's rules, the per-source backoff of
failed authentications, and the rate limit of the log lines about refusals. Pure functions of
their inputs and of the ``now`` they are given, so each is testable without a socket or a clock;
fastlb.admin.server is the glue.

What HAProxy, nginx and sshd do, and what this does (docs/config.md, "The admin socket"):
  - sshd is the closest model: ``LoginGraceTime`` (a connection must authenticate within a
    time; here ``admin_frame_timeout`` from the connect), ``MaxStartups`` (unauthenticated
    connections beyond a number are dropped; here ``admin_max_connections``, for all), and since
    OpenSSH 9.8 ``PerSourcePenalties``: a source whose authentications fail is refused at once
    for a penalty that grows with each failure, up to a maximum (``max:600s``), in a table of
    bounded size (``PerSourcePenaltyExemptList``, ``max-sources4/6``, ``overflow``).
    Here: one try per connection (sshd allows ``MaxAuthTries`` = 6), and after
    ``BACKOFF_AFTER`` failures a source's connections are closed at once for a penalty that
    doubles with each further failure, from ``BACKOFF_FIRST`` to ``BACKOFF_MAX`` seconds.
  - HAProxy's stats socket has no authentication of its own (a unix socket's mode and
    ``level``, or a TCP bind the operator must fence off); its ``stats timeout`` (default 10 s)
    closes idle CLI sessions and ``maxconn`` on the bind caps them (default 10 for stats).
    Brute force is left to stick tables (``sc_http_err_rate``) and ``tarpit``.
  - nginx has no backoff either: ``auth_delay`` (1.17.10) delays the 401 to slow guessing,
    ``limit_req``/``limit_conn`` zones cap rates per source; ``client_header_timeout`` (60 s)
    bounds a request being sent, ``keepalive_timeout`` (75 s) an idle connection.
"""
from __future__ import annotations

import collections
import ipaddress
import os
import stat
from dataclasses import dataclass

from fastlb.admin.protocol import TOKEN_MAX

__all__ = ["Backoff", "LogLimiter", "TokenFileError", "TOKEN_MIN_LENGTH", "read_token",
           "source_key"]

# A token an attacker cannot guess: 32 characters of base64 are 192 bits (`head -c 32
# /dev/urandom | base64` writes 44). The length is what can be checked; the randomness cannot.
TOKEN_MIN_LENGTH = 32
# A token file bigger than this is not a token file (read no more of it).
TOKEN_MAX_BYTES = 4096


class TokenFileError(Exception):
    """The token file is missing, unreadable, open to others, or holds too short a token.
    The message names the file and what to run."""


def read_token(path: str) -> str:
    """The admin token in ``path``, stripped; raises TokenFileError. The mode is read from the
    open file (fstat), so the file checked is the file read."""
    remedy = (f"e.g. `head -c 32 /dev/urandom | base64 > {path}; chmod 600 {path}`")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY)
    except FileNotFoundError:
        raise TokenFileError(f"the token file {path} does not exist; create it with the token "
                             f"that admin clients send ({remedy})") from None
    except OSError as exc:
        raise TokenFileError(f"cannot read the token file {path}: {exc.strerror}; make it "
                             f"readable by the user fastlb runs as (and by nobody else: chmod "
                             f"600 {path})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TokenFileError(f"the token file {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise TokenFileError(
                f"the token file {path} has mode {mode:04o}: group or others may "
                f"{'read' if mode & 0o044 else 'write'} it, and whoever reads the token controls "
                f"the balancer; run `chmod 600 {path}` (owner only)")
        data = os.read(fd, TOKEN_MAX_BYTES + 1)
    except OSError as exc:
        raise TokenFileError(f"cannot read the token file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > TOKEN_MAX_BYTES:
        raise TokenFileError(f"the token file {path} is larger than {TOKEN_MAX_BYTES} bytes; it "
                             f"must hold the token only")
    try:
        token = data.decode().strip()
    except UnicodeDecodeError:
        raise TokenFileError(f"the token file {path} is not UTF-8 text; write the token as "
                             f"text ({remedy})") from None
    if not token:
        raise TokenFileError(f"the token file {path} is empty; write the token into it ({remedy})")
    if len(token) > TOKEN_MAX:
        raise TokenFileError(f"the token in {path} is {len(token)} characters long; at most "
                             f"{TOKEN_MAX} fit in the first message of a connection")
    if len(token) < TOKEN_MIN_LENGTH:
        raise TokenFileError(f"the token in {path} is {len(token)} characters long; it must be "
                             f"at least {TOKEN_MIN_LENGTH} (a short token is guessed: {remedy})")
    return token


def source_key(host: str) -> str:
    """The backoff table's key of a peer address: the IPv4 address, an IPv6 address by its /64
    (one host usually owns a whole /64, as for the per-source limits); an IPv4-mapped IPv6
    address is its IPv4 address."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))
    return str(ip)


# Failures a source may have before it is penalised: a typo or two is not an attack.
BACKOFF_AFTER = 3
# The first penalty (at the BACKOFF_AFTER-th failure), doubled at each further failure, capped.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 300.0          # sshd's PerSourcePenalties caps at 600 s; 5 min is enough to make
                             # guessing a 32-character token hopeless, short enough for a typo
# A source is forgotten this long after its last failure (its failures no longer count).
BACKOFF_FORGET = 3600.0
# The table's bound: past it, the source seen least recently is forgotten (an attacker with
# that many addresses is not slowed by a per-source rule anyway; the connection cap and the
# one-try-per-connection rule still hold for it).
BACKOFF_SOURCES = 4096


@dataclass(slots=True)
class _Source:
    failures: int = 0
    until: float = 0.0           # refused before this time
    last: float = 0.0            # the last failure


class Backoff:
    """Failed authentications per source; ``blocked`` says how long a source is still refused."""

    def __init__(self, after: int = BACKOFF_AFTER, first: float = BACKOFF_FIRST,
                 cap: float = BACKOFF_MAX, forget: float = BACKOFF_FORGET,
                 size: int = BACKOFF_SOURCES) -> None:
        self.after, self.first, self.cap, self.forget, self.size = after, first, cap, forget, size
        self._table: collections.OrderedDict[str, _Source] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def blocked(self, source: str, now: float) -> float:
        """Seconds this source is still refused (0.0: let it try)."""
        s = self._table.get(source)
        if s is None:
            return 0.0
        if now - s.last > self.forget:
            del self._table[source]
            return 0.0
        # at most the cap: until = then + penalty, and (then + 4.0) - then can exceed 4.0 by an ulp
        return min(self.cap, max(0.0, s.until - now))

    def failure(self, source: str, now: float) -> float:
        """Record a failed attempt; returns the penalty it starts (0.0: none yet)."""
        s = self._table.pop(source, None)
        if s is None or now - s.last > self.forget:
            s = _Source()
        s.failures += 1
        s.last = now
        penalty = 0.0
        if s.failures >= self.after:
            penalty = min(self.cap, self.first * 2.0 ** min(s.failures - self.after, 64))
            s.until = now + penalty
        self._table[source] = s                 # most recently seen last
        while len(self._table) > self.size:
            self._table.popitem(last=False)
        return penalty

    def success(self, source: str) -> None:
        """A source that knows the token has nothing to pay for its typos."""
        self._table.pop(source, None)


class LogLimiter:
    """At most one line per ``interval`` for one kind of event: the first is logged at once,
    the others are counted and reported as one line ("... N more in the last 10 s") when the
    interval ends (``flush``, which the glue calls when ``hit`` says one is due)."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.window_end = float("-inf")
        self.suppressed = 0
        self.last = ""               # what the last suppressed event was about (for the summary)

    def hit(self, now: float, what: str = "") -> bool:
        """An event: True when it is to be logged now (the first of a window)."""
        if now >= self.window_end and self.suppressed == 0:
            self.window_end = now + self.interval
            return True
        self.suppressed += 1
        self.last = what
        return False

    def flush(self, now: float) -> tuple[int, str]:
        """(events suppressed in the window that ended, the last one's text), and a new window
        starts if there were any (so a steady flood gives one line per interval)."""
        n, last = self.suppressed, self.last
        self.suppressed, self.last = 0, ""
        if n:
            self.window_end = now + self.interval
        return n, last
