"""Local evaluation of a model on a hospital's held-out records.

Plain numpy: every message a deployed hospital answers runs in a fresh process, and importing
scikit-learn's metrics (and SciPy behind them) would cost that process about a second."""

from __future__ import annotations

import numpy as np


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the Mann-Whitney probability that a random positive scores
    above a random negative, ties counted as one half. NaN unless both classes are present."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ordered = scores[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(ordered)]
    ranks = np.empty(len(ordered))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # 1-based, ties share their mean rank
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def risk_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """AUC (NaN when the split holds one class only), Brier score and log loss."""
    labels = np.asarray(labels).astype(int)
    probabilities = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-7, 1 - 1e-7)
    log_loss = -np.mean(labels * np.log(probabilities) + (1 - labels) * np.log1p(-probabilities))
    return {"auc": roc_auc(labels, probabilities), "brier": float(np.mean((probabilities - labels) ** 2)),
            "log-loss": float(log_loss)}
