"""Will a run work at this node? Every check a training run makes at a hospital, made up front.

`fedrisk node check --dir NODE --purpose P` calls `check_readiness`: the node's own policy
(`NodePolicy.check_run`: purpose served, epsilon, rounds, delta and model-size caps), its export
against its schema, consent for the purpose (expired and withdrawn consents excluded), the
records left for training and for the held-out split, delta against 1/(10 n), that every model
input can be encoded (schema runs), and what the run would bring the purpose's budget to under
the ledger's own composition. Problems are collected, not raised one at a time, so a hospital
fixes them in one pass; nothing is written (no audit entry, no ledger charge, no noise cache; the
ledger is read through a private copy). The budget check composes the run's training and its DP
evaluations, as the run's own epsilon does; the node's start-of-run check counts training only.

What it reports is the hospital's to read: counts and column names, never a record value.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from clients import encoding
from clients.node_state import TEST_FRACTION, NodeState, test_split
from clients.policy import NodePolicy
from clients.schema import ExportSchema
from federation import features as fx
from federation.config import RunConfig
from federation.errors import ConfigError, FedriskError
from federation.model import num_parameters
from federation.round_evaluation import evaluation_noise_multiplier
from privacy.accounting import calibrate_noise
from privacy.ledger import BudgetLedger, GaussianMechanism


@dataclass
class Readiness:
    """What a run with `config` would meet at one node."""

    hospital: str
    purpose: str
    records: int = 0
    usable: int = 0
    excluded: dict[str, int] = field(default_factory=dict)
    train_records: int = 0
    test_records: int = 0
    inputs: list[str] = field(default_factory=list)
    withheld: dict[str, str] = field(default_factory=dict)
    """Export columns kept out of the model, and why."""
    epsilon_spent: float | None = None
    epsilon_after: float | None = None
    budget: float | None = None
    problems: list[str] = field(default_factory=list)
    """What would make the run fail here."""
    warnings: list[str] = field(default_factory=list)
    """What would not stop the run but that the hospital should know (e.g. a tiny DP-SGD batch)."""

    @property
    def ready(self) -> bool:
        return not self.problems


def _inputs(schema: ExportSchema, config: RunConfig, out: Readiness) -> None:
    for column in schema.columns:
        if column.role in ("feature", "quasi-identifier") and not column.allowed_for(config.purpose):
            out.withheld[column.name] = (f"class {column.sensitivity} is restricted and the schema does not "
                                         f"allow it for {config.purpose}")
        elif column.role in ("direct-identifier", "record-key"):
            out.withheld[column.name] = "direct identifier: removed at the node before anything else"
        elif column.role in ("consent", "consent-date", "consent-expiry"):
            out.withheld[column.name] = "consent bookkeeping: decides which records are used, never an input"
        elif column.role == "ignore":
            out.withheld[column.name] = "role ignore"
    if config.features == "schema":
        try:
            out.inputs = encoding.feature_names(schema, config.purpose)
        except FedriskError as error:
            out.problems.append(f"model inputs: {error}")
    else:
        out.inputs = list(fx.FEATURE_NAMES)


@contextmanager
def _ledger_copy(state: NodeState) -> Iterator[BudgetLedger]:
    """The node's ledger, read through a private copy: opening a BudgetLedger may create, migrate
    or checkpoint its file, and a check must write nothing. Refuses a node without a ledger."""
    if not state.ledger_path.is_file():
        raise ConfigError(f"{state.directory} has no budget ledger ({state.ledger_path.name}); "
                          "`fedrisk node init` makes one")
    with tempfile.TemporaryDirectory(prefix="fedrisk-check-") as tmp:
        copy = Path(tmp) / state.ledger_path.name
        for suffix in ("", "-wal", "-shm"):  # committed WAL pages are part of the ledger too
            source = Path(f"{state.ledger_path}{suffix}")
            if source.is_file():
                shutil.copyfile(source, Path(f"{copy}{suffix}"))
        with BudgetLedger(copy) as ledger:
            yield ledger


def check_readiness(state: NodeState, config: RunConfig, today: date | None = None) -> Readiness:
    """Every check a training run of `config` makes at this node, without running it."""
    with _ledger_copy(state) as ledger:
        return _check(state, config, today, ledger)


def _check(state: NodeState, config: RunConfig, today: date | None, ledger: BudgetLedger) -> Readiness:
    out = Readiness(hospital=state.hospital, purpose=config.purpose)
    policy = NodePolicy.load(state.directory)
    key_id = state.hospital_key().key_id
    schema = state.schema()
    purposes = ledger.purposes()
    ledger_delta = ledger.budget(config.purpose).delta if config.purpose in purposes else None
    consent_purposes = schema.consent_policy().purposes
    if not schema.releases_label(config.purpose):
        label = schema.column(schema.label)
        out.problems.append(f"the label column {label.name!r} is of restricted class {label.sensitivity} and the "
                            f"schema does not release it for {config.purpose}")
    if config.purpose not in consent_purposes:
        out.problems.append(f"purpose {config.purpose!r}: no consent column of the schema covers it "
                            f"(covered: {', '.join(consent_purposes) or 'none'})")
    _inputs(schema, config, out)
    try:
        policy.check_run(purpose=config.purpose, target_epsilon=config.target_epsilon,
                         evaluation_epsilon=config.evaluation_budget, rounds=config.rounds, delta=config.delta,
                         min_contributors=config.min_contributors,
                         model_parameters=num_parameters(config.model, len(out.inputs) or config.input_size),
                         federation=policy.federation or key_id, key_id=key_id,
                         ledger_purposes=purposes, ledger_delta=ledger_delta)
    except FedriskError as error:
        out.problems.append(str(error))
    if out.problems and config.purpose not in consent_purposes:
        return out
    try:
        clean, mask, excluded = state.usable(config.purpose, today)
    except FedriskError as error:
        out.problems.append(str(error))
        return out
    from clients.deidentify import PSEUDONYM

    out.records, out.usable, out.excluded = int(len(clean)), int(mask.sum()), dict(excluded)
    is_test = test_split(clean.loc[mask, PSEUDONYM].reset_index(drop=True))
    out.test_records, out.train_records = int(is_test.sum()), int((~is_test).sum())
    if out.usable == 0:
        out.problems.append(f"no record may be used for {config.purpose} (excluded: {out.excluded})")
        return out
    try:
        policy.check_records(delta=config.delta, records=out.train_records)
    except FedriskError as error:
        out.problems.append(f"{error} (n = {out.train_records:,} training records here: delta must be at most "
                            f"{1.0 / (10 * max(out.train_records, 1)):.2g})")
    used = clean.loc[mask].reset_index(drop=True)
    try:  # the encoding the run will do, on the same records (nothing is kept)
        encoding.model_inputs(used, schema, config.purpose, config.features)
    except (FedriskError, KeyError, ValueError, TypeError) as error:
        out.problems.append(f"the records do not encode as the model reads them ({type(error).__name__}: {error})")
    expected_batch = out.train_records * config.sample_rate
    if expected_batch < 1.0:
        out.problems.append(f"too few consented records for sample-rate {config.sample_rate:g}: an expected "
                            f"DP-SGD batch of {expected_batch:.2f} records (the run refuses below 1)")
    elif expected_batch < 10:
        out.warnings.append(f"at sample rate {config.sample_rate:g} the expected DP-SGD batch is {expected_batch:.1f} "
                            "records: the noise will dominate this hospital's update (a larger --sample-rate helps)")
    if config.purpose in purposes:
        z = evaluation_noise_multiplier(config.evaluation_budget, config.delta, config.rounds)
        try:
            sigma = calibrate_noise(target_epsilon=config.target_epsilon, delta=config.delta,
                                    sample_rate=config.sample_rate, steps=config.planned_steps,
                                    extra=((1.0, z, config.rounds),))
        except ValueError as error:
            out.problems.append(f"epsilon {config.target_epsilon:g}: {error}")
            return out
        out.budget = ledger.budget(config.purpose).epsilon_total
        out.epsilon_spent = ledger.spent(config.purpose)
        run = GaussianMechanism(sample_rate=config.sample_rate, noise_multiplier=sigma, steps=config.planned_steps)
        evaluation = GaussianMechanism.gaussian_release(noise_multiplier=z, count=config.rounds)
        out.epsilon_after = ledger.would_spend_all(config.purpose, [run, evaluation])
        if out.epsilon_after > out.budget + 1e-9:
            out.problems.append(f"budget: the run would bring {config.purpose} to epsilon {out.epsilon_after:.3f}, "
                                f"over its budget of {out.budget:g} (spent {out.epsilon_spent:.3f})")
    return out


__all__ = ["Readiness", "TEST_FRACTION", "check_readiness"]
