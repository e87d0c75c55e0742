"""Membership-inference baseline: the release audit's attack on a non-DP model beside the DP ones.

What it measures, on one synthetic federation: the loss-threshold attack of the release audit
(`server.releases.membership`: threshold on p(y | x), members = the hospitals' training splits,
non-members = their held-out splits, the splits training used) against

* `non-DP`: the same model family trained the same way (FedAvg over the hospitals' training
  splits, the same rounds, local epochs, batch size, learning rate and Adam, from the same public
  start) with plain minibatch SGD: no clipping, no noise (`clients.training.train_local` with
  `dp=False`, the benchmark's non-private reference);
* `DP eps=E`: a real federated run (`engines.simulation.simulate`: DP-SGD, CKKS aggregation,
  DP evaluation, recalibration) at target epsilon E per hospital; the released (calibrated)
  model is attacked.

It is an experiment, so the histograms are exact: each hospital's own code path builds the table
(`clients.analytics`: consented records, both splits, p(y | x), the audit's bins), summed over
hospitals, with no DP noise. Columns: `auc` (the binned attack AUC, what a release audit
estimates), `auc_unbinned` (the same attack on the raw scores, for the loss of binning),
`advantage` (max TPR - FPR), `epsilon_lower_bound` (95%, sampling only: the counts are exact) and,
for the DP models, `auc_dp_audit` ± `auc_dp_audit_se`: the audit as `fedrisk release audit`
runs it (noised at epsilon `--audit-epsilon` per hospital, charged to the nodes' ledgers).

The defaults are a small federation (3 hospitals, 6,000 patients, about 1,600 training records
each) trained for 5 rounds of 5 local epochs: small and long enough for the non-DP model to
memorise measurably, as a baseline must. Rerun (several minutes on two cores):

    .venv/bin/python -m experiments.membership_baseline [--hospitals 3] [--patients 6000] [--rounds 5]
        [--local-epochs 5] [--models 'mlp|mlp:256,256'] [--epsilons 4,1] [--out experiments/results/membership]
        [--work DIR]

Writes `table.csv` and `table.md` to `--out`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd

EPSILONS = (4.0, 1.0)
AUDIT_EPSILON = 0.5
COLUMNS = {
    "model": "model family",
    "training": "non-DP (plain SGD) or DP-SGD at the target epsilon per hospital (whole run)",
    "epsilon_run_max": "the run's accounted epsilon (largest over hospitals); empty for non-DP",
    "auc": "loss-threshold attack AUC, exact binned histogram of p(y|x) (the audit's bins)",
    "auc_unbinned": "the same attack's AUC on the raw scores",
    "advantage": "membership advantage, max over thresholds of TPR - FPR",
    "epsilon_lower_bound": "empirical epsilon lower bound (95%, exact counts: sampling only)",
    "auc_dp_audit": "attack AUC from the DP audit query (as `fedrisk release audit`)",
    "auc_dp_audit_se": "its standard error (DP noise)",
    "members": "training-split records", "non_members": "held-out records",
    "test_auc": "the model's own AUC on the held-out records (utility)",
    "seconds": "training wall time",
}


def _audit_frame(nodes: list, weights: np.ndarray, kind: str, delta: float) -> tuple[dict[str, Any], np.ndarray,
                                                                                     np.ndarray]:
    """The attack on exact tables built by each hospital's own code, summed; and the raw scores."""
    from clients.analytics import consented_records, local_statistics, scored_records
    from engines.membership_audit import audit_query
    from federation.features import FEATURE_NAMES
    from federation.model import load_model, weights_digest
    from server.releases.membership import audit_from_table

    query = audit_query(weights_digest(weights), kind)
    model = load_model(kind, weights, len(FEATURE_NAMES))
    sums, scores, splits = 0.0, [], []
    for node in nodes:
        used = scored_records(query, consented_records(node, query.purpose)[0], model)
        sums = sums + local_statistics(used, query)
        scores.append(used["membership_score"].to_numpy(float))
        splits.append(used["split"].to_numpy())
    edges = np.asarray(query.bins)
    rows = [{"split": split, "bin_low": edges[b], "bin_high": edges[b + 1], "count": float(c), "se": 0.0}
            for s, split in enumerate(("train", "held-out"))
            for b, c in enumerate(np.asarray(sums).reshape(2, -1)[s])]
    audit = audit_from_table(pd.DataFrame(rows), delta=delta)
    return ({"auc": audit.auc, "advantage": audit.advantage, "epsilon_lower_bound": audit.epsilon_lower_bound,
             "members": audit.members, "non_members": audit.non_members},
            np.concatenate(scores), np.concatenate(splits) == "train")


def _unbinned_auc(scores: np.ndarray, members: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(members.astype(int), scores))


def _test_auc(hospitals: list, weights: np.ndarray, kind: str) -> float:
    from clients.evaluation import risk_metrics
    from federation.model import load_model, predict_proba

    model = load_model(kind, weights, hospitals[0].test_x.shape[1])
    y = np.concatenate([h.test_y for h in hospitals])
    return float(risk_metrics(y, predict_proba(model, np.concatenate([h.test_x for h in hospitals])))["auc"])


def train_without_dp(hospitals: list, config: Any) -> np.ndarray:
    """FedAvg with plain minibatch SGD at each hospital: the run's schedule without clipping or noise."""
    from clients.training import LocalTraining, train_local
    from federation.model import initial_weights

    weights = initial_weights(config.model, config.seed, config.input_size)
    plan = LocalTraining(model_kind=config.model, epochs=config.local_epochs, sample_rate=config.sample_rate,
                         learning_rate=config.learning_rate, clip_norm=config.clip_norm, noise_multiplier=0.0,
                         seed=config.seed, dp=False, n_features=config.input_size)
    for _ in range(config.rounds):
        local = [train_local(weights, h.train_x, h.train_y, plan).weights for h in hospitals]
        sizes = np.array([len(h.train_y) for h in hospitals], dtype=float)
        weights = np.average(np.stack(local), axis=0, weights=sizes).astype(np.float32)
    return weights


def run(args: argparse.Namespace, stream: TextIO = sys.stdout) -> pd.DataFrame:
    from engines.analytics import answer_in_process
    from engines.membership_audit import audit_query
    from engines.provisioning import provision_nodes
    from engines.simulation import simulate
    from experiments import reference
    from experiments.synthetic import synthesize
    from federation.config import RunConfig
    from federation.he_codec import HospitalKey, ServerContext, init_keys
    from federation.model import weights_digest
    from server.releases.membership import audit_from_table

    work = Path(args.work or tempfile.mkdtemp(prefix="fedrisk-membership-"))
    budget = (sum(args.epsilons) + AUDIT_EPSILON * len(args.epsilons)) * len(args.models) * 1.01
    synthesize(args.hospitals, args.patients, work / "data", seed=args.seed)
    keys = init_keys(work / "keys")
    base = RunConfig(data_dir=str(work / "data"), keys_dir=str(work / "keys"), nodes_dir=str(work / "nodes"),
                     num_hospitals=args.hospitals, rounds=args.rounds, local_epochs=args.local_epochs, delta=1e-6,
                     seed=args.seed,
                     min_contributors=2, provision_budget=budget)
    nodes = provision_nodes(work / "data", keys.hospital_context, work / "nodes",
                            purposes={base.purpose: (budget, base.delta)})
    hospitals = reference.load_all(nodes, base.purpose)
    rows = []
    for kind in args.models:
        config = base.replace(model=kind)
        runs: list[tuple[str, float | None, np.ndarray, float]] = []
        began = time.perf_counter()
        runs.append(("non-DP", None, train_without_dp(hospitals, config), time.perf_counter() - began))
        for epsilon in args.epsilons:
            began = time.perf_counter()
            result = simulate(config.replace(target_epsilon=epsilon, run_dir=str(work / f"run-{kind}-{epsilon:g}")))
            accounted = max(h["run_epsilon"] for h in result.privacy["hospitals"].values())
            runs.append((f"DP eps={epsilon:g}", accounted, result.weights, time.perf_counter() - began))
        for training, accounted, weights, seconds in runs:
            figures, scores, members = _audit_frame(nodes, weights, kind, base.delta)
            row = {"model": kind, "training": training, "epsilon_run_max": accounted, **figures,
                   "auc_unbinned": _unbinned_auc(scores, members), "auc_dp_audit": None, "auc_dp_audit_se": None,
                   "test_auc": _test_auc(hospitals, weights, kind), "seconds": seconds}
            if accounted is not None:
                query = audit_query(weights_digest(weights), kind, epsilon=AUDIT_EPSILON, purpose=base.purpose)
                table = answer_in_process(nodes, HospitalKey.load(keys.hospital_context),
                                          ServerContext.load(work / "keys"), query, f"audit-{training}", weights)
                noised = audit_from_table(table, delta=base.delta)
                row["auc_dp_audit"], row["auc_dp_audit_se"] = noised.auc, noised.auc_se
            rows.append(row)
            stream.write(f"  {kind} {training}: attack AUC {row['auc']:.4f} (unbinned {row['auc_unbinned']:.4f}), "
                         f"advantage {row['advantage']:.4f}, epsilon lower bound {row['epsilon_lower_bound']:.3f}"
                         + (f", DP audit AUC {row['auc_dp_audit']:.4f} ± {row['auc_dp_audit_se']:.4f}, accounted "
                            f"epsilon {accounted:.3f}" if accounted is not None else "")
                         + f"; test AUC {row['test_auc']:.4f}\n")
            stream.flush()
    return pd.DataFrame(rows, columns=list(COLUMNS))


def markdown(frame: pd.DataFrame, args: argparse.Namespace) -> str:
    def cell(column: str, value: Any) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return ""
        if column in ("members", "non_members", "seconds"):
            return f"{value:,.0f}"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = [f"# Membership inference: non-DP baseline vs DP-SGD ({args.hospitals} synthetic hospitals, "
             f"{args.patients:,} patients, {args.rounds} rounds of {args.local_epochs} local epochs)", "",
             "Rerun: `.venv/bin/python -m experiments.membership_baseline " + " ".join(_argv(args)) + "`", ""]
    lines += [f"The DP audit (`auc_dp_audit`) is noised at epsilon {AUDIT_EPSILON:g} per hospital; on a federation this "
              "small its standard error is of the order of the effect, and it shrinks as one over the number of "
              "held-out records. Everything else is read off exact histograms.", ""]
    lines += [f"* `{name}`: {meaning}" for name, meaning in COLUMNS.items()]
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(c, row[c]) for c in COLUMNS) + " |" for row in frame.to_dict("records")]
    return "\n".join(lines) + "\n"


def _argv(args: argparse.Namespace) -> list[str]:
    return [f"--hospitals {args.hospitals}", f"--patients {args.patients}", f"--rounds {args.rounds}",
            f"--local-epochs {args.local_epochs}",
            f"--models '{'|'.join(args.models)}'", f"--epsilons {','.join(f'{e:g}' for e in args.epsilons)}"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.membership_baseline", description=__doc__.split("\n")[0])
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--patients", type=int, default=6_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--models", type=lambda s: tuple(s.split("|")), default=("mlp",),
                        help="model families separated by | (e.g. 'mlp|mlp:256,256')")
    parser.add_argument("--epsilons", type=lambda s: tuple(float(v) for v in s.split(",")), default=EPSILONS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/membership"))
    parser.add_argument("--work", help="work directory (default: a new temporary one)")
    args = parser.parse_args(argv)
    frame = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / "table.csv", index=False)
    (args.out / "table.md").write_text(markdown(frame, args))
    print(markdown(frame, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
