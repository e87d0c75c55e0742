"""SQLite stores encrypted at rest, as a thief with a copy of the disk and as the operator see them.

A sealed node's ledger, audit log, consent store and grants (and the signals service's keys,
hospitals and request log) hold no readable byte without the at-rest key: no SQLite header, no
table name, no purpose, no hospital, no pseudonym. Without the key every command fails with one
line naming the store and the variable; with the wrong key or an altered page it is refused, not
read. With the key everything works as before, and sealing an existing node or service keeps
every row. A plain store planted in a sealed directory is refused."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from clients.backup import backup_node, restore_node
from clients.node_state import NodeState
from federation import sealing, stores
from federation.errors import KeyMaterialError
from privacy.grants import GrantAuthority, list_grants
from privacy.ledger import GaussianMechanism

PURPOSE = "credit-risk-research"
BANK = "bank-acme"


def _cli(*argv: str) -> int:
    from cli.main import main

    return main(list(argv))


def _key(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return sealing.create_key_file(path, "node at-rest key")


def _busy_node(directory: Path, federation_data, keys) -> tuple[NodeState, list[str]]:
    """A node that has done what a node does: spent budget, recorded a withdrawal and an erasure,
    issued a grant to a bank, audited all of it. Returns it and the pseudonyms it stored."""
    node = NodeState.init(directory, hospital="hospital_00", data_file=federation_data.files[0],
                          key_file=keys.hospital_context, budgets={PURPOSE: (4.0, 1e-5)})
    with node.ledger() as ledger:
        ledger.charge(PURPOSE, GaussianMechanism(0.01, 1.1, 300), run_id="run-1", kind="training",
                      actor="hospital_00", slot="round-1", identity="a" * 64)
    key = node.pseudonym_key()
    pseudonyms = [key.pseudonym(f"patient-{i}") for i in range(3)]
    registry = node.revocations()
    registry.revoke(pseudonyms[0], PURPOSE)
    registry.erase(pseudonyms[1])
    GrantAuthority(node.directory, node.hospital, audit=node.audit()).issue(pseudonyms[2], BANK, "r1")
    node.load_records(PURPOSE)
    return node, pseudonyms


def _disk_bytes(directory: Path) -> dict[str, bytes]:
    """Every store file (and journal) in `directory`, as a copied disk image holds it."""
    return {p.name: p.read_bytes() for p in directory.iterdir()
            if p.is_file() and re.search(r"\.(sqlite|db)(-wal|-journal)?$", p.name)}


def _assert_nothing_readable(files: dict[str, bytes], pseudonyms: list[str]) -> None:
    assert {"ledger.sqlite", "audit.sqlite", "revocations.sqlite", "grants.sqlite"} <= set(files)
    for name, raw in files.items():
        for needle in (b"SQLite format 3", b"CREATE TABLE", PURPOSE.encode(), b"hospital_00", BANK.encode(),
                       *(p.encode() for p in pseudonyms)):
            assert needle not in raw, (name, needle)


def test_a_sealed_nodes_stores_give_a_thief_nothing_and_work_with_the_key(tmp_path, federation_data, keys,
                                                                          monkeypatch, capsys) -> None:
    at_rest = _key(tmp_path / "elsewhere" / "at-rest.key")
    monkeypatch.setenv(sealing.KEY_FILE_ENV, str(at_rest))
    node, pseudonyms = _busy_node(tmp_path / "node", federation_data, keys)
    with node.ledger() as ledger:  # a live ledger: its WAL file is on disk too
        spent = ledger.spent(PURPOSE)
        _assert_nothing_readable(_disk_bytes(node.directory), pseudonyms)

    monkeypatch.delenv(sealing.KEY_FILE_ENV)  # the thief: the disk image, not the key
    capsys.readouterr()
    assert _cli("node", "budget", "--dir", str(node.directory)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FEDRISK_NODE_KEY_FILE" in err[0] and "encrypted" in err[0], err
    with pytest.raises(KeyMaterialError, match="FEDRISK_NODE_KEY_FILE"):
        node.revocations()

    monkeypatch.setenv(sealing.KEY_FILE_ENV, str(_key(tmp_path / "other.key")))  # the wrong key
    with pytest.raises(KeyMaterialError, match=r"ledger.sqlite cannot be opened with this at-rest key"):
        node.ledger()

    monkeypatch.setenv(sealing.KEY_FILE_ENV, str(at_rest))
    again = NodeState.load(node.directory)
    with again.ledger() as ledger:
        assert ledger.spent(PURPOSE) == spent > 0
    assert again.revocations().revoked(PURPOSE) == {pseudonyms[0], pseudonyms[1]}
    assert again.revocations().erased() == {pseudonyms[1]}
    assert [g.bank for g in list_grants(again.directory)] == [BANK]
    assert again.audit().verify().ok
    capsys.readouterr()
    assert _cli("node", "budget", "--dir", str(node.directory)) == 0
    assert f"{PURPOSE}: spent epsilon" in capsys.readouterr().out


def test_an_altered_page_or_a_planted_plain_store_is_refused(tmp_path, federation_data, keys, monkeypatch) -> None:
    monkeypatch.setenv(sealing.KEY_FILE_ENV, str(_key(tmp_path / "k")))
    node, _ = _busy_node(tmp_path / "node", federation_data, keys)
    ledger = node.ledger_path
    raw = bytearray(ledger.read_bytes())
    raw[4096 + 100] ^= 0x01  # one bit of the second page
    ledger.write_bytes(bytes(raw))
    Path(f"{ledger}-wal").unlink(missing_ok=True)
    with pytest.raises(Exception) as refused:
        with node.ledger() as opened:
            opened.spent(PURPOSE)
    assert isinstance(refused.value, (KeyMaterialError, *stores.DatabaseError)), refused.value

    import sqlite3

    planted = node.directory / "revocations.sqlite"
    planted.unlink()
    with sqlite3.connect(planted) as db:  # someone with write access but not the key
        db.execute("CREATE TABLE erasures (pseudonym TEXT PRIMARY KEY, at TEXT NOT NULL)")
    with pytest.raises(KeyMaterialError, match="revocations.sqlite is a plain SQLite file in a directory whose "
                                               "stores are encrypted"):
        node.revocations()


def test_sealing_an_existing_node_encrypts_every_store_and_keeps_every_row(tmp_path, federation_data, keys,
                                                                           monkeypatch, capsys) -> None:
    node, pseudonyms = _busy_node(tmp_path / "node", federation_data, keys)
    assert all(stores.is_clear(node.directory / name) for name in ("ledger.sqlite", "audit.sqlite"))
    with node.ledger() as ledger:
        spent = ledger.spent(PURPOSE)
    entries = len(node.audit().entries())
    monkeypatch.setenv(sealing.KEY_FILE_ENV, str(_key(tmp_path / "k")))

    # an interrupted seal: one store already encrypted, the directory not yet marked
    stores.encrypt_in_place(node.directory / "grants.sqlite")
    assert not node.sealed and [g.bank for g in list_grants(node.directory)] == [BANK]

    capsys.readouterr()
    assert _cli("node", "seal", "--dir", str(node.directory)) == 0
    out = capsys.readouterr().out
    assert "ledger.sqlite" in out and "audit.sqlite" in out and "grants.sqlite" not in out  # finished, not redone
    sealed = NodeState.load(node.directory)
    assert sealed.sealed
    assert not any(p.name.endswith(("-wal", "-shm", ".encrypting")) for p in node.directory.iterdir())
    _assert_nothing_readable(_disk_bytes(node.directory), pseudonyms)
    with sealed.ledger() as ledger:
        assert ledger.spent(PURPOSE) == spent
    assert sealed.revocations().revoked(PURPOSE) == {pseudonyms[0], pseudonyms[1]}
    assert sealed.revocations().erased() == {pseudonyms[1]}
    log = sealed.audit()
    assert len(log.entries()) == entries + 1 and log.entries()[-1].action == "node.seal" and log.verify().ok
    assert sealed.load_records(PURPOSE).train_x.shape[0] > 0


def test_a_sealed_nodes_backup_restores_encrypted_stores(tmp_path, federation_data, keys, monkeypatch) -> None:
    monkeypatch.setenv(sealing.KEY_FILE_ENV, str(_key(tmp_path / "k")))
    node, pseudonyms = _busy_node(tmp_path / "node", federation_data, keys)
    backup_key = os.urandom(32)
    backup_node(node.directory, tmp_path / "node.backup", backup_key)
    restored_dir = tmp_path / "restored"
    restore_node(tmp_path / "node.backup", restored_dir, backup_key)
    _assert_nothing_readable(_disk_bytes(restored_dir), pseudonyms)  # the snapshot was never written in clear
    restored = NodeState.load(restored_dir)
    assert restored.sealed and restored.revocations().erased() == {pseudonyms[1]}
    assert restored.audit().verify().ok


def test_sealing_the_signals_service_encrypts_its_stores(tmp_path, monkeypatch, capsys) -> None:
    from server.signals.app import SIGNALS_AUDIT, ServiceSettings, make_app

    db = tmp_path / "service" / "signals.sqlite"
    db.parent.mkdir()
    capsys.readouterr()
    assert _cli("serve", "keys", "add", "--role", "auditor", "--label", "acme-audit", "--db", str(db)) == 0
    api_key = capsys.readouterr().out.splitlines()[0]
    settings = ServiceSettings(db=db, registry_dir=tmp_path / "registry")
    with TestClient(make_app(settings)) as client:
        assert client.get("/v1/audit", headers={"X-API-Key": api_key}).status_code == 200

    assert _cli("serve", "seal", "--db", str(db)) == 2  # no key configured: refused, nothing changed
    assert "FEDRISK_NODE_KEY_FILE" in capsys.readouterr().err and stores.is_clear(db)
    monkeypatch.setenv(sealing.KEY_FILE_ENV, str(_key(tmp_path / "k")))
    assert _cli("serve", "seal", "--db", str(db)) == 0
    assert "signals.sqlite" in capsys.readouterr().out
    for path in (db, db.with_name(SIGNALS_AUDIT)):
        raw = path.read_bytes()
        assert stores.is_clear(path) is False and b"acme-audit" not in raw and b"auditor" not in raw

    with TestClient(make_app(settings)) as client:  # works with the key: the same key, the same log
        reply = client.get("/v1/audit", headers={"X-API-Key": api_key})
        assert reply.status_code == 200 and "stores.seal" in reply.text
    monkeypatch.delenv(sealing.KEY_FILE_ENV)
    capsys.readouterr()
    assert _cli("serve", "keys", "list", "--db", str(db)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FEDRISK_NODE_KEY_FILE" in err[0]

    old = tmp_path / "k"
    monkeypatch.setenv(sealing.KEY_FILE_ENV, str(old))
    new = _key(tmp_path / "k2")
    assert _cli("serve", "rekey", "--db", str(db), "--new-key-file", str(new), "--reason", "yearly") == 0
    assert "re-encrypted" in capsys.readouterr().out
    monkeypatch.setenv(sealing.KEY_FILE_ENV, str(old))
    assert _cli("serve", "keys", "list", "--db", str(db)) == 2  # the old key opens nothing
    assert "cannot be opened with this at-rest key" in capsys.readouterr().err
    monkeypatch.setenv(sealing.KEY_FILE_ENV, str(new))
    assert _cli("serve", "keys", "list", "--db", str(db)) == 0
    assert "acme-audit" in capsys.readouterr().out


def test_rotating_the_at_rest_key_re_encrypts_everything_and_the_old_key_opens_nothing(
        tmp_path, federation_data, keys, monkeypatch, capsys) -> None:
    old_key = _key(tmp_path / "old.key")
    monkeypatch.setenv(sealing.KEY_FILE_ENV, str(old_key))
    node, pseudonyms = _busy_node(tmp_path / "node", federation_data, keys)
    before = node.pseudonym_key().pseudonym("patient-9")
    with node.ledger() as ledger:
        spent = ledger.spent(PURPOSE)
    new_key = _key(tmp_path / "new.key")
    assert _cli("node", "rotate", "at-rest", "--dir", str(node.directory), "--new-key-file", str(old_key),
                "--reason", "scheduled") == 2  # the same key: refused
    # an interrupted rotation: the ledger already re-keyed, the rest not
    from federation.stores import _derive, _open_under

    db = _open_under(node.ledger_path, _derive(sealing.at_rest_key()))
    db.execute("PRAGMA journal_mode=DELETE")
    db.execute(f'PRAGMA rekey = "{_derive(sealing.read_key_file(new_key, "k", "k"))}"')
    db.close()
    capsys.readouterr()
    assert _cli("node", "rotate", "at-rest", "--dir", str(node.directory), "--new-key-file", str(new_key),
                "--reason", "suspected leak of the old key") == 0
    assert "re-encrypted" in capsys.readouterr().out

    monkeypatch.setenv(sealing.KEY_FILE_ENV, str(old_key))  # whoever holds the old key: nothing opens
    stale = NodeState.load(node.directory)
    for opener in (stale.pseudonym_key, stale.hospital_key, stale.signing_key, stale.ledger, stale.revocations):
        with pytest.raises(KeyMaterialError, match="cannot be opened with this at-rest key"):
            opener()
    monkeypatch.setenv(sealing.KEY_FILE_ENV, str(new_key))
    rotated = NodeState.load(node.directory)
    assert rotated.pseudonym_key().pseudonym("patient-9") == before
    with rotated.ledger() as ledger:
        assert ledger.spent(PURPOSE) == spent
    assert rotated.revocations().erased() == {pseudonyms[1]}
    log = rotated.audit()
    assert log.verify().ok
    last = log.entries()[-1]
    assert last.action == "node.key-rotate" and last.details["key"] == "at-rest"
    assert last.details["new"] == sealing.key_id(sealing.read_key_file(new_key, "k", "k"))
    assert last.details["files"] == 7  # 4 secrets and 3 stores: the ledger was re-keyed before the interruption


def test_a_removed_marker_with_planted_clear_stores_is_refused_not_read(tmp_path, federation_data, keys,
                                                                        monkeypatch) -> None:
    """Someone with write access but no key deletes the marker and puts clear stores in place
    (a fresh ledger with budget to spare, a consent store with no withdrawals): the node, run with
    its key, refuses the directory instead of reading them."""
    import sqlite3

    monkeypatch.setenv(sealing.KEY_FILE_ENV, str(_key(tmp_path / "k")))
    node, _ = _busy_node(tmp_path / "node", federation_data, keys)
    (node.directory / sealing.SEALED_MARKER).unlink()
    for name in ("ledger.sqlite", "revocations.sqlite"):
        (node.directory / name).unlink()
        sqlite3.connect(node.directory / name).close()
    with pytest.raises(KeyMaterialError, match="is not sealed at rest but an at-rest key is configured"):
        NodeState.load(node.directory)


def test_a_locked_encrypted_ledger_is_busy_not_a_wrong_key(tmp_path, monkeypatch) -> None:
    from privacy.ledger import BudgetLedger, LedgerBusy

    monkeypatch.setenv(sealing.KEY_FILE_ENV, str(_key(tmp_path / "k")))
    sealing.mark_sealed(tmp_path)
    with BudgetLedger(tmp_path / "ledger.sqlite") as ledger:
        ledger.set_budget(PURPOSE, 1.0, 1e-5)
    holder = stores.connect(tmp_path / "ledger.sqlite", isolation_level=None)
    holder.execute("PRAGMA journal_mode=DELETE")  # a rollback-journal lock blocks readers too
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(LedgerBusy, match="is busy"):
            BudgetLedger(tmp_path / "ledger.sqlite", busy_timeout=0.2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_an_interrupted_encryption_leaves_the_plain_store_whole(tmp_path, monkeypatch) -> None:
    import sqlite3

    monkeypatch.setenv(sealing.KEY_FILE_ENV, str(_key(tmp_path / "k")))
    path = tmp_path / "revocations.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE erasures (pseudonym TEXT PRIMARY KEY, at TEXT NOT NULL)")
        db.execute("INSERT INTO erasures VALUES ('ab', 'today')")
    real_replace = os.replace

    def crash(src, dst):  # the machine stops just before the rename
        raise OSError("power lost")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        stores.encrypt_in_place(path)
    monkeypatch.setattr(os, "replace", real_replace)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT * FROM erasures").fetchall() == [("ab", "today")]
    assert stores.encrypt_in_place(path) and stores.is_clear(path) is False  # running it again finishes
    assert not list(tmp_path.glob(".*encrypting*"))
    with stores.connect(path, encrypted=True) as db:
        assert db.execute("SELECT * FROM erasures").fetchall() == [("ab", "today")]


def test_the_service_seal_refuses_a_directory_shared_with_other_stores(tmp_path, monkeypatch, capsys) -> None:
    import sqlite3

    db = tmp_path / "signals.sqlite"
    assert _cli("serve", "keys", "list", "--db", str(db)) == 0
    sqlite3.connect(tmp_path / "mlflow.db").execute("CREATE TABLE runs (x)").connection.close()
    monkeypatch.setenv(sealing.KEY_FILE_ENV, str(_key(tmp_path / "keys" / "k")))
    capsys.readouterr()
    assert _cli("serve", "seal", "--db", str(db)) == 2
    assert "also holds mlflow.db" in capsys.readouterr().err
    assert stores.is_clear(tmp_path / "mlflow.db") and stores.is_clear(db)
