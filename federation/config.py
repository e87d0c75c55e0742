"""Run configuration: every parameter a federated training run depends on, in one place.

A `RunConfig` travels three ways: built by the CLI, read from Flower's run config (so
`flwr run .` works with the `[tool.flwr.app.config]` table in pyproject.toml), and logged to
MLflow as the run's parameters. Privacy parameters travel together so that anyone can recompute
each hospital's epsilon from the logged values.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from federation.errors import ConfigError

MODEL_KINDS = ("mlp", "logreg")
DEFAULT_HIDDEN = (64, 32)
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def model_layers(kind: str) -> tuple[str, tuple[int, ...]]:
    """Split a model spec into its family and hidden widths: "mlp" is inputs-64-32-1,
    "mlp:1000,960" is inputs-1000-960-1 (about 1M parameters), "logreg" has no hidden layer."""
    family, _, widths = str(kind).partition(":")
    if family == "logreg" and not widths:
        return family, ()
    if family != "mlp":
        raise ConfigError(f"model must be 'mlp', 'mlp:W1,W2,...' or 'logreg', got {kind!r}")
    if not widths:
        return family, DEFAULT_HIDDEN
    try:
        hidden = tuple(int(w) for w in widths.split(","))
    except ValueError:
        raise ConfigError(f"model {kind!r}: hidden widths must be whole numbers, e.g. 'mlp:128,64'") from None
    if not hidden or any(not 1 <= w <= 8192 for w in hidden) or len(hidden) > 8:
        raise ConfigError(f"model {kind!r}: 1 to 8 hidden layers of 1 to 8192 units each")
    return family, hidden
STANDARD_INPUTS = 40
DEFAULT_PURPOSE = "credit-risk-research"


@dataclass(frozen=True)
class RunConfig:
    """Parameters of one federated training run.

    Attributes:
        data_dir: directory of hospital export files (`hospital_*.parquet|csv`); simulation only:
            used to provision node directories when `nodes_dir` is empty.
        nodes_dir: directory of hospital node directories (`fedrisk node init`); each holds
            the hospital's export path, schema, budget ledger and audit log.
        provision_budget: epsilon budget per purpose given to nodes provisioned for a simulation.
        schema_file: export schema of provisioned nodes (default: the synthetic export's).
        keys_dir: directory written by `fedrisk keys init` (hospital and server contexts).
        run_dir: where the run writes its MLflow store, release artifact and reports.
        num_hospitals: hospitals that take part; the run waits for this many nodes.
        rounds: federated rounds (default 5).
        local_epochs: DP-SGD epochs per hospital per round (default 1).
        sample_rate: Poisson sampling rate q of DP-SGD, the same at every hospital, so it
            reveals nothing about a hospital's size (default 0.01: 100 steps per epoch).
        clip_norm: per-sample gradient L2 clip C (default 1.0).
        learning_rate: local optimiser step size (default 0.01, Adam; chosen on the synthetic
            generator by `experiments.training_dynamics`, never on a hospital's data).
        server_momentum: FedAvgM momentum beta applied, at every hospital, to the sequence of
            decrypted round aggregates (post-processing of DP outputs: it costs no budget);
            0 is plain FedAvg.
        server_learning_rate: FedAvgM step size eta on that momentum (default 1.0).
        target_epsilon: epsilon each hospital may spend on the whole run (default 1.0).
        delta: delta of the (epsilon, delta) guarantee; must be below 1/n at each hospital.
        model: "mlp" (inputs-64-32-1), "mlp:W1,W2,..." (other hidden widths) or "logreg".
        features: "standard" (the 40-input credit-risk contract of federation.features) or
            "schema" (inputs encoded from the export schema's declared bounds and categories).
        n_features: number of model inputs of a "schema" run (every hospital checks its own).
        seed: seeds model initialisation and every hospital's sampler.
        purpose: the declared purpose of the run; only records consenting to it are used.
        tracking_uri: MLflow tracking URI; empty means a SQLite store under run_dir (library use: the
            CLI passes its workspace's store, `federation.workspace`).
        experiment: MLflow experiment name.
        min_contributors: fewest hospitals an aggregate must contain before any hospital
            agrees to decrypt it (so no single hospital's update is ever revealed).
        round_timeout: seconds the server waits for replies to one message of a round; a hospital
            that has not replied by then is left out of that step (a straggler) and asked again
            in the next round.
        min_replies: fewest hospitals whose valid replies a round needs to complete; 0 (the
            default) means all `num_hospitals`. Must be at least `min_contributors`.
        run_id: the run's name, which hospitals' ledgers charge rounds to; empty means the server
            names it (or takes it from the run directory's checkpoint, when resuming).
        query: a cohort query (federation.query) to answer instead of training: a YAML or JSON
            file on the server, or the query as inline JSON. `run_id` then names the query run.
        model_file: a released model.npz that a `risk_score` query scores with (its SHA-256 must
            be the one the query names); the weights travel to hospitals with the query.
        evaluation_epsilon: epsilon of the run's DP evaluations, all rounds together; 0 (the
            default) means a quarter of `target_epsilon`, at most 0.5. Each round's federated evaluation is a Gaussian release charged to every
            hospital's ledger, and DP-SGD's noise is calibrated so that training and evaluation
            together meet `target_epsilon`.

    DP-SGD and CKKS are not settings: a hospital node always trains under DP and aggregates under
    encryption, whatever a run config says (a config naming `dp` or `he` is refused as unknown).
    """

    data_dir: str = "data"
    nodes_dir: str = ""
    provision_budget: float = 10.0
    schema_file: str = ""
    keys_dir: str = "keys"
    run_dir: str = "runs/latest"
    num_hospitals: int = 3
    rounds: int = 5
    local_epochs: int = 1
    sample_rate: float = 0.01
    clip_norm: float = 1.0
    learning_rate: float = 0.01
    server_momentum: float = 0.0
    server_learning_rate: float = 1.0
    target_epsilon: float = 1.0
    delta: float = 1e-5
    model: str = "mlp"
    features: str = "standard"
    n_features: int = 0
    seed: int = 0
    purpose: str = DEFAULT_PURPOSE
    tracking_uri: str = ""
    experiment: str = "fedrisk"
    min_contributors: int = 2
    round_timeout: float = 600.0
    min_replies: int = 0
    run_id: str = ""
    query: str = ""
    model_file: str = ""
    evaluation_epsilon: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first parameter that is out of range."""
        if not (isinstance(self.target_epsilon, (int, float)) and self.target_epsilon > 0
                and math.isfinite(self.target_epsilon)):
            raise ConfigError(f"target-epsilon must be a positive number, got {self.target_epsilon!r}")
        if not (0.0 < self.delta < 1.0):
            raise ConfigError(f"delta must lie in (0, 1), got {self.delta!r}")
        if not (0.0 < self.sample_rate <= 0.5):
            raise ConfigError(f"sample-rate must lie in (0, 0.5], got {self.sample_rate!r}")
        steps = 1.0 / self.sample_rate
        if abs(steps - round(steps)) > 1e-9:
            raise ConfigError(f"sample-rate must be 1/k for a whole k, got {self.sample_rate!r}")
        if not (isinstance(self.evaluation_epsilon, (int, float)) and math.isfinite(self.evaluation_epsilon)
                and 0 <= self.evaluation_epsilon < self.target_epsilon / 2):
            raise ConfigError(f"evaluation-epsilon must be 0 (a quarter of target-epsilon) or below half of target-epsilon "
                              f"({self.target_epsilon:g}), got {self.evaluation_epsilon!r}")
        if self.provision_budget <= 0:
            raise ConfigError(f"provision-budget must be positive, got {self.provision_budget!r}")
        if self.clip_norm <= 0:
            raise ConfigError(f"clip-norm must be positive, got {self.clip_norm!r}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning-rate must be positive, got {self.learning_rate!r}")
        if not (0.0 <= self.server_momentum < 1.0):
            raise ConfigError(f"server-momentum must lie in [0, 1), got {self.server_momentum!r}")
        if not (0.0 < self.server_learning_rate <= 10.0):
            raise ConfigError(f"server-learning-rate must lie in (0, 10], got {self.server_learning_rate!r}")
        for name in ("rounds", "local_epochs", "num_hospitals", "min_contributors"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")
        if self.features not in ("standard", "schema"):
            raise ConfigError(f"features must be 'standard' or 'schema', got {self.features!r}")
        if self.features == "schema" and self.n_features < 1:
            raise ConfigError("n-features must be given (>= 1) for a run with features = 'schema'")
        model_layers(self.model)
        if self.min_contributors > self.num_hospitals:
            raise ConfigError(
                f"min-contributors ({self.min_contributors}) exceeds num-hospitals ({self.num_hospitals})")
        if not isinstance(self.min_replies, int) or self.min_replies < 0 or self.min_replies > self.num_hospitals:
            raise ConfigError(f"min-replies must be 0 (all) or at most num-hospitals ({self.num_hospitals}), "
                              f"got {self.min_replies!r}")
        if 0 < self.min_replies < self.min_contributors:
            raise ConfigError(f"min-replies ({self.min_replies}) is below min-contributors ({self.min_contributors}): "
                              "hospitals would refuse to decrypt such a round")
        if not (isinstance(self.round_timeout, (int, float)) and self.round_timeout > 0):
            raise ConfigError(f"round-timeout must be a positive number of seconds, got {self.round_timeout!r}")
        if self.run_id and not RUN_ID_PATTERN.fullmatch(self.run_id):
            raise ConfigError(f"run-id must be 1-64 letters, digits, '.', '_' or '-', got {self.run_id!r}")
        if not self.purpose or not self.purpose.replace("-", "").isalnum():
            raise ConfigError(f"purpose must be a slug like 'credit-risk-research', got {self.purpose!r}")

    @property
    def input_size(self) -> int:
        """Number of model inputs: 40 for the standard contract, else `n_features`."""
        return STANDARD_INPUTS if self.features == "standard" else self.n_features

    @property
    def evaluation_budget(self) -> float:
        """Epsilon of the run's DP evaluations, all rounds together."""
        return self.evaluation_epsilon or min(self.target_epsilon / 4, 0.5)

    @property
    def required_replies(self) -> int:
        """Hospitals whose valid replies a round needs."""
        return self.min_replies or self.num_hospitals

    @property
    def steps_per_epoch(self) -> int:
        """DP-SGD steps per local epoch: 1/q, the same at every hospital."""
        return int(round(1.0 / self.sample_rate))

    @property
    def planned_steps(self) -> int:
        """DP-SGD steps a hospital takes over the whole run; noise is calibrated to this."""
        return self.rounds * self.local_epochs * self.steps_per_epoch

    @property
    def mlflow_uri(self) -> str:
        """The tracking URI in force: the explicit one, else SQLite under run_dir."""
        if self.tracking_uri:
            return self.tracking_uri
        from federation.run_dir import MLFLOW_DB

        return f"sqlite:///{(Path(self.run_dir).resolve() / MLFLOW_DB)}"

    def fingerprint(self) -> str:
        """SHA-256 (16 hex) of everything that decides what a run computes: a checkpoint may only
        be resumed by the same run. Paths, tracking and timeouts are not part of it."""
        import hashlib
        import json

        ignored = {"data-dir", "nodes-dir", "keys-dir", "run-dir", "tracking-uri", "experiment",
                   "round-timeout", "min-replies", "run-id", "schema-file", "provision-budget", "query", "model-file"}
        decisive = {k: v for k, v in self.to_user_config().items() if k not in ignored}
        return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_user_config(self) -> dict[str, Any]:
        """Flower run-config form: kebab-case keys, scalar values."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_user_config(cls, values: Mapping[str, Any]) -> "RunConfig":
        """Build from Flower's run config (kebab-case keys); unknown keys are an error."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown run-config key {key!r}")
            kind = known[name].type
            try:
                if kind in ("int", int):
                    value = int(value)
                elif kind in ("float", float):
                    value = float(value)
                elif kind in ("bool", bool):
                    value = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
                else:
                    value = str(value)
            except (TypeError, ValueError):
                raise ConfigError(f"run-config key {key!r} has a value of the wrong type: {value!r}") from None
            kwargs[name] = value
        return cls(**kwargs)
