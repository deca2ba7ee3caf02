"""The read-only view of a running fastlb that the metrics port serves.

Owner: ``Sources`` (the narrow interface the supervisor hands to the metrics port) and
``snapshot`` (one JSON-ready picture joining the counters, the registry and the health state
machines). Prometheus (fastlb/promex.py), the JSON API and the status page (fastlb/httpapi.py)
all read this one picture, so they never disagree, and none of them imports the supervisor.

Rules: nothing here writes anything; a snapshot is built on the supervisor's loop from values
it already holds (counters are summed over the worker blocks by ``stats``), in well under a
millisecond per hundred backends; it is plain data (str, int, float, bool, None, list, dict).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastlb import __version__
from fastlb.config import Service
from fastlb.health import HealthState

# HAProxy's server states, in the order its exporter prints them (promex_srv_st, less NOLB).
SERVER_STATES = ("DOWN", "UP", "MAINT", "DRAIN")
POOL_STATES = ("DOWN", "UP")


@dataclass(frozen=True)
class Sources:
    """What the metrics port may read from the supervisor, and nothing more.

    stats:    today's ``Balancer.stats()`` (per service, per backend: counters, health, state).
    services: the registry's snapshot (name -> config.Service).
    health:   (service, address) -> its HealthState, or None without active checks.
    """
    stats: Callable[[], list[dict[str, Any]]]
    services: Callable[[], Mapping[str, Service]]
    health: Callable[[str, str], HealthState | None] = lambda service, address: None
    memory: Callable[[], Mapping[str, int]] = lambda: {}      # [mem] DataPath.memory
    # [obs] fastlb.connlog.histograms() of the running supervisor (None: not exported)
    histograms: Callable[[], dict[str, Any]] | None = None
    # [admin] the admin server's refusal counts by reason (AdminServer.counts; {}: no admin)
    admin: Callable[[], Mapping[str, int]] = lambda: {}
    started: float = field(default_factory=time.time)
    pid: int = field(default_factory=os.getpid)


def server_state(b: Mapping[str, Any]) -> str:
    """HAProxy's status of a server: MAINT (admin), else DOWN (health), else DRAIN or UP."""
    if b["state"] == "maint":
        return "MAINT"
    if b["health"] != "up":
        return "DOWN"
    return "DRAIN" if b["state"] == "drain" else "UP"


def snapshot(src: Sources) -> dict[str, Any]:
    """Every service and backend now, with what a dashboard needs beside the counters."""
    now = time.time()
    registry = src.services()
    services = []
    rows = src.stats()
    for svc in rows:
        cfg = registry.get(svc["service"])
        backends = []
        for b in svc["backends"]:
            hs = src.health(svc["service"], b["address"])
            backends.append({
                **b,
                "status": server_state(b),
                "checked": hs is not None,
                "downs": hs.downs if hs else 0,
                "downtime": round(hs.downtime_now(), 3) if hs else 0.0,
                "last_change": hs.changed_at or None if hs else None,
            })
        usable = [b for b in backends if b["status"] == "UP"]
        services.append({
            "name": svc["service"],
            "listen": [a.text for a in cfg.listen] if cfg else [],
            "policy": cfg.policy if cfg else None,
            "status": "UP" if usable else "DOWN",
            "active_servers": len(usable),
            "weight": sum(b["weight"] for b in usable),
            "backends": backends,
            "limits": svc.get("limits", {}),                                    # [limits]
        })
    glob: dict[str, Any] = next((s["global"] for s in rows if "global" in s), {})   # [limits]
    return {"version": __version__, "pid": src.pid, "started": src.started, "now": now,
            "services": services, "global": glob, "memory": dict(src.memory()),
            "etcd": next((s["etcd"] for s in rows if "etcd" in s), None),       # [etcd]
            "admin": dict(src.admin())}                                         # [admin]
