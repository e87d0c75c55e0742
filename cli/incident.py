"""`fedrisk incident`: scope and contain a breach, at a hospital node or at the signals service.

    fedrisk incident scope   --dir NODE (--bank B | --grant-refs FILE | --all-grants) [--since T] [--until T]
                             [--notification-list FILE] [--csv FILE|-]
    fedrisk incident scope   --db SIGNALS_DB (--api-key-id K | --bank B | --hospital H) [--since T] [--until T]
                             [--grant-refs-out DIR] [--csv FILE|-]
    fedrisk incident contain --dir NODE (...as scope...) --reason R [--by NAME]
    fedrisk incident contain --db SIGNALS_DB (--api-key-id K | --bank B | --hospital H) --reason R [--by NAME]

The runbook (docs/security/incident-response.md) says which to run when, and who.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import sys
from pathlib import Path

from federation.errors import ConfigError


def _when(value: str | None, flag: str) -> str | None:
    from cli.main import _when as parse

    return parse(value, flag)


def _node_scope(args: argparse.Namespace):
    from clients.incident import read_grant_refs, scope_at_node
    from clients.node_state import NodeState

    state = NodeState.load(Path(args.dir))
    refs = read_grant_refs(Path(args.grant_refs)) if args.grant_refs else set()
    return state, scope_at_node(state, bank=args.bank or "", grant_refs=refs, every_grant=args.all_grants,
                                since=_when(args.since, "--since"), until=_when(args.until, "--until"))


def _service_scope(args: argparse.Namespace):
    from cli.serve import _db
    from server.signals.app import ServiceSettings
    from server.signals.incident import scope_at_service

    db = _db(args)
    audit = ServiceSettings(db=db, registry_dir=Path(".")).audit_path
    return db, audit, scope_at_service(audit, key_id=args.api_key_id or "", bank=args.bank or "",
                                       hospital=args.hospital or "", since=_when(args.since, "--since"),
                                       until=_when(args.until, "--until"))


def _write_csv(target: str, header: list[str], rows: list[dict]) -> None:
    handle = sys.stdout if target == "-" else open(target, "w", newline="", encoding="utf-8")
    try:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    finally:
        if handle is not sys.stdout:
            handle.close()


def _one_side(args: argparse.Namespace) -> str:
    if bool(args.dir) == bool(args.db):
        raise ConfigError("give --dir NODE (scope at a hospital node) or --db SIGNALS_DB (at the signals service)")
    if args.dir and (args.api_key_id or args.hospital or args.grant_refs_out):
        raise ConfigError("--api-key-id, --hospital and --grant-refs-out are for the service (--db)")
    if args.db and (args.grant_refs or args.all_grants or args.notification_list):
        raise ConfigError("--grant-refs, --all-grants and --notification-list are for a node (--dir)")
    return "node" if args.dir else "service"


def _cmd_scope(args: argparse.Namespace) -> int:
    if _one_side(args) == "node":
        from clients.incident import notification_list

        state, scope = _node_scope(args)
        print(f"{scope.hospital}: {scope.what}, {scope.since[:16]} to {scope.until[:16]} UTC: {len(scope.grants)} "
              f"grant(s) could have been used, {len(scope.used)} were, covering {scope.patients} patient(s)")
        for grant in scope.grants:
            row = grant.to_row()
            print(f"  grant {row['grant']}  bank {row['bank']:<12} release {row['release']:<5} issued "
                  f"{row['issued'][:16]}  uses in window {row['uses_in_window']}  patient ref {row['patient_ref']}…"
                  + (f"  revoked {row['revoked_at'][:16]}" if row["revoked_at"] else ""))
        if args.csv:
            _write_csv(args.csv, list(scope.grants[0].to_row()) if scope.grants else ["grant"],
                       [g.to_row() for g in scope.grants])
        if args.notification_list:
            count = notification_list(state, scope, Path(args.notification_list))
            print(f"notification list (record keys, mode 0600, stays on this machine): {args.notification_list}, "
                  f"{count} patient(s)")
        return 0
    _, _, scope = _service_scope(args)
    print(f"signals service: {scope.what}, {scope.since[:16]} to {scope.until[:16]} UTC: {len(scope.requests)} "
          f"request(s), {len(scope.scores)} score request(s)")
    for (method, endpoint, status), count in sorted(scope.by_endpoint.items(), key=lambda x: -x[1]):
        print(f"  {count:>6}  {method} {endpoint} -> {status}")
    for hospital, refs in scope.grant_refs_by_hospital().items():
        print(f"  {hospital}: {len(refs)} grant reference(s) to check there (fedrisk incident scope --dir NODE "
              "--grant-refs FILE)")
    if args.grant_refs_out:
        out = Path(args.grant_refs_out)
        out.mkdir(parents=True, exist_ok=True)
        for hospital, refs in scope.grant_refs_by_hospital().items():
            (out / f"{hospital}.grant-refs").write_text("".join(f"{r}\n" for r in refs))
        print(f"grant references per hospital written to {out}/<hospital>.grant-refs")
    if args.csv:
        _write_csv(args.csv, ["seq", "at", "principal", "key_id", "bank", "method", "endpoint", "status", "hospital",
                              "release", "grant_ref", "refusal"], scope.requests)
    return 0


def _cmd_contain(args: argparse.Namespace) -> int:
    by = args.by or _login()
    if _one_side(args) == "node":
        from clients.incident import contain_at_node

        state, scope = _node_scope(args)
        revoked = contain_at_node(state, scope, reason=args.reason, by=by)
        print(f"{scope.hospital}: {revoked} grant(s) revoked ({scope.what}); audited as incident.contain")
        return 0
    from server.signals.incident import contain_at_service

    db, audit, _ = _service_scope(args)
    done = contain_at_service(db, audit, key_id=args.api_key_id or "", bank=args.bank or "",
                              hospital=args.hospital or "", reason=args.reason, by=by)
    print(f"signals service: {done['keys-revoked']} API key(s) revoked, {done['hospitals-suspended']} hospital(s) "
          "suspended; audited as incident.contain")
    return 0


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def register(commands: argparse._SubParsersAction) -> None:
    """Add `fedrisk incident scope|contain`."""
    incident = commands.add_parser("incident", help="breach response: scope what a leak reached, contain it").add_subparsers(
        dest="incident_command", required=True)
    for name, text in (("scope", "list what a leaked key, bank, node or grant set could have reached; reads only "
                                 "(--notification-list writes the hospital's own list)"),
                       ("contain", "revoke or suspend what a leak exposed, in one audited step")):
        parser = incident.add_parser(name, help=text)
        parser.add_argument("--dir", help="a hospital node's directory: scope at the node")
        parser.add_argument("--db", help="the signals service's signals.sqlite: scope at the service")
        parser.add_argument("--bank", help="a bank (its key leaked or it misbehaved)")
        parser.add_argument("--api-key-id", help="service: the leaked API key's id (`fedrisk serve keys list`)")
        parser.add_argument("--hospital", help="service: a hospital whose endpoint misbehaved")
        parser.add_argument("--grant-refs", metavar="FILE", help="node: grant references from the service's scope")
        parser.add_argument("--all-grants", action="store_true", help="node: every grant (a leaked grant signing key "
                                                                      "or a compromised node)")
        parser.add_argument("--since", metavar="WHEN", help="start of the window (UTC date or date-time)")
        parser.add_argument("--until", metavar="WHEN", help="end of the window (UTC date or date-time)")
        parser.add_argument("--grant-refs-out", metavar="DIR", help=argparse.SUPPRESS if name == "contain" else
                            "service: write each hospital's grant references to DIR/<hospital>.grant-refs")
        parser.add_argument("--notification-list", metavar="FILE", help=argparse.SUPPRESS if name == "contain" else
                            "node: write the affected patients' record keys here (mode 0600, new file)")
        parser.add_argument("--csv", metavar="FILE", help=argparse.SUPPRESS if name == "contain" else
                            "also write the scope as CSV ('-': stdout)")
        if name == "contain":
            parser.add_argument("--reason", required=True, help="why, in one line (audited)")
            parser.add_argument("--by", help="who contains it (default: the login name)")
            parser.set_defaults(handler=_cmd_contain)
        else:
            parser.set_defaults(handler=_cmd_scope)
