"""The CKKS codec: aggregation within the flooding bound, and key material that stays where it belongs."""

from __future__ import annotations

import os
import shutil
import stat

import numpy as np
import pytest
import tenseal.sealapi as seal

from federation import he_codec
from federation.errors import CodecRangeError, KeyMaterialError
from federation.he_codec import HospitalKey, ReplyRejected, ServerContext, flooding_std, init_keys
from federation.model import num_parameters


def _encrypted_fedavg(key: HospitalKey, server: ServerContext, weights: list[np.ndarray],
                      counts: list[int]) -> np.ndarray:
    """The protocol's arithmetic: hospitals send Enc(n_k/N (w_k - w0), n_k/N); the server only
    checks shapes; a hospital adds, decrypts (flooded) and divides."""
    n_hat = float(sum(counts))
    start = np.zeros_like(weights[0])
    updates = [key.encrypt(np.concatenate([n / n_hat * (w - start), [n / n_hat]]))
               for w, n in zip(weights, counts)]
    for update in updates:
        server.parse(update, len(start) + 1)
    total = key.decrypt_flooded(updates, len(start) + 1, "run|1|train|update")
    return start + total[:-1] / total[-1]


def test_he_fedavg_equals_plaintext_weighted_fedavg_within_the_flooding_bound(keys) -> None:
    rng = np.random.default_rng(0)
    key = HospitalKey.load(keys.hospital_context)
    server = ServerContext.load(keys.hospital_context.parent)
    length = num_parameters("mlp")
    weights = [rng.normal(0, 0.3, length).clip(-0.99, 0.99) for _ in range(8)]
    counts = [60_000, 41_000, 23_500, 12_000, 8_100, 5_000, 2_300, 900]
    expected = np.average(np.stack(weights), axis=0, weights=counts)
    got = _encrypted_fedavg(key, server, weights, counts)
    bound = 6 * flooding_std(8)  # the flooding dominates CKKS's own error by design
    assert np.max(np.abs(got - expected)) <= bound
    assert 0.5 * flooding_std(8) < np.std(got - expected) < 2 * flooding_std(8)  # flooded, not exact
    assert flooding_std(8) < 2e-6


def test_flooding_is_deterministic_per_aggregate_and_fresh_across_aggregates(keys) -> None:
    key = HospitalKey.load(keys.hospital_context)
    a = [key.encrypt(np.full(10, 0.25)) for _ in range(3)]
    first = key.decrypt_flooded(a, 10, "r|1|evaluate|evaluation")
    assert np.array_equal(first, key.decrypt_flooded(a, 10, "r|1|evaluate|evaluation"))
    other = key.decrypt_flooded(a, 10, "r|2|evaluate|evaluation")
    assert not np.array_equal(first, other)
    assert np.allclose(first, 0.75, atol=1e-5) and np.allclose(other, 0.75, atol=1e-5)


def test_server_context_holds_no_secret_key_and_cannot_decrypt_or_encrypt(keys) -> None:
    server = ServerContext.load(keys.server_context.parent)
    assert not hasattr(server, "decrypt_flooded") and not hasattr(server, "encrypt")
    assert keys.server_context.read_bytes() == he_codec._reference_params_bytes()


def test_server_refuses_a_context_with_a_secret_key(keys, tmp_path) -> None:
    shutil.copy(keys.hospital_context, tmp_path / he_codec.SERVER_CONTEXT_FILE)
    shutil.copy(keys.federation_file, tmp_path / he_codec.FEDERATION_FILE)
    with pytest.raises(KeyMaterialError, match="secret key"):
        ServerContext.load(tmp_path)


def test_hospital_refuses_the_servers_context(keys) -> None:
    with pytest.raises(KeyMaterialError, match="no secret key"):
        HospitalKey.load(keys.server_context)


def test_contexts_with_other_parameters_are_refused(tmp_path) -> None:
    params = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    params.set_poly_modulus_degree(8192)
    params.set_coeff_modulus(seal.CoeffModulus.Create(8192, [60, 40, 60]))
    (tmp_path / "server.ckks").write_bytes(he_codec._save(params))
    (tmp_path / "federation.json").write_text('{"key_id": "x"}')
    with pytest.raises(KeyMaterialError, match="parameters"):
        ServerContext.load(tmp_path)
    (tmp_path / "hospital.ckks").write_bytes(b"not a key")
    with pytest.raises(KeyMaterialError, match="parameters"):
        HospitalKey.load(tmp_path / "hospital.ckks")


def test_keys_init_writes_a_private_secret_key_and_refuses_to_overwrite(tmp_path) -> None:
    bundle = init_keys(tmp_path)
    assert stat.S_IMODE(os.stat(bundle.hospital_context).st_mode) == 0o600
    assert HospitalKey.load(bundle.hospital_context).key_id == bundle.key_id
    with pytest.raises(KeyMaterialError, match="already exists"):
        init_keys(tmp_path)


def test_ciphertexts_from_another_key_do_not_decrypt_to_the_sum(keys, tmp_path) -> None:
    mine = HospitalKey.load(keys.hospital_context)
    theirs = HospitalKey.load(init_keys(tmp_path).hospital_context)
    assert mine.key_id != theirs.key_id
    garbled = mine.decrypt_flooded([theirs.encrypt(np.array([0.5]))], 1, "x")
    assert abs(garbled[0] - 0.5) > 1e-3


def test_malformed_ciphertexts_are_rejected_before_use(keys) -> None:
    key = HospitalKey.load(keys.hospital_context)
    server = ServerContext.load(keys.hospital_context.parent)
    good = key.encrypt(np.array([0.1, 0.2, 0.3]))
    for bad in ([good[0][: len(good[0]) // 2]], [good[0] + bytes(1 << 20)], [b"junk"], good * 2):
        with pytest.raises(ReplyRejected):
            server.parse(bad, 3)


def test_values_outside_the_codec_range_are_refused(keys) -> None:
    key = HospitalKey.load(keys.hospital_context)
    with pytest.raises(CodecRangeError):
        key.encrypt(np.array([0.5, 1.5]))
    with pytest.raises(CodecRangeError):
        key.encrypt(np.array([np.nan]))


def test_encrypted_mlp_update_is_at_most_four_times_its_float32_size(keys) -> None:
    key = HospitalKey.load(keys.hospital_context)
    length = num_parameters("mlp")
    update = np.random.default_rng(1).uniform(-1, 1, length + 2)
    size = sum(len(blob) for blob in key.encrypt(update))
    assert size <= 4 * 4 * length  # two reals per slot, seeded ciphertexts: 3.5x for the demo MLP
