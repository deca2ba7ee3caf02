"""Health: active checks, passive reports, and the up/down state of every backend.

Owner: the health bitmap's bits (this module is their one writer) and each backend's health
state machine. The data path reads the bits lock-free and never waits for this module.

``HealthState`` is the pure state machine (rise/fall, passive down, which interval applies):
no I/O, tested alone. ``HealthChecker`` runs one asyncio task per checked backend: it sleeps an
interval (with jitter), runs a check bounded by ``timeout`` (a TCP connect, or send bytes and
expect a substring or a regex in the reply), and feeds the result to the state machine. Every
transition is logged once with its reason and handed to ``on_change`` (which rebuilds the
service's policy for slow start and panic mode, and publishes the event).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import random
import re
import ssl
import time
from dataclasses import dataclass
from typing import Callable

from fastlb._core import HealthBitmap
from fastlb.config import HealthConfig, OrigTls

log = logging.getLogger("fastlb.health")

# A check that fails for a reason of this host (out of fds, buffers, memory, local ports) says
# nothing about the backend: no verdict, the state stays (as the data path does not blame a
# backend for its local errors, core/limits.pxi). Logged at most once per LOCAL_LOG_INTERVAL.
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                          errno.EADDRNOTAVAIL})
LOCAL_LOG_INTERVAL = 10.0
# A reply is read up to this many bytes looking for the expected match.
MAX_REPLY = 65536


@dataclass
class HealthState:
    """Rise/fall state of one backend (HAProxy's semantics: counters reset on each change)."""
    cfg: HealthConfig
    up: bool = True
    successes: int = 0        # consecutive passing checks while down
    failures: int = 0         # consecutive failing checks while up
    reason: str = "initial state"
    since: float = 0.0
    check_failures: int = 0   # all failing checks, for stats and metrics
    # For metrics and the status page (HAProxy's chkdown, lastchg, downtime): transitions to
    # down, the wall-clock time of the last change, and the seconds spent down before it.
    downs: int = 0
    changed_at: float = 0.0   # time.time() of the last transition (0: none yet)
    downtime: float = 0.0     # seconds spent down, up to the last transition back up

    def on_check(self, ok: bool, detail: str = "") -> str | None:
        """Feed one check result. Returns the transition's reason, or None."""
        if ok:
            self.failures = 0
            if not self.up:
                self.successes += 1
                if self.successes >= self.cfg.rise:
                    return self._set(True, f"{self.cfg.rise} check{'s' * (self.cfg.rise > 1)} passed")
            return None
        self.check_failures += 1
        self.successes = 0
        if self.up:
            self.failures += 1
            if self.failures >= self.cfg.fall:
                return self._set(False, f"{self.cfg.fall} check{'s' * (self.cfg.fall > 1)} failed ({detail})")
        return None

    def on_passive(self, failures: int, reason: str) -> str | None:
        """The data path saw ``failures`` consecutive failures: down at once."""
        if not self.up:
            return None
        return self._set(False, f"{failures} consecutive failures on client connections ({reason})")

    def _set(self, up: bool, reason: str) -> str:
        if up and not self.up and self.since:
            self.downtime += time.monotonic() - self.since
        if not up:
            self.downs += 1
        self.changed_at = time.time()
        self.up = up
        self.successes = self.failures = 0
        self.reason = reason
        self.since = time.monotonic()
        return reason

    def next_interval(self) -> float:
        """fastinter while a change is under way, downinter while down, else interval."""
        c = self.cfg
        if (self.up and self.failures) or (not self.up and self.successes):
            return c.fastinter or c.interval
        if not self.up:
            return c.downinter or c.interval
        return c.interval

    def downtime_now(self) -> float:
        """Seconds spent down so far, including the current spell if down now."""
        return self.downtime + (0.0 if self.up or not self.since else time.monotonic() - self.since)


def _orig_context(o: OrigTls) -> ssl.SSLContext:
    """[orig] The check's client context for a backend reached over TLS: the data path's
    settings (ca or the system store, verify, the client certificate). Built once per OrigTls
    (the client certificate is read from its file: Python's ssl loads no PEM from memory)."""
    ctx = ssl.create_default_context(cadata=o.ca_pem.decode("ascii", "replace") if o.ca_pem else None)
    if not o.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if o.cert and o.key:
        ctx.load_cert_chain(o.cert, o.key)
    return ctx


_ORIG_CONTEXTS: dict[OrigTls, ssl.SSLContext] = {}


def orig_tls(o: OrigTls | None, name: str) -> tuple[ssl.SSLContext, str] | None:
    """[orig] (context, name to verify and send as SNI) for checks over TLS (None: plain)."""
    if o is None:
        return None
    ctx = _ORIG_CONTEXTS.get(o)
    if ctx is None:
        if len(_ORIG_CONTEXTS) > 256:            # configurations come and go: keep it bounded
            _ORIG_CONTEXTS.clear()
        ctx = _ORIG_CONTEXTS[o] = _orig_context(o)
    return ctx, o.sni or name


async def check_once(host: str, port: int, cfg: HealthConfig,
                     tls: tuple[ssl.SSLContext, str] | None = None) -> tuple[bool | None, str]:
    """One check, bounded by cfg.timeout. Returns (passed, detail); passed is None when the
    check could not be made for a local reason (LOCAL_ERRNOS). Holds nothing afterwards.
    ``tls`` [orig]: (context, name): the check connects over TLS as the data path does (the
    same verification, SNI and client certificate); a failed handshake fails the check."""
    writer = None
    try:
        async with asyncio.timeout(cfg.timeout):
            if tls is not None:                                                # [orig]
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=tls[0], server_hostname=tls[1] or None,
                    ssl_handshake_timeout=cfg.timeout)
            else:
                reader, writer = await asyncio.open_connection(host, port)
            if cfg.kind == "tcp":
                return True, "connected"
            if cfg.send:
                writer.write(cfg.send)
            data = b""
            rx = re.compile(cfg.expect_regex.encode()) if cfg.expect_regex is not None else None
            while len(data) < MAX_REPLY:
                chunk = await reader.read(MAX_REPLY - len(data))
                if not chunk:
                    break
                data += chunk
                if (rx.search(data) if rx else cfg.expect is not None and cfg.expect in data):
                    return True, "expected reply"
            return False, f"unexpected reply {data[:40]!r}"
    except TimeoutError:
        return False, f"timeout after {cfg.timeout:g}s"
    except ssl.SSLError as exc:                                                 # [orig]
        return False, f"TLS: {getattr(exc, 'verify_message', None) or exc.reason or exc}"
    except OSError as exc:
        if exc.errno in LOCAL_ERRNOS:
            return None, f"not checked: {exc.strerror} (a local error, not the backend's)"
        return False, exc.strerror or type(exc).__name__
    finally:
        if writer is not None:
            writer.close()


Change = Callable[[str, str, bool, str], None]   # (service, address, up, reason)


class HealthChecker:
    """One task per checked backend; the single writer of the health bits."""

    def __init__(self, health: HealthBitmap, on_change: Change) -> None:
        self.health = health
        self.on_change = on_change
        self.states: dict[tuple[str, str], HealthState] = {}
        self.slots: dict[tuple[str, str], int] = {}
        self.tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.targets: dict[tuple[str, str], tuple[str, int]] = {}
        self.tls: dict[tuple[str, str], tuple[OrigTls | None, str]] = {}   # [orig]
        self._local_log = (-LOCAL_LOG_INTERVAL, 0)       # (last line, checks since): local errors

    def track(self, service: str, address: str, slot: int, host: str, port: int,
              cfg: HealthConfig | None, tls: OrigTls | None = None, name: str = "") -> None:
        """Start (or restart, when its config changed) checking a backend. Without a config the
        backend is simply up. ``tls``, ``name`` [orig]: check over TLS (the name verified and
        sent as SNI unless tls.sni says)."""
        key = (service, address)
        if cfg is not None and cfg.port:   # [orig] a check port of its own: plain, as HAProxy
            tls = None                     # inherits `ssl` for checks only without `port`
        old = self.states.get(key)
        if (old is not None and old.cfg == cfg and self.slots.get(key) == slot
                and self.tls.get(key, (None, "")) == (tls, name)):
            return
        self.untrack(service, address)
        if tls is not None:
            self.tls[key] = (tls, name)
        self.slots[key] = slot
        if cfg is None:
            self.health.mark_up(slot)
            return
        st = HealthState(cfg, up=(cfg.initial == "up") if old is None else old.up,
                         since=time.monotonic())
        self.states[key] = st
        (self.health.mark_up if st.up else self.health.mark_down)(slot)
        self.targets[key] = (host, cfg.port or port)
        self.tasks[key] = asyncio.get_running_loop().create_task(self._run(key))

    def untrack(self, service: str, address: str) -> None:
        key = (service, address)
        task = self.tasks.pop(key, None)
        if task is not None:
            task.cancel()
        self.states.pop(key, None)
        self.slots.pop(key, None)
        self.targets.pop(key, None)
        self.tls.pop(key, None)

    def stop(self) -> None:
        for key in list(self.tasks):
            self.untrack(*key)

    def state(self, service: str, address: str) -> HealthState | None:
        return self.states.get((service, address))

    def passive_down(self, service: str, address: str, failures: int, reason: str) -> None:
        st = self.states.get((service, address))
        if st is None:
            return              # no active checks: nothing could bring it back; stay up
        why = st.on_passive(failures, reason)
        if why is not None:
            self._transition((service, address), st, why)

    async def _run(self, key: tuple[str, str]) -> None:
        st = self.states[key]
        host, port = self.targets[key]
        o, name = self.tls.get(key, (None, ""))
        tls, tls_error = None, ""
        try:
            tls = orig_tls(o, name)                                             # [orig]
        except (OSError, ValueError) as exc:    # the client certificate's file changed since
            tls_error = f"TLS settings: {exc}"  # the load: every check fails, said why
        rnd = random.Random()
        while True:
            interval = st.next_interval()
            await asyncio.sleep(interval * (1 + st.cfg.jitter * (2 * rnd.random() - 1)))
            ok, detail = (False, tls_error) if tls_error else \
                await check_once(host, port, st.cfg, tls)
            if ok is None:                      # a local error: no verdict on the backend
                self._local_error(key, detail)
                continue
            why = st.on_check(ok, detail)
            log.debug("%s/%s: check %s (%s)", key[0], key[1], "passed" if ok else "failed", detail)
            if why is not None:
                try:
                    self._transition(key, st, why)
                except Exception:  # noqa: BLE001 - a bug in a listener must not end the checks
                    log.exception("%s/%s: handling a health change failed", *key)

    def _local_error(self, key: tuple[str, str], detail: str) -> None:
        now = time.monotonic()
        last, count = self._local_log
        if now - last >= LOCAL_LOG_INTERVAL:
            self._local_log = (now, 0)
            log.warning("%s/%s: check %s%s", key[0], key[1], detail,
                        f" ({count + 1} checks in the last {LOCAL_LOG_INTERVAL:g}s)" if count else "")
        else:
            self._local_log = (last, count + 1)

    def _transition(self, key: tuple[str, str], st: HealthState, why: str) -> None:
        slot = self.slots[key]
        (self.health.mark_up if st.up else self.health.mark_down)(slot)
        log.warning("%s/%s %s: %s", key[0], key[1], "UP" if st.up else "DOWN", why)
        self.on_change(key[0], key[1], st.up, why)
