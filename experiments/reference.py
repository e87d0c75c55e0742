"""Reference points for a federated run, computed by experiments only (never by the federated
path): a centralized non-private model on pooled data, and the oracle that knows true risk.

All three AUCs a demo prints (federated, centralized, oracle) are measured the same way: the
AUC on each hospital's local test split, weighted by the split's size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from clients.data import HospitalData
from clients.deidentify import PSEUDONYM
from clients.evaluation import risk_metrics
from clients.node_state import NodeState, test_split
from federation import features as fx
from federation.model import RISK_BANDS, build_model, predict_proba


def weighted_auc(parts: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean of per-hospital AUCs weighted by test-split size (as federated evaluation does)."""
    aucs, weights = [], []
    for labels, scores in parts:
        auc = risk_metrics(labels, scores)["auc"]
        if not np.isnan(auc):
            aucs.append(auc)
            weights.append(len(labels))
    return float(np.average(aucs, weights=weights))


ECE_BINS = 10
"""Equal-width probability bins of the demo's expected calibration error."""


def calibration_reference(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Demo-only references of a scorer on pooled held-out records: `auc_pooled` (one AUC over all
    records), `calibration_in_the_large` (mean predicted minus observed rate) and `ece` (expected
    calibration error over `ECE_BINS` equal-width bins: the record-weighted mean of
    |observed rate - mean predicted| per bin)."""
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    bins = np.minimum((scores * ECE_BINS).astype(int), ECE_BINS - 1)
    predicted = np.bincount(bins, weights=scores, minlength=ECE_BINS)
    observed = np.bincount(bins, weights=labels, minlength=ECE_BINS)
    ece = float(np.abs(observed - predicted).sum() / len(labels))
    return {"auc_pooled": risk_metrics(labels, scores)["auc"],
            "calibration_in_the_large": float(scores.mean() - labels.mean()), "ece": ece}


def band_reference(labels: np.ndarray, scores: np.ndarray) -> dict[str, dict[str, float]]:
    """Per risk band of the scoring service (on the probability as a node returns it, rounded):
    share of records, mean predicted and observed rate. Demo-only, on pooled held-out records."""
    from clients.scoring import risk_band, round_probability

    bands = np.array([risk_band(round_probability(p)) for p in scores])
    out = {}
    for band, _, _ in RISK_BANDS:
        mask = bands == band
        out[band] = {"share": float(mask.mean()),
                     "mean_predicted": float(scores[mask].mean()) if mask.any() else None,
                     "observed_rate": float(np.asarray(labels)[mask].mean()) if mask.any() else None}
    return out


def centralized_auc(hospitals: list[HospitalData], model_kind: str, epochs: int = 8,
                    batch_size: int = 512, seed: int = 0) -> float:
    """Train the same model family without DP on all hospitals' pooled training splits."""
    torch.manual_seed(seed)
    x = torch.as_tensor(np.concatenate([h.train_x for h in hospitals]))
    y = torch.as_tensor(np.concatenate([h.train_y for h in hospitals]))
    model = build_model(model_kind, x.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            index = order[start:start + batch_size]
            optimizer.zero_grad()
            loss_fn(model(x[index]).squeeze(-1), y[index]).backward()
            optimizer.step()
    return weighted_auc([(h.test_y, predict_proba(model, h.test_x)) for h in hospitals])


def oracle_auc(nodes: list[NodeState], truth_file: Path, purpose: str) -> float:
    """AUC of the generator's true risk on the same test records the models are scored on
    (simulation only: the demo holds every hospital's file and the ground truth)."""
    truth = pd.read_parquet(truth_file, columns=[fx.RECORD_KEY, "true_risk"]).set_index(fx.RECORD_KEY)["true_risk"]
    parts = []
    for state in nodes:
        clean, mask, _ = state.usable(purpose)
        raw = pd.read_parquet(state.data_file, columns=[fx.RECORD_KEY, fx.LABEL])
        keys = raw[fx.RECORD_KEY].to_numpy()[mask]
        labels = raw[fx.LABEL].to_numpy()[mask]
        is_test = test_split(clean[PSEUDONYM][mask].reset_index(drop=True))
        parts.append((labels[is_test], truth.loc[keys[is_test]].to_numpy()))
    return weighted_auc(parts)


def pooled(hospitals: list[HospitalData]) -> HospitalData:
    """All hospitals' training records as one table (demo reference computations only)."""
    x = np.concatenate([h.train_x for h in hospitals])
    y = np.concatenate([h.train_y for h in hospitals])
    return HospitalData("pooled", x, y, x[:0], y[:0])


def load_all(nodes: list[NodeState], purpose: str) -> list[HospitalData]:
    """Every hospital's consented, encoded records (simulation only: one machine holds all)."""
    return [state.load_records(purpose) for state in nodes]
