"""What a finished training run offers for release, read from its MLflow run and checked.

`server.tracking.RunTracker.finish` logs a run's release under the artifact path `release/`:
model.npz, model.sha256, privacy_report.json and run_summary.json, and tags the run with the
model's SHA-256. `read_run_release` downloads those files and refuses, with one line, anything a
release must not rest on: an unknown, deleted or unfinished run, missing files, weights that do
not hash to the logged SHA-256, a run without DP (a zero noise multiplier, zero steps) or without a
DP federated evaluation, or a privacy report whose epsilons do not recompute
(`server.releases.certificates.hospitals_from_report` reads it, `_check_privacy` recomputes it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from federation.errors import FedriskError
from federation.model import weights_digest
from federation.round_evaluation import AUC, BRIER
from privacy.accounting import EPSILON_TOLERANCE
from server.tracking import CALIBRATION_FILE, INPUTS_FILE
from server.releases.certificates import NEIGHBOURING, CertificateError, hospitals_from_report

RELEASE_ARTIFACT_PATH = "release"
MODEL_FILE, DIGEST_FILE, PRIVACY_FILE, SUMMARY_FILE = (
    "model.npz", "model.sha256", "privacy_report.json", "run_summary.json")
RELEASE_FILES = (MODEL_FILE, DIGEST_FILE, PRIVACY_FILE, SUMMARY_FILE)
"""Every release has these; a recalibrated one also CALIBRATION_FILE (`server.tracking`)."""
RUN_SHA256_TAG = "release.sha256"  # set on the training run by server.tracking
FEDERATED_METRICS = (AUC, BRIER)  # logged per round by the training run: the DP federated evaluation
CUTOFF_CLOCK_SLACK = timedelta(days=1)
"""A cut-off may be at most this far past the run's start (UTC), for approvers east of UTC."""


class ReleaseError(FedriskError):
    """A release cannot be found or changed (one line, naming the release)."""


class ReleaseRefused(ReleaseError):
    """A run cannot be released: not finished, no release artifacts, digest mismatch, no DP or no DP
    evaluation, epsilons that do not recompute, released already."""


@dataclass(frozen=True)
class RunRelease:
    """A finished run's checked release files and what the run logged about them.

    Attributes:
        run_id: the MLflow run; source: URI of its `release/` artifacts; files: local directory
        holding the downloaded files; model_kind, n_features, sha256: the model; privacy_report:
        privacy_report.json (checked); federated: the last round's DP federated AUC and Brier
        (absent ones left out); cutoff: the data cut-off as an ISO date; calibration: the Platt map
        the run folded into the model (calibration.json), None for a run that did not recalibrate.
    """

    run_id: str
    source: str
    files: Path
    model_kind: str
    n_features: int
    sha256: str
    privacy_report: dict[str, Any]
    federated: dict[str, float]
    cutoff: str
    calibration: dict[str, Any] | None = None
    inputs: dict[str, Any] | None = None
    """A schema run's inputs.json (input names, label, its meaning, intended use), if it has one."""


def read_run_release(client: Any, run_id: str, staging: Path, cutoff: date | str | None = None) -> RunRelease:
    """Read run `run_id` through an MlflowClient and download its release into `staging` (created;
    the caller removes it). cutoff: the data cut-off date, default the run's start date (UTC)."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ReleaseRefused(f"run {run_id!r} is not in the tracking store {client.tracking_uri}") from None
    if run.info.lifecycle_stage != "active":
        raise ReleaseRefused(f"run {run_id} is deleted")
    if run.info.status != "FINISHED":
        raise ReleaseRefused(f"run {run_id} is {run.info.status}, not FINISHED: only a finished run is released")
    day = _cutoff(cutoff, datetime.fromtimestamp(run.info.start_time / 1000.0, UTC))
    staging.mkdir(parents=True)
    try:
        client.download_artifacts(run_id, RELEASE_ARTIFACT_PATH, str(staging))
    except (MlflowException, OSError):
        pass  # reported below as missing files
    files = staging / RELEASE_ARTIFACT_PATH
    missing = [name for name in RELEASE_FILES if not (files / name).is_file()]
    if missing:
        raise ReleaseRefused(f"run {run_id} has no release artifacts ({RELEASE_ARTIFACT_PATH}/{missing[0]} missing)")
    try:
        with np.load(files / MODEL_FILE, allow_pickle=False) as npz:
            weights, kind, n_features = np.asarray(npz["weights"]), str(npz["model"]), int(npz["n_features"])
        declared = (files / DIGEST_FILE).read_text().split()[0]
        report = json.loads((files / PRIVACY_FILE).read_text())
        calibration = json.loads((files / CALIBRATION_FILE).read_text()) if (files / CALIBRATION_FILE).is_file() else None
        if calibration is not None and not isinstance(calibration, dict):
            raise ValueError(CALIBRATION_FILE)
        inputs = json.loads((files / INPUTS_FILE).read_text()) if (files / INPUTS_FILE).is_file() else None
        if inputs is not None and not (isinstance(inputs, dict) and isinstance(inputs.get("features"), list)
                                       and len(inputs["features"]) == n_features):
            inputs = None  # a description that does not fit the model is not printed on its card
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise ReleaseRefused(f"run {run_id}: its release artifacts are unreadable ({type(exc).__name__})") from None
    digest = weights_digest(weights)
    if declared != digest or run.data.tags.get(RUN_SHA256_TAG, digest) != digest:
        raise ReleaseRefused(f"run {run_id}: {RELEASE_ARTIFACT_PATH}/{DIGEST_FILE} does not match the weights "
                             f"in {MODEL_FILE}")
    _check_privacy(run_id, report)
    return RunRelease(run_id=run_id, source=f"{run.info.artifact_uri.rstrip('/')}/{RELEASE_ARTIFACT_PATH}",
                      files=files, model_kind=kind, n_features=n_features, sha256=digest, privacy_report=report,
                      federated=_last_round(client, run_id), cutoff=day, calibration=calibration, inputs=inputs)


def _cutoff(value: date | str | None, run_started: datetime) -> str:
    """The data cut-off as an ISO date: `value`, or the run's start date (UTC) when None; never
    later than the run could have read data."""
    if value is None:
        return run_started.date().isoformat()
    try:
        day = value if isinstance(value, date) else date.fromisoformat(str(value))
    except ValueError:
        raise ReleaseRefused(f"cutoff must be a date YYYY-MM-DD, got {value!r}") from None
    if day > (run_started + CUTOFF_CLOCK_SLACK).date():
        raise ReleaseRefused(f"cutoff {day.isoformat()} is after the run started ({run_started.date().isoformat()} "
                             "UTC): the run cannot have read later data")
    return day.isoformat()


def _check_privacy(run_id: str, report: dict[str, Any]) -> None:
    """Refuse a privacy report that a certificate must not rest on: one `hospitals_from_report`
    refuses (no DP, no DP evaluation, from before evaluation was DP), a hospital at another delta
    than the run's, an epsilon (DP-SGD, evaluation or run) that does not recompute from its
    parameters, a ledger epsilon below the run's own, an epsilon_max that is not the largest
    run_epsilon, or another neighbouring relation than the accountant's (`NEIGHBOURING`)."""
    from privacy.accounting import recompute_report

    def refuse(message: str) -> ReleaseRefused:
        return ReleaseRefused(f"run {run_id}: {message}")

    try:
        hospitals = hospitals_from_report(report)
        delta, epsilon_max = float(report["delta"]), float(report["epsilon_max"])
        neighbouring, assumption = report["neighbouring"], report["assumption"]
    except CertificateError as error:
        raise refuse(str(error)) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise refuse(f"its privacy report is malformed ({type(exc).__name__}: {exc})") from None
    for name, h in hospitals.items():
        if h.delta != delta:
            raise refuse(f"{name}: delta {h.delta:g} is not the run's delta {delta:g}")
    for check in recompute_report(report):
        if not check.ok:
            raise refuse(f"{check.hospital}'s logged {check.key} {check.logged:.4f} does not recompute from its "
                         f"parameters ({check.recomputed:.4f})")
    for name, h in hospitals.items():
        assert h.run_epsilon is not None and h.ledger_epsilon is not None
        if h.ledger_epsilon < h.run_epsilon - EPSILON_TOLERANCE:
            raise refuse(f"{name}: ledger_epsilon {h.ledger_epsilon:.4f} is below its run_epsilon "
                         f"{h.run_epsilon:.4f}, yet its ledger holds this run's charges")
    largest = max(h.run_epsilon for h in hospitals.values() if h.run_epsilon is not None)
    if abs(epsilon_max - largest) > EPSILON_TOLERANCE:
        raise refuse(f"epsilon_max {epsilon_max:.4f} in its privacy report is not the largest run_epsilon "
                     f"({largest:.4f})")
    if neighbouring != NEIGHBOURING:
        raise refuse(f"its privacy report's neighbouring relation is {neighbouring!r}, not {NEIGHBOURING!r} "
                     "as the accountant assumes")
    if not isinstance(assumption, str) or not assumption.strip():
        raise refuse("its privacy report states no assumption on how patients are spread over hospitals")


def _last_round(client: Any, run_id: str) -> dict[str, float]:
    """The run's federated metrics at its last logged round."""
    metrics: dict[str, float] = {}
    for key in FEDERATED_METRICS:
        history = client.get_metric_history(run_id, key)
        if history:
            value = max(history, key=lambda m: (m.step, m.timestamp)).value
            if np.isfinite(value):
                metrics[key] = float(value)
    return metrics
