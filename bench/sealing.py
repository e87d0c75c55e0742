"""What sealing a node at rest costs: its secrets and stores sealed against in clear.

Makes one CKKS key (`fedrisk keys init`) and, in a scratch directory, the node's three secrets
twice: in clear, and sealed with AES-256-GCM under a fresh at-rest key (`federation.sealing`).
Then times, interleaved (every repetition loads every secret once in each form, in turn), the
loaders a node uses: `HospitalKey.load` (CKKS secret context), `PseudonymKey.load` and
`SigningKey.load`; and the store operations a node does most, on a plain SQLite directory and on
a sealed one (SQLCipher, `federation.stores`) holding the same rows: an audit append, a consent
withdrawal written and the withdrawal set read back, and opening the ledger (WAL) for its budget.
Reports the median per operation and the sealed/clear ratio, and the file sizes.

    PYTHONPATH=. python bench/sealing.py [--reps 30] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from federation import sealing
from privacy.audit import CONSENT_REVOKE, ROLE_HOSPITAL, AuditLog
from privacy.consent import RevocationRegistry
from privacy.ledger import BudgetLedger
from federation.contributions import SigningKey
from federation.he_codec import HospitalKey, init_keys
from privacy.pseudonym import PseudonymKey


def _prepare(root: Path) -> dict[str, tuple[Path, Path, object]]:
    keys = init_keys(root / "keys")
    clear, sealed = root / "clear", root / "sealed"
    clear.mkdir()
    sealed.mkdir()
    at_rest = sealing.create_key_file(root / "at-rest.key", "node at-rest key")
    os.environ[sealing.KEY_FILE_ENV] = str(at_rest)
    key = sealing.at_rest_key()
    plain = keys.hospital_context.read_bytes()
    (clear / "hospital.ckks").write_bytes(plain)
    (sealed / "hospital.ckks").write_bytes(sealing.seal(plain, sealing.ROLE_CKKS, key))
    for directory in (clear, sealed):
        if directory is clear:
            del os.environ[sealing.KEY_FILE_ENV]
        PseudonymKey.create(directory / "pseudonym.key")
        SigningKey.create(directory / "signing.key")
        os.environ[sealing.KEY_FILE_ENV] = str(at_rest)
    sealing.mark_sealed(sealed)
    for directory in (clear, sealed):
        with BudgetLedger(directory / "ledger.sqlite") as ledger:
            ledger.set_budget("credit-risk-research", 4.0, 1e-5)
        RevocationRegistry(directory / "revocations.sqlite")
        for i in range(200):  # a log with some history, as a node's has
            AuditLog(directory / "audit.sqlite", role=ROLE_HOSPITAL, identity="h").append(
                CONSENT_REVOKE, details={"n": i})
    counter = iter(range(10**9))

    def append(directory: Path) -> None:
        AuditLog(directory / "audit.sqlite", role=ROLE_HOSPITAL, identity="h").append(
            CONSENT_REVOKE, details={"n": next(counter)})

    def revoke(directory: Path) -> None:
        registry = RevocationRegistry(directory / "revocations.sqlite")
        registry.revoke(f"{next(counter):032x}", "credit-risk-research")
        registry.revoked("credit-risk-research")

    def budget(directory: Path) -> None:
        with BudgetLedger(directory / "ledger.sqlite") as ledger:
            ledger.budget("credit-risk-research")

    return {"ckks secret context": (clear / "hospital.ckks", sealed / "hospital.ckks", HospitalKey.load),
            "pseudonym key": (clear / "pseudonym.key", sealed / "pseudonym.key", PseudonymKey.load),
            "signing key": (clear / "signing.key", sealed / "signing.key", SigningKey.load),
            "store: audit append": (clear, sealed, append),
            "store: consent write+read": (clear, sealed, revoke),
            "store: ledger open": (clear, sealed, budget)}


def _size(path: Path, name: str) -> int:
    if path.is_file():
        return path.stat().st_size
    store = {"store: audit append": "audit.sqlite", "store: consent write+read": "revocations.sqlite",
             "store: ledger open": "ledger.sqlite"}[name]
    return (path / store).stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedrisk-bench-sealing-") as scratch:
        secrets = _prepare(Path(scratch))
        times: dict[str, dict[str, list[float]]] = {name: {"clear": [], "sealed": []} for name in secrets}
        for _ in range(args.reps):
            for name, (clear, sealed, load) in secrets.items():
                for form, path in (("clear", clear), ("sealed", sealed)):
                    start = time.perf_counter()
                    load(path)
                    times[name][form].append(time.perf_counter() - start)
        rows = {name: {"clear_ms": 1e3 * statistics.median(t["clear"]),
                       "sealed_ms": 1e3 * statistics.median(t["sealed"]),
                       "bytes": _size(secrets[name][1], name)} for name, t in times.items()}
    for row in rows.values():
        row["ratio"] = row["sealed_ms"] / row["clear_ms"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'what':<27}{'clear ms':>10}{'sealed ms':>11}{'ratio':>8}{'bytes':>12}   (median of {args.reps})")
    for name, row in rows.items():
        print(f"{name:<27}{row['clear_ms']:>10.3f}{row['sealed_ms']:>11.3f}{row['ratio']:>8.2f}{row['bytes']:>12,}")


if __name__ == "__main__":
    main()
