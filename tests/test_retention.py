"""Coordinator-side retention at the signals service, as its operator and as a bank see it: an
approved cohort table past its retention is deleted (its rows gone from the store's file, not just
unlisted), banks can no longer read it, newer tables stay, the purge is audited, and a dry run or
a bad retention changes nothing. (Old runs and MLflow artifacts: tests/test_releases.py.)"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi.testclient import TestClient

from federation.query import load_query
from server.analytics import QueryResult, estimate, write_result
from server.signals.app import SIGNALS_AUDIT, ServiceSettings, make_app
from server.signals.auth import KeyStore
from server.signals.cohorts import CohortStore
from server.signals.retention import purge_cohorts

QUERY = Path(__file__).resolve().parents[1] / "experiments" / "queries" / "delinquency_by_age_insurance.yaml"


def _cli(*argv: str) -> int:
    from cli.main import main

    return main(list(argv))


def _approve(store: CohortStore, tmp_path: Path, run_id: str) -> None:
    query = load_query(str(QUERY))
    cells = (query.layout().length - 1) // 2
    table = estimate(query, [v for _ in range(cells) for v in (200.0, -60.0)], query.noise_multiplier(), 3)
    csv, meta = write_result(QueryResult(query, run_id, table, ["h0", "h1", "h2"], query.noise_multiplier(),
                                         query.epsilon), tmp_path / f"{run_id}.csv")
    store.approve(json.loads(meta.read_text()), csv.read_text(), "dana", note=f"marker-{run_id}")


def test_cohort_tables_past_retention_are_deleted_for_good_and_audited(tmp_path: Path, capsys) -> None:
    db = tmp_path / "service" / "signals.sqlite"
    store = CohortStore(db)
    _approve(store, tmp_path, "old-table")
    _approve(store, tmp_path, "new-table")
    with sqlite3.connect(db) as raw:  # "old-table" was approved 400 days ago
        raw.execute("UPDATE cohorts SET approved_at = ? WHERE cohort_id = 'old-table'",
                    ((datetime.now(UTC) - timedelta(days=400)).isoformat(timespec="seconds"),))
    bank_key = KeyStore(db).add("bank-analyst", "acme", bank="bank-acme")[1]

    capsys.readouterr()
    assert _cli("serve", "purge", "--db", str(db), "--cohorts-older-than-days", "0") == 2
    assert "--cohorts-older-than-days must be a whole number of days" in capsys.readouterr().err
    assert _cli("serve", "purge", "--db", str(db), "--cohorts-older-than-days", "365", "--dry-run") == 0
    assert "would delete 1 cohort table(s)" in capsys.readouterr().out
    assert [c.cohort_id for c in store.list()] == ["old-table", "new-table"]

    assert _cli("serve", "purge", "--db", str(db), "--cohorts-older-than-days", "365") == 0
    out = capsys.readouterr().out
    assert "deleted 1 cohort table(s)" in out and "old-table" in out
    assert [c.cohort_id for c in store.list()] == ["new-table"]
    raw_bytes = b"".join(p.read_bytes() for p in db.parent.glob("signals.sqlite*"))
    assert b"marker-old-table" not in raw_bytes and b"marker-new-table" in raw_bytes  # overwritten, not unlinked

    with TestClient(make_app(ServiceSettings(db=db, registry_dir=tmp_path / "registry"))) as client:
        headers = {"X-API-Key": bank_key}
        assert client.get("/v1/cohorts/old-table", headers=headers).status_code == 404
        assert client.get("/v1/cohorts/new-table", headers=headers).status_code == 200
    from privacy.audit import AuditLog

    log = AuditLog(db.with_name(SIGNALS_AUDIT), role="signals-service", identity="signals")
    purges = [e for e in log.entries() if e.action == "cohorts.purge"]
    assert len(purges) == 1 and purges[0].details["ids"] == ["old-table"] and log.verify().ok
    assert purge_cohorts(db, db.with_name(SIGNALS_AUDIT), 365) == []  # nothing left to purge: nothing audited
    assert len([e for e in log.entries() if e.action == "cohorts.purge"]) == 1
