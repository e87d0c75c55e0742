"""A new user's path from someone else's CSV files to a release, with only documented commands:
draft a schema, check it, check a node, train, evaluate, approve, release, and read the card (the
membership audit of a schema run is walked through by notebooks/data_to_release.ipynb).

The breast-cancer exports stand in for the user's own data; their shipped schema is deleted, so
the schema the run uses is the one `fedrisk node schema init` drafted (plus the two lines a
reviewer writes: what the model is for, what the label means)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from federation.model import RISK_BANDS, load_model, predict_proba

ROOT = Path(__file__).resolve().parents[1]
PURPOSE = "clinical-research"


def fedrisk(*argv: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "cli.main", *argv], cwd=cwd, capture_output=True, text=True,
                            timeout=900, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    if ok:
        assert result.returncode == 0, f"fedrisk {' '.join(argv)}:\n{result.stderr[-1500:]}"
    assert "Traceback" not in result.stderr, result.stderr[-1500:]
    return result


def test_from_someone_elses_csv_to_a_release_with_documented_commands(tmp_path: Path) -> None:
    fedrisk("data", "breast-cancer", "--out", "data", cwd=tmp_path)
    (tmp_path / "data" / "breast_cancer_schema.yaml").unlink()
    exports = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "data").glob("hospital_*.csv"))

    drafted = fedrisk("node", "schema", "init", *(a for f in exports for a in ("--data", f)), "--label", "malignant",
                      "--purpose", PURPOSE, "--out", "schema.yaml", cwd=tmp_path)
    assert "consent purposes: clinical-research" in drafted.stdout
    schema = (tmp_path / "schema.yaml").read_text()
    schema = schema.replace("intended-use: ''", "intended-use: 'Tumour classification research; not a diagnosis'")
    schema = schema.replace("label-description: ''", "label-description: 'malignant (1) or benign (0)'")
    (tmp_path / "schema.yaml").write_text(schema)
    for export in exports:
        assert "valid against" in fedrisk("node", "check", export, "--schema", "schema.yaml", cwd=tmp_path).stdout

    fedrisk("keys", "init", "--out", "keys", cwd=tmp_path)
    run = fedrisk("run", "--data", "data", "--schema", "schema.yaml", "--features", "schema", "--purpose", PURPOSE,
                  "--keys", "keys", "--out", "run", "--hospitals", "3", "--rounds", "2", "--sample-rate", "0.05",
                  "--delta", "2e-4", "--epsilon", "4", "--learning-rate", "0.02", cwd=tmp_path)
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", run.stdout).group(1)  # type: ignore[union-attr]
    assert (tmp_path / "mlflow.db").is_file() and not (tmp_path / "run" / "mlflow.db").exists()  # the workspace's
    assert "plot: run/plots/training.png" in run.stdout
    assert (tmp_path / "run" / "plots" / "training.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "run").rename(tmp_path / "moved")  # the store, not the run directory, records the run
    ready = fedrisk("node", "check", "--dir", "moved/nodes/hospital_00", "--features", "schema", "--purpose", PURPOSE,
                    "--epsilon", "1", "--delta", "2e-4", "--sample-rate", "0.05", cwd=tmp_path)
    assert "model inputs: 30 (" in ready.stdout and "ready:" in ready.stdout  # budget left for more after the run

    evaluation = fedrisk("release", "evaluate", "--run-dir", "moved", "--nodes", "moved/nodes", "--keys", "keys",
                         "--hospitals", "3", cwd=tmp_path)
    tables = re.findall(r"--evaluation (\S+)", evaluation.stdout)
    assert (tmp_path / "moved" / "evaluation" / "plots" / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    assert tables and "purpose clinical-research" in evaluation.stdout
    for role, approver in (("data-scientist", ["--by", "Dana Data"]),
                           ("hospital-operator", ["--by", "Hank Ops", "--hospital", "hospital_00"])):
        fedrisk("release", "approve", run_id, "--role", role, *approver, cwd=tmp_path)  # two people, two roles
    create = [*("release", "create", run_id),
              *(a for t in tables for a in ("--evaluation", t)), "--no-audit", "first release of a pilot"]
    refused = fedrisk(*create, cwd=tmp_path, ok=False)  # ~115 held-out records: too noisy to calibrate
    assert refused.returncode == 2 and "--accept-miscalibration" in refused.stderr
    fedrisk(*create, "--accept-miscalibration", "about 115 held-out records, too few to calibrate under DP",
            cwd=tmp_path)
    shown = json.loads(fedrisk("release", "show", "r1", cwd=tmp_path).stdout)
    card = shown["model_card"]
    assert card["intended_use"] == "Tumour classification research; not a diagnosis"
    assert card["features"][0]["inputs"][:2] == ["mean_radius", "mean_texture"] and card["n_features"] == 30
    assert any("'malignant': malignant (1) or benign (0)" in line for line in card["limitations"])
    assert not any("delinquency" in line for line in [card["intended_use"], *card["limitations"]])
    assert shown["certificate"]["privacy_audit"]["reason"] == "first release of a pilot"
    assert [(a["role"], a["by"]) for a in shown["certificate"]["approvals"]] == [
        ("data-scientist", "Dana Data"), ("hospital-operator", "Hank Ops")]

    # one store: the run, its evaluation, and the registered release side by side
    import mlflow

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.tracking.MlflowClient(tracking_uri=store, registry_uri=store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run_id in {r.info.run_id for r in runs} and len(runs) >= 2
    assert {"plots/training.png"} <= {a.path for a in client.list_artifacts(run_id, "plots")}
    assert any("plots/calibration.png" in {a.path for a in client.list_artifacts(r.info.run_id, "plots")}
               for r in runs if r.info.run_id != run_id)  # the evaluation's run
    assert [v.run_id for v in client.search_model_versions("name='fedrisk-credit-risk'")] == [run_id]

    # a bank loads the release with MLflow alone and scores encoded inputs as the node's model does
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    try:
        loaded = mlflow.pyfunc.load_model("models:/fedrisk-credit-risk/1")
    finally:
        mlflow.set_tracking_uri("")
        mlflow.set_registry_uri("")
    names = loaded.metadata.get_input_schema().input_names()
    assert len(names) == 30 and names[:2] == ["mean_radius", "mean_texture"]
    rows = pd.DataFrame(np.random.default_rng(0).uniform(-1, 1, (50, len(names))), columns=names)
    scored = loaded.predict(rows)
    with np.load(tmp_path / "releases" / "releases" / "r1" / "model.npz") as npz:
        model = load_model(str(npz["model"]), npz["weights"], int(npz["n_features"]))
    assert np.allclose(scored["probability"], predict_proba(model, rows.to_numpy(np.float32)), atol=1e-6)
    assert set(scored["band"]) <= {name for name, _, _ in RISK_BANDS}
