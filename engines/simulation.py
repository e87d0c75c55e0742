"""Run a federated training in Flower's simulation engine (one machine, one process per
simulated hospital node, via Ray).

This module is the only place that imports both the hospital side and the server side: it is
the data scientist's harness, not part of either trust domain.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, TextIO

from clients.app import make_client_app
from engines.provisioning import load_nodes, provision_nodes, warn_small_hospitals, record_release_inputs
from federation.config import RunConfig
from federation.errors import FedriskError, KeyMaterialError, ProtocolError
from federation.he_codec import (
    HOSPITAL_CONTEXT_FILE,
    HospitalKey,
    ServerContext,
    check_file_mode,
)
from federation.round_evaluation import AUC, BRIER, LOG_LOSS, SE_SUFFIX
from server.app import FederatedResult, Progress, make_server_app
from server.training_run import stage
from server.tracking import ROUND_EPSILON_MAX, ROUND_SECONDS


IN_FLIGHT_PER_WORKER = 4
"""Unanswered messages per simulation worker (one per core) the server keeps pushed: enough that
no worker waits, few enough that Flower's per-poll scan of stored messages stays small."""


def round_line(data: dict[str, Any]) -> str:
    """One finished round as `fedrisk run` and the demo show it: the DP evaluation's metrics, the
    largest epsilon so far and the round's time."""
    se = data.get(AUC + SE_SUFFIX)
    spread = f" ± {se:.4f}" if isinstance(se, float) and math.isfinite(se) else ""
    return (f"  round {data['round']}/{data['rounds']}  DP pooled AUC {data[AUC]:.4f}{spread}  "
            f"Brier {data[BRIER]:.4f}  log loss {data[LOG_LOSS]:.4f}  "
            f"epsilon so far {data[ROUND_EPSILON_MAX]:.3f}  {data[ROUND_SECONDS]:.1f}s")


def print_rounds(stream: TextIO) -> Progress:
    """A progress callback that prints `round_line` for each finished round."""
    def show(event: str, data: dict[str, Any]) -> None:
        if event == "round":
            stream.write(round_line(data) + "\n")
            stream.flush()
    return show


def preflight(config: RunConfig, progress: Progress | None = None) -> RunConfig:
    """Check everything that can be checked before any process starts, so a bad input costs
    seconds and leaves nothing behind: the key material is of the right kind on each side and
    is the same key; every hospital's export validates against its schema. Without a
    `nodes_dir`, node directories are provisioned under the run directory from `data_dir`.
    Returns the config with `nodes_dir` set; `progress` hears the provisioning's steps."""
    from clients.data import cache_budget

    stage(progress, "checks", "checking the keys and every hospital's export")
    cache_budget()  # a bad $FEDRISK_RECORD_CACHE_MB fails here, not in a worker mid-round
    server = ServerContext.load(Path(config.keys_dir))
    key_path = Path(config.keys_dir) / HOSPITAL_CONTEXT_FILE
    hospital = HospitalKey.load(key_path)
    check_file_mode(key_path)
    if hospital.key_id != server.key_id:
        raise KeyMaterialError(f"{key_path} is not the key named in {Path(config.keys_dir) / 'federation.json'}")
    if config.run_dir and not config.query:
        from server.checkpoint import Checkpoint

        checkpoint = Checkpoint.load(Path(config.run_dir), config)
        if checkpoint:
            checkpoint.check_key(server.key_id, Path(config.run_dir))
    if config.nodes_dir:
        states = load_nodes(Path(config.nodes_dir), config.num_hospitals)
        for state in states:
            state.check_export()
            if state.hospital_key().key_id != server.key_id:
                raise KeyMaterialError(f"{state.directory}: the node's CKKS key is not the federation's key "
                                       f"{server.key_id} (after a rotation: `fedrisk node rotate ckks`)")
        _enrolled(states, server.key_id)
        if not config.query:  # a query draws no DP-SGD batches
            warn_small_hospitals(states, config.sample_rate)
        return config
    nodes_dir = Path(config.run_dir) / "nodes"
    states = provision_nodes(Path(config.data_dir), key_path, nodes_dir, count=config.num_hospitals,
                             purposes={config.purpose: (config.provision_budget, config.delta)},
                             schema_file=Path(config.schema_file) if config.schema_file else None,
                             progress=lambda done, total: stage(progress, "provision", "provisioning hospital nodes "
                                                                "(validating and pseudonymising each export)",
                                                                done=done, total=total))
    config = config.replace(nodes_dir=str(nodes_dir))
    if not config.query:
        warn_small_hospitals(states, config.sample_rate)
    return config


def _enrolled(states: list, key_id: str) -> None:
    """Nodes made one by one (`fedrisk node init`) are enrolled together before a simulation
    (the data scientist plays every hospital): unless each already holds a manifest listing
    exactly these hospitals under the federation's key `key_id`, they get one (so a simulation
    after a CKKS key rotation re-enrols them)."""
    from clients.node_state import enrol
    from federation.errors import FedriskError

    names = sorted(s.hospital for s in states)
    try:
        if all(sorted(s.manifest().hospitals) == names and s.manifest().federation == key_id for s in states):
            return
    except FedriskError:
        pass
    enrol(states)


def simulate(config: RunConfig, progress: Progress | None = None, verbose: bool = False) -> FederatedResult:
    """Train `config` in Flower's simulation engine and return the run's result (a
    `server.analytics.QueryResult` when the config carries a cohort query).

    User-caused failures (bad file, wrong key, privacy refusal) come back as FedriskError
    with one line of explanation; the MLflow run is deleted in that case.
    """
    from flwr.simulation import run_simulation

    run_dir_existed = Path(config.run_dir).exists()
    provisioned = not config.nodes_dir
    config = preflight(config, progress)
    try:
        result = _run(config, progress, verbose, run_simulation)
    except BaseException:
        if provisioned and not run_dir_existed:
            shutil.rmtree(config.run_dir, ignore_errors=True)
        raise
    if not config.query:  # after the run: a failure here must not undo a finished, charged run
        try:
            record_release_inputs(config, result.run_id)
        except Exception as error:  # noqa: BLE001 - the card then numbers the inputs; say why
            from federation.errors import warn_user

            warn_user(f"the release's input names were not recorded ({type(error).__name__}: {error}); "
                      "its model card will number the inputs")
    return result


def _run(config: RunConfig, progress: Progress | None, verbose: bool, run_simulation) -> FederatedResult:
    outcome: list = []
    cpus = max(1, min(os.cpu_count() or 1, config.num_hospitals))
    server_app = make_server_app(config, progress, outcome, in_flight=IN_FLIGHT_PER_WORKER * cpus)
    client_app = make_client_app(config)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
    stage(progress, "engine", "starting Flower's simulation engine")
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
