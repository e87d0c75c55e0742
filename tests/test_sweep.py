"""The privacy-utility sweep (experiments.sweep) on tiny settings: 2 epsilons x logreg x the
synthetic federation, 2 hospitals of 500 patients, 1 round. Integration tier (real engine)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from experiments import sweep

EPSILONS = (1.0, 4.0)
TINY = ["--epsilons", "1,4", "--models", "logreg", "--federations", "synthetic", "--hospitals", "2",
        "--patients", "1000", "--rounds", "1"]
PNGS = ("auc_vs_epsilon.png", "calibration_synthetic.png")


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, pd.DataFrame]:
    base = tmp_path_factory.mktemp("sweep")
    out, work = base / "out", base / "work"
    assert sweep.main([*TINY, "--out", str(out), "--work", str(work)]) == 0
    return out, work, pd.read_csv(out / "table.csv", keep_default_na=False, na_values=[""])


def test_one_experiment_holds_one_run_per_federation_model_epsilon(swept) -> None:
    _, work, table = swept
    from server.tracking import quiet_mlflow

    client = quiet_mlflow().tracking.MlflowClient(f"sqlite:///{(work / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name(sweep.EXPERIMENT)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert sorted((r.data.params["federation"], r.data.params["model"], float(r.data.params["epsilon"]))
                  for r in runs) == [("synthetic", "logreg", e) for e in EPSILONS]
    assert {r.info.status for r in runs} == {"FINISHED"}
    others = [e for e in client.search_experiments() if e.experiment_id != experiment.experiment_id]
    assert all(not client.search_runs([e.experiment_id]) for e in others), "every sweep run is in the one experiment"
    assert sorted(r.info.run_id for r in runs) == sorted(table["mlflow_run_id"])
    for run in runs:
        assert 0.0 < run.data.metrics["sweep.auc_weighted_mean"] <= 1.0
        assert "sweep.ece" in run.data.metrics and "sweep.calibration_in_the_large" in run.data.metrics
        assert float(run.data.params["target-epsilon"]) == float(run.data.params["epsilon"])


def test_table_has_every_row_with_labelled_auc_columns(swept) -> None:
    out, _, table = swept
    assert list(table.columns) == list(sweep.COLUMNS)
    assert sorted(zip(table["federation"], table["model"], table["epsilon"])) == [
        ("synthetic", "logreg", e) for e in EPSILONS]
    for column in ("auc_weighted_mean", "auc_pooled", "auc_centralized"):
        assert table[column].between(0.0, 1.0).all(), column
    assert pd.api.types.is_float_dtype(table["auc_dp_pooled"]) and pd.api.types.is_float_dtype(table["auc_dp_pooled_se"])
    assert (table["epsilon_run_max"] <= table["epsilon"] + 1e-9).all()
    md = (out / "table.md").read_text()
    assert "`auc_dp_pooled`: AUC, pooled DP evaluation histogram" in md
    assert "`auc_weighted_mean`: AUC of the released model, per-hospital held-out records, weighted mean" in md
    assert md.count("| synthetic | logreg |") == len(EPSILONS)


def test_plots_exist_and_are_pngs(swept) -> None:
    out, _, _ = swept
    for name in PNGS:
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data.startswith(b"\x89PNG"), name


@pytest.mark.parametrize("args, flag", [
    (["--epsilons", "1,zero"], "--epsilons"),
    (["--epsilons", "-1"], "--epsilons"),
    (["--epsilons", "1,1"], "--epsilons"),
    (["--models", "forest"], "--models"),
    (["--federations", "mars"], "--federations"),
    (["--rounds", "0"], "--rounds"),
    (["--hospitals", "1"], "--hospitals"),
    (["--patients", "10"], "--patients"),
])
def test_bad_arguments_are_refused_in_one_line(args, flag, tmp_path, capsys) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    assert sweep.main([*args, "--out", str(out), "--work", str(work)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sweep: error: ") and flag in err, err
    assert not out.exists() and not work.exists()


def test_a_non_empty_out_is_refused_and_kept(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert sweep.main(["--out", str(out), "--work", str(tmp_path / "work")]) == 2
    assert "--out" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and not (tmp_path / "work").exists()


def test_the_command_exits_2_in_one_line(tmp_path) -> None:
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "experiments.sweep", "--rounds", "three", "--out", str(out),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--rounds" in done.stderr, done.stderr
    assert not out.exists()
