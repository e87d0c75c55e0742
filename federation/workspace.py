"""A workspace: the one place a team's runs, evaluations, analytics and releases are tracked.

Every command that tracks something (`fedrisk run`, `demo`, `analytics run`, `release evaluate`,
`release audit`, `release create`, `serve`) uses the workspace's MLflow store by default, so one
`mlflow ui --backend-store-uri sqlite:///<workspace>/mlflow.db` shows them all side by side and
the Model Registry sits in the same store as the runs it releases:

    <workspace>/mlflow.db      MLflow tracking store and Model Registry (SQLite)
    <workspace>/mlartifacts/   the runs' artifacts (release files, tables, plots)
    <workspace>/releases/      the release registry's model copies and audit log

The workspace is `--workspace DIR`, else `$FEDRISK_WORKSPACE`, else the current directory. Run
directories (`--out`) hold what a run computes (checkpoint, release files, nodes of a
simulation) but no store of their own, so moving one does not break the runs or releases the
store records. `--tracking-uri` still points any command at another store (a tracking server).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from federation.errors import ConfigError

WORKSPACE_ENV = "FEDRISK_WORKSPACE"
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
REGISTRY_DIR = "releases"
REGISTRY_POINTER = "registry.json"
LEGACY_REGISTRY_DB = "registry.db"
"""A registry made before workspaces kept its Model Registry in `<registry>/registry.db`; such a
registry goes on using it."""


@dataclass(frozen=True)
class Workspace:
    """The workspace rooted at `root` (an absolute path; nothing is created until a run writes)."""

    root: Path

    @classmethod
    def locate(cls, given: str | os.PathLike[str] | None = None) -> "Workspace":
        """`given`, else $FEDRISK_WORKSPACE, else the current directory."""
        chosen = str(given or os.environ.get(WORKSPACE_ENV) or "") or "."
        return cls(Path(chosen).expanduser().resolve())

    @property
    def store(self) -> Path:
        return self.root / STORE_FILE

    @property
    def tracking_uri(self) -> str:
        """The workspace's MLflow store, SQLite."""
        return sqlite_uri(self.store)

    @property
    def registry_dir(self) -> Path:
        return self.root / REGISTRY_DIR

    def exists(self) -> bool:
        """Whether anything has been tracked here yet."""
        return self.store.is_file()


def sqlite_uri(path: Path) -> str:
    """The MLflow URI of a SQLite file."""
    return f"sqlite:///{Path(path).resolve()}"


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///` URI; None for any other kind of store (a server, a database)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or len(uri) == len(prefix):
        return None
    return Path(unquote(uri[len(prefix):].split("?", 1)[0]))


def artifact_root(tracking_uri: str) -> Path | None:
    """Where a local SQLite store keeps its runs' artifacts: `mlartifacts/` beside the file, not
    MLflow's default `./mlruns` of whatever directory a command happens to run in. None for a
    remote store, whose server decides."""
    path = sqlite_path(tracking_uri)
    return None if path is None else path.parent / ARTIFACTS_DIR


def registry_store(registry_dir: Path, default: str = "") -> str:
    """The Model Registry a release registry directory uses: the store its `registry.json` names
    (written when the registry was made), else its own `registry.db` if it has one (a registry
    made before workspaces), else `default` (the workspace's store, for a new registry), else a
    new `registry.db` in it."""
    directory = Path(registry_dir)
    pointer = directory / REGISTRY_POINTER
    if pointer.is_file():
        try:
            store = json.loads(pointer.read_text())["model_registry"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"{pointer} is damaged: it must name the registry's MLflow store") from None
        if isinstance(store, str) and store.startswith("sqlite:///") and not store.startswith("sqlite:////"):
            return sqlite_uri(directory / store[len("sqlite:///"):])  # relative to the registry directory
        return str(store)
    legacy = directory / LEGACY_REGISTRY_DB
    if legacy.is_file() or not default:
        return sqlite_uri(legacy)
    return default


def record_registry_store(registry_dir: Path, store: str) -> None:
    """Write `registry.json` naming the registry's store (relative to the directory when the store
    is a SQLite file beside or above it, so a workspace can be moved whole)."""
    directory = Path(registry_dir).resolve()
    path = sqlite_path(store)
    if path is not None:
        path = path.resolve()
        if path.parent == directory or directory.is_relative_to(path.parent):
            store = f"sqlite:///{os.path.relpath(path, directory)}"
    pointer = directory / REGISTRY_POINTER
    tmp = pointer.with_name(f".{REGISTRY_POINTER}.{os.getpid()}")
    tmp.write_text(json.dumps({"model_registry": store}, indent=2) + "\n")
    tmp.replace(pointer)
