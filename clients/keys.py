"""A hospital operator's key operations: seal the node's secrets at rest, rotate its keys.

- `seal_node`: every secret in the node directory (CKKS secret context, pseudonym key,
  contribution signing key, grant signing key) sealed with AES-256-GCM under the operator's
  at-rest key (`federation.sealing`); node.json then says the node is sealed, and a secret found
  in clear in a sealed node is refused from then on.
- `rotate_signing_key`: a new Ed25519 contribution key; the old one is destroyed. The node's
  entry in the federation manifest no longer matches, so its contributions are refused by the
  other hospitals until the federation re-enrols it (`fedrisk node enrol`): a leaked old key
  signs nothing anyone accepts.
- `rekey_pseudonyms`: a new pseudonymisation key; every pseudonym the node's stores hold (consent
  withdrawals and restorations, erasures, grants) is re-mapped through the export's record keys
  in one SQLite transaction across both stores, so no consent, erasure or grant is lost. The old
  key is kept sealed beside the new one for one use only: finding a patient's entries in the
  append-only audit log written before the re-key (their usage record). It never makes a new
  pseudonym. Re-keying redraws the local test split, which hashes the pseudonym.
- `install_ckks_key`: the federation's new CKKS key replaces the node's copy of the old one,
  which is destroyed, and its id is recorded as retired. Ciphertexts and checkpoints made under
  the old key can no longer be decrypted by this node: a run made under it cannot resume, and
  the node refuses the old key's messages (their key id is not its key's).

Each step is audited with the public fingerprints only (`node.seal`, `node.key-rotate`).
"""

from __future__ import annotations

import json
import os
import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

from clients.erasure import PURGED
from clients.node_state import STAGED_PSEUDONYM_FILE, NodeState
from federation import sealing
from federation.contributions import SIGNING_KEY_FILE, SigningKey
from federation.errors import ConfigError, KeyMaterialError
from federation.he_codec import HOSPITAL_CONTEXT_FILE, HospitalKey
from privacy.audit import NODE_KEY_ROTATE, NODE_SEAL, Digest
from privacy.grants import GRANTS_FILE
from privacy.grants import SIGNING_KEY_FILE as GRANT_KEY_FILE
from privacy.pseudonym import KEY_BYTES, PseudonymKey

PSEUDONYM_FILE = "pseudonym.key"
RETIRED_PSEUDONYM_FILE = "pseudonym_keys_retired"
_PSEUDONYM_TABLES = ("revocations", "consent_events", "erasures")

RETIRED_CKKS_FILE = "ckks_keys_retired.json"
SECRET_FILES = ((HOSPITAL_CONTEXT_FILE, sealing.ROLE_CKKS), ("pseudonym.key", sealing.ROLE_PSEUDONYM),
                (SIGNING_KEY_FILE, sealing.ROLE_SIGNING), (GRANT_KEY_FILE, sealing.ROLE_GRANT),
                ("pseudonym_keys_retired", sealing.ROLE_PSEUDONYM_RETIRED))
"""Every secret file a node directory can hold, with its sealing role."""


def _reason(reason: str) -> str:
    text = " ".join(str(reason or "").split())
    if not text:
        raise ConfigError("--reason must say why (it is audited)")
    return text


def seal_node(state: NodeState) -> list[str]:
    """Seal every secret file of the node under the configured at-rest key and mark the node
    sealed. Returns the files sealed now (already sealed ones are left). Everything is checked
    to open first, so a wrong key or a damaged file changes nothing."""
    key = sealing.at_rest_key()
    if key is None:
        raise ConfigError(f"set ${sealing.KEY_FILE_ENV} (a key from `fedrisk node seal-key`) or ${sealing.KEY_ENV} "
                          "to the at-rest key first")
    present = [(state.directory / name, role) for name, role in SECRET_FILES if (state.directory / name).is_file()]
    for path, role in present:
        sealing.unseal(path.read_bytes(), role, path)
    state.hospital_key()
    state.pseudonym_key()
    sealed = [path.name for path, role in present if sealing.reseal_file(path, role, key)]
    if not state.sealed:
        NodeState(state.directory, state.hospital, state.data_file, state.schema_file, state.key_file,
                  True).write_node_file()
    state.audit().append(NODE_SEAL, details={"files": sorted(sealed)})
    return sealed


def rotate_signing_key(state: NodeState, reason: str) -> tuple[str, str]:
    """Replace the node's contribution signing key; returns (old, new) public keys, hex. The
    federation must re-enrol the node before its contributions are accepted again."""
    why = _reason(reason)
    path = state.directory / SIGNING_KEY_FILE
    old = state.signing_key().public_hex
    staged = path.with_name(f".{SIGNING_KEY_FILE}.new")
    staged.unlink(missing_ok=True)
    new = SigningKey.create(staged).public_hex
    _require_sealed_if(state, staged)
    os.replace(staged, path)
    state.audit().append(NODE_KEY_ROTATE, details={"key": "contribution-signing", "old": Digest(old),
                                                   "new": Digest(new), "reason": why})
    return old, new


def rekey_pseudonyms(state: NodeState, reason: str) -> dict[str, int]:
    """Replace the node's pseudonymisation key and re-map every stored pseudonym; returns the rows
    re-mapped per table. Refuses, changing nothing, when a stored pseudonym belongs to no record of
    the current export (a consent or an erasure would be lost). Interrupted, the same call
    completes it: the new key is staged first, the stores' update only touches old pseudonyms,
    and the node refuses to load records while a re-key is staged."""
    why = _reason(reason)
    staged = state.directory / STAGED_PSEUDONYM_FILE
    old = PseudonymKey.load(state.directory / PSEUDONYM_FILE, require_sealed=state.sealed)
    created = not staged.exists()
    if created:
        PseudonymKey.create(staged)
        _require_sealed_if(state, staged)
    new = PseudonymKey.load(staged, require_sealed=state.sealed)
    mapping = {}
    for record_key in state.record_keys():
        mapping[old.pseudonym(record_key)] = new.pseudonym(record_key)
    new_values = set(mapping.values())
    registry, grants = state.directory / "revocations.sqlite", state.directory / GRANTS_FILE
    state.revocations()
    remapped: dict[str, int] = {}
    with closing(sqlite3.connect(registry, timeout=30.0, isolation_level=None)) as db:
        tables = [f"main.{t}" for t in _PSEUDONYM_TABLES]
        if grants.is_file():
            db.execute("ATTACH DATABASE ? AS g", (str(grants),))
            tables.append("g.grants")
        db.execute("BEGIN IMMEDIATE")
        try:
            stored = {row[0] for table in tables for row in db.execute(f"SELECT DISTINCT pseudonym FROM {table}")}
            unmapped = stored - set(mapping) - new_values - {PURGED}
            if unmapped:
                raise ConfigError(f"{len(unmapped)} pseudonym(s) in the node's consent, erasure or grant records "
                                  f"belong to no record of {state.data_file.name}; re-key with the export that holds "
                                  "them (nothing was changed)")
            db.execute("CREATE TEMP TABLE remap (old TEXT PRIMARY KEY, new TEXT NOT NULL)")
            db.executemany("INSERT INTO remap VALUES (?, ?)", [p for p in mapping.items() if p[0] in stored])
            for table in tables:
                remapped[table.split(".")[1]] = db.execute(
                    f"UPDATE {table} SET pseudonym = (SELECT new FROM remap WHERE old = pseudonym) "
                    "WHERE pseudonym IN (SELECT old FROM remap)").rowcount
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            if created:
                staged.unlink(missing_ok=True)
            raise
    retired_path = state.directory / RETIRED_PSEUDONYM_FILE
    retired = _retired_pseudonym_secrets(state)
    if old.secret not in retired:
        sealing.write_secret_file(retired_path, sealing.seal_for_disk(b"".join([*retired, old.secret]),
                                                                      sealing.ROLE_PSEUDONYM_RETIRED))
    os.replace(staged, state.directory / PSEUDONYM_FILE)
    state.audit().append(NODE_KEY_ROTATE, details={"key": "pseudonym", "reason": why, "remapped": remapped})
    return remapped


def retired_pseudonym_keys(state: NodeState) -> list[PseudonymKey]:
    """The pseudonym keys this node held before, oldest first: only for finding a patient's entries
    in audit records written before a re-key (`clients.usage`)."""
    return [PseudonymKey(secret) for secret in _retired_pseudonym_secrets(state)]


def _retired_pseudonym_secrets(state: NodeState) -> list[bytes]:
    path = state.directory / RETIRED_PSEUDONYM_FILE
    if not path.is_file():
        return []
    raw = sealing.unseal(path.read_bytes(), sealing.ROLE_PSEUDONYM_RETIRED, path, require_sealed=state.sealed)
    return [raw[i:i + KEY_BYTES] for i in range(0, len(raw), KEY_BYTES)]


def install_ckks_key(state: NodeState, key_file: Path, reason: str) -> tuple[str, str]:
    """Install the federation's new CKKS key at this node in place of the old one, which is
    destroyed; returns (old, new) key ids. Refuses the key the node already holds."""
    why = _reason(reason)
    new_key = HospitalKey.load(Path(key_file))
    old_key = state.hospital_key()
    if new_key.key_id == old_key.key_id:
        raise ConfigError(f"--key-file {key_file} holds the key this node already has ({old_key.key_id})")
    plain = sealing.unseal(Path(key_file).read_bytes(), sealing.ROLE_CKKS, Path(key_file))
    staged = state.key_file.with_name(f".{HOSPITAL_CONTEXT_FILE}.new")
    staged.unlink(missing_ok=True)
    sealing.write_secret_file(staged, sealing.seal_for_disk(plain, sealing.ROLE_CKKS), exclusive=True)
    _require_sealed_if(state, staged)
    retired_path = state.directory / RETIRED_CKKS_FILE
    retired = json.loads(retired_path.read_text()) if retired_path.is_file() else []
    retired.append({"key_id": old_key.key_id, "retired": datetime.now(UTC).isoformat(timespec="seconds"),
                    "reason": why})
    sealing.write_secret_file(retired_path, json.dumps(retired, indent=2).encode())
    _shred(state.key_file)
    os.replace(staged, state.key_file)
    state.audit().append(NODE_KEY_ROTATE, details={"key": "ckks", "old": Digest(old_key.key_id),
                                                   "new": Digest(new_key.key_id), "reason": why})
    return old_key.key_id, new_key.key_id


def retired_ckks_keys(state: NodeState) -> list[str]:
    """The ids of the CKKS keys this node held before and destroyed."""
    path = state.directory / RETIRED_CKKS_FILE
    return [str(entry["key_id"]) for entry in json.loads(path.read_text())] if path.is_file() else []


def _require_sealed_if(state: NodeState, staged: Path) -> None:
    """A sealed node's new key file must be sealed too (an at-rest key must be configured)."""
    if state.sealed and not sealing.is_sealed(staged.read_bytes()):
        staged.unlink()
        raise KeyMaterialError(f"{state.directory} is sealed: set ${sealing.KEY_FILE_ENV} so the new key is sealed")


def _shred(path: Path) -> None:
    """Overwrite a key file with random bytes before it is replaced (best effort on file systems
    that write in place; on copy-on-write or flash storage only sealing protects old copies)."""
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.write(os.urandom(size))
        handle.flush()
        os.fsync(handle.fileno())
