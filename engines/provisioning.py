"""Provision hospital node directories for a simulation (one machine holds every hospital).

In production each hospital runs `fedrisk node init` on its own machine and installs the
federation manifest it is given. A simulation does the same for every export file in a data
directory, all or nothing: `NodeState.init` validates each export against its schema, and any
failure removes every node directory made so far. The data scientist plays every hospital here,
so the nodes are enrolled together (one manifest of their signing keys in each).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from clients.data import hospital_files
from clients.node_state import TEST_FRACTION, NodeState, enrol
from clients.policy import NodePolicy
from federation.errors import ConfigError, warn_user


def provision_nodes(data_dir: Path, key_file: Path, nodes_dir: Path, *, purposes: dict[str, tuple[float, float]],
                    count: int | None = None, schema_file: Path | None = None,
                    progress: Callable[[int, int], None] | None = None) -> list[NodeState]:
    """One node directory per hospital file (named after the file), with `purposes` budgets.
    `progress(done, total)` is called before each node is made (and once when all are)."""
    files = hospital_files(Path(data_dir))
    if count is not None:
        if len(files) < count:
            raise ConfigError(f"num-hospitals is {count} but {data_dir} holds {len(files)} hospital files")
        if len(files) > count:
            warn_user(f"{data_dir} holds {len(files)} hospital files; using the first {count} "
                      f"({', '.join(p.name for p in files[:count])}); pass --hospitals {len(files)} to use all")
        files = files[:count]
    nodes_dir = Path(nodes_dir)
    if nodes_dir.exists() and any(nodes_dir.iterdir()):
        raise ConfigError(f"{nodes_dir} already holds node directories")
    try:
        states = []
        for path in files:
            if progress:
                progress(len(states), len(files))
            states.append(NodeState.init(nodes_dir / path.stem, hospital=path.stem, data_file=path, key_file=key_file,
                                         budgets=purposes, schema_file=schema_file))
        if progress:
            progress(len(states), len(files))
        for state in states:  # the data scientist plays every hospital: its policy allows what its budgets do
            NodePolicy.for_budgets(purposes).save(state.directory)
        enrol(states)
        return states
    except BaseException:
        shutil.rmtree(nodes_dir, ignore_errors=True)
        raise


def load_nodes(nodes_dir: Path, count: int) -> list[NodeState]:
    """The first `count` node directories under `nodes_dir`, in name order."""
    states = NodeState.discover(Path(nodes_dir))
    if len(states) < count:
        raise ConfigError(f"num-hospitals is {count} but {nodes_dir} holds {len(states)} fedrisk nodes")
    if len(states) > count:
        warn_user(f"{nodes_dir} holds {len(states)} fedrisk nodes; using the first {count} "
                  f"({', '.join(s.hospital for s in states[:count])}); pass --hospitals {len(states)} to use all")
    return states[:count]


MIN_EXPECTED_BATCH = 10.0
"""Below this many records in an expected DP-SGD batch (records x sample rate), a hospital is warned of."""


def export_rows(path: Path) -> int:
    """Rows of a hospital export, read from its metadata (Parquet) or by counting lines (CSV)."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    with open(path, "rb") as handle:
        return max(sum(1 for _ in handle) - 1, 0)


def warn_small_hospitals(states: list[NodeState], sample_rate: float) -> None:
    """Warn (never refuse: the hospital's policy decides) of a hospital whose export is so small that
    the DP-SGD noise will swamp its update and its held-out split cannot evaluate a model."""
    for state in states:
        rows = export_rows(state.data_file)
        if rows * sample_rate < MIN_EXPECTED_BATCH:
            warn_user(f"{state.hospital} has {rows:,} records: at sample rate {sample_rate:g} its expected DP-SGD batch "
                      f"is {rows * sample_rate:.1f} records, so noise will dominate its update, and its held-out "
                      f"split (about {int(rows * TEST_FRACTION):,} records) is too small to evaluate with")


def schema_input_count(purpose: str, *, schema_file: Path | None = None, nodes_dir: Path | None = None,
                       count: int | None = None) -> int:
    """How many model inputs a `features = "schema"` run has: derived from the export schema (the
    one given, else every node's, which must agree), never typed by hand."""
    from clients import encoding
    from clients.schema import SHIPPED_SYNTHETIC_SCHEMA, ExportSchema

    if nodes_dir:
        states = load_nodes(Path(nodes_dir), count or 1)
        widths = {state.hospital: len(encoding.feature_names(state.schema(), purpose)) for state in states}
        if len(set(widths.values())) != 1:
            raise ConfigError("the nodes' schemas encode to different numbers of model inputs: "
                              + ", ".join(f"{h} {w}" for h, w in sorted(widths.items())))
        return next(iter(widths.values()))
    schema = ExportSchema.load(Path(schema_file) if schema_file else SHIPPED_SYNTHETIC_SCHEMA)
    return len(encoding.feature_names(schema, purpose))




def record_release_inputs(config, mlflow_run_id: str) -> None:
    """After a schema run: write beside its release what the model reads and predicts (input names,
    label, what it means, intended use; from the run's schema file, else the first node's schema)
    and log it to the run's release artifacts, so the release's model card names them. A run whose
    inputs the schema does not describe (another width) gets nothing, and its card numbers them."""
    import json

    from clients import encoding
    from clients.schema import ExportSchema
    from federation.release_model import write_mlmodel
    from server.tracking import INPUTS_FILE, quiet_mlflow

    if config.features != "schema":
        return
    states = [] if config.schema_file or not config.nodes_dir else NodeState.discover(Path(config.nodes_dir))
    if config.schema_file:
        schema = ExportSchema.load(Path(config.schema_file))
    elif states:
        schema = states[0].schema()
    else:
        return
    names = encoding.feature_names(schema, config.purpose)
    if len(names) != config.input_size:
        return
    path = Path(config.run_dir) / "release" / INPUTS_FILE
    path.write_text(json.dumps({"features": names, "label": schema.label, "label_description": schema.label_description,
                                "intended_use": schema.intended_use, "purpose": config.purpose}, indent=2))
    client = quiet_mlflow().tracking.MlflowClient(config.mlflow_uri)
    for written in (path, write_mlmodel(path.parent)):  # the pyfunc signature now names the inputs
        client.log_artifact(mlflow_run_id, str(written), "release")
