"""A hospital operator's key operations: seal the node's secrets at rest, rotate its keys.

- `seal_node`: every secret in the node directory (CKKS secret context, pseudonym key,
  contribution signing key, grant signing key) sealed with AES-256-GCM under the operator's
  at-rest key (`federation.sealing`), and every SQLite store (ledger, audit log, consent, grants,
  decryptions, anchors, runs, alert state) encrypted page by page (`federation.stores`), the
  clear files overwritten; the directory is then marked sealed, and a secret or store found (or
  about to be written) in clear there is refused from then on.
- `rotate_signing_key`: a new Ed25519 contribution key; the old one is destroyed. The node's
  entry in the federation manifest no longer matches, so its contributions are refused by the
  other hospitals until the federation re-enrols it (`fedrisk node enrol`): a leaked old key
  signs nothing anyone accepts.
- `rekey_pseudonyms`: a new pseudonymisation key; every pseudonym the node's stores hold (consent
  withdrawals and restorations, erasures, grants) is re-mapped through the export's record keys
  in one SQLite transaction across both stores. Rows of patients the export no longer holds keep
  their old pseudonym: the old key is kept (sealed) so that such a withdrawal or erasure still
  applies if the record comes back (`NodeState.usable`), and so that a patient's entries in the
  append-only audit log written before the re-key are still found (their usage record). It never
  makes a new pseudonym. Re-keying redraws the local test split, which hashes the pseudonym.
- `rotate_at_rest_key`: every sealed secret and encrypted store re-encrypted under a new at-rest
  key (a suspected leak of the old one, or a scheduled change).
- `install_ckks_key`: the federation's new CKKS key replaces the node's copy of the old one,
  which is destroyed, and its id is recorded as retired. Ciphertexts and checkpoints made under
  the old key can no longer be decrypted by this node: a run made under it cannot resume, and
  the node refuses the old key's messages (their key id is not its key's).

Each step is audited with the public fingerprints only (`node.seal`, `node.key-rotate`).
"""

from __future__ import annotations

import json
import os
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

from clients.anchoring import EPOCH_FILE
from clients.erasure import PURGED
from clients.node_state import RETIRED_PSEUDONYM_FILE, STAGED_PSEUDONYM_FILE, NodeState
from federation import sealing, stores
from federation.contributions import SIGNING_KEY_FILE, SigningKey
from federation.errors import ConfigError
from federation.he_codec import HOSPITAL_CONTEXT_FILE, HospitalKey
from privacy.audit import NODE_KEY_ROTATE, NODE_SEAL, Digest
from privacy.grants import GRANTS_FILE
from privacy.grants import SIGNING_KEY_FILE as GRANT_KEY_FILE
from privacy.pseudonym import PseudonymKey

PSEUDONYM_FILE = "pseudonym.key"
_PSEUDONYM_TABLES = ("revocations", "consent_events", "erasures")

RETIRED_CKKS_FILE = "ckks_keys_retired.json"
SECRET_FILES = ((HOSPITAL_CONTEXT_FILE, sealing.ROLE_CKKS), ("pseudonym.key", sealing.ROLE_PSEUDONYM),
                (SIGNING_KEY_FILE, sealing.ROLE_SIGNING), (GRANT_KEY_FILE, sealing.ROLE_GRANT),
                (RETIRED_PSEUDONYM_FILE, sealing.ROLE_PSEUDONYM_RETIRED), (EPOCH_FILE, sealing.ROLE_ANCHOR_EPOCH))
"""Every sealed file a node directory can hold, with its sealing role."""


def _reason(reason: str) -> str:
    text = " ".join(str(reason or "").split())
    if not text:
        raise ConfigError("--reason must say why (it is audited)")
    return text


def seal_node(state: NodeState) -> list[str]:
    """Seal every secret file of the node and encrypt every SQLite store in it (`federation.stores`)
    under the configured at-rest key, then mark the node sealed. Returns the files sealed or
    encrypted now (already sealed ones are left, so running it again finishes an interrupted
    seal). Everything is checked to open first, so a wrong key or a damaged file changes nothing.
    The node must not be serving while it is sealed."""
    key = sealing.at_rest_key()
    if key is None:
        raise ConfigError(f"set ${sealing.KEY_FILE_ENV} (a key from `fedrisk node seal-key`) or ${sealing.KEY_ENV} "
                          "to the at-rest key first")
    present = [(state.directory / name, role) for name, role in SECRET_FILES if (state.directory / name).is_file()]
    for path, role in present:
        sealing.unseal(path.read_bytes(), role, path)
    state.hospital_key()
    state.pseudonym_key()
    stores.check_directory(state.directory)
    sealed = [path.name for path, role in present if sealing.reseal_file(path, role, key)]
    sealed += stores.encrypt_directory(state.directory)
    sealing.mark_sealed(state.directory)
    state.audit().append(NODE_SEAL, details={"files": sorted(sealed)})
    return sealed


def rotate_signing_key(state: NodeState, reason: str) -> tuple[str, str]:
    """Replace the node's contribution signing key; returns (old, new) public keys, hex. The
    federation must re-enrol the node before its contributions are accepted again."""
    why = _reason(reason)
    path = state.directory / SIGNING_KEY_FILE
    _recover(path)
    old = state.signing_key().public_hex
    staged = path.with_name(f".{SIGNING_KEY_FILE}.new")
    staged.unlink(missing_ok=True)
    new = SigningKey.create(staged).public_hex
    _replace_key(path, staged)
    state.audit().append(NODE_KEY_ROTATE, details={"key": "contribution-signing", "old": Digest(old),
                                                   "new": Digest(new), "reason": why})
    return old, new


def rekey_pseudonyms(state: NodeState, reason: str) -> dict[str, int]:
    """Replace the node's pseudonymisation key and re-map every stored pseudonym of a record the
    export holds; returns the rows re-mapped per table, and under "kept" the rows of patients no
    longer in the export (left under their old pseudonym, still applied through the kept old key).
    Interrupted, the same call completes it: the new key is staged (durably) before the stores
    change, the stores' update only touches old pseudonyms, and the node refuses to load records
    while a re-key is staged."""
    why = _reason(reason)
    staged = state.directory / STAGED_PSEUDONYM_FILE
    _recover(state.directory / PSEUDONYM_FILE)
    old = PseudonymKey.load(state.directory / PSEUDONYM_FILE, require_sealed=state.sealed)
    record_keys = state.record_keys()
    state.revocations()
    created = not staged.exists()
    if created:
        PseudonymKey.create(staged)
    try:
        new = PseudonymKey.load(staged, require_sealed=state.sealed)
        mapping = {old.pseudonym(k): new.pseudonym(k) for k in record_keys}
        remapped = _remap(state, mapping)
    except BaseException:
        if created:
            staged.unlink(missing_ok=True)
        raise
    retired = state.retired_pseudonym_keys()
    if old.secret not in {k.secret for k in retired}:
        path = state.directory / RETIRED_PSEUDONYM_FILE
        content = b"".join([*(k.secret for k in retired), old.secret])
        sealing.write_secret_file(path, sealing.seal_for_disk(content, sealing.ROLE_PSEUDONYM_RETIRED, path))
    _replace_key(state.directory / PSEUDONYM_FILE, staged)
    late = _remap(state, mapping)  # a withdrawal written under the old key while the re-key ran
    remapped = {table: count + late.get(table, 0) for table, count in remapped.items() if table != "kept"} | {
        "kept": late["kept"]}
    state.audit().append(NODE_KEY_ROTATE, details={"key": "pseudonym", "reason": why, "remapped": remapped})
    return remapped


def adopt_record(state: NodeState, record_key: str) -> int:
    """Bring one record's rows kept under a retired pseudonym key (it was absent from the export
    at a re-key) under the current key, before an operator acts on it (withdraw, restore, erase);
    returns the rows moved. A no-op on a node that was never re-keyed."""
    retired = state.retired_pseudonym_keys()
    if not retired:
        return 0
    current = state.pseudonym_key().pseudonym(record_key)
    moved = _remap(state, {key.pseudonym(record_key): current for key in retired})
    return sum(count for table, count in moved.items() if table != "kept")


def _remap(state: NodeState, mapping: dict[str, str]) -> dict[str, int]:
    """Re-map, in one transaction over the consent registry and the grant store, every stored
    pseudonym that `mapping` holds; counts per table, and "kept": rows of no current record."""
    registry, grants = state.directory / "revocations.sqlite", state.directory / GRANTS_FILE
    new_values = set(mapping.values())
    remapped: dict[str, int] = {}
    with closing(stores.connect(registry, timeout=30.0, isolation_level=None)) as db:
        tables = [f"main.{t}" for t in _PSEUDONYM_TABLES]
        if grants.is_file():
            stores.attach(db, grants, "g")
            tables.append("g.grants")
        db.execute("BEGIN IMMEDIATE")
        try:
            stored = {row[0] for table in tables for row in db.execute(f"SELECT DISTINCT pseudonym FROM {table}")}
            db.execute("CREATE TEMP TABLE remap (old TEXT PRIMARY KEY, new TEXT NOT NULL)")
            db.executemany("INSERT INTO remap VALUES (?, ?)", [p for p in mapping.items() if p[0] in stored])
            for table in tables:
                # OR REPLACE: a row the same patient already has under the new key stands for both
                remapped[table.split(".")[1]] = db.execute(
                    f"UPDATE OR REPLACE {table} SET pseudonym = (SELECT new FROM remap WHERE old = pseudonym) "
                    "WHERE pseudonym IN (SELECT old FROM remap)").rowcount
            db.execute("CREATE TEMP TABLE kept (pseudonym TEXT PRIMARY KEY)")
            db.executemany("INSERT INTO kept VALUES (?)", [(p,) for p in stored - set(mapping) - new_values - {PURGED}])
            remapped["kept"] = sum(db.execute(f"SELECT COUNT(*) FROM {table} WHERE pseudonym IN "
                                              "(SELECT pseudonym FROM kept)").fetchone()[0] for table in tables)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return remapped


def install_ckks_key(state: NodeState, key_file: Path, reason: str) -> tuple[str, str]:
    """Install the federation's new CKKS key at this node in place of the old one, which is
    destroyed; returns (old, new) key ids. Refuses the key the node holds or held before."""
    why = _reason(reason)
    _recover(state.key_file)
    new_key = HospitalKey.load(Path(key_file))
    old_key = state.hospital_key()
    if new_key.key_id == old_key.key_id:
        raise ConfigError(f"--key-file {key_file} holds the key this node already has ({old_key.key_id})")
    if new_key.key_id in retired_ckks_keys(state):
        raise ConfigError(f"--key-file {key_file} holds key {new_key.key_id}, which this node retired")
    plain = sealing.unseal(Path(key_file).read_bytes(), sealing.ROLE_CKKS, Path(key_file))
    staged = state.key_file.with_name(f".{HOSPITAL_CONTEXT_FILE}.new")
    staged.unlink(missing_ok=True)
    sealing.write_secret_file(staged, sealing.seal_for_disk(plain, sealing.ROLE_CKKS, state.key_file), exclusive=True)
    retired_path = state.directory / RETIRED_CKKS_FILE
    retired = json.loads(retired_path.read_text()) if retired_path.is_file() else []
    retired.append({"key_id": old_key.key_id, "retired": datetime.now(UTC).isoformat(timespec="seconds"),
                    "reason": why})
    sealing.write_secret_file(retired_path, json.dumps(retired, indent=2).encode())
    _replace_key(state.key_file, staged)
    state.audit().append(NODE_KEY_ROTATE, details={"key": "ckks", "old": Digest(old_key.key_id),
                                                   "new": Digest(new_key.key_id), "reason": why})
    return old_key.key_id, new_key.key_id


def rotate_at_rest_key(state: NodeState, new_key_file: Path, reason: str) -> tuple[str, str]:
    """Re-encrypt the sealed node under the at-rest key in `new_key_file` (every sealed secret
    resealed, every store re-keyed; `federation.stores.rotate_directory`) and audit it; returns
    the (old, new) key fingerprints. The current key is the configured one; from here on this
    process uses the new one. The node must not be serving. Run it again (with the old key still
    configured) to finish an interrupted rotation."""
    why = _reason(reason)
    staged = {STAGED_PSEUDONYM_FILE: sealing.ROLE_PSEUDONYM, f".{HOSPITAL_CONTEXT_FILE}.new": sealing.ROLE_CKKS}
    changed, old_id, new_id = stores.rotate_to_key_file(state.directory, {**dict(SECRET_FILES), **staged},
                                                        Path(new_key_file))
    state.audit().append(NODE_KEY_ROTATE, details={"key": "at-rest", "old": old_id, "new": new_id,
                                                   "files": len(changed), "reason": why})
    return old_id, new_id


def retired_ckks_keys(state: NodeState) -> list[str]:
    """The ids of the CKKS keys this node held before and destroyed."""
    path = state.directory / RETIRED_CKKS_FILE
    return [str(entry["key_id"]) for entry in json.loads(path.read_text())] if path.is_file() else []


def _recover(path: Path) -> None:
    """Undo a `_replace_key` interrupted between its two renames: the old key goes back."""
    aside = path.with_name(f".{path.name}.retiring")
    if aside.exists() and not path.exists():
        os.replace(aside, path)


def _replace_key(path: Path, staged: Path) -> None:
    """Put the staged new key file in place of the key at `path`, then destroy the old one: moved
    aside first (so at every moment one of the two is at `path`), overwritten, removed."""
    aside = path.with_name(f".{path.name}.retiring")
    os.replace(path, aside)
    os.replace(staged, path)
    sealing.fsync_directory(path.parent)
    sealing.shred(aside)
    aside.unlink()
