"""A second, real public dataset through the same hospital path (schema, validation,
de-identification, consent, DP training, HE aggregation)."""

from __future__ import annotations

import pandas as pd
import pytest

from clients import encoding
from clients.schema import ExportSchema
from clients.validation import validate_export
from experiments.breast_cancer import PURPOSE, export_breast_cancer
from experiments.simulation import simulate
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
                       sample_rate=0.05, delta=1e-3, target_epsilon=4.0, learning_rate=0.02)
    result = simulate(config)
    assert result.rounds[5]["auc"] > 0.85
    assert all(h["epsilon"] <= 4.0 for h in result.privacy["hospitals"].values())


def test_a_node_whose_export_encodes_to_another_width_is_refused(keys, tmp_path) -> None:
    files, schema_file = export_breast_cancer(tmp_path / "data")
    config = RunConfig(data_dir=str(files[0].parent), schema_file=str(schema_file),
                       keys_dir=str(keys.server_context.parent), run_dir=str(tmp_path / "run"),
                       num_hospitals=3, rounds=1, features="schema", n_features=29, purpose=PURPOSE,
                       sample_rate=0.05, delta=1e-3)
    with pytest.raises(Exception, match="30 model inputs"):
        simulate(config)
