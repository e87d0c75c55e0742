"""DP evaluation of a released model: calibration, AUC and their gaps by group, from noised tables.

The input, precisely: for each group field G ("age" or "sex"), one pandas DataFrame as
`server.analytics.estimate` produces for a histogram query over the field `risk_score` (the
model's predicted probability) with bins `RISK_SCORE_BINS` grouped by [G, "delinquent_90d_12m"]
(`engines.model_evaluation.marginal` gives one per field from a single query grouped by age,
sex and the label). Columns: G (group label such as "40-49" or "F"), "delinquent_90d_12m"
("no" / "yes"), "bin_low", "bin_high", "count" (noised record count of the bin), "se" (standard
error of that count: the DP noise's) and "suppressed" (a suppressed cell's count is NaN; its group
is reported as not evaluable). Other columns (ci95_low, records, ...) are ignored.

Everything here is post-processing of that DP output, so it costs no privacy: noised positives
and negatives per bin (negative counts taken as zero); calibration rows (bin midpoint against the
observed delinquency rate); the AUC of the binned ROC (Mann-Whitney, ties within a bin counted
half) and the calibration offset (observed minus mean predicted rate), both from the noised counts
as released (see `federation.round_evaluation.binned_auc` for why not clipped); and for each a
95% interval from a parametric bootstrap of the known noise (each count redrawn with its se,
fixed seed). The intervals cover the DP noise only, not the sampling variation of the evaluation
cohort. A metric the noise leaves undefined (a class total at or below zero in too many draws) is
reported as None, never guessed.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from federation import features as fx
from federation.errors import FedriskError
from federation.round_evaluation import binned_auc

RISK_SCORE_FIELD = "risk_score"
RISK_SCORE_BINS: tuple[float, ...] = tuple(round(0.1 * k, 1) for k in range(11))
LABEL_GROUPS = ("no", "yes")  # how the query contract labels delinquent_90d_12m = 0 / 1
TABLE_COLUMNS = (fx.LABEL, "bin_low", "bin_high", "count", "se", "suppressed")
BOOTSTRAP_DRAWS = 2000
BOOTSTRAP_SEED = 6  # fixed: the same DP table always gives the same card
INTERVAL = (2.5, 97.5)  # percentiles of the bootstrap draws: a 95% interval
INTERVAL_BASIS = (f"95% percentile interval of a parametric bootstrap of the known DP noise ({BOOTSTRAP_DRAWS} "
                  f"draws, seed {BOOTSTRAP_SEED}); it does not cover the sampling variation of the evaluation cohort")


class EvaluationTableError(FedriskError):
    """A DP evaluation table does not have the documented form (names the table and the problem)."""


def json_ready(value: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays become Python numbers and lists, tuples lists."""
    def plain(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            return v.tolist()
        if isinstance(v, np.generic):
            return v.item()
        raise TypeError(f"{type(v).__name__} is not JSON serialisable")

    return json.loads(json.dumps(value, default=plain))


@dataclass
class _GroupHistogram:
    """Noised positives and negatives per score bin of one group, with their noise SEs."""

    label: str
    positives: np.ndarray
    negatives: np.ndarray
    positives_se: np.ndarray
    negatives_se: np.ndarray
    total: float  # sum of the noised counts as released (before clipping negatives)


def _parse_table(group_field: str, frame: pd.DataFrame) -> tuple[np.ndarray, list[_GroupHistogram], list[str]]:
    """The bin edges, the evaluable groups (in table order) and the suppressed groups of one table."""
    def fail(message: str) -> EvaluationTableError:
        return EvaluationTableError(f"evaluation table {group_field!r}: {message}")

    if not isinstance(frame, pd.DataFrame):
        raise fail("is not a pandas DataFrame")
    missing = [c for c in (group_field, *TABLE_COLUMNS) if c not in frame.columns]
    if missing:
        raise fail(f"missing column(s) {', '.join(missing)} (columns: {group_field}, {', '.join(TABLE_COLUMNS)})")
    labels = set(frame[fx.LABEL].astype(str))
    if not labels <= set(LABEL_GROUPS):
        raise fail(f"{fx.LABEL} holds {sorted(labels - set(LABEL_GROUPS))}; expected {'/'.join(LABEL_GROUPS)}")
    edges: np.ndarray | None = None
    evaluable, suppressed = [], []
    for label, rows in frame.groupby(frame[group_field].astype(str), sort=False):
        halves: dict[str, pd.DataFrame] = {}
        for outcome in LABEL_GROUPS:
            half = rows[rows[fx.LABEL].astype(str) == outcome].sort_values("bin_low")
            if half.empty:
                raise fail(f"group {label!r} has no rows for {fx.LABEL} = {outcome!r}")
            bins = np.concatenate([half["bin_low"].to_numpy(float), half["bin_high"].to_numpy(float)[-1:]])
            if not (np.all(np.diff(bins) > 0) and np.allclose(half["bin_high"].to_numpy(float)[:-1], bins[1:-1])
                    and bins[0] >= 0.0 and bins[-1] <= 1.0):
                raise fail(f"group {label!r}: bins must be contiguous and increasing within [0, 1]")
            if edges is None:
                edges = bins
            elif len(bins) != len(edges) or not np.allclose(bins, edges):
                raise fail(f"group {label!r} has different bins from the rest of the table")
            halves[outcome] = half
        counts = {o: halves[o]["count"].to_numpy(float) for o in LABEL_GROUPS}
        ses = {o: halves[o]["se"].to_numpy(float) for o in LABEL_GROUPS}
        hidden = any(halves[o]["suppressed"].astype(bool).any() or not np.isfinite(counts[o]).all()
                     for o in LABEL_GROUPS)
        if hidden:
            suppressed.append(label)
            continue
        if any(not np.isfinite(ses[o]).all() or (ses[o] < 0).any() for o in LABEL_GROUPS):
            raise fail(f"group {label!r}: se must be finite and non-negative")
        evaluable.append(_GroupHistogram(label, counts["yes"], counts["no"], ses["yes"], ses["no"],
                                         float(counts["yes"].sum() + counts["no"].sum())))
    if edges is None:
        raise fail("has no rows")
    return edges, evaluable, suppressed


def _calibration_offset(positives: np.ndarray, negatives: np.ndarray, mids: np.ndarray) -> np.ndarray:
    """Calibration in the large: observed delinquency rate minus the mean predicted rate (bin
    midpoints), from the noised counts as released. Positive: the model under-predicts."""
    n = positives + negatives
    total = n.sum(axis=-1)
    defined = (positives.sum(axis=-1) >= 0) & (total > 0)
    observed = np.divide(positives.sum(axis=-1), total, out=np.full(np.shape(total), np.nan), where=defined)
    predicted = np.divide((n * mids).sum(axis=-1), total, out=np.full(np.shape(total), np.nan), where=defined)
    return np.clip(observed - predicted, -1.0, 1.0)


def _estimate(point: float, draws: np.ndarray) -> tuple[float | None, list[float] | None]:
    """A point estimate and its percentile interval, or (None, None) when the noise leaves it
    undefined in more of the draws than the interval's lower tail (a class total at or below zero)."""
    finite = draws[np.isfinite(draws)]
    if not np.isfinite(point) or draws.size - finite.size > draws.size * INTERVAL[0] / 100.0:
        return None, None
    return float(point), [float(v) for v in np.percentile(finite, INTERVAL)]


def _evaluate_group(hist: _GroupHistogram, edges: np.ndarray, rng: np.random.Generator,
                    table: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Summary and calibration rows of one group, and its bootstrap draws of each metric."""
    mids = (edges[:-1] + edges[1:]) / 2.0
    shape = (BOOTSTRAP_DRAWS, len(mids))
    pos_draws = hist.positives + hist.positives_se * rng.standard_normal(shape)
    neg_draws = hist.negatives + hist.negatives_se * rng.standard_normal(shape)
    draws = {"auc": binned_auc(pos_draws, neg_draws),
             "calibration_offset": _calibration_offset(pos_draws, neg_draws, mids)}
    auc, auc_ci = _estimate(binned_auc(hist.positives, hist.negatives), draws["auc"])
    offset, offset_ci = _estimate(_calibration_offset(hist.positives, hist.negatives, mids),
                                  draws["calibration_offset"])
    pos, neg = np.clip(hist.positives, 0.0, None), np.clip(hist.negatives, 0.0, None)
    n = pos + neg
    rates = np.divide(pos, n, out=np.full(len(n), np.nan), where=n > 0)
    clipped_pos, clipped_n = np.clip(pos_draws, 0.0, None), np.clip(pos_draws, 0.0, None) + np.clip(neg_draws, 0.0, None)
    rate_draws = np.divide(clipped_pos, clipped_n, out=np.full(shape, np.nan), where=clipped_n > 0)
    with warnings.catch_warnings():  # a bin empty in every draw has no spread: its se stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        rate_se = np.nanstd(rate_draws, axis=0)
    calibration = [{"bin_low": float(edges[b]), "bin_high": float(edges[b + 1]), "mean_predicted": float(mids[b]),
                    "observed_rate": float(rates[b]) if n[b] > 0 else None,
                    "se": float(rate_se[b]) if n[b] > 0 and np.isfinite(rate_se[b]) else None,
                    "positives": float(pos[b]), "negatives": float(neg[b]), "n": float(n[b])}
                   for b in range(len(mids))]
    positives, negatives = float(hist.positives.sum()), float(hist.negatives.sum())
    total = positives + negatives
    summary = {"table": table, "auc": auc, "auc_ci95": auc_ci, "calibration_offset": offset,
               "calibration_offset_ci95": offset_ci, "positives": positives, "negatives": negatives,
               "records": hist.total,
               "observed_rate": positives / total if total > 0 and positives >= 0 else None,
               "mean_predicted": float((hist.positives + hist.negatives) @ mids / total) if total > 0 else None,
               "calibration": calibration}
    return summary, draws


def _gap(values: dict[str, float | None], draws: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """Highest and lowest group on a metric and the difference, with its bootstrap interval (the
    groups are picked by their point estimates, so the interval is, if anything, optimistic)."""
    known = {g: v for g, v in values.items() if v is not None}
    if len(known) < 2:
        return None
    high, low = max(known, key=known.__getitem__), min(known, key=known.__getitem__)
    _, interval = _estimate(known[high] - known[low], draws[high] - draws[low])
    return {"highest": high, "highest_value": known[high], "lowest": low, "lowest_value": known[low],
            "gap": known[high] - known[low], "ci95": interval}


METRICS = ("auc", "calibration_offset")
CALIBRATION_OFFSET_WORDS = "calibration offset (observed minus predicted rate of the label)"


def evaluation_from_tables(tables: Mapping[str, pd.DataFrame]) -> dict[str, Any]:
    """Calibration, AUC and their gaps by group, from DP evaluation tables (see the module docstring).

    tables: group field ("age", "sex") -> its table. Returns {"basis", "bins", "overall",
    "groups": {field: {group: summary}}, "gaps": {field: {metric: gap}}, "suppressed": {field:
    [groups]}}. A summary holds auc, calibration_offset (observed minus mean predicted rate), each
    with a `_ci95` interval (None when the noise leaves it undefined), observed_rate,
    mean_predicted, positives, negatives and records (noised totals as released) and its
    calibration rows (per bin: mean_predicted = bin midpoint, observed_rate and its se, and the
    noised positives, negatives and n, negative counts clipped at 0). A gap names the highest
    and lowest group with the difference and its interval. "overall" sums the groups of the
    table with the fewest suppressed groups (ties: the first given) and names that table.
    Raises EvaluationTableError for a table not of the documented form.
    """
    if not tables:
        raise EvaluationTableError("no DP evaluation table given")
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    parsed = {name: _parse_table(name, frame) for name, frame in tables.items()}
    groups: dict[str, dict[str, Any]] = {}
    gaps: dict[str, dict[str, Any]] = {}
    for name, (edges, hists, _) in parsed.items():
        results = {h.label: _evaluate_group(h, edges, rng, name) for h in hists}
        groups[name] = {label: summary for label, (summary, _) in results.items()}
        gaps[name] = {metric: _gap({g: s[metric] for g, (s, _) in results.items()},
                                   {g: d[metric] for g, (_, d) in results.items()}) for metric in METRICS}
    table = min(parsed, key=lambda name: len(parsed[name][2]))
    edges, hists, hidden = parsed[table]
    if not hists:
        raise EvaluationTableError(f"evaluation table {table!r}: every group is suppressed")
    overall = _GroupHistogram(
        "overall", sum(h.positives for h in hists), sum(h.negatives for h in hists),
        np.sqrt(sum(h.positives_se ** 2 for h in hists)), np.sqrt(sum(h.negatives_se ** 2 for h in hists)),
        sum(h.total for h in hists))
    summary, _ = _evaluate_group(overall, edges, rng, table)
    summary["excluded_groups"] = hidden
    return json_ready({"basis": INTERVAL_BASIS, "bins": [float(e) for e in edges], "overall": summary,
                       "groups": groups, "gaps": gaps,
                       "suppressed": {name: hidden_groups for name, (_, _, hidden_groups) in parsed.items()}})


def _with_interval(value: float | None, interval: list[float] | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def fairness_notes(evaluation: Mapping[str, Any]) -> list[str]:
    """One sentence per group field on its AUC and calibration gaps, with 95% intervals. The notes
    pass no verdict: the intervals cover the DP noise only, not the sampling variation of each
    group nor the choice of the two extreme groups among many, so a gap whose interval excludes
    zero is not by itself evidence of a gap in the population."""
    notes = []
    for name, groups in evaluation["groups"].items():
        parts = []
        for metric, words in (("auc", "AUC"), ("calibration_offset", CALIBRATION_OFFSET_WORDS)):
            gap = evaluation["gaps"][name][metric]
            if gap is None:
                parts.append(f"{words}: fewer than two groups could be evaluated under the DP noise")
                continue
            high, low = groups[gap["highest"]], groups[gap["lowest"]]
            parts.append(
                f"{words} ranges from {_with_interval(low[metric], low[metric + '_ci95'])} ({gap['lowest']}) to "
                f"{_with_interval(high[metric], high[metric + '_ci95'])} ({gap['highest']}), a gap of "
                f"{_with_interval(gap['gap'], gap['ci95'])}")
        unevaluable = [g for g, stats in groups.items() if stats["auc"] is None]
        if unevaluable:
            parts.append(f"too few records for the DP noise: {', '.join(unevaluable)}")
        hidden = evaluation["suppressed"].get(name) or []
        if hidden:
            parts.append(f"not evaluable (suppressed): {', '.join(hidden)}")
        notes.append(f"By {name}: " + "; ".join(parts) + " (95% intervals of the DP noise only).")
    return notes


# --- evaluation tables as files ------------------------------------------------------------------

ESTIMATE_COLUMNS = frozenset({*TABLE_COLUMNS, "ci95_low", "ci95_high", "records"})
"""Every column `server.analytics.estimate` writes for a histogram, besides the group fields."""


@dataclass(frozen=True)
class DPEvaluation:
    """DP evaluation tables of one model, and where they came from.

    Attributes:
        tables: group field -> its table (the form in the module docstring).
        model_sha256: SHA-256 of the model the risk_score query scored with; when given, a release
            refuses tables of any other model. Empty: not checked (tables built by hand).
        source: the query run in words, e.g. "cohort query model-evaluation-1a2b3c4d (epsilon 0.5
            per hospital)", printed on the model card.
        epsilon: what each hospital was charged for the evaluation (the queries' epsilons summed;
            0 when not known, tables built by hand).
    """

    tables: Mapping[str, pd.DataFrame]
    model_sha256: str = ""
    source: str = ""
    epsilon: float = 0.0


def load_evaluation(paths: list[Path]) -> DPEvaluation:
    """Read evaluation tables written by the analytics machinery: CSV or Parquet files, one per
    group field (found as the one column besides `ESTIMATE_COLUMNS`), each with its query's JSON
    beside it (`<stem>.json`, or `X.json` for `X.by-<group>.csv`) naming the model it scored."""
    tables: dict[str, pd.DataFrame] = {}
    digests, sources, charged = set(), set(), {}
    for path in map(Path, paths):
        try:
            frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(
                path, dtype={fx.LABEL: str}, keep_default_na=False, na_values=[""])
        except (OSError, ValueError) as exc:
            raise EvaluationTableError(f"cannot read evaluation table {path}: {type(exc).__name__}") from None
        groups = [c for c in frame.columns if c not in ESTIMATE_COLUMNS]
        if len(groups) != 1:
            raise EvaluationTableError(f"{path}: expected exactly one group column besides "
                                       f"{', '.join(sorted(ESTIMATE_COLUMNS))}, found {groups or 'none'}")
        tables[groups[0]] = frame.assign(**{groups[0]: frame[groups[0]].astype(str)})
        stem = path.name.removesuffix(path.suffix)
        beside = [path.with_name(f"{stem.split('.by-')[0]}.json"), path.with_suffix(".json")]
        meta_path = next((p for p in beside if p.is_file()), None)
        if meta_path is None:
            raise EvaluationTableError(f"{path}: no query JSON beside it ({beside[0].name}) to show which model "
                                       "it evaluated")
        try:
            meta = json.loads(meta_path.read_text())
            digests.add(str(meta["query"]["model"]["sha256"]))
            sources.add(f"cohort query {meta['run-id']} (epsilon {float(meta['privacy']['epsilon']):.3g} "
                        "per hospital)")
            charged[str(meta["run-id"])] = float(meta["privacy"]["epsilon"])
        except (ValueError, KeyError, TypeError):
            raise EvaluationTableError(f"{meta_path}: not the JSON of a risk_score query over a model") from None
    if len(digests) != 1:
        raise EvaluationTableError("the evaluation tables come from queries over different models")
    return DPEvaluation(tables, digests.pop(), "; ".join(sorted(sources)), sum(charged.values()))
