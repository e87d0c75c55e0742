"""Synthetic hospital exports look like real ones and carry a learnable, known risk."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from experiments.synthetic import SynthesisError, SynthesisReport, synthesize
from federation import features as fx

HOSPITALS = 8
PATIENTS = 20_000


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthesisReport, Path]:
    out_dir = tmp_path_factory.mktemp("exports")
    return synthesize(HOSPITALS, PATIENTS, out_dir, seed=0), out_dir


@pytest.fixture(scope="module")
def pooled(generated: tuple[SynthesisReport, Path]) -> pd.DataFrame:
    report, _ = generated
    return pd.concat([pd.read_parquet(path) for path in report.files], ignore_index=True)


def test_one_file_per_hospital_with_the_export_columns_and_dtypes(generated):
    report, out_dir = generated
    names = sorted(path.name for path in out_dir.glob("hospital_*.parquet"))
    assert names == [f"hospital_{k:02d}.parquet" for k in range(HOSPITALS)]
    for path in report.files:
        frame = pd.read_parquet(path)
        assert list(frame.columns) == list(fx.EXPORT_DTYPES)
        kinds = {column: frame[column].dtype.kind for column in frame.columns}
        assert kinds == fx.EXPORT_DTYPES


def test_identifiers_look_like_identifiers(pooled):
    assert pooled[fx.RECORD_KEY].str.fullmatch(r"MRN-\d+").all()
    assert pooled[fx.RECORD_KEY].is_unique
    assert pooled["full_name"].str.fullmatch(r"[A-Z][a-z]+ [A-Z][A-Za-z']+").all()
    assert pooled["full_name"].nunique() > 500
    assert pooled["national_id"].str.fullmatch(r"\d{3}-\d{2}-\d{4}").all()
    assert pooled["phone"].str.fullmatch(r"\+1-\d{3}-\d{3}-\d{4}").all()
    assert pooled["address"].str.fullmatch(r"\d+ [A-Z][a-z]+ [A-Z][a-z]+, [A-Z][a-z]+").all()
    assert pooled["zip3"].str.fullmatch(r"\d{3}").all()
    assert pooled["age"].between(18, 95).all()
    assert set(pooled["sex"]) == {"F", "M"}


def test_hospital_sizes_are_heavy_tailed_usable_and_sum_to_patients(generated):
    report, out_dir = generated
    rows = [len(pd.read_parquet(path)) for path in report.files]
    assert rows == list(report.rows_by_hospital)
    assert sum(rows) == PATIENTS
    assert max(rows) >= 3 * min(rows)
    assert min(rows) >= 500


def test_hospitals_differ_in_prevalence_and_case_mix(pooled, generated):
    report, _ = generated
    hospital = np.repeat(np.arange(HOSPITALS), report.rows_by_hospital)
    kind = np.asarray(report.hospital_types)[hospital]
    assert report.hospital_types[:3] == ("tertiary", "community", "rural")
    prevalence = pooled[fx.LABEL].groupby(hospital).mean()
    assert prevalence.min() > 0.03 and prevalence.max() < 0.3
    assert prevalence.max() - prevalence.min() > 0.05
    by_type = pooled.groupby(kind)
    assert by_type["age"].mean()["tertiary"] > by_type["age"].mean()["rural"] + 3
    assert by_type["total_charges"].median()["tertiary"] > by_type["total_charges"].median()["rural"]
    no_cover = pooled["insurance_type"].isin(["uninsured", "self_pay"]).groupby(kind).mean()
    assert no_cover["rural"] > no_cover["tertiary"] + 0.05
    remote = pooled["area_type"].isin(["rural", "remote"]).groupby(kind).mean()
    assert remote["rural"] > 0.6 > remote["tertiary"]


def test_consent_rates_and_dates_are_plausible(pooled):
    assert 0.82 < pooled[fx.CONSENT_CREDIT_RISK_RESEARCH].mean() < 0.88
    assert 0.56 < pooled[fx.CONSENT_APPLICANT_SCORING].mean() < 0.64
    encounter = pooled[fx.ENCOUNTER_DATE]
    assert encounter.max() <= pd.Timestamp("2026-06-30")
    assert encounter.min() > pd.Timestamp("2025-06-30")
    assert (pooled[fx.CONSENT_RECORDED_ON] <= encounter).all()


def test_same_seed_gives_same_files_and_other_seed_does_not(tmp_path):
    first = synthesize(3, 3_000, tmp_path / "a", seed=7)
    again = synthesize(3, 3_000, tmp_path / "b", seed=7)
    other = synthesize(3, 3_000, tmp_path / "c", seed=8)
    for left, right in zip(first.files, again.files):
        pd.testing.assert_frame_equal(pd.read_parquet(left), pd.read_parquet(right))
    assert first.oracle_auc == again.oracle_auc
    assert (tmp_path / "a" / "manifest.json").read_text() == (tmp_path / "b" / "manifest.json").read_text()
    assert not pd.read_parquet(first.files[0]).equals(pd.read_parquet(other.files[0]))


def test_ground_truth_is_a_separate_file_that_no_hospital_file_contains(generated, pooled):
    report, out_dir = generated
    assert report.truth_path == out_dir / "ground_truth" / "truth.parquet"
    assert report.truth_path not in set(out_dir.glob("*.parquet"))
    truth = pd.read_parquet(report.truth_path)
    assert list(truth[fx.RECORD_KEY]) == list(pooled[fx.RECORD_KEY])
    assert truth["true_risk"].between(0.0, 1.0).all()
    assert list(truth["hospital"]) == list(np.repeat(np.arange(HOSPITALS), report.rows_by_hospital))
    for path in report.files:
        columns = set(pd.read_parquet(path).columns)
        assert not columns & {"true_risk", "hospital"}


def test_manifest_describes_the_run(generated):
    report, out_dir = generated
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["seed"] == 0
    assert [h["file"] for h in manifest["hospitals"]] == [p.name for p in report.files]
    assert [h["rows"] for h in manifest["hospitals"]] == list(report.rows_by_hospital)
    assert [h["type"] for h in manifest["hospitals"]] == list(report.hospital_types)
    assert 0.75 < manifest["oracle_auc"] < 0.9
    assert manifest["oracle_auc"] == pytest.approx(report.oracle_auc, abs=1e-4)


def test_oracle_auc_matches_sklearn_on_the_ground_truth(generated, pooled):
    report, _ = generated
    truth = pd.read_parquet(report.truth_path)
    assert report.oracle_auc == pytest.approx(roc_auc_score(pooled[fx.LABEL], truth["true_risk"]), abs=1e-9)


def test_encoded_features_are_a_finite_float32_matrix_of_40_columns(pooled):
    assert len(fx.FEATURE_NAMES) == 40 == len(set(fx.FEATURE_NAMES))
    encoded = fx.encode_features(pooled)
    assert encoded.shape == (len(pooled), 40)
    assert encoded.dtype == np.float32
    assert np.isfinite(encoded).all()
    assert (np.abs(encoded) <= 5.0).all()
    typical = np.mean(np.abs(encoded) <= 3.0, axis=0)
    assert typical.min() > 0.95
    labels = fx.encode_labels(pooled)
    assert labels.dtype == np.float32 and labels.shape == (len(pooled),)
    assert set(np.unique(labels)) == {0.0, 1.0}


def test_encoding_ignores_identifiers_and_uses_no_statistics_of_the_data(pooled):
    encoded = fx.encode_features(pooled)
    without_ids = pooled.drop(columns=[fx.RECORD_KEY, *fx.DIRECT_IDENTIFIERS])
    np.testing.assert_array_equal(fx.encode_features(without_ids), encoded)
    assert not set(fx.RAW_FEATURE_COLUMNS) & {fx.RECORD_KEY, fx.LABEL, *fx.DIRECT_IDENTIFIERS}
    np.testing.assert_array_equal(fx.encode_features(pooled.iloc[[17]]), encoded[[17]])
    np.testing.assert_array_equal(fx.encode_features(pooled.iloc[:1000]), encoded[:1000])


def test_unknown_category_and_missing_lab_encode_to_reference(pooled):
    row = pooled.iloc[[0]].copy()
    row["insurance_type"] = "crypto_barter"
    row["hba1c"] = np.nan
    encoded = fx.encode_features(row)[0]
    insurance = [fx.FEATURE_NAMES.index(f"insurance_{name}") for name in fx.INSURANCE_TYPES]
    assert (encoded[insurance] == 0.0).all()
    assert encoded[fx.FEATURE_NAMES.index("hba1c")] == 0.0
    with pytest.raises(fx.FeatureEncodingError, match="albumin"):
        fx.encode_features(pooled.drop(columns=["albumin"]))


def test_logistic_regression_on_encoded_features_comes_close_to_the_oracle(generated, pooled):
    report, _ = generated
    features, labels = fx.encode_features(pooled), fx.encode_labels(pooled)
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=0.3, random_state=0, stratify=labels)
    model = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    auc = roc_auc_score(y_test, model.predict_proba(x_test)[:, 1])
    assert auc > 0.7
    assert abs(report.oracle_auc - auc) < 0.04


@pytest.mark.parametrize(("hospitals", "patients", "seed", "named"), [
    (0, 10_000, 0, "hospitals"),
    (1001, 10_000_000, 0, "hospitals"),
    (500, 249_999, 0, "patients"),
    (4, 1_999, 0, "patients"),
    (2.5, 10_000, 0, "hospitals"),
    (2, 10_000, -1, "seed"),
])
def test_bad_parameters_raise_synthesis_error_and_write_nothing(tmp_path, hospitals, patients, seed, named):
    out_dir = tmp_path / "out"
    with pytest.raises(SynthesisError, match=named):
        synthesize(hospitals, patients, out_dir, seed=seed)
    assert not out_dir.exists()


def test_refuses_to_overwrite_existing_hospital_files(tmp_path):
    synthesize(2, 1_000, tmp_path)
    before = (tmp_path / "hospital_00.parquet").read_bytes()
    with pytest.raises(SynthesisError, match=re.escape(str(tmp_path))):
        synthesize(2, 1_000, tmp_path, seed=1)
    assert (tmp_path / "hospital_00.parquet").read_bytes() == before


def test_five_hundred_hospitals_are_generated_heavy_tailed_and_each_usable(tmp_path):
    import pyarrow.parquet as pq

    report = synthesize(500, 300_000, tmp_path / "out", seed=4)
    sizes = np.array([pq.ParquetFile(f).metadata.num_rows for f in report.files])
    assert len(report.files) == 500 and sizes.sum() == 300_000
    assert sizes.min() >= 500  # every hospital can train locally
    assert sizes.max() > 8 * np.median(sizes)  # a few large hospitals, many small ones
    assert len({f.name for f in report.files}) == 500
