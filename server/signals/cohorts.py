"""Approved DP cohort tables: the only cohort statistics a bank can read.

A federated cohort query (`fedrisk analytics run`) writes its DP answer with
`server.analytics.write_result`: a table (`<run-id>.csv`) and `<run-id>.json` holding the query,
its run id and its privacy statement. A data scientist reviews the result and approves it for
release; only then does it appear under `/v1/cohorts`.

Approval re-checks what can be checked without the data, so a hand-edited or mislabelled table
is refused rather than published:
- the query re-validates (`CohortQuery.from_mapping`: public group domains, no identifiers);
- the privacy statement names the query's purpose and a positive epsilon and delta;
- the table has exactly the columns and the cells `server.analytics.estimate` gives for that
  query, in its order (so no extra column or row can ride along);
- rows marked suppressed carry no values (they are blanked again here, whatever the file says).
"""

from __future__ import annotations

import io
import json
import math
import re
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from federation import stores
from federation.errors import ConfigError
from federation.query import CohortQuery

MAX_TABLE_BYTES = 5_000_000
MAX_ROWS = 20_000
SUPPRESSED = "suppressed"
_LABEL_COLUMNS = ("bin_low", "bin_high", "level")  # describe a row, never withheld
COHORT_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,127}$"  # a query run id (federation.query slugs + digest)
_RUN_ID = re.compile(COHORT_ID_PATTERN)
_SCHEMA = """CREATE TABLE IF NOT EXISTS cohorts (
    cohort_id TEXT PRIMARY KEY, query TEXT NOT NULL, privacy TEXT NOT NULL, columns TEXT NOT NULL,
    rows TEXT NOT NULL, approved_by TEXT NOT NULL, approved_at TEXT NOT NULL, note TEXT NOT NULL)"""

Cell = str | float | bool | None


class CohortRefused(ConfigError):
    """A query result cannot be approved (malformed, not what its query produces, or a duplicate)."""


class CohortConflict(CohortRefused):
    """A table with the same run id is already approved (a new run id buys a fresh answer)."""


@dataclass(frozen=True)
class ApprovedCohort:
    """One approved table: the query it answers, its privacy statement and its rows."""

    cohort_id: str
    query: dict[str, Any]
    privacy: dict[str, Any]
    columns: list[str]
    rows: list[dict[str, Cell]]
    approved_by: str
    approved_at: str
    note: str

    def summary(self) -> dict[str, Any]:
        """What a listing shows: the query in one line, its cost, who approved it."""
        q = self.query
        return {"cohort_id": self.cohort_id, "name": q["name"], "purpose": q["purpose"],
                "measure": q["measure"], "field": q.get("field"),
                "group_by": [next(iter(g)) for g in q.get("group-by", [])],
                "epsilon": float(self.privacy["epsilon"]), "delta": float(self.privacy["delta"]),
                "hospitals": len(self.privacy.get("hospitals", [])), "rows": len(self.rows),
                "suppressed_rows": sum(bool(r.get(SUPPRESSED)) for r in self.rows),
                "approved_by": self.approved_by, "approved_at": self.approved_at}


class CohortStore:
    """Approved tables, in the `cohorts` table of `signals.sqlite`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.execute(_SCHEMA)

    def approve(self, result: dict[str, Any], table_csv: str, approved_by: str, note: str = "") -> ApprovedCohort:
        """Check a query result (`<run-id>.json` as a dict and the CSV text) and publish it."""
        if not isinstance(result, dict) or not {"query", "run-id", "privacy"} <= set(result):
            raise CohortRefused("result must be the query result JSON: keys query, run-id, privacy")
        cohort_id = str(result["run-id"])
        if not _RUN_ID.fullmatch(cohort_id):
            raise CohortRefused(f"run-id must be a lower-case slug, got {cohort_id[:80]!r}")
        query = CohortQuery.from_mapping(result["query"], source="result query")
        privacy = _check_privacy(result["privacy"], query)
        columns, rows = _check_table(query, table_csv)
        cohort = ApprovedCohort(cohort_id, query.to_dict(), privacy, columns, rows, approved_by,
                                datetime.now(UTC).isoformat(timespec="seconds"), note[:500])
        try:
            with closing(self._connect()) as db, db:
                db.execute("INSERT INTO cohorts VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (
                    cohort.cohort_id, json.dumps(cohort.query), json.dumps(privacy), json.dumps(columns),
                    json.dumps(rows), approved_by, cohort.approved_at, cohort.note))
        except stores.IntegrityError:
            raise CohortConflict(f"cohort {cohort_id} is already approved") from None
        return cohort

    def approve_files(self, table: Path, approved_by: str, note: str = "") -> ApprovedCohort:
        """Approve the files `write_result` wrote: `table` (.csv) and the .json beside it."""
        table = Path(table)
        try:
            result = json.loads(table.with_suffix(".json").read_text(encoding="utf-8"))
            text = table.read_text(encoding="utf-8")
        except (OSError, ValueError) as exc:
            raise CohortRefused(f"cannot read the query result beside {table}: {type(exc).__name__}") from None
        return self.approve(result, text, approved_by, note)

    def list(self) -> list[ApprovedCohort]:
        """Every approved table, oldest first."""
        with closing(self._connect()) as db:
            rows = db.execute("SELECT * FROM cohorts ORDER BY approved_at, cohort_id").fetchall()
        return [_cohort(row) for row in rows]

    def get(self, cohort_id: str) -> ApprovedCohort | None:
        """One approved table, or None."""
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM cohorts WHERE cohort_id = ?", (cohort_id,)).fetchone()
        return _cohort(row) if row else None

    def purge(self, before: datetime, *, dry_run: bool = False) -> list[str]:
        """Delete the tables approved before `before` (their rows overwritten on disk, SQLite's
        secure_delete); the ids deleted, or with `dry_run` the ids that would be."""
        cutoff = before.astimezone(UTC).isoformat(timespec="seconds")
        with closing(self._connect()) as db, db:
            ids = [row[0] for row in db.execute("SELECT cohort_id FROM cohorts WHERE approved_at < ? "
                                                "ORDER BY approved_at, cohort_id", (cutoff,))]
            if ids and not dry_run:
                db.execute("PRAGMA secure_delete = ON")
                db.execute("DELETE FROM cohorts WHERE approved_at < ?", (cutoff,))
        return ids

    def _connect(self) -> stores.Connection:
        return stores.connect(self.path, timeout=30.0)


def _cohort(row: tuple) -> ApprovedCohort:
    cohort_id, query, privacy, columns, rows, approved_by, approved_at, note = row
    return ApprovedCohort(cohort_id, json.loads(query), json.loads(privacy), json.loads(columns),
                          json.loads(rows), approved_by, approved_at, note)


def _check_privacy(privacy: Any, query: CohortQuery) -> dict[str, Any]:
    if not isinstance(privacy, dict):
        raise CohortRefused("privacy must be the result's privacy statement (a mapping)")
    try:
        epsilon, delta = float(privacy["epsilon"]), float(privacy["delta"])
    except (KeyError, TypeError, ValueError):
        raise CohortRefused("privacy statement needs numeric epsilon and delta") from None
    if not (math.isfinite(epsilon) and epsilon > 0 and 0 < delta < 1):
        raise CohortRefused(f"privacy statement has epsilon {epsilon!r}, delta {delta!r}: not a DP guarantee")
    if privacy.get("purpose") != query.purpose:
        raise CohortRefused(f"privacy statement is for purpose {privacy.get('purpose')!r}, "
                            f"the query for {query.purpose!r}")
    if not isinstance(privacy.get("hospitals"), list) or not privacy["hospitals"]:
        raise CohortRefused("privacy statement must list the hospitals that answered")
    return privacy


def _expected(query: CohortQuery) -> pd.DataFrame:
    """The table `estimate` makes for this query (values meaningless, shape exact)."""
    from server.analytics import estimate  # imports Flower: only needed when approving

    layout = query.layout()
    return estimate(query, np.ones(layout.length - 1), 1.0, 1)


def _check_table(query: CohortQuery, text: str) -> tuple[list[str], list[dict[str, Cell]]]:
    if not isinstance(text, str) or not text.strip():
        raise CohortRefused("table is empty")
    if len(text.encode()) > MAX_TABLE_BYTES:
        raise CohortRefused(f"table is larger than {MAX_TABLE_BYTES:,} bytes")
    expected = _expected(query)
    groups = [g.field for g in query.group_by]
    try:
        table = pd.read_csv(io.StringIO(text), dtype={g: str for g in groups}, keep_default_na=False,
                            na_values=[""], nrows=MAX_ROWS + 1)
    except (ValueError, pd.errors.ParserError):
        raise CohortRefused("table is not readable CSV") from None
    if list(table.columns) != list(expected.columns):
        raise CohortRefused(f"table columns {list(table.columns)[:12]} are not those of a {query.measure} "
                            f"query by {groups or 'nothing'}: {list(expected.columns)}")
    if len(table) != len(expected):
        raise CohortRefused(f"table has {len(table)} rows; the query's cells give {len(expected)}")
    keys = groups + [c for c in _LABEL_COLUMNS if c in expected.columns]
    for key in keys:
        if not _same(table[key], expected[key]):
            raise CohortRefused(f"column {key!r} does not list the query's public cells in order")
    flags = table[SUPPRESSED].astype(str).str.lower()
    if not flags.isin(["true", "false"]).all():
        raise CohortRefused("column 'suppressed' must be true or false")
    table[SUPPRESSED] = flags.eq("true")
    values = [c for c in table.columns if c not in keys and c != SUPPRESSED]
    try:
        table[values] = table[values].astype(float)
    except (ValueError, TypeError):
        raise CohortRefused(f"columns {values} must be numbers") from None
    table.loc[table[SUPPRESSED], values] = np.nan
    rows = [{c: _cell(v) for c, v in row.items()} for row in table.to_dict(orient="records")]
    return list(table.columns), rows


def _same(got: pd.Series, want: pd.Series) -> bool:
    if pd.api.types.is_numeric_dtype(want):
        try:
            return bool(np.allclose(got.astype(float), want.astype(float)))
        except (ValueError, TypeError):
            return False
    return got.astype(str).tolist() == want.astype(str).tolist()


def _cell(value: Any) -> Cell:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return None if value is None else str(value)
