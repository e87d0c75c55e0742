"""What sealing node secrets at rest costs: loading each secret sealed against loading it in clear.

Makes one CKKS key (`fedrisk keys init`) and, in a scratch directory, the node's three secrets
twice: in clear, and sealed with AES-256-GCM under a fresh at-rest key (`federation.sealing`).
Then times, interleaved (every repetition loads every secret once in each form, in turn), the
loaders a node uses: `HospitalKey.load` (CKKS secret context), `PseudonymKey.load` and
`SigningKey.load`. Reports the median per load and the sealed/clear ratio, and the file sizes.

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
    return {"ckks secret context": (clear / "hospital.ckks", sealed / "hospital.ckks", HospitalKey.load),
            "pseudonym key": (clear / "pseudonym.key", sealed / "pseudonym.key", PseudonymKey.load),
            "signing key": (clear / "signing.key", sealed / "signing.key", SigningKey.load)}


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
                       "bytes": secrets[name][1].stat().st_size} for name, t in times.items()}
    for row in rows.values():
        row["ratio"] = row["sealed_ms"] / row["clear_ms"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'secret':<22}{'clear ms':>10}{'sealed ms':>11}{'ratio':>8}{'bytes':>12}   (median of {args.reps})")
    for name, row in rows.items():
        print(f"{name:<22}{row['clear_ms']:>10.3f}{row['sealed_ms']:>11.3f}{row['ratio']:>8.2f}{row['bytes']:>12,}")


if __name__ == "__main__":
    main()
