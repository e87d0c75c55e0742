"""A patient's erasure request, and retention, at a hospital node (`fedrisk node erase|purge`).

Erasure (`erase_patient`): the patient's record is excluded from every purpose, now and for good
(`privacy.consent.RevocationRegistry.erase`; no restore), their live grants are revoked, and the
link from each of their grants to them is removed. What cannot be purged is reported with the
reason, never hidden:

* models and tables already released that used the record (listed from the patient's usage
  record, `clients.usage`): they are DP, so the record's influence on each is bounded by its
  epsilon, and they cannot be recalled from banks;
* the audit log and the ledger: the audit log is hash-chained and holds only digests, never the
  record; the ledger holds aggregate charges, no per-patient data;
* the hospital's export: the node reads it but does not own it; the record stays excluded until
  the hospital's source system drops it.

The report is computed before anything is changed, so it can be given to the patient; one audit
entry (`consent.erase`) records the erasure with the pseudonym as a digest.

Retention (`purge_node`): grants that ended (expired, revoked or used up) more than the node
policy's `grant_retention_days` ago lose their link to the patient; the grant row (id, bank,
release, dates, uses) stays for the audit trail. One audit entry (`node.purge`) records the count.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from federation import stores
from federation.errors import ConfigError
from privacy.audit import CONSENT_ERASE, NODE_PURGE, AuditIdentifierError, Digest
from privacy.grants import GRANTS_FILE, GrantAuthority, list_grants

PURGED = ""
"""What a purged grant row holds in place of the patient's pseudonym."""


@dataclass(frozen=True)
class ErasureReport:
    """What an erasure did and what it could not undo, for the patient and the hospital's records."""

    hospital: str
    erased: bool
    grants_revoked: int
    grants_unlinked: int
    released_uses: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        head = (f"{self.hospital}: the record is excluded from every purpose from now on (erasure recorded)"
                if self.erased else f"{self.hospital}: the record had been erased already; nothing new was recorded")
        out = [head, f"  grants: {self.grants_revoked} revoked, {self.grants_unlinked} no longer linked to the patient"]
        if self.released_uses:
            out.append("  cannot be recalled (already released, DP-bounded; the patient's influence on each is at most "
                       "the epsilon shown):")
            out += [f"    {line}" for line in self.released_uses]
        out += [f"  kept: {line}" for line in self.kept]
        return out


KEPT = (
    "the audit log: hash-chained, it cannot be edited without breaking the chain, and holds digests, never the record",
    "the budget ledger: aggregate privacy charges, no per-patient data",
    "the export file: the node does not own it; the record stays excluded until the hospital's source system drops it",
)


def _pseudonym(state: object, record_key: str) -> str:
    import pandas as pd

    key = str(record_key).strip()
    if key not in set(state.record_keys()):  # type: ignore[attr-defined]
        raise ConfigError(f"--record-key: no record of {Path(state.data_file).name} has that record key "  # type: ignore[attr-defined]
                          f"(column {state.schema().record_key!r}); nothing was erased")  # type: ignore[attr-defined]
    return str(state.pseudonym_key().pseudonymise(pd.Series([key])).iloc[0])  # type: ignore[attr-defined]


def erase_patient(state: object, record_key: str, *, reason: str, by: str) -> ErasureReport:
    """Carry out the erasure request of the patient with `record_key` (see the module docstring)."""
    from clients.usage import usage_record

    reason = " ".join(str(reason or "").split())
    if not reason:
        raise ConfigError("--reason must say on what basis the record is erased (audited)")
    pseudonym = _pseudonym(state, record_key)
    report = usage_record(state, record_key)  # what was released, before anything changes
    released = [f"{row.at:%Y-%m-%d %H:%M} UTC  {row.kind}  {row.purpose or ''}  {row.what}"
                + (f"  epsilon {row.epsilon:.3g}" if row.epsilon is not None else "")
                for row in report.uses if row.kind != "scoring"]
    registry = state.revocations()  # type: ignore[attr-defined]
    newly = registry.erase(pseudonym)
    authority = GrantAuthority(Path(state.directory), state.hospital)  # type: ignore[attr-defined]
    now = datetime.now(UTC)
    path = Path(state.directory) / GRANTS_FILE  # type: ignore[attr-defined]
    revoked = unlinked = 0
    if path.is_file():
        for grant in list_grants(Path(state.directory), pseudonym=pseudonym):  # type: ignore[attr-defined]
            if grant.state(now) == "active":
                authority.revoke(grant.grant_id, now)
                revoked += 1
        unlinked = _unlink(path, "pseudonym = ?", [(pseudonym,)])
    details = {"pseudonym": Digest(pseudonym), "grants-revoked": revoked, "grants-unlinked": unlinked,
               "released-uses": len(released), "reason": reason[:300], "by": by[:64]}
    audit = state.audit()  # type: ignore[attr-defined]
    try:
        audit.append(CONSENT_ERASE, details=details)
    except AuditIdentifierError:
        audit.append(CONSENT_ERASE, details={**details, "reason": "withheld by the identifier filter",
                                             "by": "withheld by the identifier filter"})
    return ErasureReport(state.hospital, newly, revoked, unlinked, released, list(KEPT))  # type: ignore[attr-defined]


def _unlink(path: Path, where: str, keys: list[tuple[str]]) -> int:
    """Blank the pseudonym of the grant rows matching `where` for each of `keys`, overwriting the
    old bytes (secure_delete) and compacting the file (VACUUM), so the link is gone from the file
    too, not only from the table. Returns the rows changed."""
    with closing(stores.connect(path, timeout=30.0)) as db:
        db.execute("PRAGMA secure_delete = ON")
        with db:
            count = sum(db.execute(f"UPDATE grants SET pseudonym = ? WHERE {where} AND pseudonym != ?",
                                   (PURGED, *key, PURGED)).rowcount for key in keys)
        db.execute("VACUUM")
    return count


def purge_node(state: object, *, now: datetime | None = None, dry_run: bool = False) -> int:
    """Unlink from their patients the grants that ended more than the policy's retention ago;
    returns how many (with `dry_run`, how many would be, changing nothing)."""
    from clients.policy import NodePolicy

    policy = NodePolicy.load(Path(state.directory))  # type: ignore[attr-defined]
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(days=policy.grant_retention_days)
    path = Path(state.directory) / GRANTS_FILE  # type: ignore[attr-defined]
    if not path.is_file():
        return 0
    with closing(stores.connect(path, timeout=30.0)) as db:
        rows = db.execute("SELECT grant_id, expires, revoked_at FROM grants WHERE pseudonym != ?", (PURGED,)).fetchall()
    # a grant ends when revoked or when it expires (a used-up one is kept to its expiry: its last use is unknown here)
    ended = [grant_id for grant_id, expires, revoked_at in rows
             if datetime.fromisoformat(revoked_at or expires) <= min(now, cutoff)]
    if dry_run or not ended:
        return len(ended)
    count = _unlink(path, "grant_id = ?", [(grant_id,) for grant_id in ended])
    state.audit().append(NODE_PURGE, details={  # type: ignore[attr-defined]
        "grants-unlinked": count, "retention-days": policy.grant_retention_days})
    return count
