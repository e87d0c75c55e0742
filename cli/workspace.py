"""The workspace a command tracks in (`federation.workspace`), from `fedrisk --workspace DIR`,
$FEDRISK_WORKSPACE or the current directory, spelled once for every sub-command."""

from __future__ import annotations

import argparse
from pathlib import Path

from federation.workspace import WORKSPACE_ENV, Workspace, registry_store

WORKSPACE_HELP = (f"workspace directory: one MLflow store (mlflow.db) for runs, evaluations, analytics and the "
                  f"release registry (default ${WORKSPACE_ENV}, else the current directory)")


def workspace(args: argparse.Namespace) -> Workspace:
    """The command's workspace."""
    return Workspace.locate(getattr(args, "workspace", None))


def tracking_uri(args: argparse.Namespace) -> str:
    """--tracking-uri if given, else the workspace's store."""
    return getattr(args, "tracking_uri", "") or workspace(args).tracking_uri


def registry_dir(args: argparse.Namespace) -> Path:
    """--registry if given, else the workspace's `releases/`."""
    given = getattr(args, "registry", None)
    return Path(given) if given else workspace(args).registry_dir


def registry_uri(args: argparse.Namespace) -> str:
    """The Model Registry of the command's registry directory (`federation.workspace.registry_store`):
    the one it was made with, else, for a new registry, the --tracking-uri store if one is given,
    else the workspace's."""
    return registry_store(registry_dir(args), getattr(args, "tracking_uri", "") or workspace(args).tracking_uri)
