"""Which records a run may use: consent for the run's purpose, not expired, not revoked.

A hospital records consent per purpose (a boolean column) together with the date it was
given, and optionally the date it expires. `ConsentPolicy` turns those columns, the run's
date and the node's revocations into a mask of usable records and counts of the excluded
ones by reason, never by person. Revocations are recorded at the node, by pseudonym, in a
`RevocationRegistry`; a run reads it once when it starts, so revoking takes effect from the
next run. Pure pandas and SQLite: no federation machinery.
"""

from __future__ import annotations

import re
from contextlib import closing
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import AbstractSet, Mapping, NamedTuple

import numpy as np
import pandas as pd

from federation import stores
from federation.errors import DataError

DEFAULT_VALIDITY_DAYS = 730
"""How long a consent covers its purpose when the export records no expiry date (two years)."""
PURPOSE_PATTERN = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
"""Purposes are slugs such as `credit-risk-research`."""
_PSEUDONYM_PATTERN = re.compile(r"^[0-9a-f]{32}$")
EXCLUSION_REASONS: tuple[str, ...] = ("no-consent-for-purpose", "revoked", "expired")
"""Each excluded record is counted once, under the first of these reasons that applies."""


class ConsentError(DataError):
    """No consent column covers a purpose, or a revocation is malformed."""


@dataclass(frozen=True)
class ConsentFields:
    """Where one purpose's consent lives in a table: the yes/no column, the date it was
    recorded, an optional expiry-date column, and an optional validity period in days that
    overrides the policy default."""

    granted: str
    recorded_on: str | None = None
    expires_on: str | None = None
    validity_days: int | None = None


@dataclass(frozen=True)
class ExclusionCounts:
    """How many records a run left out, by reason (never which ones)."""

    no_consent_for_purpose: int = 0
    revoked: int = 0
    expired: int = 0

    @property
    def total(self) -> int:
        """All excluded records."""
        return self.no_consent_for_purpose + self.revoked + self.expired

    def as_dict(self) -> dict[str, int]:
        """Counts keyed by the reason names in `EXCLUSION_REASONS`, for logs and certificates."""
        return {"no-consent-for-purpose": self.no_consent_for_purpose,
                "revoked": self.revoked, "expired": self.expired}


class ConsentDecision(NamedTuple):
    """`mask[i]` is True when row i may be used; `excluded` counts the others by reason."""

    mask: np.ndarray
    excluded: ExclusionCounts


class ConsentPolicy:
    """Decide record by record whether consent covers a purpose on a given day.

    `fields` maps each purpose slug to its `ConsentFields`. A consent expires on the date in
    its expiry column when one is declared, otherwise `validity_days` (the purpose's own, else
    `default_validity_days`, 730) after the day it was recorded; from that day on it no longer
    covers the purpose. A granted consent with no recorded date cannot be shown to be current
    and counts as expired.
    """

    def __init__(self, fields: Mapping[str, ConsentFields],
                 default_validity_days: int = DEFAULT_VALIDITY_DAYS) -> None:
        if default_validity_days <= 0:
            raise ConsentError(f"consent validity must be a positive number of days, got {default_validity_days}")
        self.fields = dict(fields)
        self.default_validity_days = int(default_validity_days)

    @property
    def purposes(self) -> tuple[str, ...]:
        """Purposes some consent column covers."""
        return tuple(self.fields)

    def _expiry(self, table: pd.DataFrame, fields: ConsentFields) -> pd.Series:
        """The first day each record's consent no longer covers the purpose (NaT if unknown)."""
        if fields.expires_on is not None:
            return pd.to_datetime(table[fields.expires_on], errors="coerce")
        if fields.recorded_on is None:
            return pd.Series(pd.NaT, index=table.index, dtype="datetime64[ns]")
        days = fields.validity_days or self.default_validity_days
        return pd.to_datetime(table[fields.recorded_on], errors="coerce") + pd.Timedelta(days=days)

    def decide(self, table: pd.DataFrame, purpose: str, *, today: date,
               revoked: AbstractSet[str], pseudonyms: pd.Series) -> ConsentDecision:
        """Usable records of `table` for a run with `purpose` on `today`.

        `pseudonyms` holds each row's pseudonym (aligned with `table`, in row order);
        `revoked` is the set of pseudonyms whose consent for `purpose` was withdrawn.
        """
        if purpose not in self.fields:
            known = ", ".join(self.fields) or "none"
            raise ConsentError(f"no consent column covers purpose {purpose!r} (covered: {known})")
        if len(pseudonyms) != len(table):
            raise ConsentError("pseudonyms and table differ in length")
        fields = self.fields[purpose]
        granted = table[fields.granted].astype("boolean").fillna(False).to_numpy(dtype=bool)
        is_revoked = pd.Series(pseudonyms).astype(str).isin(set(revoked)).to_numpy()
        expiry = self._expiry(table, fields)
        current = (expiry > pd.Timestamp(today)).fillna(False).to_numpy(dtype=bool)

        no_consent = ~granted
        revoked_only = granted & is_revoked
        expired_only = granted & ~is_revoked & ~current
        counts = ExclusionCounts(no_consent_for_purpose=int(no_consent.sum()),
                                 revoked=int(revoked_only.sum()), expired=int(expired_only.sum()))
        return ConsentDecision(mask=granted & ~is_revoked & current, excluded=counts)


def _timestamp(when: datetime | date | None) -> str:
    """An ISO timestamp (UTC, seconds) that sorts as text; `None` means now."""
    if when is None:
        when = datetime.now(timezone.utc)
    if not isinstance(when, datetime):
        when = datetime(when.year, when.month, when.day)
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc).replace(tzinfo=None)
    return when.isoformat(timespec="seconds")


REVOKED, RESTORED, ERASED = "revoked", "restored", "erased"
ERASED_PURPOSES = "*"  # an erasure covers every purpose
"""The two events of a consent's withdrawal record."""


class RevocationRegistry:
    """Withdrawn consents, kept on the hospital node in a SQLite file, keyed by pseudonym.

    Only pseudonyms are stored, never record keys. A run calls `revoked(purpose)` once at its
    start and uses that set throughout, so a revocation made during a run applies from the
    next one.

    The record only grows (the node's anchored state head counts it, `clients.anchoring`): a
    patient's first withdrawal for a purpose is a row of `revocations`; undoing it (`restore`, a
    withdrawal recorded by mistake, or consent given again) and withdrawing again afterwards are
    rows of `consent_events`. A consent is withdrawn when its latest event is a withdrawal.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ConsentError(f"revocation registry {self.path} is a directory, not a file")
        try:
            with closing(stores.connect(self.path)) as db, db:
                db.execute("CREATE TABLE IF NOT EXISTS revocations (pseudonym TEXT NOT NULL, "
                           "purpose TEXT NOT NULL, revoked_at TEXT NOT NULL, PRIMARY KEY (pseudonym, purpose))")
                db.execute("CREATE TABLE IF NOT EXISTS consent_events (pseudonym TEXT NOT NULL, purpose TEXT NOT NULL, "
                           f"action TEXT NOT NULL CHECK (action IN ('{REVOKED}', '{RESTORED}')), at TEXT NOT NULL)")
                db.execute("CREATE TABLE IF NOT EXISTS erasures (pseudonym TEXT PRIMARY KEY, at TEXT NOT NULL)")
        except stores.DatabaseError:
            raise ConsentError(f"cannot open revocation registry {self.path}: not a fedrisk registry") from None

    @staticmethod
    def _check(pseudonym: str, purpose: str) -> None:
        if not isinstance(pseudonym, str) or not _PSEUDONYM_PATTERN.match(pseudonym):
            raise ConsentError("a revocation needs a pseudonym (32 lowercase hex characters)")
        if not PURPOSE_PATTERN.match(purpose):
            raise ConsentError(f"purpose {purpose!r} is not a slug such as 'credit-risk-research'")

    def revoke(self, pseudonym: str, purpose: str, when: datetime | date | None = None) -> bool:
        """Record that `pseudonym` withdrew consent for `purpose` at `when` (default now). Returns
        False, recording nothing, if the consent is withdrawn already (the earlier time stands)."""
        self._check(pseudonym, purpose)
        with closing(stores.connect(self.path)) as db, db:
            if self._status(db, pseudonym, purpose) == REVOKED:
                return False
            first = db.execute("INSERT OR IGNORE INTO revocations VALUES (?, ?, ?)",
                               (pseudonym, purpose, _timestamp(when))).rowcount
            if not first:  # withdrawn before, restored since: withdrawn again
                db.execute("INSERT INTO consent_events VALUES (?, ?, ?, ?)",
                           (pseudonym, purpose, REVOKED, _timestamp(when)))
            return True

    def restore(self, pseudonym: str, purpose: str, when: datetime | date | None = None) -> None:
        """Undo the withdrawal of `pseudonym`'s consent for `purpose` from `when` (default now): the
        record is usable again from the next run, query or score. Raises ConsentError if its consent
        for the purpose is not withdrawn."""
        self._check(pseudonym, purpose)
        if pseudonym in self.erased():
            raise ConsentError("this record was erased at the patient's request; its use cannot be restored")
        with closing(stores.connect(self.path)) as db, db:
            if self._status(db, pseudonym, purpose) != REVOKED:
                raise ConsentError(f"no withdrawal of this record's consent for {purpose} is in force; nothing to undo")
            db.execute("INSERT INTO consent_events VALUES (?, ?, ?, ?)", (pseudonym, purpose, RESTORED, _timestamp(when)))

    @staticmethod
    def _status(db: stores.Connection, pseudonym: str, purpose: str) -> str | None:
        """REVOKED, RESTORED or None (never withdrawn) for one consent, now."""
        first = db.execute("SELECT 1 FROM revocations WHERE pseudonym = ? AND purpose = ?", (pseudonym, purpose)).fetchone()
        if not first:
            return None
        latest = db.execute("SELECT action FROM consent_events WHERE pseudonym = ? AND purpose = ? ORDER BY rowid DESC "
                            "LIMIT 1", (pseudonym, purpose)).fetchone()
        return latest[0] if latest else REVOKED

    def entries(self) -> list[tuple[str, ...]]:
        """Every withdrawal as (pseudonym, purpose, revoked_at), in the order recorded, then every
        later restore or repeated withdrawal as (pseudonym, purpose, at, action): what the node's
        anchored state head hashes (`clients.anchoring`); it only grows."""
        with closing(stores.connect(self.path)) as db:
            first = [tuple(row) for row in db.execute(
                "SELECT pseudonym, purpose, revoked_at FROM revocations ORDER BY rowid")]
            events = [tuple(row) for row in db.execute(
                "SELECT pseudonym, purpose, at, action FROM consent_events ORDER BY rowid")]
            erasures = [(row[0], ERASED_PURPOSES, row[1], ERASED) for row in db.execute(
                "SELECT pseudonym, at FROM erasures ORDER BY rowid")]
            return first + events + erasures

    def erase(self, pseudonym: str, when: datetime | date | None = None) -> bool:
        """Record the patient's erasure request: from `when` (default now) the record is excluded
        from every purpose, present and future, for good (no `restore`). False if erased already."""
        self._check(pseudonym, "credit-risk-research")  # the pseudonym's form; every purpose is meant
        with closing(stores.connect(self.path)) as db, db:
            return bool(db.execute("INSERT OR IGNORE INTO erasures VALUES (?, ?)",
                                   (pseudonym, _timestamp(when))).rowcount)

    def erased(self, as_of: datetime | date | None = None) -> set[str]:
        """Pseudonyms erased at or before `as_of` (default: all)."""
        query, parameters = "SELECT pseudonym FROM erasures", ()
        if as_of is not None:
            query, parameters = query + " WHERE at <= ?", (_timestamp(as_of),)
        with closing(stores.connect(self.path)) as db:
            return {row[0] for row in db.execute(query, parameters)}

    def history(self) -> list[tuple[str, str, str, str]]:
        """Every withdrawal and restore as (at, pseudonym, purpose, action), oldest first."""
        rows = [(row[2], row[0], row[1], row[3] if len(row) > 3 else REVOKED) for row in self.entries()
                if len(row) < 4 or row[3] != ERASED]
        return sorted(rows, key=lambda row: row[0])

    def revoked(self, purpose: str, as_of: datetime | date | None = None) -> set[str]:
        """Pseudonyms whose consent for `purpose` stood withdrawn at `as_of` (default: now and
        everything recorded): each one's latest event at or before then is a withdrawal."""
        cutoff = _timestamp(as_of) if as_of is not None else None
        latest: dict[str, tuple[str, int, str]] = {}
        for order, (at, pseudonym, event_purpose, action) in enumerate(self.history()):
            if event_purpose == purpose and (cutoff is None or at <= cutoff):
                if pseudonym not in latest or (at, order) >= latest[pseudonym][:2]:
                    latest[pseudonym] = (at, order, action)
        return {pseudonym for pseudonym, (_, _, action) in latest.items() if action == REVOKED} | self.erased(as_of)
