"""Training dynamics on the synthetic generator: how the AUC and log loss of the global model move
round by round under each optimiser setting, so defaults are chosen on synthetic data only.

One federation (the demo's by default: 8 hospitals, 200,000 patients, seed 0) is synthesised and
provisioned once; each setting is one DP federated run at the same epsilon. After a run, the
experiment plays hospital 0 (it holds the key, as every demo does) and replays the global model of
every round from the chain of signed, encrypted updates the coordinator kept
(`HospitalNode.global_weights`, the code a hospital trains from), then scores it on the pooled
held-out records of every hospital without noise. Those exact figures exist only in an experiment.

    .venv/bin/python -m experiments.training_dynamics --grid learning_rate=0.005,0.01 server_momentum=0,0.5

writes `table.csv`, `table.md` and `rounds.csv` under `experiments/results/training_dynamics/`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from federation.config import RunConfig

RESULTS = Path(__file__).resolve().parent / "results" / "training_dynamics"
TUNABLE = ("learning_rate", "clip_norm", "server_momentum", "server_learning_rate", "local_epochs", "rounds",
           "sample_rate")


def parse_grid(items: list[str]) -> list[dict[str, Any]]:
    """`name=v1,v2` items -> every combination, as RunConfig keyword arguments."""
    axes: dict[str, list[Any]] = {}
    for item in items:
        name, _, values = item.partition("=")
        name = name.replace("-", "_")
        if name not in TUNABLE or not values:
            raise SystemExit(f"--grid: {item!r} is not NAME=V1,V2 with NAME one of {', '.join(TUNABLE)}")
        cast = int if name in ("local_epochs", "rounds") else float
        axes[name] = [cast(v) for v in values.split(",")]
    if not axes:
        return [{}]
    names = list(axes)
    return [dict(zip(names, combo)) for combo in itertools.product(*(axes[n] for n in names))]


def round_figures(config: RunConfig, result: Any, node_dir: Path, held_out: list[Any]) -> list[dict[str, float]]:
    """Exact pooled AUC and log loss of the global model after each round (replayed at one node)."""
    from clients.evaluation import risk_metrics
    from clients.node import HospitalNode
    from clients.node_state import NodeState
    from experiments import reference
    from federation.model import load_model, predict_proba

    node = HospitalNode(config, NodeState.load(node_dir))
    x = np.concatenate([h.test_x for h in held_out])
    y = np.concatenate([h.test_y for h in held_out])
    rows = []
    for server_round in range(1, config.rounds + 1):
        weights = node.global_weights(result.chain, result.fedrisk_run_id, server_round)
        model = load_model(config.model, weights, config.input_size)
        scores = predict_proba(model, x)
        metrics = risk_metrics(y, scores)
        rows.append({"round": server_round, "auc_pooled": metrics["auc"], "log_loss": metrics["log-loss"],
                     "auc_weighted_mean": reference.weighted_auc([(h.test_y, predict_proba(model, h.test_x))
                                                                  for h in held_out])})
    return rows


def markdown(frame: pd.DataFrame) -> str:
    """A pipe table of `frame`, floats to 4 decimals."""
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the grid and write its tables."""
    from engines.provisioning import provision_nodes
    from engines.simulation import simulate
    from experiments import reference
    from experiments.synthetic import synthesize
    from federation.he_codec import init_keys

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", nargs="*", default=[], metavar="NAME=V1,V2",
                        help=f"settings to cross (NAME one of {', '.join(TUNABLE)}); default: the defaults alone")
    parser.add_argument("--hospitals", type=int, default=8, help="hospitals of the federation (default 8)")
    parser.add_argument("--patients", type=int, default=200_000, help="patients across them (default 200,000)")
    parser.add_argument("--epsilon", type=float, default=1.0, help="epsilon of every run (default 1)")
    parser.add_argument("--model", default="mlp", help="model of every run (default mlp)")
    parser.add_argument("--seed", type=int, default=0, help="data, initial model and run seed (default 0)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"where the tables go (default {RESULTS})")
    args = parser.parse_args(argv)
    settings = parse_grid(args.grid)

    with tempfile.TemporaryDirectory(prefix="fedrisk-dynamics-") as tmp:
        work = Path(tmp)
        budget = args.epsilon * len(settings) * 1.5 + 1.0
        base = RunConfig(data_dir=str(work / "data"), keys_dir=str(work / "keys"), nodes_dir=str(work / "nodes"),
                         run_dir=str(work / "runs"), num_hospitals=args.hospitals, target_epsilon=args.epsilon,
                         delta=1e-6, model=args.model, seed=args.seed, provision_budget=budget,
                         tracking_uri=f"sqlite:///{work / 'mlflow.db'}", experiment="training-dynamics")
        synthesize(args.hospitals, args.patients, work / "data", seed=args.seed)
        keys = init_keys(work / "keys")
        nodes = provision_nodes(work / "data", keys.hospital_context, work / "nodes",
                                purposes={base.purpose: (budget, base.delta)})
        held_out = reference.load_all(nodes, base.purpose)
        centralized = reference.centralized_auc(held_out, args.model, seed=args.seed)
        print(f"centralized non-private {args.model}: weighted-mean AUC {centralized:.4f}", flush=True)
        table, per_round = [], []
        for index, changes in enumerate(settings):
            config = base.replace(run_dir=str(work / "runs" / f"s{index}"), **changes)
            began = time.perf_counter()
            result = simulate(config)
            seconds = time.perf_counter() - began
            rows = round_figures(config, result, nodes[0].directory, held_out)
            label = ", ".join(f"{k}={v:g}" for k, v in changes.items()) or "defaults"
            aucs = [r["auc_weighted_mean"] for r in rows]
            table.append({**{k: getattr(config, k) for k in TUNABLE}, "auc_weighted_mean": aucs[-1],
                          "auc_pooled": rows[-1]["auc_pooled"], "gap_to_centralized": aucs[-1] - centralized,
                          "best_round": int(np.argmax(aucs)) + 1,
                          "monotone": bool(all(b >= a - 1e-4 for a, b in zip(aucs, aucs[1:]))),
                          "log_loss_first": rows[0]["log_loss"], "log_loss_last": rows[-1]["log_loss"],
                          "auc_centralized": centralized, "seconds": seconds})
            per_round += [{"setting": label, **r} for r in rows]
            print(f"{label}: AUC by round {' '.join(f'{a:.4f}' for a in aucs)} "
                  f"(gap {aucs[-1] - centralized:+.4f}); log loss {rows[0]['log_loss']:.4f} -> "
                  f"{rows[-1]['log_loss']:.4f}; {seconds:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(table)
    frame.to_csv(args.out / "table.csv", index=False)
    pd.DataFrame(per_round).to_csv(args.out / "rounds.csv", index=False)
    (args.out / "table.md").write_text(
        f"Synthetic federation: {args.hospitals} hospitals, {args.patients:,} patients, seed {args.seed}, "
        f"{args.model}, epsilon {args.epsilon:g}, delta 1e-6. Exact figures on pooled held-out records "
        "(experiment only).\n\n" + markdown(frame) + "\n")
    (args.out / "command.json").write_text(json.dumps({"argv": sys.argv[1:] if argv is None else argv}) + "\n")
    print(f"tables in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
