"""Budget ledger under attack by racing processes: one slot is charged once, a budget is never
overspent, and every loser gets a typed refusal, never a raw SQLite error.

8 processes (spawn) are started once for the module and warm their PLD code (importing dp_accounting
and SciPy costs seconds each); for each race every one opens the ledger and they are released together
through one Barrier. Each child classifies its own outcome by exception type and reports it on
a Queue, so a raw sqlite3 error would show up in the assertion by name.
"""

from __future__ import annotations

import base64
import hashlib
import multiprocessing
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from federation import sealing, stores
from privacy.ledger import BudgetExceeded, BudgetLedger, ChargeConflict, GaussianMechanism

PROCESSES = 8
PURPOSE = "credit-risk-research"
DELTA = 1e-5
# BASE spends most of the budget; one RACER costs ~60% of what is left, two cost more.
BASE = GaussianMechanism(0.01, 1.0, 1000)
RACER = GaussianMechanism(0.01, 1.0, 800)
Race = Callable[..., list[tuple[int, str, Any]]]


def identity(*parts: object) -> str:
    """A noisy output's identity as a caller computes it: a digest of what determines it."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _racer(index: int, tasks: Any, barrier: Any, results: Any) -> None:
    """One process: for each (ledger, slot, identity) task, open the ledger, wait for all the
    others, charge RACER and report the outcome."""
    RACER.epsilon(DELTA)  # imports the accountant and caches RACER's epsilon before any race
    while (task := tasks.get()) is not None:
        path, slot, output, at_rest = task
        os.environ.pop(sealing.KEY_FILE_ENV, None)
        if at_rest:  # the ledger is encrypted at rest (a sealed node): every process holds the key
            os.environ[sealing.KEY_ENV] = at_rest
        else:
            os.environ.pop(sealing.KEY_ENV, None)
        try:
            with BudgetLedger(path) as ledger:
                barrier.wait(timeout=120)
                charge = ledger.charge(PURPOSE, RACER, run_id="run-1", kind="training", actor=f"process-{index}",
                                       slot=slot, identity=output)
            results.put((index, "charged", charge))
        except ChargeConflict as error:
            results.put((index, "conflict", str(error)))
        except BudgetExceeded as error:
            results.put((index, "exceeded", str(error)))
        except BaseException as error:  # reported with its type, so the test fails with the reason
            results.put((index, f"raw {type(error).__module__}.{type(error).__name__}", repr(error)))


@pytest.fixture(scope="module")
def race() -> Iterator[Race]:
    """Run one race: racer i charges (slots[i], outputs[i]); every child's report, by index."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
    tasks = [ctx.Queue() for _ in range(PROCESSES)]
    workers = [ctx.Process(target=_racer, args=(i, tasks[i], barrier, results)) for i in range(PROCESSES)]
    for worker in workers:
        worker.start()

    def run(path: Path, slots: list[str], outputs: list[str], at_rest: str = "") -> list[tuple[int, str, Any]]:
        for i in range(PROCESSES):
            tasks[i].put((str(path), slots[i], outputs[i], at_rest))
        return sorted((results.get(timeout=240) for _ in workers), key=lambda report: report[0])

    try:
        yield run
    finally:
        for queue in tasks:
            queue.put(None)
        for worker in workers:
            worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0] * PROCESSES


def _ledger(path: Path, epsilon_total: float = 50.0) -> None:
    with BudgetLedger(path) as ledger:
        ledger.set_budget(PURPOSE, epsilon_total, DELTA)


def test_eight_outputs_racing_for_one_slot_charge_it_once(tmp_path: Path, race: Race) -> None:
    path = tmp_path / "ledger.sqlite"
    _ledger(path)
    outputs = [identity("run-1", 3, f"model-{i}") for i in range(PROCESSES)]  # 8 different models, one round
    reports = race(path, ["round-3"] * PROCESSES, outputs)
    verdicts = [verdict for _, verdict, _ in reports]
    assert sorted(verdicts) == ["charged"] + ["conflict"] * (PROCESSES - 1), reports
    winner = next(report for report in reports if report[1] == "charged")
    assert all("already charged for another noisy output" in text for _, verdict, text in reports
               if verdict == "conflict")
    with BudgetLedger(path) as ledger:
        assert ledger.all_charges() == [winner[2]]
        assert winner[2].identity == outputs[winner[0]] and winner[2].actor == f"process-{winner[0]}"
        assert ledger.spent(PURPOSE) == RACER.epsilon(DELTA) == winner[2].epsilon_after


def test_eight_retries_of_one_output_are_charged_once_and_all_get_that_charge(tmp_path: Path, race: Race) -> None:
    path = tmp_path / "ledger.sqlite"
    _ledger(path)
    output = identity("run-1", 3, "model-A")
    reports = race(path, ["round-3"] * PROCESSES, [output] * PROCESSES)
    assert [verdict for _, verdict, _ in reports] == ["charged"] * PROCESSES, reports
    charges = {report[2] for report in reports}
    assert len(charges) == 1, charges
    with BudgetLedger(path) as ledger:
        assert ledger.all_charges() == list(charges)
        assert ledger.spent(PURPOSE) == RACER.epsilon(DELTA)


@pytest.mark.parametrize("encrypted", [False, True], ids=["clear", "encrypted-at-rest"])
def test_eight_processes_racing_for_the_last_of_a_budget_cannot_overspend_it(tmp_path: Path, race: Race,
                                                                            encrypted: bool, monkeypatch) -> None:
    path = tmp_path / "ledger.sqlite"
    at_rest = ""
    if encrypted:  # a sealed node's ledger (SQLCipher pages, WAL frames too) shared by 8 processes
        at_rest = base64.b64encode(os.urandom(32)).decode()
        monkeypatch.delenv(sealing.KEY_FILE_ENV, raising=False)
        monkeypatch.setenv(sealing.KEY_ENV, at_rest)
        sealing.mark_sealed(tmp_path)
    with BudgetLedger(path) as ledger:
        ledger.set_budget(PURPOSE, 10.0, DELTA)
        ledger.charge(PURPOSE, BASE, run_id="base", kind="training", actor="alice", slot="round-1",
                      identity=identity("base", 1))
        spent = ledger.spent(PURPOSE)
        ledger.set_budget(PURPOSE, spent + 1.0, DELTA)  # 1.0 left
        assert 0.5 < ledger.would_spend(PURPOSE, RACER) - spent < 0.7
        twice = GaussianMechanism(RACER.sample_rate, RACER.noise_multiplier, 2 * RACER.steps)
        assert ledger.would_spend(PURPOSE, twice) > spent + 1.0  # two racers cannot both fit
    slots = [f"round-{i + 2}" for i in range(PROCESSES)]
    reports = race(path, slots, [identity("run-1", slot) for slot in slots], at_rest)
    verdicts = [verdict for _, verdict, _ in reports]
    assert sorted(verdicts) == ["charged"] + ["exceeded"] * (PROCESSES - 1), reports
    winner = next(report for report in reports if report[1] == "charged")
    with BudgetLedger(path) as ledger:
        history = ledger.history(PURPOSE)
        assert [c.run_id for c in history] == ["base", "run-1"] and history[1] == winner[2]
        assert ledger.spent(PURPOSE) <= ledger.budget(PURPOSE).epsilon_total
        assert ledger.spent(PURPOSE) == winner[2].epsilon_after
    assert stores.is_clear(path) is (not encrypted)
