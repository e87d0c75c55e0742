"""Cohort queries: the declarative form of a federated DP statistic, checked before anything runs.

A query file (YAML) names one measure over consented records, grouped by fields whose groups
come from the federation's public contract, never from the data:

    name: delinquency-by-age-band          # slug; names the query's runs and ledger charges
    purpose: credit-risk-research          # only records consenting to it are read
    epsilon: 1.0                           # what each hospital spends on this query
    delta: 1.0e-6                          # optional (default 1e-6)
    measure: rate                          # count | sum | mean | rate | histogram | quantiles
    field: delinquent_90d_12m              # what the measure is over (not for count)
    bounds: [0, 20000]                     # sum and mean: values are clamped into [low, high]
    bins: [0, 1000, 5000, 20000]           # histogram and quantiles: fixed edges, values clamped
    quantiles: [0.25, 0.5, 0.75]           # quantiles only
    group-by: [age, {insurance_type: [private, medicaid]}]   # optional; a subset of a domain
    suppress-below: 20                     # cells whose noised record count is below it are withheld (0: none)
    model: {sha256: <64 hex>, kind: mlp}   # only with risk_score or membership_score: the model to score with

`risk_score` is the probability a model gives each record. A query over it names the model by
its SHA-256 (the weights travel with the query and each hospital checks the digest) and reads
only each hospital's held-out test split, the records the model was not trained on. A histogram
of `risk_score` grouped by a group field and `delinquent_90d_12m` is a DP evaluation of the
model: calibration, AUC and fairness by group follow from it by post-processing.

`membership_score` is, per record, the probability the named model gives the record's true label,
p(y | x): a monotone function of the record's loss, so a threshold on it is the loss-threshold
membership-inference attack. Unlike `risk_score` it reads both the training split and the
held-out split of the consented records (exactly the splits training used,
`clients.node_state.test_split`), and the pseudo-field `split` ("train" / "held-out") may group
it; `split` is refused with any other field. A histogram of `membership_score` by `split` is the
release's empirical privacy audit (`server.releases.membership`). Its sensitivity is that of any
histogram: a record's split is a function of the record's own pseudonym, so adding or removing
one patient moves one count in one cell by 1, and the model is a fixed input of the query (a DP
output the query composes with).

The hospital and the server both parse the same file with `CohortQuery.from_mapping`, so a
hospital never trusts the server's reading of a query. `layout` fixes the vector a hospital
encrypts: per cell, the statistics of the measure, each with the scale (`units`) that keeps the
federation's sum inside the CKKS slot range and the noise (`noise_scales`) its sensitivity needs.

Sensitivity, per hospital, for adding or removing one patient's record (a patient is in one
cell): a count moves by 1; a value clamped to [low, high] moves a centred sum (value minus the
midpoint c) by at most h = (high - low) / 2. Count and centred sum are released together with
half of the squared sensitivity each: noise sigma_count = z * sqrt(2) and sigma_sum = z * sqrt(2) * h,
where z is the Gaussian noise multiplier for (epsilon, delta) at L2 sensitivity 1 (the ledger's
`GaussianMechanism.gaussian_release`). A histogram's bin counts move by 1 in total: sigma = z.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from federation import features as fx
from federation.errors import ConfigError

MEASURES = ("count", "sum", "mean", "rate", "histogram", "quantiles")
DEFAULT_DELTA = 1e-6
DEFAULT_SUPPRESS_BELOW = 20.0
MAX_VECTOR_LENGTH = 16_384
CELL_CAPACITY = 2.0 ** 21
"""Most records the whole federation may hold in one cell. Each statistic is divided by its
per-record magnitude times this, so the encrypted sum stays within the CKKS slot range (|v| < 2)
and the codec's absolute error (about 2e-7) is about 0.4 records, far below the DP noise."""

_SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
_KEYS = {"name", "purpose", "epsilon", "delta", "measure", "field", "bounds", "bins", "quantiles",
         "group-by", "suppress-below", "description", "model"}
RISK_SCORE = "risk_score"
MEMBERSHIP_SCORE = "membership_score"
SPLIT = "split"
SPLITS = ("train", "held-out")
"""The groups of `SPLIT`: the records training used, and the held-out test split it never saw."""
SCORED_FIELDS = (RISK_SCORE, MEMBERSHIP_SCORE)
"""Fields a model computes at the hospital: a query over one names the model (`model`)."""
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
AGE_BANDS = tuple(range(0, 100, 10))
"""Lower bounds of the public age bands ("0-9" ... "80-89", "90+")."""


class QueryError(ConfigError):
    """A query is malformed: the message names the query file and the key or field at fault."""


@dataclass(frozen=True)
class FieldSpec:
    """What the federation's public contract says about one column a query may name.

    `kind` is "categorical" (fixed category list), "boolean", "binary" (0/1 integer), "age"
    (numeric, grouped into public 10-year bands), "numeric", "score" (a model's probability, see
    `RISK_SCORE` and `MEMBERSHIP_SCORE`), "split" (`SPLIT`, the training or held-out split, only
    with `MEMBERSHIP_SCORE`) or "free-text" (no public domain).
    """

    name: str
    kind: str
    domain: tuple[str, ...] = ()

    @property
    def groupable(self) -> bool:
        return bool(self.domain)

    @property
    def measurable(self) -> bool:
        return self.kind in ("boolean", "binary", "age", "numeric", "score")

    def labels(self, values: Any) -> np.ndarray:
        """Each value's group label ('' when it is in no group: missing or unknown)."""
        import pandas as pd

        series = pd.Series(values)
        if self.kind == "age":
            lower = np.floor(pd.to_numeric(series, errors="coerce").to_numpy(dtype=float) / 10.0) * 10.0
            out = np.full(len(series), "", dtype=object)
            ok = ~np.isnan(lower) & (lower >= 0)
            out[ok] = [_age_label(int(min(v, AGE_BANDS[-1]))) for v in lower[ok]]
            return out
        if self.kind in ("boolean", "binary"):
            numeric = pd.to_numeric(series.astype("object").map(_as_flag), errors="coerce").to_numpy(dtype=float)
            return np.where(numeric == 1.0, "yes", np.where(numeric == 0.0, "no", "")).astype(object)
        text = series.astype("string").str.strip().fillna("").to_numpy(dtype=object)
        lookup = {c.lower(): c for c in self.domain}
        return np.array([lookup.get(str(v).lower(), "") for v in text], dtype=object)


def _as_flag(value: Any) -> Any:
    if isinstance(value, str):
        return {"true": 1, "false": 0, "1": 1, "0": 0}.get(value.strip().lower())
    return value


def _age_label(lower: int) -> str:
    return f"{lower}+" if lower == AGE_BANDS[-1] else f"{lower}-{lower + 9}"


def _contract() -> dict[str, FieldSpec]:
    fields: dict[str, FieldSpec] = {
        "sex": FieldSpec("sex", "categorical", ("F", "M")),
        "area_type": FieldSpec("area_type", "categorical", fx.AREA_TYPES),
        "insurance_type": FieldSpec("insurance_type", "categorical", fx.INSURANCE_TYPES),
        "employment_status": FieldSpec("employment_status", "categorical", fx.EMPLOYMENT_STATUSES),
        "age": FieldSpec("age", "age", tuple(_age_label(b) for b in AGE_BANDS)),
        "zip3": FieldSpec("zip3", "free-text"),
        RISK_SCORE: FieldSpec(RISK_SCORE, "score"),
        MEMBERSHIP_SCORE: FieldSpec(MEMBERSHIP_SCORE, "score"),
        SPLIT: FieldSpec(SPLIT, "split", SPLITS),
        fx.LABEL: FieldSpec(fx.LABEL, "binary", ("no", "yes")),
        "on_payment_plan": FieldSpec("on_payment_plan", "boolean", ("no", "yes")),
    }
    for name in fx.CHRONIC_CONDITIONS:
        fields[name] = FieldSpec(name, "boolean", ("no", "yes"))
    for name in fx.LAB_COLUMNS + fx.UTILISATION_COLUMNS + fx.CHARGE_COLUMNS + fx.BILLING_COLUMNS:
        fields.setdefault(name, FieldSpec(name, "numeric"))
    return fields


FIELDS: dict[str, FieldSpec] = _contract()
"""Every column a query may name, under its fedrisk name (a hospital's `maps-to` target)."""
_NEVER = set(fx.DIRECT_IDENTIFIERS) | {fx.RECORD_KEY, *fx.CONSENT_COLUMNS, fx.ENCOUNTER_DATE}


@dataclass(frozen=True)
class GroupBy:
    """One grouping field and the groups, from its public domain, the query keeps."""

    field: str
    groups: tuple[str, ...]


@dataclass(frozen=True)
class Layout:
    """The vector one hospital encrypts: `cells * per_cell` statistics, then the contributor slot."""

    cells: tuple[tuple[str, ...], ...]
    per_cell: int
    units: np.ndarray          # divide a statistic by this before encryption (per position)
    noise_scales: np.ndarray   # noise standard deviation per position, in multiples of z

    @property
    def length(self) -> int:
        """Values encrypted, including the contributor slot."""
        return len(self.cells) * self.per_cell + 1


@dataclass(frozen=True)
class CohortQuery:
    """A validated cohort query (see the module docstring for the file format)."""

    name: str
    purpose: str
    epsilon: float
    delta: float
    measure: str
    field: str | None
    bounds: tuple[float, float] | None
    bins: tuple[float, ...] | None
    quantiles: tuple[float, ...] | None
    group_by: tuple[GroupBy, ...]
    suppress_below: float
    model: tuple[str, str] | None = None  # (sha256, kind) of the model a risk_score or membership_score query scores with
    model_features: str = "standard"
    """What the scored model reads: the standard 40-input contract, or ("schema") the inputs each
    hospital encodes from its export schema for the query's purpose (and its schema's label)."""

    # --- reading ----------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path) -> CohortQuery:
        """Read and validate a query file."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise QueryError(f"query file not found: {path}") from None
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            raise QueryError(f"{path}: not valid YAML" + (f" (line {line + 1})" if line is not None else "")) from None
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def from_mapping(cls, data: Any, source: str = "query") -> CohortQuery:
        """Validate a parsed query; every mistake is a one-line QueryError naming `source`."""
        def fail(message: str) -> QueryError:
            return QueryError(f"{source}: {message}")

        if not isinstance(data, Mapping):
            raise fail("a query is a mapping of keys (name, purpose, epsilon, measure, ...)")
        unknown = sorted(set(map(str, data)) - _KEYS)
        if unknown:
            raise fail(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
        for key in ("name", "purpose", "epsilon", "measure"):
            if key not in data:
                raise fail(f"missing key {key!r}")
        name, purpose = str(data["name"]), str(data["purpose"])
        for key, value in (("name", name), ("purpose", purpose)):
            if not _SLUG.match(value):
                raise fail(f"{key} must be a slug like 'delinquency-by-age', got {value!r}")
        epsilon = _number(data["epsilon"], "epsilon", fail)
        if not 0.0 < epsilon <= 100.0:
            raise fail(f"epsilon must be > 0 and at most 100, got {data['epsilon']!r}")
        delta = _number(data.get("delta", DEFAULT_DELTA), "delta", fail)
        if not 0.0 < delta < 1e-3:
            raise fail(f"delta must lie in (0, 0.001), got {data.get('delta')!r}")
        measure = str(data["measure"])
        if measure not in MEASURES:
            raise fail(f"measure must be one of {', '.join(MEASURES)}, got {measure!r}")
        suppress = _number(data.get("suppress-below", DEFAULT_SUPPRESS_BELOW), "suppress-below", fail)
        if suppress < 0:
            raise fail(f"suppress-below must be >= 0, got {suppress!r}")

        field = _measured_field(data, measure, fail)
        bounds = bins = quantiles = None
        for key, needed in (("bounds", ("sum", "mean")), ("bins", ("histogram", "quantiles")),
                            ("quantiles", ("quantiles",))):
            if key in data and measure not in needed:
                raise fail(f"{key!r} does not apply to measure {measure!r}")
        if measure in ("sum", "mean"):
            bounds = _bounds(data, field, fail)
        elif measure == "rate":
            bounds = (0.0, 1.0)
        if measure in ("histogram", "quantiles"):
            bins = _bins(data, fail)
        if measure == "quantiles":
            quantiles = _quantiles(data, fail)
        group_by = _group_by(data.get("group-by", []), field, fail)
        if field != MEMBERSHIP_SCORE and any(g.field == SPLIT for g in group_by):
            raise fail(f"group-by {SPLIT!r} applies only to field {MEMBERSHIP_SCORE!r} (a membership audit)")
        model = _model(data, field, fail)
        features = str(data["model"].get("features", "standard")) if model else "standard"
        query = cls(name, purpose, epsilon, delta, measure, field, bounds, bins, quantiles, group_by, suppress, model,
                    features)
        if query.layout().length > MAX_VECTOR_LENGTH:
            raise fail(f"{len(query.layout().cells)} cells of {query.layout().per_cell} statistics is more than "
                       f"{MAX_VECTOR_LENGTH} values; group by fewer fields or use fewer bins")
        return query

    # --- what the query means ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Canonical form: what travels to hospitals and what `digest` hashes."""
        out: dict[str, Any] = {"name": self.name, "purpose": self.purpose, "epsilon": self.epsilon,
                               "delta": self.delta, "measure": self.measure}
        if self.field is not None:
            out["field"] = self.field
        if self.bounds is not None and self.measure != "rate":
            out["bounds"] = list(self.bounds)
        if self.bins is not None:
            out["bins"] = list(self.bins)
        if self.quantiles is not None:
            out["quantiles"] = list(self.quantiles)
        out["group-by"] = [{g.field: list(g.groups)} for g in self.group_by]
        out["suppress-below"] = self.suppress_below
        if self.model is not None:
            out["model"] = {"sha256": self.model[0], "kind": self.model[1]}
            if self.model_features != "standard":  # standard queries keep the digest they always had
                out["model"]["features"] = self.model_features
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """SHA-256 (16 hex) of the canonical query."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def default_run_id(self) -> str:
        """The query's name and digest: resubmitting the same query on the same data repeats the
        same answer at no new cost; a new run id buys a fresh, independently noised answer."""
        return f"{self.name}-{self.digest()[:8]}"

    @property
    def paired(self) -> bool:
        """Whether each cell releases a (count, centred sum) pair."""
        return self.measure in ("sum", "mean", "rate")

    @property
    def half_range(self) -> float:
        """h = (high - low) / 2: what one record can move a centred sum by."""
        assert self.bounds is not None
        return (self.bounds[1] - self.bounds[0]) / 2.0

    @property
    def centre(self) -> float:
        assert self.bounds is not None
        return (self.bounds[0] + self.bounds[1]) / 2.0

    def layout(self) -> Layout:
        """Cells (the product of the group domains, in order) and the per-position scales."""
        cells = tuple(itertools.product(*(g.groups for g in self.group_by)))
        if self.paired:
            h = self.half_range
            per_cell, units, scales = 2, [CELL_CAPACITY, CELL_CAPACITY * h], [math.sqrt(2), math.sqrt(2) * h]
        elif self.bins is not None:
            per_cell = len(self.bins) - 1
            units, scales = [CELL_CAPACITY] * per_cell, [1.0] * per_cell
        else:
            per_cell, units, scales = 1, [CELL_CAPACITY], [1.0]
        return Layout(cells, per_cell, np.tile(units, len(cells)).astype(float),
                      np.tile(scales, len(cells)).astype(float))

    def noise_multiplier(self) -> float:
        """z: Gaussian noise, in units of L2 sensitivity, for (epsilon, delta) on one release."""
        from privacy.accounting import calibrate_noise

        return calibrate_noise(target_epsilon=self.epsilon, delta=self.delta, sample_rate=1.0, steps=1,
                               tolerance=0.001)

    def describe(self) -> str:
        """One line: what is measured, by what, at what cost."""
        what = self.measure if self.field is None else f"{self.measure} of {self.field}"
        by = f" by {', '.join(g.field for g in self.group_by)}" if self.group_by else ""
        return f"{what}{by}, epsilon {self.epsilon:g} per hospital, purpose {self.purpose}"


def load_query(value: str) -> CohortQuery:
    """A query given as a file path (YAML or JSON) or as inline JSON (what a run config carries)."""
    if value.lstrip().startswith("{"):
        try:
            data = json.loads(value)
        except ValueError:
            raise QueryError("inline query: not valid JSON") from None
        return CohortQuery.from_mapping(data, source="inline query")
    return CohortQuery.load(Path(value))


def _number(value: Any, key: str, fail) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise fail(f"{key} must be a finite number, got {value!r}")
    return float(value)


def _field_spec(name: Any, where: str, fail) -> FieldSpec:
    name = str(name)
    if name in _NEVER:
        raise fail(f"{where} {name!r} is an identifier, consent or date column; queries never read it")
    if name not in FIELDS:
        raise fail(f"{where} {name!r} is not a field of the federation's contract "
                   f"(fields: {', '.join(sorted(FIELDS))})")
    return FIELDS[name]


def _measured_field(data: Mapping, measure: str, fail) -> str | None:
    if measure == "count":
        if "field" in data:
            raise fail("measure 'count' counts records and takes no 'field'")
        return None
    if "field" not in data:
        raise fail(f"measure {measure!r} needs a 'field'")
    spec = _field_spec(data["field"], "field", fail)
    if spec.name == SPLIT:
        raise fail(f"field {SPLIT!r} is the training or held-out split; it can only group {MEMBERSHIP_SCORE!r}")
    if measure == "rate" and spec.kind not in ("boolean", "binary"):
        raise fail(f"measure 'rate' needs a yes/no field; {spec.name!r} is {spec.kind}")
    if not spec.measurable:
        raise fail(f"field {spec.name!r} is {spec.kind}, not numeric; it can only be grouped by")
    return spec.name


def _model(data: Mapping, field: str | None, fail) -> tuple[str, str] | None:
    raw = data.get("model")
    if field not in SCORED_FIELDS:
        if raw is not None:
            raise fail(f"'model' applies only to fields {' and '.join(map(repr, SCORED_FIELDS))}")
        return None
    if not isinstance(raw, Mapping) or not {"sha256", "kind"} <= set(map(str, raw)) \
            or set(map(str, raw)) - {"sha256", "kind", "features"}:
        raise fail(f"field {field!r} needs 'model: {{sha256: <64 hex>, kind: mlp|logreg|mlp:W1,..., "
                   "features: standard|schema (optional)}}'")
    if str(raw.get("features", "standard")) not in ("standard", "schema"):
        raise fail(f"model features must be 'standard' or 'schema', got {raw.get('features')!r}")
    digest, kind = str(raw["sha256"]), str(raw["kind"])
    if not _SHA256.match(digest):
        raise fail(f"model sha256 must be 64 lowercase hex characters, got {digest!r}")
    from federation.config import model_layers

    try:
        model_layers(kind)
    except ConfigError as exc:
        raise fail(f"model kind: {exc}") from None
    return digest, kind


def _bounds(data: Mapping, field: str | None, fail) -> tuple[float, float]:
    if "bounds" not in data:
        raise fail(f"measure {data['measure']!r} needs 'bounds: [low, high]' for {field!r}: "
                   "each record's value is clamped into them, which is what bounds its sensitivity")
    raw = data["bounds"]
    if not isinstance(raw, (list, tuple)) or len(raw) != 2:
        raise fail(f"bounds must be [low, high], got {raw!r}")
    low, high = (_number(v, "bounds", fail) for v in raw)
    if not low < high:
        raise fail(f"bounds must have low < high, got {raw!r}")
    return low, high


def _bins(data: Mapping, fail) -> tuple[float, ...]:
    raw = data.get("bins")
    if raw is None:
        raise fail(f"measure {data['measure']!r} needs 'bins': fixed, increasing edges (values are clamped into them)")
    if not isinstance(raw, (list, tuple)) or len(raw) < 2:
        raise fail(f"bins must be a list of at least two increasing edges, got {raw!r}")
    edges = tuple(_number(v, "bins", fail) for v in raw)
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise fail(f"bins must be strictly increasing, got {list(raw)!r}")
    return edges


def _quantiles(data: Mapping, fail) -> tuple[float, ...]:
    raw = data.get("quantiles")
    if not isinstance(raw, (list, tuple)) or not raw:
        raise fail("measure 'quantiles' needs 'quantiles: [0.5, ...]' (levels strictly between 0 and 1)")
    levels = tuple(_number(v, "quantiles", fail) for v in raw)
    if any(not 0.0 < q < 1.0 for q in levels):
        raise fail(f"quantile levels must lie strictly between 0 and 1, got {list(raw)!r}")
    return levels


def _group_by(raw: Any, measured: str | None, fail) -> tuple[GroupBy, ...]:
    if isinstance(raw, (str, Mapping)):
        raw = [raw]
    if not isinstance(raw, (list, tuple)):
        raise fail(f"group-by must be a list of fields, got {raw!r}")
    groups: list[GroupBy] = []
    for item in raw:
        chosen: Any = None
        if isinstance(item, Mapping):
            if len(item) != 1:
                raise fail(f"a group-by entry is a field or {{field: [groups]}}, got {dict(item)!r}")
            item, chosen = next(iter(item.items()))
        spec = _field_spec(item, "group-by field", fail)
        if spec.kind == "free-text":
            raise fail(f"group-by {spec.name!r} is free text with no public domain of groups; "
                       "group by a field with declared categories")
        if not spec.groupable:
            raise fail(f"group-by {spec.name!r} is {spec.kind}, not categorical; group by "
                       "a categorical, yes/no or age field")
        if spec.name == measured:
            raise fail(f"group-by {spec.name!r} is also the measured field")
        if spec.name in (g.field for g in groups):
            raise fail(f"group-by {spec.name!r} is named twice")
        if chosen is None:
            domain = spec.domain
        else:
            if not isinstance(chosen, (list, tuple)) or not chosen:
                raise fail(f"groups of {spec.name!r} must be a non-empty list from its domain")
            lookup = {d.lower(): d for d in spec.domain}
            chosen = [("yes" if v else "no") if isinstance(v, bool) else v for v in chosen]  # YAML: yes/no
            for value in chosen:
                if str(value).lower() not in lookup:
                    raise fail(f"group {value!r} of {spec.name!r} is not in its public domain "
                               f"({', '.join(spec.domain)}); a query cannot add groups")
            domain = tuple(dict.fromkeys(lookup[str(v).lower()] for v in chosen))
        groups.append(GroupBy(spec.name, domain))
    return tuple(groups)
