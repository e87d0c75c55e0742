"""Bad input: one clear line naming the file or parameter, a non-zero exit, no traceback,
and nothing left registered."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import tenseal as ts

from federation.he_codec import HOSPITAL_CONTEXT_FILE, SERVER_CONTEXT_FILE, init_keys
from federation.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]


def fedrisk(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI as a user would, in a fresh process."""
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def assert_clean_refusal(result: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, one line on stderr that starts with `fedrisk: error:` and names what is wrong."""
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fedrisk: error: "), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture()
def workspace(federation_data, keys, tmp_path) -> dict[str, Path]:
    """A copy of a good federation (data and keys) to break one piece at a time."""
    data = tmp_path / "data"
    data.mkdir()
    for path in federation_data.files:
        shutil.copy(path, data / path.name)
    key_dir = tmp_path / "keys"
    shutil.copytree(keys.server_context.parent, key_dir)
    return {"data": data, "keys": key_dir, "out": tmp_path / "run"}


def run_args(ws: dict[str, Path], *extra: str) -> list[str]:
    """`fedrisk run` on the workspace."""
    return ["run", "--data", str(ws["data"]), "--keys", str(ws["keys"]), "--out", str(ws["out"]),
            "--hospitals", "3", "--rounds", "1", *extra]


def assert_nothing_registered(ws: dict[str, Path]) -> None:
    """No run directory, MLflow store (the run's or the workspace's) or release was left behind."""
    assert not (ws["out"] / "mlflow.db").exists()
    assert not Workspace.locate().store.exists()
    assert not (ws["out"] / "release").exists()


def _rewrite(path: Path, change) -> None:
    frame = pd.read_parquet(path)
    change(frame).to_parquet(path)


@pytest.mark.parametrize("name,breaker,needles", [
    ("missing file", lambda ws: (ws["data"] / "hospital_01.parquet").unlink(), ["hospital files"]),
    ("unreadable file", lambda ws: (ws["data"] / "hospital_01.parquet").write_bytes(b"not parquet at all"),
     ["hospital_01.parquet", "cannot read"]),
    ("missing column", lambda ws: _rewrite(ws["data"] / "hospital_02.parquet",
                                           lambda f: f.drop(columns=["out_of_pocket"])),
     ["hospital_02.parquet", "out_of_pocket"]),
    ("mistyped column", lambda ws: _rewrite(ws["data"] / "hospital_00.parquet",
                                            lambda f: f.assign(age=f["age"].astype(str) + " years")),
     ["hospital_00.parquet", "'age'"]),
    ("empty hospital", lambda ws: _rewrite(ws["data"] / "hospital_01.parquet", lambda f: f.iloc[0:0]),
     ["hospital_01.parquet", "no records"]),
    ("public context handed to a hospital",
     lambda ws: shutil.copy(ws["keys"] / SERVER_CONTEXT_FILE, ws["keys"] / HOSPITAL_CONTEXT_FILE),
     ["hospital.ckks", "no secret key"]),
    ("secret context handed to the server",
     lambda ws: shutil.copy(ws["keys"] / HOSPITAL_CONTEXT_FILE, ws["keys"] / SERVER_CONTEXT_FILE),
     ["server.ckks", "secret key"]),
    ("server parameters differ", lambda ws: (ws["keys"] / SERVER_CONTEXT_FILE).write_bytes(
        _other_parameters().serialize(save_secret_key=False, save_public_key=False,
                                      save_galois_keys=False, save_relin_keys=False)),
     ["server.ckks", "parameters"]),
    ("hospital key is another federation's", lambda ws: shutil.copy(
        init_keys(ws["out"].parent / "other").hospital_context, ws["keys"] / HOSPITAL_CONTEXT_FILE),
     ["hospital.ckks", "federation.json"]),
])
def test_bad_files_are_refused_cleanly(workspace, name, breaker, needles) -> None:
    breaker(workspace)
    result = fedrisk(*run_args(workspace))
    assert_clean_refusal(result, *needles)
    assert_nothing_registered(workspace)


def _other_parameters() -> ts.Context:
    context = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[40, 20, 40],
                         encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
    context.global_scale = 2 ** 20
    return context


@pytest.mark.parametrize("flags,needle", [
    (["--epsilon", "0"], "target-epsilon"),
    (["--epsilon", "-1"], "target-epsilon"),
    (["--delta", "0"], "delta"),
    (["--delta", "1"], "delta"),
    (["--delta", "1.5"], "delta"),
    (["--sample-rate", "0.03"], "sample-rate"),
])
def test_out_of_range_parameters_are_refused_cleanly(workspace, flags, needle) -> None:
    result = fedrisk(*run_args(workspace, *flags))
    assert_clean_refusal(result, needle)
    assert_nothing_registered(workspace)


def test_delta_not_below_one_over_n_is_refused_before_training(workspace) -> None:
    result = fedrisk(*run_args(workspace, "--delta", "0.01"))
    assert_clean_refusal(result, "delta", "1/(10 n)")
    assert_nothing_registered(workspace)


def test_a_run_that_fails_mid_way_leaves_no_registered_run(federation_data, keys, tmp_path) -> None:
    """An update too large for the codec fails round 1 after the MLflow run was opened."""
    import mlflow

    from engines.provisioning import provision_nodes
    from engines.simulation import simulate
    from federation.config import RunConfig
    from federation.errors import FedriskError

    nodes = provision_nodes(federation_data.files[0].parent, keys.hospital_context, tmp_path / "nodes",
                            purposes={"credit-risk-research": (10.0, 1e-5)})
    config = RunConfig(nodes_dir=str(tmp_path / "nodes"), keys_dir=str(keys.server_context.parent),
                       run_dir=str(tmp_path / "run"), num_hospitals=3, rounds=1, learning_rate=50.0)
    with pytest.raises(FedriskError, match="range"):
        simulate(config)
    client = mlflow.tracking.MlflowClient(tracking_uri=config.mlflow_uri)
    experiment = client.get_experiment_by_name(config.experiment)
    assert experiment is not None, "the run was opened before it failed"
    assert client.search_runs([experiment.experiment_id]) == []
    assert not (tmp_path / "run" / "release").exists()
    with nodes[0].ledger() as ledger:
        assert len(ledger.history("credit-risk-research")) == 1, "round 1 was charged before it trained"


def test_a_provisioned_simulation_that_fails_leaves_no_run_directory(federation_data, keys, tmp_path) -> None:
    from engines.simulation import simulate
    from federation.config import RunConfig
    from federation.errors import FedriskError

    config = RunConfig(data_dir=str(federation_data.files[0].parent), keys_dir=str(keys.server_context.parent),
                       run_dir=str(tmp_path / "run"), num_hospitals=3, rounds=1, learning_rate=50.0)
    with pytest.raises(FedriskError, match="range"):
        simulate(config)
    assert not (tmp_path / "run").exists()
