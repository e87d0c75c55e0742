"""Signed contributions: what a hospital sends, bound to what it is, so no one can pass it off as
something else.

Every vector a hospital encrypts for the federation (its census, a round's update, a round's
DP evaluation, a cohort answer) travels as a `SignedContribution`: the ciphertexts plus a header
naming the hospital, the run, the round, the step and kind of vector, its length, the CKKS key,
the SHA-256 of the ciphertexts and the hospital's state head (`clients.anchoring`), signed with
the hospital's Ed25519 node signing key. The federation manifest, written at enrolment into
every node directory, lists each hospital's public key.

A hospital decrypts only a sum it added up itself from contributions that verify against its
own copy of the manifest, come from enough distinct hospitals and all name the same
(run, round, step, kind): the coordinator can relay contributions, but it cannot forge,
double, relabel or replay one (`clients.decryption`).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PrivateFormat, PublicFormat, NoEncryption

from federation import sealing
from federation.errors import ConfigError, KeyMaterialError, ProtocolError
from federation.he_codec import ciphertext_digest

SIGNING_KEY_FILE = "signing.key"
MANIFEST_FILE = "federation_manifest.json"
STEPS = ("census", "train", "evaluate", "answer")
"""What a contribution is for. Census and train aggregates are decrypted only inside nodes;
evaluate and answer aggregates are the only ones a node reveals to the coordinator."""
REVEALABLE_STEPS = ("evaluate", "answer")
_MAX_HEADER_CHARS = 4096


@dataclass(frozen=True)
class ContributionHeader:
    """What a contribution is, as its hospital signed it."""

    hospital: str
    run: str
    round: int
    step: str
    kind: str
    length: int
    key_id: str
    digest: str
    head: str = ""

    @property
    def identity(self) -> str:
        """(run, round, step, kind): what a decryption of a sum of such contributions is of."""
        return f"{self.run}|{self.round}|{self.step}|{self.kind}"

    def canonical(self) -> bytes:
        """The signed bytes: sorted-key JSON."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, text: str) -> "ContributionHeader":
        """A header from its JSON, refusing anything malformed (it comes from the coordinator)."""
        if not isinstance(text, str) or len(text) > _MAX_HEADER_CHARS:
            raise ProtocolError("a contribution header is missing or too long")
        try:
            raw = json.loads(text)
            header = cls(**raw)
        except (ValueError, TypeError):
            raise ProtocolError("a contribution header is not valid JSON of the expected fields") from None
        types = {"hospital": str, "run": str, "round": int, "step": str, "kind": str, "length": int,
                 "key_id": str, "digest": str, "head": str}
        for name, kind in types.items():
            value = getattr(header, name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ProtocolError(f"contribution header field {name!r} has the wrong type")
        if header.step not in STEPS or header.length < 1 or header.round < 0:
            raise ProtocolError(f"contribution header names step {header.step!r}, length {header.length}, "
                                f"round {header.round}: not a fedrisk contribution")
        return header


@dataclass(frozen=True)
class SignedContribution:
    """Ciphertexts, their header and the hospital's signature over the header."""

    header: ContributionHeader
    ciphertexts: tuple[bytes, ...]
    signature: bytes

    def verify(self, public_key_hex: str) -> None:
        """Raise ProtocolError unless the signature is the named key's over this header and the
        header's digest is these ciphertexts'."""
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex)).verify(
                self.signature, self.header.canonical())
        except (InvalidSignature, ValueError):
            raise ProtocolError(f"the signature of {self.header.hospital}'s {self.header.step} contribution "
                                "does not verify") from None
        if ciphertext_digest(self.ciphertexts) != self.header.digest:
            raise ProtocolError(f"{self.header.hospital}'s {self.header.step} contribution carries other "
                                "ciphertexts than it signed")


class SigningKey:
    """A node's Ed25519 signing key (`signing.key` in its directory, mode 0600)."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private

    @classmethod
    def create(cls, path: Path) -> "SigningKey":
        """Write a fresh key; refuses to replace one."""
        private = Ed25519PrivateKey.generate()
        raw = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        sealing.write_secret_file(Path(path), sealing.seal_for_disk(raw, sealing.ROLE_SIGNING, Path(path)),
                                  exclusive=True)
        return cls(private)

    @classmethod
    def load(cls, path: Path, *, require_sealed: bool = False) -> "SigningKey":
        """Read a node's signing key (sealed at rest or not, `federation.sealing`)."""
        try:
            raw = sealing.unseal(Path(path).read_bytes(), sealing.ROLE_SIGNING, Path(path),
                                 require_sealed=require_sealed)
            return cls(Ed25519PrivateKey.from_private_bytes(raw))
        except FileNotFoundError:
            raise KeyMaterialError(f"node signing key not found: {path}; run `fedrisk node enrol`") from None
        except ValueError:
            raise KeyMaterialError(f"{path} is not an Ed25519 signing key") from None

    @property
    def public_hex(self) -> str:
        """The public key, hex, as the manifest lists it."""
        return self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()

    def sign(self, header: ContributionHeader, ciphertexts: Sequence[bytes]) -> SignedContribution:
        """Sign `header` (whose digest must be the ciphertexts')."""
        if header.digest != ciphertext_digest(ciphertexts):
            raise ProtocolError("refusing to sign a header whose digest is not its ciphertexts'")
        return SignedContribution(header, tuple(bytes(b) for b in ciphertexts), self._private.sign(header.canonical()))


@dataclass(frozen=True)
class FederationManifest:
    """The hospitals of a federation and their signing keys, as each hospital holds it."""

    federation: str
    hospitals: Mapping[str, str]

    @classmethod
    def load(cls, node_dir: Path) -> "FederationManifest":
        """The manifest in a node directory; ConfigError if absent or damaged."""
        path = Path(node_dir) / MANIFEST_FILE
        try:
            raw = json.loads(path.read_text())
            hospitals = {str(k): str(v) for k, v in dict(raw["hospitals"]).items()}
            manifest = cls(str(raw["federation"]), hospitals)
        except FileNotFoundError:
            raise ConfigError(f"{path} not found: this node is not enrolled in a federation; "
                              "run `fedrisk node enrol`") from None
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path} is damaged") from None
        for name, key in manifest.hospitals.items():
            if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
                raise ConfigError(f"{path}: hospital {name!r} has no valid Ed25519 public key")
        return manifest

    def save(self, node_dir: Path) -> Path:
        """Write atomically into a node directory."""
        path = Path(node_dir) / MANIFEST_FILE
        tmp = path.with_name(f".{MANIFEST_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps({"federation": self.federation, "hospitals": dict(sorted(self.hospitals.items()))},
                                  indent=2))
        os.replace(tmp, path)
        return path

    def verify(self, contribution: SignedContribution) -> None:
        """Raise ProtocolError unless the contribution's hospital is enrolled and signed it."""
        key = self.hospitals.get(contribution.header.hospital)
        if key is None:
            raise ProtocolError(f"{contribution.header.hospital!r} is not a hospital of this federation")
        contribution.verify(key)


# --- on the wire -------------------------------------------------------------------------------

HEADERS, SIGNATURES = "headers", "signatures"


def to_record(contributions: Iterable[SignedContribution]) -> dict[str, Any]:
    """ConfigRecord content for a list of contributions."""
    items = list(contributions)
    record: dict[str, Any] = {HEADERS: [c.header.canonical().decode() for c in items],
                              SIGNATURES: [c.signature for c in items]}
    for index, item in enumerate(items):
        record[f"ciphertexts-{index}"] = list(item.ciphertexts)
    return record


def from_record(record: Mapping[str, Any] | None, what: str) -> list[SignedContribution]:
    """Contributions from a ConfigRecord the coordinator sent, checked for shape only (the caller
    verifies signatures against its manifest)."""
    if record is None:
        return []
    try:
        headers, signatures = list(record[HEADERS]), list(record[SIGNATURES])
        if len(headers) != len(signatures) or len(headers) > 10_000:
            raise ProtocolError(f"{what}: headers and signatures do not pair up")
        items = []
        for index, (text, signature) in enumerate(zip(headers, signatures)):
            blobs = list(record[f"ciphertexts-{index}"])
            if not all(isinstance(b, (bytes, bytearray)) for b in blobs) or not isinstance(signature, (bytes, bytearray)):
                raise ProtocolError(f"{what}: contribution {index} is not bytes")
            items.append(SignedContribution(ContributionHeader.parse(str(text)), tuple(bytes(b) for b in blobs),
                                            bytes(signature)))
        return items
    except (KeyError, TypeError):
        raise ProtocolError(f"{what}: not a list of signed contributions") from None


def pack(contributions: Iterable[SignedContribution]) -> bytes:
    """Contributions as one byte string (the coordinator's checkpoint)."""
    items = list(contributions)
    out = [struct.pack(">I", len(items))]
    for item in items:
        header = item.header.canonical()
        out += [struct.pack(">I", len(header)), header, struct.pack(">I", len(item.signature)), item.signature,
                struct.pack(">I", len(item.ciphertexts))]
        for blob in item.ciphertexts:
            out += [struct.pack(">Q", len(blob)), blob]
    return b"".join(out)


def unpack(data: bytes) -> list[SignedContribution]:
    """Inverse of `pack`."""
    view, at = memoryview(data), 0

    def take(size: int) -> bytes:
        nonlocal at
        if at + size > len(view):
            raise ValueError("truncated contribution pack")
        chunk = bytes(view[at:at + size])
        at += size
        return chunk

    items = []
    for _ in range(struct.unpack(">I", take(4))[0]):
        header = ContributionHeader.parse(take(struct.unpack(">I", take(4))[0]).decode())
        signature = take(struct.unpack(">I", take(4))[0])
        blobs = tuple(take(struct.unpack(">Q", take(8))[0]) for _ in range(struct.unpack(">I", take(4))[0]))
        items.append(SignedContribution(header, blobs, signature))
    return items


# --- relayed state heads (clients.anchoring) ------------------------------------------------------

def head_order(head: str) -> tuple[int, int, int, int] | None:
    """(epoch, charges, withdrawals, decryptions) of an encoded state head, or None if it is not one."""
    parts = head.split(":") if isinstance(head, str) else []
    try:
        if len(parts) != 7 or (parts[0][:1], parts[1][:1], parts[3][:1], parts[5][:1]) != ("e", "c", "r", "d"):
            return None
        return int(parts[0][1:]), int(parts[1][1:]), int(parts[3][1:]), int(parts[5][1:])
    except ValueError:
        return None


def relay_record(pairs: Iterable[tuple[str, bytes]]) -> dict[str, list]:
    """ConfigRecord content for relayed (signed header, signature) pairs."""
    items = list(pairs)
    return {HEADERS: [text for text, _ in items], SIGNATURES: [sig for _, sig in items]}


def from_relay_record(record: object) -> list[tuple[str, bytes]]:
    """Inverse of `relay_record`, tolerant of junk (each pair is verified before use)."""
    if record is None:
        return []
    try:
        headers, signatures = list(record[HEADERS]), list(record[SIGNATURES])  # type: ignore[index]
    except (KeyError, TypeError):
        return []
    return [(str(h), bytes(s)) for h, s in zip(headers, signatures) if isinstance(s, (bytes, bytearray))][:10_000]


def newest_by_hospital(pairs: Iterable[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The newest signed header per hospital among (header, signature) pairs: what a coordinator
    relays. Ordering only: nothing here is trusted before a hospital verifies the signature."""
    best: dict[str, tuple[tuple[int, int, int, int], str, bytes]] = {}
    for text, signature in pairs:
        try:
            header = ContributionHeader.parse(text)
        except ProtocolError:
            continue
        order = head_order(header.head)
        if order is None:
            continue
        known = best.get(header.hospital)
        if known is None or known[0] < order:
            best[header.hospital] = (order, text, signature)
    return [(text, sig) for _, text, sig in sorted(best.values(), key=lambda v: v[1])]


def signed_headers(contributions: Iterable[SignedContribution]) -> list[tuple[str, bytes]]:
    """(header JSON, signature) of each contribution."""
    return [(c.header.canonical().decode(), c.signature) for c in contributions]
