"""Check a hospital export against its schema before anything else happens to it.

`validate_export` reads a CSV or Parquet export, checks it with a pandera schema built from
the `ExportSchema` (lazily, so every failure is gathered), and returns the typed table. Any
problem raises `ValidationFailed`: one line naming the file, the first failing column and the
first offending data rows (1-based). Values are never printed, because a cell of an export
may identify a patient; only column names and row numbers leave this module. Nothing is
written: validation reads the file and nothing else.

CSV files are read as text and parsed here, so an integer-looking zip code keeps its leading
zeros and a typo in a number is reported rather than silently turned into a missing value.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from importlib.metadata import version as _version
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd
import pyarrow

from clients.schema import ColumnSpec, ExportSchema
from federation.errors import DataError

if TYPE_CHECKING:  # pandera is imported where exports are checked, not by every node process
    import pandera.pandas as pa

_TRUE_WORDS = {"true": True, "t": True, "yes": True, "y": True, "1": True, "1.0": True,
               "false": False, "f": False, "no": False, "n": False, "0": False, "0.0": False}
_MAX_ROWS_SHOWN = 3
_BUILTIN_CHECKS = {"not_nullable": "empty value"}


class ValidationFailed(DataError):
    """An export is missing, unreadable, or does not match its schema (names file, column, rows)."""


@dataclass(frozen=True)
class ValidatedExport:
    """A validated export: `table` holds every declared column, typed (numbers float64 or
    int64, flags bool, dates datetime64, text string, label int8); `path` is where it came from."""

    path: Path
    table: pd.DataFrame
    schema: ExportSchema

    def __len__(self) -> int:
        return len(self.table)


def as_number(series: pd.Series) -> pd.Series:
    """Values as float64; NaN where missing or not a number (true/false is not a number)."""
    if pd.api.types.is_bool_dtype(series) or pd.api.types.is_datetime64_any_dtype(series):
        return pd.Series(np.nan, index=series.index)
    if pd.api.types.is_numeric_dtype(series):
        return series.astype("float64")
    return pd.to_numeric(series.astype("string").str.strip(), errors="coerce").astype("float64")


def as_flag(series: pd.Series) -> pd.Series:
    """Values as True/False (bool, 0/1, or words such as true/yes/no); NA where not a flag."""
    if pd.api.types.is_bool_dtype(series):
        return series.astype("boolean")
    if pd.api.types.is_numeric_dtype(series):
        return series.map({0: False, 1: True}).astype("boolean")
    if pd.api.types.is_datetime64_any_dtype(series):
        return pd.Series(pd.NA, index=series.index, dtype="boolean")
    return series.astype("string").str.strip().str.lower().map(_TRUE_WORDS).astype("boolean")


def as_date(series: pd.Series) -> pd.Series:
    """Values as datetime64[ns] (ISO 8601 text or native dates); NaT where not a date."""
    if pd.api.types.is_datetime64_any_dtype(series):
        return series.dt.tz_localize(None) if series.dt.tz is not None else series.astype("datetime64[ns]")
    if pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
        return pd.Series(pd.NaT, index=series.index, dtype="datetime64[ns]")
    text = series.astype("string").str.strip()
    return pd.to_datetime(text, errors="coerce", format="ISO8601").astype("datetime64[ns]")


def category_text(series: pd.Series) -> pd.Series:
    """A categorical column's values as the text its categories are declared in: text as it is
    (stripped), whole numbers as their digits (an integer-coded column, 1 -> "1", also when a
    missing value made the column float). Anything else (1.5, True) becomes missing, which the
    "not text or a whole number" check reports."""
    if isinstance(series.dtype, pd.CategoricalDtype):
        series = series.astype("object")
    if pd.api.types.is_bool_dtype(series):
        return pd.Series(pd.NA, index=series.index, dtype="string")
    if pd.api.types.is_numeric_dtype(series):
        whole = series.notna() & (series % 1 == 0)
        out = pd.Series(pd.NA, index=series.index, dtype="string")
        out[whole] = series[whole].astype("int64").astype(str)
        return out

    def one(value: object) -> object:
        if isinstance(value, bool):
            return pd.NA
        if isinstance(value, (int, np.integer)):
            return str(int(value))
        if isinstance(value, (float, np.floating)):
            return str(int(value)) if np.isfinite(value) and value % 1 == 0 else pd.NA
        if isinstance(value, str):
            text = value.strip()
            # an integer-coded column with a missing value, written to CSV by pandas, reads "1.0"
            return text.split(".")[0] if re.fullmatch(r"-?\d+\.0+", text) else text
        return pd.NA

    if pd.api.types.infer_dtype(series, skipna=True) == "string":  # the common case: each distinct text once
        codes, uniques = pd.factorize(series, use_na_sentinel=True)
        mapped = pd.array([one(value) for value in uniques] + [pd.NA], dtype="string")
        return pd.Series(mapped.take(np.where(codes < 0, len(uniques), codes)), index=series.index, name=series.name)
    return series.map(one).astype("string")


def _is_category(series: pd.Series) -> pd.Series:
    """True where a value is text or a whole number, or missing (nullability is checked apart)."""
    return category_text(series).notna() | series.isna()


def _check(test: Callable[[pd.Series], pd.Series], message: str) -> pa.Check:
    """A vectorised pandera check whose failure is reported as `message` (never with values)."""
    import pandera.pandas as pa

    return pa.Check(lambda s: test(s).fillna(False).astype(bool), error=message)


def _checks(spec: ColumnSpec) -> list[pa.Check]:
    """The value checks one column needs, by role and type."""
    kind = {"label": "label", "consent": "boolean", "consent-date": "date",
            "consent-expiry": "date"}.get(spec.role, spec.type)
    if spec.role == "record-key":
        def keys(s: pd.Series) -> pd.Series:
            return s.astype("string").str.strip()
        return [_check(lambda s: keys(s).str.len() > 0, "empty value"),
                _check(lambda s: ~keys(s).duplicated(keep=False), "duplicate record key")]
    if kind == "label":
        return [_check(lambda s: as_number(s).isin([0.0, 1.0]), "label must be 0 or 1")]
    if kind == "boolean":
        return [_check(lambda s: as_flag(s).notna(), "not true/false")]
    if kind == "date":
        return [_check(lambda s: as_date(s).notna(), "not a date (use YYYY-MM-DD)")]
    if kind == "categorical":
        checks = [_check(_is_category, "not text or a whole number")]
        if spec.categories:
            allowed = list(spec.categories)
            checks.append(_check(lambda s: category_text(s).isin(allowed).fillna(False) | s.isna(),
                                 "not one of the declared categories"))
        return checks
    if kind != "numeric":
        return []
    checks = [_check(lambda s: as_number(s).notna(), "not a number")]
    if spec.integer:
        checks.append(_check(lambda s: ~(as_number(s) % 1 > 0), "not a whole number"))
    if spec.minimum is not None:
        low = spec.minimum
        checks.append(_check(lambda s: ~(as_number(s) < low), f"below the minimum {low:g}"))
    if spec.maximum is not None:
        high = spec.maximum
        checks.append(_check(lambda s: ~(as_number(s) > high), f"above the maximum {high:g}"))
    return checks


def pandera_schema(schema: ExportSchema) -> pa.DataFrameSchema:
    """The pandera schema of an export: every declared column present (an `ignore` column may be
    absent), no undeclared column, values of the declared type and range, unique record keys
    (compared without surrounding spaces, as they are pseudonymised)."""
    import pandera.pandas as pa

    columns = {}
    for spec in schema.columns:
        nullable = spec.role in ("direct-identifier", "ignore") or spec.nullable
        columns[spec.name] = pa.Column(None, checks=_checks(spec), nullable=nullable, required=spec.role != "ignore")
    return pa.DataFrameSchema(columns, strict=True)


def _read(path: Path) -> pd.DataFrame:
    """The raw export; CSV cells stay text. Raises `ValidationFailed` with a reason, no data."""
    if not path.exists():
        raise ValidationFailed(f"export file not found: {path}")
    if path.is_dir():
        raise ValidationFailed(f"{path} is a directory, not an export file")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise ValidationFailed(f"{path}: unsupported file type {path.suffix or '(none)'!r} (use .csv or .parquet)")
    kind = suffix.lstrip(".")
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, dtype=str, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise ValidationFailed(f"{path}: the file is empty (no header, no records)") from None
    except PermissionError:
        raise ValidationFailed(f"cannot read {path}: permission denied") from None
    except pd.errors.ParserError:
        raise ValidationFailed(f"cannot read {path}: malformed CSV") from None
    except UnicodeDecodeError:
        raise ValidationFailed(f"cannot read {path}: not UTF-8 text") from None
    except (OSError, ValueError, pyarrow.ArrowException):
        raise ValidationFailed(f"cannot read {path}: not a valid {kind} file") from None


def _rows(indices: pd.Series) -> str:
    """'rows 3, 17, 20' for the first offending 1-based data rows."""
    rows = sorted({int(i) + 1 for i in indices.dropna()})
    shown = ", ".join(str(r) for r in rows[:_MAX_ROWS_SHOWN])
    more = f" and {len(rows) - _MAX_ROWS_SHOWN} more" if len(rows) > _MAX_ROWS_SHOWN else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more}"


def _summary(path: Path, failures: pd.DataFrame, schema: ExportSchema) -> str:
    """One line for the first problem, plus how many others and where. Built from column
    names, check names and row numbers only: `failure_case` (the cell value) is never read."""
    problems: list[tuple[str | None, str]] = []
    frame_level = failures[failures["schema_context"] == "DataFrameSchema"]
    missing = frame_level.loc[frame_level["check"] == "column_in_dataframe", "failure_case"].astype(str).tolist()
    extra = frame_level.loc[frame_level["check"] == "column_in_schema", "failure_case"].astype(str).tolist()
    if missing:
        problems.append((missing[0], f"missing column(s): {', '.join(repr(c) for c in missing)}"))
    if extra:
        problems.append((extra[0], f"column(s) not declared in the schema: {', '.join(repr(c) for c in extra)} "
                                   f"(declare them, e.g. with role: ignore)"))
    order = {spec.name: i for i, spec in enumerate(schema.columns)}
    cells = failures[(failures["schema_context"] == "Column") & failures["column"].notna()].copy()
    cells["position"] = cells["column"].map(order)
    cells["order"] = pd.to_numeric(cells["check_number"], errors="coerce").fillna(-1)
    for (_, _, column, check), group in cells.groupby(["position", "order", "column", "check"], sort=True):
        problems.append((column, f"column '{column}': {_BUILTIN_CHECKS.get(check, check)} ({_rows(group['index'])})"))
    if not problems:
        return f"{path}: does not match its schema"
    first = f"{path}: {problems[0][1]}"
    others = [c for c in dict.fromkeys(str(c) for c, _ in problems[1:]) if c != str(problems[0][0])]
    if len(problems) > 1:
        where = (f" in column(s) {', '.join(repr(c) for c in others[:3])}{' ...' if len(others) > 3 else ''}"
                 if others else " in the same column")
        first += f"; {len(problems) - 1} more problem(s){where}"
    return " ".join(first.split())


def _typed(frame: pd.DataFrame, schema: ExportSchema) -> pd.DataFrame:
    """The validated table with each declared column converted to its declared type."""
    declared = {spec.name for spec in schema.columns}
    typed = frame.loc[:, [column for column in frame.columns if column in declared]].copy()
    for spec in schema.columns:
        if spec.name not in typed.columns or spec.role in ("direct-identifier", "ignore"):
            continue
        kind = {"consent": "boolean", "consent-date": "date", "consent-expiry": "date"}.get(spec.role, spec.type)
        values = typed[spec.name]
        if spec.role == "label":
            typed[spec.name] = as_number(values).astype("int8")
        elif spec.role == "record-key":
            typed[spec.name] = values.astype("string").str.strip()
        elif kind == "categorical":
            typed[spec.name] = category_text(values)
        elif kind == "numeric":
            number = as_number(values)
            typed[spec.name] = number.astype("int64") if spec.integer and not number.isna().any() else number
        elif kind == "boolean":
            flag = as_flag(values)
            typed[spec.name] = flag.astype(bool) if not flag.isna().any() else flag
        elif kind == "date":
            typed[spec.name] = as_date(values)
    return typed


def validate_export(path: Path, schema: ExportSchema) -> ValidatedExport:
    """Read the export at `path` and check it against `schema`; returns the typed table or
    raises `ValidationFailed` (one line: file, column, first rows; never a value)."""
    import pandera.pandas as pa

    path = Path(path)
    frame = _read(path)
    if frame.empty:
        raise ValidationFailed(f"{path}: the file holds no records")
    frame = frame.reset_index(drop=True)
    frame.columns = [str(c) for c in frame.columns]
    try:
        pandera_schema(schema).validate(frame, lazy=True)
    except pa.errors.SchemaErrors as errors:
        raise ValidationFailed(_summary(path, errors.failure_cases, schema)) from None
    except pa.errors.SchemaError:
        raise ValidationFailed(f"{path}: does not match its schema {schema.source}") from None
    return ValidatedExport(path=path, table=_typed(frame, schema), schema=schema)


_VALIDATOR = hashlib.sha256(
    Path(__file__).read_bytes() + Path(__file__).with_name("schema.py").read_bytes()
    + f"pandas {pd.__version__} pyarrow {pyarrow.__version__} pandera {_version('pandera')}".encode()).hexdigest()
"""The validation code itself and the libraries it reads with: a stamp made by another version of
them does not count."""


def export_digest(data_file: Path, schema_file: Path) -> str | None:
    """SHA-256 of this validator, the schema file and the export's bytes: what an export's
    validation result depends on (None when a file cannot be read: validating says why)."""
    digest = hashlib.sha256(_VALIDATOR.encode())
    try:
        for path in (schema_file, data_file):
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
            digest.update(b"\0")
    except OSError:
        return None
    return digest.hexdigest()


def validate_unless_stamped(data_file: Path, schema_file: Path, stamp: Path) -> None:
    """Validate the export unless `stamp` records that these exact bytes, under this schema and
    this validator, passed before; record a pass. A pre-flight check on the driver (the hospital
    node always validates what it loads, in its own process); the stamp holds only a digest, so
    an edited, replaced or re-exported file is validated again."""
    before = export_digest(data_file, schema_file)
    try:
        if before is not None and stamp.read_text().strip() == before:
            return
    except OSError:
        pass
    validate_export(data_file, ExportSchema.load(schema_file))
    record_validated(stamp, data_file, schema_file, before)


def record_validated(stamp: Path, data_file: Path, schema_file: Path, before: str | None) -> None:
    """Write `stamp` for an export that passed validation, whose digest was `before` when the
    validation began; nothing if the file changed since (what passed may not be what is there)."""
    if before is None or export_digest(data_file, schema_file) != before:
        return
    partial = stamp.with_name(f".{stamp.name}.{os.getpid()}")
    try:
        partial.write_text(before + "\n")
        partial.replace(stamp)
    except OSError:  # a directory this process cannot write: the stamp only saves time
        partial.unlink(missing_ok=True)
