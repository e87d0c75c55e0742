"""Book-keeping clipping gives exact clipped per-sample gradient sums, and fedrisk's private step
adds the Gaussian mechanism's noise and counts every step, as Opacus would."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from torch import nn

from clients.clipping import BookkeepingClipper, PrivateOptimizer, UnsupportedLayerError, make_private_bk
from clients.training import TensorBatches
from federation.model import N_FEATURES, build_model, get_weights, set_weights

ROWS = 3000
SAMPLE_RATE = 0.02


def _data(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, N_FEATURES, generator=generator)
    labels = (torch.rand(rows, generator=generator) < 0.3).float()
    return features, labels


def _model(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(kind)
    with torch.no_grad():  # larger than the default init so that gradients differ in size
        for p in model.parameters():
            p.mul_(3.0)
    return model.train()


def _loader(features: torch.Tensor, labels: torch.Tensor, seed: int,
            sample_rate: float = SAMPLE_RATE) -> DPDataLoader:
    return DPDataLoader(TensorBatches(features.numpy(), labels.numpy()), sample_rate=sample_rate,
                        collate_fn=lambda batch: batch[0],
                        generator=torch.Generator().manual_seed(seed))


def _flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().reshape(-1).double() for p in model.parameters()])


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _bookkeeping_grads(weights: np.ndarray, kind: str, x: torch.Tensor, y: torch.Tensor,
                       clip_norm: float) -> torch.Tensor:
    model = _model(kind, 0)
    set_weights(model, weights)
    clipper = BookkeepingClipper(model, clip_norm)
    clipper.backward(nn.BCEWithLogitsLoss(reduction="none")(model(x).squeeze(-1), y))
    return _flat_grads(model)


def _ghost_grads(weights: np.ndarray, kind: str, x: torch.Tensor, y: torch.Tensor,
                 clip_norm: float) -> torch.Tensor:
    """What Opacus's ghost backward leaves in p.grad: the clipped sum, before noise and scaling."""
    model = _model(kind, 0)
    set_weights(model, weights)
    engine = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, optimizer, criterion, _ = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            criterion=nn.BCEWithLogitsLoss(), data_loader=_loader(x, y, 0), noise_multiplier=0.0,
            max_grad_norm=clip_norm, poisson_sampling=False, grad_sample_mode="ghost")
    optimizer.zero_grad()
    criterion(private(x).squeeze(-1), y).backward()
    return _flat_grads(model)


def _brute_force_grads(weights: np.ndarray, kind: str, x: torch.Tensor, y: torch.Tensor,
                       clip_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradients one row at a time in float64, each clipped, then summed."""
    model = _model(kind, 0)
    set_weights(model, weights)
    model = model.double()
    total, norms = None, []
    for i in range(len(y)):
        model.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(
            model(x[i:i + 1].double()).squeeze(-1), y[i:i + 1].double())
        loss.backward()
        grad = _flat_grads(model)
        norms.append(grad.norm())
        clipped = grad * min(1.0, clip_norm / (float(grad.norm()) + 1e-6))
        total = clipped if total is None else total + clipped
    return total, torch.stack(norms)


def _torch_func_grads(weights: np.ndarray, kind: str, x: torch.Tensor, y: torch.Tensor,
                      clip_norm: float) -> torch.Tensor:
    """Per-sample gradients from torch.func (vmap of grad) in float64, clipped, summed."""
    from torch.func import functional_call, grad, vmap

    model = _model(kind, 0)
    set_weights(model, weights)
    model = model.double()
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (xi.unsqueeze(0),)).squeeze()
        return nn.functional.binary_cross_entropy_with_logits(out, yi)

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x.double(), y.double())
    flat = torch.cat([per_sample[name].reshape(len(y), -1) for name, _ in model.named_parameters()], 1)
    factors = (clip_norm / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)
    return (factors[:, None] * flat).sum(0)


@pytest.mark.parametrize("kind", ["mlp", "logreg"])
def test_clipped_sum_matches_opacus_ghost_and_brute_force(kind: str) -> None:
    x, y = _data(256, seed=1)
    weights = get_weights(_model(kind, seed=2))
    reference, norms = _brute_force_grads(weights, kind, x, y, clip_norm=1.0)
    clip_norm = float(norms.median())  # about half the rows are clipped
    reference, _ = _brute_force_grads(weights, kind, x, y, clip_norm)
    assert 0.2 < float((norms > clip_norm).double().mean()) < 0.8

    bookkeeping = _bookkeeping_grads(weights, kind, x, y, clip_norm)
    ghost = _ghost_grads(weights, kind, x, y, clip_norm)
    assert _relative_error(bookkeeping, ghost) < 1e-5
    assert _relative_error(bookkeeping, reference) < 1e-5
    assert _relative_error(bookkeeping, _torch_func_grads(weights, kind, x, y, clip_norm)) < 1e-5
    # Every parameter's gradient is a view of the one flat buffer the noise is added to.
    model = _model(kind, 0)
    set_weights(model, weights)
    clipper = BookkeepingClipper(model, clip_norm)
    clipper.backward(nn.BCEWithLogitsLoss(reduction="none")(model(x).squeeze(-1), y))
    assert torch.equal(clipper.flat_grad.double(), _flat_grads(model))
    assert _relative_error(clipper.per_sample_norms.double(), norms) < 1e-5
    # Clipping must matter, or agreement above would not show it is done right.
    unclipped = _bookkeeping_grads(weights, kind, x, y, clip_norm=1e6)
    assert _relative_error(unclipped, reference) > 1e-2


def _train_epoch(private_path: str, features: torch.Tensor, labels: torch.Tensor,
                 noise_multiplier: float, seed: int = 3
                 ) -> tuple[np.ndarray, PrivacyEngine | PrivateOptimizer, int]:
    """One epoch of DP-Adam on the same Poisson batches, via Opacus ghost or book-keeping.
    Returns the weights, what accounted the steps (Opacus's engine or fedrisk's optimizer) and
    the number of steps run."""
    model = _model("mlp", seed)
    optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = _loader(features, labels, seed)
    engine = PrivacyEngine(accountant="rdp")
    per_sample = nn.BCEWithLogitsLoss(reduction="none")
    if private_path == "ghost":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, optimizer, criterion, loader = engine.make_private(
                module=model, optimizer=optimizer, criterion=nn.BCEWithLogitsLoss(),
                data_loader=loader, noise_multiplier=noise_multiplier, max_grad_norm=1.0,
                poisson_sampling=False, grad_sample_mode="ghost")
    else:
        model, optimizer, clipper = make_private_bk(
            module=model, optimizer=optimizer, sample_rate=loader.sample_rate,
            num_records=len(loader.dataset), noise_multiplier=noise_multiplier, max_grad_norm=1.0)
    steps = 0
    for batch_x, batch_y in loader:
        optimizer.zero_grad()
        if private_path == "ghost":
            if len(batch_y) == 0:
                for p in model.parameters():
                    p.grad = torch.zeros_like(p)
            else:
                criterion(model(batch_x).squeeze(-1), batch_y).backward()
        else:
            clipper.backward(per_sample(model(batch_x).squeeze(-1), batch_y))
        optimizer.step()
        steps += 1
    if private_path == "ghost":
        return get_weights(model._module), engine, steps
    return get_weights(model), optimizer, steps


def test_epoch_matches_opacus_ghost_without_noise() -> None:
    features, labels = _data(ROWS, seed=4)
    start = get_weights(_model("mlp", 3))
    ghost, _, ghost_steps = _train_epoch("ghost", features, labels, noise_multiplier=0.0)
    bookkeeping, _, steps = _train_epoch("bookkeeping", features, labels, noise_multiplier=0.0)
    assert steps == ghost_steps == round(1 / SAMPLE_RATE)
    assert np.abs(ghost - start).max() > 1e-2  # the epoch did move the weights
    # Float32 rounding differs between the two paths and Adam magnifies it on weights whose
    # gradient is near zero, so compare the weight vector as a whole, with a loose per-weight cap.
    assert np.linalg.norm(bookkeeping - ghost) / np.linalg.norm(ghost) < 1e-5
    np.testing.assert_allclose(bookkeeping, ghost, rtol=0, atol=1e-4)


def test_private_optimizer_counts_sigma_rate_and_steps_for_the_accountant() -> None:
    features, labels = _data(ROWS, seed=5)
    weights, private, steps = _train_epoch("bookkeeping", features, labels, noise_multiplier=1.3)
    assert private.history == [(1.3, SAMPLE_RATE, steps)]
    assert steps == round(1 / SAMPLE_RATE)
    assert np.isfinite(weights).all()
    # Handed to Opacus's accountant, the steps give Opacus's own history and a finite epsilon.
    _, _, ghost_steps = _train_epoch("ghost", features, labels, noise_multiplier=1.3)
    engine = PrivacyEngine(accountant="rdp")
    private.record(engine.accountant)
    assert engine.accountant.history == [(1.3, SAMPLE_RATE, ghost_steps)]
    assert 0 < engine.get_epsilon(delta=1e-5) < float("inf")


def _private_logreg(rows: int, sample_rate: float, noise_multiplier: float, clip_norm: float,
                    seed: int = 0, **kwargs) -> tuple[nn.Module, PrivateOptimizer, BookkeepingClipper]:
    model = _model("logreg", 0)
    return make_private_bk(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), sample_rate=sample_rate,
        num_records=rows, noise_multiplier=noise_multiplier, max_grad_norm=clip_norm,
        noise_generator=torch.Generator().manual_seed(seed), **kwargs)


def test_noise_is_added_with_std_sigma_times_clip_over_batch() -> None:
    model, optimizer, clipper = _private_logreg(200, 0.5, 2.0, 0.5)  # expected batch 100
    before = get_weights(model)
    draws = []
    for _ in range(400):
        set_weights(model, before)
        clipper.empty_batch()
        optimizer.step()
        draws.append(before - get_weights(model))
    draws = np.stack(draws)  # steps x 41 coordinates
    # SGD with lr 1 moves by the noise / expected batch: std 2.0 * 0.5 / 100 on every coordinate.
    assert np.std(draws) == pytest.approx(0.01, rel=0.05)
    assert abs(np.mean(draws)) < 4 * 0.01 / np.sqrt(draws.size)
    per_coordinate = np.std(draws, axis=0)
    assert per_coordinate.min() > 0.0075 and per_coordinate.max() < 0.0125  # no coordinate spared
    # Independent across coordinates and steps (largest correlation near 1/sqrt(400) under independence).
    correlation = np.corrcoef(draws.T) - np.eye(draws.shape[1])
    assert np.abs(correlation).max() < 0.25
    from scipy import stats
    assert stats.kstest(draws.ravel() / 0.01, "norm").pvalue > 1e-3
    assert optimizer.history == [(2.0, 0.5, 400)]


def test_a_step_is_the_clipped_sum_plus_seeded_noise_over_the_expected_batch() -> None:
    """The whole mechanism at once, against an independent computation: SGD with lr 1 moves by
    exactly (sum of clipped per-sample gradients + N(0, (sigma C)^2)) / int(n q), the noise being
    the next draws of the run's generator over the flat parameter vector."""
    x, y = _data(64, seed=9)
    model = _model("mlp", 4)
    start = get_weights(model)
    clipped_sum, norms = _brute_force_grads(start, "mlp", x, y, clip_norm=1.0)
    clip_norm = float(norms.median())
    clipped_sum, _ = _brute_force_grads(start, "mlp", x, y, clip_norm)
    sigma, rows, rate = 0.7, 1000, 0.05  # expected batch 50, not the 64 rows this batch holds
    model, optimizer, clipper = make_private_bk(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), sample_rate=rate,
        num_records=rows, noise_multiplier=sigma, max_grad_norm=clip_norm,
        noise_generator=torch.Generator().manual_seed(123))
    clipper.backward(nn.BCEWithLogitsLoss(reduction="none")(model(x).squeeze(-1), y))
    optimizer.step()
    noise = torch.empty(len(start)).normal_(0.0, sigma * clip_norm,
                                            generator=torch.Generator().manual_seed(123))
    expected = (clipped_sum.numpy() + noise.double().numpy()) / 50
    np.testing.assert_allclose(start - get_weights(model), expected, rtol=1e-4, atol=1e-6)


def test_zero_noise_multiplier_adds_nothing_and_still_counts() -> None:
    model, optimizer, clipper = _private_logreg(200, 0.5, 0.0, 1.0)
    before = get_weights(model)
    clipper.empty_batch()
    optimizer.step()
    assert np.array_equal(get_weights(model), before)
    assert optimizer.history == [(0.0, 0.5, 1)]


def test_secure_mode_noise_has_the_same_std() -> None:
    """Opacus's secure-mode draw (one discarded, four summed over 2) keeps the std sigma * C."""
    model = _model("logreg", 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    clipper = BookkeepingClipper(model, 0.5)
    private = PrivateOptimizer(optimizer, clipper, noise_multiplier=2.0, max_grad_norm=0.5,
                               expected_batch_size=100, sample_rate=0.5,
                               generator=torch.Generator().manual_seed(1), secure_mode=True)
    before = get_weights(model)
    draws = []
    for _ in range(300):
        set_weights(model, before)
        clipper.empty_batch()
        private.step()
        draws.append(before - get_weights(model))
    assert np.std(np.concatenate(draws)) == pytest.approx(0.01, rel=0.06)
    with pytest.raises(ValueError, match="secure mode"):
        class SecureEngine:
            secure_mode = True
        _private_logreg(200, 0.5, 1.0, 1.0, engine=SecureEngine())


def test_empty_batch_is_a_finite_noise_only_step() -> None:
    features, labels = _data(ROWS, seed=7)
    model = _model("mlp", 0)
    model, optimizer, clipper = make_private_bk(
        module=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        sample_rate=SAMPLE_RATE, num_records=ROWS, noise_multiplier=1.0, max_grad_norm=1.0)
    per_sample = nn.BCEWithLogitsLoss(reduction="none")
    start = get_weights(model)
    empty_x, empty_y = features[:0], labels[:0]  # what the Poisson loader yields for no rows
    optimizer.zero_grad()
    clipper.backward(per_sample(model(empty_x).squeeze(-1), empty_y))
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    optimizer.step()
    optimizer.zero_grad()
    clipper.empty_batch()
    optimizer.step()
    after = get_weights(model)
    assert np.isfinite(after).all() and not np.array_equal(after, start)  # noise was added
    assert optimizer.history == [(1.0, SAMPLE_RATE, 2)]


def test_a_step_needs_freshly_clipped_gradients() -> None:
    """No step on stale gradients, nor on gradients that `loss.backward()` left unclipped."""
    x, y = _data(32, seed=10)
    model, optimizer, clipper = _private_logreg(200, 0.5, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="clipped gradient"):
        optimizer.step()
    clipper.backward(nn.BCEWithLogitsLoss(reduction="none")(model(x).squeeze(-1), y))
    optimizer.step()
    nn.BCEWithLogitsLoss()(model(x).squeeze(-1), y).backward()
    with pytest.raises(RuntimeError, match="clipped gradient"):
        optimizer.step()
    assert optimizer.history == [(1.0, 0.5, 1)]


def test_empty_poisson_batches_in_a_loop_are_counted() -> None:
    features, labels = _data(200, seed=8)
    loader = _loader(features, labels, 0, sample_rate=0.01)  # expected batch 2: some are empty
    model = _model("logreg", 0)
    model, optimizer, clipper = make_private_bk(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), sample_rate=0.01,
        num_records=200, noise_multiplier=1.0, max_grad_norm=1.0)
    per_sample = nn.BCEWithLogitsLoss(reduction="none")
    sizes = []
    for batch_x, batch_y in loader:
        sizes.append(len(batch_y))
        optimizer.zero_grad()
        clipper.backward(per_sample(model(batch_x).squeeze(-1), batch_y))
        optimizer.step()
    assert 0 in sizes and len(sizes) == 100
    assert optimizer.history == [(1.0, 0.01, 100)]
    assert np.isfinite(get_weights(model)).all()


def test_refuses_an_expected_batch_of_zero() -> None:
    model = _model("logreg", 0)
    with pytest.raises(ValueError, match="expected batch of 0"):
        make_private_bk(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        sample_rate=0.01, num_records=40, noise_multiplier=1.0, max_grad_norm=1.0)


def test_refuses_layers_it_cannot_clip() -> None:
    with pytest.raises(UnsupportedLayerError, match="LayerNorm"):
        BookkeepingClipper(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 1)), 1.0)
    clipper = BookkeepingClipper(nn.Sequential(nn.Linear(4, 1)), 1.0)
    with pytest.raises(UnsupportedLayerError, match="2-D"):
        clipper.module(torch.randn(2, 3, 4))
    shared = nn.Linear(4, 4)
    clipper = BookkeepingClipper(nn.Sequential(shared, nn.ReLU(), shared), 1.0)
    with pytest.raises(RuntimeError, match="twice"):
        clipper.module(torch.randn(2, 4))


@pytest.mark.parametrize("kind", ["mlp", "logreg"])
def test_the_hook_free_forward_records_what_the_hooks_record(kind: str) -> None:
    x, y = _data(128, seed=11)
    per_sample = nn.BCEWithLogitsLoss(reduction="none")
    model = _model(kind, 5)
    clipper = BookkeepingClipper(model, 0.5)
    reference = model(x)  # through the hooks
    out = clipper.forward(x)
    assert torch.equal(out, reference)
    clipper.backward(per_sample(out.squeeze(-1), y))
    direct = clipper.flat_grad.clone()
    clipper.backward(per_sample(model(x).squeeze(-1), y))  # through the hooks
    assert torch.equal(direct, clipper.flat_grad)
    with pytest.raises(RuntimeError, match="training forward pass"):
        clipper.backward(per_sample(out.squeeze(-1), y))  # nothing recorded since the last backward
    with torch.no_grad():  # outside training, a plain forward that records nothing
        assert torch.equal(clipper.forward(x), model(x))


def test_the_hook_free_forward_refuses_what_it_cannot_clip() -> None:
    clipper = BookkeepingClipper(nn.Sequential(nn.Linear(4, 1)), 1.0)
    with pytest.raises(UnsupportedLayerError, match="2-D"):
        clipper.forward(torch.randn(2, 3, 4))
    shared = nn.Linear(4, 4)
    clipper = BookkeepingClipper(nn.Sequential(shared, nn.ReLU(), shared), 1.0)
    with pytest.raises(RuntimeError, match="twice"):
        clipper.forward(torch.randn(2, 4))
