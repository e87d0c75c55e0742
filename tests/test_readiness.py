"""`fedrisk node check --dir`: every check a run makes at a node, up front, from the real node
directory; the input count a schema run needs is derived, never typed."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import _run_config, build_parser
from clients.node_state import NodeState
from clients.readiness import check_readiness
from engines.provisioning import provision_nodes
from experiments.breast_cancer import PURPOSE, export_breast_cancer
from federation.config import RunConfig
from federation.errors import ConfigError, FedriskError
from federation.he_codec import init_keys

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cancer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Breast-cancer exports, their schema, keys and three provisioned nodes (budget 5, delta 2e-4)."""
    work = tmp_path_factory.mktemp("cancer")
    _, schema = export_breast_cancer(work / "data", hospitals=3, seed=0)
    keys = init_keys(work / "keys")
    provision_nodes(work / "data", keys.hospital_context, work / "nodes", purposes={PURPOSE: (5.0, 2e-4)},
                    schema_file=schema)
    return work, schema, work / "keys"


def _config(**changes) -> RunConfig:
    base = dict(purpose=PURPOSE, features="schema", n_features=1, target_epsilon=4.0, delta=2e-4, sample_rate=0.05)
    return RunConfig(**{**base, **changes})


def _tree_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def test_a_node_ready_for_the_walkthrough_run_lists_its_inputs_and_writes_nothing(cancer) -> None:
    work, _, _ = cancer
    node = work / "nodes" / "hospital_00"
    before = _tree_digest(node)
    report = check_readiness(NodeState.load(node), _config())
    assert report.ready, report.problems
    assert len(report.inputs) == 30 and "mean_radius" in report.inputs
    assert report.withheld["record_id"].startswith("direct identifier")
    assert report.usable == report.train_records + report.test_records > 0
    assert 0.0 == report.epsilon_spent < report.epsilon_after <= 4.0 + 1e-6
    assert any("expected DP-SGD batch" in w for w in report.warnings)  # ~60 training records at q = 0.05
    assert _tree_digest(node) == before  # no audit entry, no ledger row, no noise cache
    starved = check_readiness(NodeState.load(node), _config(sample_rate=0.01))  # ~60 records: a batch of 0.6
    assert any("too few consented records for sample-rate 0.01" in p for p in starved.problems)
    assert _tree_digest(node) == before


def test_every_problem_a_run_would_meet_is_listed_at_once(cancer, tmp_path: Path) -> None:
    work, schema, keys = cancer
    other = check_readiness(NodeState.load(work / "nodes" / "hospital_01"), _config(purpose="credit-risk-research"))
    assert any("no consent column of the schema covers it" in p for p in other.problems)
    assert any("no budget in this node's ledger" in p for p in other.problems)
    # a node whose budget is epsilon 1 at a loose delta: one report names the epsilon cap, the
    # budget and delta over 1/(10 n) for its ~150 training records
    state = provision_nodes(work / "data", keys / "hospital.ckks", tmp_path / "nodes",
                            purposes={PURPOSE: (1.0, 1e-2)}, schema_file=schema)[1]
    report = check_readiness(state, _config(target_epsilon=4.0, delta=5e-3))
    assert any("max_epsilon_per_run" in p for p in report.problems)
    assert any("over its budget of 1" in p for p in report.problems)
    assert any("1/(10 n)" in p for p in report.problems)
    assert check_readiness(state, _config(target_epsilon=1.0, delta=1e-4)).ready


def test_a_numeric_input_without_bounds_is_a_problem_before_any_run(cancer, tmp_path: Path) -> None:
    work, schema, keys = cancer
    unbounded = tmp_path / "schema.yaml"
    unbounded.write_text(schema.read_text().replace("    min: 4.0\n    max: 31.0\n", "", 1))
    states = provision_nodes(work / "data", keys / "hospital.ckks", tmp_path / "nodes",
                             purposes={PURPOSE: (5.0, 2e-4)}, schema_file=unbounded)
    report = check_readiness(states[0], _config())
    assert any("mean_radius: numeric features of a schema-encoded run need min and max" in p for p in report.problems)
    result = subprocess.run([sys.executable, "-m", "cli.main", "node", "check", "--dir", str(states[0].directory),
                             "--features", "schema", "--purpose", PURPOSE, "--epsilon", "4", "--delta", "2e-4"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "PROBLEM: model inputs: mean_radius" in result.stdout
    assert "problem(s) a run would meet" in result.stderr and "Traceback" not in result.stderr


def test_the_input_count_of_a_schema_run_is_derived_and_a_wrong_one_is_refused(cancer) -> None:
    work, schema, keys = cancer
    argv = ["run", "--data", str(work / "data"), "--schema", str(schema), "--keys", str(keys), "--out",
            str(work / "run"), "--features", "schema", "--purpose", PURPOSE, "--delta", "2e-4"]
    assert _run_config(build_parser().parse_args(argv)).input_size == 30
    assert _run_config(build_parser().parse_args([*argv[:3], "--nodes", str(work / "nodes"), *argv[5:]])).input_size == 30
    with pytest.raises(ConfigError, match="--n-features 26 disagrees with the schema, whose inputs number 30"):
        _run_config(build_parser().parse_args([*argv, "--n-features", "26"]))


def test_a_scored_schema_query_cannot_read_a_label_the_schema_withholds(cancer, tmp_path: Path) -> None:
    """The coordinator asks for a risk_score histogram grouped by the label, or a membership audit,
    of a schema-feature model at a hospital whose schema puts the label in a restricted class:
    refused before any record is read, as the same query of a standard model is."""
    from clients.analytics import HospitalAnalytics
    from federation.he_codec import HospitalKey
    from federation.query import CohortQuery
    from privacy.ledger import BudgetLedger

    work, schema, keys = cancer
    restricted = tmp_path / "schema.yaml"
    restricted.write_text(schema.read_text().replace("  malignant:\n    role: label\n    class: diagnosis-treatment\n",
                                                     "  malignant:\n    role: label\n    class: psych-social\n", 1))
    state = provision_nodes(work / "data", keys / "hospital.ckks", tmp_path / "nodes",
                            purposes={PURPOSE: (5.0, 2e-4)}, schema_file=restricted)[0]
    analytics = HospitalAnalytics(state, HospitalKey.load(keys / "hospital.ckks"))
    model = {"sha256": "0" * 64, "kind": "logreg", "features": "schema"}
    for field, groups, bins in (("risk_score", ["delinquent_90d_12m"], [0, 0.5, 1]),
                                ("membership_score", ["split"], [0, 0.5, 1])):
        query = CohortQuery.from_mapping({"name": "probe", "purpose": PURPOSE, "epsilon": 0.1, "measure": "histogram",
                                          "field": field, "bins": bins, "model": model, "suppress-below": 0,
                                          "group-by": groups})
        with pytest.raises(FedriskError, match="not released for purpose"):
            analytics.check(query, "probe-run")
    with BudgetLedger(state.ledger_path) as ledger:
        assert ledger.history(PURPOSE) == []  # nothing charged
    with pytest.raises(FedriskError, match="does not release it for purpose"):  # nor does training read it
        state.load_records(PURPOSE, features="schema")
    assert any("restricted class psych-social" in p for p in check_readiness(state, _config()).problems)
