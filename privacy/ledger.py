"""A hospital's persistent privacy budget ledger: what each purpose may spend, and what it has.

Each hospital node keeps one SQLite file. A purpose (a slug such as "credit-risk-research")
has a total budget (epsilon_total, delta). Every charge is stored as its mechanism's parameters,
never as an epsilon alone, so the ledger composes charges properly: it adds the Renyi-DP curves
of all charges over `RDP_ORDERS` and converts the sum to epsilon at the budget's delta (Opacus's
`get_privacy_spent`). That is tighter than adding per-run epsilons, and anyone can recompute it.

`charge` is atomic across processes: the check and the insert happen in one `BEGIN IMMEDIATE`
transaction, so two requests racing for the last of a budget cannot both get it. A charge is
identified by (purpose, run_id, idempotency_key); retrying it returns the original charge
instead of spending twice.
"""

from __future__ import annotations

import math
import numbers
import re
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import numpy as np

from federation.errors import PrivacyBudgetError
from privacy.accounting import RDP_ORDERS, rdp_analysis

KINDS = ("training", "analytics")
SCHEMA_VERSION = 1
_SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (
    purpose TEXT PRIMARY KEY, epsilon_total REAL NOT NULL, delta REAL NOT NULL,
    updated_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS charges (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    purpose TEXT NOT NULL REFERENCES budgets(purpose),
    run_id TEXT NOT NULL, idempotency_key TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('training', 'analytics')), actor TEXT NOT NULL,
    sample_rate REAL NOT NULL, noise_multiplier REAL NOT NULL, steps INTEGER NOT NULL,
    epsilon_after REAL NOT NULL, charged_at TEXT NOT NULL,
    UNIQUE (purpose, run_id, idempotency_key));
"""


class BudgetParameterError(PrivacyBudgetError, ValueError):
    """A budget or mechanism parameter is out of range (the message names it)."""


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


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise BudgetParameterError(message)


@lru_cache(maxsize=1024)
def _rdp_curve(q: float, sigma: float, steps: int, orders: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(rdp_analysis().compute_rdp(q=q, noise_multiplier=sigma, steps=steps,
                                          orders=list(orders)))


@dataclass(frozen=True)
class GaussianMechanism:
    """`steps` releases of the Gaussian mechanism, each on a Poisson sample of rate `sample_rate`.

    DP-SGD is (q, sigma, steps); a plain Gaussian release repeated `count` times is the case
    q = 1 with steps = count. `noise_multiplier` is the noise std divided by the L2 sensitivity.
    """

    sample_rate: float
    noise_multiplier: float
    steps: int

    def __post_init__(self) -> None:
        q, sigma, steps = self.sample_rate, self.noise_multiplier, self.steps
        _check(isinstance(steps, numbers.Integral) and not isinstance(steps, bool) and steps >= 1,
               f"steps must be an integer >= 1, got {steps!r}")
        _check(isinstance(q, numbers.Real) and 0.0 < q <= 1.0, f"sample_rate must be in (0, 1], got {q!r}")
        _check(isinstance(sigma, numbers.Real) and 0.0 < sigma < math.inf,
               f"noise_multiplier must be > 0 and finite, got {sigma!r}")
        for name, cast in (("sample_rate", float), ("noise_multiplier", float), ("steps", int)):
            object.__setattr__(self, name, cast(getattr(self, name)))

    @classmethod
    def gaussian_release(cls, *, noise_multiplier: float, count: int = 1) -> "GaussianMechanism":
        """`count` releases of the plain Gaussian mechanism (no subsampling, q = 1)."""
        return cls(1.0, noise_multiplier, count)

    @property
    def name(self) -> str:
        return "gaussian" if self.sample_rate == 1.0 else "poisson-subsampled-gaussian"

    def rdp(self, orders: Iterable[float] = RDP_ORDERS) -> np.ndarray:
        """Renyi-DP curve of the whole mechanism (all its steps) at `orders`."""
        return np.array(_rdp_curve(self.sample_rate, self.noise_multiplier, self.steps,
                                   tuple(float(a) for a in orders)))

    def epsilon(self, delta: float) -> float:
        """Epsilon at `delta` of this mechanism on its own."""
        return _epsilon([self], delta)

    def describe(self) -> str:
        """One line for logs and refusals."""
        if self.name == "gaussian":
            return f"Gaussian mechanism, noise multiplier {self.noise_multiplier:g}, released {self.steps} time(s)"
        return (f"DP-SGD (Poisson-subsampled Gaussian), sample rate {self.sample_rate:g}, "
                f"noise multiplier {self.noise_multiplier:g}, {self.steps} steps")

    def to_dict(self) -> dict[str, object]:
        """Everything needed to recompute this mechanism's privacy cost."""
        return {"mechanism": self.name, "sample_rate": self.sample_rate,
                "noise_multiplier": self.noise_multiplier, "steps": self.steps}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> "GaussianMechanism":
        return cls(data["sample_rate"], data["noise_multiplier"], data["steps"])  # type: ignore[arg-type]


def _epsilon(mechanisms: Iterable[GaussianMechanism], delta: float) -> float:
    """Epsilon at `delta` of the composition of `mechanisms` (RDP curves added over orders)."""
    curves = [m.rdp() for m in mechanisms]
    if not curves:
        return 0.0
    eps, _ = rdp_analysis().get_privacy_spent(orders=list(RDP_ORDERS), rdp=np.sum(curves, axis=0),
                                            delta=delta)
    return float(eps)


@dataclass(frozen=True)
class Budget:
    """The total a purpose may spend on this node."""

    purpose: str
    epsilon_total: float
    delta: float


@dataclass(frozen=True)
class Charge:
    """One committed charge: who spent what, on which run, and the ledger's epsilon after it."""

    purpose: str
    run_id: str
    idempotency_key: str
    kind: str
    actor: str
    mechanism: GaussianMechanism
    epsilon_after: float
    charged_at: str

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "mechanism": self.mechanism.to_dict()}


class BudgetLedger:
    """The privacy budget ledger in one SQLite file (WAL mode), safe to share between processes.

    `busy_timeout` is how long, in seconds, a writer waits for another process's transaction.
    """

    def __init__(self, path: str | Path, *, busy_timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise PrivacyBudgetError(f"ledger {self.path} has schema version {version}, newer than "
                                     f"this fedrisk understands ({SCHEMA_VERSION})")
        self._db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "BudgetLedger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self, *, immediate: bool = False) -> Iterator[None]:
        """One transaction; IMMEDIATE takes the write lock up front so check-then-write is atomic."""
        self._db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _budget(self, purpose: str) -> Budget:
        row = self._db.execute("SELECT epsilon_total, delta FROM budgets WHERE purpose = ?",
                               (purpose,)).fetchone()
        if row is None:
            raise UnknownPurpose(f"no privacy budget set for purpose '{purpose}' in ledger {self.path}")
        return Budget(purpose, row[0], row[1])

    def _charges(self, purpose: str) -> list[Charge]:
        rows = self._db.execute(
            "SELECT run_id, idempotency_key, kind, actor, sample_rate, noise_multiplier, steps, "
            "epsilon_after, charged_at FROM charges WHERE purpose = ? ORDER BY id", (purpose,))
        return [Charge(purpose, r[0], r[1], r[2], r[3], GaussianMechanism(r[4], r[5], r[6]), r[7], r[8])
                for r in rows]

    def set_budget(self, purpose: str, epsilon_total: float, delta: float) -> Budget:
        """Create or update a purpose's budget. Delta is fixed once anything has been charged
        (every stored epsilon is at that delta), and epsilon_total may not drop below what is spent."""
        _check(isinstance(purpose, str) and bool(_SLUG.match(purpose)),
               f"purpose must be a slug like 'credit-risk-research', got {purpose!r}")
        _check(0.0 < epsilon_total < math.inf, f"epsilon_total must be > 0 and finite, got {epsilon_total!r}")
        _check(0.0 < delta < 1.0, f"delta must be in (0, 1), got {delta!r}")
        with self._transaction(immediate=True):
            charges = self._charges(purpose)
            if charges:
                old = self._budget(purpose)
                if delta != old.delta:
                    raise PrivacyBudgetError(f"cannot change delta for '{purpose}' from {old.delta:g} to "
                                             f"{delta:g}: {len(charges)} charge(s) already recorded")
                spent = _epsilon([c.mechanism for c in charges], delta)
                if epsilon_total < spent:
                    raise PrivacyBudgetError(f"cannot lower epsilon_total for '{purpose}' to {epsilon_total:g}: "
                                             f"{spent:.4g} already spent")
            self._db.execute(
                "INSERT INTO budgets (purpose, epsilon_total, delta, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (purpose) DO UPDATE SET epsilon_total = excluded.epsilon_total, "
                "delta = excluded.delta, updated_at = excluded.updated_at",
                (purpose, float(epsilon_total), float(delta), _now()))
        return Budget(purpose, float(epsilon_total), float(delta))

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

    def history(self, purpose: str) -> list[Charge]:
        """Every committed charge for the purpose, oldest first."""
        with self._transaction():
            self._budget(purpose)
            return self._charges(purpose)

    def would_spend(self, purpose: str, mechanism: GaussianMechanism) -> float:
        """The ledger's epsilon if `mechanism` were charged now (nothing is written)."""
        return self._composed(purpose, [mechanism])

    def _composed(self, purpose: str, extra: list[GaussianMechanism]) -> float:
        with self._transaction():
            budget = self._budget(purpose)
            mechanisms = [c.mechanism for c in self._charges(purpose)]
        return _epsilon(mechanisms + extra, budget.delta)

    def charge(self, purpose: str, mechanism: GaussianMechanism, *, run_id: str, kind: str,
               actor: str, idempotency_key: str = "") -> Charge:
        """Charge `mechanism` to `purpose`, atomically, or raise BudgetExceeded and write nothing.

        (purpose, run_id, idempotency_key) names the charge: a retry with the same name and the
        same mechanism returns the original charge without spending again (use the key to
        charge one run several times, e.g. once per round). Reusing a name for a different
        mechanism or kind is refused.
        """
        _check(isinstance(mechanism, GaussianMechanism), f"mechanism must be a GaussianMechanism, got {mechanism!r}")
        _check(kind in KINDS, f"kind must be one of {KINDS}, got {kind!r}")
        _check(isinstance(run_id, str) and run_id != "", f"run_id must be a non-empty string, got {run_id!r}")
        _check(isinstance(actor, str) and actor != "", f"actor must be a non-empty string, got {actor!r}")
        _check(isinstance(idempotency_key, str), f"idempotency_key must be a string, got {idempotency_key!r}")
        with self._transaction(immediate=True):
            budget = self._budget(purpose)
            charges = self._charges(purpose)
            for done in charges:
                if (done.run_id, done.idempotency_key) == (run_id, idempotency_key):
                    if (done.mechanism, done.kind) != (mechanism, kind):
                        raise PrivacyBudgetError(
                            f"charge '{run_id}'/'{idempotency_key}' for '{purpose}' was already recorded "
                            f"with a different mechanism or kind ({done.mechanism.describe()}, {done.kind})")
                    return done
            spent = _epsilon([c.mechanism for c in charges], budget.delta)
            after = _epsilon([c.mechanism for c in charges] + [mechanism], budget.delta)
            if after > budget.epsilon_total:
                raise BudgetExceeded(purpose, mechanism.epsilon(budget.delta), after, spent,
                                     budget.epsilon_total, budget.delta)
            charge = Charge(purpose, run_id, idempotency_key, kind, actor, mechanism, after, _now())
            self._db.execute(
                "INSERT INTO charges (purpose, run_id, idempotency_key, kind, actor, sample_rate, "
                "noise_multiplier, steps, epsilon_after, charged_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (purpose, run_id, idempotency_key, kind, actor, mechanism.sample_rate,
                 mechanism.noise_multiplier, mechanism.steps, after, charge.charged_at))
        return charge


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def compose_epsilon(mechanisms: Iterable[GaussianMechanism], delta: float) -> float:
    """Epsilon at `delta` of `mechanisms` composed (RDP curves added over `RDP_ORDERS`): the very
    composition the ledger charges with, public so that anyone can recompute a logged epsilon."""
    return _epsilon(mechanisms, delta)
