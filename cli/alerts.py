"""`fedrisk alerts`: switch on, prove and read the alert rules of an audit log (`privacy.alerts`).

    fedrisk alerts init --dir DIR [--webhook URL] [--syslog ADDRESS] [--min-severity warning] [--force]
    fedrisk alerts test --dir DIR
    fedrisk alerts list --dir DIR

DIR is the directory of the audit log to watch: a hospital node's directory, the signals service's
state directory (beside signals_audit.sqlite), a run directory or the release registry.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from federation.errors import ConfigError

DIR_HELP = "directory of the audit log to watch (a node directory, the service's state directory, a run directory)"


def _cmd_init(args: argparse.Namespace) -> int:
    from privacy.alerts import CONFIG_FILE, SEVERITIES, AlertConfig

    directory = Path(args.dir)
    if not directory.is_dir():
        raise ConfigError(f"--dir {directory}: no such directory")
    path = directory / CONFIG_FILE
    if path.exists() and not args.force:
        raise ConfigError(f"{path} exists; pass --force to replace it")
    if args.min_severity not in SEVERITIES:
        raise ConfigError(f"--min-severity must be one of {', '.join(SEVERITIES)}")
    config = AlertConfig(syslog={"address": args.syslog, "facility": "auth"} if args.syslog else None,
                         webhook={"url": args.webhook} if args.webhook else None, min_severity=args.min_severity)
    tmp = path.with_name(f".{CONFIG_FILE}.new")
    config.write(tmp)
    AlertConfig.load(tmp)  # the same checks every reader makes (a webhook over plain http off loopback, ...)
    tmp.replace(path)
    sinks = [s for s, on in (("syslog", args.syslog), ("webhook", args.webhook)) if on]
    print(f"alert rules on for {directory}: {path} (sinks: {', '.join(sinks) or 'none: alerts are only recorded'}); "
          "prove the wiring with `fedrisk alerts test`")
    return 0


def _cmd_test(args: argparse.Namespace) -> int:
    from privacy.alerts import CONFIG_FILE, Alert, AlertConfig, AlertMonitor, now_utc

    directory = Path(args.dir)
    config = AlertConfig.load(directory / CONFIG_FILE)
    if config.syslog is None and config.webhook is None:
        raise ConfigError(f"{directory / CONFIG_FILE} names no sink (syslog or webhook) to test")
    monitor = AlertMonitor(directory, "fedrisk-cli", config)
    outcome = monitor.deliver(Alert("test", "info", "fedrisk alert test: the wiring works", "fedrisk-cli", now_utc()))
    for sink, result in outcome.items():
        print(f"{sink}: {result}")
    return 0 if all(result == "ok" for result in outcome.values()) else 1


def _cmd_list(args: argparse.Namespace) -> int:
    from privacy.alerts import recorded_alerts

    alerts = recorded_alerts(Path(args.dir))
    print(f"{len(alerts)} alert(s) recorded in {args.dir}")
    for alert, delivered in alerts:
        print(f"  {alert.at[:16].replace('T', ' ')} UTC  {alert.severity:<8} {alert.rule:<15} {alert.summary}"
              + (f"  [delivered: {delivered}]" if delivered else ""))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add `fedrisk alerts init|test|list`."""
    alerts = commands.add_parser("alerts", help="alert rules over an audit log: init, test, list").add_subparsers(
        dest="alerts_command", required=True)
    init = alerts.add_parser("init", help="switch on the alert rules for an audit log (writes alerts.json)")
    init.add_argument("--dir", required=True, help=DIR_HELP)
    init.add_argument("--webhook", metavar="URL", help="POST each alert as JSON here (https, or http on loopback)")
    init.add_argument("--syslog", metavar="ADDRESS", help="send each alert to syslog: /dev/log or host:port (UDP)")
    init.add_argument("--min-severity", default="warning", help="least severity delivered (every alert is recorded; "
                                                                "default warning)")
    init.add_argument("--force", action="store_true", help="replace an existing alerts.json")
    init.set_defaults(handler=_cmd_init)
    test = alerts.add_parser("test", help="send a test alert to every configured sink; exit 1 if one fails")
    test.add_argument("--dir", required=True, help=DIR_HELP)
    test.set_defaults(handler=_cmd_test)
    listing = alerts.add_parser("list", help="the alerts recorded for an audit log, and their delivery; writes nothing")
    listing.add_argument("--dir", required=True, help=DIR_HELP)
    listing.set_defaults(handler=_cmd_list)
