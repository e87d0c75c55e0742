"""Synthetic hospital exports for simulation, tests and notebooks.

`synthesize` writes one Parquet file per hospital in the shape a real export has
(identifiers, quasi-identifiers, clinical and billing columns, consent, label), so
every stage of the pipeline — validation, de-identification, consent filtering,
training — runs on it unchanged. Hospitals differ the way real ones do: sizes are
heavy-tailed, case mix rotates through tertiary / community / rural, and label
prevalence differs. Each patient's true delinquency risk is a known function of
the encoded features, written to a separate ground-truth file so experiments can
compare any model against the oracle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from federation import features as fx
from federation.errors import ConfigError

CUTOFF_DATE = np.datetime64("2026-06-30")
HOSPITAL_TYPES: tuple[str, ...] = ("tertiary", "community", "rural")
MIN_HOSPITAL_ROWS = 500
MIN_HOSPITAL_SHARE = 0.01
FLOOR_TOTAL_SHARE = 0.2
"""At most this share of all patients goes to the hospitals' size floors: with more than 20
hospitals each floor is `FLOOR_TOTAL_SHARE / hospitals` of the patients instead of 1%, so 500
hospitals keep the heavy-tailed sizes (and 20 or fewer draw exactly what they always drew)."""
MAX_HOSPITALS = 1000
TRUTH_DIR = "ground_truth"

_FEMALE_NAMES = (
    "Mary Patricia Jennifer Linda Elizabeth Barbara Susan Jessica Sarah Karen Nancy Lisa Betty "
    "Margaret Sandra Ashley Kimberly Emily Donna Michelle Carol Amanda Melissa Deborah Stephanie "
    "Rebecca Laura Sharon Cynthia Kathleen Amy Angela Helen Anna Brenda Pamela Nicole Samantha Maria "
    "Rosa Aisha Mei Priya Fatima Lucia Ngozi Yuki Sofia"
).split()
_MALE_NAMES = (
    "James Robert John Michael David William Richard Joseph Thomas Charles Christopher Daniel "
    "Matthew Anthony Mark Donald Steven Paul Andrew Joshua Kenneth Kevin Brian George Timothy "
    "Ronald Edward Jason Jeffrey Ryan Jacob Gary Nicholas Eric Jonathan Stephen Larry Justin Scott "
    "Jose Carlos Wei Raj Omar Luis Kwame Hiroshi Mateo"
).split()
_LAST_NAMES = (
    "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez "
    "Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris "
    "Sanchez Clark Ramirez Lewis Robinson Walker Young Allen King Wright Scott Torres Nguyen Hill "
    "Flores Green Adams Nelson Baker Hall Rivera Campbell Mitchell Carter Roberts Chen Patel Kim "
    "Okafor Singh Cohen Murphy O'Brien Kowalski Novak Schmidt Rossi Tanaka Ali Haddad Mensah Lindqvist"
).split()
_STREETS = (
    "Maple Oak Pine Cedar Elm Washington Lake Hill Park Main Church River Meadow Forest Sunset "
    "Highland Jefferson Lincoln Franklin Willow Spring Chestnut Walnut Ridge Valley Mill Prairie"
).split()
_STREET_SUFFIXES = "St Ave Rd Blvd Ln Dr Ct Way".split()
_CITIES = (
    "Springfield Riverton Fairview Greenville Madison Clinton Franklin Georgetown Salem Ashland Milford "
    "Oxford Dover Burlington Lebanon Marion Hudson Kingston Chester Newport Centerville Lakewood Bristol "
    "Auburn Dayton Jackson Winchester Clayton Harmony Brookfield"
).split()


class SynthesisError(ConfigError, ValueError):
    """A parameter of `synthesize` is out of range, or the output directory is already used."""


@dataclass(frozen=True)
class SynthesisReport:
    """What `synthesize` wrote: hospital files in index order, their sizes and types,
    the oracle AUC of the true risk against the drawn labels, and the ground-truth file."""

    files: tuple[Path, ...]
    rows_by_hospital: tuple[int, ...]
    hospital_types: tuple[str, ...]
    oracle_auc: float
    truth_path: Path


@dataclass(frozen=True)
class _CaseMix:
    """Shifts that make a tertiary, community or rural hospital's patients look like its own:
    mean age in years; shifts of the latent frailty and strain traits (sd 1); area and insurance
    probabilities in `AREA_TYPES` / `INSURANCE_TYPES` order; a log-rate shift of admissions;
    a multiplier on charges; an offset on the log-odds of delinquency."""

    age_mean: float
    frailty: float
    strain: float
    area: tuple[float, float, float, float]
    insurance: tuple[float, float, float, float, float]
    admission_shift: float
    charge_scale: float
    logit_offset: float


_CASE_MIX: dict[str, _CaseMix] = {
    "tertiary": _CaseMix(60.0, 0.45, -0.15, (0.62, 0.28, 0.08, 0.02),
                         (0.42, 0.34, 0.14, 0.05, 0.05), 0.35, 1.6, -0.3),
    "community": _CaseMix(51.0, 0.0, 0.1, (0.35, 0.45, 0.15, 0.05),
                          (0.38, 0.22, 0.24, 0.09, 0.07), 0.0, 1.0, 0.0),
    "rural": _CaseMix(54.0, 0.15, 0.4, (0.04, 0.12, 0.56, 0.28),
                      (0.24, 0.24, 0.22, 0.17, 0.13), -0.45, 0.75, 0.35),
}

_LOGIT_WEIGHTS: dict[str, float] = {
    "age": -0.04, "sex_female": -0.02,
    "insurance_private": -0.16, "insurance_medicare": -0.09, "insurance_medicaid": 0.07,
    "insurance_uninsured": 0.18, "insurance_self_pay": 0.14,
    "employment_employed": -0.09, "employment_unemployed": 0.14,
    "employment_retired": -0.035, "employment_disabled": 0.07,
    "diabetes": 0.03, "hypertension": 0.01, "copd": 0.03, "chf": 0.035, "ckd": 0.02,
    "cancer": 0.04, "depression": 0.05, "substance_use": 0.12,
    "hba1c": 0.02, "albumin": -0.025, "hemoglobin": -0.01,
    "admissions_12m": 0.04, "ed_visits_12m": 0.1, "length_of_stay_days": 0.02,
    "outpatient_visits_12m": -0.04,
    "total_charges_log": 0.04, "out_of_pocket_log": 0.14,
    "prior_late_payments_24m": 0.12, "on_payment_plan": -0.16, "balance_outstanding_log": 0.1,
    "months_since_last_payment": 0.07, "statements_sent_12m": 0.04,
    "area_rural": 0.03, "area_remote": 0.05,
}
_INTERCEPT = -3.2
_CONDITION_LOGITS: dict[str, tuple[float, float, float, float]] = {
    # base log-odds, then loadings on frailty, (age - 50) / 18 and strain
    "diabetes": (-1.9, 0.6, 0.4, 0.1), "hypertension": (-1.0, 0.5, 0.8, 0.1),
    "copd": (-3.0, 0.7, 0.5, 0.2), "chf": (-3.6, 0.8, 0.8, 0.0),
    "ckd": (-3.2, 0.8, 0.7, 0.0), "cancer": (-3.2, 0.6, 0.5, 0.0),
    "depression": (-1.8, 0.4, -0.1, 0.35), "substance_use": (-3.1, 0.3, -0.4, 0.6),
}
_OUT_OF_POCKET_SHARE: dict[str, tuple[float, float]] = {
    "private": (2, 14), "medicare": (2, 20), "medicaid": (1, 60), "uninsured": (6, 3), "self_pay": (8, 2),
}
"""Beta(a, b) share of charges the patient owes, by insurance type."""
_LAB_MISSING_RATE: dict[str, float] = {"hba1c": 0.06, "albumin": 0.08, "bmi": 0.03}
_HOSPITAL_OFFSET_SD = 0.25


def _check_parameters(hospitals: int, patients: int, seed: int) -> None:
    """Raise `SynthesisError` naming the first parameter that cannot produce usable hospitals."""
    for name, value in (("hospitals", hospitals), ("patients", patients), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise SynthesisError(f"{name} must be an integer, got {value!r}")
    if not 1 <= hospitals <= MAX_HOSPITALS:
        raise SynthesisError(f"hospitals must be between 1 and {MAX_HOSPITALS}, got {hospitals}")
    if seed < 0:
        raise SynthesisError(f"seed must be non-negative, got {seed}")
    if patients < hospitals * _min_rows(patients, hospitals):
        raise SynthesisError(
            f"patients must be at least {hospitals * _min_rows(patients, hospitals)} for {hospitals} hospitals "
            f"(each needs at least {MIN_HOSPITAL_ROWS} rows and {_floor_share(hospitals):.2%} of patients), "
            f"got {patients}"
        )


def _floor_share(hospitals: int) -> float:
    return min(MIN_HOSPITAL_SHARE, FLOOR_TOTAL_SHARE / hospitals)


def _min_rows(patients: int, hospitals: int) -> int:
    """Smallest hospital size that keeps every hospital usable for local training."""
    return max(MIN_HOSPITAL_ROWS, int(np.ceil(_floor_share(hospitals) * patients)))


def _hospital_sizes(rng: np.random.Generator, hospitals: int, patients: int) -> np.ndarray:
    """Heavy-tailed sizes: a Zipf-like share per hospital with lognormal jitter, above a usable floor."""
    floor = _min_rows(patients, hospitals)
    shares = np.arange(1, hospitals + 1) ** -1.1 * rng.lognormal(0.0, 0.25, hospitals)
    shares = rng.permutation(shares / shares.sum())
    extra = (patients - floor * hospitals) * shares
    sizes = floor + np.floor(extra).astype(np.int64)
    remainder = patients - sizes.sum()
    sizes[np.argsort(extra - np.floor(extra))[::-1][:remainder]] += 1
    return sizes


def _draw(rng: np.random.Generator, probabilities: np.ndarray) -> np.ndarray:
    """One category index per row from row-wise (unnormalised) probabilities of shape (n, k)."""
    cumulative = np.cumsum(probabilities, axis=1)
    u = rng.random(len(probabilities))[:, None] * cumulative[:, -1:]
    return np.minimum((u > cumulative).sum(axis=1), probabilities.shape[1] - 1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _simulate_patients(rng: np.random.Generator, mix: dict[str, np.ndarray], hospital: np.ndarray,
                       hospitals: int) -> pd.DataFrame:
    """Demographics, conditions, labs, utilisation, charges and billing for every patient.

    Two latent traits drive the correlations a real export shows: `frailty` (illness
    burden: conditions, labs, admissions, charges) and `strain` (financial pressure:
    insurance, employment, late payments, unpaid balances). Neither is exported.
    """
    n = len(hospital)
    age_shift = rng.normal(0.0, 2.5, hospitals)[hospital]
    age = np.clip(np.rint(rng.normal(mix["age_mean"] + age_shift, 18.0)), 18, 95).astype(np.int64)
    a = (age - 50.0) / 18.0
    female = rng.random(n) < 0.54
    frailty = rng.normal(mix["frailty"] + 0.45 * a, 1.0)
    strain = rng.normal(mix["strain"] - 0.2 * a, 1.0)

    area = _draw(rng, mix["area"])
    insurance_tilt = strain[:, None] * np.array([-0.7, 0.0, 0.5, 0.9, 0.7])
    insurance = _draw(rng, mix["insurance"] * np.exp(insurance_tilt))
    insurance[(age >= 65) & (rng.random(n) < 0.85)] = fx.INSURANCE_TYPES.index("medicare")
    employment = _draw(rng, np.exp(np.column_stack([
        1.6 - 0.6 * strain - 0.4 * frailty,
        -0.4 + 0.7 * strain,
        -4.0 + 3.0 * (age >= 60) + 4.0 * (age >= 65),
        -1.8 + 0.8 * frailty,
    ])))
    insurance_name = np.asarray(fx.INSURANCE_TYPES)[insurance]
    employment_name = np.asarray(fx.EMPLOYMENT_STATUSES)[employment]

    conditions = {name: rng.random(n) < _sigmoid(b + f * frailty + g * a + s * strain)
                  for name, (b, f, g, s) in _CONDITION_LOGITS.items()}
    n_chronic = np.sum(list(conditions.values()), axis=0)
    labs = _labs(rng, conditions, frailty, a, female)

    uninsured = np.isin(insurance_name, ("uninsured", "self_pay"))
    low_cover = uninsured | (insurance_name == "medicaid")
    admissions = rng.poisson(np.exp(-1.9 + 0.45 * frailty + 0.15 * n_chronic + mix["admission_shift"]))
    ed_visits = rng.poisson(np.exp(-0.9 + 0.3 * frailty + 0.35 * strain + 0.3 * low_cover))
    outpatient = rng.poisson(np.exp(1.3 + 0.15 * n_chronic + 0.15 * frailty - 0.4 * uninsured))
    stay = np.round(np.where(admissions > 0, rng.gamma(np.maximum(2.0 * admissions, 1e-9), 2.3), 0.0), 1)

    charges = mix["charge_scale"] * (60.0 + 190.0 * outpatient + 1900.0 * ed_visits
                                     + 4500.0 * admissions + 3100.0 * stay)
    charges *= rng.lognormal(0.0, 0.6, n)
    catastrophic = rng.random(n) < 0.01
    charges[catastrophic] += rng.lognormal(11.0, 1.0, catastrophic.sum())
    share_a, share_b = np.array([_OUT_OF_POCKET_SHARE[name] for name in fx.INSURANCE_TYPES])[insurance].T
    out_of_pocket = np.round(charges * rng.beta(share_a, share_b), 2)

    return pd.DataFrame({
        "age": age,
        "sex": np.where(female, "F", "M"),
        "area_type": np.asarray(fx.AREA_TYPES)[area],
        "insurance_type": insurance_name,
        "employment_status": employment_name,
        **conditions,
        **labs,
        "admissions_12m": admissions.astype(np.int64),
        "ed_visits_12m": ed_visits.astype(np.int64),
        "length_of_stay_days": stay,
        "outpatient_visits_12m": outpatient.astype(np.int64),
        "total_charges": np.round(charges, 2),
        "out_of_pocket": out_of_pocket,
        **_billing(rng, strain, out_of_pocket, employment_name == "employed"),
    })


def _labs(rng: np.random.Generator, conditions: dict[str, np.ndarray], frailty: np.ndarray,
          a: np.ndarray, female: np.ndarray) -> dict[str, np.ndarray]:
    """Lab values in clinical units (HbA1c %, creatinine mg/dL, haemoglobin g/dL, BMI kg/m²,
    systolic mmHg, albumin g/dL), shifted by the matching conditions; some are never measured."""
    n = len(frailty)
    labs = {
        "hba1c": np.clip(rng.normal(5.4, 0.4, n) + conditions["diabetes"] * rng.gamma(4.0, 0.5, n), 3.5, 19.0),
        "creatinine": np.clip(rng.lognormal(np.log(0.9) + 0.9 * conditions["ckd"], 0.25), 0.2, 24.0),
        "hemoglobin": np.clip(rng.normal(np.where(female, 13.2, 14.8) - 1.2 * conditions["ckd"]
                                         - 0.9 * conditions["cancer"], 1.2), 4.0, 24.0),
        "bmi": np.clip(rng.normal(28.0 + 2.5 * conditions["diabetes"], 5.5), 15.0, 65.0),
        # clipped where a 5-sigma draw (a few in ten million) would leave what a monitor can record
        "systolic_bp": np.clip(rng.normal(122.0 + 14.0 * conditions["hypertension"] + 3.0 * a, 14.0), 60.0, 260.0),
        "albumin": np.clip(rng.normal(4.2 - 0.15 * frailty, 0.35), 1.5, 5.5),
    }
    labs = {name: np.round(values, 2 if name == "creatinine" else 1) for name, values in labs.items()}
    for name, missing_rate in _LAB_MISSING_RATE.items():
        labs[name][rng.random(n) < missing_rate] = np.nan
    return labs


def _billing(rng: np.random.Generator, strain: np.ndarray, out_of_pocket: np.ndarray,
             employed: np.ndarray) -> dict[str, np.ndarray]:
    """Payment history and the current account: late payments, unpaid balance, plan, statements."""
    n = len(strain)
    late_rate = np.exp(-1.3 + 0.9 * strain + 0.12 * np.log1p(out_of_pocket) - 0.3 * employed)
    unpaid = _sigmoid(-1.2 + 1.1 * strain + rng.normal(0.0, 1.0, n)) * (rng.random(n) < 0.75)
    balance = np.round(out_of_pocket * unpaid, 2)
    owing = balance > 0
    months = np.minimum(rng.geometric(1.0 / (1.0 + np.exp(0.6 + 0.5 * strain))) - 1, 24)
    statement_rate = np.where(owing, _sigmoid(-0.6 + 0.15 * np.log1p(balance) + 0.3 * strain), 0.03)
    return {
        "prior_late_payments_24m": rng.poisson(late_rate).astype(np.int64),
        "on_payment_plan": owing & (rng.random(n) < _sigmoid(-3.0 + 0.3 * np.log1p(balance) - 0.4 * strain)),
        "balance_outstanding": balance,
        "months_since_last_payment": np.where(owing, months, 0).astype(np.int64),
        "statements_sent_12m": rng.binomial(12, statement_rate).astype(np.int64),
    }


def _true_logit(frame: pd.DataFrame, encoded: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Log-odds of 90-day delinquency: linear in the encoded features plus a few realistic
    nonlinear terms (late payments saturate, uninsured patients with large bills, the
    90-day mark on months since last payment, young adults) plus the hospital offset."""
    weights = np.array([_LOGIT_WEIGHTS.get(name, 0.0) for name in fx.FEATURE_NAMES])
    column = {name: encoded[:, i].astype(np.float64) for i, name in enumerate(fx.FEATURE_NAMES)}
    uninsured = column["insurance_uninsured"] + column["insurance_self_pay"]
    late = frame["prior_late_payments_24m"].to_numpy(dtype=np.float64)
    months = frame["months_since_last_payment"].to_numpy(dtype=np.float64)
    nonlinear = (
        1.4 * (1.0 - np.exp(-late))
        + 0.9 * uninsured * np.maximum(column["out_of_pocket_log"], 0.0)
        + 0.6 * np.maximum(months - 3.0, 0.0) / 3.0
        + 0.4 * (frame["age"].to_numpy() < 30)
        - 0.4 * column["on_payment_plan"] * np.maximum(column["balance_outstanding_log"], 0.0)
    )
    return _INTERCEPT + encoded.astype(np.float64) @ weights + nonlinear + offset


def _digits(rng: np.random.Generator, low: int, high: int, n: int, width: int) -> np.ndarray:
    """Random integers in [low, high) as zero-padded strings of `width` digits."""
    return np.char.zfill(rng.integers(low, high, n).astype(str), width)


def _join(*parts: np.ndarray | str) -> np.ndarray:
    """Element-wise string concatenation of arrays and literals."""
    result = np.asarray(parts[0], dtype=str)
    for part in parts[1:]:
        result = np.char.add(result, np.asarray(part, dtype=str))
    return result


def _identifiers(rng: np.random.Generator, female: np.ndarray, hospital: np.ndarray,
                 hospitals: int) -> dict[str, np.ndarray]:
    """Record keys, direct identifiers and zip3 in the formats a hospital system uses."""
    n = len(hospital)
    mrn = 10_000_000 + np.cumsum(rng.integers(1, 400, n))
    first = np.where(female, rng.choice(_FEMALE_NAMES, n), rng.choice(_MALE_NAMES, n))
    cities = np.asarray(_CITIES)[rng.integers(0, len(_CITIES), (hospitals, 3))]
    zip_base = rng.integers(100, 990, hospitals)
    return {
        fx.RECORD_KEY: _join("MRN-", rng.permutation(mrn).astype(str)),
        "full_name": _join(first, " ", rng.choice(_LAST_NAMES, n)),
        "national_id": _join(_digits(rng, 1, 666, n, 3), "-", _digits(rng, 1, 100, n, 2), "-",
                             _digits(rng, 1, 10_000, n, 4)),
        "phone": _join("+1-", _digits(rng, 201, 990, n, 3), "-", _digits(rng, 200, 1000, n, 3), "-",
                       _digits(rng, 0, 10_000, n, 4)),
        "address": _join(rng.integers(1, 10_000, n).astype(str), " ", rng.choice(_STREETS, n), " ",
                         rng.choice(_STREET_SUFFIXES, n), ", ", cities[hospital, rng.integers(0, 3, n)]),
        "zip3": np.char.zfill((zip_base[hospital] + rng.integers(0, 6, n)).astype(str), 3),
    }


def _auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties get average ranks)."""
    order = np.argsort(score, kind="mergesort")
    sorted_score = score[order]
    ranks = np.empty(len(score))
    _, first, counts = np.unique(sorted_score, return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    positives = label.astype(bool)
    n_pos, n_neg = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def synthesize(hospitals: int, patients: int, out_dir: Path, seed: int = 0) -> SynthesisReport:
    """Write `hospitals` synthetic exports totalling `patients` rows to `out_dir`.

    Files are `hospital_00.parquet`, `hospital_01.parquet`, ...; the true risk of every
    patient goes to `ground_truth/truth.parquet` and a summary to `manifest.json`.
    The same seed always gives the same files. Raises `SynthesisError` for parameters
    that cannot give every hospital at least max(500, 1% of patients) rows, or when
    `out_dir` already holds hospital files.
    """
    _check_parameters(hospitals, patients, seed)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SynthesisError(f"out_dir {out_dir} exists and is not a directory")
    if any(out_dir.glob("hospital_*.parquet")):
        raise SynthesisError(f"out_dir {out_dir} already holds hospital files; choose an empty directory")

    rng = np.random.default_rng(seed)
    sizes = _hospital_sizes(rng, hospitals, patients)
    types = tuple(HOSPITAL_TYPES[k % len(HOSPITAL_TYPES)] for k in range(hospitals))
    hospital = np.repeat(np.arange(hospitals), sizes)
    type_index = np.array([HOSPITAL_TYPES.index(t) for t in types])[hospital]
    mix = {field: np.array([getattr(_CASE_MIX[t], field) for t in HOSPITAL_TYPES])[type_index]
           for field in _CaseMix.__dataclass_fields__}

    records = _simulate_patients(rng, mix, hospital, hospitals)
    offset = mix["logit_offset"] + rng.normal(0.0, _HOSPITAL_OFFSET_SD, hospitals)[hospital]
    true_risk = _sigmoid(_true_logit(records, fx.encode_features(records), offset))
    label = (rng.random(patients) < true_risk).astype(np.int8)

    encounter = CUTOFF_DATE - rng.integers(0, 365, patients).astype("timedelta64[D]")
    consent_on = encounter - rng.integers(0, 3 * 365, patients).astype("timedelta64[D]")
    identifiers = _identifiers(rng, records["sex"].to_numpy() == "F", hospital, hospitals)
    export = pd.concat([pd.DataFrame({key: identifiers[key] for key in (fx.RECORD_KEY, *fx.DIRECT_IDENTIFIERS)}),
                        records], axis=1)
    export.insert(export.columns.get_loc("sex") + 1, "zip3", identifiers["zip3"])
    export[fx.ENCOUNTER_DATE] = encounter.astype("datetime64[ns]")
    export[fx.CONSENT_CREDIT_RISK_RESEARCH] = rng.random(patients) < 0.85
    export[fx.CONSENT_APPLICANT_SCORING] = rng.random(patients) < 0.60
    export[fx.CONSENT_RECORDED_ON] = consent_on.astype("datetime64[ns]")
    export[fx.LABEL] = label

    out_dir.mkdir(parents=True, exist_ok=True)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    files = tuple(out_dir / f"hospital_{k:02d}.parquet" for k in range(hospitals))
    for k, path in enumerate(files):
        export.iloc[bounds[k]:bounds[k + 1]].reset_index(drop=True).to_parquet(path, index=False)

    truth_path = out_dir / TRUTH_DIR / "truth.parquet"
    truth_path.parent.mkdir(exist_ok=True)
    pd.DataFrame({fx.RECORD_KEY: export[fx.RECORD_KEY], "hospital": hospital.astype(np.int16),
                  "true_risk": true_risk}).to_parquet(truth_path, index=False)

    oracle_auc = _auc(true_risk, label)
    manifest = {
        "seed": seed,
        "patients": patients,
        "cutoff_date": str(CUTOFF_DATE),
        "oracle_auc": round(oracle_auc, 4),
        "truth_file": str(truth_path.relative_to(out_dir)),
        "hospitals": [
            {"file": path.name, "rows": int(sizes[k]), "type": types[k],
             "prevalence": round(float(label[bounds[k]:bounds[k + 1]].mean()), 4)}
            for k, path in enumerate(files)
        ],
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return SynthesisReport(files=files, rows_by_hospital=tuple(int(s) for s in sizes),
                           hospital_types=types, oracle_auc=oracle_auc, truth_path=truth_path)
