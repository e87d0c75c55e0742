"""What the malicious-coordinator defences cost, measured side by side in one run.

* decryption flooding, on a model: one demo-sized round (8 hospitals, the demo MLP) aggregated
  by verified, flooded decryption against the same aggregate decrypted exactly; the figure is the
  AUC of the two resulting models on held-out records, and the largest weight difference;
* decryption flooding, on a cohort table: the standard error of a count cell at epsilon 1 with and
  without the flooding term;
* verified decryption's time and bytes: an 8-hospital MLP aggregate verified (signatures,
  shapes), added and decrypted at a node, and the bytes of the signed contributions;
* DP evaluation, on training: DP-SGD's noise multiplier when the run's target epsilon must also
  cover its DP evaluations (a quarter of it, at most 0.5) against DP-SGD alone;
* DP evaluation, on the figure itself: the DP AUC of a round's evaluation against the exact AUC
  of the same scores, over repeated noise draws;
* the accountant: at the demo's settings, DP-SGD's sigma (and the DP evaluation's z) calibrated
  under RDP (the accountant before) and under PLD (the one in force), and the epsilon each pair
  certifies under PLD, RDP and, independently, Opacus's PRV accountant.

Run: `.venv/bin/python bench/privacy_costs.py [--json FILE] [--accountants-only]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clients.evaluation import risk_metrics  # noqa: E402
from clients.node import HospitalNode  # noqa: E402
from engines.provisioning import provision_nodes  # noqa: E402
from experiments.synthetic import synthesize  # noqa: E402
from federation import round_evaluation  # noqa: E402
from federation.config import RunConfig  # noqa: E402
from federation.he_codec import CONTRIBUTOR_UNIT, flooding_std, init_keys  # noqa: E402
from federation.model import load_model, predict_proba  # noqa: E402
from federation.query import CELL_CAPACITY  # noqa: E402
from privacy.accounting import (ACCOUNTANT, RDP_ACCOUNTANT, GaussianMechanism, calibrate_noise,  # noqa: E402
                                _pld_epsilon, compose_epsilon, prv_epsilon)


def model_round(workdir: Path) -> dict[str, float]:
    """One real round of 8 hospitals: flooded vs exact aggregate, and verified-decryption cost."""
    report = synthesize(8, 200_000, workdir / "data", seed=0)
    keys = init_keys(workdir / "keys")
    config = RunConfig(keys_dir=str(workdir / "keys"), num_hospitals=8, rounds=1, delta=1e-6)
    states = provision_nodes(report.files[0].parent, keys.hospital_context, workdir / "nodes",
                             purposes={config.purpose: (10.0, config.delta)})
    nodes = [HospitalNode(config, s) for s in states]
    run = "privacy-costs"
    census = [n.census(run, n.check_rollback([])) for n in nodes]
    updates = [n.train(1, census, {}, run, n.check_rollback([])).contribution for n in nodes]
    node = nodes[0]
    length = node.length + 2
    began = time.perf_counter()
    flooded = node.global_weights({1: updates}, run, 1)
    verified_seconds = time.perf_counter() - began
    key = node.key
    exact_sum = key._decrypt_exact(key.sum([u.ciphertexts for u in updates], length), length)
    start = node.global_weights({}, run, 0)
    exact = start + exact_sum[:node.length] / exact_sum[-2]
    x = np.concatenate([n.data.test_x for n in nodes])
    y = np.concatenate([n.data.test_y for n in nodes])
    auc = {name: risk_metrics(y, predict_proba(load_model(config.model, w, config.input_size), x))["auc"]
           for name, w in (("flooded", flooded), ("exact", exact))}
    return {"auc_flooded": auc["flooded"], "auc_exact": auc["exact"],
            "max_weight_difference": float(np.max(np.abs(flooded - exact))),
            "flooding_std": flooding_std(8), "verified_decryption_seconds": verified_seconds,
            "contribution_bytes": float(statistics.mean(sum(len(b) for b in u.ciphertexts) for u in updates)),
            "contributor_slot": float(exact_sum[-1] / CONTRIBUTOR_UNIT)}


def cohort_cell(hospitals: int = 3, epsilon: float = 1.0, delta: float = 1e-5) -> dict[str, float]:
    """A count cell's standard error (records) at epsilon 1, with and without the flooding."""
    z = calibrate_noise(target_epsilon=epsilon, delta=delta, sample_rate=1.0, steps=1, tolerance=0.001)
    dp = np.sqrt(hospitals) * z * np.sqrt(2)
    flood = flooding_std(hospitals) * CELL_CAPACITY
    return {"dp_se_records": float(dp), "flooding_se_records": float(flood),
            "se_inflation": float(np.hypot(dp, flood) / dp)}


def evaluation_costs(epsilon: float = 1.0, delta: float = 1e-6, rounds: int = 5, draws: int = 200) -> dict[str, float]:
    """DP-SGD's sigma with and without the run's DP evaluations, and the DP AUC's error."""
    budget = min(epsilon / 4, 0.5)
    z = round_evaluation.evaluation_noise_multiplier(budget, delta, rounds)
    alone = calibrate_noise(target_epsilon=epsilon, delta=delta, sample_rate=0.01, steps=rounds * 100)
    shared = calibrate_noise(target_epsilon=epsilon, delta=delta, sample_rate=0.01, steps=rounds * 100,
                             extra=((1.0, z, rounds),))
    rng = np.random.default_rng(3)
    logits = rng.normal(-2.2, 1.3, 40_000)
    labels = (rng.random(40_000) < 1 / (1 + np.exp(-logits))).astype(float)
    scores = 1 / (1 + np.exp(-(logits + rng.normal(0, 0.6, 40_000))))
    exact = risk_metrics(labels, scores)["auc"]
    parts = np.array_split(np.arange(40_000), 8)
    errors = []
    for draw in range(draws):
        summed = sum(round_evaluation.noised_evaluation(labels[p], scores[p], noise_multiplier=z, seed=draw * 8 + i)
                     for i, p in enumerate(parts))
        errors.append(round_evaluation.metrics_from_noised(summed, noise_multiplier=z, hospitals=8)[round_evaluation.AUC] - exact)
    errors = np.asarray(errors)
    return {"evaluation_epsilon": budget, "evaluation_noise_multiplier": z, "sigma_dp_sgd_alone": alone,
            "sigma_with_evaluation": shared, "sigma_ratio": shared / alone, "exact_auc": exact,
            "dp_auc_rms_error": float(np.sqrt(np.mean(errors ** 2))),
            "dp_auc_mean_error": float(np.mean(errors))}


def accountant_costs(epsilon: float = 1.0, delta: float = 1e-6, rounds: int = 5,
                     sample_rate: float = 0.01) -> dict[str, dict[str, float]]:
    """The demo's plan (`fedrisk demo`: 5 rounds of 1/q steps at q = 0.01, delta 1e-6, target 1, a
    quarter of it for the DP evaluations) calibrated under each accountant, and what each certifies."""
    steps, budget = rounds * round(1 / sample_rate), min(epsilon / 4, 0.5)
    figures: dict[str, dict[str, float]] = {}
    for name, accountant in (("rdp", RDP_ACCOUNTANT), ("pld", ACCOUNTANT)):
        began = time.perf_counter()
        if accountant == ACCOUNTANT:  # what a node runs now
            z = round_evaluation.evaluation_noise_multiplier(budget, delta, rounds)
        else:  # what the RDP version's evaluation_noise_multiplier gave (the same bisection, by RDP)
            z = calibrate_noise(target_epsilon=budget, delta=delta, sample_rate=1.0, steps=rounds, tolerance=0.005,
                                accountant=accountant)
        sigma = calibrate_noise(target_epsilon=epsilon, delta=delta, sample_rate=sample_rate, steps=steps,
                                extra=((1.0, z, rounds),), accountant=accountant)
        seconds = time.perf_counter() - began
        mechanisms = [GaussianMechanism(sample_rate, sigma, steps), GaussianMechanism.gaussian_release(
            noise_multiplier=z, count=rounds)]
        _pld_epsilon.cache_clear()
        began = time.perf_counter()
        pld = compose_epsilon(mechanisms, delta)
        one = time.perf_counter() - began
        figures[name] = {"sigma": sigma, "evaluation_z": z, "calibration_seconds": seconds,
                         "epsilon_pld": pld, "epsilon_rdp": compose_epsilon(mechanisms, delta, accountant=RDP_ACCOUNTANT),
                         "epsilon_prv": prv_epsilon(mechanisms, delta).estimate, "pld_composition_seconds": one}
    figures["pld"]["sigma_ratio"] = figures["pld"]["sigma"] / figures["rdp"]["sigma"]
    return figures


def print_accountant_costs(acc: dict[str, dict[str, float]]) -> None:
    for name in ("rdp", "pld"):
        f = acc[name]
        print(f"demo noise calibrated by {name.upper()}: DP-SGD sigma {f['sigma']:.4f}, evaluation z {f['evaluation_z']:.2f} "
              f"-> certifies epsilon {f['epsilon_pld']:.4f} by PLD, {f['epsilon_rdp']:.4f} by RDP, "
              f"{f['epsilon_prv']:.4f} by PRV (independent); calibration {f['calibration_seconds']:.2f} s")
    print(f"PLD sigma / RDP sigma at the demo's target: x{acc['pld']['sigma_ratio']:.3f}; one PLD composition of the "
          f"demo run {acc['pld']['pld_composition_seconds']:.3f} s (uncached)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--accountants-only", action="store_true", help="only the accountant figures (seconds)")
    args = parser.parse_args()
    figures: dict[str, object] = {}
    figures["accountants"] = acc = accountant_costs()
    print_accountant_costs(acc)
    if args.accountants_only:
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        figures["model_round"] = model = model_round(Path(tmp))
    print(f"flooded vs exact aggregate, 8 hospitals: AUC {model['auc_flooded']:.5f} vs {model['auc_exact']:.5f}, "
          f"max weight difference {model['max_weight_difference']:.2e} (flooding std {model['flooding_std']:.2e})")
    print(f"verified decryption of one 8-hospital MLP aggregate at a node: {model['verified_decryption_seconds']:.3f} s; "
          f"signed contribution {model['contribution_bytes']:,.0f} B")
    figures["cohort_cell"] = cell = cohort_cell()
    print(f"count cell at epsilon 1, 3 hospitals: DP se {cell['dp_se_records']:.2f} records, flooding "
          f"{cell['flooding_se_records']:.2f} -> se x{cell['se_inflation']:.4f}")
    figures["evaluation"] = ev = evaluation_costs()
    print(f"DP evaluation at epsilon {ev['evaluation_epsilon']:g} per run (z = {ev['evaluation_noise_multiplier']:.2f}): "
          f"DP-SGD sigma {ev['sigma_with_evaluation']:.4f} vs {ev['sigma_dp_sgd_alone']:.4f} alone "
          f"(x{ev['sigma_ratio']:.3f}); DP AUC RMS error {ev['dp_auc_rms_error']:.4f} on 40,000 records, 8 hospitals")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
