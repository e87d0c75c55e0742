"""DP accounting: calibrated noise meets the target, and epsilons recompute independently."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest

from privacy.accounting import (
    DPSpend, GaussianMechanism, HospitalSpend, calibrate_noise, compose_epsilon, epsilon_for, recompute_report,
    remembered_noise)


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


def _hospital_spend() -> HospitalSpend:
    training = DPSpend.of(sample_rate=0.02, noise_multiplier=1.1, steps=150, clip_norm=1.0, delta=1e-6)
    evaluation = GaussianMechanism.gaussian_release(noise_multiplier=40.0, count=3)
    run = compose_epsilon([GaussianMechanism(0.02, 1.1, 150), evaluation], 1e-6)
    return HospitalSpend(run_epsilon=run, ledger_epsilon=run + 0.25, training=training, evaluation=evaluation,
                         evaluation_epsilon=evaluation.epsilon(1e-6))


def test_a_hospital_spend_is_one_record_on_the_wire_and_recomputes_in_the_report() -> None:
    spend = _hospital_spend()
    assert HospitalSpend.from_wire(spend.to_wire()) == spend
    entry = spend.report_entry(target_epsilon=2.0)
    assert entry["clip_norm"] == 1.0 and entry["delta"] == 1e-6  # the node's values, not the server's
    checks = recompute_report({"hospitals": {"hospital_00": entry}})
    assert [c.key for c in checks] == ["epsilon", "evaluation.epsilon", "run_epsilon"] and all(c.ok for c in checks)


@pytest.mark.parametrize(("edit", "field"), [
    (lambda d: d.update(format=0), "format"),
    (lambda d: d.update(run_epsilon="1.0"), "run_epsilon"),
    (lambda d: d.update(ledger_epsilon=float("nan")), "ledger_epsilon"),
    (lambda d: d["training"].update(noise_multiplier=0.0), "noise_multiplier"),
    (lambda d: d["training"].update(steps=2.5), "steps"),
    (lambda d: d["training"].update(delta=-1e-6), "delta"),
    (lambda d: d["evaluation"].update(noise_multiplier=0.0), "evaluation"),
    (lambda d: d.update(training=[1, 2]), "training"),
    (lambda d: d["training"].update(mechanism="a" * 10_000), "training"),
    (lambda d: d["training"].update(accountant="trust me"), "training"),
])
def test_a_malformed_spend_is_refused_naming_its_field(edit, field: str) -> None:
    data = _hospital_spend().to_dict()
    edit(data)
    with pytest.raises(ValueError, match=field):
        HospitalSpend.from_wire(json.dumps(data))
    with pytest.raises(ValueError, match="JSON"):
        HospitalSpend.from_wire("{not json")
