"""Chosen-ciphertext decryption: the coordinator picks what a hospital decrypts. It cannot.

Each test hands a hospital a doctored set of contributions through the real reveal handler and
checks that the hospital refuses (one line back, an audit entry at the node) or drops what is not
genuine, and never returns a decryption of anything but a verified sum of enough hospitals.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from federation import messages as M
from federation.contributions import SignedContribution
from federation.he_codec import HospitalKey, ciphertext_digest

from .conftest import audit_actions


@pytest.fixture()
def evaluated(coordinator):
    """One honest round and its three signed DP evaluations (nothing revealed yet)."""
    run = "chosen"
    census = coordinator.census(run)
    chain = {1: coordinator.round(run, 1, census, {})}
    evaluations = [coordinator.contribution(coordinator.evaluate(node, run, 1, census, chain))
                   for node in coordinator.nodes]
    return run, census, chain, evaluations


def _refused(coordinator, reply, *words: str) -> str:
    error = coordinator.error(reply)
    assert error is not None, "the hospital decrypted what it should have refused"
    assert "\n" not in error
    for word in words:
        assert word in error, error
    return error


def test_one_hospitals_own_reply_doubled_is_refused(coordinator, evaluated) -> None:
    run, _, _, evaluations = evaluated
    victim = evaluations[1]
    reply = coordinator.reveal(coordinator.nodes[0], run, 1, [victim, victim])
    _refused(coordinator, reply, "1 verified hospital", "at least 2")
    assert "decryption.dropped" in audit_actions(coordinator.nodes[0])


def test_a_lone_contribution_is_refused_under_the_policy_floor(coordinator, evaluated) -> None:
    run, _, _, evaluations = evaluated
    _refused(coordinator, coordinator.reveal(coordinator.nodes[2], run, 1, evaluations[:1]), "at least 2")


def test_unsigned_forged_and_relabelled_contributions_are_dropped(coordinator, evaluated) -> None:
    run, _, _, evaluations = evaluated
    good = evaluations[0]
    unsigned = dataclasses.replace(evaluations[1], signature=bytes(64))
    forger = Ed25519PrivateKey.generate()
    forged = SignedContribution(evaluations[2].header, evaluations[2].ciphertexts,
                                forger.sign(evaluations[2].header.canonical()))
    relabelled = dataclasses.replace(evaluations[1], header=dataclasses.replace(evaluations[1].header, hospital="hospital_02"))
    reply = coordinator.reveal(coordinator.nodes[0], run, 1, [good, unsigned, forged, relabelled])
    _refused(coordinator, reply, "1 verified hospital")


def test_a_crafted_ciphertext_under_a_genuine_header_is_refused(coordinator, evaluated) -> None:
    run, _, _, evaluations = evaluated
    key = HospitalKey.load(coordinator.nodes[0].key_file)
    crafted = key.encrypt(np.zeros(evaluations[1].header.length))
    swapped = dataclasses.replace(evaluations[1], ciphertexts=tuple(crafted))
    reply = coordinator.reveal(coordinator.nodes[0], run, 1, [evaluations[0], swapped])
    _refused(coordinator, reply, "1 verified hospital")
    # and a header re-signed by nobody cannot name the crafted digest
    assert ciphertext_digest(crafted) != evaluations[1].header.digest


def test_replayed_contributions_of_another_round_or_step_are_refused(coordinator, evaluated) -> None:
    run, census, chain, evaluations = evaluated
    # round 1's training updates presented as round 1's evaluation
    _refused(coordinator, coordinator.reveal(coordinator.nodes[0], run, 1, chain[1]), "0 verified")
    # the census asked to be revealed: never
    _refused(coordinator, coordinator.reveal(coordinator.nodes[0], run, 0, census, step="census", kind="census"),
             "only DP evaluations and cohort answers")
    # a round's updates asked to be revealed: never
    _refused(coordinator, coordinator.reveal(coordinator.nodes[0], run, 1, chain[1], step="train", kind="update"),
             "only DP evaluations and cohort answers")
    # the same evaluations under another run id
    _refused(coordinator, coordinator.reveal(coordinator.nodes[0], "other-run", 1, evaluations), "0 verified")


def test_a_second_different_sum_of_one_step_is_never_decrypted(coordinator, evaluated) -> None:
    run, _, _, evaluations = evaluated
    everyone = coordinator.values(coordinator.reveal(coordinator.nodes[0], run, 1, evaluations))
    # differencing: the same node asked for the sum without hospital_02
    reply = coordinator.reveal(coordinator.nodes[0], run, 1, evaluations[:2])
    _refused(coordinator, reply, "already decrypted", "another set")
    # the same set again gets the recorded answer, bit for bit
    assert np.array_equal(coordinator.values(coordinator.reveal(coordinator.nodes[0], run, 1, evaluations)), everyone)
    assert audit_actions(coordinator.nodes[0]).count("decryption") >= 1


def test_a_reveal_naming_another_length_gets_the_nodes_own_length(coordinator, evaluated) -> None:
    run, _, _, evaluations = evaluated
    values = coordinator.values(coordinator.reveal(coordinator.nodes[0], run, 1, evaluations,
                                                   **{"vector-length": 4096}))
    assert len(values) == evaluations[0].header.length
    assert values[-1] == pytest.approx(3 * 2.0 ** -7, abs=1e-4)  # three contributors, nothing else
    assert M.EVAL_UNIT > 0
