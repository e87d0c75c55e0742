"""The three overhead figures of a run, each measured side by side in one process.

* dp_overhead_ratio: one DP-SGD epoch (Opacus, Poisson sampling, fast clipping) over the same
  non-private epoch (same model, optimiser and expected batch size).
* he_overhead_ratio: one federated round (every hospital replays the global model, trains,
  packs its update; the server sums) under CKKS over the same round in plaintext FedAvg.
* ciphertext_expansion: bytes of one encrypted update over the float32 bytes of the model.

Runs alternate A, B, A, B so drift in machine speed hits both sides alike; medians are quoted.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from clients.data import HospitalData
from clients.node import HospitalNode
from clients.node_state import NodeState
from clients.training import LocalTraining, train_local
from federation.config import RunConfig
from federation.he_codec import PlaintextCodec, ServerContext
from federation.model import initial_weights, num_parameters


def interleaved(first: Callable[[], object], second: Callable[[], object], repeats: int
                ) -> tuple[list[float], list[float]]:
    """Wall seconds of `first` and `second`, run alternately `repeats` times each after one
    unmeasured warm-up run of each (imports, caches, allocator)."""
    first()
    second()
    a, b = [], []
    for _ in range(repeats):
        for fn, sink in ((first, a), (second, b)):
            began = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - began)
    return a, b


@dataclass(frozen=True)
class Ratio:
    """Medians of both sides and their ratio."""

    numerator_seconds: float
    denominator_seconds: float

    @property
    def ratio(self) -> float:
        """numerator / denominator."""
        return self.numerator_seconds / self.denominator_seconds


def dp_overhead(data: HospitalData, config: RunConfig, repeats: int = 3) -> Ratio:
    """A DP-SGD epoch against the same non-private epoch on one hospital's records."""
    start = initial_weights(config.model, config.seed)
    plan = LocalTraining(model_kind=config.model, epochs=1, sample_rate=config.sample_rate,
                         learning_rate=config.learning_rate, clip_norm=config.clip_norm,
                         noise_multiplier=1.0, seed=config.seed)
    private = lambda: train_local(start, data.train_x, data.train_y, plan)  # noqa: E731
    plain = lambda: train_local(start, data.train_x, data.train_y,  # noqa: E731
                                LocalTraining(**{**plan.__dict__, "dp": False}))
    a, b = interleaved(private, plain, repeats)
    return Ratio(statistics.median(a), statistics.median(b))


def _round(nodes: list[HospitalNode], server: ServerContext | PlaintextCodec, sizes: list[int]
           ) -> Callable[[], None]:
    census = server.sum((node.census() for node in nodes), 2)

    def one_round() -> None:
        updates = [node.train(1, census, []).ciphertexts for node in nodes]
        aggregate = server.sum(updates, nodes[0].length + 2)
        for node in nodes:
            node.global_weights(aggregate)
        sizes.extend(sum(len(b) for b in update) for update in updates)
    return one_round


@dataclass(frozen=True)
class HEOverhead:
    """Round time with and without CKKS, and the size of an encrypted update."""

    round: Ratio
    update_bytes: int
    model_float32_bytes: int

    @property
    def ciphertext_expansion(self) -> float:
        """Encrypted update bytes over the float32 bytes of the model it carries."""
        return self.update_bytes / self.model_float32_bytes


def he_overhead(nodes: list[NodeState], config: RunConfig, repeats: int = 3) -> HEOverhead:
    """A whole round (all hospitals train and pack; the server sums; all decode) with CKKS
    against plaintext FedAvg. Hospitals run one after another, as on a single core. Every
    repetition is the same round 1 of one run, so each hospital's ledger is charged once."""
    encrypted = [HospitalNode(config, state) for state in nodes]
    plaintext = [HospitalNode(config.replace(he=False), state) for state in nodes]
    sizes: list[int] = []
    a, b = interleaved(_round(encrypted, ServerContext.load(Path(config.keys_dir)), sizes),
                       _round(plaintext, PlaintextCodec(), []), repeats)
    return HEOverhead(Ratio(statistics.median(a), statistics.median(b)), max(sizes),
                      4 * num_parameters(config.model))
