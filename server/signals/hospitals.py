"""The hospitals the signals service may route score requests to.

For each hospital the service keeps: the URL of its scoring endpoint (`clients/scoring_service.py`,
reached over HTTP only: the service never imports hospital code), the hospital's published
Ed25519 grant key (to check a grant's signature before anything is forwarded), and the path of
the file holding the bearer token the hospital's endpoint accepts from this service.

The token stays in its file (mode 0600, managed by the operator) and is read when a request is
forwarded; `signals.sqlite` holds no secret in clear, only key hashes and public keys.

Graded protection: a score and its request are medical-derived data and the token a credential, so
an endpoint off this machine must be `https://` (checked against `--hospital-ca` or the system's
trust store); plain `http://` is accepted on loopback only (a node and the service on one host,
or a TLS-terminating proxy beside the node). The rule is checked when a hospital is added and
again before its token is read for any request, so an edited database cannot downgrade it.
"""

from __future__ import annotations

import re
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from federation import stores
from federation.errors import ConfigError
from federation.urls import unprotected_url as _unprotected

MAX_TOKEN_BYTES = 4096
NODE_HASH_PREFIX = "sha256:"  # how the node's own token file starts: the hash, not the token
_HOSPITAL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SCHEMA = """CREATE TABLE IF NOT EXISTS hospitals (
    hospital TEXT PRIMARY KEY, url TEXT NOT NULL, grant_key_pem TEXT NOT NULL,
    token_file TEXT NOT NULL, added TEXT NOT NULL, suspended_at TEXT)"""


class HospitalUnavailable(ConfigError):
    """A registered hospital's service token cannot be read (file gone, empty or unreadable)."""


@dataclass(frozen=True)
class HospitalEndpoint:
    """One hospital's scoring endpoint as registered with the signals service."""

    hospital: str
    url: str
    grant_key_pem: str
    token_file: str
    added: str
    suspended_at: str | None = None

    def service_token(self) -> str:
        """The bearer token this service presents to the hospital (read from its file each time,
        so rotating it means replacing the file); never for an endpoint `unprotected_url` refuses."""
        problem = unprotected_url(self.url)
        if problem:
            raise HospitalUnavailable(f"{self.hospital}: {problem}")
        if self.suspended_at:
            raise HospitalUnavailable(f"{self.hospital}: routing suspended since {self.suspended_at} (incident "
                                      "containment; `fedrisk serve hospitals add` resumes it)")
        try:
            raw = Path(self.token_file).read_bytes()[:MAX_TOKEN_BYTES]
        except OSError:
            raise HospitalUnavailable(f"service token of {self.hospital} is unreadable") from None
        token = raw.decode("utf-8", errors="replace").strip()
        if not token:
            raise HospitalUnavailable(f"service token of {self.hospital} is empty")
        if token.startswith(NODE_HASH_PREFIX):
            raise HospitalUnavailable(f"{self.token_file} holds the token's hash (the node's file); the signals "
                                      "service needs the token itself (printed by `fedrisk node service-token`)")
        return token


def unprotected_url(url: str) -> str:
    """Why scores may not travel to `url` ("" when they may): `federation.urls.unprotected_url`,
    with how a hospital fixes it."""
    problem = _unprotected(url)
    return f"{problem}: serve the node over TLS (`fedrisk node serve --ssl-certfile ... --ssl-keyfile ...`)" \
        if problem else ""


class HospitalDirectory:
    """Registered hospitals, in the `hospitals` table of `signals.sqlite`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.execute(_SCHEMA)
            if "suspended_at" not in {row[1] for row in db.execute("PRAGMA table_info(hospitals)")}:
                db.execute("ALTER TABLE hospitals ADD COLUMN suspended_at TEXT")

    def add(self, hospital: str, url: str, grant_key_file: Path, token_file: Path) -> HospitalEndpoint:
        """Register (or re-register, e.g. after a key rotation) a hospital's scoring endpoint."""
        if not _HOSPITAL.fullmatch(hospital or ""):
            raise ConfigError(f"hospital must be a name such as 'hospital_00', got {hospital!r}")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ConfigError(f"--url must be the endpoint's base URL, such as https://node.example:8101, got {url!r}")
        problem = unprotected_url(url)
        if problem:
            raise ConfigError(f"--url {url}: {problem}")
        pem = _read_grant_key(Path(grant_key_file))
        token_path = Path(token_file).resolve()
        endpoint = HospitalEndpoint(hospital, url.rstrip("/"), pem, str(token_path),
                                    datetime.now(UTC).isoformat(timespec="seconds"))
        endpoint.service_token()  # refuse a missing or empty token file now, not at the first request
        with closing(self._connect()) as db, db:
            db.execute("INSERT OR REPLACE INTO hospitals (hospital, url, grant_key_pem, token_file, added, suspended_at) "
                       "VALUES (?, ?, ?, ?, ?, NULL)",
                       (endpoint.hospital, endpoint.url, endpoint.grant_key_pem, endpoint.token_file, endpoint.added))
        return endpoint

    def get(self, hospital: str) -> HospitalEndpoint | None:
        """The endpoint of `hospital`, or None if it is not registered."""
        with closing(self._connect()) as db:
            row = db.execute("SELECT hospital, url, grant_key_pem, token_file, added, suspended_at FROM hospitals "
                             "WHERE hospital = ?", (hospital,)).fetchone()
        return HospitalEndpoint(*row) if row else None

    def list(self) -> list[HospitalEndpoint]:
        """Every registered hospital, by name."""
        with closing(self._connect()) as db:
            rows = db.execute("SELECT hospital, url, grant_key_pem, token_file, added, suspended_at FROM hospitals "
                              "ORDER BY hospital").fetchall()
        return [HospitalEndpoint(*row) for row in rows]

    def _connect(self) -> stores.Connection:
        return stores.connect(self.path, timeout=30.0)


def _read_grant_key(path: Path) -> str:
    """The PEM text of an Ed25519 public key file: the PEM itself, or the JSON the hospital's
    `GET /v1/grant-key` returns (saved as it came, `{"public_key_pem": ...}`)."""
    try:
        pem = path.read_text(encoding="utf-8")
        if pem.lstrip().startswith("{"):
            import json

            try:
                pem = str(json.loads(pem)["public_key_pem"])
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"{path} is JSON but not a hospital's /v1/grant-key reply "
                                  "(it has no public_key_pem)") from None
        key = load_pem_public_key(pem.encode())
    except OSError:
        raise ConfigError(f"grant key file not readable: {path}") from None
    except (ValueError, TypeError):
        raise ConfigError(f"{path} is not a PEM public key (expected the hospital's grant key)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 public key (grant tokens are signed with Ed25519)")
    return pem.strip() + "\n"
