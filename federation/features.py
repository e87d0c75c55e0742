"""The feature contract shared by hospital nodes and the server.

A hospital export is one table per hospital with the columns named here. The
model never sees it directly: `encode_features` turns the raw clinical and
billing columns into a fixed 40-column float32 matrix using only the public
reference constants written in this module. No statistic is ever computed from
the data being encoded, for two reasons: every hospital must feed the shared
model the same representation of the same patient, and a hospital's own means
and spreads are themselves statistics about its patients that must not leak
into a model update.

Direct identifiers and the record key are part of the export (a hospital needs
them to run its own process) but are never read by the encoder.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from federation.errors import DataError

DIRECT_IDENTIFIERS: tuple[str, ...] = ("full_name", "national_id", "phone", "address")
RECORD_KEY = "patient_id"
LABEL = "delinquent_90d_12m"
ENCOUNTER_DATE = "last_encounter_date"
CONSENT_CREDIT_RISK_RESEARCH = "consent_credit_risk_research"
CONSENT_APPLICANT_SCORING = "consent_applicant_scoring"
CONSENT_RECORDED_ON = "consent_recorded_on"
CONSENT_COLUMNS: tuple[str, ...] = (
    CONSENT_CREDIT_RISK_RESEARCH,
    CONSENT_APPLICANT_SCORING,
    CONSENT_RECORDED_ON,
)
QUASI_IDENTIFIERS: tuple[str, ...] = ("age", "sex", "zip3")

AREA_TYPES: tuple[str, ...] = ("urban", "suburban", "rural", "remote")
INSURANCE_TYPES: tuple[str, ...] = ("private", "medicare", "medicaid", "uninsured", "self_pay")
EMPLOYMENT_STATUSES: tuple[str, ...] = ("employed", "unemployed", "retired", "disabled")

DEMOGRAPHIC_COLUMNS: tuple[str, ...] = ("age", "sex", "area_type", "insurance_type", "employment_status")
CHRONIC_CONDITIONS: tuple[str, ...] = (
    "diabetes", "hypertension", "copd", "chf", "ckd", "cancer", "depression", "substance_use",
)
LAB_COLUMNS: tuple[str, ...] = ("hba1c", "creatinine", "hemoglobin", "bmi", "systolic_bp", "albumin")
UTILISATION_COLUMNS: tuple[str, ...] = (
    "admissions_12m", "ed_visits_12m", "length_of_stay_days", "outpatient_visits_12m",
)
CHARGE_COLUMNS: tuple[str, ...] = ("total_charges", "out_of_pocket")
BILLING_COLUMNS: tuple[str, ...] = (
    "prior_late_payments_24m",
    "on_payment_plan",
    "balance_outstanding",
    "months_since_last_payment",
    "statements_sent_12m",
)
RAW_FEATURE_COLUMNS: tuple[str, ...] = (
    DEMOGRAPHIC_COLUMNS + CHRONIC_CONDITIONS + LAB_COLUMNS
    + UTILISATION_COLUMNS + CHARGE_COLUMNS + BILLING_COLUMNS
)
"""Every column `encode_features` reads, and nothing else."""

EXPORT_DTYPES: dict[str, str] = {
    RECORD_KEY: "O",
    **{column: "O" for column in DIRECT_IDENTIFIERS},
    "age": "i",
    "sex": "O",
    "zip3": "O",
    "area_type": "O",
    "insurance_type": "O",
    "employment_status": "O",
    **{column: "b" for column in CHRONIC_CONDITIONS},
    **{column: "f" for column in LAB_COLUMNS},
    "admissions_12m": "i",
    "ed_visits_12m": "i",
    "length_of_stay_days": "f",
    "outpatient_visits_12m": "i",
    "total_charges": "f",
    "out_of_pocket": "f",
    "prior_late_payments_24m": "i",
    "on_payment_plan": "b",
    "balance_outstanding": "f",
    "months_since_last_payment": "i",
    "statements_sent_12m": "i",
    ENCOUNTER_DATE: "M",
    CONSENT_CREDIT_RISK_RESEARCH: "b",
    CONSENT_APPLICANT_SCORING: "b",
    CONSENT_RECORDED_ON: "M",
    LABEL: "i",
}
"""Expected `Series.dtype.kind` of every export column: 'O' text (object or pandas
string), 'i' integer, 'f' float (labs may be missing, stored as NaN), 'b' bool,
'M' datetime64 (dates at midnight)."""

# (column, apply log1p first, reference centre, reference scale). The references
# are public clinical and billing norms, chosen once; they are never refitted.
_NUMERIC_REFERENCES: tuple[tuple[str, bool, float, float], ...] = (
    ("age", False, 50.0, 18.0),
    ("hba1c", False, 5.8, 1.0),
    ("creatinine", True, 0.7, 0.25),
    ("hemoglobin", False, 13.5, 1.6),
    ("bmi", False, 28.0, 6.0),
    ("systolic_bp", False, 128.0, 18.0),
    ("albumin", False, 4.0, 0.45),
    ("admissions_12m", True, 0.2, 0.4),
    ("ed_visits_12m", True, 0.4, 0.5),
    ("length_of_stay_days", True, 0.5, 1.0),
    ("outpatient_visits_12m", True, 1.5, 0.7),
    ("total_charges", True, 7.5, 1.5),
    ("out_of_pocket", True, 5.0, 2.0),
    ("prior_late_payments_24m", True, 0.5, 0.6),
    ("balance_outstanding", True, 3.0, 3.0),
    ("months_since_last_payment", False, 2.0, 3.0),
    ("statements_sent_12m", False, 3.0, 3.5),
)
_REFERENCE_BY_COLUMN = {reference[0]: reference for reference in _NUMERIC_REFERENCES}
_CLIP = 5.0
"""Encoded numeric values are clipped to ±_CLIP so one extreme row cannot dominate a gradient."""

FEATURE_NAMES: tuple[str, ...] = (
    ("age", "sex_female")
    + tuple(f"insurance_{name}" for name in INSURANCE_TYPES)
    + tuple(f"employment_{name}" for name in EMPLOYMENT_STATUSES)
    + CHRONIC_CONDITIONS
    + LAB_COLUMNS
    + UTILISATION_COLUMNS
    + ("total_charges_log", "out_of_pocket_log")
    + ("prior_late_payments_24m", "on_payment_plan", "balance_outstanding_log",
       "months_since_last_payment", "statements_sent_12m")
    + tuple(f"area_{name}" for name in AREA_TYPES)
)
"""The 40 model inputs, in the column order of `encode_features`."""


class FeatureEncodingError(DataError, ValueError):
    """The table handed to the encoder lacks a required column, or its label is not 0/1."""


def _numeric(frame: pd.DataFrame, column: str) -> np.ndarray:
    """A raw column as float64; missing values stay NaN."""
    return pd.to_numeric(frame[column], errors="coerce").astype("float64").to_numpy()


def _scaled(frame: pd.DataFrame, column: str) -> np.ndarray:
    """One numeric column on its reference scale; a missing value maps to the reference centre (0)."""
    _, use_log, centre, scale = _REFERENCE_BY_COLUMN[column]
    values = _numeric(frame, column)
    if use_log:
        values = np.log1p(np.clip(values, 0.0, None))
    encoded = (values - centre) / scale
    return np.clip(np.nan_to_num(encoded, nan=0.0), -_CLIP, _CLIP)


def _flag(frame: pd.DataFrame, column: str) -> np.ndarray:
    """A yes/no column as 0/1; missing counts as no."""
    return np.nan_to_num(_numeric(frame, column), nan=0.0).clip(0.0, 1.0)


def _one_hot(frame: pd.DataFrame, column: str, categories: tuple[str, ...]) -> np.ndarray:
    """Indicator columns over a fixed category list; an unknown or missing value is all zeros."""
    values = frame[column].astype("string").str.strip().str.lower().fillna("").to_numpy(dtype=object)
    return (values[:, None] == np.asarray(categories, dtype=object)[None, :]).astype(np.float64)


def encode_features(df: pd.DataFrame) -> np.ndarray:
    """Encode a hospital export (or any table with `RAW_FEATURE_COLUMNS`) as the model's inputs.

    Returns a float32 array of shape (n, 40) whose columns follow `FEATURE_NAMES`.
    Only `RAW_FEATURE_COLUMNS` are read; identifiers, the record key, consent and
    the label may be present or absent and make no difference. Raises
    `FeatureEncodingError` naming any required column that is missing.
    """
    missing = [column for column in RAW_FEATURE_COLUMNS if column not in df.columns]
    if missing:
        raise FeatureEncodingError(f"missing feature columns: {', '.join(missing)}")
    frame = df.loc[:, list(RAW_FEATURE_COLUMNS)]
    sex = frame["sex"].astype("string").str.strip().str.upper().fillna("")
    blocks = [
        _scaled(frame, "age")[:, None],
        sex.isin(("F", "FEMALE")).to_numpy(dtype=np.float64)[:, None],
        _one_hot(frame, "insurance_type", INSURANCE_TYPES),
        _one_hot(frame, "employment_status", EMPLOYMENT_STATUSES),
        np.column_stack([_flag(frame, column) for column in CHRONIC_CONDITIONS]),
        np.column_stack([_scaled(frame, column) for column in LAB_COLUMNS + UTILISATION_COLUMNS]),
        np.column_stack([_scaled(frame, column) for column in CHARGE_COLUMNS]),
        _scaled(frame, "prior_late_payments_24m")[:, None],
        _flag(frame, "on_payment_plan")[:, None],
        np.column_stack([_scaled(frame, column) for column in (
            "balance_outstanding", "months_since_last_payment", "statements_sent_12m")]),
        _one_hot(frame, "area_type", AREA_TYPES),
    ]
    return np.hstack(blocks).astype(np.float32)


def encode_labels(df: pd.DataFrame) -> np.ndarray:
    """The 90-day delinquency label as a float32 vector of 0/1, shape (n,)."""
    if LABEL not in df.columns:
        raise FeatureEncodingError(f"missing label column: {LABEL}")
    labels = pd.to_numeric(df[LABEL], errors="coerce").to_numpy(dtype=np.float64)
    if not np.isin(labels, (0.0, 1.0)).all():
        raise FeatureEncodingError(f"label column {LABEL} must hold only 0 and 1")
    return labels.astype(np.float32)
