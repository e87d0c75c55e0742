"""Deployment vs simulation: round latency and bytes on the wire per hospital per round.

Runs the same federation (3 hospitals, the same data, node directories, keys and run id) in
Flower's simulation engine and on its deployment engine (a SuperLink and three SuperNodes on
loopback, TLS and SuperNode authentication), one model after the other, and prints both side
by side. Models: the demo's MLP (4,737 parameters), a 251k-parameter MLP (40-500-460-1) and a
1M-parameter MLP (40-1000-960-1, 1,002,921 parameters), where CKKS starts to cost. It ends with
one line, `deployment/simulation round ratio: <x>`, for the first model.

Each hospital runs as in production: its node service (`fedrisk node serve`) holds the node
directory and its SuperNode, as another user where the machine allows, relays to it.

Run: `.venv/bin/python bench/deployment.py [--rounds 2] [--patients 4500] [--models mlp,mlp:1000,960]
[--json FILE]`. Takes about 10 minutes on 2 cores.

Bytes are the serialised ciphertexts a hospital sends (up) and receives (down: the chain of
encrypted aggregates it replays, plus the census total), as counted by the server; Flower's own
framing (HTTP/TLS, record headers) comes on top. Round seconds are the server's wall time for
one round: training, aggregation, evaluation and the reveal of the summed metrics.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engines.deployment import LocalDeployment  # noqa: E402
from engines.provisioning import provision_nodes  # noqa: E402
from engines.simulation import simulate  # noqa: E402
from experiments.synthetic import synthesize  # noqa: E402
from engines.credentials import init_credentials  # noqa: E402
from federation.config import RunConfig  # noqa: E402
from federation.he_codec import init_keys  # noqa: E402
from federation.model import num_parameters  # noqa: E402
from server.tracking import ROUND_BYTES_DOWN, ROUND_BYTES_UP, ROUND_SECONDS  # noqa: E402

PURPOSE = "credit-risk-research"
NOOP_APP = ROOT / "bench" / "noop_app"


def _per_round(summary: dict) -> dict[str, float]:
    rounds = list(summary.values())
    mean = lambda key: sum(float(r[key]) for r in rounds) / len(rounds)  # noqa: E731
    return {"round_seconds": mean(ROUND_SECONDS), "bytes_up": mean(ROUND_BYTES_UP),
            "bytes_down": mean(ROUND_BYTES_DOWN)}


def measure(root: Path, model: str, rounds: int, patients: int) -> dict[str, object]:
    """One model: simulation, then deployment, on identical copies of the same nodes."""
    report = synthesize(3, patients, root / "data", seed=5)
    hospitals = [p.stem for p in report.files]
    keys = init_keys(root / "keys")
    provision_nodes(root / "data", keys.hospital_context, root / "nodes", purposes={PURPOSE: (10.0, 1e-5)})
    shutil.copytree(root / "nodes", root / "sim-nodes")
    run_id = f"bench-{model.replace(':', '-').replace(',', '-')}"

    began = time.perf_counter()
    sim = simulate(RunConfig(nodes_dir=str(root / "sim-nodes"), keys_dir=str(keys.server_context.parent),
                             run_dir=str(root / "sim-run"), num_hospitals=3, rounds=rounds, model=model,
                             run_id=run_id))
    sim_seconds = time.perf_counter() - began

    credentials = init_credentials(root / "creds", hospitals, ["127.0.0.1"])
    with LocalDeployment(root / "work", credentials) as deployment:
        separation = deployment.separation
        deployment.start_superlink()
        for hospital in hospitals:
            deployment.register(hospital)
            deployment.start_supernode(hospital, root / "nodes" / hospital)
        deployment.wait_online(hospitals)
        began = time.perf_counter()
        run = deployment.submit({"keys-dir": str(keys.server_context.parent), "run-dir": str(root / "dep-run"),
                                 "nodes-dir": "", "num-hospitals": 3, "rounds": rounds, "model": model,
                                 "run-id": run_id, "round-timeout": 1800.0})
        status = deployment.wait_run(run, timeout=3600)
        dep_seconds = time.perf_counter() - began
        floor = _message_floor(deployment, root / "noop.json", len(hospitals)) if status.completed else None
    result: dict[str, object] = {
        "model": model, "parameters": num_parameters(model, 40), "rounds": rounds,
        "simulation": {**_per_round({str(k): v for k, v in sim.rounds.items()}), "run_seconds": sim_seconds}}
    if not status.completed:  # reported, not raised: where the deployment breaks is a finding too
        result["deployment_failure"] = f"{status.status}: {status.details} (after {dep_seconds:.0f} s)"
        return result
    dep_summary = json.loads((root / "dep-run" / "release" / "run_summary.json").read_text())
    deployed = np.load(root / "dep-run" / "release" / "model.npz")["weights"]
    result["deployment"] = {**_per_round(dep_summary["rounds"]), "run_seconds": dep_seconds}
    result["max_abs_weight_difference"] = float(np.max(np.abs(deployed - sim.weights)))
    result["flower_message_round_trip_seconds"] = floor
    result["separation"] = separation
    return result


def _message_floor(deployment: LocalDeployment, out: Path, nodes: int, rounds: int = 5) -> float:
    """Median wall time of one message to every SuperNode and back, with a ClientApp that does
    nothing (bench/noop_app): the deployment engine's own cost per sequential message."""
    run = deployment.submit({"out": str(out), "nodes": nodes, "rounds": rounds}, app_dir=NOOP_APP)
    status = deployment.wait_run(run, timeout=900)
    if not status.completed:
        raise RuntimeError(f"the no-op app failed: {status.status} {status.details}")
    return float(np.median(json.loads(out.read_text())["round_trip_seconds"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--patients", type=int, default=4500)
    parser.add_argument("--models", default="mlp;mlp:500,460;mlp:1000,960", help="';'-separated model specs")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    results = []
    for model in args.models.split(";"):
        with tempfile.TemporaryDirectory(prefix="fedrisk-bench-deploy-") as tmp:
            results.append(measure(Path(tmp), model, args.rounds, args.patients))
        r = results[-1]
        print(f"\nmodel {r['model']} ({r['parameters']:,} parameters), {r['rounds']} rounds, 3 hospitals")
        if "deployment_failure" in r:
            s = r["simulation"]
            print(f"simulation: round {s['round_seconds']:.1f} s, up {s['bytes_up'] / 1e6:.3f} MB, "
                  f"down {s['bytes_down'] / 1e6:.3f} MB per hospital per round")
            print(f"deployment failed: {r['deployment_failure']}")
            continue
        s, d = r["simulation"], r["deployment"]
        print(f"{'':26}{'simulation':>14}{'deployment':>14}{'ratio':>8}")
        for key, label, unit in (("round_seconds", "round latency", "s"), ("bytes_up", "bytes up / hosp / round", "B"),
                                 ("bytes_down", "bytes down / hosp / round", "B"), ("run_seconds", "whole run", "s")):
            fmt = (lambda v: f"{v:,.1f} s") if unit == "s" else (lambda v: f"{v / 1e6:,.3f} MB")
            print(f"{label:26}{fmt(s[key]):>14}{fmt(d[key]):>14}{d[key] / s[key]:>7.2f}x")
        print(f"max |deployed - simulated| weight: {r['max_abs_weight_difference']:.2e}")
        floor = r["flower_message_round_trip_seconds"]
        print(f"Flower's own round trip for one message (no-op ClientApp): {floor:.1f} s; a fedrisk round sends "
              f"3 in sequence (train, evaluate, reveal): {3 * floor:.1f} s of the deployed round")
        print(f"SuperNodes: {r['separation']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    first = results[0]
    if "deployment" in first:
        ratio = first["deployment"]["round_seconds"] / first["simulation"]["round_seconds"]
        print(f"deployment/simulation round ratio: {ratio:.2f}")
    else:
        print(f"deployment/simulation round ratio: n/a ({first['deployment_failure']})")


if __name__ == "__main__":
    main()
