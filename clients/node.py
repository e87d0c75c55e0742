"""A hospital node's side of the protocol, independent of how messages travel.

The node keeps no model between rounds: the server sends the chain of encrypted aggregates,
and the node replays it from the public initial model (decrypting is cheap). So a node that
restarts, or joins late, computes exactly the global model every other node computes.

What leaves the node: ciphertexts, and public privacy accounting values. Nothing else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from clients.data import HospitalData
from clients.evaluation import risk_metrics
from clients.node_state import NodeState
from federation import he_codec
from federation.config import RunConfig
from federation.errors import ConfigError, FedriskError, KeyMaterialError, PrivacyBudgetError, ProtocolError
from federation.he_codec import CENSUS_UNIT, CONTRIBUTOR_UNIT, HospitalKey, PlaintextCodec
from federation.messages import EVAL_LENGTH
from federation.model import initial_weights, load_model, num_parameters, predict_proba, weights_digest
from privacy.accounting import DPSpend, check_delta, remembered_noise
from privacy.audit import RELEASE, ROUND_TRAIN, RUN_START, Digest
from privacy.ledger import GaussianMechanism


_DATA_CACHE: dict[tuple, HospitalData] = {}
_CACHE_LIMIT = 16  # hospitals one simulation worker may serve in turn
_KEY_CACHE: dict[tuple[str, float], HospitalKey] = {}
NOISE_CACHE = "noise_calibrations.json"
"""In the node directory: the sigmas this node has calibrated (see `remembered_noise`)."""


def _cached_data(state: NodeState, purpose: str, features: str) -> HospitalData:
    key = (str(state.directory), purpose, features, *state.inputs_stamp())
    if key not in _DATA_CACHE:
        if len(_DATA_CACHE) >= _CACHE_LIMIT:
            _DATA_CACHE.pop(next(iter(_DATA_CACHE)))
        _DATA_CACHE[key] = state.load_records(purpose, features=features)
    return _DATA_CACHE[key]


def _cached_key(path: Path) -> HospitalKey:
    key = (str(path), path.stat().st_mtime if path.exists() else 0.0)
    if key not in _KEY_CACHE:
        _KEY_CACHE[key] = HospitalKey.load(path)
    return _KEY_CACHE[key]


@dataclass(frozen=True)
class TrainOutcome:
    """What a train step sends back: ciphertexts and public accounting values."""

    ciphertexts: list[bytes]
    spend: DPSpend
    train_seconds: float
    he_seconds: float


class HospitalNode:
    """One hospital: its node state (data, schema, ledger, audit log), its copy of the
    federation's CKKS secret key, and a run config."""

    def __init__(self, config: RunConfig, state: NodeState, key_file: Path | None = None) -> None:
        self.config = config
        self.state = state
        self.name = state.hospital
        self.key: HospitalKey | PlaintextCodec = (
            _cached_key(Path(key_file or state.key_file)) if config.he else PlaintextCodec())
        self.length = num_parameters(config.model, config.input_size)
        self._data: HospitalData | None = None

    @property
    def data(self) -> HospitalData:
        """The consented, de-identified, encoded records (loaded on first use, audited)."""
        if self._data is None:
            self._data = _cached_data(self.state, self.config.purpose, self.config.features)
            if self._data.train_x.shape[1] != self.config.input_size:
                self._refuse(ConfigError(
                    f"{self.name}: the export encodes to {self._data.train_x.shape[1]} model inputs, "
                    f"the run expects {self.config.input_size}"))
            if self.config.dp and not check_delta(self.config.delta, self._data.n_train):
                self._refuse(PrivacyBudgetError(
                    f"{self.name}: delta {self.config.delta:g} is not below 1/n for this hospital's records"))
            if self.config.sample_rate * self._data.n_train < 1.0:
                self._refuse(PrivacyBudgetError(
                    f"{self.name}: too few consented records for sample-rate {self.config.sample_rate:g}"))
        return self._data

    def _refuse(self, error: FedriskError) -> None:
        self.state.audit().refusal(error, purpose=self.config.purpose)
        raise error

    def _mechanism(self, steps: int) -> GaussianMechanism:
        return GaussianMechanism(sample_rate=self.config.sample_rate,
                                 noise_multiplier=self.noise_multiplier(), steps=steps)

    def begin_run(self, run_id: str) -> None:
        """Before any record is touched: refuse a run whose planned spend would exceed what is
        left of this hospital's budget for the purpose; then load (and audit) the data.

        A resumed run (same `run_id`) is checked for the steps it has not yet charged only."""
        cfg = self.config
        for key in [k for k in _DATA_CACHE if k[0] == str(self.state.directory)]:
            del _DATA_CACHE[key]  # every run reads (and audits) its data afresh
        self._data = None
        charged = 0
        if cfg.dp:
            with self.state.ledger() as ledger:
                try:
                    budget = ledger.budget(cfg.purpose)
                    charged = sum(c.mechanism.steps for c in ledger.history(cfg.purpose) if c.run_id == run_id)
                    remaining = max(cfg.planned_steps - charged, 0)
                    planned = ledger.would_spend(cfg.purpose, self._mechanism(remaining)) if remaining \
                        else ledger.spent(cfg.purpose)
                except FedriskError as error:
                    self._refuse(error)
                spent = ledger.spent(cfg.purpose)
            if planned > budget.epsilon_total:
                self._refuse(PrivacyBudgetError(
                    f"{self.name}: run would bring purpose {cfg.purpose!r} to epsilon {planned:.3f}, "
                    f"over its budget of {budget.epsilon_total:g} (spent {spent:.3f})"))
        self.state.audit().append(RUN_START, purpose=cfg.purpose, details={
            "run": run_id, "rounds": cfg.rounds, "target-epsilon": cfg.target_epsilon,
            "steps-already-charged": charged})
        _ = self.data

    def check_federation(self, key_id: str, params_id: str) -> None:
        """Refuse to work under another key or other CKKS parameters than the server's."""
        if params_id != self.key.params_id:
            raise KeyMaterialError(f"{self.name}: the server's CKKS parameters differ from this hospital's")
        if key_id != self.key.key_id:
            raise KeyMaterialError(f"{self.name}: this hospital's CKKS key is not the federation's key")

    # --- census -------------------------------------------------------------------------
    def census(self) -> list[bytes]:
        """Encrypted [n_k * 2^-24, contributor]: lets hospitals learn the federation's size
        (to normalise updates) without the server learning any hospital's."""
        return self.key.encrypt(np.array([self.data.n_train * CENSUS_UNIT, CONTRIBUTOR_UNIT]))

    def census_total(self, census: Sequence[bytes]) -> float:
        """Decrypt the summed census: N_hat, the federation's training record count."""
        values = self.key.decrypt(census, 2)
        self._check_contributors(values[1], "census")
        return float(values[0] / CENSUS_UNIT)

    def _check_contributors(self, value: float, what: str) -> int:
        contributors = int(round(value / CONTRIBUTOR_UNIT))
        if contributors < self.config.min_contributors:
            raise ProtocolError(
                f"{self.name}: refusing to decrypt a {what} holding {contributors} hospital(s); "
                f"at least {self.config.min_contributors} are required")
        return contributors

    # --- global model ---------------------------------------------------------------------
    def global_weights(self, chain: Sequence[bytes]) -> np.ndarray:
        """Replay the chain of encrypted aggregates on the public initial model."""
        weights = initial_weights(self.config.model, self.config.seed, self.config.input_size)
        per_round = he_codec.ciphertexts_for(self.length + 2) if self.config.he else 1
        if len(chain) % per_round:
            raise ProtocolError(f"{self.name}: aggregate chain of {len(chain)} ciphertexts is not "
                                f"whole rounds of {per_round}")
        rounds = len(chain) // per_round
        for r in range(rounds):
            values = self.key.decrypt(chain[r * per_round:(r + 1) * per_round], self.length + 2)
            self._check_contributors(values[-1], f"round {r + 1} aggregate")
            share = values[-2]
            if share <= 0:
                raise ProtocolError(f"{self.name}: round {r + 1} aggregate carries no records")
            weights = weights + values[:self.length] / share
        return weights

    # --- train ----------------------------------------------------------------------------
    def noise_multiplier(self) -> float:
        """Sigma for the whole planned run, so its epsilon meets the target at delta."""
        cfg = self.config
        return remembered_noise(self.state.directory / NOISE_CACHE, target_epsilon=cfg.target_epsilon,
                                delta=cfg.delta, sample_rate=cfg.sample_rate, steps=cfg.planned_steps)

    def _charge_round(self, run_id: str, server_round: int, round_steps: int, start_digest: str) -> int:
        """Charge this round to the ledger before it trains, and return the DP-SGD steps the run
        had already charged for earlier rounds (the ledger is the record of what ran).

        The charge is named by the round and the model it starts from. The round's sampling and
        noise come from a seed derived from the node's secret, the run and the round, so
        training the same round again from the same model (the coordinator restarted, a reply
        was lost) repeats the same computation: it releases nothing new and is not charged
        again. The same round from a different model would reuse that noise on other inputs,
        and is refused."""
        cfg = self.config
        key = f"round-{server_round}:{start_digest[:16]}"
        with self.state.ledger() as ledger:
            earlier = [c for c in ledger.history(cfg.purpose) if c.run_id == run_id and c.idempotency_key != key]
            if any(c.idempotency_key.split(":")[0] == f"round-{server_round}" for c in earlier):
                self._refuse(PrivacyBudgetError(
                    f"{self.name}: round {server_round} of run {run_id} was already trained from a different "
                    "global model; training it again would spend the budget twice"))
            steps_so_far = sum(charge.mechanism.steps for charge in earlier)
            if steps_so_far + round_steps > cfg.planned_steps:
                self._refuse(PrivacyBudgetError(
                    f"{self.name}: round {server_round} would exceed the {cfg.planned_steps} DP-SGD steps "
                    "the noise was calibrated for"))
            try:
                charge = ledger.charge(cfg.purpose, self._mechanism(round_steps), run_id=run_id,
                                       kind="training", actor=self.name, slot=key, identity=key)
            except FedriskError as error:
                self._refuse(error)
        self.state.audit().append(ROUND_TRAIN, purpose=cfg.purpose, epsilon=charge.epsilon_after,
                                  details={"run": run_id, "round": server_round, "steps": round_steps})
        return steps_so_far

    def train(self, server_round: int, census: Sequence[bytes], chain: Sequence[bytes],
              run_id: str = "local") -> TrainOutcome:
        """One round: replay the global model, charge the round to the ledger, run DP-SGD,
        encrypt the weighted delta."""
        cfg = self.config
        began = time.perf_counter()
        from clients.training import LocalTraining, train_local  # torch + opacus: train messages only

        n_hat = self.census_total(census)
        start = self.global_weights(chain)
        he_seconds = time.perf_counter() - began
        round_steps = cfg.local_epochs * cfg.steps_per_epoch
        start_digest = weights_digest(start)
        steps_so_far = self._charge_round(run_id, server_round, round_steps, start_digest) if cfg.dp else 0
        sigma = self.noise_multiplier() if cfg.dp else 0.0
        result = train_local(start, self.data.train_x, self.data.train_y, LocalTraining(
            model_kind=cfg.model, epochs=cfg.local_epochs, sample_rate=cfg.sample_rate,
            learning_rate=cfg.learning_rate, clip_norm=cfg.clip_norm, noise_multiplier=sigma,
            seed=cfg.seed * 1_000_003 + server_round * 101 + sum(map(ord, self.name)), dp=cfg.dp,
            n_features=cfg.input_size,
            secret_seed=self.state.pseudonym_key().derive_seed("dp-sgd", run_id, server_round, cfg.fingerprint())))
        began = time.perf_counter()
        share = self.data.n_train / n_hat
        update = np.concatenate([share * (result.weights - start), [share, CONTRIBUTOR_UNIT]])
        ciphertexts = self.key.encrypt(update)
        he_seconds += time.perf_counter() - began
        total_steps = steps_so_far + result.steps
        spend = DPSpend.of(sample_rate=cfg.sample_rate, noise_multiplier=sigma, steps=total_steps if cfg.dp else 0,
                           clip_norm=cfg.clip_norm, delta=cfg.delta)
        return TrainOutcome(ciphertexts, spend, result.seconds, he_seconds)

    # --- evaluate -------------------------------------------------------------------------
    def evaluate(self, census: Sequence[bytes], chain: Sequence[bytes]) -> list[bytes]:
        """Evaluate the global model on the local test split; encrypt the weighted metrics."""
        n_hat = self.census_total(census)
        weights = self.global_weights(chain)
        probabilities = predict_proba(load_model(self.config.model, weights, self.config.input_size),
                                      self.data.test_x)
        metrics = risk_metrics(self.data.test_y, probabilities)
        weight = len(self.data.test_y) / n_hat
        auc_weight = 0.0 if np.isnan(metrics["auc"]) else weight
        vector = np.array([auc_weight * np.nan_to_num(metrics["auc"]), auc_weight,
                           weight * metrics["brier"], weight * min(metrics["log-loss"], 1.0 / max(weight, 1e-12)),
                           weight, CONTRIBUTOR_UNIT])
        return self.key.encrypt(vector)

    def reveal(self, aggregate: Sequence[bytes], length: int = EVAL_LENGTH) -> list[float]:
        """Decrypt a summed metric or query vector of `length` values (its last slot counts the
        hospitals in it), only if enough hospitals are in it."""
        values = self.key.decrypt(aggregate, length)
        self._check_contributors(values[-1], "metric aggregate")
        return [float(v) for v in values]

    # --- release --------------------------------------------------------------------------
    def release(self, chain: Sequence[bytes], run_id: str = "local") -> tuple[np.ndarray, str]:
        """Decrypt the final model (DP by post-processing) and its SHA-256. Audited."""
        weights = self.global_weights(chain).astype(np.float32)
        digest = weights_digest(weights)
        self.state.audit().append(RELEASE, purpose=self.config.purpose,
                                  details={"run": run_id, "sha256": Digest(digest)})
        return weights, digest
