"""The signals service's stores encrypted at rest (`fedrisk serve seal`).

The service keeps API key digests, hospitals' endpoints and token files' names, approved cohort
tables and its request audit log in SQLite files beside `--db`. Sealed, every one of them is
encrypted page by page under the operator's at-rest key (`federation.stores`), and the directory
is marked so that a store found or created there in clear is refused from then on. The service
then needs the key (`$FEDRISK_NODE_KEY_FILE` or `$FEDRISK_NODE_KEY`, the machine's at-rest key)
to start; without it every command fails with one line naming the store and the variable.
"""

from __future__ import annotations

from pathlib import Path

from federation import sealing, stores
from federation.errors import ConfigError
from privacy.alerts import STATE_FILE as ALERT_STATE_FILE
from privacy.audit import STORES_REKEY, STORES_SEAL
from server.signals.trail import RequestTrail


def _own_stores(db: Path, audit: Path) -> list[str]:
    """The service's stores beside `db`; ConfigError if the directory holds any other store (a
    workspace's mlflow.db, another service's): sealing marks the whole directory."""
    own = [db.name, audit.name, ALERT_STATE_FILE]
    others = [p.name for p in stores.stores_in(db.parent) if p.name not in own]
    if others:
        raise ConfigError(f"--db {db}: its directory also holds {', '.join(others)}; keep the service's stores in a "
                          "directory of their own before sealing it")
    return own


def seal_service(db: Path, audit: Path) -> list[str]:
    """Encrypt every store in the directory of `db` (and the audit log `audit`, which must lie
    there) and mark the directory sealed; the stores encrypted now. Stop the service first."""
    db, audit = Path(db), Path(audit)
    directory = db.parent
    if not directory.is_dir():
        raise ConfigError(f"--db {db}: its directory does not exist (nothing to seal)")
    if audit.parent.resolve() != directory.resolve():
        raise ConfigError(f"the audit log {audit} is not beside --db {db}; seal each directory")
    if sealing.at_rest_key() is None:
        raise ConfigError(f"set ${sealing.KEY_FILE_ENV} (a key from `fedrisk node seal-key`) or ${sealing.KEY_ENV} "
                          "to the at-rest key first")
    encrypted = stores.encrypt_directory(directory, _own_stores(db, audit))
    sealing.mark_sealed(directory)
    RequestTrail(audit).log.append(STORES_SEAL, details={"stores": sorted(encrypted)})
    return encrypted


def rotate_service_key(db: Path, audit: Path, new_key_file: Path, reason: str) -> tuple[str, str]:
    """Re-key every store beside `db` under the at-rest key in `new_key_file` (the current key is
    the configured one) and audit it under the new key; the (old, new) key fingerprints. Stop the
    service first; run it again with the old key configured to finish an interrupted one."""
    why = " ".join(str(reason or "").split())
    if not why:
        raise ConfigError("--reason must say why (it is audited)")
    changed, old_id, new_id = stores.rotate_to_key_file(Path(db).parent, {}, Path(new_key_file),
                                                        _own_stores(Path(db), Path(audit)))
    RequestTrail(audit).log.append(STORES_REKEY, details={"old": old_id, "new": new_id, "stores": sorted(changed),
                                                          "reason": why})
    return old_id, new_id
