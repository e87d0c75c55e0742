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

from engines.simulation import simulate
from experiments.signals_local import approve
from experiments.synthetic import synthesize
from federation import features as fx
from cli.main import EXIT_USER_ERROR, main
from clients.node_state import NodeState
from federation.config import RunConfig
from federation.he_codec import KeyBundlePaths, he_parameters
from federation.model import weights_digest
from federation.query import CohortQuery
from privacy.accounting import ACCOUNTANT, RDP_ORDERS, epsilon_for
from privacy.audit import AuditLog
from privacy.ledger import GaussianMechanism, compose_epsilon
from server.analytics import estimate
from server.releases.certificates import (
    FEATURE_GROUPS,
    NEIGHBOURING,
    NOT_EVALUATED,
    CertificateError,
    ModelCard,
    PrivacyCertificate,
)
from server.releases.dp_evaluation import RISK_SCORE_BINS, DPEvaluation, evaluation_from_tables
from server.releases import (
    RELEASE_AUDIT_FILE,
    STATUS_WITHDRAWN,
    ReleaseError,
    ReleaseRefused,
    ReleaseRegistry,
)
from server.calibration import CALIBRATION_TOLERANCE, fit_platt
from server.signals.catalogue import ReleaseView
from server.tracking import CALIBRATION_FILE

APPROVER = "Dana Risk"
UNAUDITED = "test of the release rules; the membership audit is tested in test_membership_audit.py"
EDGES = np.asarray(RISK_SCORE_BINS)


class TrainedRun:
    """The module's finished run: where its store is, its MLflow id, and what it logged."""

    def __init__(self, run_dir: Path, mlflow_run_id: str, digest: str, keys_dir: Path) -> None:
        self.run_dir, self.run_id, self.digest, self.keys_dir = run_dir, mlflow_run_id, digest, keys_dir
        self.tracking_uri = f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
        self.report = json.loads((run_dir / "release" / "privacy_report.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, keys: KeyBundlePaths) -> TrainedRun:
    base = tmp_path_factory.mktemp("release-run")
    synthesize(2, 6000, base / "data", seed=3)
    run_dir = base / "run"
    # the last round's DP evaluation is what the release is recalibrated from: a generous evaluation
    # budget keeps its noise small enough, on 1,200 held-out records, for the fit to be applied
    # (server.calibration declines a fit the noise makes a gamble; tests/test_calibration.py)
    result = simulate(RunConfig(data_dir=str(base / "data"), keys_dir=str(keys.server_context.parent),
                                run_dir=str(run_dir), num_hospitals=2, rounds=1, model="logreg", sample_rate=0.05,
                                target_epsilon=4.0, evaluation_epsilon=1.0))
    assert not result.calibration["problem"], result.calibration["problem"]
    return TrainedRun(run_dir, result.run_id, result.digest, keys.server_context.parent)


def _calibrated(rng: np.random.Generator, n: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    """Scores of a calibrated model and labels drawn from them; `spread` sets the AUC."""
    scores = 1.0 / (1.0 + np.exp(-rng.normal(-2.2, spread, n)))
    return scores, rng.random(n) < scores


def _evaluation_of(digest: str, seed: int = 5) -> DPEvaluation:
    """DP evaluation tables (by sex) of a calibrated model `digest`, as `fedrisk release evaluate` gives."""
    rng = np.random.default_rng(seed)
    samples = {"F": _calibrated(rng, 3000, 1.5), "M": _calibrated(rng, 3000, 1.0)}
    return DPEvaluation({"sex": _dp_table("sex", samples, seed=seed)}, model_sha256=digest,
                        source="synthetic test table")


def _evaluation_files(directory: Path, digest: str, seed: int = 4) -> list[str]:
    """The evaluation table and its query JSON as engines.model_evaluation writes them: the
    `--evaluation` arguments of `fedrisk release create`."""
    rng = np.random.default_rng(seed)
    table = _dp_table("sex", {"F": _calibrated(rng, 3000, 1.5), "M": _calibrated(rng, 3000, 1.0)}, seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    table_file = directory / "model-evaluation-1a2b.by-sex.csv"
    table.to_csv(table_file, index=False)
    query = _evaluation_query("sex", digest)
    (directory / "model-evaluation-1a2b.json").write_text(json.dumps({
        "query": query.to_dict(), "run-id": "model-evaluation-1a2b", "privacy": {"epsilon": query.epsilon}}))
    return ["--evaluation", str(table_file)]


@pytest.fixture(scope="module")
def released(trained: TrainedRun, tmp_path_factory: pytest.TempPathFactory) -> tuple[ReleaseRegistry, object]:
    registry = ReleaseRegistry(trained.tracking_uri, tmp_path_factory.mktemp("registry"))
    return registry, registry.create(approve(registry, trained.run_id), APPROVER, cutoff="2025-06-30",
                                     evaluation=_evaluation_of(trained.digest), unaudited=UNAUDITED)


def _metric(trained: TrainedRun, key: str) -> float | None:
    """The run's last-round value of a metric; None when the DP noise left it undefined (not logged)."""
    history = mlflow.tracking.MlflowClient(trained.tracking_uri).get_metric_history(trained.run_id, key)
    return max(history, key=lambda m: m.step).value if history else None


def test_certificate_is_the_runs_privacy_report(trained: TrainedRun, released) -> None:
    _, release = released
    cert, report = release.certificate, trained.report
    assert release.release_id == "r1" and release.status == "active" and release.sha256 == trained.digest
    assert cert.model_sha256 == trained.digest and cert.mlflow_run_id == trained.run_id
    assert cert.hospitals == len(report["hospitals"]) == 2
    assert cert.epsilon_max == report["epsilon_max"] and cert.delta == report["delta"]
    assert cert.accountant == report["accountant"] == ACCOUNTANT and cert.he_parameters == report["he_parameters"]
    assert "runs (PLD)" in cert.overlap  # its all-hospitals figure is composed by the accountant it names
    assert cert.purpose == report["purpose"] and cert.data_cutoff == "2025-06-30"
    for name, logged in report["hospitals"].items():
        spend = cert.per_hospital[name]
        for key in ("epsilon", "delta", "mechanism", "noise_multiplier", "sample_rate", "steps", "clip_norm",
                    "run_epsilon", "ledger_epsilon"):
            assert getattr(spend, key) == logged[key], (name, key)
        assert spend.evaluation.count == logged["evaluation"]["count"] >= 1
    assert cert.records == round(evaluation_from_tables(_evaluation_of(trained.digest).tables)["overall"]["records"])
    assert PrivacyCertificate.from_json(cert.to_json()) == cert


def test_model_card_carries_the_runs_federated_metrics(trained: TrainedRun, released) -> None:
    _, release = released
    card = release.card
    assert card.federated_auc == _metric(trained, "auc") and card.federated_brier == _metric(trained, "brier")
    assert card.federated_basis.startswith("DP federated evaluation, last round")
    assert card.calibration["source"] == "synthetic test table" and "sex" in card.fairness["groups"]
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
        "cutoff": "2025-06-30", "dp-evaluated": True, "recalibrated": True, "calibration-override": False,
        "privacy-audited": False, "approvals": ["data-scientist:-", "hospital-operator:hospital_00"]}
    approvals = [e for e in entries if e.action == "release.approve"]
    assert [(e.details["role"], e.details["sha256"]) for e in approvals] == [
        ("data-scientist", trained.digest), ("hospital-operator", trained.digest)]


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
    release = registry.create(approve(registry, trained.run_id), APPROVER, evaluation=_evaluation_of(trained.digest),
                              unaudited=UNAUDITED)
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
    assert [e.action for e in entries] == ["release.approve", "release.approve", "release.create", "release.withdraw", "refusal"]
    assert entries[3].details["by"] == "Sam Audit" and entries[3].details["release"] == release.release_id
    assert log.verify().ok


def test_release_audit_measures_the_runs_model_under_dp_and_its_table_goes_on_the_certificate(
        trained: TrainedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nodes, keys = trained.run_dir / "nodes", trained.keys_dir
    audit = ["release", "audit", "--run-dir", str(trained.run_dir), "--nodes", str(nodes), "--keys", str(keys),
             "--hospitals", "2", "--epsilon", "0.5", "--out", str(tmp_path / "audit")]
    assert main(audit) == 0
    printed = capsys.readouterr().out
    assert "epsilon 0.500 charged to each hospital's ledger" in printed and "loss-threshold attack AUC" in printed
    assert f"beside the run's accounted epsilon {trained.report['epsilon_max']:.3f}" in printed
    table = printed.split("release it with: --audit ")[1].strip()
    approve(ReleaseRegistry(trained.tracking_uri, Path(str(tmp_path / "registry"))), trained.run_id)
    assert main(["release", "create", trained.run_id, "--run-dir", str(trained.run_dir), "--registry",
                 str(tmp_path / "registry"), "--approved-by", APPROVER, *_evaluation_files(tmp_path, trained.digest),
                 "--audit", table]) == 0
    section = ReleaseRegistry("", tmp_path / "registry").get("r1").certificate.privacy_audit
    assert section["audited"] is True and section["query_epsilon"] == pytest.approx(0.5, rel=0.01)
    assert 0.4 < section["auc"] < 0.6 and section["epsilon_lower_bound"] <= trained.report["epsilon_max"]
    for node in sorted(nodes.iterdir()):  # charged at every hospital, as an analytics query
        with NodeState.load(node).ledger() as ledger:
            assert any(c.kind == "analytics" and c.run_id.startswith("membership-audit-") for c in ledger.all_charges())


def test_cli(trained: TrainedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = str(tmp_path / "registry")
    create = ["release", "create", trained.run_id, "--run-dir", str(trained.run_dir), "--registry", registry,
              "--approved-by", APPROVER, "--cutoff", "2025-06-30", *_evaluation_files(tmp_path, trained.digest),
              "--no-audit", UNAUDITED]
    assert main(create) == EXIT_USER_ERROR  # not yet approved by the two people a release needs
    assert "lacks the data-scientist and hospital-operator approval" in capsys.readouterr().err
    approve(ReleaseRegistry(trained.tracking_uri, Path(registry)), trained.run_id)
    capsys.readouterr()
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
    assert shown["model_card"]["calibration"]["source"].startswith("cohort query model-evaluation-1a2b")
    assert main(["release", "show", "r7", "--registry", registry]) == EXIT_USER_ERROR
    assert "no release r7" in capsys.readouterr().err
    assert main(["release", "withdraw", "r1", "--reason", "superseded", "--by", "Sam", "--registry", registry]) == 0
    assert capsys.readouterr().out.startswith("withdrew r1")
    assert main(["release", "list", "--json", "--registry", registry]) == 0
    assert json.loads(capsys.readouterr().out)[0]["status"] == STATUS_WITHDRAWN
    assert main(["release", "create", trained.run_id, "--run-dir", str(tmp_path / "nowhere"),
                 "--registry", registry]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "--run-dir" in err and "no such directory" in err
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
    samples = {"F": _calibrated(rng, 3000, 1.5), "M": _calibrated(rng, 3000, 1.0)}
    tables = {"sex": _dp_table("sex", samples, seed=3)}
    registry = ReleaseRegistry(trained.tracking_uri, tmp_path / "registry")
    with pytest.raises(ReleaseRefused, match="DP evaluation scored model"):
        registry.create(trained.run_id, APPROVER, evaluation=DPEvaluation(tables, model_sha256="b" * 64))
    release = registry.create(approve(registry, trained.run_id), APPROVER, evaluation=DPEvaluation(
        tables, model_sha256=trained.digest, source="synthetic test table"), unaudited=UNAUDITED)
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
    table = _dp_table("sex", {"F": _calibrated(rng, 3000, 1.5), "M": _calibrated(rng, 3000, 1.0)}, seed=4)
    table_file = tmp_path / "model-evaluation-1a2b.by-sex.csv"  # as engines.model_evaluation writes it
    table.to_csv(table_file, index=False)
    create = ["release", "create", trained.run_id, "--run-dir", str(trained.run_dir),
              "--registry", str(tmp_path / "registry"), "--evaluation", str(table_file),
              "--no-audit", UNAUDITED]
    approve(ReleaseRegistry(trained.tracking_uri, Path(str(tmp_path / "registry"))), trained.run_id)
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



# --- releases of hand-built runs: what a certificate may rest on ------------------------------------
# Runs logged into a real MLflow store exactly as server.tracking.RunTracker.finish logs them, with a
# privacy report written by hand: no federation is trained, so these tests pin the release rules.

DELTA = 1e-5
PURPOSE = "credit-risk-research"
ASSUMPTION = "hospitals hold disjoint patients: each patient's records are at one hospital only"


def _mechanisms(q: float, sigma: float, steps: int, z: float, count: int) -> list[GaussianMechanism]:
    return [GaussianMechanism(q, sigma, steps), GaussianMechanism.gaussian_release(noise_multiplier=z, count=count)]


def _honest_report(ledger_before: float = 0.4) -> dict:
    """A privacy report of the new format for two hospitals; each ledger had `ledger_before` spent."""
    hospitals = {}
    for name, q, sigma, steps, z, count in (("hospital_00", 0.05, 1.1, 40, 6.0, 4),
                                            ("hospital_01", 0.08, 0.9, 25, 6.0, 4)):
        dp_sgd, evaluation = _mechanisms(q, sigma, steps, z, count)
        run_epsilon = compose_epsilon([dp_sgd, evaluation], DELTA)
        hospitals[name] = {
            "mechanism": "DP-SGD, Poisson-subsampled Gaussian", "sample_rate": q, "noise_multiplier": sigma,
            "steps": steps, "clip_norm": 1.0, "delta": DELTA, "target_epsilon": 3.0,
            "epsilon": epsilon_for(sample_rate=q, noise_multiplier=sigma, steps=steps, delta=DELTA),
            "evaluation": {"mechanism": "gaussian", "noise_multiplier": z, "count": count,
                           "epsilon": compose_epsilon([evaluation], DELTA)},
            "run_epsilon": run_epsilon, "ledger_epsilon": run_epsilon + ledger_before}
    return {"guarantee": "per-patient (epsilon, delta)-DP; hospitals hold disjoint patients, so the released "
                         "model is (max_k run_epsilon_k, delta)-DP",
            "epsilon_max": max(h["run_epsilon"] for h in hospitals.values()), "delta": DELTA,
            "accountant": ACCOUNTANT, "rdp_orders": list(RDP_ORDERS), "recompute": "privacy.ledger.compose_epsilon",
            "he_parameters": he_parameters(), "purpose": PURPOSE, "hospitals": hospitals,
            "neighbouring": NEIGHBOURING, "assumption": ASSUMPTION}


def _round_histogram() -> np.ndarray:
    """A revealed round evaluation vector (negatives, then positives per SCORE_BINS) of a model
    that under-predicts, as DP-SGD leaves it."""
    from federation.round_evaluation import score_histogram

    rng = np.random.default_rng(2)
    scores, labels = _calibrated(rng, 20_000, 1.2)
    return score_histogram(labels.astype(int), scores ** 1.3) + rng.normal(0.0, 5.0, 28)


class HandBuiltStore:
    """A tracking store laid out as `fedrisk run --out DIR` leaves it (DIR/mlflow.db), and runs in it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True)
        self.tracking_uri = f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
        self.client = mlflow.tracking.MlflowClient(self.tracking_uri)
        self.experiment_id = self.client.create_experiment(
            "fedrisk", artifact_location=(run_dir.resolve() / "mlartifacts").as_uri())
        self.weights = np.random.default_rng(0).normal(0.0, 0.1, len(fx.FEATURE_NAMES) + 1).astype(np.float32)
        self.digest = weights_digest(self.weights)

    def run(self, report: dict, aucs: tuple[float, ...] = (0.61, 0.68, 0.71), calibrated: bool = True) -> str:
        """A FINISHED run with its release artifacts and per-round federated metrics; its run id.
        `calibrated`: the release holds the calibration.json of a recalibrated run."""
        run_id = self.client.create_run(self.experiment_id).info.run_id
        for step, auc in enumerate(aucs, start=1):
            self.client.log_metric(run_id, "auc", auc, step=step)
            self.client.log_metric(run_id, "brier", 0.2 - 0.01 * step, step=step)
        release = self.run_dir / f"release-{run_id}"
        release.mkdir()
        np.savez(release / "model.npz", weights=self.weights, model="logreg", n_features=len(fx.FEATURE_NAMES))
        (release / "model.sha256").write_text(self.digest + "\n")
        (release / "privacy_report.json").write_text(json.dumps(report, indent=2))
        (release / "run_summary.json").write_text(json.dumps({"rounds": len(aucs)}))
        if calibrated:
            (release / CALIBRATION_FILE).write_text(json.dumps(fit_platt(_round_histogram(), source="test").to_dict()))
        self.client.log_artifacts(run_id, str(release), artifact_path="release")
        self.client.set_tag(run_id, "release.sha256", self.digest)
        self.client.set_terminated(run_id, status="FINISHED")
        return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> HandBuiltStore:
    return HandBuiltStore(tmp_path_factory.mktemp("hand-built") / "run")


@pytest.fixture(scope="module")
def hand_registry(store: HandBuiltStore, tmp_path_factory: pytest.TempPathFactory) -> ReleaseRegistry:
    return ReleaseRegistry(store.tracking_uri, tmp_path_factory.mktemp("hand-registry"))


def _refused(registry: ReleaseRegistry, run_id: str, evaluation: DPEvaluation | None, reason: str) -> str:
    """Assert that releasing `run_id` is refused in one audited line matching `reason`, leaving no release."""
    with pytest.raises(ReleaseRefused, match=reason) as refused:
        registry.create(run_id, APPROVER, evaluation=evaluation)
    message = str(refused.value)
    assert "\n" not in message
    assert run_id not in [r.run_id for r in registry.list()]
    assert registry.audit.entries()[-1].details["reason"] == message
    return message


def test_a_run_without_dp_is_refused_though_its_report_says_ckks(store: HandBuiltStore,
                                                                 hand_registry: ReleaseRegistry) -> None:
    report = _honest_report()
    for spend in report["hospitals"].values():  # what a dp=false run logs: no noise, no steps, epsilon 0
        spend.update(noise_multiplier=0.0, steps=0, epsilon=0.0)
        spend["evaluation"].update(noise_multiplier=0.0, count=0, epsilon=0.0)
        spend["run_epsilon"] = spend["ledger_epsilon"] = 0.0
    report["epsilon_max"] = 0.0
    assert report["he_parameters"]["scheme"] == "CKKS"
    run_id = store.run(report)
    _refused(hand_registry, run_id, _evaluation_of(store.digest),
             rf"^run {run_id}: hospital_00: noise_multiplier is 0, not > 0 \(DP-SGD added no noise")


def _without(entry: dict, key: str) -> None:
    del entry[key]


@pytest.mark.parametrize(("change", "reason"), [
    (lambda h: h.update(steps=0), r"hospital_01: steps is 0, not >= 1"),
    (lambda h: h.update(sample_rate=0.0), r"hospital_01: sample_rate is 0, not in \(0, 1\]"),
    (lambda h: h.update(sample_rate=1.5), r"hospital_01: sample_rate is 1.5, not in \(0, 1\]"),
    (lambda h: h.update(noise_multiplier=float("inf")), r"hospital_01: noise_multiplier must be a finite number"),
    (lambda h: _without(h, "noise_multiplier"), r"hospital_01: noise_multiplier is missing"),
    (lambda h: _without(h, "evaluation"), r"hospital_01: evaluation is missing .*no DP evaluation during the run"),
    (lambda h: h["evaluation"].update(count=0), r"hospital_01: evaluation: count is 0, not >= 1"),
    (lambda h: h["evaluation"].update(noise_multiplier=0.0), r"hospital_01: evaluation: noise_multiplier is 0"),
    (lambda h: h["evaluation"].update(mechanism="laplace"), r"hospital_01: evaluation.mechanism is 'laplace'"),
    (lambda h: _without(h, "ledger_epsilon"), r"hospital_01: ledger_epsilon is missing"),
])
def test_a_spend_without_dp_or_without_dp_evaluation_is_refused(store: HandBuiltStore, hand_registry: ReleaseRegistry,
                                                                change, reason) -> None:
    report = _honest_report()
    change(report["hospitals"]["hospital_01"])
    _refused(hand_registry, store.run(report), _evaluation_of(store.digest), reason)


def test_a_report_from_before_dp_evaluation_is_refused(store: HandBuiltStore, hand_registry: ReleaseRegistry) -> None:
    report = _honest_report()
    for spend in report["hospitals"].values():
        for key in ("evaluation", "run_epsilon", "ledger_epsilon"):
            del spend[key]
    del report["neighbouring"], report["assumption"]
    report["epsilon_max"] = max(h["epsilon"] for h in report["hospitals"].values())
    _refused(hand_registry, store.run(report), _evaluation_of(store.digest), "the run predates DP evaluation")


def _halve_run_epsilon(report: dict) -> None:
    report["hospitals"]["hospital_00"]["run_epsilon"] /= 2


def _halve_evaluation_epsilon(report: dict) -> None:
    report["hospitals"]["hospital_00"]["evaluation"]["epsilon"] /= 2


def _understate_epsilon_max(report: dict) -> None:
    report["epsilon_max"] = min(h["run_epsilon"] for h in report["hospitals"].values())


def _shrink_ledger(report: dict) -> None:
    spend = report["hospitals"]["hospital_00"]
    spend["ledger_epsilon"] = spend["run_epsilon"] / 2


def _other_relation(report: dict) -> None:
    report["neighbouring"] = "replace one patient's records"


@pytest.mark.parametrize(("tamper", "reason"), [
    (_halve_run_epsilon, r"hospital_00's logged run_epsilon \S+ does not recompute from its parameters"),
    (_halve_evaluation_epsilon, r"hospital_00's logged evaluation.epsilon \S+ does not recompute"),
    (_understate_epsilon_max, r"epsilon_max \S+ in its privacy report is not the largest run_epsilon"),
    (_shrink_ledger, r"hospital_00: ledger_epsilon \S+ is below its run_epsilon"),
    (_other_relation, r"neighbouring relation is .replace one patient's records., not .add/remove"),
])
def test_a_tampered_report_is_refused(store: HandBuiltStore, hand_registry: ReleaseRegistry, tamper, reason) -> None:
    report = _honest_report()
    tamper(report)
    _refused(hand_registry, store.run(report), _evaluation_of(store.digest), reason)


def test_a_release_without_a_dp_evaluation_of_its_model_is_refused(store: HandBuiltStore,
                                                                    hand_registry: ReleaseRegistry) -> None:
    run_id = store.run(_honest_report())
    _refused(hand_registry, run_id, None, r"a release needs a DP evaluation of its model: run `fedrisk release "
                                          r"evaluate` and pass the tables it names \(--evaluation\)")
    tables = _evaluation_of(store.digest).tables
    _refused(hand_registry, run_id, DPEvaluation(tables), "the DP evaluation scored no named model")
    exact = {"sex": tables["sex"].assign(se=0.0)}  # exact counts dressed as a DP table
    _refused(hand_registry, run_id, DPEvaluation(exact, model_sha256=store.digest),
             "evaluation table 'sex': a count without a positive se carries no DP noise")


def test_an_honest_run_is_released_with_run_and_ledger_epsilon_per_hospital(
        store: HandBuiltStore, tmp_path: Path) -> None:
    report = _honest_report(ledger_before=0.4)
    run_id = store.run(report, aucs=(0.61, 0.68, 0.71))
    registry = ReleaseRegistry(store.tracking_uri, tmp_path / "registry")
    release = registry.create(approve(registry, run_id), APPROVER, evaluation=_evaluation_of(store.digest),
                              unaudited=UNAUDITED)
    cert = release.certificate
    for name, logged in report["hospitals"].items():
        spend = cert.per_hospital[name]
        recomputed = compose_epsilon(_mechanisms(logged["sample_rate"], logged["noise_multiplier"], logged["steps"],
                                                 logged["evaluation"]["noise_multiplier"],
                                                 logged["evaluation"]["count"]), DELTA)
        assert spend.run_epsilon == pytest.approx(recomputed, abs=1e-9)
        assert spend.run_epsilon > max(spend.epsilon, spend.evaluation.epsilon)  # both spends count
        assert spend.ledger_epsilon == pytest.approx(spend.run_epsilon + 0.4)
        assert (spend.noise_multiplier, spend.sample_rate, spend.steps, spend.clip_norm, spend.delta) == (
            logged["noise_multiplier"], logged["sample_rate"], logged["steps"], 1.0, DELTA)
        assert (spend.evaluation.mechanism, spend.evaluation.noise_multiplier, spend.evaluation.count) == (
            "gaussian", 6.0, 4)
    assert cert.epsilon_max == max(h.run_epsilon for h in cert.per_hospital.values())
    assert cert.neighbouring == "add/remove one patient's records" and cert.assumption == ASSUMPTION
    assert cert.epsilon_all_hospitals > cert.epsilon_max  # a patient at both hospitals is covered by less
    assert f"{cert.epsilon_all_hospitals:.4g}" in cert.overlap and "several hospitals" in cert.overlap
    assert "ledger" in cert.ledger_basis
    assert PrivacyCertificate.from_json(cert.to_json()) == cert == registry.get(release.release_id).certificate
    shown = ReleaseView(release.release_id, release.status, cert, release.card).detail().model_dump(mode="json")
    assert shown["certificate"]["per_hospital"]["hospital_00"]["ledger_epsilon"] == cert.per_hospital[
        "hospital_00"].ledger_epsilon  # as the signals service publishes it
    card = release.card
    assert card.federated_auc == 0.71 and card.federated_basis.startswith("DP federated evaluation, last round")
    assert not any("not differentially private" in line for line in [card.federated_basis, *card.limitations])
    assert isinstance(card.calibration, dict) and card.calibration["source"] == "synthetic test table"


def test_a_certificate_stored_before_dp_evaluation_still_reads(store: HandBuiltStore, tmp_path: Path) -> None:
    registry = ReleaseRegistry(store.tracking_uri, tmp_path / "registry")
    cert = registry.create(approve(registry, store.run(_honest_report())), APPROVER, evaluation=_evaluation_of(store.digest),
                           unaudited=UNAUDITED).certificate
    old = cert.to_dict()
    for key in ("neighbouring", "assumption", "epsilon_all_hospitals", "overlap", "ledger_basis"):
        del old[key]
    for spend in old["per_hospital"].values():
        for key in ("run_epsilon", "ledger_epsilon", "evaluation"):
            del spend[key]
    read = PrivacyCertificate.from_dict(old)
    assert read.epsilon_max == cert.epsilon_max and read.per_hospital["hospital_00"].run_epsilon is None
    assert read.per_hospital["hospital_00"].evaluation is None and read.neighbouring == ""
    del old["per_hospital"]["hospital_00"]["steps"]
    with pytest.raises(CertificateError, match="not a fedrisk privacy certificate"):
        PrivacyCertificate.from_dict(old)


def test_cli_requires_the_dp_evaluation_and_prints_each_hospitals_epsilons(
        store: HandBuiltStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_id = store.run(_honest_report())
    create = ["release", "create", run_id, "--run-dir", str(store.run_dir), "--registry", str(tmp_path / "registry")]
    approve(ReleaseRegistry(store.tracking_uri, Path(str(tmp_path / "registry"))), run_id)
    assert main(create) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("fedrisk: error: a release needs a DP evaluation of its model") and err.count("\n") == 1
    assert main([*create, *_evaluation_files(tmp_path / "evaluation", store.digest), "--no-audit", UNAUDITED]) == 0
    out = capsys.readouterr().out
    cert = ReleaseRegistry("", tmp_path / "registry").get("r1").certificate
    for name, spend in cert.per_hospital.items():
        assert (f"{name}: run epsilon {spend.run_epsilon:.4f} (DP-SGD {spend.epsilon:.4f}, 4 DP evaluations "
                f"{spend.evaluation.epsilon:.4f}); ledger epsilon for {PURPOSE} after the run "
                f"{spend.ledger_epsilon:.4f}") in out
    assert "DP federated evaluation, last round: pooled DP AUC 0.7100" in out and "add/remove one patient" in out


# --- the release's calibration check --------------------------------------------------------------

def _miscalibrated_evaluation(digest: str, shift: float) -> DPEvaluation:
    """DP evaluation tables of a model whose scores are off by `shift` on the logit scale."""
    rng = np.random.default_rng(8)
    samples = {}
    for group in ("F", "M"):
        scores, labels = _calibrated(rng, 3000, 1.2)
        logits = np.log(scores) - np.log1p(-scores) + shift
        samples[group] = (1.0 / (1.0 + np.exp(-logits)), labels)
    return DPEvaluation({"sex": _dp_table("sex", samples, seed=9)}, model_sha256=digest, source="synthetic test table")


def test_a_miscalibrated_release_is_refused_unless_the_override_goes_on_its_certificate(
        store: HandBuiltStore, tmp_path: Path) -> None:
    registry = ReleaseRegistry(store.tracking_uri, tmp_path / "registry")
    run_id = store.run(_honest_report())
    under = _miscalibrated_evaluation(store.digest, shift=-1.0)  # predicts about half the observed rate
    with pytest.raises(ReleaseRefused) as refused:
        registry.create(run_id, APPROVER, evaluation=under)
    message = str(refused.value)
    assert "calibration offset (observed minus predicted rate) is +0.0" in message and "--accept-miscalibration" in message
    assert f"beyond the tolerance of {CALIBRATION_TOLERANCE:g}" in message and "\n" not in message
    assert registry.list() == []
    release = registry.create(approve(registry, run_id), APPROVER, evaluation=under, accept_miscalibration="pilot: bank recalibrates",
                              unaudited=UNAUDITED)
    override = release.certificate.calibration_override
    assert override["reason"] == "pilot: bank recalibrates" and override["by"] == APPROVER
    assert any("calibration offset" in p for p in override["problems"])
    again = ReleaseRegistry("", tmp_path / "registry").get(release.release_id)  # read back from the registry
    assert again.certificate.calibration_override == override
    entries = AuditLog(tmp_path / "registry" / RELEASE_AUDIT_FILE, role="auditor", identity="test").entries()
    assert [e.details["calibration-override"] for e in entries if e.action == "release.create"] == [True]


def test_a_run_that_was_not_recalibrated_is_refused(store: HandBuiltStore, tmp_path: Path) -> None:
    registry = ReleaseRegistry(store.tracking_uri, tmp_path / "registry")
    run_id = store.run(_honest_report(), calibrated=False)
    with pytest.raises(ReleaseRefused, match="was not recalibrated"):
        registry.create(run_id, APPROVER, evaluation=_evaluation_of(store.digest))


def test_a_calibrated_release_carries_its_map_and_bands_with_observed_rates(store: HandBuiltStore,
                                                                            tmp_path: Path) -> None:
    registry = ReleaseRegistry(store.tracking_uri, tmp_path / "registry")
    release = registry.create(approve(registry, store.run(_honest_report())), APPROVER,
                              evaluation=_evaluation_of(store.digest), unaudited=UNAUDITED)
    card = release.card
    assert release.certificate.calibration_override is None
    assert card.recalibration["method"].startswith("platt") and card.recalibration["slope"] > 0
    assert [b["band"] for b in card.bands] == ["low", "medium", "high"]
    for band in card.bands:  # a calibrated model's bands observe rates inside them
        assert band["inside"] is True and band["low"] <= band["observed_rate"] < band["high"]
    assert ModelCard.from_dict(card.to_dict()) == card
    legacy = {k: v for k, v in card.to_dict().items() if k not in ("recalibration", "bands")}
    assert ModelCard.from_dict(legacy).bands is None  # cards issued before recalibration still read


def test_a_release_needs_two_people_in_two_roles_for_this_very_model(store: HandBuiltStore, tmp_path: Path) -> None:
    """One person approving in both roles is not enough; another run's approvals do not carry over;
    a bad approval is refused and audited, and nothing is released."""
    registry = ReleaseRegistry(store.tracking_uri, tmp_path / "registry")
    first, second = store.run(_honest_report()), store.run(_honest_report())
    registry.approve(first, "data-scientist", "Dana Risk")
    registry.approve(first, "hospital-operator", "Dana Risk", "hospital_00")
    with pytest.raises(ReleaseRefused, match="same person"):
        registry.create(first, APPROVER, evaluation=_evaluation_of(store.digest), unaudited=UNAUDITED)
    registry.approve(first, "hospital-operator", "Hank Ops", "hospital_00")
    with pytest.raises(ReleaseRefused, match="lacks the data-scientist and hospital-operator approval"):
        registry.create(second, APPROVER, evaluation=_evaluation_of(store.digest), unaudited=UNAUDITED)
    from server.releases.approvals import ApprovalError

    with pytest.raises(ApprovalError, match="names the hospital"):
        registry.approve(second, "hospital-operator", "Hank Ops")
    assert registry.list() == []
    release = registry.create(first, APPROVER, evaluation=_evaluation_of(store.digest), unaudited=UNAUDITED)
    assert {(a["role"], a["by"]) for a in release.certificate.approvals} == {
        ("data-scientist", "Dana Risk"), ("hospital-operator", "Dana Risk"), ("hospital-operator", "Hank Ops")}


def test_retention_purges_old_runs_and_their_artifacts_but_keeps_what_releases_stand_on(tmp_path: Path, capsys) -> None:
    from datetime import UTC, datetime, timedelta

    from mlflow.exceptions import MlflowException

    from server.releases.retention import purge_runs

    store = HandBuiltStore(tmp_path / "workspace")
    registry = ReleaseRegistry(store.tracking_uri, tmp_path / "registry")
    released_run = store.run(_honest_report())
    release = registry.create(approve(registry, released_run), APPROVER, evaluation=_evaluation_of(store.digest),
                              unaudited=UNAUDITED)
    old_runs = [store.run(_honest_report()), store.run(_honest_report())]
    running = store.client.create_run(store.experiment_id).info.run_id  # may still be resumed
    artifacts = {run_id: Path(store.client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
                 for run_id in [released_run, *old_runs]}
    assert all(path.is_dir() for path in artifacts.values())

    assert main(["release", "purge", "--registry", str(tmp_path / "registry"), "--tracking-uri", store.tracking_uri,
                 "--runs-older-than-days", "0"]) == EXIT_USER_ERROR
    assert "--older-than-days must be a whole number of days" in capsys.readouterr().err
    assert main(["release", "purge", "--registry", str(tmp_path / "registry"), "--tracking-uri", store.tracking_uri,
                 "--runs-older-than-days", "30"]) == 0  # today's runs are inside any retention
    assert "deleted 0 run(s)" in capsys.readouterr().out

    later = datetime.now(UTC) + timedelta(days=400)
    dry = purge_runs(registry, store.tracking_uri, 365, now=later, dry_run=True)
    assert sorted(dry.purged) == sorted(old_runs) and dry.kept_released == [released_run]
    assert dry.kept_running == [running] and dry.artifact_bytes > 0
    assert all(path.is_dir() for path in artifacts.values())  # a dry run changes nothing

    report = purge_runs(registry, store.tracking_uri, 365, now=later)
    assert sorted(report.purged) == sorted(old_runs)
    for run_id in old_runs:
        with pytest.raises(MlflowException):
            store.client.get_run(run_id)
        assert not artifacts[run_id].exists()
    assert store.client.get_run(released_run).info.lifecycle_stage == "active" and artifacts[released_run].is_dir()
    assert registry.get(release.release_id).run_id == released_run  # the release still reads
    entry = registry.audit.entries()[-1]
    assert entry.action == "workspace.purge" and entry.details["runs-purged"] == 2
    assert entry.details["kept-released"] == 1 and registry.audit.verify().ok
    logged = len(registry.audit.entries())
    again = purge_runs(registry, store.tracking_uri, 365, now=later)
    assert again.purged == [] and len(registry.audit.entries()) == logged  # nothing to do: nothing audited
