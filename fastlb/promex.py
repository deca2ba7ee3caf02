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
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                   Metric)
from prometheus_client.registry import Collector

from fastlb import _core, observe

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
    ("retry_warnings_total", "counter",
     "Total number of server connection retries (an attempt on another backend after this one "
     "failed).", "retries"),
    ("check_failures_total", "counter", "Total number of failed individual health checks.",
     "check_failures"),
    ("check_up_down_total", "counter",
     "Total number of UP to DOWN transitions (checks or passive detection).", "downs"),
    ("downtime_seconds_total", "counter", "Total time spent in DOWN state, in seconds.",
     "downtime"),
    ("weight", "gauge", "Server's configured weight.", "weight"),
]
# Per service pool (HAProxy's backend metrics): sums over its servers.
BACKEND_SUMS = SERVER[:6]

# [limits] Per server, from the shared gauges (HAProxy's names): (name, help, field).
SERVER_LIMITS = [
    ("max_sessions", "Maximum observed number of sessions (connecting or open) on the server.",
     "max"),
    ("limit_sessions", "Configured session limit of the server (max_conns; 0: none).", "limit"),
]
# [limits] Per service's listeners (HAProxy's frontend metrics): (name, kind, help, field).
FRONTEND = [
    ("current_sessions", "gauge", "Number of current sessions (admitted under maxconn).", "cur"),
    ("max_sessions", "gauge", "Maximum observed number of current sessions.", "max"),
    ("limit_sessions", "gauge", "Configured session limit (service.maxconn; 0: none).", "limit"),
    ("sessions_total", "counter", "Total number of sessions admitted.", "total"),
]
# HAProxy's denied_connections: refused by a connection rule (here the ACL and per-source
# limits). Every refusal reason is also in fastlb_*_refused_connections_total{reason}.
DENIED = ("denied_acl", "denied_src_conns", "denied_src_rate", "denied_src_table")
REFUSALS = [f for f in _core.GAUGE_FIELDS
            if f not in ("cur", "max", "queued", "total", "maxconn_reached")]


def reason_of(field: str) -> str:
    """The ``reason`` label of a refusal count: its gauge field without "denied_"."""
    return field.removeprefix("denied_")


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
        yield from self._limits(snap)
        yield from self._backends(snap["services"])
        yield from self._servers(snap["services"], snap["now"])
        yield from self._histograms()                                     # [obs]
        yield from self._etcd(snap.get("etcd"))                           # [etcd]
        yield from self._admin(snap.get("admin") or {})                   # [admin]

    def _admin(self, counts: dict[str, int]) -> Iterator[Metric]:
        """[admin] Connections the admin socket refused or closed, by reason (over_cap,
        backoff, unauthorized, timeout, idle: fastlb.admin.server); only with an admin."""
        if not counts:
            return
        fam = CounterMetricFamily("fastlb_admin_refused_connections", "Admin connections "
                                  "refused or closed by fastlb, per reason (over the "
                                  "connection cap, during a source's backoff, failed "
                                  "authentication, a frame or reply timeout, idle).",
                                  labels=["reason"])
        for reason, n in sorted(counts.items()):
            fam.add_metric([reason], n)
        yield fam

    def _etcd(self, info: dict[str, Any] | None) -> Iterator[Metric]:
        """[etcd] Whether etcd is reachable (0: the last known members serve) and the last
        revision seen; only with etcd-managed services."""
        if info is None:
            return
        up = GaugeMetricFamily("fastlb_discovery_etcd_up", "1 when the etcd watch is live, 0 "
                               "while etcd is unreachable (the last known members serve).")
        up.add_metric([], 1 if info["up"] else 0)
        rev = GaugeMetricFamily("fastlb_discovery_etcd_revision", "The last etcd revision "
                                "this balancer has applied.")
        rev.add_metric([], info["revision"])
        yield from (up, rev)

    def _limits(self, snap: dict[str, Any]) -> Iterator[Metric]:
        """[limits] Connection limits, queues and refusals: per service (HAProxy's frontend
        and backend names) and for the whole process ([global] maxconn)."""
        services = snap["services"]
        for suffix, kind, help_, field in FRONTEND:
            fam = _family(f"fastlb_frontend_{suffix}", kind, help_, ["proxy"])
            for s in services:
                fam.add_metric([s["name"]], s["limits"].get(field, 0))
            yield fam
        denied = CounterMetricFamily("fastlb_frontend_denied_connections", "Total number of "
                                     "connections refused by the ACL or per-source limits.",
                                     labels=["proxy"])
        refused = CounterMetricFamily("fastlb_frontend_refused_connections", "Total number of "
                                      "clients refused or closed before a backend took them, "
                                      "per reason.", labels=["proxy", "reason"])
        reached = CounterMetricFamily("fastlb_frontend_maxconn_reached", "Times a listener of "
                                      "the service stopped accepting at service.maxconn.",
                                      labels=["proxy"])
        queue = GaugeMetricFamily("fastlb_backend_current_queue", "Number of clients waiting "
                                  "in the service's queue for a server place.", labels=["proxy"])
        qsize = GaugeMetricFamily("fastlb_backend_queue_limit", "Configured queue size "
                                  "(service.queue.size; 0: no queue).", labels=["proxy"])
        for s in services:
            lim = s["limits"]
            denied.add_metric([s["name"]], sum(lim.get(f, 0) for f in DENIED))
            for f in REFUSALS:
                refused.add_metric([s["name"], reason_of(f)], lim.get(f, 0))
            reached.add_metric([s["name"]], lim.get("maxconn_reached", 0))
            queue.add_metric([s["name"]], lim.get("queued", 0))
            qsize.add_metric([s["name"]], lim.get("queue_size", 0))
        yield from (denied, refused, reached, queue, qsize)
        glob = snap.get("global") or {}
        for name, help_, value in [
            ("max_connections", "Maximum number of concurrent connections ([global] maxconn).",
             glob.get("limit", 0)),
            ("current_sessions", "Number of current sessions over every service and worker "
             "(connecting, queued or open).", glob.get("cur", 0)),
            ("max_sessions", "Maximum observed number of current sessions.", glob.get("max", 0)),
        ]:
            yield GaugeMetricFamily(f"fastlb_process_{name}", help_, value=value)
        reached_g = CounterMetricFamily("fastlb_process_maxconn_reached", "Times a listener "
                                        "stopped accepting at [global] maxconn.",
                                        value=glob.get("maxconn_reached", 0))
        refused_g = CounterMetricFamily("fastlb_process_refused_connections", "Total number of "
                                        "clients refused or closed before a backend took them, "
                                        "per reason, over every service.", labels=["reason"])
        for f in REFUSALS:
            refused_g.add_metric([reason_of(f)], glob.get(f, 0))
        yield from (reached_g, refused_g)

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
        mem = snap.get("memory") or {}                         # [mem] no HAProxy equivalent
        for name, help_, key in [
            ("buffers_in_use", "Connection buffers holding unsent bytes now, over every worker.",
             "buffers_in_use"),
            ("buffers_in_use_max", "The most connection buffers in use at once since the start "
             "(the sum of each worker's).", "buffers_peak"),
            ("buffer_budget_bytes", "The cap on connection buffers ([global] buffer_budget), "
             "over every worker.", "buffer_budget_bytes"),
        ]:
            if key in mem:
                yield GaugeMetricFamily(f"fastlb_{name}", help_, value=mem[key])
        for name, help_, key in [                              # [tls] core/tls.pxi
            ("tls_handshakes_total", "TLS handshakes completed with clients, over every worker.",
             "tls_handshakes"),
            ("tls_resumptions_total", "Of those, resumed sessions (tickets or the cache).",
             "tls_resumed"),
            ("tls_handshake_failures_total", "TLS handshakes that failed (a bad ClientHello, no "
             "shared version or cipher, the client leaving).", "tls_handshake_failures"),
            ("tls_handshake_timeouts_total", "TLS handshakes not done within timeouts.handshake.",
             "tls_handshake_timeouts"),
            ("tls_client_cert_missing_total", "Handshakes refused: no client certificate "
             "(verify_client = required).", "tls_client_no_cert"),
            ("tls_client_cert_expired_total", "Handshakes refused: an expired (or not yet "
             "valid) client certificate.", "tls_client_expired"),
            ("tls_client_cert_untrusted_total", "Handshakes refused: a client certificate "
             "not signed by client_ca.", "tls_client_untrusted"),
            ("tls_authz_denied_total", "Clients with a valid certificate but no allowed "
             "identity (service.authz), closed after the handshake.", "tls_authz_denied"),
            ("tls_backend_handshakes_total", "TLS handshakes completed with backends "  # [orig]
             "(backends[].tls).", "tls_backend_handshakes"),
            ("tls_backend_resumptions_total", "Of those, resumed sessions (cached per backend).",
             "tls_backend_resumed"),
            ("tls_backend_handshake_failures_total", "TLS handshakes with backends that failed "
             "(refused verification, protocol errors), each a failed connect.",
             "tls_backend_failures"),
            # [lean] core/lean.pxi
            ("process_accept_wakeups_total", "Wake-ups of a worker for a listening socket, over every "
             "worker (one per connection: one worker woken for it).", "accept_wakeups"),
            ("process_connections_total", "Client connections accepted, over every worker.",
             "accepted"),
            ("process_speculative_io_total", "Reads right after accept and sends right after "
             "connect that found their socket ready (each saves an epoll round).",
             "speculative_hits"),
            ("process_speculative_io_misses_total", "Of those guesses, the ones that found the "
             "socket not ready (one syscall spent; a score per listener and backend backs off).",
             "speculative_misses"),
        ]:
            if key in mem:
                yield CounterMetricFamily(f"fastlb_{name}", help_, value=mem[key])
        yield from tls_by_label(mem)                           # [tlsops]
        yield from sni_metrics(mem)                                             # [sni]
        yield from _splice_metrics(mem)                         # [splice]

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
        for suffix, help_, field in SERVER_LIMITS:                              # [limits]
            fam = GaugeMetricFamily(f"fastlb_server_{suffix}", help_, labels=labels)
            for s in services:
                for b in s["backends"]:
                    fam.add_metric([s["name"], b["address"]], b.get(field, 0))
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


# [tlsops] every TLS client refused, once, under one reason (the label), and the versions of the
# handshakes done; the [tls] memory keys they come from (DataPlane.memory, summed over workers)
TLS_FAILURE_REASONS = (("timeout", "tls_handshake_timeouts"), ("no_client_cert", "tls_client_no_cert"),
                       ("expired", "tls_client_expired"), ("untrusted", "tls_client_untrusted"),
                       ("identity_refused", "tls_authz_denied"),
                       ("protocol", "tls_protocol_errors"), ("other", "tls_other_failures"))
TLS_VERSIONS = (("TLSv1.2", "tls_v1_2"), ("TLSv1.3", "tls_v1_3"))


def tls_by_label(mem: Mapping[str, int]) -> Iterator[Metric]:
    """[tlsops] fastlb_tls_failures_total{reason} and fastlb_tls_handshakes_by_version_total
    {version}, over every worker and service (none without the counts)."""
    if "tls_v1_3" not in mem:
        return
    fail = CounterMetricFamily("fastlb_tls_failures", "TLS clients refused, per reason: timeout "
                               "(timeouts.handshake), no_client_cert, expired, untrusted (client "
                               "certificates), identity_refused (service.authz), protocol (not "
                               "TLS, a bad or oversized message, no shared version), other (the "
                               "client left or sent an alert).", labels=["reason"])
    for reason, key in TLS_FAILURE_REASONS:
        fail.add_metric([reason], mem.get(key, 0))
    ver = CounterMetricFamily("fastlb_tls_handshakes_by_version", "TLS handshakes completed, "
                              "per negotiated protocol version.", labels=["version"])
    for version, key in TLS_VERSIONS:
        ver.add_metric([version], mem.get(key, 0))
    yield from (fail, ver)
    yield from tls_by_service(mem)


def tls_by_service(mem: Mapping[str, int]) -> Iterator[Metric]:
    """[tlsops] The same per service ("tls.SERVICE.NAME" memory keys): fastlb_frontend_tls_*
    {proxy}, as HAProxy's frontend families."""
    per: dict[str, dict[str, int]] = {}
    for k, v in mem.items():
        if k.startswith("tls."):
            svc, _, name = k[4:].rpartition(".")
            per.setdefault(svc, {})[name] = v
    if not per:
        return
    hs = CounterMetricFamily("fastlb_frontend_tls_handshakes", "TLS handshakes completed with "
                             "the service's clients.", labels=["proxy"])
    res = CounterMetricFamily("fastlb_frontend_tls_resumptions", "Of those, resumed sessions.",
                              labels=["proxy"])
    fail = CounterMetricFamily("fastlb_frontend_tls_failures", "The service's TLS clients "
                               "refused, per reason (as fastlb_tls_failures_total).",
                               labels=["proxy", "reason"])
    ver = CounterMetricFamily("fastlb_frontend_tls_handshakes_by_version", "The service's TLS "
                              "handshakes per negotiated version.", labels=["proxy", "version"])
    for svc, c in sorted(per.items()):
        hs.add_metric([svc], c.get("handshakes", 0))
        res.add_metric([svc], c.get("resumed", 0))
        for reason in ("timeout", "no_client_cert", "expired", "untrusted", "identity_refused",
                       "protocol", "other"):
            fail.add_metric([svc, reason], c.get(reason, 0))
        for version, key in (("TLSv1.2", "v1_2"), ("TLSv1.3", "v1_3")):
            ver.add_metric([svc, version], c.get(key, 0))
    yield from (hs, res, fail, ver)
SNI_OUTCOMES = (("routed", "sni_routed"), ("default", "sni_defaulted"), ("no_route", "sni_no_route"),
                ("bad_hello", "sni_bad_hello"), ("oversize", "sni_oversize"),
                ("timeout", "sni_timeouts"))


def sni_metrics(mem: Mapping[str, int]) -> Iterator[Metric]:
    """[sni] Connections on addresses shared by SNI routing, by outcome (core/sni.pxi)."""
    if "sni_routed" not in mem:
        return
    fam = CounterMetricFamily("fastlb_sni_connections", "Connections on a listen address shared "
                              "by SNI routing, by outcome: routed by name, sent to the default "
                              "service, or closed (no route, not a ClientHello, over 16 KiB, "
                              "past timeouts.handshake).", labels=["outcome"])
    for outcome, key in SNI_OUTCOMES:
        fam.add_metric([outcome], mem.get(key, 0))
    yield fam
def _splice_metrics(mem: dict[str, Any]) -> Iterator[Metric]:
    """[splice] core/splice.pxi: bytes moved through pipes and the pipes held now (HAProxy's
    show info has PipesUsed / PipesFree; it counts no spliced bytes)."""
    if "pipes_in_use" in mem:
        yield GaugeMetricFamily("fastlb_process_pipes_used", "Pipes holding spliced bytes now, over "
                                "every worker (show info PipesUsed).", value=mem["pipes_in_use"])
        yield GaugeMetricFamily("fastlb_process_pipes_free", "Empty pipes kept for reuse, over every "
                                "worker (show info PipesFree).", value=mem.get("pipes_pooled", 0))
    if "spliced_bytes" in mem:
        yield CounterMetricFamily("fastlb_process_spliced_bytes_total", "Bytes moved with splice(2) "
                                  "through pipes (zero-copy), both directions, over every "
                                  "worker.", value=mem["spliced_bytes"])
        yield CounterMetricFamily("fastlb_process_pipes_refused_total", "Times a transfer that would "
                                  "have been spliced used its buffer: the per-worker pipe cap "
                                  "reached, or pipe() failed.",
                                  value=mem.get("pipes_capped", 0) + mem.get("pipe_failures", 0))
