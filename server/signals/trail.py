"""The signals service's own audit log: one hash-chained entry per request.

Each entry (action `signals.request`, `privacy.audit.AuditLog`) says who called (principal
label, key id, role), what (method, route template, never the concrete URL or body), and the
HTTP status; score requests add the hospital, bank, release, a digest of the grant id and the
refusal kind. Tokens, grants and API keys never enter it. Readers see slices of it:
a caller its own entries, a hospital operator the score requests routed to its hospital,
an auditor all of it with the chain verified.

Slices are read by scanning the log: fine for a service's audit volume on one disk; a busy
deployment would index `key-id` and `hospital` (the AuditLog file stays the record).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from privacy.audit import SIGNALS_REQUEST, AuditEntry, AuditIdentifierError, AuditLog, AuditVerification, Digest
from server.signals.auth import Principal

SERVICE_ROLE = "signals-service"
ANONYMOUS = "anonymous"
SCORES_ENDPOINT = "/v1/scores"
UNMATCHED = "(no such route)"


class RequestTrail:
    """Append and read the per-request audit entries of one service."""

    def __init__(self, path: Path, identity: str = "signals") -> None:
        self.log = AuditLog(path, role=SERVICE_ROLE, identity=identity)
        # Appends from this process's worker threads queue here rather than in SQLite's busy
        # handler, whose growing sleeps (up to 100 ms each) made the tail latency under load.
        self._append_lock = threading.Lock()

    def record(self, principal: Principal | None, method: str, endpoint: str, status: int,
               extra: dict[str, Any] | None = None) -> AuditEntry:
        """Audit one request. If the identifier filter refuses a detail (a label or id that looks
        like a phone number), the entry is kept with that detail withheld rather than lost."""
        who: dict[str, Any] = ({"principal": principal.label, "key-id": Digest(principal.key_id), "role": principal.role}
                               if principal else {"principal": ANONYMOUS, "role": ANONYMOUS})
        if principal and principal.bank:
            who["bank"] = principal.bank
        details = {**who, "method": method, "endpoint": endpoint, "status": int(status), **(extra or {})}
        with self._append_lock:
            try:
                return self.log.append(SIGNALS_REQUEST, details=details)
            except AuditIdentifierError:
                kept = {k: details[k] for k in ("key-id", "role", "method", "endpoint", "status") if k in details}
                return self.log.append(SIGNALS_REQUEST, details={**kept, "withheld": "a detail refused by the identifier filter"})

    def entries(self, *, key_id: str | None = None, hospital: str | None = None,
                limit: int = 100) -> list[AuditEntry]:
        """Newest first: all entries, or those of one key, or the score requests routed to a hospital."""
        selected: list[AuditEntry] = []
        for entry in reversed(self.log.entries()):
            details = _details(entry)
            if key_id is not None and details.get("key-id") != key_id:
                continue
            if hospital is not None and (details.get("endpoint") != SCORES_ENDPOINT
                                         or details.get("hospital") != hospital):
                continue
            selected.append(entry)
            if len(selected) >= limit:
                break
        return selected

    def verify(self) -> AuditVerification:
        """Check the whole chain against its anchor."""
        return self.log.verify()


def _details(entry: AuditEntry) -> dict[str, Any]:
    try:
        return entry.details
    except ValueError:  # a mangled entry: `verify` reports it; a slice just skips it
        return {}


def entry_view(entry: AuditEntry) -> dict[str, Any]:
    """An entry as the API returns it (flat, named fields; chain fields for auditors to check)."""
    d = _details(entry)
    status = d.get("status")
    view: dict[str, Any] = {"seq": entry.seq, "ts": entry.ts, "action": entry.action,
                            "status": status if isinstance(status, int) else None,
                            "hash": entry.hash, "prev_hash": entry.prev_hash}
    for field, key in _TEXT_FIELDS:
        view[field] = None if d.get(key) is None else str(d[key])
    return view


_TEXT_FIELDS = (("principal", "principal"), ("key_id", "key-id"), ("role", "role"), ("bank", "bank"),
                ("method", "method"), ("endpoint", "endpoint"), ("hospital", "hospital"),
                ("release", "release"), ("grant_ref", "grant-ref"), ("refusal", "refusal"), ("reason", "reason"))
