"""Encrypted node backups as a security officer checks them: a stolen backup shows nothing of the
node's secrets or stores, the wrong key or one altered byte is refused, a restore writes a new
directory whose node works, and never over an existing one."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from clients.node_state import NodeState


@pytest.fixture()
def node(tmp_path: Path, federation_data, keys) -> NodeState:
    return NodeState.init(tmp_path / "node", hospital="hospital_00", data_file=federation_data.files[0],
                          key_file=keys.hospital_context, budgets={"credit-risk-research": (2.0, 1e-5)})


def _cli(*argv: str) -> int:
    from cli.main import main

    return main(list(argv))


def test_a_backup_reveals_nothing_and_restores_a_working_node(node: NodeState, tmp_path: Path, capsys) -> None:
    key = tmp_path / "backup.key"
    assert _cli("node", "backup", "key", "--out", str(key)) == 0
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    backup = tmp_path / "node.backup"
    assert _cli("node", "backup", "create", "--dir", str(node.directory), "--out", str(backup), "--key-file", str(key)) == 0
    sealed = backup.read_bytes()
    secrets = [(node.directory / name).read_bytes() for name in ("pseudonym.key", "hospital.ckks", "signing.key")]
    assert all(secret[:32] not in sealed for secret in secrets)
    assert b"SQLite format 3" not in sealed and b"credit-risk-research" not in sealed  # no store, no ledger in clear
    assert stat.S_IMODE(os.stat(backup).st_mode) == 0o600

    restored = tmp_path / "restored"
    assert _cli("node", "backup", "restore", "--from", str(backup), "--dir", str(restored), "--key-file", str(key)) == 0
    again = NodeState.load(restored)
    with again.ledger() as ledger:
        assert ledger.remaining("credit-risk-research") == pytest.approx(2.0)
    assert again.audit().verify().ok and len(again.audit().entries()) == len(node.audit().entries())
    assert (restored / "pseudonym.key").read_bytes() == (node.directory / "pseudonym.key").read_bytes()
    assert stat.S_IMODE(os.stat(restored / "pseudonym.key").st_mode) == 0o600
    assert again.load_records("credit-risk-research").train_x.shape[0] > 0  # the restored node reads its data


def test_the_wrong_key_an_altered_byte_and_an_existing_directory_are_refused(node: NodeState, tmp_path: Path,
                                                                              capsys) -> None:
    key, other = tmp_path / "a.key", tmp_path / "b.key"
    for path in (key, other):
        assert _cli("node", "backup", "key", "--out", str(path)) == 0
    backup = tmp_path / "node.backup"
    assert _cli("node", "backup", "create", "--dir", str(node.directory), "--out", str(backup), "--key-file", str(key)) == 0
    capsys.readouterr()
    assert _cli("node", "backup", "restore", "--from", str(backup), "--dir", str(tmp_path / "r1"),
                "--key-file", str(other)) == 2
    assert "cannot be opened with this key, or the file was altered" in capsys.readouterr().err
    altered = bytearray(backup.read_bytes())
    altered[len(altered) // 2] ^= 1
    (tmp_path / "altered.backup").write_bytes(bytes(altered))
    assert _cli("node", "backup", "restore", "--from", str(tmp_path / "altered.backup"), "--dir", str(tmp_path / "r2"),
                "--key-file", str(key)) == 2
    assert "or the file was altered" in capsys.readouterr().err
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()  # nothing partial left
    assert _cli("node", "backup", "restore", "--from", str(backup), "--dir", str(node.directory),
                "--key-file", str(key)) == 2
    assert "not empty" in capsys.readouterr().err
    assert _cli("node", "backup", "key", "--out", str(key)) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert _cli("node", "backup", "create", "--dir", str(node.directory), "--out", str(tmp_path / "x.backup")) == 2
    assert "FEDRISK_BACKUP_KEY" in capsys.readouterr().err
