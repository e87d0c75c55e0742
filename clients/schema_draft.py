"""Draft an export schema from a hospital's own export, for a person to review before anyone uses it.

`fedrisk node schema init --data FILE --label COL --out schema.yaml` reads the export at the
node and writes a schema that `ExportSchema.load` accepts: every column with a guessed role, class
and type, so that `fedrisk node check` and a run can proceed once a person has reviewed it.

What is guessed, and why each guess needs review:
* roles: the `--label` and `--record-key` columns as given; columns whose names look like direct
  identifiers (name, phone, e-mail, address, national id, ...) as `direct-identifier`; boolean
  columns named `consent_*` as `consent` for the purpose in their name, and a date column named
  like `consent_*_on`/`consent_date` as `consent-date`; every other column as `feature`.
* classes: `identity` for identifiers and consent bookkeeping, else `diagnosis-treatment`, the
  most cautious unrestricted guess; restricted classes (genetic, psych-social) are never guessed.
* bounds: numeric bounds are the observed range, rounded outward to two significant figures. They
  are this hospital's data: a schema is shared with the federation, so replace them with bounds
  from clinical or domain knowledge before sharing (the draft says so beside each).
* categories: a text column with at most `MAX_CATEGORIES` distinct values gets them, sorted;
  one with more is left without categories (not encodable as a model input until reviewed).

Nothing is read but the export; nothing is written but the draft (refused if it exists).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from clients.schema import ExportSchema
from federation.errors import ConfigError

MAX_CATEGORIES = 20
MIN_ROWS_PER_CATEGORY = 10
"""A text column's values are drafted as its categories only if each is held by this many rows
(a rarer value could be a person's name or a free-text note, and a schema is shared)."""
_IDENTIFIER = re.compile(r"(^|_)(name|first_?name|last_?name|full_?name|surname|phone|mobile|fax|email|e_?mail|"
                         r"address|street|city|zip|zip_?code|postcode|post_?code|ssn|national_?id|passport|mrn|"
                         r"nhs_?number|dob|date_?of_?birth|birth_?date|insurance_?number|account_?number|"
                         r"ip_?address|url|device_?id|licen[cs]e|plate)($|_)", re.I)
_KEY_LIKE = re.compile(r"(^|_)(id|key|no|num|number|code|ref)$", re.I)


def _snake(name: str) -> str:
    """camelCase and other spellings as snake_case, for the identifier patterns."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).replace("-", "_").replace(" ", "_").lower()


def _looks_like_identifier(name: str, series: pd.Series) -> bool:
    """Named like a direct identifier, named like a key, or unique per row (a key by another name)."""
    snake = _snake(name)
    if _IDENTIFIER.search(snake) or _KEY_LIKE.search(snake):
        return True
    if len(series) < 2 or not series.notna().all() or not series.is_unique:
        return False
    numbers = _as_number(series)
    measured = numbers.notna().all() and not (numbers % 1 == 0).all()  # unique fractions: a measurement
    return not measured
_CONSENT = re.compile(r"^consent_(?P<purpose>[a-z0-9_]+)$", re.I)
_CONSENT_DATE = re.compile(r"^consent(_[a-z0-9_]+)?_(on|date|recorded_on|given_on)$", re.I)


def _outward(value: float, up: bool) -> float:
    """`value` rounded away from the data to two significant figures."""
    if value == 0 or not math.isfinite(value):
        return 0.0
    exponent = math.floor(math.log10(abs(value))) - 1
    step = 10.0 ** exponent
    rounded = (math.ceil if up else math.floor)(value / step) * step
    return float(round(rounded, -exponent)) if exponent < 0 else float(rounded)  # 0.35, not 0.35000000000000003


def _yaml_number(value: float) -> str:
    """`value` as YAML reads back a number: whole numbers as digits, others with a decimal point
    in the mantissa (PyYAML reads 1e-05 as text, 1.0e-05 as a number)."""
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    text = repr(float(value))
    mantissa, _, exponent = text.partition("e")
    if exponent and "." not in mantissa:
        text = f"{mantissa}.0e{exponent}"
    return text


def _as_number(series: pd.Series) -> pd.Series:
    return pd.to_numeric(series, errors="coerce")


def _kind(series: pd.Series) -> str:
    """numeric, boolean, date or categorical, from the column's type (Parquet) or its text (CSV)."""
    if pd.api.types.is_bool_dtype(series):
        return "boolean"
    if pd.api.types.is_datetime64_any_dtype(series):
        return "date"
    if pd.api.types.is_numeric_dtype(series):
        return "numeric"
    present = series.dropna()
    if present.empty:
        return "categorical"
    text = present.astype(str).str.strip().str.lower()
    if text.isin(["true", "false", "yes", "no"]).all():
        return "boolean"
    if _as_number(present).notna().all():
        return "numeric"
    if pd.to_datetime(present.astype(str), errors="coerce", format="%Y-%m-%d").notna().all():
        return "date"
    return "categorical"


def _read(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ConfigError(f"--data {path}: no such export file")
    if path.suffix.lower() == ".parquet":
        return pd.read_parquet(path)
    if path.suffix.lower() == ".csv":
        return pd.read_csv(path, dtype=str, encoding="utf-8")
    raise ConfigError(f"--data {path}: use a .csv or .parquet export")


def draft_schema(data: Path | list[Path], *, label: str, record_key: str | None = None,
                 purpose: str | None = None) -> str:
    """The YAML text of a reviewed-to-be schema for the export(s) at `data` (see the module
    docstring). Several files (one federation's exports, in a simulation) are read as one table,
    so the draft's ranges and categories cover them all. With `purpose`, a lone consent column is
    taken to be that purpose's."""
    files = [Path(p) for p in (data if isinstance(data, list) else [data])]
    frame = pd.concat([_read(p) for p in files], ignore_index=True)
    data = files[0]
    if label not in frame.columns:
        raise ConfigError(f"--label {label!r} is not a column of {Path(data).name} "
                          f"(columns: {', '.join(map(str, frame.columns[:12]))}{' ...' if len(frame.columns) > 12 else ''})")
    if record_key is None:
        unique = [c for c in frame.columns if c != label and frame[c].notna().all() and frame[c].is_unique
                  and _KEY_LIKE.search(_snake(str(c))) and not _IDENTIFIER.search(_snake(str(c)))]
        if not unique:
            raise ConfigError(f"no column of {Path(data).name} is named and unique like a record key "
                              "(e.g. patient_id, mrn); name it with --record-key")
        record_key = unique[0]
    elif record_key not in frame.columns:
        raise ConfigError(f"--record-key {record_key!r} is not a column of {Path(data).name}")
    consent_purposes = [m["purpose"].replace("_", "-").lower() for c in frame.columns
                        if (m := _CONSENT.match(str(c))) and not _CONSENT_DATE.match(str(c))
                        and _kind(frame[c]) == "boolean"]
    lines = [f"# DRAFT schema for {Path(data).name}, written by `fedrisk node schema init`: review every column",
             "# before use. Bounds marked REVIEW are this hospital's observed range (rounded outward):",
             "# replace them with clinical or domain bounds before the schema is shared with anyone.",
             "version: 1",
             "intended-use: ''  # REVIEW: what a model trained on this export is for (printed on its model card)",
             "label-description: ''  # REVIEW: what the label's 1 and 0 mean", "columns:"]
    for column in frame.columns:
        name, series = str(column), frame[column]
        kind = _kind(series)
        nullable = bool(series.isna().any())
        body: list[str] = []
        if name == record_key:
            body = ["role: record-key", "class: identity"]
        elif name == label:
            body = ["role: label", "class: diagnosis-treatment"]
        elif _CONSENT.match(name) or _CONSENT_DATE.match(name):
            pass  # decided below
        elif _looks_like_identifier(name, series):
            body = ["role: direct-identifier", "class: identity  # REVIEW: named or unique like an identifier"]
        if body:
            pass
        elif (m := _CONSENT.match(name)) and kind == "boolean" and not _CONSENT_DATE.match(name):
            guessed = m["purpose"].replace("_", "-").lower()
            if purpose and len(consent_purposes) == 1 and guessed != purpose:
                body = ["role: consent", "class: identity", f"purpose: {purpose}  # REVIEW: from --purpose"]
                consent_purposes = [purpose]
            else:
                body = ["role: consent", "class: identity", f"purpose: {guessed}"]
        elif _CONSENT_DATE.match(name) and kind == "date":
            body = ["role: consent-date", "class: identity"]
        else:
            body = ["role: feature", "class: diagnosis-treatment  # REVIEW: the column's sensitivity class",
                    f"type: {kind}"]
            if kind == "numeric":
                values = _as_number(series).dropna()
                whole = bool((values % 1 == 0).all())
                if whole:
                    body.append("integer: true")
                body += [f"min: {_yaml_number(_outward(float(values.min()), up=False))}  # REVIEW: observed range here",
                         f"max: {_yaml_number(_outward(float(values.max()), up=True))}  # REVIEW: observed range here"]
            elif kind == "categorical":
                counts = series.dropna().astype(str).str.strip().value_counts()
                distinct = sorted(counts.index)
                if len(distinct) <= MAX_CATEGORIES and (counts >= MIN_ROWS_PER_CATEGORY).all():
                    quoted = ", ".join("'" + v.replace("'", "''") + "'" for v in distinct)
                    body.append(f"categories: [{quoted}]  # REVIEW: the full list of values")
                else:
                    body.append(f"# {len(distinct)} distinct values, some rare: give 'categories' (or role ignore) "
                                "to use it")
            if nullable:
                body.append("nullable: true")
        if nullable and body[0] in ("role: consent", "role: consent-date"):
            body.append("nullable: true")
        lines.append(f"  {name}:")
        lines += [f"    {item}" for item in body]
    if not consent_purposes:
        lines.insert(3, "# No consent_<purpose> column was found: a run needs one consent column per purpose.")
    if purpose and purpose not in consent_purposes:
        lines.insert(3, f"# No consent column covers {purpose!r}: add consent_{purpose.replace('-', '_')} to the export.")
    return "\n".join(lines) + "\n"


def write_draft(data: Path | list[Path], out: Path, *, label: str, record_key: str | None = None,
                purpose: str | None = None) -> ExportSchema:
    """Write the draft to `out` (refusing to overwrite) and return it as loaded, so a draft that
    does not load is never left behind."""
    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out {out} exists; a draft never overwrites a schema")
    text = draft_schema(data, label=label, record_key=record_key, purpose=purpose)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        ExportSchema.load(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return ExportSchema.load(out)
