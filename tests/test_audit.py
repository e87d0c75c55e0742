"""Audit log: every single-entry tampering an attacker with the DB file can do is caught and named.

Tampering is done as an attacker would: raw sqlite3 UPDATE/DELETE/INSERT on the DB file. Forged
hashes are computed from the documented formula, independently of privacy.audit.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import re
import shutil
import sqlite3
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

import pytest

from privacy.audit import (DATA_LOAD, GENESIS, RELEASE, REFUSAL, ROLE_HOSPITAL, ROUND_TRAIN,
                           RUN_START, AuditIdentifierError, AuditLog, Digest, format_verification)

N = 6
FIELDS = ["seq", "prev_hash", "role", "identity", "action", "ts", "purpose", "epsilon", "details",
          "hash"]


def _documented_hash(seq: int, prev: str, row: dict) -> str:
    """SHA-256 over canonical JSON of [seq, prev_hash, fields], as the module docstring says."""
    fields = {k: row[k] for k in ("role", "identity", "action", "ts", "purpose", "epsilon")}
    fields["details"] = json.loads(row["details"])
    payload = json.dumps([seq, prev, fields], sort_keys=True, separators=(",", ":"),
                         ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def _sql(db: Path, *statements: tuple[str, tuple] | str) -> None:
    """Run statements on the raw DB file and commit, as an attacker with file access would."""
    with closing(sqlite3.connect(db)) as conn:
        for st in statements:
            sql, params = (st, ()) if isinstance(st, str) else st
            conn.execute(sql, params)
        conn.commit()


def _row(db: Path, seq: int) -> dict:
    with closing(sqlite3.connect(db)) as conn:
        conn.row_factory = sqlite3.Row
        return dict(conn.execute("SELECT * FROM audit WHERE seq = ?", (seq,)).fetchone())


def _names(problem: str, seq: int) -> bool:
    return re.search(rf"\bentry {seq}\b", problem) is not None


def _make_log(path: Path) -> AuditLog:
    log = AuditLog(path, role=ROLE_HOSPITAL, identity="St Elsewhere")
    log.append(DATA_LOAD, purpose="credit-risk-research", details={"rows": 5000, "kept": 4870})
    log.append(RUN_START, purpose="credit-risk-research", details={"model": "mlp", "rounds": 2})
    log.append(ROUND_TRAIN, purpose="credit-risk-research", epsilon=0.4, details={"round": 1})
    log.append(ROUND_TRAIN, purpose="credit-risk-research", epsilon=0.4, details={"round": 2})
    log.append(RELEASE, purpose="credit-risk-research", epsilon=0.8,
               details={"sha256": hashlib.sha256(b"model").hexdigest()})
    log.append(REFUSAL, details={"reason": "budget exhausted", "requested_epsilon": 2.0})
    return log


@pytest.fixture()
def log(tmp_path: Path) -> AuditLog:
    return _make_log(tmp_path / "audit.sqlite")


def test_clean_log_verifies_and_stores_the_documented_chain(log: AuditLog) -> None:
    result = log.verify()
    assert result.ok and result.problems == [] and result.entries == N
    assert format_verification(result) == f"audit log intact: {N} entries"
    entries = log.entries()
    assert [e.seq for e in entries] == list(range(1, N + 1))
    assert [e.action for e in entries] == [DATA_LOAD, RUN_START, ROUND_TRAIN, ROUND_TRAIN, RELEASE, REFUSAL]
    assert [e.epsilon for e in entries] == [None, None, 0.4, 0.4, 0.8, None]
    assert entries[5].purpose is None and entries[5].details["reason"] == "budget exhausted"
    assert all(e.role == ROLE_HOSPITAL and e.identity == "St Elsewhere" for e in entries)
    assert all(datetime.fromisoformat(e.ts).utcoffset() == timezone.utc.utcoffset(None) for e in entries)
    prev = GENESIS
    for e in entries:
        assert e.prev_hash == prev
        assert e.hash == _documented_hash(e.seq, prev, _row(log.path, e.seq))
        prev = e.hash
    anchor = log.head()
    assert anchor is not None and (anchor.count, anchor.head) == (N, entries[-1].hash)


def _changed(field: str, old: object, pos: int) -> object:
    """A different value for `field` of entry `pos`, of the kind an attacker would write."""
    if field == "epsilon":
        return 0.25 if old is None else float(old) + 0.5  # type: ignore[arg-type]
    if field == "purpose" and old is None:
        return "marketing"
    fixed = {"seq": 100 + pos, "prev_hash": "f" * 64, "hash": "e" * 64,
             "ts": "1999-01-01T00:00:00.000000+00:00", "details": '{"rows":999999}'}
    return fixed.get(field, f"{old}-x")


@pytest.mark.parametrize("pos", range(1, N + 1))
@pytest.mark.parametrize("field", FIELDS)
def test_editing_any_field_of_any_entry_is_detected_and_named(log: AuditLog, pos: int, field: str) -> None:
    old = _row(log.path, pos)[field]
    _sql(log.path, (f"UPDATE audit SET {field} = ? WHERE seq = ?", (_changed(field, old, pos), pos)))
    result = log.verify()
    assert not result.ok
    assert all(_names(p, pos) for p in result.problems), result.problems
    verb = "reordered" if field == "seq" else "edited"
    assert any(verb in p for p in result.problems), result.problems


@pytest.mark.parametrize("pos", range(1, N + 1))
def test_rewriting_an_entry_with_a_recomputed_hash_is_detected(log: AuditLog, pos: int) -> None:
    row = _row(log.path, pos)
    row["details"] = json.dumps({"rows": 1}, separators=(",", ":"))
    forged = _documented_hash(pos, row["prev_hash"], row)
    _sql(log.path, ("UPDATE audit SET details = ?, hash = ? WHERE seq = ?", (row["details"], forged, pos)))
    result = log.verify()
    assert not result.ok and any(_names(p, pos) and "edited" in p for p in result.problems), result.problems


@pytest.mark.parametrize("pos", range(1, N + 1))
def test_deleting_any_entry_is_detected(log: AuditLog, pos: int) -> None:
    _sql(log.path, ("DELETE FROM audit WHERE seq = ?", (pos,)))
    result = log.verify()
    assert not result.ok
    assert result.problems and all(_names(p, pos) and "deleted" in p for p in result.problems), result.problems
    assert ("truncated at the tail" in result.problems[0]) == (pos == N)


@pytest.mark.parametrize("pos", range(1, N + 1))
def test_deleting_an_entry_and_renumbering_the_rest_to_close_the_gap_is_detected(
        log: AuditLog, pos: int) -> None:
    _sql(log.path, ("DELETE FROM audit WHERE seq = ?", (pos,)),
         ("UPDATE audit SET seq = seq - 1 WHERE seq > ?", (pos,)))
    result = log.verify()
    assert not result.ok
    assert result.problems and all(_names(p, pos) and "deleted" in p for p in result.problems), result.problems


@pytest.mark.parametrize("pos", range(1, N))
def test_deleting_two_entries_and_renumbering_names_both(log: AuditLog, pos: int) -> None:
    _sql(log.path, ("DELETE FROM audit WHERE seq IN (?, ?)", (pos, pos + 1)),
         ("UPDATE audit SET seq = seq - 2 WHERE seq > ?", (pos + 1,)))
    problems = log.verify().problems
    assert len(problems) == 1 and problems[0].startswith(f"entries {pos}-{pos + 1}: deleted"), problems


@pytest.mark.parametrize("pos", range(1, N + 1))
def test_inserting_a_forged_entry_before_any_entry_is_detected(log: AuditLog, pos: int) -> None:
    prev = GENESIS if pos == 1 else _row(log.path, pos - 1)["hash"]
    fake = {"role": ROLE_HOSPITAL, "identity": "St Elsewhere", "action": RELEASE,
            "ts": _row(log.path, pos)["ts"], "purpose": "credit-risk-research", "epsilon": 0.01,
            "details": json.dumps({"note": "nothing to see"}, separators=(",", ":"))}
    fake_hash = _documented_hash(pos, prev, fake)
    _sql(log.path,
         ("UPDATE audit SET seq = -seq WHERE seq >= ?", (pos,)),
         "UPDATE audit SET seq = 1 - seq WHERE seq < 0",  # make room: later entries move up one
         ("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
          (pos, prev, *fake.values(), fake_hash)))
    assert _documented_hash(pos, prev, _row(log.path, pos)) == _row(log.path, pos)["hash"]  # self-consistent
    result = log.verify()
    assert not result.ok
    assert any(_names(p, pos) and "inserted" in p for p in result.problems), result.problems


@pytest.mark.parametrize("pos", range(1, N + 1))
def test_swapping_any_entry_with_its_neighbour_is_detected(log: AuditLog, pos: int) -> None:
    other = pos + 1 if pos < N else pos - 1
    _sql(log.path,
         ("UPDATE audit SET seq = -1 WHERE seq = ?", (pos,)),
         ("UPDATE audit SET seq = ? WHERE seq = ?", (pos, other)),
         ("UPDATE audit SET seq = ? WHERE seq = -1", (other,)))
    result = log.verify()
    assert not result.ok
    for seq in (pos, other):
        assert any(_names(p, seq) and "reordered" in p for p in result.problems), result.problems


def test_tail_truncation_is_caught_by_the_anchor_and_only_by_an_external_copy_if_both_are_rewritten(
        log: AuditLog, tmp_path: Path) -> None:
    shipped = log.head()  # what the node ships elsewhere after appending
    backup = tmp_path / "anchor-before"
    shutil.copy(log.anchor_path, backup)
    _sql(log.path, "DELETE FROM audit WHERE seq >= 5")
    result = log.verify()
    assert not result.ok
    assert result.problems == [f"entries 5-{N}: deleted - log truncated at the tail (the anchor records {N} entries)"]

    # An attacker who also rewrites the anchor to the new head is not caught locally (documented
    # limit), but is caught against the copy shipped off the node.
    entries = log.entries()
    log.anchor_path.write_text(json.dumps({"count": len(entries), "head": entries[-1].hash}))
    assert log.verify().ok
    against_copy = log.verify(anchor=shipped)
    assert not against_copy.ok and any("entries 5-6: deleted" in p for p in against_copy.problems)

    log.anchor_path.unlink()
    missing = log.verify()
    assert not missing.ok and any("anchor" in p and "missing" in p for p in missing.problems)


def test_a_forged_append_after_the_head_is_caught_by_the_anchor(log: AuditLog) -> None:
    last = _row(log.path, N)
    fake = {"role": ROLE_HOSPITAL, "identity": "St Elsewhere", "action": RELEASE, "ts": last["ts"],
            "purpose": "credit-risk-research", "epsilon": 0.0, "details": "{}"}
    _sql(log.path, ("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (N + 1, last["hash"], *fake.values(), _documented_hash(N + 1, last["hash"], fake))))
    result = log.verify()
    assert not result.ok
    assert result.problems == [f"entry {N + 1}: inserted after the anchored head (the anchor records {N} entries)"]


def test_format_verification_gives_one_line_per_problem(log: AuditLog) -> None:
    _sql(log.path, "DELETE FROM audit WHERE seq = 2", "UPDATE audit SET action = 'release' WHERE seq = 4")
    result = log.verify()
    lines = format_verification(result).splitlines()
    assert lines == result.problems and len(lines) == 2
    assert any(_names(line, 2) and "deleted" in line for line in lines)
    assert any(_names(line, 4) and "edited" in line for line in lines)


@pytest.mark.parametrize("key,value", [
    ("name", "Jane Roe"), ("national_id", "X1-77"), ("phone", "5550100"), ("address", "1 High St"),
    ("patient_id", "p-17"), ("mrn", "000123"), ("ssn", "078-05-1120"), ("email", "jr@example.org"),
    ("dob", "1970-01-01"), ("patientName", "Jane Roe"), ("Phone-Number", "5550100"),
    ("first_name", "Jane"), ("date_of_birth", "1970-01-01"), ("contact.email", "jr@example.org"),
])
def test_identifier_keys_are_refused_without_echoing_the_value(log: AuditLog, key: str, value: str) -> None:
    details: dict = {"rows": 10}
    outer, _, inner = key.partition(".")
    details[outer] = {inner: value} if inner else value
    before = (log.entries(), log.anchor_path.read_bytes())
    with pytest.raises(AuditIdentifierError) as info:
        log.append(DATA_LOAD, details=details)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert f"'{key}'" in message and value not in message
    assert (log.entries(), log.anchor_path.read_bytes()) == before  # nothing written


@pytest.mark.parametrize("value", ["078-05-1120", "+1-555-867-5309", "1-555-867-5309", "(555) 867-5309",
                                   "call 555-867-5309 after 5pm", "AB123456C", "123456789012"])
def test_identifier_values_are_refused_and_named_by_key_only(log: AuditLog, value: str) -> None:
    with pytest.raises(AuditIdentifierError) as info:
        log.append(REFUSAL, details={"note": value})
    message = str(info.value)
    assert "'note'" in message and value not in message and "\n" not in message
    assert not any(chunk in message for chunk in re.findall(r"\d{3,}", value))
    with pytest.raises(AuditIdentifierError, match="purpose") as info:
        log.append(REFUSAL, purpose=value)
    assert value not in str(info.value)
    assert len(log.entries()) == N


@pytest.mark.parametrize("value", [
    "2024-05-01T10:22:33.123456+00:00", hashlib.sha256(b"x").hexdigest(), "0.123456789",
    "123e4567-e89b-12d3-a456-426614174000", "hospital_1.parquet", "credit-risk-research", "1.41.0"])
def test_ordinary_values_are_accepted(log: AuditLog, value: str) -> None:
    entry = log.append(RUN_START, details={"value": value, "patients": 15000, "n_patients": 3})
    assert entry.details["value"] == value and log.verify().ok


def test_a_digest_that_happens_to_be_all_digits_is_kept_as_a_digest(log: AuditLog) -> None:
    """About one 16-hex digest in 1,900 is all digits, which the value filter reads as a card number.
    Wrapped as a Digest (a value the code hashed itself) it is kept; the bare string is still refused."""
    lucky = next(d for i in range(10**6) if (d := hashlib.sha256(str(i).encode()).hexdigest()[:16]).isdigit())
    entry = log.append(RELEASE, details={"grant-ref": Digest(lucky), "kind": "revoked"})
    assert entry.details == {"grant-ref": lucky, "kind": "revoked"} and log.verify().ok
    with pytest.raises(AuditIdentifierError):
        log.append(RELEASE, details={"grant-ref": lucky})
    for not_a_digest in ("078-05-1120", "555 867 5309", "ABCDEF123456", "12345678"):
        with pytest.raises(AuditIdentifierError, match="Digest"):
            Digest(not_a_digest)


def _append_many(path: str, worker: int, count: int) -> None:
    log = AuditLog(path, role=ROLE_HOSPITAL, identity=f"worker-{worker}")
    for i in range(count):
        log.append(ROUND_TRAIN, purpose="credit-risk-research", epsilon=0.01, details={"i": i})


def test_concurrent_appends_from_four_processes_keep_one_verifying_chain(tmp_path: Path) -> None:
    path, workers, count = tmp_path / "shared.sqlite", 4, 30
    AuditLog(path, role=ROLE_HOSPITAL, identity="setup")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(path), w, count)) for w in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    log = AuditLog(path, role=ROLE_HOSPITAL, identity="auditor")
    result = log.verify()
    assert result.ok, result.problems
    entries = log.entries()
    assert [e.seq for e in entries] == list(range(1, workers * count + 1))
    seen = {(e.identity, e.details["i"]) for e in entries}
    assert seen == {(f"worker-{w}", i) for w in range(workers) for i in range(count)}
    assert log.head().count == workers * count  # type: ignore[union-attr]


def test_a_federation_of_500_hospitals_fits_an_entry_and_its_names_can_be_checked(tmp_path: Path) -> None:
    """An enrolment or a round of 500 hospitals used to exceed an entry's size and fail the run at
    provisioning; past NAMES_LISTED_UP_TO names the entry holds the count and a digest of the
    sorted names, which the manifest's list reproduces, and a small federation is still listed."""
    from privacy.audit import NAMES_LISTED_UP_TO, NODE_ENROL, hospital_names

    names = [f"hospital_{i:03d}" for i in range(500)]
    log = AuditLog(tmp_path / "audit.sqlite", role=ROLE_HOSPITAL, identity="hospital_000")
    log.append(NODE_ENROL, details={"hospitals": hospital_names(reversed(names))})
    log.append(ROUND_TRAIN, purpose="credit-risk-research", epsilon=0.5,
               details={"contributors": hospital_names(names[:NAMES_LISTED_UP_TO])})
    enrol, round_entry = log.entries()
    summary = json.loads(enrol.details_json)["hospitals"]
    assert summary == {"count": 500, "sha256": hashlib.sha256("\n".join(names).encode()).hexdigest()}
    assert json.loads(round_entry.details_json)["contributors"] == names[:NAMES_LISTED_UP_TO]
    assert log.verify().problems == []


def test_a_few_very_long_names_are_summarised_too(tmp_path: Path) -> None:
    """The summary also applies by size: 40 names of 60 characters would pass the count but not
    the entry's limit (an approver could add approvals under long names to block a release)."""
    from privacy.audit import NODE_ENROL, hospital_names

    names = [f"h{i:02d}-" + "x" * 56 for i in range(40)]
    log = AuditLog(tmp_path / "audit.sqlite", role=ROLE_HOSPITAL, identity="h00")
    log.append(NODE_ENROL, details={"hospitals": hospital_names(names)})
    assert json.loads(log.entries()[0].details_json)["hospitals"]["count"] == 40
