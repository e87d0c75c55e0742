"""The release registry: which trained models a bank may use, with their certificates and cards.

A release is a version of the MLflow registered model `fedrisk-credit-risk` whose source is a
finished training run's `release/` artifacts (model.npz, model.sha256, privacy_report.json,
run_summary.json). Its privacy certificate and model card (`server.releases.certificates`) are stored as
JSON tags on the model version, and its status (`active` or `withdrawn`) as a tag too.

Where things live:
* the training runs: the tracking store at `tracking_uri` (the workspace's `mlflow.db` for runs
  the CLI made, `federation.workspace`), read only when a release is created;
* the registry: MLflow's Model Registry at `registry_uri`: the CLI gives the workspace's store, so
  runs and releases are in one place (a registry made before workspaces keeps its own
  `<registry_dir>/registry.db`); without one, `<registry_dir>/registry.db`;
* `<registry_dir>/releases/<release_id>/`: the release's model.npz and model.sha256 (what a hospital
  node installs), certificate.json, model_card.json and release.json, downloaded once;
* `<registry_dir>/release_audit.sqlite`: the hash-chained audit log of every create, withdrawal
  and refusal (`privacy.audit`).

Release ids are `r<version>` ("r3" for version 3): URL-safe, unlike "fedrisk-credit-risk/3".
Creating and withdrawing take an exclusive lock on `<registry_dir>/.lock` (one machine).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pandas as pd

from federation.errors import FedriskError
from federation.model import weights_digest
from federation.workspace import REGISTRY_POINTER, record_registry_store, registry_store, sqlite_path
from privacy.audit import (RELEASE_APPROVE, RELEASE_CREATE, RELEASE_WITHDRAW, ROLE_SERVER, AuditIdentifierError,
                           AuditLog, Digest, hospital_names)
from server.releases.approvals import Approval, ApprovalStore, missing_approvals
from server.releases.certificates import (
    ModelCard,
    PrivacyCertificate,
    build_certificate,
    build_model_card,
)
from server.releases.dp_evaluation import DPEvaluation, evaluation_from_tables
from server.releases.membership import AuditTable, release_section
from server.calibration import release_problems
from server.tracking import quiet_mlflow
from server.releases.run_artifacts import (
    DIGEST_FILE,
    MODEL_FILE,
    ReleaseError,
    ReleaseRefused,
    RunRelease,
    read_run_release,
)


__all__ = ["Release", "ReleaseError", "ReleaseNotFound", "ReleaseRefused", "ReleaseRegistry", "release_id_of"]

REGISTERED_MODEL = "fedrisk-credit-risk"
REGISTRY_DB, RELEASES_DIR, LOCK_FILE = "registry.db", "releases", ".lock"
RELEASE_AUDIT_FILE = "release_audit.sqlite"
CERTIFICATE_FILE, CARD_FILE, RELEASE_FILE = "certificate.json", "model_card.json", "release.json"
STATUS_ACTIVE, STATUS_WITHDRAWN = "active", "withdrawn"
AUDIT_IDENTITY = "release-registry"
TAG_STATUS, TAG_SHA256, TAG_APPROVER, TAG_CUTOFF = (
    "fedrisk.status", "fedrisk.sha256", "fedrisk.approved-by", "fedrisk.cutoff")
TAG_CERTIFICATE, TAG_CARD, TAG_TRACKING = "fedrisk.certificate", "fedrisk.model-card", "fedrisk.tracking-uri"
TAG_WITHDRAWN_BY, TAG_WITHDRAWN_REASON, TAG_WITHDRAWN_AT = (
    "fedrisk.withdrawn-by", "fedrisk.withdrawn-reason", "fedrisk.withdrawn-at")
RELEASE_ID_PATTERN = re.compile(r"^r([1-9][0-9]{0,8})$")
MAX_TEXT = 300  # longest approver, withdrawer or reason kept
WITHHELD = "withheld by the identifier filter"


class ReleaseNotFound(ReleaseError):
    """No release has this id."""


@dataclass(frozen=True)
class Release:
    """One release as the registry holds it.

    Attributes:
        release_id: `r<version>`; version: the MLflow model version; run_id: the training run;
        sha256: of the weights; status: "active" or "withdrawn"; created: UTC ISO timestamp;
        certificate, card: its privacy certificate and model card; model_dir: local directory
        holding model.npz and model.sha256 (and the JSON files); approved_by: who approved it;
        withdrawn_reason: why it was withdrawn ("" while active).
    """

    release_id: str
    version: int
    run_id: str
    sha256: str
    status: str
    created: str
    certificate: PrivacyCertificate
    card: ModelCard
    model_dir: Path
    approved_by: str = ""
    withdrawn_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what `fedrisk release show` prints and an API returns)."""
        return {"release_id": self.release_id, "version": self.version, "run_id": self.run_id,
                "sha256": self.sha256, "status": self.status, "created": self.created,
                "approved_by": self.approved_by, "withdrawn_reason": self.withdrawn_reason,
                "model_dir": str(self.model_dir), "certificate": self.certificate.to_dict(),
                "model_card": self.card.to_dict()}


def release_id_of(version: int | str) -> str:
    """The release id of an MLflow model version."""
    return f"r{int(version)}"


def _text(value: str, what: str) -> str:
    text = " ".join(str(value or "").split())
    if not text:
        raise ReleaseError(f"{what} must not be empty")
    if len(text) > MAX_TEXT:
        raise ReleaseError(f"{what} is longer than {MAX_TEXT} characters")
    return text


class ReleaseRegistry:
    """Releases of `fedrisk-credit-risk`, created from training runs in the tracking store.

    tracking_uri: the MLflow tracking store holding the training runs (only `create` needs it;
    "" is fine for listing, reading and withdrawing). registry_dir: the registry's directory (see
    the module docstring). registry_uri: the MLflow Model Registry; default SQLite in registry_dir.
    """

    def __init__(self, tracking_uri: str, registry_dir: Path, registry_uri: str = "", *,
                 must_exist: bool = False) -> None:
        self.registry_dir = Path(registry_dir).resolve()
        registry_uri = registry_uri or registry_store(self.registry_dir)
        store = sqlite_path(registry_uri)
        if must_exist and (not (self.registry_dir / RELEASE_AUDIT_FILE).is_file()
                           or (store is not None and not store.is_file())):
            raise ReleaseError(f"--registry {registry_dir}: no release registry there (no release has been created in "
                               f"it{'' if store is None else ' with the store ' + str(store)}; `fedrisk release create` "
                               "makes one)")
        quiet_mlflow()
        from mlflow.tracking import MlflowClient  # slow to import: only here

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.tracking_uri = tracking_uri
        self.registry_dir.mkdir(parents=True, exist_ok=True)
        self.registry_uri = registry_uri
        if not must_exist and not (self.registry_dir / REGISTRY_POINTER).is_file():  # later readers find the store
            record_registry_store(self.registry_dir, registry_uri)
        self.client = MlflowClient(tracking_uri=tracking_uri or self.registry_uri, registry_uri=self.registry_uri)
        self.audit = AuditLog(self.registry_dir / RELEASE_AUDIT_FILE, role=ROLE_SERVER, identity=AUDIT_IDENTITY)

    # --- reading -----------------------------------------------------------------------------
    def list(self) -> list[Release]:
        """Every release, oldest first, withdrawn ones included (filter on `status`). A version still
        being created (no certificate yet) is not a release and is left out."""
        versions = sorted((v for v in self._versions() if _complete(v)), key=lambda v: int(v.version))
        return [self._release(v) for v in versions]

    def run_ids(self) -> set[str]:
        """The training runs behind every model version: releases live or withdrawn, and versions still
        being created (retention keeps all of them, `server.releases.retention`)."""
        return {str(v.run_id) for v in self._versions() if v.run_id}

    def get(self, release_id: str) -> Release:
        """The release `release_id`, its model files in `model_dir`; raises ReleaseNotFound."""
        return self._release(self._version(release_id))

    # --- changing ----------------------------------------------------------------------------
    def approve(self, mlflow_run_id: str, role: str, by: str, hospital: str = "") -> Approval:
        """Record an approval of a finished run's model (`server.releases.approvals`); audited. The
        run must be in the tracking store; the approval binds to its model's SHA-256."""
        if not self.tracking_uri:
            raise ReleaseRefused("no tracking URI: say where the run's MLflow store is")
        staging = self.registry_dir / f".staging-{uuid.uuid4().hex}"
        with self._lock():
            try:
                run = read_run_release(self.client, str(mlflow_run_id), staging)
                approval = ApprovalStore(self.registry_dir).add(run.run_id, run.sha256, role, by, hospital)
            except FedriskError as error:
                self.audit.refusal(error)
                raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            details = {"run": run.run_id, "sha256": Digest(run.sha256), "role": role, "by": approval.by,
                       "hospital": approval.hospital or None}
            try:
                self.audit.append(RELEASE_APPROVE, purpose=str(run.privacy_report.get("purpose") or "") or None,
                                  details=details)
            except AuditIdentifierError:
                self.audit.append(RELEASE_APPROVE, details={**details, "by": WITHHELD})
            return approval

    def create(self, mlflow_run_id: str, approved_by: str, cutoff: date | str | None = None,
               evaluation: DPEvaluation | None = None, accept_miscalibration: str = "",
               audit: AuditTable | None = None, unaudited: str = "") -> Release:
        """Release a finished training run. Refuses (ReleaseRefused, one line, audited) a run that is
        unknown, not FINISHED, without release artifacts, whose model.sha256 does not match its
        weights, whose privacy report shows no DP or no DP federated evaluation or does not
        recompute (`server.releases.run_artifacts`), that is released already, or that comes without a DP
        evaluation of its model.

        approved_by: who approved it (recorded, audited as "approver"). cutoff: the data cut-off
        date (default: the run's start date, the latest data it can have read). evaluation: the DP
        evaluation tables of the run's model (`fedrisk release evaluate`, read by
        `server.releases.dp_evaluation.load_evaluation`), required: they give the card's calibration and
        fairness and the certificate's record count. Tables that do not name this run's model by its
        SHA-256, or that carry no noise, are refused.

        The evaluation is also the release's calibration check (`server.calibration.release_problems`):
        a model the run did not recalibrate, a calibration offset the noise leaves undefined or beyond
        `CALIBRATION_TOLERANCE`, or a risk band whose observed rate lies outside it is refused unless
        `accept_miscalibration` gives the reason to release anyway; the reason, the approver and the
        problems then go on the certificate (`calibration_override`) and into the audit log.

        audit: the release's empirical privacy audit (`fedrisk release audit`, read by
        `server.releases.membership.load_audit`); required unless `unaudited` gives the reason to
        release without one, which then goes on the certificate. An audit of another model, without
        noise, or whose epsilon lower bound exceeds the accounted epsilon is refused
        (`server.releases.membership.release_section`).
        """
        with self._lock():
            try:
                if not self.tracking_uri:
                    raise ReleaseRefused("no tracking URI: say where the run's MLflow store is "
                                         "(--tracking-uri, or --run-dir for a `fedrisk run --out` directory)")
                override = _text(accept_miscalibration, "accept-miscalibration") if accept_miscalibration else ""
                waiver = _text(unaudited, "no-audit") if unaudited else ""
                return self._create(str(mlflow_run_id), _text(approved_by, "approved-by"), cutoff, evaluation, override,
                                    audit, waiver)
            except FedriskError as error:
                self.audit.refusal(error)
                raise

    def withdraw(self, release_id: str, by: str, reason: str) -> Release:
        """Mark a release withdrawn (every reader sees it at once); audited. Raises ReleaseError if it
        is unknown or withdrawn already."""
        by, reason = _text(by, "withdrawn-by"), _text(reason, "reason")
        with self._lock():
            version = self._version(release_id)
            if version.tags.get(TAG_STATUS) == STATUS_WITHDRAWN:
                raise ReleaseError(f"release {release_id} is already withdrawn")
            now = datetime.now(UTC).isoformat(timespec="seconds")
            for key, value in ((TAG_WITHDRAWN_BY, by), (TAG_WITHDRAWN_REASON, reason), (TAG_WITHDRAWN_AT, now),
                               (TAG_STATUS, STATUS_WITHDRAWN)):
                self.client.set_model_version_tag(REGISTERED_MODEL, version.version, key, value)
            release = self._release(self._version(release_id), fetch=False)  # stands even if files are lost
            if release.model_dir.is_dir():
                self._write_release_json(release)
            details = {"release": release_id, "run": release.run_id, "sha256": Digest(release.sha256), "by": by,
                       "reason": reason}
            try:
                self.audit.append(RELEASE_WITHDRAW, purpose=release.certificate.purpose, details=details)
            except AuditIdentifierError:  # the withdrawal stands; its words are kept in the registry only
                self.audit.append(RELEASE_WITHDRAW, purpose=release.certificate.purpose,
                                  details={**details, "by": WITHHELD, "reason": WITHHELD})
            return release

    # --- internals ---------------------------------------------------------------------------
    def _create(self, run_id: str, approver: str, cutoff: date | str | None,
                evaluation: DPEvaluation | None, override: str, audit: AuditTable | None, waiver: str) -> Release:
        staging = self.registry_dir / f".staging-{uuid.uuid4().hex}"
        try:
            run = read_run_release(self.client, run_id, staging, cutoff)
            mine = [v for v in self._versions() if v.run_id == run_id]
            for abandoned in (v for v in mine if not _complete(v)):  # left by a create that was killed
                self.client.delete_model_version(REGISTERED_MODEL, abandoned.version)
            released = [v for v in mine if _complete(v)]
            if released:
                raise ReleaseRefused(f"run {run_id} is already released as {release_id_of(released[0].version)} "
                                     f"({released[0].tags.get(TAG_STATUS, '?')})")
            summary = self._evaluation(evaluation, run.sha256)
            problems = release_problems(summary["overall"], run.calibration)
            if problems and not override:
                raise ReleaseRefused(f"run {run_id}: {'; '.join(problems)} (to release it anyway, give the reason: "
                                     "--accept-miscalibration REASON; it goes on the certificate)")
            accepted = {"reason": override, "by": approver, "problems": problems} if problems else None
            audited = release_section(audit, waiver, approver=approver, model_sha256=run.sha256,
                                      privacy_report=run.privacy_report)
            approvals = ApprovalStore(self.registry_dir).of(run_id, run.sha256)
            lacking = missing_approvals(approvals)
            if lacking:
                raise ReleaseRefused(f"run {run_id}: {lacking} (a release needs a data scientist's and a hospital "
                                     f"operator's: fedrisk release approve {run_id} --role data-scientist|"
                                     "hospital-operator)")
            return self._register(run, approver, summary, accepted, audited, approvals)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def _evaluation(evaluation: DPEvaluation | None, digest: str) -> dict[str, Any]:
        """The release's DP evaluation summary; refuses none, one of another (or no named) model,
        and tables whose counts carry no noise (an se of 0 is an exact, non-DP count)."""
        if evaluation is None:
            raise ReleaseRefused("a release needs a DP evaluation of its model: run `fedrisk release evaluate` "
                                 "and pass the tables it names (--evaluation)")
        if not isinstance(evaluation, DPEvaluation):
            raise ReleaseRefused(f"the DP evaluation must be a DPEvaluation naming the model it scored, not "
                                 f"{type(evaluation).__name__}")
        if evaluation.model_sha256 != digest:
            scored = f"model {evaluation.model_sha256[:12]}..." if evaluation.model_sha256 else "no named model"
            raise ReleaseRefused(f"the DP evaluation scored {scored}, not this run's model {digest[:12]}...")
        for name, frame in evaluation.tables.items():
            if isinstance(frame, pd.DataFrame) and {"count", "se", "suppressed"} <= set(frame.columns):
                counts = pd.to_numeric(frame["count"], errors="coerce")
                shown = frame[~frame["suppressed"].astype(bool) & np.isfinite(counts)]
                if not (pd.to_numeric(shown["se"], errors="coerce") > 0.0).all():
                    raise ReleaseRefused(f"evaluation table {name!r}: a count without a positive se carries no DP "
                                         "noise")
        summary = evaluation_from_tables(evaluation.tables)
        summary["source"], summary["epsilon"] = evaluation.source, evaluation.epsilon
        return summary

    def _register(self, run: RunRelease, approver: str, evaluation: dict[str, Any],
                  calibration_override: dict[str, Any] | None, privacy_audit: dict[str, Any],
                  approvals: list[Approval]) -> Release:
        """Create the model version, its certificate and card, the local copy and the audit entry;
        undo the version if any later step fails."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(REGISTERED_MODEL, description=(
                "Federated DP credit-risk models (fedrisk); each version is one approved release."))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self.client.create_model_version(
            REGISTERED_MODEL, run.source, run_id=run.run_id, description=f"fedrisk release of run {run.run_id}",
            tags={TAG_STATUS: STATUS_ACTIVE, TAG_SHA256: run.sha256, TAG_APPROVER: approver, TAG_CUTOFF: run.cutoff,
                  TAG_TRACKING: _without_credentials(self.tracking_uri)})
        release_id = release_id_of(version.version)
        target = self.registry_dir / RELEASES_DIR / release_id
        try:
            certificate = build_certificate(
                release_id=release_id, model_sha256=run.sha256, mlflow_run_id=run.run_id,
                privacy_report=run.privacy_report, cutoff=run.cutoff,
                issued=datetime.now(UTC).isoformat(timespec="seconds"), evaluation=evaluation,
                calibration_override=calibration_override, privacy_audit=privacy_audit,
                approvals=[a.to_dict() for a in approvals])
            card = build_model_card(
                release_id=release_id, model_sha256=run.sha256, model_kind=run.model_kind, n_features=run.n_features,
                purpose=certificate.purpose, hospitals=certificate.hospitals, epsilon_max=certificate.epsilon_max,
                delta=certificate.delta, federated_auc=run.federated.get("auc"),
                federated_brier=run.federated.get("brier"), evaluation=evaluation, recalibration=run.calibration,
                inputs=run.inputs)
            for tag, document in ((TAG_CERTIFICATE, certificate.to_dict()), (TAG_CARD, card.to_dict())):
                self.client.set_model_version_tag(REGISTERED_MODEL, version.version, tag, json.dumps(document))
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            run.files.rename(target)
            release = self.get(release_id)
            self.audit.append(RELEASE_CREATE, purpose=certificate.purpose, details={
                "release": release_id, "run": run.run_id, "sha256": Digest(run.sha256), "approver": approver,
                "cutoff": run.cutoff, "dp-evaluated": True, "recalibrated": run.calibration is not None,
                "calibration-override": calibration_override is not None,
                "privacy-audited": bool(privacy_audit["audited"]),
                "approvals": hospital_names(f"{a.role}:{a.hospital or '-'}" for a in approvals)})
        except BaseException:
            self.client.delete_model_version(REGISTERED_MODEL, version.version)
            shutil.rmtree(target, ignore_errors=True)
            raise
        return release

    def _versions(self) -> Iterator[Any]:
        """Every model version of the registered model (none before the first release)."""
        token = None
        while True:
            page = self.client.search_model_versions(f"name='{REGISTERED_MODEL}'", page_token=token)
            yield from page
            token = page.token
            if not token:
                return

    def _version(self, release_id: str) -> Any:
        from mlflow.exceptions import MlflowException

        match = RELEASE_ID_PATTERN.match(str(release_id))
        if not match:
            raise ReleaseNotFound(f"no release {release_id!r}: release ids look like r1, r2, ...")
        try:
            version = self.client.get_model_version(REGISTERED_MODEL, match.group(1))
        except MlflowException:
            raise ReleaseNotFound(f"no release {release_id}") from None
        if not _complete(version):
            raise ReleaseNotFound(f"no release {release_id} (it is being created, or its creation failed)")
        return version

    def _release(self, version: Any, fetch: bool = True) -> Release:
        """The Release of a complete model version; with `fetch`, its model files made local."""
        release_id = release_id_of(version.version)
        tags = version.tags
        certificate = PrivacyCertificate.from_json(tags[TAG_CERTIFICATE])
        card = ModelCard.from_json(tags[TAG_CARD])
        sha256 = tags[TAG_SHA256]
        release = Release(
            release_id=release_id, version=int(version.version), run_id=version.run_id, sha256=sha256,
            status=tags.get(TAG_STATUS, STATUS_WITHDRAWN), created=datetime.fromtimestamp(
                version.creation_timestamp / 1000.0, UTC).isoformat(timespec="seconds"),
            certificate=certificate, card=card, model_dir=self.registry_dir / RELEASES_DIR / release_id,
            approved_by=tags.get(TAG_APPROVER, ""), withdrawn_reason=tags.get(TAG_WITHDRAWN_REASON, ""))
        if fetch:
            self._materialise(release, version.source)
        return release

    def _materialise(self, release: Release, source: str) -> None:
        """Make `release.model_dir` hold the model files (downloading them from the version's source
        once, checking the SHA-256) and the release's JSON files."""
        directory = release.model_dir
        digest_file = directory / DIGEST_FILE
        if not (directory / MODEL_FILE).is_file() or not digest_file.is_file():
            from mlflow.artifacts import download_artifacts

            staging = self.registry_dir / f".staging-{uuid.uuid4().hex}"
            try:
                fetched = Path(download_artifacts(artifact_uri=source, dst_path=str(staging),
                                                  tracking_uri=self.tracking_uri or None))
                with np.load(fetched / MODEL_FILE, allow_pickle=False) as npz:
                    if weights_digest(npz["weights"]) != release.sha256:
                        raise ReleaseError(f"release {release.release_id}: the model at {source} no longer matches "
                                           "its SHA-256")
                shutil.rmtree(directory, ignore_errors=True)
                directory.parent.mkdir(parents=True, exist_ok=True)
                fetched.rename(directory)
            except (OSError, ValueError, KeyError) as exc:
                raise ReleaseError(f"release {release.release_id}: its model is not in {directory} and cannot be "
                                   f"read from {source} ({type(exc).__name__})") from None
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        elif digest_file.read_text().split()[:1] != [release.sha256]:
            raise ReleaseError(f"release {release.release_id}: {digest_file} does not match the registry's SHA-256")
        if not (directory / RELEASE_FILE).is_file():
            (directory / CERTIFICATE_FILE).write_text(release.certificate.to_json())
            (directory / CARD_FILE).write_text(release.card.to_json())
        self._write_release_json(release)

    @staticmethod
    def _write_release_json(release: Release) -> None:
        """release.json: what a hospital node needs to know about the release, status included."""
        record = {"release": release.release_id, "model": release.card.model_kind,
                  "n_features": release.card.n_features, "sha256": release.sha256, "status": release.status,
                  "run": release.run_id, "created": release.created}
        path = release.model_dir / RELEASE_FILE
        if path.is_file() and json.loads(path.read_text()) == record:
            return
        tmp = path.with_name(f"{RELEASE_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(path)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.registry_dir / LOCK_FILE, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _complete(version: Any) -> bool:
    """Whether a model version carries everything a release has (a killed create leaves less)."""
    return all(tag in version.tags for tag in (TAG_CERTIFICATE, TAG_CARD, TAG_SHA256))


def _without_credentials(uri: str) -> str:
    """A tracking URI fit to store: any user:password@ part removed."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])) if "@" in parts.netloc else uri
