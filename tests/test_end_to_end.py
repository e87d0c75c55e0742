"""A real federated run in Flower's simulation engine: 3 hospitals, 3 rounds, DP and HE on.

One run is shared by the tests below; each asserts something a user relies on.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest

import server.strategy as strategy_module
from engines.simulation import simulate
from federation import messages as M
from federation import round_evaluation
from federation.config import RunConfig
from federation.contributions import from_record
from federation.he_codec import SERVER_CONTEXT_FILE, ServerContext
from federation.model import weights_digest
from privacy.accounting import ACCOUNTANT, RDP_ACCOUNTANT, calibrate_noise, epsilon_for
from privacy.ledger import GaussianMechanism, compose_epsilon
from tests.test_accounting import _independent_epsilon

pytestmark = pytest.mark.slow

ALLOWED_REPLY_KEYS = {M.HOSPITAL, M.SPEND}
ALLOWED_CONTRIBUTION_KEYS = {"headers", "signatures", "ciphertexts-0"}
ALLOWED_SPEND_KEYS = {"format", "accountant", "run_epsilon", "ledger_epsilon", "training", "evaluation"}
ALLOWED_MECHANISM_KEYS = {"mechanism", "sample_rate", "noise_multiplier", "steps", "clip_norm", "delta", "epsilon",
                          "accountant"}


def _spend_numbers(reply) -> list[float]:
    """Every number the privacy spend of a reply carries, checked to be only public accounting fields."""
    spend = json.loads(reply.content.config_records[M.REPLY][M.SPEND])
    assert set(spend) <= ALLOWED_SPEND_KEYS and spend["accountant"] == ACCOUNTANT  # a public constant
    numbers = [spend["run_epsilon"], spend["ledger_epsilon"]]
    for part in ("training", "evaluation"):
        if spend[part] is not None:
            assert set(spend[part]) <= ALLOWED_MECHANISM_KEYS
            numbers += [v for v in spend[part].values() if isinstance(v, (int, float))]
    return numbers


@pytest.fixture(scope="module")
def run(federation_data, keys, tmp_path_factory):
    """Run once, recording every train reply the server receives."""
    captured: list = []
    original = strategy_module.HEFedAvg.aggregate_train

    def recording(self, server_round, replies):
        replies = list(replies)
        captured.extend(replies)
        return original(self, server_round, replies)

    strategy_module.HEFedAvg.aggregate_train = recording
    try:
        config = RunConfig(data_dir=str(federation_data.files[0].parent), keys_dir=str(keys.server_context.parent),
                           run_dir=str(tmp_path_factory.mktemp("run")), num_hospitals=3, rounds=3,
                           learning_rate=0.01)
        result = simulate(config)
    finally:
        strategy_module.HEFedAvg.aggregate_train = original
    return config, result, captured


def test_federated_model_clearly_beats_a_constant_predictor_and_its_dp_auc_says_so(run) -> None:
    from clients.evaluation import risk_metrics
    from clients.node_state import NodeState
    from federation.model import load_model, predict_proba

    config, result, _ = run
    final = result.rounds[config.rounds]
    assert final["hospitals"] == 3
    held_out = [NodeState.load(d).load_records(config.purpose) for d in sorted(Path(config.run_dir, "nodes").iterdir())]
    x = np.concatenate([h.test_x for h in held_out])
    y = np.concatenate([h.test_y for h in held_out])
    exact = risk_metrics(y, predict_proba(load_model(config.model, result.weights, config.input_size), x))["auc"]
    assert exact > 0.66, f"released model's AUC {exact:.3f} on the held-out records; a constant predictor scores 0.5"
    # the DP evaluation's AUC (all the server ever sees) agrees with the exact one within its noise;
    # when the noise leaves a class total at or below zero it is undefined (NaN), never guessed
    assert any(np.isfinite(m["auc"]) for m in result.rounds.values())
    if np.isfinite(final["auc"]):
        assert abs(final["auc"] - exact) < 4 * final["auc_se"] + 0.02, (final["auc"], final["auc_se"], exact)


def test_train_replies_carry_ciphertext_only(run, keys) -> None:
    config, _, replies = run
    assert len(replies) == 3 * config.rounds
    server = ServerContext.load(keys.server_context.parent)
    assert (keys.server_context.parent / SERVER_CONTEXT_FILE).read_bytes() == keys.server_context.read_bytes()
    for reply in replies:
        content = reply.content
        assert not content.array_records, "no plaintext arrays may travel in a train reply"
        record = content.config_records[M.REPLY]
        assert set(record.keys()) <= ALLOWED_REPLY_KEYS
        assert set(content.config_records[M.CONTRIBUTION].keys()) <= ALLOWED_CONTRIBUTION_KEYS
        (contribution,) = from_record(content.config_records[M.CONTRIBUTION], "reply")
        assert contribution.header.step == "train" and contribution.header.hospital == record[M.HOSPITAL]
        server.parse(contribution.ciphertexts, contribution.header.length)  # ciphertexts, of the federation's shape
        assert not content.metric_records
        assert _spend_numbers(reply)


def test_no_record_count_travels_in_plaintext(run, federation_data) -> None:
    _, _, replies = run
    counts = set(federation_data.rows_by_hospital)
    for reply in replies:
        numbers = _spend_numbers(reply)
        assert not any(float(v).is_integer() and int(v) in counts for v in numbers)
        assert all(not isinstance(v, (int, float)) for v in reply.content.config_records[M.REPLY].values()
                   if not isinstance(v, (str, list)))


def test_each_epsilon_is_within_target_and_recomputes_from_what_ran(run) -> None:
    config, result, _ = run
    hospitals = result.privacy["hospitals"]
    assert len(hospitals) == 3
    z = round_evaluation.evaluation_noise_multiplier(config.evaluation_budget, config.delta, config.rounds)
    sigma = calibrate_noise(target_epsilon=config.target_epsilon, delta=config.delta,
                            sample_rate=config.sample_rate, steps=config.planned_steps,
                            extra=((1.0, z, config.rounds),))
    for spend in hospitals.values():
        assert spend["evaluation"]["count"] == config.rounds
        assert spend["evaluation"]["noise_multiplier"] == pytest.approx(z)
        run_epsilon = compose_epsilon([GaussianMechanism(spend["sample_rate"], spend["noise_multiplier"], spend["steps"]),
                                       GaussianMechanism.gaussian_release(noise_multiplier=z, count=config.rounds)],
                                      config.delta)
        assert run_epsilon == pytest.approx(spend["run_epsilon"], rel=1e-6)
        assert run_epsilon <= config.target_epsilon
        assert spend["ledger_epsilon"] >= spend["run_epsilon"] - 1e-9
        assert spend["steps"] == config.rounds * config.local_epochs * round(1 / config.sample_rate)
        assert spend["noise_multiplier"] == pytest.approx(sigma)
        recomputed = epsilon_for(sample_rate=spend["sample_rate"], noise_multiplier=spend["noise_multiplier"],
                                 steps=spend["steps"], delta=spend["delta"])
        assert recomputed == pytest.approx(spend["epsilon"], rel=1e-9)
        assert recomputed <= config.target_epsilon
        independent = _independent_epsilon(spend["sample_rate"], spend["noise_multiplier"],
                                           spend["steps"], spend["delta"])
        assert spend["epsilon"] >= 0.98 * independent  # never below Opacus's PRV accountant
        assert spend["accountant"] == ACCOUNTANT and spend["epsilon"] <= epsilon_for(
            sample_rate=spend["sample_rate"], noise_multiplier=spend["noise_multiplier"], steps=spend["steps"],
            delta=spend["delta"], accountant=RDP_ACCOUNTANT)  # nor above RDP


def test_mlflow_run_has_parameters_metrics_and_release(run) -> None:
    config, result, _ = run
    client = mlflow.tracking.MlflowClient(tracking_uri=config.mlflow_uri)
    tracked = client.get_run(result.run_id)
    assert tracked.info.status == "FINISHED"
    params = tracked.data.params
    for key in ("target-epsilon", "delta", "clip-norm", "sample-rate", "noise-multiplier", "rounds",
                "local-epochs", "he.poly_modulus_degree", "he.coeff_mod_bit_sizes"):
        assert key in params, key
    history = client.get_metric_history(result.run_id, "round-seconds")
    assert [m.step for m in history] == list(range(1, config.rounds + 1))
    # the DP AUC is logged for each round whose noised histogram defines it (never a guessed value)
    assert {m.step for m in client.get_metric_history(result.run_id, "auc")} <= set(range(1, config.rounds + 1))
    assert {f"epsilon.{h}" for h in result.privacy["hospitals"]} <= set(tracked.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "release")}
    assert {"release/model.npz", "release/privacy_report.json"} <= artifacts
    assert tracked.data.tags["release.sha256"] == result.digest


def test_release_artifact_matches_its_hash(run) -> None:
    _, result, _ = run
    release = Path(result.release_dir)
    weights = np.load(release / "model.npz")["weights"]
    assert weights_digest(weights) == result.digest == (release / "model.sha256").read_text().strip()
    report = json.loads((release / "privacy_report.json").read_text())
    assert report["epsilon_max"] == max(h["run_epsilon"] for h in report["hospitals"].values())


def test_server_side_files_hold_no_identifiers(run, federation_data) -> None:
    import pandas as pd

    config, _, _ = run
    identities = pd.read_parquet(federation_data.files[0], columns=["full_name", "national_id", "phone"]).head(50)
    blobs = b"".join(p.read_bytes() for p in Path(config.run_dir).rglob("*") if p.is_file())
    for value in identities.to_numpy().ravel():
        assert str(value).encode() not in blobs


def test_privacy_verify_recomputes_the_report_and_names_a_tampered_epsilon(run, tmp_path, capsys) -> None:
    from cli.main import main

    _, result, _ = run
    report = Path(result.release_dir) / "privacy_report.json"
    assert main(["privacy", "verify", str(report)]) == 0
    out = capsys.readouterr().out
    assert "run_epsilon" in out and "(pld)" in out and "independent prv" in out
    assert json.loads(report.read_text())["accountant"] == ACCOUNTANT
    tampered = json.loads(report.read_text())
    first = sorted(tampered["hospitals"])[0]
    tampered["hospitals"][first]["run_epsilon"] *= 0.5
    (tmp_path / "tampered.json").write_text(json.dumps(tampered))
    assert main(["privacy", "verify", str(tmp_path / "tampered.json")]) == 2
    assert "differs from its recomputation" in capsys.readouterr().err


def test_a_reply_with_a_malformed_spend_is_left_out_naming_the_field(run, keys) -> None:
    """A curious hospital that misreports its spend (here: no noise) loses its reply, not the round."""
    from flwr.app import ConfigRecord

    from server.strategy import ReplyChecker

    _, _, replies = run
    first_round = [r for r in replies if from_record(r.content.config_records[M.CONTRIBUTION], "r")[0].header.round == 1]
    assert len(first_round) == 3
    run_id = from_record(first_round[0].content.config_records[M.CONTRIBUTION], "r")[0].header.run
    liar = first_round[1]
    honest_record = liar.content.config_records[M.REPLY]
    spend = json.loads(honest_record[M.SPEND])
    spend["training"]["noise_multiplier"] = 0.0
    liar.content.config_records[M.REPLY] = ConfigRecord({M.HOSPITAL: honest_record[M.HOSPITAL],
                                                         M.SPEND: json.dumps(spend)})
    try:
        checker = ReplyChecker(ServerContext.load(keys.server_context.parent), run_id, min_replies=2)
        spends: dict = {}
        length = from_record(first_round[0].content.config_records[M.CONTRIBUTION], "r")[0].header.length
        accepted = checker.accept(1, first_round, "train", "update", length, "training", spends)
    finally:
        liar.content.config_records[M.REPLY] = honest_record
    liar_name = str(honest_record[M.HOSPITAL])
    assert sorted(c.header.hospital for c in accepted) == sorted(spends) and liar_name not in spends
    (rejection,) = checker.rejections
    assert rejection.hospital == liar_name and "noise_multiplier" in rejection.reason


def test_a_message_to_a_hospital_is_as_large_in_the_last_round_as_in_the_first(run) -> None:
    """Each hospital replays the rounds it verified from its own decryption records, so the server
    sends it only what is new: the chain no longer rides along with every message."""
    from server.tracking import ROUND_BYTES_DOWN

    config, result, _ = run
    down = [result.rounds[r][ROUND_BYTES_DOWN] for r in range(1, config.rounds + 1)]
    assert down[0] > 0 and down == [down[0]] * config.rounds, down
