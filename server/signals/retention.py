"""Retention at the signals service: approved cohort tables past their time are deleted.

An approved cohort table is a DP release the service publishes to banks. Once its retention has
passed (`fedrisk serve purge --cohorts-older-than-days N`) it is deleted from the service's store,
its rows overwritten on disk, and banks can no longer read it; the purge is audited in the
service's request log (`cohorts.purge`, with the count and the cut-off). Deleting a DP output
does not refund the privacy it cost: that was charged at the hospitals when it was computed.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from federation.errors import ConfigError
from privacy.audit import COHORTS_PURGE
from server.retention import retention_cutoff
from server.signals.cohorts import CohortStore
from server.signals.trail import RequestTrail

_LISTED_IDS = 50  # the audit entry names at most this many tables (an entry is a summary, never a dump)


def purge_cohorts(db: Path, audit: Path, older_than_days: int, *, now: datetime | None = None,
                  dry_run: bool = False) -> list[str]:
    """Delete the cohort tables in `db` approved more than `older_than_days` ago and audit it in
    `audit`; the ids deleted (or, with `dry_run`, that would be, changing nothing)."""
    cutoff = retention_cutoff(older_than_days, "--cohorts-older-than-days", now)
    if not Path(db).is_file():
        raise ConfigError(f"--db {db}: no signals service store there")
    ids = CohortStore(Path(db)).purge(cutoff, dry_run=dry_run)
    if ids and not dry_run:
        RequestTrail(Path(audit)).log.append(COHORTS_PURGE, details={
            "tables": len(ids), "ids": ids[:_LISTED_IDS], "retention-days": older_than_days,
            "cutoff": cutoff.isoformat(timespec="seconds")})
    return ids
