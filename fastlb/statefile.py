"""The state file: acknowledged registry changes, durable across crashes.

Owner: the on-disk format and its atomic replacement. Layout (msgpack map):
    {"format": "fastlb-state", "version": 1,
     "registry": [service table, ...],   # the registry as last acknowledged
     "config":   [service table, ...]}   # the config that registry was reconciled with
Service tables have the keys of a ``[[service]]`` table (config.service_to_dict).

Writes: a temp file in the same directory, fsync, rename over the old file, fsync the directory;
so the path holds the old state or the new one, never a torn one. A torn temp file (a crash in
the middle of a write) is never read and is removed at the next write.
"""
from __future__ import annotations

import os
from typing import Mapping

import msgpack

from fastlb import config
from fastlb.config import Service
from fastlb.errors import ConfigError, StateFileError

__all__ = ["StateFileError", "load", "save"]

FORMAT = "fastlb-state"
VERSION = 1




def save(path: str, registry: Mapping[str, Service], cfg: Mapping[str, Service]) -> None:
    data = msgpack.packb({
        "format": FORMAT, "version": VERSION,
        "registry": [config.service_to_dict(s) for s in registry.values()],
        "config": [config.service_to_dict(s) for s in cfg.values()],
    }, use_bin_type=True)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load(path: str) -> tuple[dict[str, Service], dict[str, Service]] | None:
    """(registry, config) from the file, or None when there is no file. Raises StateFileError."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(path, f"cannot read it: {exc.strerror}") from None
    try:
        doc = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise StateFileError(path, f"not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StateFileError(path, "not a fastlb state file (no \"format\": \"fastlb-state\")")
    if doc.get("version") != VERSION:
        raise StateFileError(path, f"unknown version {doc.get('version')!r} "
                                   f"(this fastlb reads version {VERSION})")
    out = []
    for part in ("registry", "config"):
        tables = doc.get(part)
        if not isinstance(tables, list):
            raise StateFileError(path, f"\"{part}\" is not a list")
        services: dict[str, Service] = {}
        for i, table in enumerate(tables):
            try:
                svc = config.service_from_dict(table, f"{part}[{i}]")
            except ConfigError as exc:
                raise StateFileError(path, str(exc)) from None
            services[svc.name] = svc
        out.append(services)
    return out[0], out[1]
