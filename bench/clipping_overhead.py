"""What per-sample clipping costs: one epoch of DP training against one epoch of plain training.

Times, in one process and interleaved (every repetition runs every path once, in turn), one epoch
over ROWS x 40 synthetic rows of the 40-64-32-1 MLP with Adam for:

  plain          non-private, on the same Poisson batches as the DP paths (fedrisk's
                 `PoissonBatchSampler`, as in `clients.training.train_local`): the reference, so
                 that sampling and data loading are identical on every path
  plain-shuffled non-private, shuffled batches of the expected size, as
                 `clients.training.train_local` with dp=False and `make bench`'s plain side
                 (shows what Poisson sampling itself costs, which no clipping method can remove)
  ghost          Opacus `make_private(grad_sample_mode="ghost")`: two backward passes
  bk-opacus      the book-keeping clipper (one backward pass) feeding Opacus's
                 `DPOptimizerFastGradientClipping` (noise and scaling per parameter tensor, the
                 RDP accountant's hook every step): fedrisk's production path until issue 14
  bookkeeping    `clients.clipping.make_private_bk`, the production path: the same clipper and
                 fedrisk's own step (noise on one flat gradient buffer, a step counter)

All paths fetch every batch with `clients.training.TensorBatches.rows` (index_select of the
rows), as `train_local` does; none goes through a DataLoader. Only the epoch loop is timed
(model, optimizer and engine are built outside the timer). Reports the median over repetitions
and its ratio to plain's and to plain-shuffled's median. Every DP path takes a step (noise only)
on an empty Poisson batch; the plain paths skip it.

    PYTHONPATH=. python bench/clipping_overhead.py [--reps 5] [--rows 100000] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from torch import nn

from opacus.optimizers import DPOptimizerFastGradientClipping

from clients.clipping import BookkeepingClipper, make_private_bk
from clients.sampling import PoissonBatchSampler
from clients.training import TensorBatches
from federation.model import N_FEATURES, build_model

SAMPLE_RATES = (0.01, 0.04)
PATHS = ("plain", "plain-shuffled", "ghost", "bk-opacus", "bookkeeping")
NOISE_MULTIPLIER = 1.0
CLIP_NORM = 1.0
LEARNING_RATE = 1e-3


def _first(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """`TensorBatches.__getitems__` already returns the whole batch as one item."""
    return batch[0]


def _poisson_loader(dataset: TensorBatches, sample_rate: float, seed: int) -> DPDataLoader:
    """Only for `make_private` to read the sample rate and dataset size from."""
    return DPDataLoader(dataset, sample_rate=sample_rate, collate_fn=_first,
                        generator=torch.Generator().manual_seed(seed))


def _poisson_batches(dataset: TensorBatches, sample_rate: float, seed: int
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    sampler = PoissonBatchSampler(len(dataset), sample_rate, int(round(1 / sample_rate)), seed)
    return (dataset.rows(index) for index in list(sampler.index_tensors()))  # drawn up front, as train_local


def _timed_epoch(loader: Iterable[tuple[torch.Tensor, torch.Tensor]], optimizer: torch.optim.Optimizer,
                 backward: Callable[[torch.Tensor, torch.Tensor], None],
                 empty_batch: Callable[[], None] | None = None) -> tuple[float, int]:
    """Time one epoch: a step per batch. An empty Poisson batch is skipped by the plain paths
    (`empty_batch` None) and is a noisy step of zero gradient on the DP paths."""
    began = time.perf_counter()
    steps = 0
    for x, y in loader:
        optimizer.zero_grad()
        if len(y):
            backward(x, y)
            optimizer.step()
        elif empty_batch is not None:
            empty_batch()
            optimizer.step()
        steps += 1
    return time.perf_counter() - began, steps


def _loss_backward(model: nn.Module, criterion: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], None]:
    return lambda x, y: criterion(model(x).squeeze(-1), y).backward()


def epoch_plain_shuffled(dataset: TensorBatches, sample_rate: float,
                         seed: int) -> tuple[float, int]:
    torch.manual_seed(seed)
    model = build_model("mlp").train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    criterion = nn.BCEWithLogitsLoss()
    batch = int(round(sample_rate * len(dataset)))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    steps = min(int(round(1 / sample_rate)), -(-len(dataset) // batch))
    loader = (dataset.rows(order[step * batch:(step + 1) * batch]) for step in range(steps))
    return _timed_epoch(loader, optimizer, _loss_backward(model, criterion))


def epoch_plain(dataset: TensorBatches, sample_rate: float, seed: int) -> tuple[float, int]:
    torch.manual_seed(seed)
    model = build_model("mlp").train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    criterion = nn.BCEWithLogitsLoss()
    return _timed_epoch(_poisson_batches(dataset, sample_rate, seed), optimizer, _loss_backward(model, criterion))


def epoch_ghost(dataset: TensorBatches, sample_rate: float, seed: int) -> tuple[float, int]:
    torch.manual_seed(seed)
    model = build_model("mlp").train()
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, criterion, _ = engine.make_private(
        module=model, optimizer=torch.optim.Adam(model.parameters(), lr=LEARNING_RATE),
        criterion=nn.BCEWithLogitsLoss(), data_loader=_poisson_loader(dataset, sample_rate, seed),
        noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=CLIP_NORM, poisson_sampling=False,
        grad_sample_mode="ghost")
    params = [p for p in model.parameters() if p.requires_grad]

    def zero_gradients() -> None:
        for p in params:
            p.grad = torch.zeros_like(p)
    return _timed_epoch(_poisson_batches(dataset, sample_rate, seed), optimizer,
                        _loss_backward(model, criterion), zero_gradients)


def epoch_bk_opacus(dataset: TensorBatches, sample_rate: float, seed: int) -> tuple[float, int]:
    torch.manual_seed(seed)
    model = build_model("mlp").train()
    engine = PrivacyEngine(accountant="rdp")
    loader = _poisson_batches(dataset, sample_rate, seed)
    clipper = BookkeepingClipper(model, CLIP_NORM)
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.Adam(model.parameters(), lr=LEARNING_RATE), noise_multiplier=NOISE_MULTIPLIER,
        max_grad_norm=CLIP_NORM, expected_batch_size=int(len(dataset) * sample_rate),
        loss_reduction="mean")
    optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    per_sample = nn.BCEWithLogitsLoss(reduction="none")
    seconds, steps = _timed_epoch(loader, optimizer, lambda x, y: clipper.backward(per_sample(clipper.forward(x).squeeze(-1), y)),
                                  clipper.empty_batch)
    if engine.accountant.history != [(NOISE_MULTIPLIER, sample_rate, steps)]:
        raise RuntimeError(f"accountant recorded {engine.accountant.history}, {steps} steps ran")
    return seconds, steps


def epoch_bookkeeping(dataset: TensorBatches, sample_rate: float, seed: int) -> tuple[float, int]:
    torch.manual_seed(seed)
    model = build_model("mlp").train()
    loader = _poisson_batches(dataset, sample_rate, seed)
    model, optimizer, clipper = make_private_bk(
        module=model, optimizer=torch.optim.Adam(model.parameters(), lr=LEARNING_RATE),
        sample_rate=sample_rate, num_records=len(dataset), noise_multiplier=NOISE_MULTIPLIER,
        max_grad_norm=CLIP_NORM)
    per_sample = nn.BCEWithLogitsLoss(reduction="none")
    seconds, steps = _timed_epoch(loader, optimizer, lambda x, y: clipper.backward(per_sample(clipper.forward(x).squeeze(-1), y)),
                                  clipper.empty_batch)
    if optimizer.history != [(NOISE_MULTIPLIER, sample_rate, steps)]:
        raise RuntimeError(f"the private optimizer recorded {optimizer.history}, {steps} steps ran")
    return seconds, steps


EPOCHS: dict[str, Callable[[TensorBatches, float, int], tuple[float, int]]] = {
    "plain": epoch_plain, "plain-shuffled": epoch_plain_shuffled, "ghost": epoch_ghost,
    "bk-opacus": epoch_bk_opacus, "bookkeeping": epoch_bookkeeping}


def measure(rows: int, reps: int, seed: int = 0) -> list[dict[str, object]]:
    """Median epoch seconds and ratio to plain for every path and sample rate."""
    generator = np.random.default_rng(seed)
    features = generator.standard_normal((rows, N_FEATURES)).astype(np.float32)
    labels = (generator.random(rows) < 0.3).astype(np.float32)
    dataset = TensorBatches(features, labels)
    for q in SAMPLE_RATES:  # warm-up, untimed
        for path in PATHS:
            EPOCHS[path](dataset, q, seed)
    seconds: dict[tuple[float, str], list[float]] = {
        (q, p): [] for q in SAMPLE_RATES for p in PATHS}
    steps: dict[tuple[float, str], int] = {}
    for rep in range(reps):
        for q in SAMPLE_RATES:
            for path in PATHS:
                elapsed, steps[q, path] = EPOCHS[path](dataset, q, seed + rep)
                seconds[q, path].append(elapsed)
    results = []
    for q in SAMPLE_RATES:
        reference = statistics.median(seconds[q, "plain"])
        shuffled = statistics.median(seconds[q, "plain-shuffled"])
        for path in PATHS:
            median = statistics.median(seconds[q, path])
            results.append({"sample_rate": q, "expected_batch": int(rows * q), "path": path,
                            "steps": steps[q, path], "median_seconds": median,
                            "ratio_to_plain": median / reference,
                            "ratio_to_plain_shuffled": median / shuffled,
                            "seconds": seconds[q, path]})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # Opacus warns about its backward hooks on every ghost step
    torch.set_num_threads(args.threads)
    results = measure(args.rows, args.reps)
    if args.json:
        print(json.dumps({"rows": args.rows, "reps": args.reps, "threads": args.threads,
                          "torch": torch.__version__, "results": results}, indent=2))
        return
    print(f"{args.rows} rows x {N_FEATURES} features, MLP 40-64-32-1, Adam, "
          f"{args.threads} thread(s), median of {args.reps}")
    print(f"{'batch':>6} {'path':<15} {'steps':>5} {'epoch s':>8} {'x plain':>8} "
          f"{'x shuffled':>10}")
    for row in results:
        print(f"{row['expected_batch']:>6} {row['path']:<15} {row['steps']:>5} "
              f"{row['median_seconds']:>8.3f} {row['ratio_to_plain']:>8.2f} "
              f"{row['ratio_to_plain_shuffled']:>10.2f}")


if __name__ == "__main__":
    main()
