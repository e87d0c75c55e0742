"""DP-SGD accounting: calibrate the noise for a planned run, and say what a run spent.

The mechanism is the Poisson-subsampled Gaussian mechanism run for `steps` steps with
sampling rate q and noise multiplier sigma. Its Renyi-DP curve is computed with Opacus's RDP
analysis and converted to (epsilon, delta). Everything needed to recompute an epsilon is in
`DPSpend`, which is what runs log and certificates print.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from federation.errors import PrivacyBudgetError


RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [80, 128, 256, 512])
ACCOUNTANT = "rdp (opacus.accountants.analysis.rdp)"
DP_SGD = "DP-SGD, Poisson-subsampled Gaussian"


def rdp_analysis():
    """Opacus's RDP analysis, imported on first use: importing opacus costs about a second,
    which every short-lived ClientApp process that computes no epsilon would otherwise pay."""
    from opacus.accountants.analysis import rdp

    return rdp


Extra = tuple[tuple[float, float, int], ...]
"""Other mechanisms a run composes with its DP-SGD, as (sample_rate, noise_multiplier, steps);
a plain Gaussian release repeated k times is (1.0, z, k)."""


def _rdp(sample_rate: float, noise_multiplier: float, steps: int):
    return rdp_analysis().compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps,
                                      orders=list(RDP_ORDERS))


@lru_cache(maxsize=4096)
def epsilon_for(*, sample_rate: float, noise_multiplier: float, steps: int, delta: float, extra: Extra = ()) -> float:
    """Epsilon at `delta` after `steps` Poisson-subsampled Gaussian steps composed with the
    `extra` mechanisms (RDP accountant). A pure function of its arguments, so it is remembered:
    a node asks for the same values several times per message."""
    curves = [_rdp(*m) for m in extra if m[2] > 0]
    if steps > 0:
        curves.append(_rdp(sample_rate, noise_multiplier, steps))
    if not curves:
        return 0.0
    epsilon, _ = rdp_analysis().get_privacy_spent(orders=list(RDP_ORDERS), rdp=sum(curves), delta=delta)
    return float(epsilon)


@lru_cache(maxsize=64)
def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    tolerance: float = 0.005, extra: Extra = ()) -> float:
    """Smallest noise multiplier (to within `tolerance` in epsilon) whose epsilon over
    `steps` steps, composed with the `extra` mechanisms, is at most `target_epsilon`.
    Calibrated once per run, before training."""
    if extra and epsilon_for(sample_rate=sample_rate, noise_multiplier=1.0, steps=0, delta=delta,
                             extra=extra) >= target_epsilon:
        raise ValueError("the other mechanisms alone already spend the target epsilon")
    low, high = 0.0, 1.0
    while epsilon_for(sample_rate=sample_rate, noise_multiplier=high, steps=steps, delta=delta, extra=extra) > target_epsilon:
        low, high = high, high * 2.0
        if high > 1e4:
            raise ValueError("no noise multiplier below 1e4 meets the target epsilon")
    while True:
        mid = (low + high) / 2.0
        eps = epsilon_for(sample_rate=sample_rate, noise_multiplier=mid, steps=steps, delta=delta, extra=extra)
        if eps > target_epsilon:
            low = mid
        else:
            high = mid
            if target_epsilon - eps <= tolerance * target_epsilon:
                return high
        if high - low < 1e-6:
            return high


def remembered_noise(cache: Path, *, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     extra: Extra = ()) -> float:
    """`calibrate_noise`, remembered in the JSON file `cache` for the next process.

    A deployed hospital answers each message in a fresh process, and a calibration costs a
    couple of seconds of RDP evaluations. A remembered sigma is used only after one evaluation
    confirms it still meets the target, so an edited or corrupt file can cost accuracy (a
    larger sigma) but never privacy; anything unusable is recalibrated and rewritten."""
    key = json.dumps([target_epsilon, delta, sample_rate, steps] + ([list(m) for m in extra] if extra else []))
    try:
        remembered = json.loads(Path(cache).read_text())
    except (OSError, ValueError):
        remembered = {}
    sigma = remembered.get(key) if isinstance(remembered, dict) else None
    if isinstance(sigma, float) and 0 < sigma <= 1e4 and epsilon_for(
            sample_rate=sample_rate, noise_multiplier=sigma, steps=steps, delta=delta, extra=extra) <= target_epsilon:
        return sigma
    sigma = calibrate_noise(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps,
                            extra=extra)
    remembered = {**(remembered if isinstance(remembered, dict) else {}), key: sigma}
    temporary = Path(cache).with_name(f".{Path(cache).name}.{os.getpid()}")
    try:
        temporary.write_text(json.dumps(remembered, sort_keys=True))
        os.replace(temporary, cache)
    except OSError:  # a read-only node directory: calibrate every time
        temporary.unlink(missing_ok=True)
    return sigma


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
           delta: float) -> "DPSpend":
        """Account a run of `steps` DP-SGD steps."""
        return cls(mechanism=DP_SGD, sample_rate=sample_rate,
                   noise_multiplier=noise_multiplier, steps=steps, clip_norm=clip_norm, delta=delta,
                   epsilon=epsilon_for(sample_rate=sample_rate, noise_multiplier=noise_multiplier,
                                       steps=steps, delta=delta))

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



def compose_epsilon(mechanisms: Iterable[GaussianMechanism], delta: float) -> float:
    """Epsilon at `delta` of `mechanisms` composed (RDP curves added over `RDP_ORDERS`): the very
    composition the ledger charges with, public so that anyone can recompute a logged epsilon."""
    return _epsilon(mechanisms, delta)


EPSILON_TOLERANCE = 1e-6
"""How far a logged epsilon may sit from its recomputation (floating point only)."""


@dataclass(frozen=True)
class Recomputed:
    """One logged epsilon of a privacy report and what its logged parameters give."""

    hospital: str
    key: str
    logged: float
    recomputed: float

    @property
    def ok(self) -> bool:
        return abs(self.logged - self.recomputed) <= EPSILON_TOLERANCE


def recompute_report(report: dict) -> list[Recomputed]:
    """Every epsilon of a training run's privacy report recomputed from the parameters beside it:
    per hospital, DP-SGD alone, its DP evaluations alone (when the report has them) and the two
    composed (`run_epsilon`). The one verifier behind `fedrisk privacy verify` and
    `fedrisk release create`. Raises KeyError, TypeError or ValueError for a malformed report and
    BudgetParameterError for parameters that are no DP mechanism (a noise multiplier of 0)."""
    checks = []
    for name, h in sorted(dict(report["hospitals"]).items()):
        delta = float(h["delta"])
        dp_sgd = GaussianMechanism(float(h["sample_rate"]), float(h["noise_multiplier"]), int(h["steps"]))
        checks.append(Recomputed(name, "epsilon", float(h["epsilon"]), compose_epsilon([dp_sgd], delta)))
        evaluation = h.get("evaluation")
        if evaluation:
            released = GaussianMechanism.gaussian_release(noise_multiplier=float(evaluation["noise_multiplier"]),
                                                          count=int(evaluation["count"]))
            checks.append(Recomputed(name, "evaluation.epsilon", float(evaluation["epsilon"]),
                                     compose_epsilon([released], delta)))
            checks.append(Recomputed(name, "run_epsilon", float(h["run_epsilon"]),
                                     compose_epsilon([dp_sgd, released], delta)))
    return checks


SPEND_FORMAT = 1
"""Version of `HospitalSpend`'s wire form."""


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
    never the server's config."""

    run_epsilon: float
    ledger_epsilon: float
    training: DPSpend | None = None
    evaluation: GaussianMechanism | None = None
    evaluation_epsilon: float = 0.0

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form: the wire value and the checkpoint's."""
        return {"format": SPEND_FORMAT, "run_epsilon": self.run_epsilon, "ledger_epsilon": self.ledger_epsilon,
                "training": self.training.to_dict() if self.training else None,
                "evaluation": ({**self.evaluation.to_dict(), "epsilon": self.evaluation_epsilon}
                               if self.evaluation else None)}

    def to_wire(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: object) -> "HospitalSpend":
        """Parse a spend a hospital sent (or a checkpoint kept). Raises ValueError naming the field."""
        if not isinstance(data, dict) or data.get("format") != SPEND_FORMAT:
            raise ValueError(f"privacy spend is not a format-{SPEND_FORMAT} record")
        training = evaluation = None
        if data.get("training") is not None:
            t = data["training"]
            if not isinstance(t, dict):
                raise ValueError("privacy spend field 'training' must be a record")
            if t.get("mechanism") != DP_SGD or t.get("accountant") != ACCOUNTANT:
                raise ValueError(f"privacy spend field 'training' must name {DP_SGD!r} and {ACCOUNTANT!r}")
            training = DPSpend(mechanism=DP_SGD,
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
                   evaluation_epsilon=_number(data["evaluation"], "epsilon") if evaluation else 0.0)

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
                "run_epsilon": self.run_epsilon, "ledger_epsilon": self.ledger_epsilon}
