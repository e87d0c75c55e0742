"""The three overhead figures of a run, each measured side by side in one process.

* dp_overhead_ratio: one DP-SGD epoch over the same non-private epoch, both
  `clients.training.train_local` from the same start weights on the same records, timed whole
  (model, optimiser and sampler set-up included). DP side: Poisson batches at rate q
  (`PoissonBatchSampler`, drawn per epoch), book-keeping per-sample clipping to C, Gaussian
  noise sigma * C = 1.0 * C on the flat gradient sum, division by int(n q), Adam. Plain side:
  the same 40-64-32-1 MLP and Adam, 1/q batches of round(n q) rows from one shuffled
  permutation per epoch, mean BCE loss and `loss.backward()`. Both fetch every batch with
  `TensorBatches.rows` (index_select), neither through a DataLoader.
* dp_overhead_vs_tight: the same DP-SGD epoch over a tight plain loop of the same model and
  optimiser (`tight_plain_epoch`): the records shuffled once, every batch a contiguous slice,
  `zero_grad(set_to_none=True)`, nothing else per step: the fastest honest non-private epoch,
  so the ratio is what DP costs, not what fedrisk's loop costs. The ratio against `train_local`'s
  own plain mode is kept beside it, labelled.
* he_overhead_ratio: one federated round (every hospital replays the global model, trains,
  packs its update; the server sums) under CKKS over the same round in plaintext FedAvg.
* ciphertext_expansion: bytes of one encrypted update over the float32 bytes of the model.

Runs alternate A, B, A, B so drift in machine speed hits both sides alike; medians are quoted.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from clients.data import HospitalData
from clients.node import HospitalNode
from clients.node_state import NodeState
from clients.training import LocalTraining, train_local
from federation.model import build_model, set_weights
from federation.config import RunConfig
from federation.he_codec import ServerContext
from federation.model import initial_weights, num_parameters


def interleaved(first: Callable[[], object], second: Callable[[], object], repeats: int,
                prepare_first: Callable[[], object] | None = None) -> tuple[list[float], list[float]]:
    """Wall seconds of `first` and `second`, run alternately `repeats` times each after one
    unmeasured warm-up run of each (imports, caches, allocator). `prepare_first`, if given,
    runs unmeasured before each run of `first`."""
    for fn in (prepare_first, first, second):
        if fn is not None:
            fn()
    a, b = [], []
    for _ in range(repeats):
        if prepare_first is not None:
            prepare_first()
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


@dataclass(frozen=True)
class DPOverhead:
    """A DP epoch against fedrisk's own plain loop (`loop`) and against a tight plain loop (`tight`)."""

    loop: Ratio
    tight: Ratio


def tight_plain_epoch(start: np.ndarray, features: np.ndarray, labels: np.ndarray, plan: LocalTraining) -> np.ndarray:
    """One non-private epoch as tight as PyTorch allows for this model: the records shuffled once,
    then 1/q steps over contiguous slices of round(n q) rows, mean BCE, Adam; returns the weights
    (so nothing is elided)."""
    import torch
    from torch import nn

    from federation.model import get_weights

    model = build_model(plan.model_kind, plan.n_features)
    set_weights(model, start)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=plan.learning_rate)
    criterion = nn.BCEWithLogitsLoss()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(plan.seed))
    # shuffled once, so that every batch below is a contiguous view
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).index_select(0, order)
    y = torch.from_numpy(labels).to(torch.float32).index_select(0, order)
    batch = max(1, int(round(plan.sample_rate * len(y))))
    for step in range(min(int(round(1.0 / plan.sample_rate)), -(-len(y) // batch))):
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x[step * batch:(step + 1) * batch]).squeeze(-1), y[step * batch:(step + 1) * batch]).backward()
        optimizer.step()
    return get_weights(model)


def dp_overhead(data: HospitalData, config: RunConfig, repeats: int = 3) -> DPOverhead:
    """A DP-SGD epoch against the same non-private epoch on one hospital's records, in
    `train_local`'s plain mode and as a tight loop (what each side does: the module docstring).
    Medians of `repeats` interleaved triples (DP, loop, tight, DP, loop, tight, ...)."""
    start = initial_weights(config.model, config.seed)
    plan = LocalTraining(model_kind=config.model, epochs=1, sample_rate=config.sample_rate,
                         learning_rate=config.learning_rate, clip_norm=config.clip_norm,
                         noise_multiplier=1.0, seed=config.seed)
    sides = (lambda: train_local(start, data.train_x, data.train_y, plan),
             lambda: train_local(start, data.train_x, data.train_y, LocalTraining(**{**plan.__dict__, "dp": False})),
             lambda: tight_plain_epoch(start, data.train_x, data.train_y, plan))
    times: list[list[float]] = [[] for _ in sides]
    for side in sides:
        side()  # warm-up: imports, caches, allocator
    for _ in range(repeats):
        for side, sink in zip(sides, times):
            began = time.perf_counter()
            side()
            sink.append(time.perf_counter() - began)
    private, loop, tight = (statistics.median(t) for t in times)
    return DPOverhead(loop=Ratio(private, loop), tight=Ratio(private, tight))


def _encrypted_round(nodes: list[HospitalNode], server: ServerContext, sizes: list[int]
                     ) -> tuple[Callable[[], None], Callable[[], None]]:
    """One whole round of the protocol as it runs, and its unmeasured preparation. The
    preparation starts a fresh run (census: every node re-reads and audits its records, as at
    the start of any run), so nothing is served from a node's record of earlier decryptions and
    each run's round is charged once. The round: every hospital verifies and decrypts the census,
    trains, seals a signed update; the server checks each reply; every hospital verifies, adds and
    decrypts the round (flooded)."""
    counter = iter(range(1_000_000))
    current: dict[str, object] = {}

    def prepare() -> None:
        run_id = f"bench-{next(counter)}-{time.time_ns()}"
        current["run"] = run_id
        current["census"] = [node.census(run_id, node.check_rollback([])) for node in nodes]

    def one_round() -> None:
        run_id, census = str(current["run"]), current["census"]
        updates = [node.train(1, census, {}, run_id, node.check_rollback([])).contribution for node in nodes]
        for update in updates:
            server.parse(update.ciphertexts, nodes[0].length + 2)
        for node in nodes:
            node.global_weights({1: updates}, run_id, 1)
        sizes.extend(sum(len(b) for b in update.ciphertexts) for update in updates)
    return one_round, prepare


def _plaintext_round(nodes: list[HospitalNode]) -> Callable[[], None]:
    """The same round as plaintext FedAvg: the benchmark's reference, and the only place a
    plaintext aggregation exists. Each hospital trains with the same DP-SGD on the same records;
    its update is summed in the clear; every hospital applies the sum. Nothing leaves the bench."""
    def one_round() -> None:
        n_hat = float(sum(node.data.n_train for node in nodes))
        config = nodes[0].config
        start = initial_weights(config.model, config.seed, config.input_size)
        total = None
        for node in nodes:
            plan = LocalTraining(model_kind=config.model, epochs=config.local_epochs, sample_rate=config.sample_rate,
                                 learning_rate=config.learning_rate, clip_norm=config.clip_norm,
                                 noise_multiplier=node.noise_multiplier(), seed=config.seed,
                                 n_features=config.input_size, secret_seed=1)
            result = train_local(start, node.data.train_x, node.data.train_y, plan)
            share = node.data.n_train / n_hat
            update = np.concatenate([share * (result.weights - start), [share]])
            total = update if total is None else total + update
        for _ in nodes:
            _ = start + total[:-1] / total[-1]
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
    encrypted repetition is round 1 of a fresh run, charged to each hospital's ledger (give the
    nodes a budget for it)."""
    encrypted = [HospitalNode(config, state) for state in nodes]
    sizes: list[int] = []
    round_, prepare = _encrypted_round(encrypted, ServerContext.load(Path(config.keys_dir)), sizes)
    a, b = interleaved(round_, _plaintext_round(encrypted), repeats, prepare_first=prepare)
    return HEOverhead(Ratio(statistics.median(a), statistics.median(b)), max(sizes),
                      4 * num_parameters(config.model))
