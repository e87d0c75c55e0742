"""Deliberate faults, for testing how the federation copes with a misbehaving hospital.

A node misbehaves only when the operator of *its own process* asks it to, through the
`FEDRISK_INJECT_FAULTS` environment variable; nothing the server sends can turn a fault on.
The value is a comma-separated list of `hospital:message@round:kind`, for example
`hospital_01:train@3:truncated`. Kinds (each changes what the node sends, nothing else):

* `truncated`: every ciphertext cut to half its length (bytes corrupted in transit);
* `foreign-key`: the update encrypted under a freshly made key, and the reply naming it
  (a hospital still configured with an old federation key);
* `foreign-params`: the update encrypted under other CKKS parameters (N = 4096);
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
    import tenseal as ts

    from federation import he_codec

    if kind == "truncated":
        return [blob[: len(blob) // 2] for blob in ciphertexts], None
    if kind == "oversized":
        return [blob + bytes(1 << 20) for blob in ciphertexts], None
    if kind == "foreign-key":
        context = he_codec._new_secret_context()
        other = he_codec.HospitalKey(context=context, key_id=he_codec._key_id(context))
        return other.encrypt(plaintext), other.key_id
    if kind == "foreign-params":
        context = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[40, 20, 40],
                             encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
        context.global_scale = 2.0 ** he_codec.GLOBAL_SCALE_BITS
        return [ts.ckks_vector(context, plaintext[i:i + he_codec.SLOTS].tolist()).serialize()
                for i in range(0, plaintext.size, he_codec.SLOTS)], None
    raise ValueError(kind)
