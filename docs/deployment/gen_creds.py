"""Test CA + server cert (SAN 127.0.0.1, localhost, ::1) and P-384 SuperNode auth key pairs (OpenSSH format)."""
import datetime, ipaddress, os, sys
from pathlib import Path
from cryptography import x509
from cryptography.x509.oid import NameOID, ExtendedKeyUsageOID
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

out = Path(sys.argv[1]); n_nodes = int(sys.argv[2]) if len(sys.argv) > 2 else 3
certs = out / "certs"; keys = out / "node-keys"
certs.mkdir(parents=True, exist_ok=True); keys.mkdir(parents=True, exist_ok=True)
now = datetime.datetime.now(datetime.timezone.utc)

def write(path, data, mode=0o644):
    path.write_bytes(data); os.chmod(path, mode)

def pem_key(k):
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())

ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrisk test CA")])
ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
      .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
      .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
      .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
      .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                   content_commitment=False, key_encipherment=False, data_encipherment=False,
                                   key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
      .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
      .sign(ca_key, hashes.SHA256()))
write(certs / "ca.crt", ca.public_bytes(serialization.Encoding.PEM))
write(certs / "ca.key", pem_key(ca_key), 0o600)

srv_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                   x509.IPAddress(ipaddress.ip_address("::1"))])
srv = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
       .issuer_name(ca_name).public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
       .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
       .add_extension(san, critical=False)
       .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
       .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
       .sign(ca_key, hashes.SHA256()))
write(certs / "server.pem", srv.public_bytes(serialization.Encoding.PEM))
write(certs / "server.key", pem_key(srv_key), 0o600)

# SuperNode authentication keys: NIST P-384, OpenSSH private (for flower-supernode
# --auth-supernode-private-key) and OpenSSH public (for `flwr supernode register`).
for i in list(range(n_nodes)) + ["rogue"]:
    k = ec.generate_private_key(ec.SECP384R1())
    name = f"supernode_{i}" if i != "rogue" else "supernode_rogue"
    write(keys / name, k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()), 0o600)
    write(keys / f"{name}.pub", k.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                           serialization.PublicFormat.OpenSSH) + b"\n")
print("credentials in", out)
