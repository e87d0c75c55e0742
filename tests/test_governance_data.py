"""Bring-your-own-data governance: export schema, validation, pseudonyms, consent, de-identification.

What a hospital would notice: its export is accepted when it matches its schema and refused
with one clear line (file, column, rows; never a patient's value) when it does not, with
nothing written; identifiers never reach training; withdrawn or expired consents are honoured;
and a hospital whose columns are named differently trains the same model inputs.
"""

from __future__ import annotations

import os
import re
import stat
import textwrap
from datetime import date, datetime
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import yaml

from clients.deidentify import PSEUDONYM, deidentify
from clients.schema import SHIPPED_SYNTHETIC_SCHEMA, ExportSchema, SchemaError, synthetic_schema_text
from clients.validation import ValidationFailed, validate_export
from experiments.synthetic import CUTOFF_DATE, synthesize
from federation import features as fx
from federation.errors import DataError, FedriskError
from privacy.consent import (ConsentError, ConsentFields, ConsentPolicy, ExclusionCounts,
                             RevocationRegistry)
from privacy.pseudonym import PseudonymKey, PseudonymKeyError

RESEARCH = "credit-risk-research"
SCORING = "applicant-scoring"
IDENTIFYING = (fx.RECORD_KEY, "full_name", "national_id", "phone", "address")


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ...]:
    """Two small synthetic hospital exports."""
    return synthesize(2, 2000, tmp_path_factory.mktemp("governance") / "d", seed=1).files


@pytest.fixture(scope="module")
def schema() -> ExportSchema:
    return ExportSchema.load(SHIPPED_SYNTHETIC_SCHEMA)


@pytest.fixture(scope="module")
def sample(exports: tuple[Path, ...]) -> pd.DataFrame:
    """The first 60 rows of one export, to break one piece at a time."""
    return pd.read_parquet(exports[0]).iloc[:60].reset_index(drop=True)


@pytest.fixture()
def key(tmp_path: Path) -> PseudonymKey:
    return PseudonymKey.create(tmp_path / "pseudonym.key")


def files_under(directory: Path) -> set[Path]:
    return set(directory.rglob("*"))


def assert_one_clean_line(error: Exception, *needles: str, forbidden: set[str] = frozenset(),
                          kind: type[Exception] = DataError) -> None:
    """A user error (`kind`) whose message is one line, names all `needles` and no value in `forbidden`."""
    message = str(error)
    assert isinstance(error, kind)
    assert message and "\n" not in message and "\r" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    leaked = [value for value in forbidden if value in message]
    assert not leaked, (leaked, message)


# (a) the shipped schema describes the synthetic export ------------------------------------------

def test_shipped_schema_validates_synthetic_exports(exports, schema):
    assert SHIPPED_SYNTHETIC_SCHEMA.read_text() == synthetic_schema_text(), "shipped schema is stale"
    assert sorted(c.name for c in schema.columns) == sorted(fx.EXPORT_DTYPES)
    for path in exports:
        validated = validate_export(path, schema)
        raw = pd.read_parquet(path)
        assert len(validated) == len(raw) and list(validated.table.columns) == list(raw.columns)
        assert validated.table[fx.LABEL].dtype == np.int8
        assert validated.table[fx.CONSENT_RECORDED_ON].dtype.kind == "M"
        assert validated.table["diabetes"].dtype == bool
        assert validated.table["hba1c"].isna().any()  # labs may be missing, and stay missing


def test_documented_example_schema_loads():
    import clients.schema as module
    doc = module.__doc__
    example = textwrap.dedent(doc[doc.index("    version: 1"):doc.index("\nEvery column")])
    documented = ExportSchema.from_mapping(yaml.safe_load(example), source="docstring")
    assert documented.training_columns(RESEARCH) == ["pt_age", "zip3", "hba1c", "depression"]
    assert documented.training_columns(SCORING) == ["pt_age", "zip3", "hba1c"]


def test_csv_and_parquet_validate_to_the_same_table(exports, schema, tmp_path):
    csv = tmp_path / "hospital.csv"
    pd.read_parquet(exports[1]).to_csv(csv, index=False)
    from_csv, from_parquet = validate_export(csv, schema).table, validate_export(exports[1], schema).table
    assert np.array_equal(fx.encode_features(from_csv), fx.encode_features(from_parquet))
    pd.testing.assert_frame_equal(from_csv.drop(columns=list(fx.DIRECT_IDENTIFIERS)),
                                  from_parquet.drop(columns=list(fx.DIRECT_IDENTIFIERS)))


# (b) malformed schema files -----------------------------------------------------------------------

def _base() -> dict:
    return yaml.safe_load(synthetic_schema_text())


def _schema_with(change: Callable[[dict], object]) -> Callable[[Path], Path]:
    def write(directory: Path) -> Path:
        data = _base()
        change(data)
        path = directory / "schema.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path
    return write


def _schema_text(text: str | bytes) -> Callable[[Path], Path]:
    def write(directory: Path) -> Path:
        path = directory / "schema.yaml"
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return path
    return write


def _col(name: str, **changes) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        for key, value in changes.items():
            if value is None:
                data["columns"][name].pop(key.replace("_", "-"), None)
            else:
                data["columns"][name][key.replace("_", "-")] = value
    return change


def _duplicate_column_yaml() -> str:
    text = synthetic_schema_text()
    return text + "  age: {role: feature, class: identity, type: numeric}\n"


BAD_SCHEMAS = [
    ("yaml-syntax", _schema_text("version: 1\ncolumns: {age: [role: feature\n"), ["line"]),
    ("not-a-mapping", _schema_text("- version\n- columns\n"), ["mapping"]),
    ("empty-file", _schema_text(""), ["mapping"]),
    ("not-utf8", _schema_text(b"\xff\xfe\x00bad"), []),
    ("unknown-top-key", _schema_with(lambda d: d.update(colums={})), ["colums"]),
    ("wrong-version", _schema_with(lambda d: d.update(version=2)), ["version"]),
    ("unknown-role", _schema_with(_col("age", role="identifier")), ["'age'", "identifier"]),
    ("unknown-class", _schema_with(_col("hba1c", **{"class": "lab-results"})), ["'hba1c'", "lab-results"]),
    ("missing-class", _schema_with(_col("bmi", **{"class": None})), ["'bmi'", "class"]),
    ("missing-record-key", _schema_with(lambda d: d["columns"].pop(fx.RECORD_KEY)), ["record-key"]),
    ("missing-label", _schema_with(lambda d: d["columns"].pop(fx.LABEL)), ["label"]),
    ("two-labels", _schema_with(lambda d: d["columns"].update(
        label_copy={"role": "label", "class": "insurance-billing"})), ["label_copy"]),
    ("duplicate-maps-to", _schema_with(lambda d: d["columns"].update(
        a1c={"role": "feature", "class": "vitals-labs", "type": "numeric", "maps-to": "hba1c"})), ["'a1c'", "maps-to"]),
    ("maps-to-unknown", _schema_with(_col("bmi", maps_to="body_mass")), ["'bmi'", "body_mass"]),
    ("maps-to-wrong-type", _schema_with(_col("sex", maps_to="age")), ["'sex'", "maps-to"]),
    ("reversed-bounds", _schema_with(_col("age", min=120, max=0)), ["'age'", "min"]),
    ("bound-not-number", _schema_with(_col("bmi", max="high")), ["'bmi'", "max"]),
    ("bounds-on-text", _schema_with(_col("insurance_type", min=0)), ["'insurance_type'", "min"]),
    ("unknown-generalisation", _schema_with(_col("zip3", generalise={"zip5": 3})), ["'zip3'", "zip5"]),
    ("qi-without-generalisation", _schema_with(_col("sex", generalise=None)), ["'sex'", "generalise"]),
    ("age-band-on-text", _schema_with(_col("sex", generalise={"age-band": 10})), ["'sex'", "age-band"]),
    ("age-band-zero", _schema_with(_col("age", generalise={"age-band": 0})), ["'age'", "age-band"]),
    ("unknown-type", _schema_with(_col("hba1c", type="float")), ["'hba1c'", "float"]),
    ("consent-without-purpose", _schema_with(_col(fx.CONSENT_APPLICANT_SCORING, purpose=None)),
     [fx.CONSENT_APPLICANT_SCORING, "purpose"]),
    ("purpose-not-slug", _schema_with(_col(fx.CONSENT_APPLICANT_SCORING, purpose="Applicant Scoring")),
     [fx.CONSENT_APPLICANT_SCORING, "slug"]),
    ("consent-without-date", _schema_with(lambda d: d["columns"].pop(fx.CONSENT_RECORDED_ON)), ["consent-date"]),
    ("allow-on-unrestricted-class", _schema_with(_col("diabetes", allow_for_purposes=[RESEARCH])),
     ["'diabetes'", "allow-for-purposes"]),
    ("unknown-column-key", _schema_with(_col("hba1c", maxx=3)), ["'hba1c'", "maxx"]),
    ("categories-not-text",
     _schema_text(synthetic_schema_text().replace("categories: [F, M]", "categories: [yes, no]")),
     ["'sex'", "categories"]),
    ("column-written-twice", _schema_text(_duplicate_column_yaml()), ["age", "twice"]),
    ("validity-for-unknown-purpose", _schema_with(lambda d: d.update({"consent-validity-days": {"marketing": 30}})),
     ["marketing"]),
]


@pytest.mark.parametrize("name,write,needles", BAD_SCHEMAS, ids=[case[0] for case in BAD_SCHEMAS])
def test_bad_schema_file_is_refused_in_one_line(name, write, needles, tmp_path):
    path = write(tmp_path)
    before = files_under(tmp_path)
    with pytest.raises(SchemaError) as caught:
        ExportSchema.load(path)
    assert_one_clean_line(caught.value, str(path), *needles)
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("name,make", [("missing", lambda d: d / "nowhere.yaml"),
                                      ("directory", lambda d: (d / "schema.yaml").mkdir() or d / "schema.yaml")])
def test_schema_file_that_cannot_be_opened(name, make, tmp_path):
    path = make(tmp_path)
    with pytest.raises(SchemaError) as caught:
        ExportSchema.load(path)
    assert_one_clean_line(caught.value, str(path))


def test_at_least_thirty_malformed_inputs():
    assert len(BAD_SCHEMAS) >= 12 and len(BAD_DATA) >= 18 and len(BAD_SCHEMAS) + len(BAD_DATA) >= 30


# (b) malformed data files -------------------------------------------------------------------------

def _parquet(change: Callable[[pd.DataFrame], pd.DataFrame], suffix: str = ".parquet"):
    def write(sample: pd.DataFrame, directory: Path) -> Path:
        path = directory / f"hospital{suffix}"
        frame = change(sample.copy())
        frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path, index=False)
        return path
    return write


def _bytes(content: bytes, name: str = "hospital.parquet"):
    def write(sample: pd.DataFrame, directory: Path) -> Path:
        path = directory / name
        path.write_bytes(content)
        return path
    return write


def _set(column: str, rows: list[int], value, as_text: bool = False):
    """Put `value` in `rows` of `column`; `as_text` turns the column into text first (a mixed column
    cannot be stored in Parquet otherwise)."""
    def change(frame: pd.DataFrame) -> pd.DataFrame:
        series = frame[column].astype(str if as_text else object)
        series.loc[rows] = value
        frame[column] = series if as_text else series.infer_objects()
        return frame
    return change


def _truncated(sample: pd.DataFrame, directory: Path) -> Path:
    path = directory / "hospital.parquet"
    sample.to_parquet(path, index=False)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _ragged_csv(sample: pd.DataFrame, directory: Path) -> Path:
    path = directory / "hospital.csv"
    sample.to_csv(path, index=False)
    lines = path.read_text().splitlines()
    lines[4] += ",surplus,fields"
    path.write_text("\n".join(lines) + "\n")
    return path


def _directory(sample: pd.DataFrame, directory: Path) -> Path:
    path = directory / "hospital.parquet"
    path.mkdir()
    return path


BAD_DATA = [
    # (id, writer, column named in the message or None, offending 0-based rows or None, other needles)
    ("missing-column", _parquet(lambda f: f.drop(columns=["out_of_pocket"])), "out_of_pocket", None, ["missing"]),
    ("extra-column", _parquet(lambda f: f.assign(free_text_notes="see chart")), "free_text_notes", None,
     ["not declared"]),
    ("number-as-words", _parquet(_set("age", [3, 7], "forty", as_text=True)), "age", [3, 7], ["not a number"]),
    ("number-as-words-csv", _parquet(_set("age", [5], "forty"), ".csv"), "age", [5], ["not a number"]),
    ("flag-not-boolean", _parquet(_set("diabetes", [2], "maybe", as_text=True)), "diabetes", [2], ["true/false"]),
    ("flag-not-boolean-csv", _parquet(_set(fx.CONSENT_CREDIT_RISK_RESEARCH, [9], "perhaps"), ".csv"),
     fx.CONSENT_CREDIT_RISK_RESEARCH, [9], ["true/false"]),
    ("category-coded-but-undeclared", _parquet(lambda f: f.assign(sex=np.where(f["sex"] == "F", 1, 2))), "sex",
     [0, 1, 2], ["not one of the declared categories"]),
    ("category-as-fraction", _parquet(lambda f: f.assign(sex=np.where(f["sex"] == "F", 1.5, 2.5))), "sex",
     [0, 1, 2], ["not text or a whole number"]),
    ("date-unparseable", _parquet(_set(fx.CONSENT_RECORDED_ON, [4, 9], "2024-13-45", as_text=True)),
     fx.CONSENT_RECORDED_ON, [4, 9], ["not a date"]),
    ("date-as-number", _parquet(lambda f: f.assign(**{fx.ENCOUNTER_DATE: np.arange(len(f)) + 20_000})),
     fx.ENCOUNTER_DATE, [0, 1, 2], ["not a date"]),
    ("fraction-in-count", _parquet(_set("admissions_12m", [6], 1.5)), "admissions_12m", [6], ["whole"]),
    ("above-maximum", _parquet(_set("hba1c", [5, 20], 99.0)), "hba1c", [5, 20], ["maximum"]),
    ("below-minimum", _parquet(_set("age", [8], -3)), "age", [8], ["minimum"]),
    ("undeclared-category", _parquet(_set("insurance_type", [10], "gold")), "insurance_type", [10], ["categories"]),
    ("missing-required-value", _parquet(_set("total_charges", [11], np.nan)), "total_charges", [11], ["empty"]),
    ("missing-consent-flag", _parquet(_set(fx.CONSENT_APPLICANT_SCORING, [17], None)),
     fx.CONSENT_APPLICANT_SCORING, [17], ["empty"]),
    ("duplicate-record-keys", _parquet(lambda f: f.assign(**{fx.RECORD_KEY: f[fx.RECORD_KEY].where(
        f.index != 13, f.loc[12, fx.RECORD_KEY])})), fx.RECORD_KEY, [12, 13], ["duplicate"]),
    ("empty-record-key", _parquet(_set(fx.RECORD_KEY, [14], None)), fx.RECORD_KEY, [14], ["empty"]),
    ("blank-record-key", _parquet(_set(fx.RECORD_KEY, [19], "   ")), fx.RECORD_KEY, [19], ["empty"]),
    ("keys-equal-but-for-spaces", _parquet(lambda f: f.assign(**{fx.RECORD_KEY: f[fx.RECORD_KEY].where(
        f.index != 21, " " + f.loc[20, fx.RECORD_KEY])})), fx.RECORD_KEY, [20, 21], ["duplicate"]),
    ("nan-label", _parquet(_set(fx.LABEL, [15], np.nan)), fx.LABEL, [15], []),
    ("label-not-binary", _parquet(_set(fx.LABEL, [16, 18], 2)), fx.LABEL, [16, 18], ["0 or 1"]),
    ("empty-parquet", _parquet(lambda f: f.iloc[0:0]), None, None, ["no records"]),
    ("header-only-csv", _parquet(lambda f: f.iloc[0:0], ".csv"), None, None, ["no records"]),
    ("zero-byte-csv", _bytes(b"", "hospital.csv"), None, None, ["empty"]),
    ("not-a-parquet-file", _bytes(b"patient_id,age\nMRN-1,40\n"), None, None, ["not a valid parquet"]),
    ("truncated-parquet", _truncated, None, None, ["not a valid parquet"]),
    ("not-utf8-csv", _bytes(b"\xff\xfe\xfa\xfb,\xff\n\xfe,\xfa\n", "hospital.csv"), None, None, ["UTF-8"]),
    ("ragged-csv", _ragged_csv, None, None, ["malformed CSV"]),
    ("unsupported-suffix", _bytes(b"PK\x03\x04", "hospital.xlsx"), None, None, ["unsupported"]),
    ("directory-not-file", _directory, None, None, ["directory"]),
    ("missing-file", lambda sample, directory: directory / "hospital_99.parquet", None, None, ["not found"]),
]


@pytest.mark.parametrize("name,write,column,rows,needles", BAD_DATA, ids=[case[0] for case in BAD_DATA])
def test_bad_data_file_is_refused_in_one_line(name, write, column, rows, needles, sample, schema, tmp_path):
    path = write(sample, tmp_path)
    before = files_under(tmp_path)
    identifying = {str(v) for c in IDENTIFYING for v in sample[c]}
    with pytest.raises(ValidationFailed) as caught:
        validate_export(path, schema)
    expected = [str(path), *needles] + ([f"'{column}'"] if column else [])
    assert_one_clean_line(caught.value, *expected, forbidden=identifying)
    for row in (rows or [])[:3]:
        assert re.search(rf"\brows? [\d, ]*\b{row + 1}\b", str(caught.value)), (row + 1, str(caught.value))
    assert files_under(tmp_path) == before


# (c) pseudonyms -----------------------------------------------------------------------------------

def test_pseudonyms_are_stable_per_key_and_unlinkable_across_keys(tmp_path, sample):
    first = PseudonymKey.create(tmp_path / "a.key")
    assert stat.S_IMODE((tmp_path / "a.key").stat().st_mode) == 0o600
    assert (tmp_path / "a.key").stat().st_size == 32
    keys = sample[fx.RECORD_KEY]
    again = PseudonymKey.load(tmp_path / "a.key").pseudonymise(keys)
    assert again.equals(first.pseudonymise(keys))
    assert again.str.fullmatch(r"[0-9a-f]{32}").all() and again.nunique() == keys.nunique()
    other = PseudonymKey.create(tmp_path / "b.key").pseudonymise(keys)
    assert not set(other) & set(again)
    assert first.secret.hex() not in repr(first)


def test_pseudonym_key_file_is_protected(tmp_path):
    path = tmp_path / "node.key"
    PseudonymKey.create(path)
    with pytest.raises(PseudonymKeyError, match="refusing to overwrite"):
        PseudonymKey.create(path)
    os.chmod(path, 0o644)
    with pytest.raises(PseudonymKeyError) as caught:
        PseudonymKey.load(path)
    assert_one_clean_line(caught.value, str(path), "0644", kind=FedriskError)
    os.chmod(path, 0o600)
    path.write_bytes(b"short")
    with pytest.raises(PseudonymKeyError, match="5 bytes"):
        PseudonymKey.load(path)
    with pytest.raises(PseudonymKeyError, match="not found"):
        PseudonymKey.load(tmp_path / "absent.key")


# (d) consent --------------------------------------------------------------------------------------

def test_revoked_and_expired_records_are_excluded_with_counts_by_reason(tmp_path, key):
    today = date(2026, 6, 30)
    days_ago = [10, None, 800, 10, 730, 729, 5, None, 100]
    consented = [True, False, True, True, True, True, False, True, True]
    table = pd.DataFrame({
        "mrn": [f"K{i}" for i in range(9)],
        "ok": consented,
        "on": [pd.Timestamp(today) - pd.Timedelta(days=d) if d is not None else pd.NaT for d in days_ago],
    })
    pseudonyms = key.pseudonymise(table["mrn"])
    registry = RevocationRegistry(tmp_path / "revocations.sqlite")
    registry.revoke(pseudonyms[3], RESEARCH, datetime(2026, 6, 1, 9))
    registry.revoke(pseudonyms[6], RESEARCH, datetime(2026, 6, 1, 9))
    registry.revoke(pseudonyms[8], SCORING, datetime(2026, 6, 1, 9))   # another purpose: no effect
    registry.revoke(pseudonyms[0], RESEARCH, datetime(2026, 6, 30, 12))  # during the run: next run
    policy = ConsentPolicy({RESEARCH: ConsentFields(granted="ok", recorded_on="on")})
    run_start = datetime(2026, 6, 30, 8)
    revoked_at_start = RevocationRegistry(tmp_path / "revocations.sqlite").revoked(RESEARCH, as_of=run_start)
    mask, excluded = policy.decide(table, RESEARCH, today=today, pseudonyms=pseudonyms, revoked=revoked_at_start)
    assert mask.tolist() == [True, False, False, False, False, True, False, False, True]
    assert excluded == ExclusionCounts(no_consent_for_purpose=2, revoked=1, expired=3)
    assert excluded.as_dict() == {"no-consent-for-purpose": 2, "revoked": 1, "expired": 3}

    next_run = policy.decide(table, RESEARCH, today=today, pseudonyms=pseudonyms, revoked=registry.revoked(RESEARCH))
    assert next_run.excluded.revoked == 2 and not next_run.mask[0]


def test_a_withdrawal_is_undone_on_record_and_can_be_made_again(tmp_path, key):
    """Undoing a withdrawal adds to the record, never deletes (the node's anchored head counts it);
    runs started before the undo still exclude the record, later ones use it; withdrawing again works."""
    registry = RevocationRegistry(tmp_path / "revocations.sqlite")
    patient, other = key.pseudonymise(pd.Series(["MRN-1", "MRN-2"]))
    assert registry.revoke(patient, RESEARCH, datetime(2026, 6, 1, 9))
    assert not registry.revoke(patient, RESEARCH, datetime(2026, 6, 2, 9))  # already withdrawn: nothing recorded
    with pytest.raises(ConsentError, match="nothing to undo"):
        registry.restore(other, RESEARCH)
    registry.restore(patient, RESEARCH, datetime(2026, 6, 10, 9))
    assert registry.revoked(RESEARCH, as_of=datetime(2026, 6, 5)) == {patient}  # a run started before the undo
    assert registry.revoked(RESEARCH) == set()
    with pytest.raises(ConsentError, match="nothing to undo"):
        registry.restore(patient, RESEARCH)
    assert registry.revoke(patient, RESEARCH, datetime(2026, 6, 20, 9))
    assert registry.revoked(RESEARCH) == {patient} and registry.revoked(SCORING) == set()
    assert [action for _, _, _, action in registry.history()] == ["revoked", "restored", "revoked"]
    assert len(registry.entries()) == 3  # only ever grows


def test_consent_expiry_column_and_schema_policy(exports, schema, key):
    validated = validate_export(exports[0], schema).table
    validity = schema.consent_validity_days[RESEARCH]
    today = (pd.Timestamp(CUTOFF_DATE) + pd.Timedelta(days=validity - 2 * 365)).date()
    pseudonyms = key.pseudonymise(validated[fx.RECORD_KEY])
    decision = schema.consent_policy().decide(validated, RESEARCH, today=today, revoked=set(), pseudonyms=pseudonyms)
    granted = validated[fx.CONSENT_CREDIT_RISK_RESEARCH].to_numpy()
    current = (validated[fx.CONSENT_RECORDED_ON] + pd.Timedelta(days=validity) > pd.Timestamp(today)).to_numpy()
    assert decision.mask.tolist() == (granted & current).tolist()
    assert decision.excluded.no_consent_for_purpose == int((~granted).sum())
    assert decision.excluded.expired == int((granted & ~current).sum()) > 0
    assert decision.excluded.total + int(decision.mask.sum()) == len(validated)

    with_expiry = validated.assign(until=pd.Timestamp(today) + pd.Timedelta(days=1))
    policy = ConsentPolicy({RESEARCH: ConsentFields(granted=fx.CONSENT_CREDIT_RISK_RESEARCH, expires_on="until")})
    assert policy.decide(with_expiry, RESEARCH, today=today, revoked=set(), pseudonyms=pseudonyms).excluded.expired == 0
    with pytest.raises(ConsentError, match="marketing"):
        policy.decide(with_expiry, "marketing", today=today, revoked=set(), pseudonyms=pseudonyms)
    with pytest.raises(ConsentError):
        RevocationRegistry(Path(key.path).parent / "r.sqlite").revoke("MRN-123", RESEARCH)


# (e) de-identification ----------------------------------------------------------------------------

def test_deidentification_drops_identifiers_first_and_generalises(exports, schema, key):
    validated = validate_export(exports[0], schema)
    untouched = validated.table.copy()
    result = deidentify(validated, schema, key, purpose=RESEARCH)
    table, report = result.table, result.report
    pd.testing.assert_frame_equal(validated.table, untouched)
    assert report.steps[0].startswith("dropped direct identifiers")
    assert report.dropped_identifiers == fx.DIRECT_IDENTIFIERS
    assert not set(IDENTIFYING) & set(table.columns)
    cells = {str(v) for column in table.columns for v in table[column]}
    assert not cells & {str(v) for c in IDENTIFYING for v in untouched[c]}
    assert table[PSEUDONYM].equals(key.pseudonymise(untouched[fx.RECORD_KEY]).rename(PSEUDONYM))
    age = untouched["age"]
    assert (table["age"] % 10 == 0).all() and (table["age"] <= age).all() and (age - table["age"] < 10).all()
    assert table["zip3"].equals(untouched["zip3"].str.slice(0, 2))
    assert (table[fx.ENCOUNTER_DATE].dt.day == 1).all()
    assert (table[fx.ENCOUNTER_DATE].dt.month == untouched[fx.ENCOUNTER_DATE].dt.month).all()
    assert report.generalised == {"age": "age-band 10", "zip3": "prefix 2", fx.ENCOUNTER_DATE: "month"}
    assert not set(fx.CONSENT_COLUMNS) & set(table.columns)
    assert {"depression", "substance_use"} <= set(table.columns)


def test_restricted_classes_need_an_explicit_release(exports, schema, key):
    validated = validate_export(exports[0], schema)
    scoring = deidentify(validated, schema, key, purpose=SCORING)
    assert not {"depression", "substance_use"} & set(scoring.table.columns)
    assert scoring.report.excluded_sensitive == ("depression", "substance_use")

    data = _base()
    data["columns"]["brca1_variant"] = {"role": "feature", "class": "genetic-biosample", "type": "boolean"}
    with_genetics = ExportSchema.from_mapping(data)
    table = validated.table.assign(brca1_variant=False)
    assert "brca1_variant" not in deidentify(table, with_genetics, key, purpose=RESEARCH).table.columns
    data["columns"]["brca1_variant"]["allow-for-purposes"] = [RESEARCH]
    released = ExportSchema.from_mapping(data)
    assert "brca1_variant" in deidentify(table, released, key, purpose=RESEARCH).table.columns
    assert "brca1_variant" not in deidentify(table, released, key, purpose=SCORING).table.columns


# (f) a hospital whose columns are named differently ------------------------------------------------

RENAMES = {fx.RECORD_KEY: "mrn", "age": "pt_age", "sex": "gender", "hba1c": "a1c_pct",
           "total_charges": "charges_total", "depression": "dep_dx", fx.LABEL: "outcome_90d"}


def test_mapped_schema_yields_the_same_model_inputs(exports, schema, key, tmp_path):
    data = _base()
    data["columns"] = {RENAMES.get(name, name): spec | ({"maps-to": name} if name in RENAMES
                                                       and name != fx.RECORD_KEY else {})
                       for name, spec in data["columns"].items()}
    (tmp_path / "mapped.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    mapped = ExportSchema.load(tmp_path / "mapped.yaml")
    renamed_export = tmp_path / "renamed.csv"
    pd.read_parquet(exports[0]).rename(columns=RENAMES).to_csv(renamed_export, index=False)

    standard = deidentify(validate_export(exports[0], schema), schema, key, purpose=RESEARCH)
    other = deidentify(validate_export(renamed_export, mapped), mapped, key, purpose=RESEARCH)
    assert other.report.renamed == {v: k for k, v in RENAMES.items() if k != fx.RECORD_KEY}
    assert np.array_equal(fx.encode_features(other.table), fx.encode_features(standard.table))
    assert np.array_equal(fx.encode_labels(other.table), fx.encode_labels(standard.table))
    assert other.table[PSEUDONYM].equals(standard.table[PSEUDONYM])
    assert list(fx.encode_features(standard.table).shape) == [len(standard.table), len(fx.FEATURE_NAMES)]


@pytest.mark.parametrize("kind", ["parquet-int", "parquet-with-missing", "csv", "csv-with-missing"])
def test_integer_coded_categories_validate_and_encode(tmp_path: Path, kind: str) -> None:
    """A hospital's tumour grade coded 1/2/3: declared unquoted, read from an integer column (or a
    float one, as one missing value makes it, or CSV text), one-hot encoded like any category."""
    from clients import encoding
    from experiments.breast_cancer import PURPOSE, export_breast_cancer

    files, schema_path = export_breast_cancer(tmp_path / "data", hospitals=2, seed=0)
    schema_text = schema_path.read_text().replace("columns:\n", "columns:\n  grade:\n    role: feature\n"
                                                  "    class: diagnosis-treatment\n    type: categorical\n"
                                                  "    nullable: true\n    categories: [1, 2, 3]\n", 1)
    schema_path.write_text(schema_text)
    schema = ExportSchema.load(schema_path)
    assert schema.column("grade").categories == ("1", "2", "3")
    frame = pd.read_csv(files[0], dtype=str)
    grades = np.resize([1, 2, 3], len(frame))
    if kind == "csv":
        frame["grade"] = grades.astype(str)
        path = tmp_path / "export.csv"
        frame.to_csv(path, index=False)
    elif kind == "csv-with-missing":  # pandas writes such a column as 1.0, 2.0, ... and an empty cell
        frame["grade"] = np.where(np.arange(len(frame)) == 0, np.nan, grades)
        path = tmp_path / "export.csv"
        frame.to_csv(path, index=False)
        assert "2.0" in path.read_text()
    else:
        frame["grade"] = grades if kind == "parquet-int" else np.where(np.arange(len(frame)) == 0, np.nan, grades)
        path = tmp_path / "export.parquet"
        frame.to_parquet(path)
    validated = validate_export(path, schema)
    assert validated.table["grade"].iloc[1] == "2"
    names = encoding.feature_names(schema, PURPOSE)
    assert [n for n in names if n.startswith("grade=")] == ["grade=1", "grade=2", "grade=3"]
    frame["grade"] = np.resize([1, 4], len(frame)) if not kind.startswith("csv") else np.resize(["1", "4"], len(frame))
    frame.to_csv(path, index=False) if kind.startswith("csv") else frame.to_parquet(path)
    with pytest.raises(ValidationFailed, match="grade.*not one of the declared categories"):
        validate_export(path, schema)


def test_a_models_scale_is_declared_apart_from_what_validation_accepts(tmp_path: Path) -> None:
    """A skewed lab value validated on [0, 5000] but read by the model on log(1 + x) over [1, 500]:
    typical values spread over [-1, 1] instead of a sliver of it; a bad scale is refused."""
    from clients import encoding
    from experiments.breast_cancer import PURPOSE, export_breast_cancer

    _, schema_path = export_breast_cancer(tmp_path / "data", hospitals=2, seed=0)
    text = schema_path.read_text()
    assert "  mean_area:\n" in text
    scaled = re.sub(r"(  mean_area:\n(?:    .*\n)*?    max: [0-9.]+\n)",
                    r"\1    scale: {min: 100, max: 3000, log: true}\n", text, count=1)
    assert scaled != text
    schema_path.write_text(scaled)
    schema = ExportSchema.load(schema_path)
    spec = schema.column("mean_area")
    assert spec.scale is not None and spec.scale.log and spec.maximum is not None
    index = encoding.feature_names(schema, PURPOSE).index("mean_area")
    table = pd.DataFrame({c.target: [0.0] * 3 for c in encoding.input_columns(schema, PURPOSE)})
    table["mean_area"] = [143.5, 551.0, 2501.0]  # the data's smallest, median and largest area
    x = encoding.encode(table, schema, PURPOSE)[:, index]
    linear = 2.0 * (table["mean_area"].to_numpy() - spec.minimum) / (spec.maximum - spec.minimum) - 1.0
    assert np.ptp(x) > 1.5 and x[1] > -0.1  # the median sits near the middle, not at the bottom edge
    assert linear[1] < -0.5  # what the validation bounds alone gave
    for bad, words in (("{min: 10, max: 5}", "min < max"), ("{min: -2, max: 5, log: true}", "min > -1"),
                       ("[1, 2]", "is a mapping")):
        schema_path.write_text(scaled.replace("{min: 100, max: 3000, log: true}", bad))
        with pytest.raises(SchemaError, match=re.escape(words)):
            ExportSchema.load(schema_path)
