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
    assert "genetic" not in text and "psych-social" not in text  # restricted classes are never guessed


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
