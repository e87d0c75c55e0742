"""Recalibrating a released model from its DP evaluation: Platt scaling on the noised score histogram.

DP-SGD shifts a model's probabilities: clipping bounds each record's pull, and with a 13% base
rate the positives, whose gradients are larger, are clipped more, so the model under-predicts
(the demo's raw release predicted a mean 0.066 against an observed 0.135). A bank reads the score
as a probability of default, so the release must be recalibrated.

What the fit sees is DP output only: the flooded sum over the hospitals of their noised held-out
score histograms (`federation.round_evaluation`, negatives then positives over `SCORE_BINS`), which
the run has already charged and revealed. Fitting is post-processing and costs no budget. Each bin
stands for its records by its midpoint score; the fit is weighted logistic regression of the label
on that score's logit (Platt scaling, p' = sigmoid(slope * logit(p) + intercept)), with the noised
counts clipped at zero, solved by damped Newton steps (the objective is convex). Midpoints were
measured against the alternative of a normal fitted to the binned logits: on the demo's model,
whose logits are far from normal (median score 0.010, 99th percentile 0.99), the normal's fit left
a calibration-in-the-large of +0.05 where midpoints leave +0.006.

What a two-parameter map cannot do: on the demo's model, Platt scaling fitted on every held-out
record (no binning, no noise) still leaves an expected calibration error of 0.031, because the
trained model's miscalibration is not linear in the logit; the binned DP fit reaches about that.

Platt's map has two properties an isotonic fit lacks: it is strictly increasing (slope > 0 is
required), so the ranking and AUC of the release are those of the trained model; and on a model
whose last layer is linear it is exact to fold into the weights (`calibrated_weights`): the final
layer's weights are scaled by the slope and its bias becomes slope * bias + intercept. A calibrated
release is therefore an ordinary model file, scored by every node and service unchanged.

The fit is refused (`CalibrationError`) when the noise leaves too little to fit: fewer than
`MIN_CLASS_RECORDS` noised records of either class, or a fitted slope that is not positive.

A fit is also declined when the noise makes it a gamble (`calibrate_release` with the noise's
standard deviation): a parametric bootstrap redraws the known Gaussian noise around the revealed
histogram `FIT_BOOTSTRAP_DRAWS` times and refits; the spread of the refitted maps' mean predicted
probability (`mean_se`) is how far the map's correction itself may be off. The map is applied
only when the offset it corrects is at least `MIN_CORRECTION_TO_NOISE` times that spread: on a
small federation (3 hospitals, 1,800 held-out records) the positives' total alone carries noise
of about 60% of itself, and a fitted map moved the calibration-in-the-large from -0.076 to
+0.080. Declined, the model is released as trained and `fedrisk release create` needs an override.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from federation.errors import FedriskError
from federation.model import RISK_BANDS, model_layers, num_parameters, weights_digest
from federation.round_evaluation import BINS, LENGTH, SCORE_BINS

METHOD = "platt (weighted logistic regression on the logit of each bin's midpoint score)"
MIN_CLASS_RECORDS = 50.0
"""Fewest noised records of each class the fit needs (below it, the noise dominates the fit)."""
FIT_BOOTSTRAP_DRAWS = 200
FIT_BOOTSTRAP_SEED = 11  # fixed: the same revealed sum always gives the same decision
MIN_CORRECTION_TO_NOISE = 2.0
"""The map is applied only if |calibration-in-the-large it corrects| >= this x its bootstrap spread."""
_SCORE_FLOOR = 1e-4
_MAX_ITERATIONS = 200


class CalibrationError(FedriskError):
    """A release cannot be calibrated from its DP evaluation (the message says why)."""


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def bin_logits(edges: tuple[float, ...] | np.ndarray = SCORE_BINS) -> np.ndarray:
    """Logit of each bin's midpoint score: the score that stands for the bin's records in the fit."""
    e = np.asarray(edges, dtype=np.float64)
    mid = np.clip((e[:-1] + e[1:]) / 2.0, _SCORE_FLOOR, 1.0 - _SCORE_FLOOR)
    return np.log(mid) - np.log1p(-mid)


@dataclass(frozen=True)
class Calibration:
    """A Platt map fitted on a DP evaluation, and what it left of the miscalibration.

    Attributes:
        slope, intercept: p' = sigmoid(slope * logit(p) + intercept).
        source: the DP output fitted, in words (e.g. "DP evaluation of round 5, 8 hospitals").
        records, positives: noised totals of that evaluation.
        before, after: binned calibration-in-the-large (mean predicted minus observed rate) and
            expected calibration error of the evaluation histogram, before and after the map
            (each bin's records at its midpoint score). In-sample: the release's own check is a
            fresh DP evaluation of the calibrated model (`fedrisk release evaluate`).
        raw_sha256: digest of the model as trained (the hospitals' release) before the map.
    """

    slope: float
    intercept: float
    source: str
    records: float
    positives: float
    before: dict[str, float]
    after: dict[str, float]
    raw_sha256: str = ""
    method: str = METHOD
    problem: str = ""
    """Why the run could not recalibrate (then slope 1, intercept 0: the model as trained)."""
    mean_se: float = 0.0
    """Bootstrap spread of the fitted map's mean predicted probability under the evaluation's
    known DP noise (0: fitted without the noise's size, e.g. a calibration.json from before)."""

    def apply(self, probabilities: np.ndarray) -> np.ndarray:
        """The calibrated probabilities of raw ones."""
        p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0 - 1e-12)
        return _sigmoid(self.slope * (np.log(p) - np.log1p(-p)) + self.intercept)

    def invert(self, calibrated: np.ndarray) -> np.ndarray:
        """The trained model's probabilities behind calibrated ones (the inverse map)."""
        p = np.clip(np.asarray(calibrated, dtype=np.float64), 1e-12, 1.0 - 1e-12)
        return _sigmoid(((np.log(p) - np.log1p(-p)) - self.intercept) / self.slope)

    def to_dict(self) -> dict[str, object]:
        """JSON form (the release's calibration.json, MLflow, the certificate)."""
        return asdict(self)


def _binned_errors(negatives: np.ndarray, positives: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    n = negatives + positives
    total = float(n.sum())
    observed = np.divide(positives, n, out=np.zeros_like(n), where=n > 0)
    return {"calibration_in_the_large": float((n * predicted).sum() / total - positives.sum() / total),
            "ece": float((n * np.abs(observed - predicted)).sum() / total)}


def fit_platt(summed: np.ndarray, *, source: str) -> Calibration:
    """Fit the Platt map on a revealed DP evaluation vector (`LENGTH` noised counts: negatives per
    bin, then positives). Raises CalibrationError when the noise leaves too little to fit."""
    summed = np.asarray(summed, dtype=np.float64)
    if summed.shape != (LENGTH,) or not np.isfinite(summed).all():
        raise CalibrationError(f"a DP evaluation vector has {LENGTH} finite values, got shape {summed.shape}")
    negatives, positives = np.clip(summed[:BINS], 0.0, None), np.clip(summed[BINS:], 0.0, None)
    if positives.sum() < MIN_CLASS_RECORDS or negatives.sum() < MIN_CLASS_RECORDS:
        raise CalibrationError(f"{source}: {positives.sum():.0f} positive and {negatives.sum():.0f} negative noised "
                               f"records; calibration needs at least {MIN_CLASS_RECORDS:.0f} of each")
    z = bin_logits()
    n = negatives + positives
    design = np.stack([z, np.ones_like(z)], axis=1)

    def objective(v: np.ndarray) -> float:  # binned negative log-likelihood
        t = design @ v
        return float((n * np.logaddexp(0.0, t) - positives * t).sum())

    params = np.array([1.0, 0.0])
    for _ in range(_MAX_ITERATIONS):  # damped Newton: the objective is convex
        p = _sigmoid(design @ params)
        gradient = design.T @ (n * p - positives)
        hessian = (design * (n * p * (1.0 - p))[:, None]).T @ design + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        current, scale = objective(params), 1.0
        while objective(params - scale * step) > current + 1e-12 and scale > 1e-6:
            scale /= 2.0
        params = params - scale * step
        if np.max(np.abs(scale * step)) < 1e-10:
            break
    else:
        raise CalibrationError(f"{source}: the calibration fit did not converge")
    slope, intercept = (float(v) for v in params)
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope <= 0.0:
        raise CalibrationError(f"{source}: the fitted calibration slope is {slope:.3g}; a calibration must keep "
                               "the model's ranking (slope > 0)")
    return Calibration(slope=slope, intercept=intercept, source=source, records=float(summed.sum()),
                       positives=float(summed[BINS:].sum()),
                       before=_binned_errors(negatives, positives, _sigmoid(z)),
                       after=_binned_errors(negatives, positives, _sigmoid(slope * z + intercept)))


def calibrated_weights(kind: str, weights: np.ndarray, n_features: int, calibration: Calibration) -> np.ndarray:
    """The flat weights of the model whose output is `calibration` applied to `weights`' output.

    The last layer is nn.Linear(width, 1) and its parameters close the flat vector (its weights,
    then its bias), so scaling them by the slope and adding the intercept to the bias turns the
    logit z into slope * z + intercept exactly."""
    _, hidden = model_layers(kind)
    flat = np.array(weights, dtype=np.float32, copy=True).reshape(-1)
    if flat.size != num_parameters(kind, n_features):
        raise CalibrationError(f"{flat.size} weights do not fit model {kind!r} with {n_features} inputs")
    width = hidden[-1] if hidden else n_features
    last = flat[-(width + 1):].astype(np.float64)
    last *= calibration.slope
    last[-1] += calibration.intercept
    flat[-(width + 1):] = last.astype(np.float32)
    return flat


def fit_spread(summed: np.ndarray, noise_sd: float, *, source: str) -> float:
    """Standard deviation, over a parametric bootstrap of the evaluation's known Gaussian noise
    (each entry redrawn with std `noise_sd`), of the refitted map's mean predicted probability on
    the revealed histogram; infinite when more than a tenth of the refits are refused."""
    summed = np.asarray(summed, dtype=np.float64)
    counts = np.clip(summed[:BINS], 0.0, None) + np.clip(summed[BINS:], 0.0, None)
    if noise_sd <= 0.0 or counts.sum() <= 0.0:
        return 0.0
    z, means, refused = bin_logits(), [], 0
    draws = summed + noise_sd * np.random.default_rng(FIT_BOOTSTRAP_SEED).standard_normal((FIT_BOOTSTRAP_DRAWS, LENGTH))
    for draw in draws:
        try:
            refit = fit_platt(draw, source=source)
        except CalibrationError:
            refused += 1
            continue
        means.append(float((counts * _sigmoid(refit.slope * z + refit.intercept)).sum() / counts.sum()))
    if refused > FIT_BOOTSTRAP_DRAWS // 10 or len(means) < 2:
        return math.inf
    return float(np.std(means))


def calibrate_release(kind: str, weights: np.ndarray, n_features: int, summed: np.ndarray, *,
                      source: str, noise_sd: float = 0.0) -> tuple[np.ndarray, Calibration]:
    """Fit on the revealed DP evaluation and fold the map into the weights: (calibrated, calibration).

    `noise_sd` is the standard deviation of the noise in each entry of `summed` (the square root
    of the hospitals summed, times their evaluation noise multiplier); 0 skips the noise check.
    A fit the noise does not allow, or whose correction is within `MIN_CORRECTION_TO_NOISE` bootstrap
    spreads of nothing, leaves the model as trained with the reason in `problem`: the run still
    finishes, and `fedrisk release create` refuses the model unless overridden."""
    raw = weights_digest(np.asarray(weights, dtype=np.float32))
    try:
        fitted = fit_platt(summed, source=source)
        spread = fit_spread(summed, noise_sd, source=source)
        correction = abs(fitted.before["calibration_in_the_large"] - fitted.after["calibration_in_the_large"])
        if correction < MIN_CORRECTION_TO_NOISE * spread:
            raise CalibrationError(
                f"{source}: the DP noise is too large to calibrate with: the fit would move the mean predicted "
                f"probability by {correction:.4f}, but its own bootstrap spread under the noise is {spread:.4f} "
                f"(needs a correction of at least {MIN_CORRECTION_TO_NOISE:g}x the spread)")
        fitted = Calibration(**{**asdict(fitted), "mean_se": spread})
    except CalibrationError as exc:
        summed = np.asarray(summed, dtype=np.float64)
        return (np.asarray(weights, dtype=np.float32).copy(),
                Calibration(slope=1.0, intercept=0.0, source=source, records=float(summed.sum()),
                            positives=float(summed[BINS:].sum()), before={}, after={}, raw_sha256=raw,
                            problem=str(exc)))
    fitted = Calibration(**{**asdict(fitted), "raw_sha256": raw})
    return calibrated_weights(kind, weights, n_features, fitted), fitted


# --- the release's check: a fresh DP evaluation of the calibrated model ---------------------------

CALIBRATION_TOLERANCE = 0.02
"""Largest |observed minus mean predicted rate| a release may show on its DP evaluation without an
explicit, recorded override (probability units)."""
MIN_BAND_RECORDS = 100.0
"""A band with fewer noised records is reported but not held to its range (the noise dominates)."""


def band_rates(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Each risk band's noised records, positives and observed rate, from a DP evaluation's
    calibration rows (per score bin: bin_low, bin_high, positives, negatives, noised and clipped
    at 0), and whether the observed rate lies inside the band. Bins must not straddle a band edge."""
    out = []
    for name, low, high in RISK_BANDS:
        inside = [r for r in rows if float(r["bin_low"]) >= low - 1e-12 and float(r["bin_high"]) <= high + 1e-12]
        straddle = [r for r in rows if float(r["bin_low"]) < high - 1e-12 and float(r["bin_high"]) > high + 1e-12]
        if straddle:
            raise CalibrationError(f"evaluation bin [{straddle[0]['bin_low']}, {straddle[0]['bin_high']}) straddles "
                                   f"the {name} band's edge {high}")
        positives = sum(float(r["positives"]) for r in inside)
        records = sum(float(r["n"]) for r in inside)
        rate = positives / records if records > 0 else None
        out.append({"band": name, "low": low, "high": high, "records": records, "positives": positives,
                    "observed_rate": rate, "held_to_range": records >= MIN_BAND_RECORDS,
                    "inside": None if rate is None else bool(low <= rate < high or rate == high == 1.0)})
    return out


def release_problems(overall: dict[str, object], calibration: dict[str, object] | None,
                     tolerance: float = CALIBRATION_TOLERANCE) -> list[str]:
    """Why a release's calibration is not good enough to release without an override (empty: it is).

    overall: the DP evaluation summary of the released model (`evaluation_from_tables`'s
    "overall"); calibration: the Platt map the run folded into the model (None: the run did not
    recalibrate)."""
    problems = []
    if not calibration:
        problems.append("the run's model was not recalibrated (no calibration.json in its release)")
    elif calibration.get("problem"):
        problems.append(f"the run's model was not recalibrated: {calibration['problem']}")
    offset = overall.get("calibration_offset")
    if offset is None:
        problems.append("calibration cannot be evaluated: the DP noise leaves the calibration offset undefined")
    elif abs(float(offset)) > tolerance:  # type: ignore[arg-type]
        problems.append(f"calibration offset (observed minus predicted rate) is {float(offset):+.4f}, beyond the "  # type: ignore[arg-type]
                        f"tolerance of {tolerance:g}")
    for band in band_rates(list(overall.get("calibration") or [])):  # type: ignore[arg-type]
        if band["held_to_range"] and band["inside"] is False:
            problems.append(f"{band['band']} band [{band['low']:g}, {band['high']:g}) observes a rate of "
                            f"{band['observed_rate']:.3f}, outside the band")
    return problems
