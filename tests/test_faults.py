"""Faults a real federation meets, short of starting processes (tests/test_deployment.py does
that): bad ciphertexts, hospitals missing from a round, a coordinator that has to resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from clients import faults
from clients.node import HospitalNode
from clients.node_state import NodeState
from engines.provisioning import provision_nodes
from engines.simulation import simulate
from federation.config import RunConfig
from federation.errors import ConfigError, ProtocolError
from federation.he_codec import MAX_CIPHERTEXT_BYTES, HospitalKey, ReplyRejected, ServerContext
from privacy.audit import REPLY_REJECTED, RUN_RESUME, AuditLog
from privacy.ledger import BudgetLedger
from server.checkpoint import CHECKPOINT_FILE, Checkpoint

PURPOSE = "credit-risk-research"


@pytest.fixture()
def nodes(federation_data, keys, tmp_path) -> Path:
    provision_nodes(federation_data.files[0].parent, keys.hospital_context, tmp_path / "nodes",
                    purposes={PURPOSE: (10.0, 1e-5)})
    return tmp_path / "nodes"


def _config(keys, nodes: Path, run_dir: Path, **changes) -> RunConfig:
    return RunConfig(nodes_dir=str(nodes), keys_dir=str(keys.server_context.parent), run_dir=str(run_dir),
                     num_hospitals=3, **changes)


@pytest.mark.parametrize("kind, reason", [
    ("truncated", "not a CKKS ciphertext"),
    ("foreign-params", "byte limit|not a CKKS ciphertext"),
    ("oversized", f"over the {MAX_CIPHERTEXT_BYTES:,}-byte limit"),
])
def test_the_server_rejects_malformed_ciphertexts_with_a_reason(keys, kind, reason) -> None:
    key, server = HospitalKey.load(keys.hospital_context), ServerContext.load(keys.server_context.parent)
    update = np.linspace(-0.5, 0.5, 5000)
    good = key.encrypt(update)
    assert len(server.parse(good, 5000)) == 2
    bad, _ = faults.corrupt(kind, good, update)
    with pytest.raises(ReplyRejected, match=reason):
        server.parse(bad, 5000)
    with pytest.raises(ReplyRejected, match="3 ciphertexts where 2"):
        server.parse(good + good[:1], 5000)


def test_a_fault_spec_is_checked() -> None:
    assert faults.planned_faults("hospital_01:train@3:truncated")[0].server_round == 3
    with pytest.raises(ConfigError, match="FEDRISK_INJECT_FAULTS"):
        faults.planned_faults("hospital_01:train:truncated")
    with pytest.raises(ConfigError, match="not one of"):
        faults.planned_faults("hospital_01:train@3:melted")


def test_a_round_without_one_hospital_is_the_weighted_mean_of_the_others(keys, nodes) -> None:
    """Counts travel encrypted with the updates: a hospital adds what arrived, nothing else."""
    config = _config(keys, nodes, nodes.parent / "run", rounds=1)
    hospitals = [HospitalNode(config, NodeState.load(d)) for d in sorted(nodes.iterdir())]
    run = "dropout"
    census = [node.census(run, node.check_rollback([])) for node in hospitals]
    start = hospitals[0].global_weights({}, run, 0)
    updates = [node.train(1, census, {}, run, node.check_rollback([])).contribution for node in hospitals]
    present = [0, 2]  # hospital_01 dropped out
    replayed = hospitals[0].global_weights({1: [updates[i] for i in present]}, run, 1)

    local = []
    n_hat = hospitals[0].census_total(census, run)
    for i in present:
        key = hospitals[i].key
        values = key._decrypt_exact(key.parse(updates[i].ciphertexts, hospitals[i].length + 2), hospitals[i].length + 2)
        local.append(start + values[:-2] / (hospitals[i].data.n_train / n_hat))
    sizes = np.array([hospitals[i].data.n_train for i in present], dtype=float)
    expected = (sizes[:, None] * np.array(local)).sum(axis=0) / sizes.sum()
    assert np.max(np.abs(replayed - expected)) < 1e-5  # within the decryption's flooding


def test_server_momentum_is_replayed_from_the_same_aggregates_at_every_hospital(keys, nodes) -> None:
    """FedAvgM is post-processing of the decrypted aggregates: with momentum beta, round 2's global
    model is w1 + eta * (beta * step1 + step2), where step r is what plain FedAvg would add, and
    every hospital replays the same model from the same chain."""
    beta, eta = 0.5, 0.8
    config = _config(keys, nodes, nodes.parent / "run", rounds=2, server_momentum=beta, server_learning_rate=eta)
    plain = _config(keys, nodes, nodes.parent / "run", rounds=2)
    hospitals = [HospitalNode(config, NodeState.load(d)) for d in sorted(nodes.iterdir())]
    run = "momentum"
    census = [node.census(run, node.check_rollback([])) for node in hospitals]
    chain = {1: [node.train(1, census, {}, run, node.check_rollback([])).contribution for node in hospitals]}
    chain[2] = [node.train(2, census, chain, run, node.check_rollback([])).contribution for node in hospitals]
    start = hospitals[0].global_weights({}, run, 0)
    replayer = HospitalNode(plain, NodeState.load(sorted(nodes.iterdir())[0]))  # same decryptions, no momentum
    step1 = replayer.global_weights(chain, run, 1) - start
    step2 = replayer.global_weights(chain, run, 2) - replayer.global_weights(chain, run, 1)
    expected = start + eta * step1 + eta * (beta * step1 + step2)
    replayed = hospitals[0].global_weights(chain, run, 2)
    assert np.max(np.abs(replayed - expected)) < 1e-9 and np.max(np.abs(step2)) > 1e-4
    others = [h.global_weights(chain, run, 2) for h in hospitals[1:]]
    assert all(np.max(np.abs(o - replayed)) < 1e-5 for o in others)  # each hospital floods its own decryption
    with pytest.raises(ConfigError, match="server-momentum"):
        plain.replace(server_momentum=1.0)


def test_retraining_a_round_from_the_same_model_repeats_it_and_is_charged_once(keys, nodes) -> None:
    config = _config(keys, nodes, nodes.parent / "run", rounds=2)
    states = [NodeState.load(d) for d in sorted(nodes.iterdir())]
    hospitals = [HospitalNode(config, state) for state in states]
    node, state = hospitals[0], states[0]
    census = [h.census("retry", h.check_rollback([])) for h in hospitals]

    def exact(contribution) -> np.ndarray:
        return node.key._decrypt_exact(node.key.parse(contribution.ciphertexts, node.length + 2), node.length + 2)

    first = exact(node.train(1, census, {}, "retry", "").contribution)
    again = exact(node.train(1, census, {}, "retry", "").contribution)
    assert np.max(np.abs(first - again)) < 1e-6  # same samples, same noise: nothing new released
    with BudgetLedger(state.ledger_path) as ledger:
        assert len([c for c in ledger.history(PURPOSE) if c.run_id == "retry"]) == 1
    other = config.replace(learning_rate=config.learning_rate * 1.5)
    with pytest.raises(ProtocolError, match="another run configuration"):
        HospitalNode(other, state).train(1, census, {}, "retry", "")


def test_a_checkpoint_is_only_resumed_by_the_same_run(keys, nodes, tmp_path) -> None:
    config = RunConfig(run_dir=str(tmp_path), rounds=3)
    hospitals = [HospitalNode(_config(keys, nodes, tmp_path, rounds=3), NodeState.load(d)) for d in sorted(nodes.iterdir())]
    census = [h.census("r1", h.check_rollback([])) for h in hospitals]
    Checkpoint(run_id="r1", fingerprint=config.fingerprint(), completed_round=2, census=census,
               chain={1: census[:2], 2: census[1:]}, anchors=[("h", b"s")], rounds={1: {"auc": 0.7}, 2: {"auc": 0.75}},
               contributors={1: ["a", "b"], 2: ["a"]}).save(tmp_path)
    loaded = Checkpoint.load(tmp_path, config.replace(round_timeout=5.0, min_replies=2))
    assert loaded.completed_round == 2 and loaded.chain == {1: census[:2], 2: census[1:]}
    assert loaded.census == census and loaded.rounds[2] == {"auc": 0.75} and loaded.anchors == [("h", b"s")]
    with pytest.raises(ConfigError, match="different configuration"):
        Checkpoint.load(tmp_path, config.replace(rounds=4))
    with pytest.raises(ConfigError, match="not run-id"):
        Checkpoint.load(tmp_path, config.replace(run_id="r2"))
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="not a readable fedrisk checkpoint"):
        Checkpoint.load(tmp_path, config)


@pytest.mark.slow
def test_bad_replies_are_left_out_and_a_failed_run_resumes_from_its_checkpoint(keys, nodes, tmp_path,
                                                                               monkeypatch) -> None:
    """In Flower's simulation engine: round 1 goes on without a reply made under another key;
    round 2 loses two of three replies (oversized, truncated) and the run stops, resumable;
    resubmitted without the faults, it resumes at round 2 and charges nobody twice."""
    run_dir = tmp_path / "run"
    config = _config(keys, nodes, run_dir, rounds=3, min_replies=2, run_id="resume-me")
    monkeypatch.setenv(faults.ENV, "hospital_01:train@1:foreign-key,hospital_02:train@2:oversized,"
                                   "hospital_01:train@2:truncated")
    with pytest.raises(ProtocolError, match="training round 2: 1 valid replies, 2 needed"):
        simulate(config)
    assert (run_dir / CHECKPOINT_FILE).is_file() and not (run_dir / "release").exists()

    monkeypatch.delenv(faults.ENV)
    result = simulate(config)
    assert result.contributors == {1: ["hospital_00", "hospital_02"], 2: ["hospital_00", "hospital_01", "hospital_02"],
                                   3: ["hospital_00", "hospital_01", "hospital_02"]}
    assert "not the federation's key" in {(r["round"], r["hospital"]): r["reason"]
                                           for r in result.rejections}[(1, "hospital_01")]
    assert not (run_dir / CHECKPOINT_FILE).exists()

    log = AuditLog(run_dir / "server_audit.sqlite", role="test", identity="test")
    assert log.verify().ok
    logged = {(e.details["round"], e.details["hospital"]): e.details["reason"]
              for e in log.entries() if e.action == REPLY_REJECTED}
    assert "byte limit" in logged[(2, "hospital_02")]  # the failed round's rejections are in the audit log
    assert "not a CKKS ciphertext" in logged[(2, "hospital_01")]
    actions = [e.action for e in log.entries()]
    assert actions.count(RUN_RESUME) == 1 and actions.count(REPLY_REJECTED) >= 3
    for node_dir in sorted(nodes.iterdir()):
        with BudgetLedger(node_dir / "ledger.sqlite") as ledger:
            keys_charged = [c.slot for c in ledger.history(PURPOSE) if c.run_id == "resume-me" and c.kind == "training"]
        assert sorted(keys_charged) == ["round-1", "round-2", "round-3"], (node_dir.name, keys_charged)
    summary = json.loads((run_dir / "release" / "run_summary.json").read_text())
    assert sorted(summary["rounds"]) == ["1", "2", "3"]
    shutil.rmtree(run_dir / "release")


def test_a_step_with_fewer_messages_in_flight_than_hospitals_reaches_every_hospital(keys, nodes, monkeypatch) -> None:
    """The simulation keeps only a few messages unanswered at a time (Flower's engine scans every
    stored message on each poll); every hospital is still asked, a bad reply is still named, and
    the round aggregates the others."""
    import engines.simulation as simulation

    monkeypatch.setattr(simulation, "IN_FLIGHT_PER_WORKER", 1)  # 2 workers: 2 in flight for 3 hospitals
    monkeypatch.setenv(faults.ENV, "hospital_01:train@1:truncated")
    result = simulate(_config(keys, nodes, nodes.parent / "run", rounds=1, min_replies=2))
    assert result.contributors[1] == ["hospital_00", "hospital_02"]
    assert [(r["hospital"], r["step"]) for r in result.rejections] == [("hospital_01", "training")]
