"""`fedrisk node schema init`: a draft schema from someone else's export that loads, validates the
export, flags what a person must review, and never guesses an identifier into a model input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from clients.schema_draft import draft_schema, write_draft
from clients.validation import validate_export
from experiments.synthetic import synthesize
from federation.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_a_draft_of_the_synthetic_export_loads_validates_it_and_keeps_identifiers_out(tmp_path: Path) -> None:
    report = synthesize(2, 2_000, tmp_path / "data", seed=4)
    schema = write_draft(list(report.files), tmp_path / "draft.yaml", label="delinquent_90d_12m")
    roles = {c.name: c.role for c in schema.columns}
    assert roles["patient_id"] == "record-key"
    assert {roles[c] for c in ("full_name", "phone", "address", "national_id")} == {"direct-identifier"}
    assert roles["consent_credit_risk_research"] == "consent" and roles["consent_recorded_on"] == "consent-date"
    assert set(schema.consent_policy().purposes) == {"credit-risk-research", "applicant-scoring"}
    assert schema.column("sex").categories == ("F", "M")
    for path in report.files:
        validate_export(path, schema)  # the draft accepts the exports it was drafted from
    text = (tmp_path / "draft.yaml").read_text()
    assert text.count("# REVIEW: observed range here") >= 10 and "before the schema is shared" in text


def test_draft_refusals_name_the_flag(tmp_path: Path) -> None:
    report = synthesize(1, 500, tmp_path / "data", seed=5)
    with pytest.raises(ConfigError, match="--label 'default' is not a column"):
        draft_schema(report.files[0], label="default")
    with pytest.raises(ConfigError, match="--record-key 'mrn' is not a column"):
        draft_schema(report.files[0], label="delinquent_90d_12m", record_key="mrn")
    (tmp_path / "taken.yaml").write_text("keep me")
    result = subprocess.run([sys.executable, "-m", "cli.main", "node", "schema", "init", "--data", str(report.files[0]),
                             "--label", "delinquent_90d_12m", "--out", str(tmp_path / "taken.yaml")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "never overwrites" in result.stderr
    assert (tmp_path / "taken.yaml").read_text() == "keep me"


def test_identifiers_by_other_names_and_rare_values_stay_out_of_the_inputs(tmp_path: Path) -> None:
    """Someone else's export: camelCase names, a unique column that is a key by another name, a
    date of birth, a postcode, a rare free-text value, and bounds YAML would misread if printed
    as 2e+06: none becomes a model input or a category, and the draft still loads."""
    import pandas as pd

    rows = 60
    frame = pd.DataFrame({
        "PatientName": [f"Person {i}" for i in range(rows)],
        "encounter_id": [f"E{i:05d}" for i in range(rows)],
        "chart_number": list(range(1000, 1000 + rows)),  # unique integers: a key by another name
        "dob": ["1970-01-01"] * rows, "postcode": ["AB1"] * rows,
        "ward": ["north"] * 30 + ["south"] * 29 + ["Mrs Smith's bay"],  # one rare value
        "charges": [2_000_000.25 + i for i in range(rows)], "tiny": [0.00001 * (i + 1) for i in range(rows)],
        "consent_research": ["true"] * rows, "consent_on": ["2026-01-01"] * rows,
        "outcome": [i % 2 for i in range(rows)]})
    path = tmp_path / "export.csv"
    frame.to_csv(path, index=False)
    schema = write_draft(path, tmp_path / "draft.yaml", label="outcome", record_key="encounter_id")
    roles = {c.name: c.role for c in schema.columns}
    assert {roles[c] for c in ("PatientName", "chart_number", "dob", "postcode")} == {"direct-identifier"}
    assert schema.column("ward").categories is None  # "Mrs Smith's bay" is in no shared list
    assert "Mrs Smith" not in (tmp_path / "draft.yaml").read_text()
    assert schema.column("charges").maximum >= 2_000_059 and 0 < schema.column("tiny").minimum < 0.0001
