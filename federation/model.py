"""Model definitions and the flat-vector view of their weights that the HE codec carries.

torch is imported by the functions that build or run a model, not by this module: in the
deployment engine every message a hospital answers starts a fresh ClientApp process, and the
census, reveal and release messages only need the vector length and the digest."""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING

import numpy as np

from federation.config import model_layers
from federation.features import FEATURE_NAMES

N_FEATURES = len(FEATURE_NAMES)
if TYPE_CHECKING:
    from torch import nn

PRIOR_RATE = 0.10
"""Public prior of 90-day medical-debt delinquency used to initialise the output bias, so
the first rounds are calibrated without looking at any hospital's label rate."""


LOW_BAND_UPPER = 0.10
"""A probability of 90-day delinquency below 10% is `low` risk (about the population base rate)."""
MEDIUM_BAND_UPPER = 0.30
"""From 10% up to 30% is `medium`; 30% and above is `high`."""
RISK_BANDS: tuple[tuple[str, float, float], ...] = (
    ("low", 0.0, LOW_BAND_UPPER), ("medium", LOW_BAND_UPPER, MEDIUM_BAND_UPPER), ("high", MEDIUM_BAND_UPPER, 1.0))
"""The risk bands of a released model's probability, as (name, lower, upper): the node's scorer
assigns them (`clients.scoring.risk_band`) and a release is checked against them
(`server.calibration.band_rates`)."""


def risk_band(probability: float) -> str:
    """The `RISK_BANDS` band of a calibrated probability: each band holds [lower, upper), the last
    one 1 too."""
    for name, _, upper in RISK_BANDS[:-1]:
        if probability < upper:
            return name
    return RISK_BANDS[-1][0]


def build_model(kind: str, n_features: int = N_FEATURES) -> nn.Module:
    """`mlp`: n-64-32-1 with ReLU (`mlp:W1,W2,...` for other hidden widths); `logreg`: n-1
    (n = 40 for the standard contract). All output one logit."""
    import torch
    from torch import nn

    _, hidden = model_layers(kind)
    layers: list[nn.Module] = []
    width = n_features
    for units in hidden:
        layers += [nn.Linear(width, units), nn.ReLU()]
        width = units
    model = nn.Sequential(*layers, nn.Linear(width, 1))
    with torch.no_grad():
        model[-1].bias.fill_(float(np.log(PRIOR_RATE / (1 - PRIOR_RATE))))
    return model


def num_parameters(kind: str, n_features: int = N_FEATURES) -> int:
    """Length of the flat weight vector of a model kind: each linear layer's weights and biases."""
    widths = (n_features, *model_layers(kind)[1], 1)
    return sum(inputs * outputs + outputs for inputs, outputs in zip(widths, widths[1:]))


def initial_weights(kind: str, seed: int, n_features: int = N_FEATURES) -> np.ndarray:
    """The public starting point of a run: every hospital derives the same one from the seed.

    Each layer is re-drawn (torch's default Linear initialisation, in layer order) from a
    generator of its own: torch's process-wide generator is shared with every other thread of
    the node, so a model built concurrently elsewhere would shift the draws and give two
    messages of one round two different start models, hence two charge identities."""
    import torch
    from torch import nn

    model = build_model(kind, n_features)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.bias.uniform_(-bound, bound, generator=generator)
        model[-1].bias.fill_(float(np.log(PRIOR_RATE / (1 - PRIOR_RATE))))
    return get_weights(model)


def get_weights(model: nn.Module) -> np.ndarray:
    """All parameters as one float64 vector, in `model.parameters()` order."""
    import torch

    return torch.nn.utils.parameters_to_vector(
        [p.detach() for p in model.parameters()]).double().numpy().copy()


def set_weights(model: nn.Module, weights: np.ndarray) -> None:
    """Load a flat vector produced by `get_weights` into `model`."""
    import torch

    vector = torch.as_tensor(np.asarray(weights), dtype=torch.float32)
    expected = sum(p.numel() for p in model.parameters())
    if vector.numel() != expected:
        raise ValueError(f"weight vector has {vector.numel()} values, model needs {expected}")
    torch.nn.utils.vector_to_parameters(vector, list(model.parameters()))


def load_model(kind: str, weights: np.ndarray, n_features: int = N_FEATURES) -> nn.Module:
    """A model of `kind` holding `weights`, in eval mode."""
    model = build_model(kind, n_features)
    set_weights(model, weights)
    return model.eval()


def weights_digest(weights: np.ndarray) -> str:
    """SHA-256 of the released model: its float32 little-endian bytes."""
    return hashlib.sha256(np.asarray(weights, dtype="<f4").tobytes()).hexdigest()


def predict_proba(model: nn.Module, features: np.ndarray, batch: int = 65536) -> np.ndarray:
    """Predicted probability of delinquency for each row."""
    import torch

    model.eval()
    with torch.no_grad():
        out = [torch.sigmoid(model(torch.as_tensor(features[i:i + batch]))).squeeze(-1).numpy()
               for i in range(0, len(features), batch)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
