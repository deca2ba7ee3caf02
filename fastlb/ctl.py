"""``fastlb ctl``: the admin client on the command line.

Owner: verbs, their arguments, and how results are shown (tables, or --json for scripts).
Exit codes: 0 ok; 1 the server answered with an error (its message on stderr); 2 usage or
connection problems.
"""
from __future__ import annotations

import argparse
import json
import sys
import tomllib
from typing import Any

from fastlb.admin.client import AdminClient, AdminError

DEFAULT_SOCKET = "/run/fastlb/admin.sock"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("ctl", help="talk to a running fastlb through its admin socket")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", help=f"Unix admin socket (default {DEFAULT_SOCKET})")
    where.add_argument("--tcp", metavar="HOST:PORT", help="TCP admin socket (needs --token-file)")
    p.add_argument("--token-file", help="file holding the admin token (TCP)")
    p.add_argument("--json", action="store_true", help="print the raw result as JSON")
    verbs = p.add_subparsers(dest="ctl_verb", required=True)
    verbs.add_parser("ping")
    verbs.add_parser("version")
    verbs.add_parser("services")
    b = verbs.add_parser("backends", help="backends of a service")
    b.add_argument("service")
    a = verbs.add_parser("add", help="add a backend")
    a.add_argument("service")
    a.add_argument("address")
    a.add_argument("--weight", type=int)
    a.add_argument("--state", choices=["ready", "drain", "maint"])
    r = verbs.add_parser("remove", help="remove a backend (it drains: open connections go on)")
    r.add_argument("service")
    r.add_argument("address")
    w = verbs.add_parser("weight", help="set a backend's weight")
    w.add_argument("service")
    w.add_argument("address")
    w.add_argument("weight", type=int)
    d = verbs.add_parser("drain", help="no new connections; open ones go on")
    d.add_argument("service")
    d.add_argument("address")
    d.add_argument("--timeout", type=float, help="close what is still open after this many seconds")
    m = verbs.add_parser("maint", help="no new connections")
    m.add_argument("service")
    m.add_argument("address")
    m.add_argument("--close", action="store_true", help="also close open connections")
    rd = verbs.add_parser("ready", help="back in rotation")
    rd.add_argument("service")
    rd.add_argument("address")
    s = verbs.add_parser("add-service", help="add a service from a TOML file with one [[service]]")
    s.add_argument("file")
    rs = verbs.add_parser("remove-service")
    rs.add_argument("service")
    verbs.add_parser("stats")
    verbs.add_parser("watch", help="print registry and health events until interrupted")
    verbs.add_parser("reload", help="re-read the config file and apply what changed")
    verbs.add_parser("workers", help="worker processes: pid, snapshot generation, connections")
    verbs.add_parser("restart-workers", help="replace every worker, one at a time, dropping nothing")


def _request(args: argparse.Namespace) -> tuple[str, dict]:
    v = args.ctl_verb
    if v in ("ping", "version", "services", "stats", "reload", "workers"):
        return v, {}
    if v == "restart-workers":
        return "restart_workers", {}
    if v == "backends":
        return "backends", {"service": args.service}
    if v == "remove-service":
        return "remove_service", {"service": args.service}
    if v == "add-service":
        with open(args.file, "rb") as f:
            doc = tomllib.load(f)
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
    if v == "drain":
        return "set_state", {**fields, "state": "drain",
                             **({"timeout": args.timeout} if args.timeout else {})}
    if v == "maint":
        return "set_state", {**fields, "state": "maint", **({"close": True} if args.close else {})}
    if v == "ready":
        return "set_state", {**fields, "state": "ready"}
    raise SystemExit(f"fastlb ctl: unknown verb {v}")


def _table(rows: list[dict], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths))]
    for r in rows:
        lines.append("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))
    return "\n".join(lines)


def _show(verb: str, result: Any) -> str:
    if verb == "services":
        return _table([{**r, "listen": ",".join(r["listen"])} for r in result],
                      ["name", "listen", "policy", "backends"])
    if verb == "backends":
        return _table(result, ["address", "weight", "state", "health"])
    if verb == "workers":
        return _table(result, ["index", "pid", "generation", "connections", "stopping"])
    if verb == "stats":
        rows = [{"service": s["service"], **b} for s in result for b in s["backends"]]
        return _table(rows, ["service", "address", "state", "health", "weight", "active", "total",
                             "bytes_in", "bytes_out", "connect_failures", "check_failures"])
    if isinstance(result, dict):
        return " ".join(f"{k}={v}" for k, v in result.items())
    return str(result)


def main(args: argparse.Namespace) -> int:
    try:
        if args.tcp:
            if not args.token_file:
                print("fastlb ctl: --tcp needs --token-file", file=sys.stderr)
                return 2
            with open(args.token_file) as f:
                token = f.read().strip()
            host, _, port = args.tcp.rpartition(":")
            client = AdminClient(tcp=(host.strip("[]"), int(port)), token=token)
        else:
            client = AdminClient(socket_path=args.socket or DEFAULT_SOCKET)
    except (OSError, ValueError) as exc:
        print(f"fastlb ctl: cannot reach the admin socket: {exc}", file=sys.stderr)
        return 2
    with client:
        try:
            if args.ctl_verb == "watch":
                for ev in client.events():
                    print(json.dumps(ev) if args.json else _show("event", ev), flush=True)
                return 0
            op, fields = _request(args)
            result = client.call(op, **fields)
        except AdminError as exc:
            print(f"fastlb ctl: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
        except (OSError, ConnectionError) as exc:
            print(f"fastlb ctl: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 0
    print(json.dumps(result, indent=1) if args.json else _show(args.ctl_verb, result))
    return 0
