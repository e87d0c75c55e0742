"""Poisson subsampling for DP-SGD, drawn in O(batch) instead of O(n) per step.

Poisson sampling includes each record independently with probability q. Equivalently, the
batch size is Binomial(n, q) and, given that size k, the batch is a uniformly random k-subset
of the records: the two procedures have the same distribution over batches, so the privacy
analysis of the Poisson-subsampled Gaussian mechanism applies unchanged. Opacus's sampler
draws n uniforms per step; this one draws a binomial and k indices.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields `steps` Poisson batches of record indices out of `num_records` at rate q.

    `sample_rate` is read by the DP machinery (as on Opacus's DPDataLoader)."""

    def __init__(self, num_records: int, sample_rate: float, steps: int, seed: int) -> None:
        if not (0 < sample_rate <= 1):
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
        self.num_records = int(num_records)
        self.sample_rate = float(sample_rate)
        self.steps = int(steps)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.steps

    def _draw(self) -> np.ndarray:
        size = int(self.rng.binomial(self.num_records, self.sample_rate))
        # A uniformly random `size`-subset; its order is irrelevant (the batch enters as a sum),
        # so numpy's final shuffle of it is skipped.
        return self.rng.choice(self.num_records, size=size, replace=False,
                               shuffle=False).astype(np.int64, copy=False)

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield self._draw().tolist()

    def index_tensors(self) -> Iterator[torch.Tensor]:
        """The same batches as iterating the sampler (same draws from the same generator),
        as int64 tensors for `TensorBatches.rows`, with no round trip through Python lists."""
        for _ in range(self.steps):
            yield torch.from_numpy(self._draw())
