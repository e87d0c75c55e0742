"""The signals service on one machine: synthetic hospital nodes, real federated training runs,
releases with a DP evaluation, a hospital's scoring endpoint, grants, API keys, and
`fedrisk serve`, each service a separate uvicorn process on loopback.

This is the harness the signals tests and `bench/scoring_load.py` use; every step is the real
code path: synthesis, node provisioning, DP-SGD + CKKS training in Flower's simulation engine,
the release registry, the DP evaluation query answered by the nodes, grant issuing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

from clients.node_state import NodeState
from clients.scoring import grant_authority, install_release, issue_grant
from clients.scoring_service import new_service_token, write_service_token_file
from engines.deployment import free_port
from engines.provisioning import provision_nodes
from experiments.synthetic import synthesize
from federation import features as fx
from federation.config import RunConfig
from federation.he_codec import HospitalKey, ServerContext, init_keys
from federation.model import weights_digest

ROOT = Path(__file__).resolve().parents[1]
BANK = "bank-a"
MODEL_KIND = "mlp"
PURPOSES = {"credit-risk-research": (1e6, 1e-5), "applicant-scoring": (1e6, 1e-5)}
EVALUATION_EPSILON = 2.0  # small synthetic federation: a larger epsilon keeps the demo card's intervals readable
HOSPITALS = 2
START_TIMEOUT_S = 60.0


@dataclass
class TrainedRun:
    """A real federated training run (`engines.simulation.simulate`): where MLflow holds it."""

    tracking_uri: str
    run_id: str
    weights: np.ndarray
    model_kind: str


@dataclass
class SignalsFederation:
    """Synthetic hospitals, their key and pristine node directories, and real training runs of them."""

    root: Path
    keys_dir: Path
    nodes_dir: Path
    runs: list[TrainedRun]


@dataclass
class LocalHospital:
    """The scoring hospital (hospital_00), the federation's nodes, and the credentials the signals
    service needs for the hospital."""

    state: NodeState
    keys_dir: Path
    nodes_dir: Path
    export: pd.DataFrame
    node_token_file: Path  # the node's: the service token's SHA-256
    service_token_file: Path  # the signals service's: the token itself (0600)
    grant_key_file: Path

    def consenting(self) -> list[str]:
        """Record keys of patients whose applicant-scoring consent holds."""
        return [str(k) for k in self.export.loc[self.export["consent_applicant_scoring"], fx.RECORD_KEY]]

    def issue(self, record_key: str, bank: str = BANK, release: str = "r1", *, hours: int = 24, uses: int = 1) -> str:
        """A grant token for one patient, one bank and one release (`fedrisk node grant issue`'s defaults)."""
        return issue_grant(self.state, record_key, bank, release, hours=hours, uses=uses)

    def nodes(self) -> list[NodeState]:
        return NodeState.discover(self.nodes_dir)


def build_federation(root: Path, *, patients: int = 2000, seed: int = 5, runs: int = 1) -> SignalsFederation:
    """Synthesise HOSPITALS exports, provision their nodes, and train `runs` real federated runs
    (DP-SGD + CKKS in Flower's simulation engine, one round each, different seeds)."""
    from engines.simulation import simulate

    root.mkdir(parents=True, exist_ok=True)
    synthesize(HOSPITALS, patients, root / "data", seed=seed)
    keys = init_keys(root / "keys")
    provision_nodes(root / "data", keys.hospital_context, root / "nodes", purposes=PURPOSES)
    trained = []
    for index in range(runs):
        config = RunConfig(nodes_dir=str(root / "nodes"), keys_dir=str(root / "keys"), run_dir=str(root / f"run{index}"),
                           num_hospitals=HOSPITALS, rounds=1, model=MODEL_KIND, seed=seed + index, sample_rate=0.05)
        result = simulate(config)
        trained.append(TrainedRun(config.mlflow_uri, result.run_id, np.asarray(result.weights, dtype=np.float32),
                                  MODEL_KIND))
    return SignalsFederation(root, root / "keys", root / "nodes", trained)


def build_hospital(root: Path, federation: SignalsFederation) -> LocalHospital:
    """A private copy of the federation's nodes (same records and secrets; its own ledgers, grants
    and audit logs) with hospital_00 ready to serve: its service token and grant key."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(federation.nodes_dir, root / "nodes")
    state = NodeState.discover(root / "nodes")[0]
    token = new_service_token()
    write_service_token_file(root / "node-token.sha256", token)
    service_token_file = root / "signals-service.token"
    fd = os.open(service_token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(token + "\n")
    grant_key_file = root / "grant-key.pem"
    grant_key_file.write_text(grant_authority(state).public_key_pem())
    return LocalHospital(state, federation.keys_dir, root / "nodes", pd.read_parquet(state.data_file),
                         root / "node-token.sha256", service_token_file, grant_key_file)


def dp_evaluation(hospital: LocalHospital, run: TrainedRun) -> object:
    """The model's DP evaluation tables, answered by every node's own analytics code in process."""
    from engines.analytics import answer_in_process
    from engines.model_evaluation import (
        EVALUATION_GROUPS,
        evaluation_query,
        marginal,
    )
    from server.releases.dp_evaluation import DPEvaluation

    digest = weights_digest(run.weights)
    query = evaluation_query(digest, run.model_kind, epsilon=EVALUATION_EPSILON)
    table = answer_in_process(hospital.nodes(), HospitalKey.load(hospital.keys_dir / "hospital.ckks"),
                              ServerContext.load(hospital.keys_dir), query, query.default_run_id(), run.weights)
    return DPEvaluation({g: marginal(table, g) for g in EVALUATION_GROUPS}, digest,
                        f"cohort query {query.default_run_id()} (epsilon {EVALUATION_EPSILON:g} per hospital)")


LOCAL_CALIBRATION_OVERRIDE = ("local signals stack: a one-round run on a small synthetic federation, whose DP "
                              "evaluation is too noisy to check calibration; for exercising scoring, not for banks")
"""The reason the local stack's releases carry on their certificates (when the calibration check
fails, as it does at this size): the override is recorded, never implied."""
LOCAL_AUDIT_WAIVER = ("local signals stack: releases for exercising scoring, not for banks; no membership audit "
                      "is spent on them")
"""Why the local stack's releases carry no privacy audit (on each certificate's `privacy_audit`)."""


SCIENTIST, OPERATOR = "dana-data-scientist", "hank-hospital-operator"
"""The two people who approve the local stack's releases (a release needs both roles)."""


def approve(registry: object, run_id: str, hospital: str = "hospital_00") -> str:
    """Record both approvals a release needs (a data scientist's, a hospital operator's) on
    `registry` (a ReleaseRegistry); returns `run_id`, to pass on to `create`."""
    registry.approve(run_id, "data-scientist", SCIENTIST)  # type: ignore[attr-defined]
    registry.approve(run_id, "hospital-operator", OPERATOR, hospital)  # type: ignore[attr-defined]
    return run_id


def create_release(registry_dir: Path, hospital: LocalHospital, run: TrainedRun) -> str:
    """Register a release of a real training run (with its DP evaluation) and install it at the node."""
    from server.releases import ReleaseRegistry

    registry_dir.mkdir(parents=True, exist_ok=True)
    evaluation = dp_evaluation(hospital, run)  # a release needs its DP evaluation
    registry = ReleaseRegistry(run.tracking_uri, registry_dir)
    release = registry.create(
        approve(registry, run.run_id, hospital.state.hospital), SCIENTIST, evaluation=evaluation,  # type: ignore[arg-type]
        accept_miscalibration=LOCAL_CALIBRATION_OVERRIDE, unaudited=LOCAL_AUDIT_WAIVER)
    install_release(hospital.state.directory, release.model_dir, release.release_id)
    return release.release_id


@dataclass
class Service:
    """A uvicorn service in its own process; `stop` ends it (and only it)."""

    name: str
    process: subprocess.Popen
    base_url: str
    log: Path
    ca: str = ""
    """The CA bundle an HTTPS service's certificate verifies with ("" for plain HTTP)."""

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> Service:
        """Block until /v1/health answers 200; raises (after stopping it) if it dies or times out."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.base_url}/v1/health", timeout=1.0, verify=self.ca or True).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not answer within {timeout:g}s: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _start(name: str, argv: list[str], log: Path, port: int, wait: bool, ca: str = "") -> Service:
    """Start `python -m cli.main <argv>` (logging to `log`); with `wait`, until it answers. `ca`:
    the service serves HTTPS with a certificate this CA bundle verifies."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", "cli.main", *argv], cwd=ROOT, stdout=sink,
                                   stderr=subprocess.STDOUT)
    service = Service(name, process, f"{'https' if ca else 'http'}://127.0.0.1:{port}", log, ca)
    return service.wait_ready() if wait else service


def start_node_service(hospital: LocalHospital, log_dir: Path, *, wait: bool = True,
                       tls: tuple[Path, Path, Path] | None = None) -> Service:
    """`fedrisk node serve` for the hospital, on a free loopback port; `tls` = (certificate, key,
    CA bundle) serves it over HTTPS."""
    port = free_port()
    extra = ["--ssl-certfile", str(tls[0]), "--ssl-keyfile", str(tls[1])] if tls else []
    return _start(f"scoring node {hospital.state.hospital}", [
        "node", "serve", "--dir", str(hospital.state.directory), "--port", str(port),
        "--token-file", str(hospital.node_token_file), *extra], log_dir / "node.log", port, wait,
        str(tls[2]) if tls else "")


def start_signals_service(db: Path, registry_dir: Path, log_dir: Path, *, rate: float = 1000.0,
                          burst: int = 1000, wait: bool = True, hospital_ca: Path | None = None) -> Service:
    """`fedrisk serve` on a free loopback port (generous rate limits unless told otherwise);
    `hospital_ca`: the CA bundle hospitals' HTTPS scoring endpoints are checked against."""
    port = free_port()
    extra = ["--hospital-ca", str(hospital_ca)] if hospital_ca else []
    return _start("signals service", ["serve", "--port", str(port), "--db", str(db), "--registry",
                                      str(registry_dir), "--rate", str(rate), "--burst", str(burst), *extra],
                  log_dir / "signals.log", port, wait)


def register_hospital(db: Path, hospital: LocalHospital, node: Service) -> None:
    """Register the hospital's running scoring endpoint, as `fedrisk serve hospitals add` does."""
    from server.signals.hospitals import HospitalDirectory

    HospitalDirectory(db).add(hospital.state.hospital, node.base_url, hospital.grant_key_file,
                              hospital.service_token_file)
