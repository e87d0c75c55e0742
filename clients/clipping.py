"""Per-sample gradient clipping for Linear models in one backward pass ("book-keeping").

Opacus's ghost clipping (`grad_sample_mode="ghost"`) runs two backward passes: one for the
per-sample gradient norms, one for the reweighted loss. For nn.Linear layers on 2-D inputs one
pass is enough (Bu et al., 2022, "book-keeping"): keep each layer's input A (B x in) and the
gradient G (B x out) of the per-sample loss SUM with respect to its output. Sample i's gradient is
then g_i a_i^T for the weight and g_i for the bias, so

    ||grad_i||^2 = sum over layers of ||g_i||^2 * (||a_i||^2 + 1)      (exact)
    c_i          = min(1, C / (||grad_i|| + 1e-6))                      (as Opacus)
    W.grad       = (c * G)^T A,   bias.grad = sum_i c_i g_i.

The backward pass is taken with respect to the layer outputs only, so autograd never forms the
unclipped weight gradients. Everything else stays with Opacus: `DPOptimizerFastGradientClipping`
adds the Gaussian noise (std sigma * C), divides by the expected batch size and feeds the RDP
accountant attached to the caller's `PrivacyEngine`, exactly as `make_private` would.
"""

from __future__ import annotations

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader

# Added to the per-sample norm before dividing, as in Opacus's `get_clipping_coef`.
NORM_EPSILON = 1e-6


class UnsupportedLayerError(TypeError):
    """The model has trainable parameters outside nn.Linear, which book-keeping cannot clip."""


class BookkeepingClipper:
    """Leaves the clipped per-sample gradient sum of every nn.Linear parameter in `p.grad`.

    Forward hooks record each Linear layer's input and output during a training forward pass
    (module in train mode, grad enabled); `backward` turns the per-sample losses of that pass
    into clipped gradient sums. Each Linear must be called at most once per forward pass.
    """

    def __init__(self, module: nn.Module, max_grad_norm: float) -> None:
        """`module`: the model; its trainable parameters must all belong to nn.Linear layers.
        `max_grad_norm`: the clip norm C applied to each sample's whole (flat) gradient."""
        if max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
        for name, sub in module.named_modules():
            own = [p for p in sub.parameters(recurse=False) if p.requires_grad]
            if own and not isinstance(sub, nn.Linear):
                raise UnsupportedLayerError(
                    f"layer {name or '<root>'} ({type(sub).__name__}) has trainable parameters; "
                    "book-keeping clipping supports only nn.Linear (use Opacus ghost clipping)")
        self.module = module
        self.max_grad_norm = float(max_grad_norm)
        self.layers = [sub for sub in module.modules() if isinstance(sub, nn.Linear)
                       and any(p.requires_grad for p in sub.parameters(recurse=False))]
        self.params = [p for layer in self.layers for p in layer.parameters(recurse=False)
                       if p.requires_grad]
        self.per_sample_norms: torch.Tensor | None = None  # unclipped norms of the last batch
        self._captured: dict[nn.Linear, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = [module.register_forward_pre_hook(self._start_forward)]
        self._handles += [layer.register_forward_hook(self._capture) for layer in self.layers]

    def _start_forward(self, _module: nn.Module, _inputs: tuple) -> None:
        self._captured = {}

    def _capture(self, layer: nn.Linear, inputs: tuple[torch.Tensor, ...],
                 output: torch.Tensor) -> None:
        if not (layer.training and torch.is_grad_enabled()):
            return
        if layer in self._captured:
            raise RuntimeError("an nn.Linear ran twice in one forward pass; shared weights are "
                               "not supported by book-keeping clipping")
        if inputs[0].dim() != 2:
            raise UnsupportedLayerError(
                f"nn.Linear input has shape {tuple(inputs[0].shape)}; book-keeping clipping is "
                "exact only for 2-D (batch x features) inputs")
        self._captured[layer] = (inputs[0].detach(), output)

    def backward(self, loss_per_sample: torch.Tensor) -> None:
        """Set `p.grad` = sum_i c_i * grad(loss_i) for every trainable parameter.

        `loss_per_sample`: the unreduced loss (criterion with `reduction="none"`), one value per
        row of the batch of the latest training forward pass. Replaces any existing `p.grad`,
        as Opacus's ghost backward does. A zero-row batch gives zero gradients.
        """
        captured, self._captured = self._captured, {}
        if loss_per_sample.dim() == 0:
            raise ValueError("backward needs one loss per sample; use reduction='none'")
        if loss_per_sample.shape[0] == 0:
            self.empty_batch()
            return
        losses = (loss_per_sample if loss_per_sample.dim() == 1
                  else loss_per_sample.reshape(loss_per_sample.shape[0], -1).sum(dim=1))
        if len(captured) != len(self.layers):
            raise RuntimeError("backward needs the per-sample losses of a training forward pass "
                               "(module.train(), grad enabled) through every Linear layer")
        layers = list(captured)
        activations = [captured[layer][0] for layer in layers]
        if any(a.shape[0] != losses.shape[0] for a in activations):
            raise ValueError(f"{losses.shape[0]} losses for a batch of "
                             f"{activations[0].shape[0]} rows")
        # Gradient of the loss SUM w.r.t. each layer output: row i is sample i's own gradient.
        out_grads = torch.autograd.grad(losses.sum(), [captured[layer][1] for layer in layers])
        squared = torch.zeros_like(losses)
        for layer, a, g in zip(layers, activations, out_grads):
            g_norm_sq = torch.linalg.vector_norm(g, dim=1).square_()
            if layer.weight.requires_grad:
                squared.addcmul_(g_norm_sq, torch.linalg.vector_norm(a, dim=1).square_())
            if layer.bias is not None and layer.bias.requires_grad:
                squared.add_(g_norm_sq)
        self.per_sample_norms = squared.sqrt()
        clip = (self.max_grad_norm / (self.per_sample_norms + NORM_EPSILON)).clamp_(max=1.0)
        clip = clip.unsqueeze(1)
        for layer, a, g in zip(layers, activations, out_grads):
            # Scale whichever factor is narrower: (c*G)^T A == G^T (c*A).
            scale_g = g.shape[1] <= a.shape[1]
            clipped_g = g * clip if scale_g else g
            if layer.weight.requires_grad:
                layer.weight.grad = clipped_g.t() @ (a if scale_g else a * clip)
            if layer.bias is not None and layer.bias.requires_grad:
                layer.bias.grad = clipped_g.sum(dim=0) if scale_g else g.t() @ clip[:, 0]

    def empty_batch(self) -> None:
        """An empty Poisson batch: zero gradients, so the optimizer step adds noise only.

        The step must still be taken: the privacy analysis counts it."""
        self._captured = {}
        for p in self.params:
            p.grad = torch.zeros_like(p)

    def remove(self) -> None:
        """Detach the hooks, leaving the module as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class BookkeepingDPOptimizer(DPOptimizerFastGradientClipping):
    """Opacus's fast-clipping DP optimizer (noise sigma * C, mean over the expected batch,
    accountant hook), with one change: `accumulate` copies `p.grad` with `clone()` where Opacus
    uses `copy.deepcopy`, which costs ~50 us per tensor through Python's copy machinery.
    """

    def accumulate(self) -> None:
        for p in self.params:
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad)
            else:
                p.summed_grad = p.grad.detach().clone()


def make_private_bk(*, module: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader,
                    noise_multiplier: float, max_grad_norm: float, engine: PrivacyEngine,
                    noise_generator: torch.Generator | None = None,
                    ) -> tuple[nn.Module, BookkeepingDPOptimizer, BookkeepingClipper]:
    """Make `module` private like `engine.make_private(..., grad_sample_mode="ghost")`, but
    with single-pass book-keeping clipping.

    `data_loader` should be Opacus's `DPDataLoader` (Poisson sampling); its `sample_rate` q is
    what the accountant records (other loaders: q = 1 / len(loader), as Opacus assumes).
    Returns the same `module` (hooks attached), the Opacus DP optimizer (noise sigma * C,
    division by int(len(dataset) * q), one accountant step per `step()`), and the clipper whose
    `backward(loss_per_sample)` replaces `loss.backward()` in the training loop.
    """
    if noise_generator is not None and engine.secure_mode:
        raise ValueError("a seeded noise generator is prohibited in secure mode")
    sample_rate = float(getattr(data_loader, "sample_rate", 1.0 / len(data_loader)))
    expected_batch_size = int(len(data_loader.dataset) * sample_rate)
    if expected_batch_size < 1:
        raise ValueError(f"{len(data_loader.dataset)} rows at sample rate {sample_rate} give an "
                         "expected batch of 0; the mean gradient would divide by zero")
    clipper = BookkeepingClipper(module, max_grad_norm)
    trainable = set(clipper.params)
    in_optimizer = {p for group in optimizer.param_groups for p in group["params"]
                    if p.requires_grad}
    if in_optimizer != trainable:
        clipper.remove()
        raise ValueError("the optimizer must hold exactly the module's trainable parameters")
    # As `PrivacyEngine._prepare_optimizer` builds it for flat, non-distributed ghost clipping.
    dp_optimizer = BookkeepingDPOptimizer(
        optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size, loss_reduction="mean",
        generator=engine.secure_rng if engine.secure_mode else noise_generator,
        secure_mode=engine.secure_mode)
    dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return module, dp_optimizer, clipper
