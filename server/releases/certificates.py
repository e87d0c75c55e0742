"""What a bank reads about a released model: its privacy certificate and its model card.

Both are built from what the training run logged (its privacy report, parameters and DP federated
metrics) and, for calibration, fairness and the record count, from the release's DP evaluation
(`server.releases.dp_evaluation.evaluation_from_tables`); nothing else. A number that was not measured
under DP is not printed: a group field the evaluation did not cover says `NOT_EVALUATED`.

`hospitals_from_report` is the one reader of a privacy report's per-hospital entries: it refuses,
naming the hospital and the field, a run without DP (a zero noise multiplier, zero steps), without
a DP evaluation, or from before evaluation was DP. `server.releases.run_artifacts` recomputes what it reads.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from federation import features as fx
from federation.errors import FedriskError
from privacy.accounting import ACCOUNTANT, ACCOUNTANTS
from privacy.ledger import GaussianMechanism, compose_epsilon
from server.calibration import band_rates
from server.releases.dp_evaluation import fairness_notes, json_ready

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
FEDERATED_EVALUATION_BASIS = (
    "DP federated evaluation, last round, of the model as trained (before recalibration, which keeps its "
    "ranking): pooled DP AUC and Brier score, read off the sum over hospitals of their Gaussian-noised score "
    "histograms of their own held-out records (each charged to the hospital's privacy ledger: the "
    "certificate's per-hospital evaluation). The AUC is that of the pooled binned scores, not a mean of "
    "per-hospital AUCs; the figures carry the DP noise and no interval.")
NEIGHBOURING = "add/remove one patient's records"
"""The neighbouring relation every epsilon here is computed for (Poisson sampling, the certificate's accountant)."""
EVALUATION_MECHANISM = "gaussian"  # each round's DP federated evaluation: a plain Gaussian release
REPORT_KEYS_SINCE_DP_EVALUATION = ("evaluation", "run_epsilon", "ledger_epsilon")
LEDGER_BASIS = (
    "ledger_epsilon is each hospital's cumulative epsilon for the purpose after this run, as its own budget "
    "ledger reported it: it composes every charge to the purpose, this run's included, and cannot be "
    "recomputed from this certificate (it is never below the hospital's run_epsilon).")
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
class EvaluationPrivacy:
    """One hospital's DP federated evaluation during the run: `count` releases of the Gaussian
    mechanism with noise multiplier `noise_multiplier` (one per evaluated round), and their
    `epsilon` alone at the certificate's delta."""

    mechanism: str
    noise_multiplier: float
    count: int
    epsilon: float


@dataclass(frozen=True)
class HospitalPrivacy:
    """One hospital's privacy spend on the run, as the run logged it: enough to recompute every
    epsilon but `ledger_epsilon` (`mechanisms` and `privacy.ledger.compose_epsilon`).

    Attributes:
        epsilon: DP-SGD alone, the Poisson-subsampled Gaussian mechanism (sample_rate,
            noise_multiplier, steps) at `delta`; clip_norm is its per-sample L2 bound.
        run_epsilon: the run's whole epsilon at this hospital: DP-SGD composed with `evaluation`.
        ledger_epsilon: the hospital's cumulative epsilon for the purpose after the run, from its
            own ledger (reported by the node, not recomputable; see `LEDGER_BASIS`).
        evaluation: the run's DP federated evaluation at this hospital.
    The last three are None only on a certificate issued before the federated evaluation was DP.
    """

    epsilon: float
    delta: float
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    run_epsilon: float | None = None
    ledger_epsilon: float | None = None
    evaluation: EvaluationPrivacy | None = None

    @classmethod
    def from_report(cls, name: str, entry: Mapping[str, Any]) -> HospitalPrivacy:
        """One hospital's entry of a privacy report, checked field by field: refuses (CertificateError,
        naming `name` and the field) a spend without DP noise, steps or a DP evaluation."""
        if not isinstance(entry, Mapping):
            raise CertificateError(f"{name}: its privacy report entry is not a mapping")
        sgd = "DP-SGD added no noise: a run without DP is not released"
        evaluation = entry.get("evaluation")
        if evaluation is None:
            raise CertificateError(f"{name}: evaluation is missing from the privacy report (no DP evaluation "
                                   "during the run)")
        if not isinstance(evaluation, Mapping):
            raise CertificateError(f"{name}: evaluation in the privacy report is not a mapping")
        where = f"{name}: evaluation"
        if evaluation.get("mechanism") != EVALUATION_MECHANISM:
            raise CertificateError(f"{where}.mechanism is {evaluation.get('mechanism')!r}, not "
                                   f"{EVALUATION_MECHANISM!r}")
        return cls(
            epsilon=_real(entry, "epsilon", name), delta=_delta(entry, name), mechanism=str(entry.get("mechanism", "")),
            noise_multiplier=_positive(entry, "noise_multiplier", name, sgd),
            sample_rate=_sample_rate(entry, name), steps=_count(entry, "steps", name, "no DP-SGD step was accounted"),
            clip_norm=_positive(entry, "clip_norm", name, "no per-sample clipping bound"),
            run_epsilon=_real(entry, "run_epsilon", name), ledger_epsilon=_real(entry, "ledger_epsilon", name),
            evaluation=EvaluationPrivacy(
                mechanism=EVALUATION_MECHANISM,
                noise_multiplier=_positive(evaluation, "noise_multiplier", where, "the evaluation added no noise"),
                count=_count(evaluation, "count", where, "no DP evaluation during the run"),
                epsilon=_real(evaluation, "epsilon", where)))

    def mechanisms(self) -> list[GaussianMechanism]:
        """DP-SGD and the DP evaluation as ledger mechanisms: their composition is `run_epsilon`."""
        if self.evaluation is None:
            raise CertificateError("a certificate issued before DP evaluation has no evaluation mechanism")
        return [GaussianMechanism(self.sample_rate, self.noise_multiplier, self.steps),
                GaussianMechanism.gaussian_release(noise_multiplier=self.evaluation.noise_multiplier,
                                                   count=self.evaluation.count)]


def _real(entry: Mapping[str, Any], key: str, where: str) -> float:
    if key not in entry:
        raise CertificateError(f"{where}: {key} is missing from the privacy report")
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise CertificateError(f"{where}: {key} must be a finite number, got {value!r}")
    return float(value)


def _positive(entry: Mapping[str, Any], key: str, where: str, meaning: str) -> float:
    value = _real(entry, key, where)
    if value <= 0.0:
        raise CertificateError(f"{where}: {key} is {value:g}, not > 0 ({meaning})")
    return value


def _count(entry: Mapping[str, Any], key: str, where: str, meaning: str) -> int:
    value = _real(entry, key, where)
    if not value.is_integer():
        raise CertificateError(f"{where}: {key} must be a whole number, got {value:g}")
    if value < 1:
        raise CertificateError(f"{where}: {key} is {value:g}, not >= 1 ({meaning})")
    return int(value)


def _sample_rate(entry: Mapping[str, Any], where: str) -> float:
    value = _real(entry, "sample_rate", where)
    if not 0.0 < value <= 1.0:
        raise CertificateError(f"{where}: sample_rate is {value:g}, not in (0, 1]")
    return value


def _delta(entry: Mapping[str, Any], where: str) -> float:
    value = _real(entry, "delta", where)
    if not 0.0 < value < 1.0:
        raise CertificateError(f"{where}: delta is {value:g}, not in (0, 1)")
    return value


def hospitals_from_report(privacy_report: Mapping[str, Any]) -> dict[str, HospitalPrivacy]:
    """Every hospital's checked `HospitalPrivacy` from a privacy report (`server.tracking.privacy_report`),
    by name. Raises CertificateError for a report that names no hospital, that predates the DP
    federated evaluation (no hospital has any of `REPORT_KEYS_SINCE_DP_EVALUATION`), or whose entry
    for some hospital fails `HospitalPrivacy.from_report`."""
    hospitals = privacy_report.get("hospitals") if isinstance(privacy_report, Mapping) else None
    if not isinstance(hospitals, Mapping) or not hospitals:
        raise CertificateError("the privacy report names no hospital")
    if not any(isinstance(h, Mapping) and key in h for h in hospitals.values()
               for key in REPORT_KEYS_SINCE_DP_EVALUATION):
        raise CertificateError("the run predates DP evaluation: its privacy report has no "
                               f"{', '.join(REPORT_KEYS_SINCE_DP_EVALUATION)} for any hospital, so its federated "
                               "evaluation was not DP; retrain to release")
    return {str(name): HospitalPrivacy.from_report(str(name), entry) for name, entry in sorted(hospitals.items())}


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
        hospitals: number of hospitals whose privacy spend the run logged.
        records: the DP noised record count of the release's DP evaluation table (the evaluation
            cohort of held-out records, not the training set), rounded: the coordinator never
            learns any hospital's record count. None only on certificates issued without one.
        records_basis: which of the two `records` is, in words.
        epsilon_max, delta: the release's (epsilon, delta)-DP guarantee per patient: the largest
            run_epsilon over the hospitals (each hospital's DP-SGD and DP evaluation composed), which
            holds under `assumption`.
        guarantee: the guarantee in words, as the run stated it.
        accountant: the privacy accountant that computed every epsilon.
        he_parameters: the CKKS parameters the updates were aggregated under.
        per_hospital: hospital name -> its `HospitalPrivacy`.
        neighbouring: the neighbouring relation of every epsilon (`NEIGHBOURING`).
        assumption: the run's statement that hospitals hold disjoint patients.
        epsilon_all_hospitals: epsilon at `delta` for a patient with records at every hospital: all
            hospitals' runs composed (what holds where `assumption` fails).
        overlap: what holds for a patient at several hospitals, in words.
        ledger_basis: what each hospital's `ledger_epsilon` is (`LEDGER_BASIS`).
        patient_epsilon: a patient's cumulative epsilon for the purpose so far: the largest
            `ledger_epsilon` over the hospitals (every run and query charged to the purpose, this run
            included), at most what any one patient has lost, beside this release's `epsilon_max`.
        patient_epsilon_statement: the two in words, for a reader of the certificate.
        approvals: the release's two approvals (`server.releases.approvals`): role, by, hospital, at,
            and the run and model SHA-256 they bind to; empty on a release made before them.
        calibration_override: None, or {"reason", "by", "problems"} when the release was approved
            although its calibration failed the release check (`server.calibration.release_problems`).
        privacy_audit: the release's empirical privacy audit (`server.releases.membership`): the
            membership-inference attack's AUC, advantage and epsilon lower bound beside the accounted
            epsilon, the audit query's epsilon and that it was charged, and a sentence of what it means;
            or {"audited": False, "statement": "not audited for this release", "reason", "by"}. None
            only on certificates issued before releases were audited.
    The last five are empty (None) only on a certificate issued before the federated evaluation was DP.
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
    neighbouring: str = ""
    assumption: str = ""
    epsilon_all_hospitals: float | None = None
    overlap: str = ""
    ledger_basis: str = ""
    calibration_override: dict[str, Any] | None = None
    privacy_audit: dict[str, Any] | None = None
    patient_epsilon: float | None = None
    patient_epsilon_statement: str = ""
    approvals: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return json_ready(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyCertificate:
        """Read back `to_dict` output (raises CertificateError if a field is missing); a certificate
        issued before the federated evaluation was DP reads back with its newer fields empty."""
        try:
            values = {f.name: data[f.name] for f in fields(cls) if f.name in data or not _has_default(f)}
            values["per_hospital"] = {name: _hospital(spend) for name, spend in data["per_hospital"].items()}
            return cls(**values)
        except (KeyError, TypeError, AttributeError) as exc:
            raise CertificateError(f"not a fedrisk privacy certificate ({type(exc).__name__}: {exc})") from None

    @classmethod
    def from_json(cls, text: str) -> PrivacyCertificate:
        return cls.from_dict(json.loads(text))


def _has_default(f: Any) -> bool:
    return f.default is not MISSING or f.default_factory is not MISSING


def _hospital(spend: Mapping[str, Any]) -> HospitalPrivacy:
    evaluation = spend.get("evaluation")
    return HospitalPrivacy(**{**spend, "evaluation": None if evaluation is None else EvaluationPrivacy(**evaluation)})


def build_certificate(*, release_id: str, model_sha256: str, mlflow_run_id: str, privacy_report: Mapping[str, Any],
                      cutoff: str, issued: str, evaluation: Mapping[str, Any],
                      calibration_override: Mapping[str, Any] | None = None,
                      privacy_audit: Mapping[str, Any] | None = None,
                      approvals: list[Mapping[str, Any]] | None = None) -> PrivacyCertificate:
    """The certificate of a release from its run's `privacy_report.json` (see
    `server.tracking.privacy_report`; checked by `hospitals_from_report`, recomputed by
    `server.releases.run_artifacts`), for `records`, the release's `evaluation_from_tables` result,
    and its `privacy_audit` section (`server.releases.membership.release_section`)."""
    per_hospital = hospitals_from_report(privacy_report)
    try:
        report = {key: privacy_report[key] for key in ("epsilon_max", "delta", "guarantee", "accountant",
                                                        "he_parameters", "purpose", "neighbouring", "assumption")}
        overall = evaluation["overall"]
        records = round(float(overall["records"]))
        basis = (f"DP noised record count of the evaluation table ({overall['table']!r}): held-out records "
                 "scored in the DP evaluation, not the training set size")
        delta = float(report["delta"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CertificateError(f"the run's privacy report or DP evaluation lacks {exc} or has it malformed") from None
    composer = report["accountant"] if report["accountant"] in ACCOUNTANTS else ACCOUNTANT  # the one it names
    everywhere = compose_epsilon([m for h in per_hospital.values() for m in h.mechanisms()], delta, accountant=composer)
    overlap = ("Where hospitals do not hold disjoint patients, a patient with records at several hospitals is "
               f"protected by the composition of those hospitals' runs ({composer.split(' ')[0].upper()}), "
               "not by epsilon_max: "
               f"at most epsilon {everywhere:.4g} at delta {delta:g} for a patient at all {len(per_hospital)} "
               "hospitals.")
    patient, statement = _patient_epsilon(per_hospital, float(report["epsilon_max"]), str(report["purpose"]),
                                          float(evaluation.get("epsilon") or 0.0),
                                          float((privacy_audit or {}).get("query_epsilon") or 0.0))
    return PrivacyCertificate(
        release_id=release_id, model_sha256=model_sha256, mlflow_run_id=mlflow_run_id,
        purpose=str(report["purpose"]), data_cutoff=cutoff, issued=issued, hospitals=len(per_hospital),
        records=records, records_basis=basis, epsilon_max=float(report["epsilon_max"]), delta=delta,
        guarantee=str(report["guarantee"]), accountant=str(report["accountant"]),
        he_parameters=dict(report["he_parameters"]), per_hospital=per_hospital,
        neighbouring=str(report["neighbouring"]), assumption=str(report["assumption"]),
        epsilon_all_hospitals=everywhere, overlap=overlap, ledger_basis=LEDGER_BASIS,
        calibration_override=dict(calibration_override) if calibration_override else None,
        privacy_audit=dict(privacy_audit) if privacy_audit else None, patient_epsilon=patient,
        patient_epsilon_statement=statement, approvals=[dict(a) for a in approvals or []])


def _patient_epsilon(per_hospital: Mapping[str, HospitalPrivacy], release_epsilon: float, purpose: str,
                     evaluation_epsilon: float, audit_epsilon: float) -> tuple[float | None, str]:
    """A patient's cumulative epsilon for the purpose, and the sentence saying it: each hospital's
    ledger after the run, plus the release's DP evaluation and audit charged to the same ledgers
    afterwards (added: basic composition, an upper bound); the largest over the hospitals."""
    after_run = {name: h.ledger_epsilon for name, h in per_hospital.items() if h.ledger_epsilon is not None}
    if not after_run:
        return None, ""
    extra = evaluation_epsilon + audit_epsilon
    hospital = max(after_run, key=lambda name: after_run[name])
    total = after_run[hospital] + extra
    later = " and ".join(f"{what} (epsilon {value:.3g})" for what, value in
                         (("its DP evaluation", evaluation_epsilon), ("its privacy audit", audit_epsilon)) if value)
    return total, (
        f"This release alone protects each patient at epsilon {release_epsilon:.3g}. Counting what the hospitals "
        f"had spent on {purpose} by the end of its run (earlier runs and queries included)"
        + (f", then {later}" if later else "") + f", a patient's cumulative epsilon for {purpose} is at most "
        f"{total:.3g} (at {hospital}). Later queries add to it; each hospital's own budget caps the total.")


@dataclass(frozen=True)
class ModelCard:
    """What the released model is for, how well it does, and where it falls short.

    Attributes:
        release_id, model_sha256: the release and its weights.
        model_kind, n_features: the architecture ("logreg", "mlp", ...) and its number of inputs.
        intended_use, out_of_scope_uses: fixed text (`INTENDED_USE`, `OUT_OF_SCOPE_USES`).
        features: the model's inputs in column order, as [{"group": what they describe, "inputs":
            [model input names]}] (`FEATURE_GROUPS` for the standard contract).
        federated_auc, federated_brier: the run's DP federated evaluation of its last round (None if
            the run logged none).
        federated_basis: what those two numbers are (`FEDERATED_EVALUATION_BASIS`).
        calibration: {"basis", "source", "overall": rows, "groups": {field: {group: rows}}}
            where a row is {bin_low, bin_high, mean_predicted (bin midpoint), observed_rate, se, n}.
        fairness: {"basis", "source", "overall": summary, "groups": {field: {group: summary}},
            "gaps": {field: {"auc": gap, "calibration_offset": gap}}}; a summary holds auc,
            calibration_offset and their `_ci95` intervals, observed_rate, mean_predicted,
            positives, negatives, records (`server.releases.dp_evaluation.evaluation_from_tables`).
        fairness_notes: sentences on the AUC and calibration gaps by age band and sex, with intervals.
        limitations: sentences a user of the score must know.
        recalibration: the Platt map the run folded into the released weights
            (`server.calibration.Calibration.to_dict`), None for a model that was not recalibrated.
        bands: each risk band of the calibrated probability with its noised records and observed
            rate in the DP evaluation (`server.calibration.band_rates`).
    The last two are None on cards issued before releases were recalibrated.
    Cards issued before a DP evaluation was required may hold NOT_EVALUATED for calibration and
    fairness, and a federated_basis of the non-DP evaluation of that time.
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
    recalibration: dict[str, Any] | None = None
    bands: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return json_ready(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        """Read back `to_dict` output (raises CertificateError if a field is missing)."""
        try:
            return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data or not _has_default(f)})
        except (KeyError, TypeError) as exc:
            raise CertificateError(f"not a fedrisk model card ({type(exc).__name__}: {exc})") from None

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        return cls.from_dict(json.loads(text))


def build_model_card(*, release_id: str, model_sha256: str, model_kind: str, n_features: int, purpose: str,
                     hospitals: int, epsilon_max: float, delta: float, federated_auc: float | None,
                     federated_brier: float | None, evaluation: Mapping[str, Any],
                     recalibration: Mapping[str, Any] | None = None,
                     inputs: Mapping[str, Any] | None = None) -> ModelCard:
    """The card of a release: fixed use statements, the run's DP federated evaluation of its last round
    (`FEDERATED_EVALUATION_BASIS`), and calibration and fairness from `evaluation` (the release's
    `evaluation_from_tables` result). It quotes no figure that is not DP."""
    standard = n_features == len(fx.FEATURE_NAMES) and not inputs
    names = [str(n) for n in inputs["features"]] if inputs else [f"input_{i}" for i in range(n_features)]
    groups = FEATURE_GROUPS if standard else {"schema-encoded inputs": tuple(names)}
    features = [{"group": group, "inputs": list(names)} for group, names in groups.items()]
    if standard:
        label_line = "The label is 90-day medical-bill delinquency within 12 months; it is not general credit default."
        intended_use, out_of_scope = INTENDED_USE, list(OUT_OF_SCOPE_USES)
    else:
        label = str((inputs or {}).get("label") or "the schema's label")
        meaning = str((inputs or {}).get("label_description") or "")
        label_line = (f"The label is the export column {label!r}" + (f": {meaning}." if meaning else
                      " (the schema gives no label-description: ask the hospitals what it means)."))
        intended_use = str((inputs or {}).get("intended_use") or "") or (
            f"Not stated: the hospitals' export schema declares no intended-use for this model of {label!r}.")
        out_of_scope = [OUT_OF_SCOPE_USES[0], OUT_OF_SCOPE_USES[1],
                        f"Predicting anything other than {label!r} as the schema defines it.", *OUT_OF_SCOPE_USES[3:]]
    limitations = [
        (f"Trained with DP-SGD and evaluated under DP each round at (epsilon {epsilon_max:.3g}, delta {delta:g}) "
         f"per patient on records of {hospitals} hospitals whose patients consented to {purpose}; the DP noise "
         "costs accuracy, and performance on other populations is unknown."),
        label_line,
        FEDERATED_EVALUATION_BASIS,
    ]
    if not standard:
        limitations.append(f"Inputs were encoded from the hospitals' export schema ({n_features} inputs), "
                           "not the standard credit-risk contract; reason codes are not available.")
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
        intended_use=intended_use, out_of_scope_uses=out_of_scope, features=features,
        federated_auc=federated_auc, federated_brier=federated_brier, federated_basis=FEDERATED_EVALUATION_BASIS,
        calibration=calibration, fairness=fairness, fairness_notes=notes, limitations=limitations,
        recalibration=dict(recalibration) if recalibration else None,
        bands=band_rates(list(evaluation["overall"]["calibration"])))


def _summary(stats: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stats.items() if k not in ("calibration", "table")}
