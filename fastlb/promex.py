"""Prometheus metrics named as HAProxy's built-in exporter (addons/promex) names them.

Owner: the metric names, their types, help and labels (the table docs/metrics.md explains) and
the ``prometheus_client`` collector that fills them from one ``observe.snapshot`` per scrape.
Nothing is stored here: every scrape reads the shared counters afresh (summed over workers).

Naming rule: HAProxy's ``haproxy_<object>_<alt_name>`` becomes ``fastlb_<object>_<alt_name>``
with the same labels (``proxy`` = the service, ``server`` = the backend address) and the same
``state`` label values, so HAProxy's dashboards and alerts carry over by a prefix rewrite.
Only what fastlb counts truthfully today is emitted; docs/metrics.md lists what comes later.
"""
from __future__ import annotations

import resource
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                   Metric)
from prometheus_client.registry import Collector

from fastlb import observe

# The exposition format prometheus_client writes (the classic text format); scrapers of every
# Prometheus version accept this content type.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Per server (HAProxy's server metrics): (name, kind, help, snapshot field)
SERVER = [
    ("current_sessions", "gauge", "Number of current sessions on the server.", "active"),
    ("sessions_total", "counter",
     "Total number of sessions (client connections relayed to the server).", "total"),
    ("bytes_in_total", "counter", "Total number of request bytes (client to server).", "bytes_in"),
    ("bytes_out_total", "counter", "Total number of response bytes (server to client).",
     "bytes_out"),
    ("connection_errors_total", "counter",
     "Total number of failed connections to the server (refused, timed out).", "connect_failures"),
    ("check_failures_total", "counter", "Total number of failed individual health checks.",
     "check_failures"),
    ("check_up_down_total", "counter",
     "Total number of UP to DOWN transitions (checks or passive detection).", "downs"),
    ("downtime_seconds_total", "counter", "Total time spent in DOWN state, in seconds.",
     "downtime"),
    ("weight", "gauge", "Server's configured weight.", "weight"),
]
# Per service pool (HAProxy's backend metrics): sums over its servers.
BACKEND_SUMS = SERVER[:5]


def _family(name: str, kind: str, help_: str, labels: list[str]) -> GaugeMetricFamily | CounterMetricFamily:
    if kind == "counter":
        return CounterMetricFamily(name.removesuffix("_total"), help_, labels=labels)
    return GaugeMetricFamily(name, help_, labels=labels)


class FastLBCollector(Collector):
    """A custom collector: each scrape builds one snapshot and yields the families from it."""

    def __init__(self, sources: observe.Sources) -> None:
        self.sources = sources

    def describe(self) -> list[Metric]:
        return []          # no snapshot at registration time; names are documented instead

    def collect(self) -> Iterator[Metric]:
        snap = observe.snapshot(self.sources)
        yield from self._process(snap)
        yield from self._backends(snap["services"])
        yield from self._servers(snap["services"], snap["now"])
        yield from self._histograms()                                     # [obs]

    def _process(self, snap: dict[str, Any]) -> Iterator[Metric]:
        info = GaugeMetricFamily("fastlb_process_build_info", "Build info.", labels=["version"])
        info.add_metric([snap["version"]], 1)
        yield info
        for name, help_, value in [
            ("start_time_seconds", "Start time in seconds (Unix time).", snap["started"]),
            ("uptime_seconds", "How long ago this process started, in seconds.",
             snap["now"] - snap["started"]),
            ("max_fds", "Hard limit on the number of per-process file descriptors.",
             resource.getrlimit(resource.RLIMIT_NOFILE)[1]),
            ("current_connections",
             "Current number of client connections relayed to a backend, over every worker.",
             sum(b["active"] for s in snap["services"] for b in s["backends"])),
        ]:
            yield GaugeMetricFamily(f"fastlb_process_{name}", help_, value=value)

    def _backends(self, services: list[dict[str, Any]]) -> Iterator[Metric]:
        for suffix, kind, help_, field in BACKEND_SUMS:
            fam = _family(f"fastlb_backend_{suffix}", kind, help_.replace("the server", "the "
                          "backend's servers"), ["proxy"])
            for s in services:
                fam.add_metric([s["name"]], sum(b[field] for b in s["backends"]))
            yield fam
        status = GaugeMetricFamily("fastlb_backend_status", "Current status of the service, per "
                                   "state label value (UP: a server can take connections).",
                                   labels=["proxy", "state"])
        active = GaugeMetricFamily("fastlb_backend_active_servers", "Current number of UP "
                                   "servers that take new connections.", labels=["proxy"])
        weight = GaugeMetricFamily("fastlb_backend_weight", "Sum of the weights of the UP "
                                   "servers.", labels=["proxy"])
        for s in services:
            for state in observe.POOL_STATES:
                status.add_metric([s["name"], state], 1 if s["status"] == state else 0)
            active.add_metric([s["name"]], s["active_servers"])
            weight.add_metric([s["name"]], s["weight"])
        yield from (status, active, weight)

    def _servers(self, services: list[dict[str, Any]], now: float) -> Iterator[Metric]:
        labels = ["proxy", "server"]
        for suffix, kind, help_, field in SERVER:
            fam = _family(f"fastlb_server_{suffix}", kind, help_, labels)
            for s in services:
                for b in s["backends"]:
                    fam.add_metric([s["name"], b["address"]], b[field])
            yield fam
        status = GaugeMetricFamily("fastlb_server_status", "Current status of the server, per "
                                   "state label value.", labels=labels + ["state"])
        last = GaugeMetricFamily("fastlb_server_check_last_change_seconds", "How long ago the "
                                 "last server state changed, in seconds (since the start when "
                                 "it never changed).", labels=labels)
        for s in services:
            for b in s["backends"]:
                for state in observe.SERVER_STATES:
                    status.add_metric([s["name"], b["address"], state],
                                      1 if b["status"] == state else 0)
                since = b["last_change"] or self.sources.started
                last.add_metric([s["name"], b["address"]], max(0.0, now - since))
        yield from (status, last)


    # -- [obs] the data path's histograms and the connection log (core/connlog.pxi) -------------
    def _histograms(self) -> Iterator[Metric]:
        if self.sources.histograms is None:
            return
        h = self.sources.histograms()
        les = [f"{e:g}" for e in h["edges"]] + ["+Inf"]
        for kind, name, help_ in HISTOGRAMS:
            fam = HistogramMetricFamily(name, help_, labels=["proxy"])
            for service, kinds in sorted(h["services"].items()):
                cum, total = kinds[kind]
                fam.add_metric([service], list(zip(les, cum, strict=True)), total)
            yield fam
        yield CounterMetricFamily("fastlb_process_connlog_dropped", "Connection log records dropped "
                                  "because a worker's ring was full (the data path never waits).",
                                  value=h["dropped"])


# [obs] (kind in fastlb.connlog.histograms, name, help): per service, over every worker.
HISTOGRAMS = [
    ("connect", "fastlb_backend_connect_time_seconds",
     "Time from the first connect attempt to the backend's accept (retries included), seconds."),
    ("duration", "fastlb_backend_session_duration_seconds",
     "Time from the client's accept to the session's close, seconds."),
]


def registry(sources: observe.Sources) -> CollectorRegistry:
    """A registry with fastlb's collector and the standard ``process_*`` of this process."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(FastLBCollector(sources))
    ProcessCollector(registry=reg)
    return reg


def render(reg: CollectorRegistry) -> bytes:
    """The exposition text of one scrape."""
    return generate_latest(reg)
