"""`flwr run .` runs fedrisk through Flower's own launcher (local SuperLink, simulation runtime)
with the app and config in pyproject.toml."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engines.deployment import processes_with, send_signals
from engines.provisioning import provision_nodes

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _stop_processes_of(flwr_home: Path) -> None:
    """Flower leaves its local SuperLink running; stop every process started for this test."""
    send_signals(processes_with(f"FLWR_HOME={flwr_home}", exact=True), signal.SIGTERM)


def test_flwr_run_trains_and_releases(federation_data, keys, tmp_path) -> None:
    provision_nodes(federation_data.files[0].parent, keys.hospital_context, tmp_path / "nodes",
                    purposes={"credit-risk-research": (10.0, 1e-5)}, count=2)
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    run_config = (f"nodes-dir='{tmp_path / 'nodes'}' keys-dir='{keys.server_context.parent}' "
                  f"run-dir='{tmp_path / 'run'}' rounds=1")
    try:
        result = subprocess.run([str(bin_dir / "flwr"), "run", str(ROOT), "--stream", "--run-config", run_config],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    finally:
        _stop_processes_of(flwr_home)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (tmp_path / "run" / "release" / "model.npz").is_file()
    assert (tmp_path / "run" / "release" / "privacy_report.json").is_file()
