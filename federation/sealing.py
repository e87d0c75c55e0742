"""Node secrets sealed at rest: AES-256-GCM under a key the operator supplies.

A hospital node keeps secrets on disk: the CKKS secret context, the pseudonymisation key, the
contribution signing key, the grant signing key. File modes keep other users out; they do not
help against a stolen disk image or a backup tape. Sealed, each secret file is

    MAGIC | 12-byte random nonce | AES-256-GCM(secret, associated data = MAGIC | role)

under a 32-byte at-rest key that never lies in the node directory: the operator keeps it in a
file elsewhere (`$FEDRISK_NODE_KEY_FILE`, made by `fedrisk node seal-key`) or hands it to the
process in `$FEDRISK_NODE_KEY` (base64), for example from a secrets manager. The role in the
associated data stops a sealed file from being swapped into another secret's place. Without
the key a sealed file gives nothing and the node refuses to start, naming the file and the
variable; with it the node works as before.

Every reader of a secret file calls `unseal`, every writer `seal_for_disk`: a node whose
operator configured a key writes every new secret sealed (keys created at `node init`,
rotated keys, a grant key created on first use).
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

from federation.errors import ConfigError, KeyMaterialError

MAGIC = b"FEDRISK-SEALED v1\n"
KEY_BYTES, NONCE_BYTES = 32, 12
KEY_ENV = "FEDRISK_NODE_KEY"
KEY_FILE_ENV = "FEDRISK_NODE_KEY_FILE"

SEALED_MARKER = ".fedrisk-sealed"
"""A file in a directory whose secrets are sealed: every secret read there must be sealed, and no
secret is written there in clear."""

ROLE_CKKS = "ckks-secret-context"
ROLE_PSEUDONYM = "pseudonym-key"
ROLE_SIGNING = "contribution-signing-key"
ROLE_GRANT = "grant-signing-key"
ROLE_PSEUDONYM_RETIRED = "retired-pseudonym-keys"
ROLE_ANCHOR_EPOCH = "anchor-epoch"  # not secret, but sealed so that it cannot be raised without the key


def create_key_file(path: Path, what: str) -> Path:
    """A new random 32-byte key at `path`: base64, mode 0600, never overwritten (an old key may
    still be needed to open what it sealed). `what` names the key in the error."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists; a {what} is never overwritten (it may still open what it sealed)") from None
    except OSError as exc:
        raise ConfigError(f"cannot create {what} {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii") + "\n")
    return Path(path)


def parse_key(text: str, where: str, what: str) -> bytes:
    """The 32 bytes a base64 key text holds; one-line ConfigError naming `where` otherwise."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{where}: not a {what} (base64 of {KEY_BYTES} bytes)")
    return key


def read_key_file(path: Path, where: str, what: str) -> bytes:
    """The key in the file at `path` (see `parse_key`)."""
    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        raise ConfigError(f"{where}: not readable") from None
    return parse_key(text, where, what)


def at_rest_key() -> bytes | None:
    """The operator's at-rest key from `$FEDRISK_NODE_KEY_FILE` or `$FEDRISK_NODE_KEY`, or None
    when neither is set (secrets are then written in clear, as before sealing existed)."""
    path = os.environ.get(KEY_FILE_ENV, "").strip()
    if path:
        return read_key_file(Path(path), f"${KEY_FILE_ENV}={path}", "node at-rest key")
    text = os.environ.get(KEY_ENV, "").strip()
    return parse_key(text, f"${KEY_ENV}", "node at-rest key") if text else None


def key_id(key: bytes) -> str:
    """A public fingerprint of an at-rest key (which key sealed a directory, for the audit log and
    the operator); it reveals nothing of the key."""
    import hashlib

    return hashlib.sha256(b"fedrisk at-rest key id\0" + key).hexdigest()[:16]


def use_key_file(path: Path) -> None:
    """Make the key file `path` this process's at-rest key from now on (after a rotation)."""
    os.environ[KEY_FILE_ENV] = str(path)
    os.environ.pop(KEY_ENV, None)


def is_sealed(raw: bytes) -> bool:
    """Whether `raw` is a sealed secret file's content."""
    return raw.startswith(MAGIC)


def seal(plain: bytes, role: str, key: bytes) -> bytes:
    """`plain` sealed for `role` under `key`."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = secrets.token_bytes(NONCE_BYTES)
    return MAGIC + nonce + AESGCM(key).encrypt(nonce, plain, MAGIC + role.encode("ascii"))


def open_sealed(raw: bytes, role: str, key: bytes) -> bytes | None:
    """The secret a sealed file's content `raw` holds for `role` under `key`; None if it does not
    open (wrong key, altered, another role's file, or not sealed)."""
    if not is_sealed(raw):
        return None
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    body = raw[len(MAGIC):]
    try:
        return AESGCM(key).decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:], MAGIC + role.encode("ascii"))
    except (InvalidTag, ValueError):
        return None


def directory_sealed(directory: Path) -> bool:
    """Whether `directory` holds sealed secrets (its `SEALED_MARKER` exists)."""
    return (Path(directory) / SEALED_MARKER).exists()


def check_keyed(directory: Path, seal_command: str) -> None:
    """A process given an at-rest key opens only sealed directories: an unsealed one there is
    either not sealed yet (`seal_command` seals it) or was sealed and lost its marker, which is
    how someone with write access but no key would make it read clear files planted in place of
    the encrypted ones. KeyMaterialError either way, naming the directory."""
    if not directory_sealed(directory) and at_rest_key() is not None:
        raise KeyMaterialError(f"{directory} is not sealed at rest but an at-rest key is configured "
                               f"(${KEY_FILE_ENV} or ${KEY_ENV}): if it was sealed, its {SEALED_MARKER} marker was "
                               f"removed, so restore the directory from a backup; otherwise run `{seal_command}` "
                               "or unset the key")


def mark_sealed(directory: Path) -> None:
    """Mark `directory` as holding sealed secrets only."""
    write_secret_file(Path(directory) / SEALED_MARKER, b"secrets in this directory are sealed at rest\n")


def seal_for_disk(plain: bytes, role: str, path: Path) -> bytes:
    """What a writer of the new secret file `path` writes: sealed when an at-rest key is
    configured; refused in clear in a sealed directory (KeyMaterialError)."""
    key = at_rest_key()
    if key is None:
        if directory_sealed(Path(path).parent):
            raise KeyMaterialError(f"{Path(path).parent} is sealed: set ${KEY_FILE_ENV} (or ${KEY_ENV}) so "
                                   f"{Path(path).name} is written sealed")
        return plain
    return seal(plain, role, key)


def unseal(raw: bytes, role: str, where: Path, *, require_sealed: bool = False) -> bytes:
    """The secret in a file's content `raw`: opened when sealed, as is when in clear (unless the
    node is sealed, `require_sealed`: then a clear file is refused, since it can only have been
    put there from outside). KeyMaterialError naming the file and what to set otherwise."""
    if not is_sealed(raw):
        if require_sealed or directory_sealed(Path(where).parent):
            raise KeyMaterialError(f"{where} is in clear but this node's secrets are sealed at rest; a clear "
                                   "secret here was put in place from outside: restore it from a backup")
        return raw
    try:
        key = at_rest_key()
    except ConfigError as exc:
        raise KeyMaterialError(str(exc)) from None
    if key is None:
        raise KeyMaterialError(f"{where} is sealed at rest: set ${KEY_FILE_ENV} (or ${KEY_ENV}) to the node's "
                               "at-rest key")
    plain = open_sealed(raw, role, key)
    if plain is None:
        raise KeyMaterialError(f"{where} cannot be opened with this at-rest key (wrong key, altered, or another "
                               "secret's file)")
    return plain


def reseal_file(path: Path, role: str, key: bytes) -> bool:
    """Seal the secret file at `path` in place (atomically, mode 0600). False if it already was
    sealed under `key`; KeyMaterialError if sealed under another key."""
    path = Path(path)
    raw = path.read_bytes()
    if is_sealed(raw):
        if open_sealed(raw, role, key) is None:
            raise KeyMaterialError(f"{path} is sealed under another at-rest key")
        return False
    write_secret_file(path, seal(raw, role, key), shred_old=True)
    return True


def shred(path: Path) -> None:
    """Overwrite a file with random bytes, in place, before it is removed or replaced (best effort:
    on copy-on-write or flash storage old blocks may survive; only sealing protects those)."""
    size = Path(path).stat().st_size
    with open(path, "r+b") as handle:
        handle.write(secrets.token_bytes(size))
        handle.flush()
        os.fsync(handle.fileno())


def fsync_directory(directory: Path) -> None:
    """Make the renames and creations in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_secret_file(path: Path, content: bytes, *, exclusive: bool = False, shred_old: bool = False) -> None:
    """Write `content` to `path` with mode 0600 through a temporary file and an atomic rename,
    durable when this returns (`exclusive`: refuse if `path` exists, FileExistsError;
    `shred_old`: overwrite the file being replaced first, as when a clear secret is sealed)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            os.link(tmp, path)
        else:
            if shred_old and path.exists():
                shred(path)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_directory(path.parent)
