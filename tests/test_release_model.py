"""A release as an MLflow pyfunc model (`federation.release_model`) and the workspace that tracks
runs and releases in one store (`federation.workspace`): what a bank loading a model, or a user
running commands in a directory, would notice."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from federation.errors import ConfigError, FedriskError
from federation.features import FEATURE_NAMES
from federation.model import RISK_BANDS, initial_weights, load_model, predict_proba, risk_band, weights_digest
from federation.release_model import ReleasePredictor, write_mlmodel
from federation.workspace import WORKSPACE_ENV, Workspace, artifact_root, record_registry_store, registry_store


def _release(directory: Path, *, n_features: int = len(FEATURE_NAMES), features: str = "standard") -> np.ndarray:
    directory.mkdir(parents=True, exist_ok=True)
    weights = initial_weights("mlp", seed=3, n_features=n_features).astype(np.float32)
    np.savez(directory / "model.npz", weights=weights, model="mlp", n_features=n_features, features=features,
             purpose="credit-risk-research")
    (directory / "model.sha256").write_text(weights_digest(weights) + "\n")
    return weights


def test_a_release_loads_with_mlflow_pyfunc_and_scores_named_inputs(tmp_path: Path) -> None:
    import mlflow

    weights = _release(tmp_path / "r1")
    write_mlmodel(tmp_path / "r1")
    loaded = mlflow.pyfunc.load_model(str(tmp_path / "r1"))
    assert loaded.metadata.get_input_schema().input_names() == list(FEATURE_NAMES)
    x = np.random.default_rng(1).uniform(-1, 1, (64, len(FEATURE_NAMES))).astype(np.float32)
    frame = pd.DataFrame(x, columns=FEATURE_NAMES)
    scored = loaded.predict(frame[list(reversed(FEATURE_NAMES))])  # columns are matched by name, not position
    expected = predict_proba(load_model("mlp", weights), x)
    assert np.allclose(scored["probability"], expected, atol=1e-6)
    assert list(scored["band"]) == [risk_band(p) for p in expected]
    assert np.allclose(ReleasePredictor(tmp_path / "r1").predict(x)["probability"], expected, atol=1e-6)


def test_a_tampered_release_is_refused_on_load(tmp_path: Path) -> None:
    weights = _release(tmp_path / "r1")
    write_mlmodel(tmp_path / "r1")
    np.savez(tmp_path / "r1" / "model.npz", weights=weights * 1.5, model="mlp", n_features=len(FEATURE_NAMES))
    with pytest.raises(ConfigError, match="do not match model.sha256"):
        ReleasePredictor(tmp_path / "r1")


def test_wrong_inputs_get_one_clear_error(tmp_path: Path) -> None:
    _release(tmp_path / "r1", n_features=5, features="schema")
    predictor = ReleasePredictor(tmp_path / "r1")
    assert predictor.inputs == [f"input_{i}" for i in range(5)]  # an unnamed schema release numbers its inputs
    with pytest.raises(ConfigError, match="missing column"):
        predictor.predict(pd.DataFrame({"input_0": [0.1]}))
    with pytest.raises(ConfigError, match="5 inputs per row"):
        predictor.predict(np.zeros((2, 4)))
    with pytest.raises(ConfigError, match="finite"):
        predictor.predict(np.full((1, 5), np.nan))


def test_bands_follow_the_contract_edges() -> None:
    for name, lower, upper in RISK_BANDS:
        assert risk_band(lower) == name
        assert risk_band(np.nextafter(upper, 0.0)) == name
    assert risk_band(1.0) == RISK_BANDS[-1][0]


def test_the_workspace_is_the_flag_else_the_environment_else_the_current_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WORKSPACE_ENV, str(tmp_path / "env"))
    assert Workspace.locate(tmp_path / "flag").root == (tmp_path / "flag").resolve()
    assert Workspace.locate().root == (tmp_path / "env").resolve()
    monkeypatch.delenv(WORKSPACE_ENV)
    monkeypatch.chdir(tmp_path)
    workspace = Workspace.locate()
    assert workspace.root == tmp_path.resolve() and workspace.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert artifact_root(workspace.tracking_uri) == tmp_path.resolve() / "mlartifacts"
    assert artifact_root("http://tracking.example:5000") is None
    assert registry_store(workspace.registry_dir, workspace.tracking_uri) == workspace.tracking_uri  # a new one
    workspace.registry_dir.mkdir()
    record_registry_store(workspace.registry_dir, workspace.tracking_uri)
    assert '"sqlite:///../mlflow.db"' in (workspace.registry_dir / "registry.json").read_text()  # moves with it
    assert registry_store(workspace.registry_dir, "sqlite:////elsewhere.db") == workspace.tracking_uri
    (workspace.registry_dir / "registry.json").unlink()
    (workspace.registry_dir / "registry.db").write_bytes(b"")  # a registry made before workspaces keeps its own
    assert registry_store(workspace.registry_dir, workspace.tracking_uri).endswith("/releases/registry.db")


def test_reading_an_empty_workspace_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    monkeypatch.setenv(WORKSPACE_ENV, str(tmp_path))
    assert main(["release", "list"]) == 2
    assert "no release registry there" in capsys.readouterr().err
    assert main(["release", "create", "0" * 32, "--no-audit", "x"]) == 2
    assert "no MLflow store in the workspace" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
