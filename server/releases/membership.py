"""The empirical privacy audit of a release: a membership-inference attack measured under DP.

The input is the DP table of one cohort query (`engines.membership_audit.audit_query`): a
histogram of `membership_score` = p(y | x), the probability the released model gives each
record's true label, grouped by `split`, summed over the hospitals. Members are the training
split; non-members the held-out split. Each record's split is a keyed hash of its pseudonym
(`clients.node_state.test_split`), fixed before training and independent of everything else
about the record, so the held-out records are draws from the same population as the training
records that the model never saw: the right non-member population for the attack, with no
shift between the two groups for the attack to pick up instead of memorisation.

The attack is the loss-threshold attack (Yeom et al., 2018): call a record a member when
p(y | x) is at least a threshold. From the table, for each bin edge t as threshold:
TPR(t) = members with p >= t / members, FPR(t) = non-members with p >= t / non-members.

* `auc`: the attack's AUC over the binned scores (Mann-Whitney, ties within a bin count half),
  from the noised counts as released: clipping would add mass to empty bins and pull the AUC
  toward 0.5, which for an audit is the wrong direction (`federation.round_evaluation.binned_auc`).
  `auc_se` is the standard deviation of that AUC under the known DP noise (parametric
  bootstrap, fixed seed); `auc_sampling_se` is Hanley and McNeil's sampling standard error.
* `advantage`: max over thresholds of TPR - FPR (Yeom's membership advantage), from the counts
  with negative noised counts clipped to zero (the ROC is read off the clipped counts).
* `epsilon_lower_bound`: (epsilon, delta)-DP implies, for every test, TPR <= e^eps FPR + delta and
  1 - FPR <= e^eps (1 - TPR) + delta. So eps >= log((TPR - delta) / FPR) and
  eps >= log((1 - FPR - delta) / (1 - TPR)); the bound is the largest of these over thresholds,
  with TPR replaced by a lower and FPR by an upper confidence bound, so that it holds with
  `CONFIDENCE` (95%) jointly over every threshold (Bonferroni over thresholds, the two rates and
  the two sources of error): the DP noise (the noised counts above and below the threshold each
  moved `z` of their known standard deviations the unfavourable way) and sampling (Clopper-Pearson
  at the counts so moved, the records taken as draws from the hospitals' population). 0 when no
  threshold gives a positive bound.

What it is and is not. This is an average-case audit of the training set: one run, the hospitals'
real records as the members, a simple attack. It is a lower bound on the privacy loss this
attack demonstrates (in the sense of Steinke, Nasr and Jagielski, "Privacy auditing with one (1)
training run", 2023: membership assigned independently at random), not a certificate: the
guarantee is the accounted epsilon. Worst-case records (canaries) and stronger attacks would
give larger bounds; a bound far below the accounted epsilon is expected and is not evidence that
the accounted epsilon is loose. A bound above it is evidence that the accounting or the
implementation is wrong, and the registry refuses such a release.

Everything here is post-processing of the DP table, so it costs nothing more.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from federation.errors import FedriskError
from federation.query import MEMBERSHIP_SCORE, SPLIT, SPLITS
from federation.round_evaluation import binned_auc

ATTACK = ("loss threshold: a record is called a member when p(y | x), the model's probability of its true label, "
          "is at least a threshold")
CONFIDENCE = 0.95
BOOTSTRAP_DRAWS = 2000
BOOTSTRAP_SEED = 14  # fixed: the same DP table always gives the same audit
MEMBERSHIP_BINS: tuple[float, ...] = (0.0, *(round(1.0 - 10.0 ** (-k / 4.0), 6) for k in range(1, 17)), 1.0)
"""Edges of the p(y | x) histogram: 0, then 1 - 10^(-k/4) for k = 1..16 (quarter decades of the
loss-like 1 - p, from 0.44 to 0.9999), then 1. Scores concentrate near 1 (most records are
classified correctly with confidence), where members and non-members differ, so the bins are fine
there and coarse below 0.44; 17 bins keep the noise per split small (`MAX_VECTOR_LENGTH` is far)."""
MEMBERS, NON_MEMBERS = SPLITS
TABLE_COLUMNS = (SPLIT, "bin_low", "bin_high", "count", "se")
MEANING = ("a membership-inference attack on the training records, measured under DP at each hospital: an "
           "average-case empirical lower bound on the privacy loss (an AUC of 0.5, advantage 0 and bound 0 mean "
           "the attack could not tell training records from held-out ones); the guarantee is the accounted epsilon")
NOT_AUDITED = "not audited for this release"


class AuditTableError(FedriskError):
    """A membership audit table does not have the documented form (names the table and the problem)."""


@dataclass(frozen=True)
class MembershipAudit:
    """The attack's figures from one DP table (see the module docstring for each).

    Attributes:
        attack: what the attack does (`ATTACK`).
        auc, auc_se, auc_sampling_se: the attack's AUC and its standard errors (DP noise; sampling).
        advantage: max over thresholds of TPR - FPR.
        epsilon_lower_bound: the empirical epsilon lower bound at `delta` and `confidence`.
        confidence, delta: of the lower bound.
        members, non_members: the noised record totals of the two splits (as released).
        bins: the histogram's edges; roc: [(threshold, tpr, fpr)] from the clipped counts.
    """

    attack: str
    auc: float | None
    auc_se: float | None
    auc_sampling_se: float | None
    advantage: float
    epsilon_lower_bound: float
    confidence: float
    delta: float
    members: float
    non_members: float
    bins: list[float]
    roc: list[tuple[float, float, float]]


def _split_counts(table: pd.DataFrame, source: str) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Bin edges and, per split, the noised counts and their noise variances, summed over any other
    group fields of the table."""
    def fail(message: str) -> AuditTableError:
        return AuditTableError(f"membership audit table {source}: {message}")

    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise fail(f"missing column(s) {', '.join(missing)} (needs {', '.join(TABLE_COLUMNS)})")
    splits = set(table[SPLIT].astype(str))
    if splits != set(SPLITS):
        raise fail(f"{SPLIT} holds {sorted(splits)}; expected both of {', '.join(SPLITS)}")
    counts = pd.to_numeric(table["count"], errors="coerce")
    se = pd.to_numeric(table["se"], errors="coerce")
    if not (np.isfinite(counts).all() and np.isfinite(se).all() and (se >= 0).all()):
        raise fail("every count and se must be a finite number, se non-negative (no suppressed cells)")
    frame = table.assign(count=counts, var=se ** 2, **{SPLIT: table[SPLIT].astype(str)})
    summed = frame.groupby([SPLIT, "bin_low", "bin_high"], as_index=False).agg(count=("count", "sum"),
                                                                              var=("var", "sum"))
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    edges: np.ndarray | None = None
    for split in SPLITS:
        rows = summed[summed[SPLIT] == split].sort_values("bin_low")
        bins = np.concatenate([rows["bin_low"].to_numpy(float), rows["bin_high"].to_numpy(float)[-1:]])
        if not (np.all(np.diff(bins) > 0) and np.allclose(rows["bin_high"].to_numpy(float)[:-1], bins[1:-1])
                and bins[0] >= 0.0 and bins[-1] <= 1.0):
            raise fail(f"split {split!r}: bins must be contiguous and increasing within [0, 1]")
        if edges is not None and (len(bins) != len(edges) or not np.allclose(bins, edges)):
            raise fail("the two splits have different bins")
        edges = bins
        out[split] = (rows["count"].to_numpy(float), rows["var"].to_numpy(float))
    assert edges is not None
    return edges, out


def _at_or_above(values: np.ndarray) -> np.ndarray:
    """For each bin k (and one past the last), the sum of values in bins k and above."""
    return np.concatenate([np.cumsum(values[::-1])[::-1], [0.0]])


def _rate_bounds(counts: np.ndarray, var: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """For thresholds at each interior edge: a lower and an upper confidence bound on the share of
    records at or above it, each failing with probability at most `alpha`: half for the DP noise (a
    quarter for the noised count at or above, a quarter for the one below) and half for sampling."""
    z = stats.norm.isf(alpha / 4.0)
    above, above_var = _at_or_above(counts)[1:-1], _at_or_above(var)[1:-1]
    below, below_var = counts.sum() - above, var.sum() - above_var
    above_sd, below_sd = np.sqrt(above_var), np.sqrt(np.maximum(below_var, 0.0))
    tail = alpha / 2.0

    def share(k: np.ndarray, n: np.ndarray, lower: bool) -> np.ndarray:
        """Clopper-Pearson at (possibly fractional) counts k of n; the trivial bound where n is 0."""
        k, n = np.clip(k, 0.0, None), np.clip(n, 0.0, None)
        out = np.full(k.shape, 0.0 if lower else 1.0)
        if lower:
            ok = (k > 0) & (n > 0)
            out[ok] = stats.beta.ppf(tail, k[ok], n[ok] - k[ok] + 1.0)
        else:
            ok = (k < n) & (n > 0)
            out[ok] = stats.beta.ppf(1.0 - tail, k[ok] + 1.0, n[ok] - k[ok])
        return np.nan_to_num(out, nan=0.0 if lower else 1.0)

    low_above, high_above = np.clip(above - z * above_sd, 0.0, None), np.clip(above + z * above_sd, 0.0, None)
    low_below, high_below = np.clip(below - z * below_sd, 0.0, None), np.clip(below + z * below_sd, 0.0, None)
    return (share(low_above, low_above + high_below, lower=True),
            share(high_above, high_above + low_below, lower=False))


def audit_from_table(table: pd.DataFrame, *, delta: float, confidence: float = CONFIDENCE,
                     source: str = "table") -> MembershipAudit:
    """The audit's figures from one DP table of `membership_score` by `split` (columns `split`,
    `bin_low`, `bin_high`, `count`, `se`; other group columns are summed over, their noise added in
    quadrature). `delta`: the delta of the bound (the release's). Raises AuditTableError for a
    table not of that form."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    edges, splits = _split_counts(table, source)
    members, members_var = splits[MEMBERS]
    others, others_var = splits[NON_MEMBERS]
    # the AUC: from the counts as released, with the bootstrap spread of the known noise
    auc = float(binned_auc(members, others))
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    draws = binned_auc(members + np.sqrt(members_var) * rng.standard_normal((BOOTSTRAP_DRAWS, len(members))),
                       others + np.sqrt(others_var) * rng.standard_normal((BOOTSTRAP_DRAWS, len(others))))
    defined = math.isfinite(auc) and np.isfinite(draws).mean() >= 0.975
    m_total, n_total = float(members.sum()), float(others.sum())
    sampling_se = None
    if defined and m_total > 0 and n_total > 0:
        q1, q2 = auc / (2.0 - auc), 2.0 * auc ** 2 / (1.0 + auc)
        sampling_se = math.sqrt(max(auc * (1 - auc) + (m_total - 1) * (q1 - auc ** 2)
                                    + (n_total - 1) * (q2 - auc ** 2), 0.0) / (m_total * n_total))
    # the ROC and the advantage: from the clipped counts
    pos, neg = np.clip(members, 0.0, None), np.clip(others, 0.0, None)
    tpr = _at_or_above(pos) / pos.sum() if pos.sum() > 0 else np.zeros(len(edges))
    fpr = _at_or_above(neg) / neg.sum() if neg.sum() > 0 else np.zeros(len(edges))
    advantage = float(max(0.0, np.max(tpr - fpr)))
    # the epsilon lower bound: conservative rates at every interior threshold, jointly at `confidence`
    thresholds = len(edges) - 2
    alpha = (1.0 - confidence) / max(2 * thresholds, 1)
    tpr_low, _ = _rate_bounds(members, members_var, alpha)
    _, fpr_high = _rate_bounds(others, others_var, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        first = np.log(np.clip(tpr_low - delta, 0.0, None) / fpr_high)
        second = np.log(np.clip(1.0 - fpr_high - delta, 0.0, None) / (1.0 - tpr_low))
    candidates = np.concatenate([first, second])
    candidates = candidates[np.isfinite(candidates)]
    bound = float(max(0.0, candidates.max())) if candidates.size else 0.0
    roc = [(float(edges[k]), float(tpr[k]), float(fpr[k])) for k in range(len(edges))]
    return MembershipAudit(
        attack=ATTACK, auc=auc if defined else None,
        auc_se=float(np.nanstd(draws)) if defined else None, auc_sampling_se=sampling_se,
        advantage=advantage, epsilon_lower_bound=bound, confidence=confidence, delta=delta,
        members=m_total, non_members=n_total, bins=[float(e) for e in edges], roc=roc)


# --- audit tables as files -----------------------------------------------------------------------

@dataclass(frozen=True)
class AuditTable:
    """A membership audit's DP table and what its query JSON says about it.

    Attributes:
        table: the DP table (`audit_from_table`'s input).
        model_sha256: the model the query scored (a release refuses another model's audit).
        epsilon, noise_multiplier: what the audit query spent at each hospital, charged to its ledger
            before it was computed, and its noise.
        source: the query run in words.
    """

    table: pd.DataFrame
    model_sha256: str
    epsilon: float
    noise_multiplier: float
    source: str


def load_audit(path: Path) -> AuditTable:
    """Read an audit table written by `fedrisk release audit` (CSV or Parquet) and its query JSON
    beside it (`<stem>.json`), which must be a `membership_score` query grouped by `split`."""
    path = Path(path)
    try:
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype={SPLIT: str})
    except (OSError, ValueError) as exc:
        raise AuditTableError(f"cannot read membership audit table {path}: {type(exc).__name__}") from None
    meta_path = path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
        query, privacy = meta["query"], meta["privacy"]
        if query["field"] != MEMBERSHIP_SCORE or not any(SPLIT in g for g in query["group-by"]):
            raise ValueError("not a membership query")
        return AuditTable(table, str(query["model"]["sha256"]), float(privacy["epsilon"]),
                          float(privacy["noise_multiplier"]),
                          f"cohort query {meta['run-id']} (epsilon {float(privacy['epsilon']):.3g} per hospital)")
    except FileNotFoundError:
        raise AuditTableError(f"{path}: no query JSON beside it ({meta_path.name}) to show which model it "
                              "audited") from None
    except (ValueError, KeyError, TypeError):
        raise AuditTableError(f"{meta_path}: not the JSON of a membership_score query by split") from None


def epsilon_with_audit(privacy_report: Mapping[str, Any], audit: AuditTable) -> float:
    """Epsilon at the report's delta of each hospital's run (DP-SGD and its DP evaluations) composed
    with the audit query, the largest over hospitals: what a patient has spent on the release once
    it is audited (the audit is charged to the ledgers, but is not part of the run's epsilon)."""
    from privacy.accounting import compose_epsilon
    from privacy.ledger import GaussianMechanism
    from server.releases.certificates import hospitals_from_report

    query = GaussianMechanism.gaussian_release(noise_multiplier=audit.noise_multiplier)
    delta = float(privacy_report["delta"])
    return max(compose_epsilon([*h.mechanisms(), query], delta)
               for h in hospitals_from_report(privacy_report).values())


def certificate_section(audit: AuditTable, *, accounted_epsilon: float, delta: float,
                        with_audit: float | None = None) -> dict[str, Any]:
    """The certificate's `privacy_audit` section for an audit table (refusing none; see
    `release_section` for what a release refuses). `with_audit`: `epsilon_with_audit`, if known."""
    figures = audit_from_table(audit.table, delta=delta, source=audit.source)
    auc = "n/a" if figures.auc is None else f"{figures.auc:.3f}"
    statement = (f"A loss-threshold membership-inference attack, run on the training and held-out records at "
                 f"each hospital under DP, reached AUC {auc} (0.5 is chance) and advantage {figures.advantage:.3f}; "
                 f"the privacy loss it demonstrates is at least epsilon {figures.epsilon_lower_bound:.3f} "
                 f"({figures.confidence:.0%} confidence), against the accounted epsilon {accounted_epsilon:.3f}. "
                 "It is an average-case lower bound, not a guarantee; the guarantee is the accounted epsilon"
                 + (f", {with_audit:.3f} with the audit query composed." if with_audit is not None else "."))
    return {"audited": True, "attack": figures.attack, "auc": figures.auc, "auc_se": figures.auc_se,
            "auc_sampling_se": figures.auc_sampling_se, "advantage": figures.advantage,
            "epsilon_lower_bound": figures.epsilon_lower_bound, "confidence": figures.confidence,
            "delta": delta, "accounted_epsilon": accounted_epsilon, "members": figures.members,
            "non_members": figures.non_members, "bins": figures.bins,
            "query_epsilon": audit.epsilon, "query_noise_multiplier": audit.noise_multiplier, "charged": True,
            "charge_basis": "the audit query's epsilon was charged to each hospital's privacy ledger before it was "
                            "computed; it is not part of the run's accounted epsilon, and epsilon_with_audit "
                            "composes the two",
            "epsilon_with_audit": with_audit,
            "source": audit.source, "meaning": MEANING, "statement": statement}


def unaudited_section(reason: str, by: str) -> dict[str, Any]:
    """The certificate's `privacy_audit` section of a release approved without an audit."""
    return {"audited": False, "statement": NOT_AUDITED, "reason": reason, "by": by}


def release_section(audit: AuditTable | None, unaudited_reason: str, *, approver: str, model_sha256: str,
                    privacy_report: Mapping[str, Any]) -> dict[str, Any]:
    """The `privacy_audit` section of a new release, or ReleaseRefused (one line): a release without
    an audit and without a reason to go without one, with both, with an audit of another model or
    whose counts carry no DP noise, or whose empirical lower bound exceeds the accounted epsilon
    (the accounting, or its implementation, is then wrong at the stated confidence)."""
    from server.releases.run_artifacts import ReleaseRefused

    if audit is None and not unaudited_reason:
        raise ReleaseRefused("a release needs an empirical privacy audit of its model: run `fedrisk release audit` "
                             "and pass the table it names (--audit), or give the reason to release without one "
                             "(--no-audit REASON; it goes on the certificate)")
    if audit is not None and unaudited_reason:
        raise ReleaseRefused("give a privacy audit (--audit) or a reason to release without one (--no-audit), not both")
    if audit is None:
        return unaudited_section(unaudited_reason, approver)
    if not isinstance(audit, AuditTable):
        raise ReleaseRefused(f"the privacy audit must be an AuditTable naming the model it scored, not "
                             f"{type(audit).__name__}")
    if audit.model_sha256 != model_sha256:
        raise ReleaseRefused(f"the privacy audit scored model {audit.model_sha256[:12]}..., not this run's model "
                             f"{model_sha256[:12]}...")
    if not (pd.to_numeric(audit.table.get("se", pd.Series(dtype=float)), errors="coerce") > 0.0).all() \
            or not audit.noise_multiplier > 0.0:
        raise ReleaseRefused("privacy audit table: a count without a positive se carries no DP noise")
    accounted_epsilon, delta = float(privacy_report["epsilon_max"]), float(privacy_report["delta"])
    try:
        section = certificate_section(audit, accounted_epsilon=accounted_epsilon, delta=delta,
                                      with_audit=epsilon_with_audit(privacy_report, audit))
    except AuditTableError as error:
        raise ReleaseRefused(str(error)) from None
    if section["epsilon_lower_bound"] > accounted_epsilon:
        raise ReleaseRefused(f"the privacy audit's empirical epsilon lower bound {section['epsilon_lower_bound']:.3f} "
                             f"exceeds the accounted epsilon {accounted_epsilon:.3f}: the privacy accounting or its "
                             "implementation is wrong; not released")
    return section


def describe(section: Mapping[str, Any] | None) -> str:
    """One line for the CLI."""
    if not section:
        return "privacy audit: none (certificate issued before audits)"
    if not section.get("audited"):
        return f"privacy audit: {NOT_AUDITED} (waived by {section.get('by')}: {section.get('reason')})"
    auc = "n/a" if section["auc"] is None else f"{section['auc']:.3f}"
    se = f" ± {section['auc_se']:.3f}" if section.get("auc_se") is not None else ""
    return (f"privacy audit (membership inference, {section['source']}): attack AUC {auc}{se}, advantage "
            f"{section['advantage']:.3f}, epsilon lower bound {section['epsilon_lower_bound']:.3f} "
            f"({section['confidence']:.0%}) beside accounted epsilon {section['accounted_epsilon']:.3f}")
