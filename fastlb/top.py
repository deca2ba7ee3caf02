"""``fastlb top``: a live terminal view of a running fastlb, over its admin socket.

Owner: the screen. Every ``--interval`` seconds it asks ``stats`` and redraws: per service and
backend, status (HAProxy's UP/DOWN/MAINT/DRAIN), weight, active connections, connections/s and
bytes/s (from the difference between two polls), totals, failures; below, the most recent
events (health changes, admin changes, reloads) from a ``subscribe`` connection read by a
thread. Plain ANSI (alternate screen, cursor home, clear to end): it works over ssh in any
terminal, no curses needed. Keys: ``q`` (or Ctrl-C) quits.

``render`` is pure (stats in, lines out) and tested alone; ``main`` is the terminal glue.
"""
from __future__ import annotations

import argparse
import collections
import os
import select
import shutil
import socket
import sys
import termios
import threading
import time
import tty
from typing import Any

from fastlb.admin.client import AdminClient, AdminError
from fastlb.observe import server_state

EVENTS_KEPT = 50
ALT_ON, ALT_OFF = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"
HOME, CLEAR_EOL, CLEAR_EOS = "\x1b[H", "\x1b[K", "\x1b[J"
BOLD, REVERSE, RESET = "\x1b[1m", "\x1b[7m", "\x1b[0m"
COLOR = {"UP": "\x1b[32m", "DOWN": "\x1b[1;31m", "MAINT": "\x1b[35m", "DRAIN": "\x1b[33m"}


def add_parser(sub: Any) -> None:
    from fastlb import ctl
    p = sub.add_parser("top", parents=[ctl._connection_options()],
                       help="live view of a running fastlb (q quits)",
                       description="A live terminal view of a running fastlb over its admin "
                                   "socket: per backend status, rates, active connections, "
                                   "bytes, and recent events. q or Ctrl-C quits.")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    p.add_argument("--iterations", type=int, default=0,
                   help="stop after this many refreshes (default: until q)")


def _size(n: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"     # pragma: no cover


def _event_line(ev: dict) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(ev.get("_at", time.time())))
    op = ev.get("op", "?")
    if op == "health":
        return (f"{when} {ev.get('service')}/{ev.get('address')} {str(ev.get('health')).upper()}: "
                f"{ev.get('reason', '')}")
    rest = " ".join(f"{k}={v}" for k, v in ev.items() if k not in ("op", "_at"))
    return f"{when} {op} {rest}"


COLUMNS = [("BACKEND", 22, "<"), ("STATUS", 6, "<"), ("WEIGHT", 6, ">"), ("ACTIVE", 7, ">"),
           ("CONN/S", 8, ">"), ("IN/S", 8, ">"), ("OUT/S", 8, ">"), ("TOTAL", 9, ">"),
           ("BYTES IN", 9, ">"), ("BYTES OUT", 9, ">"), ("ERRORS", 7, ">"), ("CHKFAIL", 7, ">"),
           ("REASON", 0, "<")]


def render(stats: list[dict], prev: dict[tuple[str, str], dict] | None, dt: float,
           events: list[dict], width: int, height: int, *, color: bool = True,
           title: str = "") -> list[str]:
    """The screen's lines for one refresh (each at most ``width`` visible characters)."""
    def paint(code: str, text: str) -> str:
        return f"{code}{text}{RESET}" if color else text

    up = sum(1 for s in stats for b in s["backends"] if server_state(b) == "UP")
    allb = sum(len(s["backends"]) for s in stats)
    active = sum(b["active"] for s in stats for b in s["backends"])
    head = (f"fastlb top  {time.strftime('%H:%M:%S')}  services {len(stats)}  "
            f"backends up {up}/{allb}  active {active}  (q quits)  {title}")
    lines = [paint(BOLD, head[:width])]
    header = " ".join(f"{name:{align}{w}}" if w else name for name, w, align in COLUMNS)
    for s in stats:
        lines.append("")
        lines.append(paint(BOLD, f"{s['service']}"[:width]))
        lines.append(paint(REVERSE, header[:width].ljust(width)))
        for b in s["backends"]:
            p = (prev or {}).get((s["service"], b["address"]))
            def rate(field: str, b: dict = b, p: dict | None = p) -> float:
                return max(0.0, (b[field] - p[field]) / dt) if p and dt > 0 else 0.0
            st = server_state(b)
            cells = [b["address"], st, str(b["weight"]), str(b["active"]),
                     f"{rate('total'):.1f}" if p else "-",
                     _size(rate("bytes_in")) if p else "-", _size(rate("bytes_out")) if p else "-",
                     str(b["total"]), _size(b["bytes_in"]), _size(b["bytes_out"]),
                     str(b["connect_failures"]), str(b["check_failures"]), b.get("health_reason", "")]
            text = " ".join(f"{c:{align}{w}}" if w else c
                            for c, (_, w, align) in zip(cells, COLUMNS, strict=True))[:width]
            if color:   # colour the status cell only; widths stay those of the plain text
                start = COLUMNS[0][1] + 1
                if len(text) > start:
                    text = text[:start] + paint(COLOR[st], text[start:start + 6]) + text[start + 6:]
            lines.append(text)
    room = height - len(lines) - 2
    if room > 0:
        lines.append("")
        lines.append(paint(BOLD, "recent events"))
        shown = events[-room:] if events else []
        lines += [_event_line(ev)[:width] for ev in shown] or ["(none yet)"]
    return lines[:height]


def _snapshot(stats: list[dict]) -> dict[tuple[str, str], dict]:
    return {(s["service"], b["address"]): dict(b) for s in stats for b in s["backends"]}


def _follow(client: AdminClient, events: collections.deque, stop: threading.Event) -> None:
    try:
        for ev in client.events():
            ev["_at"] = time.time()
            events.append(ev)
            if stop.is_set():
                return
    except (OSError, ConnectionError, AdminError):
        return


def main(args: argparse.Namespace) -> int:
    from fastlb import ctl
    try:
        client, watcher = ctl._connect(args), ctl._connect(args)
    except SystemExit as exc:
        print(str(exc.code).replace("fastlb ctl:", "fastlb top:"), file=sys.stderr)
        return 2
    title = getattr(args, "tcp", None) or getattr(args, "socket", None) or ctl.DEFAULT_SOCKET
    events: collections.deque = collections.deque(maxlen=EVENTS_KEPT)
    stop = threading.Event()
    threading.Thread(target=_follow, args=(watcher, events, stop), daemon=True).start()
    tty_in = sys.stdin.isatty()
    saved = termios.tcgetattr(sys.stdin) if tty_in else None
    out = sys.stdout
    color = out.isatty() and os.environ.get("NO_COLOR") is None
    prev, prev_t, n, code = None, 0.0, 0, 0
    try:
        if tty_in:
            tty.setcbreak(sys.stdin)
        if out.isatty():
            out.write(ALT_ON)
        while True:
            try:
                stats = client.call("stats")
            except (OSError, ConnectionError, AdminError) as exc:
                code, message = 1, f"fastlb top: lost the admin connection ({exc})"
                break
            now = time.monotonic()
            size = _terminal_size(out)
            lines = render(stats, prev, now - prev_t, list(events), size.columns, size.lines,
                           color=color, title=title)
            out.write(HOME + "".join(line + CLEAR_EOL + "\r\n" for line in lines) + CLEAR_EOS)
            out.flush()
            prev, prev_t, n = _snapshot(stats), now, n + 1
            if args.iterations and n >= args.iterations:
                message = ""
                break
            if _wait_for_quit(args.interval, tty_in):
                message = ""
                break
    except KeyboardInterrupt:
        message = ""
    finally:
        stop.set()
        if out.isatty():
            out.write(ALT_OFF)
            out.flush()
        if saved is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)
        client.close()
        try:
            watcher.sock.shutdown(socket.SHUT_RDWR)       # wakes the events thread
        except OSError:
            pass
        watcher.close()
    if message:
        print(message, file=sys.stderr)
    return code


def _terminal_size(out: Any) -> os.terminal_size:
    """The terminal's size now (it follows resizes, where $COLUMNS would go stale); for a
    pipe, $COLUMNS/$LINES or 120x40."""
    try:
        return os.get_terminal_size(out.fileno())
    except (OSError, ValueError, AttributeError):
        return shutil.get_terminal_size((120, 40))


def _wait_for_quit(interval: float, tty_in: bool) -> bool:
    """Sleep ``interval``; True when q was pressed (or stdin ended) meanwhile."""
    deadline = time.monotonic() + interval
    while (left := deadline - time.monotonic()) > 0:
        if not tty_in:
            time.sleep(left)
            return False
        ready, _, _ = select.select([sys.stdin], [], [], left)
        if ready:
            key = os.read(sys.stdin.fileno(), 1)
            if key in (b"q", b"Q", b""):
                return True
    return False
