"""Local DP-SGD: Poisson batches, secret randomness, and the two clipping paths agreeing."""

from __future__ import annotations

import numpy as np
import pytest

from clients.sampling import PoissonBatchSampler
from clients.training import LocalTraining, train_local
from federation.model import initial_weights


def _data(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 40)).astype(np.float32)
    y = (rng.random(n) < 1 / (1 + np.exp(-(x[:, 0] - 2)))).astype(np.float32)
    return x, y


def _plan(**changes) -> LocalTraining:
    base = dict(model_kind="mlp", epochs=1, sample_rate=0.02, learning_rate=0.005, clip_norm=1.0,
                noise_multiplier=1.0, seed=0)
    return LocalTraining(**{**base, **changes})


def test_poisson_batches_include_each_record_with_probability_q() -> None:
    n, q, steps = 2000, 0.05, 4000
    sampler = PoissonBatchSampler(n, q, steps, seed=3)
    counts = np.zeros(n)
    sizes = []
    for batch in sampler:
        assert len(set(batch)) == len(batch)
        counts[batch] += 1
        sizes.append(len(batch))
    assert np.mean(sizes) == pytest.approx(n * q, rel=0.01)
    assert np.var(sizes) == pytest.approx(n * q * (1 - q), rel=0.1)
    inclusion = counts / steps
    assert inclusion.mean() == pytest.approx(q, rel=0.01)
    assert np.abs(inclusion - q).max() < 6 * np.sqrt(q * (1 - q) / steps)


def test_noise_and_sampling_cannot_be_replayed_from_public_parameters() -> None:
    x, y = _data()
    start = initial_weights("mlp", 0)
    first = train_local(start, x, y, _plan())
    second = train_local(start, x, y, _plan())
    assert first.steps == second.steps == 50
    assert np.abs(first.weights - second.weights).max() > 1e-4


def test_bookkeeping_and_opacus_ghost_train_the_same_model_without_noise() -> None:
    x, y = _data()
    start = initial_weights("mlp", 0)
    ours = train_local(start, x, y, _plan(noise_multiplier=0.0, secret_seed=11, clip_norm=0.1))
    ghost = train_local(start, x, y, _plan(noise_multiplier=0.0, secret_seed=11, clip_norm=0.1,
                                           clipping="ghost"))
    assert np.linalg.norm(ours.weights - ghost.weights) <= 1e-5 * np.linalg.norm(ghost.weights)
    assert np.abs(ours.weights - start).max() > 1e-3


def test_several_local_epochs_run_one_over_q_steps_each() -> None:
    x, y = _data()
    result = train_local(initial_weights("logreg", 0), x, y, _plan(model_kind="logreg", epochs=3))
    assert result.steps == 150


def test_local_metrics_agree_with_scikit_learn_including_ties() -> None:
    """The node computes AUC, Brier score and log loss with numpy (no scikit-learn import in
    every deployed ClientApp process); scikit-learn is the independent reference here."""
    from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

    from clients.evaluation import risk_metrics

    rng = np.random.default_rng(7)
    for size in (2, 9, 300, 5000):
        labels = rng.integers(0, 2, size)
        labels[:2] = [0, 1]
        scores = np.round(rng.random(size), int(rng.integers(1, 4)))  # coarse scores: many ties
        ours, clipped = risk_metrics(labels, scores), np.clip(scores, 1e-7, 1 - 1e-7)
        assert ours["auc"] == pytest.approx(roc_auc_score(labels, clipped), abs=1e-12)
        assert ours["brier"] == pytest.approx(brier_score_loss(labels, clipped), abs=1e-12)
        assert ours["log-loss"] == pytest.approx(log_loss(labels, clipped, labels=[0, 1]), rel=1e-9)
    assert np.isnan(risk_metrics(np.ones(5), rng.random(5))["auc"])


@pytest.mark.parametrize("kind", ["mlp", "logreg", "mlp:128,64", "mlp:7"])
def test_the_weight_vector_length_is_computed_without_building_the_model(kind: str) -> None:
    from federation.model import build_model, num_parameters

    for inputs in (40, 31):
        assert num_parameters(kind, inputs) == sum(p.numel() for p in build_model(kind, inputs).parameters())


def test_the_start_model_does_not_depend_on_what_other_threads_draw_meanwhile() -> None:
    """Concurrent messages of one round must derive one start model (hence one charge identity)
    even while another thread of the node builds models from torch's process-wide generator."""
    import threading

    import torch

    from federation.model import build_model

    expected = initial_weights("mlp", 7)
    stop = threading.Event()

    def draw() -> None:
        while not stop.is_set():
            build_model("mlp")
            torch.rand(64)

    drawer = threading.Thread(target=draw)
    drawer.start()
    try:
        seen = [initial_weights("mlp", 7) for _ in range(200)]
    finally:
        stop.set()
        drawer.join()
    assert all(np.array_equal(w, expected) for w in seen)


def test_the_same_secret_seed_trains_bit_identical_weights() -> None:
    """The deployment engine and the simulation run this same function: one seed, one model."""
    x, y = _data()
    start = initial_weights("mlp", 0)
    first = train_local(start, x, y, _plan(secret_seed=5, epochs=2))
    second = train_local(start, x, y, _plan(secret_seed=5, epochs=2))
    other = train_local(start, x, y, _plan(secret_seed=6, epochs=2))
    assert np.array_equal(first.weights, second.weights)
    assert not np.array_equal(first.weights, other.weights)


def test_every_drawn_batch_is_a_counted_noisy_step_even_when_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Expected batch 2 out of 200 rows: some Poisson batches are empty, and each is still a step
    of the private optimizer (noise added, counted) -- the count the ledger charges."""
    import clients.training as training
    from clients.clipping import PrivateOptimizer

    sizes: list[int] = []
    draws = PoissonBatchSampler.index_tensors

    def recording(self):  # noqa: ANN001, ANN202
        for index in draws(self):
            sizes.append(len(index))
            yield index

    noisy: list[int] = []
    step = PrivateOptimizer.step

    def counting(self):  # noqa: ANN001, ANN202
        before = self.clipper.flat_grad.clone()
        step(self)
        noisy.append(int(not torch.equal(before / self.expected_batch_size, self.clipper.flat_grad)))

    import torch
    monkeypatch.setattr(training.PoissonBatchSampler, "index_tensors", recording)
    monkeypatch.setattr(PrivateOptimizer, "step", counting)
    x, y = _data(200)
    result = train_local(initial_weights("logreg", 0), x, y,
                         _plan(model_kind="logreg", sample_rate=0.01, epochs=2, secret_seed=3))
    assert 0 in sizes and result.steps == len(sizes) == 200
    assert sum(noisy) == 200  # every step, empty or not, carried noise


def test_the_plain_reference_trains_on_shuffled_batches_of_the_expected_size() -> None:
    x, y = _data(1000)
    start = initial_weights("logreg", 0)
    plain = train_local(start, x, y, _plan(model_kind="logreg", dp=False, sample_rate=0.03))
    assert plain.steps == 33  # 1/q steps of 30 rows (of the ceil(1000 / 30) = 34 a permutation holds)
    again = train_local(start, x, y, _plan(model_kind="logreg", dp=False, sample_rate=0.03))
    assert np.array_equal(plain.weights, again.weights)
