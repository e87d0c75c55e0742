"""What a bank reads about a released model: its privacy certificate and its model card.

Both are built from what the training run logged (its privacy report, parameters and federated
metrics) and, for calibration and fairness, from an optional DP evaluation
(`server.dp_evaluation.evaluation_from_tables`); nothing else. A number that was not measured is
not printed: without a DP evaluation, calibration and fairness say `NOT_EVALUATED`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from federation import features as fx
from federation.errors import FedriskError
from server.dp_evaluation import fairness_notes, json_ready

NOT_EVALUATED = "not evaluated under DP for this release"
FAIRNESS_FIELDS = ("age", "sex")  # the group fields a model card reports fairness by
INTENDED_USE = ("Scoring applicants who consented, for 90-day medical-bill delinquency risk; "
                "a credit decision aid, not a sole basis.")
OUT_OF_SCOPE_USES = (
    "Scoring anyone without a valid applicant-scoring consent grant from their hospital.",
    "Using the score as the sole basis of a credit decision, or refusing credit automatically without human review.",
    ("Predicting anything other than 90-day medical-bill delinquency within 12 months (e.g. general credit "
     "default), or using the score for insurance, employment, housing or clinical decisions."),
    "Inferring an applicant's health conditions from their score or reasons.",
    "Populations other than the contributing hospitals' patients without a new evaluation.",
)
FEDERATED_METRICS_BASIS = (
    "Federated evaluation of the last round: each hospital's AUC and Brier score on its own held-out records, "
    "averaged with weights proportional to those records, revealed only as an encrypted aggregate. "
    "The revealed aggregate is not differentially private and carries no interval.")
FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    "demographics": ("age", "sex_female"),
    "insurance": tuple(f"insurance_{name}" for name in fx.INSURANCE_TYPES),
    "employment": tuple(f"employment_{name}" for name in fx.EMPLOYMENT_STATUSES),
    "chronic conditions": fx.CHRONIC_CONDITIONS,
    "laboratory results": fx.LAB_COLUMNS,
    "utilisation": fx.UTILISATION_COLUMNS,
    "charges": ("total_charges_log", "out_of_pocket_log"),
    "billing history": ("prior_late_payments_24m", "on_payment_plan", "balance_outstanding_log",
                        "months_since_last_payment", "statements_sent_12m"),
    "area": tuple(f"area_{name}" for name in fx.AREA_TYPES),
}
"""The standard 40 model inputs (`federation.features.FEATURE_NAMES`) by what they describe."""


class CertificateError(FedriskError):
    """A run's logged privacy report is missing something, or a stored certificate or card is malformed."""


@dataclass(frozen=True)
class HospitalPrivacy:
    """One hospital's DP-SGD spend, as its run logged it: enough to recompute its epsilon
    (`privacy.accounting.epsilon_for`)."""

    epsilon: float
    delta: float
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float


@dataclass(frozen=True)
class PrivacyCertificate:
    """The privacy guarantee of one release, built only from the training run's logged privacy report.

    Attributes:
        release_id: the release (`r<version>` of the registry).
        model_sha256: SHA-256 of the released weights (float32 little-endian), as in model.sha256.
        mlflow_run_id: the training run the release came from.
        purpose: the run's declared purpose; only records consenting to it were trained on.
        data_cutoff: ISO date of the latest data the run could have read (stated by the approver).
        issued: UTC ISO timestamp of the release.
        hospitals: number of hospitals whose DP-SGD spend the run logged.
        records: None unless a DP evaluation table was supplied: the coordinator never learns any
            hospital's record count. With a table, it is that table's DP noised record count (the
            evaluation cohort of held-out records, not the training set), rounded.
        records_basis: which of the two `records` is, in words.
        epsilon_max, delta: the release's (epsilon, delta)-DP guarantee per patient (hospitals hold
            disjoint patients, so the maximum over hospitals).
        guarantee: the guarantee in words, as the run stated it.
        accountant: the privacy accountant that computed every epsilon.
        he_parameters: the CKKS parameters the updates were aggregated under.
        per_hospital: hospital name -> its `HospitalPrivacy`.
    """

    release_id: str
    model_sha256: str
    mlflow_run_id: str
    purpose: str
    data_cutoff: str
    issued: str
    hospitals: int
    records: int | None
    records_basis: str
    epsilon_max: float
    delta: float
    guarantee: str
    accountant: str
    he_parameters: dict[str, Any]
    per_hospital: dict[str, HospitalPrivacy]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return json_ready(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyCertificate:
        """Read back `to_dict` output (raises CertificateError if a field is missing)."""
        try:
            values = {f.name: data[f.name] for f in fields(cls)}
            values["per_hospital"] = {name: HospitalPrivacy(**spend) for name, spend in data["per_hospital"].items()}
        except (KeyError, TypeError, AttributeError) as exc:
            raise CertificateError(f"not a fedrisk privacy certificate ({type(exc).__name__}: {exc})") from None
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> PrivacyCertificate:
        return cls.from_dict(json.loads(text))


def build_certificate(*, release_id: str, model_sha256: str, mlflow_run_id: str, privacy_report: Mapping[str, Any],
                      cutoff: str, issued: str, evaluation: Mapping[str, Any] | None = None) -> PrivacyCertificate:
    """The certificate of a release from its run's `privacy_report.json` (see
    `server.tracking.privacy_report`) and, for `records`, an `evaluation_from_tables` result."""
    try:
        per_hospital = {name: HospitalPrivacy(
            epsilon=float(h["epsilon"]), delta=float(h["delta"]), mechanism=str(h["mechanism"]),
            noise_multiplier=float(h["noise_multiplier"]), sample_rate=float(h["sample_rate"]),
            steps=int(h["steps"]), clip_norm=float(h["clip_norm"]))
            for name, h in sorted(privacy_report["hospitals"].items())}
        report = {key: privacy_report[key] for key in ("epsilon_max", "delta", "guarantee", "accountant",
                                                        "he_parameters", "purpose")}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CertificateError(f"the run's privacy report lacks {exc} or has it malformed") from None
    if not per_hospital:
        raise CertificateError("the run's privacy report names no hospital")
    if evaluation is None:
        records, basis = None, "not known: each hospital's record count stays at the hospital"
    else:
        overall = evaluation["overall"]
        records = round(float(overall["records"]))
        basis = (f"DP noised record count of the evaluation table ({overall['table']!r}): held-out records "
                 "scored in the DP evaluation, not the training set size")
    return PrivacyCertificate(
        release_id=release_id, model_sha256=model_sha256, mlflow_run_id=mlflow_run_id,
        purpose=str(report["purpose"]), data_cutoff=cutoff, issued=issued, hospitals=len(per_hospital),
        records=records, records_basis=basis, epsilon_max=float(report["epsilon_max"]),
        delta=float(report["delta"]), guarantee=str(report["guarantee"]), accountant=str(report["accountant"]),
        he_parameters=dict(report["he_parameters"]), per_hospital=per_hospital)


@dataclass(frozen=True)
class ModelCard:
    """What the released model is for, how well it does, and where it falls short.

    Attributes:
        release_id, model_sha256: the release and its weights.
        model_kind, n_features: the architecture ("logreg", "mlp", ...) and its number of inputs.
        intended_use, out_of_scope_uses: fixed text (`INTENDED_USE`, `OUT_OF_SCOPE_USES`).
        features: the model's inputs in column order, as [{"group": what they describe, "inputs":
            [model input names]}] (`FEATURE_GROUPS` for the standard contract).
        federated_auc, federated_brier: the last round's federated evaluation (see `federated_basis`).
        federated_basis: what those two numbers are (`FEDERATED_METRICS_BASIS`).
        calibration: NOT_EVALUATED, or {"basis", "source", "overall": rows, "groups": {field: {group: rows}}}
            where a row is {bin_low, bin_high, mean_predicted (bin midpoint), observed_rate, se, n}.
        fairness: NOT_EVALUATED, or {"basis", "source", "overall": summary, "groups": {field: {group: summary}},
            "gaps": {field: {"auc": gap, "calibration_offset": gap}}}; a summary holds auc,
            calibration_offset and their `_ci95` intervals, observed_rate, mean_predicted,
            positives, negatives, records (`server.dp_evaluation.evaluation_from_tables`).
        fairness_notes: sentences on the AUC and calibration gaps by age band and sex, with intervals.
        limitations: sentences a user of the score must know.
    """

    release_id: str
    model_sha256: str
    model_kind: str
    n_features: int
    intended_use: str
    out_of_scope_uses: list[str]
    features: list[dict[str, Any]]
    federated_auc: float | None
    federated_brier: float | None
    federated_basis: str
    calibration: dict[str, Any] | str
    fairness: dict[str, Any] | str
    fairness_notes: list[str] = field(default_factory=list)
    limitations: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return json_ready(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        """Read back `to_dict` output (raises CertificateError if a field is missing)."""
        try:
            return cls(**{f.name: data[f.name] for f in fields(cls)})
        except (KeyError, TypeError) as exc:
            raise CertificateError(f"not a fedrisk model card ({type(exc).__name__}: {exc})") from None

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        return cls.from_dict(json.loads(text))


def build_model_card(*, release_id: str, model_sha256: str, model_kind: str, n_features: int, purpose: str,
                     hospitals: int, epsilon_max: float, delta: float, federated_auc: float | None,
                     federated_brier: float | None, evaluation: Mapping[str, Any] | None = None) -> ModelCard:
    """The card of a release: fixed use statements, the run's federated metrics, and calibration and
    fairness from `evaluation` (an `evaluation_from_tables` result) or NOT_EVALUATED without one."""
    standard = n_features == len(fx.FEATURE_NAMES)
    groups = FEATURE_GROUPS if standard else {"schema-encoded inputs": tuple(f"input_{i}" for i in range(n_features))}
    features = [{"group": group, "inputs": list(names)} for group, names in groups.items()]
    limitations = [
        (f"Trained with DP-SGD at (epsilon {epsilon_max:.3g}, delta {delta:g}) per patient on records of "
         f"{hospitals} hospitals whose patients consented to {purpose}; the DP noise costs accuracy, and "
         "performance on other populations is unknown."),
        "The label is 90-day medical-bill delinquency within 12 months; it is not general credit default.",
        FEDERATED_METRICS_BASIS,
    ]
    if not standard:
        limitations.append(f"Inputs were encoded from the hospitals' export schema ({n_features} inputs), "
                           "not the standard credit-risk contract; reason codes are not available.")
    if evaluation is None:
        calibration: dict[str, Any] | str = NOT_EVALUATED
        fairness: dict[str, Any] | str = NOT_EVALUATED
        notes = [f"Calibration and fairness by age band and sex: {NOT_EVALUATED}."]
        limitations.append(notes[0])
    else:
        source = str(evaluation.get("source") or "DP evaluation tables supplied at release")
        calibration = {"basis": evaluation["basis"], "source": source,
                       "overall": evaluation["overall"]["calibration"],
                       "groups": {g: {label: s["calibration"] for label, s in groups.items()}
                                  for g, groups in evaluation["groups"].items()}}
        fairness = {"basis": evaluation["basis"], "source": source, "overall": _summary(evaluation["overall"]),
                    "groups": {g: {label: _summary(s) for label, s in groups.items()}
                               for g, groups in evaluation["groups"].items()},
                    "gaps": evaluation["gaps"]}
        notes = fairness_notes(evaluation) + [f"By {name}: {NOT_EVALUATED}." for name in FAIRNESS_FIELDS
                                              if name not in evaluation["groups"]]
        limitations += [
            f"DP evaluation: AUC is that of the score grouped into {len(evaluation['bins']) - 1} bins (ties "
            "within a bin count half); negative noised counts are taken as zero; " + evaluation["basis"] + ".",
            *notes]
    return ModelCard(
        release_id=release_id, model_sha256=model_sha256, model_kind=model_kind, n_features=n_features,
        intended_use=INTENDED_USE, out_of_scope_uses=list(OUT_OF_SCOPE_USES), features=features,
        federated_auc=federated_auc, federated_brier=federated_brier, federated_basis=FEDERATED_METRICS_BASIS,
        calibration=calibration, fairness=fairness, fairness_notes=notes, limitations=limitations)


def _summary(stats: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stats.items() if k not in ("calibration", "table")}
