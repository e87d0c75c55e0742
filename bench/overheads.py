"""Overhead benchmark: DP-SGD vs plain training, CKKS vs plaintext FedAvg, ciphertext size.

Every comparison runs both sides in this one process, alternating A, B, A, B, and quotes
medians, so machine drift hits both sides alike. Run: `make bench` or
`.venv/bin/python bench/overheads.py [--repeats 15] [--he-repeats 5] [--json FILE]`.

Figures:
* dp_overhead_vs_tight: one epoch of DP-SGD over a tight plain loop of the same model and Adam
  (`experiments.overheads.tight_plain_epoch`): the headline DP cost.
* dp_overhead_ratio: one epoch of DP-SGD over one plain epoch, same 40-64-32-1 MLP and Adam,
  100,000 rows, one thread, at q = 0.01 and 0.04; both sides are `train_local`, timed whole.
  DP: Poisson batches at rate q (fedrisk's sampler), book-keeping per-sample clipping, fedrisk's
  noise step (sigma * C on one flat gradient buffer, over int(n q)), Adam. Plain: 1/q shuffled
  batches of round(n q) rows, mean loss, `loss.backward()`, Adam. Both fetch batches by
  index_select, no DataLoader (`experiments.overheads` says it in full). The DP side thus also
  pays for Poisson sampling and variable batch sizes; `bench/clipping_overhead.py` also
  compares against plain training on the same Poisson batches.
* he_overhead_ratio: one federated round of the demo's federation (8 hospitals, 200,000
  patients): every hospital trains and packs its update, the server sums, every hospital
  decodes; CKKS against plaintext FedAvg.
* ciphertext_expansion: bytes of one encrypted MLP update over the float32 bytes of the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clients.data import HospitalData  # noqa: E402
from experiments import overheads  # noqa: E402
from engines.provisioning import provision_nodes  # noqa: E402
from experiments.synthetic import synthesize  # noqa: E402
from federation import features as fx  # noqa: E402
from federation.config import RunConfig  # noqa: E402
from federation.he_codec import init_keys  # noqa: E402


def dp_figure(workdir: Path, repeats: int, sample_rate: float) -> overheads.DPOverhead:
    """DP epoch vs plain epoch on 100,000 synthetic rows."""
    report = synthesize(1, 100_000, workdir / "dp-data", seed=11)
    frame = pd.read_parquet(report.files[0])
    x, y = fx.encode_features(frame), fx.encode_labels(frame)
    data = HospitalData("bench", x, y, x[:0], y[:0])
    config = RunConfig(sample_rate=sample_rate)
    return overheads.dp_overhead(data, config, repeats=repeats)


def he_figure(workdir: Path, repeats: int) -> overheads.HEOverhead:
    """One demo-sized round with CKKS vs plaintext FedAvg."""
    report = synthesize(8, 200_000, workdir / "he-data", seed=0)
    keys = init_keys(workdir / "keys")
    config = RunConfig(data_dir=str(report.files[0].parent), keys_dir=str(workdir / "keys"),
                       num_hospitals=8, rounds=1, delta=1e-6)
    nodes = provision_nodes(report.files[0].parent, keys.hospital_context, workdir / "nodes",
                            purposes={config.purpose: (100.0, config.delta)})
    return overheads.he_overhead(nodes, config, repeats=repeats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="DP epoch pairs (default 15)")
    parser.add_argument("--he-repeats", type=int, default=5, help="federated round pairs (default 5)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    figures: dict[str, object] = {"machine": {"cpus": __import__("os").cpu_count(), "torch_threads": 1}}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for q in (0.01, 0.04):
            dp = dp_figure(workdir / f"q{q}", args.repeats, q)
            figures[f"dp_q{q}"] = {"dp_epoch_s": dp.loop.numerator_seconds,
                                   "tight_plain_epoch_s": dp.tight.denominator_seconds,
                                   "plain_epoch_s": dp.loop.denominator_seconds,
                                   "dp_overhead_vs_tight": dp.tight.ratio, "dp_overhead_ratio": dp.loop.ratio}
            print(f"DP-SGD epoch, 100k rows, q={q}: {dp.loop.numerator_seconds:.3f}s vs tight plain loop "
                  f"{dp.tight.denominator_seconds:.3f}s -> dp_overhead_vs_tight {dp.tight.ratio:.2f}; vs fedrisk's "
                  f"plain loop {dp.loop.denominator_seconds:.3f}s -> dp_overhead_ratio {dp.loop.ratio:.2f}", flush=True)
        he = he_figure(workdir, args.he_repeats)
        figures["he_round"] = {"he_round_s": he.round.numerator_seconds, "plain_round_s": he.round.denominator_seconds,
                               "he_overhead_ratio": he.round.ratio, "update_bytes": he.update_bytes,
                               "model_float32_bytes": he.model_float32_bytes,
                               "ciphertext_expansion": he.ciphertext_expansion}
        print(f"federated round, 8 hospitals / 200k patients: CKKS {he.round.numerator_seconds:.3f}s vs "
              f"plaintext {he.round.denominator_seconds:.3f}s -> he_overhead_ratio {he.round.ratio:.3f}", flush=True)
        print(f"encrypted update {he.update_bytes:,} B for a {he.model_float32_bytes:,} B float32 model "
              f"-> ciphertext_expansion {he.ciphertext_expansion:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
