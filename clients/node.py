"""A hospital node's side of the protocol, independent of how messages travel.

Every message is hostile input: the node answers only what its own policy (`clients.policy`, in
its node directory) allows, and DP-SGD and CKKS are always on. The node keeps no model between
rounds: the server sends every hospital's signed contributions so far (census, then each
round's updates), and the node rebuilds the global model by verified decryption
(`clients.decryption`): it adds the contributions it verified itself and decrypts each step
once, flooded; a repeated step returns the recorded values. A node that restarts, or joins
late, computes exactly the global model every other node computes.

Every noisy output is charged to the ledger before it is computed, once, under one identity:
(purpose, run, round, start-model digest, run-config fingerprint, digest of the records used).
Its DP seed derives from exactly that identity, and the ledger's slot for the round refuses any
other identity, so the same round can never be trained (or evaluated) twice with fresh noise.

What leaves the node: signed ciphertexts, public privacy accounting values, and the flooded
values of evaluation and query aggregates (DP) and of the final model (DP by post-processing).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from clients import faults
from clients.anchoring import check_not_rolled_back
from clients.data import HospitalData, LoadCache
from clients.decryption import Expected, VerifiedDecryptor
from clients.node_state import NodeState
from clients.policy import NodePolicy, PolicyRefusal
from federation import round_evaluation, stores
from federation.config import RunConfig
from federation.contributions import ContributionHeader, FederationManifest, SignedContribution
from federation.errors import ConfigError, FedriskError, KeyMaterialError, PrivacyBudgetError, ProtocolError
from federation.he_codec import CENSUS_UNIT, CONTRIBUTOR_UNIT, HospitalKey, check_file_mode, ciphertext_digest
from federation.messages import CENSUS_LENGTH, EVAL_UNIT
from federation.model import initial_weights, load_model, num_parameters, predict_proba, weights_digest
from privacy.accounting import DPSpend, HospitalSpend, remembered_noise
from privacy.audit import RELEASE, ROUND_EVALUATE, ROUND_TRAIN, RUN_START, Digest
from privacy.ledger import GaussianMechanism

_DATA_CACHE: LoadCache[HospitalData] = LoadCache()  # every hospital a simulation worker serves, to a byte budget
_KEY_CACHE: dict[tuple[str, float], HospitalKey] = {}
NOISE_CACHE = "noise_calibrations.json"
"""In the node directory: the sigmas this node has calibrated (see `remembered_noise`)."""
EVALUATION_LENGTH = round_evaluation.LENGTH + 1
RUNS_FILE = "runs.sqlite"
"""In the node directory: the run config fingerprint each run id was first seen with."""  # the DP histogram and the contributor slot


def _cached_data(state: NodeState, purpose: str, features: str) -> HospitalData:
    key = (str(state.directory), purpose, features, *state.inputs_stamp())
    return _DATA_CACHE.get(key, lambda: state.load_records(purpose, features=features))


def _cached_key(path: Path, sealed: bool) -> HospitalKey:
    key = (str(path), path.stat().st_mtime_ns if path.exists() else 0, sealed)
    if key not in _KEY_CACHE:
        _KEY_CACHE[key] = HospitalKey.load(path, require_sealed=sealed)
        check_file_mode(path)
    return _KEY_CACHE[key]


def records_digest(x: np.ndarray, y: np.ndarray) -> str:
    """SHA-256 (16 hex) of the encoded records a computation used."""
    digest = hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(y, dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]


def charge_identity(*parts: object) -> str:
    """The identity a ledger charge and its DP seed are bound to (hex)."""
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class TrainOutcome:
    """What a train step sends back: a signed contribution and the run's spend at this hospital."""

    contribution: SignedContribution
    spend: HospitalSpend
    train_seconds: float
    he_seconds: float


@dataclass(frozen=True)
class EvaluationOutcome:
    """What an evaluate step sends back: a signed DP evaluation and the run's spend at this hospital."""

    contribution: SignedContribution
    spend: HospitalSpend


class HospitalNode:
    """One hospital: its node state (data, schema, ledger, audit log, policy, manifest), its copy
    of the federation's CKKS secret key, its signing key, and the run config it was sent."""

    def __init__(self, config: RunConfig, state: NodeState, key_file: Path | None = None,
                 policy: NodePolicy | None = None) -> None:
        self.config = config
        self.state = state
        self.name = state.hospital
        self.key = _cached_key(Path(key_file or state.key_file), state.sealed)
        self.policy = policy if policy is not None else NodePolicy.load(state.directory)
        self.length = num_parameters(config.model, config.input_size)
        self._data: HospitalData | None = None
        self._manifest: FederationManifest | None = None
        self._decryptor: VerifiedDecryptor | None = None

    # --- admission: the node's policy decides ----------------------------------------------
    def _refuse(self, error: FedriskError) -> None:
        self.state.audit().refusal(error, purpose=self.config.purpose)
        error.audited = True  # type: ignore[attr-defined]
        raise error

    def check_federation(self, key_id: str, params_id: str) -> None:
        """Refuse to work under another key or other CKKS parameters than the server's."""
        if params_id != self.key.params_id:
            self._refuse(KeyMaterialError(f"{self.name}: the server's CKKS parameters differ from this hospital's"))
        if key_id != self.key.key_id:
            self._refuse(KeyMaterialError(f"{self.name}: this hospital's CKKS key is not the federation's key"))

    def _ledger_terms(self, purpose: str) -> tuple[list[str], float | None]:
        with self.state.ledger() as ledger:
            purposes = ledger.purposes()
            delta = ledger.budget(purpose).delta if purpose in purposes else None
        return purposes, delta

    def admit(self, federation: str) -> None:
        """Before any record is read: refuse a run config the hospital's policy does not allow
        (purpose, epsilon, rounds, delta, min-contributors, model size, federation)."""
        cfg = self.config
        purposes, delta = self._ledger_terms(cfg.purpose)
        try:
            self.policy.check_run(purpose=cfg.purpose, target_epsilon=cfg.target_epsilon,
                                  evaluation_epsilon=cfg.evaluation_budget, rounds=cfg.rounds, delta=cfg.delta,
                                  min_contributors=cfg.min_contributors, model_parameters=self.length,
                                  federation=federation, key_id=self.key.key_id, ledger_purposes=purposes,
                                  ledger_delta=delta)
        except PolicyRefusal as error:
            self._refuse(error)

    def check_rollback(self, relayed: Sequence[tuple[str, bytes]]) -> str:
        """Refuse to work while this node is behind a head anchored outside it; return its head."""
        try:
            return check_not_rolled_back(self.state, self.name, relayed, self.manifest).encode()
        except FedriskError as error:
            self._refuse(error)
            raise

    @property
    def manifest(self) -> FederationManifest:
        """The federation manifest this hospital holds."""
        if self._manifest is None:
            try:
                manifest = self.state.manifest()
            except FedriskError as error:
                self._refuse(error)
            if manifest.federation != self.key.key_id:
                self._refuse(ConfigError(f"{self.name}: the federation manifest was made under CKKS key "
                                         f"{manifest.federation}, not this node's key {self.key.key_id}; re-enrol "
                                         "after a key rotation (`fedrisk node enrol`)"))
            self._manifest = manifest
        return self._manifest

    @property
    def decryptor(self) -> VerifiedDecryptor:
        """Verified, flooded, once-per-step decryption under this node's policy floor."""
        if self._decryptor is None:
            floor = self.policy.effective_min_contributors(self.config.min_contributors)
            self._decryptor = VerifiedDecryptor(self.state, self.key, self.manifest, floor)
        return self._decryptor

    @property
    def data(self) -> HospitalData:
        """The consented, de-identified, encoded records (loaded on first use, audited)."""
        if self._data is None:
            self._data = _cached_data(self.state, self.config.purpose, self.config.features)
            if self._data.train_x.shape[1] != self.config.input_size:
                self._refuse(ConfigError(
                    f"{self.name}: the export encodes to {self._data.train_x.shape[1]} model inputs, "
                    f"the run expects {self.config.input_size}"))
            try:
                self.policy.check_records(delta=self.config.delta, records=self._data.n_train)
            except PolicyRefusal as error:
                self._refuse(error)
            if self.config.sample_rate * self._data.n_train < 1.0:
                self._refuse(PrivacyBudgetError(
                    f"{self.name}: too few consented records for sample-rate {self.config.sample_rate:g}"))
        return self._data

    # --- signed contributions ---------------------------------------------------------------
    def seal(self, values: np.ndarray, *, run: str, server_round: int, step: str, kind: str, head: str,
             message_type: str = "") -> SignedContribution:
        """Encrypt `values` and sign them with what they are. The encryption is derandomised by a
        seed only this node can derive from what it encrypts, so the same contribution is the
        same ciphertext every time it is made. A fault the node's own operator injected
        (`clients.faults`) replaces the ciphertexts before signing."""
        values = np.asarray(values, dtype=np.float64)
        seed = hmac.new(self.state.pseudonym_key().secret, "\x1f".join(
            ["fedrisk-encryption", run, str(server_round), step, kind]).encode() + values.tobytes(),
            hashlib.sha512).digest()
        ciphertexts = self.key.encrypt(values, seed=seed)
        key_id = self.key.key_id
        fault = faults.fault_for(self.name, message_type, server_round) if message_type else None
        if fault is not None:
            ciphertexts, named_key = faults.corrupt(fault, ciphertexts, np.asarray(values, dtype=np.float64))
            key_id = named_key or key_id
        header = ContributionHeader(hospital=self.name, run=run, round=server_round, step=step, kind=kind,
                                    length=int(np.asarray(values).size), key_id=key_id,
                                    digest=ciphertext_digest(ciphertexts), head=head)
        return self.state.signing_key().sign(header, ciphertexts)

    # --- census -------------------------------------------------------------------------------
    def pin_run(self, run_id: str) -> None:
        """Bind the run id to this run config at first sight (`runs.sqlite`): a coordinator
        cannot change a run's configuration between its messages (more rounds for a larger
        evaluation noise budget, another learning rate for fresh noise), only start a new run."""
        fingerprint = self.config.fingerprint()
        with closing(stores.connect(self.state.directory / RUNS_FILE, timeout=30.0)) as db, db:
            db.execute("CREATE TABLE IF NOT EXISTS runs (run TEXT PRIMARY KEY, fingerprint TEXT NOT NULL)")
            db.execute("INSERT OR IGNORE INTO runs VALUES (?, ?)", (run_id, fingerprint))
            pinned = db.execute("SELECT fingerprint FROM runs WHERE run = ?", (run_id,)).fetchone()[0]
        if pinned != fingerprint:
            self._refuse(ProtocolError(f"{self.name}: run {run_id} was started under another run configuration; "
                                       "a run's configuration cannot change between its messages"))

    def begin_run(self, run_id: str) -> None:
        """Before any record is touched: refuse a run whose planned spend would exceed what is
        left of this hospital's budget for the purpose; then load (and audit) the data.

        A resumed run (same `run_id`) is checked for the steps it has not yet charged only."""
        cfg = self.config
        self.pin_run(run_id)
        home = str(self.state.directory)
        _DATA_CACHE.drop(lambda key: key[0] == home)  # every run reads (and audits) its data afresh
        self._data = None
        with self.state.ledger() as ledger:
            try:
                budget = ledger.budget(cfg.purpose)
                charged = sum(c.mechanism.steps for c in ledger.history(cfg.purpose)
                              if c.run_id == run_id and c.kind == "training")
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

    def census(self, run_id: str, head: str, message_type: str = "") -> SignedContribution:
        """Signed Enc([n_k * 2^-24, contributor]): lets hospitals learn the federation's size (to
        normalise updates) without the server learning any hospital's."""
        self.begin_run(run_id)
        return self.seal(np.array([self.data.n_train * CENSUS_UNIT, CONTRIBUTOR_UNIT]), run=run_id,
                         server_round=0, step="census", kind="census", head=head, message_type=message_type)

    def census_total(self, census: Sequence[SignedContribution], run_id: str) -> float:
        """N_hat, the federation's training record count, from the verified census. A message may
        leave the census out once this node has verified it: then it is read from this node's own
        record of that decryption (as verified rounds are: `global_weights`)."""
        expected = Expected(run_id, 0, "census", "census", CENSUS_LENGTH)
        if census:
            values = self.decryptor.decrypt(census, expected)
        else:
            recorded = self.decryptor.recorded(expected)
            if recorded is None:
                self._refuse(ProtocolError(f"{self.name}: the server sent no census for run {run_id}, and this node "
                                           "has not verified one"))
            values = recorded
        total = float(values[0] / CENSUS_UNIT)
        if total < 1.0:
            self._refuse(ProtocolError(f"{self.name}: the census holds no records"))
        return total

    # --- global model -------------------------------------------------------------------------
    def unverified_rounds(self, chain: Mapping[int, Sequence[SignedContribution]], run_id: str,
                          through: int) -> list[int]:
        """Rounds up to `through` the server sent no contributions for and this node has not
        verified and decrypted in an earlier message of the run."""
        return [r for r in range(1, through + 1) if r not in chain
                and self.decryptor.recorded(Expected(run_id, r, "train", "update", self.length + 2)) is None]

    def global_weights(self, chain: Mapping[int, Sequence[SignedContribution]], run_id: str,
                       through: int) -> np.ndarray:
        """The global model after round `through`: the public initial model moved by each round's
        verified, decrypted aggregate divided by its summed record share (the FedAvg step),
        through server momentum when the run sets it (FedAvgM: m = beta * m + step,
        w = w + eta * m). Every hospital replays the same public steps, so all agree.

        `chain` need only hold the rounds this node has not yet verified: a round it verified and
        decrypted before is replayed from its own record of that decryption, so the server sends
        each hospital only what is new to it and a message's size does not grow with the round."""
        cfg = self.config
        weights = initial_weights(cfg.model, cfg.seed, cfg.input_size)
        momentum = np.zeros_like(weights)
        missing = self.unverified_rounds(chain, run_id, through)
        if missing:  # checked before anything is decrypted: a refused message costs no decryption
            self._refuse(ProtocolError(f"{self.name}: the server sent no contributions for round {missing[0]}, "
                                       "which this node has not verified"))
        for server_round in range(1, through + 1):
            expected = Expected(run_id, server_round, "train", "update", self.length + 2)
            if server_round in chain:
                values = self.decryptor.decrypt(chain[server_round], expected)
            else:  # verified and decrypted by this node in an earlier message of the run
                values = self.decryptor.recorded(expected)
            share = values[-2]
            if share <= 0:
                self._refuse(ProtocolError(f"{self.name}: round {server_round} aggregate carries no records"))
            momentum = cfg.server_momentum * momentum + values[:self.length] / share
            weights = weights + cfg.server_learning_rate * momentum
        return weights

    # --- train --------------------------------------------------------------------------------
    def _evaluation_mechanism(self) -> GaussianMechanism:
        cfg = self.config
        z = round_evaluation.remembered_evaluation_noise(self.state.directory / NOISE_CACHE, cfg.evaluation_budget,
                                                         cfg.delta, cfg.rounds)
        return GaussianMechanism.gaussian_release(noise_multiplier=z)

    def noise_multiplier(self) -> float:
        """Sigma for the whole planned run, so that DP-SGD composed with the run's DP
        evaluations meets the target epsilon at delta."""
        cfg = self.config
        z = self._evaluation_mechanism().noise_multiplier
        return remembered_noise(self.state.directory / NOISE_CACHE, target_epsilon=cfg.target_epsilon,
                                delta=cfg.delta, sample_rate=cfg.sample_rate, steps=cfg.planned_steps,
                                extra=((1.0, z, cfg.rounds),))

    def _mechanism(self, steps: int) -> GaussianMechanism:
        return GaussianMechanism(sample_rate=self.config.sample_rate,
                                 noise_multiplier=self.noise_multiplier(), steps=steps)

    def _charge(self, run_id: str, slot: str, identity: str, mechanism: GaussianMechanism, kind: str) -> None:
        """Charge one noisy output before it is computed, under the run's cap in this node's
        policy; refuse (audited, nothing charged) a slot already charged for another output."""
        cfg = self.config
        with self.state.ledger() as ledger:
            try:
                run_after = ledger.run_would_spend(cfg.purpose, run_id, mechanism, slot=slot)
                if run_after > self.policy.max_epsilon_per_run + 1e-9:
                    raise PolicyRefusal(f"{self.name}: run {run_id} would spend epsilon {run_after:.3f} at this "
                                        f"hospital, over its policy's max_epsilon_per_run "
                                        f"{self.policy.max_epsilon_per_run:g}")
                ledger.charge(cfg.purpose, mechanism, run_id=run_id, kind=kind, actor=self.name, slot=slot,
                              identity=identity)
            except FedriskError as error:
                self._refuse(error)

    def spend(self, run_id: str) -> HospitalSpend:
        """What run `run_id` has spent at this hospital, read from its ledger (what was charged is
        what ran): its DP-SGD steps as one mechanism, its DP evaluations as another, the two
        composed, and the purpose's total."""
        cfg = self.config
        with self.state.ledger() as ledger:
            charges = [c for c in ledger.history(cfg.purpose) if c.run_id == run_id]
            run_epsilon, ledger_epsilon = ledger.run_spent(cfg.purpose, run_id), ledger.spent(cfg.purpose)
        training = [c.mechanism for c in charges if c.kind == "training"]
        evaluations = [c.mechanism for c in charges if c.kind == "evaluation"]
        dp_sgd = evaluation = None
        if training:
            if len({(m.sample_rate, m.noise_multiplier) for m in training}) != 1:
                raise ProtocolError(f"{self.name}: run {run_id}'s training charges differ in sample rate or noise")
            dp_sgd = DPSpend.of(sample_rate=training[0].sample_rate, noise_multiplier=training[0].noise_multiplier,
                                steps=sum(m.steps for m in training), clip_norm=cfg.clip_norm, delta=cfg.delta)
        if evaluations:
            if len({m.noise_multiplier for m in evaluations}) != 1 or any(m.sample_rate != 1.0 for m in evaluations):
                raise ProtocolError(f"{self.name}: run {run_id}'s evaluation charges differ in noise")
            evaluation = GaussianMechanism.gaussian_release(noise_multiplier=evaluations[0].noise_multiplier,
                                                            count=sum(m.steps for m in evaluations))
        return HospitalSpend(run_epsilon=run_epsilon, ledger_epsilon=ledger_epsilon, training=dp_sgd,
                             evaluation=evaluation,
                             evaluation_epsilon=evaluation.epsilon(cfg.delta) if evaluation else 0.0)

    def train(self, server_round: int, census: Sequence[SignedContribution],
              chain: Mapping[int, Sequence[SignedContribution]], run_id: str, head: str,
              message_type: str = "") -> TrainOutcome:
        """One round: rebuild the global model, charge the round, run DP-SGD, seal the update."""
        cfg = self.config
        if not 1 <= server_round <= cfg.rounds:
            self._refuse(ProtocolError(f"{self.name}: round {server_round} is outside the run's {cfg.rounds} rounds"))
        self.pin_run(run_id)
        began = time.perf_counter()
        from clients.training import LocalTraining, train_local  # torch + opacus: train messages only

        missing = self.unverified_rounds(chain, run_id, server_round - 1)
        if missing:  # checked before anything is decrypted: a refused message costs no decryption
            self._refuse(ProtocolError(f"{self.name}: the server sent no contributions for round {missing[0]}, "
                                       "which this node has not verified"))
        n_hat = self.census_total(census, run_id)
        start = self.global_weights(chain, run_id, server_round - 1)
        he_seconds = time.perf_counter() - began
        data = self.data
        round_steps = cfg.local_epochs * cfg.steps_per_epoch
        with self.state.ledger() as ledger:
            earlier = sum(c.mechanism.steps for c in ledger.history(cfg.purpose)
                          if c.run_id == run_id and c.kind == "training" and c.slot != f"round-{server_round}")
        if earlier + round_steps > cfg.planned_steps:
            self._refuse(PrivacyBudgetError(f"{self.name}: round {server_round} would exceed the "
                                            f"{cfg.planned_steps} DP-SGD steps the noise was calibrated for"))
        identity = charge_identity(cfg.purpose, run_id, server_round, weights_digest(start), cfg.fingerprint(),
                                   records_digest(data.train_x, data.train_y))
        mechanism = self._mechanism(round_steps)  # read once: what trains is exactly what is charged
        self._charge(run_id, f"round-{server_round}", identity, mechanism, "training")
        self.state.audit().append(ROUND_TRAIN, purpose=cfg.purpose, details={
            "run": run_id, "round": server_round, "steps": round_steps, "identity": Digest(identity)})
        sigma = mechanism.noise_multiplier
        result = train_local(start, data.train_x, data.train_y, LocalTraining(
            model_kind=cfg.model, epochs=cfg.local_epochs, sample_rate=cfg.sample_rate,
            learning_rate=cfg.learning_rate, clip_norm=cfg.clip_norm, noise_multiplier=sigma,
            seed=cfg.seed, n_features=cfg.input_size,
            secret_seed=self.state.pseudonym_key().derive_seed("dp-sgd", identity)))
        began = time.perf_counter()
        share = data.n_train / n_hat
        update = np.concatenate([share * (result.weights - start), [share, CONTRIBUTOR_UNIT]])
        head = self.check_rollback([])  # the head now includes this round's charge
        contribution = self.seal(update, run=run_id, server_round=server_round, step="train", kind="update",
                                 head=head, message_type=message_type)
        he_seconds += time.perf_counter() - began
        if result.steps != round_steps:  # what is charged must be what ran
            raise ProtocolError(f"{self.name}: {result.steps} DP-SGD steps ran, {round_steps} were charged")
        return TrainOutcome(contribution, self.spend(run_id), result.seconds, he_seconds)

    # --- evaluate -----------------------------------------------------------------------------
    def evaluate(self, server_round: int, chain: Mapping[int, Sequence[SignedContribution]], run_id: str,
                 head: str, message_type: str = "") -> EvaluationOutcome:
        """DP evaluation of the global model after `server_round` on the local test split: a
        noised score histogram by label, charged before it is computed, once per (run, round)."""
        cfg = self.config
        if not 1 <= server_round <= cfg.rounds:
            self._refuse(ProtocolError(f"{self.name}: round {server_round} is outside the run's {cfg.rounds} rounds"))
        self.pin_run(run_id)
        weights = self.global_weights(chain, run_id, server_round)
        data = self.data
        mechanism = self._evaluation_mechanism()
        identity = charge_identity(cfg.purpose, run_id, server_round, "evaluate", weights_digest(weights),
                                   cfg.fingerprint(), records_digest(data.test_x, data.test_y))
        self._charge(run_id, f"eval-round-{server_round}", identity, mechanism, "evaluation")
        probabilities = predict_proba(load_model(cfg.model, weights, cfg.input_size), data.test_x)
        noised = round_evaluation.noised_evaluation(
            data.test_y, probabilities, noise_multiplier=mechanism.noise_multiplier,
            seed=self.state.pseudonym_key().derive_seed("evaluation", identity))
        self.state.audit().append(ROUND_EVALUATE, purpose=cfg.purpose, details={
            "run": run_id, "round": server_round, "identity": Digest(identity),
            "noise-multiplier": mechanism.noise_multiplier})
        head = self.check_rollback([])
        contribution = self.seal(np.concatenate([noised * EVAL_UNIT, [CONTRIBUTOR_UNIT]]), run=run_id,
                                 server_round=server_round, step="evaluate", kind="evaluation", head=head,
                                 message_type=message_type)
        return EvaluationOutcome(contribution, self.spend(run_id))

    def reveal(self, contributions: Sequence[SignedContribution], expected: Expected) -> list[float]:
        """Decrypt a sum of DP evaluations or cohort answers, verified and flooded."""
        return [float(v) for v in self.decryptor.decrypt(contributions, expected)]

    # --- release ------------------------------------------------------------------------------
    def release(self, chain: Mapping[int, Sequence[SignedContribution]], run_id: str) -> tuple[np.ndarray, str]:
        """The final model (DP by post-processing) and its SHA-256. Audited."""
        self.pin_run(run_id)
        through = max(chain, default=0)
        if through < 1:
            self._refuse(ProtocolError(f"{self.name}: nothing to release: the server sent no completed round"))
        weights = self.global_weights(chain, run_id, through).astype(np.float32)
        digest = weights_digest(weights)
        self.state.audit().append(RELEASE, purpose=self.config.purpose,
                                  details={"run": run_id, "round": through, "sha256": Digest(digest)})
        return weights, digest

