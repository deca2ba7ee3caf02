"""The service manager's notification protocol (systemd's sd_notify), for ``Type=notify``.

Owner: the datagrams sent to ``$NOTIFY_SOCKET``. Without that variable (not started by a
service manager) every call does nothing and returns False. The protocol (sd_notify(3)): one
datagram of newline-separated ``KEY=VALUE`` fields on a unix datagram socket; a path starting
with ``@`` is in the abstract namespace (the ``@`` stands for a leading NUL byte).

The supervisor sends ``READY=1`` once it serves, ``RELOADING=1`` with ``MONOTONIC_USEC`` when a
SIGHUP reload begins and ``READY=1`` when it ends (failed or not: the old config keeps serving),
``STOPPING=1`` when it begins to stop, and a human ``STATUS=`` line with each, which
``systemctl status`` shows. A send that fails is logged once and never stops fastlb.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("fastlb")
_warned = False


def address(env: Mapping[str, str] | None = None) -> str | None:
    """The socket address to send to (abstract: a leading NUL), or None when not supervised."""
    path = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        return "\0" + path[1:]
    if path.startswith("/"):
        return path
    return None           # unset, or a kind we do not speak (vsock: "vsock:CID:PORT")


def notify(*fields: str, env: Mapping[str, str] | None = None) -> bool:
    """Send one datagram of ``KEY=VALUE`` fields; True when it was sent."""
    global _warned
    addr = address(env)
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.send("\n".join(fields).encode())
        return True
    except OSError as exc:
        if not _warned:
            _warned = True
            log.warning("NOTIFY_SOCKET %s: %s (the service manager is not told our state)",
                        addr.replace("\0", "@"), exc.strerror or exc)
        return False


def _status(text: str) -> str:
    return "STATUS=" + text.replace("\n", " ")


def ready(status: str) -> bool:
    return notify("READY=1", _status(status))


def reloading(status: str = "reloading the config") -> bool:
    # MONOTONIC_USEC: CLOCK_MONOTONIC in microseconds, as systemd requires with RELOADING=1
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}", _status(status))


def stopping(status: str) -> bool:
    return notify("STOPPING=1", _status(status))


def status(text: str) -> bool:
    return notify(_status(text))
