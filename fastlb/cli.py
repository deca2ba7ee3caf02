"""Command line: ``fastlb run | check | demo | --version``.

Owner: argument parsing and exit codes only; each verb calls into its module.
Exit codes: 0 ok, 1 runtime failure, 2 bad config or usage.
"""
from __future__ import annotations

import argparse
import logging
import sys

from fastlb import __version__, signals
from fastlb.errors import ConfigError, FastLBError


EPILOG = """\
examples:
  fastlb demo                          three local backends, one service per policy, a failover
  fastlb check -c /etc/fastlb.toml     validate a config and what it needs from this machine
  fastlb run -c /etc/fastlb.toml       run until SIGTERM (graceful) or SIGINT; SIGHUP reloads
  fastlb ctl backends web              ask the running fastlb (see fastlb ctl --help)
  fastlb register web 10.0.0.5:80 --ttl 10s   keep this instance registered until SIGTERM
  fastlb top                           live view: rates, health, active, bytes, events (q quits)

exit codes: 0 ok; 1 a failure while running (or, for ctl, a request the server refused);
            2 a bad config, a problem `fastlb check` reports, or a usage error
"""


def main(argv: list[str] | None = None) -> int:
    signals.defer()              # SIGHUP/SIGTERM/SIGINT while starting: acted on once running
    p = argparse.ArgumentParser(prog="fastlb", description="A TCP (layer 4) load balancer.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"fastlb {__version__}")
    sub = p.add_subparsers(dest="verb", required=True)
    r = sub.add_parser("run", help="run the balancer")
    r.add_argument("-c", "--config", required=True, help="TOML config file")
    r.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"],
                   help="overrides [global] log_level (default info)")
    r.add_argument("--ignore-state", action="store_true",
                   help="start from the config alone, ignoring (and then overwriting) the state file")
    c = sub.add_parser("check", help="validate a config and what it needs from this machine",
                       description="Validate a config file, then check what `fastlb run` would "
                                   "need from this machine (files, directories, free addresses: "
                                   "each bound and released at once). Exit 2 on any problem.")
    c.add_argument("-c", "--config", required=True)
    c.add_argument("--no-bind", action="store_true",
                   help="do not try the listen, metrics and admin addresses (e.g. before "
                        "reloading the fastlb that holds them)")
    d = sub.add_parser("demo", help="local backends + the balancer + a little load")
    d.add_argument("--connections", type=int, default=300, help="connections per policy")
    d.add_argument("--print-config", action="store_true",
                   help="print the sample config shipped with fastlb (for /etc/fastlb/fastlb.toml) and exit")
    from fastlb import ctl, top
    ctl.add_parser(sub)
    top.add_parser(sub)
    # [leases] the long-running registration helper (fastlb/register.py)
    g = sub.add_parser("register", parents=[ctl.connection_options()],
                       help="keep a backend registered in a running fastlb (renews its lease)",
                       description="Register ADDRESS in SERVICE with a lease, renew it every "
                                   "TTL/3, register again if the lease is lost, deregister on "
                                   "SIGTERM/SIGINT. For a service's start script or sidecar.")
    g.add_argument("service")
    g.add_argument("address", help="host:port of this instance")
    g.add_argument("--ttl", required=True, help="the lease's time to live, e.g. 10s")
    g.add_argument("--weight", type=int, default=None, help="1-1000000 (default 1)")
    g.add_argument("--meta", action="append", metavar="KEY=VALUE", help="metadata (repeatable)")
    from fastlb.etcd import add_register_options
    add_register_options(g)                                                   # [etcd] --etcd
    args = p.parse_args(argv)
    if args.verb != "run":
        signals.restore()
    if args.verb == "top":
        return top.main(args)

    if args.verb == "ctl":
        return ctl.main(args)

    if args.verb == "register":                                               # [leases]
        if args.etcd:                                                         # [etcd]
            from fastlb import etcd
            return etcd.register_main(args)
        from fastlb import register
        return register.main(args)

    if args.verb == "demo":
        from fastlb import demo
        if args.print_config:
            return demo.print_config()
        return demo.main(connections=args.connections)

    from fastlb import config
    try:
        cfg = config.load(args.config)
    except ConfigError as exc:
        print(f"fastlb: {exc}", file=sys.stderr)
        return 2
    from fastlb import preflight
    if args.verb == "check":
        warnings: list[ConfigError] = []
        found = preflight.problems(cfg, mode="check", bind=not args.no_bind, warnings=warnings)
        for w in warnings:
            print(f"fastlb: warning: {w}", file=sys.stderr)
        if found:
            print(preflight.report(found), file=sys.stderr)
            return 2
        print(config.summary(cfg))
        return 0
    found = preflight.problems(cfg, mode="run", ignore_state=args.ignore_state)
    if found:
        print(preflight.report(found), file=sys.stderr)
        return 2
    level = args.log_level or cfg.global_.log_level
    from fastlb import logs, supervisor
    logs.setup(level, cfg.global_.log_format)
    try:
        return supervisor.run(cfg, config_path=args.config, ignore_state=args.ignore_state,
                              log_level=level)
    except FastLBError as exc:
        logging.getLogger("fastlb").error("cannot start: %s", exc)
        return 2
    except OSError as exc:
        logging.getLogger("fastlb").error("cannot start: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
