"""A hospital's records as the model sees them, and where a simulation finds export files.

Reading an export goes through the node (`clients.node_state.NodeState.load_records`):
schema validation, de-identification, consent, then encoding into `HospitalData`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import pandas as pd

from federation.errors import ConfigError, DataError

CACHE_ENV = "FEDRISK_RECORD_CACHE_MB"
DEFAULT_CACHE_MB = 4096
Value = TypeVar("Value")


def cache_budget() -> int:
    """Bytes of loaded records one process may keep (`$FEDRISK_RECORD_CACHE_MB`, default 4096 MB):
    a simulation worker serving many hospitals keeps every one it serves loaded, rather than
    re-reading, re-validating and re-encoding an export for each message."""
    text = os.environ.get(CACHE_ENV, "").strip()
    if not text:
        return DEFAULT_CACHE_MB * 2**20
    try:
        megabytes = int(text)
    except ValueError:
        megabytes = -1
    if megabytes < 0:
        raise ConfigError(f"${CACHE_ENV} must be a whole number of megabytes (0: keep only the last load), "
                          f"got {text[:40]!r}")
    return megabytes * 2**20


def size_of(value: object) -> int:
    """The bytes the arrays and tables in `value` (a HospitalData, a DataFrame, or a tuple of them) hold."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, pd.DataFrame):
        return int(value.memory_usage(index=True, deep=False).sum())
    if isinstance(value, tuple):
        return sum(size_of(v) for v in value)
    if isinstance(value, HospitalData):
        return sum(size_of(v) for v in (value.train_x, value.train_y, value.test_x, value.test_y))
    return 0


class LoadCache(Generic[Value]):
    """Loaded records by key, least recently used dropped first once their bytes pass the budget
    (the newest load is always kept). One per process; keys carry what a load depends on."""

    def __init__(self) -> None:
        self._entries: OrderedDict[Hashable, tuple[Value, int]] = OrderedDict()
        self.bytes = 0

    def get(self, key: Hashable, load: Callable[[], Value]) -> Value:
        """The cached value of `key`, else `load()`, cached."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key][0]
        value = load()
        size = size_of(value)
        self._entries[key] = (value, size)
        self.bytes += size
        budget = cache_budget()
        while self.bytes > budget and len(self._entries) > 1:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped
        return value

    def drop(self, match: Callable[[Hashable], bool]) -> None:
        """Forget every entry whose key `match`es (a new run reads, and audits, afresh)."""
        for key in [k for k in self._entries if match(k)]:
            self.bytes -= self._entries.pop(key)[1]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries


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
