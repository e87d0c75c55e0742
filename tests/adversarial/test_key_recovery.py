"""Passive key recovery (Li and Micciancio, EUROCRYPT 2021) against what hospitals reveal.

A CKKS decryption returns m + e where c0 + c1 * s = m + e. Whoever holds a ciphertext and the
exact decryption solves for the secret s = (m + e - c0) / c1 in the ring, coefficient-wise in
the NTT domain (SEAL keeps ciphertexts, plaintexts and keys there). The attacker below is that
algorithm. Played on a leaky decryption (the raw plaintext), it recovers every NTT coefficient of
the secret key; played on what a fedrisk hospital actually reveals (flooded, rounded values of an
aggregate it verified), it recovers nothing.
"""

from __future__ import annotations

import numpy as np
import tenseal.sealapi as seal

from federation import he_codec
from federation.he_codec import HospitalKey, SCALE_BITS


def _words(array: object, count: int) -> list[int]:
    return [int(array.at(i)) for i in range(count)]  # type: ignore[attr-defined]


def _prime(key: HospitalKey) -> int:
    return int(key.context.first_context_data().parms().coeff_modulus()[0].value())


def recover_secret(ciphertext: seal.Ciphertext, plaintext_ntt: list[int], q: int) -> list[int]:
    """s = (m' - c0) * c1^-1 mod q, coefficient-wise in the NTT domain."""
    n = he_codec.POLY_MODULUS_DEGREE
    words = _words(ciphertext.dyn_array(), 2 * n)
    c0, c1 = words[:n], words[n:]
    return [((m - a) * pow(b, -1, q)) % q for m, a, b in zip(plaintext_ntt, c0, c1)]


def encode_revealed(key: HospitalKey, values: np.ndarray) -> list[int]:
    """What the attacker makes of revealed values: re-encode them as the plaintext polynomial."""
    padded = np.zeros(he_codec.VALUES_PER_CIPHERTEXT)  # the attacker knows unused slots hold zero
    padded[:len(values)] = values
    values = padded
    plain = seal.Plaintext()
    seal.CKKSEncoder(key.context).encode((values[0::2] + 1j * values[1::2]).tolist(), 2.0 ** SCALE_BITS, plain)
    return _words(plain.dyn_array(), he_codec.POLY_MODULUS_DEGREE)


def _secret_ntt(key: HospitalKey) -> list[int]:
    return _words(key._secret.data().dyn_array(), he_codec.POLY_MODULUS_DEGREE)


def test_the_attack_recovers_the_key_from_a_leaky_decryption_but_nothing_from_what_hospitals_reveal(coordinator) -> None:
    key = HospitalKey.load(coordinator.nodes[0].key_file)
    q = _prime(key)
    secret = _secret_ntt(key)

    # the honest protocol: three DP evaluations, summed and revealed by a hospital
    run = "key-recovery"
    census = coordinator.census(run)
    chain = {1: coordinator.round(run, 1, census, {})}
    evaluations = [coordinator.contribution(coordinator.evaluate(node, run, 1, census, chain))
                   for node in coordinator.nodes]
    revealed = coordinator.values(coordinator.reveal(coordinator.nodes[0], run, 1, evaluations))

    # the coordinator can form the very ciphertext that was decrypted: the sum of the three
    (summed,) = key.sum([c.ciphertexts for c in evaluations], len(revealed))

    # a leaky hospital returning the raw decryption would hand over the key
    raw = seal.Plaintext()
    seal.Decryptor(key.context, key._secret).decrypt(summed, raw)
    leaked = recover_secret(summed, _words(raw.dyn_array(), he_codec.POLY_MODULUS_DEGREE), q)
    assert leaked == secret

    # what fedrisk reveals: flooded and rounded; the same algorithm recovers nothing
    guess = recover_secret(summed, encode_revealed(key, revealed), q)
    matching = sum(g == s for g, s in zip(guess, secret))
    assert matching <= 2, f"{matching} of {len(secret)} NTT coefficients of the key recovered"

    # asking again cannot average the flooding away: the same step gives the same values
    again = coordinator.values(coordinator.reveal(coordinator.nodes[1], run, 1, evaluations))
    assert np.array_equal(again, revealed)
