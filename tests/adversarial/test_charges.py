"""Fresh noise for free, charging races and the evaluation oracle, played against real nodes.

Every noisy output a node sends is charged once under one identity (purpose, run, round, start
model, run-config fingerprint, records used); the same slot under another identity is refused,
so the ledger's composition always covers every noisy output that left the node.
"""

from __future__ import annotations

import threading

import numpy as np

from federation.contributions import from_record
from federation import messages as M

from .conftest import audit_actions, charges


def _revoke_one(node, purpose: str, *, held_out: bool) -> None:
    """Withdraw the consent of one patient of the training (or held-out) split."""
    import pandas as pd

    from clients.node_state import test_split

    pseudonyms = node.pseudonym_key().pseudonymise(pd.read_parquet(node.data_file)["patient_id"].astype(str))
    chosen = pseudonyms[test_split(pseudonyms) == held_out].iloc[0]
    node.revocations().revoke(chosen, purpose)


def _outputs(replies) -> int:
    return sum(1 for r in replies if M.CONTRIBUTION in r.content.config_records)


def test_a_round_resent_with_a_learning_rate_changed_in_the_7th_digit_is_refused(coordinator) -> None:
    run = "fresh-noise"
    census = coordinator.census(run)
    node = coordinator.nodes[0]
    first = coordinator.train(node, run, 1, census, {})
    assert coordinator.error(first) is None
    tweaked = {**coordinator.config.to_user_config(), "learning-rate": coordinator.config.learning_rate * (1 + 1e-7)}
    for _ in range(4):
        again = coordinator.train(node, run, 1, census, {}, config=tweaked)
        assert "another run configuration" in (coordinator.error(again) or ""), coordinator.error(again)
    assert len([c for c in charges(node) if c.kind == "training"]) == 1


def test_the_same_round_retried_unchanged_repeats_its_output_and_is_not_charged_again(coordinator) -> None:
    run = "retry"
    census = coordinator.census(run)
    node = coordinator.nodes[1]
    first = coordinator.contribution(coordinator.train(node, run, 1, census, {}))
    second = coordinator.contribution(coordinator.train(node, run, 1, census, {}))
    assert coordinator.error(coordinator.train(node, run, 1, census, {})) is None
    key = __import__("federation.he_codec", fromlist=["HospitalKey"]).HospitalKey.load(node.key_file)
    a = key._decrypt_exact(key.parse(first.ciphertexts, first.header.length), first.header.length)
    b = key._decrypt_exact(key.parse(second.ciphertexts, second.header.length), second.header.length)
    assert np.allclose(a, b, atol=1e-9)  # same identity, same seed: nothing new released
    assert len([c for c in charges(node) if c.kind == "training"]) == 1


def test_a_round_resent_after_one_patient_revoked_is_refused(coordinator) -> None:
    run = "revoked"
    census = coordinator.census(run)
    node = coordinator.nodes[2]
    assert coordinator.error(coordinator.train(node, run, 1, census, {})) is None
    _revoke_one(node, coordinator.config.purpose, held_out=False)
    again = coordinator.train(node, run, 1, census, {})
    assert "already charged" in (coordinator.error(again) or "")
    assert len([c for c in charges(node) if c.kind == "training"]) == 1


def _race(coordinator, node, run: str, census, configs: list) -> list:
    barrier = threading.Barrier(len(configs))
    replies: list = [None] * len(configs)

    def attack(i: int) -> None:
        barrier.wait()
        replies[i] = coordinator.train(node, run, 1, census, {}, config=configs[i])

    threads = [threading.Thread(target=attack, args=(i,)) for i in range(len(configs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return replies


def test_eight_concurrent_trainings_of_one_round_are_charged_once_and_send_one_output(coordinator) -> None:
    run = "race"
    census = coordinator.census(run)
    node = coordinator.nodes[0]
    replies = _race(coordinator, node, run, census, [None] * 8)
    assert [coordinator.error(r) for r in replies] == [None] * 8
    outputs = {coordinator.contribution(r).ciphertexts for r in replies}
    assert len(outputs) == 1  # one identity, one seed, one (deterministic) ciphertext
    assert len([c for c in charges(node) if c.kind == "training"]) == 1


def test_eight_concurrent_trainings_under_other_configs_are_all_refused_with_a_typed_reason(coordinator) -> None:
    run = "race-configs"
    census = coordinator.census(run)
    node = coordinator.nodes[0]
    configs = [{**coordinator.config.to_user_config(), "learning-rate": 0.05 + (i + 1) * 1e-4} for i in range(8)]
    errors = [coordinator.error(r) for r in _race(coordinator, node, run, census, configs)]
    assert all(e is not None and "another run configuration" in e for e in errors), errors
    assert not any(word in e for e in errors for word in ("OperationalError", "IntegrityError", "is locked"))
    assert [c for c in charges(node) if c.kind == "training"] == []


def test_the_ledger_covers_every_noisy_output_that_left_the_node(coordinator) -> None:
    """A run's worth of honest and hostile traffic: every contribution that left carries a charge."""
    run = "cover"
    census = coordinator.census(run)
    node = coordinator.nodes[0]
    sent = []
    for config in (None, {**coordinator.config.to_user_config(), "clip-norm": 0.9}):
        sent.append(coordinator.train(node, run, 1, census, {}, config=config))
    chain = {1: [coordinator.contribution(sent[0]),
                 *[coordinator.contribution(coordinator.train(n, run, 1, census, {})) for n in coordinator.nodes[1:]]]}
    for _ in range(3):
        sent.append(coordinator.evaluate(node, run, 1, census, chain))
    from federation.he_codec import HospitalKey

    key = HospitalKey.load(node.key_file)
    outputs = set()
    for reply in sent:
        if M.CONTRIBUTION in reply.content.config_records:
            item = from_record(reply.content.config_records[M.CONTRIBUTION], "r")[0]
            exact = key._decrypt_exact(key.parse(item.ciphertexts, item.header.length), item.header.length)
            outputs.add((item.header.step, tuple(np.round(exact, 7))))
    ledger = charges(node)
    assert len({c.slot for c in ledger}) == len(ledger)
    assert len([c for c in ledger if c.kind == "training"]) == 1
    assert len([c for c in ledger if c.kind == "evaluation"]) == 1
    # two distinct noisy outputs left (one update; one evaluation, its repeats identical), two charges
    assert len(outputs) == len(ledger) == 2


def test_an_evaluation_repeated_after_a_revocation_is_refused_not_recomputed(coordinator) -> None:
    """The evaluation oracle: evaluate, revoke one patient, evaluate the same model again. The
    second evaluation would differ only by that patient (and fresh noise); it is refused."""
    run = "oracle"
    census = coordinator.census(run)
    chain = {1: coordinator.round(run, 1, census, {})}
    node = coordinator.nodes[0]
    first = coordinator.evaluate(node, run, 1, census, chain)
    assert coordinator.error(first) is None
    _revoke_one(node, coordinator.config.purpose, held_out=True)
    second = coordinator.evaluate(node, run, 1, census, chain)
    assert "already charged" in (coordinator.error(second) or "")
    assert audit_actions(node).count("round.evaluate") == 1


def test_rounds_outside_the_run_are_refused_and_charge_nothing(coordinator) -> None:
    run = "rounds"
    census = coordinator.census(run)
    node = coordinator.nodes[0]
    for server_round in (0, -3, coordinator.config.rounds + 1, 2 ** 40):
        error = coordinator.error(coordinator.train(node, run, server_round, census, {}))
        assert error is not None and "outside the run" in error, error
    assert charges(node) == []
