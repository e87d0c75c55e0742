"""`fedrisk serve`: the bank-facing signals service (registered by cli.main.build_parser).

    fedrisk serve [--host 127.0.0.1] [--port 8400] [--db D] [--registry R] [--tracking-uri U]
    fedrisk serve keys add --role ROLE --label LABEL [--bank B | --hospital H] [--db D]
    fedrisk serve keys list | revoke KEY_ID | rotate KEY_ID [--grace-hours 24] [--db D]
    fedrisk serve hospitals add --hospital H --url URL --grant-key PEM_FILE --token-file F [--db D]
    fedrisk serve hospitals list [--db D]
    fedrisk serve seal [--db D]
    fedrisk serve rekey --new-key-file F --reason R [--db D]
    fedrisk serve purge --cohorts-older-than-days N [--dry-run] [--db D]

Machinery is imported inside each handler so `fedrisk --help` stays fast. User errors are
FedriskError subclasses: `cli.main.main` prints them as one line and exits 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cli import workspace as ws
from federation.errors import ConfigError

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8400
DEFAULT_DB = Path("runs/signals/signals.sqlite")


def _db(args: argparse.Namespace, *, to_seal: bool = False) -> Path:
    """The service's store (--db); a process given an at-rest key refuses it unless its directory
    is sealed (`federation.sealing.check_keyed`) or `fedrisk serve seal` is sealing it."""
    from federation.sealing import check_keyed

    db = Path(getattr(args, "db", None) or DEFAULT_DB)
    if not to_seal:
        check_keyed(db.parent, f"fedrisk serve seal --db {db}")
    return db


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.signals.app import ServiceSettings, make_app

    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise ConfigError("give both --ssl-certfile and --ssl-keyfile to serve over TLS")

    limits = {k: v for k, v in (("rate_per_second", args.rate), ("burst", args.burst)) if v is not None}
    if args.hospital_ca and not Path(args.hospital_ca).is_file():
        raise ConfigError(f"--hospital-ca {args.hospital_ca}: no such file")
    settings = ServiceSettings(db=_db(args), registry_dir=ws.registry_dir(args),
                               tracking_uri=ws.tracking_uri(args), registry_uri=ws.registry_uri(args),
                               hospital_ca=args.hospital_ca or "", **limits)
    app = make_app(settings)
    print(f"fedrisk signals service on http://{args.host}:{args.port}/ (dashboard), API docs at /docs; "
          f"state {settings.db}, audit {settings.audit_path}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
    return 0


def _cmd_keys_add(args: argparse.Namespace) -> int:
    from server.signals.auth import KeyStore

    principal, key = KeyStore(_db(args)).add(args.role, args.label, bank=args.bank, hospital=args.hospital,
                                             days=args.days)
    bound = f" for {principal.bank or principal.hospital}" if principal.bank or principal.hospital else ""
    print(key)
    print(f"API key {principal.key_id} for {principal.label} ({principal.role}{bound}), valid until "
          f"{(principal.expires or '')[:16].replace('T', ' ')} UTC; only its SHA-256 is stored: copy the key (above) "
          "now, it cannot be shown again")
    return 0


def _cmd_keys_rotate(args: argparse.Namespace) -> int:
    from server.signals.auth import KeyStore

    principal, key = KeyStore(_db(args)).rotate(args.key_id, grace_hours=args.grace_hours, days=args.days)
    print(key)
    print(f"new API key {principal.key_id} for {principal.label}, valid until {(principal.expires or '')[:16]} UTC; "
          f"the old key {args.key_id} works for {args.grace_hours} more hour(s), then gets 401")
    return 0


def _cmd_keys_list(args: argparse.Namespace) -> int:
    from server.signals.auth import KeyStore

    for p in KeyStore(_db(args)).principals():
        state = {"revoked": f"revoked {p.revoked_at}", "expired": f"expired {p.expires}",
                 "active": f"live until {p.expires}" if p.expires else "live, no expiry (made before keys expired)"}
        print(f"{p.key_id}  {p.role:<17} {p.label:<24} {p.bank or p.hospital or '-':<16} {p.created}  "
              f"{state[p.state()]}")
    return 0


def _cmd_keys_revoke(args: argparse.Namespace) -> int:
    from server.signals.auth import KeyStore

    principal = KeyStore(_db(args)).revoke(args.key_id)
    print(f"API key {principal.key_id} of {principal.label} revoked; its next request gets 401")
    return 0


def _cmd_hospitals_add(args: argparse.Namespace) -> int:
    from server.signals.hospitals import HospitalDirectory

    endpoint = HospitalDirectory(_db(args)).add(args.hospital, args.url, Path(args.grant_key), Path(args.token_file))
    print(f"hospital {endpoint.hospital}: score requests go to {endpoint.url}/v1/score; grants are checked with "
          f"the key from {args.grant_key}; the service token is read from {endpoint.token_file}")
    return 0


def _cmd_hospitals_list(args: argparse.Namespace) -> int:
    from server.signals.hospitals import HospitalDirectory

    for endpoint in HospitalDirectory(_db(args)).list():
        print(f"{endpoint.hospital:<20} {endpoint.url:<32} token file {endpoint.token_file}  added {endpoint.added}")
    return 0


def _cmd_seal(args: argparse.Namespace) -> int:
    from server.signals.app import SIGNALS_AUDIT
    from server.signals.at_rest import seal_service

    db = _db(args, to_seal=True)
    encrypted = seal_service(db, db.with_name(SIGNALS_AUDIT))
    print(f"signals service stores in {db.parent} encrypted at rest (SQLCipher AES-256): "
          f"{', '.join(encrypted) or 'all were already encrypted'}; the service now needs the at-rest key to start")
    return 0


def _cmd_rekey(args: argparse.Namespace) -> int:
    from server.signals.app import SIGNALS_AUDIT
    from server.signals.at_rest import rotate_service_key

    db = _db(args)
    old, new = rotate_service_key(db, db.with_name(SIGNALS_AUDIT), Path(args.new_key_file), args.reason)
    print(f"signals service stores in {db.parent} re-encrypted under at-rest key {new} (was {old}); set "
          f"FEDRISK_NODE_KEY_FILE={args.new_key_file} for the service now, then destroy the old key")
    return 0


def _cmd_purge(args: argparse.Namespace) -> int:
    from server.signals.app import SIGNALS_AUDIT
    from server.signals.retention import purge_cohorts

    db = _db(args)
    ids = purge_cohorts(db, db.with_name(SIGNALS_AUDIT), args.cohorts_older_than_days, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(ids)} cohort table(s) approved more than {args.cohorts_older_than_days} days ago"
          + (f": {', '.join(ids[:20])}{' ...' if len(ids) > 20 else ''}" if ids else ""))
    return 0


def _db_option(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # On the sub-commands the default is SUPPRESS, so `fedrisk serve --db D keys add` keeps D.
    parser.add_argument("--db", default=None if top else argparse.SUPPRESS,
                        help=f"the service's SQLite file: keys, hospitals, approved cohorts (default {DEFAULT_DB})")


def register(commands: argparse._SubParsersAction) -> None:
    """Add `fedrisk serve` (and its keys / hospitals sub-commands) to the `fedrisk` parser."""
    serve = commands.add_parser("serve", help="the bank-facing signals service (API + dashboard)",
                                description="Run the signals service with uvicorn, or manage its keys and hospitals.")
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    _db_option(serve, top=True)
    serve.add_argument("--registry", help="release registry directory (default <workspace>/releases, where "
                                          "`fedrisk release create` registers)")
    serve.add_argument("--tracking-uri", default="", help="MLflow store of the registry (default: the workspace's)")
    serve.add_argument("--rate", type=float, help="requests per second per caller (default 20, "
                       "server.signals.auth.DEFAULT_RATE_PER_SECOND)")
    serve.add_argument("--burst", type=int, help="requests a caller may make at once (default 40, "
                       "server.signals.auth.DEFAULT_BURST)")
    serve.add_argument("--ssl-certfile", help="TLS certificate (PEM): serve HTTPS directly (or put a TLS proxy in front)")
    serve.add_argument("--ssl-keyfile", help="TLS private key (PEM) for --ssl-certfile")
    serve.add_argument("--hospital-ca", metavar="PEM",
                       help="CA certificates that hospitals' HTTPS scoring endpoints are checked against "
                            "(default: the system's trust store)")
    serve.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                       help="uvicorn's log level (default warning)")
    serve.set_defaults(handler=_cmd_serve)
    manage = serve.add_subparsers(dest="serve_command", required=False, metavar="{keys,hospitals,seal,rekey,purge}")
    seal = manage.add_parser("seal", help="encrypt the service's stores at rest under $FEDRISK_NODE_KEY_FILE "
                                          "(stop the service first)")
    _db_option(seal, top=False)
    seal.set_defaults(handler=_cmd_seal)
    rekey = manage.add_parser("rekey", help="re-encrypt the sealed service's stores under a new at-rest key")
    rekey.add_argument("--new-key-file", required=True, help="the new key, from `fedrisk node seal-key --out`")
    rekey.add_argument("--reason", required=True, help="why (audited)")
    _db_option(rekey, top=False)
    rekey.set_defaults(handler=_cmd_rekey)
    purge = manage.add_parser("purge", help="retention: delete approved cohort tables past their time (audited)")
    purge.add_argument("--cohorts-older-than-days", type=int, required=True,
                       help="delete the tables approved more than this many days ago")
    purge.add_argument("--dry-run", action="store_true", help="list what would be deleted; change nothing")
    _db_option(purge, top=False)
    purge.set_defaults(handler=_cmd_purge)

    keys = manage.add_parser("keys", help="API keys of principals").add_subparsers(dest="keys_command", required=True)
    add = keys.add_parser("add", help="make an API key (printed once)")
    add.add_argument("--role", required=True, help="bank-analyst, hospital-operator, data-scientist or auditor")
    add.add_argument("--label", required=True, help="who holds it, e.g. acme-risk-team (appears in the audit log)")
    add.add_argument("--bank", help="bank id of a bank-analyst key (must match the bank in grant tokens)")
    add.add_argument("--hospital", help="hospital of a hospital-operator key")
    add.add_argument("--days", type=int, default=90, help="how long the key works (default 90, at most 730)")
    _db_option(add, top=False)
    add.set_defaults(handler=_cmd_keys_add)
    rotate = keys.add_parser("rotate", help="a new key for a key's holder; the old one works for a grace period")
    rotate.add_argument("key_id", help="the key's id, as `fedrisk serve keys list` shows it")
    rotate.add_argument("--grace-hours", type=int, default=24, help="how long the old key still works (default 24; "
                                                                    "0: stops now)")
    rotate.add_argument("--days", type=int, default=90, help="how long the new key works (default 90)")
    _db_option(rotate, top=False)
    rotate.set_defaults(handler=_cmd_keys_rotate)
    listing = keys.add_parser("list", help="every key: id, role, label, state")
    _db_option(listing, top=False)
    listing.set_defaults(handler=_cmd_keys_list)
    revoke = keys.add_parser("revoke", help="revoke a key by its id (from `keys list`)")
    revoke.add_argument("key_id", help="the key's id, as `fedrisk serve keys list` shows it")
    _db_option(revoke, top=False)
    revoke.set_defaults(handler=_cmd_keys_revoke)

    hospitals = manage.add_parser("hospitals", help="hospitals' scoring endpoints").add_subparsers(
        dest="hospitals_command", required=True)
    hadd = hospitals.add_parser("add", help="register (or update) a hospital's scoring endpoint")
    hadd.add_argument("--hospital", required=True, help="the hospital's name (as in its grant tokens)")
    hadd.add_argument("--url", required=True, help="base URL of its endpoint, e.g. http://127.0.0.1:8101")
    hadd.add_argument("--grant-key", required=True, help="its grant key: the reply of GET /v1/grant-key on the node saved to a file (JSON), "
                      "or the PEM inside it")
    hadd.add_argument("--token-file", required=True,
                      help="file holding the service token the node accepts (from `fedrisk node service-token`)")
    _db_option(hadd, top=False)
    hadd.set_defaults(handler=_cmd_hospitals_add)
    hlist = hospitals.add_parser("list", help="registered hospitals")
    _db_option(hlist, top=False)
    hlist.set_defaults(handler=_cmd_hospitals_list)
