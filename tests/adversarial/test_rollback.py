"""No silent rollback: a hospital restores an older backup of its node directory (spent budget
reopened, a consent withdrawal undone). Its own signed heads, relayed by the coordinator, and the
heads the other hospitals anchored make it refuse until its operator runs the documented,
audited recovery."""

from __future__ import annotations

import shutil

from federation.contributions import relay_record
from federation import messages as M

from .conftest import audit_actions, charges


def _run_once(coordinator, run: str):
    """A round and its evaluation: every hospital then verifies (and anchors) every round-1 update."""
    census = coordinator.census(run)
    chain = {1: coordinator.round(run, 1, census, {})}
    for node in coordinator.nodes:
        coordinator.contribution(coordinator.evaluate(node, run, 1, census, chain))
    return census, chain


def test_a_restored_older_node_directory_refuses_to_run_until_its_operator_recovers(coordinator, tmp_path) -> None:
    node = coordinator.nodes[0]
    backup = tmp_path / "backup"
    shutil.copytree(node.directory, backup)
    _run_once(coordinator, "before-restore")
    spent_before = len(charges(node))
    assert spent_before >= 1

    shutil.rmtree(node.directory)
    shutil.copytree(backup, node.directory)  # the silent rollback
    assert charges(node) == []

    # the coordinator relays the node's own newest signed head: it refuses, audited, nothing read
    error = coordinator.error(coordinator.send(node, M.CENSUS, {
        M.CONFIG: __import__("flwr.app", fromlist=["ConfigRecord"]).ConfigRecord(coordinator.base("after-restore", 0)),
        M.ANCHORS: __import__("flwr.app", fromlist=["ConfigRecord"]).ConfigRecord(relay_record(coordinator.anchors))}))
    assert error is not None and "behind the head anchored" in error and "anchor accept" in error
    assert audit_actions(node)[-1] == "refusal" and charges(node) == []

    # the documented recovery: a new epoch, every remaining budget closed, audited
    from cli.main import main

    assert main(["node", "anchor", "accept", "--dir", str(node.directory)]) == 0
    assert "anchor.accepted" in audit_actions(node)
    with node.ledger() as ledger:
        assert ledger.remaining(coordinator.config.purpose) < 1e-6


def test_when_the_coordinator_withholds_the_anchors_the_other_hospitals_drop_the_rolled_back_node(
        coordinator, tmp_path) -> None:
    node = coordinator.nodes[0]
    backup = tmp_path / "backup"
    shutil.copytree(node.directory, backup)
    _run_once(coordinator, "before-restore")
    shutil.rmtree(node.directory)
    shutil.copytree(backup, node.directory)

    coordinator.anchors = []  # a coordinator colluding with the restore relays nothing
    census = coordinator.census("withheld")
    update = coordinator.contribution(coordinator.train(coordinator.nodes[1], "withheld", 1, census, {}))
    assert update.header.hospital == "hospital_01"
    assert "anchor.behind" in audit_actions(coordinator.nodes[1])


def test_an_encrypted_backup_restored_cannot_reopen_spent_budget(coordinator, tmp_path) -> None:
    """The same rollback through `fedrisk node backup create|restore`: the restored node is the backup's
    state, and it refuses to run until the audited recovery, which closes the budget."""
    from cli.main import main
    from flwr.app import ConfigRecord

    node = coordinator.nodes[1]
    key, backup = tmp_path / "backup.key", tmp_path / "node.backup"
    assert main(["node", "backup", "key", "--out", str(key)]) == 0
    assert main(["node", "backup", "create", "--dir", str(node.directory), "--out", str(backup),
                 "--key-file", str(key)]) == 0
    _run_once(coordinator, "before-backup-restore")
    assert len(charges(node)) >= 1
    shutil.rmtree(node.directory)
    assert main(["node", "backup", "restore", "--from", str(backup), "--dir", str(node.directory),
                 "--key-file", str(key)]) == 0
    assert charges(node) == []  # the restored ledger is the backup's
    error = coordinator.error(coordinator.send(node, M.CENSUS, {
        M.CONFIG: ConfigRecord(coordinator.base("after-backup-restore", 0)),
        M.ANCHORS: ConfigRecord(relay_record(coordinator.anchors))}))
    assert error is not None and "behind the head anchored" in error
    assert charges(node) == []
    assert main(["node", "anchor", "accept", "--dir", str(node.directory)]) == 0
    with node.ledger() as ledger:
        assert ledger.remaining(coordinator.config.purpose) < 1e-6
