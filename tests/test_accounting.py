"""DP accounting: calibrated noise meets the target, and epsilons recompute independently."""

from __future__ import annotations

import dp_accounting
import pytest

from privacy.accounting import DPSpend, calibrate_noise, epsilon_for


def _independent_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    """Google's dp-accounting RDP accountant on the same Poisson-subsampled Gaussian."""
    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(event, steps)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("target", [0.5, 1.0, 4.0])
def test_calibrated_noise_meets_the_target_without_wasting_it(target: float) -> None:
    sigma = calibrate_noise(target_epsilon=target, delta=1e-5, sample_rate=0.01, steps=500)
    eps = epsilon_for(sample_rate=0.01, noise_multiplier=sigma, steps=500, delta=1e-5)
    assert target * 0.99 <= eps <= target


@pytest.mark.parametrize("q,sigma,steps", [(0.01, 1.1, 500), (0.02, 0.8, 1000), (0.005, 2.0, 200)])
def test_epsilon_matches_an_independent_accountant(q: float, sigma: float, steps: int) -> None:
    ours = epsilon_for(sample_rate=q, noise_multiplier=sigma, steps=steps, delta=1e-5)
    theirs = _independent_epsilon(q, sigma, steps, 1e-5)
    assert ours == pytest.approx(theirs, rel=0.02)


def test_spend_record_carries_everything_needed_to_recompute() -> None:
    spend = DPSpend.of(sample_rate=0.01, noise_multiplier=1.2, steps=300, clip_norm=1.0, delta=1e-5)
    recomputed = epsilon_for(sample_rate=spend.sample_rate, noise_multiplier=spend.noise_multiplier,
                             steps=spend.steps, delta=spend.delta)
    assert spend.epsilon == recomputed
    assert {"sample_rate", "noise_multiplier", "steps", "clip_norm", "delta", "epsilon"} <= set(spend.to_dict())
