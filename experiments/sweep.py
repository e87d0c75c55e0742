"""Privacy-utility sweep: epsilon x model on the synthetic and the breast-cancer federations.

What it measures: for every federation, model family and epsilon (per hospital, the whole run:
DP-SGD plus the run's DP evaluations), one federated run in Flower's simulation engine (DP-SGD,
CKKS aggregation, recalibration from the last round's DP evaluation), and what its released
model is worth:

* `auc_dp_pooled` (± `auc_dp_pooled_se`): the AUC the coordinator itself sees, from the pooled,
  noised score histogram of the last round's DP evaluation (DP output, charged to the ledgers);
* `auc_weighted_mean`: the released model's AUC on each hospital's held-out records, weighted
  by their number (demo-only reference: the sweep plays every hospital);
* `auc_pooled`, `calibration_in_the_large` (mean predicted minus observed rate) and `ece`
  (10 equal-width bins) of the released, recalibrated model on all held-out records pooled
  (demo-only references, `experiments.reference.calibration_reference`);
* `citl_uncalibrated`: the calibration in the large of the model as trained, before the run's
  Platt map (the map inverted on the released scores);
* `auc_centralized`: the same model family trained without DP on the pooled training records,
  scored like `auc_weighted_mean` (computed once per federation and model);
* `epsilon_run_min` / `epsilon_run_max`: the hospitals' run epsilons as their accountants
  reported them; `wall_seconds`: the run's training wall time.

How: each federation's exports, CKKS key and hospital nodes are made once, in a work directory
(default `runs/sweep/<timestamp>`, not committed). Each node is provisioned with one budget for
the whole sweep: the sum of every run's target epsilon (models x sum of epsilons), times 1.001.
Every run is an MLflow run of the one experiment `fedrisk-sweep` (SQLite store
`<work>/mlflow.db` unless `--tracking-uri` is given), with params `federation`, `model` and
`epsilon` and the reference metrics above logged onto it.

The federations: `synthetic` is `experiments.synthetic` (`--hospitals`, `--patients`, delta 1e-6,
the 40-input standard features, sample rate 0.01, the default learning rate: 0.005 when the results in
`experiments/results/sweep/` were measured, 0.01 since); `breast-cancer` is
`experiments.breast_cancer` (569 patients over 3 hospitals, 30 schema features, delta 2e-4,
sample rate 0.05, learning rate 0.02, as its own test runs it). Both run `--rounds` rounds.

Rerun:

    .venv/bin/python -m experiments.sweep [--epsilons 0.25,0.5,1,2,4,8] [--models logreg,mlp]
        [--federations synthetic,breast-cancer] [--hospitals 4] [--patients 40000] [--rounds 3]
        [--out experiments/results/sweep] [--work runs/sweep/<timestamp>] [--tracking-uri URI]

Writes `table.csv`, `table.md`, `reliability.csv`, `auc_vs_epsilon.png` and one
`calibration_<federation>.png` per federation to `--out`, which must be new or empty.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, TextIO

import numpy as np
import pandas as pd

from federation.config import RunConfig, model_layers
from federation.errors import FedriskError

EXPERIMENT = "fedrisk-sweep"
EPSILONS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
MODELS: tuple[str, ...] = ("logreg", "mlp")
FEDERATIONS: tuple[str, ...] = ("synthetic", "breast-cancer")
BUDGET_MARGIN = 1.001
"""Each node's budget is the sweep's total planned epsilon times this (rounding headroom only)."""
RELIABILITY_BINS = 10
RELIABILITY_MIN_RECORDS = 20
"""A reliability diagram leaves out bins with fewer held-out records (reliability.csv keeps them)."""
CENTRALIZED_STEPS = 2_000
"""Fewest Adam steps the centralized non-private reference trains for."""
EXIT_USER_ERROR = 2

COLUMNS: dict[str, str] = {
    "federation": "federation (synthetic or breast-cancer)",
    "model": "model family",
    "epsilon": "target epsilon per hospital, whole run (DP-SGD + DP evaluations)",
    "epsilon_run_min": "smallest run epsilon a hospital's accountant reported",
    "epsilon_run_max": "largest run epsilon a hospital's accountant reported (the release's epsilon)",
    "auc_dp_pooled": "AUC, pooled DP evaluation histogram of the last round (what the coordinator sees)",
    "auc_dp_pooled_se": "its standard error (DP noise)",
    "auc_weighted_mean": "AUC of the released model, per-hospital held-out records, weighted mean (demo-only reference)",
    "auc_pooled": "AUC of the released model on all held-out records pooled (demo-only reference)",
    "auc_centralized": "AUC of the same model family trained without DP on pooled records, per-hospital weighted mean",
    "calibration_in_the_large": "released (recalibrated) model: mean predicted minus observed rate, pooled held-out",
    "citl_uncalibrated": "the same for the model as trained, before the run's Platt map",
    "ece": "released model's expected calibration error, 10 equal-width bins, pooled held-out",
    "calibration_slope": "slope of the run's Platt map",
    "calibration_intercept": "intercept of the run's Platt map",
    "calibration_problem": "why the run could not recalibrate (empty: it did)",
    "wall_seconds": "training wall time of the run (simulate)",
    "mlflow_run_id": "the run in MLflow experiment fedrisk-sweep",
}
"""The table's columns, in order, with what each means (written above the Markdown table)."""


class SweepArgumentError(FedriskError):
    """A sweep argument is out of range (the message names it)."""


@dataclass
class Federation:
    """One federation, ready for runs: its nodes, the config every run shares and the held-out
    records (simulation only: the sweep plays every hospital)."""

    name: str
    base: RunConfig
    held_out: list[Any]
    centralized: dict[str, float] = field(default_factory=dict)
    centralized_batch: int = 512

    @property
    def centralized_epochs(self) -> int:
        """Epochs of the centralized reference: at least 8, and enough for CENTRALIZED_STEPS Adam
        steps (the reference's default 8 epochs of batch 512 underfit a small federation)."""
        records = sum(len(h.train_y) for h in self.held_out)
        return max(8, math.ceil(CENTRALIZED_STEPS / math.ceil(records / self.centralized_batch)))


# --- arguments --------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse prints usage too)
        print(f"sweep: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def _float_list(name: str, text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise SweepArgumentError(f"--{name} must be comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise SweepArgumentError(f"--{name} must be positive finite numbers, got {text!r}")
    if len(set(values)) != len(values):
        raise SweepArgumentError(f"--{name} repeats a value: {text!r}")
    return tuple(sorted(values))


def _name_list(name: str, text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(","))
    if not all(values):
        raise SweepArgumentError(f"--{name} has an empty entry: {text!r}")
    if len(set(values)) != len(values):
        raise SweepArgumentError(f"--{name} repeats a value: {text!r}")
    return values


def _empty_or_new(name: str, path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise SweepArgumentError(f"--{name} {path} already holds files; choose a new directory")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check every argument; a bad one raises SweepArgumentError (or exits 2 from argparse)."""
    parser = _Parser(prog="python -m experiments.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", default=",".join(f"{e:g}" for e in EPSILONS),
                        help="target epsilons per hospital (default 0.25,0.5,1,2,4,8)")
    parser.add_argument("--models", default=",".join(MODELS), help="model families (default logreg,mlp)")
    parser.add_argument("--federations", default=",".join(FEDERATIONS),
                        help="federations (default synthetic,breast-cancer)")
    parser.add_argument("--hospitals", type=int, default=4, help="synthetic hospitals (default 4)")
    parser.add_argument("--patients", type=int, default=40_000, help="synthetic patients in all (default 40000)")
    parser.add_argument("--rounds", type=int, default=3, help="federated rounds per run (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="data, model and sampler seed (default 0)")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/sweep"),
                        help="table and plots (must be new or empty)")
    parser.add_argument("--work", type=Path, default=None,
                        help="data, keys, nodes, run directories, MLflow store (default runs/sweep/<timestamp>)")
    parser.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default SQLite in --work)")
    args = parser.parse_args(argv)
    args.epsilons = _float_list("epsilons", args.epsilons)
    args.models = _name_list("models", args.models)
    for model in args.models:
        try:
            model_layers(model)
        except FedriskError as exc:
            raise SweepArgumentError(f"--models: {exc}") from None
    args.federations = _name_list("federations", args.federations)
    for name in args.federations:
        if name not in FEDERATIONS:
            raise SweepArgumentError(f"--federations: unknown federation {name!r} (known: {', '.join(FEDERATIONS)})")
    if args.rounds < 1:
        raise SweepArgumentError(f"--rounds must be at least 1, got {args.rounds}")
    if args.seed < 0:
        raise SweepArgumentError(f"--seed must be non-negative, got {args.seed}")
    if "synthetic" in args.federations:
        if args.hospitals < 2:
            raise SweepArgumentError(f"--hospitals must be at least 2 (an aggregate needs two contributors), "
                                     f"got {args.hospitals}")
        from experiments.synthetic import SynthesisError, _check_parameters

        try:
            _check_parameters(args.hospitals, args.patients, args.seed)
        except SynthesisError as exc:
            flag = next((f for f in ("hospitals", "patients") if str(exc).startswith(f)), "patients")
            raise SweepArgumentError(f"--{flag}: {exc}") from None
    for epsilon in args.epsilons:  # the run config's own checks (e.g. evaluation epsilon)
        try:
            RunConfig(target_epsilon=epsilon, rounds=args.rounds, model=args.models[0])
        except FedriskError as exc:
            raise SweepArgumentError(f"--epsilons {epsilon:g}: {exc}") from None
    _empty_or_new("out", args.out)
    args.work = args.work or Path("runs") / "sweep" / datetime.now().strftime("%Y%m%d-%H%M%S")
    _empty_or_new("work", args.work)
    if args.out.resolve() == args.work.resolve():
        raise SweepArgumentError("--out and --work must be different directories")
    return args


def sweep_budget(epsilons: Sequence[float], models: Sequence[str]) -> float:
    """Epsilon each node is provisioned with: every run of the sweep on it, with rounding headroom."""
    return len(models) * float(sum(epsilons)) * BUDGET_MARGIN


# --- federations ------------------------------------------------------------------------------------

def build_synthetic(work: Path, args: argparse.Namespace, budget: float) -> Federation:
    """Synthetic exports, one CKKS key and provisioned nodes under `work`."""
    from engines.provisioning import provision_nodes
    from experiments import reference
    from experiments.synthetic import synthesize
    from federation.he_codec import init_keys

    base = RunConfig(data_dir=str(work / "data"), keys_dir=str(work / "keys"), nodes_dir=str(work / "nodes"),
                     run_dir=str(work / "runs"), num_hospitals=args.hospitals, rounds=args.rounds, delta=1e-6,
                     seed=args.seed, min_contributors=2, provision_budget=budget, experiment=EXPERIMENT)
    synthesize(args.hospitals, args.patients, work / "data", seed=args.seed)
    keys = init_keys(work / "keys")
    nodes = provision_nodes(work / "data", keys.hospital_context, work / "nodes",
                            purposes={base.purpose: (budget, base.delta)})
    return Federation("synthetic", base, reference.load_all(nodes, base.purpose))


def build_breast_cancer(work: Path, args: argparse.Namespace, budget: float) -> Federation:
    """The breast-cancer exports and schema, one CKKS key and provisioned nodes under `work`."""
    from engines.provisioning import provision_nodes
    from experiments.breast_cancer import PURPOSE, export_breast_cancer
    from federation.he_codec import init_keys

    files, schema = export_breast_cancer(work / "data", hospitals=3, seed=args.seed)
    base = RunConfig(data_dir=str(work / "data"), schema_file=str(schema), keys_dir=str(work / "keys"),
                     nodes_dir=str(work / "nodes"), run_dir=str(work / "runs"), num_hospitals=len(files),
                     rounds=args.rounds, features="schema", n_features=30, purpose=PURPOSE, sample_rate=0.05,
                     delta=2e-4, learning_rate=0.02, seed=args.seed, min_contributors=2,
                     provision_budget=budget, experiment=EXPERIMENT)
    keys = init_keys(work / "keys")
    nodes = provision_nodes(work / "data", keys.hospital_context, work / "nodes",
                            purposes={PURPOSE: (budget, base.delta)}, schema_file=schema)
    held_out = [state.load_records(PURPOSE, features="schema") for state in nodes]
    return Federation("breast-cancer", base, held_out, centralized_batch=32)


BUILDERS = {"synthetic": build_synthetic, "breast-cancer": build_breast_cancer}


# --- one run ----------------------------------------------------------------------------------------

def reliability(labels: np.ndarray, scores: np.ndarray, bins: int = RELIABILITY_BINS) -> pd.DataFrame:
    """Per equal-width probability bin: records, mean predicted and observed rate (NaN if empty)."""
    scores = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    labels = np.asarray(labels, dtype=np.float64)
    index = np.minimum((scores * bins).astype(int), bins - 1)
    n = np.bincount(index, minlength=bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        predicted = np.bincount(index, weights=scores, minlength=bins) / n
        observed = np.bincount(index, weights=labels, minlength=bins) / n
    return pd.DataFrame({"bin": np.arange(bins), "bin_low": np.arange(bins) / bins, "records": n,
                         "mean_predicted": predicted, "observed_rate": observed})


def run_one(federation: Federation, model: str, epsilon: float, tracking_uri: str,
            stream: TextIO) -> tuple[dict[str, Any], pd.DataFrame]:
    """One federated run and its references: (table row, reliability rows)."""
    from engines.simulation import simulate
    from experiments import reference
    from federation.model import load_model, predict_proba
    from federation.round_evaluation import AUC, SE_SUFFIX
    from server.calibration import Calibration
    from server.tracking import quiet_mlflow

    name = f"{federation.name}-{model.replace(':', '_').replace(',', '_')}-e{epsilon:g}"
    base = federation.base
    config = base.replace(run_dir=str(Path(base.run_dir) / name), model=model, target_epsilon=epsilon,
                          tracking_uri=tracking_uri)
    began = time.perf_counter()
    result = simulate(config)
    wall_seconds = time.perf_counter() - began
    hospitals = federation.held_out
    released = load_model(model, result.weights, config.input_size)
    test_y = np.concatenate([h.test_y for h in hospitals])
    scores = predict_proba(released, np.concatenate([h.test_x for h in hospitals]))
    pooled = reference.calibration_reference(test_y, scores)
    calibration = Calibration(**result.calibration)
    raw_scores = calibration.invert(scores)
    if model not in federation.centralized:
        federation.centralized[model] = reference.centralized_auc(
            hospitals, model, epochs=federation.centralized_epochs, batch_size=federation.centralized_batch,
            seed=base.seed)
    last = result.rounds[config.rounds]
    run_eps = [h["run_epsilon"] for h in result.privacy["hospitals"].values()]
    row: dict[str, Any] = {
        "federation": federation.name, "model": model, "epsilon": epsilon,
        "epsilon_run_min": min(run_eps), "epsilon_run_max": max(run_eps),
        "auc_dp_pooled": _number(last.get(AUC)), "auc_dp_pooled_se": _number(last.get(AUC + SE_SUFFIX)),
        "auc_weighted_mean": reference.weighted_auc([(h.test_y, predict_proba(released, h.test_x)) for h in hospitals]),
        "auc_pooled": pooled["auc_pooled"], "auc_centralized": federation.centralized[model],
        "calibration_in_the_large": pooled["calibration_in_the_large"],
        "citl_uncalibrated": float(raw_scores.mean() - test_y.mean()), "ece": pooled["ece"],
        "calibration_slope": calibration.slope, "calibration_intercept": calibration.intercept,
        "calibration_problem": calibration.problem, "wall_seconds": wall_seconds, "mlflow_run_id": result.run_id,
    }
    client = quiet_mlflow().tracking.MlflowClient(tracking_uri)
    for key, value in (("federation", federation.name), ("model", model), ("epsilon", f"{epsilon:g}")):
        client.log_param(result.run_id, key, value)
    client.set_tag(result.run_id, "fedrisk.kind", "sweep")
    for key in ("epsilon_run_max", "auc_dp_pooled", "auc_dp_pooled_se", "auc_weighted_mean", "auc_pooled",
                "auc_centralized", "calibration_in_the_large", "citl_uncalibrated", "ece", "wall_seconds"):
        if row[key] is not None and math.isfinite(row[key]):
            client.log_metric(result.run_id, f"sweep.{key}", float(row[key]))
    bins = pd.concat([reliability(test_y, scores).assign(stage="released (recalibrated)"),
                      reliability(test_y, raw_scores).assign(stage="as trained")], ignore_index=True)
    bins = bins.assign(federation=federation.name, model=model, epsilon=epsilon)
    stream.write(f"  {name}: DP pooled AUC {_fmt(row['auc_dp_pooled'])} ± {_fmt(row['auc_dp_pooled_se'])}, "
                 f"weighted-mean AUC {row['auc_weighted_mean']:.4f}, CITL {row['calibration_in_the_large']:+.4f} "
                 f"(as trained {row['citl_uncalibrated']:+.4f}), ECE {row['ece']:.4f}, run epsilon "
                 f"{row['epsilon_run_max']:.3f}, {wall_seconds:.0f}s\n")
    stream.flush()
    return row, bins


def _number(value: Any) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


# --- outputs ----------------------------------------------------------------------------------------

def markdown(frame: pd.DataFrame, heading: str) -> str:
    """The table as GitHub Markdown (floats to 4 significant digits), each column explained above."""
    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return ""
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = [heading, ""] + [f"- `{c}`: {COLUMNS[c]}" for c in frame.columns] + [""]
    lines += ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_auc(frame: pd.DataFrame, path: Path) -> Path:
    """AUC against epsilon, one panel per federation: per model the DP pooled AUC (solid, ± se),
    the released model's per-hospital weighted mean (dotted) and the centralized reference (dashed)."""
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter

    federations = list(dict.fromkeys(frame["federation"]))
    figure, axes = plt.subplots(1, len(federations), figsize=(6.5 * len(federations), 4.5), squeeze=False)
    epsilons = sorted(frame["epsilon"].unique())
    for ax, name in zip(axes[0], federations):
        rows = frame[frame["federation"] == name]
        for index, (model, part) in enumerate(rows.groupby("model", sort=False)):
            colour = f"C{index}"
            se = part["auc_dp_pooled_se"].astype(float).fillna(0.0)
            ax.errorbar(part["epsilon"], part["auc_dp_pooled"].astype(float), yerr=se, fmt="o-", color=colour,
                        capsize=3, label=f"{name} {model}: AUC, pooled DP evaluation (± se)")
            ax.plot(part["epsilon"], part["auc_weighted_mean"], "s:", color=colour,
                    label=f"{name} {model}: AUC, per-hospital weighted mean (reference)")
            ax.axhline(float(part["auc_centralized"].iloc[0]), color=colour, linestyle="--", linewidth=1,
                       label=f"{name} {model}: centralized non-private AUC")
        ax.set(xscale="log", xlabel="epsilon per hospital (whole run)", ylabel="AUC",
               title=f"{name} federation: AUC vs epsilon")
        ax.set_xticks(epsilons, labels=[f"{e:g}" for e in epsilons])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def calibration_epsilons(epsilons: Sequence[float]) -> list[float]:
    """The epsilons the reliability diagrams show: smallest, a middle one, largest."""
    values = sorted(epsilons)
    return list(dict.fromkeys([values[0], values[len(values) // 2], values[-1]]))


def plot_calibration(bins: pd.DataFrame, federation: str, path: Path) -> Path:
    """Reliability diagrams, one panel per model: observed rate against mean predicted probability
    per 10 equal-width bins of the pooled held-out records (bins of at least RELIABILITY_MIN_RECORDS
    records), for a few epsilons; solid the released (recalibrated) model, dotted the model as trained."""
    plt = _pyplot()
    rows = bins[bins["federation"] == federation]
    models = list(dict.fromkeys(rows["model"]))
    shown = calibration_epsilons(rows["epsilon"].unique())
    figure, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        ax.plot([0, 1], [0, 1], color="grey", linewidth=1, label="perfect calibration")
        for index, epsilon in enumerate(shown):
            for stage, style in (("released (recalibrated)", "o-"), ("as trained", "x:")):
                part = rows[(rows["model"] == model) & (rows["epsilon"] == epsilon) & (rows["stage"] == stage)
                            & (rows["records"] >= RELIABILITY_MIN_RECORDS)]
                ax.plot(part["mean_predicted"], part["observed_rate"], style, color=f"C{index}",
                        label=f"epsilon {epsilon:g}, {stage}")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability (bin)", ylabel="observed rate (bin)",
               title=f"{federation} {model}: reliability ({RELIABILITY_BINS} bins)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_outputs(frame: pd.DataFrame, bins: pd.DataFrame, out: Path, heading: str) -> list[Path]:
    """Table (CSV, Markdown), reliability bins and plots; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "table.csv", out / "table.md", out / "reliability.csv"]
    frame.to_csv(written[0], index=False)
    written[1].write_text(markdown(frame, heading))
    bins.to_csv(written[2], index=False)
    written.append(plot_auc(frame, out / "auc_vs_epsilon.png"))
    for name in dict.fromkeys(frame["federation"]):
        written.append(plot_calibration(bins, name, out / f"calibration_{name}.png"))
    return written


# --- the sweep --------------------------------------------------------------------------------------

def run_sweep(args: argparse.Namespace, stream: TextIO = sys.stdout) -> pd.DataFrame:
    """Every (federation, model, epsilon) run; writes the outputs to args.out. On failure, removes
    the output and work directories it created."""
    began = time.perf_counter()
    out, work = Path(args.out), Path(args.work)
    created = [p for p in (out, work) if not p.exists()]
    budget = sweep_budget(args.epsilons, args.models)
    try:
        work.mkdir(parents=True, exist_ok=True)
        tracking_uri = args.tracking_uri or f"sqlite:///{(work / 'mlflow.db').resolve()}"
        _experiment(tracking_uri, work)
        stream.write(f"sweep -> {out} (work: {work}, MLflow {tracking_uri}, experiment {EXPERIMENT})\n"
                     f"  {len(args.federations)} federation(s) x {len(args.models)} model(s) x "
                     f"{len(args.epsilons)} epsilon(s), {args.rounds} round(s); each node's budget epsilon "
                     f"{budget:g} ({len(args.models)} x {sum(args.epsilons):g} x {BUDGET_MARGIN})\n")
        stream.flush()
        rows, bins = [], []
        for name in args.federations:
            federation = BUILDERS[name](work / name, args, budget)
            stream.write(f"  {name}: {len(federation.held_out)} hospitals provisioned "
                         f"({time.perf_counter() - began:.0f}s)\n")
            stream.flush()
            for model in args.models:
                for epsilon in args.epsilons:
                    row, reliability_rows = run_one(federation, model, epsilon, tracking_uri, stream)
                    rows.append(row)
                    bins.append(reliability_rows)
        frame = pd.DataFrame(rows, columns=list(COLUMNS))
        total = time.perf_counter() - began
        heading = (f"Privacy-utility sweep (`python -m experiments.sweep {' '.join(_argv_echo(args))}`): "
                   f"{len(frame)} runs, {args.rounds} round(s) each, total wall time {total / 60:.1f} min.")
        written = write_outputs(frame, pd.concat(bins, ignore_index=True), out, heading)
    except BaseException:
        for path in created:
            shutil.rmtree(path, ignore_errors=True)
        raise
    stream.write("\n" + markdown(frame, heading) + "\nwrote " + ", ".join(str(p) for p in written) + "\n"
                 f"total wall time {total:.1f}s\n")
    return frame


def _argv_echo(args: argparse.Namespace) -> list[str]:
    return [f"--epsilons {','.join(f'{e:g}' for e in args.epsilons)}", f"--models {','.join(args.models)}",
            f"--federations {','.join(args.federations)}", f"--hospitals {args.hospitals}",
            f"--patients {args.patients}", f"--rounds {args.rounds}", f"--seed {args.seed}"]


def _experiment(tracking_uri: str, work: Path) -> str:
    """The sweep's one MLflow experiment, created with its artifacts under `work` if new."""
    from server.tracking import quiet_mlflow

    mlflow = quiet_mlflow()
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow.create_experiment(EXPERIMENT, artifact_location=(work.resolve() / "mlartifacts").as_uri())


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        run_sweep(args)
    except FedriskError as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("sweep: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
