"""Consent grants: a patient authorises one bank to score them, with one release, a few times,
for a short while, at their hospital.

The hospital node issues a signed *grant token*; the applicant hands it to the bank; the bank
submits it with a score request; the node verifies it against its own records and counts the
use. A token is

    fedrisk-grant.v2.<base64url(canonical JSON payload)>.<base64url(Ed25519 signature)>

signed over the ASCII text before the last dot (prefix included, so a signature cannot be
reused under another format). The payload names the grant (32 random hex characters), the
hospital, the bank, the purpose, the one release it may be scored with, how many scores it
allows, and the issue and expiry times (ISO UTC). It holds no pseudonym and no record key: only
the node's `grants.sqlite` links a grant to its patient's pseudonym, so a bank learns nothing
that identifies the patient at the hospital.

Why so narrow: a grant that worked for a year, any number of times, with any release, would let
a bank re-score an applicant daily and follow their health. So a grant is bound to one release,
allows `uses` scores (default 1, at most MAX_GRANT_USES), at most one per `min_interval_s` (the
node's per-grant rate limit), and expires after `hours` (default 24, at most MAX_GRANT_HOURS).
The node counts uses in one SQLite write transaction, so concurrent requests (threads or
processes) racing for the last use cannot together spend more than the grant allows.

Anyone holding the hospital's public key can check a token's signature (`verify_signature`,
used by the bank-facing service to route a request); only the node can tell whether a grant
is still valid (`GrantAuthority.verify`: it also exists, is not revoked, expired or used up) and
spend a use of it (`GrantAuthority.consume`).
Pure policy code: SQLite and the `cryptography` library, no HTTP, no Flower.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import re
import secrets
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

from federation import sealing, stores
from federation.errors import FedriskError, KeyMaterialError
from privacy.audit import (GRANT_ISSUE, GRANT_KEY_ROTATE, GRANT_REFUSED, GRANT_REVOKE, AuditIdentifierError, AuditLog,
                           Digest)
from privacy.consent import PURPOSE_PATTERN

TOKEN_PREFIX = "fedrisk-grant.v2"
"""Format tag and version: the first part of every token (v2 added `release` and `uses`)."""
GRANTS_FILE = "grants.sqlite"
SIGNING_KEY_FILE = "grant_signing.key"
RETIRED_KEYS_FILE = "grant_keys_retired.json"
"""Public keys of rotated-away grant signing keys, oldest first (their private keys are destroyed)."""
"""The hospital's Ed25519 signing key (PKCS#8 PEM, mode 0600); never leaves the node."""
SCORING_PURPOSE = "applicant-scoring"
DEFAULT_GRANT_HOURS = 24
MAX_GRANT_HOURS = 30 * 24
"""A grant lasts a day by default and 30 days at most: long enough for a loan decision, too short
to follow an applicant's health."""
DEFAULT_GRANT_USES = 1
MAX_GRANT_USES = 10
"""Scores one grant allows: one by default (a loan application), a few at most (a re-check)."""
DEFAULT_GRANT_INTERVAL_S = 60.0
"""The node's per-grant rate limit: at most one score per grant per minute (0 disables it)."""
MAX_TOKEN_CHARS = 2048
"""Longer input is refused as malformed before any decoding (a real token is about 380)."""
GRANT_ID_HEX_CHARS = 32
BANK_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""Bank ids are short slugs such as `bank-a`."""
RELEASE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""Release ids are plain names such as `r1` (they name a directory at the node)."""
_GRANT_ID_PATTERN = re.compile(rf"^[0-9a-f]{{{GRANT_ID_HEX_CHARS}}}$")
_TEXT_FIELDS = ("grant", "hospital", "bank", "purpose", "release")
_PAYLOAD_FIELDS = (*_TEXT_FIELDS, "uses", "issued", "expires")
_SCHEMA = ("CREATE TABLE IF NOT EXISTS grants (grant_id TEXT PRIMARY KEY, pseudonym TEXT NOT NULL, "
           "bank TEXT NOT NULL, purpose TEXT NOT NULL, issued TEXT NOT NULL, expires TEXT NOT NULL, "
           "revoked_at TEXT, release TEXT, uses_allowed INTEGER NOT NULL DEFAULT 0, "
           "uses_spent INTEGER NOT NULL DEFAULT 0, last_use REAL)")
_ADDED_COLUMNS = {"release": "TEXT", "uses_allowed": "INTEGER NOT NULL DEFAULT 0",
                  "uses_spent": "INTEGER NOT NULL DEFAULT 0", "last_use": "REAL"}
"""Columns v2 added to a v1 `grants.sqlite`; v1 grants get no release and no uses: never usable."""

# Refusal kinds (GrantRefused.kind): what a service maps to a status code.
MALFORMED, FORGED, UNKNOWN, EXPIRED, REVOKED, WRONG_BANK, WRONG_PURPOSE = (
    "malformed", "forged", "unknown", "expired", "revoked", "wrong-bank", "wrong-purpose")
WRONG_RELEASE, USED_UP, RATE_LIMITED = "wrong-release", "used-up", "rate-limited"


GRANT_REF_HEX = 16


def grant_ref(grant_id: str) -> str:
    """The reference the signals service audits in place of a grant id (the id itself is a bearer
    secret's handle): the first GRANT_REF_HEX hex of its SHA-256. A node matches it to its grants."""
    return hashlib.sha256(grant_id.encode()).hexdigest()[:GRANT_REF_HEX]


class GrantError(FedriskError):
    """A grant operation the user asked for cannot be done (bad bank id, unknown grant id, ...)."""


class GrantRefused(GrantError):
    """A token was refused. `kind` is one of the refusal kinds; the message is one line and never
    holds a pseudonym or record key. `grant_id` is set once the signature has verified;
    `retry_after` (seconds) only for RATE_LIMITED."""

    def __init__(self, kind: str, reason: str, grant_id: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"grant refused: {reason}")
        self.kind, self.grant_id, self.retry_after = kind, grant_id, retry_after


@dataclass(frozen=True)
class GrantPayload:
    """What a token says (once its signature has verified): no pseudonym, no record key."""

    grant_id: str
    hospital: str
    bank: str
    purpose: str
    release: str
    uses: int
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


def _is_count(value: object) -> bool:
    """A use count a grant may allow: an int (not a bool) from 1 to MAX_GRANT_USES."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_GRANT_USES


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
        if not all(isinstance(fields[n], str) for n in _TEXT_FIELDS) or not _is_count(fields["uses"]):
            raise TypeError("fields")
        payload = GrantPayload(fields["grant"], fields["hospital"], fields["bank"], fields["purpose"],
                               fields["release"], fields["uses"], _parse_iso(fields["issued"]),
                               _parse_iso(fields["expires"]))
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
    GrantRefused (MALFORMED or FORGED). Says nothing about expiry, revocation or uses left:
    only the issuing node can (GrantAuthority.verify)."""
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
        try:
            content = sealing.seal_for_disk(pem, sealing.ROLE_GRANT, path)
        except KeyMaterialError as exc:
            raise GrantError(str(exc)) from None
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
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
        pem = sealing.unseal(path.read_bytes(), sealing.ROLE_GRANT, path)
    except KeyMaterialError as exc:
        raise GrantError(str(exc)) from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except ValueError:
        raise GrantError(f"grant signing key {path} is damaged") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise GrantError(f"grant signing key {path} is not an Ed25519 key")
    return key


def _check_use(grant_id: str, allowed: int, spent: int, last_use: float | None, interval_s: float,
               now: datetime) -> None:
    """Refuse a grant whose uses are spent (USED_UP) or that was used less than `interval_s`
    before `now` (RATE_LIMITED, with the seconds to wait)."""
    if spent >= allowed:
        raise GrantRefused(USED_UP, f"used up (it allowed {allowed} score{'s' if allowed != 1 else ''})", grant_id)
    if last_use is not None and interval_s > 0:
        wait = min(interval_s, last_use + interval_s - now.timestamp())  # a clock set back waits one interval
        if wait > 0:
            raise GrantRefused(RATE_LIMITED, f"used less than {interval_s:g} s ago; retry in {math.ceil(wait)} s",
                               grant_id, retry_after=wait)


@dataclass(frozen=True)
class GrantRecord:
    """What a hospital operator sees of one grant (never its pseudonym)."""

    grant_id: str
    bank: str
    purpose: str
    release: str
    issued: str
    expires: str
    uses_spent: int
    uses_allowed: int
    revoked_at: str | None

    def state(self, now: datetime | None = None) -> str:
        """active, revoked, expired or used-up."""
        now = now or datetime.now(UTC)
        if self.revoked_at:
            return "revoked"
        if datetime.fromisoformat(self.expires) <= now:
            return "expired"
        if self.uses_spent >= self.uses_allowed:
            return "used-up"
        return "active"


def list_grants(node_dir: Path, pseudonym: str | None = None) -> list[GrantRecord]:
    """Every grant a node has issued, oldest first, read without writing (no key is made, no table
    created): an empty list when the node has issued none. `pseudonym`: only that patient's grants
    (a patient's usage record, `clients.usage`); the records returned never hold it."""
    path = Path(node_dir) / GRANTS_FILE
    if not path.is_file():
        return []
    where, arguments = ("WHERE pseudonym = ? ", (pseudonym,)) if pseudonym is not None else ("", ())
    with closing(stores.connect(path, read_only=True, timeout=30.0)) as db:
        rows = db.execute("SELECT grant_id, bank, purpose, COALESCE(release, ''), issued, expires, uses_spent, "
                          f"uses_allowed, revoked_at FROM grants {where}ORDER BY issued, grant_id", arguments).fetchall()
    return [GrantRecord(*row) for row in rows]


class GrantAuthority:
    """A hospital node's grants: issues, revokes, verifies tokens and counts their uses.

    node_dir: the node directory (holds `grants.sqlite` and `grant_signing.key`, both created on
    first use); hospital: this hospital's name, written into and checked against every token;
    audit: the node's audit log, which records every issue, revocation and refusal (grant id,
    bank, reason; never a pseudonym); min_interval_s: the per-grant rate limit, the least time
    between two uses of one grant (default DEFAULT_GRANT_INTERVAL_S; 0 disables it). Every call
    reads the database afresh, so a revocation or a spent use applies to the very next
    verification, in any process.
    """

    def __init__(self, node_dir: Path, hospital: str, *, audit: AuditLog | None = None,
                 min_interval_s: float = DEFAULT_GRANT_INTERVAL_S) -> None:
        if not (isinstance(min_interval_s, (int, float)) and math.isfinite(min_interval_s) and min_interval_s >= 0):
            raise GrantError(f"the per-grant interval must be a number of seconds >= 0, got {min_interval_s!r}")
        self.directory, self.hospital, self.audit = Path(node_dir), hospital, audit
        self.min_interval_s = float(min_interval_s)
        self.db_path = self.directory / GRANTS_FILE
        self._key_path = self.directory / SIGNING_KEY_FILE
        self._loaded_key = _load_or_create_key(self._key_path)
        self._key_stamp = self._stamp()
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")  # one process at a time creates or upgrades the table
            try:
                db.execute(_SCHEMA)
                present = {row[1] for row in db.execute("PRAGMA table_info(grants)")}
                for column, kind in _ADDED_COLUMNS.items():
                    if column not in present:
                        db.execute(f"ALTER TABLE grants ADD COLUMN {column} {kind}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def _connect(self) -> stores.Connection:
        """Autocommit connection: multi-statement transactions are opened explicitly."""
        return stores.connect(self.db_path, timeout=30.0, isolation_level=None)

    def _stamp(self) -> tuple[int, int]:
        info = self._key_path.stat()
        return info.st_ino, info.st_mtime_ns

    @property
    def _key(self) -> Ed25519PrivateKey:
        """The signing key, read again if another process rotated it (a running node service
        follows `fedrisk node grant rotate-key` at its next request)."""
        try:
            stamp = self._stamp()
        except FileNotFoundError:  # being rotated right now: the new key appears at once
            stamp = None
        if stamp is not None and stamp != self._key_stamp:
            self._loaded_key, self._key_stamp = _load_or_create_key(self._key_path), stamp
        return self._loaded_key

    def retired_keys(self) -> list[str]:
        """The public keys of signing keys rotated away (PEM), newest first."""
        path = self.directory / RETIRED_KEYS_FILE
        if not path.is_file():
            return []
        return [str(entry["public_key_pem"]) for entry in reversed(json.loads(path.read_text()))]

    @staticmethod
    def _retired_signature(token: str, pem: str) -> GrantPayload | None:
        try:
            return verify_signature(token, pem)
        except (GrantRefused, GrantError):
            return None

    def rotate_key(self, reason: str) -> tuple[int, str]:
        """Replace the grant signing key (after a suspected leak, or on schedule): every grant still
        live is revoked, the old private key is destroyed and its public key kept in
        `RETIRED_KEYS_FILE` (its tokens are then refused as revoked, not as forgeries). Returns the
        grants revoked and the new public key, which the signals service must be given again
        (`fedrisk serve hospitals add --grant-key`). Audited (`grant.key-rotate`)."""
        reason = " ".join(str(reason or "").split())
        if not reason:
            raise GrantError("--reason must say why the key is rotated (audited)")
        old_pem = self.public_key_pem()
        now = datetime.now(UTC)
        with closing(self._connect()) as db:
            live = [row[0] for row in db.execute(
                "SELECT grant_id FROM grants WHERE revoked_at IS NULL AND expires > ? AND uses_spent < uses_allowed",
                (_iso(now),))]
        for grant_id in live:
            self.revoke(grant_id, now)
        retired_path = self.directory / RETIRED_KEYS_FILE
        retired = json.loads(retired_path.read_text()) if retired_path.is_file() else []
        retired.append({"public_key_pem": old_pem, "retired": _iso(now)})
        tmp = retired_path.with_name(f".{RETIRED_KEYS_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps(retired, indent=2))
        tmp.replace(retired_path)
        self._key_path.unlink()
        self._loaded_key = _load_or_create_key(self._key_path)
        self._key_stamp = self._stamp()
        new_pem = self.public_key_pem()
        self._record(GRANT_KEY_ROTATE, SCORING_PURPOSE, {
            "old-key": Digest(hashlib.sha256(old_pem.encode()).hexdigest()),
            "new-key": Digest(hashlib.sha256(new_pem.encode()).hexdigest()), "grants-revoked": len(live),
            "reason": reason[:300]})
        return len(live), new_pem

    def public_key_pem(self) -> str:
        """The hospital's grant-verification key (SubjectPublicKeyInfo PEM): safe to publish."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")

    def issue(self, pseudonym: str, bank: str, release: str, purpose: str = SCORING_PURPOSE, *,
              hours: int = DEFAULT_GRANT_HOURS, uses: int = DEFAULT_GRANT_USES) -> str:
        """Record a grant for the patient with `pseudonym`: `bank` may score them with `release`
        up to `uses` times (1 to MAX_GRANT_USES) within `hours` (1 to MAX_GRANT_HOURS). Returns
        its signed token."""
        if not BANK_PATTERN.match(bank or ""):
            raise GrantError("bank id must be 1-64 letters, digits, '.', '-' or '_'")
        if not isinstance(release, str) or not RELEASE_PATTERN.match(release):
            raise GrantError("release id must be 1-64 letters, digits, '.', '-' or '_' (e.g. r1)")
        if not PURPOSE_PATTERN.match(purpose or ""):
            raise GrantError(f"purpose {purpose!r} is not a slug such as {SCORING_PURPOSE!r}")
        if isinstance(hours, bool) or not isinstance(hours, int) or not 1 <= hours <= MAX_GRANT_HOURS:
            raise GrantError(f"a grant lasts 1 to {MAX_GRANT_HOURS} hours ({MAX_GRANT_HOURS // 24} days), got {hours}")
        if not _is_count(uses):
            raise GrantError(f"a grant allows 1 to {MAX_GRANT_USES} uses, got {uses}")
        if not re.fullmatch(r"[0-9a-f]{32}", pseudonym or ""):
            raise GrantError("a grant needs the patient's pseudonym (32 lowercase hex characters)")
        grant_id = secrets.token_hex(GRANT_ID_HEX_CHARS // 2)
        issued = datetime.now(UTC).replace(microsecond=0)
        payload = {"grant": grant_id, "hospital": self.hospital, "bank": bank, "purpose": purpose,
                   "release": release, "uses": uses, "issued": _iso(issued),
                   "expires": _iso(issued + timedelta(hours=hours))}
        body = _b64encode(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8"))
        signing_input = f"{TOKEN_PREFIX}.{body}"
        token = f"{signing_input}.{_b64encode(self._key.sign(signing_input.encode('ascii')))}"
        with closing(self._connect()) as db:
            db.execute("INSERT INTO grants (grant_id, pseudonym, bank, purpose, issued, expires, release, "
                       "uses_allowed) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (grant_id, pseudonym, bank, purpose, payload["issued"], payload["expires"], release, uses))
        self._record(GRANT_ISSUE, purpose, {"grant": Digest(grant_id), "bank": bank, "release": release,
                                            "uses": uses, "expires": payload["expires"]})
        return token

    def revoke(self, grant_id: str, when: datetime | None = None) -> None:
        """Revoke a grant from `when` (default now); revoking twice keeps the first time."""
        if not _GRANT_ID_PATTERN.match(grant_id or ""):
            raise GrantError(f"a grant id is {GRANT_ID_HEX_CHARS} lowercase hex characters")
        with closing(self._connect()) as db:
            row = db.execute("SELECT purpose, revoked_at FROM grants WHERE grant_id = ?", (grant_id,)).fetchone()
            if row is None:
                raise GrantError("no grant with that id was issued at this node")
            changed = db.execute("UPDATE grants SET revoked_at = ? WHERE grant_id = ? AND revoked_at IS NULL",
                                 (_iso(when or datetime.now(UTC)), grant_id)).rowcount
        if changed:
            self._record(GRANT_REVOKE, row[0], {"grant": Digest(grant_id)})

    def verify(self, token: str, bank: str, release: str, purpose: str = SCORING_PURPOSE,
               now: datetime | None = None) -> Grant:
        """The grant `token` stands for, if it is genuine, issued here for `bank`, `release` and
        `purpose`, not revoked, not expired at `now` (default: the current time), with a use
        left and not rate-limited. Spends nothing (see `consume`). Otherwise raises GrantRefused
        with a one-line reason, after recording the refusal in the audit log."""
        try:
            return self._verify(token, bank, release, purpose, now or datetime.now(UTC))
        except GrantRefused as refusal:
            self._refused(refusal, bank, purpose, release)
            raise

    def consume(self, grant: Grant, now: datetime | None = None) -> int:
        """Spend one use of a verified `grant` and return the uses it has left. One SQLite write
        transaction reads and updates the count, so concurrent callers (in any process) racing
        for the last use get exactly one success between them. Refuses (audited) a grant that
        was revoked, expired, used up or used less than `min_interval_s` ago in the meantime."""
        moment = now or datetime.now(UTC)
        try:
            return self._consume(grant.grant_id, moment)
        except GrantRefused as refusal:
            self._refused(refusal, grant.payload.bank, grant.payload.purpose, grant.payload.release)
            raise

    def _verify(self, token: str, bank: str, release: str, purpose: str, now: datetime) -> Grant:
        try:
            payload = verify_signature(token, self.public_key_pem())
        except GrantRefused as refusal:
            # a token signed with a key this node rotated away is its own, revoked at the rotation:
            # checked below against the store, it is refused as revoked, not taken for a forgery
            payload = next((p for p in (self._retired_signature(token, pem) for pem in self.retired_keys()) if p),
                           None)
            if payload is None:
                raise refusal
        grant_id = payload.grant_id
        if payload.hospital != self.hospital:
            raise GrantRefused(FORGED, "forged token (names another hospital)", grant_id)
        with closing(self._connect()) as db:
            row = db.execute("SELECT pseudonym, bank, purpose, release, uses_allowed, expires, revoked_at, "
                             "uses_spent, last_use FROM grants WHERE grant_id = ?", (grant_id,)).fetchone()
        if row is None:
            raise GrantRefused(UNKNOWN, "unknown grant (not issued at this node)", grant_id)
        pseudonym, *stored, revoked_at, spent, last_use = row
        if tuple(stored) != (payload.bank, payload.purpose, payload.release, payload.uses, _iso(payload.expires)):
            raise GrantRefused(FORGED, "forged token (differs from the grant issued)", grant_id)
        if payload.bank != bank:
            raise GrantRefused(WRONG_BANK, "the grant was issued to another bank", grant_id)
        if payload.purpose != purpose:
            raise GrantRefused(WRONG_PURPOSE, f"the grant covers {payload.purpose!r}, not {purpose!r}", grant_id)
        if payload.release != release:
            asked = release if isinstance(release, str) and RELEASE_PATTERN.match(release) else "the one asked for"
            raise GrantRefused(WRONG_RELEASE, f"the grant covers release {payload.release}, not {asked}", grant_id)
        if revoked_at is not None and revoked_at <= _iso(now):
            raise GrantRefused(REVOKED, f"revoked on {revoked_at}", grant_id)
        if now >= payload.expires:
            raise GrantRefused(EXPIRED, f"expired on {_iso(payload.expires)}", grant_id)
        _check_use(grant_id, payload.uses, spent, last_use, self.min_interval_s, now)
        return Grant(payload=payload, pseudonym=pseudonym)

    def _consume(self, grant_id: str, now: datetime) -> int:
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")  # the write lock first: no other use can slip in between
            try:
                row = db.execute("SELECT uses_allowed, uses_spent, last_use, expires, revoked_at FROM grants "
                                 "WHERE grant_id = ?", (grant_id,)).fetchone()
                if row is None:
                    raise GrantRefused(UNKNOWN, "unknown grant (not issued at this node)", grant_id)
                allowed, spent, last_use, expires, revoked_at = row
                if revoked_at is not None and revoked_at <= _iso(now):
                    raise GrantRefused(REVOKED, f"revoked on {revoked_at}", grant_id)
                if _iso(now) >= expires:
                    raise GrantRefused(EXPIRED, f"expired on {expires}", grant_id)
                _check_use(grant_id, allowed, spent, last_use, self.min_interval_s, now)
                db.execute("UPDATE grants SET uses_spent = uses_spent + 1, last_use = ? WHERE grant_id = ?",
                           (now.timestamp(), grant_id))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return allowed - spent - 1

    def _refused(self, refusal: GrantRefused, bank: str, purpose: str, release: object) -> None:
        self._record(GRANT_REFUSED, purpose if PURPOSE_PATTERN.match(purpose or "") else None,
                     {"kind": refusal.kind, "reason": str(refusal),
                      "grant": Digest(refusal.grant_id) if refusal.grant_id else None,
                      "bank": bank if BANK_PATTERN.match(bank or "") else None,
                      "release": release if isinstance(release, str) and RELEASE_PATTERN.match(release) else None})

    def _record(self, action: str, purpose: str | None, details: dict[str, object]) -> None:
        """Append to the audit log; details the identifier filter rejects (a bank id that looks
        like an ID number) are recorded by the refusal kind alone."""
        if self.audit is None:
            return
        try:
            self.audit.append(action, purpose=purpose, details=details)
        except AuditIdentifierError:
            self.audit.append(action, purpose=purpose, details={"kind": details.get("kind", "unrecorded")})
