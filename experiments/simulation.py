"""Run a federated training in Flower's simulation engine (one machine, one process per
simulated hospital node, via Ray).

This module is the only place that imports both the hospital side and the server side: it is
the data scientist's harness, not part of either trust domain.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from clients.app import make_client_app
from clients.data import hospital_files, load_table
from federation.config import RunConfig
from federation.errors import ConfigError, FedriskError, KeyMaterialError, ProtocolError
from federation.he_codec import HOSPITAL_CONTEXT_FILE, HospitalKey, ServerContext, check_file_mode
from server.app import FederatedResult, Progress, make_server_app


def preflight(config: RunConfig) -> list[Path]:
    """Check everything that can be checked before any process starts, so a bad input costs
    seconds and leaves nothing behind: every hospital file reads and matches the export
    schema, the key material is of the right kind on each side and is the same key.
    Returns the hospital files."""
    files = hospital_files(Path(config.data_dir))
    if len(files) < config.num_hospitals:
        raise ConfigError(f"num-hospitals is {config.num_hospitals} but {config.data_dir} holds {len(files)} hospital files")
    files = files[: config.num_hospitals]
    for path in files:
        load_table(path)
    server = ServerContext.load(Path(config.keys_dir))
    key_path = Path(config.keys_dir) / HOSPITAL_CONTEXT_FILE
    hospital = HospitalKey.load(key_path)
    check_file_mode(key_path)
    if hospital.key_id != server.key_id:
        raise KeyMaterialError(f"{key_path} is not the key named in {Path(config.keys_dir) / 'federation.json'}")
    return files


def simulate(config: RunConfig, progress: Progress | None = None, verbose: bool = False) -> FederatedResult:
    """Train `config` in Flower's simulation engine and return the run's result.

    User-caused failures (bad file, wrong key, privacy refusal) come back as FedriskError
    with one line of explanation; the MLflow run is deleted in that case.
    """
    from flwr.simulation import run_simulation

    preflight(config)
    outcome: list = []
    server_app = make_server_app(config, progress, outcome)
    client_app = make_client_app(config)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
    cpus = max(1, min(os.cpu_count() or 1, config.num_hospitals))
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": verbose,
                             "logging_level": logging.ERROR}}
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=config.num_hospitals,
                   backend_config=backend, verbose_logging=verbose)
    if not outcome:
        raise ProtocolError("the simulation ended before the server finished the run")
    if isinstance(outcome[0], FedriskError):
        raise outcome[0]
    return outcome[0]
