"""MLflow tracking of a federated run: parameters, per-round metrics, epsilon per hospital, and
the release artifacts (final model, privacy report).

A run that fails before its first round completes is deleted from the tracking store, so no
partial run stays registered; one that fails later is marked FAILED and kept, because the
coordinator can resume it from its checkpoint (`server.checkpoint`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from federation.config import RunConfig
from federation.he_codec import he_parameters
from federation.release_model import INPUTS_FILE, write_mlmodel  # noqa: F401  (INPUTS_FILE: re-exported)
from federation.workspace import artifact_root
from privacy.accounting import (ACCOUNTANT, MIXED_ACCOUNTANTS, PRV_ACCOUNTANT, RDP_ACCOUNTANT, RDP_ORDERS,
                                HospitalSpend)


# The per-round metrics of a training run, beside the DP evaluation's own (AUC, BRIER, LOG_LOSS, ...
# in federation.round_evaluation): logged to MLflow, kept in the checkpoint, read by the benches.
ROUND_CONTRIBUTORS = "contributors"  # hospitals whose update the round aggregated
ROUND_EPSILON_MAX = "epsilon-max"  # the largest run epsilon any hospital reported so far
ROUND_BYTES_UP = "bytes-up-per-hospital"  # mean sealed-update bytes a hospital sent
ROUND_BYTES_DOWN = "bytes-down-per-hospital"  # bytes each hospital was sent (the relayed chain)
ROUND_REJECTED = "rejected-replies"  # replies the reply checker left out this round
ROUND_SECONDS = "round-seconds"  # wall-clock time of train + evaluate
ROUND_HOSPITALS = "hospitals"  # accepted replies, in the strategy's MetricRecord of a step
CALIBRATION_FILE = "calibration.json"  # in the release directory: the Platt map folded into model.npz


def quiet_mlflow() -> Any:
    """MLflow, imported with its artifact progress bars and git probing off. The environment is
    set here, when MLflow is first needed, not when this module is imported."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    import mlflow

    return mlflow


class RunTracker:
    """One MLflow run for one federated training run."""

    def __init__(self, config: RunConfig, resume_run_id: str = "", run_name: str = "") -> None:
        mlflow = quiet_mlflow()  # imported here: it is slow to import and only the server needs it

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.mlflow = mlflow
        self.config = config
        Path(config.run_dir).mkdir(parents=True, exist_ok=True)
        experiment_id = _experiment_id(mlflow, config)
        if resume_run_id and _is_active(mlflow, resume_run_id):
            self.run = mlflow.start_run(run_id=resume_run_id)
            self.run_id = self.run.info.run_id
            return
        self.run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name or Path(config.run_dir).name)
        self.run_id = self.run.info.run_id
        params: dict[str, Any] = {k: v for k, v in config.to_user_config().items()
                                  if k not in ("data-dir", "keys-dir", "run-dir", "tracking-uri")}
        params["planned-steps"] = config.planned_steps
        params["accountant"] = ACCOUNTANT
        params.update({f"he.{k}": v for k, v in he_parameters().items()})
        mlflow.log_params(params)

    def log_round(self, server_round: int, metrics: dict[str, float]) -> None:
        """Per-round metrics (federated AUC, Brier, log loss, bytes, seconds)."""
        clean = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
        self.mlflow.log_metrics(clean, step=server_round)

    def finish(self, *, weights: np.ndarray, digest: str, privacy_report: dict[str, Any],
               summary: dict[str, Any], calibration: dict[str, Any]) -> Path:
        """Log epsilon per hospital, the calibration and the artifacts; returns the release directory."""
        mlflow = self.mlflow
        for hospital, spend in privacy_report["hospitals"].items():
            mlflow.log_metric(f"epsilon.{hospital}", spend["epsilon"])
        if privacy_report["hospitals"]:
            first = next(iter(privacy_report["hospitals"].values()))
            mlflow.log_param("noise-multiplier", first["noise_multiplier"])
        release = Path(self.config.run_dir) / "release"
        release.mkdir(parents=True, exist_ok=True)
        np.savez(release / "model.npz", weights=np.asarray(weights, dtype=np.float32),
                 model=self.config.model, n_features=self.config.input_size, features=self.config.features,
                 purpose=self.config.purpose)
        (release / "model.sha256").write_text(digest + "\n")
        (release / "privacy_report.json").write_text(json.dumps(privacy_report, indent=2))
        (release / "run_summary.json").write_text(json.dumps(summary, indent=2, default=float))
        (release / CALIBRATION_FILE).write_text(json.dumps(calibration, indent=2))
        mlflow.log_params({"calibration.method": calibration["method"], "calibration.slope": calibration["slope"],
                           "calibration.intercept": calibration["intercept"]})
        mlflow.log_metrics({f"calibration.{when}.{k}": float(v) for when in ("before", "after")
                            for k, v in calibration[when].items()})
        if calibration.get("problem"):
            mlflow.set_tag("calibration.problem", str(calibration["problem"]))
        write_mlmodel(release)  # `mlflow.pyfunc.load_model` loads the release
        mlflow.log_artifacts(str(release), artifact_path="release")
        self._plot_rounds()
        mlflow.set_tag("release.sha256", digest)
        mlflow.end_run(status="FINISHED")
        return release

    def _plot_rounds(self) -> None:
        """`<run>/plots/training.png` from the run's logged round metrics (all rounds, a resumed
        run's earlier ones too), logged under `plots/`."""
        from federation.round_evaluation import AUC, BRIER, SE_SUFFIX
        from server.plots import PLOTS_DIR, TRAINING_PLOT, training_plot

        client = self.mlflow.tracking.MlflowClient()
        history = {key: [(m.step, m.value) for m in client.get_metric_history(self.run_id, name)]
                   for key, name in (("auc", AUC), ("auc_se", AUC + SE_SUFFIX), ("brier", BRIER),
                                     ("epsilon-max", ROUND_EPSILON_MAX))}
        path = training_plot(history, Path(self.config.run_dir) / PLOTS_DIR / TRAINING_PLOT)
        self.mlflow.log_artifact(str(path), artifact_path=PLOTS_DIR)

    def fail(self) -> None:
        """End the run as FAILED but keep it: its checkpoint can be resumed."""
        self.mlflow.end_run(status="FAILED")

    def abort(self) -> None:
        """End and delete the run: a failed run must not look like a result."""
        mlflow = self.mlflow
        try:
            mlflow.end_run(status="FAILED")
            mlflow.tracking.MlflowClient().delete_run(self.run_id)
        finally:
            release = Path(self.config.run_dir) / "release"
            shutil.rmtree(release, ignore_errors=True)


def _experiment_id(mlflow: Any, config: RunConfig) -> str:
    """Point MLflow at the config's store and return its experiment, created if new (a SQLite
    store's artifacts beside its file: `federation.workspace.artifact_root`)."""
    mlflow.set_tracking_uri(config.mlflow_uri)
    experiment = mlflow.get_experiment_by_name(config.experiment)
    if experiment is not None:
        return experiment.experiment_id
    root = artifact_root(config.mlflow_uri)
    return mlflow.create_experiment(config.experiment, artifact_location=root.as_uri() if root else None)


def _is_active(mlflow: Any, run_id: str) -> bool:
    try:
        return mlflow.tracking.MlflowClient().get_run(run_id).info.lifecycle_stage == "active"
    except mlflow.exceptions.MlflowException:
        return False


NEIGHBOURING = "add/remove one patient's records"
ASSUMPTION = ("hospitals hold disjoint patients: a patient in one hospital's records is protected by that "
              "hospital's epsilon; a patient treated at several hospitals is protected by the composition of "
              "theirs (at most their sum)")


def privacy_report(config: RunConfig, spends: dict[str, HospitalSpend]) -> dict[str, Any]:
    """Everything needed to recompute each hospital's epsilon, and the run's guarantee.

    Per hospital, its `HospitalSpend` as it reported it: the DP-SGD mechanism (q, sigma, steps,
    with its own clip norm and delta) and its epsilon alone; the run's DP evaluations (`count`
    Gaussian releases of multiplier z); `run_epsilon`, the two composed; and `ledger_epsilon`,
    the hospital's cumulative epsilon for the purpose."""
    hospitals = {name: spend.report_entry(config.target_epsilon) for name, spend in sorted(spends.items())}
    accountants = sorted({spend.accountant for spend in spends.values()})
    return {
        "guarantee": "per-patient (epsilon, delta)-DP for the add/remove-one-patient relation; hospitals hold "
                     "disjoint patients, so the released model is (max_k run_epsilon_k, delta)-DP",
        "neighbouring": NEIGHBOURING,
        "assumption": ASSUMPTION,
        "epsilon_max": max((h["run_epsilon"] for h in hospitals.values()), default=0.0),
        "delta": config.delta,
        # each hospital's entry names its accountant too; they differ only while a node still runs the RDP version
        "accountant": (accountants[0] if len(accountants) == 1 else ACCOUNTANT if not accountants
                       else MIXED_ACCOUNTANTS),
        "cross_checks": [RDP_ACCOUNTANT, PRV_ACCOUNTANT],
        "rdp_orders": list(RDP_ORDERS),
        "recompute": "fedrisk privacy verify privacy_report.json (or privacy.accounting.compose_epsilon([GaussianMechanism"
                     "(q, sigma, steps), GaussianMechanism.gaussian_release(noise_multiplier=z, count=count)], delta, "
                     "accountant=<the hospital's accountant>))",
        "he_parameters": he_parameters(),
        "purpose": config.purpose,
        "hospitals": hospitals,
    }


def track_query(config: RunConfig, result: Any, files: list[Path]) -> str:
    """One MLflow run for one answered cohort query (`server.analytics.QueryResult`): the query
    as parameters, its privacy statement and table as artifacts. Returns the MLflow run id."""
    mlflow = quiet_mlflow()
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    experiment_id = _experiment_id(mlflow, config)
    query = result.query
    with mlflow.start_run(experiment_id=experiment_id, run_name=result.run_id) as run:
        mlflow.set_tags({"fedrisk.kind": "analytics", "fedrisk.query": query.name, "fedrisk.purpose": query.purpose})
        mlflow.log_params({"query." + k: json.dumps(v) if isinstance(v, (list, dict)) else v
                           for k, v in query.to_dict().items()})
        mlflow.log_params({"query.run-id": result.run_id, "noise-multiplier": result.noise_multiplier,
                           "hospitals": ",".join(result.hospitals), "accountant": ACCOUNTANT})
        mlflow.log_metrics({"epsilon": result.epsilon, "seconds": result.seconds,
                            "cells": float(len(result.table)),
                            "suppressed": float(result.table["suppressed"].sum())})
        for path in files:
            mlflow.log_artifact(str(path), artifact_path="query")
    return run.info.run_id
