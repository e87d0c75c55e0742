"""Budget ledger: refuses overspending atomically, composes by RDP, survives races and restarts."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest

from federation.errors import FedriskError, PrivacyBudgetError
from privacy.accounting import RDP_ORDERS, epsilon_for
from privacy.ledger import (BudgetExceeded, BudgetLedger, BudgetParameterError, GaussianMechanism,
                            UnknownPurpose)

PURPOSE = "credit-risk-research"
DELTA = 1e-5
RUNS = [  # three DP-SGD runs and two Gaussian releases (q = 1), as a hospital might spend them
    (GaussianMechanism(0.01, 1.1, 500), "training"),
    (GaussianMechanism.gaussian_release(noise_multiplier=20.0, count=3), "analytics"),
    (GaussianMechanism(0.02, 1.5, 800), "training"),
    (GaussianMechanism(0.005, 0.9, 2000), "training"),
    (GaussianMechanism.gaussian_release(noise_multiplier=35.0), "analytics"),
]
# Race set-up: BASE spends most of the budget; one RACER costs ~60% of what is left, two cost more.
BASE = GaussianMechanism(0.01, 1.0, 1000)
RACER = GaussianMechanism(0.01, 1.0, 800)


def _dp_accounting_epsilon(mechanisms: list[GaussianMechanism], delta: float) -> float:
    """Google's dp-accounting RDP accountant on the same mechanisms, composed."""
    accountant = dp_accounting.rdp.RdpAccountant()
    for m in mechanisms:
        gaussian = dp_accounting.GaussianDpEvent(m.noise_multiplier)
        event = gaussian if m.sample_rate == 1.0 else dp_accounting.PoissonSampledDpEvent(m.sample_rate, gaussian)
        accountant.compose(event, m.steps)
    return accountant.get_epsilon(delta)


def _content(path: Path) -> str:
    """Every row of the ledger file, read through a separate connection."""
    with sqlite3.connect(path) as db:
        return "\n".join(db.iterdump())


@pytest.fixture()
def ledger(tmp_path: Path) -> Iterator[BudgetLedger]:
    with BudgetLedger(tmp_path / "node" / "ledger.sqlite") as opened:
        yield opened


def _charge_all(ledger: BudgetLedger, runs: list[tuple[GaussianMechanism, str]] = RUNS) -> None:
    for i, (mechanism, kind) in enumerate(runs):
        ledger.charge(PURPOSE, mechanism, run_id=f"run-{i}", kind=kind, actor="alice@hospital-a")


def test_a_run_that_would_overspend_is_refused_and_the_ledger_is_unchanged(ledger: BudgetLedger) -> None:
    ledger.set_budget(PURPOSE, 3.0, DELTA)
    ledger.charge(PURPOSE, GaussianMechanism(0.01, 1.1, 500), run_id="run-1", kind="training", actor="alice")
    history, spent, content = ledger.history(PURPOSE), ledger.spent(PURPOSE), _content(ledger.path)
    greedy = GaussianMechanism(0.02, 0.8, 1000)
    assert ledger.would_spend(PURPOSE, greedy) > 3.0
    with pytest.raises(BudgetExceeded) as refused:
        ledger.charge(PURPOSE, greedy, run_id="run-2", kind="training", actor="alice")
    message = str(refused.value)
    assert "\n" not in message and PURPOSE in message and "of 3 (delta=1e-05)" in message
    assert f"{spent:.4g}" in message and f"{greedy.epsilon(DELTA):.4g}" in message
    assert isinstance(refused.value, PrivacyBudgetError) and isinstance(refused.value, FedriskError)
    assert ledger.history(PURPOSE) == history
    assert ledger.spent(PURPOSE) == spent
    assert _content(ledger.path) == content


def test_spend_across_runs_matches_googles_dp_accounting(ledger: BudgetLedger) -> None:
    ledger.set_budget(PURPOSE, 100.0, DELTA)
    _charge_all(ledger)
    history = ledger.history(PURPOSE)
    for n, charge in enumerate(history, start=1):
        theirs = _dp_accounting_epsilon([m for m, _ in RUNS[:n]], DELTA)
        assert charge.epsilon_after == pytest.approx(theirs, rel=0.02)
    assert ledger.spent(PURPOSE) == pytest.approx(_dp_accounting_epsilon([m for m, _ in RUNS], DELTA), rel=0.02)
    assert ledger.spent(PURPOSE) == history[-1].epsilon_after
    assert ledger.remaining(PURPOSE) == pytest.approx(100.0 - ledger.spent(PURPOSE))


def test_rdp_composition_is_tighter_than_summing_epsilons(ledger: BudgetLedger) -> None:
    ledger.set_budget(PURPOSE, 100.0, DELTA)
    _charge_all(ledger)
    alone = [m.epsilon(DELTA) for m, _ in RUNS]
    assert alone[0] == pytest.approx(epsilon_for(sample_rate=0.01, noise_multiplier=1.1, steps=500, delta=DELTA))
    assert max(alone) < ledger.spent(PURPOSE) < 0.8 * sum(alone)


def test_gaussian_release_is_the_unsampled_case_with_the_closed_form_curve() -> None:
    release = GaussianMechanism.gaussian_release(noise_multiplier=4.0, count=5)
    orders = np.array(RDP_ORDERS)
    assert release.rdp() == pytest.approx(5 * orders / (2 * 4.0 ** 2))
    assert release.name == "gaussian" and "released 5 time" in release.describe()
    assert GaussianMechanism(0.01, 1.0, 10).name == "poisson-subsampled-gaussian"


def _race_worker(path: str, barrier: Any, results: Any, index: int) -> None:
    """One process: open the ledger, wait for all the others, then try to charge RACER."""
    with BudgetLedger(path) as ledger:
        barrier.wait()
        try:
            ledger.charge(PURPOSE, RACER, run_id=f"race-{index}", kind="training", actor=f"process-{index}")
            results.put((index, "charged"))
        except BudgetExceeded:
            results.put((index, "refused"))
        except Exception as error:  # reported, so the test fails with the reason
            results.put((index, f"error: {error!r}"))


def test_processes_racing_for_the_last_of_a_budget_cannot_both_get_it(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with BudgetLedger(path) as ledger:
        ledger.set_budget(PURPOSE, 10.0, DELTA)
        ledger.charge(PURPOSE, BASE, run_id="base", kind="training", actor="alice")
        spent = ledger.spent(PURPOSE)
        ledger.set_budget(PURPOSE, spent + 1.0, DELTA)  # 1.0 left
        assert 0.5 < ledger.would_spend(PURPOSE, RACER) - spent < 0.7
        twice = GaussianMechanism(RACER.sample_rate, RACER.noise_multiplier, 2 * RACER.steps)
        assert ledger.would_spend(PURPOSE, twice) > spent + 1.0  # two racers cannot both fit
    processes = 4
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    workers = [ctx.Process(target=_race_worker, args=(str(path), barrier, results, i)) for i in range(processes)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=180) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    verdicts = sorted(verdict for _, verdict in outcomes)
    assert verdicts == ["charged"] + ["refused"] * (processes - 1), verdicts
    with BudgetLedger(path) as ledger:
        history = ledger.history(PURPOSE)
        assert [c.run_id for c in history][0] == "base" and len(history) == 2
        assert history[1].run_id == f"race-{next(i for i, v in outcomes if v == 'charged')}"
        assert ledger.spent(PURPOSE) <= ledger.budget(PURPOSE).epsilon_total


def test_the_ledger_persists_across_reopening(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with BudgetLedger(path) as ledger:
        ledger.set_budget(PURPOSE, 20.0, DELTA)
        _charge_all(ledger, RUNS[:3])
        before = (ledger.budget(PURPOSE), ledger.history(PURPOSE), ledger.spent(PURPOSE))
    with BudgetLedger(path) as reopened:
        assert (reopened.budget(PURPOSE), reopened.history(PURPOSE), reopened.spent(PURPOSE)) == before
        assert reopened._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        reopened.charge(PURPOSE, RUNS[3][0], run_id="run-3", kind="training", actor="bob")
        assert reopened.spent(PURPOSE) > before[2]


def test_history_says_who_spent_what_and_when(ledger: BudgetLedger) -> None:
    ledger.set_budget(PURPOSE, 100.0, DELTA)
    _charge_all(ledger)
    history = ledger.history(PURPOSE)
    assert [c.run_id for c in history] == [f"run-{i}" for i in range(len(RUNS))]
    assert [c.kind for c in history] == [kind for _, kind in RUNS]
    assert [c.mechanism for c in history] == [m for m, _ in RUNS]
    assert all(c.actor == "alice@hospital-a" and c.purpose == PURPOSE for c in history)
    after = [c.epsilon_after for c in history]
    assert after == sorted(after) and len(set(after)) == len(after)
    times = [datetime.fromisoformat(c.charged_at) for c in history]
    assert times == sorted(times) and all(t.tzinfo is not None for t in times)
    logged = history[2].to_dict()
    recomputed = GaussianMechanism.from_dict(logged["mechanism"])  # type: ignore[arg-type]
    assert recomputed == RUNS[2][0] and logged["mechanism"]["mechanism"] == "poisson-subsampled-gaussian"


def test_a_retried_charge_is_not_charged_twice(ledger: BudgetLedger) -> None:
    ledger.set_budget(PURPOSE, 2.0, DELTA)
    round_cost = GaussianMechanism(0.01, 1.0, 300)
    first = ledger.charge(PURPOSE, round_cost, run_id="run-7", kind="training", actor="a", idempotency_key="round-1")
    spent = ledger.spent(PURPOSE)
    retry = ledger.charge(PURPOSE, round_cost, run_id="run-7", kind="training", actor="a", idempotency_key="round-1")
    assert retry == first and len(ledger.history(PURPOSE)) == 1 and ledger.spent(PURPOSE) == spent
    with pytest.raises(PrivacyBudgetError, match="different mechanism"):
        ledger.charge(PURPOSE, GaussianMechanism(0.01, 1.0, 301), run_id="run-7", kind="training",
                      actor="a", idempotency_key="round-1")
    ledger.charge(PURPOSE, round_cost, run_id="run-7", kind="training", actor="a", idempotency_key="round-2")
    assert len(ledger.history(PURPOSE)) == 2 and ledger.spent(PURPOSE) > spent
    ledger.set_budget(PURPOSE, ledger.spent(PURPOSE), DELTA)  # now exhausted: a retry still succeeds
    assert ledger.charge(PURPOSE, round_cost, run_id="run-7", kind="training", actor="a",
                         idempotency_key="round-1") == first
    assert len(ledger.history(PURPOSE)) == 2


def test_unknown_purpose_is_named(ledger: BudgetLedger) -> None:
    ledger.set_budget(PURPOSE, 1.0, DELTA)
    calls = [lambda: ledger.budget("fraud-screening"), lambda: ledger.spent("fraud-screening"),
             lambda: ledger.remaining("fraud-screening"), lambda: ledger.history("fraud-screening"),
             lambda: ledger.would_spend("fraud-screening", GaussianMechanism(0.01, 1.0, 1)),
             lambda: ledger.charge("fraud-screening", GaussianMechanism(0.01, 1.0, 1), run_id="r",
                                   kind="training", actor="a")]
    for call in calls:
        with pytest.raises(UnknownPurpose, match="fraud-screening"):
            call()


@pytest.mark.parametrize("build,parameter", [
    (lambda: GaussianMechanism(0.0, 1.0, 10), "sample_rate"),
    (lambda: GaussianMechanism(1.5, 1.0, 10), "sample_rate"),
    (lambda: GaussianMechanism(0.01, 0.0, 10), "noise_multiplier"),
    (lambda: GaussianMechanism(0.01, -1.0, 10), "noise_multiplier"),
    (lambda: GaussianMechanism(0.01, 1.0, 0), "steps"),
    (lambda: GaussianMechanism(0.01, 1.0, 2.5), "steps"),
])
def test_bad_mechanism_parameters_are_named(build, parameter: str) -> None:
    with pytest.raises(BudgetParameterError, match=parameter) as error:
        build()
    assert isinstance(error.value, ValueError) and isinstance(error.value, PrivacyBudgetError)


@pytest.mark.parametrize("purpose,epsilon_total,delta,parameter", [
    (PURPOSE, 0.0, DELTA, "epsilon_total"), (PURPOSE, -1.0, DELTA, "epsilon_total"),
    (PURPOSE, 1.0, 0.0, "delta"), (PURPOSE, 1.0, 1.0, "delta"), ("Credit Risk", 1.0, DELTA, "purpose"),
])
def test_bad_budget_parameters_are_named(ledger: BudgetLedger, purpose: str, epsilon_total: float,
                                         delta: float, parameter: str) -> None:
    with pytest.raises(BudgetParameterError, match=parameter):
        ledger.set_budget(purpose, epsilon_total, delta)
    with pytest.raises(UnknownPurpose):
        ledger.budget(purpose)


def test_bad_charge_parameters_are_named(ledger: BudgetLedger) -> None:
    ledger.set_budget(PURPOSE, 5.0, DELTA)
    mechanism = GaussianMechanism(0.01, 1.0, 10)
    for kwargs, parameter in [({"kind": "marketing"}, "kind"), ({"run_id": ""}, "run_id"), ({"actor": ""}, "actor")]:
        with pytest.raises(BudgetParameterError, match=parameter):
            ledger.charge(PURPOSE, mechanism, **{"run_id": "r", "kind": "training", "actor": "a", **kwargs})
    assert ledger.history(PURPOSE) == []


def test_budget_changes_that_would_falsify_the_record_are_refused(ledger: BudgetLedger) -> None:
    ledger.set_budget(PURPOSE, 5.0, 1e-6)
    ledger.set_budget(PURPOSE, 5.0, DELTA)  # nothing charged yet: delta may still change
    assert ledger.spent(PURPOSE) == 0.0 and ledger.remaining(PURPOSE) == 5.0
    ledger.charge(PURPOSE, GaussianMechanism(0.01, 1.1, 500), run_id="run-1", kind="training", actor="a")
    spent = ledger.spent(PURPOSE)
    with pytest.raises(PrivacyBudgetError, match="delta"):
        ledger.set_budget(PURPOSE, 5.0, 1e-6)
    with pytest.raises(PrivacyBudgetError, match="already spent"):
        ledger.set_budget(PURPOSE, spent * 0.9, DELTA)
    assert ledger.budget(PURPOSE).epsilon_total == 5.0 and ledger.budget(PURPOSE).delta == DELTA
    assert ledger.set_budget(PURPOSE, 8.0, DELTA).epsilon_total == 8.0
    assert ledger.remaining(PURPOSE) == pytest.approx(8.0 - spent)
