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

from clients.data import hospital_files
from clients.node_state import NodeState, enrol
from clients.policy import NodePolicy
from federation.errors import ConfigError


def provision_nodes(data_dir: Path, key_file: Path, nodes_dir: Path, *, purposes: dict[str, tuple[float, float]],
                    count: int | None = None, schema_file: Path | None = None) -> list[NodeState]:
    """One node directory per hospital file (named after the file), with `purposes` budgets."""
    files = hospital_files(Path(data_dir))
    if count is not None:
        if len(files) < count:
            raise ConfigError(f"num-hospitals is {count} but {data_dir} holds {len(files)} hospital files")
        files = files[:count]
    nodes_dir = Path(nodes_dir)
    if nodes_dir.exists() and any(nodes_dir.iterdir()):
        raise ConfigError(f"{nodes_dir} already holds node directories")
    try:
        states = [NodeState.init(nodes_dir / path.stem, hospital=path.stem, data_file=path, key_file=key_file,
                                 budgets=purposes, schema_file=schema_file) for path in files]
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
    return states[:count]
