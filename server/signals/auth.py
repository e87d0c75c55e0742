"""Who may call the signals service: principals, their roles, API keys, and rate limits.

A principal is one API key held by one person or system, with one role:

| role | bound to | sees |
|---|---|---|
| `bank-analyst` | a bank id | active releases, approved cohort tables, scores for its own bank's grants, its own audit trail |
| `hospital-operator` | a hospital | score requests routed to its hospital |
| `data-scientist` | - | releases (withdrawn too), cohorts; approves cohort tables, withdraws releases |
| `auditor` | - | everything readable, and the whole service audit log with its chain verified |

API keys are `fr_` + 32 URL-safe characters (192 random bits). Only their SHA-256 is stored:
the keys are high-entropy random strings, so a fast hash is enough (nothing to brute-force), and
the stored hash is compared with `hmac.compare_digest`. The key itself is shown once, when made.

Rate limits are a token bucket per principal (per client address for calls without a valid key):
`burst` calls at once, refilled at `rate` per second; an empty bucket answers 429 with Retry-After.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from federation import stores
from federation.errors import ConfigError

ROLE_BANK, ROLE_HOSPITAL = "bank-analyst", "hospital-operator"
ROLE_DATA_SCIENTIST, ROLE_AUDITOR = "data-scientist", "auditor"
ROLES = (ROLE_BANK, ROLE_HOSPITAL, ROLE_DATA_SCIENTIST, ROLE_AUDITOR)
KEY_PREFIX = "fr_"
KEY_RANDOM_BYTES = 24  # 24 bytes -> 32 URL-safe characters, 192 bits
KEY_ID_HEX = 12  # public handle of a key in listings and audit entries: a prefix of its hash
DEFAULT_RATE_PER_SECOND = 20.0
DEFAULT_BURST = 40
MAX_LABEL_DIGITS = 5  # labels enter the audit log, which refuses phone- and ID-like numbers
DEFAULT_KEY_DAYS = 90  # an API key expires; `fedrisk serve keys rotate` replaces one before it does
MAX_KEY_DAYS = 730
MAX_BUCKETS = 10_000  # anonymous buckets are keyed by address; full ones are dropped past this

_KEY = re.compile(rf"^{KEY_PREFIX}[A-Za-z0-9_-]{{32}}$")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_SCHEMA = """CREATE TABLE IF NOT EXISTS principals (
    key_hash TEXT PRIMARY KEY, key_id TEXT NOT NULL UNIQUE, label TEXT NOT NULL, role TEXT NOT NULL,
    bank TEXT, hospital TEXT, created TEXT NOT NULL, revoked_at TEXT)"""


class AuthError(ConfigError):
    """A principal cannot be made or changed as asked (bad role, label, bank; unknown key id)."""


@dataclass(frozen=True)
class Principal:
    """The holder of one API key. `bank` is set for bank analysts, `hospital` for operators."""

    key_id: str
    label: str
    role: str
    bank: str | None = None
    hospital: str | None = None
    created: str = ""
    revoked_at: str | None = None
    expires: str | None = None
    """UTC ISO time the key stops working (None: a key made before keys expired)."""

    def state(self, now: datetime | None = None) -> str:
        """active, revoked or expired."""
        if self.revoked_at:
            return "revoked"
        if self.expires and datetime.fromisoformat(self.expires) <= (now or datetime.now(UTC)):
            return "expired"
        return "active"


def hash_key(key: str) -> str:
    """SHA-256 hex of an API key: what the store keeps instead of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """The principals of one service, in the `principals` table of `signals.sqlite`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.execute(_SCHEMA)
            if "expires" not in {row[1] for row in db.execute("PRAGMA table_info(principals)")}:
                db.execute("ALTER TABLE principals ADD COLUMN expires TEXT")

    def add(self, role: str, label: str, *, bank: str | None = None,
            hospital: str | None = None, days: int = DEFAULT_KEY_DAYS) -> tuple[Principal, str]:
        """Make a principal whose key works for `days` days; returns it and its API key (the only
        time the key exists in clear)."""
        _check_principal(role, label, bank, hospital)
        if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_KEY_DAYS:
            raise AuthError(f"--days: a key lasts 1 to {MAX_KEY_DAYS} days, got {days!r}")
        key = KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)
        digest = hash_key(key)
        now = datetime.now(UTC).replace(microsecond=0)
        principal = Principal(digest[:KEY_ID_HEX], label, role, bank, hospital, now.isoformat(),
                              expires=(now + timedelta(days=days)).isoformat())
        with closing(self._connect()) as db, db:
            db.execute("INSERT INTO principals (key_hash, key_id, label, role, bank, hospital, created, revoked_at, "
                       "expires) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?)",
                       (digest, principal.key_id, label, role, bank, hospital, principal.created, principal.expires))
        return principal, key

    def rotate(self, key_id: str, *, grace_hours: int = 24, days: int = DEFAULT_KEY_DAYS) -> tuple[Principal, str]:
        """A new key for the holder of live key `key_id` (same label, role, bank or hospital); the
        old one keeps working for `grace_hours` (0: stops now) so the holder can switch."""
        if isinstance(grace_hours, bool) or not isinstance(grace_hours, int) or not 0 <= grace_hours <= 168:
            raise AuthError(f"--grace-hours: 0 to 168, got {grace_hours!r}")
        old = next((p for p in self.principals() if p.key_id == key_id and p.state() == "active"), None)
        if old is None:
            raise AuthError(f"no live API key with id {key_id!r} (see `fedrisk serve keys list`)")
        new, key = self.add(old.role, old.label, bank=old.bank, hospital=old.hospital, days=days)
        until = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=grace_hours)
        if old.expires is None or datetime.fromisoformat(old.expires) > until:
            with closing(self._connect()) as db, db:
                db.execute("UPDATE principals SET expires = ? WHERE key_id = ?", (until.isoformat(), key_id))
        return new, key

    def authenticate(self, key: str | None) -> Principal | None:
        """The live principal holding `key`, or None (no key, malformed, unknown, revoked or expired).

        The row is found by the key's hash (an index lookup can only leak timing about a
        hash, which says nothing usable about the key); the hashes are then compared in
        constant time so no code path compares secrets byte by byte."""
        if not key or not _KEY.fullmatch(key):
            return None
        digest = hash_key(key)
        with closing(self._connect()) as db:
            row = db.execute("SELECT key_hash, key_id, label, role, bank, hospital, created, revoked_at, expires "
                             "FROM principals WHERE key_hash = ?", (digest,)).fetchone()
        if row is None or not hmac.compare_digest(row[0], digest):
            return None
        principal = Principal(*row[1:])
        return principal if principal.state() == "active" else None

    def revoke(self, key_id: str) -> Principal:
        """Revoke the key with public handle `key_id`; it stops working on the next request."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with closing(self._connect()) as db, db:
            changed = db.execute("UPDATE principals SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                                 (now, key_id)).rowcount
        if not changed:
            raise AuthError(f"no live API key with id {key_id!r} (see `fedrisk serve keys list`)")
        return next(p for p in self.principals() if p.key_id == key_id)

    def principals(self) -> list[Principal]:
        """Every principal ever made, revoked ones included, oldest first."""
        with closing(self._connect()) as db:
            rows = db.execute("SELECT key_id, label, role, bank, hospital, created, revoked_at, expires "
                              "FROM principals ORDER BY created, key_id").fetchall()
        return [Principal(*row) for row in rows]

    def _connect(self) -> stores.Connection:
        return stores.connect(self.path, timeout=30.0)


def _check_principal(role: str, label: str, bank: str | None, hospital: str | None) -> None:
    if role not in ROLES:
        raise AuthError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if not _LABEL.fullmatch(label or "") or sum(c.isdigit() for c in label) > MAX_LABEL_DIGITS:
        raise AuthError(f"label must be 1-64 letters, digits, '.', '_' or '-' with at most {MAX_LABEL_DIGITS} "
                        f"digits (it names a team or person, e.g. 'acme-risk-team'); got {label!r}")
    if (role == ROLE_BANK) != (bank is not None):
        raise AuthError("--bank is required for a bank-analyst key, and only for one")
    if (role == ROLE_HOSPITAL) != (hospital is not None):
        raise AuthError("--hospital is required for a hospital-operator key, and only for one")
    for what, value in (("bank", bank), ("hospital", hospital)):
        if value is not None and not _SLUG.fullmatch(value):
            raise AuthError(f"{what} must be a lower-case id such as 'acme-bank', got {value!r}")


class RateLimiter:
    """Token buckets, one per client: `burst` tokens, refilled at `rate` per second."""

    def __init__(self, rate: float = DEFAULT_RATE_PER_SECOND, burst: int = DEFAULT_BURST) -> None:
        if not (rate > 0 and math.isfinite(rate)) or burst < 1:
            raise ConfigError(f"rate limit must be > 0 per second with a burst of at least 1, got {rate}, {burst}")
        self.rate, self.burst = float(rate), int(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, monotonic time)
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """Spend one token of `client`'s bucket: 0.0 if allowed, else the seconds until one is back."""
        now = time.monotonic()
        with self._lock:
            tokens, then = self._buckets.get(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate)
            allowed = tokens >= 1.0
            self._buckets[client] = (tokens - 1.0 if allowed else tokens, now)
            if len(self._buckets) > MAX_BUCKETS:
                self._forget_full(now)
            return 0.0 if allowed else (1.0 - tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled: a fresh bucket is the same as a full one."""
        full = [c for c, (t, then) in self._buckets.items() if t + (now - then) * self.rate >= self.burst]
        for client in full:
            del self._buckets[client]
