"""Deliberate faults, for testing how the federation copes with a misbehaving hospital.

A node misbehaves only when the operator of *its own process* asks it to, through the
`FEDRISK_INJECT_FAULTS` environment variable; nothing the server sends can turn a fault on.
The value is a comma-separated list of `hospital:message@round:kind`, for example
`hospital_01:train@3:truncated`. Kinds (each changes what the node sends, nothing else):

* `truncated`: every ciphertext cut to half its length (bytes corrupted in transit);
* `foreign-key`: the update encrypted under a freshly made key, and the reply naming it
  (a hospital still configured with an old federation key);
* `foreign-params`: the update encrypted under other CKKS parameters (N = 8192);
* `oversized`: every ciphertext padded with 1 MiB of junk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from federation.errors import ConfigError

ENV = "FEDRISK_INJECT_FAULTS"
KINDS = ("truncated", "foreign-key", "foreign-params", "oversized")


@dataclass(frozen=True)
class Fault:
    """One fault: which hospital, on which message type and round, of which kind."""

    hospital: str
    message: str
    server_round: int
    kind: str


def planned_faults(spec: str | None = None) -> list[Fault]:
    """Parse `spec` (default: the environment variable); ConfigError on a malformed entry."""
    spec = os.environ.get(ENV, "") if spec is None else spec
    faults = []
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        try:
            hospital, when, kind = entry.split(":")
            message, server_round = when.split("@")
            fault = Fault(hospital, message, int(server_round), kind)
        except ValueError:
            raise ConfigError(f"{ENV}: {entry!r} is not hospital:message@round:kind") from None
        if kind not in KINDS:
            raise ConfigError(f"{ENV}: fault kind {kind!r} is not one of {', '.join(KINDS)}")
        faults.append(fault)
    return faults


def fault_for(hospital: str, message: str, server_round: int) -> str | None:
    """The kind of fault to inject into this reply, if any."""
    for fault in planned_faults():
        if (fault.hospital, fault.message, fault.server_round) == (hospital, message, server_round):
            return fault.kind
    return None


def corrupt(kind: str, ciphertexts: list[bytes], plaintext: np.ndarray) -> tuple[list[bytes], str | None]:
    """The ciphertexts a faulty node sends instead, and the key id it names (None: unchanged)."""
    import tempfile
    from pathlib import Path

    import tenseal.sealapi as seal

    from federation import he_codec
    if kind == "truncated":
        return [blob[: len(blob) // 2] for blob in ciphertexts], None
    if kind == "oversized":
        return [blob + bytes(1 << 20) for blob in ciphertexts], None
    if kind == "foreign-key":
        with tempfile.TemporaryDirectory() as scratch:
            other = he_codec.HospitalKey.load(he_codec.init_keys(Path(scratch)).hospital_context)
        return other.encrypt(plaintext), other.key_id
    if kind == "foreign-params":
        params = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
        params.set_poly_modulus_degree(8192)
        params.set_coeff_modulus(seal.CoeffModulus.Create(8192, [60, 40, 60]))
        context = seal.SEALContext(params, True, seal.SEC_LEVEL_TYPE.TC128)
        encoder = seal.CKKSEncoder(context)
        encryptor = seal.Encryptor(context, seal.KeyGenerator(context).secret_key())
        blobs = []
        for start in range(0, plaintext.size, encoder.slot_count()):
            plain = seal.Plaintext()
            encoder.encode(plaintext[start:start + encoder.slot_count()].tolist(), 2.0 ** 40, plain)
            blobs.append(he_codec._save(encryptor.encrypt_symmetric(plain)))
        return blobs, None
    raise ValueError(kind)
