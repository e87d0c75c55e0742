"""Credentials for a local trial of Flower's deployment engine: TLS and SuperNode authentication.

Flower 1.41 needs two kinds of key material before a SuperLink will accept hospitals:

* **TLS.** The SuperLink serves the Fleet, Control and Runtime APIs on one HTTPS port, and each
  SuperNode serves its own Runtime API to its ClientApp processes. `init_credentials` makes a
  test CA, a SuperLink certificate whose subject alternative names are the addresses clients dial,
  and one loopback certificate per SuperNode. Every certificate is signed by the test CA, so
  `ca.crt` is the one file each party needs in order to trust the others.
* **SuperNode authentication** (`flower-superlink --enable-supernode-auth`). Each hospital holds
  an EC P-384 key in OpenSSH format (`flower-supernode --auth-supernode-private-key`); the
  coordinator enrols its public half with `flwr supernode register`. `new_node_key` lets a
  hospital make its own pair, so the private key never leaves it.

Certificates use EC P-256 keys and SHA-256 signatures. Private keys are written mode 0600 and
their directories 0700. Output appears all at once or not at all: everything is built in a hidden
sibling directory and renamed into place, so a failure (or Ctrl-C) leaves no partial key material.
This is a CA for trials: it has no revocation and its key sits next to the certificates.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.errors import ConfigError

MANIFEST_FILE = "credentials.json"
MANIFEST_FORMAT = 1
CA_CERT_FILE, CA_KEY_FILE = "ca.crt", "ca.key"
SUPERLINK_CERT_FILE, SUPERLINK_KEY_FILE = "superlink.crt", "superlink.key"
HOSPITALS_DIR = "hospitals"
AUTH_KEY_FILE, AUTH_PUB_FILE = "auth.key", "auth.pub"
NODE_CERT_FILE, NODE_KEY_FILE = "node.crt", "node.key"

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
"""Where a SuperNode's ClientApps reach its Runtime API, and the default SuperLink hosts."""
MAX_DAYS = 825  # the longest validity browsers accept for a server certificate
CLOCK_SKEW = timedelta(minutes=5)  # certificates are valid from slightly before "now"
TLS_CURVE = ec.SECP256R1()
AUTH_CURVE = ec.SECP384R1()  # the curve Flower recommends for SuperNode authentication

_SLUG = re.compile(r"[A-Za-z0-9_-]+\Z")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")


@dataclass(frozen=True)
class HospitalCredentials:
    """One hospital's files: its SuperNode's authentication key pair and Runtime API certificate."""

    name: str
    auth_private_key: Path
    auth_public_key: Path
    node_certificate: Path
    node_key: Path


@dataclass(frozen=True)
class CredentialPaths:
    """Where `init_credentials` wrote everything, as recorded in `credentials.json`."""

    directory: Path
    manifest: Path
    ca_certificate: Path
    ca_key: Path
    ca_sha256_fingerprint: str
    superlink_certificate: Path
    superlink_key: Path
    hosts: tuple[str, ...]
    not_valid_after: datetime
    hospitals: dict[str, HospitalCredentials] = field(default_factory=dict)

    def files(self) -> list[Path]:
        """Every file the manifest names."""
        paths = [self.ca_certificate, self.ca_key, self.superlink_certificate, self.superlink_key]
        for hospital in self.hospitals.values():
            paths += [hospital.auth_private_key, hospital.auth_public_key,
                      hospital.node_certificate, hospital.node_key]
        return paths


def hospital_names(spec: str) -> list[str]:
    """Hospital names from the `--hospitals` option: a count N gives `hospital_00` ..
    `hospital_{N-1}` (the names `fedrisk node provision` uses), anything else is a
    comma-separated list of names."""
    spec = spec.strip()
    if spec.isascii() and spec.isdigit():
        return [f"hospital_{index:02d}" for index in range(int(spec))]
    return [name.strip() for name in spec.split(",")]


def init_credentials(out: Path, hospitals: list[str], hosts: list[str], days: int = 30,
                     force: bool = False) -> CredentialPaths:
    """Create the test CA, the SuperLink's certificate and every hospital's credentials in `out`.

    `hosts` are the names and addresses clients use to reach the SuperLink; each becomes a
    subject alternative name of its certificate (IP addresses as IP entries, the rest as DNS
    names), since TLS clients check the address they dialled against these. The loopback names
    are always added: the SuperLink's own SuperExec dials it on 127.0.0.1. `days` is the
    validity of every certificate (1 to 825). A non-empty `out` is refused unless `force` is
    set, and even then only if it holds fedrisk credentials: replacing it invalidates every
    key already enrolled with a SuperLink.
    """
    names = _checked_hospitals(hospitals)
    host_entries = _checked_hosts(list(hosts) + [h for h in LOOPBACK_HOSTS if h not in hosts])
    _check_days(days)
    target = _writable_target(out, force, marker=MANIFEST_FILE)

    now = datetime.now(timezone.utc).replace(microsecond=0)
    not_after = now + timedelta(days=days)
    with _staged_directory(target) as stage:
        ca_key, ca_cert = _issue_ca(now, not_after)
        _write_private_key(stage / CA_KEY_FILE, _pem(ca_key))
        _write_public(stage / CA_CERT_FILE, ca_cert.public_bytes(serialization.Encoding.PEM))

        link_key, link_cert = _issue_server_certificate(
            ca_key, ca_cert, "fedrisk SuperLink", list(host_entries.values()), now, not_after)
        _write_private_key(stage / SUPERLINK_KEY_FILE, _pem(link_key))
        _write_public(stage / SUPERLINK_CERT_FILE, link_cert.public_bytes(serialization.Encoding.PEM))

        loopback = list(_checked_hosts(list(LOOPBACK_HOSTS)).values())
        (stage / HOSPITALS_DIR).mkdir(mode=0o700)
        for name in names:
            node_dir = stage / HOSPITALS_DIR / name
            node_dir.mkdir(mode=0o700)
            _write_auth_key_pair(node_dir, comment=name)
            node_key, node_cert = _issue_server_certificate(
                ca_key, ca_cert, f"fedrisk SuperNode {name}", loopback, now, not_after)
            _write_private_key(node_dir / NODE_KEY_FILE, _pem(node_key))
            _write_public(node_dir / NODE_CERT_FILE, node_cert.public_bytes(serialization.Encoding.PEM))

        paths = _credential_paths(target, names, tuple(host_entries), not_after,
                                  ca_cert.fingerprint(hashes.SHA256()).hex(":").upper())
        _write_public(stage / MANIFEST_FILE, (json.dumps(_manifest(paths, now), indent=2) + "\n").encode())
    return paths


def renew_credentials(out: Path, days: int = 30, new_ca: bool = False) -> CredentialPaths:
    """Rotate the TLS certificates in `out` (made by `init_credentials`): a new key and certificate
    for the SuperLink and for every SuperNode's Runtime API, valid for `days`, for the same
    addresses. The SuperNodes' authentication keys are kept, so no hospital has to be registered
    again. Under the same CA (default) the parties keep trusting `ca.crt`; the renewal cannot
    outlive the CA. `new_ca` also replaces the CA (after its key leaked, or as it expires): every
    party must then be given the new `ca.crt`. All files change at once or not at all."""
    paths = load_manifest(out)
    _check_days(days)
    target = paths.directory
    now = datetime.now(timezone.utc).replace(microsecond=0)
    not_after = now + timedelta(days=days)
    if new_ca:
        ca_key, ca_cert = _issue_ca(now, not_after)
    else:
        try:
            ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
            ca_cert = x509.load_pem_x509_certificate(paths.ca_certificate.read_bytes())
        except ValueError:
            raise ConfigError(f"{paths.ca_key} or {paths.ca_certificate} is damaged") from None
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{paths.ca_key} is not the test CA's EC key")
        if not_after > ca_cert.not_valid_after_utc:
            raise ConfigError(f"--days {days}: the test CA expires {ca_cert.not_valid_after_utc:%Y-%m-%d}; renew "
                              "within its validity, or pass --new-ca (every party then needs the new ca.crt)")
    hosts = list(_checked_hosts(list(paths.hosts)).values())
    loopback = list(_checked_hosts(list(LOOPBACK_HOSTS)).values())
    with _staged_directory(target) as stage:
        shutil.copytree(target, stage, dirs_exist_ok=True)
        if new_ca:
            _replace_file(stage / CA_KEY_FILE, _pem(ca_key), 0o600)
            _replace_file(stage / CA_CERT_FILE, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        link_key, link_cert = _issue_server_certificate(ca_key, ca_cert, "fedrisk SuperLink", hosts, now, not_after)
        _replace_file(stage / SUPERLINK_KEY_FILE, _pem(link_key), 0o600)
        _replace_file(stage / SUPERLINK_CERT_FILE, link_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        for name in paths.hospitals:
            node_dir = stage / HOSPITALS_DIR / name
            node_key, node_cert = _issue_server_certificate(
                ca_key, ca_cert, f"fedrisk SuperNode {name}", loopback, now, not_after)
            _replace_file(node_dir / NODE_KEY_FILE, _pem(node_key), 0o600)
            _replace_file(node_dir / NODE_CERT_FILE, node_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        renewed = _credential_paths(target, list(paths.hospitals), paths.hosts, not_after,
                                    ca_cert.fingerprint(hashes.SHA256()).hex(":").upper())
        _replace_file(stage / MANIFEST_FILE, (json.dumps(_manifest(renewed, now), indent=2) + "\n").encode(), 0o644)
    return renewed


def _replace_file(path: Path, data: bytes, mode: int) -> None:
    """Overwrite `path` (inside a staged directory) with `data` and `mode`."""
    path.unlink(missing_ok=True)
    _write_new(path, data, mode)


def new_node_key(out: Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """Create one hospital's SuperNode authentication key pair in `out`, on the hospital's machine.

    Returns `(auth.key, auth.pub)`. The private key (OpenSSH format, mode 0600) is for
    `flower-supernode --auth-supernode-private-key` and should never leave the hospital; only
    `auth.pub` goes to the coordinator for `flwr supernode register`. Its comment field is
    `name`, so the coordinator can tell the keys apart. A non-empty `out` is refused unless
    `force` is set and it holds a key pair made here.
    """
    if not isinstance(name, str) or not _SLUG.match(name):
        raise ConfigError(f"--name: {name!r} is not a valid name (use letters, digits, '_' and '-')")
    target = _writable_target(out, force, marker=AUTH_PUB_FILE)
    with _staged_directory(target) as stage:
        _write_auth_key_pair(stage, comment=name)
    return target / AUTH_KEY_FILE, target / AUTH_PUB_FILE


def load_manifest(out: Path) -> CredentialPaths:
    """Read the `credentials.json` that `init_credentials` wrote in `out`, checking that every
    file it names is still there."""
    path = Path(out).expanduser() / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
        if manifest["format"] != MANIFEST_FORMAT:
            raise ConfigError(f"{path}: unsupported credentials format {manifest['format']!r}")
        hospitals = {
            name: HospitalCredentials(name, Path(files["auth_private_key"]), Path(files["auth_public_key"]),
                                      Path(files["node_certificate"]), Path(files["node_key"]))
            for name, files in manifest["hospitals"].items()}
        paths = CredentialPaths(
            directory=Path(manifest["directory"]), manifest=path.resolve(),
            ca_certificate=Path(manifest["ca"]["certificate"]), ca_key=Path(manifest["ca"]["key"]),
            ca_sha256_fingerprint=manifest["ca"]["sha256_fingerprint"],
            superlink_certificate=Path(manifest["superlink"]["certificate"]),
            superlink_key=Path(manifest["superlink"]["key"]),
            hosts=tuple(manifest["hosts"]), not_valid_after=datetime.fromisoformat(manifest["not_valid_after"]),
            hospitals=hospitals)
    except FileNotFoundError:
        raise ConfigError(f"no credentials manifest at {path}; create one with `fedrisk certs init`") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"{path} is not a fedrisk credentials manifest") from None
    for file in paths.files():
        if not file.is_file():
            raise ConfigError(f"{path} names {file}, which does not exist (was the directory moved?)")
    return paths


def _checked_hospitals(hospitals: list[str]) -> list[str]:
    if not hospitals:
        raise ConfigError("--hospitals: give at least one hospital")
    seen: set[str] = set()
    for name in hospitals:
        if not isinstance(name, str) or not _SLUG.match(name):
            raise ConfigError(f"--hospitals: {name!r} is not a valid name (use letters, digits, '_' and '-')")
        if name in seen:
            raise ConfigError(f"--hospitals: {name!r} is listed twice")
        seen.add(name)
    return list(hospitals)


def _checked_hosts(hosts: list[str]) -> dict[str, x509.GeneralName]:
    """Each host as it was given, mapped to its subject alternative name; repeats dropped."""
    if not hosts:
        raise ConfigError("--host: give at least one address the SuperLink is reached at")
    entries: dict[str, x509.GeneralName] = {}
    for host in hosts:
        entry = _san_entry(host)
        if entry not in entries.values():
            entries[host] = entry
    return entries


def _san_entry(host: str) -> x509.GeneralName:
    if not isinstance(host, str):
        raise ConfigError(f"--host: {host!r} is not a host name or IP address")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if getattr(address, "scope_id", None):
            raise ConfigError(f"--host: {host!r} has a zone index, which a certificate cannot name")
        return x509.IPAddress(address)
    labels = host.split(".")
    if len(host) > 253 or not all(_DNS_LABEL.match(label) for label in labels) or labels[-1].isdigit():
        raise ConfigError(f"--host: {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host.lower())


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise ConfigError(f"--days must be a whole number from 1 to {MAX_DAYS}, got {days!r}")


def _writable_target(out: Path, force: bool, *, marker: str) -> Path:
    """The absolute output directory, if it may be written: absent, empty, or (with `force`)
    holding `marker`, i.e. written by this module. Never replaces an unrelated directory."""
    target = Path(out).expanduser().resolve()
    if not target.exists():
        return target
    if not target.is_dir():
        raise ConfigError(f"--out {target} exists and is not a directory")
    if not any(target.iterdir()):
        return target
    if not force:
        raise ConfigError(f"--out {target} already exists and is not empty; pass --force to replace it")
    if not (target / marker).is_file():
        raise ConfigError(f"--out {target} has no {marker}, so fedrisk did not write it; refusing to replace it")
    return target


@contextmanager
def _staged_directory(target: Path) -> Iterator[Path]:
    """Yield an empty, private sibling of `target` to fill; on success it replaces `target`.

    On any failure the sibling is removed, `target` is left as it was, and parent directories
    created for it are removed again.
    """
    created = [parent for parent in target.parents if not parent.exists()]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    except OSError as exc:
        _remove_empty(created)
        raise ConfigError(f"--out {target}: cannot create it ({exc.strerror})") from None
    try:
        yield stage
        _replace_directory(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        _remove_empty(created)
        raise


def _replace_directory(stage: Path, target: Path) -> None:
    """Rename `stage` to `target`. A non-empty `target` is first moved aside, and moved back if
    the rename fails, so at every moment `target` is either the old or the new directory."""
    if not (target.is_dir() and any(target.iterdir())):
        os.replace(stage, target)  # also replaces an empty directory
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.replace(target, old)
    try:
        os.replace(stage, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old)


def _remove_empty(directories: list[Path]) -> None:
    """Remove directories we created, innermost first, as long as they are empty."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return


def _issue_ca(now: datetime, not_after: datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign end-entity certificates only (path length 0)."""
    key = ec.generate_private_key(TLS_CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrisk"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "fedrisk test CA")])
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _issue_server_certificate(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common_name: str,
                              names: list[x509.GeneralName], now: datetime,
                              not_after: datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for `names`, signed by the CA."""
    key = ec.generate_private_key(TLS_CURVE)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrisk"),
                         x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False,
               crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign,
                         crl_sign=crl_sign, encipher_only=False, decipher_only=False)


def _write_auth_key_pair(directory: Path, *, comment: str) -> None:
    """`auth.key` (OpenSSH private key) and `auth.pub` (one OpenSSH public key line) in `directory`."""
    key = ec.generate_private_key(AUTH_CURVE)
    _write_private_key(directory / AUTH_KEY_FILE, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_public(directory / AUTH_PUB_FILE, public + f" {comment}\n".encode())


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private_key(path: Path, data: bytes) -> None:
    _write_new(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _write_new(path, data, 0o644)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with exactly `mode` (whatever the umask) before any byte is written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), mode)
        handle.write(data)


def _credential_paths(target: Path, names: list[str], hosts: tuple[str, ...], not_after: datetime,
                      fingerprint: str) -> CredentialPaths:
    hospitals = {name: HospitalCredentials(name, target / HOSPITALS_DIR / name / AUTH_KEY_FILE,
                                           target / HOSPITALS_DIR / name / AUTH_PUB_FILE,
                                           target / HOSPITALS_DIR / name / NODE_CERT_FILE,
                                           target / HOSPITALS_DIR / name / NODE_KEY_FILE)
                 for name in names}
    return CredentialPaths(directory=target, manifest=target / MANIFEST_FILE,
                           ca_certificate=target / CA_CERT_FILE, ca_key=target / CA_KEY_FILE,
                           ca_sha256_fingerprint=fingerprint, superlink_certificate=target / SUPERLINK_CERT_FILE,
                           superlink_key=target / SUPERLINK_KEY_FILE, hosts=hosts, not_valid_after=not_after,
                           hospitals=hospitals)


def _manifest(paths: CredentialPaths, created_at: datetime) -> dict[str, object]:
    return {
        "format": MANIFEST_FORMAT,
        "created_at": created_at.isoformat(),
        "not_valid_after": paths.not_valid_after.isoformat(),
        "directory": str(paths.directory),
        "hosts": list(paths.hosts),
        "ca": {"certificate": str(paths.ca_certificate), "key": str(paths.ca_key),
               "sha256_fingerprint": paths.ca_sha256_fingerprint},
        "superlink": {"certificate": str(paths.superlink_certificate), "key": str(paths.superlink_key)},
        "hospitals": {name: {"auth_private_key": str(h.auth_private_key), "auth_public_key": str(h.auth_public_key),
                             "node_certificate": str(h.node_certificate), "node_key": str(h.node_key)}
                      for name, h in paths.hospitals.items()},
    }
