"""Local DP-SGD at a hospital.

Batches are Poisson samples of the hospital's records (`clients.sampling`). Per-sample
clipping never materialises per-sample gradients, in one of two modes:

* "bookkeeping" (default): the clipped gradient sum in a single backward pass, then
  fedrisk's own Gaussian-mechanism step on one flat gradient buffer (`clients.clipping`), which
  counts the steps it took;
* "ghost": Opacus's own `make_private(grad_sample_mode="ghost")`, two backward passes, its
  optimizer and RDP accountant; kept as the reference the book-keeping path is tested against.

The noise multiplier is calibrated once per run for the whole planned number of steps, so
every round uses the same sigma and the run's epsilon meets its target. After training, the
steps the private optimizer (or Opacus's accountant) recorded are checked against the steps
that ran (only the step count is used: every epsilon fedrisk states is computed by
`privacy.accounting`, PLD).
"""

from __future__ import annotations

import secrets
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, Dataset

from clients.clipping import make_private_bk
from clients.sampling import PoissonBatchSampler
from federation.model import build_model, get_weights, set_weights

CLIPPING_MODES = ("bookkeeping", "ghost")


class TensorBatches(Dataset):
    """Rows of (features, label) that a loader fetches a whole batch at a time."""

    def __init__(self, features: np.ndarray, labels: np.ndarray) -> None:
        self.features = torch.as_tensor(features, dtype=torch.float32)
        self.labels = torch.as_tensor(labels, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.rows(torch.as_tensor(indices, dtype=torch.long))]

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of the rows at `index` (int64): how both the private and the plain
        training loop fetch every batch."""
        return self.features.index_select(0, index), self.labels.index_select(0, index)


def _whole_batch(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    if not batch:
        return torch.zeros((0, 0)), torch.zeros(0)
    return batch[0]


@dataclass(frozen=True)
class LocalTraining:
    """How a hospital trains in one round."""

    model_kind: str
    epochs: int
    sample_rate: float
    learning_rate: float
    clip_norm: float
    noise_multiplier: float
    seed: int
    dp: bool = True
    n_features: int = 40
    clipping: str = "bookkeeping"
    secret_seed: int | None = None
    """Seeds Poisson sampling and the Gaussian noise. Both must be unpredictable to anyone
    outside the node, or the DP guarantee is void. Hospital nodes derive it from their own
    secret key, the run and the round's starting model (`PseudonymKey.derive_seed`); None draws
    it from the operating system's entropy."""


@dataclass(frozen=True)
class LocalResult:
    """The locally trained weights and what the training cost in privacy terms."""

    weights: np.ndarray
    steps: int
    seconds: float


def train_local(start: np.ndarray, features: np.ndarray, labels: np.ndarray,
                plan: LocalTraining) -> LocalResult:
    """Train from `start` for `plan.epochs` epochs of 1/q steps each.

    With `plan.dp` the steps are DP-SGD (Poisson sampling at rate q, per-sample clipping to
    `clip_norm`, Gaussian noise of std `noise_multiplier * clip_norm` on the clipped sum, the sum
    over the expected batch int(n * q)). Without it the same loop runs plain minibatch training:
    the same model, Adam and batch fetching (`TensorBatches.rows`), on shuffled batches of the
    expected size (the benchmark's non-private reference).
    """
    model = build_model(plan.model_kind, plan.n_features)
    set_weights(model, start)
    model.train()
    optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=plan.learning_rate)
    criterion: nn.Module = nn.BCEWithLogitsLoss()
    dataset = TensorBatches(features, labels)
    steps_per_epoch = int(round(1.0 / plan.sample_rate))
    began = time.perf_counter()
    steps = 0
    if plan.dp and plan.clipping == "bookkeeping":
        secret_seed = plan.secret_seed if plan.secret_seed is not None else secrets.randbits(63)
        noise = torch.Generator().manual_seed(secret_seed)
        sampler = PoissonBatchSampler(len(dataset), plan.sample_rate, steps_per_epoch, seed=secret_seed + 1)
        model, private, clipper = make_private_bk(
            module=model, optimizer=optimizer, sample_rate=plan.sample_rate,
            num_records=len(dataset), noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.clip_norm, noise_generator=noise)
        per_sample = nn.BCEWithLogitsLoss(reduction="none")
        try:
            for _ in range(plan.epochs):
                # The epoch's batches are drawn before its first step (the same draws, in the same
                # order, as drawing each before its step): numpy's sampler is several times
                # slower when called between the steps' torch kernels than in one run.
                for index in list(sampler.index_tensors()):
                    if len(index) == 0:
                        clipper.empty_batch()  # an empty Poisson batch is still a noisy, counted step
                    else:
                        batch_x, batch_y = dataset.rows(index)
                        clipper.backward(per_sample(clipper.forward(batch_x).squeeze(-1), batch_y))
                    private.step()
                    steps += 1
        finally:
            clipper.remove()
        if private.history != ([(plan.noise_multiplier, plan.sample_rate, steps)] if steps else []):
            raise RuntimeError(f"the private optimizer recorded {private.history}, but {steps} steps ran")
    elif plan.dp:
        secret_seed = plan.secret_seed if plan.secret_seed is not None else secrets.randbits(63)
        noise = torch.Generator().manual_seed(secret_seed)
        sampler = PoissonBatchSampler(len(dataset), plan.sample_rate, steps_per_epoch, seed=secret_seed + 1)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=_whole_batch)
        if plan.clipping != "ghost":
            raise ValueError(f"clipping must be one of {CLIPPING_MODES}, got {plan.clipping!r}")
        with warnings.catch_warnings():
            # Opacus warns that secure_mode is off (its CSPRNG needs torchcsprng, which has no
            # build for this torch) and about its backward hooks; the noise and sampling seed
            # comes from the node's secret instead (see `LocalTraining.secret_seed`).
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="rdp")
            model, optimizer, criterion, loader = engine.make_private(
                module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
                noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.clip_norm,
                poisson_sampling=False, grad_sample_mode="ghost", noise_generator=noise)
            params = [p for p in model.parameters() if p.requires_grad]
            for _ in range(plan.epochs):
                for batch_x, batch_y in loader:
                    optimizer.zero_grad()
                    if len(batch_y) == 0:
                        for p in params:  # an empty Poisson batch is still a noisy, accounted step
                            p.grad = torch.zeros_like(p)
                    else:
                        criterion(model(batch_x).squeeze(-1), batch_y).backward()
                    optimizer.step()
                    steps += 1
        history = engine.accountant.history
        recorded = sum(entry[2] for entry in history)
        if recorded != steps or any(entry[:2] != (plan.noise_multiplier, plan.sample_rate) for entry in history):
            raise RuntimeError(f"Opacus accounted {history}, but {steps} steps ran")
        model = model._module
    else:
        batch = max(1, int(round(plan.sample_rate * len(dataset))))
        shuffle = torch.Generator().manual_seed(plan.seed)
        for _ in range(plan.epochs):
            order = torch.randperm(len(dataset), generator=shuffle)
            for step in range(min(steps_per_epoch, -(-len(dataset) // batch))):
                batch_x, batch_y = dataset.rows(order[step * batch:(step + 1) * batch])
                optimizer.zero_grad()
                loss = criterion(model(batch_x).squeeze(-1), batch_y)
                loss.backward()
                optimizer.step()
                steps += 1
    return LocalResult(weights=get_weights(model), steps=steps, seconds=time.perf_counter() - began)
