"""Coordinator-side retention: old runs and their artifacts leave the workspace's MLflow store.

A workspace keeps every training and analytics run with its artifacts (release files, privacy
reports, summaries, query tables, plots) in `mlflow.db` and `mlartifacts/`. None of it is raw
data, but all of it is derived from the hospitals' records, and the policies hospitals and banks
work under ask that what is no longer needed is deleted. `purge_runs` deletes, for good, every run
that ended before the cut-off, with its artifacts, except:

- a run behind a model version of the release registry (a release, live or withdrawn, or one being
  created): the release's certificate, card and audit entries point at it, and a withdrawn
  release is still the record of what banks were given;
- a run still marked running (it may be resumed).

Deletion goes through MLflow's own path: the run is marked deleted, then `mlflow gc` removes its
rows and its artifact directory. The purge is audited in the registry's log (`workspace.purge`,
with the counts and the cut-off, never run contents).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from federation.errors import ConfigError
from privacy.audit import WORKSPACE_PURGE
from server.releases.registry import ReleaseRegistry
from server.retention import retention_cutoff

_GC_TIMEOUT_S = 600


@dataclass
class WorkspacePurge:
    """What a purge removed (or, dry, would remove) and what it kept past the cut-off, and why."""

    cutoff: str
    purged: list[str] = field(default_factory=list)
    kept_released: list[str] = field(default_factory=list)
    kept_running: list[str] = field(default_factory=list)
    artifact_bytes: int = 0


def _local_path(uri: str) -> Path | None:
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path))
    return None


def _size(path: Path | None) -> int:
    if path is None or not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _runs(client: Any) -> list[Any]:
    """Every run of every experiment, deleted ones too (a run marked deleted still has its rows and
    artifacts until it is collected)."""
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs: list[Any] = []
    for start in range(0, len(experiments), 100):
        token = None
        while True:
            page = client.search_runs(experiments[start:start + 100], run_view_type=ViewType.ALL,
                                      max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
    return runs


def purge_runs(registry: ReleaseRegistry, tracking_uri: str, older_than_days: int, *,
               now: datetime | None = None, dry_run: bool = False) -> WorkspacePurge:
    """Delete the runs of `tracking_uri` that ended more than `older_than_days` ago, with their
    artifacts, except those behind `registry`'s model versions and those still running."""
    cutoff = retention_cutoff(older_than_days, "--older-than-days", now)  # before the slow import
    from mlflow.tracking import MlflowClient

    cutoff_ms = int(cutoff.timestamp() * 1000)
    client = MlflowClient(tracking_uri=tracking_uri)
    released = registry.run_ids()
    report = WorkspacePurge(cutoff=cutoff.isoformat(timespec="seconds"))
    for run in _runs(client):
        info = run.info
        ended = info.end_time or info.start_time or 0
        if ended >= cutoff_ms:
            continue
        if info.run_id in released:
            report.kept_released.append(info.run_id)
        elif info.status == "RUNNING" and info.lifecycle_stage != "deleted":
            report.kept_running.append(info.run_id)
        else:
            report.purged.append(info.run_id)
            report.artifact_bytes += _size(_local_path(info.artifact_uri))
    if dry_run or not report.purged:
        return report
    for run_id in report.purged:
        if client.get_run(run_id).info.lifecycle_stage != "deleted":
            client.delete_run(run_id)
    _collect(tracking_uri, report.purged)
    registry.audit.append(WORKSPACE_PURGE, details={
        "runs-purged": len(report.purged), "kept-released": len(report.kept_released),
        "kept-running": len(report.kept_running), "artifact-bytes": report.artifact_bytes,
        "retention-days": older_than_days, "cutoff": report.cutoff})
    return report


def _collect(tracking_uri: str, run_ids: list[str]) -> None:
    """`mlflow gc` of the given (deleted) runs: their rows and their artifact directories go."""
    for start in range(0, len(run_ids), 200):
        batch = run_ids[start:start + 200]
        command = [sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", tracking_uri,
                   "--tracking-uri", tracking_uri, "--run-ids", ",".join(batch)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=_GC_TIMEOUT_S, check=False)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ConfigError(f"mlflow gc failed on the workspace's store ({last[:200]}); the runs are marked "
                              "deleted: run the purge again")
