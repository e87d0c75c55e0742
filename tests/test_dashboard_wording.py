"""What a bank analyst reads on the dashboard, rendered from certificates, model cards and cohort
tables shaped as the registry stores them (no federation, no service): plain labelled rows first,
the exact recorded values folded under "Technical details"; ε, AUC, risk bands and how a score may
be used explained beside the numbers; hidden cohort cells saying why; a chart only when it
compares something; timestamps to the minute in UTC; and every stored value escaped.

`tests/test_signals.py` checks the same on the pages the running service serves.
"""

from __future__ import annotations

import copy
import inspect
import re
from html import unescape
from pathlib import Path
from typing import Any

import pytest

from federation.model import RISK_BANDS
from server.releases.certificates import ModelCard, PrivacyCertificate
from server.signals import charts, dashboard
from server.signals.auth import Principal
from server.signals.catalogue import ReleaseView
from server.signals.cohorts import ApprovedCohort
from server.signals.trail import RequestTrail

HOSTILE = '<script>alert("x")</script>'
RAW_NAMES = ("poly_modulus_degree", "coeff_mod_bit_sizes", "global_scale_bits", "security_bits", "max_k",
             "epsilon_max", "run_epsilon", "ledger_epsilon", "records_basis", "mlflow_run_id", "he_parameters",
             "model_sha256", "epsilon_all_hospitals", "calibration_override", "noise_multiplier", "sample_rate",
             "clip_norm", "patient_epsilon", "delinquent_90d_12m", "insurance_type", "ci95_low", "ci95_high",
             "suppress-below")

CERTIFICATE: dict[str, Any] = {
    "release_id": "r1", "model_sha256": "56171ff0546a7a456540c4633685bda2a4fb088b71adc0224ccf9e51b7aefdef",
    "mlflow_run_id": "284c6ff9f8d04553af2dbaf79d0e71ab", "purpose": "credit-risk-research",
    "data_cutoff": "2026-12-03", "issued": "2026-12-03T11:34:02+00:00", "hospitals": 2, "records": 199,
    "records_basis": "DP noised record count of the evaluation table ('age'): held-out records scored in the DP "
                     "evaluation, not the training set size",
    "epsilon_max": 0.9956092483246551, "delta": 1e-05,
    "guarantee": "per-patient (epsilon, delta)-DP for the add/remove-one-patient relation; hospitals hold disjoint "
                 "patients, so the released model is (max_k run_epsilon_k, delta)-DP",
    "accountant": "pld (dp_accounting.pld, connect-the-dots, pessimistic estimate)",
    "he_parameters": {"scheme": "CKKS", "poly_modulus_degree": 4096, "coeff_mod_bit_sizes": [60, 49],
                      "global_scale_bits": 55, "packing": "complex (two reals per slot)",
                      "encryption": "symmetric, seeded", "security_bits": 128,
                      "decryption": "flooded (s = 30 bits, at most 4096 decryptions per key), rounded to 2^-40",
                      "library": "Microsoft SEAL via tenseal.sealapi"},
    "per_hospital": {name: {"epsilon": 0.9633100150715632, "delta": 1e-05,
                            "mechanism": "DP-SGD, Poisson-subsampled Gaussian", "noise_multiplier": 1.390625,
                            "sample_rate": 0.05, "steps": 20, "clip_norm": 1.0, "run_epsilon": 0.9956092483246551,
                            "ledger_epsilon": 1.317623515431334,
                            "evaluation": {"mechanism": "gaussian", "noise_multiplier": 13.3125, "count": 1,
                                           "epsilon": 0.24944851073710755}}
                     for name in ("hospital_00", "hospital_01")},
    "neighbouring": "add/remove one patient's records",
    "assumption": "hospitals hold disjoint patients",
    "epsilon_all_hospitals": 1.317623515431334,
    "overlap": "Where hospitals do not hold disjoint patients, ... not by epsilon_max: at most epsilon 1.318 ...",
    "ledger_basis": "ledger_epsilon is each hospital's cumulative epsilon for the purpose after this run",
    "calibration_override": None,
    "patient_epsilon": 1.5669,
    "patient_epsilon_statement": "This release alone protects each patient at epsilon 0.996. Counting ...",
    "privacy_audit": {"audited": True, "auc": 0.503, "advantage": 0.01, "epsilon_lower_bound": 0.02,
                      "accounted_epsilon": 0.9956092483246551, "confidence": 0.95,
                      "statement": "A loss-threshold membership-inference attack ... reached AUC 0.503"},
}

CARD: dict[str, Any] = {
    "release_id": "r1", "model_sha256": CERTIFICATE["model_sha256"], "model_kind": "mlp", "n_features": 40,
    "intended_use": "Scoring applicants who consented, for 90-day medical-bill delinquency risk; a credit "
                    "decision aid, not a sole basis.",
    "out_of_scope_uses": ["Inferring an applicant's health conditions from their score or reasons."],
    "features": [{"group": "demographics", "inputs": ["age", "sex_female"]},
                 {"group": "billing history", "inputs": ["prior_late_payments_24m", "on_payment_plan"]}],
    "federated_auc": 0.81, "federated_brier": 0.0812,
    "federated_basis": "DP federated evaluation, last round, of the model as trained: pooled DP AUC and Brier",
    "calibration": {"basis": "bootstrap", "source": "cohort query model-evaluation",
                    "overall": [{"bin_low": 0.0, "bin_high": 0.1, "mean_predicted": 0.05, "observed_rate": 0.06,
                                 "n": 900.0},
                                {"bin_low": 0.1, "bin_high": 0.3, "mean_predicted": 0.2, "observed_rate": 0.18,
                                 "n": 300.0},
                                {"bin_low": 0.3, "bin_high": 1.0, "mean_predicted": 0.5, "observed_rate": 0.47,
                                 "n": 100.0}],
                    "groups": {}},
    "fairness": {"basis": "bootstrap", "source": "cohort query model-evaluation", "overall": {"auc": 0.8},
                 "groups": {"sex": {"F": {"auc": 0.79, "auc_ci95": [0.7, 0.86]},
                                    "M": {"auc": 0.82, "auc_ci95": [0.74, 0.88]}}},
                 "gaps": {}},
    "fairness_notes": [],
    "limitations": [
        "Trained with DP-SGD and evaluated under DP each round at (epsilon 0.996, delta 1e-05) per patient.",
        "The label is 90-day medical-bill delinquency within 12 months; it is not general credit default.",
        "DP federated evaluation, last round, of the model as trained: pooled DP AUC and Brier",
        "DP evaluation: AUC is that of the score grouped into 10 bins (ties within a bin count half).",
    ],
    "recalibration": {"method": "platt", "slope": 1.1, "intercept": -0.2},
    "bands": [{"band": "low", "low": 0.0, "high": 0.1, "records": 900.4, "positives": 54.0,
               "observed_rate": 0.06, "held_to_range": True, "inside": True},
              {"band": "medium", "low": 0.1, "high": 0.3, "records": 300.2, "positives": 54.0,
               "observed_rate": 0.18, "held_to_range": True, "inside": True},
              {"band": "high", "low": 0.3, "high": 1.0, "records": 40.0, "positives": 19.0,
               "observed_rate": 0.475, "held_to_range": False, "inside": True}],
}


def _release(release_id: str = "r1", *, auc: float | None = 0.81, certificate: dict | None = None,
             card: dict | None = None, status: str = "active", withdrawn: str | None = None) -> ReleaseView:
    cert = copy.deepcopy(certificate or CERTIFICATE) | {"release_id": release_id}
    model_card = copy.deepcopy(card or CARD) | {"release_id": release_id, "federated_auc": auc}
    return ReleaseView(release_id, status, PrivacyCertificate.from_dict(cert), ModelCard.from_dict(model_card),
                       withdrawn)


def _cohort(*, threshold: float = 20.0, approved_by: str = "dana", note: str = "reviewed") -> ApprovedCohort:
    """A rate by insurance type, as `CohortStore` keeps it: the first cell hidden (too few records)."""
    query = {"name": "delinquency-by-insurance", "purpose": "credit-risk-research", "epsilon": 1.0, "delta": 1e-06,
             "measure": "rate", "field": "delinquent_90d_12m",
             "group-by": [{"insurance_type": ["private", "medicaid", "self_pay"]}], "suppress-below": threshold}
    privacy = {"epsilon": 1.0, "delta": 1e-06, "purpose": "credit-risk-research", "hospitals": ["h0", "h1", "h2"],
               "guarantee": "each hospital's answer is (epsilon, delta)-DP on its own",
               "he_parameters": CERTIFICATE["he_parameters"]}
    columns = ["insurance_type", "rate", "se", "ci95_low", "ci95_high", "records", "suppressed"]
    rows = [{"insurance_type": "private", "rate": None, "se": None, "ci95_low": None, "ci95_high": None,
             "records": None, "suppressed": True},
            {"insurance_type": "medicaid", "rate": 0.21, "se": 0.03, "ci95_low": 0.15, "ci95_high": 0.27,
             "records": 204.6, "suppressed": False},
            {"insurance_type": "self_pay", "rate": 0.34, "se": 0.04, "ci95_low": 0.26, "ci95_high": 0.42,
             "records": 151.2, "suppressed": False}]
    return ApprovedCohort("delinquency-2026q3", query, privacy, columns, rows, approved_by,
                          "2026-12-03T11:34:11+00:00", note)


class _Catalogue:
    """What `panels` asks of a `ReleaseCatalogue`."""

    def __init__(self, releases: list[ReleaseView]) -> None:
        self.releases = releases

    def list(self, *, for_bank: bool) -> list[ReleaseView]:
        return [r for r in self.releases if r.status == "active" or not for_bank]


class _Cohorts:
    """What `panels` asks of a `CohortStore`."""

    def __init__(self, cohorts: list[ApprovedCohort]) -> None:
        self.cohorts = cohorts

    def list(self) -> list[ApprovedCohort]:
        return self.cohorts


BANK = Principal("0a1b2c3d4e5f", "acme-risk-team", "bank-analyst", bank="bank-a")
AUDITOR = Principal("5f4e3d2c1b0a", "audrey", "auditor")


def _page(tmp_path: Path, releases: list[ReleaseView], cohorts: list[ApprovedCohort] | None = None,
          caller: Principal = BANK) -> str:
    trail = RequestTrail(tmp_path / "signals_audit.sqlite")
    trail.record(caller, "GET", "/dashboard/panels", 200)
    return dashboard.panels(caller, _Catalogue(releases), _Cohorts(cohorts or []), trail)  # type: ignore[arg-type]


def primary(html: str) -> str:
    """What a reader reads first: the text of the page without its folded technical details (no tags,
    no attributes, entities decoded)."""
    html = re.sub(r'<details class="technical">.*?</details>', " ", html, flags=re.S)
    html = re.sub(r"</?(?:b|i|em|strong|code|span|time|a)\b[^>]*>", "", html)  # inside a line of text
    return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", html)))


def _articles(html: str, kind: str) -> list[str]:
    return re.findall(rf'<article class="{kind}".*?</article>', html, flags=re.S)


def test_the_certificate_reads_in_plain_words_and_keeps_the_exact_values_for_auditors(tmp_path: Path) -> None:
    html = _page(tmp_path, [_release()])
    text = primary(html)
    for name in RAW_NAMES:
        assert name not in text, name
    assert "(epsilon, delta)-DP" not in text and "DP-SGD epsilon" not in text and "HE parameters" not in text
    assert "Privacy guarantee ε = 0.996 per patient, with δ = 0.00001 (1 in 100,000)" in text
    assert "Encryption used for aggregation CKKS, 2,048 slots per encrypted message, 128-bit security" in text
    assert "never saw any one hospital's update" in text
    assert "Model neural network (hidden layers of 64 and 32 units), reading 40 inputs" in text
    assert "patients who consented to credit risk research" in text
    assert "A patient with records at all 2 hospitals is protected at ε = 1.32 instead" in text
    assert "reached an AUC of 0.50 (0.5 means it could not tell at all)" in text
    assert "Each patient's total so far at most ε = 1.57 for credit risk research" in text
    assert CERTIFICATE["model_sha256"] in text  # the fingerprint a bank matches stays in plain sight

    technical = "".join(re.findall(r'<details class="technical">.*?</details>', html, flags=re.S))
    assert "<summary>Technical details</summary>" in technical
    for exact in ("<code>he_parameters.poly_modulus_degree</code></td><td>4096",
                  "<code>epsilon_max</code></td><td>0.9956092483246551",
                  "<code>per_hospital.hospital_00.noise_multiplier</code></td><td>1.390625",
                  "<code>mlflow_run_id</code></td><td>284c6ff9f8d04553af2dbaf79d0e71ab",
                  "(max_k run_epsilon_k, delta)-DP"):
        assert exact in technical, exact


def test_timestamps_read_to_the_minute_in_utc(tmp_path: Path) -> None:
    html = _page(tmp_path, [_release()], [_cohort()], caller=AUDITOR)
    text = primary(html)
    assert not re.search(r"\d{2}:\d{2}:\d{2}", text)  # no seconds, no microseconds ...
    assert not re.search(r"\d{4}-\d{2}-\d{2}T\d{2}", text)  # ... no raw ISO form
    assert "Released 2026-12-03 11:34 UTC" in text and "by dana, 2026-12-03 11:34 UTC" in text
    audit_times = re.findall(r'<time datetime="([^"]+)">([^<]+)</time>', html)
    assert audit_times and all(shown == dashboard.plain_time(exact) for exact, shown in audit_times)
    assert any("." in exact for exact, _ in audit_times)  # the audit log's microseconds stay in the markup

    assert dashboard.plain_time("2026-12-03T11:30:12.345678+00:00") == "2026-12-03 11:30 UTC"
    assert dashboard.plain_time("2026-12-03T13:30:59+02:00") == "2026-12-03 11:30 UTC"
    assert dashboard.plain_time("2026-12-03T11:30:00Z") == "2026-12-03 11:30 UTC"
    assert dashboard.plain_time("2026-12-03T11:30:00") == "2026-12-03 11:30 UTC"  # fedrisk writes UTC
    assert dashboard.plain_time("2026-12-03") == "2026-12-03"  # a date stays a date
    assert dashboard.plain_time("not a time") == "not a time"


def test_epsilon_is_explained_beside_every_guarantee_in_one_wording(tmp_path: Path) -> None:
    html = _page(tmp_path, [_release("r1"), _release("r2")], [_cohort()])
    for article in _articles(html, "release") + _articles(html, "cohort"):
        text = primary(article)
        assert "ε =" in text and dashboard.EPSILON_MEANING in text
        assert "smaller is stronger" in dashboard.EPSILON_MEANING.lower()
        assert "δ (delta) is the small chance that the guarantee does not hold" in text
    certificate = re.search(r'<details class="certificate">.*?</details>\s*</details>', html, flags=re.S)
    assert certificate and dashboard.EPSILON_MEANING in primary(certificate.group(0))
    source = inspect.getsource(dashboard)
    assert source.count("measures how much any one patient's records") == 1  # written once, reused


def test_risk_bands_are_read_from_the_models_bands_with_the_observed_rates(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = primary(_articles(_page(tmp_path, [_release()]), "release")[0])
    assert dashboard.BAND_MEANING in text and "calibrated probability" in text
    for name, low, high in RISK_BANDS:
        assert f"{name} a score {dashboard.band_range(low, high)}" in text
    assert "low a score below 10% 6% had the outcome (about 900 held-out records after noise)" in text
    assert "medium a score 10% to under 30% 18% had the outcome (about 300 held-out records after noise)" in text
    assert "high a score 30% or more too few records to say (about 40 held-out records after noise)" in text

    moved = (("low", 0.0, 0.2), ("medium", 0.2, 0.5), ("high", 0.5, 1.0))
    monkeypatch.setattr(dashboard, "RISK_BANDS", moved)  # the edges are read, never written down
    text = primary(_page(tmp_path, [_release()]))
    assert "low: a score below 20%" in text and "medium a score 20% to under 50%" in text
    assert "10%" not in text.replace("0.10", "")


def test_a_score_says_how_it_may_and_may_not_be_used(tmp_path: Path) -> None:
    html = _page(tmp_path, [_release()])
    form = re.search(r'<section id="score">.*?</section>', html, flags=re.S)
    assert form
    for where in (primary(form.group(0)), primary(_articles(html, "release")[0])):
        assert "How to use a score" in where and "probability for a group of similar applicants" in where
        assert "not a diagnosis" in where and "one input to a credit decision" in where
        assert "must not be the sole basis of an adverse decision" in where
        assert "must not be used, nor its reasons, to infer the applicant's medical condition" in where
        assert "must not be shared beyond that purpose" in where
        assert dashboard.SCORE_USE_INTRO in where and all(rule in where for rule in dashboard.SCORE_USE_RULES)
    release = primary(_articles(html, "release")[0])
    assert f"Intended use {CARD['intended_use']}" in release
    assert "What it predicts 90-day medical-bill delinquency within 12 months" in release

    schema_card = copy.deepcopy(CARD) | {"intended_use": "Tumour classification research; not a diagnosis",
                                         "limitations": ["The label is the export column 'malignant': the tumour "
                                                         "is malignant."]}
    other = primary(_page(tmp_path, [_release(card=schema_card)]))
    assert "What it predicts The export column 'malignant': the tumour is malignant." in other
    assert "Intended use Tumour classification research; not a diagnosis" in other


def test_hidden_cohort_cells_say_what_happened_and_why(tmp_path: Path) -> None:
    html = _articles(_page(tmp_path, [], [_cohort()]), "cohort")[0]
    text = primary(html)
    assert "suppressed" not in text.lower()
    assert "hidden: fewer than 20 records after noise" in text  # the table's cell
    assert "too few to show (under 20 records)" in text  # the chart's row
    assert ("Cells with fewer than 20 records (counted after noise was added) are hidden, so that no small group "
            "of patients can be singled out.") in text
    assert "Hidden cells 1 of 3." in text
    assert 'class="suppressed"' in html and 'data-label="private"' in html  # what the stylesheet and tools use
    assert "Share of patients with 90-day medical-bill delinquency within 12 months by insurance type" in text
    assert "self pay 34.0% 26.0% to 42.0% about 151" in text
    assert "<code>query.suppress-below</code></td><td>20.0" in html  # the exact threshold, for auditors

    text = primary(_page(tmp_path, [], [_cohort(threshold=0.0)]))
    assert "This table hides no cell: its query set no minimum number of records." in text


def test_a_chart_is_drawn_only_when_it_compares_something(tmp_path: Path) -> None:
    one = _page(tmp_path, [_release("r1", auc=0.81)])
    assert 'data-chart="bars"' not in one
    text = primary(one)
    assert "AUC 0.81 for release r1 (one release)" in text
    assert text.count(dashboard.AUC_MEANING) == 1  # explained once, in plain words
    assert "randomly chosen person who had the outcome" in dashboard.AUC_MEANING and "0.5 is chance" in text
    with pytest.raises(ValueError):
        charts.bar_chart([("r1", 0.81)], "one bar")

    two = _page(tmp_path, [_release("r1", auc=0.81), _release("r2", auc=0.43)])
    bars = re.findall(r'<rect class="mark"[^>]*data-label="(r\d)" data-value="([^"]+)"', two)
    assert bars == [("r1", "0.81"), ("r2", "0.43")]
    assert "below 0.5: worse than chance" in primary(two)
    assert primary(two).count(dashboard.AUC_MEANING) == 1

    none = primary(_page(tmp_path, [_release("r1", auc=None), _release("r2", auc=None)]))
    assert "No release has an AUC" in none and "not available: the privacy noise" in none

    lone_group = copy.deepcopy(CARD)
    lone_group["fairness"]["groups"] = {"sex": {"F": {"auc": 0.79, "auc_ci95": [0.7, 0.86]},
                                                "M": {"auc": None, "auc_ci95": None}}}
    html = _page(tmp_path, [_release(card=lone_group)])
    assert 'data-chart="intervals"' not in html  # one measured group: nothing to compare
    assert "measured for sex F only (AUC 0.79)" in primary(html)


def test_every_value_from_a_certificate_card_or_table_is_escaped(tmp_path: Path) -> None:
    certificate = copy.deepcopy(CERTIFICATE)
    certificate["purpose"] = HOSTILE
    certificate["he_parameters"]["library"] = HOSTILE
    certificate["per_hospital"] = {HOSTILE: certificate["per_hospital"]["hospital_00"]}
    certificate["calibration_override"] = {"by": HOSTILE, "reason": HOSTILE, "problems": [HOSTILE]}
    certificate["privacy_audit"] = {"audited": False, "by": HOSTILE, "reason": HOSTILE}
    certificate["issued"] = HOSTILE
    card = copy.deepcopy(CARD) | {"intended_use": HOSTILE, "model_kind": HOSTILE,
                                  "limitations": [f"The label is {HOSTILE}", HOSTILE],
                                  "features": [{"group": HOSTILE, "inputs": ["x"]}]}
    card["fairness"]["groups"] = {HOSTILE: {HOSTILE: {"auc": 0.7, "auc_ci95": [0.6, 0.8]}, "b": {"auc": 0.6}}}
    cohort = _cohort(approved_by=HOSTILE, note=HOSTILE)
    cohort.rows[1]["insurance_type"] = HOSTILE
    html = _page(tmp_path, [_release(HOSTILE, certificate=certificate, card=card, withdrawn=HOSTILE),
                            _release("r2", certificate=certificate, card=card)], [cohort], caller=AUDITOR)
    assert "<script" not in html
    assert html.count("&lt;script&gt;") > 10
