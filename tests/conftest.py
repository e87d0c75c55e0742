"""Shared fixtures: small synthetic federations and key material, made once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from experiments.synthetic import SynthesisReport, synthesize  # noqa: E402
from federation.he_codec import KeyBundlePaths, init_keys  # noqa: E402


UNIT_TIER = frozenset({
    "test_accounting.py", "test_architecture.py", "test_sealing.py", "test_encrypted_stores.py", "test_retention.py",
    "test_record_cache.py", "test_pseudonym_rekey.py", "test_audit.py", "test_certs.py", "test_clipping.py",
    "test_deploy_compose.py", "test_grants.py", "test_he_codec.py", "test_ledger.py", "test_ledger_races.py",
    "test_policy.py", "test_round_evaluation.py", "test_synthetic.py", "test_training.py",
    "test_governance_data.py", "test_node_channel.py", "test_calibration.py", "test_cli_usability.py", "test_readiness.py", "test_schema_draft.py", "test_dashboard_wording.py", "test_release_model.py", "test_graded_protection.py", "test_alerts.py", "test_incident.py", "test_backup.py", "test_erasure.py"})
"""Test files of the fast tier (`make test-fast`, `pytest -m unit`): no federation, no Flower engine,
no long-lived process."""

E2E_TIER = frozenset({
    "test_demo.py", "test_deployment.py", "test_dashboard_browser.py", "test_end_to_end.py",
    "test_flwr_run.py", "test_notebooks.py", "test_new_user.py"})
"""Test files of the end-to-end tier (`make test-e2e`, `pytest -m e2e`): a whole user path as the
user starts it: `fedrisk demo`/`run` subprocesses, `flwr run`, SuperLink and SuperNode processes
on loopback, the notebooks, the dashboard in Chromium. Every other file, the adversarial suite's
real-handler federations included, is `integration` (`make test-integration`): real engines,
HTTP services and processes, one component path at a time."""

TIERS = ("unit", "integration", "e2e")


def tier_of(path: Path) -> str:
    """The tier of a test file, from its name."""
    name = path.name
    return "unit" if name in UNIT_TIER else "e2e" if name in E2E_TIER else "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its tier."""
    for item in items:
        item.add_marker(getattr(pytest.mark, tier_of(Path(str(item.fspath)))))


@pytest.fixture(autouse=True)
def fedrisk_workspace(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's own fedrisk workspace (`federation.workspace`): a command a test runs, in this
    process or a child, tracks there and never in the checkout's directory."""
    from federation.workspace import WORKSPACE_ENV

    root = tmp_path_factory.mktemp("workspace")
    monkeypatch.setenv(WORKSPACE_ENV, str(root))
    return root


@pytest.fixture(scope="session")
def federation_data(tmp_path_factory: pytest.TempPathFactory) -> SynthesisReport:
    """Three synthetic hospitals, 15,000 patients in all."""
    return synthesize(3, 15_000, tmp_path_factory.mktemp("federation") / "data", seed=7)


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyBundlePaths:
    """One federation key: hospital secret context and server parameters-only context."""
    return init_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture()
def data_dir(federation_data: SynthesisReport) -> Path:
    """Directory of the three hospital files."""
    return federation_data.files[0].parent


@pytest.fixture(scope="session")
def signals_federation(tmp_path_factory: pytest.TempPathFactory):
    """Two synthetic hospitals and three real federated training runs of them (one round each),
    made once for the signals-service tests; each test module releases them into its own registry
    and works on its own copy of the nodes."""
    from experiments import signals_local

    return signals_local.build_federation(tmp_path_factory.mktemp("signals-federation"), runs=3)
