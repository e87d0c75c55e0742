"""The CKKS codec: parameters, key material, and how updates are packed, encrypted and serialised.

Parameters are chosen once, here, and checked whenever a context is loaded:

* ring dimension N = 2048 (1024 real slots per ciphertext);
* coefficient modulus of 34 + 20 = 54 bits. The HomomorphicEncryption.org standard table
  allows at most 54 bits at N = 2048 for 128-bit classical security with a ternary secret,
  so these parameters give >= 128-bit security. Fresh ciphertexts live at the 34-bit data
  level, which is what keeps them small on the wire;
* scale 2^32: each slot carries values below 2 in magnitude, and the decryption error of a
  sum of up to 128 fresh ciphertexts stays below about 1e-6 (measured in the tests and the
  benchmark);
* symmetric encryption: only hospitals (who share the secret key) can encrypt; the server's
  context holds the parameters alone, so it can add ciphertexts and do nothing else.

Everything a hospital sends is normalised into [-1, 1] before encryption: model deltas are
weighted by n_k / N_hat, where N_hat is the federation-wide record count that hospitals learn
from an encrypted census at the start of a run. The server never sees N_hat or any n_k.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tenseal as ts

from federation.errors import CodecRangeError, KeyMaterialError, ProtocolError

POLY_MODULUS_DEGREE = 2048
COEFF_MOD_BIT_SIZES = (34, 20)
GLOBAL_SCALE_BITS = 32
SLOTS = POLY_MODULUS_DEGREE // 2
SECURITY_BITS = 128
MAX_ABS_VALUE = 1.0  # what one hospital may put in a slot; sums of many stay below 2
CONTRIBUTOR_UNIT = 2.0 ** -7  # each hospital adds this to the contributor slot (<=255 fit)
CENSUS_UNIT = 2.0 ** -24  # census slot carries n_k * 2^-24 (up to ~33M records in all)

MAX_CIPHERTEXT_BYTES = 2 * len(COEFF_MOD_BIT_SIZES) * POLY_MODULUS_DEGREE * 8 + 4096
"""Largest serialised ciphertext a server accepts: two polynomials over every modulus,
uncompressed, plus headers (a fresh ciphertext is about 21.6 kB compressed)."""

HOSPITAL_CONTEXT_FILE = "hospital.ckks"
SERVER_CONTEXT_FILE = "server.ckks"
FEDERATION_FILE = "federation.json"


def he_parameters() -> dict[str, object]:
    """The CKKS parameters as logged with every run and printed on every certificate."""
    return {
        "scheme": "CKKS",
        "poly_modulus_degree": POLY_MODULUS_DEGREE,
        "coeff_mod_bit_sizes": list(COEFF_MOD_BIT_SIZES),
        "global_scale_bits": GLOBAL_SCALE_BITS,
        "encryption": "symmetric",
        "security_bits": SECURITY_BITS,
        "library": f"tenseal {ts.__version__}",
    }


def _params_bytes(context: ts.Context) -> bytes:
    return context.serialize(save_public_key=False, save_secret_key=False,
                             save_galois_keys=False, save_relin_keys=False)


def _new_secret_context() -> ts.Context:
    context = ts.context(ts.SCHEME_TYPE.CKKS, POLY_MODULUS_DEGREE,
                         coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES),
                         encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
    context.global_scale = 2.0 ** GLOBAL_SCALE_BITS
    return context


_REFERENCE_PARAMS_ID: str | None = None


def reference_params_id() -> str:
    """Fingerprint of the parameters this module defines (what every loaded context must match)."""
    global _REFERENCE_PARAMS_ID
    if _REFERENCE_PARAMS_ID is None:
        _REFERENCE_PARAMS_ID = params_id(_new_secret_context())
    return _REFERENCE_PARAMS_ID


def params_id(context: ts.Context) -> str:
    """SHA-256 of a context's encryption parameters and scale (no key material)."""
    return hashlib.sha256(_params_bytes(context)).hexdigest()[:16]


def _key_id(context: ts.Context) -> str:
    secret_bytes = context.serialize(save_public_key=False, save_secret_key=True,
                                     save_galois_keys=False, save_relin_keys=False)
    return hmac.new(b"fedrisk-ckks-key-id", secret_bytes, hashlib.sha256).hexdigest()[:16]


@dataclass(frozen=True)
class KeyBundlePaths:
    """Where `fedrisk keys init` wrote the key material."""

    hospital_context: Path
    server_context: Path
    federation_file: Path
    key_id: str
    params_id: str


def init_keys(keys_dir: Path, *, overwrite: bool = False) -> KeyBundlePaths:
    """Create a fresh CKKS key: the secret context for hospitals (mode 0600) and a
    parameters-only context for the server, plus `federation.json` naming the key.

    Refuses to overwrite existing key material unless asked: replacing a key makes every
    ciphertext made under the old one undecryptable.
    """
    keys_dir = Path(keys_dir)
    hospital_path = keys_dir / HOSPITAL_CONTEXT_FILE
    if hospital_path.exists() and not overwrite:
        raise KeyMaterialError(f"{hospital_path} already exists; pass --force to replace the key")
    keys_dir.mkdir(parents=True, exist_ok=True)
    context = _new_secret_context()
    key_id, pid = _key_id(context), params_id(context)
    secret_bytes = context.serialize(save_public_key=False, save_secret_key=True,
                                     save_galois_keys=False, save_relin_keys=False)
    tmp = hospital_path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secret_bytes)
    os.chmod(tmp, 0o600)
    os.replace(tmp, hospital_path)
    server_path = keys_dir / SERVER_CONTEXT_FILE
    server_path.write_bytes(_params_bytes(context))
    federation_path = keys_dir / FEDERATION_FILE
    federation_path.write_text(json.dumps(
        {"key_id": key_id, "params_id": pid, "he_parameters": he_parameters()}, indent=2))
    return KeyBundlePaths(hospital_path, server_path, federation_path, key_id, pid)


def _read_context(path: Path, role: str) -> ts.Context:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise KeyMaterialError(f"{role} CKKS context not found: {path}") from None
    except OSError as exc:
        raise KeyMaterialError(f"cannot read {role} CKKS context {path}: {exc.strerror}") from None
    try:
        context = ts.context_from(raw)
    except Exception:
        raise KeyMaterialError(f"{path} is not a TenSEAL context") from None
    if params_id(context) != reference_params_id():
        raise KeyMaterialError(
            f"{path} uses CKKS parameters other than fedrisk's "
            f"(N={POLY_MODULUS_DEGREE}, moduli {list(COEFF_MOD_BIT_SIZES)}, scale 2^{GLOBAL_SCALE_BITS})")
    return context


@dataclass
class HospitalKey:
    """A hospital's CKKS secret context: it can encrypt and decrypt."""

    context: ts.Context
    key_id: str

    @classmethod
    def load(cls, path: Path) -> "HospitalKey":
        """Load and check a hospital context; refuses a server (parameters-only) context."""
        context = _read_context(path, "hospital")
        if not context.has_secret_key():
            raise KeyMaterialError(
                f"{path} holds no secret key: hospitals need {HOSPITAL_CONTEXT_FILE}, not the server's context")
        context.global_scale = 2.0 ** GLOBAL_SCALE_BITS
        return cls(context=context, key_id=_key_id(context))

    @property
    def params_id(self) -> str:
        """Fingerprint of the parameters (shared with the server)."""
        return params_id(self.context)

    def encrypt(self, values: np.ndarray) -> list[bytes]:
        """Encrypt a vector of values in [-1, 1], 1024 slots per ciphertext, serialised."""
        values = np.asarray(values, dtype=np.float64).ravel()
        if not np.all(np.isfinite(values)):
            raise CodecRangeError("update holds NaN or infinite values; refusing to encrypt")
        peak = float(np.max(np.abs(values))) if values.size else 0.0
        if peak > MAX_ABS_VALUE:
            raise CodecRangeError(
                f"a value of magnitude {peak:.3g} exceeds the codec's range of {MAX_ABS_VALUE}; "
                "lower the learning rate or local epochs")
        return [ts.ckks_vector(self.context, values[i:i + SLOTS].tolist()).serialize()
                for i in range(0, values.size, SLOTS)]

    def decrypt(self, ciphertexts: Sequence[bytes], length: int) -> np.ndarray:
        """Decrypt serialised ciphertexts back into a float64 vector of `length` values."""
        if not ciphertexts:
            raise KeyMaterialError("no ciphertexts to decrypt")
        if len(ciphertexts) != ciphertexts_for(length):
            raise KeyMaterialError(
                f"expected {ciphertexts_for(length)} ciphertexts for {length} values, got {len(ciphertexts)}")
        parts = []
        for blob in ciphertexts:
            try:
                vector = ts.ckks_vector_from(self.context, bytes(blob))
            except Exception:
                raise KeyMaterialError("a ciphertext could not be read under this hospital's key") from None
            parts.append(np.asarray(vector.decrypt(), dtype=np.float64))
        return np.concatenate(parts)[:length]


@dataclass
class ServerContext:
    """The server's CKKS context: parameters only. It can add ciphertexts; it cannot
    encrypt or decrypt."""

    context: ts.Context
    key_id: str

    @classmethod
    def load(cls, keys_dir: Path) -> "ServerContext":
        """Load `server.ckks` and `federation.json`; refuses any context holding a secret key."""
        keys_dir = Path(keys_dir)
        path = keys_dir / SERVER_CONTEXT_FILE
        context = _read_context(path, "server")
        if context.has_secret_key():
            raise KeyMaterialError(
                f"{path} holds a CKKS secret key; the server must only ever get the parameters-only context")
        federation = keys_dir / FEDERATION_FILE
        try:
            key_id = json.loads(federation.read_text())["key_id"]
        except (OSError, ValueError, KeyError):
            raise KeyMaterialError(f"{federation} is missing or has no key_id; run `fedrisk keys init`") from None
        return cls(context=context, key_id=str(key_id))

    @property
    def params_id(self) -> str:
        """Fingerprint of the parameters (shared with the hospitals)."""
        return params_id(self.context)

    def parse(self, update: Sequence[bytes], length: int) -> list[ts.CKKSVector]:
        """Check one hospital's reply and load its ciphertexts, or raise `ReplyRejected` saying
        why: the wrong number of ciphertexts, one over the size limit, bytes that are not a
        fresh CKKS ciphertext under the federation's parameters, or the wrong number of values.
        (A ciphertext made under another secret key with these parameters cannot be told apart
        by anyone without a key; replies name their key and are checked for that upstream.)"""
        expected = ciphertexts_for(length)
        if len(update) != expected:
            raise ReplyRejected(f"{len(update)} ciphertexts where {expected} were expected")
        vectors = []
        for index, blob in enumerate(update):
            if len(blob) > MAX_CIPHERTEXT_BYTES:
                raise ReplyRejected(f"ciphertext {index} is {len(blob):,} bytes, over the "
                                    f"{MAX_CIPHERTEXT_BYTES:,}-byte limit")
            try:
                vector = ts.ckks_vector_from(self.context, bytes(blob))
                scales = [c.scale for c in vector.ciphertext()]
            except Exception:
                raise ReplyRejected(f"ciphertext {index} is not a CKKS ciphertext under the federation's "
                                    "parameters") from None
            want = min(SLOTS, length - index * SLOTS)
            if vector.size() != want or scales != [2.0 ** GLOBAL_SCALE_BITS]:
                raise ReplyRejected(f"ciphertext {index} carries {vector.size()} values at another scale or "
                                    f"count than the {want} expected")
            vectors.append(vector)
        return vectors

    def add(self, updates: Iterable[list[ts.CKKSVector]]) -> list[bytes]:
        """Slot-wise sum of parsed updates (see `parse`), serialised."""
        total: list | None = None
        for vectors in updates:
            total = list(vectors) if total is None else [acc + vec for acc, vec in zip(total, vectors)]
        if total is None:
            raise KeyMaterialError("no ciphertexts to sum")
        return [vector.serialize() for vector in total]

    def sum(self, updates: Iterable[Sequence[bytes]], length: int) -> list[bytes]:
        """Check, parse and add serialised updates of `length` values each."""
        return self.add(self.parse(update, length) for update in updates)


class ReplyRejected(ProtocolError):
    """One hospital's reply cannot enter an aggregate; the round goes on without it."""


def ciphertexts_for(length: int) -> int:
    """How many ciphertexts carry `length` values."""
    return max(1, -(-length // SLOTS))


def check_file_mode(path: Path) -> None:
    """Refuse a hospital secret context readable by group or others."""
    mode = stat.S_IMODE(Path(path).stat().st_mode)
    if mode & 0o077:
        raise KeyMaterialError(f"{path} is readable by others (mode {oct(mode)}); chmod 600 it")


class PlaintextCodec:
    """The same packing without encryption: the benchmark's plaintext-FedAvg reference.

    Only runs with `he = false` use it, to measure what CKKS costs; it offers no protection.
    """

    key_id = "plaintext"
    params_id = "plaintext"

    def encrypt(self, values: np.ndarray) -> list[bytes]:
        """The float64 bytes of the vector, in one block."""
        return [np.asarray(values, dtype="<f8").tobytes()]

    def decrypt(self, blocks: Sequence[bytes], length: int) -> np.ndarray:
        """Inverse of `encrypt`."""
        return np.concatenate([np.frombuffer(bytes(b), dtype="<f8") for b in blocks])[:length]

    def parse(self, update: Sequence[bytes], length: int) -> list[np.ndarray]:
        """Check a reply's block against `length` and load it (mirrors `ServerContext.parse`)."""
        if len(update) != 1 or len(update[0]) != 8 * length:
            raise ReplyRejected(f"a plaintext reply of {sum(len(b) for b in update):,} bytes where "
                                f"{8 * length:,} were expected")
        return [np.frombuffer(bytes(update[0]), dtype="<f8")]

    def add(self, updates: Iterable[list[np.ndarray]]) -> list[bytes]:
        """Element-wise sum of parsed plaintext vectors."""
        total = None
        for (vector,) in updates:
            total = vector if total is None else total + vector
        if total is None:
            raise KeyMaterialError("no updates to sum")
        return self.encrypt(total)

    def sum(self, updates: Iterable[Sequence[bytes]], length: int) -> list[bytes]:
        """Element-wise sum of plaintext vectors of `length` values each."""
        return self.add(self.parse(update, length) for update in updates)

    @staticmethod
    def blocks_for(length: int) -> int:
        """One block carries any length."""
        return 1
