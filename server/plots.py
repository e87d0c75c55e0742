"""PNG plots of what the coordinator already holds: nothing here touches a record or costs budget.

* `training_plot`: a run's DP pooled AUC (± its noise se) and Brier by round, with the largest
  epsilon spent so far; drawn from the run's MLflow metrics when it finishes.
* `calibration_plot`: a release candidate's reliability diagram from its DP evaluation (observed
  rate per score bin, ± se, against the bin's predicted probability, the risk bands shaded).
* `group_auc_plot`: the DP AUC of each age band / sex group with its 95% interval.

Each is written beside the results (`<run>/plots/`, `<evaluation>/plots/`) and logged to the
run's MLflow run under `plots/`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PLOTS_DIR = "plots"
TRAINING_PLOT, CALIBRATION_PLOT, GROUP_AUC_PLOT = "training.png", "calibration.png", "auc_by_group.png"


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display on a server or in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot().close(figure)
    return path


def training_plot(history: Mapping[str, Sequence[tuple[int, float]]], path: Path, title: str = "") -> Path:
    """history: metric name -> [(round, value)] for "auc", "auc_se", "brier" and "epsilon-max"
    (any may be missing). Two panels: AUC (± se) and Brier by round; epsilon spent by round."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    auc = dict(history.get("auc", ()))
    se = dict(history.get("auc_se", ()))
    rounds = sorted(auc)
    left.errorbar(rounds, [auc[r] for r in rounds], yerr=[se.get(r, 0.0) for r in rounds], fmt="o-", capsize=3,
                  label="AUC, pooled DP evaluation (± se of its noise)")
    left.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance (0.5)")
    # a DP estimate can fall outside [0, 1] on a small federation; the axis shows the meaningful range
    left.set(xlabel="round", ylabel="AUC", ylim=(0.0, 1.0), title=title or "DP federated evaluation by round")
    brier = dict(history.get("brier", ()))
    if brier:
        other = left.twinx()
        other.plot(sorted(brier), [brier[r] for r in sorted(brier)], "s--", color="C1", label="Brier (right axis)")
        other.set(ylabel="Brier score", ylim=(0.0, max(0.3, *brier.values())))
        other.legend(loc="lower right", fontsize=8)
    left.legend(loc="upper left", fontsize=8)
    left.grid(True, alpha=0.3)
    epsilon = dict(history.get("epsilon-max", ()))
    every = sorted(set(rounds) | set(brier) | set(epsilon))
    left.set_xticks(every)
    right.plot(sorted(epsilon), [epsilon[r] for r in sorted(epsilon)], "o-", color="C2")
    right.set(xlabel="round", ylabel="epsilon", ylim=(0.0, None), title="largest epsilon spent so far (any hospital)")
    right.set_xticks(every)
    right.grid(True, alpha=0.3)
    return _save(figure, path)


def calibration_plot(summary: Mapping[str, Any], path: Path, title: str = "") -> Path:
    """summary: `server.releases.dp_evaluation.evaluation_from_tables` output. The overall
    reliability diagram with the risk bands of `federation.model.RISK_BANDS` shaded."""
    from federation.model import RISK_BANDS

    plt = pyplot()
    figure, ax = plt.subplots(figsize=(5.5, 5))
    for index, (name, lower, upper) in enumerate(RISK_BANDS):
        ax.axvspan(lower, upper, color=f"C{index}", alpha=0.08)
        ax.text((lower + upper) / 2, 0.97, name, ha="center", va="top", fontsize=8)
    ax.plot([0, 1], [0, 1], color="grey", linewidth=1, label="perfect calibration")
    rows = [r for r in summary["overall"].get("calibration", []) if r.get("observed_rate") is not None]
    ax.errorbar([r["mean_predicted"] for r in rows], [r["observed_rate"] for r in rows],
                yerr=[r.get("se") or 0.0 for r in rows], fmt="o-", capsize=3,
                label="observed rate per score bin (± se of the DP noise)")
    offset = summary["overall"].get("calibration_offset")
    note = "" if offset is None else f"; observed minus predicted {offset:+.3f}"
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted probability (bin midpoint)", ylabel="observed rate",
           title=title or f"Calibration on the DP evaluation{note}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(figure, path)


def group_auc_plot(summary: Mapping[str, Any], path: Path) -> Path | None:
    """The DP AUC of each group (with its 95% interval), one panel per group field that has at
    least two groups; None (nothing written) when no field has two."""
    fields = {name: groups for name, groups in summary.get("groups", {}).items() if len(groups) >= 2}
    if not fields:
        return None
    plt = pyplot()
    figure, axes = plt.subplots(1, len(fields), figsize=(4.5 * len(fields), 3.8), squeeze=False)
    for ax, (name, groups) in zip(axes[0], fields.items()):
        labels = [g for g, s in groups.items() if s.get("auc") is not None]
        values = [groups[g]["auc"] for g in labels]
        low = [v - (groups[g].get("auc_ci95") or [v, v])[0] for g, v in zip(labels, values)]
        high = [(groups[g].get("auc_ci95") or [v, v])[1] - v for g, v in zip(labels, values)]
        ax.errorbar(labels, values, yerr=[low, high], fmt="o", capsize=4)
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set(ylim=(0.4, 1.0), ylabel="AUC (95% interval)", title=f"DP AUC by {name}")
        ax.grid(True, axis="y", alpha=0.3)
    return _save(figure, path)


def log_plots(tracking_uri: str, mlflow_run_id: str, paths: Sequence[Path]) -> None:
    """Log plot files to an MLflow run under `plots/`."""
    from server.tracking import quiet_mlflow

    client = quiet_mlflow().tracking.MlflowClient(tracking_uri)
    for path in paths:
        client.log_artifact(mlflow_run_id, str(path), PLOTS_DIR)
