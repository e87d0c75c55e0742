"""Keyed pseudonyms for record keys: HMAC-SHA256 under a key only the hospital node holds.

The same patient gets the same pseudonym in every run at one hospital (the key is kept in a
file on the node), so revocations and the local test split can follow a patient without the
record key ever leaving the de-identification step. Without the key a pseudonym cannot be
recomputed from a guessed record key, and two hospitals (two keys) give unlinkable
pseudonyms for the same key. The key file is 32 random bytes, readable by its owner only.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from federation import sealing
from federation.errors import DataError, KeyMaterialError

KEY_BYTES = 32
"""Key length: 256 bits, the SHA-256 output size (RFC 2104 asks for at least that)."""
PSEUDONYM_HEX_CHARS = 32
"""Pseudonym length: the first 128 bits of the HMAC, as lowercase hex."""


class PseudonymKeyError(KeyMaterialError):
    """The pseudonymisation key file is missing, exposed, of the wrong size, or already exists."""


@dataclass(frozen=True)
class PseudonymKey:
    """A hospital's pseudonymisation key. The secret never appears in `repr` or logs."""

    secret: bytes = field(repr=False)
    path: Path | None = None

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_BYTES:
            raise PseudonymKeyError(f"a pseudonymisation key is {KEY_BYTES} bytes, got {len(self.secret)}")

    @classmethod
    def create(cls, path: Path) -> PseudonymKey:
        """Write a new random key to `path` with mode 0600. Refuses to overwrite an existing
        file: replacing a key silently breaks every pseudonym recorded under the old one."""
        path = Path(path)
        secret = secrets.token_bytes(KEY_BYTES)
        try:
            content = sealing.seal_for_disk(secret, sealing.ROLE_PSEUDONYM, path)
        except KeyMaterialError as exc:
            raise PseudonymKeyError(str(exc)) from None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except FileExistsError:
            raise PseudonymKeyError(f"{path} already exists; refusing to overwrite a pseudonymisation key") from None
        except OSError as exc:
            raise PseudonymKeyError(f"cannot create pseudonymisation key {path}: {exc.strerror}") from None
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        sealing.fsync_directory(path.parent)
        return cls(secret=secret, path=path)

    @classmethod
    def load(cls, path: Path, *, require_sealed: bool = False) -> PseudonymKey:
        """Read the key at `path` (sealed at rest or not, `federation.sealing`). Refuses a file
        that group or others may read or write."""
        path = Path(path)
        try:
            info = path.stat()
        except FileNotFoundError:
            raise PseudonymKeyError(f"pseudonymisation key not found: {path}") from None
        if not stat.S_ISREG(info.st_mode):
            raise PseudonymKeyError(f"pseudonymisation key {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise PseudonymKeyError(f"pseudonymisation key {path} is accessible to group or others "
                                    f"(mode {mode:04o}); run: chmod 600 {path}")
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise PseudonymKeyError(f"cannot read pseudonymisation key {path}: {exc.strerror}") from None
        try:
            secret = sealing.unseal(raw, sealing.ROLE_PSEUDONYM, path, require_sealed=require_sealed)
        except KeyMaterialError as exc:
            raise PseudonymKeyError(str(exc)) from None
        if len(secret) != KEY_BYTES:
            raise PseudonymKeyError(f"pseudonymisation key {path} holds {len(secret)} bytes, expected {KEY_BYTES}")
        return cls(secret=secret, path=path)

    def pseudonym(self, record_key: object) -> str:
        """The pseudonym of one record key (its text form is what is hashed)."""
        digest = hmac.digest(self.secret, str(record_key).encode("utf-8"), hashlib.sha256)
        return digest.hex()[:PSEUDONYM_HEX_CHARS]

    def derive_seed(self, purpose: str, *context: object) -> int:
        """A 63-bit seed derived from the node's secret for `purpose` and `context`.

        Domain-separated from pseudonyms. DP-SGD draws its Poisson batches and Gaussian noise
        from it: unpredictable to anyone without the node's key, yet the same when the same
        round is computed again from the same inputs (a retried round then repeats its output
        instead of releasing a second, independently noised one).
        """
        message = "\x1f".join(["fedrisk-seed", purpose, *map(str, context)]).encode("utf-8")
        return int.from_bytes(hmac.digest(self.secret, message, hashlib.sha256)[:8], "big") >> 1

    def pseudonymise(self, record_keys: pd.Series) -> pd.Series:
        """Pseudonyms of `record_keys`, same index and name. Empty keys are refused."""
        if record_keys.isna().any():
            raise DataError("cannot pseudonymise empty record keys")
        return pd.Series([self.pseudonym(value) for value in record_keys], index=record_keys.index,
                         name=record_keys.name, dtype="string")
