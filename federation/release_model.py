"""A release as an MLflow pyfunc model: `mlflow.pyfunc.load_model` on a run's `release/`
artifacts, a registry copy (`releases/r3`) or `models:/fedrisk-credit-risk/3` gives a model whose
`predict` turns model inputs into calibrated probabilities and risk bands.

The MLmodel names this module as its loader (`loader_module`), not a pickled Python object:
loading a release runs fedrisk's own code on its `model.npz` (read without pickle) and never code
that came with the files. The weights are checked against `model.sha256` when loaded, so a model
whose weights were changed after release is refused.

Inputs are the model's encoded inputs, one column per input under its name: the 40 columns of
`federation.features.FEATURE_NAMES` for a standard-contract model, the names in `inputs.json`
for a schema-encoded one (`clients.encoding.feature_names`; `input_0`, ... when a release does not
name them). A 2-D array of the right width is read in that order. The output has one row per
input row: `probability` (calibrated, the Platt map is folded into the weights) and `band`
(`federation.model.RISK_BANDS`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from federation.errors import ConfigError

LOADER_MODULE = "federation.release_model"
MLMODEL_FILE = "MLmodel"
MODEL_FILE, DIGEST_FILE = "model.npz", "model.sha256"
INPUTS_FILE = "inputs.json"
"""A schema run's release: what its model reads and predicts, from the federation's export schema
(written beside the release by whoever started the run and held the schema, `engines`)."""
OUTPUT_COLUMNS = ("probability", "band")


def input_names(directory: Path, n_features: int, features: str) -> list[str]:
    """The names of a release's model inputs, in order (see the module docstring)."""
    inputs = Path(directory) / INPUTS_FILE
    if inputs.is_file():
        try:
            names = json.loads(inputs.read_text()).get("features")
        except (OSError, ValueError, AttributeError):
            names = None
        if isinstance(names, list) and len(names) == n_features and all(isinstance(n, str) for n in names):
            return names
    from federation.features import FEATURE_NAMES

    if features == "standard" and n_features == len(FEATURE_NAMES):
        return list(FEATURE_NAMES)
    return [f"input_{i}" for i in range(n_features)]


class ReleasePredictor:
    """A release's model, ready to score (what `mlflow.pyfunc.load_model` wraps)."""

    def __init__(self, directory: Path) -> None:
        from federation.model import load_model, weights_digest

        directory = Path(directory)
        try:
            with np.load(directory / MODEL_FILE, allow_pickle=False) as archive:
                weights = np.asarray(archive["weights"], dtype=np.float32)
                self.kind = str(archive["model"])
                self.n_features = int(archive["n_features"])
                features = str(archive["features"]) if "features" in archive else "standard"
            declared = (directory / DIGEST_FILE).read_text().split()[0]
        except (OSError, KeyError, ValueError, IndexError):
            raise ConfigError(f"{directory}: not a fedrisk release (needs {MODEL_FILE} and {DIGEST_FILE})") from None
        self.sha256 = weights_digest(weights)
        if declared != self.sha256:
            raise ConfigError(f"{directory / MODEL_FILE}: its weights do not match {DIGEST_FILE}; the model was "
                              "changed after release and is not loaded")
        self.inputs = input_names(directory, self.n_features, features)
        self._model = load_model(self.kind, weights, self.n_features)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Calibrated probability and risk band for each row of `model_input` (a DataFrame with the
        input columns, extra columns ignored, or an array of n_features columns)."""
        from federation.model import predict_proba, risk_band

        if isinstance(model_input, pd.DataFrame):
            missing = [name for name in self.inputs if name not in model_input.columns]
            if missing:
                raise ConfigError(f"the model reads {len(self.inputs)} inputs; missing column(s) "
                                  f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
            values = model_input[self.inputs].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float32)
        else:
            values = np.asarray(model_input, dtype=np.float32)
            if values.ndim != 2 or values.shape[1] != self.n_features:
                raise ConfigError(f"the model reads {self.n_features} inputs per row, got shape {values.shape}")
        if not np.isfinite(values).all():
            raise ConfigError("model inputs must be finite numbers (missing values are encoded before scoring)")
        probability = predict_proba(self._model, values).astype(np.float64)
        return pd.DataFrame({"probability": probability, "band": [risk_band(p) for p in probability]},
                            index=model_input.index if isinstance(model_input, pd.DataFrame) else None)


def _load_pyfunc(data_path: str) -> ReleasePredictor:
    """MLflow's entry point: `data_path` is the release's model.npz."""
    return ReleasePredictor(Path(data_path).parent)


def write_mlmodel(directory: Path) -> Path:
    """Make the release directory `directory` (model.npz, model.sha256, inputs.json if any) an MLflow
    pyfunc model: write its MLmodel, with a signature naming the inputs and outputs."""
    directory = Path(directory)
    predictor = ReleasePredictor(directory)
    from mlflow.models import Model, ModelSignature
    from mlflow.pyfunc import add_to_model
    from mlflow.types import ColSpec, Schema

    model = Model()
    add_to_model(model, loader_module=LOADER_MODULE, data=MODEL_FILE)
    model.signature = ModelSignature(inputs=Schema([ColSpec("double", name) for name in predictor.inputs]),
                                     outputs=Schema([ColSpec("double", "probability"), ColSpec("string", "band")]))
    model.metadata = {"fedrisk.sha256": predictor.sha256, "fedrisk.model": predictor.kind}
    path = directory / MLMODEL_FILE
    model.save(str(path))
    return path
