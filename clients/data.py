"""A hospital's records as the model sees them, and where a simulation finds export files.

Reading an export goes through the node (`clients.node_state.NodeState.load_records`):
schema validation, de-identification, consent, then encoding into `HospitalData`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from federation.errors import DataError


@dataclass
class HospitalData:
    """One hospital's consented, encoded records, split into local train and test parts."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    excluded: dict[str, int] = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        """Records DP-SGD trains on."""
        return int(len(self.train_y))


def hospital_files(data_dir: Path) -> list[Path]:
    """Hospital export files in a directory, in name order (`hospital_*.parquet|csv`)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory not found: {data_dir}")
    files = sorted([*data_dir.glob("hospital_*.parquet"), *data_dir.glob("hospital_*.csv")])
    if not files:
        raise DataError(f"{data_dir} holds no hospital_*.parquet or hospital_*.csv files")
    return files
