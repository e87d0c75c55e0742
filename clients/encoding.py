"""Model inputs for exports that bring their own features (`features = "schema"` runs).

The standard credit-risk model reads the fixed 40-input contract in `federation.features`.
A federation with other data (the breast-cancer walkthrough, a new registry) instead agrees on
one export schema, and every hospital encodes the schema's training columns the same way,
using only what the schema publishes, never statistics of its own data:

* numeric: scaled from the declared `scale` (or, without one, the validation bounds [min, max])
  onto [-1, 1], on log(1 + x) when the scale says `log`, clipped; missing -> 0;
* boolean: 0 / 1; missing -> 0;
* categorical: one-hot over the declared `categories`; unknown -> all zeros.

Dates and categorical columns without declared categories cannot be encoded this way and are
refused when the schema is loaded for such a run.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from clients.schema import ColumnSpec, ExportSchema, Scaling
from federation.errors import DataError


def _encodable(spec: ColumnSpec) -> None:
    if spec.type == "numeric" and spec.scale is None and (spec.minimum is None or spec.maximum is None):
        raise DataError(f"{spec.name}: numeric features of a schema-encoded run need min and max "
                        "(or a 'scale: {min: A, max: B}' for the model)")
    if spec.type == "categorical" and not spec.categories:
        raise DataError(f"{spec.name}: categorical features of a schema-encoded run need categories")
    if spec.type not in ("numeric", "boolean", "categorical"):
        raise DataError(f"{spec.name}: a {spec.type} column cannot be a model input of a schema-encoded run")


def input_columns(schema: ExportSchema, purpose: str) -> list[ColumnSpec]:
    """The schema's training columns for `purpose`, each checked to be encodable."""
    specs = [schema.column(name) for name in schema.training_columns(purpose)]
    for spec in specs:
        _encodable(spec)
    return specs


def feature_names(schema: ExportSchema, purpose: str) -> list[str]:
    """Names of the model inputs, in order (one per numeric/boolean column, one per category)."""
    names: list[str] = []
    for spec in input_columns(schema, purpose):
        if spec.type == "categorical":
            names += [f"{spec.target}={category}" for category in spec.categories or ()]
        else:
            names.append(spec.target)
    return names


def encode(table: pd.DataFrame, schema: ExportSchema, purpose: str) -> np.ndarray:
    """Encode a de-identified table (columns under their `target` names) as float32 inputs."""
    parts: list[np.ndarray] = []
    for spec in input_columns(schema, purpose):
        column = table[spec.target]
        if spec.type == "numeric":
            scale = spec.scale or Scaling(float(spec.minimum), float(spec.maximum))
            values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
            low, high = scale.low, scale.high
            if scale.log:
                values, low, high = np.log1p(np.maximum(values, low)), np.log1p(low), np.log1p(high)
            scaled = np.clip(2.0 * (values - low) / max(high - low, 1e-12) - 1.0, -1.0, 1.0)
            parts.append(np.nan_to_num(scaled, nan=0.0)[:, None])
        elif spec.type == "boolean":
            parts.append(column.astype("boolean").fillna(False).to_numpy(dtype=np.float64)[:, None])
        else:
            text = column.astype("string")
            parts.append(np.stack([(text == c).fillna(False).to_numpy(dtype=np.float64)
                                   for c in spec.categories or ()], axis=1))
    return np.concatenate(parts, axis=1).astype(np.float32) if parts else np.zeros((len(table), 0), np.float32)


def model_inputs(table: pd.DataFrame, schema: ExportSchema, purpose: str,
                 features: str = "standard") -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of a de-identified table as a model of `features` reads them: the standard
    40-input contract, or ("schema") this schema's encoding for `purpose` and its label. The one
    place training, scored queries and `node check` encode records."""
    if features == "schema":
        return encode(table, schema, purpose), labels(table, schema)
    from federation import features as fx

    return fx.encode_features(table), fx.encode_labels(table)


def labels(table: pd.DataFrame, schema: ExportSchema) -> np.ndarray:
    """The label column as float32 0/1."""
    return pd.to_numeric(table[schema.column(schema.label).target]).to_numpy(dtype=np.float32)
