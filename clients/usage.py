"""A patient's usage record, kept on their hospital's node (`fedrisk node usage`): which training
runs, cohort queries, release evaluations, membership audits and bank scorings used their record,
for which purpose, when, and at what privacy cost.

An access request is answered from the node's own records, never from anything the coordinator
says: the hash-chained audit log (`privacy.audit`), the consent withdrawal history
(`privacy.consent.RevocationRegistry`), the grants store (`privacy.grants`), the budget ledger
(`privacy.ledger`), the export and the consent columns its schema declares. The record key only
computes the pseudonym (`privacy.pseudonym`) and is never written anywhere; building the answer
writes nothing, and `record_answer` writes the one `usage.report` audit entry that says it was given.

Recorded and derived uses. Some events name the patient: a bank scoring (`score.grant-use`) names
its grant, which `grants.sqlite` links to the pseudonym, and a consent change names the pseudonym.
Those rows are RECORDED. Runs and queries read every record whose consent holds, and the log says
that, not which records: `data.load` (a run's records, with purpose and counts) and
`analytics.answer` (a cohort query, a release's DP evaluation, a membership audit). For those the
row is DERIVED: the record was among them if it is in the export, its consent column for the
purpose was granted and current that day, and it was not withdrawn at that moment, decided by the
node's own rule (`ConsentPolicy.decide`). Withdrawals are ordered against a use by the audit
entries that record each withdrawal and restore (exact), or, for a change with no audit entry, by
the registry's time to the second (a change in the same second as the use counts either way, so
a possible use is listed). A run's rounds belong to the latest load of their purpose before them
(a node trains on its most recent load: loads are cached only while export, schema, withdrawals
and day are unchanged). A training-split record is trained on; a held-out one is scored in the
DP evaluation of each round and in a release's DP evaluation (which reads held-out records only).

Epsilon. A DP use shows the privacy-loss bound of its ledger charges, linked through the log (a
round's charge identity; an answer's run, query digest and ledger total), composed at the
purpose's budget delta. For a run that is every round charged while the record was in its data,
training and evaluation alike: a bound whatever the split. A charge counts once, so a repeated
answer (the same noise) costs nothing more; per purpose, the composition over the uses listed
bounds what the record has cost at this node. A score is not DP: it is a disclosure the patient
authorised, to one bank.

Limits, said in the report where they apply: the derivation reads the CURRENT export and schema
(the node keeps no older copy); a load reads the withdrawals when it starts and is logged when it
ends, so a withdrawal made in between is taken as already in force; a consent's day is the node's
local date, as the load used it; a record no longer in the export gets its recorded uses only; and
the answer is as complete as the audit log, whose chain is verified first.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, TextIO

import pandas as pd

from clients.node_state import NodeState, test_split
from clients.validation import validate_export
from federation.errors import ConfigError
from federation.query import MEMBERSHIP_SCORE, RISK_SCORE
from privacy.accounting import compose_epsilon
from privacy.audit import (ANALYTICS_ANSWER, CONSENT_RESTORE, CONSENT_REVOKE, DATA_LOAD, GRANT_ISSUE, GRANT_REFUSED,
                           GRANT_REVOKE, REFUSAL, RELEASE, ROUND_EVALUATE, ROUND_TRAIN, RUN_START, SCORE_REFUSED,
                           SCORE_USE, USAGE_REPORT, AuditEntry, Digest)
from privacy.consent import REVOKED
from privacy.grants import list_grants
from privacy.ledger import Charge

DERIVED, RECORDED = "derived", "recorded"
TRAINING, LOAD, QUERY, EVALUATION, MEMBERSHIP = ("training run", "data load", "cohort query", "release evaluation",
                                                 "membership audit")
SCORING, GRANT, REFUSED, CONSENT, ACCESS = "bank scoring", "grant", "refused scoring", "consent", "access request"
USE_KINDS = (TRAINING, LOAD, QUERY, EVALUATION, MEMBERSHIP, SCORING)
"""Kinds of row that are a use of the record; the others (a grant issued or revoked, a refused
scoring, a consent change, an earlier access request) are events the patient should see beside them."""
CSV_COLUMNS = ("time_utc", "kind", "purpose", "what", "epsilon", "basis", "use", "audit_seq", "related_seqs",
               "ledger_charges", "export_changed_since")


class UsageRequestError(ConfigError):
    """An access request this node cannot answer as asked (one line, never the record key)."""


class UnknownRecord(UsageRequestError):
    """No record of the export has the key, and nothing the node holds names its pseudonym."""


class UncoveredPurpose(UsageRequestError):
    """The purpose asked for is one no consent column of the node's schema covers."""


@dataclass(frozen=True)
class UsageRow:
    """One use of the record, or one event beside the uses, as the node's records show it.

    at: when (UTC, the audit entry's time); kind: one of the kinds above; purpose: the purpose it
    served; what: in plain words; epsilon: the DP bound of this use at this node (None: not a DP
    output, or nothing charged); basis: DERIVED or RECORDED; seq: the audit entry it stands on;
    related: further audit entries it draws on (a run's rounds and release); charges: the ledger
    charge ids its epsilon composes; export_changed: derived from an export or schema modified
    since, so judged on the current one."""

    at: datetime
    kind: str
    purpose: str | None
    what: str
    epsilon: float | None
    basis: str
    seq: int
    related: tuple[int, ...] = ()
    charges: tuple[int, ...] = ()
    export_changed: bool = False

    @property
    def is_use(self) -> bool:
        """Whether the row is a use of the record (not an event beside the uses)."""
        return self.kind in USE_KINDS


@dataclass(frozen=True)
class UsageReport:
    """A patient's usage record at one node: rows oldest first, the epsilon per purpose composed
    over the uses listed (at `delta[purpose]`), notes on what limits the answer, and whether the
    audit log's chain verified. `pseudonym` is for the audit entry only; reports show a prefix."""

    hospital: str
    pseudonym: str
    purpose: str | None
    rows: tuple[UsageRow, ...]
    totals: dict[str, float]
    delta: dict[str, float]
    notes: tuple[str, ...]
    audit_intact: bool

    @property
    def uses(self) -> tuple[UsageRow, ...]:
        """The rows that are uses of the record (what the counts and the audit entry count)."""
        return tuple(r for r in self.rows if r.is_use)


@dataclass
class _Load:
    """A `data.load` entry, the run whose start it followed (if any), and the rounds of each run
    that trained or evaluated on what it loaded."""

    entry: AuditEntry
    run: str | None
    rounds: dict[str, list[AuditEntry]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Draft:
    """A row before its epsilon is set (charges count once, oldest row first)."""

    row: UsageRow
    charges: tuple[Charge, ...] = ()
    fallback_epsilon: float | None = None


def _utc(ts: str) -> datetime:
    """An audit or grant time as an aware UTC datetime."""
    moment = datetime.fromisoformat(ts)
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


def _second(at: datetime) -> str:
    """A time as the withdrawal history stores it: naive UTC ISO, whole seconds (sorts as text)."""
    return at.astimezone(timezone.utc).replace(tzinfo=None, microsecond=0).isoformat()


def minute(at: datetime) -> str:
    """A time as the report prints it: UTC, to the minute."""
    return at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M") + " UTC"


def _rounds(entries: list[AuditEntry]) -> str:
    """'round 1' or 'rounds 1, 2, 3' for a run's round entries."""
    numbers = sorted({int(e.details.get("round", 0)) for e in entries})
    return f"round{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))}"


class _Reader:
    """The node's records about one patient, read once (nothing is written); `drafts` turns them into
    rows, and `usage_record` sets each row's epsilon."""

    def __init__(self, state: NodeState, record_key: str, purpose: str | None) -> None:
        self.state, self.purpose = state, purpose
        self.pseudonym = state.pseudonym_key().pseudonym(str(record_key).strip())
        # the audit log is append-only: entries written before a pseudonym re-key name the old pseudonym
        self.pseudonyms = {self.pseudonym,
                           *(k.pseudonym(str(record_key).strip()) for k in state.retired_pseudonym_keys())}
        schema = state.schema()
        self.policy = schema.consent_policy()
        if purpose is not None and purpose not in self.policy.fields:
            raise UncoveredPurpose(f"no consent column of this node's schema covers {purpose!r} "
                                   f"(purposes: {', '.join(self.policy.fields)})")
        table = validate_export(state.data_file, schema).table
        self.row = table.loc[table[schema.record_key] == str(record_key).strip()].reset_index(drop=True)
        self.held_out = bool(test_split(pd.Series([self.pseudonym]))[0])
        registry = state.directory / "revocations.sqlite"
        self.history = [h for h in (state.revocations().history() if registry.is_file() else [])
                        if h[1] in self.pseudonyms]
        self.grants = {g.grant_id: g for p in sorted(self.pseudonyms) for g in list_grants(state.directory, p)}
        log = state.audit()
        self.audit_intact = log.verify().ok
        self.entries = log.entries()
        self.logged = [e for e in self.entries if e.action in (CONSENT_REVOKE, CONSENT_RESTORE)
                       and e.details.get("pseudonym") in self.pseudonyms]
        self.charges: dict[str, list[Charge]] = {}
        self.delta: dict[str, float] = {}
        with state.ledger() as ledger:
            for name in ledger.purposes():
                self.charges[name], self.delta[name] = ledger.history(name), ledger.budget(name).delta
        changed = max(state.data_file.stat().st_mtime, state.schema_file.stat().st_mtime)
        self.export_changed_at = datetime.fromtimestamp(changed, tz=timezone.utc)
        self._decisions: dict[tuple[Any, ...], bool] = {}

    def known(self) -> bool:
        """Whether the export holds the record, or any of the node's stores names its pseudonym."""
        return not self.row.empty or bool(self.history or self.grants or self.logged)

    # --- consent, as the node decided it then -------------------------------------------------
    def _withdrawn(self, purpose: str, entry: AuditEntry, same_second_before: bool) -> bool:
        """Whether the record's consent for `purpose` stood withdrawn just before `entry`."""
        changes = [(at, action) for at, _, p, action in self.history if p == purpose]
        logged = [e for e in self.logged if e.purpose == purpose]
        # the log's entries order each change exactly against the use, when they are the history's own
        paired = [e.action == CONSENT_REVOKE for e in logged] == [a == REVOKED for _, a in changes]
        cutoff, withdrawn = _second(_utc(entry.ts)), False
        for index, (at, action) in enumerate(changes):
            if paired:
                before = logged[index].seq < entry.seq
            else:
                before = at < cutoff or (at == cutoff and same_second_before)
            if before:
                withdrawn = action == REVOKED
        return withdrawn

    def eligible(self, purpose: str, entry: AuditEntry) -> bool:
        """Whether a use at `entry` that read every record consenting to `purpose` read this one."""
        if self.row.empty or purpose not in self.policy.fields:
            return False
        day = _utc(entry.ts).astimezone().date()  # the node's local date, as the load used it
        outcomes = set()
        for same_second_before in (False, True):
            withdrawn = self._withdrawn(purpose, entry, same_second_before)
            key = (purpose, day, withdrawn)
            if key not in self._decisions:
                decision = self.policy.decide(self.row, purpose, today=day,
                                              revoked={self.pseudonym} if withdrawn else set(),
                                              pseudonyms=pd.Series([self.pseudonym]))
                self._decisions[key] = bool(decision.mask[0])
            outcomes.add(self._decisions[key])
        return True in outcomes

    # --- rows -------------------------------------------------------------------------------
    def _derived(self, entry: AuditEntry, kind: str, what: str, charges: list[Charge],
                 related: tuple[int, ...] = (), fallback: float | None = None) -> _Draft:
        at = _utc(entry.ts)
        row = UsageRow(at, kind, entry.purpose, what, None, DERIVED, entry.seq, related,
                       export_changed=self.export_changed_at > at)
        return _Draft(row, tuple(charges), fallback)

    def _recorded(self, entry: AuditEntry, kind: str, what: str) -> _Draft:
        return _Draft(UsageRow(_utc(entry.ts), kind, entry.purpose, what, None, RECORDED, entry.seq))

    def _run_rows(self, load: _Load, releases: dict[str, AuditEntry]) -> list[_Draft]:
        purpose = str(load.entry.purpose)
        if not load.rounds:
            what = (f"loaded for run {load.run}, which trained and evaluated no round on it" if load.run else
                    f"loaded with every record consenting to {purpose} (no run followed)")
            return [self._derived(load.entry, LOAD, what, [])]
        drafts = []
        for run, rounds in load.rounds.items():
            reading = [r for r in rounds if (r.action == ROUND_EVALUATE) == self.held_out]
            if not reading:
                what = f"run {run}: loaded, but no round of it read your record"
            elif self.held_out:
                what = f"run {run}: held out from training, scored in the DP evaluation of {_rounds(reading)}"
            else:
                what = f"run {run}: trained on in {_rounds(reading)} (DP-SGD)"
            release = releases.get(run)
            related = [r.seq for r in rounds]
            if release is not None and release.seq > load.entry.seq:
                what += f"; model released (sha256 {str(release.details.get('sha256', ''))[:12]}…)"
                related.append(release.seq)
            identities = {str(r.details.get("identity")) for r in rounds}
            charges = [c for c in self.charges.get(purpose, []) if c.run_id == run and c.identity in identities]
            drafts.append(self._derived(load.entry, TRAINING, what, charges, tuple(related)))
        return drafts

    def _answer_row(self, entry: AuditEntry) -> _Draft | None:
        purpose, details = str(entry.purpose), entry.details
        if not self.eligible(purpose, entry):
            return None
        field_name, name, run = details.get("field") or "", details.get("query", "?"), details.get("run", "?")
        if field_name == RISK_SCORE:
            if not self.held_out:
                return None  # a release's DP evaluation reads held-out records only
            kind, what = EVALUATION, f"DP evaluation {name} of a released model (run {run}): your held-out record " \
                "scored"
        elif field_name == MEMBERSHIP_SCORE:
            split = "held-out" if self.held_out else "training"
            kind, what = MEMBERSHIP, f"membership audit {name} (run {run}): your record scored, in the {split} split"
        else:
            measure = f"{details.get('measure', '?')}{' of ' + field_name if field_name else ''}"
            kind, what = QUERY, f"cohort query {name} ({measure}, run {run}): read with every consented record"
        prefix = f"query-{details.get('digest', '')}:"
        linked = [c for c in self.charges.get(purpose, []) if c.kind == "analytics" and c.run_id == run
                  and c.slot.startswith(prefix)]
        exact = [c for c in linked if entry.epsilon is not None and c.epsilon_after == entry.epsilon]
        fallback = details.get("query-epsilon")
        return self._derived(entry, kind, what, (exact or linked)[-1:],
                             fallback=float(fallback) if isinstance(fallback, (int, float)) else None)

    def _grant_row(self, entry: AuditEntry) -> _Draft | None:
        grant = self.grants.get(str(entry.details.get("grant")))
        if grant is None:
            return None
        details, short = entry.details, f"{grant.grant_id[:8]}…"
        if entry.action == SCORE_USE:
            return self._recorded(entry, SCORING, f"scored for {grant.bank} with release {grant.release} (grant "
                                  f"{short}): a rounded probability, its band and up to 3 reason categories "
                                  "left the node")
        if entry.action == GRANT_ISSUE:
            return self._recorded(entry, GRANT, f"grant {short} issued: {grant.bank} may score you with release "
                                  f"{grant.release}, {grant.uses_allowed} time(s), until {minute(_utc(grant.expires))}")
        if entry.action == GRANT_REVOKE:
            return self._recorded(entry, GRANT, f"grant {short} for {grant.bank} revoked")
        return self._recorded(entry, REFUSED, f"{grant.bank}'s request to score you with grant {short} refused "
                              f"({details.get('kind', 'refused')}); nothing left the node")

    def drafts(self) -> list[_Draft]:
        """Every row, in audit order."""
        drafts: list[_Draft] = []
        loads: list[_Load] = []
        latest: dict[str, _Load] = {}
        starting: dict[str, str] = {}
        releases: dict[str, AuditEntry] = {}
        for entry in self.entries:
            action, purpose, details = entry.action, entry.purpose, entry.details
            if self.purpose is not None and purpose not in (self.purpose, None) and action != USAGE_REPORT:
                continue  # another purpose's run, query or scoring: not asked about
            if action == RUN_START and purpose:
                starting[purpose] = str(details.get("run"))
            elif action == REFUSAL and purpose:
                starting.pop(purpose, None)  # a run refused before its load (no consented record, ...) loaded nothing
            elif action == DATA_LOAD and purpose:
                latest[purpose] = _Load(entry, starting.pop(purpose, None))
                if self.eligible(purpose, entry):
                    loads.append(latest[purpose])
            elif action in (ROUND_TRAIN, ROUND_EVALUATE) and purpose in latest:
                latest[str(purpose)].rounds.setdefault(str(details.get("run")), []).append(entry)
            elif action == RELEASE:
                releases.setdefault(str(details.get("run")), entry)
            elif action == ANALYTICS_ANSWER and purpose:
                drafts.extend(d for d in [self._answer_row(entry)] if d)
            elif action in (SCORE_USE, SCORE_REFUSED, GRANT_ISSUE, GRANT_REVOKE, GRANT_REFUSED):
                drafts.extend(d for d in [self._grant_row(entry)] if d)
            elif action in (CONSENT_REVOKE, CONSENT_RESTORE) and details.get("pseudonym") in self.pseudonyms:
                done = "withdrawn" if action == CONSENT_REVOKE else "restored (the withdrawal undone)"
                drafts.append(self._recorded(entry, CONSENT, f"consent for {purpose} {done}"))
            elif action == USAGE_REPORT and details.get("pseudonym") in self.pseudonyms:
                drafts.append(self._recorded(entry, ACCESS, f"an access request answered ({details.get('uses', 0)} "
                                             "use(s) listed)"))
        for load in loads:
            drafts.extend(self._run_rows(load, releases))
        wanted = [d for d in drafts if self.purpose in (None, d.row.purpose) or d.row.kind == ACCESS]
        return sorted(wanted, key=lambda d: (d.row.seq, d.row.related))


def usage_record(state: NodeState, record_key: str, purpose: str | None = None) -> UsageReport:
    """The usage record of the patient with `record_key` at `state`'s node, for `purpose` only or
    every purpose. Reads the node's stores and writes nothing (see `record_answer`). Raises
    UnknownRecord when neither the export nor any store knows the key, UncoveredPurpose for a
    purpose no consent column covers."""
    reader = _Reader(state, record_key, purpose)
    if not reader.known():
        raise UnknownRecord(f"no record of {state.data_file.name} has that record key, and no grant or consent "
                            "change at this node names it; nothing was written")
    rows: list[UsageRow] = []
    attributed: set[int] = set()
    totals: dict[str, float] = {}
    notes: list[str] = []
    by_purpose: dict[str, list[Charge]] = {}
    for draft in reader.drafts():
        fresh = [c for c in draft.charges if c.id not in attributed]
        attributed.update(c.id for c in fresh)
        epsilon, what = (draft.fallback_epsilon if not draft.charges else None), draft.row.what
        if fresh:
            by_purpose.setdefault(fresh[0].purpose, []).extend(fresh)
            epsilon = compose_epsilon([c.mechanism for c in fresh], reader.delta[fresh[0].purpose])
        elif draft.charges:  # the same output again: charged once, repeated with the same noise
            epsilon, what = 0.0, f"{what} (a repeat of the output above, the same noise: nothing more released)"
        if draft.row.basis == DERIVED and draft.row.kind != LOAD and not draft.charges:
            notes.append(f"audit entry {draft.row.seq}: no ledger charge is linked to it, so it is in no total"
                         + ("; its epsilon is the one the audit entry states" if epsilon is not None else ""))
        rows.append(replace(draft.row, what=what, epsilon=epsilon, charges=tuple(c.id for c in draft.charges)))
    for name, charges in by_purpose.items():
        totals[name] = compose_epsilon([c.mechanism for c in charges], reader.delta[name])
    if reader.row.empty:
        notes.append(f"your record is not in the current export ({state.data_file.name}): runs and queries, which "
                     "the log records by count only, cannot be judged; only uses recorded by name are listed")
    stale = [r for r in rows if r.export_changed]
    if stale:
        notes.append(f"{len(stale)} derived use(s) predate the current export or schema (modified "
                     f"{minute(reader.export_changed_at)}): they are judged on its consent columns, as the node "
                     "keeps no older copy")
    if len(reader.logged) != len(reader.history):
        notes.append(f"the withdrawal history holds {len(reader.history)} consent change(s) of your record, the "
                     f"audit log {len(reader.logged)}: uses are ordered against them by the history's time, to the "
                     "second (a change in the same second as a use is taken to allow it)")
    if not reader.audit_intact:
        notes.append("the audit log's chain does NOT verify (`fedrisk audit verify` says where): this answer is only "
                     "as complete as the log")
    return UsageReport(state.hospital, reader.pseudonym, purpose, tuple(rows), totals,
                       {p: reader.delta[p] for p in totals}, tuple(notes), reader.audit_intact)


def record_answer(state: NodeState, report: UsageReport, *, output: str) -> AuditEntry:
    """The one write of an access request: a `usage.report` audit entry naming the pseudonym (as a
    Digest, never the record key), the purpose asked about, the counts and the output form."""
    uses = report.uses
    return state.audit().append(USAGE_REPORT, purpose=report.purpose, details={
        "pseudonym": Digest(report.pseudonym), "uses": len(uses),
        "derived": sum(r.basis == DERIVED for r in uses), "recorded": sum(r.basis == RECORDED for r in uses),
        "events": len(report.rows) - len(uses), "output": output})


def _epsilon_text(row: UsageRow) -> str:
    """A row's epsilon as printed: four decimals, 'not DP' for a score, blank otherwise."""
    if row.epsilon is not None:
        return f"{row.epsilon:.4f}"
    return "not DP" if row.kind == SCORING else ""


def csv_rows(report: UsageReport) -> list[tuple[str, ...]]:
    """The report's rows as CSV records, in `CSV_COLUMNS` order."""
    return [(minute(r.at), r.kind, r.purpose or "", r.what, _epsilon_text(r), r.basis, "yes" if r.is_use else "no",
             str(r.seq), ";".join(map(str, r.related)), ";".join(map(str, r.charges)),
             "yes" if r.export_changed else "no") for r in report.rows]


def write_csv(report: UsageReport, handle: TextIO) -> None:
    """Write the report's rows, with a header line, as CSV to `handle`."""
    writer = csv.writer(handle)
    writer.writerow(CSV_COLUMNS)
    writer.writerows(csv_rows(report))


LEGEND = (
    "derived: the node records that a run or query read every record whose consent for the purpose held (how many, "
    "not which); your record was eligible and used: in the export, its consent granted and current that day, not "
    "withdrawn at that moment",
    "recorded: the log names your record's grant or pseudonym directly",
    "epsilon: a DP output used your record, but your influence on it is bounded by this epsilon (this node's ledger "
    "charges for it; for a run, every round charged while your record was in its data); a bank score is not DP: a "
    "disclosure you authorised, to that bank")
"""What the bases and the epsilons mean, printed under any report that lists a use."""


def report_lines(report: UsageReport) -> list[str]:
    """The report as the officer reads it: a heading, one line per row oldest first, then what the
    bases and epsilons mean, the epsilon per purpose and the notes."""
    uses = report.uses
    scope = f"for {report.purpose}" if report.purpose else "for every purpose"
    lines = [f"{report.hospital}: the usage record of one patient (pseudonym {report.pseudonym[:12]}…) {scope}, "
             "from this node's own audit log, consent history, grants, ledger and export; nothing was asked of the "
             "coordinator",
             f"  {len(uses)} use(s): {sum(r.basis == DERIVED for r in uses)} derived, "
             f"{sum(r.basis == RECORDED for r in uses)} recorded; {len(report.rows) - len(uses)} other event(s)"]
    for r in report.rows:
        epsilon = ("epsilon " if r.epsilon is not None else "") + _epsilon_text(r)
        lines.append(f"  {minute(r.at)}  {r.kind:<18} {r.purpose or '':<22} {r.what}{'  ' + epsilon if epsilon else ''}"
                     f"  [{r.basis}{'' if r.is_use else ', not a use'}; audit entry {r.seq}]"
                     f"{' *' if r.export_changed else ''}")
    if uses:
        lines += [f"  {line}" for line in LEGEND]
    else:
        lines.append(f"  no use of this record is on record at this node {scope}")
    lines += [f"  {name}: at most epsilon {total:.4f} for your record over the DP uses above, composed, at delta "
              f"{report.delta[name]:g}" for name, total in sorted(report.totals.items())]
    lines += [f"  note: {note}" for note in report.notes]
    if any(r.export_changed for r in report.rows):
        lines.append("  * based on the current export (it changed after this use)")
    return lines
