"""A patient's erasure request and the node's retention, as a data protection officer checks them:
after an erasure the record serves no purpose any more (and cannot be restored), the patient's
grants are revoked and no longer point at them, other patients are untouched, and the report says
what could not be recalled. Retention unlinks only grants that ended long enough ago."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from clients.erasure import purge_node
from clients.node_state import NodeState
from clients.policy import NodePolicy
from federation import features as fx
from privacy.grants import GRANTS_FILE, GrantAuthority, list_grants

RESEARCH, SCORING = "credit-risk-research", "applicant-scoring"


@pytest.fixture()
def node(tmp_path: Path, federation_data, keys) -> NodeState:
    return NodeState.init(tmp_path / "node", hospital="hospital_00", data_file=federation_data.files[0],
                          key_file=keys.hospital_context, budgets={RESEARCH: (2.0, 1e-5), SCORING: (1.0, 1e-5)})


def _consenting(node: NodeState, count: int) -> list[str]:
    table = pd.read_parquet(node.data_file)
    usable = table[table[fx.CONSENT_CREDIT_RISK_RESEARCH] & table[fx.CONSENT_APPLICANT_SCORING]]
    clean, mask, _ = node.usable(RESEARCH)
    return [str(k) for k in usable[fx.RECORD_KEY].iloc[:count * 5]][:count]


def _usable(node: NodeState, purpose: str) -> int:
    return int(node.usable(purpose)[1].sum())


def test_an_erased_record_serves_no_purpose_and_its_grants_no_longer_point_at_it(node: NodeState, capsys) -> None:
    from cli.main import main

    patient, other = _consenting(node, 2)
    node.load_records(RESEARCH)  # the record was used once before the request
    pseudonym, other_pseudonym = node.pseudonym_key().pseudonymise(pd.Series([patient, other]))
    authority = GrantAuthority(node.directory, node.hospital, audit=node.audit())
    for person in (pseudonym, pseudonym, other_pseudonym):
        authority.issue(person, "bank-a", "r1")
    before = {purpose: _usable(node, purpose) for purpose in (RESEARCH, SCORING)}

    assert main(["node", "erase", "--dir", str(node.directory), "--record-key", patient, "--reason",
                 "erasure request of 2026-12-01, form 7"]) == 0
    out = capsys.readouterr().out
    assert "excluded from every purpose" in out and "2 revoked, 2 no longer linked" in out
    assert "the audit log" in out and "the export file" in out  # what could not be purged, said
    assert patient not in out
    assert {purpose: _usable(node, purpose) for purpose in (RESEARCH, SCORING)} == {
        purpose: count - 1 for purpose, count in before.items()}
    assert pseudonym.encode() not in (node.directory / GRANTS_FILE).read_bytes()
    assert other_pseudonym.encode() in (node.directory / GRANTS_FILE).read_bytes()
    states = sorted(g.state() for g in list_grants(node.directory))
    assert states == ["active", "revoked", "revoked"]
    entry = node.audit().entries()[-1]
    assert entry.action == "consent.erase" and patient not in entry.details_json
    assert entry.details["grants-revoked"] == 2

    assert main(["node", "restore", "--dir", str(node.directory), "--record-key", patient, "--purpose", RESEARCH,
                 "--reason", "changed my mind"]) == 2
    assert "erased at the patient's request" in capsys.readouterr().err
    assert main(["node", "erase", "--dir", str(node.directory), "--record-key", patient, "--reason", "again"]) == 0
    assert "erased already" in capsys.readouterr().out
    assert main(["node", "erase", "--dir", str(node.directory), "--record-key", "NOT-A-KEY", "--reason", "x"]) == 2
    assert "nothing was erased" in capsys.readouterr().err


def test_retention_unlinks_only_grants_that_ended_long_enough_ago(node: NodeState, capsys) -> None:
    from cli.main import main

    first, second, third = node.pseudonym_key().pseudonymise(pd.Series(_consenting(node, 3)))
    authority = GrantAuthority(node.directory, node.hospital, audit=node.audit())
    for person in (first, second, third):
        authority.issue(person, "bank-a", "r1", hours=1)
    import sqlite3

    with sqlite3.connect(node.directory / GRANTS_FILE) as db:
        owner = {pseudonym: grant_id for grant_id, pseudonym in db.execute("SELECT grant_id, pseudonym FROM grants")}
    old, recent = owner[first], owner[second]
    authority.revoke(old, datetime.now(UTC) - timedelta(days=40))
    authority.revoke(recent, datetime.now(UTC) - timedelta(days=2))
    NodePolicy(grant_retention_days=30).save(node.directory)
    assert main(["node", "purge", "--dir", str(node.directory), "--dry-run"]) == 0
    assert "1 grant(s) that ended over 30 days ago" in capsys.readouterr().out
    assert purge_node(node) == 1
    grants = (node.directory / GRANTS_FILE).read_bytes()
    assert first.encode() not in grants and second.encode() in grants and third.encode() in grants
    assert len(list_grants(node.directory)) == 3  # the rows stay for the audit trail
    assert node.audit().entries()[-1].action == "node.purge"
    assert purge_node(node, now=datetime.now(UTC) + timedelta(days=60)) == 2  # later, the other two have ended
