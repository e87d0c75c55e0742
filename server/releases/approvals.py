"""Two approvals before a release: a data scientist's and a hospital operator's, by two people.

A release puts a model trained on hospitals' records in banks' hands, so no one person may make
one: `fedrisk release approve RUN_ID --role data-scientist` and `--role hospital-operator` record
the two approvals (who, when, for which hospital), each bound to the run's model SHA-256, so an
approval of one model never carries over to another. `release create` refuses until both are
there, by different people, and puts them on the certificate. Each approval is audited in the
registry's release log (`release.approve`).

The approvals live in `<registry>/approvals.sqlite`; they only ever grow.
"""

from __future__ import annotations

import re
from contextlib import closing
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from federation import stores
from federation.errors import FedriskError

APPROVALS_FILE = "approvals.sqlite"
ROLE_DATA_SCIENTIST, ROLE_HOSPITAL_OPERATOR = "data-scientist", "hospital-operator"
APPROVER_ROLES = (ROLE_DATA_SCIENTIST, ROLE_HOSPITAL_OPERATOR)
_HOSPITAL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ApprovalError(FedriskError):
    """An approval that cannot be recorded as given (role, name, hospital, run)."""


@dataclass(frozen=True)
class Approval:
    """One person's approval of one run's model, in one role."""

    run_id: str
    sha256: str
    role: str
    by: str
    hospital: str
    at: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


class ApprovalStore:
    """The approvals of a registry directory."""

    def __init__(self, registry_dir: Path) -> None:
        self.path = Path(registry_dir) / APPROVALS_FILE
        with closing(stores.connect(self.path, timeout=30.0)) as db, db:
            db.execute("CREATE TABLE IF NOT EXISTS approvals (run_id TEXT NOT NULL, sha256 TEXT NOT NULL, "
                       "role TEXT NOT NULL, by TEXT NOT NULL, hospital TEXT NOT NULL, at TEXT NOT NULL, "
                       "PRIMARY KEY (run_id, sha256, role, by))")

    def add(self, run_id: str, sha256: str, role: str, by: str, hospital: str = "") -> Approval:
        """Record `by`'s approval of run `run_id`'s model `sha256` as `role` (a hospital operator
        names the hospital); approving twice keeps the first."""
        if role not in APPROVER_ROLES:
            raise ApprovalError(f"--role must be {' or '.join(APPROVER_ROLES)}, got {role!r}")
        by = " ".join(str(by or "").split())
        if not by or len(by) > 120:
            raise ApprovalError("--by must name the approver (1-120 characters)")
        if role == ROLE_HOSPITAL_OPERATOR and not _HOSPITAL.fullmatch(hospital or ""):
            raise ApprovalError("a hospital operator's approval names the hospital (--hospital, e.g. hospital_00)")
        if role == ROLE_DATA_SCIENTIST and hospital:
            raise ApprovalError("--hospital is for a hospital operator's approval")
        approval = Approval(run_id, sha256, role, by, hospital, datetime.now(UTC).isoformat(timespec="seconds"))
        with closing(stores.connect(self.path, timeout=30.0)) as db, db:
            db.execute("INSERT OR IGNORE INTO approvals VALUES (?, ?, ?, ?, ?, ?)",
                       (approval.run_id, approval.sha256, approval.role, approval.by, approval.hospital, approval.at))
        return approval

    def of(self, run_id: str, sha256: str) -> list[Approval]:
        """The approvals of one run's model, oldest first."""
        with closing(stores.connect(self.path, timeout=30.0)) as db:
            rows = db.execute("SELECT run_id, sha256, role, by, hospital, at FROM approvals WHERE run_id = ? AND "
                              "sha256 = ? ORDER BY at, role", (run_id, sha256)).fetchall()
        return [Approval(*row) for row in rows]


def missing_approvals(approvals: list[Approval]) -> str:
    """Why these approvals do not yet allow a release ("" when they do): one per role, by two people."""
    roles = {a.role for a in approvals}
    lacking = [role for role in APPROVER_ROLES if role not in roles]
    if lacking:
        return f"it lacks the {' and '.join(lacking)} approval"
    people = {(a.role, a.by) for a in approvals}
    scientists = {by for role, by in people if role == ROLE_DATA_SCIENTIST}
    operators = {by for role, by in people if role == ROLE_HOSPITAL_OPERATOR}
    if not any(s != o for s in scientists for o in operators):
        return "its two approvals are by the same person; a release needs two people"
    return ""
