"""The connection log's reader: drains the workers' rings, formats the lines, writes them out.

Owner: the supervisor's half of the connection log (docs/connlog.md). The data path writes one
fixed-size record per connection into its block's ring in shared memory, in C
(core/connlog.pxi); here, on the supervisor's loop, every ring is drained in batches (every
``INTERVAL``, sooner while a ring is more than half full), each record becomes one line (text,
HAProxy-like, or one JSON object) and the batch goes to the destination in one write:
``stderr`` (beside the process log), ``file:/path`` (reopened on SIGUSR1, for logrotate) or
``syslog:unix:/dev/log`` / ``syslog:udp:host:port`` (RFC 5424, one datagram per line).

A full ring drops records in the data path, never waits: the drops are counted in the ring
header, logged here at most once per ``DROP_LOG_INTERVAL`` and exported in /metrics
(``fastlb_process_connlog_dropped_total``). A destination that fails (disk full, syslog down) loses
that batch, logged the same rate-limited way: the log never stops the balancer.
Nothing here runs per connection in the data path's process when ``workers > 1``; with
``workers = 1`` the drain shares the one process (a few microseconds per logged line).
"""
from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

from fastlb import _core

log = logging.getLogger("fastlb")

INTERVAL = 0.1               # seconds between drains
FAST_INTERVAL = 0.01         # while a ring was more than half full at the last drain
BATCH = 4096                 # records taken from one ring per drain
DROP_LOG_INTERVAL = 10.0     # drops and write errors: at most one line per this many seconds
SYSLOG_PRI = 16 * 8 + 6      # facility local0, severity informational (HAProxy's default local0)
TERM_CODES: tuple[str, ...] = tuple(_core.TERM_CODES)
NOSRV = "<NOSRV>"            # HAProxy's name for "no server" in its logs
SNI_UNROUTED = "<sni>"       # [sni] the "service" of a connection refused before SNI routing

# A record as ConnLog.drain gives it.
Record = tuple[int, int, int, int, int, int, int, int, "tuple[str, int] | None", int, int, int,
               int, int]
# row -> (service, format), slot -> backend address: the names at drain time.
Names = tuple[Mapping[int, tuple[str, str]], Mapping[int, str]]


def _iso(ns: int) -> str:
    """Local time with its UTC offset, to the microsecond (as the process log, more digits);
    the microseconds truncated, as the C formatter does."""
    t = datetime.datetime.fromtimestamp(ns // 10**9).astimezone()
    return t.replace(microsecond=ns % 10**9 // 1000).isoformat(timespec="microseconds")


def _ms(us: int) -> str:
    return "-1" if us < 0 else f"{us / 1000:.3f}"


def fields(rec: Record, names: Names, block: int) -> dict[str, Any]:
    """One record as a JSON-ready dict (the JSON line; the text line is made from it)."""
    (end_ns, accept_ns, tw, tc, tr, tt, bin_, bout, client, lport, retries, row, slot,
     term) = rec
    rows, slots = names
    service = rows.get(row, (f"row{row}", "text"))[0]
    return {"time": _iso(end_ns), "accept_time": _iso(accept_ns),
            "client": client[0] if client else None, "client_port": client[1] if client else None,
            "service": service, "listener_port": lport,
            "backend": slots.get(slot, f"slot{slot}") if slot >= 0 else None,
            "retries": retries, "queue_us": tw, "connect_us": tc, "first_byte_us": tr,
            "total_us": tt, "bytes_in": bin_, "bytes_out": bout,
            "term": TERM_CODES[term] if 0 <= term < len(TERM_CODES) else "??", "worker": block}


def text_line(f: Mapping[str, Any]) -> str:
    """HAProxy's TCP log, dated and with fastlb's fields:
    ``<end time> <client>:<port> <service>:<listener port> <service>/<backend> Tw/Tc/Tr/Tt
    <bytes in>/<bytes out> <term> <retries>``; times in ms (three decimals), -1 when the phase
    was never reached; ``<NOSRV>`` when no backend was connected or tried."""
    client = f["client"]
    who = (f"[{client}]" if client and ":" in client else client or "-") + f":{f['client_port'] or 0}"
    return (f"{f['time']} {who} {f['service']}:{f['listener_port']} "
            f"{f['service']}/{f['backend'] or NOSRV} "
            f"{_ms(f['queue_us'])}/{_ms(f['connect_us'])}/{_ms(f['first_byte_us'])}/{_ms(f['total_us'])} "
            f"{f['bytes_in']}/{f['bytes_out']} {f['term']} {f['retries']}")


def format_record(rec: Record, names: Names, block: int) -> str:
    """One line in Python: the twin of the C formatter (``ConnLog.format``), which the drain
    uses; tests hold the two to the same bytes."""
    f = fields(rec, names, block)
    fmt = names[0].get(rec[11], ("", "text"))[1]
    return json.dumps(f, separators=(",", ":")) if fmt == "json" else text_line(f)


def syslog_frame(line: str, hostname: str, pid: int, now: float | None = None) -> bytes:
    """One RFC 5424 message: ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD MSG``."""
    ts = datetime.datetime.fromtimestamp(time.time() if now is None else now,
                                         datetime.timezone.utc).isoformat(timespec="microseconds")
    ts = ts.replace("+00:00", "Z")
    return f"<{SYSLOG_PRI}>1 {ts} {hostname or '-'} fastlb {pid} conn - {line}".encode()


class Sink:
    """Where the lines go: ``write(lines)`` (one batch), ``reopen()``, ``close()``."""

    def __init__(self, destination: str) -> None:
        self.destination = destination
        self.file: IO[bytes] | None = None
        self.sock: socket.socket | None = None
        self.connected = False
        self.hostname = socket.gethostname()
        self.open()

    def open(self) -> None:
        """A file that cannot be opened raises OSError (fastlb does not start); a syslog socket
        that cannot be reached yet is retried at each batch (the daemon may start later)."""
        d = self.destination
        if d.startswith("file:"):
            self.file = open(d[5:], "ab")            # noqa: SIM115 - kept open, reopened
        elif d.startswith("syslog:unix:"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.sock.setblocking(False)
            self._connect()
            if not self.connected:
                log.warning("connection log: %s cannot be reached yet; trying again with each "
                            "batch", d)
        elif d.startswith("syslog:udp:"):
            host, _, port = d[len("syslog:udp:"):].rpartition(":")
            host = host.strip("[]")
            info = socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)[0]
            self.sock = socket.socket(info[0], socket.SOCK_DGRAM)
            self.sock.setblocking(False)
            self.sock.connect(info[4])
            self.connected = True

    def _connect(self) -> None:
        assert self.sock is not None
        try:
            self.sock.connect(self.destination[len("syslog:unix:"):])
            self.connected = True
        except OSError:
            self.connected = False

    def write(self, data: bytes) -> None:
        """Lines, each ending in a newline, in one write (syslog: one datagram each)."""
        if self.sock is not None:
            if not self.connected:
                self._connect()
                if not self.connected:
                    raise ConnectionRefusedError(f"{self.destination} cannot be reached")
            pid = os.getpid()
            for line in data.decode().splitlines():   # an OSError loses the rest of the batch
                self.sock.send(syslog_frame(line, self.hostname, pid))
            return
        if self.file is not None:
            self.file.write(data)
            self.file.flush()
        else:
            stream = sys.stderr
            stream.flush()                      # the process log's pending lines first
            view = memoryview(data)
            while view:                         # a pipe may take a large batch in parts
                view = view[os.write(stream.fileno(), view):]

    def reopen(self) -> None:
        """SIGUSR1: a file is closed and opened again by name (logrotate moved it); a syslog
        socket is reconnected (the daemon restarted)."""
        self.close()
        self.open()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Drainer:
    """Drains every block's ring of ``connlog`` on ``loop`` into the destination. ``names()``
    gives the row -> (service, format) and slot -> address maps at drain time."""

    def __init__(self, connlog: _core.ConnLog, destination: str, names: Callable[[], Names],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.connlog = connlog
        self.names = names
        self.loop = loop
        self.sink = Sink(destination)
        self.task: asyncio.Task[None] | None = None
        self.written = 0
        self._drops_seen = 0
        self._last_report: dict[str, float] = {}     # kind -> when it was last logged
        self._errors = 0

    def start(self) -> None:
        self.task = self.loop.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                busy = self.drain()
            except Exception:  # noqa: BLE001 - a bug: say so (rate-limited) and keep draining
                busy = False
                if self._report("bug", "connection log: the drain failed (a bug; records wait in the "
                                "rings and are dropped once they are full)"):
                    log.exception("connection log: drain")
            await asyncio.sleep(FAST_INTERVAL if busy else INTERVAL)

    def dropped(self) -> int:
        return sum(self.connlog.dropped(b) for b in range(self.connlog.nblocks))

    def drain(self) -> bool:
        """Drain every ring once. True when a ring held more than half its capacity."""
        busy = False
        chunks: list[bytes] = []
        count = 0
        half = self.connlog.capacity // 2
        tables: tuple[dict[int, tuple[bytes, bytes, bool]], dict[int, tuple[bytes, bytes]]] | None = None
        for block in range(self.connlog.nblocks):   # a worker's lines in the order they ended
            if not self.connlog.pending(block):
                continue
            if tables is None:
                tables = c_tables(self.names())
            data, n = self.connlog.format(block, tables[0], tables[1], BATCH)
            busy = busy or n > half
            chunks.append(data)
            count += n
        if chunks:
            try:
                self.sink.write(b"".join(chunks))
                self.written += count
            except OSError as exc:
                self._errors += count
                self._report("write", f"connection log: writing to {self.sink.destination} failed: {exc}; "
                             f"{self._errors} line(s) lost so far")
        drops = self.dropped()
        if drops > self._drops_seen:
            if self._report("drops", f"connection log: {drops - self._drops_seen} record(s) dropped, the "
                            f"ring was full ({drops} since the start); the drain cannot keep up"):
                self._drops_seen = drops
        return busy

    def _report(self, kind: str, message: str) -> bool:
        """Log a warning of ``kind`` at most once per DROP_LOG_INTERVAL; True when logged."""
        now = time.monotonic()
        if now - self._last_report.get(kind, -DROP_LOG_INTERVAL) < DROP_LOG_INTERVAL:
            return False
        self._last_report[kind] = now
        log.warning("%s", message)
        return True

    def reopen(self) -> None:
        self.drain()
        try:
            self.sink.reopen()
            log.info("connection log: %s reopened", self.sink.destination)
        except OSError as exc:
            log.error("connection log: reopening %s failed: %s", self.sink.destination, exc)

    def close(self) -> None:
        """The last drain (the workers have stopped), then close the destination."""
        if self.task is not None:
            self.task.cancel()
        self.drain()
        self.sink.close()


def c_tables(names: Names) -> tuple[dict[int, tuple[bytes, bytes, bool]],
                                   dict[int, tuple[bytes, bytes]]]:
    """The name maps as ConnLog.format takes them: each name as text and as a JSON string."""
    rows, slots = names
    return ({r: (n.encode(), json.dumps(n).encode(), fmt == "json") for r, (n, fmt) in rows.items()},
            {s: (a.encode(), json.dumps(a).encode()) for s, a in slots.items()})


def names_from(slots: Mapping[tuple[str, str], int], formats: Mapping[str, str],
               service_row: str) -> Names:
    """The drain's name maps from the slot table ((service, address) -> slot; a service's own
    row is keyed by ``service_row``) and each service's log format."""
    rows: dict[int, tuple[str, str]] = {}
    addrs: dict[int, str] = {}
    for (service, address), slot in slots.items():
        if address == service_row:
            rows[slot] = (service, formats.get(service, "text"))
        else:
            addrs[slot] = address
    # [sni] refused before SNI routing named a service (core/sni.pxi): HAProxy logs its frontend
    rows.setdefault(-1, (SNI_UNROUTED, "json" if "json" in formats.values() else "text"))
    return rows, addrs


def histograms(connlog: _core.ConnLog, rows: Mapping[str, int]) -> dict[str, Any]:
    """/metrics: per service (name -> its row), the connect-time and duration histograms
    summed over blocks as Prometheus buckets: ``{"edges": seconds, "services": {name:
    {"connect": (cumulative counts, sum seconds), "duration": ...}}}``; and the drops."""
    edges = [e / 1e6 for e in _core.HISTOGRAM_EDGES_US]
    out: dict[str, Any] = {}
    for name, row in rows.items():
        kinds = {}
        for kind, idx in (("connect", _core.H_CONNECT), ("duration", _core.H_DURATION)):
            counts, total = connlog.histogram(row, idx)
            cum, acc = [], 0
            for c in counts:
                acc += c
                cum.append(acc)
            kinds[kind] = (cum, total / 1e6)
        out[name] = kinds
    return {"edges": edges, "services": out,
            "dropped": sum(connlog.dropped(b) for b in range(connlog.nblocks))}
