"""Cheap abuse a coordinator (or the bundle it ships) could try against a node's decryptions and
audit log: padded contribution sets and trainings that skip rounds, played through the real relay."""

from __future__ import annotations

import sqlite3
from contextlib import closing

from federation import messages as M

from .conftest import charges


def _decryptions(node) -> int:
    path = node.directory / "decryptions.sqlite"
    if not path.exists():
        return 0
    with closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT COUNT(*) FROM decryptions").fetchone()[0]


def test_a_census_padded_with_copies_is_refused_whole_in_one_audit_entry(coordinator) -> None:
    run = "padded"
    census = coordinator.census(run)
    node = coordinator.nodes[0]
    before = len(node.audit().entries())
    reply = coordinator.train(node, run, 1, census * 40, {})
    error = coordinator.error(reply) or ""
    assert "set of 120 contributions: the federation has 3 hospitals" in error, error
    added = node.audit().entries()[before:]
    assert len(added) <= 3  # the relay's arrival, the refusal: not one entry per junk item
    assert _decryptions(node) == 0 and charges(node) == []


def test_a_training_that_skips_rounds_is_refused_before_anything_is_decrypted(coordinator) -> None:
    run = "skip"
    census = coordinator.census(run)
    node = coordinator.nodes[1]
    for _ in range(5):  # each would have cost one of the key's decryptions
        reply = coordinator.train(node, run, 2, census, {})
        assert "the server sent no contributions for round 1" in (coordinator.error(reply) or "")
    assert _decryptions(node) == 0 and charges(node) == []


def test_a_run_id_outside_the_pattern_is_refused_before_it_reaches_a_ledger(coordinator) -> None:
    node = coordinator.nodes[2]
    for bad in ("x" * 5000, "../../ledger", "run\nforged.entry"):
        reply = coordinator.send(node, M.CENSUS, {M.CONFIG: __import__("flwr.app", fromlist=["ConfigRecord"])
                                                 .ConfigRecord(coordinator.base(bad, 0))})
        assert "run-id is not a run id" in (coordinator.error(reply) or "")
    assert charges(node) == []
