"""One federated training run, driven by the coordinator: census, HE FedAvg rounds over signed
contributions with DP evaluation, release, MLflow tracking, checkpoints and audit.

`run_federated` is the whole run against a Flower Grid; it works the same under the simulation
engine and the deployment engine (`server.app` wires it into the ServerApp).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from federation import messages as M
from federation.config import RunConfig
from federation.errors import FedriskError, ProtocolError
from federation.contributions import SignedContribution, to_record
from federation.he_codec import ServerContext
from federation.run_dir import SERVER_AUDIT_FILE
from federation.model import num_parameters, weights_digest
from federation.round_evaluation import AUC, evaluation_noise_multiplier
from privacy.audit import (
    RELEASE,
    REPLY_REJECTED,
    ROLE_SERVER,
    ROUND_TRAIN,
    RUN_RESUME,
    RUN_START,
    AuditLog,
    Digest,
    hospital_names,
)
from server.calibration import Calibration, calibrate_release
from server.checkpoint import Checkpoint, new_run_id
from server.grid import ask_one, exchange, wait_for_nodes
from server.strategy import HEFedAvg, Rejection, contribution_bytes
from server.tracking import (ROUND_BYTES_DOWN, ROUND_BYTES_UP, ROUND_CONTRIBUTORS, ROUND_EPSILON_MAX,
                             ROUND_HOSPITALS, ROUND_REJECTED, ROUND_SECONDS, RunTracker, privacy_report)

Progress = Callable[[str, dict], None]
"""A run's progress callback: (event, data). Events: "stage" (data: `stage`, a short key, and
`text`, what is happening now, for a display), "round" (a finished round's metrics), "resume",
"rejected" (a reply the server refused)."""

STAGE = "stage"


def stage(notify: Progress | None, key: str, text: str, **data: object) -> None:
    """Tell the progress display, if any, what the run does now (start-up steps, then each round's)."""
    if notify is not None:
        notify(STAGE, {"stage": key, "text": text, **data})


@dataclass
class FederatedResult:
    """What a finished run hands back to whoever started it."""

    run_id: str
    weights: np.ndarray
    digest: str
    rounds: dict[int, dict[str, float]]
    privacy: dict[str, object]
    release_dir: str
    fedrisk_run_id: str = ""
    contributors: dict[int, list[str]] = field(default_factory=dict)
    rejections: list[dict[str, object]] = field(default_factory=list)
    calibration: dict[str, object] = field(default_factory=dict)
    """The Platt map folded into `weights` (`server.calibration.Calibration.to_dict`): its
    `raw_sha256` is the model the hospitals trained and released, `digest` the calibrated one's."""
    chain: dict[int, list[SignedContribution]] = field(default_factory=dict)
    """The signed, encrypted updates each round accepted: what the coordinator holds (and relayed).
    Only a key holder can replay the global model of any round from it (`HospitalNode.global_weights`)."""

    @property
    def round_seconds(self) -> dict[int, float]:
        """Wall seconds of each round, as the server measured it."""
        return {r: metrics[ROUND_SECONDS] for r, metrics in self.rounds.items()}


def run_federated(grid: Grid, config: RunConfig, progress: Progress | None = None,
                  share_config: bool = False, in_flight: int | None = None) -> FederatedResult:
    """Run census, `config.rounds` HE FedAvg rounds with federated evaluation, and the release.

    Resumes after the last completed round when the run directory holds this run's checkpoint.
    `in_flight` caps a step's unanswered messages (`server.grid.send_and_receive`; simulation).
    """
    notify = progress or (lambda event, data: None)
    Path(config.run_dir).mkdir(parents=True, exist_ok=True)
    audit = AuditLog(Path(config.run_dir) / SERVER_AUDIT_FILE, role=ROLE_SERVER, identity="coordinator")
    try:
        return _Run(grid, config, notify, share_config, audit, in_flight).run()
    except FedriskError as error:
        audit.refusal(error, purpose=config.purpose)
        raise


class _Run:
    """One federated run (or the rest of one, when resuming), driven by the ServerApp."""

    def __init__(self, grid: Grid, config: RunConfig, notify: Progress, share_config: bool, audit: AuditLog,
                 in_flight: int | None = None) -> None:
        self.grid, self.config, self.notify, self.audit, self.in_flight = grid, config, notify, audit, in_flight
        self.he = ServerContext.load(config.keys_dir)
        self.checkpoint = Checkpoint.load(Path(config.run_dir), config)
        if self.checkpoint:
            self.checkpoint.check_key(self.he.key_id, Path(config.run_dir))
        self.run_id = self.checkpoint.run_id if self.checkpoint else (config.run_id or new_run_id())
        self.base: dict[str, object] = {M.KEY_ID: self.he.key_id, M.PARAMS_ID: self.he.params_id, M.RUN_ID: self.run_id,
                                        M.FEDERATION: self.he.key_id}
        if share_config:
            self.base[M.RUN_CONFIG] = json.dumps(config.to_user_config())
        self.strategy = HEFedAvg(self.he, [], self._reveal, min_replies=config.required_replies, config=self.base,
                                 update_length=num_parameters(config.model, config.input_size) + 2)
        self.rounds: dict[int, dict[str, float]] = {}
        if self.checkpoint:
            self.rounds.update(self.checkpoint.rounds)
            self.strategy.privacy.update(self.checkpoint.privacy)
            self.strategy.contributors.update(self.checkpoint.contributors)
            self.strategy.rejections.extend(Rejection.from_dict(r) for r in self.checkpoint.rejections)
            self.strategy.chain.update(self.checkpoint.chain)
            self.strategy.anchors = list(self.checkpoint.anchors)
            self.strategy.evaluations.update(self.checkpoint.evaluations)
        self.logged_rejections = len(self.strategy.rejections)  # a checkpoint's were logged by the earlier run

    def _log_rejections(self) -> None:
        for rejection in self.strategy.rejections[self.logged_rejections:]:
            details = {"run": self.run_id, **rejection.to_dict()}
            try:
                self.audit.append(REPLY_REJECTED, purpose=self.config.purpose, details=details)
            except ValueError:  # a reason the identifier filter refuses is logged by its step only
                self.audit.append(REPLY_REJECTED, purpose=self.config.purpose,
                                  details={**details, "reason": "withheld by the identifier filter"})
            self.notify("rejected", rejection.to_dict())
        self.logged_rejections = len(self.strategy.rejections)

    def _send(self, server_round: int, messages: list[Message], step: str) -> list[Message]:
        replies, silent = exchange(self.grid, messages, self.config.round_timeout, self.in_flight)
        for node in silent:
            self.strategy.rejections.append(Rejection(server_round, step, self.strategy.checker.hospital_of(node),
                                                      f"no reply within round-timeout ({self.config.round_timeout:g}s)"))
        return replies

    def _reveal(self, contributions: list[SignedContribution], server_round: int) -> list[float]:
        hospitals = [c.header.hospital for c in contributions]
        reply = ask_one(self.grid, self.strategy.checker.nodes_of(hospitals), M.REVEAL, {
            M.CONFIG: ConfigRecord({**self.base, M.ROUND: server_round, M.STEP: "evaluate", M.KIND: "evaluation"}),
            M.REVEAL_RECORD: ConfigRecord(to_record(contributions))}, self.config.round_timeout, "reveal")
        return [float(v) for v in reply.content.config_records[M.REPLY][M.VALUES]]

    def _census(self, nodes: list[int]) -> None:
        from federation.contributions import relay_record

        content = RecordDict({M.CONFIG: ConfigRecord({**self.base, M.ROUND: 0}),
                              M.ANCHORS: ConfigRecord(relay_record(self.strategy.anchors))})
        messages = [Message(content=content, dst_node_id=node, message_type=M.CENSUS) for node in nodes]
        replies = self._send(0, messages, "census")
        accepted = self.strategy.checker.accept(0, replies, "census", "census", M.CENSUS_LENGTH)
        self._log_rejections()
        self.strategy.relay(accepted)
        # On resume the chain is normalised by the first census: keep it (hospitals still run
        # the census: it re-checks their budget for the rounds left, before any data is read).
        self.strategy.census = list(self.checkpoint.census) if self.checkpoint else accepted

    def run(self) -> FederatedResult:
        config, strategy, checkpoint = self.config, self.strategy, self.checkpoint
        stage(self.notify, "nodes", f"waiting for {config.num_hospitals} hospital nodes to connect")
        nodes = wait_for_nodes(self.grid, config.num_hospitals, config.required_replies, config.round_timeout)
        stage(self.notify, "census", f"{len(nodes)} hospital nodes connected; census (each node checks its policy "
              "and budget and calibrates its noise)")
        self._census(nodes)
        stage(self.notify, "tracking", "starting the MLflow run")
        tracker = RunTracker(config, resume_run_id=checkpoint.mlflow_run_id if checkpoint else "", run_name=self.run_id)
        if checkpoint:
            self.audit.append(RUN_RESUME, purpose=config.purpose, details={
                "run": self.run_id, "mlflow-run": Digest(tracker.run_id), "completed-rounds": checkpoint.completed_round})
            self.notify("resume", {"run": self.run_id, "completed": checkpoint.completed_round, "rounds": config.rounds})
        else:
            self.audit.append(RUN_START, purpose=config.purpose, details={
                "run": self.run_id, "mlflow-run": Digest(tracker.run_id), "hospitals": len(nodes), "rounds": config.rounds,
                "target-epsilon": config.target_epsilon})
        try:
            for server_round in range((checkpoint.completed_round if checkpoint else 0) + 1, config.rounds + 1):
                self._round(server_round, tracker)
            release = ask_one(self.grid, strategy.checker.nodes_of(strategy.contributors[config.rounds]), M.RELEASE,
                              strategy.records(config.rounds, config.rounds), config.round_timeout, "release")
            weights = release.content.array_records[M.RELEASED_MODEL][M.WEIGHTS].numpy()
            digest = str(release.content.config_records[M.REPLY][M.SHA256])
            if weights_digest(weights) != digest:
                raise ProtocolError("the released model does not match the SHA-256 its hospital sent")
            weights, calibration = self._calibrate(weights)
            digest = weights_digest(weights)
            report = privacy_report(config, strategy.privacy)
            rejections = [r.to_dict() for r in strategy.rejections]
            summary = {"run-id": self.run_id, "rounds": self.rounds, "hospitals": sorted(strategy.privacy),
                       "contributors": strategy.contributors, "rejections": rejections, "sha256": digest,
                       "calibration": calibration.to_dict(),
                       "chain_bytes": sum(contribution_bytes(c) for c in strategy.chain.values())}
            release_dir = tracker.finish(weights=weights, digest=digest, privacy_report=report, summary=summary,
                                         calibration=calibration.to_dict())
            self.audit.append(RELEASE, purpose=config.purpose, epsilon=report["epsilon_max"],
                              details={"run": self.run_id, "mlflow-run": Digest(tracker.run_id), "sha256": Digest(digest),
                                       "trained-sha256": Digest(calibration.raw_sha256)})
        except BaseException:
            self._log_rejections()
            if self.rounds:
                tracker.fail()  # resumable: keep the MLflow run next to the checkpoint
            else:
                tracker.abort()
            raise
        Checkpoint.clear(Path(config.run_dir))
        return FederatedResult(run_id=tracker.run_id, weights=weights, digest=digest, rounds=self.rounds,
                               privacy=report, release_dir=str(release_dir), fedrisk_run_id=self.run_id,
                               contributors=dict(strategy.contributors), rejections=rejections,
                               calibration=calibration.to_dict(), chain=dict(strategy.chain))

    def _calibrate(self, weights: np.ndarray) -> tuple[np.ndarray, Calibration]:
        """The trained model recalibrated on the last round's revealed DP evaluation, which scored
        exactly this model on every contributing hospital's held-out records (no new charge)."""
        config, last = self.config, self.config.rounds
        if last not in self.strategy.evaluations:
            raise ProtocolError(f"no revealed DP evaluation of round {last} to calibrate the release with")
        hospitals = int(self.rounds.get(last, {}).get(ROUND_HOSPITALS, 0)) or len(self.strategy.contributors.get(last, []))
        z = evaluation_noise_multiplier(config.evaluation_budget, config.delta, config.rounds)
        return calibrate_release(config.model, weights, config.input_size, np.asarray(self.strategy.evaluations[last]),
                                 source=f"DP evaluation of round {last} ({hospitals} hospitals' held-out records)",
                                 noise_sd=math.sqrt(max(hospitals, 1)) * z)

    def _round(self, server_round: int, tracker: RunTracker) -> None:
        """Train, aggregate, evaluate; then log and checkpoint the round."""
        config, strategy = self.config, self.strategy
        began = time.perf_counter()
        stage(self.notify, "train", f"round {server_round}/{config.rounds}: DP-SGD training at the hospitals",
              round=server_round)
        replies = self._send(server_round, list(strategy.configure_train(server_round, None, ConfigRecord(), self.grid)),
                             "training")
        _, train_metrics = strategy.aggregate_train(server_round, replies)
        stage(self.notify, "evaluate", f"round {server_round}/{config.rounds}: DP evaluation at the hospitals",
              round=server_round)
        replies = self._send(server_round, list(strategy.configure_evaluate(server_round, None, ConfigRecord(), self.grid)),
                             "evaluation")
        evaluation = strategy.aggregate_evaluate(server_round, replies)
        seconds = time.perf_counter() - began
        self._log_rejections()
        traffic = strategy.traffic[server_round]
        metrics = {**{k: float(v) for k, v in evaluation.items()},
                   ROUND_CONTRIBUTORS: float(train_metrics[ROUND_HOSPITALS]),
                   ROUND_EPSILON_MAX: float(train_metrics[ROUND_EPSILON_MAX]),
                   ROUND_BYTES_UP: float(np.mean(list(traffic.up_bytes.values()))),
                   ROUND_BYTES_DOWN: float(traffic.down_bytes),
                   ROUND_REJECTED: float(sum(r.server_round == server_round for r in strategy.rejections)),
                   ROUND_SECONDS: seconds}
        tracker.log_round(server_round, metrics)
        self.audit.append(ROUND_TRAIN, purpose=config.purpose, epsilon=metrics[ROUND_EPSILON_MAX], details={
            "run": self.run_id, "round": server_round,
            "contributors": hospital_names(strategy.contributors[server_round]),
            "dp-auc": round(metrics[AUC], 6) if np.isfinite(metrics[AUC]) else None})
        self.rounds[server_round] = metrics
        Checkpoint(run_id=self.run_id, fingerprint=config.fingerprint(), completed_round=server_round,
                   census=strategy.census, chain=dict(strategy.chain), anchors=list(strategy.anchors),
                   mlflow_run_id=tracker.run_id, rounds=self.rounds, privacy=strategy.privacy,
                   contributors=strategy.contributors, evaluations=dict(strategy.evaluations),
                   rejections=[r.to_dict() for r in strategy.rejections]).save(Path(config.run_dir))
        self.notify("round", {"round": server_round, "rounds": config.rounds, **metrics})
