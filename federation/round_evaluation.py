"""DP federated evaluation of a round's model: a noised score histogram per hospital, metrics from the sum.

What a hospital releases each round is `noised_evaluation`: the histogram of its held-out
records' model scores over the public bins `SCORE_BINS`, one histogram per label, plus Gaussian
noise. Adding or removing one patient adds or removes 1 in exactly one entry (the bin of his score,
in his label's histogram), so the vector's L2 sensitivity is 1 and noise of standard deviation z
per entry is the Gaussian mechanism with noise multiplier z. The exact metrics it replaces (AUC,
Brier score, log loss per hospital, weighted and summed) were uncharged and repeatable: evaluating
one model before and after one patient's consent revocation gave that patient's label and score.

Everything the server computes from the sum over hospitals (`metrics_from_noised`) is
post-processing and costs nothing more: the AUC of the binned ROC (`binned_auc`), the Brier score
and log loss with each bin's records taken as spread evenly over the bin, the noised record and
positive counts, and standard errors from a parametric bootstrap of the known noise.

Brier score and log loss come from the histogram rather than from clamped per-record sums of
their own. Extra sums would share the unit L2 sensitivity with the histogram: giving a Brier sum
a third of it (squared) raises the histogram's noise, and the AUC's error, by 22%, to bring the
Brier score's noise from 0.003 to 0.002 (40,000 records in 8 hospitals at the recommended noise,
see tests/test_round_evaluation.py); a log-loss sum would need a clamp as well. The price is a
binning bias: each bin's records are taken as spread evenly over it, which is off by how uneven
the density is inside a bin (Brier +0.0006, log loss +0.003 on the test's 13%-base-rate model)
and caps how overconfident a log loss can look (a positive scored 1e-6 counts as one scored
evenly in [0, 0.02]).

Recommended budget: the evaluation's own share of a run's purpose, e.g. epsilon 0.5 at delta
1e-5 over 5 rounds: `evaluation_noise_multiplier(0.5, 1e-5, releases=5)` = 15.75 (PLD; RDP needed
17.19), each round's release alone epsilon 0.21. On the test's 40,000 records in 8 hospitals
that gives AUC within 0.012 (RMS; 0.023 at the 95th percentile) and Brier within 0.003 (RMS) of
the exact values (measured at z = 17.19; the smaller z only narrows them).

Layout of the vector (length `LENGTH`, record units): the negatives' (label 0) counts per bin, in
bin order, then the positives' (label 1). The caller scales it into the CKKS slot range and adds
the contributor slot; the noise seed must come from a node secret and the records' digest, so
that neighbouring record sets never share noise (identical noise on both would cancel in their
difference) and a retried release of the same records is the same vector (nothing new learnt).
"""

from __future__ import annotations

import math
import numbers
from functools import lru_cache
from pathlib import Path

import numpy as np

from federation.errors import ConfigError
from privacy.accounting import GaussianMechanism, remembered

SCORE_BINS: tuple[float, ...] = (0.0, 0.02, 0.04, 0.06, 0.08, 0.10, 0.13, 0.16, 0.20, 0.25, 0.30,
                                 0.40, 0.50, 0.70, 1.0)
"""Public, fixed bin edges of a model's score (probability of 90-day delinquency) over [0, 1].

Credit-risk scores concentrate at low values (a base rate near 13% puts the median score near 0.07
and 90% of records below 0.3), and a binned AUC loses exactly the ordering inside a bin, so bins
are 0.02 wide up to 0.1 and widen to 0.3 above 0.7 where few records fall. On the test's model
(base rate 13%, AUC 0.80) the noise-free binned AUC is 0.002 below the exact one; ten bins of
0.1 lose 0.026 (both checked in tests/test_round_evaluation.py). Each bin adds noise to the AUC,
but a bin that few records fall into adds little: in trials on that model, ten coarser bins
(0, .02, .04, .07, .1, .15, .2, .3, .5, .7, 1) cut the AUC's noise by about 5% and doubled its
binning bias. Fixed in advance, never taken from the data, so the bins themselves reveal nothing."""
BINS = len(SCORE_BINS) - 1
LENGTH = 2 * BINS
"""Length of one hospital's evaluation vector: negatives per bin, then positives per bin."""
BOOTSTRAP_DRAWS = 1000
BOOTSTRAP_SEED = 7  # fixed: the same revealed sum always gives the same standard errors
MAX_NOISE_MULTIPLIER = 1e4

_EDGES = np.array(SCORE_BINS)
_LOW, _HIGH = _EDGES[:-1], _EDGES[1:]


class EvaluationParameterError(ConfigError):
    """A parameter of a DP round evaluation is out of range (the message names it)."""


def _xlogx(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)


def _bin_losses() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per bin, the mean Brier term and log loss of a negative and of a positive whose score is
    spread evenly over the bin: Brier (s - y)^2 averages to (m - y)^2 + w^2 / 12 (midpoint m, width
    w); log loss -log s (or -log(1 - s)) integrates in closed form (x log x - x)."""
    mid, width = (_LOW + _HIGH) / 2.0, _HIGH - _LOW
    brier_neg, brier_pos = mid ** 2 + width ** 2 / 12.0, (1.0 - mid) ** 2 + width ** 2 / 12.0
    loss_pos = -((_xlogx(_HIGH) - _HIGH) - (_xlogx(_LOW) - _LOW)) / width
    loss_neg = -((_xlogx(1.0 - _LOW) - (1.0 - _LOW)) - (_xlogx(1.0 - _HIGH) - (1.0 - _HIGH))) / width
    return brier_neg, brier_pos, loss_neg, loss_pos


_BRIER_NEG, _BRIER_POS, _LOSS_NEG, _LOSS_POS = _bin_losses()
_BRIER_WEIGHTS = np.concatenate([_BRIER_NEG, _BRIER_POS])
_LOSS_WEIGHTS = np.concatenate([_LOSS_NEG, _LOSS_POS])


def _real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise EvaluationParameterError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise EvaluationParameterError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def evaluation_noise_multiplier(epsilon: float, delta: float, releases: int = 1) -> float:
    """The noise multiplier z for `releases` evaluation releases costing at most `epsilon` at `delta`.

    z is found by bisection so that `releases` Gaussian releases at L2 sensitivity 1 and noise std
    z, composed as the ledger composes them (`GaussianMechanism.gaussian_release(noise_multiplier=z,
    count=releases).epsilon(delta)`, PLD), spend between 99.5% and 100% of `epsilon`: the ledger
    never refuses a charge it was calibrated for, and no more noise is added than needed.
    Calibrate once for the run's evaluation budget and its rounds (releases = rounds); each round
    is then charged `gaussian_release(noise_multiplier=z)`. Cached per (epsilon, delta, releases).
    """
    epsilon, delta = _real(epsilon, "epsilon"), _real(delta, "delta")
    if epsilon <= 0.0:
        raise EvaluationParameterError(f"epsilon must be > 0, got {epsilon!r}")
    if not 0.0 < delta < 1.0:
        raise EvaluationParameterError(f"delta must be in (0, 1), got {delta!r}")
    return _calibrated(epsilon, delta, _count(releases, "releases"))


def remembered_evaluation_noise(cache: Path, epsilon: float, delta: float, releases: int = 1) -> float:
    """`evaluation_noise_multiplier`, remembered in the JSON file `cache` for the next process
    (`privacy.accounting.remembered`): a remembered z is used only if its releases spend between
    99.5% and 100% of `epsilon` (what the bisection guarantees; two evaluations, not fourteen)."""
    def usable(z: float) -> bool:
        return 0.995 * epsilon <= _spent(z, releases, delta) <= epsilon

    return remembered(cache, ["evaluation", epsilon, delta, releases], usable=usable,
                      compute=lambda: evaluation_noise_multiplier(epsilon, delta, releases))


def _spent(z: float, releases: int, delta: float) -> float:
    return GaussianMechanism.gaussian_release(noise_multiplier=z, count=releases).epsilon(delta)


@lru_cache(maxsize=256)
def _calibrated(epsilon: float, delta: float, releases: int) -> float:
    def spent(z: float) -> float:
        return _spent(z, releases, delta)

    low, high = 0.0, 1.0
    while spent(high) > epsilon:  # epsilon falls as z grows: find a z that meets the target
        low, high = high, high * 2.0
        if high > MAX_NOISE_MULTIPLIER:
            raise EvaluationParameterError(
                f"epsilon {epsilon:g} over {releases} release(s) at delta {delta:g} needs a noise multiplier "
                f"above {MAX_NOISE_MULTIPLIER:g}; raise epsilon")
    at_high = spent(high)
    while at_high < 0.995 * epsilon and high - low > 1e-9 * high:  # invariant: spent(high) <= epsilon
        mid = (low + high) / 2.0
        at_mid = spent(mid)
        if at_mid > epsilon:
            low = mid
        else:
            high, at_high = mid, at_mid
    return high


def _records(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(labels), np.asarray(probabilities, dtype=np.float64)
    if labels.ndim != 1 or scores.shape != labels.shape:
        raise EvaluationParameterError(f"labels and probabilities must be 1-d of one length, got shapes "
                                       f"{labels.shape} and {scores.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise EvaluationParameterError("labels must be 0 or 1 (delinquent_90d_12m)")
    if not np.isfinite(scores).all():
        raise EvaluationParameterError("probabilities must be finite (a model returned NaN or inf)")
    return labels.astype(bool), np.clip(scores, 0.0, 1.0)


def score_histogram(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """The exact evaluation vector (float64, `LENGTH`): records per score bin, negatives then positives.

    Each record adds 1 to the bin of its score (clamped into [0, 1]; bin b holds [e_b, e_b+1), the
    last bin includes 1) in its label's histogram, so one record moves the vector by L2 = 1. Never
    released as it is: `noised_evaluation` is what leaves a hospital."""
    positive, scores = _records(labels, probabilities)
    bins = np.clip(np.searchsorted(_EDGES, scores, side="right") - 1, 0, BINS - 1)
    return np.bincount(bins + BINS * positive, minlength=LENGTH).astype(np.float64)


def noised_evaluation(labels: np.ndarray, probabilities: np.ndarray, *, noise_multiplier: float,
                      seed: int) -> np.ndarray:
    """One hospital's DP evaluation release: `score_histogram` plus Gaussian noise of std
    `noise_multiplier` per entry (the Gaussian mechanism at L2 sensitivity 1).

    seed: seeds the noise (numpy's default Generator); derive it from a node secret and the
    records' digest (see the module docstring). The same records and seed give the same vector."""
    z = _real(noise_multiplier, "noise_multiplier")
    if not 0.0 < z <= MAX_NOISE_MULTIPLIER:
        raise EvaluationParameterError(f"noise_multiplier must be in (0, {MAX_NOISE_MULTIPLIER:g}], got {z!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or int(seed) < 0:
        raise EvaluationParameterError(f"seed must be a non-negative integer, got {seed!r}")
    exact = score_histogram(labels, probabilities)
    return exact + z * np.random.default_rng(int(seed)).standard_normal(LENGTH)


def binned_auc(positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC over ordered score bins (last axis): a positive beats every negative in a
    lower bin and ties half of those in its own bin. NaN when a class total is not positive.

    Fed the noised counts as released, negative ones included: numerator and denominator are then
    unbiased (the two classes' noise is independent), while clipping counts at zero would add
    mass to empty bins and pull the AUC toward 0.5, most in small groups."""
    positives, negatives = np.asarray(positives, dtype=np.float64), np.asarray(negatives, dtype=np.float64)
    below = np.cumsum(negatives, axis=-1) - negatives
    wins = (positives * (below + 0.5 * negatives)).sum(axis=-1)
    pos_total, neg_total = positives.sum(axis=-1), negatives.sum(axis=-1)
    defined = (pos_total > 0) & (neg_total > 0)
    auc = np.divide(wins, pos_total * neg_total, out=np.full(np.shape(wins), np.nan), where=defined)
    return np.clip(auc, 0.0, 1.0)


def _metrics(vectors: np.ndarray) -> dict[str, np.ndarray]:
    """AUC, Brier score and log loss of summed vectors (last axis), from the counts as released."""
    negatives, positives = vectors[..., :BINS], vectors[..., BINS:]
    records = vectors.sum(axis=-1)
    defined = records > 0
    nan = np.full(np.shape(records), np.nan)
    brier = np.divide(vectors @ _BRIER_WEIGHTS, records, out=nan.copy(), where=defined)
    loss = np.divide(vectors @ _LOSS_WEIGHTS, records, out=nan.copy(), where=defined)
    return {AUC: binned_auc(positives, negatives), BRIER: np.clip(brier, 0.0, 1.0),
            LOG_LOSS: np.clip(loss, 0.0, None)}


AUC, BRIER, LOG_LOSS = "auc", "brier", "log-loss"
"""The metrics a DP evaluation round yields (each also as `<name>` + `SE_SUFFIX`)."""
SE_SUFFIX = "_se"
RECORDS, POSITIVES = "records", "positives"


def metrics_from_noised(summed: np.ndarray, *, noise_multiplier: float, hospitals: int) -> dict[str, float]:
    """The round's metrics from the sum over `hospitals` of their `noised_evaluation` vectors.

    Returns "auc" (binned Mann-Whitney, NaN when a noised class total is <= 0), "brier" and
    "log-loss" (each bin's records spread evenly over it; NaN when the noised record count is
    <= 0), "records" and "positives" (noised counts), and "auc_se", "brier_se", "log-loss_se":
    the standard deviation of the metric over a parametric bootstrap of the known noise (each entry
    redrawn with std sqrt(hospitals) * noise_multiplier, `BOOTSTRAP_DRAWS` draws, fixed seed; NaN
    when the metric is). They cover the DP noise only: not the binning, nor the sampling
    variation of the evaluation cohort. Pure post-processing of DP output: no privacy cost."""
    summed = np.asarray(summed, dtype=np.float64)
    if summed.shape != (LENGTH,) or not np.isfinite(summed).all():
        raise EvaluationParameterError(f"summed must be {LENGTH} finite values, got shape {summed.shape}")
    z = _real(noise_multiplier, "noise_multiplier")
    if not 0.0 <= z <= MAX_NOISE_MULTIPLIER:
        raise EvaluationParameterError(f"noise_multiplier must be in [0, {MAX_NOISE_MULTIPLIER:g}], got {z!r}")
    sd = math.sqrt(_count(hospitals, "hospitals")) * z
    point = _metrics(summed)
    draws = _metrics(summed + sd * np.random.default_rng(BOOTSTRAP_SEED).standard_normal((BOOTSTRAP_DRAWS, LENGTH)))
    out = {name: float(value) for name, value in point.items()}
    for name, values in draws.items():
        finite = values[np.isfinite(values)]
        out[f"{name}{SE_SUFFIX}"] = float(finite.std()) if math.isfinite(out[name]) and finite.size >= 2 else math.nan
    out[RECORDS], out[POSITIVES] = float(summed.sum()), float(summed[BINS:].sum())
    return out
