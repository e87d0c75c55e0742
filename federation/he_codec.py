"""The CKKS codec: parameters, key material, packing, and the only decryption that leaves a node.

Parameters are chosen once, here, and checked whenever key material is loaded:

* ring dimension N = 4096, coefficient modulus 60 + 49 = 109 bits. The HomomorphicEncryption.org
  standard allows at most 109 bits at N = 4096 for 128-bit classical security with a ternary
  secret, so these parameters give >= 128-bit security (SEAL checks it: the context is built
  with `SEC_LEVEL_TYPE.TC128`). Fresh ciphertexts live at the 60-bit data level; the 49-bit prime
  is SEAL's special prime and never travels.
* scale 2^55 and two reals per slot: CKKS slots are complex, so one ciphertext carries
  N/2 = 2048 slots = 4096 real values (real and imaginary parts). A sum decodes correctly while
  every value stays below 2^(60-55-1) = 16 in magnitude; one hospital puts at most 1 in a slot
  and every vector fedrisk sums is a weighted average or a bounded count, so sums stay below 4.
* symmetric, seeded encryption: only hospitals (who share the secret key) can encrypt, and a
  fresh ciphertext is serialised with the seed of its uniformly random half instead of the half
  itself (SEAL's `encrypt_symmetric` -> `Serializable`), which halves the bytes: 32,972 bytes for
  4,096 reals, 2.0x their float32 size.

Why N = 4096 and not 2048: what leaves a decryption must be *flooded*. CKKS decryption returns
m + e, and (Li and Micciancio, EUROCRYPT 2021) anyone holding a ciphertext and m + e at full
precision solves c0 + c1 s = m + e for the secret s. fedrisk therefore never releases m + e: a
hospital adds Gaussian noise far above e before any decrypted value is used or sent
(`HospitalKey.decrypt_flooded`). The flooding standard deviation follows the bound of Li,
Micciancio, Schultz and Sorrell (CRYPTO 2022) for s bits of statistical security against an
adversary who sees t decryptions:

    sigma_flood = E * 2^(s/2) * sqrt(64 t),

with s = 30 (OpenFHE's default for its NOISE_FLOODING_DECRYPT mode), t = 4096 decryptions per
key (every node refuses more: `MAX_DECRYPTIONS_PER_KEY`, after which the key must be rotated), and
E a high-probability bound on the decoded error of a sum of k fresh ciphertexts: each
coefficient of a fresh ciphertext's error is a discrete Gaussian of std 3.2 plus the encoding's
rounding (variance 1/12), so each decoded real has std sqrt(k (3.2^2 + 1/12) N/2) / Delta; E is
6 of those standard deviations. For k = 8 hospitals that gives E = 6.8e-14 and
sigma_flood = 1.15e-6, which the aggregates carry comfortably (model deltas are ~1e-3, DP-SGD's
own noise is larger still; a cohort count unit is 4.8e-7 per record, so the flooding adds
about 2.4 records of noise per cell, folded into the standard errors the analytics report).
At N = 2048 the largest secure modulus is 54 bits; with a 34-bit data level the same flooding
would be about 0.1 in every value, far too much for any aggregate: hence N = 4096.

The flooded vector is then rounded to multiples of 2^-40. The flooding noise is drawn from a
ChaCha20 stream keyed by a key derived from the CKKS secret (which only hospitals hold) and the
identity of what is decrypted, so every hospital that decrypts the same aggregate gets the same
values (all hospitals replay the same global model) and a repeated request yields the same
values rather than a fresh sample to average away.

Everything a hospital sends is normalised into [-1, 1] before encryption: model deltas are
weighted by n_k / N_hat, where N_hat is the federation-wide record count that hospitals learn
from an encrypted census at the start of a run. The server never sees N_hat or any n_k.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import stat
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import tenseal.sealapi as seal

from federation import sealing
from federation.errors import CodecRangeError, KeyMaterialError, ProtocolError

POLY_MODULUS_DEGREE = 4096
COEFF_MOD_BIT_SIZES = (60, 49)
SCALE_BITS = 55
SLOTS = POLY_MODULUS_DEGREE // 2
VALUES_PER_CIPHERTEXT = 2 * SLOTS  # two reals per complex slot
SECURITY_BITS = 128
MAX_ABS_VALUE = 1.0  # what one hospital may put in a slot
MAX_SUM_ABS = 2.0 ** (COEFF_MOD_BIT_SIZES[0] - SCALE_BITS - 1)  # where a sum stops decoding
CONTRIBUTOR_UNIT = 2.0 ** -7  # each hospital adds this to the contributor slot
CENSUS_UNIT = 2.0 ** -24  # census slot carries n_k * 2^-24 (up to ~33M records in all)
ENCRYPTION_ERROR_STD = 3.2  # SEAL's error distribution
STATISTICAL_SECURITY_BITS = 30
MAX_DECRYPTIONS_PER_KEY = 4096
ROUNDING_STEP = 2.0 ** -40

MAX_CIPHERTEXT_BYTES = 2 * POLY_MODULUS_DEGREE * 8 + 4096
"""Largest serialised ciphertext accepted: two uncompressed polynomials at the data level plus
headers (a fresh seeded ciphertext is 32,972 bytes)."""

HOSPITAL_CONTEXT_FILE = "hospital.ckks"
SERVER_CONTEXT_FILE = "server.ckks"
FEDERATION_FILE = "federation.json"
_KEY_MAGIC = b"FEDRISK-CKKS-2\n"


def he_parameters() -> dict[str, object]:
    """The CKKS parameters as logged with every run and printed on every certificate."""
    return {
        "scheme": "CKKS",
        "poly_modulus_degree": POLY_MODULUS_DEGREE,
        "coeff_mod_bit_sizes": list(COEFF_MOD_BIT_SIZES),
        "global_scale_bits": SCALE_BITS,
        "packing": "complex (two reals per slot)",
        "encryption": "symmetric, seeded",
        "security_bits": SECURITY_BITS,
        "decryption": (f"flooded (s = {STATISTICAL_SECURITY_BITS} bits, at most {MAX_DECRYPTIONS_PER_KEY} "
                       "decryptions per key), rounded to 2^-40"),
        "library": "Microsoft SEAL via tenseal.sealapi",
    }


def flooding_std(contributors: int) -> float:
    """Standard deviation of the flooding noise added to each decrypted value of a sum of
    `contributors` fresh ciphertexts (see the module docstring)."""
    per_value = math.sqrt(max(contributors, 1) * (ENCRYPTION_ERROR_STD ** 2 + 1.0 / 12.0)
                          * POLY_MODULUS_DEGREE / 2) / 2.0 ** SCALE_BITS
    return 6.0 * per_value * 2.0 ** (STATISTICAL_SECURITY_BITS / 2) * math.sqrt(64 * MAX_DECRYPTIONS_PER_KEY)


# --- SEAL plumbing: its Python binding saves and loads through file paths ----------------------

_SCRATCH = threading.local()


def _scratch_path() -> str:
    path = getattr(_SCRATCH, "path", None)
    if path is None or not os.path.isdir(os.path.dirname(path)):
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        directory = tempfile.mkdtemp(prefix="fedrisk-ckks-", dir=base)
        os.chmod(directory, 0o700)
        path = _SCRATCH.path = os.path.join(directory, f"blob-{threading.get_ident()}")
    return path


def _save(obj: object) -> bytes:
    path = _scratch_path()
    obj.save(path)  # type: ignore[attr-defined]
    try:
        with open(path, "rb") as handle:
            return handle.read()
    finally:
        os.unlink(path)


def _load(obj: object, context: seal.SEALContext | None, blob: bytes) -> None:
    path = _scratch_path()
    with open(path, "wb") as handle:
        handle.write(blob)
    try:
        if context is None:
            obj.load(path)  # type: ignore[attr-defined]
        else:
            obj.load(context, path)  # type: ignore[attr-defined]
    finally:
        os.unlink(path)


def _parameters() -> seal.EncryptionParameters:
    params = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    params.set_poly_modulus_degree(POLY_MODULUS_DEGREE)
    params.set_coeff_modulus(seal.CoeffModulus.Create(POLY_MODULUS_DEGREE, list(COEFF_MOD_BIT_SIZES)))
    return params


def _context(params: seal.EncryptionParameters) -> seal.SEALContext:
    return seal.SEALContext(params, True, seal.SEC_LEVEL_TYPE.TC128)


_REFERENCE_PARAMS: bytes | None = None


def _reference_params_bytes() -> bytes:
    global _REFERENCE_PARAMS
    if _REFERENCE_PARAMS is None:
        _REFERENCE_PARAMS = _save(_parameters())
    return _REFERENCE_PARAMS


def reference_params_id() -> str:
    """Fingerprint of the parameters this module defines (what all key material must match)."""
    return params_id_of(_reference_params_bytes())


def params_id_of(params_bytes: bytes) -> str:
    """SHA-256 (16 hex) of serialised encryption parameters (no key material)."""
    return hashlib.sha256(params_bytes).hexdigest()[:16]


def _key_id(secret_bytes: bytes) -> str:
    return hmac.new(b"fedrisk-ckks-key-id", secret_bytes, hashlib.sha256).hexdigest()[:16]


def _params_from(blob: bytes, where: Path) -> tuple[seal.EncryptionParameters, seal.SEALContext]:
    if params_id_of(blob) != reference_params_id():
        raise KeyMaterialError(
            f"{where} uses CKKS parameters other than fedrisk's "
            f"(N={POLY_MODULUS_DEGREE}, moduli {list(COEFF_MOD_BIT_SIZES)}, scale 2^{SCALE_BITS})")
    params = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    _load(params, None, blob)
    return params, _context(params)


def _pack_key_file(params_bytes: bytes, secret_bytes: bytes) -> bytes:
    return _KEY_MAGIC + struct.pack(">I", len(params_bytes)) + params_bytes + secret_bytes


def _unpack_key_file(raw: bytes, where: Path) -> tuple[bytes, bytes]:
    if raw.startswith(_KEY_MAGIC):
        body = raw[len(_KEY_MAGIC):]
        (size,) = struct.unpack(">I", body[:4])
        return body[4:4 + size], body[4 + size:]
    if params_id_of(raw) == reference_params_id():
        raise KeyMaterialError(f"{where} holds no secret key: hospitals need {HOSPITAL_CONTEXT_FILE}, "
                               "not the server's context")
    raise KeyMaterialError(f"{where} uses CKKS parameters other than fedrisk's, or is not fedrisk key material "
                           f"(N={POLY_MODULUS_DEGREE}, moduli {list(COEFF_MOD_BIT_SIZES)}, scale 2^{SCALE_BITS}); "
                           "run `fedrisk keys init`")


@dataclass(frozen=True)
class KeyBundlePaths:
    """Where `fedrisk keys init` wrote the key material."""

    hospital_context: Path
    server_context: Path
    federation_file: Path
    key_id: str
    params_id: str


def init_keys(keys_dir: Path, *, overwrite: bool = False) -> KeyBundlePaths:
    """Create a fresh CKKS key: the secret key for hospitals (mode 0600) and the parameters alone
    for the server, plus `federation.json` naming the key.

    Refuses to overwrite existing key material unless asked: replacing a key makes every
    ciphertext made under the old one undecryptable.
    """
    keys_dir = Path(keys_dir)
    hospital_path = keys_dir / HOSPITAL_CONTEXT_FILE
    if hospital_path.exists() and not overwrite:
        raise KeyMaterialError(f"{hospital_path} already exists; pass --force to replace the key")
    keys_dir.mkdir(parents=True, exist_ok=True)
    params_bytes = _reference_params_bytes()
    params, context = _params_from(params_bytes, Path("fedrisk"))
    secret_bytes = _save(seal.KeyGenerator(context).secret_key())
    key_id, pid = _key_id(secret_bytes), params_id_of(params_bytes)
    tmp = hospital_path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(_pack_key_file(params_bytes, secret_bytes))
    os.chmod(tmp, 0o600)
    os.replace(tmp, hospital_path)
    server_path = keys_dir / SERVER_CONTEXT_FILE
    server_path.write_bytes(params_bytes)
    federation_path = keys_dir / FEDERATION_FILE
    federation_path.write_text(json.dumps(
        {"key_id": key_id, "params_id": pid, "he_parameters": he_parameters()}, indent=2))
    return KeyBundlePaths(hospital_path, server_path, federation_path, key_id, pid)


def _read(path: Path, role: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise KeyMaterialError(f"{role} CKKS context not found: {path}") from None
    except OSError as exc:
        raise KeyMaterialError(f"cannot read {role} CKKS context {path}: {exc.strerror}") from None


def ciphertexts_for(length: int) -> int:
    """How many ciphertexts carry `length` values."""
    return max(1, -(-length // VALUES_PER_CIPHERTEXT))


def ciphertext_digest(ciphertexts: Sequence[bytes]) -> str:
    """SHA-256 of a list of serialised ciphertexts (each length-prefixed), hex."""
    digest = hashlib.sha256()
    for blob in ciphertexts:
        digest.update(struct.pack(">Q", len(blob)))
        digest.update(bytes(blob))
    return digest.hexdigest()


class _Parser:
    """Loads serialised ciphertexts under the federation's parameters and checks their shape."""

    context: seal.SEALContext

    def _load_one(self, blob: bytes, index: int) -> seal.Ciphertext:
        if len(blob) > MAX_CIPHERTEXT_BYTES:
            raise ReplyRejected(f"ciphertext {index} is {len(blob):,} bytes, over the "
                                f"{MAX_CIPHERTEXT_BYTES:,}-byte limit")
        ciphertext = seal.Ciphertext()
        try:
            _load(ciphertext, self.context, bytes(blob))
            valid = seal.is_valid_for(ciphertext, self.context)
        except Exception:
            valid = False
        if not valid:
            raise ReplyRejected(f"ciphertext {index} is not a CKKS ciphertext under the federation's parameters")
        if (ciphertext.size() != 2 or ciphertext.coeff_modulus_size() != 1 or not ciphertext.is_ntt_form()
                or ciphertext.scale != 2.0 ** SCALE_BITS):
            raise ReplyRejected(f"ciphertext {index} is not a fresh ciphertext at the federation's level and scale")
        return ciphertext

    def parse(self, update: Sequence[bytes], length: int) -> list[seal.Ciphertext]:
        """Check one contribution's ciphertexts and load them, or raise `ReplyRejected` saying
        why: the wrong number of ciphertexts, one over the size limit, or bytes that are not a
        fresh CKKS ciphertext under the federation's parameters. (A ciphertext made under
        another secret key with these parameters cannot be told apart without a key; replies
        name their key and are signed, which is checked upstream.)"""
        expected = ciphertexts_for(length)
        if len(update) != expected:
            raise ReplyRejected(f"{len(update)} ciphertexts where {expected} were expected")
        return [self._load_one(blob, index) for index, blob in enumerate(update)]


@dataclass
class HospitalKey(_Parser):
    """A hospital's copy of the federation's CKKS secret key: it can encrypt, add and decrypt."""

    context: seal.SEALContext
    key_id: str
    params_id: str
    _secret: seal.SecretKey
    _flood_key: bytes
    _secret_bytes: bytes

    @classmethod
    def load(cls, path: Path, *, require_sealed: bool = False) -> "HospitalKey":
        """Load and check a hospital key file (sealed at rest or not, `federation.sealing`);
        refuses the server's (parameters-only) file."""
        path = Path(path)
        raw = sealing.unseal(_read(path, "hospital"), sealing.ROLE_CKKS, path, require_sealed=require_sealed)
        params_bytes, secret_bytes = _unpack_key_file(raw, path)
        _, context = _params_from(params_bytes, path)
        secret = seal.SecretKey()
        try:
            _load(secret, context, secret_bytes)
        except Exception:
            raise KeyMaterialError(f"{path} holds no readable CKKS secret key") from None
        flood_key = hmac.new(b"fedrisk-ckks-flooding", secret_bytes, hashlib.sha256).digest()
        return cls(context, _key_id(secret_bytes), params_id_of(params_bytes), secret, flood_key, secret_bytes)

    def _seeded(self, seed: bytes) -> tuple[seal.SEALContext, seal.Encryptor]:
        """A context whose randomness (the ciphertext's uniform half and its error) comes from
        a BLAKE2xb stream under `seed`, and an encryptor for it."""
        words = [int.from_bytes(seed[i:i + 8], "little") for i in range(0, 64, 8)]
        params = _parameters()
        params.set_random_generator(seal.Blake2xbPRNGFactory(words))
        context = _context(params)
        secret = seal.SecretKey()
        _load(secret, context, self._secret_bytes)
        return context, seal.Encryptor(context, secret)

    def encrypt(self, values: np.ndarray, *, seed: bytes | None = None) -> list[bytes]:
        """Encrypt a vector of values in [-1, 1], 4096 per ciphertext (two per complex slot),
        each serialised in SEAL's seeded form.

        `seed` (64 bytes, secret, derived by the node from what it encrypts) makes the encryption
        deterministic: the same contribution encrypted again is the same ciphertext, bit for bit,
        so a retried step repeats its output exactly and every engine sees the same aggregate
        (and decrypts it with the same flooding). Without it SEAL draws fresh randomness."""
        values = np.asarray(values, dtype=np.float64).ravel()
        if not np.all(np.isfinite(values)):
            raise CodecRangeError("update holds NaN or infinite values; refusing to encrypt")
        peak = float(np.max(np.abs(values))) if values.size else 0.0
        if peak > MAX_ABS_VALUE:
            raise CodecRangeError(
                f"a value of magnitude {peak:.3g} exceeds the codec's range of {MAX_ABS_VALUE}; "
                "lower the learning rate or local epochs")
        if seed is None:
            context, encryptor = self.context, seal.Encryptor(self.context, self._secret)
        else:
            if len(seed) != 64:
                raise KeyMaterialError("an encryption seed is 64 bytes")
            context, encryptor = self._seeded(seed)
        encoder = seal.CKKSEncoder(context)
        blobs = []
        for start in range(0, max(values.size, 1), VALUES_PER_CIPHERTEXT):
            chunk = values[start:start + VALUES_PER_CIPHERTEXT]
            if chunk.size % 2:
                chunk = np.append(chunk, 0.0)
            plain = seal.Plaintext()
            encoder.encode((chunk[0::2] + 1j * chunk[1::2]).tolist(), 2.0 ** SCALE_BITS, plain)
            blobs.append(_save(encryptor.encrypt_symmetric(plain)))
        return blobs

    def _decrypt_exact(self, ciphertexts: Sequence[seal.Ciphertext], length: int) -> np.ndarray:
        """m + e at full precision. Never released: only `decrypt_flooded` calls it."""
        encoder, decryptor = seal.CKKSEncoder(self.context), seal.Decryptor(self.context, self._secret)
        parts = []
        for ciphertext in ciphertexts:
            plain = seal.Plaintext()
            decryptor.decrypt(ciphertext, plain)
            slots = np.asarray(encoder.decode_complex(plain))
            reals = np.empty(2 * slots.size)
            reals[0::2], reals[1::2] = slots.real, slots.imag
            parts.append(reals)
        return np.concatenate(parts)[:length]

    def sum(self, contributions: Sequence[Sequence[bytes]], length: int,
            parsed: Sequence[list[seal.Ciphertext]] | None = None) -> list[seal.Ciphertext]:
        """Slot-wise sum of several contributions' ciphertexts (each checked by `parse`, unless
        `parsed` holds them already loaded, in the same order)."""
        if not contributions:
            raise KeyMaterialError("no ciphertexts to sum")
        loaded = list(parsed) if parsed is not None else [self.parse(update, length) for update in contributions]
        evaluator = seal.Evaluator(self.context)
        total = list(loaded[0])
        for update in loaded[1:]:
            summed = []
            for accumulator, ciphertext in zip(total, update):
                out = seal.Ciphertext()
                evaluator.add(accumulator, ciphertext, out)  # never alters a loaded contribution
                summed.append(out)
            total = summed
        return total

    def decrypt_flooded(self, contributions: Sequence[Sequence[bytes]], length: int, identity: str,
                        parsed: Sequence[list[seal.Ciphertext]] | None = None) -> np.ndarray:
        """Add up `contributions` (each a list of ciphertexts of `length` values), decrypt the
        sum and return it flooded and rounded (module docstring): the only decryption whose
        result is ever used or sent. `identity` names what is decrypted (run, round, step,
        kind); with the ciphertexts' digests it keys the flooding stream."""
        exact = self._decrypt_exact(self.sum(contributions, length, parsed), length)
        digest = hashlib.sha256(identity.encode())
        for update in contributions:
            digest.update(bytes.fromhex(ciphertext_digest(update)))
        noise = _gaussian_stream(hmac.new(self._flood_key, digest.digest(), hashlib.sha256).digest(), length)
        flooded = exact + noise * flooding_std(len(contributions))
        return np.round(flooded / ROUNDING_STEP) * ROUNDING_STEP


def _gaussian_stream(key: bytes, count: int) -> np.ndarray:
    """`count` standard normal draws from the ChaCha20 keystream under `key` (Box-Muller)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    pairs = (count + 1) // 2
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(16 * pairs))
    words = np.frombuffer(stream, dtype="<u8").reshape(pairs, 2)
    u1 = ((words[:, 0] >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0 ** 53  # (0, 1]
    u2 = (words[:, 1] >> np.uint64(11)).astype(np.float64) / 2.0 ** 53
    radius = np.sqrt(-2.0 * np.log(u1))
    return np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])[:count]


@dataclass
class ServerContext(_Parser):
    """The coordinator's CKKS parameters: it can check ciphertexts' shape; it cannot encrypt,
    decrypt, or even add (hospitals add the contributions they verify themselves)."""

    context: seal.SEALContext
    key_id: str
    params_id: str

    @classmethod
    def load(cls, keys_dir: Path) -> "ServerContext":
        """Load `server.ckks` and `federation.json`; refuses any file holding a secret key."""
        keys_dir = Path(keys_dir)
        path = keys_dir / SERVER_CONTEXT_FILE
        raw = _read(path, "server")
        if raw.startswith(_KEY_MAGIC):
            raise KeyMaterialError(
                f"{path} holds a CKKS secret key; the server must only ever get the parameters-only context")
        _, context = _params_from(raw, path)
        federation = keys_dir / FEDERATION_FILE
        try:
            key_id = json.loads(federation.read_text())["key_id"]
        except (OSError, ValueError, KeyError):
            raise KeyMaterialError(f"{federation} is missing or has no key_id; run `fedrisk keys init`") from None
        return cls(context, str(key_id), params_id_of(raw))


class ReplyRejected(ProtocolError):
    """One hospital's reply cannot enter an aggregate; the round goes on without it."""


def check_file_mode(path: Path) -> None:
    """Refuse a hospital secret key file readable by group or others."""
    mode = stat.S_IMODE(Path(path).stat().st_mode)
    if mode & 0o077:
        raise KeyMaterialError(f"{path} is readable by others (mode {oct(mode)}); chmod 600 it")
