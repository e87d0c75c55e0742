"""Federated cohort queries from Python or the CLI, in Flower's simulation engine.

    from engines.analytics import run_query
    result = run_query("queries/delinquency_by_age.yaml", nodes_dir="nodes", keys_dir="keys")
    result.table          # pandas DataFrame: estimate, se, ci95_low, ci95_high, records, suppressed

Each call is one Flower run: the same ServerApp and ClientApp as training, with the query in the
run config (on the deployment engine: `flwr run . <federation> --run-config "query='q.yaml'"`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from clients.analytics import HospitalAnalytics
from clients.node_state import NodeState
from engines.simulation import simulate
from federation.config import RunConfig
from federation.he_codec import HospitalKey, ServerContext
from federation.query import CohortQuery, load_query
from server.analytics import QueryResult, estimate


def run_query(query: CohortQuery | str | Path, *, nodes_dir: str | Path = "", data_dir: str | Path = "",
              keys_dir: str | Path = "keys", run_dir: str | Path = "runs/analytics", num_hospitals: int = 3,
              run_id: str = "", tracking_uri: str = "", min_contributors: int = 2,
              provision_budget: float = 10.0, model_file: str | Path = "", verbose: bool = False) -> QueryResult:
    """Answer `query` (a CohortQuery, a query file, or inline JSON) across the hospital nodes
    in `nodes_dir` (or nodes provisioned under `run_dir` from the exports in `data_dir`, each
    with `provision_budget` for the query's purpose). A `risk_score` or `membership_score` query
    scores with the release `model_file` (model.npz). Raises FedriskError, one line, on a
    malformed query, a refusal at any hospital, or a failure; then nothing is released."""
    if not isinstance(query, CohortQuery):
        query = load_query(str(query))
    config = RunConfig(nodes_dir=str(nodes_dir), data_dir=str(data_dir), keys_dir=str(keys_dir), run_dir=str(run_dir),
                       num_hospitals=num_hospitals, purpose=query.purpose, delta=query.delta, run_id=run_id,
                       tracking_uri=tracking_uri, min_contributors=min_contributors, query=query.to_json(),
                       provision_budget=provision_budget, model_file=str(model_file))
    return simulate(config, verbose=verbose)  # the ServerApp answers the query its config carries


def answer_in_process(nodes: Sequence[NodeState], key: HospitalKey, server: ServerContext, query: CohortQuery,
                      run_id: str, model_weights: np.ndarray | None = None) -> pd.DataFrame:
    """A query's DP table computed by the protocol's own steps in this process, without Flower's
    transport: every hospital answers (charge, clamp, noise, encrypt), the server context checks
    the ciphertexts, a hospital key adds and decrypts the sum (flooded), `estimate` builds the
    table. For experiments that need many answers quickly (accuracy sweeps, the noise
    calibration tests)."""
    layout = query.layout()
    answers = [HospitalAnalytics(node, key).answer(query, run_id, len(nodes), model_weights) for node in nodes]
    ciphertexts = [key.encrypt(answer.vector) for answer in answers]
    for blobs in ciphertexts:
        server.parse(blobs, layout.length)
    values = key.decrypt_flooded(ciphertexts, layout.length, f"{run_id}|0|answer|answer:{query.digest()}")
    return estimate(query, values[:-1] * layout.units, answers[0].noise_multiplier, len(nodes))
