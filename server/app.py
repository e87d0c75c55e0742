"""The coordinating server as a Flower ServerApp: census, HE FedAvg rounds, release.

`run_federated` is the whole run against a Flower Grid; it works the same under the simulation
engine and the deployment engine.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from federation import messages as M
from federation.config import RunConfig
from federation.errors import FedriskError, ProtocolError
from federation.he_codec import PlaintextCodec, ServerContext
from federation.model import weights_digest
from privacy.audit import RELEASE, ROLE_SERVER, ROUND_TRAIN, RUN_START, AuditLog
from server.strategy import HEFedAvg, chain_ciphertexts
from server.tracking import RunTracker, privacy_report

Progress = Callable[[str, dict], None]
SERVER_AUDIT_FILE = "server_audit.sqlite"


@dataclass
class FederatedResult:
    """What a finished run hands back to whoever started it."""

    run_id: str
    weights: np.ndarray
    digest: str
    rounds: dict[int, dict[str, float]]
    privacy: dict[str, object]
    release_dir: str
    round_seconds: dict[int, float] = field(default_factory=dict)
    he_seconds: dict[int, float] = field(default_factory=dict)
    bytes_up: dict[int, dict[str, int]] = field(default_factory=dict)


def _ask(grid: Grid, node_ids: list[int], message_type: str, records: dict, timeout: float,
         what: str) -> list[ConfigRecord | Message]:
    messages = [Message(content=RecordDict(records), dst_node_id=node, message_type=message_type)
                for node in node_ids]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    out = []
    for reply in replies:
        if reply.has_error():
            raise ProtocolError(f"{what}: node {reply.metadata.src_node_id} failed: {reply.error.reason}")
        record = reply.content.config_records.get(M.REPLY)
        if record is None or M.ERROR in record:
            raise ProtocolError(f"{what}: {record[M.ERROR] if record is not None else 'empty reply'}")
        out.append(reply)
    if len(out) < len(node_ids):
        raise ProtocolError(f"{what}: {len(out)} of {len(node_ids)} hospitals replied in time")
    return out


def _wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise ProtocolError(f"only {len(nodes)} of {count} hospital nodes connected within {timeout:.0f}s")
        time.sleep(0.5)
    return nodes


def run_federated(grid: Grid, config: RunConfig, progress: Progress | None = None,
                  share_config: bool = False) -> FederatedResult:
    """Run census, `config.rounds` HE FedAvg rounds with federated evaluation, and the release."""
    notify = progress or (lambda event, data: None)
    Path(config.run_dir).mkdir(parents=True, exist_ok=True)
    audit = AuditLog(Path(config.run_dir) / SERVER_AUDIT_FILE, role=ROLE_SERVER, identity="coordinator")
    try:
        return _run(grid, config, notify, share_config, audit)
    except FedriskError as error:
        audit.refusal(error, purpose=config.purpose)
        raise


def _run(grid: Grid, config: RunConfig, notify: Progress, share_config: bool, audit: AuditLog) -> FederatedResult:
    he: ServerContext | PlaintextCodec = ServerContext.load(config.keys_dir) if config.he else PlaintextCodec()
    nodes = _wait_for_nodes(grid, config.num_hospitals, config.round_timeout)
    base = {M.KEY_ID: he.key_id, M.PARAMS_ID: he.params_id}
    if share_config:
        base[M.RUN_CONFIG] = json.dumps(config.to_user_config())
    timeout = config.round_timeout
    census_replies = _ask(grid, nodes, M.CENSUS, {M.CONFIG: ConfigRecord({**base, M.ROUND: 0})},
                          timeout, "census")
    census_total = he.sum(list(r.content.config_records[M.REPLY][M.CIPHERTEXTS]) for r in census_replies)
    key_holder = nodes[0]

    def reveal(aggregate: list[bytes]) -> list[float]:
        reply = _ask(grid, [key_holder], M.REVEAL, {
            M.CONFIG: ConfigRecord({**base, M.ROUND: 0}),
            M.AGGREGATE_RECORD: ConfigRecord({M.AGGREGATE: aggregate})}, timeout, "reveal")[0]
        return [float(v) for v in reply.content.config_records[M.REPLY][M.VALUES]]

    strategy = HEFedAvg(he, census_total, reveal, min_replies=config.num_hospitals, config=base)
    tracker = RunTracker(config)
    audit.append(RUN_START, purpose=config.purpose, details={
        "mlflow-run": tracker.run_id, "hospitals": len(nodes), "rounds": config.rounds,
        "target-epsilon": config.target_epsilon})
    try:
        rounds: dict[int, dict[str, float]] = {}
        round_seconds: dict[int, float] = {}
        arrays = ArrayRecord()
        for server_round in range(1, config.rounds + 1):
            began = time.perf_counter()
            replies = grid.send_and_receive(
                strategy.configure_train(server_round, arrays, ConfigRecord(), grid), timeout=timeout)
            arrays, train_metrics = strategy.aggregate_train(server_round, replies)
            replies = grid.send_and_receive(
                strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid), timeout=timeout)
            evaluation = strategy.aggregate_evaluate(server_round, replies)
            round_seconds[server_round] = time.perf_counter() - began
            traffic = strategy.traffic[server_round]
            metrics = {**{k: float(v) for k, v in evaluation.items()},
                       "epsilon-max": float(train_metrics["epsilon-max"]),
                       "bytes-up-per-hospital": float(np.mean(list(traffic.up_bytes.values()))),
                       "bytes-down-per-hospital": float(traffic.down_bytes),
                       "round-seconds": round_seconds[server_round]}
            rounds[server_round] = metrics
            tracker.log_round(server_round, metrics)
            audit.append(ROUND_TRAIN, purpose=config.purpose, epsilon=metrics["epsilon-max"], details={
                "round": server_round, "hospitals": int(metrics["hospitals"]), "auc": round(metrics["auc"], 6)})
            notify("round", {"round": server_round, "rounds": config.rounds, **metrics})
        release = _ask(grid, [key_holder], M.RELEASE, {
            M.STATE: arrays, M.CONFIG: ConfigRecord({**base, M.ROUND: config.rounds})}, timeout, "release")[0]
        weights = release.content.array_records[M.RELEASED_MODEL][M.WEIGHTS].numpy()
        digest = str(release.content.config_records[M.REPLY][M.SHA256])
        if weights_digest(weights) != digest:
            raise ProtocolError("the released model does not match the SHA-256 its hospital sent")
        report = privacy_report(config, strategy.privacy)
        summary = {"rounds": rounds, "hospitals": sorted(strategy.privacy), "sha256": digest,
                   "chain_ciphertexts": len(chain_ciphertexts(arrays))}
        release_dir = tracker.finish(weights=weights, digest=digest, privacy_report=report, summary=summary)
        audit.append(RELEASE, purpose=config.purpose, epsilon=report["epsilon_max"],
                     details={"mlflow-run": tracker.run_id, "sha256": digest})
    except BaseException:
        tracker.abort()
        raise
    he_seconds = {r: max(v.values()) for r, v in strategy.he_seconds.items()}
    return FederatedResult(run_id=tracker.run_id, weights=weights, digest=digest, rounds=rounds,
                           privacy=report, release_dir=str(release_dir), round_seconds=round_seconds,
                           he_seconds=he_seconds,
                           bytes_up={r: t.up_bytes for r, t in strategy.traffic.items()})


def make_server_app(preset: RunConfig | None = None, progress: Progress | None = None,
                    outcome: list | None = None) -> ServerApp:
    """A ServerApp. `preset` fixes the run config (simulation); `outcome` receives the
    FederatedResult, or the user-caused error that ended the run."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            config = preset or RunConfig.from_user_config(context.run_config)
            result = run_federated(grid, config, progress, share_config=preset is None)
        except FedriskError as exc:
            if outcome is None:
                raise
            outcome.append(exc)
            return
        if outcome is not None:
            outcome.append(result)

    return server_app


app = make_server_app()
