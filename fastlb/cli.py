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


def _setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    signals.defer()              # SIGHUP/SIGTERM/SIGINT while starting: acted on once running
    p = argparse.ArgumentParser(prog="fastlb", description="A TCP (layer 4) load balancer.")
    p.add_argument("--version", action="version", version=f"fastlb {__version__}")
    sub = p.add_subparsers(dest="verb", required=True)
    r = sub.add_parser("run", help="run the balancer")
    r.add_argument("-c", "--config", required=True, help="TOML config file")
    r.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    r.add_argument("--ignore-state", action="store_true",
                   help="start from the config alone, ignoring (and then overwriting) the state file")
    c = sub.add_parser("check", help="validate a config file and print a summary")
    c.add_argument("-c", "--config", required=True)
    d = sub.add_parser("demo", help="local backends + the balancer + a little load")
    d.add_argument("--connections", type=int, default=300, help="connections per policy")
    from fastlb import ctl
    ctl.add_parser(sub)
    args = p.parse_args(argv)
    if args.verb != "run":
        signals.restore()

    if args.verb == "ctl":
        return ctl.main(args)

    if args.verb == "demo":
        from fastlb import demo
        return demo.main(connections=args.connections)

    from fastlb import config
    try:
        cfg = config.load(args.config)
    except ConfigError as exc:
        print(f"fastlb: {exc}", file=sys.stderr)
        return 2
    if args.verb == "check":
        print(config.summary(cfg))
        return 0
    _setup_logging(args.log_level)
    from fastlb import supervisor
    try:
        return supervisor.run(cfg, config_path=args.config, ignore_state=args.ignore_state,
                              log_level=args.log_level)
    except FastLBError as exc:
        logging.getLogger("fastlb").error("cannot start: %s", exc)
        return 2
    except OSError as exc:
        logging.getLogger("fastlb").error("cannot start: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
