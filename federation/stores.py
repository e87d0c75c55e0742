"""SQLite stores, encrypted at rest in a sealed directory.

A node's ledger, audit log, consent withdrawals, grants, decryption and anchoring records, and
the signals service's keys, hospitals and cohort tables are SQLite files. In a sealed directory
(`federation.sealing.SEALED_MARKER`) every one of them is opened through SQLCipher: each 4 KiB
page (and each WAL frame) is encrypted with AES-256 and authenticated with HMAC-SHA512 under a
store key, so a stolen disk image or a copied file gives no row, no table name, not even the
schema, and an altered page is refused rather than read.

Why SQLCipher and not AES-GCM over the file: a store is shared live between processes (the
ledger by every Flower worker, in WAL mode) and updated page by page, so it must be encrypted
where SQLite reads and writes pages. SQLCipher's page format is encrypt-then-MAC (AES-256-CBC
with a random IV per page write, HMAC-SHA512 over IV, ciphertext and page number): the same
guarantee as GCM for this use, confidentiality and integrity of every page. The sealed secrets
themselves stay AES-256-GCM (`federation.sealing`).

The store key is never stored: it is derived with HKDF-SHA256 from the operator's at-rest key
(`$FEDRISK_NODE_KEY_FILE` or `$FEDRISK_NODE_KEY`) and handed to SQLCipher as a raw key, so
opening a store costs no password stretching. Outside a sealed directory stores are plain
SQLite, as before; a store that is already encrypted is opened encrypted wherever it lies (an
interrupted `fedrisk node seal` leaves some stores encrypted before the marker is written).

Every store in fedrisk is opened with `connect`; the exception tuples below catch the same
errors from either driver.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlcipher3 import dbapi2 as _cipher

from federation import sealing
from federation.errors import ConfigError, KeyMaterialError

CLEAR_HEADER = b"SQLite format 3\x00"
STORE_SUFFIXES = (".sqlite", ".db")
_HKDF_INFO = b"fedrisk sqlcipher store key v1"

Error = (sqlite3.Error, _cipher.Error)
DatabaseError = (sqlite3.DatabaseError, _cipher.DatabaseError)
IntegrityError = (sqlite3.IntegrityError, _cipher.IntegrityError)
OperationalError = (sqlite3.OperationalError, _cipher.OperationalError)
Connection = sqlite3.Connection | _cipher.Connection


@lru_cache(maxsize=8)
def _derive(at_rest: bytes) -> str:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(at_rest)
    return f"x'{key.hex()}'"


@lru_cache(maxsize=1)
def _quiet() -> None:
    """SQLCipher logs a failed page check to stderr; the caller's one-line error says it instead."""
    with closing(_cipher.connect(":memory:")) as db:
        db.execute("PRAGMA cipher_log_level = NONE")


def store_key(path: Path | None = None) -> str:
    """The SQLCipher raw-key literal for this process's at-rest key; KeyMaterialError naming the
    store `path` and the variables when none is configured."""
    try:
        at_rest = sealing.at_rest_key()
    except ConfigError as exc:
        raise KeyMaterialError(str(exc)) from None
    if at_rest is None:
        where = f"{path} is encrypted at rest" if path is not None else "the stores here are encrypted at rest"
        raise KeyMaterialError(f"{where}: set ${sealing.KEY_FILE_ENV} (or ${sealing.KEY_ENV}) to the at-rest key")
    return _derive(at_rest)


def _not_a_database(error: Exception) -> bool:
    """Whether a driver error says the key does not open the file (SQLITE_NOTADB), as opposed to a
    busy, locked or full database, which callers handle as such."""
    return getattr(error, "sqlite_errorcode", None) == 26 or "file is not a database" in str(error)


def _wrong_key(path: Path) -> KeyMaterialError:
    return KeyMaterialError(f"{path} cannot be opened with this at-rest key (${sealing.KEY_FILE_ENV} or "
                            f"${sealing.KEY_ENV} holds another key, or the file was altered)")


def is_clear(path: Path) -> bool | None:
    """True for a plain SQLite file, False for an encrypted one, None if absent or empty."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(CLEAR_HEADER))
    except FileNotFoundError:
        return None
    return None if not head else head == CLEAR_HEADER


def is_encrypted(path: Path) -> bool:
    """Whether the store at `path` is (or, being new, will be) encrypted: it lies in a sealed
    directory, or its file is not plain SQLite and an at-rest key is configured (outside a sealed
    directory such a file is otherwise reported by SQLite as not a database, as it always was)."""
    path = Path(path)
    if sealing.directory_sealed(path.parent):
        return True
    if is_clear(path) is not False:
        return False
    try:
        return sealing.at_rest_key() is not None
    except ConfigError:
        return True


def attach(db: Connection, path: Path, alias: str) -> None:
    """ATTACH the store at `path` to the open connection `db` as `alias`, with its own key when it
    is encrypted (the rule of `connect`)."""
    path = Path(path)
    if not alias.isidentifier():
        raise ValueError(f"not an SQL alias: {alias!r}")
    if is_encrypted(path):
        if is_clear(path):
            raise KeyMaterialError(f"{path} is a plain SQLite file in a directory whose stores are encrypted at "
                                   "rest; run `fedrisk node seal` to encrypt it")
        if not isinstance(db, _cipher.Connection):
            raise KeyMaterialError(f"{path} is encrypted at rest but the store it joins is not; run `fedrisk node "
                                   "seal` to finish encrypting the directory")
        db.execute(f'ATTACH DATABASE ? AS {alias} KEY "{store_key(path)}"', (str(path),))
        try:
            db.execute(f"SELECT count(*) FROM {alias}.sqlite_master").fetchone()
        except _cipher.DatabaseError as error:
            db.execute(f"DETACH DATABASE {alias}")
            if _not_a_database(error):
                raise _wrong_key(path) from None
            raise
    elif isinstance(db, _cipher.Connection):
        db.execute(f"ATTACH DATABASE ? AS {alias} KEY ''", (str(path),))
    else:
        db.execute(f"ATTACH DATABASE ? AS {alias}", (str(path),))


def connect(path: Path | str, *, timeout: float = 30.0, isolation_level: str | None = "",
            read_only: bool = False, encrypted: bool | None = None) -> Any:
    """Open the SQLite store at `path` (a DB-API connection of either driver).

    Encrypted when `encrypted`, or by default when `is_encrypted(path)`: the key is derived from
    the at-rest key and checked at once, so a wrong or missing key fails here with one line
    naming the file, never later inside a transaction. A plain SQLite file in a sealed directory
    is refused: it can only have been put there from outside (or the node was never migrated;
    `fedrisk node seal` encrypts it). `read_only` opens without write access."""
    path = Path(path)
    if encrypted is None:
        encrypted = is_encrypted(path)
    target = f"file:{path}?mode=ro" if read_only else str(path)
    if not encrypted:
        return sqlite3.connect(target, timeout=timeout, isolation_level=isolation_level, uri=read_only)
    if is_clear(path):
        raise KeyMaterialError(f"{path} is a plain SQLite file in a directory whose stores are encrypted at rest; "
                               "run `fedrisk node seal` (or `fedrisk serve seal`) to encrypt it")
    db = _keyed(target, store_key(path), timeout=timeout, isolation_level=isolation_level, uri=read_only)
    if db is None:
        raise _wrong_key(path)
    return db


def _shred_open(handle: Any) -> None:
    """Overwrite the whole file behind the open binary `handle` with random bytes, durably."""
    size = os.fstat(handle.fileno()).st_size
    handle.seek(0)
    handle.write(os.urandom(size))
    handle.flush()
    os.fsync(handle.fileno())


def _reencrypt(path: Path, old: str | None, new: str) -> None:
    """Rewrite the store at `path` (plain when `old` is None, else under the raw key `old`) under
    the raw key `new`: exported into a new file beside it, renamed over it, and only then the old
    file's content overwritten through a handle held across the rename, so that an interruption
    leaves either the old store or the new one, never neither. Its journals are overwritten too."""
    staged = path.with_name(f".{path.name}.encrypting")
    staged.unlink(missing_ok=True)
    _quiet()
    source = _cipher.connect(str(path), isolation_level=None, timeout=60.0)
    try:
        if old is not None:
            source.execute(f'PRAGMA key = "{old}"')
        journal = source.execute("PRAGMA journal_mode").fetchone()[0]
        busy = source.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy and busy[0]:
            raise KeyMaterialError(f"{path} is in use by another process; stop the node (or service) first")
        source.execute(f'ATTACH DATABASE ? AS encrypted KEY "{new}"', (str(staged),))
        source.execute("BEGIN EXCLUSIVE")
        version = source.execute("PRAGMA main.user_version").fetchone()[0]
        source.execute("SELECT sqlcipher_export('encrypted')")
        source.execute(f"PRAGMA encrypted.user_version = {int(version)}")
        source.execute("COMMIT")
        source.execute("DETACH DATABASE encrypted")
    except BaseException:
        source.close()
        staged.unlink(missing_ok=True)
        raise
    source.close()
    os.chmod(staged, 0o600)
    if journal == "wal":
        target = _cipher.connect(str(staged), isolation_level=None)
        try:
            target.execute(f'PRAGMA key = "{new}"')
            target.execute("PRAGMA journal_mode=WAL")
        finally:
            target.close()
    with open(path, "r+b") as previous:
        os.replace(staged, path)
        sealing.fsync_directory(path.parent)
        _shred_open(previous)
    for suffix in ("-wal", "-shm", "-journal"):
        sidecar = Path(f"{path}{suffix}")
        if sidecar.exists():
            with open(sidecar, "r+b") as handle:
                _shred_open(handle)
            sidecar.unlink()
    sealing.fsync_directory(path.parent)


def _keyed(target: str, literal: str, *, timeout: float = 60.0, isolation_level: str | None = None,
           uri: bool = False) -> Any | None:
    """An SQLCipher connection to `target` under the raw-key `literal`, its first page read at once;
    None if the key does not open it (busy or locked errors pass as such)."""
    _quiet()
    db = _cipher.connect(target, timeout=timeout, isolation_level=isolation_level, uri=uri)
    try:
        db.execute(f'PRAGMA key = "{literal}"')
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except _cipher.DatabaseError as error:
        db.close()
        if _not_a_database(error):
            return None
        raise
    return db


def encrypt_in_place(path: Path) -> bool:
    """Encrypt the plain SQLite store at `path` under the at-rest key (`_reencrypt`). False if it
    already is encrypted (checked to open under this key). The store's writers must be stopped."""
    path = Path(path)
    state = is_clear(path)
    if state is None:
        return False
    if state is False:
        connect(path, encrypted=True).close()
        return False
    _reencrypt(path, None, store_key(path))
    return True


def stores_in(directory: Path) -> list[Path]:
    """The SQLite store files directly in `directory` (not their journals)."""
    return sorted(p for p in Path(directory).iterdir()
                  if p.is_file() and p.suffix in STORE_SUFFIXES and is_clear(p) is not None)


def check_directory(directory: Path, only: Iterable[str] | None = None) -> list[Path]:
    """Every store in `directory` (or those of its stores named in `only`), each checked to open
    (a plain one as SQLite, an encrypted one under this at-rest key) before anything is changed;
    KeyMaterialError naming the first that does not."""
    found = stores_in(directory)
    if only is not None:
        names = set(only)
        found = [p for p in found if p.name in names]
    for path in found:
        try:
            with closing(connect(path, read_only=True, encrypted=is_clear(path) is False)) as db:
                db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except DatabaseError:
            raise KeyMaterialError(f"{path} is damaged (not an SQLite store); nothing was encrypted") from None
    return found


def encrypt_directory(directory: Path, only: Iterable[str] | None = None) -> list[str]:
    """Encrypt every plain store in `directory` under the at-rest key (`encrypt_in_place`), after
    checking they all open; the names encrypted now. The caller marks the directory sealed once
    everything in it is, so that an interruption is finished by running it again."""
    store_key(Path(directory))
    return [path.name for path in check_directory(directory, only) if encrypt_in_place(path)]


def _open_under(path: Path, literal: str) -> Any | None:
    """A connection to the encrypted store `path` under the raw-key `literal`, or None if it does
    not open under it."""
    return _keyed(str(path), literal)


def rotate_directory(directory: Path, secrets: dict[str, str], new_at_rest: bytes,
                     only: Iterable[str] | None = None) -> list[str]:
    """Re-encrypt a sealed directory under a new at-rest key: every sealed secret file named in
    `secrets` ({file name: sealing role}) and every store. The current key is the configured one.

    Everything is checked first to open under the current key or the new one (a file already
    under the new key is left: running it again finishes an interrupted rotation); then each
    secret is resealed and each store rewritten under the new key (`_reencrypt`: the old file's
    pages are overwritten, not left in a journal).
    Returns the files changed. The directory's writers must be stopped."""
    directory = Path(directory)
    if not sealing.directory_sealed(directory):
        raise ConfigError(f"{directory} is not sealed; seal it first (`fedrisk node seal` / `fedrisk serve seal`)")
    old_at_rest = sealing.at_rest_key()
    if old_at_rest is None:
        raise ConfigError(f"set ${sealing.KEY_FILE_ENV} (or ${sealing.KEY_ENV}) to the current at-rest key")
    if new_at_rest == old_at_rest:
        raise ConfigError("the new at-rest key is the current one")
    old, new = _derive(old_at_rest), _derive(new_at_rest)
    pending_secrets: list[tuple[Path, str, bytes]] = []
    for name, role in secrets.items():
        path = directory / name
        if not path.is_file():
            continue
        raw = path.read_bytes()
        plain = sealing.open_sealed(raw, role, old_at_rest)
        if plain is None and sealing.open_sealed(raw, role, new_at_rest) is None:
            raise KeyMaterialError(f"{path} opens under neither the current nor the new at-rest key; nothing changed")
        if plain is not None:
            pending_secrets.append((path, role, plain))
    pending_stores: list[Path] = []
    for path in [p for p in stores_in(directory) if only is None or p.name in set(only)]:
        for literal in (old, new):
            db = _open_under(path, literal)
            if db is not None:
                db.close()
                if literal == old:
                    pending_stores.append(path)
                break
        else:
            raise KeyMaterialError(f"{path} opens under neither the current nor the new at-rest key; nothing changed")
    for path, role, plain in pending_secrets:
        sealing.write_secret_file(path, sealing.seal(plain, role, new_at_rest), shred_old=True)
    for path in pending_stores:
        _reencrypt(path, old, new)
    return sorted([p.name for p, _, _ in pending_secrets] + [p.name for p in pending_stores])


def rotate_to_key_file(directory: Path, secrets: dict[str, str], new_key_file: Path,
                       only: Iterable[str] | None = None) -> tuple[list[str], str, str]:
    """`rotate_directory` under the key in `new_key_file`, which then becomes this process's
    at-rest key (so the caller's audit entry is written under it). Returns the files changed and
    the old and new keys' public fingerprints."""
    new = sealing.read_key_file(Path(new_key_file), f"--new-key-file {new_key_file}", "at-rest key")
    old = sealing.at_rest_key()
    changed = rotate_directory(directory, secrets, new, only)
    sealing.use_key_file(Path(new_key_file))
    return changed, sealing.key_id(old) if old else "", sealing.key_id(new)
