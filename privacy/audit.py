"""A tamper-evident audit log: every data load, run, round, release and refusal, hash-chained.

Each node (hospital or server) keeps one SQLite file. An entry records who (role, identity),
what (action), when (UTC ISO timestamp), for which purpose, the epsilon it charged, and a small
JSON `details` dict. Entry k stores

    hash_k = SHA-256( canonical JSON of [k, hash_{k-1}, fields_k] ),   hash_0 = GENESIS

(canonical: sorted keys, no spaces, UTF-8), so editing, deleting, inserting or reordering an
entry breaks a hash or a link, and `verify` names the entry and what happened to it.
Identifiers never enter the log: `append` refuses details whose keys suggest one (name, phone,
patient_id, ...) or whose strings look like a phone or national ID number.

The chain alone cannot show that the newest entries were deleted, or that someone with write
access appended forged entries after the genuine head. So every append also replaces an anchor
file `<db>.head` (entry count and head hash; temp file + os.replace, under the write lock).
Limits, stated plainly:
- Someone who can rewrite the DB *and* the anchor, recomputing every hash, is NOT detected.
  The anchor is only as safe as where it is kept: ship `head()` off the node (to the server,
  a backup, a signed report) after appends, and check with `verify(anchor=that_copy)`.
- A crash between writing the anchor and committing leaves the anchor one entry ahead;
  `verify` then reports that entry as deleted at the tail (confirm from backups).
- Deleting every entry and the anchor and reopening starts a fresh log; only an external
  anchor copy reveals that.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import astuple, dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from federation import stores
from federation.errors import FedriskError

GENESIS = "0" * 64
ROLE_HOSPITAL, ROLE_SERVER, ROLE_DATA_SCIENTIST = "hospital-node", "server", "data-scientist"

# Every action any fedrisk audit log records, in one place: the log's whole vocabulary.
# A hospital node's log:
NODE_INIT, NODE_ENROL, POLICY_SET = "node.init", "node.enrol", "policy.set"
NODE_SEAL, NODE_KEY_ROTATE = "node.seal", "node.key-rotate"  # secrets sealed at rest; a CKKS or signing key replaced
DATA_LOAD, REFUSAL, CONSENT_REVOKE, CONSENT_RESTORE = "data.load", "refusal", "consent.revoke", "consent.restore"
CONSENT_ERASE, NODE_PURGE = "consent.erase", "node.purge"  # an erasure request carried out; retention enforced
RUN_START, ROUND_TRAIN, ROUND_EVALUATE, RELEASE = "run.start", "round.train", "round.evaluate", "release"
DECRYPTION, CONTRIBUTION_DROPPED = "decryption", "decryption.dropped"
ANCHOR_BEHIND, ANCHOR_ACCEPTED = "anchor.behind", "anchor.accepted"
ANALYTICS_ANSWER = "analytics.answer"
RELEASE_INSTALL, RELEASE_WITHDRAW = "release.install", "release.withdraw"  # also the registry's withdrawal
GRANT_ISSUE, GRANT_REVOKE, GRANT_REFUSED = "grant.issue", "grant.revoke", "grant.refused"
GRANT_KEY_ROTATE = "grant.key-rotate"
SCORE_USE, SCORE_REFUSED = "score.grant-use", "score.refused"
USAGE_REPORT = "usage.report"  # a patient's access request answered from the node's records (clients.usage)
RELAY_REQUEST, RELAY_REFUSED = "relay.request", "relay.refused"  # the node service's federation socket
# The coordinator's run log, the release registry's and the signals service's:
RUN_RESUME, REPLY_REJECTED, ROUND_MISSING = "run.resume", "reply.rejected", "round.missing"
ANALYTICS_RELEASE, RELEASE_CREATE, SIGNALS_REQUEST = "analytics.release", "release.create", "signals.request"
RELEASE_APPROVE = "release.approve"  # the registry's log: one of a release's two approvals
INCIDENT_CONTAIN = "incident.contain"  # any party's log: a containment step (`fedrisk incident contain`)
WORKSPACE_PURGE = "workspace.purge"  # the registry's log: old runs and their artifacts deleted (retention)
COHORTS_PURGE = "cohorts.purge"  # the signals service's log: approved cohort tables past retention deleted
STORES_SEAL, STORES_REKEY = "stores.seal", "stores.rekey"  # the signals service's log: its stores encrypted at
# rest (`fedrisk serve seal`), re-encrypted under a new at-rest key (`fedrisk serve rekey`)
MAX_DETAILS_CHARS = 4096  # a summary of an event, never data

_ACTION = re.compile(r"[a-z][a-z0-9_-]*(?:\.[a-z0-9_-]+)*")
_COLUMNS = "seq, prev_hash, role, identity, action, ts, purpose, epsilon, details, hash"
_SELECT = f"SELECT {_COLUMNS} FROM audit ORDER BY seq"
_SCHEMA = """CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY, prev_hash TEXT NOT NULL, role TEXT NOT NULL,
    identity TEXT NOT NULL, action TEXT NOT NULL, ts TEXT NOT NULL, purpose TEXT,
    epsilon REAL, details TEXT NOT NULL, hash TEXT NOT NULL)"""
_ID_WORDS = frozenset({
    "name", "names", "surname", "forename", "firstname", "lastname", "fullname", "phone",
    "telephone", "mobile", "address", "email", "mail", "mrn", "ssn", "dob", "birthdate",
    "birthday", "postcode", "zipcode", "nationalid", "patientid", "passport", "nhs"})
_ID_PHRASES = ("national_id", "patient_id", "record_id", "person_id", "subject_id", "applicant_id",
               "customer_id", "date_of_birth", "birth_date", "social_security", "medical_record",
               "zip_code", "post_code")
_ID_VALUE = re.compile(
    r"(?<![\w-])(?<!\d\.)(?:"
    r"\d{3}-\d{2}-\d{4}"                                    # ddd-dd-dddd (SSN style)
    r"|(?:\+?\d{1,3}[ .-])?\(?\d{3}\)?[ .-]?\d{3}[ .-]\d{4}"  # +1-ddd-ddd-dddd, (ddd) ddd-dddd
    r"|[A-Z]{2}\d{6}[A-D]"                                  # UK National Insurance number
    r"|\d{9,}"                                              # a bare run of 9+ digits
    r")(?![\w-]|\.\d)")


class AuditIdentifierError(FedriskError, ValueError):
    """`append` was given something that looks like a personal identifier; nothing was written."""


class Digest(str):
    """A hex digest or random hex handle the code computed itself (an API key id, a grant
    reference, a query or model SHA-256). About one n-character digest in (16/10)^n is all
    digits and would read as an ID number to the value filter, so a `Digest` is exempt from
    that scan. Only the format (lowercase hex, 12+ characters) is checked here: wrap values the
    code derived from a hash or a random draw, never a value that came in from outside."""

    def __new__(cls, value: str) -> Digest:
        if not isinstance(value, str) or not _HEX_DIGEST.fullmatch(value):
            raise AuditIdentifierError("refused audit details: a Digest must be lowercase hex of 12-128 characters")
        return super().__new__(cls, value)


_HEX_DIGEST = re.compile(r"[0-9a-f]{12,128}")

NAMES_LISTED_UP_TO = 64
NAMES_LISTED_CHARS = 2048
"""`hospital_names` lists up to NAMES_LISTED_UP_TO names, of at most NAMES_LISTED_CHARS together;
more are summarised (an entry is at most MAX_DETAILS_CHARS, and a 500-hospital federation's
names, or a few very long ones, are not)."""


def hospital_names(names: Iterable[str]) -> object:
    """Names (hospitals, approvers) for an entry's details: the sorted list, or past
    NAMES_LISTED_UP_TO names or NAMES_LISTED_CHARS characters, {"count", "sha256" of the sorted
    names one per line}, which the full list (the manifest, the run's summary) can be checked against."""
    ordered = sorted(names)
    if len(ordered) <= NAMES_LISTED_UP_TO and len(json.dumps(ordered)) <= NAMES_LISTED_CHARS:
        return ordered
    return {"count": len(ordered), "sha256": Digest(hashlib.sha256("\n".join(ordered).encode()).hexdigest())}


@dataclass(frozen=True)
class AuditEntry:
    """One stored entry, as read from the DB (`details_json` is its canonical JSON text)."""

    seq: int
    prev_hash: str
    role: str
    identity: str
    action: str
    ts: str
    purpose: str | None
    epsilon: float | None
    details_json: str
    hash: str

    @property
    def details(self) -> dict[str, Any]:
        """The details dict (raises ValueError if the stored text was mangled)."""
        return json.loads(self.details_json)

    def hash_at(self, seq: int) -> str | None:
        """The hash this entry's fields and stored link give at position `seq`;
        None if a field is unreadable or the details text is not canonical."""
        try:
            details = json.loads(self.details_json)
            if _canonical(details) != self.details_json:
                return None
            fields = {"role": self.role, "identity": self.identity, "action": self.action,
                      "ts": self.ts, "purpose": self.purpose, "epsilon": self.epsilon,
                      "details": details}
            return hashlib.sha256(_canonical([seq, self.prev_hash, fields]).encode()).hexdigest()
        except (TypeError, ValueError):
            return None


@dataclass(frozen=True)
class AuditAnchor:
    """Entry count and head hash after the last append: what a truncation or forgery changes."""

    count: int
    head: str


@dataclass(frozen=True)
class AuditVerification:
    """Outcome of `AuditLog.verify`: one line per problem, each naming an entry."""

    entries: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


class AuditLog:
    """The audit log of one party at `path` (SQLite), anchored by `<path>.head`.

    role: who writes, e.g. ROLE_HOSPITAL; identity: which one, e.g. the hospital's name.
    Safe for several processes appending at once (each append is one BEGIN IMMEDIATE
    transaction that reads the head and inserts after it).
    """

    def __init__(self, path: str | os.PathLike[str], *, role: str, identity: str,
                 budget: Callable[[], Mapping[str, tuple[float, float]]] | None = None) -> None:
        """budget: for a node's log, {purpose: (spent, total)} from its ledger, for the alert rules
        (`privacy.alerts`: watching starts when an alerts.json is beside the log)."""
        for what, value in (("role", role), ("identity", identity)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"audit log {what} must be a non-empty string")
        _refuse_identifiers({"role": role, "identity": identity}, "")
        self.path, self.role, self.identity = Path(path), role, identity
        self.anchor_path = Path(f"{self.path}.head")
        self._budget = budget
        self._monitor: Any = None  # privacy.alerts.AlertMonitor, opened at the first append
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._transaction() as db:
            db.execute(_SCHEMA)
            empty = db.execute("SELECT COUNT(*) FROM audit").fetchone()[0] == 0
            if empty and not self.anchor_path.exists():
                self._write_anchor(AuditAnchor(0, GENESIS))

    def append(self, action: str, *, purpose: str | None = None, epsilon: float | None = None,
               details: dict[str, Any] | None = None) -> AuditEntry:
        """Record one event; raises AuditIdentifierError (nothing written) on identifiers.

        action: dotted lower-case name (DATA_LOAD, RUN_START, ...); purpose: the run's purpose
        slug or None; epsilon: epsilon this event charged, or None; details: small JSON dict.
        """
        if not isinstance(action, str) or not _ACTION.fullmatch(action):
            raise ValueError("audit action must be a dotted lower-case name such as 'data.load'")
        if purpose is not None and not isinstance(purpose, str):
            raise ValueError("audit purpose must be a string or None")
        if epsilon is not None:
            epsilon = float(epsilon)
            if not math.isfinite(epsilon) or epsilon < 0:
                raise ValueError("audit epsilon must be a finite non-negative number or None")
        details = dict(details or {})
        _refuse_identifiers(purpose, "purpose")
        _refuse_identifiers(details, "")
        try:
            details_json = _canonical(details)
        except (TypeError, ValueError):
            raise ValueError("audit details must hold only JSON values (str, number, bool, "
                             "null, list, dict)") from None
        if len(details_json) > MAX_DETAILS_CHARS:
            raise ValueError(f"audit details exceed {MAX_DETAILS_CHARS} characters; log a summary")
        with self._transaction() as db:
            last = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
            ts = datetime.now(timezone.utc).isoformat(timespec="microseconds")
            entry = AuditEntry(seq, prev, self.role, self.identity, action, ts, purpose, epsilon,
                               details_json, "")
            entry = replace(entry, hash=entry.hash_at(seq) or "")
            db.execute(f"INSERT INTO audit ({_COLUMNS}) VALUES ({', '.join('?' * 10)})",
                       astuple(entry))
            self._write_anchor(AuditAnchor(seq, entry.hash))  # under the lock: anchors stay ordered
        self._watch(entry)
        return entry

    def _watch(self, entry: AuditEntry) -> None:
        """Feed the alert rules (if an alerts.json is beside the log). An alert problem is reported
        on stderr and never undoes or fails the audited event."""
        import sys

        from privacy.alerts import CONFIG_FILE, AlertMonitor

        if self._monitor is None and not (self.path.parent / CONFIG_FILE).is_file():
            return
        try:
            if self._monitor is None:
                since = (datetime.now(timezone.utc) - timedelta(days=1)).isoformat(timespec="microseconds")
                with closing(self._connect()) as db:
                    history = [AuditEntry(*row) for row in db.execute(
                        f"SELECT {_COLUMNS} FROM audit WHERE ts >= ? AND seq < ? ORDER BY seq", (since, entry.seq))]
                self._monitor = AlertMonitor.beside(self.path, f"{self.role}:{self.identity}", budget=self._budget,
                                                    history=history)
            if self._monitor is not None:
                self._monitor.observe(entry)
        except Exception as exc:  # noqa: BLE001  (watching must not break what it watches)
            print(f"fedrisk: alert rules of {self.path.name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)

    def refusal(self, error: BaseException, *, purpose: str | None = None) -> AuditEntry:
        """Record a refusal with its one-line reason. A reason the identifier filter rejects
        (it may quote a path or a number) is recorded by its kind only."""
        kind = type(error).__name__
        try:
            return self.append(REFUSAL, purpose=purpose, details={"reason": str(error)[:300], "kind": kind})
        except ValueError:
            return self.append(REFUSAL, purpose=purpose, details={"reason": kind, "kind": kind})

    def entries(self) -> list[AuditEntry]:
        """All stored entries in sequence order (as stored; `verify` says whether to trust them)."""
        with closing(self._connect()) as db:
            return [AuditEntry(*row) for row in db.execute(_SELECT)]

    def head(self) -> AuditAnchor | None:
        """The anchor written by the last append, or None if the file is missing.
        Ship a copy elsewhere: it is what catches a rewrite of the DB and this file together."""
        try:
            raw = json.loads(self.anchor_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        return AuditAnchor(count=int(raw["count"]), head=str(raw["head"]))

    def verify(self, anchor: AuditAnchor | None = None) -> AuditVerification:
        """Check the chain against `anchor` (default: the anchor file) and name every problem."""
        state = ""
        with self._transaction() as db:  # hold the write lock: no append is half-done
            rows = [AuditEntry(*row) for row in db.execute(_SELECT)]
            try:
                anchor = anchor or self.head()
                state = "missing" if anchor is None else ""
            except (ValueError, KeyError, TypeError):
                state = "unreadable"
        problems = [f"anchor {self.anchor_path.name} is {state}: deletion at the tail and forged "
                    "appends cannot be ruled out"] if state else []
        return AuditVerification(entries=len(rows), problems=problems + _diagnose(rows, anchor))

    def _connect(self) -> stores.Connection:
        return stores.connect(self.path, timeout=60.0, isolation_level=None)

    @contextmanager
    def _transaction(self) -> Iterator[stores.Connection]:
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _write_anchor(self, anchor: AuditAnchor) -> None:
        tmp = self.anchor_path.with_name(f"{self.anchor_path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(_canonical({"count": anchor.count, "head": anchor.head}))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.anchor_path)


def format_verification(result: AuditVerification) -> str:
    """What the CLI prints: one line per problem, or 'audit log intact: N entries'."""
    return f"audit log intact: {result.entries} entries" if result.ok else "\n".join(result.problems)


def _diagnose(rows: list[AuditEntry], anchor: AuditAnchor | None) -> list[str]:
    """Find each stored entry's original position (where its own hash verifies), then report
    entries whose hash verifies nowhere (edited), surplus claims on a position (inserted),
    positions nobody holds (deleted), moves not explained by those (reordered), broken links
    between genuine neighbours and a head that differs from the anchor (rewritten)."""
    def authentic(r: AuditEntry, p: int) -> bool:
        return p >= 1 and r.hash_at(p) == r.hash and bool(r.hash)

    by_hash = {r.hash: r for r in rows}
    orig: dict[int, int] = {}  # stored seq -> position where the entry's own hash verifies
    h, p = (anchor.head, anchor.count) if anchor else ("", 0)
    while p >= 1 and h in by_hash and by_hash[h].seq not in orig and authentic(by_hash[h], p):
        orig[by_hash[h].seq], h, p = p, by_hash[h].prev_hash, p - 1  # back from the anchored head
    for r in (r for r in rows if r.seq not in orig):
        p = next((p for p in (r.seq, r.seq - 1, r.seq + 1) if authentic(r, p)), None)
        if p is not None:
            orig[r.seq] = p
    progress = True
    while progress:  # moved further: position = predecessor's position + 1
        progress = False
        for r in (r for r in rows if r.seq not in orig):
            pred = by_hash.get(r.prev_hash)
            p = 1 if r.prev_hash == GENESIS else (orig.get(pred.seq, -1) + 1 if pred else 0)
            if authentic(r, p):
                orig[r.seq], progress = p, True
    referenced = {r.prev_hash for r in rows} | ({anchor.head} if anchor else set())
    claims: dict[int, list[AuditEntry]] = {}
    for r in rows:
        if r.seq in orig:
            claims.setdefault(orig[r.seq], []).append(r)
    forged: set[int] = set()
    for rs in (rs for rs in claims.values() if len(rs) > 1):
        unreferenced = [r for r in rs if r.hash not in referenced]
        forged.update(r.seq for r in (unreferenced if 0 < len(unreferenced) < len(rs) else rs[1:]))
    genuine = {orig[r.seq]: r for r in rows if r.seq in orig and r.seq not in forged}
    edited = {r.seq for r in rows if r.seq not in orig and not (anchor and r.seq > anchor.count)}
    held = sorted(p for p in set(genuine) | edited if p >= 1)
    forged_sorted, problems = sorted(forged), []
    for r in rows:
        p = orig.get(r.seq)
        if r.seq in forged:
            problems.append(f"entry {r.seq}: inserted (a forged or copied entry claiming "
                            f"position {p}, which the chain already holds)")
        elif anchor and (p or r.seq) > anchor.count:
            problems.append(f"entry {r.seq}: inserted after the anchored head "
                            f"(the anchor records {anchor.count} entries)")
        elif p is None:
            problems.append(f"entry {r.seq}: edited ({_what_changed(r, genuine, referenced)})")
        elif not -(p - 1 - bisect_left(held, p)) <= r.seq - p <= bisect_left(forged_sorted, r.seq):
            problems.append(f"entry {p}: reordered (stored at position {r.seq})")  # unexplained move
    top = held[-1] if held else 0
    for lo, hi in _gaps(held, anchor.count if anchor else 0):
        span = f"entry {lo}" if lo == hi else f"entries {lo}-{hi}"
        tail = f" - log truncated at the tail (the anchor records {hi} entries)" if lo > top else ""
        problems.append(f"{span}: deleted{tail}")
    for p, r in sorted(genuine.items()):
        if p == 1 and r.prev_hash != GENESIS:
            problems.append("entry 1: edited (rewritten with a recomputed hash: it does not "
                            "chain to the genesis value)")
        elif p - 1 in genuine and r.prev_hash != genuine[p - 1].hash:
            problems.append(f"entry {p - 1} or entry {p}: edited (rewritten with a recomputed "
                            f"hash: entry {p} does not chain to entry {p - 1})")
    if anchor and anchor.count in genuine and genuine[anchor.count].hash != anchor.head:
        problems.append(f"entry {anchor.count}: edited (rewritten with a recomputed hash: it "
                        "does not match the anchored head)")
    return problems


def _what_changed(r: AuditEntry, genuine: dict[int, AuditEntry], referenced: set[str]) -> str:
    """Say which part of an entry whose hash verifies nowhere was edited."""
    here = r.hash_at(r.seq)
    if here is not None and here in referenced:
        return "its stored hash was changed"
    before = GENESIS if r.seq == 1 else getattr(genuine.get(r.seq - 1), "hash", None)
    if before is not None and replace(r, prev_hash=before).hash_at(r.seq) == r.hash:
        return "its link to the previous entry was changed"
    return "its contents do not match its hash"


def _gaps(held: list[int], last: int) -> Iterator[tuple[int, int]]:
    """Runs of positions in 1..max(held, last) that no entry holds: [2, 5], 7 -> (1,1) (3,4) (6,7)."""
    before = 0
    for p in [*held, max([last, *held]) + 1]:
        if p > before + 1:
            yield before + 1, p - 1
        before = p


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def _is_identifier_key(key: str) -> bool:
    norm = re.sub(r"[^a-z0-9]+", "_", re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key).lower()).strip("_")
    return (bool(set(norm.split("_")) & _ID_WORDS) or norm.replace("_", "") in _ID_WORDS
            or any(f"_{phrase}_" in f"_{norm}_" for phrase in _ID_PHRASES))


def _refuse_identifiers(value: Any, where: str) -> None:
    """Raise AuditIdentifierError naming the key (never the value) if `value` holds an identifier."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if not isinstance(key, str) or _ID_VALUE.search(key):
                raise AuditIdentifierError(f"refused audit details: a key under {where or 'details'!r}"
                                           " is not a string or looks like an ID number")
            path = f"{where}.{key}" if where else key
            if _is_identifier_key(key):
                raise AuditIdentifierError(f"refused audit details: key {path[:60]!r} suggests an "
                                           "identifier; identifiers never enter the audit log")
            _refuse_identifiers(inner, path)
    elif isinstance(value, (list, tuple)):
        for i, inner in enumerate(value):
            _refuse_identifiers(inner, f"{where}[{i}]")
    elif isinstance(value, str) and not isinstance(value, Digest) and _ID_VALUE.search(value):
        raise AuditIdentifierError(f"refused audit details: the value of {where[:60]!r} looks like a "
                                   "phone or national ID number; identifiers never enter the audit log")
