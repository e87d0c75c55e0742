"""Encrypted backups of a hospital node directory (`fedrisk node backup key|create|restore`).

A backup is one file: a short public header (format, hospital, when) and the node directory as a
tar archive sealed with AES-256-GCM under a 32-byte key the operator keeps apart from the backups
(`fedrisk node backup key`; a file of mode 0600, or `$FEDRISK_BACKUP_KEY`). The header is the
cipher's associated data, so neither it nor the archive can be altered unnoticed, and a stolen
backup gives nothing without the key: no CKKS secret, pseudonym key, signing key, ledger or audit
log in clear. SQLite stores are copied with SQLite's online backup, so a backup taken while the
node serves is consistent file by file. A manifest inside the archive holds every file's SHA-256,
checked on restore.

Restoring writes a new directory (never over an existing one) and nothing else. A restore cannot
roll the node back silently: a restored node is behind the state head it signed and the other
hospitals anchored (`clients.anchoring`), so it refuses to run until its operator runs the
audited recovery (`fedrisk node anchor accept`), which closes every remaining budget.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
import tarfile
import tempfile
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from federation import sealing, stores
from federation.errors import ConfigError

MAGIC = b"FEDRISK-NODE-BACKUP v1\n"
NONCE_BYTES = sealing.NONCE_BYTES
KEY_ENV = "FEDRISK_BACKUP_KEY"
MANIFEST = "backup-manifest.json"
SKIPPED_SUFFIXES = ("-journal", "-wal", "-shm", ".tmp")


@dataclass(frozen=True)
class BackupInfo:
    """What a backup holds: hospital, when it was made, how many files, the audit log's head."""

    hospital: str
    created: str
    files: int
    audit_entries: int


def create_key(path: Path) -> Path:
    """A new random backup key at `path` (base64, mode 0600; never overwritten)."""
    return sealing.create_key_file(path, "backup key")


def load_key(path: Path | None) -> bytes:
    """The backup key from `path`, else $FEDRISK_BACKUP_KEY; one-line ConfigError otherwise."""
    what = "backup key (from `fedrisk node backup key`)"
    if path is not None:
        return sealing.read_key_file(Path(path), f"--key-file {path}", what)
    text = os.environ.get(KEY_ENV, "").strip()
    if not text:
        raise ConfigError(f"give --key-file (made by `fedrisk node backup key`) or set ${KEY_ENV}")
    return sealing.parse_key(text, f"${KEY_ENV}", what)


def _snapshot(node_dir: Path, staging: Path) -> dict[str, str]:
    """Copy the node directory into `staging` (SQLite files through the online backup API);
    returns {relative path: SHA-256}."""
    digests: dict[str, str] = {}
    for source in sorted(p for p in node_dir.rglob("*") if p.is_file()):
        if source.name.endswith(SKIPPED_SUFFIXES):
            continue
        relative = source.relative_to(node_dir)
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.suffix == ".sqlite":
            with closing(stores.connect(source, read_only=True, timeout=30.0)) as src, \
                    closing(stores.connect(target, encrypted=stores.is_encrypted(source))) as dst:
                src.backup(dst)
        else:
            shutil.copyfile(source, target)
        digests[str(relative)] = hashlib.sha256(target.read_bytes()).hexdigest()
    return digests


def backup_node(node_dir: Path, out: Path, key: bytes) -> BackupInfo:
    """Write an encrypted backup of the node at `node_dir` to `out` (a new file, mode 0600)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from clients.node_state import NodeState

    state = NodeState.load(node_dir)
    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out {out} exists; a backup never overwrites a file")
    created = datetime.now(UTC).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="fedrisk-backup-") as scratch:
        staging = Path(scratch) / "node"
        staging.mkdir(mode=0o700)
        digests = _snapshot(Path(state.directory), staging)
        entries = len(state.audit().entries())
        manifest = {"format": 1, "hospital": state.hospital, "created": created, "files": digests,
                    "audit_entries": entries}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w:gz") as tar:
            tar.add(staging, arcname="node")
    header = MAGIC + json.dumps({"format": 1, "hospital": state.hospital, "created": created},
                                sort_keys=True).encode() + b"\n"
    nonce = secrets.token_bytes(NONCE_BYTES)
    sealed = AESGCM(key).encrypt(nonce, archive.getvalue(), header)
    tmp = out.with_name(f".{out.name}.partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(header + nonce + sealed)
    os.replace(tmp, out)
    return BackupInfo(state.hospital, created, len(digests), entries)


def _open(backup: Path, key: bytes) -> tuple[dict, bytes]:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        raw = Path(backup).read_bytes()
    except OSError:
        raise ConfigError(f"--from {backup}: not readable") from None
    if not raw.startswith(MAGIC) or b"\n" not in raw[len(MAGIC):]:
        raise ConfigError(f"--from {backup}: not a fedrisk node backup")
    end = raw.index(b"\n", len(MAGIC)) + 1
    header, nonce, sealed = raw[:end], raw[end:end + NONCE_BYTES], raw[end + NONCE_BYTES:]
    try:
        public = json.loads(header[len(MAGIC):])
        payload = AESGCM(key).decrypt(nonce, sealed, header)
    except (ValueError, InvalidTag):
        raise ConfigError(f"--from {backup}: cannot be opened with this key, or the file was altered") from None
    return public, payload


def restore_node(backup: Path, target: Path, key: bytes) -> BackupInfo:
    """Restore the backup `backup` into the new directory `target` (absent or empty); every file's
    SHA-256 is checked against the manifest before the directory appears."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"--dir {target} exists and is not empty; restore into a new directory")
    public, payload = _open(backup, key)
    with tempfile.TemporaryDirectory(prefix="fedrisk-restore-", dir=target.parent if target.parent.exists() else None) \
            as scratch:
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as tar:
            tar.extractall(scratch, filter="data")
        staging = Path(scratch) / "node"
        manifest = json.loads((staging / MANIFEST).read_text())
        for relative, digest in manifest["files"].items():
            path = staging / relative
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
                raise ConfigError(f"--from {backup}: {relative} does not match the backup's manifest")
        (staging / MANIFEST).unlink()
        os.chmod(staging, 0o700)
        for path in staging.rglob("*"):
            if path.is_file():
                os.chmod(path, 0o600)
        if target.exists():
            target.rmdir()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(target))
    return BackupInfo(str(public.get("hospital", "")), str(public.get("created", "")), len(manifest["files"]),
                      int(manifest.get("audit_entries", 0)))
