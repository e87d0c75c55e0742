"""The CKKS codec: exact-enough aggregation, and key material that stays where it belongs."""

from __future__ import annotations

import os
import shutil
import stat

import numpy as np
import pytest
import tenseal as ts

from federation import he_codec
from federation.errors import CodecRangeError, KeyMaterialError
from federation.he_codec import HospitalKey, ServerContext, init_keys
from federation.model import num_parameters


def _encrypted_fedavg(key: HospitalKey, server: ServerContext, weights: list[np.ndarray],
                      counts: list[int]) -> np.ndarray:
    """The protocol's arithmetic: hospitals send Enc(n_k/N (w_k - w0), n_k/N); the server sums."""
    n_hat = float(sum(counts))
    start = np.zeros_like(weights[0])
    updates = [key.encrypt(np.concatenate([n / n_hat * (w - start), [n / n_hat]]))
               for w, n in zip(weights, counts)]
    total = key.decrypt(server.sum(updates, len(start) + 1), len(start) + 1)
    return start + total[:-1] / total[-1]


def test_he_fedavg_equals_plaintext_weighted_fedavg(keys) -> None:
    rng = np.random.default_rng(0)
    key = HospitalKey.load(keys.hospital_context)
    server = ServerContext.load(keys.hospital_context.parent)
    length = num_parameters("mlp")
    weights = [rng.normal(0, 0.3, length).clip(-0.99, 0.99) for _ in range(8)]
    counts = [60_000, 41_000, 23_500, 12_000, 8_100, 5_000, 2_300, 900]
    expected = np.average(np.stack(weights), axis=0, weights=counts)
    got = _encrypted_fedavg(key, server, weights, counts)
    assert np.max(np.abs(got - expected)) <= 1e-6
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) <= 1e-6


def test_server_context_holds_no_secret_key_and_cannot_decrypt(keys) -> None:
    server = ServerContext.load(keys.server_context.parent)
    assert not server.context.has_secret_key()
    key = HospitalKey.load(keys.hospital_context)
    blob = key.encrypt(np.array([0.25, -0.5]))[0]
    vector = ts.ckks_vector_from(server.context, blob)
    with pytest.raises(ValueError):
        vector.decrypt()
    with pytest.raises(ValueError):
        ts.ckks_vector(server.context, [1.0])


def test_server_refuses_a_context_with_a_secret_key(keys, tmp_path) -> None:
    shutil.copy(keys.hospital_context, tmp_path / he_codec.SERVER_CONTEXT_FILE)
    shutil.copy(keys.federation_file, tmp_path / he_codec.FEDERATION_FILE)
    with pytest.raises(KeyMaterialError, match="secret key"):
        ServerContext.load(tmp_path)


def test_hospital_refuses_the_servers_context(keys) -> None:
    with pytest.raises(KeyMaterialError, match="no secret key"):
        HospitalKey.load(keys.server_context)


def test_contexts_with_other_parameters_are_refused(tmp_path) -> None:
    other = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[40, 20, 40])
    other.global_scale = 2 ** 20
    (tmp_path / "hospital.ckks").write_bytes(other.serialize(save_secret_key=True))
    with pytest.raises(KeyMaterialError, match="parameters"):
        HospitalKey.load(tmp_path / "hospital.ckks")


def test_keys_init_writes_a_private_secret_context_and_refuses_to_overwrite(tmp_path) -> None:
    bundle = init_keys(tmp_path)
    assert stat.S_IMODE(os.stat(bundle.hospital_context).st_mode) == 0o600
    assert HospitalKey.load(bundle.hospital_context).key_id == bundle.key_id
    with pytest.raises(KeyMaterialError, match="already exists"):
        init_keys(tmp_path)


def test_ciphertexts_from_another_key_do_not_decrypt_to_the_sum(keys, tmp_path) -> None:
    mine = HospitalKey.load(keys.hospital_context)
    theirs = HospitalKey.load(init_keys(tmp_path).hospital_context)
    assert mine.key_id != theirs.key_id
    garbled = mine.decrypt(theirs.encrypt(np.array([0.5])), 1)
    assert abs(garbled[0] - 0.5) > 1e-3


def test_values_outside_the_codec_range_are_refused(keys) -> None:
    key = HospitalKey.load(keys.hospital_context)
    with pytest.raises(CodecRangeError):
        key.encrypt(np.array([0.5, 1.5]))
    with pytest.raises(CodecRangeError):
        key.encrypt(np.array([np.nan]))


def test_encrypted_mlp_update_is_at_most_six_times_its_float32_size(keys) -> None:
    key = HospitalKey.load(keys.hospital_context)
    length = num_parameters("mlp")
    update = np.random.default_rng(1).uniform(-1, 1, length + 2)
    size = sum(len(blob) for blob in key.encrypt(update))
    assert size <= 6 * 4 * length
