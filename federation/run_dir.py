"""The names of what a run directory holds, spelled once (the coordinator writes them; the CLI,
the release registry and the tests read them)."""

from __future__ import annotations

MLFLOW_DB = "mlflow.db"                 # the run's own MLflow store, unless a tracking URI is given
SERVER_AUDIT_FILE = "server_audit.sqlite"  # the coordinator's hash-chained audit log
NODE_AUDIT_FILE = "audit.sqlite"        # a hospital node's hash-chained audit log (in its node directory)
RELEASE_DIR = "release"                 # model.npz, model.sha256, privacy_report.json, run_summary.json
