"""`fedrisk node usage`: a patient's usage record, answered at their hospital's node from its own
records. A real node lives through a history (loads, a withdrawal and its undoing, a two-hospital
training run through the real HospitalNode handlers, cohort queries and a release's DP evaluation
through HospitalAnalytics, grants and scorings through ConsentedScorer), and the record is read as
a data-protection officer would check it: the loads a patient consented to and none after their
withdrawal, nothing for a purpose they never consented to, exactly their own scorings, every row
on an audit entry, the epsilon the ledger charged, the record key nowhere, one audit entry and no
other write."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import sqlite3
import time
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cli.main import EXIT_USER_ERROR, main
from clients.analytics import HospitalAnalytics
from clients.node import HospitalNode
from clients.node_state import NodeState
from clients.node_state import test_split as held_out_split
from clients.scoring import ConsentedScorer, issue_grant
from clients.usage import (ACCESS, CONSENT, CSV_COLUMNS, DERIVED, EVALUATION, GRANT, LOAD, QUERY, RECORDED, REFUSED,
                           SCORING, TRAINING, UnknownRecord, csv_rows, usage_record)
from engines.provisioning import provision_nodes
from experiments.synthetic import synthesize
from federation import features as fx
from federation.config import RunConfig
from federation.he_codec import HospitalKey, init_keys
from federation.model import initial_weights, weights_digest
from federation.query import CohortQuery
from privacy.accounting import compose_epsilon
from privacy.consent import RevocationRegistry
from privacy.grants import GrantRefused, peek_payload

RESEARCH, SCORING_PURPOSE = "credit-risk-research", "applicant-scoring"
PURPOSES = {RESEARCH: (10.0, 1e-5), SCORING_PURPOSE: (10.0, 1e-5)}
RUN, COUNT_RUN, EVAL_RUN, BANK, RELEASE = "r1", "count-run", "eval-run", "bank-a", "r1"
DERIVED_KINDS = (LOAD, TRAINING, QUERY, EVALUATION)


@dataclass(frozen=True)
class History:
    """A node after a known history, and the patients it concerns (record keys)."""

    state: NodeState
    keys_file: Path
    consenting: str  # research and scoring consent, training split: withdraws research, then restores it
    held_out: str  # research consent, held-out split, never withdraws
    no_research: str  # no research consent
    other: str  # scoring consent: another patient's grant
    loads: tuple[int, int, int]  # data.load seqs: before the withdrawal, during it, the run's after the restore
    grants: dict[str, set[str]]  # record key -> its grant ids


def _last(state: NodeState, action: str) -> int:
    return max(e.seq for e in state.audit().entries() if e.action == action)


def _write_release(directory: Path, weights: np.ndarray) -> Path:
    directory.mkdir(parents=True)
    np.savez(directory / "model.npz", weights=weights.astype(np.float32), model="mlp", n_features=40)
    (directory / "model.sha256").write_text(weights_digest(weights.astype(np.float32)) + "\n")
    return directory


def _pick(export: pd.DataFrame, state: NodeState, mask: pd.Series, held_out: bool | None = None,
          skip: tuple[str, ...] = ()) -> str:
    """The first record key under `mask` (and in the held-out split or not), other than `skip`."""
    for key in export.loc[mask, fx.RECORD_KEY].astype(str):
        split = bool(held_out_split(pd.Series([state.pseudonym_key().pseudonym(key)]))[0])
        if key not in skip and (held_out is None or split == held_out):
            return key
    raise AssertionError("no such record in the synthetic export")


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    root = tmp_path_factory.mktemp("usage")
    synthesize(2, 1200, root / "data", seed=3)
    keys = init_keys(root / "keys")
    states = provision_nodes(root / "data", keys.hospital_context, root / "nodes", purposes=PURPOSES)
    state = states[0]
    export = pd.read_parquet(state.data_file)
    current = pd.to_datetime(export[fx.CONSENT_RECORDED_ON]) >= pd.Timestamp(date.today() - timedelta(days=3 * 365))
    research = export[fx.CONSENT_CREDIT_RISK_RESEARCH] & current
    scoring = export[fx.CONSENT_APPLICANT_SCORING] & current
    consenting = _pick(export, state, research & scoring, held_out=False)
    held_out = _pick(export, state, research, held_out=True)
    no_research = _pick(export, state, ~export[fx.CONSENT_CREDIT_RISK_RESEARCH])
    other = _pick(export, state, scoring, skip=(consenting,))
    directory = str(state.directory)

    state.load_records(RESEARCH)
    before = _last(state, "data.load")
    assert main(["node", "revoke", "--dir", directory, "--record-key", consenting, "--purpose", RESEARCH]) == 0
    state.load_records(RESEARCH)
    during = _last(state, "data.load")
    assert main(["node", "restore", "--dir", directory, "--record-key", consenting, "--purpose", RESEARCH,
                 "--reason", "withdrawn by mistake"]) == 0

    config = RunConfig(purpose=RESEARCH, rounds=1, sample_rate=0.05, run_id=RUN, evaluation_epsilon=0.2)
    nodes = [HospitalNode(config, s) for s in states]
    census = [n.census(RUN, n.check_rollback([])) for n in nodes]
    updates = [n.train(1, census, {}, RUN, n.check_rollback([])).contribution for n in nodes]
    for n in nodes:
        n.evaluate(1, {1: updates}, RUN, n.check_rollback([]))
    nodes[0].release({1: updates}, RUN)
    after = _last(state, "data.load")

    analytics = HospitalAnalytics(state, HospitalKey.load(keys.hospital_context))
    count = CohortQuery.from_mapping({"name": "patient-count", "purpose": RESEARCH, "epsilon": 0.5, "measure": "count"})
    analytics.answer(count, COUNT_RUN, hospitals=2)
    analytics.answer(count, COUNT_RUN, hospitals=2)  # a repeat: the same charge, the same noise
    weights = initial_weights("mlp", 0, 40).astype(np.float32)
    evaluation = CohortQuery.from_mapping({"name": "release-evaluation", "purpose": RESEARCH, "epsilon": 0.5,
                                           "measure": "histogram", "field": "risk_score", "bins": [0.0, 0.1, 0.3, 1.0],
                                           "model": {"sha256": weights_digest(weights), "kind": "mlp"}})
    analytics.answer(evaluation, EVAL_RUN, hospitals=2, model_weights=weights)

    release_dir = _write_release(root / "run" / "release", weights)
    assert main(["node", "release", "install", "--dir", directory, "--release-dir", str(release_dir),
                 "--release-id", RELEASE]) == 0
    token, token_other = issue_grant(state, consenting, BANK, RELEASE, uses=2), issue_grant(state, other, BANK, RELEASE)
    scorer = ConsentedScorer(state, grant_interval_s=0)
    scorer.score(token, BANK, RELEASE)
    scorer.score(token_other, BANK, RELEASE)
    scorer.score(token, BANK, RELEASE)
    with pytest.raises(GrantRefused):
        scorer.score(token, BANK, RELEASE)  # used up: refused, audited, nothing left the node
    grants = {consenting: {peek_payload(token).grant_id}, other: {peek_payload(token_other).grant_id}}
    return History(state, keys.hospital_context, consenting, held_out, no_research, other,
                   (before, during, after), grants)


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _snapshot(directory: Path) -> dict[str, tuple[int, str]]:
    """Every file of the node directory but the audit log: modification time and content digest."""
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(directory.rglob("*")) if p.is_file() and not p.name.startswith("audit.sqlite")}


def test_a_consenting_record_lists_the_loads_it_consented_to_and_none_after_its_withdrawal(history: History) -> None:
    before, during, after = history.loads
    report = usage_record(history.state, history.consenting, purpose=RESEARCH)
    derived = [r for r in report.rows if r.kind in DERIVED_KINDS and r.kind != QUERY]
    assert [r.seq for r in derived] == [before, after]  # not the load made while it was withdrawn
    assert [r.kind for r in derived] == [LOAD, TRAINING] and all(r.basis == DERIVED for r in derived)
    assert "trained on in round 1 (DP-SGD)" in derived[1].what and "model released" in derived[1].what
    consent = [r for r in report.rows if r.kind == CONSENT]
    assert [r.what.split()[-1] for r in consent][:1] == ["withdrawn"] and "restored" in consent[1].what
    assert before < consent[0].seq < during < consent[1].seq < after and not any(r.is_use for r in consent)
    # a patient who never withdrew was in all three loads, in the held-out split of the run
    held = usage_record(history.state, history.held_out, purpose=RESEARCH)
    assert [r.seq for r in held.rows if r.kind in (LOAD, TRAINING)] == [before, during, after]
    assert "held out from training, scored in the DP evaluation of round 1" in held.rows[2].what


def test_a_record_without_consent_for_a_purpose_lists_no_use_for_it(history: History) -> None:
    report = usage_record(history.state, history.no_research, purpose=RESEARCH)
    assert report.uses == () and report.totals == {}
    everything = usage_record(history.state, history.no_research)
    assert not [r for r in everything.rows if r.purpose == RESEARCH]


def test_scorings_are_exactly_the_patients_own_grant_uses(history: History) -> None:
    entries = history.state.audit().entries()
    mine, theirs = history.grants[history.consenting], history.grants[history.other]
    expected = [e.seq for e in entries if e.action == "score.grant-use" and e.details["grant"] in mine]
    report = usage_record(history.state, history.consenting)
    scorings = [r for r in report.rows if r.kind == SCORING]
    assert [r.seq for r in scorings] == expected and len(expected) == 2
    assert all(r.basis == RECORDED and r.epsilon is None and r.purpose == SCORING_PURPOSE for r in scorings)
    other_seqs = {e.seq for e in entries if e.details.get("grant") in theirs}
    assert other_seqs and not other_seqs & {r.seq for r in report.rows}
    assert [r.kind for r in report.rows if r.kind in (GRANT, REFUSED)] == [GRANT, REFUSED]  # issued; used up
    assert "used-up" in next(r.what for r in report.rows if r.kind == REFUSED)
    other = usage_record(history.state, history.other)
    assert [r.seq for r in other.rows if r.kind == SCORING] == sorted(
        e.seq for e in entries if e.action == "score.grant-use" and e.details["grant"] in theirs)


def test_every_row_stands_on_an_audit_entry_and_its_epsilon_on_the_ledger(history: History) -> None:
    entries = {e.seq: e for e in history.state.audit().entries()}
    report = usage_record(history.state, history.consenting)
    action = {LOAD: "data.load", TRAINING: "data.load", QUERY: "analytics.answer", EVALUATION: "analytics.answer",
              SCORING: "score.grant-use", CONSENT: ("consent.revoke", "consent.restore"), GRANT: "grant.issue",
              REFUSED: "grant.refused", ACCESS: "usage.report"}
    for row in report.rows:
        assert entries[row.seq].action in action[row.kind], row
        assert row.at.isoformat()[:19] == entries[row.seq].ts[:19]
    assert [r.seq for r in report.rows] == sorted(r.seq for r in report.rows)  # oldest first
    (run,) = [r for r in report.rows if r.kind == TRAINING]
    assert {entries[s].action for s in run.related} == {"round.train", "round.evaluate", "release"}
    assert all(entries[s].details["run"] == RUN for s in run.related)
    with history.state.ledger() as ledger:
        charges = {c.id: c for c in ledger.history(RESEARCH)}
        assert run.epsilon == pytest.approx(ledger.run_spent(RESEARCH, RUN), rel=1e-9)
    assert set(run.charges) == {c.id for c in charges.values() if c.run_id == RUN}
    first, repeat = [r for r in report.rows if r.kind == QUERY]
    (charge,) = [c for c in charges.values() if c.run_id == COUNT_RUN]
    assert first.charges == repeat.charges == (charge.id,)
    assert first.epsilon == pytest.approx(charge.mechanism.epsilon(PURPOSES[RESEARCH][1]), rel=1e-9)
    assert repeat.epsilon == 0.0  # the same answer again: nothing more about the patient was released
    assert report.totals[RESEARCH] == pytest.approx(compose_epsilon(
        [c.mechanism for c in charges.values() if c.run_id in (RUN, COUNT_RUN)], PURPOSES[RESEARCH][1]), rel=1e-9)
    # a release's DP evaluation reads the held-out split only: listed for that patient, not this one
    assert not [r for r in report.rows if r.kind == EVALUATION]
    held = usage_record(history.state, history.held_out, purpose=RESEARCH)
    (evaluated,) = [r for r in held.rows if r.kind == EVALUATION]
    assert entries[evaluated.seq].details["run"] == EVAL_RUN and evaluated.epsilon > 0


def test_the_command_answers_in_words_and_csv_audits_once_and_writes_nothing_else(
        history: History, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    state, key = history.state, history.consenting
    expected = usage_record(state, key)
    before, entries_before = _snapshot(state.directory), state.audit().entries()
    table = tmp_path / "usage.csv"
    code, out, err = _cli(capsys, "node", "usage", "--dir", str(state.directory), "--record-key", key,
                          "--csv", str(table))
    assert code == 0 and err == ""
    assert _snapshot(state.directory) == before  # no ledger, grant, consent or other write
    new = state.audit().entries()[len(entries_before):]
    assert [e.action for e in new] == ["usage.report"] and state.audit().verify().ok
    assert new[0].details["pseudonym"] == state.pseudonym_key().pseudonym(key)
    assert new[0].details["uses"] == len(expected.uses) and new[0].details["derived"] + new[0].details["recorded"] \
        == len(expected.uses)
    lines = out.splitlines()
    assert sum(" UTC  " in line for line in lines) == len(expected.rows)
    assert any("training run" in line and "epsilon" in line and "[derived; audit entry" in line for line in lines)
    assert any("bank scoring" in line and "not DP" in line and "[recorded; audit entry" in line for line in lines)
    assert any("your influence on it is bounded by this epsilon" in line for line in lines)
    with table.open(newline="") as handle:
        written = list(csv.reader(handle))
    assert tuple(written[0]) == CSV_COLUMNS and [tuple(r) for r in written[1:]] == csv_rows(expected)

    code, only_csv, err = _cli(capsys, "node", "usage", "--dir", str(state.directory), "--record-key", key,
                               "--purpose", SCORING_PURPOSE, "--csv", "-")
    assert code == 0 and err == ""
    rows = list(csv.DictReader(io.StringIO(only_csv)))
    assert rows and {r["purpose"] for r in rows} <= {SCORING_PURPOSE, ""}
    assert [r["kind"] for r in rows if r["use"] == "yes"] == [SCORING, SCORING]
    # the record key is nowhere: not in what was printed or written, not in the audit log or any node file
    assert key not in out + only_csv + table.read_text()
    assert all(key.encode() not in p.read_bytes() for p in state.directory.rglob("*") if p.is_file())


def test_an_unknown_record_key_is_refused_in_one_line_with_nothing_written(
        history: History, capsys: pytest.CaptureFixture[str]) -> None:
    state, unknown = history.state, "MRN-99999999"
    audit_before = state.audit_path.read_bytes()
    code, out, err = _cli(capsys, "node", "usage", "--dir", str(state.directory), "--record-key", unknown)
    assert code == EXIT_USER_ERROR and out == ""
    assert err.startswith("fedrisk: error: --record-key: ") and err.count("\n") == 1 and unknown not in err
    assert state.audit_path.read_bytes() == audit_before  # no audit entry
    with pytest.raises(UnknownRecord):
        usage_record(state, unknown)
    code, out, err = _cli(capsys, "node", "usage", "--dir", str(state.directory), "--record-key", history.consenting,
                          "--purpose", "marketing")
    assert code == EXIT_USER_ERROR and err.startswith("fedrisk: error: --purpose: ") and history.consenting not in err
    code, out, err = _cli(capsys, "node", "usage", "--dir", str(state.directory), "--record-key", history.consenting,
                          "--csv", str(state.directory / "no-such-dir" / "usage.csv"))
    assert code == EXIT_USER_ERROR and err.startswith("fedrisk: error: --csv ") and out == ""
    assert state.audit_path.read_bytes() == audit_before


def test_the_answer_says_when_it_rests_on_a_changed_export_an_unlogged_withdrawal_or_a_broken_log(
        history: History, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    export = tmp_path / "export.parquet"
    export.write_bytes(history.state.data_file.read_bytes())
    state = NodeState.init(tmp_path / "node", hospital="hospital_x", data_file=export, key_file=history.keys_file,
                           budgets={RESEARCH: PURPOSES[RESEARCH]})
    key = history.held_out
    state.load_records(RESEARCH)
    (row,) = usage_record(state, key).rows
    assert row.kind == LOAD and not row.export_changed

    later = time.time() + 120
    os.utime(export, (later, later))  # the export replaced since: the answer reads the current one
    report = usage_record(state, key)
    assert report.rows[0].export_changed and any("predate the current export" in n for n in report.notes)
    code, out, _ = _cli(capsys, "node", "usage", "--dir", str(state.directory), "--record-key", key)
    assert code == 0 and "* based on the current export" in out

    # a withdrawal the registry holds but the audit log does not: ordered by the registry's time
    RevocationRegistry(state.directory / "revocations.sqlite").revoke(state.pseudonym_key().pseudonym(key), RESEARCH)
    time.sleep(1.1)
    state.load_records(RESEARCH)
    report = usage_record(state, key)
    assert [r.kind for r in report.rows if r.is_use] == [LOAD]
    assert any("the audit log 0" in n for n in report.notes)

    with sqlite3.connect(state.audit_path) as db:  # an edited entry: the answer says the log does not verify
        db.execute("UPDATE audit SET details = '{\"purposes\":[]}' WHERE seq = 1")
    report = usage_record(state, key)
    assert not report.audit_intact and any("does NOT verify" in n for n in report.notes)
