"""HE FedAvg: Flower's FedAvg with the arithmetic moved under CKKS.

Each hospital sends Enc([ (n_k/N_hat)(w_k - w), n_k/N_hat, 1/128 ]). The server adds these
ciphertexts and appends the sum to the *chain*, the encrypted global state it holds in place
of a plaintext model. Hospitals decrypt the chain at the start of the next round and divide
by the summed record share, which is exactly weighted FedAvg over the hospitals that replied.
The server never holds a secret key and never sees a hospital's update, count or metric.

A round completes with the hospitals whose replies are valid, as long as there are at least
`min_replies` of them: a hospital that fails, times out or sends a malformed ciphertext is
left out of that round (and the reason logged); the sum stays the exact weighted average of
the hospitals in it, since their record shares are summed under encryption with their updates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from federation import messages as M
from federation.errors import ProtocolError
from federation.he_codec import PlaintextCodec, ReplyRejected, ServerContext

Reveal = Callable[[list[bytes], list[str]], list[float]]
"""Asks a key holder among the named hospitals to decrypt a summed metric vector."""


def chain_ciphertexts(arrays: ArrayRecord) -> list[bytes]:
    """The chain's ciphertexts, in order."""
    return [array.numpy().tobytes() for array in arrays.values()]


@dataclass(frozen=True)
class Rejection:
    """A reply left out of an aggregate, and why (one line, never data)."""

    server_round: int
    step: str
    hospital: str
    reason: str

    def to_dict(self) -> dict[str, object]:
        """JSON form, for the checkpoint, the audit log and MLflow."""
        return {"round": self.server_round, "step": self.step, "hospital": self.hospital, "reason": self.reason}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> "Rejection":
        """Inverse of `to_dict` (a resumed run reads its checkpoint's rejections back)."""
        return cls(int(data["round"]), str(data["step"]), str(data["hospital"]), str(data["reason"]))


def reply_record(reply: Message) -> tuple[ConfigRecord | None, str | None]:
    """A hospital's reply record, and why it carries no result if it doesn't: Flower reported
    a failure, the reply is empty, or the hospital refused (its one-line reason)."""
    if reply.has_error():
        return None, f"failed: {reply.error.reason}"
    record = reply.content.config_records.get(M.REPLY)
    if record is None:
        return None, "empty reply"
    if M.ERROR in record:
        return record, str(record[M.ERROR])
    return record, None


@dataclass
class RoundTraffic:
    """Bytes that crossed the wire in one round (per hospital, both directions)."""

    up_bytes: dict[str, int] = field(default_factory=dict)
    down_bytes: int = 0


class HEFedAvg(Strategy):
    """Weighted FedAvg over CKKS ciphertexts.

    Args:
        he: the server's parameters-only CKKS context (it can add, not decrypt).
        census_total: the encrypted federation record count, sent to hospitals each round.
        reveal: asks a key-holding hospital to decrypt a *summed* metric vector.
        min_replies: fewest hospitals whose valid replies a round needs.
        config: extra ConfigRecord entries sent with every message (run, key and parameter ids).
        update_length: values in one hospital's encrypted update (model parameters + 2).
    """

    def __init__(self, he: ServerContext | PlaintextCodec, census_total: list[bytes], reveal: Reveal,
                 min_replies: int, config: dict[str, object], update_length: int) -> None:
        self.he = he
        self.census_total = census_total
        self.reveal = reveal
        self.min_replies = min_replies
        self.base_config = config
        self.update_length = update_length
        self.chain = ArrayRecord()
        self.privacy: dict[str, dict[str, float]] = {}
        self.traffic: dict[int, RoundTraffic] = {}
        self.rejections: list[Rejection] = []
        self.contributors: dict[int, list[str]] = {}
        self.node_ids: dict[str, int] = {}

    def hospital_of(self, node_id: int) -> str:
        """The hospital a node id last replied as (or the bare node id)."""
        return next((h for h, n in self.node_ids.items() if n == node_id), f"node-{node_id}")

    def nodes_of(self, hospitals: list[str]) -> list[int]:
        """Node ids of these hospitals, then of every other known hospital (fallback key holders)."""
        first = [self.node_ids[h] for h in hospitals if h in self.node_ids]
        return first + [n for _, n in sorted(self.node_ids.items()) if n not in first]

    def summary(self) -> None:
        """Nothing to print: the run tracker logs the configuration."""

    def _messages(self, grid: Grid, server_round: int, arrays: ArrayRecord, message_type: str
                  ) -> list[Message]:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) < self.min_replies:
            raise ProtocolError(f"only {len(node_ids)} hospital node(s) connected; {self.min_replies} needed")
        config = ConfigRecord({**self.base_config, M.ROUND: server_round})
        content = RecordDict({M.STATE: arrays, M.CONFIG: config,
                              M.CENSUS_RECORD: ConfigRecord({M.CENSUS_TOTAL: self.census_total})})
        down = sum(len(b) for b in chain_ciphertexts(arrays)) + sum(len(b) for b in self.census_total)
        self.traffic.setdefault(server_round, RoundTraffic()).down_bytes = down
        return [Message(content=content, dst_node_id=node, message_type=message_type) for node in node_ids]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Send every hospital the chain so far; it trains from the model the chain encodes."""
        self.chain = arrays
        return self._messages(grid, server_round, arrays, M.TRAIN)

    def accepted(self, server_round: int, replies: Iterable[Message], step: str, length: int
                 ) -> list[tuple[str, Message, list]]:
        """The valid replies of one step as (hospital, reply, parsed ciphertexts); every other
        reply is recorded as a `Rejection`. Raises ProtocolError if fewer than `min_replies`
        remain."""
        accepted: list[tuple[str, Message, list]] = []
        reasons: list[str] = []
        for reply in replies:
            who = f"node-{reply.metadata.src_node_id}"
            record, reason = reply_record(reply)
            if record is not None and M.HOSPITAL in record:
                who = str(record[M.HOSPITAL])
                self.node_ids.setdefault(who, reply.metadata.src_node_id)
            if reason is None:
                reason = self._invalid(record, [h for h, _, _ in accepted])
            if reason is None:
                try:
                    accepted.append((who, reply, self.he.parse(list(record[M.CIPHERTEXTS]), length)))
                    continue
                except ReplyRejected as exc:
                    reason = str(exc)
            self.rejections.append(Rejection(server_round, step, who, reason))
            reasons.append(f"{who}: {reason}")
        if len(accepted) < self.min_replies:
            detail = "; ".join(reasons) if reasons else "no reply in time"
            raise ProtocolError(f"{step} round {server_round}: {len(accepted)} valid replies, "
                                f"{self.min_replies} needed ({detail})")
        return accepted

    def _invalid(self, record: ConfigRecord, seen: list[str]) -> str | None:
        """Why a hospital's result record cannot enter an aggregate, checked before parsing."""
        if M.CIPHERTEXTS not in record:
            return "reply carries no ciphertexts"
        if str(record.get(M.KEY_ID, "")) != self.base_config[M.KEY_ID]:
            return f"made under key {record.get(M.KEY_ID, '?')}, not the federation's key {self.base_config[M.KEY_ID]}"
        if str(record.get(M.PARAMS_ID, "")) != self.base_config[M.PARAMS_ID]:
            return "made under CKKS parameters other than the federation's"
        if str(record.get(M.HOSPITAL, "")) in seen:
            return "a second reply from the same hospital"
        return None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sum the valid encrypted updates and append the sum to the chain."""
        accepted = self.accepted(server_round, replies, "training", self.update_length)
        traffic = self.traffic.setdefault(server_round, RoundTraffic())
        for hospital, reply, _ in accepted:
            traffic.up_bytes[hospital] = sum(len(b) for b in reply.content.config_records[M.REPLY][M.CIPHERTEXTS])
            metrics = reply.content.metric_records[M.METRICS]
            self.privacy[hospital] = {key: float(metrics[key]) for key in
                                      (M.EPSILON, M.STEPS, M.NOISE_MULTIPLIER, M.SAMPLE_RATE)}
        summed = self.he.add(parsed for _, _, parsed in accepted)
        chain = ArrayRecord({key: array for key, array in self.chain.items()})
        for index, blob in enumerate(summed):
            chain[f"r{server_round:03d}-c{index:02d}"] = Array(np.frombuffer(blob, dtype=np.uint8).copy())
        self.chain = chain
        self.contributors[server_round] = sorted(hospital for hospital, _, _ in accepted)
        epsilons = [p[M.EPSILON] for p in self.privacy.values()]
        return chain, MetricRecord({"hospitals": len(accepted), "epsilon-max": max(epsilons)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Every hospital evaluates the new global model on its own held-out records."""
        return self._messages(grid, server_round, arrays, M.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Sum the valid encrypted weighted metrics; a key holder reveals only the sum."""
        accepted = self.accepted(server_round, replies, "evaluation", M.EVAL_LENGTH)
        summed = self.he.add(parsed for _, _, parsed in accepted)
        auc_sum, auc_weight, brier_sum, loss_sum, weight, _ = self.reveal(summed, [h for h, _, _ in accepted])
        return MetricRecord({
            "auc": auc_sum / auc_weight if auc_weight > 0 else float("nan"),
            "brier": brier_sum / weight, "log-loss": loss_sum / weight, "hospitals": len(accepted)})
