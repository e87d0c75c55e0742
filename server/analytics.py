"""The server's side of a federated cohort query, and how its DP answer becomes a table.

`answer_query` runs over a Flower Grid, in either engine:

1. QUERY_CHECK to every hospital: each re-validates the query, checks its schema releases the
   fields for the purpose and that its ledger can afford it. One refusal refuses the query for
   all, and nothing has been charged anywhere.
2. QUERY_ANSWER to every hospital: each charges its ledger, then computes, noises and encrypts
   its cell statistics. The server adds the ciphertexts.
3. REVEAL: the server relays every hospital's signed answer to one hospital, which verifies the
   signatures, adds them itself and decrypts the sum once, flooded (`clients.decryption`). The
   sum is a sum of DP releases, so what the server learns is DP; no hospital's own answer is ever
   decrypted.

If a hospital fails after phase 1, the query fails and nothing is revealed (hospitals that
already answered keep their charge: a charge without a release is safe, the reverse is not).

`estimate` turns the revealed noised sums into estimates with standard errors derived from the
known noise scale (the error of the DP answer around the exact answer on the records used; it
does not include sampling error of the cohort itself), 95% intervals, and suppression of cells
whose noised record count is below the query's published threshold.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from federation import messages as M
from federation.config import RunConfig
from federation.errors import FedriskError, PrivacyBudgetError, ProtocolError
from federation.contributions import to_record
from federation.he_codec import CONTRIBUTOR_UNIT, ServerContext, flooding_std, he_parameters
from federation.model import weights_digest
from federation.query import CohortQuery, QueryError, load_query
from privacy.accounting import ACCOUNTANT
from privacy.audit import ANALYTICS_RELEASE
from server.grid import ask_one, exchange, wait_for_nodes
from server.strategy import ReplyChecker, reply_record

Z_95 = 1.959963984540054
QUANTILE_DRAWS = 400


@dataclass
class QueryResult:
    """A query's DP answer: the table, and everything needed to audit and recompute its privacy."""

    query: CohortQuery
    run_id: str
    table: pd.DataFrame
    hospitals: list[str]
    noise_multiplier: float
    epsilon: float
    seconds: float = 0.0
    mlflow_run_id: str = ""
    files: list[str] = field(default_factory=list)

    def privacy(self) -> dict[str, Any]:
        """The query's privacy statement (what the result JSON and MLflow record)."""
        return {
            "guarantee": "each hospital's answer is (epsilon, delta)-DP on its own; hospitals hold disjoint "
                         "patients, so the table is (epsilon, delta)-DP per patient",
            "mechanism": "Gaussian, L2 sensitivity 1 after scaling (see federation.query)",
            "epsilon": self.epsilon, "delta": self.query.delta, "noise_multiplier": self.noise_multiplier,
            "accountant": ACCOUNTANT, "hospitals": self.hospitals, "purpose": self.query.purpose,
            "recompute": "privacy.ledger.GaussianMechanism.gaussian_release(noise_multiplier=z).epsilon(delta)",
            "he_parameters": he_parameters()}


def _group_columns(query: CohortQuery, frame_cells: list[tuple[str, ...]]) -> dict[str, list[str]]:
    return {g.field: [cell[i] for cell in frame_cells] for i, g in enumerate(query.group_by)}


def estimate(query: CohortQuery, sums: np.ndarray, noise_multiplier: float, hospitals: int) -> pd.DataFrame:
    """The table of a query from the federation's noised sums (in `query.layout()` order,
    already multiplied back by their units), knowing that each of `hospitals` added Gaussian
    noise of `noise_multiplier` times each position's scale."""
    layout = query.layout()
    cells = list(layout.cells) or [()]
    # per position: the hospitals' summed DP noise and the decryption's flooding, in value units
    sd = np.sqrt(hospitals * (noise_multiplier * layout.noise_scales) ** 2
                 + (flooding_std(hospitals) * np.asarray(layout.units)) ** 2)
    values = np.asarray(sums, dtype=float).reshape(len(cells), layout.per_cell)
    sd = sd.reshape(len(cells), layout.per_cell)
    rows: list[dict[str, Any]] = []
    if query.measure == "count" or query.paired:
        counts, count_sd = values[:, 0], sd[:, 0]
        for i, cell in enumerate(cells):
            row: dict[str, Any] = {g.field: cell[j] for j, g in enumerate(query.group_by)}
            suppressed = query.suppress_below > 0 and counts[i] < query.suppress_below
            if query.measure == "count":
                value, se, low, high = counts[i], count_sd[i], counts[i] - Z_95 * count_sd[i], counts[i] + Z_95 * count_sd[i]
                low = max(low, 0.0)
            else:
                centred, centred_sd = values[i, 1], sd[i, 1]
                if query.measure == "sum":
                    value = centred + query.centre * counts[i]
                    se = math.hypot(centred_sd, query.centre * count_sd[i])
                    low, high = value - Z_95 * se, value + Z_95 * se
                else:  # mean or rate: c + S/C, delta method in S and C
                    n = max(counts[i], 1.0)
                    low_b, high_b = query.bounds  # type: ignore[misc]
                    value = float(np.clip(query.centre + centred / n, low_b, high_b))
                    se = math.hypot(centred_sd, (value - query.centre) * count_sd[i]) / n
                    low, high = max(value - Z_95 * se, low_b), min(value + Z_95 * se, high_b)
            row.update({query.measure: value, "se": se, "ci95_low": low, "ci95_high": high,
                        "records": counts[i], "suppressed": bool(suppressed)})
            rows.append(row)
    else:
        edges = np.asarray(query.bins)
        for i, cell in enumerate(cells):
            base = {g.field: cell[j] for j, g in enumerate(query.group_by)}
            total = float(values[i].sum())
            suppressed = query.suppress_below > 0 and total < query.suppress_below
            if query.measure == "histogram":
                for b in range(layout.per_cell):
                    count, se = values[i, b], sd[i, b]
                    rows.append({**base, "bin_low": edges[b], "bin_high": edges[b + 1], "count": count, "se": se,
                                 "ci95_low": max(count - Z_95 * se, 0.0), "ci95_high": count + Z_95 * se,
                                 "records": total, "suppressed": bool(suppressed)})
            else:
                point = _quantiles(values[i], edges, query.quantiles)  # type: ignore[arg-type]
                draws = np.random.default_rng(i).standard_normal((QUANTILE_DRAWS, layout.per_cell)) * sd[i]
                simulated = np.array([_quantiles(values[i] + d, edges, query.quantiles) for d in draws])  # type: ignore[arg-type]
                for k, level in enumerate(query.quantiles):  # type: ignore[arg-type]
                    rows.append({**base, "level": level, "quantile": point[k],
                                 "se": float(np.std(simulated[:, k])),
                                 "ci95_low": float(np.quantile(simulated[:, k], 0.025)),
                                 "ci95_high": float(np.quantile(simulated[:, k], 0.975)),
                                 "records": total, "suppressed": bool(suppressed)})
    frame = pd.DataFrame(rows)
    hidden = frame["suppressed"].to_numpy()
    for column in [c for c in frame.columns if c not in {g.field for g in query.group_by}
                   and c not in ("suppressed", "bin_low", "bin_high", "level")]:
        frame.loc[hidden, column] = np.nan
    return frame


def _quantiles(counts: np.ndarray, edges: np.ndarray, levels: tuple[float, ...]) -> np.ndarray:
    """Quantiles of a noised histogram (negative counts taken as zero), interpolated in a bin."""
    clean = np.clip(counts, 0.0, None)
    total = clean.sum()
    if total <= 0:
        return np.full(len(levels), np.nan)
    cumulative = np.concatenate([[0.0], np.cumsum(clean)]) / total
    return np.interp(levels, cumulative, edges)


def _base(he: ServerContext, query: CohortQuery, run_id: str, hospitals: int) -> dict[str, Any]:
    return {M.KEY_ID: he.key_id, M.PARAMS_ID: he.params_id, M.RUN_ID: run_id, M.ROUND: 0, M.FEDERATION: he.key_id,
            M.QUERY: query.to_json(), M.QUERY_RUN: run_id, M.HOSPITALS: hospitals}


def answer_query(grid: Grid, config: RunConfig, query: CohortQuery, run_id: str,
                 model_weights: np.ndarray | None = None) -> QueryResult:
    """Run `query` across the hospitals connected to `grid` (waiting for `config.num_hospitals`).
    A `risk_score` query sends `model_weights` with its answer requests."""
    began = time.perf_counter()
    he = ServerContext.load(config.keys_dir)
    nodes = wait_for_nodes(grid, config.num_hospitals, config.num_hospitals, config.round_timeout)
    base = _base(he, query, run_id, len(nodes))
    layout = query.layout()

    def send(message_type: str) -> list[Message]:
        records: dict[str, Any] = {M.CONFIG: ConfigRecord(base)}
        if message_type == M.QUERY_ANSWER and model_weights is not None:
            records[M.QUERY_MODEL] = ArrayRecord({M.WEIGHTS: Array(np.asarray(model_weights, dtype=np.float32))})
        messages = [Message(content=RecordDict(records), dst_node_id=node, message_type=message_type)
                    for node in nodes]
        replies, silent = exchange(grid, messages, config.round_timeout)
        problems = [f"node-{node}: no reply within {config.round_timeout:g}s" for node in silent]
        for reply in replies:
            record, reason = reply_record(reply)
            if reason is not None:
                who = str(record[M.HOSPITAL]) if record is not None and M.HOSPITAL in record else \
                    f"node-{reply.metadata.src_node_id}"
                problems.append(reason if reason.startswith(who) else f"{who}: {reason}")
        if problems:
            error = PrivacyBudgetError if message_type == M.QUERY_CHECK else ProtocolError
            raise error(f"query {query.name!r} refused: {'; '.join(problems)}")
        return replies

    checks = send(M.QUERY_CHECK)
    multipliers = {float(r.content.config_records[M.REPLY][M.NOISE_MULTIPLIER]) for r in checks}
    if len(multipliers) != 1:
        raise ProtocolError(f"query {query.name!r}: hospitals calibrated different noise ({sorted(multipliers)})")
    answers = send(M.QUERY_ANSWER)
    checker = ReplyChecker(he, run_id, len(nodes))
    kind = f"answer:{query.digest()}"
    accepted = checker.accept(0, answers, "answer", kind, layout.length, "analytics")
    hospitals = sorted(c.header.hospital for c in accepted)
    revealed = ask_one(grid, checker.nodes_of(hospitals), M.REVEAL, {
        M.CONFIG: ConfigRecord({**base, M.STEP: "answer", M.KIND: kind}),
        M.REVEAL_RECORD: ConfigRecord(to_record(accepted))}, config.round_timeout, "reveal")
    values = np.array([float(v) for v in revealed.content.config_records[M.REPLY][M.VALUES]])
    contributors = int(round(values[-1] / CONTRIBUTOR_UNIT))
    if contributors != len(accepted):
        raise ProtocolError(f"query {query.name!r}: the revealed sum holds {contributors} answers, not {len(accepted)}")
    z = multipliers.pop()
    table = estimate(query, values[:-1] * layout.units, z, len(accepted))
    epsilon = float(answers[0].content.metric_records[M.METRICS][M.QUERY_EPSILON])
    return QueryResult(query, run_id, table, hospitals, z, epsilon, seconds=time.perf_counter() - began)


def write_result(result: QueryResult, out: Path) -> list[Path]:
    """Write the table (CSV, or Parquet for a .parquet path) and `<stem>.json` beside it
    (the query, its run id and its privacy statement). Returns the paths written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        result.table.to_parquet(out, index=False)
    else:
        result.table.to_csv(out, index=False)
    meta = out.with_suffix(".json")
    meta.write_text(json.dumps({"query": result.query.to_dict(), "run-id": result.run_id,
                                "privacy": result.privacy()}, indent=2))
    return [out, meta]


def _query_model(config: RunConfig, query: CohortQuery) -> np.ndarray | None:
    """The weights a risk_score or membership_score query scores with: `config.model_file` (a
    release's model.npz), which must match the SHA-256 the query names."""
    if query.model is None:
        return None
    if not config.model_file:
        raise QueryError(f"query {query.name!r} scores with a model: give its model.npz as model-file")
    try:
        with np.load(config.model_file) as archive:
            weights = archive["weights"]
    except (OSError, KeyError, ValueError):
        raise QueryError(f"model-file {config.model_file}: not a fedrisk model.npz") from None
    if weights_digest(weights) != query.model[0]:
        raise QueryError(f"model-file {config.model_file} does not match the query's model sha256")
    return weights


def run_analytics(grid: Grid, config: RunConfig) -> QueryResult:
    """The ServerApp's job for a run whose config carries a `query`: answer it, write the
    table under `<run-dir>/queries/`, track it in MLflow and audit the release (or refusal)."""
    from privacy.audit import ROLE_SERVER, AuditLog, Digest, hospital_names
    from federation.run_dir import SERVER_AUDIT_FILE
    from server.tracking import track_query

    query = load_query(config.query)
    run_id = config.run_id or query.default_run_id()
    Path(config.run_dir).mkdir(parents=True, exist_ok=True)
    audit = AuditLog(Path(config.run_dir) / SERVER_AUDIT_FILE, role=ROLE_SERVER, identity="coordinator")
    try:
        result = answer_query(grid, config, query, run_id, _query_model(config, query))
    except FedriskError as error:
        audit.refusal(error, purpose=query.purpose)
        raise
    out = Path(config.run_dir) / "queries" / f"{run_id}.csv"
    result.files = [str(p) for p in write_result(result, out)]
    result.mlflow_run_id = track_query(config, result, [Path(p) for p in result.files])
    audit.append(ANALYTICS_RELEASE, purpose=query.purpose, epsilon=result.epsilon, details={
        "run": run_id, "query": query.name, "digest": Digest(query.digest()), "measure": query.measure,
        "hospitals": hospital_names(result.hospitals), "cells": len(query.layout().cells),
        "suppressed-cells": int(result.table["suppressed"].sum()), "mlflow-run": Digest(result.mlflow_run_id)})
    return result
