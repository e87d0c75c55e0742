"""Accuracy of the standard cohort table against epsilon.

What it measures: how far the federation's DP answer to the "standard cohort table" lies from
the exact answer on the same consented records, for epsilon 0.25 ... 8 (per hospital). Two
queries make up the table, both for purpose `credit-risk-research`:

* `delinquency-by-age-insurance`: the 90-day delinquency rate (`delinquent_90d_12m`) by public
  10-year age band and insurance type;
* `out-of-pocket-by-insurance`: mean `out_of_pocket`, clamped to [0, 5000], by insurance type.

How: a synthetic federation (default 3 hospitals, 30,000 patients, seed 7) is created in a
temporary directory with a CKKS key and provisioned nodes holding a large budget. For every
epsilon and repeat, each hospital answers the query under a fresh run id (fresh noise), the
server context adds the ciphertexts, a hospital key decrypts the sum and `server.analytics.estimate`
turns it into the table, exactly as the Flower protocol does, minus the transport. The truth is
`clients.analytics.local_statistics` over each node's consented records, summed across
hospitals (centre + S / C per cell). It is the exact answer the DP noise is added to, so the 95%
intervals (which only cover DP noise, not sampling error) should cover it about 95% of the time.

Reported per (query, epsilon), over non-suppressed cells with records and all repeats: the
median and 90th percentile of |estimate - truth| / |truth| (cells whose truth is 0 are left out
of the relative error), the same restricted to cells with at least 1,000 true records, and the
fraction of 95% intervals covering the truth.

Rerun:

    .venv/bin/python -m experiments.analytics_accuracy [--out DIR] [--patients N] [--repeats R]

Writes `accuracy.csv`, `accuracy.md` and `accuracy.png` (if matplotlib is installed) to
`--out` (default `runs/analytics_accuracy`) and prints the Markdown table and the wall time.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from clients.analytics import consented_records, local_statistics
from clients.node_state import NodeState
from engines.analytics import answer_in_process
from engines.provisioning import provision_nodes
from experiments.synthetic import synthesize
from federation.he_codec import HospitalKey, ServerContext, init_keys
from federation.query import CohortQuery

PURPOSE = "credit-risk-research"
EPSILONS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
LARGE_CELL = 1_000
"""Cells with at least this many true records get their own error columns."""
BUDGET: dict[str, tuple[float, float]] = {PURPOSE: (1e6, 1e-6)}
STANDARD_TABLE: dict[str, dict[str, Any]] = {
    "delinquency-by-age-insurance": {
        "purpose": PURPOSE, "measure": "rate", "field": "delinquent_90d_12m",
        "group-by": ["age", "insurance_type"]},
    "out-of-pocket-by-insurance": {
        "purpose": PURPOSE, "measure": "mean", "field": "out_of_pocket", "bounds": [0, 5000],
        "group-by": ["insurance_type"]},
}
"""The standard cohort table's queries, by name, without their epsilon."""


@dataclass(frozen=True)
class Federation:
    """A synthetic federation ready to answer queries in-process."""

    nodes: list[NodeState]
    key: HospitalKey
    server: ServerContext


def build_federation(work: Path, hospitals: int, patients: int, seed: int) -> Federation:
    """Synthesise exports, make a CKKS key and provision one node per hospital under `work`."""
    synthesize(hospitals, patients, work / "data", seed=seed)
    keys = init_keys(work / "keys")
    nodes = provision_nodes(work / "data", keys.hospital_context, work / "nodes", purposes=BUDGET)
    return Federation(nodes, HospitalKey.load(keys.hospital_context), ServerContext.load(work / "keys"))


def make_query(name: str, epsilon: float) -> CohortQuery:
    """One of the standard table's queries at `epsilon`."""
    return CohortQuery.from_mapping({"name": name, "epsilon": epsilon, **STANDARD_TABLE[name]}, source=name)


def group_frame(query: CohortQuery) -> pd.DataFrame:
    """One row per cell, in layout order, with the group fields as columns."""
    cells = list(query.layout().cells)
    return pd.DataFrame({g.field: [cell[i] for cell in cells] for i, g in enumerate(query.group_by)})


def exact_answer(query: CohortQuery, nodes: Sequence[NodeState]) -> pd.DataFrame:
    """The non-private answer on the records the hospitals use: per cell, `truth` (centre +
    S / C, NaN for an empty cell) and `true_records` (C)."""
    assert query.paired, "the standard table only holds paired (count, centred sum) measures"
    totals = sum(local_statistics(consented_records(node, query.purpose)[0], query) for node in nodes)
    pairs = np.asarray(totals, dtype=float).reshape(-1, 2)
    counts, centred = pairs[:, 0], pairs[:, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        truth = np.where(counts > 0, query.centre + centred / counts, np.nan)
    return group_frame(query).assign(truth=truth, true_records=counts)


def score_cells(query: CohortQuery, table: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Per released (non-suppressed) cell holding records: relative error and CI coverage."""
    keys = [g.field for g in query.group_by]
    joined = table.merge(truth, on=keys, how="left", validate="one_to_one")
    joined = joined[~joined["suppressed"] & (joined["true_records"] > 0)]
    estimate, exact = joined[query.measure].to_numpy(float), joined["truth"].to_numpy(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        relative = np.where(exact != 0, np.abs(estimate - exact) / np.abs(exact), np.nan)
    covered = (joined["ci95_low"] <= joined["truth"]) & (joined["truth"] <= joined["ci95_high"])
    return pd.DataFrame({"relative_error": relative, "covered": covered.to_numpy(bool),
                         "true_records": joined["true_records"].to_numpy(float)})


def summarise(name: str, epsilon: float, noise_multiplier: float, scored: pd.DataFrame, repeats: int) -> dict[str, Any]:
    """One row of the accuracy table from every scored cell of every repeat."""
    errors = scored["relative_error"].dropna()
    large = scored.loc[scored["true_records"] >= LARGE_CELL, "relative_error"].dropna()

    def quantile(values: pd.Series, q: float) -> float:
        return float(values.quantile(q)) if len(values) else float("nan")

    return {"query": name, "epsilon": epsilon, "noise_multiplier": round(noise_multiplier, 4),
            "cells_per_repeat": round(len(scored) / repeats, 1),
            "median_rel_error": quantile(errors, 0.5), "p90_rel_error": quantile(errors, 0.9),
            "ci95_coverage": float(scored["covered"].mean()) if len(scored) else float("nan"),
            "large_cells_per_repeat": round(int((scored["true_records"] >= LARGE_CELL).sum()) / repeats, 1),
            "median_rel_error_large": quantile(large, 0.5), "p90_rel_error_large": quantile(large, 0.9)}


def measure(federation: Federation, epsilons: Sequence[float], repeats: int) -> pd.DataFrame:
    """The accuracy table: one row per (query, epsilon)."""
    rows: list[dict[str, Any]] = []
    for name in STANDARD_TABLE:
        truth = exact_answer(make_query(name, epsilons[0]), federation.nodes)
        for epsilon in epsilons:
            query = make_query(name, epsilon)
            noise_multiplier = query.noise_multiplier()
            scored = pd.concat([score_cells(query, answer_in_process(federation.nodes, federation.key, federation.server, query,
                                                              f"acc-{name}-e{epsilon:g}-r{k}"),
                                            truth) for k in range(repeats)], ignore_index=True)
            rows.append(summarise(name, epsilon, noise_multiplier, scored, repeats))
            print(f"  {name} epsilon={epsilon:g}: median relative error {rows[-1]['median_rel_error']:.4f}", flush=True)
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table of `frame` (floats to 4 significant digits)."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "" if np.isnan(value) else f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def plot(frame: pd.DataFrame, path: Path) -> Path | None:
    """Median relative error against epsilon, log-log: per query over all released cells
    (solid) and over cells with >= LARGE_CELL records (dashed). None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for index, (name, rows) in enumerate(frame.groupby("query", sort=False)):
        colour = f"C{index}"
        axes.plot(rows["epsilon"], rows["median_rel_error"], "o-", color=colour, label=f"{name}: all cells")
        axes.plot(rows["epsilon"], rows["median_rel_error_large"], "s--", color=colour,
                  label=f"{name}: cells >= {LARGE_CELL:,} records")
    axes.set(xscale="log", yscale="log", xlabel="epsilon (per hospital)", ylabel="median relative error",
             title="Standard cohort table: DP error vs epsilon")
    epsilons = list(frame["epsilon"].unique())
    axes.set_xticks(epsilons, labels=[f"{e:g}" for e in epsilons])
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_outputs(frame: pd.DataFrame, out: Path) -> list[Path]:
    """Write the table (CSV and Markdown) and the plot; return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "accuracy.csv", out / "accuracy.md"]
    frame.to_csv(written[0], index=False)
    written[1].write_text(markdown(frame) + "\n")
    figure = plot(frame, out / "accuracy.png")
    if figure is None:
        print("matplotlib is not installed: no plot written")
    else:
        written.append(figure)
    return written


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/analytics_accuracy"), help="output directory")
    parser.add_argument("--patients", type=int, default=30_000, help="synthetic patients in all (default 30000)")
    parser.add_argument("--hospitals", type=int, default=3, help="synthetic hospitals (default 3)")
    parser.add_argument("--repeats", type=int, default=5, help="noised answers per epsilon (default 5)")
    parser.add_argument("--seed", type=int, default=7, help="synthetic data seed (default 7)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    began = time.perf_counter()
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fedrisk-accuracy-"))
    try:
        federation = build_federation(work, args.hospitals, args.patients, args.seed)
        print(f"federation of {args.hospitals} hospitals, {args.patients:,} patients ready "
              f"in {time.perf_counter() - began:.1f}s", flush=True)
        frame = measure(federation, EPSILONS, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    written = write_outputs(frame, args.out)
    print()
    print(markdown(frame))
    print()
    print("wrote " + ", ".join(str(p) for p in written))
    print(f"total wall time {time.perf_counter() - began:.1f}s")


if __name__ == "__main__":
    main()
