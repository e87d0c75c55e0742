"""`fedrisk bank ...`: what a bank's risk team runs against the signals service (batch scoring).

The API key is read from a file or the FEDRISK_API_KEY environment variable, never from the
command line, where other users of the machine could read it in the process list.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from federation.errors import ConfigError

API_KEY_ENV = "FEDRISK_API_KEY"


def _api_key(args: argparse.Namespace) -> str:
    if args.key_file:
        try:
            key = Path(args.key_file).read_text(encoding="utf-8").strip()
        except OSError:
            raise ConfigError(f"--api-key-file {args.key_file}: not readable") from None
    else:
        key = os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        raise ConfigError(f"give the bank's API key with --key-file FILE or the {API_KEY_ENV} environment variable")
    return key


def _cmd_bank_score(args: argparse.Namespace) -> int:
    from server.signals.client import score_file

    from urllib.parse import urlparse

    url = urlparse(args.service)
    if url.scheme != "https" and url.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError(f"--service {args.service}: the API key would travel unencrypted; use https:// "
                          "(plain http is accepted on loopback only)")
    counts = score_file(Path(args.input), Path(args.output), args.service, _api_key(args),
                        default_release=args.release or "")
    print(f"{counts['scored']} scored, {counts['refused']} refused (each with its reason): {args.output}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add `fedrisk bank` and its sub-commands."""
    bank = commands.add_parser("bank", help="a bank's client of the signals service").add_subparsers(
        dest="bank_command", required=True)
    score = bank.add_parser("score", help="score a CSV of consented applicants' grants, one request per row")
    score.add_argument("--service", required=True, help="the signals service's base URL, e.g. https://signals.example")
    score.add_argument("--api-key-file", "--key-file", dest="key_file", help=f"file holding the bank-analyst API key (default: ${API_KEY_ENV})")
    score.add_argument("--input", required=True, help="CSV with a 'grant' column, optional 'release' and 'reference'")
    score.add_argument("--output", required=True, help="CSV to write (one row per input row; never the grants)")
    score.add_argument("--release-id", "--release", dest="release", help="release for rows without a 'release' column, e.g. r1")
    score.set_defaults(handler=_cmd_bank_score)
