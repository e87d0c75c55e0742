"""DP accounting: calibrate the noise for a planned run, and say what a run spent.

Every mechanism fedrisk runs is a Gaussian mechanism, `steps` times, each on a Poisson sample of
rate q with noise multiplier sigma (`GaussianMechanism`): DP-SGD is (q, sigma, steps), a cohort
answer or a round's DP evaluation is the plain Gaussian mechanism (q = 1). What they cost
together is computed by one of two accountants, named by a constant that every record carries:

* `ACCOUNTANT`, the primary one: privacy loss distributions (PLD) from Google's `dp_accounting`
  (`dp_accounting.pld.privacy_loss_distribution`), connect-the-dots discretisation with the
  pessimistic estimate, so every epsilon it gives is an upper bound on the mechanism's true
  epsilon, never an estimate that might fall below it. The value discretisation interval is
  relative: a first pass at 1e-2 gives epsilon_1, which is the figure above 20; below, a second
  pass at 1e-3 * epsilon_1 (kept within [1e-5, 2e-3]) gives it, the smaller of the two (both
  are upper bounds). That is within about 0.3% of the exact value (finer discretisation lowers
  it by no more) and takes 0.05-0.5 s for q = 0.01-0.05 and 500-5000 steps; the relative
  interval keeps the large epsilons a bisection passes through (sigma well below 1) from
  costing tens of seconds. Plain Gaussian releases are merged into one Gaussian of multiplier
  (sum k_i / z_i^2)^-1/2 and repeated (q, sigma) charges into one of their summed steps first:
  both are identities, so the figure does not depend on how a run split its charges.
* `RDP_ACCOUNTANT`, what fedrisk used before (Opacus's RDP analysis over `RDP_ORDERS`): a valid
  but looser bound (RDP epsilon >= PLD epsilon, up to discretisation), kept as a cross-check
  and to recompute records written under it. A record names its accountant and is recomputed
  with that one, never silently reinterpreted.

`prv_epsilon` is an independent cross-check: Opacus's PRV accountant (Gopi et al.), another
implementation of numerical composition, which `fedrisk privacy verify` prints beside both.
Everything needed to recompute an epsilon is in `DPSpend` and `HospitalSpend`, which is what
runs log and certificates print.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from federation.errors import PrivacyBudgetError


RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [80, 128, 256, 512])
PLD_COARSE_DISCRETIZATION = 1e-2
PLD_COARSE_ENOUGH = 20.0
PLD_RELATIVE_DISCRETIZATION = 1e-3
PLD_FINE_DISCRETIZATION = 2e-3
PLD_FINEST_DISCRETIZATION = 1e-5
"""The PLD's value discretisation: a first pass at 1e-2 gives epsilon_1, the figure if it is
above 20; otherwise a second pass at 1e-3 * epsilon_1 (within [1e-5, 2e-3]) gives it (the
smaller of the two; see above)."""
ACCOUNTANT = ("pld (dp_accounting.pld, connect-the-dots, pessimistic estimate, value discretization "
              "1e-3*epsilon within [1e-5, 2e-3], 1e-2 above epsilon 20)")
"""The accountant every epsilon fedrisk computes now is computed by (run params, reports, spends,
ledger charges, certificates)."""
RDP_ACCOUNTANT = "rdp (opacus.accountants.analysis.rdp)"
"""The accountant of fedrisk's records before PLD: still recomputed for records that name it."""
ACCOUNTANTS = (ACCOUNTANT, RDP_ACCOUNTANT)
MIXED_ACCOUNTANTS = "per hospital (each hospital's entry names its accountant)"
"""A privacy report's top-level accountant when its hospitals' spends name different ones."""
PRV_ACCOUNTANT = "prv (opacus.accountants.analysis.prv)"
"""The independent cross-check (never used to charge)."""
DP_SGD = "DP-SGD, Poisson-subsampled Gaussian"


def rdp_analysis():
    """Opacus's RDP analysis, imported on first use: importing opacus costs about a second,
    which every short-lived ClientApp process that computes no epsilon would otherwise pay."""
    from opacus.accountants.analysis import rdp

    return rdp


def pld_analysis():
    """dp_accounting's privacy loss distributions, imported on first use (as `rdp_analysis`)."""
    from dp_accounting.pld import privacy_loss_distribution

    return privacy_loss_distribution


Extra = tuple[tuple[float, float, int], ...]
"""Other mechanisms a run composes with its DP-SGD, as (sample_rate, noise_multiplier, steps);
a plain Gaussian release repeated k times is (1.0, z, k)."""

_Triples = tuple[tuple[float, float, int], ...]


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise BudgetParameterError(f"accountant must be one of {list(ACCOUNTANTS)}, got {accountant!r}")


def _canonical(triples: Iterable[tuple[float, float, int]]) -> _Triples:
    """(q, sigma, steps) with zero-step entries dropped, equal (q, sigma) merged by adding steps,
    in sorted order: the same composition, whatever order or split the charges came in."""
    merged: dict[tuple[float, float], int] = {}
    for q, sigma, steps in triples:
        if steps > 0:
            key = (float(q), float(sigma))
            merged[key] = merged.get(key, 0) + int(steps)
    return tuple(sorted((q, sigma, steps) for (q, sigma), steps in merged.items()))


def _pld_pass(triples: _Triples, delta: float, interval: float) -> float:
    pld_module = pld_analysis()
    plain = sum(steps / sigma ** 2 for q, sigma, steps in triples if q == 1.0)
    parts = [pld_module.from_gaussian_mechanism(
        standard_deviation=sigma, sampling_prob=q, pessimistic_estimate=True, use_connect_dots=True,
        value_discretization_interval=interval).self_compose(steps)
        for q, sigma, steps in triples if q != 1.0]
    if plain > 0:  # k_i releases of multiplier z_i together are one Gaussian of (sum k_i/z_i^2)^-1/2
        parts.append(pld_module.from_gaussian_mechanism(
            standard_deviation=1.0 / math.sqrt(plain), pessimistic_estimate=True, use_connect_dots=True,
            value_discretization_interval=interval))
    composed = parts[0]
    for part in parts[1:]:
        composed = composed.compose(part)
    return float(composed.get_epsilon_for_delta(delta))


@lru_cache(maxsize=4096)
def _pld_epsilon(triples: _Triples, delta: float) -> float:
    if not triples:
        return 0.0
    coarse = _pld_pass(triples, delta, PLD_COARSE_DISCRETIZATION)
    if coarse > PLD_COARSE_ENOUGH:
        return coarse
    interval = min(max(PLD_RELATIVE_DISCRETIZATION * coarse, PLD_FINEST_DISCRETIZATION), PLD_FINE_DISCRETIZATION)
    return min(coarse, _pld_pass(triples, delta, interval))  # both are upper bounds: the smaller holds


@lru_cache(maxsize=1024)
def _rdp_curve(q: float, sigma: float, steps: int, orders: tuple[float, ...] = RDP_ORDERS) -> tuple[float, ...]:
    return tuple(rdp_analysis().compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(orders)))


@lru_cache(maxsize=4096)
def _rdp_epsilon(triples: _Triples, delta: float) -> float:
    if not triples:
        return 0.0
    curves = np.sum([_rdp_curve(*t) for t in triples], axis=0)
    epsilon, _ = rdp_analysis().get_privacy_spent(orders=list(RDP_ORDERS), rdp=curves, delta=delta)
    return float(epsilon)


def _compose(triples: Iterable[tuple[float, float, int]], delta: float, accountant: str) -> float:
    _check_accountant(accountant)
    canonical = _canonical(triples)
    return (_pld_epsilon if accountant == ACCOUNTANT else _rdp_epsilon)(canonical, float(delta))


def epsilon_for(*, sample_rate: float, noise_multiplier: float, steps: int, delta: float, extra: Extra = (),
                accountant: str = ACCOUNTANT) -> float:
    """Epsilon at `delta` after `steps` Poisson-subsampled Gaussian steps composed with the
    `extra` mechanisms, by `accountant` (PLD unless told). A pure function of its arguments,
    so it is remembered: a node asks for the same values several times per message."""
    return _compose(((sample_rate, noise_multiplier, steps), *extra), delta, accountant)


@lru_cache(maxsize=64)
def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    tolerance: float = 0.005, extra: Extra = (), accountant: str = ACCOUNTANT) -> float:
    """Smallest noise multiplier (to within `tolerance` in epsilon) whose epsilon over
    `steps` steps, composed with the `extra` mechanisms, is at most `target_epsilon` by
    `accountant` (PLD unless told). Calibrated once per run, before training."""
    def eps(sigma: float, n: int = steps) -> float:
        return epsilon_for(sample_rate=sample_rate, noise_multiplier=sigma, steps=n, delta=delta, extra=extra,
                           accountant=accountant)

    if extra and eps(1.0, 0) >= target_epsilon:
        raise ValueError("the other mechanisms alone already spend the target epsilon")
    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2.0
        if high > 1e4:
            raise ValueError("no noise multiplier below 1e4 meets the target epsilon")
    while True:
        mid = (low + high) / 2.0
        at_mid = eps(mid)
        if at_mid > target_epsilon:
            low = mid
        else:
            high = mid
            if target_epsilon - at_mid <= tolerance * target_epsilon:
                return high
        if high - low < 1e-6:
            return high


def remembered(cache: Path, key: list, *, usable: Callable[[float], bool], compute: Callable[[], float]) -> float:
    """A calibration result remembered in the JSON file `cache` under `key` for the next process:
    used only if `usable` confirms it (one accountant evaluation, against the guarantee it must
    meet), else `compute`d and written back. So an edited or corrupt file can cost a recalibration
    (or accuracy, within what `usable` admits) but never privacy. The key ends with the accountant."""
    name = json.dumps([*key, ACCOUNTANT])
    try:
        stored = json.loads(Path(cache).read_text())
    except (OSError, ValueError):
        stored = {}
    stored = stored if isinstance(stored, dict) else {}
    value = stored.get(name)
    if isinstance(value, float) and 0 < value <= 1e4 and usable(value):
        return value
    value = compute()
    temporary = Path(cache).with_name(f".{Path(cache).name}.{os.getpid()}")
    try:
        temporary.write_text(json.dumps({**stored, name: value}, sort_keys=True))
        os.replace(temporary, cache)
    except OSError:  # a read-only node directory: calibrate every time
        temporary.unlink(missing_ok=True)
    return value


def remembered_noise(cache: Path, *, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     extra: Extra = ()) -> float:
    """`calibrate_noise`, remembered in the JSON file `cache` for the next process (`remembered`).

    A deployed hospital answers each message in a fresh process, and a calibration costs a
    couple of seconds of PLD evaluations. A remembered sigma is used only after one evaluation
    confirms it still meets the target. The key names the accountant, so a sigma calibrated
    under RDP (valid, but more noise than PLD needs) is recalibrated rather than reused."""
    return remembered(
        cache, [target_epsilon, delta, sample_rate, steps] + ([list(m) for m in extra] if extra else []),
        usable=lambda sigma: epsilon_for(sample_rate=sample_rate, noise_multiplier=sigma, steps=steps, delta=delta,
                                         extra=extra) <= target_epsilon,
        compute=lambda: calibrate_noise(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate,
                                        steps=steps, extra=extra))


@dataclass(frozen=True)
class DPSpend:
    """What one hospital's DP-SGD actually ran, and the epsilon it costs."""

    mechanism: str
    sample_rate: float
    noise_multiplier: float
    steps: int
    clip_norm: float
    delta: float
    epsilon: float
    accountant: str = ACCOUNTANT

    @classmethod
    def of(cls, *, sample_rate: float, noise_multiplier: float, steps: int, clip_norm: float,
           delta: float, accountant: str = ACCOUNTANT) -> "DPSpend":
        """Account a run of `steps` DP-SGD steps (by `accountant`, PLD unless told)."""
        return cls(mechanism=DP_SGD, sample_rate=sample_rate,
                   noise_multiplier=noise_multiplier, steps=steps, clip_norm=clip_norm, delta=delta,
                   epsilon=epsilon_for(sample_rate=sample_rate, noise_multiplier=noise_multiplier,
                                       steps=steps, delta=delta, accountant=accountant),
                   accountant=accountant)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form for the privacy report."""
        return asdict(self)


def check_delta(delta: float, records: int) -> bool:
    """A meaningful (epsilon, delta) guarantee needs delta below 1/n."""
    return records > 0 and delta < 1.0 / records and math.isfinite(delta)


# --- mechanisms and their composition: what the ledger charges and every verifier recomputes ---

class BudgetParameterError(PrivacyBudgetError, ValueError):
    """A budget or mechanism parameter is out of range (the message names it)."""



def _check(ok: bool, message: str) -> None:
    if not ok:
        raise BudgetParameterError(message)


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

    def epsilon(self, delta: float, accountant: str = ACCOUNTANT) -> float:
        """Epsilon at `delta` of this mechanism on its own (by `accountant`, PLD unless told)."""
        return compose_epsilon([self], delta, accountant=accountant)

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


def compose_epsilon(mechanisms: Iterable[GaussianMechanism], delta: float, *, accountant: str = ACCOUNTANT) -> float:
    """Epsilon at `delta` of `mechanisms` composed by `accountant`: PLD (`ACCOUNTANT`) unless
    told, the very composition the ledger charges with; `RDP_ACCOUNTANT` adds the RDP curves
    over `RDP_ORDERS` (records written before PLD). Public so that anyone can recompute a
    logged epsilon. BudgetParameterError names an accountant that is neither."""
    return _compose(((m.sample_rate, m.noise_multiplier, m.steps) for m in mechanisms), delta, accountant)


def _epsilon(mechanisms: Iterable[GaussianMechanism], delta: float) -> float:
    """`compose_epsilon` by the primary accountant (what the ledger charges with)."""
    return compose_epsilon(mechanisms, delta)


@dataclass(frozen=True)
class PRVEpsilon:
    """Opacus's PRV accountant on some mechanisms: its estimate and the bounds around it."""

    lower: float
    estimate: float
    upper: float


PRV_EPS_ERROR = 0.01
"""The PRV accountant's epsilon error: `lower` and `upper` are this far around its estimate."""


def prv_epsilon(mechanisms: Iterable[GaussianMechanism], delta: float, *,
                eps_error: float = PRV_EPS_ERROR) -> PRVEpsilon:
    """The same composition by an independent implementation, Opacus's PRV accountant
    (`opacus.accountants.PRVAccountant`, Gopi et al. 2021): what `fedrisk privacy verify` and
    the tests hold fedrisk's epsilons against. Never used to charge. About 0.1-2 s."""
    from opacus.accountants import PRVAccountant

    triples = _canonical((m.sample_rate, m.noise_multiplier, m.steps) for m in mechanisms)
    if not triples:
        return PRVEpsilon(0.0, 0.0, 0.0)
    accountant = PRVAccountant()
    accountant.history = [(sigma, q, steps) for q, sigma, steps in triples]  # its (noise, rate, steps) form
    delta_error = delta / 1000
    with warnings.catch_warnings(), np.errstate(all="ignore"):  # q = 1: log(1 - q) is -inf, as intended
        warnings.simplefilter("ignore")
        composed = accountant._get_dprv(eps_error=eps_error, delta_error=delta_error)
        lower, estimate, upper = composed.compute_epsilon(delta, delta_error, eps_error)
    return PRVEpsilon(float(lower), float(estimate), float(upper))


EPSILON_TOLERANCE = 1e-6
"""How far a logged epsilon may sit from its recomputation by the accountant it names
(floating point only: each accountant is deterministic)."""


@dataclass(frozen=True)
class Recomputed:
    """One logged epsilon of a privacy report and what its logged parameters give, by the
    accountant the report names for that hospital (`accountant`); `mechanisms` are what it composes."""

    hospital: str
    key: str
    logged: float
    recomputed: float
    accountant: str = ACCOUNTANT
    mechanisms: tuple[GaussianMechanism, ...] = ()
    delta: float = 0.0

    @property
    def ok(self) -> bool:
        return abs(self.logged - self.recomputed) <= EPSILON_TOLERANCE


def report_accountant(report: dict, hospital: dict | None = None) -> str:
    """The accountant a privacy report (or one hospital's entry of it) names: the entry's own,
    else the report's. Reports written before PLD name `RDP_ACCOUNTANT` at the top only.
    ValueError for a report that names none or one fedrisk does not know."""
    named = (hospital or {}).get("accountant", report.get("accountant"))
    if named not in ACCOUNTANTS:  # MIXED_ACCOUNTANTS too: every entry of such a report names its own
        raise ValueError(f"privacy report field 'accountant' must be one of {list(ACCOUNTANTS)}, got {named!r}")
    return named


def recompute_report(report: dict) -> list[Recomputed]:
    """Every epsilon of a training run's privacy report recomputed from the parameters beside it,
    by the accountant the report names (`report_accountant`: PLD now, RDP for reports written
    before): per hospital, DP-SGD alone, its DP evaluations alone (when the report has them) and
    the two composed (`run_epsilon`). The one verifier behind `fedrisk privacy verify` and
    `fedrisk release create`. Raises KeyError, TypeError or ValueError for a malformed report and
    BudgetParameterError for parameters that are no DP mechanism (a noise multiplier of 0)."""
    checks = []
    for name, h in sorted(dict(report["hospitals"]).items()):
        delta = float(h["delta"])
        accountant = report_accountant(report, h)

        def check(key: str, logged: object, mechanisms: list[GaussianMechanism]) -> Recomputed:
            recomputed = compose_epsilon(mechanisms, delta, accountant=accountant)
            return Recomputed(name, key, float(logged), recomputed, accountant, tuple(mechanisms), delta)  # type: ignore[arg-type]

        dp_sgd = GaussianMechanism(float(h["sample_rate"]), float(h["noise_multiplier"]), int(h["steps"]))
        checks.append(check("epsilon", h["epsilon"], [dp_sgd]))
        evaluation = h.get("evaluation")
        if evaluation:
            released = GaussianMechanism.gaussian_release(noise_multiplier=float(evaluation["noise_multiplier"]),
                                                          count=int(evaluation["count"]))
            checks.append(check("evaluation.epsilon", evaluation["epsilon"], [released]))
            checks.append(check("run_epsilon", h["run_epsilon"], [dp_sgd, released]))
    return checks


@dataclass(frozen=True)
class CrossCheck:
    """One recomputed epsilon beside the other accountants' figures for the same mechanisms."""

    check: Recomputed
    pld: float
    rdp: float
    prv: PRVEpsilon

    @property
    def below_prv(self) -> bool:
        """Whether the logged epsilon is below the independent PRV accountant's lower bound:
        it would then under-count, whatever its own accountant says."""
        return self.check.logged < self.prv.lower - EPSILON_TOLERANCE


def cross_check(checks: Iterable[Recomputed]) -> list[CrossCheck]:
    """Each check's mechanisms recomputed by PLD, RDP and, independently, Opacus's PRV accountant."""
    return [CrossCheck(c, compose_epsilon(c.mechanisms, c.delta, accountant=ACCOUNTANT),
                       compose_epsilon(c.mechanisms, c.delta, accountant=RDP_ACCOUNTANT),
                       prv_epsilon(c.mechanisms, c.delta)) for c in checks]


SPEND_FORMAT = 2
"""Version of `HospitalSpend`'s wire form: 2 names its accountant at the top; 1 (before PLD) was
always RDP, and is still read, as RDP."""
_RDP_SPEND_FORMAT = 1


def _number(data: dict, key: str, *, integer: bool = False, positive: bool = False) -> int | float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"privacy spend field {key!r} must be a finite number, got {value!r}")
    if integer and (value != int(value) or value < 0):
        raise ValueError(f"privacy spend field {key!r} must be a whole number >= 0, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"privacy spend field {key!r} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return int(value) if integer else float(value)


@dataclass(frozen=True)
class HospitalSpend:
    """One hospital's privacy spend for one run so far, as its ledger holds it: the DP-SGD it ran
    (`training`), the DP evaluations it released (`evaluation`: `steps` Gaussian releases of
    multiplier `noise_multiplier`), the two composed (`run_epsilon`) and everything the ledger
    holds for the purpose (`ledger_epsilon`).

    It is one record end to end: every train and evaluate reply carries the whole of it as one
    JSON value, the server keeps the newest, and `report_entry()` writes it into the privacy
    report, where `recompute_report` checks every epsilon. Clip norm and delta are the node's,
    never the server's config. `accountant` computed every epsilon in it: a format-1 spend (from
    before PLD, a node not yet upgraded or an old checkpoint) is read as RDP and stays RDP."""

    run_epsilon: float
    ledger_epsilon: float
    training: DPSpend | None = None
    evaluation: GaussianMechanism | None = None
    evaluation_epsilon: float = 0.0
    accountant: str = ACCOUNTANT

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form: the wire value and the checkpoint's."""
        if self.accountant == RDP_ACCOUNTANT:  # as the RDP version wrote it, so it reads back as RDP
            return {"format": _RDP_SPEND_FORMAT, **self._fields()}
        return {"format": SPEND_FORMAT, "accountant": self.accountant, **self._fields()}

    def _fields(self) -> dict[str, object]:
        return {"run_epsilon": self.run_epsilon, "ledger_epsilon": self.ledger_epsilon,
                "training": self.training.to_dict() if self.training else None,
                "evaluation": ({**self.evaluation.to_dict(), "epsilon": self.evaluation_epsilon}
                               if self.evaluation else None)}

    def to_wire(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: object) -> "HospitalSpend":
        """Parse a spend a hospital sent (or a checkpoint kept). Raises ValueError naming the field."""
        if not isinstance(data, dict) or data.get("format") not in (_RDP_SPEND_FORMAT, SPEND_FORMAT):
            raise ValueError(f"privacy spend is not a format-{_RDP_SPEND_FORMAT} or format-{SPEND_FORMAT} record")
        if data["format"] == _RDP_SPEND_FORMAT:
            accountant = RDP_ACCOUNTANT
        else:
            accountant = data.get("accountant")
            if accountant not in ACCOUNTANTS:
                raise ValueError(f"privacy spend field 'accountant' must be one of {list(ACCOUNTANTS)}, "
                                 f"got {str(accountant)[:100]!r}")
        training = evaluation = None
        if data.get("training") is not None:
            t = data["training"]
            if not isinstance(t, dict):
                raise ValueError("privacy spend field 'training' must be a record")
            if t.get("mechanism") != DP_SGD or t.get("accountant") != accountant:
                raise ValueError(f"privacy spend field 'training' must name {DP_SGD!r} and {accountant!r}")
            training = DPSpend(mechanism=DP_SGD, accountant=accountant,
                               sample_rate=_number(t, "sample_rate", positive=True),
                               noise_multiplier=_number(t, "noise_multiplier", positive=True),
                               steps=_number(t, "steps", integer=True), clip_norm=_number(t, "clip_norm", positive=True),
                               delta=_number(t, "delta", positive=True), epsilon=_number(t, "epsilon"))
        if data.get("evaluation") is not None:
            e = data["evaluation"]
            if not isinstance(e, dict):
                raise ValueError("privacy spend field 'evaluation' must be a record")
            try:
                evaluation = GaussianMechanism.gaussian_release(noise_multiplier=_number(e, "noise_multiplier"),
                                                                count=_number(e, "steps", integer=True))
            except BudgetParameterError as exc:
                raise ValueError(f"privacy spend field 'evaluation': {exc}") from None
        return cls(run_epsilon=_number(data, "run_epsilon"), ledger_epsilon=_number(data, "ledger_epsilon"),
                   training=training, evaluation=evaluation,
                   evaluation_epsilon=_number(data["evaluation"], "epsilon") if evaluation else 0.0,
                   accountant=accountant)

    @classmethod
    def from_wire(cls, text: object) -> "HospitalSpend":
        if not isinstance(text, str):
            raise ValueError("privacy spend must be a JSON string")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError("privacy spend is not JSON") from None
        return cls.from_dict(data)

    def report_entry(self, target_epsilon: float) -> dict[str, object]:
        """This hospital's entry in a training run's privacy report (what `recompute_report` reads)."""
        if self.training is None:
            raise ValueError("privacy spend has no DP-SGD part: the hospital reported no training")
        evaluation = ({"mechanism": "gaussian", "noise_multiplier": self.evaluation.noise_multiplier,
                       "count": self.evaluation.steps, "epsilon": self.evaluation_epsilon} if self.evaluation else
                      {"mechanism": "gaussian", "noise_multiplier": 0.0, "count": 0, "epsilon": 0.0})
        t = self.training
        return {"mechanism": t.mechanism, "sample_rate": t.sample_rate, "noise_multiplier": t.noise_multiplier,
                "steps": t.steps, "clip_norm": t.clip_norm, "delta": t.delta, "epsilon": t.epsilon,
                "target_epsilon": target_epsilon, "evaluation": evaluation,
                "run_epsilon": self.run_epsilon, "ledger_epsilon": self.ledger_epsilon, "accountant": self.accountant}
