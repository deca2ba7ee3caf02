"""``fastlb ctl``: the admin client on the command line.

Owner: verbs, their arguments, and how results are shown (tables, or --json for scripts).
Exit codes: 0 ok; 1 the server answered with an error (its message on stderr); 2 usage or
connection problems.
"""
from __future__ import annotations

import argparse
import errno
import json
import sys
import tomllib
from typing import Any

from fastlb import _core
from fastlb.admin.client import AdminClient, AdminError
from fastlb.config import parse_address

DEFAULT_SOCKET = "/run/fastlb/admin.sock"


EXAMPLES = f"""\
examples:
  fastlb ctl backends web                      ADDRESS WEIGHT STATE HEALTH of service web
  fastlb ctl add web 10.0.0.3:80 --weight 2    add a backend
  fastlb ctl drain web 10.0.0.1:80 --timeout 60
  fastlb ctl stats --json                      options may come before or after the verb
  fastlb ctl --socket /tmp/fastlb.sock watch
  fastlb ctl --tcp 127.0.0.1:9000 --token-file /etc/fastlb/token ping

The socket is the one [global] admin names in fastlb's config (default {DEFAULT_SOCKET}).
exit codes: 0 ok; 1 the server refused the request (its message on stderr);
            2 usage error, or the admin socket cannot be reached
"""

# (verb, help, [(argument, add_argument keywords)])
VERBS: list[tuple[str, str, list[tuple[str, dict[str, Any]]]]] = [
    ("ping", "check that fastlb answers", []),
    ("version", "fastlb's version and admin protocol version", []),
    ("services", "list services: name, listen addresses, policy, backends", []),
    ("backends", "backends of a service: address, weight, state, health",
     [("service", {})]),
    ("add", "add a backend to a service",
     [("service", {}), ("address", {"help": "host:port"}),
      ("--weight", {"type": int, "help": "1-1000000 (default 1)"}),
      ("--state", {"choices": ["ready", "drain", "maint"], "help": "default ready"})]),
    ("remove", "remove a backend (it drains: open connections go on)",
     [("service", {}), ("address", {})]),
    ("weight", "set a backend's weight",
     [("service", {}), ("address", {}), ("weight", {"type": int})]),
    ("max-conns", "set a backend's connection cap over all workers (0: none); open "
                  "connections above a lowered cap go on",
     [("service", {}), ("address", {}), ("max_conns", {"type": int})]),
    ("drain", "no new connections to a backend; open ones go on",
     [("service", {}), ("address", {}),
      ("--timeout", {"type": float, "help": "close what is still open after this many seconds"})]),
    ("maint", "take a backend out: no new connections",
     [("service", {}), ("address", {}),
      ("--close", {"action": "store_true", "help": "also close its open connections now"})]),
    ("ready", "put a backend back in rotation", [("service", {}), ("address", {})]),
    ("add-service", "add a service from a TOML file holding one [[service]] table",
     [("file", {})]),
    ("remove-service", "remove a service (open connections go on)", [("service", {})]),
    ("stats", "per backend: state, health, active, totals, bytes, failures", []),
    ("watch", "print registry and health events until interrupted", []),
    ("reload", "re-read the config file and apply what changed (as SIGHUP)", []),
    ("workers", "worker processes: pid, snapshot generation, connections", []),
    ("restart-workers", "replace every worker, one at a time, dropping nothing", []),
    ("log-level", "show the process log level, or set it (supervisor and workers, until restart)",
     [("level", {"nargs": "?", "choices": ["debug", "info", "warning", "error"]})]),   # [obs]
    # [leases] self-registration by hand (the long-running helper is `fastlb register`)
    ("register", "register a backend with a lease; prints the lease id (renew it within the TTL)",
     [("service", {}), ("address", {"help": "host:port"}),
      ("--ttl", {"required": True, "help": "the lease's time to live, e.g. 10s"}),
      ("--weight", {"type": int, "help": "1-1000000 (default 1)"}),
      ("--meta", {"action": "append", "metavar": "KEY=VALUE", "help": "metadata (repeatable)"})]),
    ("renew", "renew a lease for another TTL", [("lease", {})]),
    ("deregister", "give a lease back: its backend is removed (open connections go on)",
     [("lease", {})]),
]


def connection_options() -> argparse.ArgumentParser:
    """--socket/--tcp/--token-file/--json, accepted before the verb and after it. SUPPRESS as
    the default, so a value given in one place is not overwritten by the other's default."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection and output")
    g.add_argument("--socket", default=argparse.SUPPRESS,
                   help=f"Unix admin socket ([global] admin = \"unix:...\"; "
                        f"default {DEFAULT_SOCKET})")
    g.add_argument("--tcp", metavar="HOST:PORT", default=argparse.SUPPRESS,
                   help="TCP admin socket (needs --token-file)")
    g.add_argument("--token-file", default=argparse.SUPPRESS,
                   help="file holding the admin token (TCP)")
    g.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="print the raw result as JSON, for scripts")
    return p


_connection_options = connection_options     # the name fastlb.top uses


def add_parser(sub: Any) -> None:
    common = connection_options()
    p = sub.add_parser("ctl", help="talk to a running fastlb through its admin socket",
                       description="Change and inspect a running fastlb through its admin socket.",
                       parents=[common], epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="ctl_verb", required=True, metavar="VERB")
    for name, help_, arguments in VERBS:
        v = verbs.add_parser(name, help=help_, description=help_, parents=[common])
        for arg, kw in arguments:
            v.add_argument(arg, **kw)


def _request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    v = args.ctl_verb
    if v in ("ping", "version", "services", "stats", "reload", "workers"):
        return v, {}
    if v == "restart-workers":
        return "restart_workers", {}
    if v == "log-level":                                                      # [obs]
        return "log_level", {"level": args.level} if args.level else {}
    if v == "backends":
        return "backends", {"service": args.service}
    if v in ("renew", "deregister"):                                          # [leases]
        return v, {"lease": args.lease}
    if v == "register":                                                       # [leases]
        from fastlb.register import parse_ttl
        try:
            reg: dict[str, Any] = {"service": args.service, "address": args.address,
                                   "ttl": parse_ttl(args.ttl)}
        except ValueError as exc:
            raise SystemExit(f"fastlb ctl: --ttl {exc}") from None
        if args.weight is not None:
            reg["weight"] = args.weight
        if args.meta:
            pairs = [m.partition("=") for m in args.meta]
            if any(not sep for _, sep, _ in pairs):
                raise SystemExit("fastlb ctl: --meta expects KEY=VALUE")
            reg["metadata"] = {k: val for k, _, val in pairs}
        return "register", reg
    if v == "remove-service":
        return "remove_service", {"service": args.service}
    if v == "add-service":
        try:
            with open(args.file, "rb") as f:
                doc = tomllib.load(f)
        except OSError as exc:
            raise SystemExit(f"fastlb ctl: cannot read {args.file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SystemExit(f"fastlb ctl: {args.file}: TOML syntax error: {exc}") from None
        tables = doc.get("service", [])
        if len(tables) != 1:
            raise SystemExit(f"fastlb ctl: {args.file} must hold exactly one [[service]] table")
        return "add_service", {"service": tables[0]}
    fields: dict[str, Any] = {"service": args.service, "address": args.address}
    if v == "add":
        if args.weight is not None:
            fields["weight"] = args.weight
        if args.state is not None:
            fields["state"] = args.state
        return "add_backend", fields
    if v == "remove":
        return "remove_backend", fields
    if v == "weight":
        return "set_weight", {**fields, "weight": args.weight}
    if v == "max-conns":                                                        # [limits]
        return "set_max_conns", {**fields, "max_conns": args.max_conns}
    if v == "drain":
        return "set_state", {**fields, "state": "drain",
                             **({"timeout": args.timeout} if args.timeout is not None else {})}
    if v == "maint":
        return "set_state", {**fields, "state": "maint", **({"close": True} if args.close else {})}
    if v == "ready":
        return "set_state", {**fields, "state": "ready"}
    raise SystemExit(f"fastlb ctl: unknown verb {v}")


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    for r in rows:
        lines.append("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths, strict=True)))
    return "\n".join(lines)


def _with_members(backends: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """[dns] A backend given by host name or SRV record, then its members (indented; their
    state is the entry's), each with its own health and counters."""
    out = []
    for b in backends:
        out.append(b if "members" not in b else {**b, "health": f"{b['health']} (DNS {b['dns']})"})
        out += [{**m, "address": f"  {m['address']}", "state": "member"} for m in b.get("members", ())]
    return out


def _limits_table(result: list[dict[str, Any]]) -> str:
    """[limits] Per service, then the whole balancer (\"*\"): connections now, the highest,
    the limit (0: none), queued, and every refusal count (docs/metrics.md)."""
    if not result or "limits" not in result[0]:
        return ""
    rows = [{"service": s["service"], **s["limits"]} for s in result]
    rows.append({"service": "*", **result[0]["global"]})
    fields = [f for f in _core.GAUGE_FIELDS if f not in ("cur", "max", "queued", "total")]
    return _table(rows, ["service", "cur", "max", "limit", "queued", "queue_size", "total", *fields])


def _show(verb: str, result: Any) -> str:
    if verb == "services":
        return _table([{**r, "listen": ",".join(r["listen"])} for r in result],
                      ["name", "listen", "policy", "backends"])
    if verb == "backends":
        return _table(_with_members(result), ["address", "weight", "state", "health"])
    if verb == "workers":
        return _table(result, ["index", "pid", "generation", "connections", "stopping"])
    if verb == "stats":
        rows = [{"service": s["service"], **b} for s in result for b in _with_members(s["backends"])]
        return (_table(rows, ["service", "address", "state", "health", "weight", "active", "total",
                              "bytes_in", "bytes_out", "connect_failures", "check_failures",
                              "max", "limit"])
                + "\n\n" + _limits_table(result))
    if verb == "register":                                                    # [leases]
        return str(result["lease"])
    if isinstance(result, dict):
        return " ".join(f"{k}={v}" for k, v in result.items())
    return str(result)


def target(args: argparse.Namespace) -> dict[str, Any]:
    """The admin socket the options name: {"socket": path} or {"tcp": (host, port), "token":
    token}. Raises SystemExit with the problem (also used by `fastlb register`)."""
    tcp, socket_path = getattr(args, "tcp", None), getattr(args, "socket", None)
    token_file = getattr(args, "token_file", None)
    if tcp and socket_path:
        raise SystemExit("fastlb ctl: give --socket or --tcp, not both")
    if not tcp:
        return {"socket": socket_path or DEFAULT_SOCKET}
    if not token_file:
        raise SystemExit("fastlb ctl: --tcp needs --token-file (the file named by "
                         "[global] admin_token_file in fastlb's config, or a service's "
                         "registration.token_file)")
    try:
        with open(token_file) as f:
            token = f.read().strip()
    except OSError as exc:
        raise SystemExit(f"fastlb ctl: cannot read the token file {token_file}: "
                         f"{exc.strerror}") from None
    try:
        addr = parse_address(tcp, resolve=False)
    except ValueError as exc:
        raise SystemExit(f"fastlb ctl: --tcp {tcp}: {exc}") from None
    return {"tcp": (addr.host, addr.port), "token": token}


def _connect(args: argparse.Namespace) -> AdminClient:
    """Raises SystemExit(2) with a message naming what was tried and what to check."""
    tcp, socket_path = getattr(args, "tcp", None), getattr(args, "socket", None)
    token_file = getattr(args, "token_file", None)
    if tcp and socket_path:
        raise SystemExit("fastlb ctl: give --socket or --tcp, not both")
    if tcp:
        if not token_file:
            raise SystemExit("fastlb ctl: --tcp needs --token-file (the file named by "
                             "[global] admin_token_file in fastlb's config)")
        try:
            with open(token_file) as f:
                token = f.read().strip()
        except OSError as exc:
            raise SystemExit(f"fastlb ctl: cannot read the token file {token_file}: "
                             f"{exc.strerror}") from None
        try:
            addr = parse_address(tcp, resolve=False)
        except ValueError as exc:
            raise SystemExit(f"fastlb ctl: --tcp {tcp}: {exc}") from None
        try:
            return AdminClient(tcp=(addr.host, addr.port), token=token)
        except OSError as exc:
            raise SystemExit(f"fastlb ctl: cannot reach the TCP admin socket {tcp}: "
                             f"{exc.strerror or exc}; is fastlb running with [global] admin = "
                             f"\"tcp:{tcp}\"?") from None
    path = socket_path or DEFAULT_SOCKET
    try:
        return AdminClient(socket_path=path)
    except OSError as exc:
        why = {errno.ENOENT: "no such socket", errno.ECONNREFUSED: "nothing answers there",
               errno.EACCES: "permission denied (the socket is mode 0600: run as its owner)"
               }.get(exc.errno or 0, exc.strerror or str(exc))
        raise SystemExit(f"fastlb ctl: cannot reach the admin socket {path}: {why}. It must "
                         f"be the path that [global] admin = \"unix:...\" names in fastlb's "
                         f"config (give it with --socket); is fastlb running?") from None


def main(args: argparse.Namespace) -> int:
    try:
        client = _connect(args)
    except SystemExit as exc:
        print(exc.code, file=sys.stderr)
        return 2
    as_json = getattr(args, "json", False)
    with client:
        try:
            if args.ctl_verb == "watch":
                for ev in client.events():
                    print(json.dumps(ev) if as_json else _show("event", ev), flush=True)
                return 0
            try:
                op, fields = _request(args)
            except SystemExit as exc:
                print(exc.code, file=sys.stderr)
                return 2
            result = client.call(op, **fields)
        except AdminError as exc:
            print(f"fastlb ctl: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
        except (OSError, ConnectionError) as exc:
            print(f"fastlb ctl: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 0
    print(json.dumps(result, indent=1) if as_json else _show(args.ctl_verb, result))
    return 0
