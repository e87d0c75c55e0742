"""Local evaluation of a model on a hospital's held-out records."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score


def risk_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """AUC (NaN when the split holds one class only), Brier score and log loss."""
    labels = np.asarray(labels).astype(int)
    probabilities = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-7, 1 - 1e-7)
    auc = float(roc_auc_score(labels, probabilities)) if len(np.unique(labels)) == 2 else float("nan")
    return {"auc": auc, "brier": float(brier_score_loss(labels, probabilities)),
            "log-loss": float(log_loss(labels, probabilities, labels=[0, 1]))}
