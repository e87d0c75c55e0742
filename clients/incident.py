"""Breach scoping and containment at a hospital node (`fedrisk incident scope|contain --dir NODE`).

Given what leaked or misbehaved, as the node knows it: a bank (its analysts' key, or the bank
itself), the grant references the signals service names for a leaked API key (`fedrisk incident
scope --db ...` writes one file per hospital), every grant (a leaked grant signing key or a
compromised node), and a time window. The scope lists the grants that could have been used and
their uses in the window from the node's own grant store and audit log, and counts the patients
behind them. Only the hospital maps those pseudonyms to patients: `notification_list` writes the
record keys to a local file (mode 0600) for the hospital's notification, never anywhere else.

Containment revokes the scoped grants in one step, audited once (`incident.contain`) with the
reason and the count.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from federation import stores
from federation.errors import ConfigError
from privacy.audit import INCIDENT_CONTAIN, SCORE_USE, AuditIdentifierError, Digest
from privacy.grants import GRANTS_FILE, grant_ref

__all__ = ["GrantInScope", "NodeScope", "contain_at_node", "notification_list", "scope_at_node"]


@dataclass(frozen=True)
class GrantInScope:
    """One grant the incident could have reached: its id, bank, release, when it was valid, its state
    now, its uses in the window (audit entry seqs), and the patient's pseudonym (never printed whole)."""

    grant_id: str
    bank: str
    release: str
    issued: str
    expires: str
    revoked_at: str | None
    uses_in_window: tuple[int, ...]
    pseudonym: str

    def to_row(self) -> dict[str, object]:
        """What a report shows: no pseudonym, only its first 12 characters as a reference."""
        return {"grant": self.grant_id, "bank": self.bank, "release": self.release, "issued": self.issued,
                "expires": self.expires, "revoked_at": self.revoked_at or "", "uses_in_window": len(self.uses_in_window),
                "audit_seqs": " ".join(map(str, self.uses_in_window)), "patient_ref": self.pseudonym[:12]}


@dataclass(frozen=True)
class NodeScope:
    """What an incident could have reached at one node."""

    hospital: str
    what: str
    since: str
    until: str
    grants: list[GrantInScope] = field(default_factory=list)

    @property
    def patients(self) -> int:
        return len({g.pseudonym for g in self.grants})

    @property
    def used(self) -> list[GrantInScope]:
        return [g for g in self.grants if g.uses_in_window]


def _window(since: str | None, until: str | None) -> tuple[str, str]:
    low = since or "0000-01-01T00:00:00+00:00"
    high = until or "9999-12-31T23:59:59+00:00"
    if low >= high:
        raise ConfigError(f"--since {since} is not before --until {until}")
    return low, high


def read_grant_refs(path: Path) -> set[str]:
    """Grant references (16 hex) from a file the service's scope wrote, one per line."""
    try:
        refs = {line.strip() for line in Path(path).read_text().splitlines() if line.strip()}
    except OSError:
        raise ConfigError(f"--grant-refs {path}: not readable") from None
    bad = [r for r in refs if not (len(r) == 16 and all(c in "0123456789abcdef" for c in r))]
    if bad:
        raise ConfigError(f"--grant-refs {path}: {len(bad)} line(s) are not grant references (16 hex characters)")
    return refs


def scope_at_node(state: object, *, bank: str = "", grant_refs: Iterable[str] = (), every_grant: bool = False,
                  since: str | None = None, until: str | None = None) -> NodeScope:
    """The grants at node `state` (a clients.node_state.NodeState) that a leak could have reached:
    those of `bank`, those the service referenced in `grant_refs`, or (`every_grant`) all, valid
    at some time in [since, until); with their uses in the window from the node's audit log.
    Reads only."""
    low, high = _window(since, until)
    refs = set(grant_refs)
    if not (bank or refs or every_grant):
        raise ConfigError("say what leaked: --bank, --grant-refs or --all-grants")
    path = Path(state.directory) / GRANTS_FILE  # type: ignore[attr-defined]
    rows: list[tuple] = []
    if path.is_file():
        with closing(stores.connect(path, read_only=True, timeout=30.0)) as db:
            rows = db.execute("SELECT grant_id, pseudonym, bank, COALESCE(release, ''), issued, expires, revoked_at "
                              "FROM grants ORDER BY issued, grant_id").fetchall()
    uses: dict[str, list[int]] = {}
    for entry in state.audit().entries():  # type: ignore[attr-defined]
        if entry.action == SCORE_USE and low <= entry.ts < high:
            try:
                grant = json.loads(entry.details_json).get("grant")
            except ValueError:
                continue
            if grant:
                uses.setdefault(str(grant), []).append(entry.seq)
    chosen: list[GrantInScope] = []
    for grant_id, pseudonym, grant_bank, release, issued, expires, revoked_at in rows:
        valid_from, valid_to = issued, min(expires, revoked_at or expires)
        if valid_to < low or valid_from >= high:
            continue  # never usable in the window
        if every_grant or (bank and grant_bank == bank) or grant_ref(grant_id) in refs:
            chosen.append(GrantInScope(grant_id, grant_bank, release, issued, expires, revoked_at,
                                       tuple(uses.get(grant_id, ())), pseudonym))
    what = ", ".join(x for x in (f"bank {bank}" if bank else "", f"{len(refs)} grant reference(s)" if refs else "",
                                 "every grant" if every_grant else "") if x)
    return NodeScope(state.hospital, what, low, high, chosen)  # type: ignore[attr-defined]


def notification_list(state: object, scope: NodeScope, path: Path) -> int:
    """Write the record keys of the patients in `scope` to `path` (CSV, mode 0600, created new): the
    hospital's own notification list, from its export and pseudonym key. Returns the patient count."""
    import pandas as pd

    wanted = {g.pseudonym for g in scope.grants}
    keys = pd.Series(state.record_keys(), dtype="string")  # type: ignore[attr-defined]
    pseudonyms = state.pseudonym_key().pseudonymise(keys)  # type: ignore[attr-defined]
    found = sorted({key for key, p in zip(keys, pseudonyms) if p in wanted})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["record_key"])
        writer.writerows([key] for key in found)
    return len(found)


def contain_at_node(state: object, scope: NodeScope, *, reason: str, by: str) -> int:
    """Revoke every grant of `scope` still live, in one audited step; returns how many were revoked."""
    from privacy.grants import GrantAuthority

    reason = " ".join(reason.split())
    if not reason:
        raise ConfigError("--reason must say why (it is audited)")
    audit = state.audit()  # type: ignore[attr-defined]
    authority = GrantAuthority(Path(state.directory), state.hospital)  # type: ignore[attr-defined]
    now = datetime.now(UTC)
    live = [g for g in scope.grants if not g.revoked_at and datetime.fromisoformat(g.expires) > now]
    for grant in live:
        authority.revoke(grant.grant_id, now)
    details = {"scope": scope.what, "since": scope.since, "until": scope.until, "grants-revoked": len(live),
               "patients": scope.patients, "reason": reason[:300], "by": by[:64],
               "grants": Digest(hashlib.sha256(" ".join(sorted(g.grant_id for g in live)).encode()).hexdigest())}
    try:
        audit.append(INCIDENT_CONTAIN, details=details)
    except AuditIdentifierError:  # the containment stands; words the filter mistrusts are not logged
        audit.append(INCIDENT_CONTAIN, details={**details, "reason": "withheld by the identifier filter",
                                                "by": "withheld by the identifier filter"})
    return len(live)
