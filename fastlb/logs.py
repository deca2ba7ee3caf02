"""The process log: every line dated, as text or as one JSON object per line.

Owner: the root handler of fastlb's processes (the supervisor, its workers, `fastlb demo`'s
balancer). ``[global] log_format`` picks ``text`` (default) or ``json``; ``[global] log_level``
(or ``fastlb run --log-level``, which wins) the level. Lines go to stderr, where a service
manager (journald) or a container runtime collects them.

Text:  ``2026-11-28T00:41:07.123+00:00 WARNING web/10.0.0.2:80 DOWN: 3 checks failed (...)``
JSON:  ``{"time": "2026-11-28T00:41:07.123+00:00", "level": "WARNING", "logger": "fastlb.health",
         "pid": 4242, "message": "web/10.0.0.2:80 DOWN: ...", "worker": 1}`` (``worker`` in a
         worker process; ``exc`` with the traceback when there is one)

Times are local with their UTC offset, to the millisecond (ISO 8601). Workers are started with
the supervisor's environment, so ``setup`` records the format in FASTLB_LOG_FORMAT for them.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import sys

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")
ENV = "FASTLB_LOG_FORMAT"


def _time(record: logging.LogRecord) -> str:
    return datetime.datetime.fromtimestamp(record.created).astimezone().isoformat(
        timespec="milliseconds")


class TextFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        tag = f" [worker {worker}]" if worker is not None else ""
        super().__init__(f"%(asctime)s %(levelname)s{tag} %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _time(record)


class JSONFormatter(logging.Formatter):
    """One JSON object per line; a message never breaks a line (json escapes newlines)."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": _time(record), "level": record.levelname, "logger": record.name,
               "pid": record.process, "message": record.getMessage()}
        if self.worker is not None:
            out["worker"] = self.worker
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup(level: str = "info", fmt: str | None = None, *, worker: int | None = None) -> None:
    """Configure the root logger once for this process. ``fmt`` None: the parent's choice
    (FASTLB_LOG_FORMAT), else text."""
    fmt = fmt or os.environ.get(ENV) or "text"
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    os.environ[ENV] = fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter(worker) if fmt == "json" else TextFormatter(worker))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
