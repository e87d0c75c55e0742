"""Budget ledger: refuses overspending, composes by PLD (never below an independent accountant),
charges each noisy output once, migrates RDP-era files without losing a charge.

The multi-process races are in test_ledger_races.py."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import dp_accounting
import numpy as np
import pytest

from federation.errors import FedriskError, PrivacyBudgetError
from privacy.accounting import ACCOUNTANT, RDP_ACCOUNTANT, RDP_ORDERS, compose_epsilon, epsilon_for, prv_epsilon
from privacy.ledger import (KINDS, SCHEMA_VERSION, BudgetExceeded, BudgetLedger, BudgetParameterError,
                            ChargeConflict, GaussianMechanism, LedgerBusy, UnknownPurpose)

PURPOSE = "credit-risk-research"
DELTA = 1e-5
RUNS = [  # three DP-SGD runs and two Gaussian releases (q = 1), as a hospital might spend them
    (GaussianMechanism(0.01, 1.1, 500), "training"),
    (GaussianMechanism.gaussian_release(noise_multiplier=20.0, count=3), "analytics"),
    (GaussianMechanism(0.02, 1.5, 800), "training"),
    (GaussianMechanism(0.005, 0.9, 2000), "training"),
    (GaussianMechanism.gaussian_release(noise_multiplier=35.0), "analytics"),
]


def _independent(mechanisms: list[GaussianMechanism], delta: float) -> float:
    """Opacus's PRV accountant (another implementation of numerical composition) on the same
    mechanisms: its estimate, which the ledger's PLD figure must not fall 2% below."""
    return prv_epsilon(mechanisms, delta).estimate


def _dp_accounting_epsilon(mechanisms: list[GaussianMechanism], delta: float) -> float:
    """Google's dp-accounting RDP accountant on the same mechanisms, composed (the looser bound)."""
    accountant = dp_accounting.rdp.RdpAccountant()
    for m in mechanisms:
        gaussian = dp_accounting.GaussianDpEvent(m.noise_multiplier)
        event = gaussian if m.sample_rate == 1.0 else dp_accounting.PoissonSampledDpEvent(m.sample_rate, gaussian)
        accountant.compose(event, m.steps)
    return accountant.get_epsilon(delta)


def identity(*parts: object) -> str:
    """A noisy output's identity as a caller computes it: a digest of what determines it."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()


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
        ledger.charge(PURPOSE, mechanism, run_id=f"run-{i}", kind=kind, actor="alice@hospital-a",
                      slot="round-1", identity=identity(f"run-{i}", 1))


def test_a_run_that_would_overspend_is_refused_and_the_ledger_is_unchanged(ledger: BudgetLedger) -> None:
    ledger.set_budget(PURPOSE, 3.0, DELTA)
    ledger.charge(PURPOSE, GaussianMechanism(0.01, 1.1, 500), run_id="run-1", kind="training", actor="alice",
                  slot="round-1", identity=identity("run-1", 1))
    history, spent, content = ledger.history(PURPOSE), ledger.spent(PURPOSE), _content(ledger.path)
    greedy = GaussianMechanism(0.02, 0.8, 1000)
    assert ledger.would_spend(PURPOSE, greedy) > 3.0
    with pytest.raises(BudgetExceeded) as refused:
        ledger.charge(PURPOSE, greedy, run_id="run-2", kind="training", actor="alice", slot="round-1",
                      identity=identity("run-2", 1))
    message = str(refused.value)
    assert "\n" not in message and PURPOSE in message and "of 3 (delta=1e-05)" in message
    assert f"{spent:.4g}" in message and f"{greedy.epsilon(DELTA):.4g}" in message
    assert isinstance(refused.value, PrivacyBudgetError) and isinstance(refused.value, FedriskError)
    assert ledger.history(PURPOSE) == history
    assert ledger.spent(PURPOSE) == spent
    assert _content(ledger.path) == content


def test_spend_across_runs_is_never_below_an_independent_accountant_and_never_above_rdp(ledger: BudgetLedger) -> None:
    ledger.set_budget(PURPOSE, 100.0, DELTA)
    _charge_all(ledger)
    history = ledger.history(PURPOSE)
    for n, charge in enumerate(history, start=1):
        assert charge.accountant == ACCOUNTANT
        assert charge.epsilon_after <= _dp_accounting_epsilon([m for m, _ in RUNS[:n]], DELTA)  # Google's RDP: looser
    prv = prv_epsilon([m for m, _ in RUNS], DELTA)
    assert 0.98 * prv.estimate <= ledger.spent(PURPOSE) <= prv.upper  # tight, and not under PRV
    assert ledger.spent(PURPOSE) == history[-1].epsilon_after
    assert ledger.remaining(PURPOSE) == pytest.approx(100.0 - ledger.spent(PURPOSE))


def test_composition_is_tighter_than_summing_epsilons(ledger: BudgetLedger) -> None:
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


def test_the_ledger_persists_across_reopening(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with BudgetLedger(path) as ledger:
        ledger.set_budget(PURPOSE, 20.0, DELTA)
        _charge_all(ledger, RUNS[:3])
        before = (ledger.budget(PURPOSE), ledger.history(PURPOSE), ledger.spent(PURPOSE))
    with BudgetLedger(path) as reopened:
        assert (reopened.budget(PURPOSE), reopened.history(PURPOSE), reopened.spent(PURPOSE)) == before
        assert reopened._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        reopened.charge(PURPOSE, RUNS[3][0], run_id="run-3", kind="training", actor="bob", slot="round-1",
                        identity=identity("run-3", 1))
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
    output = identity("run-7", 1, "start-model-digest")
    first = ledger.charge(PURPOSE, round_cost, run_id="run-7", kind="training", actor="a", slot="round-1",
                          identity=output)
    spent = ledger.spent(PURPOSE)
    retry = ledger.charge(PURPOSE, round_cost, run_id="run-7", kind="training", actor="a", slot="round-1",
                          identity=output)
    assert retry == first and len(ledger.history(PURPOSE)) == 1 and ledger.spent(PURPOSE) == spent
    assert (first.slot, first.identity, first.idempotency_key) == ("round-1", output, "round-1")
    ledger.charge(PURPOSE, round_cost, run_id="run-7", kind="training", actor="a", slot="round-2",
                  identity=identity("run-7", 2, "start-model-digest"))
    assert len(ledger.history(PURPOSE)) == 2 and ledger.spent(PURPOSE) > spent
    ledger.set_budget(PURPOSE, ledger.spent(PURPOSE), DELTA)  # now exhausted: a retry still succeeds
    assert ledger.charge(PURPOSE, round_cost, run_id="run-7", kind="training", actor="a", slot="round-1",
                         identity=output) == first
    assert len(ledger.history(PURPOSE)) == 2


def test_unknown_purpose_is_named(ledger: BudgetLedger) -> None:
    ledger.set_budget(PURPOSE, 1.0, DELTA)
    calls = [lambda: ledger.budget("fraud-screening"), lambda: ledger.spent("fraud-screening"),
             lambda: ledger.remaining("fraud-screening"), lambda: ledger.history("fraud-screening"),
             lambda: ledger.would_spend("fraud-screening", GaussianMechanism(0.01, 1.0, 1)),
             lambda: ledger.run_spent("fraud-screening", "r"),
             lambda: ledger.charge("fraud-screening", GaussianMechanism(0.01, 1.0, 1), run_id="r",
                                   kind="training", actor="a", slot="round-1", identity=identity("r", 1))]
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
    valid = {"run_id": "r", "kind": "training", "actor": "a", "slot": "round-1", "identity": identity("r", 1)}
    for kwargs, parameter in [({"kind": "marketing"}, "kind"), ({"run_id": ""}, "run_id"), ({"actor": ""}, "actor"),
                              ({"slot": ""}, "slot"), ({"identity": ""}, "identity")]:
        with pytest.raises(BudgetParameterError, match=parameter):
            ledger.charge(PURPOSE, mechanism, **{**valid, **kwargs})
    assert ledger.history(PURPOSE) == []


def test_budget_changes_that_would_falsify_the_record_are_refused(ledger: BudgetLedger) -> None:
    ledger.set_budget(PURPOSE, 5.0, 1e-6)
    ledger.set_budget(PURPOSE, 5.0, DELTA)  # nothing charged yet: delta may still change
    assert ledger.spent(PURPOSE) == 0.0 and ledger.remaining(PURPOSE) == 5.0
    ledger.charge(PURPOSE, GaussianMechanism(0.01, 1.1, 500), run_id="run-1", kind="training", actor="a",
                  slot="round-1", identity=identity("run-1", 1))
    spent = ledger.spent(PURPOSE)
    with pytest.raises(PrivacyBudgetError, match="delta"):
        ledger.set_budget(PURPOSE, 5.0, 1e-6)
    with pytest.raises(PrivacyBudgetError, match="already spent"):
        ledger.set_budget(PURPOSE, spent * 0.9, DELTA)
    assert ledger.budget(PURPOSE).epsilon_total == 5.0 and ledger.budget(PURPOSE).delta == DELTA
    assert ledger.set_budget(PURPOSE, 8.0, DELTA).epsilon_total == 8.0
    assert ledger.remaining(PURPOSE) == pytest.approx(8.0 - spent)


def test_a_second_noisy_output_on_a_charged_slot_is_refused_and_nothing_is_written(ledger: BudgetLedger) -> None:
    ledger.set_budget(PURPOSE, 10.0, DELTA)
    round_cost = GaussianMechanism(0.01, 1.0, 300)
    first = ledger.charge(PURPOSE, round_cost, run_id="run-1", kind="training", actor="a", slot="round-3",
                          identity=identity("run-1", 3, "model-A"))
    content = _content(ledger.path)
    attempts = [  # the coordinator replays round 3 from another model, or with other parameters
        {"mechanism": round_cost, "kind": "training", "identity": identity("run-1", 3, "model-B")},
        {"mechanism": GaussianMechanism(0.01, 1.0, 301), "kind": "training", "identity": first.identity},
        {"mechanism": round_cost, "kind": "evaluation", "identity": first.identity},
    ]
    for attempt, differs in zip(attempts, ["identity", "mechanism", "kind"]):
        with pytest.raises(ChargeConflict) as refused:
            ledger.charge(PURPOSE, attempt["mechanism"], run_id="run-1", kind=attempt["kind"], actor="a",
                          slot="round-3", identity=attempt["identity"])
        message = str(refused.value)
        assert "\n" not in message and isinstance(refused.value, PrivacyBudgetError)
        assert "already charged for another noisy output" in message and "spend the budget twice" in message
        assert "'round-3'" in message and "'run-1'" in message and str(ledger.path) in message
        assert f"different {differs})" in message and refused.value.existing == first
        assert _content(ledger.path) == content
    assert ledger.history(PURPOSE) == [first]


def test_the_schema_itself_holds_each_slot_once_and_knows_the_kinds(ledger: BudgetLedger) -> None:
    ledger.set_budget(PURPOSE, 10.0, DELTA)
    assert KINDS == ("training", "analytics", "evaluation")
    evaluation = ledger.charge(PURPOSE, GaussianMechanism.gaussian_release(noise_multiplier=30.0), run_id="run-1",
                               kind="evaluation", actor="a", slot="eval-round-1", identity=identity("run-1", "eval"))
    assert ledger.history(PURPOSE) == [evaluation] and evaluation.kind == "evaluation"
    row = ("run-1", "eval-round-1", "x", "evaluation", "intruder", 1.0, 30.0, 1, 0.1, "now", ACCOUNTANT)
    insert = ("INSERT INTO charges (purpose, run_id, slot, identity, kind, actor, sample_rate, noise_multiplier, "
              "steps, epsilon_after, charged_at, accountant) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
    with sqlite3.connect(ledger.path) as db:  # writing past the Python API
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            db.execute(insert, (PURPOSE, *row))
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            db.execute(insert, (PURPOSE, "run-2", "round-1", "x", "marketing", *row[4:]))
    assert ledger.all_charges() == [evaluation]


def test_all_charges_span_purposes_in_id_order_and_run_spent_composes_one_run(ledger: BudgetLedger) -> None:
    other = "fraud-screening"
    ledger.set_budget(PURPOSE, 100.0, DELTA)
    ledger.set_budget(other, 50.0, 1e-6)
    plan = [(PURPOSE, "run-a", RUNS[0][0]), (other, "run-a", RUNS[1][0]), (PURPOSE, "run-b", RUNS[2][0]),
            (PURPOSE, "run-a", RUNS[3][0]), (other, "run-c", RUNS[4][0])]
    made = [ledger.charge(purpose, mechanism, run_id=run, kind="training", actor="a", slot=f"round-{i}",
                          identity=identity(run, i)) for i, (purpose, run, mechanism) in enumerate(plan)]
    everything = ledger.all_charges()
    assert everything == made and [c.purpose for c in everything] == [p for p, _, _ in plan]
    assert [c.id for c in everything] == sorted({c.id for c in everything})
    assert sorted(ledger.history(PURPOSE) + ledger.history(other), key=lambda c: c.id) == everything
    run_a = ledger.run_spent(PURPOSE, "run-a")
    assert run_a == pytest.approx(_independent([RUNS[0][0], RUNS[3][0]], DELTA), rel=0.02)
    assert run_a < ledger.spent(PURPOSE)  # run-b's charge is not in it
    assert ledger.run_spent(other, "run-a") == pytest.approx(RUNS[1][0].epsilon(1e-6))  # other purpose, its delta
    assert ledger.run_spent(PURPOSE, "run-c") == 0.0


def test_a_ledger_held_by_another_process_is_a_typed_refusal_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with BudgetLedger(path) as setup:
        setup.set_budget(PURPOSE, 10.0, DELTA)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process is in the middle of a write
    try:
        with BudgetLedger(path, busy_timeout=0.05) as ledger:
            for call in (lambda: ledger.charge(PURPOSE, GaussianMechanism(0.01, 1.0, 10), run_id="r", kind="training",
                                               actor="a", slot="round-1", identity=identity("r", 1)),
                         lambda: ledger.set_budget(PURPOSE, 12.0, DELTA)):
                with pytest.raises(LedgerBusy) as busy:
                    call()
                assert str(path) in str(busy.value) and "\n" not in str(busy.value)
                assert isinstance(busy.value, PrivacyBudgetError)
            holder.execute("ROLLBACK")
            charged = ledger.charge(PURPOSE, GaussianMechanism(0.01, 1.0, 10), run_id="r", kind="training",
                                    actor="a", slot="round-1", identity=identity("r", 1))
            assert ledger.history(PURPOSE) == [charged] and ledger.budget(PURPOSE).epsilon_total == 10.0
    finally:
        holder.close()


# The schema as fedrisk shipped it at version 1, verbatim: the migration test builds its file from it.
_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS budgets (
    purpose TEXT PRIMARY KEY, epsilon_total REAL NOT NULL, delta REAL NOT NULL,
    updated_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS charges (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    purpose TEXT NOT NULL REFERENCES budgets(purpose),
    run_id TEXT NOT NULL, idempotency_key TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('training', 'analytics')), actor TEXT NOT NULL,
    sample_rate REAL NOT NULL, noise_multiplier REAL NOT NULL, steps INTEGER NOT NULL,
    epsilon_after REAL NOT NULL, charged_at TEXT NOT NULL,
    UNIQUE (purpose, run_id, idempotency_key));
"""


def _rdp_after(mechanisms: list[GaussianMechanism]) -> list[float]:
    """The epsilon_after an RDP-era ledger wrote for each charge: the RDP composition so far."""
    return [compose_epsilon(mechanisms[:n], DELTA, accountant=RDP_ACCOUNTANT) for n in range(1, len(mechanisms) + 1)]


def _version_1_ledger(path: Path) -> list[tuple[object, ...]]:
    """A version-1 ledger file as the old code left it (five charges, one with an empty key, as
    its default was, and RDP epsilon_after values); returns its charge rows."""
    after = _rdp_after([m for m, _ in RUNS])
    rows = [(i + 1, PURPOSE, f"run-{i // 2}", "" if i == 0 else f"round-{i}", kind, f"user-{i}",
             mechanism.sample_rate, mechanism.noise_multiplier, mechanism.steps, after[i],
             f"2025-11-01T00:00:0{i}.000000+00:00") for i, (mechanism, kind) in enumerate(RUNS)]
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA_V1} PRAGMA user_version=1; COMMIT;")
    db.execute("INSERT INTO budgets VALUES (?, 100.0, ?, '2025-11-01T00:00:00+00:00')", (PURPOSE, DELTA))
    db.executemany("INSERT INTO charges VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    db.close()
    return rows


def test_a_version_1_ledger_is_migrated_in_place_keeping_every_charge(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    rows = _version_1_ledger(path)
    with BudgetLedger(path) as ledger:
        history = ledger.history(PURPOSE)
        assert [(c.id, c.purpose, c.run_id, c.slot, c.kind, c.actor, c.mechanism.sample_rate,
                 c.mechanism.noise_multiplier, c.mechanism.steps, c.epsilon_after, c.charged_at)
                for c in history] == rows
        assert [c.mechanism for c in history] == [m for m, _ in RUNS] and all(c.identity == "" for c in history)
        assert all(c.accountant == RDP_ACCOUNTANT for c in history)  # admitted under RDP, and it says so
        spent = ledger.spent(PURPOSE)
        assert spent == compose_epsilon([m for m, _ in RUNS], DELTA) and spent < rows[-1][9]
        assert ledger.budget(PURPOSE).epsilon_total == 100.0
        migrated = _content(path)
        assert "identity TEXT NOT NULL DEFAULT ''" in migrated and "'evaluation'" in migrated
        # the new schema is in force: a new kind, slots still unique, ids continue
        added = ledger.charge(PURPOSE, GaussianMechanism.gaussian_release(noise_multiplier=40.0), run_id="run-0",
                              kind="evaluation", actor="a", slot="eval-round-1", identity=identity("run-0", "eval"))
        assert added.id == rows[-1][0] + 1 and added.accountant == ACCOUNTANT
        with pytest.raises(ChargeConflict):  # a migrated charge's output is unknown: no identity matches it
            ledger.charge(PURPOSE, RUNS[1][0], run_id="run-0", kind=RUNS[1][1], actor="a", slot="round-1",
                          identity=identity("run-0", 1))
        assert ledger.history(PURPOSE) == history + [added] and _content(path) != migrated
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        assert db.execute("SELECT count(*) FROM sqlite_master WHERE name LIKE 'charges%' AND type = 'table'"
                          ).fetchone()[0] == 1
    settled = _content(path)
    with BudgetLedger(path) as reopened:  # opening a version-3 file again changes nothing
        assert reopened.history(PURPOSE) == history + [added]
    assert _content(path) == settled


# The schema as fedrisk shipped it at version 2 (the RDP era), verbatim, and the INSERT its
# `charge` ran: the migration tests build their files with them, as that code left them.
_SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS budgets (
    purpose TEXT PRIMARY KEY, epsilon_total REAL NOT NULL, delta REAL NOT NULL,
    updated_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS charges (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    purpose TEXT NOT NULL REFERENCES budgets(purpose),
    run_id TEXT NOT NULL, slot TEXT NOT NULL, identity TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL CHECK (kind IN ('training', 'analytics', 'evaluation')), actor TEXT NOT NULL,
    sample_rate REAL NOT NULL, noise_multiplier REAL NOT NULL, steps INTEGER NOT NULL,
    epsilon_after REAL NOT NULL, charged_at TEXT NOT NULL,
    UNIQUE (purpose, run_id, slot));
"""
_INSERT_V2 = ("INSERT INTO charges (purpose, run_id, slot, identity, kind, actor, sample_rate, "
              "noise_multiplier, steps, epsilon_after, charged_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
# What a hospital's RDP-era ledger held: two demo-like training runs (5 rounds of 100 DP-SGD
# steps and a DP evaluation each), three Gaussian cohort answers, and a short run at other noise.
V2_CHARGES = ([(f"run-{r}", f"round-{i}", "training", GaussianMechanism(0.01, 1.3984375, 100))
               for r in (1, 2) for i in range(1, 6)]
              + [(f"run-{r}", f"eval-round-{i}", "evaluation", GaussianMechanism.gaussian_release(noise_multiplier=37.5))
                 for r in (1, 2) for i in range(1, 6)]
              + [(f"query-{i}", "answer", "analytics", GaussianMechanism.gaussian_release(noise_multiplier=z))
                 for i, z in enumerate((4.4, 9.0, 20.0))]
              + [("run-3", "round-1", "training", GaussianMechanism(0.05, 2.0, 300))])
OTHER = "fraud-screening"
OTHER_CHARGE = GaussianMechanism(0.02, 1.1, 150)


def _version_2_ledger(path: Path, *, total: float | None = 100.0) -> list[tuple[object, ...]]:
    """A version-2 ledger as the RDP version of fedrisk left it: `V2_CHARGES` on PURPOSE (budget
    `total`; None: exactly its RDP spend, as a rollback recovery closes it) and one charge on
    OTHER among them, each with the RDP epsilon_after that code computed. Returns the rows."""
    after = _rdp_after([m for *_, m in V2_CHARGES])
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA_V2} PRAGMA user_version=2; COMMIT;")
    db.execute("INSERT INTO budgets VALUES (?, ?, ?, '2026-01-01T00:00:00+00:00')",
               (PURPOSE, after[-1] if total is None else total, DELTA))
    db.execute("INSERT INTO budgets VALUES (?, 5.0, 1e-6, '2026-01-01T00:00:00+00:00')", (OTHER,))
    for i, (run, slot, kind, m) in enumerate(V2_CHARGES):
        db.execute(_INSERT_V2, (PURPOSE, run, slot, identity(run, slot), kind, f"user-{i % 3}", m.sample_rate,
                                m.noise_multiplier, m.steps, after[i], f"2026-01-02T00:00:{i:02d}.000000+00:00"))
        if i == 4:  # another purpose's charge in between: ids interleave
            db.execute(_INSERT_V2, (OTHER, "run-x", "round-1", identity("run-x"), "training", "bob", 0.02, 1.1, 150,
                                    compose_epsilon([OTHER_CHARGE], 1e-6, accountant=RDP_ACCOUNTANT),
                                    "2026-01-02T00:00:04.500000+00:00"))
    rows = list(db.execute("SELECT * FROM charges ORDER BY id"))
    db.close()
    return rows


def test_an_rdp_era_version_2_ledger_migrates_without_losing_a_charge_and_never_under_counts(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    rows = _version_2_ledger(path)
    with BudgetLedger(path) as ledger:
        charges = ledger.all_charges()
        assert [(c.id, c.purpose, c.run_id, c.slot, c.identity, c.kind, c.actor, c.mechanism.sample_rate,
                 c.mechanism.noise_multiplier, c.mechanism.steps, c.epsilon_after, c.charged_at)
                for c in charges] == rows  # every row, every field, as the RDP version wrote it
        assert {c.accountant for c in charges} == {RDP_ACCOUNTANT}
        mechanisms = [m for *_, m in V2_CHARGES]
        spent, rdp = ledger.spent(PURPOSE), compose_epsilon(mechanisms, DELTA, accountant=RDP_ACCOUNTANT)
        prv = prv_epsilon(mechanisms, DELTA)
        assert spent == compose_epsilon(mechanisms, DELTA)  # the PLD composition of ALL its charges
        assert 0.98 * prv.estimate <= spent <= prv.upper  # never under an independent accountant
        assert spent < rdp == pytest.approx(rows[len(V2_CHARGES)][10])  # tighter than what RDP had recorded
        assert ledger.spent(OTHER) == compose_epsilon([OTHER_CHARGE], 1e-6)
        record = {m["purpose"]: m for m in ledger.migrations()}
        assert record[PURPOSE]["from_version"] == 2 and record[PURPOSE]["charges"] == len(V2_CHARGES)
        assert (record[PURPOSE]["spent_before"], record[PURPOSE]["spent_after"]) == (pytest.approx(rdp), spent)
        assert record[PURPOSE]["accountant_before"] == RDP_ACCOUNTANT and record[OTHER]["charges"] == 1
        assert record[PURPOSE]["epsilon_total_after"] == 100.0  # it had room: it keeps its total
        # retrying a migrated charge is still a retry: nothing is charged twice
        run, slot, kind, m = V2_CHARGES[0]
        assert ledger.charge(PURPOSE, m, run_id=run, kind=kind, actor="a", slot=slot,
                             identity=identity(run, slot)) == charges[0]
        # an overspend is still refused, with the spent figure recomputed (not RDP's epsilon_after)
        ledger.set_budget(PURPOSE, spent + 0.05, DELTA)
        before = _content(path)
        with pytest.raises(BudgetExceeded, match=f"spent {spent:.4g} of") as refused:
            ledger.charge(PURPOSE, GaussianMechanism(0.02, 0.8, 1000), run_id="run-4", kind="training",
                          actor="a", slot="round-1", identity=identity("run-4", 1))
        assert refused.value.would_be > spent + 0.05 and _content(path) == before
        added = ledger.charge(PURPOSE, GaussianMechanism.gaussian_release(noise_multiplier=60.0), run_id="query-9",
                              kind="analytics", actor="a", slot="answer", identity=identity("query-9"))
        assert added.id == rows[-1][0] + 1 and added.accountant == ACCOUNTANT
        assert ledger.spent(PURPOSE) == compose_epsilon(mechanisms + [added.mechanism], DELTA) <= spent + 0.05
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 3


def test_a_budget_full_under_rdp_stays_full_after_migration(tmp_path: Path) -> None:
    """Spent to the last (or closed by a rollback recovery at what was spent) under RDP: the PLD
    spend is lower, but the migration does not hand the difference to the purpose."""
    path = tmp_path / "ledger.sqlite"
    rows = _version_2_ledger(path, total=None)
    with BudgetLedger(path) as ledger:
        spent = ledger.spent(PURPOSE)
        assert ledger.budget(PURPOSE).epsilon_total == spent and ledger.remaining(PURPOSE) == 0.0
        record = {m["purpose"]: m for m in ledger.migrations()}
        assert record[PURPOSE]["epsilon_total_before"] == rows[len(V2_CHARGES)][10] > spent
        assert record[PURPOSE]["epsilon_total_after"] == spent
        assert record[OTHER]["epsilon_total_after"] == 5.0  # it had room: it keeps its total
        with pytest.raises(BudgetExceeded):
            ledger.charge(PURPOSE, GaussianMechanism.gaussian_release(noise_multiplier=500.0), run_id="q",
                          kind="analytics", actor="a", slot="answer", identity=identity("q"))


@pytest.mark.parametrize("build", [_version_1_ledger, _version_2_ledger])
def test_a_migration_that_cannot_take_the_lock_leaves_the_old_file_as_it_was(tmp_path: Path, build) -> None:
    path = tmp_path / "ledger.sqlite"
    build(path)
    before = _content(path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(LedgerBusy, match=str(path)):
            BudgetLedger(path, busy_timeout=0.05)
    finally:
        holder.close()
    assert _content(path) == before
    with BudgetLedger(path) as ledger:
        assert len(ledger.history(PURPOSE)) == (len(RUNS) if build is _version_1_ledger else len(V2_CHARGES))


def test_a_migration_that_fails_midway_leaves_the_version_2_file_as_it_was(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "ledger.sqlite"
    _version_2_ledger(path)
    before = _content(path)
    import privacy.ledger as module

    def broken(*args: object, **kwargs: object) -> float:
        raise RuntimeError("accountant failed mid-migration")

    monkeypatch.setattr(module, "compose_epsilon", broken)  # after the rows are copied, before the commit
    with pytest.raises(RuntimeError, match="mid-migration"):
        BudgetLedger(path)
    assert _content(path) == before
    monkeypatch.undo()
    with BudgetLedger(path) as ledger:
        assert len(ledger.all_charges()) == len(V2_CHARGES) + 1


def test_a_ledger_from_a_newer_fedrisk_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=4")
    with pytest.raises(PrivacyBudgetError, match=f"{path}.*schema version 4"):
        BudgetLedger(path)
