"""Consent grants: signed; bound to one bank, purpose and release; a few uses, counted atomically
and rate-limited per grant; expiring soon; revocable; every refusal audited."""

from __future__ import annotations

import base64
import json
import os
import shutil
import sqlite3
import stat
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cli import scoring as cli_scoring
from privacy import grants
from privacy.audit import ROLE_HOSPITAL, AuditLog
from privacy.grants import (
    EXPIRED,
    FORGED,
    GRANT_REFUSED,
    MALFORMED,
    RATE_LIMITED,
    REVOKED,
    SCORING_PURPOSE,
    SIGNING_KEY_FILE,
    TOKEN_PREFIX,
    UNKNOWN,
    USED_UP,
    WRONG_BANK,
    WRONG_PURPOSE,
    WRONG_RELEASE,
    Grant,
    GrantAuthority,
    GrantError,
    GrantPayload,
    GrantRefused,
    peek_payload,
    verify_signature,
)

HOSPITAL = "hospital_00"
PSEUDONYM = "0123456789abcdef0123456789abcdef"
RELEASE = "r1"


def _authority(directory: Path, hospital: str = HOSPITAL, **kwargs: float) -> tuple[GrantAuthority, AuditLog]:
    directory.mkdir(parents=True, exist_ok=True)
    audit = AuditLog(directory / "audit.sqlite", role=ROLE_HOSPITAL, identity=hospital)
    return GrantAuthority(directory, hospital, audit=audit, **kwargs), audit


def _decode(part: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def _encode(payload: dict) -> str:
    raw = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.fixture()
def node(tmp_path: Path) -> tuple[GrantAuthority, AuditLog]:
    return _authority(tmp_path / "node")


def _assert_refused(authority: GrantAuthority, audit: AuditLog, token: str, *, kind: str, words: str,
                    bank: str = "bank-a", release: str = RELEASE, purpose: str = SCORING_PURPOSE,
                    **kwargs: object) -> None:
    """Refused with `kind`, a one-line reason containing `words`, recorded in the node's audit log,
    and no pseudonym in the reason or anywhere in the log."""
    with pytest.raises(GrantRefused) as refused:
        authority.verify(token, bank, release, purpose, **kwargs)
    _assert_audited(audit, refused.value, kind, words)


def _assert_audited(audit: AuditLog, refusal: GrantRefused, kind: str, words: str) -> None:
    reason = str(refusal)
    assert refusal.kind == kind
    assert words in reason and "\n" not in reason and PSEUDONYM not in reason
    last = audit.entries()[-1]
    assert last.action == GRANT_REFUSED
    assert last.details["kind"] == kind and last.details["reason"] == reason
    assert PSEUDONYM.encode() not in (audit.path).read_bytes()
    assert audit.verify().ok


def test_issue_and_verify_round_trip(node: tuple[GrantAuthority, AuditLog], tmp_path: Path) -> None:
    authority, audit = node
    token = authority.issue(PSEUDONYM, "bank-a", RELEASE, hours=30)

    prefix, body, signature = token.rsplit(".", 2)
    assert prefix == TOKEN_PREFIX == "fedrisk-grant.v2" and signature
    payload = _decode(body)
    assert set(payload) == {"grant", "hospital", "bank", "purpose", "release", "uses", "issued", "expires"}
    assert (payload["release"], payload["uses"]) == (RELEASE, 1)  # one release, one score by default
    assert PSEUDONYM not in token and PSEUDONYM not in json.dumps(payload)

    grant = authority.verify(token, "bank-a", RELEASE, SCORING_PURPOSE)
    assert grant.pseudonym == PSEUDONYM
    assert (grant.payload.hospital, grant.payload.bank, grant.payload.purpose, grant.payload.release) == (
        HOSPITAL, "bank-a", SCORING_PURPOSE, RELEASE)
    assert grant.payload.expires - grant.payload.issued == timedelta(hours=30)
    default = peek_payload(authority.issue(PSEUDONYM, "bank-a", RELEASE))
    assert default.expires - default.issued == timedelta(hours=24)

    # Anyone with the published key can check the signature and read the routing fields.
    checked = verify_signature(token, authority.public_key_pem())
    assert checked == grant.payload == peek_payload(token)

    # The key persists: a fresh authority on the same node (another process) verifies the token.
    again = GrantAuthority(authority.directory, HOSPITAL)
    assert again.verify(token, "bank-a", RELEASE).grant_id == grant.grant_id
    key_mode = stat.S_IMODE((authority.directory / SIGNING_KEY_FILE).stat().st_mode)
    assert key_mode == 0o600
    assert [e.action for e in audit.entries()] == ["grant.issue", "grant.issue"]
    assert (audit.entries()[0].details["release"], audit.entries()[0].details["uses"]) == (RELEASE, 1)
    assert PSEUDONYM.encode() not in audit.path.read_bytes()


def test_tampered_payload_is_forged(node: tuple[GrantAuthority, AuditLog]) -> None:
    authority, audit = node
    prefix, body, signature = authority.issue(PSEUDONYM, "bank-a", RELEASE).rsplit(".", 2)
    payload = _decode(body)
    for field, value in (("bank", "bank-b"), ("expires", "2099-01-01T00:00:00Z"), ("release", "r2"), ("uses", 10)):
        tampered = f"{prefix}.{_encode({**payload, field: value})}.{signature}"
        _assert_refused(authority, audit, tampered, bank=payload["bank"] if field != "bank" else "bank-b",
                        release="r2" if field == "release" else RELEASE, kind=FORGED, words="signature does not verify")


def test_token_signed_with_another_key_is_forged(node: tuple[GrantAuthority, AuditLog], tmp_path: Path) -> None:
    authority, audit = node
    impostor, _ = _authority(tmp_path / "impostor", hospital=HOSPITAL)  # same name, different key
    token = impostor.issue(PSEUDONYM, "bank-a", RELEASE)
    _assert_refused(authority, audit, token, kind=FORGED, words="signature does not verify")
    with pytest.raises(GrantRefused, match="signature does not verify"):
        verify_signature(token, authority.public_key_pem())


def test_genuine_signature_but_grant_not_issued_here_is_refused(node: tuple[GrantAuthority, AuditLog],
                                                                 tmp_path: Path) -> None:
    authority, audit = node
    stolen = tmp_path / "stolen"
    stolen.mkdir()
    shutil.copy2(authority.directory / SIGNING_KEY_FILE, stolen / SIGNING_KEY_FILE)
    token = GrantAuthority(stolen, HOSPITAL).issue(PSEUDONYM, "bank-a", RELEASE)
    _assert_refused(authority, audit, token, kind=UNKNOWN, words="unknown grant")


def test_expired_grant_is_refused(node: tuple[GrantAuthority, AuditLog]) -> None:
    authority, audit = node
    token = authority.issue(PSEUDONYM, "bank-a", RELEASE, hours=1)
    expires = peek_payload(token).expires
    grant = authority.verify(token, "bank-a", RELEASE, now=expires - timedelta(seconds=1))
    assert grant.pseudonym == PSEUDONYM
    _assert_refused(authority, audit, token, kind=EXPIRED, words="expired on", now=expires)
    with pytest.raises(GrantRefused) as late:  # verified just before expiry, spent just after: refused
        authority.consume(grant, now=expires)
    _assert_audited(audit, late.value, EXPIRED, "expired on")


def test_revoked_grant_is_refused_from_the_next_request(node: tuple[GrantAuthority, AuditLog]) -> None:
    authority, audit = node
    token = authority.issue(PSEUDONYM, "bank-a", RELEASE)
    grant = authority.verify(token, "bank-a", RELEASE)
    grant_id = peek_payload(token).grant_id
    other_process = GrantAuthority(authority.directory, HOSPITAL, audit=audit)
    other_process.revoke(grant_id)
    other_process.revoke(grant_id)  # idempotent: one revocation, audited once
    _assert_refused(authority, audit, token, kind=REVOKED, words="revoked on")
    with pytest.raises(GrantRefused) as late:  # verified before the revocation, spent after: refused
        authority.consume(grant)
    _assert_audited(audit, late.value, REVOKED, "revoked on")
    assert [e.action for e in audit.entries()].count("grant.revoke") == 1
    with pytest.raises(GrantError, match="no grant with that id"):
        authority.revoke("f" * 32)


def test_wrong_bank_purpose_and_release_are_refused(node: tuple[GrantAuthority, AuditLog]) -> None:
    authority, audit = node
    token = authority.issue(PSEUDONYM, "bank-a", RELEASE)
    _assert_refused(authority, audit, token, bank="bank-b", kind=WRONG_BANK, words="another bank")
    _assert_refused(authority, audit, token, purpose="credit-risk-research", kind=WRONG_PURPOSE,
                    words="covers 'applicant-scoring'")
    _assert_refused(authority, audit, token, release="r2", kind=WRONG_RELEASE, words="covers release r1, not r2")
    assert audit.entries()[-1].details["release"] == "r2"
    assert authority.verify(token, "bank-a", RELEASE).pseudonym == PSEUDONYM  # refusals spent nothing


@pytest.mark.parametrize("token", [
    "", "not a token", f"{TOKEN_PREFIX}.%%%.abc", f"{TOKEN_PREFIX}.{_encode({'grant': 'x'})}.abc",
    f"other-format.v1.{_encode({'grant': 'a' * 32})}.abc", TOKEN_PREFIX + "." + "A" * 5000 + ".abc",
    f"fedrisk-grant.v1.{_encode({'grant': 'a' * 32})}.abc",  # the old format: no release, no uses
    f"{TOKEN_PREFIX}.{_encode({'grant': 'a' * 32, 'hospital': HOSPITAL, 'bank': 'bank-a', 'purpose': SCORING_PURPOSE, 'release': RELEASE, 'uses': 1000, 'issued': '2026-01-01T00:00:00Z', 'expires': '2026-01-02T00:00:00Z'})}.abc"])
def test_malformed_tokens_are_refused(node: tuple[GrantAuthority, AuditLog], token: str) -> None:
    authority, audit = node
    _assert_refused(authority, audit, token, kind=MALFORMED, words="malformed token")


def test_issue_rejects_bad_parameters(node: tuple[GrantAuthority, AuditLog]) -> None:
    authority, _ = node
    for kwargs, words in (({"bank": "bank a"}, "bank id"), ({"hours": 0}, "1 to 720 hours"),
                          ({"hours": 721}, r"1 to 720 hours \(30 days\), got 721"), ({"hours": 365 * 24}, "1 to 720 hours"),
                          ({"uses": 0}, "1 to 10 uses"), ({"uses": 11}, "1 to 10 uses"), ({"uses": True}, "1 to 10 uses"),
                          ({"release": "../r1"}, "release id"), ({"release": ""}, "release id"),
                          ({"pseudonym": "MRN-1234"}, "pseudonym")):
        arguments = {"pseudonym": PSEUDONYM, "bank": "bank-a", "release": RELEASE, **kwargs}
        with pytest.raises(GrantError, match=words):
            authority.issue(**arguments)


def test_exposed_signing_key_is_refused(node: tuple[GrantAuthority, AuditLog]) -> None:
    authority, _ = node
    os.chmod(authority.directory / SIGNING_KEY_FILE, 0o644)
    with pytest.raises(GrantError, match="chmod 600"):
        GrantAuthority(authority.directory, HOSPITAL)



def test_uses_are_counted_and_the_next_one_is_refused(tmp_path: Path) -> None:
    authority, audit = _authority(tmp_path / "node", min_interval_s=0)
    token = authority.issue(PSEUDONYM, "bank-a", RELEASE, uses=3)
    held = authority.verify(token, "bank-a", RELEASE)  # verified now, spent later (a slow request)
    assert [authority.consume(authority.verify(token, "bank-a", RELEASE)) for _ in range(3)] == [2, 1, 0]
    _assert_refused(authority, audit, token, kind=USED_UP, words="used up (it allowed 3 scores)")
    other_process = GrantAuthority(authority.directory, HOSPITAL, audit=audit, min_interval_s=0)
    with pytest.raises(GrantRefused) as late:
        other_process.consume(held)
    _assert_audited(audit, late.value, USED_UP, "used up")


def test_each_grant_is_rate_limited_and_a_refused_use_spends_nothing(tmp_path: Path) -> None:
    authority, audit = _authority(tmp_path / "node")
    assert authority.min_interval_s == grants.DEFAULT_GRANT_INTERVAL_S == 60.0
    token = authority.issue(PSEUDONYM, "bank-a", RELEASE, uses=2)
    sibling = authority.issue(PSEUDONYM, "bank-a", RELEASE, uses=2)
    grant = authority.verify(token, "bank-a", RELEASE)
    start = datetime.now(UTC).replace(microsecond=0)
    assert authority.consume(grant, now=start) == 1

    with pytest.raises(GrantRefused) as limited:
        authority.consume(grant, now=start + timedelta(seconds=1))
    assert limited.value.retry_after == pytest.approx(59.0)
    _assert_audited(audit, limited.value, RATE_LIMITED, "used less than 60 s ago; retry in 59 s")
    _assert_refused(authority, audit, token, kind=RATE_LIMITED, words="retry in 30 s", now=start + timedelta(seconds=30))
    # the limit is per grant: another grant is not held up by this one
    assert authority.consume(authority.verify(sibling, "bank-a", RELEASE), now=start + timedelta(seconds=1)) == 1
    # the refused attempts spent nothing: once the interval has passed, the second use is there
    assert authority.consume(grant, now=start + timedelta(seconds=60)) == 0
    with pytest.raises(GrantError, match="seconds >= 0"):
        GrantAuthority(authority.directory, HOSPITAL, min_interval_s=-1)


@pytest.mark.parametrize(("uses", "interval", "winners"), [(1, 60.0, 1), (3, 0.0, 3), (3, 60.0, 1)])
def test_concurrent_uses_get_exactly_what_the_grant_allows(tmp_path: Path, uses: int, interval: float,
                                                           winners: int) -> None:
    """Racers each hold a verified grant in their own GrantAuthority (as separate node processes
    would) and spend it at the same moment: exactly `winners` succeed, every loser is audited."""
    racers = 16
    authority, audit = _authority(tmp_path / "node", min_interval_s=interval)
    token = authority.issue(PSEUDONYM, "bank-a", RELEASE, uses=uses)
    nodes = [_authority(authority.directory, min_interval_s=interval)[0] for _ in range(racers)]
    held = [node.verify(token, "bank-a", RELEASE) for node in nodes]
    barrier, lock, outcomes = threading.Barrier(racers), threading.Lock(), []

    def race(index: int) -> None:
        barrier.wait()
        try:
            nodes[index].consume(held[index])
            outcome = "scored"
        except GrantRefused as refusal:
            outcome = refusal.kind
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(racers)]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: a check-then-write race shows up
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        sys.setswitchinterval(switch)
    assert not any(t.is_alive() for t in threads) and len(outcomes) == racers
    assert outcomes.count("scored") == winners
    assert set(outcomes) - {"scored"} <= {USED_UP, RATE_LIMITED}
    with sqlite3.connect(authority.db_path) as db:
        assert db.execute("SELECT uses_spent FROM grants").fetchone() == (winners,)
    refusals = [e for e in audit.entries() if e.action == GRANT_REFUSED]
    assert len(refusals) == racers - winners and audit.verify().ok


def test_a_v1_grants_database_is_upgraded_and_its_grants_are_never_usable(tmp_path: Path) -> None:
    node = tmp_path / "node"
    node.mkdir()
    old = "b" * 32
    with sqlite3.connect(node / "grants.sqlite") as db:
        db.execute("CREATE TABLE grants (grant_id TEXT PRIMARY KEY, pseudonym TEXT NOT NULL, bank TEXT NOT NULL, "
                   "purpose TEXT NOT NULL, issued TEXT NOT NULL, expires TEXT NOT NULL, revoked_at TEXT)")
        db.execute("INSERT INTO grants VALUES (?, ?, 'bank-a', ?, '2026-01-01T00:00:00Z', '2099-01-01T00:00:00Z', NULL)",
                   (old, PSEUDONYM, SCORING_PURPOSE))
    authority, audit = _authority(node, min_interval_s=0)
    token = authority.issue(PSEUDONYM, "bank-a", RELEASE)
    assert authority.consume(authority.verify(token, "bank-a", RELEASE)) == 0
    issued, expires = datetime(2026, 1, 1, tzinfo=UTC), datetime(2099, 1, 1, tzinfo=UTC)
    v1 = Grant(GrantPayload(old, HOSPITAL, "bank-a", SCORING_PURPOSE, RELEASE, 1, issued, expires), PSEUDONYM)
    with pytest.raises(GrantRefused) as refused:
        authority.consume(v1)
    _assert_audited(audit, refused.value, USED_UP, "it allowed 0 scores")


def test_cli_defaults_mirror_the_grant_policy() -> None:
    assert (cli_scoring.DEFAULT_GRANT_HOURS, cli_scoring.MAX_GRANT_HOURS, cli_scoring.DEFAULT_GRANT_USES,
            cli_scoring.MAX_GRANT_USES, cli_scoring.DEFAULT_GRANT_INTERVAL_S) == (
        grants.DEFAULT_GRANT_HOURS, grants.MAX_GRANT_HOURS, grants.DEFAULT_GRANT_USES, grants.MAX_GRANT_USES,
        grants.DEFAULT_GRANT_INTERVAL_S) == (24, 720, 1, 10, 60.0)


def test_rotating_the_signing_key_revokes_live_grants_and_a_running_service_follows(tmp_path: Path) -> None:
    """After a suspected leak the hospital replaces its grant key: the old key's tokens are refused as
    revoked (not as forgeries), the service that still holds the old public key refuses new tokens
    until given the new one, and a node service started before the rotation signs and checks with
    the new key at its next request."""
    authority, audit = _authority(tmp_path / "node")
    running, _ = _authority(tmp_path / "node")  # the node service's own instance, made before the rotation
    old_token = authority.issue(PSEUDONYM, "bank-a", RELEASE)
    old_pem = authority.public_key_pem()
    old_private = (tmp_path / "node" / SIGNING_KEY_FILE).read_bytes()
    revoked, new_pem = authority.rotate_key("key file found on a shared drive")
    assert revoked == 1 and new_pem != old_pem
    with pytest.raises(GrantRefused) as refused:
        running.verify(old_token, "bank-a", RELEASE)
    assert refused.value.kind == REVOKED
    new_token = running.issue(PSEUDONYM, "bank-a", RELEASE)  # signed with the new key already
    assert authority.verify(new_token, "bank-a", RELEASE).grant_id == peek_payload(new_token).grant_id
    assert verify_signature(new_token, new_pem).grant_id == peek_payload(new_token).grant_id
    with pytest.raises(GrantRefused) as at_service:
        verify_signature(new_token, old_pem)  # the service with the old key, until re-registered
    assert at_service.value.kind == FORGED
    assert all(old_private not in p.read_bytes() for p in (tmp_path / "node").iterdir() if p.is_file())  # destroyed
    rotation = [e for e in audit.entries() if e.action == "grant.key-rotate"]
    assert len(rotation) == 1 and rotation[0].details["grants-revoked"] == 1
    with pytest.raises(GrantError, match="--reason"):
        authority.rotate_key(" ")
