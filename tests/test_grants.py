"""Consent grants: signed, bank- and purpose-bound, expiring, revocable; every refusal audited."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
from datetime import timedelta
from pathlib import Path

import pytest

from privacy.audit import ROLE_HOSPITAL, AuditLog
from privacy.grants import (
    EXPIRED,
    FORGED,
    GRANT_REFUSED,
    MALFORMED,
    REVOKED,
    SCORING_PURPOSE,
    SIGNING_KEY_FILE,
    TOKEN_PREFIX,
    UNKNOWN,
    WRONG_BANK,
    WRONG_PURPOSE,
    GrantAuthority,
    GrantError,
    GrantRefused,
    peek_payload,
    verify_signature,
)

HOSPITAL = "hospital_00"
PSEUDONYM = "0123456789abcdef0123456789abcdef"


def _authority(directory: Path, hospital: str = HOSPITAL) -> tuple[GrantAuthority, AuditLog]:
    directory.mkdir(parents=True, exist_ok=True)
    audit = AuditLog(directory / "audit.sqlite", role=ROLE_HOSPITAL, identity=hospital)
    return GrantAuthority(directory, hospital, audit=audit), audit


def _decode(part: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def _encode(payload: dict) -> str:
    raw = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.fixture()
def node(tmp_path: Path) -> tuple[GrantAuthority, AuditLog]:
    return _authority(tmp_path / "node")


def _assert_refused(authority: GrantAuthority, audit: AuditLog, token: str, *, kind: str, words: str,
                    bank: str = "bank-a", purpose: str = SCORING_PURPOSE, **kwargs: object) -> None:
    """Refused with `kind`, a one-line reason containing `words`, recorded in the node's audit log,
    and no pseudonym in the reason or anywhere in the log."""
    with pytest.raises(GrantRefused) as refused:
        authority.verify(token, bank, purpose, **kwargs)
    reason = str(refused.value)
    assert refused.value.kind == kind
    assert words in reason and "\n" not in reason and PSEUDONYM not in reason
    last = audit.entries()[-1]
    assert last.action == GRANT_REFUSED
    assert last.details["kind"] == kind and last.details["reason"] == reason
    assert PSEUDONYM.encode() not in (audit.path).read_bytes()
    assert audit.verify().ok


def test_issue_and_verify_round_trip(node: tuple[GrantAuthority, AuditLog], tmp_path: Path) -> None:
    authority, audit = node
    token = authority.issue(PSEUDONYM, "bank-a", days=30)

    prefix, body, signature = token.rsplit(".", 2)
    assert prefix == TOKEN_PREFIX and signature
    payload = _decode(body)
    assert set(payload) == {"grant", "hospital", "bank", "purpose", "issued", "expires"}
    assert PSEUDONYM not in token and PSEUDONYM not in json.dumps(payload)

    grant = authority.verify(token, "bank-a", SCORING_PURPOSE)
    assert grant.pseudonym == PSEUDONYM
    assert (grant.payload.hospital, grant.payload.bank, grant.payload.purpose) == (HOSPITAL, "bank-a", SCORING_PURPOSE)
    assert grant.payload.expires - grant.payload.issued == timedelta(days=30)

    # Anyone with the published key can check the signature and read the routing fields.
    checked = verify_signature(token, authority.public_key_pem())
    assert checked == grant.payload == peek_payload(token)

    # The key persists: a fresh authority on the same node (another process) verifies the token.
    again = GrantAuthority(authority.directory, HOSPITAL)
    assert again.verify(token, "bank-a").grant_id == grant.grant_id
    key_mode = stat.S_IMODE((authority.directory / SIGNING_KEY_FILE).stat().st_mode)
    assert key_mode == 0o600
    assert [e.action for e in audit.entries()] == ["grant.issue"]
    assert PSEUDONYM.encode() not in audit.path.read_bytes()


def test_tampered_payload_is_forged(node: tuple[GrantAuthority, AuditLog]) -> None:
    authority, audit = node
    prefix, body, signature = authority.issue(PSEUDONYM, "bank-a").rsplit(".", 2)
    payload = _decode(body)
    for field, value in (("bank", "bank-b"), ("expires", "2099-01-01T00:00:00Z")):
        tampered = f"{prefix}.{_encode({**payload, field: value})}.{signature}"
        _assert_refused(authority, audit, tampered, bank=payload["bank"] if field != "bank" else "bank-b",
                        kind=FORGED, words="signature does not verify")


def test_token_signed_with_another_key_is_forged(node: tuple[GrantAuthority, AuditLog], tmp_path: Path) -> None:
    authority, audit = node
    impostor, _ = _authority(tmp_path / "impostor", hospital=HOSPITAL)  # same name, different key
    token = impostor.issue(PSEUDONYM, "bank-a")
    _assert_refused(authority, audit, token, kind=FORGED, words="signature does not verify")
    with pytest.raises(GrantRefused, match="signature does not verify"):
        verify_signature(token, authority.public_key_pem())


def test_genuine_signature_but_grant_not_issued_here_is_refused(node: tuple[GrantAuthority, AuditLog],
                                                                 tmp_path: Path) -> None:
    authority, audit = node
    stolen = tmp_path / "stolen"
    stolen.mkdir()
    shutil.copy2(authority.directory / SIGNING_KEY_FILE, stolen / SIGNING_KEY_FILE)
    token = GrantAuthority(stolen, HOSPITAL).issue(PSEUDONYM, "bank-a")
    _assert_refused(authority, audit, token, kind=UNKNOWN, words="unknown grant")


def test_expired_grant_is_refused(node: tuple[GrantAuthority, AuditLog]) -> None:
    authority, audit = node
    token = authority.issue(PSEUDONYM, "bank-a", days=1)
    expires = peek_payload(token).expires
    assert authority.verify(token, "bank-a", now=expires - timedelta(seconds=1)).pseudonym == PSEUDONYM
    _assert_refused(authority, audit, token, kind=EXPIRED, words="expired on", now=expires)


def test_revoked_grant_is_refused_from_the_next_request(node: tuple[GrantAuthority, AuditLog]) -> None:
    authority, audit = node
    token = authority.issue(PSEUDONYM, "bank-a")
    authority.verify(token, "bank-a")
    grant_id = peek_payload(token).grant_id
    other_process = GrantAuthority(authority.directory, HOSPITAL)
    other_process.revoke(grant_id)
    other_process.revoke(grant_id)  # idempotent
    _assert_refused(authority, audit, token, kind=REVOKED, words="revoked on")
    with pytest.raises(GrantError, match="no grant with that id"):
        authority.revoke("f" * 32)


def test_wrong_bank_and_wrong_purpose_are_refused(node: tuple[GrantAuthority, AuditLog]) -> None:
    authority, audit = node
    token = authority.issue(PSEUDONYM, "bank-a")
    _assert_refused(authority, audit, token, bank="bank-b", kind=WRONG_BANK, words="another bank")
    _assert_refused(authority, audit, token, purpose="credit-risk-research", kind=WRONG_PURPOSE,
                    words="covers 'applicant-scoring'")
    assert authority.verify(token, "bank-a").pseudonym == PSEUDONYM


@pytest.mark.parametrize("token", [
    "", "not a token", f"{TOKEN_PREFIX}.%%%.abc", f"{TOKEN_PREFIX}.{_encode({'grant': 'x'})}.abc",
    f"other-format.v1.{_encode({'grant': 'a' * 32})}.abc", TOKEN_PREFIX + "." + "A" * 5000 + ".abc"])
def test_malformed_tokens_are_refused(node: tuple[GrantAuthority, AuditLog], token: str) -> None:
    authority, audit = node
    _assert_refused(authority, audit, token, kind=MALFORMED, words="malformed token")


def test_issue_rejects_bad_parameters(node: tuple[GrantAuthority, AuditLog]) -> None:
    authority, _ = node
    for kwargs, words in (({"bank": "bank a"}, "bank id"), ({"days": 0}, "1 to 365 days"),
                          ({"days": 400}, "1 to 365 days"), ({"pseudonym": "MRN-1234"}, "pseudonym")):
        arguments = {"pseudonym": PSEUDONYM, "bank": "bank-a", **kwargs}
        with pytest.raises(GrantError, match=words):
            authority.issue(**arguments)


def test_exposed_signing_key_is_refused(node: tuple[GrantAuthority, AuditLog]) -> None:
    authority, _ = node
    os.chmod(authority.directory / SIGNING_KEY_FILE, 0o644)
    with pytest.raises(GrantError, match="chmod 600"):
        GrantAuthority(authority.directory, HOSPITAL)
