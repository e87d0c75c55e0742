"""A hospital's node policy: the last word on what its node does, whatever the coordinator asks.

What a hospital would notice: with no policy file its node runs on safe defaults; a policy it
writes is read back exactly and kept private (0600); a coordinator asking for more than the
policy allows (more epsilon, rounds, delta, a bigger model, fewer contributors, another purpose
or federation) is refused with one line naming the policy field and the value at fault, while an
honest run passes; a damaged policy file is never half-applied; and `fedrisk node policy set`
either changes the file and records it in the audit log, or changes neither.
"""

from __future__ import annotations

import json
import math
import stat
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest

from clients.node_state import NodeState
from clients.policy import POLICY_FILE, NodePolicy, PolicyRefusal, parse_assignments
from experiments.synthetic import synthesize
from privacy.audit import POLICY_SET
from cli.main import EXIT_USER_ERROR, main
from federation.errors import ConfigError
from federation.he_codec import KeyBundlePaths

RESEARCH, COHORT = "credit-risk-research", "cohort-research"
KEY_ID = "0a1b2c3d4e5f6a7b"
OTHER_KEY_ID = "fedcba9876543210"


def honest_run(**overrides: Any) -> dict[str, Any]:
    """What an honest coordinator asks of a node with the default policy."""
    run = dict(purpose=RESEARCH, target_epsilon=1.0, evaluation_epsilon=0.2, rounds=5, delta=1e-6,
               min_contributors=2, model_parameters=4_737, federation=KEY_ID, key_id=KEY_ID,
               ledger_purposes=[RESEARCH, COHORT], ledger_delta=1e-5)
    return run | overrides


def honest_query(**overrides: Any) -> dict[str, Any]:
    query = dict(purpose=RESEARCH, epsilon=1.0, delta=1e-6, federation=KEY_ID, key_id=KEY_ID,
                 ledger_purposes=[RESEARCH], ledger_delta=1e-5)
    return query | overrides


def assert_refusal(error: BaseException, field: str, *needles: str) -> None:
    """One line, naming the policy field and the offending value."""
    message = str(error)
    assert isinstance(error, PolicyRefusal) and error.field == field, message
    assert "\n" not in message and f"policy {field}:" in message, message
    for needle in needles:
        assert needle in message, (needle, message)


# --- defaults and the file ---------------------------------------------------------------------

def test_defaults_without_a_policy_file(tmp_path: Path) -> None:
    policy = NodePolicy.load(tmp_path)
    assert policy == NodePolicy()
    assert policy.to_dict() == {"min_contributors": 2, "max_epsilon_per_run": 2.0, "max_rounds": 50,
                                "max_delta": 1e-5, "purposes": [], "max_model_parameters": 2_000_000,
                                "federation": "", "max_evaluation_epsilon": 0.5, "max_audit_epsilon": 0.5,
                                "grant_retention_days": 365}
    assert list(tmp_path.iterdir()) == [], "loading the defaults wrote something"
    assert not {"dp", "he"} & {f.name for f in fields(NodePolicy)}, "DP and HE have no switch"


def test_save_and_load_round_trip_private_and_atomic(tmp_path: Path) -> None:
    policy = NodePolicy(min_contributors=4, max_epsilon_per_run=0.75, max_rounds=12, max_delta=1e-7,
                        purposes=(RESEARCH, COHORT), max_model_parameters=10_000, federation=KEY_ID,
                        max_evaluation_epsilon=0.0)
    (tmp_path / POLICY_FILE).write_text("{}")
    (tmp_path / POLICY_FILE).chmod(0o644)
    path = policy.save(tmp_path)
    assert path == tmp_path / POLICY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [POLICY_FILE], "a temporary file was left behind"
    assert NodePolicy.load(tmp_path) == policy
    assert json.loads(path.read_text()) == policy.to_dict()


def test_lists_and_whole_floats_are_normalised() -> None:
    policy = NodePolicy(purposes=[RESEARCH], max_epsilon_per_run=1, max_delta=1e-6)
    assert policy.purposes == (RESEARCH,) and isinstance(policy.max_epsilon_per_run, float)
    assert hash(policy) == hash(NodePolicy(purposes=(RESEARCH,), max_epsilon_per_run=1.0, max_delta=1e-6))


@pytest.mark.parametrize("changes, field", [
    ({"min_contributors": 1}, "min_contributors"),          # a floor of one reveals a single update
    ({"min_contributors": True}, "min_contributors"),
    ({"max_rounds": 2.0}, "max_rounds"),
    ({"max_rounds": 0}, "max_rounds"),
    ({"max_epsilon_per_run": -1.0}, "max_epsilon_per_run"),
    ({"max_epsilon_per_run": math.inf}, "max_epsilon_per_run"),
    ({"max_epsilon_per_run": "2"}, "max_epsilon_per_run"),
    ({"max_evaluation_epsilon": math.nan}, "max_evaluation_epsilon"),
    ({"max_delta": 1.0}, "max_delta"),
    ({"max_delta": 0.0}, "max_delta"),
    ({"max_model_parameters": False}, "max_model_parameters"),
    ({"purposes": RESEARCH}, "purposes"),                   # a string is not a list of purposes
    ({"purposes": [RESEARCH, RESEARCH]}, "purposes"),
    ({"purposes": ["Credit Risk"]}, "purposes"),
    ({"federation": "my-federation"}, "federation"),
    ({"federation": 7}, "federation"),
    ({"dp": False}, "dp"),
    ({"he": False}, "he"),
    ({"min_contributor": 3}, "min_contributor"),
])
def test_out_of_range_fields_are_refused(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        NodePolicy().with_changes(**changes)
    assert field in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("text, field", [
    ('{"max_rounds": 10', "JSON"),
    ('["min_contributors", 3]', "JSON object"),
    ('{"max_rounds": 10, "max_roundz": 5}', "max_roundz"),
    ('{"dp": false}', "dp"),
    ('{"max_epsilon_per_run": -0.5}', "max_epsilon_per_run"),
    ('{"max_delta": NaN}', "max_delta"),
    ('{"min_contributors": true}', "min_contributors"),
    ('{"max_rounds": 3, "max_rounds": 500}', "max_rounds"),  # which one would win? neither
    ('{"purposes": "credit-risk-research"}', "purposes"),
])
def test_bad_policy_files_name_the_file_and_field(tmp_path: Path, text: str, field: str) -> None:
    (tmp_path / POLICY_FILE).write_text(text)
    with pytest.raises(ConfigError) as caught:
        NodePolicy.load(tmp_path)
    message = str(caught.value)
    assert str(tmp_path / POLICY_FILE) in message and field in message and "\n" not in message, message


def test_a_partial_file_keeps_the_other_defaults(tmp_path: Path) -> None:
    (tmp_path / POLICY_FILE).write_text('{"min_contributors": 3}')
    assert NodePolicy.load(tmp_path) == NodePolicy(min_contributors=3)


# --- checks ------------------------------------------------------------------------------------

def test_an_honest_run_and_query_pass() -> None:
    policy = NodePolicy()
    assert policy.check_run(**honest_run()) is None
    assert policy.check_run(**honest_run(min_contributors=5, evaluation_epsilon=0.0)) is None  # more is fine
    assert policy.check_run(**honest_run(target_epsilon=2.0, rounds=50, delta=1e-5, model_parameters=2_000_000,
                                         evaluation_epsilon=0.5)) is None  # at each cap exactly
    assert policy.check_query(**honest_query()) is None
    pinned = NodePolicy(purposes=(COHORT,), federation=OTHER_KEY_ID)
    assert pinned.check_run(**honest_run(purpose=COHORT, federation=OTHER_KEY_ID)) is None


@pytest.mark.parametrize("policy, overrides, field, needles", [
    (NodePolicy(), {"target_epsilon": 2.5}, "max_epsilon_per_run", ("2.5", "2")),
    (NodePolicy(), {"target_epsilon": math.nan}, "max_epsilon_per_run", ("nan",)),
    (NodePolicy(), {"target_epsilon": 0.0}, "max_epsilon_per_run", ("0.0",)),
    (NodePolicy(), {"evaluation_epsilon": 0.6}, "max_evaluation_epsilon", ("0.6",)),
    (NodePolicy(), {"evaluation_epsilon": -0.1}, "max_evaluation_epsilon", ("-0.1",)),
    (NodePolicy(), {"rounds": 51}, "max_rounds", ("51", "50")),
    (NodePolicy(), {"rounds": True}, "max_rounds", ("True",)),
    (NodePolicy(), {"rounds": 5.0}, "max_rounds", ("5.0",)),
    (NodePolicy(), {"delta": 5e-6, "ledger_delta": 1e-6}, "max_delta", ("5e-06", "1e-06", RESEARCH)),
    (NodePolicy(max_delta=1e-7), {"delta": 1e-6}, "max_delta", ("1e-06", "1e-07")),
    (NodePolicy(), {"delta": math.inf}, "max_delta", ("inf",)),
    (NodePolicy(), {"min_contributors": 1}, "min_contributors", ("1", "2")),
    (NodePolicy(min_contributors=4), {"min_contributors": 3}, "min_contributors", ("3", "4")),
    (NodePolicy(), {"min_contributors": "2"}, "min_contributors", ("'2'",)),
    (NodePolicy(purposes=(RESEARCH,)), {"purpose": COHORT}, "purposes", (COHORT,)),
    (NodePolicy(), {"purpose": "marketing"}, "purposes", ("marketing", "ledger")),
    (NodePolicy(purposes=("marketing",)), {"purpose": "marketing"}, "purposes", ("marketing", "ledger")),
    (NodePolicy(), {"model_parameters": 2_000_001}, "max_model_parameters", ("2,000,001",)),
    (NodePolicy(), {"federation": OTHER_KEY_ID}, "federation", (OTHER_KEY_ID, KEY_ID)),
    (NodePolicy(federation=OTHER_KEY_ID), {}, "federation", (KEY_ID, OTHER_KEY_ID)),  # own key, not the pinned one
])
def test_check_run_refuses_what_the_policy_forbids(policy: NodePolicy, overrides: dict[str, Any], field: str,
                                                   needles: tuple[str, ...]) -> None:
    with pytest.raises(PolicyRefusal) as caught:
        policy.check_run(**honest_run(**overrides))
    assert_refusal(caught.value, field, *needles)


@pytest.mark.parametrize("overrides, field, needles", [
    ({"epsilon": 3.0}, "max_epsilon_per_run", ("3",)),
    ({"delta": 2e-5}, "max_delta", ("2e-05",)),
    ({"delta": 5e-6, "ledger_delta": 1e-6}, "max_delta", ("5e-06", "1e-06")),
    ({"purpose": COHORT}, "purposes", (COHORT, "ledger")),
    ({"federation": OTHER_KEY_ID}, "federation", (OTHER_KEY_ID,)),
])
def test_check_query_refuses_what_the_policy_forbids(overrides: dict[str, Any], field: str,
                                                     needles: tuple[str, ...]) -> None:
    with pytest.raises(PolicyRefusal) as caught:
        NodePolicy().check_query(**honest_query(**overrides))
    assert_refusal(caught.value, field, *needles)


def test_check_records_caps_delta_at_a_tenth_of_one_over_n() -> None:
    policy = NodePolicy()
    assert policy.check_records(delta=1e-5, records=10_000) is None  # exactly 1/(10 n)
    for records in (10_001, 20_000):
        with pytest.raises(PolicyRefusal) as caught:
            policy.check_records(delta=1e-5, records=records)
        assert_refusal(caught.value, "max_delta", "1e-05")
        assert str(records) not in str(caught.value), "the refusal states the node's record count"
    with pytest.raises(PolicyRefusal):
        policy.check_records(delta=1e-5, records=0)


def test_effective_min_contributors_never_goes_below_the_floor() -> None:
    assert NodePolicy().effective_min_contributors(1) == 2
    assert NodePolicy().effective_min_contributors(5) == 5
    assert NodePolicy(min_contributors=3).effective_min_contributors(2) == 3
    with pytest.raises(PolicyRefusal):
        NodePolicy().effective_min_contributors(True)


def test_parse_assignments_types_each_field() -> None:
    assert parse_assignments(["min-contributors=3", "max_delta=1e-6", f"purposes={RESEARCH}, {COHORT}",
                              "federation="]) == {
        "min_contributors": 3, "max_delta": 1e-6, "purposes": (RESEARCH, COHORT), "federation": ""}
    assert parse_assignments(["purposes="]) == {"purposes": ()}  # back to: every purpose with a budget
    for bad, needle in (("max_rounds=3.5", "max_rounds"), ("max_rounds", "KEY=VALUE"), ("he=0", "he"),
                        ("bogus=1", "bogus")):
        with pytest.raises(ConfigError, match=needle):
            parse_assignments([bad])


# --- the CLI on a real node ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(1, 500, tmp_path_factory.mktemp("policy") / "data", seed=11).files[0]


@dataclass
class Node:
    state: NodeState

    @property
    def dir(self) -> str:
        return str(self.state.directory)

    @property
    def policy_file(self) -> Path:
        return self.state.directory / POLICY_FILE

    def audit_actions(self) -> list[str]:
        return [entry.action for entry in self.state.audit().entries()]


@pytest.fixture()
def node(tmp_path: Path, export: Path, keys: KeyBundlePaths) -> Node:
    return Node(NodeState.init(tmp_path / "node", hospital="hospital_a", data_file=export,
                               key_file=keys.hospital_context, budgets={RESEARCH: (5.0, 1e-5)}))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_cli_show_prints_the_defaults_and_writes_nothing(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(node.state.directory)
    assert main(["node", "policy", "show", "--dir", node.dir]) == 0
    assert json.loads(capsys.readouterr().out) == NodePolicy().to_dict()
    assert snapshot(node.state.directory) == before


def test_cli_show_refuses_a_directory_that_is_not_a_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node", "policy", "show", "--dir", str(tmp_path)]) == EXIT_USER_ERROR
    assert "fedrisk node init" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_set_writes_the_policy_and_audits_it(node: Node, keys: KeyBundlePaths,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node", "policy", "set", "--dir", node.dir, "min_contributors=3", "max-rounds=20",
                 f"purposes={RESEARCH},{COHORT}", f"federation={keys.key_id}", "max_delta=1e-05"]) == 0
    expected = NodePolicy(min_contributors=3, max_rounds=20, purposes=(RESEARCH, COHORT), federation=keys.key_id)
    assert NodePolicy.load(node.state.directory) == expected
    assert stat.S_IMODE(node.policy_file.stat().st_mode) == 0o600
    entry = node.state.audit().entries()[-1]
    assert entry.action == POLICY_SET
    assert entry.details == {"min_contributors": 3, "max_rounds": 20, "purposes": [RESEARCH, COHORT],
                             "federation": keys.key_id}  # max_delta was not changed
    assert node.state.audit().verify().ok
    capsys.readouterr()
    assert main(["node", "policy", "show", "--dir", node.dir]) == 0
    assert json.loads(capsys.readouterr().out) == expected.to_dict()
    # the policy now refuses a coordinator asking for fewer contributors than the hospital's floor
    with pytest.raises(PolicyRefusal, match="min_contributors"):
        NodePolicy.load(node.state.directory).check_run(**honest_run(federation=keys.key_id, key_id=keys.key_id))


@pytest.mark.parametrize("assignments, needle", [
    (["min_contributors=1"], "min_contributors"),
    (["max_rounds=20", "max_epsilon_per_run=-1"], "max_epsilon_per_run"),  # one bad field: nothing changes
    (["max_rounds=true"], "max_rounds"),
    (["max_delta=nan"], "max_delta"),
    (["dp=false"], "dp"),
    (["purposes=Credit Risk"], "purposes"),
    (["max_rounds=5", "max_rounds=6"], "max_rounds"),
    (["purposes=123456789"], "audit"),  # valid for the policy, refused by the audit log: the write is undone
])
def test_cli_bad_set_leaves_the_file_and_the_log_unchanged(node: Node, capsys: pytest.CaptureFixture[str],
                                                           assignments: list[str], needle: str) -> None:
    assert main(["node", "policy", "set", "--dir", node.dir, "max_rounds=30"]) == 0
    before, actions = node.policy_file.read_bytes(), node.audit_actions()
    capsys.readouterr()
    assert main(["node", "policy", "set", "--dir", node.dir, *assignments]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("fedrisk: error: ") and err.count("\n") == 1 and needle in err, err
    assert node.policy_file.read_bytes() == before
    assert node.audit_actions() == actions
    assert sorted(p.name for p in node.state.directory.iterdir() if p.name.startswith(".")) == []


def test_cli_bad_first_set_writes_no_file(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    actions = node.audit_actions()
    assert main(["node", "policy", "set", "--dir", node.dir, "purposes=123456789"]) == EXIT_USER_ERROR
    assert not node.policy_file.exists() and node.audit_actions() == actions


def test_a_membership_audit_is_capped_by_its_own_field_and_zero_refuses_every_one() -> None:
    policy = NodePolicy(max_epsilon_per_run=2.0, max_audit_epsilon=0.5)
    assert policy.check_query(**honest_query(epsilon=1.0)) is None  # any other query: the per-run cap
    assert policy.check_query(**honest_query(epsilon=0.5, membership=True)) is None
    with pytest.raises(PolicyRefusal, match="^policy max_audit_epsilon: membership audit epsilon 1 is over the cap of 0.5$"):
        policy.check_query(**honest_query(epsilon=1.0, membership=True))
    with pytest.raises(PolicyRefusal, match="answers no membership audit") as refused:
        policy.with_changes(max_audit_epsilon=0.0).check_query(**honest_query(epsilon=0.1, membership=True))
    assert refused.value.field == "max_audit_epsilon"
    assert NodePolicy.for_budgets({RESEARCH: (6.0, 1e-5)}).max_audit_epsilon == 1.0
