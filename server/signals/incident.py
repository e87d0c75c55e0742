"""Breach scoping and containment at the signals service (`fedrisk incident scope|contain --db DB`).

Given what leaked: an API key (its key id), a bank (every key it holds), or a hospital whose
endpoint misbehaved, and a time window. The scope lists the requests that key, bank or hospital
made or received in the window, from the service's own request log: counts by endpoint and
status, and every score request with its hospital, release and grant reference. The grant
references are grouped per hospital (`grant_refs_by_hospital`): each hospital matches them to its
grants and patients with `fedrisk incident scope --dir NODE --grant-refs FILE`; the service never
learns who they are.

Containment revokes the key(s) or suspends routing to the hospital in one step, audited once in
the service's request log (`incident.contain`).
"""

from __future__ import annotations

import json
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from federation import stores
from federation.errors import ConfigError
from privacy.audit import INCIDENT_CONTAIN, SIGNALS_REQUEST, AuditIdentifierError, AuditLog
from server.signals.auth import KeyStore
from server.signals.trail import SCORES_ENDPOINT, SERVICE_ROLE

__all__ = ["ServiceScope", "contain_at_service", "scope_at_service", "suspend_hospital"]


@dataclass(frozen=True)
class ServiceScope:
    """What an incident could have reached through the service."""

    what: str
    since: str
    until: str
    requests: list[dict[str, Any]] = field(default_factory=list)

    @property
    def by_endpoint(self) -> Counter:
        return Counter((r["method"], r["endpoint"], r["status"]) for r in self.requests)

    @property
    def scores(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["endpoint"] == SCORES_ENDPOINT]

    def grant_refs_by_hospital(self) -> dict[str, list[str]]:
        """hospital -> the grant references of the score requests routed to it (answered or refused)."""
        refs: dict[str, set[str]] = {}
        for request in self.scores:
            if request.get("hospital") and request.get("grant_ref"):
                refs.setdefault(str(request["hospital"]), set()).add(str(request["grant_ref"]))
        return {hospital: sorted(values) for hospital, values in sorted(refs.items())}


def scope_at_service(audit_path: Path, *, key_id: str = "", bank: str = "", hospital: str = "",
                     since: str | None = None, until: str | None = None) -> ServiceScope:
    """The requests of the service's log at `audit_path` that `key_id`, `bank` or `hospital` made or
    received in [since, until). Reads only."""
    if not (key_id or bank or hospital):
        raise ConfigError("say what leaked: --api-key-id, --bank or --hospital")
    low, high = since or "0000-01-01T00:00:00+00:00", until or "9999-12-31T23:59:59+00:00"
    if low >= high:
        raise ConfigError(f"--since {since} is not before --until {until}")
    if not Path(audit_path).is_file():
        raise ConfigError(f"no request log at {audit_path} (give the service's --db)")
    chosen: list[dict[str, Any]] = []
    for entry in AuditLog(audit_path, role=SERVICE_ROLE, identity="incident-scope").entries():
        if entry.action != SIGNALS_REQUEST or not (low <= entry.ts < high):
            continue
        try:
            details = json.loads(entry.details_json)
        except ValueError:
            continue
        if ((key_id and details.get("key-id") == key_id) or (bank and details.get("bank") == bank)
                or (hospital and details.get("hospital") == hospital)):
            chosen.append({"seq": entry.seq, "at": entry.ts, "principal": details.get("principal", ""),
                           "key_id": details.get("key-id", ""), "bank": details.get("bank", ""),
                           "method": details.get("method", ""), "endpoint": details.get("endpoint", ""),
                           "status": details.get("status"), "hospital": details.get("hospital", ""),
                           "release": details.get("release", ""), "grant_ref": details.get("grant-ref", ""),
                           "refusal": details.get("refusal", "")})
    what = ", ".join(x for x in (f"API key {key_id}" if key_id else "", f"bank {bank}" if bank else "",
                                 f"hospital {hospital}" if hospital else "") if x)
    return ServiceScope(what, low, high, chosen)


def suspend_hospital(db: Path, hospital: str) -> bool:
    """Stop routing score requests to `hospital` (re-adding it with `serve hospitals add` resumes).
    Returns False if it was not registered."""
    from server.signals.hospitals import HospitalDirectory

    HospitalDirectory(db)  # adds the suspended_at column to a table made before it
    with closing(stores.connect(db, timeout=30.0)) as connection, connection:
        changed = connection.execute("UPDATE hospitals SET suspended_at = ? WHERE hospital = ?",
                                     (datetime.now(UTC).isoformat(timespec="seconds"), hospital)).rowcount
    return bool(changed)


def contain_at_service(db: Path, audit_path: Path, *, key_id: str = "", bank: str = "", hospital: str = "",
                       reason: str, by: str) -> dict[str, int]:
    """Revoke the API key `key_id`, every live key of `bank`, and/or suspend `hospital`, in one
    audited step. Returns what was done, counted."""
    reason = " ".join(reason.split())
    if not reason:
        raise ConfigError("--reason must say why (it is audited)")
    if not (key_id or bank or hospital):
        raise ConfigError("say what to contain: --api-key-id, --bank or --hospital")
    store = KeyStore(db)
    live = [p for p in store.principals() if p.revoked_at is None]
    targets = [p for p in live if (key_id and p.key_id == key_id) or (bank and p.bank == bank)]
    if key_id and not any(p.key_id == key_id for p in targets):
        raise ConfigError(f"--api-key-id {key_id}: no live API key has that id (see `fedrisk serve keys list`)")
    for principal in targets:
        store.revoke(principal.key_id)
    suspended = 0
    if hospital:
        if not suspend_hospital(db, hospital):
            raise ConfigError(f"--hospital {hospital}: not registered with this service")
        suspended = 1
    done = {"keys-revoked": len(targets), "hospitals-suspended": suspended}
    log = AuditLog(audit_path, role=SERVICE_ROLE, identity="incident-contain")
    details = {**done, "key-id": key_id or None, "bank": bank or None, "hospital": hospital or None,
               "reason": reason[:300], "by": by[:64]}
    try:
        log.append(INCIDENT_CONTAIN, details=details)
    except AuditIdentifierError:
        log.append(INCIDENT_CONTAIN, details={**details, "reason": "withheld by the identifier filter",
                                              "by": "withheld by the identifier filter"})
    return done
