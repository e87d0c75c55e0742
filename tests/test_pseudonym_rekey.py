"""Re-keying a node's pseudonyms, as its operator and a patient would check it: after
`fedrisk node rotate pseudonym` every pseudonym changes, yet a withdrawn consent stays withdrawn,
an erased patient stays erased, a grant still scores its patient, and the patient's usage record
still shows the withdrawal logged under the old pseudonym. A re-key that would lose a consent is
refused with nothing changed, and an interrupted one is finished by running it again."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from clients import keys as node_keys
from clients.node_state import NodeState
from clients.usage import usage_record
from federation import features as fx
from federation.errors import KeyMaterialError
from privacy.grants import GRANTS_FILE, GrantAuthority, list_grants

RESEARCH, SCORING = "credit-risk-research", "applicant-scoring"


def _cli(*argv: str) -> int:
    from cli.main import main

    return main(list(argv))


@pytest.fixture()
def node(tmp_path: Path, federation_data, keys) -> NodeState:
    return NodeState.init(tmp_path / "node", hospital="hospital_00", data_file=federation_data.files[0],
                          key_file=keys.hospital_context, budgets={RESEARCH: (2.0, 1e-5), SCORING: (1.0, 1e-5)})


def _patients(node: NodeState, count: int) -> list[str]:
    table = pd.read_parquet(node.data_file)
    both = table[table[fx.CONSENT_CREDIT_RISK_RESEARCH] & table[fx.CONSENT_APPLICANT_SCORING]]
    return [str(k) for k in both[fx.RECORD_KEY].iloc[:count]]


def _usable(node: NodeState) -> dict[str, int]:
    return {purpose: int(node.usable(purpose)[1].sum()) for purpose in (RESEARCH, SCORING)}


def test_a_rekey_changes_every_pseudonym_and_loses_no_consent_erasure_or_grant(node: NodeState, capsys) -> None:
    withdrawn, erased, scored = _patients(node, 3)
    assert _cli("node", "revoke", "--dir", str(node.directory), "--record-key", withdrawn, "--purpose", RESEARCH) == 0
    assert _cli("node", "erase", "--dir", str(node.directory), "--record-key", erased, "--reason", "form 9") == 0
    old_key = node.pseudonym_key()
    GrantAuthority(node.directory, node.hospital, audit=node.audit()).issue(old_key.pseudonym(scored), "bank-a", "r1")
    before = _usable(node)
    old = [old_key.pseudonym(k) for k in (withdrawn, erased, scored)]
    history_before = usage_record(node, withdrawn)

    capsys.readouterr()
    assert _cli("node", "rotate", "pseudonym", "--dir", str(node.directory), "--reason", "annual rotation") == 0
    assert "re-mapped 1 withdrawal(s)" in capsys.readouterr().out
    new_key = node.pseudonym_key()
    assert all(new_key.pseudonym(k) != p for k, p in zip((withdrawn, erased, scored), old))
    stores = (node.directory / "revocations.sqlite").read_bytes() + (node.directory / GRANTS_FILE).read_bytes()
    assert not any(p.encode() in stores for p in old)  # a leaked old key links nothing stored any more
    assert _usable(node) == before  # the withdrawal and the erasure still exclude the same records
    [issued] = list_grants(node.directory, new_key.pseudonym(scored))
    assert issued.state() == "active" and list_grants(node.directory, old[2]) == []
    assert _cli("node", "restore", "--dir", str(node.directory), "--record-key", erased, "--purpose", RESEARCH,
                "--reason", "x") == 2
    assert "erased at the patient's request" in capsys.readouterr().err
    after = usage_record(node, withdrawn)
    assert [r.what for r in after.rows if r.kind == "consent"] == [r.what for r in history_before.rows
                                                                   if r.kind == "consent"] != []
    entry = node.audit().entries()[-1]
    assert entry.action == "node.key-rotate" and entry.details["key"] == "pseudonym"
    assert not any(p in entry.details_json for p in old)
    assert node.audit().verify().ok


def test_a_withdrawal_and_an_erasure_of_a_record_absent_at_rekey_still_apply_when_it_returns(
        tmp_path: Path, federation_data, keys, capsys) -> None:
    export = tmp_path / "export.parquet"
    full = pd.read_parquet(federation_data.files[0])
    full.to_parquet(export)
    node = NodeState.init(tmp_path / "node", hospital="hospital_00", data_file=export, key_file=keys.hospital_context,
                          budgets={RESEARCH: (2.0, 1e-5), SCORING: (1.0, 1e-5)})
    withdrawn, erased = _patients(node, 2)
    assert _cli("node", "revoke", "--dir", str(node.directory), "--record-key", withdrawn, "--purpose", RESEARCH) == 0
    assert _cli("node", "erase", "--dir", str(node.directory), "--record-key", erased, "--reason", "form 9") == 0
    before = _usable(node)
    full[~full[fx.RECORD_KEY].astype(str).isin([withdrawn, erased])].to_parquet(export)  # both left the export
    remapped = node_keys.rekey_pseudonyms(node, "scheduled")
    assert remapped["kept"] == 2 and remapped["revocations"] == 0  # the withdrawal and the erasure, kept
    full.to_parquet(export)  # the records come back
    assert _usable(node) == before  # still withdrawn, still erased
    assert _cli("node", "restore", "--dir", str(node.directory), "--record-key", erased, "--purpose", RESEARCH,
                "--reason", "x") == 2  # an erasure made under the old key is still final
    assert "erased at the patient's request" in capsys.readouterr().err
    assert _cli("node", "restore", "--dir", str(node.directory), "--record-key", withdrawn, "--purpose", RESEARCH,
                "--reason", "consent given again") == 0  # a withdrawal made under the old key can be undone
    assert _usable(node)[RESEARCH] == before[RESEARCH] + 1


@pytest.mark.parametrize("crash_at", [1, 2])
def test_an_interrupted_rekey_blocks_loads_and_completes_when_run_again(node: NodeState, monkeypatch,
                                                                        crash_at: int) -> None:
    [patient] = _patients(node, 1)
    node.revocations().revoke(node.pseudonym_key().pseudonym(patient), SCORING)
    before = _usable(node)
    real_replace, calls = os.replace, []

    def crash(src, dst):  # the machine stops after the stores committed, while the key files move
        calls.append(dst)
        if len(calls) == crash_at:
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(node_keys.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        node_keys.rekey_pseudonyms(node, "scheduled")
    with pytest.raises(KeyMaterialError):
        node.load_records(RESEARCH)
    monkeypatch.setattr(node_keys.os, "replace", real_replace)
    node_keys.rekey_pseudonyms(node, "scheduled")
    assert _usable(node) == before
    assert len(node.retired_pseudonym_keys()) == 1
    assert not list(node.directory.glob(".pseudonym.key*"))
