"""A bank's client of the signals service: batch scoring of consented applicants, CSV in, CSV out.

Each row of the input is its own request with its own grant: `POST /v1/scores {grant, release}`
with the bank's key in `X-API-Key`. A row that is refused (expired or spent grant, withdrawn
release, another bank's grant) is written with its status and the service's one-line reason, and
the batch goes on; nothing about one applicant decides another's. The output never holds a grant:
grants are bearer credentials, so rows are matched by the bank's own `reference` (or row number).

Input columns: `grant` (required), `release` (or `default_release`), `reference` (optional, copied
through). Output columns: `OUTPUT_COLUMNS`.

    .venv/bin/fedrisk bank score --service http://127.0.0.1:8400 --key-file acme.key \
        --input applicants.csv --output scores.csv --release r1
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from federation.errors import ConfigError

OUTPUT_COLUMNS = ("row", "reference", "release", "status", "http_status", "probability", "band", "reasons", "error")
MAX_ROWS = 100_000
MAX_RETRIES_429 = 3
"""A row the service rate-limits is retried after its Retry-After this many times, then reported."""
RETRY_AFTER_CAP_S = 60.0


@dataclass(frozen=True)
class ScoredRow:
    """One output row."""

    row: int
    reference: str
    release: str
    status: str  # "scored" or "refused"
    http_status: int
    probability: float | None = None
    band: str = ""
    reasons: str = ""
    error: str = ""

    def as_csv(self) -> list[str]:
        return [str(self.row), self.reference, self.release, self.status, str(self.http_status),
                "" if self.probability is None else f"{self.probability:.2f}", self.band, self.reasons, self.error]


def read_rows(path: Path, default_release: str = "") -> list[tuple[int, str, str, str]]:
    """(row number, reference, release, grant) per input row; refuses, naming the file and row, a
    file without a `grant` column, a row without a grant or a release, or more than MAX_ROWS rows."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or "grant" not in reader.fieldnames:
                raise ConfigError(f"--input {path}: needs a 'grant' column (columns: "
                                  f"{', '.join(reader.fieldnames or []) or 'none'})")
            rows = []
            for number, record in enumerate(reader, start=1):
                if number > MAX_ROWS:
                    raise ConfigError(f"--input {path}: more than {MAX_ROWS:,} rows; split the batch")
                grant = (record.get("grant") or "").strip()
                release = (record.get("release") or "").strip() or default_release
                if not grant:
                    raise ConfigError(f"--input {path}: row {number} has no grant")
                if not release:
                    raise ConfigError(f"--input {path}: row {number} names no release (add a 'release' column "
                                      "or give --release)")
                rows.append((number, (record.get("reference") or "").strip(), release, grant))
    except FileNotFoundError:
        raise ConfigError(f"--input {path}: no such file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--input {path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise ConfigError(f"--input {path}: not a readable CSV ({exc})") from None
    if not rows:
        raise ConfigError(f"--input {path}: no rows to score")
    return rows


def score_rows(rows: list[tuple[int, str, str, str]], service: str, api_key: str, *,
               timeout: float = 60.0, sleep: Callable[[float], None] = time.sleep) -> Iterator[ScoredRow]:
    """Score each row with its own request; yields one ScoredRow per input row, in order."""
    base = service.rstrip("/")
    with httpx.Client(base_url=base, headers={"X-API-Key": api_key}, timeout=timeout) as client:
        for number, reference, release, grant in rows:
            yield _one(client, number, reference, release, grant, sleep)


def _one(client: httpx.Client, number: int, reference: str, release: str, grant: str,
         sleep: Callable[[float], None]) -> ScoredRow:
    for attempt in range(MAX_RETRIES_429 + 1):
        try:
            reply = client.post("/v1/scores", json={"grant": grant, "release": release})
        except httpx.TimeoutException:
            return ScoredRow(number, reference, release, "refused", 0,
                             error="no answer in time (the hospital may have used the grant)")
        except httpx.HTTPError as exc:
            return ScoredRow(number, reference, release, "refused", 0, error=f"service unreachable: {type(exc).__name__}")
        if reply.status_code == 429 and attempt < MAX_RETRIES_429:
            try:
                wait = float(reply.headers.get("Retry-After", "1"))
            except ValueError:
                wait = 1.0
            sleep(min(max(wait, 0.0), RETRY_AFTER_CAP_S))
            continue
        break
    if reply.status_code == 401:
        raise ConfigError("the service refused the API key (401): check --key-file")
    try:
        body = reply.json()
    except ValueError:
        body = {}
    if reply.status_code == 200:
        try:
            reasons = "; ".join(str(r.get("phrase", "")) for r in body.get("reasons", []))
            return ScoredRow(number, reference, str(body.get("release", release)), "scored", 200,
                             probability=float(body["probability"]), band=str(body.get("band", "")), reasons=reasons)
        except (KeyError, TypeError, ValueError, AttributeError):
            return ScoredRow(number, reference, release, "refused", 200,
                             error="the service's answer was malformed (the grant may have been used)")
    detail = " ".join(str(body.get("detail", reply.reason_phrase)).split()) if isinstance(body, dict) else ""
    return ScoredRow(number, reference, release, "refused", reply.status_code, error=detail[:300])


def score_file(input_path: Path, output_path: Path, service: str, api_key: str, *, default_release: str = "",
               sleep: Callable[[float], None] = time.sleep) -> dict[str, int]:
    """Score every row of `input_path` into `output_path`; returns counts by status.

    Rows are written and flushed as they are scored, to `<output>.partial` until the batch is done.
    A batch cut short (the key revoked mid-way, an interrupt) keeps the `.partial` file: the grants
    its rows used are spent, so their scores cannot be had again, and the error says how many rows
    it holds."""
    rows = read_rows(input_path, default_release)
    output_path = Path(output_path)
    tmp = output_path.with_name(output_path.name + ".partial")
    for path in (output_path, tmp):
        if path.exists():
            raise ConfigError(f"--output: {path} exists; choose a new file")
    counts = {"scored": 0, "refused": 0}
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(OUTPUT_COLUMNS)
        try:
            for scored in score_rows(rows, service, api_key, sleep=sleep):
                writer.writerow(scored.as_csv())
                handle.flush()
                counts[scored.status] += 1
        except BaseException as error:
            handle.flush()
            done = counts["scored"] + counts["refused"]
            raise ConfigError(f"the batch stopped after {done} of {len(rows)} rows ({type(error).__name__}: "
                              f"{error}); the rows done are in {tmp} (their grants are spent: keep it)") from None
    tmp.replace(output_path)
    return counts
