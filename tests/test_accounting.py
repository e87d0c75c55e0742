"""DP accounting: calibrated noise meets the target, and every epsilon is a bound that independent
accountants confirm: the PLD figure is never below Opacus's PRV accountant (2%) nor above RDP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest
from opacus.accountants import PRVAccountant

from privacy.accounting import (
    ACCOUNTANT, RDP_ACCOUNTANT, BudgetParameterError, DPSpend, GaussianMechanism, HospitalSpend, calibrate_noise,
    compose_epsilon, epsilon_for, prv_epsilon, recompute_report, remembered_noise)


def _independent_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    """Opacus's PRV accountant (Gopi et al.'s numerical composition, an implementation independent
    of dp_accounting) on the same Poisson-subsampled Gaussian: its estimate."""
    return prv_epsilon([GaussianMechanism(q, sigma, steps)], delta).estimate


def _google_rdp(mechanisms: list[GaussianMechanism], delta: float) -> float:
    """Google's dp-accounting RDP accountant on the same mechanisms: the looser bound."""
    accountant = dp_accounting.rdp.RdpAccountant()
    for m in mechanisms:
        gaussian = dp_accounting.GaussianDpEvent(m.noise_multiplier)
        accountant.compose(gaussian if m.sample_rate == 1.0 else dp_accounting.PoissonSampledDpEvent(m.sample_rate, gaussian),
                           m.steps)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("target", [0.5, 1.0, 4.0])
def test_calibrated_noise_meets_the_target_without_wasting_it(target: float) -> None:
    for accountant in (ACCOUNTANT, RDP_ACCOUNTANT):
        sigma = calibrate_noise(target_epsilon=target, delta=1e-5, sample_rate=0.01, steps=500, accountant=accountant)
        eps = epsilon_for(sample_rate=0.01, noise_multiplier=sigma, steps=500, delta=1e-5, accountant=accountant)
        assert target * 0.99 <= eps <= target


@pytest.mark.parametrize("q,sigma,steps", [(0.01, 1.1, 500), (0.02, 0.8, 1000), (0.005, 2.0, 200)])
def test_epsilon_is_never_below_an_independent_accountant_nor_above_rdp(q: float, sigma: float, steps: int) -> None:
    ours = epsilon_for(sample_rate=q, noise_multiplier=sigma, steps=steps, delta=1e-5)
    prv = prv_epsilon([GaussianMechanism(q, sigma, steps)], 1e-5)
    assert 0.98 * prv.estimate <= ours <= prv.upper  # not under PRV, and as tight as it
    rdp = epsilon_for(sample_rate=q, noise_multiplier=sigma, steps=steps, delta=1e-5, accountant=RDP_ACCOUNTANT)
    assert ours <= rdp == pytest.approx(_google_rdp([GaussianMechanism(q, sigma, steps)], 1e-5), rel=0.02)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # Opacus's PRV at q = 1 takes log(0), as intended
def test_the_prv_cross_check_is_opacuss_own_accountant_fed_the_same_mechanisms() -> None:
    mechanisms = [GaussianMechanism(0.02, 1.1, 150), GaussianMechanism.gaussian_release(noise_multiplier=20.0, count=3)]
    public = PRVAccountant()
    for m in mechanisms:
        for _ in range(m.steps):
            public.step(noise_multiplier=m.noise_multiplier, sample_rate=m.sample_rate)
    assert prv_epsilon(mechanisms, 1e-5).upper == pytest.approx(public.get_epsilon(1e-5, eps_error=0.01), rel=1e-3)


def test_an_unknown_accountant_is_named() -> None:
    with pytest.raises(BudgetParameterError, match="accountant must be one of .*got 'moments'"):
        compose_epsilon([GaussianMechanism(0.01, 1.0, 10)], 1e-5, accountant="moments")


def test_spend_record_carries_everything_needed_to_recompute() -> None:
    spend = DPSpend.of(sample_rate=0.01, noise_multiplier=1.2, steps=300, clip_norm=1.0, delta=1e-5)
    recomputed = epsilon_for(sample_rate=spend.sample_rate, noise_multiplier=spend.noise_multiplier,
                             steps=spend.steps, delta=spend.delta)
    assert spend.epsilon == recomputed
    assert {"sample_rate", "noise_multiplier", "steps", "clip_norm", "delta", "epsilon"} <= set(spend.to_dict())


PLAN = {"target_epsilon": 1.0, "delta": 1e-5, "sample_rate": 0.05, "steps": 400}
KEY = json.dumps(list(PLAN.values()) + [ACCOUNTANT])  # the cache names the accountant
RDP_ERA_KEY = json.dumps(list(PLAN.values()))  # as the RDP version of fedrisk wrote it


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


@pytest.mark.parametrize("content", ["not json", "[1, 2]", json.dumps({KEY: 0.3}), json.dumps({KEY: "4.2"})])
def test_an_edited_or_corrupt_calibration_file_never_lowers_the_noise(tmp_path: Path, content: str) -> None:
    """0.3 would give epsilon far above the target: it is recalibrated, not used."""
    cache = tmp_path / "noise_calibrations.json"
    cache.write_text(content)
    sigma = remembered_noise(cache, **PLAN)
    assert sigma == calibrate_noise(**PLAN)
    assert epsilon_for(sample_rate=0.05, noise_multiplier=sigma, steps=400, delta=1e-5) <= 1.0
    assert json.loads(cache.read_text())[KEY] == sigma


def test_a_sigma_remembered_under_rdp_is_recalibrated_under_pld(tmp_path: Path) -> None:
    """An RDP-era sigma is valid (it meets the target under PLD too) but loose: not reused."""
    rdp_sigma = calibrate_noise(**PLAN, accountant=RDP_ACCOUNTANT)
    cache = tmp_path / "noise_calibrations.json"
    cache.write_text(json.dumps({RDP_ERA_KEY: rdp_sigma}))
    sigma = remembered_noise(cache, **PLAN)
    assert sigma == calibrate_noise(**PLAN) < rdp_sigma
    assert json.loads(cache.read_text()) == {RDP_ERA_KEY: rdp_sigma, KEY: sigma}


@pytest.mark.parametrize("planted", [None, 0.05, 40.0])
def test_the_evaluation_noise_is_remembered_and_a_planted_value_is_never_used(tmp_path: Path, planted) -> None:
    """The next process reads the run's evaluation noise multiplier instead of bisecting again;
    a value planted in the file that spends more than the budget (0.05) or wastes it (40: far
    more noise than needed) is recalibrated, so the file can cost neither privacy nor accuracy."""
    from federation.round_evaluation import evaluation_noise_multiplier, remembered_evaluation_noise

    cache = tmp_path / "noise_calibrations.json"
    key = json.dumps(["evaluation", 0.5, 1e-5, 3, ACCOUNTANT])
    if planted is not None:
        cache.write_text(json.dumps({key: planted}))
    z = remembered_evaluation_noise(cache, 0.5, 1e-5, 3)
    assert z == evaluation_noise_multiplier(0.5, 1e-5, 3) and json.loads(cache.read_text())[key] == z
    probe = ("import sys; from federation import round_evaluation as r; calls = [];"
             "r._calibrated = lambda *a: calls.append(a) or 0.0;"
             "print(r.remembered_evaluation_noise(sys.argv[1], 0.5, 1e-5, 3), len(calls))")
    out = subprocess.run([sys.executable, "-c", probe, str(cache)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert (float(out[0]), int(out[1])) == (z, 0)


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
    (lambda d: d["training"].update(accountant=RDP_ACCOUNTANT), "training"),  # a PLD spend's part cannot say RDP
    (lambda d: d.update(accountant="trust me"), "accountant"),
    (lambda d: d.pop("accountant"), "accountant"),
])
def test_a_malformed_spend_is_refused_naming_its_field(edit, field: str) -> None:
    data = _hospital_spend().to_dict()
    edit(data)
    with pytest.raises(ValueError, match=field):
        HospitalSpend.from_wire(json.dumps(data))
    with pytest.raises(ValueError, match="JSON"):
        HospitalSpend.from_wire("{not json")


def _rdp_era_spend() -> dict:
    """A spend as the RDP version of fedrisk sent it (format 1, no top-level accountant)."""
    training = {"mechanism": "DP-SGD, Poisson-subsampled Gaussian", "sample_rate": 0.02, "noise_multiplier": 1.1,
                "steps": 150, "clip_norm": 1.0, "delta": 1e-6, "accountant": RDP_ACCOUNTANT,
                "epsilon": epsilon_for(sample_rate=0.02, noise_multiplier=1.1, steps=150, delta=1e-6,
                                       accountant=RDP_ACCOUNTANT)}
    evaluation = GaussianMechanism.gaussian_release(noise_multiplier=40.0, count=3)
    run = compose_epsilon([GaussianMechanism(0.02, 1.1, 150), evaluation], 1e-6, accountant=RDP_ACCOUNTANT)
    return {"format": 1, "run_epsilon": run, "ledger_epsilon": run + 0.25, "training": training,
            "evaluation": {**evaluation.to_dict(), "epsilon": evaluation.epsilon(1e-6, accountant=RDP_ACCOUNTANT)}}


def test_a_spend_written_by_the_rdp_version_is_read_as_rdp_and_recomputes_as_rdp() -> None:
    spend = HospitalSpend.from_dict(_rdp_era_spend())
    assert spend.accountant == spend.training.accountant == RDP_ACCOUNTANT
    assert spend.to_dict() == _rdp_era_spend()  # written back as it came: a checkpoint keeps it RDP
    entry = spend.report_entry(target_epsilon=2.0)
    assert entry["accountant"] == RDP_ACCOUNTANT
    checks = recompute_report({"hospitals": {"hospital_00": entry}})
    assert all(c.ok and c.accountant == RDP_ACCOUNTANT for c in checks)
    # never silently reinterpreted: read as PLD, its (RDP) epsilons would not recompute
    relabelled = {**entry, "accountant": ACCOUNTANT}
    assert not any(c.ok for c in recompute_report({"hospitals": {"hospital_00": relabelled}}))


def _report(entries: dict, accountant: str) -> dict:
    """A privacy report as server.tracking writes it (what `fedrisk privacy verify` reads)."""
    return {"accountant": accountant, "delta": 1e-6, "hospitals": entries,
            "epsilon_max": max(e["run_epsilon"] for e in entries.values())}


def test_privacy_verify_recomputes_a_fresh_report_with_pld_and_an_old_one_with_rdp(tmp_path: Path, capsys) -> None:
    from cli.main import main

    fresh = _report({"hospital_00": _hospital_spend().report_entry(2.0)}, ACCOUNTANT)
    old = _report({"hospital_00": HospitalSpend.from_dict(_rdp_era_spend()).report_entry(2.0)}, RDP_ACCOUNTANT)
    del old["hospitals"]["hospital_00"]["accountant"]  # the RDP version named it at the top only
    for report, named in ((fresh, "pld"), (old, "rdp, as logged before PLD")):
        (tmp_path / "report.json").write_text(json.dumps(report))
        assert main(["privacy", "verify", str(tmp_path / "report.json")]) == 0
        out = capsys.readouterr().out
        assert f"({named})" in out and "every epsilon recomputes" in out
        run = next(line for line in out.splitlines() if line.strip().startswith("run_epsilon"))
        assert "pld " in run and "rdp " in run and "independent prv " in run
    # an old report relabelled PLD (or a PLD report relabelled RDP) fails, naming the difference
    for report, relabel in ((old, ACCOUNTANT), (fresh, RDP_ACCOUNTANT)):
        (tmp_path / "report.json").write_text(json.dumps({**report, "accountant": relabel, "hospitals": {
            name: {k: v for k, v in h.items() if k != "accountant"} for name, h in report["hospitals"].items()}}))
        assert main(["privacy", "verify", str(tmp_path / "report.json")]) == 2
        assert "differs from its recomputation" in capsys.readouterr().err
    (tmp_path / "report.json").write_text(json.dumps({**fresh, "accountant": "trust me", "hospitals": {
        "hospital_00": {k: v for k, v in fresh["hospitals"]["hospital_00"].items() if k != "accountant"}}}))
    assert main(["privacy", "verify", str(tmp_path / "report.json")]) == 2
    err = capsys.readouterr().err
    assert "accountant" in err and "trust me" in err and len(err.strip().splitlines()) == 1


def test_privacy_verify_refuses_an_epsilon_below_the_independent_accountant(tmp_path: Path, capsys,
                                                                            monkeypatch) -> None:
    """Were the PLD code ever to under-count (here: made to halve), PRV's lower bound catches it."""
    from cli.main import main
    import privacy.accounting as accounting

    entry = _hospital_spend().report_entry(2.0)
    real = accounting._compose
    monkeypatch.setattr(accounting, "_compose", lambda t, d, a: real(t, d, a) / (2 if a == ACCOUNTANT else 1))
    halved = {**entry, "epsilon": entry["epsilon"] / 2, "run_epsilon": entry["run_epsilon"] / 2,
              "evaluation": {**entry["evaluation"], "epsilon": entry["evaluation"]["epsilon"] / 2}}
    (tmp_path / "report.json").write_text(json.dumps(_report({"hospital_00": halved}, ACCOUNTANT)))
    assert main(["privacy", "verify", str(tmp_path / "report.json")]) == 2
    assert "below the independent PRV accountant's lower bound" in capsys.readouterr().err
