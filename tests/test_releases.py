"""The release registry on a real finished training run: certificates from the run's logged privacy
report, model cards from its MLflow metrics, refusals, withdrawal, the audit trail and the CLI;
and the DP evaluation (calibration, AUC, gaps) against a table whose truth is known.

One small simulated run (2 hospitals, 1 round, logistic regression) is trained once for the module.
The DP evaluation tables are made by `server.analytics.estimate` for a real `risk_score` histogram
query: the exact per-bin counts of a synthetic score/label sample, plus Gaussian noise of exactly
the standard deviation `estimate` reports as `se` (what the hospitals' noise would give).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from experiments.simulation import simulate
from experiments.synthetic import synthesize
from federation import features as fx
from federation.cli import EXIT_USER_ERROR, main
from federation.config import RunConfig
from federation.he_codec import KeyBundlePaths
from federation.model import weights_digest
from federation.query import CohortQuery
from privacy.audit import AuditLog
from server.analytics import estimate
from server.certificates import (
    FEATURE_GROUPS,
    NOT_EVALUATED,
    ModelCard,
    PrivacyCertificate,
)
from server.dp_evaluation import RISK_SCORE_BINS, DPEvaluation, evaluation_from_tables
from server.releases import (
    RELEASE_AUDIT_FILE,
    STATUS_WITHDRAWN,
    ReleaseError,
    ReleaseRefused,
    ReleaseRegistry,
)

APPROVER = "Dana Risk"
EDGES = np.asarray(RISK_SCORE_BINS)


class TrainedRun:
    """The module's finished run: where its store is, its MLflow id, and what it logged."""

    def __init__(self, run_dir: Path, mlflow_run_id: str, digest: str) -> None:
        self.run_dir, self.run_id, self.digest = run_dir, mlflow_run_id, digest
        self.tracking_uri = f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
        self.report = json.loads((run_dir / "release" / "privacy_report.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, keys: KeyBundlePaths) -> TrainedRun:
    base = tmp_path_factory.mktemp("release-run")
    synthesize(2, 2000, base / "data", seed=3)
    run_dir = base / "run"
    result = simulate(RunConfig(data_dir=str(base / "data"), keys_dir=str(keys.server_context.parent),
                                run_dir=str(run_dir), num_hospitals=2, rounds=1, model="logreg", sample_rate=0.05))
    return TrainedRun(run_dir, result.run_id, result.digest)


@pytest.fixture(scope="module")
def released(trained: TrainedRun, tmp_path_factory: pytest.TempPathFactory) -> tuple[ReleaseRegistry, object]:
    registry = ReleaseRegistry(trained.tracking_uri, tmp_path_factory.mktemp("registry"))
    return registry, registry.create(trained.run_id, APPROVER, cutoff="2025-06-30")


def _metric(trained: TrainedRun, key: str) -> float:
    history = mlflow.tracking.MlflowClient(trained.tracking_uri).get_metric_history(trained.run_id, key)
    return max(history, key=lambda m: m.step).value


def test_certificate_is_the_runs_privacy_report(trained: TrainedRun, released) -> None:
    _, release = released
    cert, report = release.certificate, trained.report
    assert release.release_id == "r1" and release.status == "active" and release.sha256 == trained.digest
    assert cert.model_sha256 == trained.digest and cert.mlflow_run_id == trained.run_id
    assert cert.hospitals == len(report["hospitals"]) == 2
    assert cert.epsilon_max == report["epsilon_max"] and cert.delta == report["delta"]
    assert cert.accountant == report["accountant"] and cert.he_parameters == report["he_parameters"]
    assert cert.purpose == report["purpose"] and cert.data_cutoff == "2025-06-30"
    for name, logged in report["hospitals"].items():
        spend = cert.per_hospital[name]
        for key in ("epsilon", "delta", "mechanism", "noise_multiplier", "sample_rate", "steps", "clip_norm"):
            assert getattr(spend, key) == logged[key], (name, key)
    assert cert.records is None  # the coordinator never learns a record count
    assert PrivacyCertificate.from_json(cert.to_json()) == cert


def test_model_card_carries_the_runs_federated_metrics(trained: TrainedRun, released) -> None:
    _, release = released
    card = release.card
    assert card.federated_auc == _metric(trained, "auc") and card.federated_brier == _metric(trained, "brier")
    assert card.calibration == NOT_EVALUATED and card.fairness == NOT_EVALUATED
    assert card.model_kind == "logreg" and card.n_features == len(fx.FEATURE_NAMES)
    assert sum((tuple(group["inputs"]) for group in card.features), ()) == fx.FEATURE_NAMES
    assert [group["group"] for group in card.features] == list(FEATURE_GROUPS)
    assert ModelCard.from_json(card.to_json()) == card


def test_registry_lists_it_with_verified_model_files(trained: TrainedRun, released) -> None:
    registry, release = released
    assert [r.release_id for r in registry.list()] == ["r1"]
    assert registry.get("r1") == release
    with np.load(release.model_dir / "model.npz") as npz:
        assert weights_digest(npz["weights"]) == trained.digest
    assert json.loads((release.model_dir / "release.json").read_text())["status"] == "active"
    shutil.rmtree(release.model_dir)  # a lost local copy is downloaded again from the run's artifacts
    assert registry.get("r1").model_dir.joinpath("model.npz").is_file()
    entries = AuditLog(registry.registry_dir / RELEASE_AUDIT_FILE, role="auditor", identity="test").entries()
    create = [e for e in entries if e.action == "release.create"]
    assert len(create) == 1 and create[0].details == {
        "release": "r1", "run": trained.run_id, "sha256": trained.digest, "approver": APPROVER,
        "cutoff": "2025-06-30", "dp-evaluated": False}


def test_a_run_is_released_once(trained: TrainedRun, released) -> None:
    registry, _ = released
    with pytest.raises(ReleaseRefused, match="already released as r1") as refused:
        registry.create(trained.run_id, APPROVER)
    assert "\n" not in str(refused.value)
    assert [r.release_id for r in registry.list()] == ["r1"]


def _fake_run(trained: TrainedRun, status: str, tamper: str | None) -> str:
    """A run in the same store: FAILED, FINISHED without artifacts, or with tampered artifacts."""
    client = mlflow.tracking.MlflowClient(trained.tracking_uri)
    run = client.create_run(client.get_experiment_by_name("fedrisk").experiment_id)
    if tamper is not None:
        files = trained.run_dir / f"tampered-{run.info.run_id}"
        shutil.copytree(trained.run_dir / "release", files)
        if tamper == "digest":
            (files / "model.sha256").write_text("0" * 64 + "\n")
        else:
            report = json.loads((files / "privacy_report.json").read_text())
            report["hospitals"]["hospital_00"]["epsilon"] /= 2  # claims half the spend
            (files / "privacy_report.json").write_text(json.dumps(report))
        client.log_artifacts(run.info.run_id, str(files), artifact_path="release")
    client.set_terminated(run.info.run_id, status=status)
    return run.info.run_id


@pytest.mark.parametrize(("status", "tamper", "reason"), [
    ("FAILED", None, "is FAILED, not FINISHED"),
    ("FINISHED", None, "has no release artifacts"),
    ("FINISHED", "digest", "model.sha256 does not match the weights"),
    ("FINISHED", "epsilon", "does not recompute"),
])
def test_a_run_that_cannot_be_trusted_is_refused(trained: TrainedRun, released, status, tamper, reason) -> None:
    registry, _ = released
    with pytest.raises(ReleaseRefused, match=reason) as refused:
        registry.create(_fake_run(trained, status, tamper), APPROVER)
    assert "\n" not in str(refused.value)
    assert [r.release_id for r in registry.list()] == ["r1"]


def test_an_unknown_run_is_refused_in_one_line(released) -> None:
    registry, _ = released
    with pytest.raises(ReleaseRefused, match="is not in the tracking store") as refused:
        registry.create("feedface" * 4, APPROVER)
    assert "\n" not in str(refused.value)
    refusals = [e for e in registry.audit.entries() if e.action == "refusal"]
    assert refusals and "is not in the tracking store" in refusals[-1].details["reason"]


def test_withdraw_is_immediate_and_audited(trained: TrainedRun, tmp_path: Path) -> None:
    registry = ReleaseRegistry(trained.tracking_uri, tmp_path / "registry")
    release = registry.create(trained.run_id, APPROVER)
    withdrawn = registry.withdraw(release.release_id, "Sam Audit", "calibration drift in the 80-89 band")
    assert withdrawn.status == STATUS_WITHDRAWN == registry.get(release.release_id).status
    assert ReleaseRegistry("", tmp_path / "registry").get(release.release_id).status == STATUS_WITHDRAWN
    assert json.loads((release.model_dir / "release.json").read_text())["status"] == STATUS_WITHDRAWN
    with pytest.raises(ReleaseError, match="already withdrawn"):
        registry.withdraw(release.release_id, "Sam Audit", "again")
    with pytest.raises(ReleaseRefused, match="already released"):  # a withdrawn run cannot come back
        registry.create(trained.run_id, APPROVER)
    log = AuditLog(tmp_path / "registry" / RELEASE_AUDIT_FILE, role="auditor", identity="test")
    entries = log.entries()
    assert [e.action for e in entries] == ["release.create", "release.withdraw", "refusal"]
    assert entries[1].details["by"] == "Sam Audit" and entries[1].details["release"] == release.release_id
    assert log.verify().ok


def test_cli(trained: TrainedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = str(tmp_path / "registry")
    create = ["release", "create", trained.run_id, "--run-dir", str(trained.run_dir), "--registry", registry,
              "--approved-by", APPROVER, "--cutoff", "2025-06-30"]
    assert main(create) == 0
    assert "released r1 (active)" in capsys.readouterr().out
    assert main(create) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("fedrisk: error: run ") and "already released" in err and err.count("\n") == 1
    assert main(["release", "list", "--registry", registry]) == 0
    assert capsys.readouterr().out.startswith("r1    active")
    assert main(["release", "show", "r1", "--registry", registry]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["certificate"]["epsilon_max"] == trained.report["epsilon_max"]
    assert shown["model_card"]["calibration"] == NOT_EVALUATED
    assert main(["release", "show", "r7", "--registry", registry]) == EXIT_USER_ERROR
    assert "no release r7" in capsys.readouterr().err
    assert main(["release", "withdraw", "r1", "--reason", "superseded", "--by", "Sam", "--registry", registry]) == 0
    assert capsys.readouterr().out.startswith("withdrew r1")
    assert main(["release", "list", "--json", "--registry", registry]) == 0
    assert json.loads(capsys.readouterr().out)[0]["status"] == STATUS_WITHDRAWN
    assert main(["release", "create", trained.run_id, "--run-dir", str(tmp_path / "nowhere"),
                 "--registry", registry]) == EXIT_USER_ERROR
    assert "no MLflow store at" in capsys.readouterr().err
    assert main(["release", "create", trained.run_id, "--run-dir", str(trained.run_dir), "--registry", registry,
                 "--cutoff", "2999-01-01"]) == EXIT_USER_ERROR
    assert "after the run started" in capsys.readouterr().err


# --- DP evaluation ------------------------------------------------------------------------------

def _sample(rng: np.random.Generator, n: int, separation: float, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Scores and 0/1 labels; `separation` sets the AUC, `shift` miscalibrates the scores."""
    labels = rng.random(n) < 0.2
    logits = -1.8 + separation * labels + rng.normal(0.0, 1.0, n)
    return 1.0 / (1.0 + np.exp(-(logits + shift))), labels


def _exact(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact positives and negatives per score bin."""
    index = np.clip(np.searchsorted(EDGES, scores, side="right") - 1, 0, len(EDGES) - 2)
    return (np.bincount(index[labels], minlength=len(EDGES) - 1).astype(float),
            np.bincount(index[~labels], minlength=len(EDGES) - 1).astype(float))


def _truth_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC of the binned score by brute force over every (positive, negative) pair of bins."""
    wins = sum(pos[i] * neg[j] * (1.0 if i > j else 0.5 if i == j else 0.0)
               for i in range(len(pos)) for j in range(len(neg)))
    return wins / (pos.sum() * neg.sum())


def _evaluation_query(group: str, sha256: str = "a" * 64, suppress_below: float = 0) -> CohortQuery:
    """The DP evaluation query: a risk_score histogram of the model `sha256` by [group, label]."""
    return CohortQuery.from_mapping({
        "name": "model-evaluation", "purpose": "credit-risk-research", "epsilon": 1.0, "measure": "histogram",
        "field": "risk_score", "bins": list(RISK_SCORE_BINS), "model": {"sha256": sha256, "kind": "logreg"},
        "group-by": [group, fx.LABEL], "suppress-below": suppress_below})


def _dp_table(group: str, samples: dict[str, tuple[np.ndarray, np.ndarray]], seed: int,
              suppress_below: float = 0) -> pd.DataFrame:
    """The table `estimate` makes for the risk_score histogram by [group, label] over these samples,
    from their exact counts plus the noise two hospitals at epsilon 1 would add."""
    query = _evaluation_query(group, suppress_below=suppress_below)
    hospitals, z = 2, query.noise_multiplier()
    exact = []
    for cell_group, outcome in query.layout().cells:
        pos, neg = _exact(*samples[cell_group]) if cell_group in samples else (np.zeros(len(EDGES) - 1), np.zeros(len(EDGES) - 1))
        exact.append(pos if outcome == "yes" else neg)
    sd = np.sqrt(hospitals) * z * query.layout().noise_scales
    noised = np.concatenate(exact) + np.random.default_rng(seed).normal(0.0, 1.0, sd.size) * sd
    return estimate(query, noised, z, hospitals)


def test_dp_evaluation_recovers_the_known_truth() -> None:
    rng = np.random.default_rng(11)
    by_sex = {"F": _sample(rng, 6000, 2.2, 0.0), "M": _sample(rng, 6000, 0.8, 0.6)}
    by_age = {"40-49": _sample(rng, 5000, 1.5, 0.0), "50-59": _sample(rng, 5000, 1.5, 0.0),
              "90+": _sample(rng, 40, 1.5, 0.0)}
    tables = {"sex": _dp_table("sex", by_sex, seed=1), "age": _dp_table("age", by_age, seed=2, suppress_below=60)}
    evaluation = evaluation_from_tables(tables)
    assert evaluation == evaluation_from_tables(tables)  # fixed seed: the same table, the same card
    for name, samples in (("sex", by_sex), ("age", {k: v for k, v in by_age.items() if k != "90+"})):
        for group, (scores, labels) in samples.items():
            pos, neg = _exact(scores, labels)
            stats = evaluation["groups"][name][group]
            low, high = stats["auc_ci95"]
            assert low <= _truth_auc(pos, neg) <= high, (group, stats["auc"], _truth_auc(pos, neg))
            mids = (EDGES[:-1] + EDGES[1:]) / 2
            offset = pos.sum() / (pos + neg).sum() - ((pos + neg) @ mids) / (pos + neg).sum()
            low, high = stats["calibration_offset_ci95"]
            assert low <= offset <= high, (group, stats["calibration_offset"], offset)
    gap = evaluation["gaps"]["sex"]["auc"]
    assert (gap["highest"], gap["lowest"]) == ("F", "M") and gap["ci95"][0] > 0  # a real gap is flagged
    assert "90+" in evaluation["suppressed"]["age"] and "0-9" in evaluation["suppressed"]["age"]
    assert set(evaluation["groups"]["age"]) == {"40-49", "50-59"}
    assert evaluation["overall"]["table"] in ("sex", "age")
    rows = evaluation["overall"]["calibration"]
    assert [r["mean_predicted"] for r in rows] == pytest.approx((EDGES[:-1] + EDGES[1:]) / 2)
    assert all(r["positives"] >= 0 and r["negatives"] >= 0 for r in rows)


def test_release_with_a_dp_evaluation(trained: TrainedRun, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    samples = {"F": _sample(rng, 3000, 1.5, 0.0), "M": _sample(rng, 3000, 1.0, 0.0)}
    tables = {"sex": _dp_table("sex", samples, seed=3)}
    registry = ReleaseRegistry(trained.tracking_uri, tmp_path / "registry")
    with pytest.raises(ReleaseRefused, match="DP evaluation scored model"):
        registry.create(trained.run_id, APPROVER, evaluation=DPEvaluation(tables, model_sha256="b" * 64))
    release = registry.create(trained.run_id, APPROVER, evaluation=DPEvaluation(
        tables, model_sha256=trained.digest, source="synthetic test table"))
    evaluation = evaluation_from_tables(tables)
    assert release.certificate.records == round(evaluation["overall"]["records"])
    assert release.card.calibration["overall"] == evaluation["overall"]["calibration"]
    assert release.card.fairness["groups"]["sex"]["F"]["auc"] == evaluation["groups"]["sex"]["F"]["auc"]
    notes = release.card.fairness_notes
    assert notes[0].startswith("By sex: AUC ranges from") and notes[1] == f"By age: {NOT_EVALUATED}."
    assert any(line.startswith("By sex:") for line in release.card.limitations)


def test_cli_release_with_evaluation_files(trained: TrainedRun, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(7)
    table = _dp_table("sex", {"F": _sample(rng, 3000, 1.5, 0.0), "M": _sample(rng, 3000, 1.0, 0.0)}, seed=4)
    table_file = tmp_path / "model-evaluation-1a2b.by-sex.csv"  # as experiments.model_evaluation writes it
    table.to_csv(table_file, index=False)
    create = ["release", "create", trained.run_id, "--run-dir", str(trained.run_dir),
              "--registry", str(tmp_path / "registry"), "--evaluation", str(table_file)]
    for sha256, code in (("b" * 64, EXIT_USER_ERROR), (trained.digest, 0)):
        query = _evaluation_query("sex", sha256)
        (tmp_path / "model-evaluation-1a2b.json").write_text(json.dumps({
            "query": query.to_dict(), "run-id": "model-evaluation-1a2b", "privacy": {"epsilon": query.epsilon}}))
        assert main(create) == code
    assert "the DP evaluation scored model bbbbbbbbbbbb" in capsys.readouterr().err
    assert main(["release", "show", "r1", "--registry", str(tmp_path / "registry")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["certificate"]["records"] == round(table["count"].sum())
    assert shown["model_card"]["fairness"]["source"] == "cohort query model-evaluation-1a2b (epsilon 1 per hospital)"

