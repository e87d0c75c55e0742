"""DP accounting cross-checked by independent accountants on what a hospital's ledger composes:
DP-SGD runs, Gaussian cohort answers and DP evaluation releases, mixed. The PLD figure is never
more than 2% below Opacus's PRV accountant (an implementation independent of dp_accounting),
never above RDP, and within 1% of dp_accounting's own public PLD accountant at 10x finer
discretisation; noise calibrated by PLD meets its target under PRV too.

Each check costs PRV compositions of thousands of steps (seconds each), so this file is in the
integration tier; test_accounting.py keeps the single-mechanism checks in the fast tier."""

from __future__ import annotations

import dp_accounting
import pytest

from privacy.accounting import RDP_ACCOUNTANT, GaussianMechanism, calibrate_noise, compose_epsilon, prv_epsilon


MIXED = [  # what a hospital's ledger composes: DP-SGD runs, Gaussian cohort answers, DP evaluation releases
    [GaussianMechanism(0.01, 1.28, 500), GaussianMechanism.gaussian_release(noise_multiplier=34.5, count=5)],
    [GaussianMechanism(0.01, 1.1, 500), GaussianMechanism.gaussian_release(noise_multiplier=4.4),
     GaussianMechanism.gaussian_release(noise_multiplier=9.0, count=2), GaussianMechanism(0.05, 2.0, 300)],
    [GaussianMechanism(0.02, 1.5, 800), GaussianMechanism(0.005, 0.9, 2000),
     GaussianMechanism.gaussian_release(noise_multiplier=17.2, count=5), GaussianMechanism.gaussian_release(noise_multiplier=35.0)],
    [GaussianMechanism.gaussian_release(noise_multiplier=100.0), GaussianMechanism(0.01, 5.0, 100)],  # small epsilon
]


@pytest.mark.parametrize("mechanisms", MIXED, ids=["demo-run", "runs-and-answers", "long-runs", "small-epsilon"])
def test_a_mixed_composition_is_never_below_prv_and_never_above_rdp(mechanisms: list[GaussianMechanism]) -> None:
    for delta in (1e-5, 1e-6):
        ours = compose_epsilon(mechanisms, delta)
        prv = prv_epsilon(mechanisms, delta)
        assert 0.98 * prv.estimate <= ours <= prv.upper, (ours, prv)
        assert ours <= compose_epsilon(mechanisms, delta, accountant=RDP_ACCOUNTANT)


def test_the_composition_is_dp_accountings_own_fine_pld_accountant_within_a_percent() -> None:
    """Merging equal mechanisms and plain Gaussians, and the discretisation, cost no accuracy:
    the figure is dp_accounting's public PLDAccountant at 10x finer discretisation, within 1%."""
    mechanisms = MIXED[1]
    fine = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    for m in mechanisms:
        gaussian = dp_accounting.GaussianDpEvent(m.noise_multiplier)
        fine.compose(gaussian if m.sample_rate == 1.0 else dp_accounting.PoissonSampledDpEvent(m.sample_rate, gaussian),
                     m.steps)
    ours = compose_epsilon(mechanisms, 1e-5)
    assert ours == pytest.approx(fine.get_epsilon(1e-5), rel=0.01) and ours >= fine.get_epsilon(1e-5) * 0.999
    shuffled = [mechanisms[3], GaussianMechanism(0.01, 1.1, 200), mechanisms[2], mechanisms[1], GaussianMechanism(0.01, 1.1, 300)]
    assert compose_epsilon(shuffled, 1e-5) == ours  # the same charges, split and ordered otherwise


def test_pld_calibrated_noise_meets_the_target_under_prv_too_with_less_noise_than_rdp() -> None:
    """The demo's plan: q = 0.01, 500 steps, delta 1e-6, its 5 DP evaluations, target 1."""
    plan = {"target_epsilon": 1.0, "delta": 1e-6, "sample_rate": 0.01, "steps": 500, "extra": ((1.0, 34.5, 5),)}
    pld = calibrate_noise(**plan)
    rdp = calibrate_noise(**plan, accountant=RDP_ACCOUNTANT)
    assert pld < 0.95 * rdp  # about 8% less noise for the same guarantee
    mechanisms = [GaussianMechanism(0.01, pld, 500), GaussianMechanism.gaussian_release(noise_multiplier=34.5, count=5)]
    assert prv_epsilon(mechanisms, 1e-6).estimate <= 1.0 * 1.02
    assert compose_epsilon(mechanisms, 1e-6) <= 1.0 < compose_epsilon(mechanisms, 1e-6, accountant=RDP_ACCOUNTANT)
