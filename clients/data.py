"""Reading a hospital's own export: check it, drop identifiers, keep consented records, encode.

Direct identifiers are never even loaded: only the columns the model and the consent filter
need are read from the file. Error messages name the file and the column, never a value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from federation import features as fx
from federation.errors import DataError

PURPOSE_CONSENT = {
    "credit-risk-research": fx.CONSENT_CREDIT_RISK_RESEARCH,
    "applicant-scoring": fx.CONSENT_APPLICANT_SCORING,
}
TEST_FRACTION = 0.2
_KIND_WORDS = {"O": "text", "i": "integer", "f": "a number", "b": "true/false", "M": "a date"}
NEEDED_COLUMNS: tuple[str, ...] = (fx.RECORD_KEY, *fx.RAW_FEATURE_COLUMNS, fx.LABEL,
                                   *PURPOSE_CONSENT.values())


@dataclass
class HospitalData:
    """One hospital's consented records, encoded, split into local train and test parts."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    excluded: dict[str, int] = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        """Records DP-SGD trains on."""
        return int(len(self.train_y))


def hospital_files(data_dir: Path) -> list[Path]:
    """Hospital export files in a directory, in name order (`hospital_*.parquet|csv`)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory not found: {data_dir}")
    files = sorted([*data_dir.glob("hospital_*.parquet"), *data_dir.glob("hospital_*.csv")])
    if not files:
        raise DataError(f"{data_dir} holds no hospital_*.parquet or hospital_*.csv files")
    return files


def _read_columns(path: Path) -> list[str]:
    try:
        if path.suffix == ".parquet":
            return list(pq.read_schema(path).names)
        return list(pd.read_csv(path, nrows=0).columns)
    except FileNotFoundError:
        raise DataError(f"hospital file not found: {path}") from None
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"cannot read {path}: not a valid {path.suffix.lstrip('.') or 'data'} file") from None


def _coerce(frame: pd.DataFrame, column: str, kind: str, path: Path) -> pd.Series:
    series = frame[column]
    if series.dtype.kind == kind or (kind == "O" and pd.api.types.is_string_dtype(series)):
        return series
    if kind in ("i", "f") and series.dtype.kind in ("i", "u", "f", "b") and not (
            kind == "i" and series.dtype.kind == "f" and not np.all(np.mod(series.dropna(), 1) == 0)):
        return series.astype("float64")
    if kind == "b" and series.dtype.kind in ("i", "u") and series.isin([0, 1]).all():
        return series.astype(bool)
    if kind == "b" and series.dtype.kind == "O":
        lowered = series.astype(str).str.strip().str.lower()
        mapped = lowered.map({"true": True, "false": False, "1": True, "0": False})
        if mapped.notna().all():
            return mapped.astype(bool)
        bad = np.flatnonzero(mapped.isna().to_numpy())
    elif kind in ("i", "f") and series.dtype.kind == "O":
        numeric = pd.to_numeric(series, errors="coerce")
        bad = np.flatnonzero((numeric.isna() & series.notna()).to_numpy())
        if bad.size == 0:
            return numeric.astype("float64")
    else:
        bad = np.arange(min(len(series), 1))
    rows = ", ".join(str(int(i) + 1) for i in bad[:3])
    raise DataError(f"{path}: column '{column}' should be {_KIND_WORDS[kind]}, "
                    f"found {series.dtype} (first bad rows: {rows})")


def load_table(path: Path) -> pd.DataFrame:
    """The needed columns of one export, checked; identifiers are not read."""
    path = Path(path)
    if path.suffix not in (".parquet", ".csv"):
        raise DataError(f"{path}: unsupported file type (use .parquet or .csv)")
    present = _read_columns(path)
    missing = [c for c in NEEDED_COLUMNS if c not in present]
    if missing:
        raise DataError(f"{path}: missing column(s): {', '.join(missing)}")
    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path, columns=list(NEEDED_COLUMNS))
        else:
            frame = pd.read_csv(path, usecols=list(NEEDED_COLUMNS))
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot read {path}: {type(exc).__name__}") from None
    if frame.empty:
        raise DataError(f"{path}: the file holds no records")
    for column in NEEDED_COLUMNS:
        if column != fx.RECORD_KEY:
            frame[column] = _coerce(frame, column, fx.EXPORT_DTYPES[column], path)
    label = frame[fx.LABEL]
    bad = np.flatnonzero((label.isna() | ~label.isin([0, 1])).to_numpy())
    if bad.size:
        rows = ", ".join(str(int(i) + 1) for i in bad[:3])
        raise DataError(f"{path}: column '{fx.LABEL}' must be 0 or 1 (first bad rows: {rows})")
    if frame[fx.RECORD_KEY].isna().any():
        raise DataError(f"{path}: column '{fx.RECORD_KEY}' has empty record keys")
    return frame


def test_mask(record_keys: pd.Series) -> np.ndarray:
    """Which records form the local test split: a fixed hash of the record key, so the
    split is the same in every run and every process."""
    hashed = pd.util.hash_pandas_object(record_keys.astype(str), index=False).to_numpy()
    return (hashed % 1000) < int(TEST_FRACTION * 1000)


def load_hospital(path: Path, purpose: str) -> HospitalData:
    """Load one hospital's export for a run with `purpose`: consented records only."""
    path = Path(path)
    if purpose not in PURPOSE_CONSENT:
        raise DataError(f"no consent field covers purpose {purpose!r}; known: {', '.join(PURPOSE_CONSENT)}")
    frame = load_table(path)
    consented = frame[PURPOSE_CONSENT[purpose]].to_numpy(dtype=bool)
    excluded = {"no-consent-for-purpose": int((~consented).sum())}
    frame = frame.loc[consented]
    if frame.empty:
        raise DataError(f"{path}: no record consents to purpose {purpose!r}")
    is_test = test_mask(frame[fx.RECORD_KEY])
    x = fx.encode_features(frame)
    y = fx.encode_labels(frame)
    return HospitalData(name=path.stem, train_x=x[~is_test], train_y=y[~is_test],
                        test_x=x[is_test], test_y=y[is_test], excluded=excluded)
