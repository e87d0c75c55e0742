"""Node secrets sealed at rest, as a thief with a copy of the disk and as the operator see them:
a sealed node's CKKS secret, pseudonym key and signing key are unreadable without the at-rest key
(and the node refuses to start, naming the file and the variable), work unchanged with it, refuse
the wrong key, a sealed file moved into another secret's place, and a clear file planted in a
sealed node. Sealing an existing node keeps every pseudonym."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from clients.node_state import NodeState
from federation import sealing
from federation.errors import KeyMaterialError

PURPOSE = "credit-risk-research"
SECRETS = ("hospital.ckks", "pseudonym.key", "signing.key")


def _cli(*argv: str) -> int:
    from cli.main import main

    return main(list(argv))


def _init(directory: Path, federation_data, keys) -> NodeState:
    return NodeState.init(directory, hospital="hospital_00", data_file=federation_data.files[0],
                          key_file=keys.hospital_context, budgets={PURPOSE: (2.0, 1e-5)})


@pytest.fixture()
def at_rest_key(tmp_path: Path, monkeypatch, capsys) -> Path:
    path = tmp_path / "elsewhere" / "node-at-rest.key"
    path.parent.mkdir()
    assert _cli("node", "seal-key", "--out", str(path)) == 0
    assert "FEDRISK_NODE_KEY_FILE" in capsys.readouterr().out
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    monkeypatch.setenv(sealing.KEY_FILE_ENV, str(path))
    return path


def test_a_node_made_under_an_at_rest_key_holds_no_secret_in_clear(tmp_path, federation_data, keys, at_rest_key,
                                                                   monkeypatch, capsys) -> None:
    node = _init(tmp_path / "node", federation_data, keys)
    assert node.sealed and NodeState.load(node.directory).sealed
    clear_ckks = keys.hospital_context.read_bytes()
    for name in SECRETS:
        raw = (node.directory / name).read_bytes()
        assert sealing.is_sealed(raw), name
        assert stat.S_IMODE(os.stat(node.directory / name).st_mode) == 0o600
    secret_part = clear_ckks[-4096:]  # the serialized secret key sits at the file's end
    assert secret_part not in (node.directory / "hospital.ckks").read_bytes()
    pseudonym = node.pseudonym_key().pseudonym("patient-1")
    assert node.load_records(PURPOSE).train_x.shape[0] > 0  # works with the key
    signing = node.signing_key().public_hex

    monkeypatch.delenv(sealing.KEY_FILE_ENV)  # the thief: the disk image, not the key
    with pytest.raises(KeyMaterialError, match=r"pseudonym.key is sealed at rest: set \$FEDRISK_NODE_KEY_FILE"):
        NodeState.load(node.directory).pseudonym_key()
    with pytest.raises(KeyMaterialError, match="hospital.ckks is sealed at rest"):
        NodeState.load(node.directory).hospital_key()
    capsys.readouterr()
    assert _cli("node", "signing-key", "--dir", str(node.directory)) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "signing.key is sealed at rest" in err[0]

    other = tmp_path / "other.key"
    sealing.create_key_file(other, "node at-rest key")
    monkeypatch.setenv(sealing.KEY_FILE_ENV, str(other))  # the wrong key
    with pytest.raises(KeyMaterialError, match="cannot be opened with this at-rest key"):
        NodeState.load(node.directory).pseudonym_key()

    monkeypatch.setenv(sealing.KEY_FILE_ENV, str(at_rest_key))
    again = NodeState.load(node.directory)
    assert again.pseudonym_key().pseudonym("patient-1") == pseudonym
    assert again.signing_key().public_hex == signing


def test_a_sealed_node_refuses_a_swapped_or_planted_secret(tmp_path, federation_data, keys, at_rest_key,
                                                           monkeypatch) -> None:
    node = _init(tmp_path / "node", federation_data, keys)
    pseudonym_file = node.directory / "pseudonym.key"
    original = pseudonym_file.read_bytes()
    # a sealed file of the right size from another role does not open as the pseudonym key
    pseudonym_file.write_bytes(sealing.seal(os.urandom(32), sealing.ROLE_SIGNING, sealing.at_rest_key()))
    with pytest.raises(KeyMaterialError, match="another secret's file"):
        node.pseudonym_key()
    # a clear key planted by someone with write access but not the at-rest key
    pseudonym_file.write_bytes(os.urandom(32))
    with pytest.raises(KeyMaterialError, match="is in clear but this node's secrets are sealed"):
        node.pseudonym_key()
    pseudonym_file.write_bytes(original)
    assert node.pseudonym_key().pseudonym("x")
    # without the at-rest key, nothing is written in clear in a sealed node (the grant key, made on first use)
    monkeypatch.delenv(sealing.KEY_FILE_ENV)
    from privacy.grants import GrantAuthority, GrantError

    # (the grant store is encrypted too, so the refusal may come from either; neither writes anything)
    with pytest.raises((GrantError, KeyMaterialError), match="is sealed: set|FEDRISK_NODE_KEY_FILE"):
        GrantAuthority(node.directory, node.hospital, audit=node.audit()).issue("ab" * 16, "bank-a", "r1")
    assert not (node.directory / "grant_signing.key").exists()


def test_sealing_an_existing_node_keeps_its_pseudonyms_and_is_audited(tmp_path, federation_data, keys,
                                                                      monkeypatch, capsys) -> None:
    node = _init(tmp_path / "node", federation_data, keys)
    assert not node.sealed and not any(sealing.is_sealed((node.directory / n).read_bytes()) for n in SECRETS)
    before = node.pseudonym_key().pseudonym("patient-7")
    signing = node.signing_key().public_hex
    capsys.readouterr()
    assert _cli("node", "seal", "--dir", str(node.directory)) == 2  # no key configured: refused, nothing changed
    assert "FEDRISK_NODE_KEY_FILE" in capsys.readouterr().err
    assert not NodeState.load(node.directory).sealed

    key = tmp_path / "k"
    sealing.create_key_file(key, "node at-rest key")
    monkeypatch.setenv(sealing.KEY_FILE_ENV, str(key))
    assert _cli("node", "seal", "--dir", str(node.directory)) == 0
    sealed = NodeState.load(node.directory)
    assert sealed.sealed and all(sealing.is_sealed((node.directory / n).read_bytes()) for n in SECRETS)
    assert sealed.pseudonym_key().pseudonym("patient-7") == before
    assert sealed.signing_key().public_hex == signing
    assert sealed.audit().entries()[-1].action == "node.seal"
    assert sealed.audit().verify().ok
    assert _cli("node", "seal", "--dir", str(node.directory)) == 0  # again: nothing to do
    assert "already sealed" in capsys.readouterr().out
