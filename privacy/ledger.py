"""A hospital's persistent privacy budget ledger: what each purpose may spend, and what it has.

Each hospital node keeps one SQLite file. A purpose (a slug such as "credit-risk-research")
has a total budget (epsilon_total, delta). Every charge is stored as its mechanism's parameters,
never as an epsilon alone, so the ledger composes charges properly: the purpose's spent epsilon
is the privacy loss distribution (PLD) composition of all its charges at the budget's delta
(`privacy.accounting.compose_epsilon`, `ACCOUNTANT`: dp_accounting's PLD, pessimistic). That is
tighter than adding per-run epsilons, and than the RDP composition fedrisk used before; anyone
can recompute it, and Opacus's PRV accountant, an independent implementation, agrees with it.

Each charge records the accountant it was admitted under (`Charge.accountant`) and the
purpose's epsilon after it by that accountant (`epsilon_after`): the record of the decision, as
it was made. What a purpose has spent is never read from those records: it is always the PLD
composition of every charge's parameters, recomputed.

Schema versions. 3 (this one) records each charge's accountant. 2 (RDP era) had none: opening a
version-2 file migrates it in place, in one transaction that either completes or leaves the file
as it was, copying every charge row (id, purpose, run, slot, identity, kind, actor, mechanism,
epsilon_after, time) and marking each as admitted under `RDP_ACCOUNTANT`, and writes one row to
`migrations` per purpose with its spent epsilon by RDP before and by PLD after. 1 (no identity,
two kinds) migrates the same way.

Migration may make room in a budget. PLD composition of the same charges gives a smaller epsilon
than RDP did (about 12% less at the demo's settings), so a purpose that had room under RDP has
more after migration and may accept charges RDP would have refused. That is legitimate only because
both figures are upper bounds on the same mechanisms' true privacy loss, proved by different
means: RDP converts Renyi divergences to (epsilon, delta) with a loose conversion, while the
pessimistic PLD bounds the privacy loss distribution itself, so the PLD figure is the tighter
valid bound (tests hold it at no less than the PRV accountant's estimate minus 2%, and never
above RDP). Nothing is under-counted: every charge ever made is still composed, with the
parameters it was charged with; only the arithmetic that bounds their sum is sharper. A
charge that would take the PLD composition past epsilon_total is refused as before.

A budget that was full under RDP stays full: where the RDP spend had reached epsilon_total
(spent to the last, or closed at what was spent by a rollback recovery, `clients.anchoring`,
because charges lost with a restored backup are unknown), the migration lowers epsilon_total to
the PLD spend, so the room the sharper arithmetic finds is not handed to a purpose someone
decided must stop. Both totals are in `migrations`; an operator may raise a budget deliberately.

Every noisy output is charged exactly once, under one identity. A charge fills a *slot*
(purpose, run_id, slot), e.g. "round-3" of a training run; the schema holds each slot at most
once. The caller names the output it is about to release by an *identity* (a digest of what
determines it: purpose, run, round, start model, run configuration, records used). Charging a
filled slot again with the same identity, mechanism and kind is a retry and returns the
original charge; with anything else it is a second noisy output on one slot, and is refused
(`ChargeConflict`), because it would spend the budget twice while the ledger recorded it once.

`charge` is atomic across processes without composing under the write lock: it reads a
snapshot, composes outside any lock (the slow part), then in one `BEGIN IMMEDIATE` transaction
checks that the purpose's budget and last charge id are unchanged and inserts, or starts again.
After `_OPTIMISTIC_ATTEMPTS` lost races it composes under the lock, so a busy ledger still makes
progress. Two requests racing for the last of a budget therefore cannot both get it. SQLite's
own errors never escape a race: a lock held past `busy_timeout` is `LedgerBusy`, a slot filled
by another process in the meantime resolves to its charge or to `ChargeConflict`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar


from federation import stores
from federation.errors import PrivacyBudgetError
from privacy.accounting import (  # noqa: F401  (the ledger's mechanisms live in accounting)
    ACCOUNTANT,
    RDP_ACCOUNTANT,
    RDP_ORDERS,
    BudgetParameterError,
    GaussianMechanism,
    _check,
    _epsilon,
    compose_epsilon,
)

KINDS = ("training", "analytics", "evaluation")
SCHEMA_VERSION = 3
# Snapshots a charge may lose to other writers before it composes under the write lock instead.
# Each loss means another charge committed, so this bounds the extra compositions, not the wait.
_OPTIMISTIC_ATTEMPTS = 3
_SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
_KIND_CHECK = ", ".join(f"'{kind}'" for kind in KINDS)
_BUDGETS_TABLE = """CREATE TABLE IF NOT EXISTS budgets (
    purpose TEXT PRIMARY KEY, epsilon_total REAL NOT NULL, delta REAL NOT NULL,
    updated_at TEXT NOT NULL)"""
_CHARGES_TABLE = f"""CREATE TABLE {{name}} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    purpose TEXT NOT NULL REFERENCES budgets(purpose),
    run_id TEXT NOT NULL, slot TEXT NOT NULL, identity TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL CHECK (kind IN ({_KIND_CHECK})), actor TEXT NOT NULL,
    sample_rate REAL NOT NULL, noise_multiplier REAL NOT NULL, steps INTEGER NOT NULL,
    epsilon_after REAL NOT NULL, charged_at TEXT NOT NULL, accountant TEXT NOT NULL,
    UNIQUE (purpose, run_id, slot))"""
_COLUMNS = ("id, purpose, run_id, slot, identity, kind, actor, sample_rate, noise_multiplier, steps, "
            "epsilon_after, charged_at, accountant")
_MIGRATIONS_TABLE = """CREATE TABLE IF NOT EXISTS migrations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, from_version INTEGER NOT NULL, to_version INTEGER NOT NULL,
    purpose TEXT NOT NULL, charges INTEGER NOT NULL, spent_before REAL NOT NULL, accountant_before TEXT NOT NULL,
    spent_after REAL NOT NULL, accountant_after TEXT NOT NULL, epsilon_total_before REAL NOT NULL,
    epsilon_total_after REAL NOT NULL, migrated_at TEXT NOT NULL)"""
# What an old charges table's rows become: version 1 called the slot `idempotency_key`, had no
# identity and allowed two kinds; its rows are copied with identity '' (unknown), which no later
# charge's identity matches. Neither version 1 nor 2 recorded an accountant: both were RDP.
_FROM_OLD = {
    version: ("INSERT INTO charges_new (id, purpose, run_id, slot, identity, kind, actor, sample_rate, "
              "noise_multiplier, steps, epsilon_after, charged_at, accountant) SELECT id, purpose, run_id, "
              f"{slot}, {identity}, kind, actor, sample_rate, noise_multiplier, steps, epsilon_after, charged_at, "
              "? FROM charges")
    for version, slot, identity in ((1, "idempotency_key", "''"), (2, "slot", "identity"))}
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6
_R = TypeVar("_R")


class UnknownPurpose(PrivacyBudgetError):
    """No budget has been set for this purpose on this node."""


class BudgetExceeded(PrivacyBudgetError):
    """A charge would take a purpose past its epsilon_total; the ledger was left unchanged."""

    def __init__(self, purpose: str, requested: float, would_be: float, spent: float,
                 total: float, delta: float) -> None:
        self.purpose, self.requested, self.would_be = purpose, requested, would_be
        self.spent, self.total, self.delta = spent, total, delta
        super().__init__(
            f"privacy budget for '{purpose}' exceeded: charge of epsilon={requested:.4g} on its own "
            f"would bring the ledger to epsilon={would_be:.4g}, spent {spent:.4g} of {total:.4g} "
            f"(delta={delta:g}); refused, nothing charged")


class ChargeConflict(PrivacyBudgetError):
    """A slot already holds the charge of a different noisy output; nothing was written."""

    def __init__(self, ledger: Path, existing: "Charge", identity: str, mechanism: "GaussianMechanism",
                 kind: str) -> None:
        self.existing = existing
        differs = [name for name, ours, theirs in (("identity", identity, existing.identity),
                                                   ("mechanism", mechanism, existing.mechanism),
                                                   ("kind", kind, existing.kind)) if ours != theirs]
        super().__init__(
            f"slot '{existing.slot}' of run '{existing.run_id}' for '{existing.purpose}' in ledger {ledger} "
            f"was already charged for another noisy output (charge {existing.id}, different "
            f"{' and '.join(differs)}); charging it again would spend the budget twice; refused, nothing charged")


class LedgerBusy(PrivacyBudgetError):
    """Another process held the ledger's lock longer than the busy timeout; nothing was written."""


@dataclass(frozen=True)
class Budget:
    """The total a purpose may spend on this node."""

    purpose: str
    epsilon_total: float
    delta: float


@dataclass(frozen=True)
class Charge:
    """One committed charge: which slot of which run, for which noisy output (`identity`), who
    spent what, and the purpose's epsilon after it. `id` orders charges across all purposes."""

    id: int
    purpose: str
    run_id: str
    slot: str
    identity: str
    kind: str
    actor: str
    mechanism: GaussianMechanism
    epsilon_after: float
    charged_at: str
    accountant: str = ACCOUNTANT
    """The accountant the charge was admitted under, which computed `epsilon_after`
    (`RDP_ACCOUNTANT` for charges migrated from schema version 2 or 1)."""

    @property
    def idempotency_key(self) -> str:
        """The slot, under its name before schema version 2 (for readers not yet moved)."""
        return self.slot

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "mechanism": self.mechanism.to_dict()}


@dataclass(frozen=True)
class _Snapshot:
    """A purpose's budget (None if unset) and charges as one read transaction saw them."""

    budget: Budget | None
    charges: list[Charge]

    @property
    def last_id(self) -> int | None:
        return self.charges[-1].id if self.charges else None


def _charge_from_row(row: tuple[Any, ...]) -> Charge:
    return Charge(row[0], row[1], row[2], row[3], row[4], row[5], row[6],
                  GaussianMechanism(row[7], row[8], row[9]), row[10], row[11], row[12])


def _is_busy(error: Exception) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    return "locked" in str(error) or "busy" in str(error)


class BudgetLedger:
    """The privacy budget ledger in one SQLite file (WAL mode), safe to share between processes.

    `busy_timeout` is how long, in seconds, a writer waits for another process's transaction
    before giving up with `LedgerBusy`. Opening a version-1 or version-2 file migrates it in place.
    """

    def __init__(self, path: str | Path, *, busy_timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._busy_as_typed():  # an encrypted store reads its first page on opening
            self._db = stores.connect(self.path, timeout=busy_timeout, isolation_level=None)
        try:
            with self._busy_as_typed():
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute("PRAGMA foreign_keys=ON")
                current = self._version()
            if current != SCHEMA_VERSION:
                with self._transaction(immediate=True):
                    self._upgrade(self._version())  # re-read under the lock: another opener may have done it
        except BaseException:
            self._db.close()
            raise

    def _version(self) -> int:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise PrivacyBudgetError(f"ledger {self.path} has schema version {version}, newer than "
                                     f"this fedrisk understands ({SCHEMA_VERSION})")
        return version

    def _upgrade(self, version: int) -> None:
        """Bring the schema from `version` to SCHEMA_VERSION inside the caller's transaction.

        SQLite cannot alter a CHECK constraint or add a NOT NULL column without a default, so an
        old charges table is rebuilt: every row copied with its id (and marked RDP, the only
        accountant before version 3), the copy counted against the original, the AUTOINCREMENT
        counter carried over, then the old table dropped. Each purpose's spent epsilon by RDP
        before and by PLD after goes into `migrations`. Any failure rolls the whole file back
        to the version it had."""
        if version == SCHEMA_VERSION:
            return
        self._db.execute(_BUDGETS_TABLE)
        self._db.execute(_MIGRATIONS_TABLE)
        if version == 0:
            self._db.execute(_CHARGES_TABLE.format(name="IF NOT EXISTS charges"))
        else:
            self._db.execute(_CHARGES_TABLE.format(name="charges_new"))
            self._db.execute(_FROM_OLD[version], (RDP_ACCOUNTANT,))
            copied = self._db.execute("SELECT count(*) FROM charges_new").fetchone()[0]
            held = self._db.execute("SELECT count(*) FROM charges").fetchone()[0]
            if copied != held:
                raise PrivacyBudgetError(f"ledger {self.path}: migration copied {copied} of {held} charges; "
                                         f"left at schema version {version}")
            row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'charges'").fetchone()
            self._db.execute("DROP TABLE charges")
            self._db.execute("ALTER TABLE charges_new RENAME TO charges")
            if row is not None:
                self._db.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'charges'", row)
            now = _now()
            for (purpose,) in self._db.execute("SELECT purpose FROM budgets ORDER BY purpose").fetchall():
                budget, charges = self._budget(purpose), self._charges(purpose)
                mechanisms = [c.mechanism for c in charges]
                before = compose_epsilon(mechanisms, budget.delta, accountant=RDP_ACCOUNTANT)
                after = compose_epsilon(mechanisms, budget.delta)
                total = budget.epsilon_total
                if charges and before >= total * (1 - 1e-9):
                    # Full under RDP (spent, or closed by a rollback recovery at what was spent):
                    # it stays full. Only budgets that had room gain some.
                    total = max(after, 1e-9)
                    self._db.execute("UPDATE budgets SET epsilon_total = ?, updated_at = ? WHERE purpose = ?",
                                     (total, now, purpose))
                self._db.execute(
                    "INSERT INTO migrations (from_version, to_version, purpose, charges, spent_before, "
                    "accountant_before, spent_after, accountant_after, epsilon_total_before, epsilon_total_after, "
                    "migrated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (version, SCHEMA_VERSION, purpose, len(charges), before, RDP_ACCOUNTANT, after, ACCOUNTANT,
                     budget.epsilon_total, total, now))
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def migrations(self) -> list[dict[str, object]]:
        """What each schema migration of this file found, per purpose: its charges and its spent
        epsilon by the accountant before (RDP) and after (PLD). Empty for a file created at version 3."""
        with self._transaction():
            cursor = self._db.execute("SELECT * FROM migrations ORDER BY id")
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "BudgetLedger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _busy_as_typed(self) -> Iterator[None]:
        """SQLite's "database is locked" becomes LedgerBusy naming this file; other errors pass."""
        try:
            yield
        except stores.OperationalError as error:
            if not _is_busy(error):
                raise
            raise LedgerBusy(f"ledger {self.path} is busy: another process held it for more than "
                             f"{self.busy_timeout:g} s; nothing was written, try again") from error

    @contextmanager
    def _transaction(self, *, immediate: bool = False) -> Iterator[None]:
        """One transaction; IMMEDIATE takes the write lock up front so check-then-write is atomic."""
        with self._busy_as_typed():
            self._db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _budget(self, purpose: str) -> Budget:
        budget = self._budget_or_none(purpose)
        if budget is None:
            raise UnknownPurpose(f"no privacy budget set for purpose '{purpose}' in ledger {self.path}")
        return budget

    def _budget_or_none(self, purpose: str) -> Budget | None:
        row = self._db.execute("SELECT epsilon_total, delta FROM budgets WHERE purpose = ?",
                               (purpose,)).fetchone()
        return None if row is None else Budget(purpose, row[0], row[1])

    def _charges(self, purpose: str) -> list[Charge]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM charges WHERE purpose = ? ORDER BY id", (purpose,))
        return [_charge_from_row(row) for row in rows]

    def _snapshot(self, purpose: str) -> _Snapshot:
        """Budget and charges of `purpose` in the current transaction."""
        return _Snapshot(self._budget_or_none(purpose), self._charges(purpose))

    def _unchanged(self, purpose: str, snapshot: _Snapshot) -> bool:
        """Whether, in the current transaction, the purpose still has the snapshot's budget and
        last charge. Charges are never updated or deleted and ids only grow, so that is enough."""
        last = self._db.execute("SELECT max(id) FROM charges WHERE purpose = ?", (purpose,)).fetchone()[0]
        return last == snapshot.last_id and self._budget_or_none(purpose) == snapshot.budget

    def _write_if_unchanged(self, purpose: str, plan: Callable[[_Snapshot], tuple[bool, Any]],
                            write: Callable[[_Snapshot, Any], _R]) -> _R:
        """Run `plan` (slow, writes nothing) on a snapshot outside the write lock, then `write`
        under BEGIN IMMEDIATE if nothing changed since; otherwise start again. `plan` returns
        (done, value): done means `value` is the answer and nothing needs writing. After
        _OPTIMISTIC_ATTEMPTS changed snapshots, `plan` runs under the lock so progress is certain."""
        for attempt in range(_OPTIMISTIC_ATTEMPTS + 1):
            locked = attempt == _OPTIMISTIC_ATTEMPTS
            if not locked:
                with self._transaction():
                    snapshot = self._snapshot(purpose)
                done, value = plan(snapshot)
                if done:
                    return value
            with self._transaction(immediate=True):
                if locked:
                    snapshot = self._snapshot(purpose)
                    done, value = plan(snapshot)
                    if done:
                        return value
                elif not self._unchanged(purpose, snapshot):
                    continue
                return write(snapshot, value)
        raise AssertionError("unreachable: the last attempt holds the write lock")

    def set_budget(self, purpose: str, epsilon_total: float, delta: float) -> Budget:
        """Create or update a purpose's budget. Delta is fixed once anything has been charged
        (every stored epsilon is at that delta), and epsilon_total may not drop below what is spent."""
        _check(isinstance(purpose, str) and bool(_SLUG.match(purpose)),
               f"purpose must be a slug like 'credit-risk-research', got {purpose!r}")
        _check(0.0 < epsilon_total < math.inf, f"epsilon_total must be > 0 and finite, got {epsilon_total!r}")
        _check(0.0 < delta < 1.0, f"delta must be in (0, 1), got {delta!r}")
        budget = Budget(purpose, float(epsilon_total), float(delta))

        def plan(snapshot: _Snapshot) -> tuple[bool, Budget]:
            charges = snapshot.charges
            if charges and snapshot.budget is not None:
                old = snapshot.budget
                if delta != old.delta:
                    raise PrivacyBudgetError(f"cannot change delta for '{purpose}' from {old.delta:g} to "
                                             f"{delta:g}: {len(charges)} charge(s) already recorded")
                spent = _epsilon([c.mechanism for c in charges], delta)
                if epsilon_total < spent:
                    raise PrivacyBudgetError(f"cannot lower epsilon_total for '{purpose}' to {epsilon_total:g}: "
                                             f"{spent:.4g} already spent")
            return False, budget

        def write(snapshot: _Snapshot, budget: Budget) -> Budget:
            self._db.execute(
                "INSERT INTO budgets (purpose, epsilon_total, delta, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (purpose) DO UPDATE SET epsilon_total = excluded.epsilon_total, "
                "delta = excluded.delta, updated_at = excluded.updated_at",
                (purpose, budget.epsilon_total, budget.delta, _now()))
            return budget

        return self._write_if_unchanged(purpose, plan, write)

    def purposes(self) -> list[str]:
        """Every purpose that has a budget, in name order."""
        with self._transaction():
            return [row[0] for row in self._db.execute("SELECT purpose FROM budgets ORDER BY purpose")]

    def budget(self, purpose: str) -> Budget:
        """The purpose's total budget; UnknownPurpose if none was set."""
        with self._transaction():
            return self._budget(purpose)

    def spent(self, purpose: str) -> float:
        """Epsilon, at the budget's delta, of all committed charges composed."""
        return self._composed(purpose, [])

    def remaining(self, purpose: str) -> float:
        """epsilon_total minus spent (never below zero)."""
        return max(0.0, self.budget(purpose).epsilon_total - self.spent(purpose))

    def run_spent(self, purpose: str, run_id: str) -> float:
        """Epsilon, at the purpose's delta, of the composition of one run's charges only
        (0.0 if the run has none): what that run's outputs, taken together, cost."""
        with self._transaction():
            budget = self._budget(purpose)
            mechanisms = [c.mechanism for c in self._charges(purpose) if c.run_id == run_id]
        return _epsilon(mechanisms, budget.delta)

    def history(self, purpose: str) -> list[Charge]:
        """Every committed charge for the purpose, oldest first."""
        with self._transaction():
            self._budget(purpose)
            return self._charges(purpose)

    def run_would_spend(self, purpose: str, run_id: str, mechanism: GaussianMechanism, *, slot: str) -> float:
        """The run's epsilon at the budget's delta if `mechanism` were charged in `slot`: every
        other slot of the run composed with it (what a node holds to its per-run cap)."""
        others = [c.mechanism for c in self.history(purpose) if c.run_id == run_id and c.slot != slot]
        return compose_epsilon(others + [mechanism], self.budget(purpose).delta)

    def all_charges(self) -> list[Charge]:
        """Every committed charge across all purposes, in id (commit) order: the sequence a
        hash chain over the ledger covers."""
        with self._transaction():
            return [_charge_from_row(row) for row in self._db.execute(f"SELECT {_COLUMNS} FROM charges ORDER BY id")]

    def would_spend(self, purpose: str, mechanism: GaussianMechanism) -> float:
        """The ledger's epsilon if `mechanism` were charged now (nothing is written)."""
        return self._composed(purpose, [mechanism])

    def would_spend_all(self, purpose: str, mechanisms: list[GaussianMechanism]) -> float:
        """The ledger's epsilon if all of `mechanisms` were charged now (nothing is written)."""
        return self._composed(purpose, list(mechanisms))

    def _composed(self, purpose: str, extra: list[GaussianMechanism]) -> float:
        with self._transaction():
            budget = self._budget(purpose)
            mechanisms = [c.mechanism for c in self._charges(purpose)]
        return _epsilon(mechanisms + extra, budget.delta)

    def charge(self, purpose: str, mechanism: GaussianMechanism, *, run_id: str, kind: str,
               actor: str, slot: str, identity: str) -> Charge:
        """Charge `mechanism` to `purpose` for one noisy output, atomically, or raise and write nothing.

        `slot` is what one run may charge at most once ("round-3", "eval-round-3",
        "query-<digest>:<datadigest>"); `identity` names the output (normally a hex digest of
        everything that determines it). The same (purpose, run_id, slot) with the same identity,
        mechanism and kind is a retry: the original charge comes back and nothing is spent.
        Anything else on a filled slot raises ChargeConflict. BudgetExceeded if the charge would
        take the purpose past epsilon_total; LedgerBusy if another process holds the file too long.
        """
        _check(isinstance(mechanism, GaussianMechanism), f"mechanism must be a GaussianMechanism, got {mechanism!r}")
        _check(kind in KINDS, f"kind must be one of {KINDS}, got {kind!r}")
        for name, value in (("run_id", run_id), ("actor", actor), ("slot", slot), ("identity", identity)):
            _check(isinstance(value, str) and value != "", f"{name} must be a non-empty string, got {value!r}")

        def filled(snapshot: _Snapshot) -> Charge | None:
            """The slot's charge if it is filled by this very output; ChargeConflict if by another."""
            for done in snapshot.charges:
                if (done.run_id, done.slot) == (run_id, slot):
                    if (done.identity, done.mechanism, done.kind) != (identity, mechanism, kind):
                        raise ChargeConflict(self.path, done, identity, mechanism, kind)
                    return done
            return None

        def plan(snapshot: _Snapshot) -> tuple[bool, Charge | float]:
            if snapshot.budget is None:
                raise UnknownPurpose(f"no privacy budget set for purpose '{purpose}' in ledger {self.path}")
            retry = filled(snapshot)
            if retry is not None:
                return True, retry
            return False, _epsilon([c.mechanism for c in snapshot.charges] + [mechanism], snapshot.budget.delta)

        def write(snapshot: _Snapshot, after: Charge | float) -> Charge:
            assert snapshot.budget is not None and isinstance(after, float)
            budget = snapshot.budget
            if after > budget.epsilon_total:
                # recomputed, not the last epsilon_after: a migrated charge's is by RDP
                spent = _epsilon([c.mechanism for c in snapshot.charges], budget.delta)
                raise BudgetExceeded(purpose, mechanism.epsilon(budget.delta), after, spent,
                                     budget.epsilon_total, budget.delta)
            charged_at = _now()
            cursor = self._db.execute(
                "INSERT INTO charges (purpose, run_id, slot, identity, kind, actor, sample_rate, "
                "noise_multiplier, steps, epsilon_after, charged_at, accountant) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (purpose, run_id, slot, identity, kind, actor, mechanism.sample_rate,
                 mechanism.noise_multiplier, mechanism.steps, after, charged_at, ACCOUNTANT))
            charge_id = int(cursor.lastrowid)  # type: ignore[arg-type]  # set: the INSERT just ran
            return Charge(charge_id, purpose, run_id, slot, identity, kind, actor, mechanism, after, charged_at,
                          ACCOUNTANT)

        try:
            return self._write_if_unchanged(purpose, plan, write)
        except stores.IntegrityError as error:
            # Only reachable if the slot was filled behind the unchanged-check (the schema's
            # UNIQUE caught it): resolve against what is now there.
            with self._transaction():
                snapshot = self._snapshot(purpose)
            retry = filled(snapshot)
            if retry is None:
                raise PrivacyBudgetError(f"ledger {self.path} refused the charge of slot '{slot}' of run "
                                         f"'{run_id}' for '{purpose}': {error}") from error
            return retry


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")
