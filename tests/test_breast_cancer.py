"""A second, real public dataset through the same hospital path (schema, validation,
de-identification, consent, DP training, HE aggregation)."""

from __future__ import annotations

import pandas as pd
import pytest

from clients import encoding
from clients.schema import ExportSchema
from clients.validation import validate_export
from experiments.breast_cancer import PURPOSE, export_breast_cancer
from engines.simulation import simulate
from federation.config import RunConfig

pytestmark = pytest.mark.slow


def test_breast_cancer_exports_validate_and_encode_from_their_schema(tmp_path) -> None:
    files, schema_file = export_breast_cancer(tmp_path / "data")
    schema = ExportSchema.load(schema_file)
    total = sum(len(validate_export(path, schema).table) for path in files)
    assert total == 569
    table = pd.read_csv(files[0])
    x = encoding.encode(table, schema, PURPOSE)
    assert x.shape == (len(table), 30)
    assert x.min() >= -1 and x.max() <= 1


def test_breast_cancer_federation_learns_under_dp_and_he(keys, tmp_path) -> None:
    files, schema_file = export_breast_cancer(tmp_path / "data")
    config = RunConfig(data_dir=str(files[0].parent), schema_file=str(schema_file),
                       keys_dir=str(keys.server_context.parent), run_dir=str(tmp_path / "run"),
                       num_hospitals=3, rounds=5, features="schema", n_features=30, purpose=PURPOSE,
                       sample_rate=0.05, delta=2e-4, target_epsilon=4.0, learning_rate=0.02)
    result = simulate(config)
    from pathlib import Path

    import numpy as np

    from clients.evaluation import risk_metrics
    from clients.node_state import NodeState
    from federation.model import load_model, predict_proba

    held_out = [s.load_records(PURPOSE, features="schema") for s in NodeState.discover(Path(config.run_dir) / "nodes")]
    x = np.concatenate([h.test_x for h in held_out])
    y = np.concatenate([h.test_y for h in held_out])
    auc = risk_metrics(y, predict_proba(load_model(config.model, result.weights, 30), x))["auc"]
    assert auc > 0.85, f"released model's AUC {auc:.3f} on the hospitals' held-out records"
    assert all(h["run_epsilon"] <= 4.0 for h in result.privacy["hospitals"].values())


def test_a_node_whose_export_encodes_to_another_width_is_refused(keys, tmp_path) -> None:
    files, schema_file = export_breast_cancer(tmp_path / "data")
    config = RunConfig(data_dir=str(files[0].parent), schema_file=str(schema_file),
                       keys_dir=str(keys.server_context.parent), run_dir=str(tmp_path / "run"),
                       num_hospitals=3, rounds=1, features="schema", n_features=29, purpose=PURPOSE,
                       sample_rate=0.05, delta=2e-4)
    with pytest.raises(Exception, match="30 model inputs"):
        simulate(config)
