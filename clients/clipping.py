"""DP-SGD steps for Linear models: per-sample clipping in one backward pass ("book-keeping")
and a lean Gaussian-mechanism step of fedrisk's own.

Clipping. Opacus's ghost clipping (`grad_sample_mode="ghost"`) runs two backward passes: one
for the per-sample gradient norms, one for the reweighted loss. For nn.Linear layers on 2-D
inputs one pass is enough (Bu et al., 2022, "book-keeping"): keep each layer's input A (B x in)
and the gradient G (B x out) of the per-sample loss SUM with respect to its output. Sample i's
gradient is then g_i a_i^T for the weight and g_i for the bias, so

    ||grad_i||^2 = sum over layers of ||g_i||^2 * (||a_i||^2 + 1)      (exact)
    c_i          = min(1, C / (||grad_i|| + 1e-6))                      (as Opacus)
    W.grad       = (c * G)^T A,   bias.grad = sum_i c_i g_i.

The backward pass is taken with respect to the layer outputs only, so autograd never forms the
unclipped weight gradients. The clipped sums are written into one flat buffer of which every
trainable parameter's `.grad` is a view.

Noise. `PrivateOptimizer.step` then applies the Gaussian mechanism to that whole buffer at
once: it adds N(0, (sigma * C)^2) to every coordinate (one draw of the buffer's length from the
run's seeded `torch.Generator`), divides by the expected batch size int(n * q) (Opacus's
`loss_reduction="mean"` semantics), calls the wrapped optimizer's `step()` and counts the step.
There is no per-step accountant hook: the privacy analysis needs only (sigma, q, number of
steps), and `PrivateOptimizer.history` gives exactly that, in the form of Opacus's RDP
accountant history, for the caller to check against the steps its loop ran and to account.

The mechanism is the one Opacus's `DPOptimizerFastGradientClipping` implements (each sample's
whole flat gradient clipped to C, noise std sigma * C on the sum, the sum over the expected
batch size), without its per-parameter Python machinery (`summed_grad` copies, processed-flag
checks, a noise tensor and a division per parameter, the hook), which cost about as much per
step as the clipping itself. `tests/test_clipping.py` checks both against explicit per-sample
gradients and Opacus ghost clipping.
"""

from __future__ import annotations

import torch
from opacus import PrivacyEngine
from torch import nn

# Added to the per-sample norm before dividing, as in Opacus's `get_clipping_coef`.
NORM_EPSILON = 1e-6


class UnsupportedLayerError(TypeError):
    """The model has trainable parameters outside nn.Linear, which book-keeping cannot clip."""


class BookkeepingClipper:
    """Leaves the clipped per-sample gradient sum of every nn.Linear parameter in `p.grad`.

    Forward hooks record each Linear layer's input and output during a training forward pass
    (module in train mode, grad enabled); `backward` turns the per-sample losses of that pass
    into clipped gradient sums. Each Linear must be called at most once per forward pass.

    Every trainable parameter's `.grad` is a view into `flat_grad` (in `params` order), which
    `backward` and `empty_batch` overwrite whole, so nothing needs zeroing between steps.
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
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) > 1:
            raise TypeError(f"parameters of several dtypes {sorted(map(str, dtypes))}")
        dtype = dtypes.pop() if dtypes else torch.float32
        self.flat_grad = torch.zeros(sum(p.numel() for p in self.params), dtype=dtype)
        self._views: list[torch.Tensor] = []
        offset = 0
        for p in self.params:
            self._views.append(self.flat_grad[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        self._pairs = list(zip(self.params, self._views))
        view = dict(zip(map(id, self.params), self._views))
        # Per layer: weight grad view or None, bias grad view or None, and whether the clip
        # factors scale the output gradient (out <= in) or the layer input.
        self._plan = [
            (view.get(id(layer.weight)) if layer.weight.requires_grad else None,
             view.get(id(layer.bias)) if layer.bias is not None and layer.bias.requires_grad
             else None,
             layer.out_features <= layer.in_features)
            for layer in self.layers]
        self.per_sample_norms: torch.Tensor | None = None  # unclipped norms of the last batch
        self.ready = False
        """True once `backward` or `empty_batch` has filled `flat_grad`; a private step takes
        (and clears) it, so no step reuses an old gradient or one that was never clipped."""
        self._captured: dict[nn.Linear, tuple[torch.Tensor, torch.Tensor]] = {}
        hooked = set(self.layers)
        self._sequential = ([(layer, layer in hooked) for layer in module]
                            if isinstance(module, nn.Sequential) else None)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`module(x)` for an nn.Sequential, recording the Linear layers' inputs and outputs
        directly instead of through the forward hooks (which cost about a tenth of a forward
        pass of the small MLP). Each Linear runs its own `forward`; every other layer is called
        as nn.Sequential calls it. Other modules: plain `module(x)`, through the hooks."""
        sequential = self._sequential
        if sequential is None or not (self.module.training and torch.is_grad_enabled()):
            return self.module(x)
        captured: dict[nn.Linear, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer, hooked in sequential:
            if hooked:
                if x.dim() != 2:
                    raise UnsupportedLayerError(
                        f"nn.Linear input has shape {tuple(x.shape)}; book-keeping clipping is "
                        "exact only for 2-D (batch x features) inputs")
                if layer in captured:
                    raise RuntimeError("an nn.Linear ran twice in one forward pass; shared "
                                       "weights are not supported by book-keeping clipping")
                out = layer.forward(x)
                captured[layer] = (x.detach(), out)
                x = out
            else:
                x = layer(x)
        self._captured = captured
        return x

    def _bind(self) -> None:
        for p, v in self._pairs:
            if p.grad is not v:
                p.grad = v

    def backward(self, loss_per_sample: torch.Tensor) -> None:
        """Set `p.grad` = sum_i c_i * grad(loss_i) for every trainable parameter.

        `loss_per_sample`: the unreduced loss (criterion with `reduction="none"`), one value per
        row of the batch of the latest training forward pass. Replaces any existing `p.grad`,
        as Opacus's ghost backward does. A zero-row batch gives zero gradients.
        """
        captured, self._captured = self._captured, {}
        if loss_per_sample.dim() == 0:
            raise ValueError("backward needs one loss per sample; use reduction='none'")
        rows = loss_per_sample.shape[0]
        if rows == 0:
            self.empty_batch()
            return
        losses = (loss_per_sample if loss_per_sample.dim() == 1
                  else loss_per_sample.reshape(rows, -1).sum(dim=1))
        if len(captured) != len(self.layers):
            raise RuntimeError("backward needs the per-sample losses of a training forward pass "
                               "(module.train(), grad enabled) through every Linear layer")
        activations, outputs = [], []
        for layer in self.layers:
            a, out = captured[layer]
            if a.shape[0] != rows:
                raise ValueError(f"{rows} losses for a batch of {a.shape[0]} rows")
            activations.append(a)
            outputs.append(out)
        self.ready = False
        # Gradient of the loss SUM w.r.t. each layer output: row i is sample i's own gradient.
        out_grads = torch.autograd.grad(losses.sum(), outputs)
        # Squared per-sample norms: sum over layers of ||g_i||^2 (||a_i||^2 [weight] + 1 [bias]).
        squared = None
        for (weight, bias, _), a, g in zip(self._plan, activations, out_grads):
            g_sq = (g.view(-1).square() if g.shape[1] == 1
                    else torch.linalg.vector_norm(g, dim=1).square_())
            if weight is None:
                squared = g_sq if squared is None else squared.add_(g_sq)
                continue
            a_sq = torch.linalg.vector_norm(a, dim=1).square_()
            if squared is None:
                squared = torch.addcmul(g_sq, g_sq, a_sq) if bias is not None else g_sq.mul_(a_sq)
            else:
                squared.addcmul_(g_sq, a_sq)
                if bias is not None:
                    squared.add_(g_sq)
        self.per_sample_norms = norms = squared.sqrt_()
        clip = torch.div(self.max_grad_norm, norms.add(NORM_EPSILON)).clamp_(max=1.0)
        column = clip.unsqueeze(1)
        for (weight, bias, scale_g), a, g in zip(self._plan, activations, out_grads):
            # Scale whichever factor is narrower: (c*G)^T A == G^T (c*A).
            if scale_g:
                clipped_g = g * column
                if weight is not None:
                    torch.mm(clipped_g.t(), a, out=weight)
                if bias is not None:
                    torch.sum(clipped_g, dim=0, out=bias)
            else:
                if weight is not None:
                    torch.mm(g.t(), a * column, out=weight)
                if bias is not None:
                    torch.mv(g.t(), clip, out=bias)
        self._bind()
        self.ready = True

    def empty_batch(self) -> None:
        """An empty Poisson batch: zero gradients, so the optimizer step adds noise only.

        The step must still be taken: the privacy analysis counts it."""
        self._captured = {}
        self.flat_grad.zero_()
        self._bind()
        self.ready = True

    def remove(self) -> None:
        """Detach the hooks, leaving the module as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class PrivateOptimizer:
    """The Gaussian mechanism and the optimizer step on the clipper's flat gradient buffer.

    `step()`: flat_grad += N(0, (sigma * C)^2) per coordinate, drawn from `generator`;
    flat_grad /= expected_batch_size; the wrapped optimizer's `step()`; `steps += 1`. Every call
    is one counted step of the Poisson-subsampled Gaussian mechanism at rate `sample_rate`,
    whatever the batch held (an empty batch is a noise-only step)."""

    def __init__(self, optimizer: torch.optim.Optimizer, clipper: BookkeepingClipper, *,
                 noise_multiplier: float, max_grad_norm: float, expected_batch_size: int,
                 sample_rate: float, generator: torch.Generator | None = None,
                 secure_mode: bool = False) -> None:
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be non-negative, got {noise_multiplier}")
        if expected_batch_size < 1:
            raise ValueError(f"expected batch size {expected_batch_size}; the mean gradient "
                             "would divide by zero")
        if max_grad_norm != clipper.max_grad_norm:
            raise ValueError(f"noise calibrated for C={max_grad_norm}, but the clipper clips to "
                             f"{clipper.max_grad_norm}")
        self.original_optimizer = optimizer
        self.clipper = clipper
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = int(expected_batch_size)
        self.sample_rate = float(sample_rate)
        self.generator = generator
        self.secure_mode = bool(secure_mode)
        self.steps = 0
        self._std = self.noise_multiplier * self.max_grad_norm
        self._noise = torch.empty_like(clipper.flat_grad)

    @property
    def param_groups(self) -> list[dict]:
        """The wrapped optimizer's parameter groups (learning rate etc.)."""
        return self.original_optimizer.param_groups

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """What ran, as Opacus's RDP accountant records it: [(sigma, q, steps)] ([] if none)."""
        return [(self.noise_multiplier, self.sample_rate, self.steps)] if self.steps else []

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 (optimizer API)
        """Nothing to clear: the clipper overwrites the whole gradient buffer every step."""

    def _draw_noise(self) -> torch.Tensor:
        noise = self._noise
        if not self.secure_mode:
            return noise.normal_(0.0, self._std, generator=self.generator)
        # Secure mode, as Opacus's: discard one draw, then the sum of four draws over 2 (same
        # variance), which defeats floating-point attacks on one Gaussian sample
        # (Holohan and Braghin, 2021, section 5.1 with n = 2).
        torch.empty(1, dtype=noise.dtype).normal_(0.0, self._std, generator=self.generator)
        noise.zero_()
        draw = torch.empty_like(noise)
        for _ in range(4):
            noise.add_(draw.normal_(0.0, self._std, generator=self.generator))
        return noise.div_(2.0)

    def step(self) -> None:
        """One DP-SGD step on the gradients `clipper.backward` / `empty_batch` just left."""
        if not self.clipper.ready:
            raise RuntimeError("no clipped gradient to step on: call clipper.backward(losses) "
                               "or clipper.empty_batch() before every step")
        self.clipper.ready = False
        flat = self.clipper.flat_grad
        if self._std > 0:
            flat.add_(self._draw_noise())
        flat.div_(self.expected_batch_size)
        self.original_optimizer.step()
        self.steps += 1

    def record(self, accountant) -> None:  # noqa: ANN001 (any Opacus accountant)
        """Hand the steps taken so far to an Opacus accountant (e.g. to read epsilon off it)."""
        for _ in range(self.steps):
            accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)


def make_private_bk(*, module: nn.Module, optimizer: torch.optim.Optimizer, sample_rate: float,
                    num_records: int, noise_multiplier: float, max_grad_norm: float,
                    noise_generator: torch.Generator | None = None,
                    engine: PrivacyEngine | None = None,
                    ) -> tuple[nn.Module, PrivateOptimizer, BookkeepingClipper]:
    """Make `module` private like `engine.make_private(..., grad_sample_mode="ghost")` on
    Poisson batches of rate `sample_rate` out of `num_records`, but with single-pass
    book-keeping clipping and fedrisk's own noise step.

    Returns the same `module` (hooks attached), the private optimizer (noise sigma * C,
    division by int(num_records * q), a counted step per `step()`), and the clipper whose
    `backward(loss_per_sample)` replaces `loss.backward()` in the training loop. `engine`, if
    given, only decides secure mode (its CSPRNG, and no seeded generator), as Opacus would.
    """
    secure_mode = bool(engine is not None and engine.secure_mode)
    if noise_generator is not None and secure_mode:
        raise ValueError("a seeded noise generator is prohibited in secure mode")
    if not (0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
    expected_batch_size = int(num_records * sample_rate)
    if expected_batch_size < 1:
        raise ValueError(f"{num_records} rows at sample rate {sample_rate} give an "
                         "expected batch of 0; the mean gradient would divide by zero")
    clipper = BookkeepingClipper(module, max_grad_norm)
    trainable = set(clipper.params)
    in_optimizer = {p for group in optimizer.param_groups for p in group["params"]
                    if p.requires_grad}
    if in_optimizer != trainable:
        clipper.remove()
        raise ValueError("the optimizer must hold exactly the module's trainable parameters")
    private = PrivateOptimizer(
        optimizer, clipper, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size, sample_rate=sample_rate,
        generator=engine.secure_rng if secure_mode else noise_generator, secure_mode=secure_mode)
    return module, private, clipper
