"""Admin commands: one small function per op, in one table.

Owner: what each admin op does and the shape of its result. Reads are pure functions of a
registry snapshot and a ``StatsView`` (slots, health bits, counters, check states), so
``stats`` (and /metrics, which renders it) is testable without a running balancer. Changes go
through the supervisor (``Context.mutate / reload``), which runs the two-phase pipeline.
``dispatch`` is the admin server's handler (fastlb.admin.server.AdminServer); it writes the
audit trail: one line per change (mutations, reload, restart_workers) on the ``fastlb.audit``
logger, saying who (the connection: "unix uid=N pid=M" or "tcp HOST:PORT"), what (the op and
its arguments, summarized; the token is never part of them) and the result (ok or the error
code). Reads are logged at debug. The supervisor writes the same line for a SIGHUP reload.
"""
from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Mapping, Protocol

from fastlb import __version__, _core
from fastlb.admin import protocol
from fastlb.admin.protocol import AdminProtocolError, Request
from fastlb.config import Backend, Service
from fastlb.errors import RegistryError
from fastlb.leases import LEASE_OPS
from fastlb.plan import DataPath

COUNTER_FIELDS = _core.COUNTER_FIELDS
log = logging.getLogger("fastlb.admin")
audit_log = logging.getLogger("fastlb.audit")
# The trail is kept whatever [global] log_level says: a change is never below the threshold.
audit_log.setLevel(logging.INFO)


class StatsView(Protocol):
    """What the reads need of the running balancer, read-only."""

    def slot(self, service: str, address: str) -> int | None: ...
    def is_up(self, slot: int) -> bool: ...
    def counters(self, slot: int) -> dict[str, int]: ...
    def check(self, service: str, address: str) -> tuple[int, str] | None: ...   # failures, reason
    # [limits] a Gauges row: a backend's, a service's (address ""), the balancer's (service None)
    def gauges(self, service: str | None, address: str = "") -> dict[str, int]: ...
    maxconn: int                                  # [limits] [global] maxconn as resolved


class Context(Protocol):
    """The supervisor, as the handlers see it."""

    @property
    def snapshot(self) -> Mapping[str, Service]: ...
    @property
    def view(self) -> StatsView: ...
    @property
    def datapath(self) -> DataPath: ...
    async def mutate(self, op: str, args: dict[str, Any]) -> dict[str, Any]: ...
    async def reload(self) -> dict[str, Any]: ...
    def rotate_tickets(self, service: str | None) -> dict[str, Any]: ...   # [tlsops]


# -- reads: pure functions of (snapshot, view) ---------------------------------------------------
def service_of(snapshot: Mapping[str, Service], name: str) -> Service:
    try:
        return snapshot[name]
    except KeyError:
        raise RegistryError("unknown_service", f"no service {name!r}; services: "
                            f"{', '.join(sorted(snapshot)) or '(none)'}") from None


def services(snapshot: Mapping[str, Service]) -> list[dict[str, Any]]:
    return [{"name": s.name, "listen": [a.text for a in s.listen], "policy": s.policy,
             "backends": len(s.backends)} for s in snapshot.values()]


def backend_info(view: StatsView, svc: Service, b: Backend, stats: bool = False) -> dict[str, Any]:
    followed = getattr(view, "dns_entry", None)   # [dns] a host name / SRV entry: members under it
    if followed is not None and (entry := followed(svc.name, b, stats)) is not None:
        return dict(entry)
    slot = view.slot(svc.name, b.address.text)
    info: dict[str, Any] = {"address": b.address.text, "weight": b.weight, "state": b.state,
                            "health": "up" if slot is not None and view.is_up(slot) else "down"}
    lease_of = getattr(view, "lease_info", None)          # [leases] a registered backend's lease
    if lease_of is not None and (lease := lease_of(svc.name, b.address.text)) is not None:
        info.update(lease)
    if stats:
        info.update(view.counters(slot) if slot is not None else dict.fromkeys(COUNTER_FIELDS, 0))
        g = view.gauges(svc.name, b.address.text)                               # [limits]
        info.update(cur=g["cur"], max=g["max"], limit=b.max_conns)
        check = view.check(svc.name, b.address.text)
        info["check_failures"] = check[0] if check else 0
        info["health_reason"] = check[1] if check else "no checks"
    return info


def backends(snapshot: Mapping[str, Service], view: StatsView, name: str) -> list[dict[str, Any]]:
    svc = service_of(snapshot, name)
    return [backend_info(view, svc, b) for b in svc.backends]


def stats(snapshot: Mapping[str, Service], view: StatsView) -> list[dict[str, Any]]:
    """Per service, per backend: counters summed over workers, health, weight, state."""
    glob = limits_of(view.gauges(None), view.maxconn)
    return [{"service": s.name, "backends": [backend_info(view, s, b, stats=True) for b in s.backends],
             "limits": limits_of(view.gauges(s.name), s.maxconn, s.queue_size),     # [limits]
             "global": glob, **etcd_of(view, s)}                                  # [etcd]
            for s in snapshot.values()]


def etcd_of(view: StatsView, s: Service) -> dict[str, Any]:
    """[etcd] An etcd-managed service's stats say whether etcd is reachable, and the last
    revision seen (while it is not, the last known members serve)."""
    info = getattr(view, "etcd_info", None)
    return {"etcd": info()} if info is not None and s.discovery == "etcd" else {}


def limits_of(gauges: dict[str, int], limit: int, queue_size: int = 0) -> dict[str, int]:
    """[limits] A Gauges row with its limits: current, max, limit, queued, queue size,
    admitted total and every refusal count (the fields of _core.GAUGE_FIELDS)."""
    return {**gauges, "limit": limit, "queue_size": queue_size}


# -- the table -----------------------------------------------------------------------------------
Handler = Callable[[Context, dict[str, Any]], Awaitable[Any]]


async def _ping(ctx: Context, args: dict[str, Any]) -> Any:
    return "pong"


async def _version(ctx: Context, args: dict[str, Any]) -> Any:
    return {"version": __version__, "protocol": protocol.PROTOCOL_VERSION}


async def _services(ctx: Context, args: dict[str, Any]) -> Any:
    return services(ctx.snapshot)


async def _backends(ctx: Context, args: dict[str, Any]) -> Any:
    return backends(ctx.snapshot, ctx.view, args["service"])


async def _stats(ctx: Context, args: dict[str, Any]) -> Any:
    rows = stats(ctx.snapshot, ctx.view)
    if rows:                                     # [tlsops] the TLS counts, balancer-wide
        tls = tls_of(ctx.datapath.memory(), getattr(ctx, "tickets", None))
        if tls:
            rows[0]["global"] = {**rows[0]["global"], "tls": tls}
    return rows


def tls_of(memory: Mapping[str, int], keys: Any) -> dict[str, Any]:
    """[tlsops] The data paths' TLS counts (DataPlane.memory, summed over workers), with the
    failures by reason, and the ticket key rings (fastlb.tickets); {} without TLS."""
    out: dict[str, Any] = {k[4:]: v for k, v in memory.items() if k.startswith("tls_")}
    per: dict[str, dict[str, int]] = {}
    for k, v in memory.items():                      # "tls.SERVICE.NAME" (DataPlane.tls_by_service)
        if k.startswith("tls."):
            svc, _, name = k[4:].rpartition(".")
            per.setdefault(svc, {})[name] = v
    if per:
        out["services"] = per
    if keys is not None and keys.rings:
        out["tickets"] = keys.info()
    return out if (keys is not None and keys.rings) or any(out.values()) else {}


async def _rotate_tickets(ctx: Context, args: dict[str, Any]) -> Any:
    """[tlsops] Turn the TLS session ticket keys now (one service, or all)."""
    return ctx.rotate_tickets(args.get("service"))


async def _workers(ctx: Context, args: dict[str, Any]) -> Any:
    return ctx.datapath.info()


async def _restart_workers(ctx: Context, args: dict[str, Any]) -> Any:
    return {"restarted": await ctx.datapath.restart()}


async def _reload(ctx: Context, args: dict[str, Any]) -> Any:
    return await ctx.reload()


async def _log_level(ctx: Context, args: dict[str, Any]) -> Any:
    """[obs] The process log's level: get it, or set it in the supervisor and every worker
    (and the workers started later). Not persisted: a restart takes [global] log_level."""
    import logging

    from fastlb import logs
    root = logging.getLogger()
    before = logging.getLevelName(root.level).lower()
    level = args.get("level")
    if level is None:
        return {"level": before}
    if level not in logs.LEVELS:
        raise AdminProtocolError("bad_request", f"log_level: level {level!r}: expected one of "
                                                f"{', '.join(logs.LEVELS)}")
    root.setLevel(level.upper())
    set_workers = getattr(ctx.datapath, "set_log_level", None)    # worker processes
    if set_workers is not None:
        set_workers(level)
    logging.getLogger("fastlb").warning("log level %s -> %s (admin)", before, level)
    return {"level": level, "previous": before}


HANDLERS: dict[str, Handler] = {
    "ping": _ping, "version": _version, "services": _services, "backends": _backends,
    "stats": _stats, "workers": _workers, "restart_workers": _restart_workers, "reload": _reload,
    "log_level": _log_level,                                                  # [obs]
    "rotate_tickets": _rotate_tickets,                                        # [tlsops]
}


# -- the audit trail ------------------------------------------------------------------------------
AUDIT_TEXT = 120           # a string argument longer than this is cut (a service map is summed up)


def _text(value: Any) -> str:
    """One argument, for a log line: short, on one line, never a control character (a name
    sent by a client cannot forge a line)."""
    if isinstance(value, dict):
        name = value.get("name")
        backends = value.get("backends")
        n = len(backends) if isinstance(backends, list) else "?"
        return f"{{name={_text(name)}, {n} backends}}"
    if isinstance(value, list):
        return f"[{len(value)} items]"
    text = value if isinstance(value, str) else repr(value)
    if len(text) > AUDIT_TEXT:
        text = text[:AUDIT_TEXT] + f"...({len(text)} chars)"
    if isinstance(value, str) and (not text or not all(c.isprintable() and c not in " \"'=" for c in text)):
        text = repr(text)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def summarize(op: str, args: Mapping[str, Any]) -> str:
    """``op key=value ...``: what a request asks, in one bounded line."""
    return " ".join([op] + [f"{k}={_text(v)}" for k, v in args.items()])


def audit(who: str, op: str, args: Mapping[str, Any], result: Any = None,
          error: BaseException | None = None) -> None:
    """Log one change: who, what, and ok (with the generation it made) or the error code."""
    if error is None:
        gen = result.get("generation") if isinstance(result, dict) else None
        outcome = "ok" + (f" generation={gen}" if gen is not None else "")
        audit_log.info("audit: %s: %s -> %s", who or "?", summarize(op, args), outcome)
    else:
        code = getattr(error, "code", None) or type(error).__name__
        message = getattr(error, "message", None) or str(error)
        audit_log.info("audit: %s: %s -> error %s: %s", who or "?", summarize(op, args), code,
                       "".join(c if c.isprintable() else repr(c)[1:-1] for c in message[:300]))


async def _run(ctx: Context, req: Request) -> Any:
    if req.scope is not None and req.op not in protocol.SCOPED_OPS:               # [leases]
        raise AdminProtocolError("forbidden", f"a registration token (of service "
                                 f"{req.scope!r}) allows only "
                                 f"{', '.join(sorted(protocol.SCOPED_OPS))}; {req.op} needs the "
                                 f"operator token", id=req.id)
    if req.op in LEASE_OPS:                                                    # [leases]
        lease = getattr(ctx, "lease", None)
        if lease is None:
            raise AdminProtocolError("unknown_op", f"op {req.op!r} is not served here", id=req.id)
        return await lease(req.op, req.args, req.scope)
    if req.op in protocol.MUTATIONS:
        write_through = getattr(ctx, "etcd_write", None)     # [etcd] an etcd-managed service
        if write_through is not None:
            await write_through(req.op, req.args)
        return await ctx.mutate(req.op, req.args)
    handler = HANDLERS.get(req.op)
    if handler is None:
        raise AdminProtocolError("unknown_op", f"op {req.op!r} is not served here", id=req.id)
    return await handler(ctx, req.args)


async def dispatch(ctx: Context, req: Request) -> Any:
    if req.op not in protocol.CHANGES and (req.scope is None or req.op in protocol.SCOPED_OPS):
        if log.isEnabledFor(logging.DEBUG):
            log.debug("admin: %s: %s", req.who or "?", summarize(req.op, req.args))
        return await _run(ctx, req)
    try:
        result = await _run(ctx, req)
    except Exception as exc:          # AdminProtocolError, RegistryError..., or a bug
        audit(req.who, req.op, req.args, error=exc)
        raise
    audit(req.who, req.op, req.args, result)
    return result
