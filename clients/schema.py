"""The export schema file: what each column of a hospital's export is, and how sensitive it is.

A hospital describes its export once, in YAML, and every run reads it before touching the data:

    version: 1
    consent-validity-days: {credit-risk-research: 730}     # optional, per purpose
    columns:
      mrn:         {role: record-key, class: identity}
      full_name:   {role: direct-identifier, class: identity}
      pt_age:      {role: quasi-identifier, class: identity, type: numeric, integer: true,
                    min: 0, max: 120, generalise: {age-band: 10}, maps-to: age}
      zip3:        {role: quasi-identifier, class: identity, type: categorical, generalise: {prefix: 2}}
      hba1c:       {role: feature, class: vitals-labs, type: numeric, min: 3, max: 20, nullable: true}
      depression:  {role: feature, class: psych-social, type: boolean,
                    allow-for-purposes: [credit-risk-research]}
      consent_research: {role: consent, class: identity, purpose: credit-risk-research}
      consent_on:  {role: consent-date, class: identity}      # no purpose: applies to every purpose
      label_90d:   {role: label, class: insurance-billing, maps-to: delinquent_90d_12m}
      notes:       {role: ignore, class: diagnosis-treatment}

Every column has a `role` (`ROLES`) and a sensitivity `class` (`SENSITIVITY_CLASSES`).
Features and quasi-identifiers have a `type` (numeric, categorical, date, boolean); numeric ones
may bound their values (`min`, `max`, `integer: true`: what validation accepts) and declare how a
model scales them (`scale: {min: A, max: B, log: true}`: inputs are mapped from [A, B], on a
log(1 + x) scale if `log`, onto [-1, 1] and clipped; without `scale` the validation bounds are
used), categorical ones may list `categories` (text or whole numbers, for integer-coded columns),
any may be `nullable: true` (default false). A quasi-identifier states how it is coarsened before
training: `{age-band: N}` (years, to the band's lower bound), `{prefix: K}` (first K characters),
`month` (a date to the first of its month) or `none`. A `consent` column (true/false) names its
`purpose`; `consent-date` (day recorded) and `consent-expiry` (first day no longer covered) apply
to one `purpose`, or to all when none is given. `ignore` columns are accepted, never used, and may
be absent. Columns of a restricted class
(`genetic-biosample`, `psych-social`, `incident-report`) never reach training unless `allow-for-purposes` names the
run's purpose. `maps-to` says which fedrisk column a differently named export column feeds.
Mistakes raise `SchemaError`, one line naming the schema file and the column or key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from federation import features as fx
from federation.errors import DataError
from privacy.consent import DEFAULT_VALIDITY_DAYS, PURPOSE_PATTERN, ConsentFields, ConsentPolicy

SCHEMA_VERSION = 1
ROLES = ("direct-identifier", "quasi-identifier", "feature", "label", "consent", "consent-date",
         "consent-expiry", "record-key", "ignore")
SENSITIVITY_CLASSES = ("identity", "diagnosis-treatment", "medication", "vitals-labs", "genetic-biosample",
                       "psych-social", "incident-report", "insurance-billing")
RESTRICTED_CLASSES = ("genetic-biosample", "psych-social", "incident-report")
"""Classes excluded from training unless a column's `allow-for-purposes` names the run's purpose."""
TYPES = ("numeric", "categorical", "date", "boolean")
SHIPPED_SYNTHETIC_SCHEMA = Path(__file__).resolve().parent / "schemas" / "synthetic_export.yaml"

_TOP_KEYS = {"version", "description", "consent-validity-days", "columns", "intended-use", "label-description"}
_DATA_KEYS = {"type", "min", "max", "integer", "nullable", "categories", "maps-to", "allow-for-purposes", "scale"}
_ROLE_KEYS: dict[str, set[str]] = {
    "direct-identifier": set(), "record-key": set(), "ignore": set(), "label": {"maps-to"},
    "feature": _DATA_KEYS, "quasi-identifier": _DATA_KEYS | {"generalise"},
    "consent": {"purpose", "nullable"}, "consent-date": {"purpose", "nullable"},
    "consent-expiry": {"purpose", "nullable"},
}
_TYPE_ONLY_KEYS = {"min": "numeric", "max": "numeric", "integer": "numeric", "categories": "categorical",
                   "scale": "numeric"}
_GENERALISATION_TYPE = {"age-band": "numeric", "prefix": "categorical", "month": "date"}
_KIND_TYPE = {"i": "numeric", "f": "numeric", "b": "boolean", "O": "categorical", "M": "date"}
MAPPABLE_COLUMNS: dict[str, str] = {
    name: _KIND_TYPE[kind] for name, kind in fx.EXPORT_DTYPES.items()
    if name not in (fx.RECORD_KEY, fx.LABEL, *fx.DIRECT_IDENTIFIERS, *fx.CONSENT_COLUMNS)}
"""fedrisk column names a feature or quasi-identifier may `maps-to`, with the type each needs."""


class SchemaError(DataError):
    """The export schema file is unreadable or describes the export inconsistently."""


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML loader that refuses a key written twice (PyYAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool, type(None))):
                continue  # an unhashable key: the base loader reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"'{key}' is written twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


@dataclass(frozen=True)
class Generalisation:
    """How a quasi-identifier is coarsened: `kind` in age-band/prefix/month/none, `size` for the first two."""

    kind: str
    size: int | None = None

    def describe(self) -> str:
        """E.g. 'age-band 10', 'prefix 2', 'month'."""
        return self.kind if self.size is None else f"{self.kind} {self.size}"


@dataclass(frozen=True)
class Scaling:
    """How a schema-encoded model reads a numeric input: [low, high] (on log(1 + x) if `log`) onto [-1, 1]."""

    low: float
    high: float
    log: bool = False


def _scaling(raw: Any, fail) -> Scaling:
    if not isinstance(raw, dict) or not {"min", "max"} <= set(raw) or set(raw) - {"min", "max", "log"}:
        raise fail("'scale' is a mapping {min: A, max: B} with an optional 'log: true'")
    low, high = _number(raw["min"], "scale min", fail), _number(raw["max"], "scale max", fail)
    log = _flag(raw.get("log", False), "scale log", fail)
    if not low < high:
        raise fail(f"scale bounds must satisfy min < max, got {low:g} and {high:g}")
    if log and low <= -1.0:
        raise fail(f"a log scale needs min > -1 (it reads log(1 + x)), got {low:g}")
    return Scaling(low, high, log)


@dataclass(frozen=True)
class ColumnSpec:
    """One export column as the schema declares it (see the module docstring for each key)."""

    name: str
    role: str
    sensitivity: str
    type: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    integer: bool = False
    nullable: bool = False
    categories: tuple[str, ...] | None = None
    generalisation: Generalisation | None = None
    purpose: str | None = None
    allow_for_purposes: tuple[str, ...] = ()
    maps_to: str | None = None
    scale: Scaling | None = None

    @property
    def target(self) -> str:
        """The fedrisk name of this column after de-identification."""
        return self.maps_to or self.name

    def allowed_for(self, purpose: str) -> bool:
        """False for a restricted-class column the schema does not release for `purpose`."""
        return self.sensitivity not in RESTRICTED_CLASSES or purpose in self.allow_for_purposes


def _slug(value: Any, fail) -> str:
    if not isinstance(value, str) or not PURPOSE_PATTERN.match(value):
        raise fail(f"purpose {value!r} is not a slug such as 'credit-risk-research'")
    return value


def _number(value: Any, key: str, fail) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(f"'{key}' must be a finite number, got {value!r}")
    return float(value)


def _flag(value: Any, key: str, fail) -> bool:
    if not isinstance(value, bool):
        raise fail(f"'{key}' must be true or false, got {value!r}")
    return value


def _generalisation(value: Any, fail) -> Generalisation:
    if value in ("month", "none"):
        return Generalisation(value)
    if isinstance(value, dict) and len(value) == 1:
        (kind, size), = value.items()
        if kind in ("age-band", "prefix"):
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise fail(f"generalise '{kind}' needs a positive whole number, got {size!r}")
            return Generalisation(kind, size)
    raise fail(f"unknown generalisation {value!r} (use {{age-band: N}}, {{prefix: K}}, month or none)")


def _column(name: Any, spec: Any, fail_for) -> ColumnSpec:
    """Parse and check one column entry; `fail_for(name)` builds the error for this column."""
    if not isinstance(name, str) or not name:
        raise fail_for(name)("column names must be text")
    fail = fail_for(name)
    if not isinstance(spec, dict):
        raise fail("expected a mapping such as {role: feature, class: vitals-labs, type: numeric}")
    role, sensitivity = spec.get("role"), spec.get("class")
    if role is None or sensitivity is None:
        raise fail(f"missing '{'role' if role is None else 'class'}'")
    if role not in ROLES:
        raise fail(f"unknown role {role!r} (use one of: {', '.join(ROLES)})")
    if sensitivity not in SENSITIVITY_CLASSES:
        raise fail(f"unknown sensitivity class {sensitivity!r} (use one of: {', '.join(SENSITIVITY_CLASSES)})")
    for key in spec:
        if key not in _ROLE_KEYS[role] | {"role", "class", "description"}:
            raise fail(f"key '{key}' does not apply to role '{role}'")
    kind = spec.get("type")
    if role in ("feature", "quasi-identifier") and kind not in TYPES:
        raise fail(f"type {kind!r} is not one of: {', '.join(TYPES)}")
    for key, needed in _TYPE_ONLY_KEYS.items():
        if key in spec and kind != needed:
            raise fail(f"key '{key}' applies only to {needed} columns")
    minimum = _number(spec["min"], "min", fail) if "min" in spec else None
    maximum = _number(spec["max"], "max", fail) if "max" in spec else None
    if minimum is not None and maximum is not None and minimum > maximum:
        raise fail(f"bounds are reversed: min {minimum:g} > max {maximum:g}")
    categories = spec.get("categories")
    if categories is not None:
        if not isinstance(categories, list) or not categories or \
                not all(isinstance(c, str) or (isinstance(c, int) and not isinstance(c, bool)) for c in categories):
            raise fail("'categories' must be a non-empty list of text values or whole numbers (quote words such as "
                       "'yes' or 'no', which YAML reads as true/false)")
        categories = [str(c).strip() for c in categories]  # an integer-coded column's 1 is its category "1"
        if len(set(categories)) != len(categories):
            raise fail("'categories' lists a value twice")
    generalisation = None
    if role == "quasi-identifier":
        if "generalise" not in spec:
            raise fail("a quasi-identifier must declare 'generalise' (age-band, prefix, month, or none)")
        generalisation = _generalisation(spec["generalise"], fail)
        needed = _GENERALISATION_TYPE.get(generalisation.kind)
        if needed is not None and kind != needed:
            raise fail(f"generalisation '{generalisation.kind}' needs a {needed} column, not {kind}")
    if role == "consent" and "purpose" not in spec:
        raise fail("a consent column must name its 'purpose'")
    purpose = _slug(spec["purpose"], fail) if "purpose" in spec else None
    allow = spec.get("allow-for-purposes", [])
    if not isinstance(allow, list):
        raise fail("'allow-for-purposes' must be a list of purposes")
    if allow and sensitivity not in RESTRICTED_CLASSES:
        raise fail(f"'allow-for-purposes' applies only to restricted classes ({', '.join(RESTRICTED_CLASSES)})")
    maps_to = spec.get("maps-to")
    if maps_to is not None:
        wanted = {fx.LABEL: "label"} if role == "label" else MAPPABLE_COLUMNS
        if maps_to not in wanted:
            raise fail(f"maps-to {maps_to!r} is not a fedrisk {'label' if role == 'label' else 'input'} column")
        if role != "label" and MAPPABLE_COLUMNS[maps_to] != kind:
            raise fail(f"maps-to {maps_to!r} needs a {MAPPABLE_COLUMNS[maps_to]} column, not {kind}")
    return ColumnSpec(
        name=name, role=role, sensitivity=sensitivity, type=kind, minimum=minimum, maximum=maximum,
        integer=_flag(spec.get("integer", False), "integer", fail),
        nullable=_flag(spec.get("nullable", False), "nullable", fail),
        categories=tuple(categories) if categories else None, generalisation=generalisation, purpose=purpose,
        allow_for_purposes=tuple(_slug(p, fail) for p in allow), maps_to=maps_to,
        scale=_scaling(spec["scale"], fail) if "scale" in spec else None)


@dataclass(frozen=True)
class ExportSchema:
    """A hospital export's columns, roles and sensitivity classes, checked for consistency."""

    columns: tuple[ColumnSpec, ...]
    consent_validity_days: dict[str, int] = field(default_factory=dict)
    source: str = "<schema>"
    intended_use: str = ""
    """What a model trained on this export is for (`intended-use`), printed on its model card."""
    label_description: str = ""
    """What the label means (`label-description`), e.g. "malignant tumour (1) or benign (0)"."""

    @classmethod
    def load(cls, path: Path) -> ExportSchema:
        """Read and check a schema file; raises `SchemaError` naming the file and the bad entry."""
        path = Path(path)
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
        except FileNotFoundError:
            raise SchemaError(f"schema file not found: {path}") from None
        except IsADirectoryError:
            raise SchemaError(f"schema file {path} is a directory") from None
        except UnicodeDecodeError:
            raise SchemaError(f"cannot read schema file {path}: not UTF-8 text") from None
        except OSError as exc:
            raise SchemaError(f"cannot read schema file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            problem = " ".join(str(getattr(exc, "problem", None) or "invalid YAML").split())
            raise SchemaError(f"{path}: not valid YAML{where}: {problem}") from None
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def from_mapping(cls, data: Any, source: str = "<schema>") -> ExportSchema:
        """Build a schema from the parsed YAML document (a dict); `source` names it in errors."""
        def fail(message: str) -> SchemaError:
            return SchemaError(f"{source}: {message}")

        if not isinstance(data, dict):
            raise fail("expected a mapping with 'version' and 'columns'")
        for key in data:
            if key not in _TOP_KEYS:
                raise fail(f"unknown key '{key}' (expected: {', '.join(sorted(_TOP_KEYS))})")
        if data.get("version") != SCHEMA_VERSION:
            raise fail(f"key 'version' must be {SCHEMA_VERSION}, got {data.get('version')!r}")
        raw = data.get("columns")
        if not isinstance(raw, dict) or not raw:
            raise fail("key 'columns' must map each export column to its role and class")
        columns = tuple(_column(name, spec, lambda n: (lambda m: fail(f"column '{n}': {m}")))
                        for name, spec in raw.items())
        for role in ("record-key", "label"):
            found = [c.name for c in columns if c.role == role]
            if len(found) != 1:
                raise fail(f"exactly one column must have role '{role}', found "
                           f"{', '.join(repr(n) for n in found) if found else 'none'}")
        targets: dict[str, str] = {}
        for column in columns:
            if column.role in ("feature", "quasi-identifier", "label"):
                if column.target in targets:
                    raise fail(f"column '{column.name}': duplicate maps-to: '{targets[column.target]}' "
                               f"already feeds '{column.target}'")
                targets[column.target] = column.name
        purposes = [c.purpose for c in columns if c.role == "consent"]
        for column in columns:
            if column.role == "consent" and purposes.count(column.purpose) > 1:
                raise fail(f"column '{column.name}': two consent columns for purpose '{column.purpose}'")
            if column.role in ("consent-date", "consent-expiry"):
                if column.purpose is not None and column.purpose not in purposes:
                    raise fail(f"column '{column.name}': no consent column has purpose '{column.purpose}'")
                if [c.purpose for c in columns if c.role == column.role].count(column.purpose) > 1:
                    raise fail(f"column '{column.name}': two {column.role} columns for the same purpose")
        for purpose in purposes:
            if not any(c.role in ("consent-date", "consent-expiry") and c.purpose in (None, purpose)
                       for c in columns):
                raise fail(f"consent for purpose '{purpose}' has no consent-date or consent-expiry column")
        validity = data.get("consent-validity-days", {})
        if not isinstance(validity, dict):
            raise fail("key 'consent-validity-days' must map purposes to days")
        for purpose, days in validity.items():
            if purpose not in purposes:
                raise fail(f"consent-validity-days: no consent column has purpose '{purpose}'")
            if isinstance(days, bool) or not isinstance(days, int) or days <= 0:
                raise fail(f"consent-validity-days: '{purpose}' must be a positive number of days")
        texts = {}
        for key in ("intended-use", "label-description"):
            value = data.get(key, "")
            if not isinstance(value, str) or len(value) > 1000:
                raise fail(f"key '{key}' must be one line of text (at most 1000 characters)")
            texts[key] = " ".join(value.split())
        return cls(columns=columns, consent_validity_days=dict(validity), source=source,
                   intended_use=texts["intended-use"], label_description=texts["label-description"])

    def column(self, name: str) -> ColumnSpec:
        """The spec of export column `name`."""
        return next(c for c in self.columns if c.name == name)

    def columns_by_role(self, role: str) -> list[str]:
        """Export names of the columns with `role`, in schema order."""
        if role not in ROLES:
            raise SchemaError(f"{self.source}: unknown role {role!r}")
        return [c.name for c in self.columns if c.role == role]

    @property
    def record_key(self) -> str:
        """Export name of the record-key column."""
        return self.columns_by_role("record-key")[0]

    @property
    def label(self) -> str:
        """Export name of the label column."""
        return self.columns_by_role("label")[0]

    def releases_label(self, purpose: str) -> bool:
        """Whether the label may be read for `purpose` (a restricted class only where the schema
        allows it, as for any column): training, scored queries and `node check` all ask this."""
        return self.column(self.label).allowed_for(purpose)

    def training_columns(self, purpose: str) -> list[str]:
        """Export names of the model inputs a run with `purpose` may use: features and
        (generalised) quasi-identifiers, minus restricted classes not allowed for `purpose`."""
        return [c.name for c in self.columns
                if c.role in ("feature", "quasi-identifier") and c.allowed_for(purpose)]

    def excluded_columns(self, purpose: str) -> list[str]:
        """Export names of features and quasi-identifiers withheld from `purpose` by their class."""
        return [c.name for c in self.columns
                if c.role in ("feature", "quasi-identifier") and not c.allowed_for(purpose)]

    def consent_policy(self, default_validity_days: int = DEFAULT_VALIDITY_DAYS) -> ConsentPolicy:
        """The consent rules this export supports, one entry per consent purpose."""
        def dated(role: str, purpose: str) -> str | None:
            own = [c.name for c in self.columns if c.role == role and c.purpose == purpose]
            shared = [c.name for c in self.columns if c.role == role and c.purpose is None]
            return (own or shared or [None])[0]

        fields = {c.purpose: ConsentFields(granted=c.name, recorded_on=dated("consent-date", c.purpose),
                                           expires_on=dated("consent-expiry", c.purpose),
                                           validity_days=self.consent_validity_days.get(c.purpose))
                  for c in self.columns if c.role == "consent"}
        return ConsentPolicy(fields, default_validity_days=default_validity_days)


def _synthetic_groups() -> list[tuple[str, dict[str, dict]]]:
    """The synthetic export's columns in commented groups: (comment, {column: spec})."""
    def qi(cls: str, kind: str, rule: Any, **extra: Any) -> dict:
        return {"role": "quasi-identifier", "class": cls, "type": kind, **extra, "generalise": rule}

    def feature(cls: str, kind: str, **extra: Any) -> dict:
        return {"role": "feature", "class": cls, "type": kind, **extra}

    labs = {"hba1c": (3, 20), "creatinine": (0.1, 25), "hemoglobin": (3, 25), "bmi": (10, 90),
            "systolic_bp": (50, 280), "albumin": (0.5, 7)}
    psych = {"class": "psych-social", "allow-for-purposes": ["credit-risk-research"]}
    money = ("total_charges", "out_of_pocket", "balance_outstanding")
    return [
        ("Record key (pseudonymised) and direct identifiers (dropped before anything else).",
         {fx.RECORD_KEY: {"role": "record-key", "class": "identity"},
          **{c: {"role": "direct-identifier", "class": "identity"} for c in fx.DIRECT_IDENTIFIERS}}),
        ("Quasi-identifiers, generalised before training.",
         {"age": qi("identity", "numeric", {"age-band": 10}, integer=True, min=0, max=120),
          "sex": qi("identity", "categorical", "none", categories=["F", "M"]),
          "zip3": qi("identity", "categorical", {"prefix": 2}),
          fx.ENCOUNTER_DATE: qi("diagnosis-treatment", "date", "month")}),
        ("Demographics.",
         {"area_type": feature("identity", "categorical", categories=list(fx.AREA_TYPES)),
          "insurance_type": feature("insurance-billing", "categorical", categories=list(fx.INSURANCE_TYPES)),
          "employment_status": feature("identity", "categorical", categories=list(fx.EMPLOYMENT_STATUSES))}),
        ("Chronic conditions; depression and substance use are psych-social, released only for "
         "credit-risk research (the standard model reads them).",
         {c: feature("diagnosis-treatment", "boolean") | (psych if c in ("depression", "substance_use") else {})
          for c in fx.CHRONIC_CONDITIONS}),
        ("Labs and vitals; missing when never measured.",
         {c: feature("vitals-labs", "numeric", min=low, max=high, nullable=True) for c, (low, high) in labs.items()}),
        ("Utilisation over the last 12 months.",
         {c: feature("diagnosis-treatment", "numeric", **({} if c == "length_of_stay_days" else {"integer": True}),
                     min=0) for c in fx.UTILISATION_COLUMNS}),
        ("Charges and billing history.",
         {c: (feature("insurance-billing", "boolean") if c == "on_payment_plan" else
              feature("insurance-billing", "numeric", **({} if c in money else {"integer": True}), min=0))
          for c in fx.CHARGE_COLUMNS + fx.BILLING_COLUMNS}),
        ("Consent per purpose, and the day it was recorded (applies to every purpose).",
         {fx.CONSENT_CREDIT_RISK_RESEARCH: {"role": "consent", "class": "identity", "purpose": "credit-risk-research"},
          fx.CONSENT_APPLICANT_SCORING: {"role": "consent", "class": "identity", "purpose": "applicant-scoring"},
          fx.CONSENT_RECORDED_ON: {"role": "consent-date", "class": "identity"}}),
        ("Label: 90+ days delinquent within 12 months (0 or 1).",
         {fx.LABEL: {"role": "label", "class": "insurance-billing"}}),
    ]


def synthetic_schema_text() -> str:
    """The YAML schema describing exactly the exports `experiments.synthetic.synthesize` writes."""
    lines = ["# Export schema of the synthetic hospital exports (experiments/synthetic.py).",
             "# Written by clients.schema.write_synthetic_schema; the format is documented in clients/schema.py.",
             f"version: {SCHEMA_VERSION}",
             "# Consents in these exports are recorded 2022-2026; research consent runs ten years.",
             "consent-validity-days: {credit-risk-research: 3650, applicant-scoring: 3650}",
             "columns:"]
    for comment, columns in _synthetic_groups():
        lines.append(f"  # {comment}")
        lines += [f"  {name}: " + yaml.safe_dump(spec, default_flow_style=True, sort_keys=False, width=10_000).strip()
                  for name, spec in columns.items()]
    return "\n".join(lines) + "\n"


def write_synthetic_schema(path: Path = SHIPPED_SYNTHETIC_SCHEMA) -> Path:
    """Write the synthetic export's schema to `path` (default: the shipped file) and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(synthetic_schema_text(), encoding="utf-8")
    return path
