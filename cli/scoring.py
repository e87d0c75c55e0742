"""`fedrisk node` sub-commands for consented scoring (registered by cli.main.build_parser).

    fedrisk node grant issue    --dir NODE --record-key K --bank BANK --release-id ID [--uses 1]
                                [--hours 24 | --days D]
    fedrisk node grant revoke   --dir NODE --grant-id ID
    fedrisk node release install  --dir NODE --release-dir DIR --release-id ID
    fedrisk node release withdraw --dir NODE --release-id ID
    fedrisk node service-token  --token-hash-file F [--force]
    fedrisk node serve          --dir NODE [--federation-socket PATH --relay-user USER [--key-file F]]
                                [--token-hash-file F [--host 127.0.0.1] [--port 8101] [--grant-interval 60]]

Machinery is imported inside each handler so `fedrisk --help` stays fast. User errors are
FedriskError subclasses: `cli.main.main` prints them as one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.node import NODE_DIR_HELP
from federation.errors import ConfigError

DEFAULT_GRANT_HOURS, MAX_GRANT_HOURS = 24, 30 * 24
DEFAULT_GRANT_USES, MAX_GRANT_USES = 1, 10
DEFAULT_GRANT_INTERVAL_S = 60.0
"""Mirrors of privacy.grants (imported lazily there, so `fedrisk --help` stays fast); a test
checks they agree."""
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8101


def _grant_hours(args: argparse.Namespace) -> int:
    """Validity in hours: --hours, or --days (at most MAX_GRANT_HOURS // 24) times 24."""
    from privacy.grants import GrantError

    if args.days is None:
        return args.hours
    if not 1 <= args.days <= MAX_GRANT_HOURS // 24:
        raise GrantError(f"--days: a grant lasts 1 to {MAX_GRANT_HOURS // 24} days, got {args.days}")
    return args.days * 24


def _cmd_grant_issue(args: argparse.Namespace) -> int:
    from clients.node_state import NodeState
    from clients.scoring import issue_grant
    from privacy.grants import peek_payload

    state = NodeState.load(Path(args.dir))
    token = issue_grant(state, args.record_key, args.bank, args.release, hours=_grant_hours(args), uses=args.uses)
    payload = peek_payload(token)
    print(token)
    print(f"grant {payload.grant_id} for bank {payload.bank}, applicant-scoring with release {payload.release}, "
          f"{payload.uses} score{'s' if payload.uses != 1 else ''}, until {payload.expires:%Y-%m-%d %H:%M} UTC; "
          "hand the token (stdout) to the applicant", file=sys.stderr)
    return 0


def _cmd_grant_revoke(args: argparse.Namespace) -> int:
    from clients.node_state import NodeState
    from clients.scoring import grant_authority

    grant_authority(NodeState.load(Path(args.dir))).revoke(args.grant)
    print(f"grant {args.grant} revoked; the next score request with it is refused")
    return 0


def _cmd_grant_rotate_key(args: argparse.Namespace) -> int:
    from clients.node_state import NodeState
    from clients.scoring import grant_authority

    state = NodeState.load(Path(args.dir))
    revoked, pem = grant_authority(state).rotate_key(args.reason)
    if args.out:
        Path(args.out).write_text(pem)
    print(f"{state.hospital}: grant signing key replaced; {revoked} live grant(s) revoked (re-issue them). The signals "
          f"service needs the new public key: fedrisk serve hospitals add --hospital {state.hospital} --url URL "
          f"--grant-key {args.out or 'NEW_KEY.pem'} --token-file F" + ("" if args.out else "\n" + pem.strip()))
    return 0


def _cmd_grant_list(args: argparse.Namespace) -> int:
    from clients.node_state import NodeState
    from privacy.grants import list_grants

    state = NodeState.load(Path(args.dir))
    grants = [g for g in list_grants(state.directory) if not args.state or g.state() == args.state]
    print(f"{state.hospital}: {len(grants)} grant(s)" + (f" {args.state}" if args.state else ""))
    for g in grants:
        print(f"  {g.grant_id}  {g.state():<8} bank {g.bank:<16} release {g.release or '-':<6} "
              f"uses {g.uses_spent}/{g.uses_allowed}  issued {g.issued}  expires {g.expires}"
              + (f"  revoked {g.revoked_at}" if g.revoked_at else ""))
    return 0


def _cmd_release_list(args: argparse.Namespace) -> int:
    from clients.node_state import NodeState
    from clients.scoring import installed_releases

    state = NodeState.load(Path(args.dir))
    releases = installed_releases(state.directory)
    print(f"{state.hospital}: {len(releases)} installed release(s)")
    for r in releases:
        print(f"  {r.release_id:<8} {r.status:<10} {r.model_kind} ({r.n_features} inputs)  sha256 {r.sha256}")
    return 0


def _cmd_release_install(args: argparse.Namespace) -> int:
    from clients.scoring import install_release

    release = install_release(Path(args.dir), Path(args.release_dir), args.release_id)
    print(f"release {release.release_id} installed ({release.model_kind}, {release.n_features} inputs, "
          f"sha256 {release.sha256}): {release.directory}")
    return 0


def _cmd_release_withdraw(args: argparse.Namespace) -> int:
    from clients.scoring import withdraw_release

    release = withdraw_release(Path(args.dir), args.release_id)
    print(f"release {release.release_id} withdrawn; every later score with it is refused")
    return 0


def _cmd_service_token(args: argparse.Namespace) -> int:
    from clients.scoring_service import new_service_token, write_service_token_file

    token = new_service_token()
    write_service_token_file(Path(args.token_file), token, overwrite=args.force)
    print(token)
    print(f"service token hash stored in {args.token_file}; give the token (stdout, shown once) "
          "to the signals service", file=sys.stderr)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    """The node service: the federation socket (for the SuperNode's relay), the scoring endpoint
    (for the signals service), or both in one process with one audit log."""
    import os
    import signal
    import threading

    if not args.federation_socket and not args.token_file:
        raise ConfigError("fedrisk node serve needs --federation-socket (federation work), --token-hash-file "
                          "(consented scoring), or both")
    channel = None
    if args.federation_socket:
        # One intra-op thread unless the hospital says otherwise, set before torch loads (its
        # OpenMP and MKL pools read these once): the simulation engine's workers train with one
        # too, so both engines compute the same model bit for bit.
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(variable, "1")
        from clients.service import open_channel

        channel = open_channel(Path(args.dir), Path(args.federation_socket), args.relay_user,
                               Path(args.key_file) if args.key_file else None)
        if os.getuid() in channel.allowed_uids:
            print(f"warning: --relay-user includes this service's own user (uid {os.getuid()}): the SuperNode's "
                  "ClientApps could read the node directory; run the SuperNode as another user", file=sys.stderr)
    try:
        if args.token_file:
            from clients.scoring_service import serve

            if channel is not None:
                channel.start()
                print(f"federation socket ready: {channel.path}", flush=True)
            serve(Path(args.dir), host=args.host, port=args.port, token_file=Path(args.token_file),
                  grant_interval_s=args.grant_interval, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
        else:
            assert channel is not None
            stopped = threading.Event()
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: (stopped.set(), channel.close()))
            print(f"federation socket ready: {channel.path}", flush=True)
            channel.serve_forever()
    finally:
        if channel is not None:
            channel.close()
    return 0


def register(node_commands: argparse._SubParsersAction) -> None:
    """Add this module's sub-commands under `fedrisk node` (grant, release, service-token, serve)."""
    grant = node_commands.add_parser("grant", help="applicant-scoring consent grants for banks").add_subparsers(
        dest="grant_command", required=True)
    issue = grant.add_parser("issue", help="issue a signed grant token for one patient and one bank")
    issue.add_argument("--dir", required=True, help="the node directory")
    issue.add_argument("--record-key", required=True, help="the patient's record key in the export")
    issue.add_argument("--bank", required=True, help="the bank the patient authorises")
    issue.add_argument("--release-id", "--release", dest="release", required=True, help="the one installed release the bank may score with")
    issue.add_argument("--uses", type=int, default=DEFAULT_GRANT_USES,
                       help=f"scores the grant allows (default {DEFAULT_GRANT_USES}, at most {MAX_GRANT_USES})")
    validity = issue.add_mutually_exclusive_group()
    validity.add_argument("--hours", type=int, default=DEFAULT_GRANT_HOURS,
                          help=f"validity in hours (default {DEFAULT_GRANT_HOURS}, at most {MAX_GRANT_HOURS})")
    validity.add_argument("--days", type=int, default=None,
                          help=f"validity in days instead (at most {MAX_GRANT_HOURS // 24})")
    issue.set_defaults(handler=_cmd_grant_issue)
    revoke = grant.add_parser("revoke", help="revoke a grant: the next score request with it is refused")
    revoke.add_argument("--dir", required=True, help=NODE_DIR_HELP)
    revoke.add_argument("--grant-id", "--grant", dest="grant", required=True, help="the grant id (printed when it was issued)")
    revoke.set_defaults(handler=_cmd_grant_revoke)

    rotate = grant.add_parser("rotate-key", help="replace the grant signing key: every live grant is revoked; give "
                              "the signals service the new key")
    rotate.add_argument("--dir", required=True, help=NODE_DIR_HELP)
    rotate.add_argument("--reason", required=True, help="why, in one line (audited)")
    rotate.add_argument("--out", help="also write the new public key here (PEM), for `fedrisk serve hospitals add`")
    rotate.set_defaults(handler=_cmd_grant_rotate_key)

    listing = grant.add_parser("list", help="every grant this node issued: bank, release, uses, expiry, state "
                               "(never the patient); writes nothing")
    listing.add_argument("--dir", required=True, help=NODE_DIR_HELP)
    listing.add_argument("--state", choices=("active", "revoked", "expired", "used-up"), help="only grants in this state")
    listing.set_defaults(handler=_cmd_grant_list)

    release = node_commands.add_parser("release", help="released models installed for scoring").add_subparsers(
        dest="release_command", required=True)
    release_list = release.add_parser("list", help="the releases installed at this node and their status; writes nothing")
    release_list.add_argument("--dir", required=True, help=NODE_DIR_HELP)
    release_list.set_defaults(handler=_cmd_release_list)
    install = release.add_parser("install", help="install a training release (model.npz + model.sha256)")
    install.add_argument("--dir", required=True, help=NODE_DIR_HELP)
    install.add_argument("--release-dir", required=True, help="the release directory, e.g. <run>/release")
    install.add_argument("--release-id", required=True, help="the release's id in the registry")
    install.set_defaults(handler=_cmd_release_install)
    withdraw = release.add_parser("withdraw", help="withdraw an installed release: scoring with it stops at once")
    withdraw.add_argument("--dir", required=True, help=NODE_DIR_HELP)
    withdraw.add_argument("--release-id", required=True, help="the installed release's id (e.g. r3)")
    withdraw.set_defaults(handler=_cmd_release_withdraw)

    token = node_commands.add_parser("service-token", help="create the signals service's token for this node")
    token.add_argument("--token-hash-file", "--token-file", dest="token_file", required=True,
                       help="where the node keeps the token's SHA-256 (the token itself goes to the signals service)")
    token.add_argument("--force", action="store_true", help="replace an existing token")
    token.set_defaults(handler=_cmd_service_token)

    serve = node_commands.add_parser("serve", help="run the node service: federation socket and/or scoring endpoint")
    serve.add_argument("--dir", required=True, help=NODE_DIR_HELP)
    serve.add_argument("--federation-socket", metavar="PATH",
                       help="answer the SuperNode's relay ClientApp on this Unix socket")
    serve.add_argument("--relay-user", action="append", default=[], metavar="USER",
                       help="the SuperNode's OS user (name or uid), the only caller the socket answers; repeatable")
    serve.add_argument("--key-file", help="the CKKS key, if kept outside the node directory")
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    serve.add_argument("--token-hash-file", "--token-file", dest="token_file",
                       help="the service token's hash (written by `fedrisk node service-token`): serve scoring")
    serve.add_argument("--grant-interval", type=float, default=DEFAULT_GRANT_INTERVAL_S, metavar="SECONDS",
                       help=f"least time between two scores with one grant (default {DEFAULT_GRANT_INTERVAL_S:g}; "
                            "0 disables the per-grant rate limit)")
    serve.add_argument("--ssl-certfile", help="TLS certificate (PEM) of the scoring endpoint: serve HTTPS")
    serve.add_argument("--ssl-keyfile", help="TLS private key (PEM) for --ssl-certfile")
    serve.set_defaults(handler=_cmd_serve)
