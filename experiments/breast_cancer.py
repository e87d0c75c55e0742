"""A second, real public dataset through the same hospital path: scikit-learn's Wisconsin
breast-cancer data (569 patients, 30 tumour measurements), split across hospitals.

Each hospital gets a CSV export with a record key, consent columns and the label, plus one
shared export schema (`breast_cancer_schema.yaml`) whose numeric bounds are the dataset's public
ranges rounded outward. Runs use `features = "schema"` with 30 inputs and the purpose
`clinical-research`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from sklearn.datasets import load_breast_cancer

from federation.errors import ConfigError

PURPOSE = "clinical-research"
SCHEMA_FILE = "breast_cancer_schema.yaml"


def _slug(name: str) -> str:
    return name.replace(" ", "_")


def export_breast_cancer(out_dir: Path, hospitals: int = 3, seed: int = 0) -> tuple[list[Path], Path]:
    """Write `hospitals` CSV exports and the shared schema; returns (files, schema path)."""
    if not 2 <= hospitals <= 5:
        raise ConfigError(f"hospitals must be 2 to 5 for 569 patients, got {hospitals}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.glob("hospital_*")):
        raise ConfigError(f"{out_dir} already holds hospital files")
    data = load_breast_cancer(as_frame=True)
    frame = data.frame.rename(columns={c: _slug(c) for c in data.frame.columns})
    rng = np.random.default_rng(seed)
    frame["malignant"] = (frame.pop("target") == 0).astype(int)
    frame.insert(0, "record_id", [f"BC-{i:05d}" for i in rng.permutation(90_000)[:len(frame)] + 10_000])
    frame["consent_research"] = rng.random(len(frame)) > 0.04
    frame["consent_recorded_on"] = pd.Timestamp("2025-01-01") + pd.to_timedelta(rng.integers(0, 365, len(frame)), "D")
    shares = rng.dirichlet(np.full(hospitals, 4.0))
    owner = rng.choice(hospitals, size=len(frame), p=shares)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(hospitals):
        path = out_dir / f"hospital_{k:02d}.csv"
        frame[owner == k].to_csv(path, index=False, date_format="%Y-%m-%d")
        files.append(path)
    columns: dict[str, dict] = {"record_id": {"role": "record-key", "class": "identity"}}
    for name in data.feature_names:
        values = frame[_slug(name)]
        span = float(values.max() - values.min())
        columns[_slug(name)] = {"role": "feature", "class": "diagnosis-treatment", "type": "numeric",
                                "min": float(np.floor(values.min() - 0.1 * span)),
                                "max": float(np.ceil(values.max() + 0.1 * span))}
    columns["malignant"] = {"role": "label", "class": "diagnosis-treatment"}
    columns["consent_research"] = {"role": "consent", "class": "identity", "purpose": PURPOSE}
    columns["consent_recorded_on"] = {"role": "consent-date", "class": "identity"}
    schema = out_dir / SCHEMA_FILE
    schema.write_text("# Export schema of the breast-cancer walkthrough (experiments/breast_cancer.py).\n"
                      + yaml.safe_dump({"version": 1, "consent-validity-days": {PURPOSE: 3650},
                                        "intended-use": ("Research on tumour classification from fine-needle "
                                                         "aspirate measurements; not a diagnostic device."),
                                        "label-description": "the tumour was malignant (1) or benign (0)",
                                        "columns": columns}, sort_keys=False))
    return files, schema
