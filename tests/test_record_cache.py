"""A simulation worker that serves many hospitals keeps every one it serves loaded (to a byte
budget), so a hospital's export is read, validated, pseudonymised, encoded and audited once per
run, not once per message: the node's audit log shows one `data.load` per run whatever the
number of hospitals a worker serves. The budget is the operator's (`$FEDRISK_RECORD_CACHE_MB`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clients import node as node_module
from clients.data import CACHE_ENV, LoadCache, cache_budget
from clients.node_state import NodeState
from experiments.synthetic import synthesize
from federation.errors import ConfigError

PURPOSE = "credit-risk-research"
HOSPITALS = 24  # more than the 16 a worker used to keep


def test_a_worker_serving_24_hospitals_loads_and_audits_each_once(tmp_path: Path, keys, monkeypatch) -> None:
    monkeypatch.setattr(node_module, "_DATA_CACHE", LoadCache())
    report = synthesize(HOSPITALS, HOSPITALS * 500, tmp_path / "data", seed=2)
    states = [NodeState.init(tmp_path / "nodes" / f"h{i:02d}", hospital=f"h{i:02d}", data_file=file,
                             key_file=keys.hospital_context, budgets={PURPOSE: (2.0, 1e-5)})
              for i, file in enumerate(report.files)]
    for _ in range(3):  # three messages to every hospital, in turn, as a worker serves them
        for state in states:
            data = node_module._cached_data(state, PURPOSE, "standard")
            assert data.n_train > 0
    for state in states:
        loads = [e for e in state.audit().entries() if e.action == "data.load"]
        assert len(loads) == 1, state.hospital
    assert len(node_module._DATA_CACHE) == HOSPITALS


def test_the_budget_drops_the_least_recently_used_and_a_bad_budget_is_refused(monkeypatch) -> None:
    cache: LoadCache[np.ndarray] = LoadCache()
    monkeypatch.setenv(CACHE_ENV, "1")  # 1 MiB: room for two 400 KiB loads
    loads: list[str] = []

    def load(name: str):
        return lambda: loads.append(name) or np.zeros(50_000)  # 400 KB

    for name in ("a", "b", "a", "c", "a", "b"):
        cache.get(name, load(name))
    assert loads == ["a", "b", "c", "b"]  # "a" stayed (used most recently), "b" was dropped for "c"
    assert cache.bytes <= 2**20
    monkeypatch.setenv(CACHE_ENV, "0")
    cache.get("d", load("d"))
    assert len(cache) == 1 and "d" in cache  # the newest load is always kept
    monkeypatch.setenv(CACHE_ENV, "lots")
    with pytest.raises(ConfigError, match=r"\$FEDRISK_RECORD_CACHE_MB must be a whole number"):
        cache_budget()
