"""`fedrisk certs`: the credentials verify, a TLS handshake works with them, and bad input or a
failure leaves nothing behind."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import subprocess
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from engines import credentials as certs
from engines.credentials import CredentialPaths, init_credentials, load_manifest
from cli.main import main
from federation.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
FEDRISK = ROOT / ".venv" / "bin" / "fedrisk"
HOSTS = ["127.0.0.1", "localhost", "::1", "link.fedrisk.test"]
HOSPITALS = ["north", "south-2", "EAST_3"]
DAYS = 7


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> CredentialPaths:
    """Credentials for three hospitals and a SuperLink known by four names."""
    return init_credentials(tmp_path_factory.mktemp("certs") / "creds", HOSPITALS, HOSTS, days=DAYS)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CA of an unrelated set of credentials."""
    return init_credentials(tmp_path_factory.mktemp("other") / "creds", ["x"], ["127.0.0.1"]).ca_certificate


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def verify_chain(ca_file: Path, leaf_file: Path, host: str) -> None:
    """Verify `leaf_file` for `host` against `ca_file` alone, as a TLS client would (RFC 5280)."""
    name = x509.IPAddress(ipaddress.ip_address(host)) if host[0].isdigit() or ":" in host else x509.DNSName(host)
    verifier = (PolicyBuilder().store(Store([load_cert(ca_file)])).time(datetime.now(timezone.utc))
                .build_server_verifier(name))
    verifier.verify(load_cert(leaf_file), [])


def san(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(names.get_values_for_type(x509.DNSName)), {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}


def test_the_ca_signs_the_superlink_and_every_node_certificate(creds) -> None:
    ca = load_cert(creds.ca_certificate)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    leaves = [creds.superlink_certificate] + [h.node_certificate for h in creds.hospitals.values()]
    for path in leaves:
        cert = load_cert(path)
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
        verify_chain(creds.ca_certificate, path, "127.0.0.1")
    for host in HOSTS:
        verify_chain(creds.ca_certificate, creds.superlink_certificate, host)


def test_certificates_do_not_verify_under_another_ca_or_for_another_host(creds, other_ca) -> None:
    with pytest.raises(VerificationError):
        verify_chain(other_ca, creds.superlink_certificate, "127.0.0.1")
    with pytest.raises(VerificationError):
        verify_chain(creds.ca_certificate, creds.superlink_certificate, "elsewhere.fedrisk.test")
    with pytest.raises(VerificationError):  # a node's certificate is for its loopback Runtime API only
        verify_chain(creds.ca_certificate, creds.hospitals["north"].node_certificate, "link.fedrisk.test")


def test_subject_alternative_names_are_exactly_the_requested_hosts(creds) -> None:
    assert san(load_cert(creds.superlink_certificate)) == ({"localhost", "link.fedrisk.test"}, {"127.0.0.1", "::1"})
    for hospital in creds.hospitals.values():
        assert san(load_cert(hospital.node_certificate)) == ({"localhost"}, {"127.0.0.1", "::1"})


def test_certificates_expire_after_the_requested_days(creds) -> None:
    expected = datetime.now(timezone.utc) + timedelta(days=DAYS)
    for path in [creds.ca_certificate, creds.superlink_certificate, creds.hospitals["north"].node_certificate]:
        assert abs(load_cert(path).not_valid_after_utc - expected) < timedelta(minutes=1)
        assert load_cert(path).not_valid_before_utc < datetime.now(timezone.utc)


def test_private_keys_are_readable_by_their_owner_only(creds) -> None:
    private = [creds.ca_key, creds.superlink_key]
    for hospital in creds.hospitals.values():
        private += [hospital.auth_private_key, hospital.node_key]
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(creds.ca_certificate.stat().st_mode) == 0o644


def test_auth_keys_are_p384_openssh_pairs_one_per_hospital(creds) -> None:
    seen = set()
    for hospital in creds.hospitals.values():
        private = serialization.load_ssh_private_key(hospital.auth_private_key.read_bytes(), None)
        line = hospital.auth_public_key.read_text()
        public = serialization.load_ssh_public_key(line.encode())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
        assert public.public_numbers() == private.public_key().public_numbers()
        assert line.startswith("ecdsa-sha2-nistp384 ") and line.rstrip("\n").endswith(f" {hospital.name}")
        seen.add(line.split()[1])
    assert len(seen) == len(HOSPITALS)


def test_the_manifest_names_every_file_with_its_fingerprint_and_expiry(creds) -> None:
    manifest = load_manifest(creds.directory)
    assert manifest == creds
    assert sorted(manifest.hospitals) == sorted(HOSPITALS) and list(manifest.hosts) == HOSTS
    expected = {p for p in creds.directory.rglob("*") if p.is_file()} - {creds.manifest}
    assert set(manifest.files()) == expected
    assert all(path.is_absolute() for path in manifest.files())
    ca = load_cert(creds.ca_certificate)
    assert manifest.ca_sha256_fingerprint.replace(":", "").lower() == ca.fingerprint(hashes.SHA256()).hex()
    assert manifest.not_valid_after == ca.not_valid_after_utc


def test_a_missing_manifest_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="credentials.json"):
        load_manifest(tmp_path)


def handshake(cert: Path, key: Path, ca_file: Path, hostname: str) -> bytes:
    """Serve TLS with `cert`/`key` on 127.0.0.1 and connect trusting only `ca_file`, checking
    `hostname`. Returns what the server sent once the handshake completed."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(ca_file))  # no system CAs
    client_context.verify_flags |= ssl.VERIFY_X509_STRICT
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with server_context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"hello")
            except (ssl.SSLError, OSError):
                pass  # the client refused the certificate

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        try:
            with (socket.create_connection(listener.getsockname(), timeout=5) as raw,
                  client_context.wrap_socket(raw, server_hostname=hostname) as tls):
                return tls.recv(5)
        finally:
            server.join(timeout=5)


@pytest.mark.parametrize("hostname", ["127.0.0.1", "localhost"])
def test_tls_handshake_with_the_superlink_certificate(creds, hostname) -> None:
    assert handshake(creds.superlink_certificate, creds.superlink_key, creds.ca_certificate, hostname) == b"hello"


def test_tls_handshake_with_a_node_runtime_api_certificate(creds) -> None:
    north = creds.hospitals["north"]
    assert handshake(north.node_certificate, north.node_key, creds.ca_certificate, "127.0.0.1") == b"hello"


def test_tls_handshake_fails_under_another_ca_or_for_another_host(creds, other_ca) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(creds.superlink_certificate, creds.superlink_key, other_ca, "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(creds.superlink_certificate, creds.superlink_key, creds.ca_certificate, "elsewhere.fedrisk.test")


def files_of(directory: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("fedrisk: error: ")
    return lines[0]


def test_cli_writes_credentials_and_prints_the_enrolment_commands(tmp_path, capsys) -> None:
    out = tmp_path / "creds"
    assert main(["certs", "init", "--out", str(out), "--hospitals", "2"]) == 0
    printed = capsys.readouterr().out
    creds = load_manifest(out)
    assert sorted(creds.hospitals) == ["hospital_00", "hospital_01"]
    assert creds.hosts == ("127.0.0.1", "localhost", "::1")
    for name, hospital in creds.hospitals.items():
        assert f"flwr supernode register {hospital.auth_public_key} <connection> --name {name}" in printed
    assert str(creds.ca_certificate) in printed and str(creds.superlink_key) in printed
    assert [p.name for p in tmp_path.iterdir()] == ["creds"]  # no staging directory left over


def test_cli_takes_hospital_names_and_hosts(tmp_path, capsys) -> None:
    out = tmp_path / "creds"
    assert main(["certs", "init", "--out", str(out), "--hospitals", "north, south",
                 "--host", "10.1.2.3", "--host", "link.fedrisk.test", "--days", "2"]) == 0
    creds = load_manifest(out)
    assert sorted(creds.hospitals) == ["north", "south"]
    # the loopback names are always there: the SuperLink's own SuperExec dials 127.0.0.1
    assert san(load_cert(creds.superlink_certificate)) == ({"link.fedrisk.test", "localhost"},
                                                           {"10.1.2.3", "127.0.0.1", "::1"})


def test_an_existing_directory_is_refused_and_left_untouched(tmp_path, capsys) -> None:
    out = tmp_path / "creds"
    assert main(["certs", "init", "--out", str(out)]) == 0
    before = files_of(out)
    capsys.readouterr()
    assert main(["certs", "init", "--out", str(out), "--hospitals", "1"]) == 2
    line = one_error_line(capsys)
    assert str(out) in line and "--force" in line
    assert files_of(out) == before


def test_force_replaces_earlier_credentials(tmp_path, capsys) -> None:
    out = tmp_path / "creds"
    assert main(["certs", "init", "--out", str(out)]) == 0
    old_ca = (out / "ca.crt").read_bytes()
    assert main(["certs", "init", "--out", str(out), "--hospitals", "solo", "--force"]) == 0
    assert (out / "ca.crt").read_bytes() != old_ca
    assert sorted(load_manifest(out).hospitals) == ["solo"]
    assert not (out / "hospitals" / "hospital_00").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["creds"]


def test_force_never_replaces_a_directory_fedrisk_did_not_write(tmp_path, capsys) -> None:
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["certs", "init", "--out", str(out), "--force"]) == 2
    assert str(out) in one_error_line(capsys)
    assert files_of(out) == {out / "notes.txt": b"keep me"}


@pytest.mark.parametrize("flags,parameter", [
    (["--hospitals", "north,south east"], "--hospitals"),
    (["--hospitals", "north,north"], "--hospitals"),
    (["--hospitals", "north,,south"], "--hospitals"),
    (["--hospitals", "../escape"], "--hospitals"),
    (["--hospitals", "0"], "--hospitals"),
    (["--host", "link_fedrisk!"], "--host"),
    (["--host", "127.0.0.300"], "--host"),
    (["--host", ""], "--host"),
    (["--days", "0"], "--days"),
    (["--days", "826"], "--days"),
])
def test_bad_input_is_one_line_naming_the_parameter_and_leaves_nothing(tmp_path, capsys, flags, parameter) -> None:
    out = tmp_path / "nested" / "creds"
    assert main(["certs", "init", "--out", str(out), *flags]) == 2
    assert parameter in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_bad_input_through_the_installed_command(tmp_path) -> None:
    if not FEDRISK.exists():
        pytest.skip(f"{FEDRISK} is not installed")
    out = tmp_path / "creds"
    result = subprocess.run([str(FEDRISK), "certs", "init", "--out", str(out), "--host", "not a host"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "fedrisk: error: --host: 'not a host' is neither an IP address nor a DNS name"]
    assert "Traceback" not in result.stdout and list(tmp_path.iterdir()) == []


def test_a_failure_halfway_leaves_nothing_behind(tmp_path, monkeypatch) -> None:
    real, issued = certs._issue_server_certificate, []

    def fail_on_second_certificate(*args, **kwargs):
        if issued:
            raise OSError("disk full")
        issued.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(certs, "_issue_server_certificate", fail_on_second_certificate)
    with pytest.raises(OSError, match="disk full"):
        init_credentials(tmp_path / "nested" / "creds", ["a", "b"], ["127.0.0.1"])
    assert list(tmp_path.iterdir()) == []


def test_a_failed_forced_replacement_keeps_the_old_credentials(tmp_path, monkeypatch) -> None:
    old = init_credentials(tmp_path / "creds", ["a"], ["127.0.0.1"])
    before = files_of(old.directory)

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(certs, "_write_auth_key_pair", disk_full)
    with pytest.raises(OSError, match="disk full"):
        init_credentials(old.directory, ["b"], ["127.0.0.1"], force=True)
    assert files_of(old.directory) == before
    assert [p.name for p in tmp_path.iterdir()] == ["creds"]



def test_a_failed_swap_puts_the_old_credentials_back(tmp_path, monkeypatch) -> None:
    old = init_credentials(tmp_path / "creds", ["a"], ["127.0.0.1"])
    before = files_of(old.directory)
    real_replace = certs.os.replace

    def refuse_new_directory(src, dst):
        if str(src).endswith(".partial"):
            raise OSError("rename refused")
        real_replace(src, dst)

    monkeypatch.setattr(certs.os, "replace", refuse_new_directory)
    with pytest.raises(OSError, match="rename refused"):
        init_credentials(old.directory, ["b"], ["127.0.0.1"], force=True)
    assert files_of(old.directory) == before
    assert [p.name for p in tmp_path.iterdir()] == ["creds"]

def test_node_key_makes_one_hospitals_pair(tmp_path, capsys) -> None:
    out = tmp_path / "north-key"
    assert main(["certs", "node-key", "--out", str(out), "--name", "north"]) == 0
    assert "flwr supernode register" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["auth.key", "auth.pub"]
    assert stat.S_IMODE((out / "auth.key").stat().st_mode) == 0o600
    private = serialization.load_ssh_private_key((out / "auth.key").read_bytes(), None)
    public = serialization.load_ssh_public_key((out / "auth.pub").read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP384R1)
    assert public.public_numbers() == private.public_key().public_numbers()

    before = files_of(out)
    assert main(["certs", "node-key", "--out", str(out), "--name", "north"]) == 2
    assert "--force" in one_error_line(capsys)
    assert files_of(out) == before
    assert main(["certs", "node-key", "--out", str(out), "--name", "north", "--force"]) == 0
    assert files_of(out) != before


def test_node_key_refuses_a_bad_name(tmp_path, capsys) -> None:
    assert main(["certs", "node-key", "--out", str(tmp_path / "k"), "--name", "no/slashes"]) == 2
    assert "--name" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_renewal_rotates_every_tls_key_keeps_the_auth_keys_and_handshakes(tmp_path, capsys) -> None:
    out = tmp_path / "creds"
    assert main(["certs", "init", "--out", str(out), "--hospitals", "2", "--days", "30"]) == 0
    before = files_of(out)
    old = load_manifest(out)
    assert main(["certs", "renew", "--dir", str(out), "--days", "10"]) == 0
    assert "auth keys kept" in capsys.readouterr().out
    new = load_manifest(out)
    assert new.ca_sha256_fingerprint == old.ca_sha256_fingerprint  # parties keep trusting ca.crt
    for path in (new.superlink_key, new.superlink_certificate,
                 *(h.node_key for h in new.hospitals.values()), *(h.node_certificate for h in new.hospitals.values())):
        assert path.read_bytes() != before[path], path
    for hospital in new.hospitals.values():  # no hospital registers its SuperNode again
        assert hospital.auth_private_key.read_bytes() == before[hospital.auth_private_key]
        assert stat.S_IMODE(hospital.node_key.stat().st_mode) == 0o600
        verify_chain(new.ca_certificate, hospital.node_certificate, "127.0.0.1")
    expected = datetime.now(timezone.utc) + timedelta(days=10)
    assert abs(load_cert(new.superlink_certificate).not_valid_after_utc - expected) < timedelta(minutes=1)
    assert handshake(new.superlink_certificate, new.superlink_key, new.ca_certificate, "localhost") == b"hello"

    renewed = files_of(out)
    assert main(["certs", "renew", "--dir", str(out), "--days", "60"]) == 2  # past the CA's expiry
    assert "--new-ca" in one_error_line(capsys)
    assert files_of(out) == renewed  # nothing changed
    assert main(["certs", "renew", "--dir", str(out), "--days", "60", "--new-ca"]) == 0
    rolled = load_manifest(out)
    assert rolled.ca_sha256_fingerprint != old.ca_sha256_fingerprint
    old_ca = tmp_path / "old-ca.crt"
    old_ca.write_bytes(before[old.ca_certificate])
    with pytest.raises(ssl.SSLCertVerificationError):  # a party still holding the old CA no longer trusts it
        handshake(rolled.superlink_certificate, rolled.superlink_key, old_ca, "localhost")
    assert handshake(rolled.superlink_certificate, rolled.superlink_key, rolled.ca_certificate, "localhost") == b"hello"
    assert all(h.auth_private_key.read_bytes() == before[h.auth_private_key] for h in rolled.hospitals.values())
