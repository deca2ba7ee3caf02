"""Signals from the first line of ``main``: deferred until the supervisor can act on them.

Owner: SIGTERM, SIGINT and SIGHUP between the start of ``fastlb run`` and the moment the
supervisor's event loop takes them over (config and state loading, binding, the first
workers). ``defer()`` (cli.main's first line) records them instead of letting SIGHUP kill the
process or SIGINT raise KeyboardInterrupt mid-start; ``take()`` hands the recorded ones to the
supervisor, which then acts on them in order (a HUP reloads once it is running, a TERM stops
it gracefully, an INT at once).
"""
from __future__ import annotations

import signal
from types import FrameType

DEFERRED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
            signal.SIGUSR1)        # [obs] reopen the connection log (logrotate)
_pending: list[int] = []


def _record(signum: int, frame: FrameType | None) -> None:
    _pending.append(signum)


def defer() -> None:
    for sig in DEFERRED:
        signal.signal(sig, _record)


def take() -> list[int]:
    """The signals received since defer(), oldest first (and forget them)."""
    out = list(_pending)
    del _pending[:len(out)]
    return out


def restore() -> None:
    """Back to Python's defaults (a verb other than ``run``), delivering what was deferred."""
    for sig in DEFERRED:
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    for signum in take():
        signal.raise_signal(signum)
