"""Consent grants: a patient authorises one bank, for one purpose, until an expiry, at their hospital.

The hospital node issues a signed *grant token*; the applicant hands it to the bank; the bank
submits it with a score request; the node verifies it against its own records. A token is

    fedrisk-grant.v1.<base64url(canonical JSON payload)>.<base64url(Ed25519 signature)>

signed over the ASCII text before the last dot (prefix included, so a signature cannot be
reused under another format). The payload names the grant (32 random hex characters), the
hospital, the bank, the purpose and the issue and expiry times (ISO UTC). It holds no pseudonym
and no record key: only the node's `grants.sqlite` links a grant to its patient's pseudonym,
so a bank learns nothing that identifies the patient at the hospital.

Anyone holding the hospital's public key can check a token's signature (`verify_signature`,
used by the bank-facing service to route a request); only the node can tell whether a grant
is still valid (`GrantAuthority.verify`: it also exists, is not revoked and not expired).
Pure policy code: SQLite and the `cryptography` library, no HTTP, no Flower.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
import sqlite3
import stat
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from federation.errors import FedriskError
from privacy.audit import AuditIdentifierError, AuditLog, Digest
from privacy.consent import PURPOSE_PATTERN

TOKEN_PREFIX = "fedrisk-grant.v1"
"""Format tag and version: the first part of every token."""
GRANTS_FILE = "grants.sqlite"
SIGNING_KEY_FILE = "grant_signing.key"
"""The hospital's Ed25519 signing key (PKCS#8 PEM, mode 0600); never leaves the node."""
SCORING_PURPOSE = "applicant-scoring"
DEFAULT_GRANT_DAYS = 30
MAX_GRANT_DAYS = 365
"""A grant lasts at most a year: a patient re-authorises a bank rather than consent for ever."""
MAX_TOKEN_CHARS = 2048
"""Longer input is refused as malformed before any decoding (a real token is about 330)."""
GRANT_ID_HEX_CHARS = 32
BANK_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""Bank ids are short slugs such as `bank-a`."""
_GRANT_ID_PATTERN = re.compile(rf"^[0-9a-f]{{{GRANT_ID_HEX_CHARS}}}$")
_PAYLOAD_FIELDS = ("grant", "hospital", "bank", "purpose", "issued", "expires")

# Refusal kinds (GrantRefused.kind): what a service maps to a status code.
MALFORMED, FORGED, UNKNOWN, EXPIRED, REVOKED, WRONG_BANK, WRONG_PURPOSE = (
    "malformed", "forged", "unknown", "expired", "revoked", "wrong-bank", "wrong-purpose")
GRANT_ISSUE, GRANT_REVOKE, GRANT_REFUSED = "grant.issue", "grant.revoke", "grant.refused"
"""Audit actions written at the node."""


class GrantError(FedriskError):
    """A grant operation the user asked for cannot be done (bad bank id, unknown grant id, ...)."""


class GrantRefused(GrantError):
    """A token was refused. `kind` is one of the refusal kinds; the message is one line and never
    holds a pseudonym or record key. `grant_id` is set once the signature has verified."""

    def __init__(self, kind: str, reason: str, grant_id: str | None = None) -> None:
        super().__init__(f"grant refused: {reason}")
        self.kind, self.grant_id = kind, grant_id


@dataclass(frozen=True)
class GrantPayload:
    """What a token says (once its signature has verified): no pseudonym, no record key."""

    grant_id: str
    hospital: str
    bank: str
    purpose: str
    issued: datetime
    expires: datetime


@dataclass(frozen=True)
class Grant:
    """A grant as the issuing node knows it: the payload and the patient's pseudonym."""

    payload: GrantPayload
    pseudonym: str = ""

    @property
    def grant_id(self) -> str:
        return self.payload.grant_id


def _iso(when: datetime) -> str:
    """UTC, whole seconds, `Z` suffix: `2026-11-23T04:26:10Z`."""
    return when.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(text: object) -> datetime:
    if not isinstance(text, str) or not text.endswith("Z"):
        raise ValueError("not an ISO UTC time")
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _split(token: object) -> tuple[bytes, GrantPayload, bytes]:
    """Signing input, payload and signature of a token; GrantRefused(MALFORMED) if it is not one."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        raise GrantRefused(MALFORMED, "malformed token (not a fedrisk grant)")
    prefix, _, rest = token.strip().rpartition(".")
    head, _, body = prefix.rpartition(".")
    if head != TOKEN_PREFIX:
        raise GrantRefused(MALFORMED, f"malformed token (expected {TOKEN_PREFIX}.<payload>.<signature>)")
    try:
        signature, raw = _b64decode(rest), json.loads(_b64decode(body))
        fields = {name: raw[name] for name in _PAYLOAD_FIELDS}
        if not all(isinstance(fields[n], str) for n in ("grant", "hospital", "bank", "purpose")):
            raise TypeError("text fields")
        payload = GrantPayload(fields["grant"], fields["hospital"], fields["bank"], fields["purpose"],
                               _parse_iso(fields["issued"]), _parse_iso(fields["expires"]))
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise GrantRefused(MALFORMED, "malformed token (its payload cannot be read)") from None
    if not _GRANT_ID_PATTERN.match(payload.grant_id):
        raise GrantRefused(MALFORMED, "malformed token (bad grant id)")
    return prefix.encode("ascii"), payload, signature


def peek_payload(token: str) -> GrantPayload:
    """The payload of a token WITHOUT checking its signature: only to find which hospital's key
    to check it with. Raises GrantRefused(MALFORMED)."""
    return _split(token)[1]


def verify_signature(token: str, public_key_pem: str | bytes) -> GrantPayload:
    """The payload of `token` if the hospital holding `public_key_pem` signed it; raises
    GrantRefused (MALFORMED or FORGED). Says nothing about expiry or revocation: only the
    issuing node can (GrantAuthority.verify)."""
    signing_input, payload, signature = _split(token)
    pem = public_key_pem.encode("ascii") if isinstance(public_key_pem, str) else public_key_pem
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError:
        raise GrantError("the hospital's grant key is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise GrantError("the hospital's grant key is not an Ed25519 key")
    try:
        key.verify(signature, signing_input)
    except InvalidSignature:
        raise GrantRefused(FORGED, "forged token (signature does not verify)") from None
    return payload


def _load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The signing key at `path`, created (0600, atomically: temp file + hard link) if absent.
    Refuses a key file that group or others may read."""
    if not path.exists():
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(pem)
            os.link(tmp, path)  # fails if another process created the key first: use theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise GrantError(f"grant signing key {path} is accessible to group or others (mode {mode:04o}); "
                         f"run: chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError:
        raise GrantError(f"grant signing key {path} is damaged") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise GrantError(f"grant signing key {path} is not an Ed25519 key")
    return key


class GrantAuthority:
    """A hospital node's grants: issues, revokes and verifies tokens.

    node_dir: the node directory (holds `grants.sqlite` and `grant_signing.key`, both created on
    first use); hospital: this hospital's name, written into and checked against every token;
    audit: the node's audit log, which records every issue, revocation and refusal (grant id,
    bank, reason; never a pseudonym). Every call reads the database afresh, so a revocation
    applies to the very next verification, in any process.
    """

    def __init__(self, node_dir: Path, hospital: str, *, audit: AuditLog | None = None) -> None:
        self.directory, self.hospital, self.audit = Path(node_dir), hospital, audit
        self.db_path = self.directory / GRANTS_FILE
        self._key = _load_or_create_key(self.directory / SIGNING_KEY_FILE)
        with closing(self._connect()) as db, db:
            db.execute("CREATE TABLE IF NOT EXISTS grants (grant_id TEXT PRIMARY KEY, pseudonym TEXT NOT NULL, "
                       "bank TEXT NOT NULL, purpose TEXT NOT NULL, issued TEXT NOT NULL, "
                       "expires TEXT NOT NULL, revoked_at TEXT)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.db_path, timeout=30.0)

    def public_key_pem(self) -> str:
        """The hospital's grant-verification key (SubjectPublicKeyInfo PEM): safe to publish."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")

    def issue(self, pseudonym: str, bank: str, purpose: str = SCORING_PURPOSE,
              days: int = DEFAULT_GRANT_DAYS) -> str:
        """Record a grant for the patient with `pseudonym` and return its signed token."""
        if not BANK_PATTERN.match(bank or ""):
            raise GrantError("bank id must be 1-64 letters, digits, '.', '-' or '_'")
        if not PURPOSE_PATTERN.match(purpose or ""):
            raise GrantError(f"purpose {purpose!r} is not a slug such as {SCORING_PURPOSE!r}")
        if not isinstance(days, int) or not 1 <= days <= MAX_GRANT_DAYS:
            raise GrantError(f"a grant lasts 1 to {MAX_GRANT_DAYS} days, got {days}")
        if not re.fullmatch(r"[0-9a-f]{32}", pseudonym or ""):
            raise GrantError("a grant needs the patient's pseudonym (32 lowercase hex characters)")
        grant_id = secrets.token_hex(GRANT_ID_HEX_CHARS // 2)
        issued = datetime.now(UTC).replace(microsecond=0)
        expires = issued + timedelta(days=days)
        payload = {"grant": grant_id, "hospital": self.hospital, "bank": bank, "purpose": purpose,
                   "issued": _iso(issued), "expires": _iso(expires)}
        body = _b64encode(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8"))
        signing_input = f"{TOKEN_PREFIX}.{body}"
        token = f"{signing_input}.{_b64encode(self._key.sign(signing_input.encode('ascii')))}"
        with closing(self._connect()) as db, db:
            db.execute("INSERT INTO grants VALUES (?, ?, ?, ?, ?, ?, NULL)",
                       (grant_id, pseudonym, bank, purpose, payload["issued"], payload["expires"]))
        self._record(GRANT_ISSUE, purpose, {"grant": Digest(grant_id), "bank": bank, "expires": payload["expires"]})
        return token

    def revoke(self, grant_id: str, when: datetime | None = None) -> None:
        """Revoke a grant from `when` (default now); revoking twice keeps the first time."""
        if not _GRANT_ID_PATTERN.match(grant_id or ""):
            raise GrantError(f"a grant id is {GRANT_ID_HEX_CHARS} lowercase hex characters")
        with closing(self._connect()) as db, db:
            row = db.execute("SELECT purpose, revoked_at FROM grants WHERE grant_id = ?", (grant_id,)).fetchone()
            if row is None:
                raise GrantError("no grant with that id was issued at this node")
            if row[1] is None:
                db.execute("UPDATE grants SET revoked_at = ? WHERE grant_id = ?",
                           (_iso(when or datetime.now(UTC)), grant_id))
        if row[1] is None:
            self._record(GRANT_REVOKE, row[0], {"grant": Digest(grant_id)})

    def verify(self, token: str, bank: str, purpose: str = SCORING_PURPOSE, now: datetime | None = None) -> Grant:
        """The grant `token` stands for, if it is genuine, issued here for `bank` and `purpose`,
        not revoked and not expired at `now` (default: the current time). Otherwise raises
        GrantRefused with a one-line reason, after recording the refusal in the audit log."""
        try:
            return self._verify(token, bank, purpose, now or datetime.now(UTC))
        except GrantRefused as refusal:
            self._record(GRANT_REFUSED, purpose if PURPOSE_PATTERN.match(purpose or "") else None,
                         {"kind": refusal.kind, "reason": str(refusal),
                          "grant": Digest(refusal.grant_id) if refusal.grant_id else None,
                          "bank": bank if BANK_PATTERN.match(bank or "") else None})
            raise

    def _verify(self, token: str, bank: str, purpose: str, now: datetime) -> Grant:
        payload = verify_signature(token, self.public_key_pem())
        grant_id = payload.grant_id
        if payload.hospital != self.hospital:
            raise GrantRefused(FORGED, "forged token (names another hospital)", grant_id)
        with closing(self._connect()) as db:
            row = db.execute("SELECT pseudonym, bank, purpose, expires, revoked_at FROM grants WHERE grant_id = ?",
                             (grant_id,)).fetchone()
        if row is None:
            raise GrantRefused(UNKNOWN, "unknown grant (not issued at this node)", grant_id)
        pseudonym, stored_bank, stored_purpose, stored_expires, revoked_at = row
        if (stored_bank, stored_purpose, stored_expires) != (payload.bank, payload.purpose, _iso(payload.expires)):
            raise GrantRefused(FORGED, "forged token (differs from the grant issued)", grant_id)
        if payload.bank != bank:
            raise GrantRefused(WRONG_BANK, "the grant was issued to another bank", grant_id)
        if payload.purpose != purpose:
            raise GrantRefused(WRONG_PURPOSE, f"the grant covers {payload.purpose!r}, not {purpose!r}", grant_id)
        if revoked_at is not None and revoked_at <= _iso(now):
            raise GrantRefused(REVOKED, f"revoked on {revoked_at}", grant_id)
        if now >= payload.expires:
            raise GrantRefused(EXPIRED, f"expired on {_iso(payload.expires)}", grant_id)
        return Grant(payload=payload, pseudonym=pseudonym)

    def _record(self, action: str, purpose: str | None, details: dict[str, object]) -> None:
        """Append to the audit log; details the identifier filter rejects (a bank id that looks
        like an ID number) are recorded by the refusal kind alone."""
        if self.audit is None:
            return
        try:
            self.audit.append(action, purpose=purpose, details=details)
        except AuditIdentifierError:
            self.audit.append(action, purpose=purpose, details={"kind": details.get("kind", "unrecorded")})
