"""Graded protection of medical data, as a hospital's security officer checks it: incident reports
are a restricted class like genetic and psych-social data, and scores never travel over plain HTTP
off this machine, whatever the service's database says."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from clients.schema import RESTRICTED_CLASSES, ColumnSpec
from federation.errors import ConfigError
from server.signals.hospitals import HospitalDirectory, HospitalUnavailable, unprotected_url


def test_incident_reports_are_restricted_unless_the_schema_releases_them() -> None:
    assert {"genetic-biosample", "psych-social", "incident-report"} <= set(RESTRICTED_CLASSES)
    spec = ColumnSpec(name="fall_reported", role="feature", sensitivity="incident-report", type="boolean")
    assert not spec.allowed_for("credit-risk-research")
    released = ColumnSpec(name="fall_reported", role="feature", sensitivity="incident-report", type="boolean",
                          allow_for_purposes=("credit-risk-research",))
    assert released.allowed_for("credit-risk-research") and not released.allowed_for("applicant-scoring")


@pytest.mark.parametrize("url,ok", [
    ("https://node.example:8101", True), ("http://127.0.0.1:8101", True), ("http://[::1]:8101", True),
    ("http://localhost:8101", True), ("http://127.0.0.2:8101", True),
    ("http://node.example:8101", False), ("http://10.0.0.7:8101", False), ("http://0.0.0.0:8101", False),
])
def test_plain_http_is_for_loopback_only(url: str, ok: bool) -> None:
    assert (unprotected_url(url) == "") is ok


def _files(tmp_path: Path) -> tuple[Path, Path]:
    key = tmp_path / "grant-key.pem"
    key.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.PEM,
                                                                         PublicFormat.SubjectPublicKeyInfo))
    token = tmp_path / "service.token"
    token.write_text("fedrisk-svc.example-token\n")
    return key, token


def test_an_http_hospital_off_loopback_is_refused_when_added_and_when_used(tmp_path: Path) -> None:
    key, token = _files(tmp_path)
    directory = HospitalDirectory(tmp_path / "signals.sqlite")
    with pytest.raises(ConfigError, match="only on loopback"):
        directory.add("hospital_00", "http://node.example:8101", key, token)
    assert directory.list() == []
    directory.add("hospital_00", "https://node.example:8101", key, token)
    assert directory.get("hospital_00").service_token() == "fedrisk-svc.example-token"
    with sqlite3.connect(tmp_path / "signals.sqlite") as db:  # someone downgrades the row by hand
        db.execute("UPDATE hospitals SET url = 'http://node.example:8101'")
    with pytest.raises(HospitalUnavailable, match="only on loopback"):
        directory.get("hospital_00").service_token()  # the token is never read for it


def test_api_keys_expire_and_rotate_without_a_gap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main
    from server.signals.auth import AuthError, KeyStore

    store = KeyStore(tmp_path / "signals.sqlite")
    principal, key = store.add("bank-analyst", "acme-risk-team", bank="bank-a", days=30)
    assert store.authenticate(key) == principal and principal.expires > principal.created
    with pytest.raises(AuthError, match="1 to 730 days"):
        store.add("bank-analyst", "acme-risk-team", bank="bank-a", days=0)
    new, new_key = store.rotate(principal.key_id, grace_hours=24)
    assert store.authenticate(key) is not None and store.authenticate(new_key) == new  # both during the grace
    assert (new.label, new.role, new.bank) == (principal.label, principal.role, principal.bank)
    with sqlite3.connect(tmp_path / "signals.sqlite") as db:  # the grace period (or the key's life) ends
        db.execute("UPDATE principals SET expires = '2020-01-01T00:00:00+00:00' WHERE key_id = ?", (principal.key_id,))
    assert store.authenticate(key) is None and store.authenticate(new_key) == new
    with pytest.raises(AuthError, match="no live API key"):
        store.rotate(principal.key_id)  # an expired key cannot be rotated into a fresh one
    assert main(["serve", "keys", "list", "--db", str(tmp_path / "signals.sqlite")]) == 0
    listing = capsys.readouterr().out
    assert f"{principal.key_id}" in listing and "expired 2020-01-01" in listing and "live until" in listing
    assert main(["serve", "keys", "rotate", new.key_id, "--grace-hours", "0", "--db",
                 str(tmp_path / "signals.sqlite")]) == 0
    assert store.authenticate(new_key) is None  # grace 0: the old key stops at once
