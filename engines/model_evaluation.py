"""DP evaluation of a released model across the hospitals, for its model card.

One cohort query does it: a histogram of the model's `risk_score` over 10 fixed bins, grouped by
age band, sex and the 90-day delinquency label, on each hospital's held-out test split. It is
charged once to every hospital's ledger. Everything the model card shows (calibration, AUC and
their gaps by age band and by sex) is post-processing of that one DP table: `marginal` sums it
into a table per group field, with the noise of the summed cells added in quadrature.

    .venv/bin/fedrisk release evaluate runs/x --nodes runs/x/nodes --keys runs/x/keys --epsilon 0.5
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from engines.analytics import run_query
from federation import features as fx
from federation.config import RunConfig
from federation.model import weights_digest
from federation.query import RISK_SCORE, CohortQuery
from server.analytics import QueryResult
from server.releases.dp_evaluation import RISK_SCORE_BINS

EVALUATION_GROUPS = ("age", "sex")
DEFAULT_EVALUATION_EPSILON = 0.5
DEFAULT_PURPOSE = "credit-risk-research"
POPULATION = "population"
"""The group column of an evaluation of hospitals that share no group field (one group, "all")."""


@dataclass(frozen=True)
class ReleasedModel:
    """A release's model.npz as a scored query needs it: weights, kind, what it reads, its purpose."""

    weights: np.ndarray
    kind: str
    n_features: int
    features: str
    purpose: str

    @property
    def sha256(self) -> str:
        return weights_digest(self.weights)

    @classmethod
    def load(cls, model_file: Path, kind: str = "mlp") -> "ReleasedModel":
        """Read a release's model.npz; files from before `features`/`purpose` were recorded are
        standard-contract models (40 inputs) or schema ones, for the default purpose."""
        from federation.errors import ConfigError
        from federation.features import FEATURE_NAMES

        try:
            with np.load(model_file) as archive:
                weights = np.asarray(archive["weights"])
                kind = str(archive["model"]) if "model" in archive else kind
                n = int(archive["n_features"]) if "n_features" in archive else len(FEATURE_NAMES)
                features = str(archive["features"]) if "features" in archive else \
                    ("standard" if n == len(FEATURE_NAMES) else "schema")
                purpose = str(archive["purpose"]) if "purpose" in archive else DEFAULT_PURPOSE
        except (OSError, KeyError, ValueError):
            raise ConfigError(f"{model_file}: not a fedrisk model.npz") from None
        return cls(weights, kind, n, features, purpose)


def groups_released(nodes_dir: Path, num_hospitals: int, purpose: str) -> tuple[str, ...]:
    """The evaluation's group fields every hospital's schema releases for `purpose` (a breast-cancer
    export has neither age nor sex: its model card then says they were not evaluated)."""
    from engines.provisioning import load_nodes

    states = load_nodes(Path(nodes_dir), num_hospitals)
    targets = [{c.target for c in s.schema().columns
                if c.role in ("feature", "quasi-identifier") and c.allowed_for(purpose)} for s in states]
    return tuple(g for g in EVALUATION_GROUPS if all(g in t for t in targets))


def evaluation_query(sha256: str, kind: str, *, epsilon: float = DEFAULT_EVALUATION_EPSILON,
                     purpose: str = DEFAULT_PURPOSE, name: str = "model-evaluation",
                     features: str = "standard", groups: tuple[str, ...] = EVALUATION_GROUPS) -> CohortQuery:
    """The evaluation query for the model with this SHA-256 and kind."""
    return CohortQuery.from_mapping({
        "name": name, "purpose": purpose, "epsilon": epsilon, "measure": "histogram", "field": RISK_SCORE,
        "bins": list(RISK_SCORE_BINS), "model": {"sha256": sha256, "kind": kind, "features": features},
        "suppress-below": 0, "group-by": [*groups, fx.LABEL]}, source=name)


def marginal(table: pd.DataFrame, group: str) -> pd.DataFrame:
    """The evaluation table summed over every group field but `group` (and the label): columns
    `group`, delinquent_90d_12m, bin_low, bin_high, count, se, suppressed."""
    keys = [group, fx.LABEL, "bin_low", "bin_high"]
    summed = table.assign(var=table["se"] ** 2).groupby(keys, sort=False, as_index=False).agg(
        count=("count", "sum"), var=("var", "sum"))
    return summed.assign(se=np.sqrt(summed["var"]), suppressed=False).drop(columns="var")


def evaluate_model(model_file: Path, *, nodes_dir: Path, keys_dir: Path, run_dir: Path, num_hospitals: int,
                   epsilon: float = DEFAULT_EVALUATION_EPSILON, kind: str = "mlp",
                   tracking_uri: str = "", purpose: str = "") -> tuple[QueryResult, dict[str, pd.DataFrame]]:
    """Run the evaluation query for `model_file` (a release's model.npz) in the simulation engine;
    return its result and the per-group marginal tables, which are also written next to the
    query's own table as `<run-id>.by-<group>.csv`."""
    model = ReleasedModel.load(model_file, kind)
    purpose = purpose or model.purpose
    groups = groups_released(nodes_dir, num_hospitals, purpose)
    query = evaluation_query(model.sha256, model.kind, epsilon=epsilon, purpose=purpose, features=model.features,
                             groups=groups)
    result = run_query(query, nodes_dir=nodes_dir, keys_dir=keys_dir, run_dir=run_dir, num_hospitals=num_hospitals,
                       tracking_uri=tracking_uri, model_file=model_file)
    if groups:
        tables = {group: marginal(result.table, group) for group in groups}
    else:  # no group field at every hospital: the whole population is the one group
        tables = {POPULATION: marginal(result.table.assign(**{POPULATION: "all"}), POPULATION)}
    table_file = Path(result.files[0])
    for group, frame in tables.items():
        frame.to_csv(table_file.with_name(f"{table_file.stem}.by-{group}.csv"), index=False)
    evaluation_plots(tables, Path(run_dir), RunConfig(run_dir=str(run_dir), tracking_uri=tracking_uri).mlflow_uri,
                     result.mlflow_run_id)
    return result, tables


def evaluation_plots(tables: dict[str, pd.DataFrame], run_dir: Path, tracking_uri: str,
                     mlflow_run_id: str) -> list[Path]:
    """`<run_dir>/plots/calibration.png` and (with a group field of two or more groups)
    `auc_by_group.png`, post-processing of the DP tables; logged to the evaluation's MLflow run."""
    from server.plots import CALIBRATION_PLOT, GROUP_AUC_PLOT, PLOTS_DIR, calibration_plot, group_auc_plot, log_plots
    from server.releases.dp_evaluation import evaluation_from_tables

    summary = evaluation_from_tables(tables)
    plots = [calibration_plot(summary, run_dir / PLOTS_DIR / CALIBRATION_PLOT)]
    grouped = group_auc_plot(summary, run_dir / PLOTS_DIR / GROUP_AUC_PLOT)
    plots += [grouped] if grouped else []
    if mlflow_run_id:
        log_plots(tracking_uri, mlflow_run_id, plots)
    return plots
