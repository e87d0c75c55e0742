"""Breach scoping and containment, staged as a security officer would meet it: one bank analyst's
API key leaks. The service's scope lists exactly that key's requests and, per hospital, the grant
references it used; the hospital's scope turns those into exactly the affected grants and
patients (and only the hospital can name them); containment revokes the key, suspends nothing
else, and revokes the affected grants, each in one audited step. The requests are written by the
service's own request log and the grants by the node's own grant authority."""

from __future__ import annotations

import csv
import os
import stat
from pathlib import Path

import pandas as pd
import pytest

from clients.node_state import NodeState
from federation import features as fx
from privacy.audit import SCORE_USE, Digest
from privacy.grants import GrantAuthority, grant_ref, list_grants
from server.signals.auth import KeyStore
from server.signals.trail import RequestTrail


@pytest.fixture()
def staged(tmp_path: Path, federation_data, keys):
    """A node with five patients' grants (three for bank-a, two for bank-b) and a service log where
    bank-a's first key scored two of its grants, its second key one, and bank-b's key its own."""
    export = federation_data.files[0]
    state = NodeState.init(tmp_path / "node", hospital="hospital_00", data_file=export, key_file=keys.hospital_context,
                           budgets={"applicant-scoring": (1.0, 1e-5)})
    records = pd.read_parquet(export, columns=[fx.RECORD_KEY])[fx.RECORD_KEY].astype(str).iloc[:5]
    pseudonyms = list(state.pseudonym_key().pseudonymise(records))
    authority = GrantAuthority(state.directory, state.hospital, audit=state.audit())
    banks = ["bank-a", "bank-a", "bank-a", "bank-b", "bank-b"]
    tokens = [authority.issue(p, bank, "r1") for p, bank in zip(pseudonyms, banks)]
    grant_ids = [g.grant_id for g in list_grants(state.directory)]
    by_token = {g.grant_id: g for g in list_grants(state.directory)}
    assert len(tokens) == len(by_token) == 5
    db = tmp_path / "service" / "signals.sqlite"
    store = KeyStore(db)
    leaked, _ = store.add("bank-analyst", "acme-night-shift", bank="bank-a")
    other, _ = store.add("bank-analyst", "acme-day-shift", bank="bank-a")
    bank_b, _ = store.add("bank-analyst", "globex-risk", bank="bank-b")
    trail = RequestTrail(db.with_name("signals_audit.sqlite"))
    issued = sorted(list_grants(state.directory), key=lambda g: g.issued)
    by_bank = {"bank-a": [g.grant_id for g in issued if g.bank == "bank-a"],
               "bank-b": [g.grant_id for g in issued if g.bank == "bank-b"]}
    scored = [(leaked, by_bank["bank-a"][0]), (leaked, by_bank["bank-a"][1]), (other, by_bank["bank-a"][2]),
              (bank_b, by_bank["bank-b"][0])]
    for principal, grant_id in scored:
        trail.record(principal, "GET", "/v1/releases", 200)
        trail.record(principal, "POST", "/v1/scores", 200, {"hospital": "hospital_00", "release": "r1",
                                                           "grant-ref": Digest(grant_ref(grant_id))})
        state.audit().append(SCORE_USE, purpose="applicant-scoring",  # as clients.scoring.ConsentedScorer writes it
                             details={"grant": Digest(grant_id), "bank": principal.bank, "release": "r1", "uses-left": 0})
    keys_of = {p: records.iloc[pseudonyms.index(p)] for p in pseudonyms}
    return state, db, leaked, by_bank, keys_of, grant_ids


def test_a_leaked_api_key_is_scoped_to_exactly_what_it_reached(staged, tmp_path: Path, capsys) -> None:
    from cli.main import main

    state, db, leaked, by_bank, keys_of, _ = staged
    refs = tmp_path / "refs"
    assert main(["incident", "scope", "--db", str(db), "--api-key-id", leaked.key_id, "--grant-refs-out", str(refs),
                 "--csv", str(tmp_path / "requests.csv")]) == 0
    out = capsys.readouterr().out
    assert "4 request(s), 2 score request(s)" in out and "hospital_00: 2 grant reference(s)" in out
    rows = list(csv.DictReader(open(tmp_path / "requests.csv")))
    assert {r["key_id"] for r in rows} == {leaked.key_id} and len(rows) == 4
    expected = {grant_ref(g) for g in by_bank["bank-a"][:2]}
    assert set((refs / "hospital_00.grant-refs").read_text().split()) == expected

    before = {p.name: p.read_bytes() for p in state.directory.iterdir() if p.is_file() and p.suffix == ".sqlite"}
    listing = tmp_path / "notify.csv"
    assert main(["incident", "scope", "--dir", str(state.directory), "--grant-refs", str(refs / "hospital_00.grant-refs"),
                 "--notification-list", str(listing)]) == 0
    out = capsys.readouterr().out
    assert "2 grant(s) could have been used, 2 were, covering 2 patient(s)" in out
    for grant_id in by_bank["bank-a"][:2]:
        assert grant_id in out
    assert by_bank["bank-a"][2] not in out and all(g not in out for g in by_bank["bank-b"])
    for key in keys_of.values():
        assert key not in out  # the record keys go to the hospital's own list only
    named = {row["record_key"] for row in csv.DictReader(open(listing))}
    assert len(named) == 2 and named <= set(keys_of.values())
    assert stat.S_IMODE(os.stat(listing).st_mode) == 0o600
    after = {p.name: p.read_bytes() for p in state.directory.iterdir() if p.is_file() and p.suffix == ".sqlite"}
    assert after == before  # scoping reads only


def test_containment_revokes_exactly_the_scoped_key_and_grants_in_one_audited_step(staged, tmp_path: Path,
                                                                                  capsys) -> None:
    from cli.main import main

    state, db, leaked, by_bank, _, _ = staged
    refs = tmp_path / "refs"
    assert main(["incident", "scope", "--db", str(db), "--api-key-id", leaked.key_id, "--grant-refs-out",
                 str(refs)]) == 0
    assert main(["incident", "contain", "--db", str(db), "--api-key-id", leaked.key_id, "--reason",
                 "key posted in a public chat", "--by", "secops"]) == 0
    live = {p.key_id for p in KeyStore(db).principals() if p.revoked_at is None}
    assert leaked.key_id not in live and len(live) == 2  # the bank's other key and bank-b's stay
    assert main(["incident", "contain", "--dir", str(state.directory), "--grant-refs",
                 str(refs / "hospital_00.grant-refs"), "--reason", "grants used with the leaked key"]) == 0
    states = {g.grant_id: g.state() for g in list_grants(state.directory)}
    assert [states[g] for g in by_bank["bank-a"][:2]] == ["revoked", "revoked"]
    assert states[by_bank["bank-a"][2]] != "revoked" and all(states[g] != "revoked" for g in by_bank["bank-b"])
    contained = [e for e in state.audit().entries() if e.action == "incident.contain"]
    assert len(contained) == 1 and contained[0].details["grants-revoked"] == 2
    service_log = [e for e in RequestTrail(db.with_name("signals_audit.sqlite")).log.entries()
                   if e.action == "incident.contain"]
    assert len(service_log) == 1 and service_log[0].details["keys-revoked"] == 1


def test_a_scope_must_say_what_leaked_and_where(staged, capsys) -> None:
    from cli.main import main

    state, db, *_ = staged
    assert main(["incident", "scope", "--dir", str(state.directory)]) == 2
    assert "say what leaked" in capsys.readouterr().err
    assert main(["incident", "scope", "--dir", str(state.directory), "--db", str(db), "--bank", "bank-a"]) == 2
    assert "give --dir NODE" in capsys.readouterr().err
    assert main(["incident", "contain", "--db", str(db), "--api-key-id", "0" * 12, "--reason", "x"]) == 2
    assert "no live API key" in capsys.readouterr().err
