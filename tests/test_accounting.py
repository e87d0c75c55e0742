"""DP accounting: calibrated noise meets the target, and epsilons recompute independently."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest

from privacy.accounting import DPSpend, calibrate_noise, epsilon_for, remembered_noise


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


PLAN = {"target_epsilon": 1.0, "delta": 1e-5, "sample_rate": 0.05, "steps": 400}


def test_a_remembered_calibration_is_the_calibration_and_is_reused_by_the_next_process(tmp_path: Path) -> None:
    cache = tmp_path / "noise_calibrations.json"
    sigma = remembered_noise(cache, **PLAN)
    assert sigma == calibrate_noise(**PLAN)
    # A fresh process (as every deployed ClientApp message is) finds it instead of searching again.
    probe = ("import sys, json; from privacy import accounting as a; calls = []; real = a.calibrate_noise;"
             "a.calibrate_noise = lambda **k: calls.append(k) or real(**k);"
             f"s = a.remembered_noise(sys.argv[1], **json.loads(sys.argv[2])); print(s, len(calls))")
    out = subprocess.run([sys.executable, "-c", probe, str(cache), json.dumps(PLAN)], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert (float(out[0]), int(out[1])) == (sigma, 0)


@pytest.mark.parametrize("content", ["not json", "[1, 2]", json.dumps({json.dumps(list(PLAN.values())): 0.3}),
                                     json.dumps({json.dumps(list(PLAN.values())): "4.2"})])
def test_an_edited_or_corrupt_calibration_file_never_lowers_the_noise(tmp_path: Path, content: str) -> None:
    """0.3 would give epsilon far above the target: it is recalibrated, not used."""
    cache = tmp_path / "noise_calibrations.json"
    cache.write_text(content)
    sigma = remembered_noise(cache, **PLAN)
    assert sigma == calibrate_noise(**PLAN)
    assert epsilon_for(sample_rate=0.05, noise_multiplier=sigma, steps=400, delta=1e-5) <= 1.0
    assert json.loads(cache.read_text())[json.dumps(list(PLAN.values()))] == sigma
