"""HE FedAvg: Flower's FedAvg with the arithmetic moved under CKKS.

Each hospital sends Enc([ (n_k/N_hat)(w_k - w), n_k/N_hat, 1/128 ]). The server adds these
ciphertexts and appends the sum to the *chain*, the encrypted global state it holds in place
of a plaintext model. Hospitals decrypt the chain at the start of the next round and divide
by the summed record share, which is exactly weighted FedAvg over the hospitals that replied.
The server never holds a secret key and never sees a hospital's update, count or metric.
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
from federation.he_codec import PlaintextCodec, ServerContext

Reveal = Callable[[list[bytes]], list[float]]


def chain_ciphertexts(arrays: ArrayRecord) -> list[bytes]:
    """The chain's ciphertexts, in order."""
    return [array.numpy().tobytes() for array in arrays.values()]


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
        min_replies: fewest hospitals whose replies a round needs (default: all of them).
        config: extra ConfigRecord entries sent with every message (key and parameter ids).
    """

    def __init__(self, he: ServerContext | PlaintextCodec, census_total: list[bytes], reveal: Reveal,
                 min_replies: int, config: dict[str, object]) -> None:
        self.he = he
        self.census_total = census_total
        self.reveal = reveal
        self.min_replies = min_replies
        self.base_config = config
        self.chain = ArrayRecord()
        self.privacy: dict[str, dict[str, float]] = {}
        self.traffic: dict[int, RoundTraffic] = {}
        self.he_seconds: dict[int, dict[str, float]] = {}
        self.train_seconds: dict[int, dict[str, float]] = {}

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

    def _accepted(self, server_round: int, replies: Iterable[Message], what: str) -> list[ConfigRecord]:
        accepted, refusals = [], []
        for reply in replies:
            if reply.has_error():
                refusals.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
                continue
            record = reply.content.config_records.get(M.REPLY)
            if record is None or M.ERROR in record:
                refusals.append(str(record[M.ERROR]) if record is not None else "empty reply")
                continue
            accepted.append(record)
        if len(accepted) < self.min_replies:
            detail = refusals[0] if refusals else "no reply"
            raise ProtocolError(f"{what} round {server_round}: {len(accepted)} of {self.min_replies} "
                                f"hospitals replied; {detail}")
        return accepted

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sum the encrypted updates and append the sum to the chain."""
        replies = list(replies)
        accepted = self._accepted(server_round, replies, "training")
        traffic = self.traffic.setdefault(server_round, RoundTraffic())
        for reply in replies:
            record = reply.content.config_records.get(M.REPLY) if reply.has_content() else None
            if record is None or M.ERROR in record:
                continue
            hospital = str(record[M.HOSPITAL])
            traffic.up_bytes[hospital] = sum(len(b) for b in record[M.CIPHERTEXTS])
            metrics = reply.content.metric_records[M.METRICS]
            self.privacy[hospital] = {key: float(metrics[key]) for key in
                                      (M.EPSILON, M.STEPS, M.NOISE_MULTIPLIER, M.SAMPLE_RATE)}
            self.he_seconds.setdefault(server_round, {})[hospital] = float(metrics[M.HE_SECONDS])
            self.train_seconds.setdefault(server_round, {})[hospital] = float(metrics[M.TRAIN_SECONDS])
        summed = self.he.sum(list(record[M.CIPHERTEXTS]) for record in accepted)
        chain = ArrayRecord({key: array for key, array in self.chain.items()})
        for index, blob in enumerate(summed):
            chain[f"r{server_round:03d}-c{index:02d}"] = Array(np.frombuffer(blob, dtype=np.uint8).copy())
        self.chain = chain
        epsilons = [p[M.EPSILON] for p in self.privacy.values()]
        return chain, MetricRecord({"hospitals": len(accepted), "epsilon-max": max(epsilons)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Every hospital evaluates the new global model on its own held-out records."""
        return self._messages(grid, server_round, arrays, M.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Sum the encrypted weighted metrics; a key holder reveals only the sum."""
        accepted = self._accepted(server_round, replies, "evaluation")
        summed = self.he.sum(list(record[M.CIPHERTEXTS]) for record in accepted)
        auc_sum, auc_weight, brier_sum, loss_sum, weight, _ = self.reveal(summed)
        return MetricRecord({
            "auc": auc_sum / auc_weight if auc_weight > 0 else float("nan"),
            "brier": brier_sum / weight, "log-loss": loss_sum / weight, "hospitals": len(accepted)})
