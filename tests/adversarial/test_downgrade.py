"""Downgrade: a run config from the coordinator that tries to switch protections off or below the
hospital's own policy is refused before any record is read, audited, with nothing charged."""

from __future__ import annotations

import pytest

from federation import messages as M

from .conftest import audit_actions, charges


def _attack(coordinator, changes: dict) -> tuple[str | None, object]:
    config = {**coordinator.config.to_user_config(), **changes}
    node = coordinator.nodes[0]
    from flwr.app import ConfigRecord
    from federation.contributions import relay_record

    reply = coordinator.send(node, M.CENSUS, {M.CONFIG: ConfigRecord(coordinator.base("downgrade", 0, config)),
                                              M.ANCHORS: ConfigRecord(relay_record([]))})
    return coordinator.error(reply), node


@pytest.mark.parametrize(("changes", "named"), [
    ({"dp": False}, "dp"),
    ({"he": False}, "he"),
    ({"dp": False, "he": False, "min-contributors": 1}, "dp"),
    ({"min-contributors": 1}, "min_contributors"),
    ({"target-epsilon": 9.0, "provision-budget": 9.0}, "max_epsilon_per_run"),
    ({"rounds": 400}, "max_rounds"),
    ({"delta": 1e-3}, "max_delta"),
    ({"purpose": "marketing"}, "purpose"),
    ({"model": "mlp:2048,1024"}, "max_model_parameters"),
])
def test_a_config_that_weakens_the_node_is_refused_audited_and_charges_nothing(coordinator, changes, named) -> None:
    error, node = _attack(coordinator, changes)
    assert error is not None and "\n" not in error
    assert named in error, error
    actions = audit_actions(node)
    assert actions[-1] == "refusal"
    assert "data.load" not in actions and "run.start" not in actions  # no record was read
    assert charges(node) == []


def test_a_coordinator_of_another_federation_is_refused(coordinator) -> None:
    from flwr.app import ConfigRecord

    node = coordinator.nodes[0]
    base = {**coordinator.base("downgrade", 0), M.FEDERATION: "0123456789abcdef"}
    reply = coordinator.send(node, M.CENSUS, {M.CONFIG: ConfigRecord(base)})
    assert "federation" in (coordinator.error(reply) or "")
    assert charges(node) == [] and "data.load" not in audit_actions(node)


def test_a_training_message_that_downgrades_mid_run_is_refused_before_training(coordinator) -> None:
    run = "mid-run"
    census = coordinator.census(run)
    weaker = {**coordinator.config.to_user_config(), "min-contributors": 1}
    reply = coordinator.train(coordinator.nodes[1], run, 1, census, {}, config=weaker)
    assert "min_contributors" in (coordinator.error(reply) or "")
    assert charges(coordinator.nodes[1]) == []


def test_the_node_policy_floor_holds_even_when_the_config_asks_for_more_hospitals(coordinator) -> None:
    """Asking for more contributors than the floor is allowed; the node's floor still applies."""
    run = "floor"
    census = coordinator.census(run, config={**coordinator.config.to_user_config(), "min-contributors": 3})
    assert len(census) == 3


def test_a_refused_downgrade_raises_the_hospitals_alert(coordinator) -> None:
    """The hospital that switched alerts on hears of the coordinator's attempt as it is refused."""
    from privacy.alerts import AlertConfig, drain_deliveries, recorded_alerts

    node = coordinator.nodes[0]
    AlertConfig().write(node.directory / "alerts.json")
    try:
        error, _ = _attack(coordinator, {"rounds": 400})
        drain_deliveries()
        fired = [alert for alert, _ in recorded_alerts(node.directory) if alert.rule == "policy-refusal"]
        assert error is not None and fired and fired[-1].severity == "high" and "max_rounds" in fired[-1].summary
    finally:
        (node.directory / "alerts.json").unlink()
