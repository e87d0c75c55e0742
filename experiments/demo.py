"""`fedrisk demo`: the main job on embedded defaults.

Synthesise hospitals, create the federation's CKKS key, train in Flower's simulation engine
with DP-SGD and HE aggregation, audit the release with one DP membership-inference query (as
`fedrisk release audit` does; its table is left under `<out>/audit/queries/` for
`release create --audit`), then put the result next to its reference points (centralized
non-private model, oracle) and the three overhead figures.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from collections.abc import Callable
from typing import Any, TextIO

from federation.config import RunConfig
from federation.errors import ConfigError
from federation.round_evaluation import AUC, SE_SUFFIX

AUDIT_EPSILON = 0.5
"""What each hospital spends on the demo's membership audit (the `release audit` default)."""


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs; every field has the default `fedrisk demo` uses."""

    out: Path | None = None
    hospitals: int = 8
    patients: int = 200_000
    rounds: int = 5
    epsilon: float = 1.0
    delta: float = 1e-6
    model: str = "mlp"
    seed: int = 0
    tracking_uri: str = ""
    overheads: bool = True


def _out_dir(settings: DemoSettings) -> Path:
    out = settings.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} already holds files; choose a new directory")
    return out


def run_demo(settings: DemoSettings, stream: TextIO = sys.stdout,
             working: Callable[[str, int], Any] | None = None) -> dict[str, Any]:
    """Run the demo and return the summary it writes to `summary.json`. working(what, rounds): a
    progress display for the training (a context manager with a `callback`, `cli.progress.Working`);
    default, one printed line per round."""
    from experiments import overheads, reference
    from engines.provisioning import provision_nodes
    from engines.simulation import print_rounds, simulate
    from experiments.synthetic import synthesize
    from federation.he_codec import init_keys

    out = _out_dir(settings)
    created = not out.exists()
    config = RunConfig(data_dir=str(out / "data"), keys_dir=str(out / "keys"), run_dir=str(out),
                       num_hospitals=settings.hospitals, rounds=settings.rounds,
                       target_epsilon=settings.epsilon, delta=settings.delta, model=settings.model,
                       seed=settings.seed, tracking_uri=settings.tracking_uri,
                       min_contributors=min(2, settings.hospitals))
    began = time.perf_counter()
    try:
        stream.write(f"fedrisk demo -> {out}\n")
        stream.write(f"  synthesising {settings.patients:,} patients across {settings.hospitals} hospitals...\n")
        stream.flush()
        synthesis = synthesize(settings.hospitals, settings.patients, out / "data", seed=settings.seed)
        keys = init_keys(out / "keys")
        stream.write(f"  CKKS key {keys.key_id} created (hospitals: {keys.hospital_context.name}, "
                     f"server: {keys.server_context.name}, parameters only)\n")
        nodes = provision_nodes(out / "data", keys.hospital_context, out / "nodes",
                                purposes={config.purpose: (config.provision_budget, config.delta)})
        config = config.replace(nodes_dir=str(out / "nodes"))
        stream.write(f"  {len(nodes)} hospital nodes initialised (schema checked, pseudonym key, "
                     f"budget epsilon={config.provision_budget:g} for {config.purpose}, audit log)\n")
        stream.write(f"  training in Flower's simulation engine: {settings.rounds} rounds, DP-SGD at "
                     f"epsilon={settings.epsilon:g}, delta={settings.delta:g} per hospital, CKKS aggregation\n")
        stream.flush()
        train_began = time.perf_counter()
        if working is None:
            result = simulate(config, progress=print_rounds(stream))
        else:
            with working("training", settings.rounds) as display:
                result = simulate(config, progress=display.callback)
        wall_seconds = time.perf_counter() - train_began
        stream.write("  computing reference points (centralized non-private model, oracle)...\n")
        stream.flush()
        hospitals = reference.load_all(nodes, config.purpose)
        auc_centralized = reference.centralized_auc(hospitals, config.model, seed=config.seed)
        auc_oracle = reference.oracle_auc(nodes, synthesis.truth_path, config.purpose)
        import numpy as np

        from federation.model import load_model, predict_proba
        from server.calibration import Calibration

        released = load_model(config.model, result.weights, config.input_size)
        per_hospital = [(h.test_y, predict_proba(released, h.test_x)) for h in hospitals]
        test_y = np.concatenate([labels for labels, _ in per_hospital])
        scores = np.concatenate([s for _, s in per_hospital])
        pooled_reference = reference.calibration_reference(test_y, scores)
        summary: dict[str, Any] = {
            # the released (calibrated) model on the same held-out records as the references (the demo
            # plays every hospital); the coordinator itself only ever sees the DP evaluation beside it
            "auc_federated": reference.weighted_auc(per_hospital),
            "auc_federated_dp": result.rounds[settings.rounds][AUC],
            "auc_federated_dp_se": result.rounds[settings.rounds].get(AUC + SE_SUFFIX),
            **pooled_reference,
            "calibration": {"method": result.calibration["method"], "slope": result.calibration["slope"],
                            "intercept": result.calibration["intercept"],
                            "mean_se": result.calibration.get("mean_se"),
                            "problem": result.calibration.get("problem", ""),
                            "calibration_in_the_large_uncalibrated": float(
                                Calibration(**result.calibration).invert(scores).mean() - test_y.mean())},
            "bands": reference.band_reference(test_y, scores),
            "auc_centralized": auc_centralized,
            "auc_oracle": auc_oracle,
            "epsilon_by_hospital": {name: h["run_epsilon"] for name, h in result.privacy["hospitals"].items()},
            "delta": settings.delta,
            "rounds": settings.rounds,
            "wall_seconds": wall_seconds,
            "he_overhead_ratio": None,
            "dp_overhead_ratio": None,
            "dp_overhead_ratio_vs_fedrisk_loop": None,
            "ciphertext_expansion": None,
            "mlflow_run_id": result.run_id,
            "tracking_uri": config.mlflow_uri,
            "release_sha256": result.digest,
            "release_dir": result.release_dir,
        }
        stream.write(f"  auditing the release: one DP membership-inference query at every hospital "
                     f"(epsilon {AUDIT_EPSILON:g}, charged to each ledger)...\n")
        stream.flush()
        summary["privacy_audit"] = membership_audit(nodes, keys, out / "audit", result, config,
                                                    accounted=max(summary["epsilon_by_hospital"].values()))
        if settings.overheads:
            stream.write("  measuring overheads side by side (DP vs plain epoch, HE vs plaintext round)...\n")
            stream.flush()
            pooled = reference.pooled(hospitals)
            dp = overheads.dp_overhead(pooled, config)
            summary["dp_overhead_ratio"] = dp.tight.ratio
            summary["dp_overhead_ratio_vs_fedrisk_loop"] = dp.loop.ratio
            he = overheads.he_overhead(nodes, config.replace(rounds=1), repeats=3)
            summary["he_overhead_ratio"] = he.round.ratio
            summary["ciphertext_expansion"] = he.ciphertext_expansion
        summary["total_seconds"] = time.perf_counter() - began
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    stream.write(render_summary(summary))
    return summary


def membership_audit(nodes: list, keys: Any, out: Path, result: Any, config: RunConfig,
                     accounted: float) -> dict[str, Any]:
    """The release's membership audit: the audit query answered by every hospital's own code (charge,
    both splits, noise, CKKS) and decrypted once, in this process as the demo plays every party;
    its table is written as `fedrisk release audit` writes it, and the certificate's figures returned."""
    from engines.analytics import answer_in_process
    from engines.membership_audit import audit_query
    from federation.he_codec import HospitalKey, ServerContext
    from privacy.ledger import GaussianMechanism
    from server.analytics import QueryResult, write_result
    from server.releases.membership import certificate_section, load_audit

    query = audit_query(result.digest, config.model, epsilon=AUDIT_EPSILON, purpose=config.purpose)
    run_id = query.default_run_id()
    table = answer_in_process(nodes, HospitalKey.load(keys.hospital_context), ServerContext.load(config.keys_dir),
                              query, run_id, result.weights)
    z = query.noise_multiplier()
    answered = QueryResult(query, run_id, table, [n.hospital for n in nodes], z,
                           GaussianMechanism.gaussian_release(noise_multiplier=z).epsilon(query.delta))
    path = write_result(answered, out / "queries" / f"{run_id}.csv")[0]
    section = certificate_section(load_audit(path), accounted_epsilon=accounted, delta=config.delta)
    keep = ("auc", "auc_se", "advantage", "epsilon_lower_bound", "confidence", "query_epsilon", "accounted_epsilon")
    return {**{k: section[k] for k in keep}, "table": str(path)}


def render_summary(summary: dict[str, Any]) -> str:
    """The table the demo prints at the end."""
    def fmt(value: Any, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    eps = summary["epsilon_by_hospital"]
    calibration = summary.get("calibration") or {}
    rows = [
        ("AUC, pooled DP evaluation histogram (coordinator)", fmt(summary.get("auc_federated_dp"), ".4f")
         + (f" ± {summary['auc_federated_dp_se']:.4f}" if summary.get("auc_federated_dp_se") else "")),
        ("AUC, per-hospital weighted mean (demo reference)", fmt(summary["auc_federated"], ".4f")),
        ("AUC, pooled held-out records (demo reference)", fmt(summary.get("auc_pooled"), ".4f")),
        ("centralized AUC (pooled, non-private)", fmt(summary["auc_centralized"], ".4f")),
        ("oracle AUC (true risk)", fmt(summary["auc_oracle"], ".4f")),
        ("calibration in the large (predicted - observed)", fmt(summary.get("calibration_in_the_large"), "+.4f")
         + (f" (trained model before calibration {calibration['calibration_in_the_large_uncalibrated']:+.4f})"
            if "calibration_in_the_large_uncalibrated" in calibration else "")),
        ("expected calibration error (10 bins)", fmt(summary.get("ece"), ".4f")),
        ("recalibration", f"not applied: {calibration['problem']}" if calibration.get("problem")
         else f"Platt map from the last DP evaluation (its bootstrap spread {fmt(calibration.get('mean_se'), '.4f')})"),
        ("epsilon per hospital (max)", f"{max(eps.values()):.3f} at delta={summary['delta']:g}"),
        ("membership attack AUC (DP audit of the release)", _audit_line(summary.get("privacy_audit"))),
        ("rounds", str(summary["rounds"])),
        ("training wall time", f"{summary['wall_seconds']:.1f} s"),
        ("DP overhead (DP-SGD epoch / tight plain epoch)", fmt(summary["dp_overhead_ratio"], ".2f") + "x"),
        ("  (against fedrisk's own plain loop)", fmt(summary["dp_overhead_ratio_vs_fedrisk_loop"], ".2f") + "x"),
        ("HE overhead (CKKS round / plaintext round)", fmt(summary["he_overhead_ratio"], ".3f") + "x"),
        ("ciphertext expansion (update / float32)", fmt(summary["ciphertext_expansion"], ".2f") + "x"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = ["", "fedrisk demo summary", "-" * (width + 24)]
    lines += [f"{label:<{width}}  {value}" for label, value in rows]
    for band, row in (summary.get("bands") or {}).items():
        lines.append(f"band {band:<6}  {row['share']:6.1%} of records, predicted {fmt(row['mean_predicted'], '.3f')}, "
                     f"observed {fmt(row['observed_rate'], '.3f')}")
    lines += ["epsilon by hospital: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(eps.items())),
              f"release sha256: {summary['release_sha256']}",
              f"MLflow: {summary['tracking_uri']} (run {summary['mlflow_run_id']})", ""]
    return "\n".join(lines)


def _audit_line(audit: dict[str, Any] | None) -> str:
    if not audit:
        return "n/a"
    auc = "n/a" if audit["auc"] is None else f"{audit['auc']:.4f}"
    se = f" ± {audit['auc_se']:.4f}" if audit.get("auc_se") is not None else ""
    return (f"{auc}{se}, advantage {audit['advantage']:.3f}, epsilon lower bound "
            f"{audit['epsilon_lower_bound']:.3f} ({audit['confidence']:.0%}) vs accounted "
            f"{audit['accounted_epsilon']:.3f}")
