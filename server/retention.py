"""What every coordinator-side retention command shares: the retention given in days, checked, and
the cut-off it means (`server.releases.retention` for runs, `server.signals.retention` for cohort
tables)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from federation.errors import ConfigError

MAX_RETENTION_DAYS = 36500


def retention_cutoff(older_than_days: int, flag: str, now: datetime | None = None) -> datetime:
    """The instant `older_than_days` before `now` (default: now, UTC); ConfigError naming `flag`
    unless it is a whole number of days from 1 to MAX_RETENTION_DAYS."""
    if isinstance(older_than_days, bool) or not isinstance(older_than_days, int) \
            or not 1 <= older_than_days <= MAX_RETENTION_DAYS:
        raise ConfigError(f"{flag} must be a whole number of days from 1 to {MAX_RETENTION_DAYS}, "
                          f"got {older_than_days!r}")
    return (now or datetime.now(UTC)) - timedelta(days=older_than_days)
