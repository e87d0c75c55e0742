"""A hospital's own policy: the last word on what its node does, whatever the coordinator asks.

The coordinator is an adversary of the hospitals, so nothing that protects a hospital may be
set by the run config it sends. Each node directory holds `policy.json`, written by the
hospital (`fedrisk node policy set`), and every run and query is checked against it before any
record is read (`check_run`, `check_query`), and once more when the records' count is known
(`check_records`):

    {"min_contributors": 2,            fewest distinct hospitals in an aggregate this node decrypts (>= 2)
     "max_epsilon_per_run": 2.0,       cap on a training run's target epsilon and on a query's epsilon
     "max_rounds": 50,                 cap on the rounds of a training run
     "max_delta": 1e-05,               cap on delta; in force: min(max_delta, the purpose's ledger delta, 1/(10 n))
     "purposes": [],                   purposes served; [] = every purpose the ledger has a budget for
     "max_model_parameters": 2000000,  cap on the size of the model a run trains
     "federation": "",                 CKKS key id of the federation served; "" = this node's own key's id
     "max_evaluation_epsilon": 0.5,    cap on a run's DP evaluation epsilon (0: no DP evaluation)
     "max_audit_epsilon": 0.5,         cap on a membership audit query's epsilon (0: no membership audit;
                                       it is the only query that reads the training split)
     "grant_retention_days": 365}      days an ended grant (expired, revoked, used up) keeps its link to the
                                       patient; `fedrisk node purge` then removes it (clients.erasure)

An absent file means these defaults; a present file must be valid in full (unknown or
out-of-range fields are a ConfigError naming the file and the field, never silently ignored).
A request the policy forbids raises `PolicyRefusal`, one line naming the policy field and the
offending value. DP-SGD and CKKS are not policy fields: they are always on, and no switch exists.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from federation.errors import ConfigError, FedriskError

POLICY_FILE = "policy.json"
"""In the node directory: the hospital's policy (mode 0600)."""

_SLUG = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")  # the ledger's purpose slugs
_KEY_ID = re.compile(r"[0-9a-f]{16}")            # federation.he_codec key ids
_ALWAYS_ON = {"dp": "DP-SGD", "he": "CKKS aggregation"}


class PolicyRefusal(FedriskError):
    """The node's policy forbids a request: one line naming the policy field and the offending value."""

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.field = field


def _refusal(field: str, problem: str) -> PolicyRefusal:
    return PolicyRefusal(f"policy {field}: {problem}", field=field)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(float(value)))


# --- the policy's own fields -------------------------------------------------------------------
def _whole(field: str, value: Any, low: int) -> int:
    if not _is_int(value) or value < low:
        raise ConfigError(f"{field} must be a whole number >= {low}, got {value!r}")
    return int(value)


def _positive(field: str, value: Any, *, zero: bool = False) -> float:
    if not _is_number(value) or value < 0 or (value == 0 and not zero):
        raise ConfigError(f"{field} must be a finite number {'>=' if zero else '>'} 0, got {value!r}")
    return float(value)


def _delta_cap(field: str, value: Any) -> float:
    if not _is_number(value) or not 0.0 < value < 1.0:
        raise ConfigError(f"{field} must be a number in (0, 1), got {value!r}")
    return float(value)


def _purposes(field: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{field} must be a list of purpose slugs, got {value!r}")
    for purpose in value:
        if not isinstance(purpose, str) or not _SLUG.fullmatch(purpose):
            raise ConfigError(f"{field}: each purpose must be a slug like 'credit-risk-research', got {purpose!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{field} names a purpose twice: {list(value)!r}")
    return tuple(value)


def _federation(field: str, value: Any) -> str:
    if not isinstance(value, str) or (value and not _KEY_ID.fullmatch(value)):
        raise ConfigError(f"{field} must be '' (this node's own key) or a CKKS key id of 16 hex digits, "
                          f"got {value!r}")
    return value


_VALIDATORS = {
    "min_contributors": lambda f, v: _whole(f, v, 2),
    "max_epsilon_per_run": _positive,
    "max_rounds": lambda f, v: _whole(f, v, 1),
    "max_delta": _delta_cap,
    "purposes": _purposes,
    "max_model_parameters": lambda f, v: _whole(f, v, 1),
    "federation": _federation,
    "max_evaluation_epsilon": lambda f, v: _positive(f, v, zero=True),
    "max_audit_epsilon": lambda f, v: _positive(f, v, zero=True),
    "grant_retention_days": lambda f, v: _whole(f, v, 1),
}


def _unknown(field: str, known: list[str]) -> str:
    if field in _ALWAYS_ON:
        return f"{field!r} is not a policy field: {_ALWAYS_ON[field]} is always on and has no switch"
    return f"unknown policy field {field!r} (fields: {', '.join(known)})"


@dataclass(frozen=True)
class NodePolicy:
    """What this hospital's node agrees to do (see the module docstring for each field).

    Every field is validated on construction (ConfigError naming the field); a policy that
    exists is a valid one."""

    min_contributors: int = 2
    max_epsilon_per_run: float = 2.0
    max_rounds: int = 50
    max_delta: float = 1e-5
    purposes: tuple[str, ...] = ()
    max_model_parameters: int = 2_000_000
    federation: str = ""
    max_evaluation_epsilon: float = 0.5
    max_audit_epsilon: float = 0.5
    grant_retention_days: int = 365

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _VALIDATORS[f.name](f.name, getattr(self, f.name)))

    # --- the file ------------------------------------------------------------------------------
    @classmethod
    def for_budgets(cls, budgets: dict[str, tuple[float, float]]) -> "NodePolicy":
        """The policy a new node starts with: runs of up to its largest purpose budget, at up to
        that budget's delta (still capped at 1/(10 n) once records are read); every other field
        at its default. The operator tightens it with `fedrisk node policy set`."""
        epsilon = max(e for e, _ in budgets.values())
        return cls(max_epsilon_per_run=float(epsilon), max_evaluation_epsilon=float(min(epsilon / 2, 1.0)),
                   max_audit_epsilon=float(min(epsilon / 2, 1.0)),
                   max_delta=float(max(d for _, d in budgets.values())))

    @classmethod
    def load(cls, node_dir: Path) -> "NodePolicy":
        """The policy in `node_dir`: the defaults if it has no policy file, else the file's
        fields over the defaults. A bad file is a ConfigError naming the file and the field."""
        path = Path(node_dir) / POLICY_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the node policy ({type(exc).__name__})") from None
        try:
            raw = json.loads(text, object_pairs_hook=_no_duplicates)
        except ValueError as exc:
            raise ConfigError(f"{path}: not valid JSON ({str(exc).splitlines()[0][:120]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a node policy is a JSON object of fields, got {type(raw).__name__}")
        try:
            return cls().with_changes(**raw)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def save(self, node_dir: Path) -> Path:
        """Write the policy (every field) to `node_dir`/policy.json, mode 0600, atomically:
        a reader sees the old policy or the new one, never half of one."""
        path = Path(node_dir) / POLICY_FILE
        write_atomically(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def with_changes(self, **changes: Any) -> "NodePolicy":
        """A copy with some fields changed, validated; an unknown field is a ConfigError."""
        known = [f.name for f in fields(self)]
        for field in changes:
            if field not in known:
                raise ConfigError(_unknown(field, known))
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: every field, purposes as a list."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    # --- checks --------------------------------------------------------------------------------
    def check_run(self, *, purpose: str, target_epsilon: float, evaluation_epsilon: float, rounds: int,
                  delta: float, min_contributors: int, model_parameters: int, federation: str, key_id: str,
                  ledger_purposes: list[str], ledger_delta: float | None) -> None:
        """Before any record is read: refuse a training run the policy forbids.

        purpose, target_epsilon, evaluation_epsilon, rounds, delta, min_contributors,
        model_parameters, federation: what the coordinator asks for; key_id: this node's CKKS key
        id; ledger_purposes: purposes with a budget in this node's ledger; ledger_delta: the
        ledger's delta for `purpose` (None: not known). Raises PolicyRefusal."""
        self._check_federation(federation, key_id)
        self._check_purpose(purpose, ledger_purposes)
        self._check_epsilon("max_epsilon_per_run", "target-epsilon", target_epsilon, self.max_epsilon_per_run)
        self._check_epsilon("max_evaluation_epsilon", "evaluation-epsilon", evaluation_epsilon,
                            self.max_evaluation_epsilon, zero=True)
        if not _is_int(rounds) or rounds < 1:
            raise _refusal("max_rounds", f"rounds {rounds!r} is not a whole number >= 1")
        if rounds > self.max_rounds:
            raise _refusal("max_rounds", f"rounds {rounds} is over the cap of {self.max_rounds}")
        self._check_delta(delta, purpose, ledger_delta)
        if not _is_int(min_contributors) or min_contributors < 1:
            raise _refusal("min_contributors", f"min-contributors {min_contributors!r} is not a whole number >= 1")
        if min_contributors < self.min_contributors:
            raise _refusal("min_contributors", f"min-contributors {min_contributors} is below this node's floor "
                                               f"of {self.min_contributors}")
        if not _is_int(model_parameters) or model_parameters < 1:
            raise _refusal("max_model_parameters", f"model parameters {model_parameters!r} is not a whole number >= 1")
        if model_parameters > self.max_model_parameters:
            raise _refusal("max_model_parameters", f"a model of {model_parameters:,} parameters is over the cap "
                                                   f"of {self.max_model_parameters:,}")

    def check_records(self, *, delta: float, records: int) -> None:
        """After loading: delta must be at most 1/(10 n) for this node's n records. The message
        does not state n (it may reach the coordinator)."""
        if not _is_int(records) or records < 1:
            raise _refusal("max_delta", f"delta {delta!r} cannot be bounded: this node has no records to use")
        if not _is_number(delta) or delta <= 0 or delta > 1.0 / (10 * int(records)):
            raise _refusal("max_delta", f"delta {delta!r} is over 1/(10 n) for this node's n records")

    def check_query(self, *, purpose: str, epsilon: float, delta: float, federation: str, key_id: str,
                    ledger_purposes: list[str], ledger_delta: float | None, membership: bool = False) -> None:
        """Before any record is read: refuse a cohort query the policy forbids (arguments as in
        `check_run`; `epsilon` is what the query spends at this node; `membership`: the query is a
        membership audit, over the training split too, capped by `max_audit_epsilon`). Raises
        PolicyRefusal."""
        self._check_federation(federation, key_id)
        self._check_purpose(purpose, ledger_purposes)
        self._check_epsilon("max_epsilon_per_run", "query epsilon", epsilon, self.max_epsilon_per_run)
        if membership:
            if self.max_audit_epsilon == 0:
                raise _refusal("max_audit_epsilon", "this node answers no membership audit (max_audit_epsilon 0)")
            self._check_epsilon("max_audit_epsilon", "membership audit epsilon", epsilon, self.max_audit_epsilon)
        self._check_delta(delta, purpose, ledger_delta)

    def effective_min_contributors(self, requested: int) -> int:
        """Fewest hospitals an aggregate must hold before this node decrypts it: the
        coordinator's request, never below this node's floor."""
        if not _is_int(requested):
            raise _refusal("min_contributors", f"min-contributors {requested!r} is not a whole number")
        return max(int(requested), self.min_contributors)

    def _check_federation(self, federation: str, key_id: str) -> None:
        expected = self.federation or key_id
        if not isinstance(federation, str) or federation != expected:
            whose = "the policy's federation" if self.federation else "this node's own key id"
            raise _refusal("federation", f"the coordinator names federation {federation!r}, "
                                         f"not {whose} {expected!r}")

    def _check_purpose(self, purpose: str, ledger_purposes: list[str]) -> None:
        if not isinstance(purpose, str) or (self.purposes and purpose not in self.purposes):
            raise _refusal("purposes", f"purpose {purpose!r} is not served by this node "
                                       f"(serves: {', '.join(self.purposes) or 'none'})")
        if purpose not in ledger_purposes:
            raise _refusal("purposes", f"purpose {purpose!r} has no budget in this node's ledger")

    @staticmethod
    def _check_epsilon(field: str, what: str, value: float, cap: float, *, zero: bool = False) -> None:
        if not _is_number(value) or value < 0 or (value == 0 and not zero):
            raise _refusal(field, f"{what} {value!r} is not a finite number {'>=' if zero else '>'} 0")
        if value > cap:
            raise _refusal(field, f"{what} {value:g} is over the cap of {cap:g}")

    def _check_delta(self, delta: float, purpose: str, ledger_delta: float | None) -> None:
        if not _is_number(delta) or not 0.0 < delta < 1.0:
            raise _refusal("max_delta", f"delta {delta!r} is not a number in (0, 1)")
        if delta > self.max_delta:
            raise _refusal("max_delta", f"delta {delta:g} is over the cap of {self.max_delta:g}")
        if ledger_delta is not None and delta > ledger_delta:
            raise _refusal("max_delta", f"delta {delta:g} is over the ledger's delta {ledger_delta:g} "
                                        f"for purpose {purpose!r}")


def parse_assignments(assignments: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings (the CLI's) as typed policy fields: whole numbers, numbers, a
    comma-separated purpose list, a key id. Kebab-case keys are accepted. Values are checked
    by `NodePolicy.with_changes`; here only their form is (ConfigError naming the field)."""
    defaults = {f.name: f.default for f in fields(NodePolicy)}
    changes: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        field = key.strip().replace("-", "_")
        if not sep or not field:
            raise ConfigError(f"a policy change is KEY=VALUE, got {assignment!r}")
        if field not in defaults:
            raise ConfigError(_unknown(field, list(defaults)))
        if field in changes:
            raise ConfigError(f"policy field {field} is given twice")
        default, text = defaults[field], text.strip()
        try:
            if isinstance(default, tuple):
                changes[field] = tuple(p.strip() for p in text.split(",") if p.strip())
            elif isinstance(default, int):
                changes[field] = int(text)
            elif isinstance(default, float):
                changes[field] = float(text)
            else:
                changes[field] = text
        except ValueError:
            kind = "whole number" if isinstance(default, int) else "number"
            raise ConfigError(f"policy field {field} must be a {kind}, got {text!r}") from None
    return changes


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a field given twice is a mistake, not 'the last one wins'."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"field {key!r} is given twice")
        out[key] = value
    return out


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text`, mode 0600, via a temporary file in the same directory."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
