"""The membership audit query against a malicious coordinator, through the real relay and node
service: it reads the training split, so it must be exactly as guarded as any other DP answer —
the model it names checked, `split` refused anywhere else, charged before it is computed and
within budget, refused by the node's own policy (`max_audit_epsilon`: 0 answers none), and noised."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from clients.policy import NodePolicy
from engines.membership_audit import audit_query
from federation import messages as M
from federation.he_codec import HospitalKey
from federation.model import initial_weights, weights_digest

from .conftest import BUDGET, audit_actions, charges

WEIGHTS = initial_weights("logreg", 5, 40)


def _ask(coordinator, node, query: dict | str, run: str, weights: np.ndarray | None = WEIGHTS):
    """Send QUERY_ANSWER with `query` (a mapping or raw JSON, unchecked: the attacker's own text)."""
    text = query if isinstance(query, str) else json.dumps(query)
    config = coordinator.base(run, 0, None, **{M.QUERY: text, M.QUERY_RUN: run})
    records = {M.CONFIG: ConfigRecord(config)}
    if weights is not None:
        records[M.QUERY_MODEL] = ArrayRecord({M.WEIGHTS: Array(np.asarray(weights, dtype=np.float32))})
    return coordinator.send(node, M.QUERY_ANSWER, records)


def _audit(epsilon: float = 1.0) -> dict:
    return audit_query(weights_digest(WEIGHTS), "logreg", epsilon=epsilon).to_dict()


def _analytics(node) -> list:
    return [c for c in charges(node) if c.kind == "analytics"]


def _decrypted(coordinator, node, reply) -> np.ndarray:
    """The node's noised answer in counts (what only a key holder could read; the test is one)."""
    query = audit_query(weights_digest(WEIGHTS), "logreg")
    layout = query.layout()
    key = HospitalKey.load(node.key_file)
    values = key._decrypt_exact(key.parse(coordinator.contribution(reply).ciphertexts, layout.length), layout.length)
    return values[:-1] * layout.units


def test_a_membership_query_with_weights_that_are_not_the_named_model_is_refused_uncharged(coordinator) -> None:
    node = coordinator.nodes[0]
    for weights in (initial_weights("logreg", 6, 40), None, np.zeros(7)):
        error = coordinator.error(_ask(coordinator, node, _audit(), "m1", weights))
        assert error is not None and "\n" not in error
        assert "does not match its SHA-256" in error or "wrong number of weights" in error, error
    assert _analytics(node) == []
    assert audit_actions(node).count("refusal") >= 3


@pytest.mark.parametrize("query", [
    {"name": "who-trained", "purpose": "credit-risk-research", "epsilon": 0.5, "measure": "count",
     "group-by": ["split"]},
    {"name": "risk-by-split", "purpose": "credit-risk-research", "epsilon": 0.5, "measure": "histogram",
     "field": "risk_score", "bins": [0, 0.5, 1], "group-by": ["split"],
     "model": {"sha256": weights_digest(WEIGHTS), "kind": "logreg"}},
])
def test_split_without_membership_score_is_refused_in_one_line_naming_it(coordinator, query) -> None:
    node = coordinator.nodes[1]
    error = coordinator.error(_ask(coordinator, node, query, "m2"))
    assert error is not None and "'split' applies only to field 'membership_score'" in error and "\n" not in error
    assert _analytics(node) == []


def test_the_audit_is_charged_before_it_is_computed_and_a_repeat_beyond_budget_is_refused(
        coordinator, monkeypatch: pytest.MonkeyPatch) -> None:
    node = coordinator.nodes[2]
    import clients.analytics

    def fail(*_args, **_kwargs):
        raise RuntimeError("the computation failed after the charge")

    NodePolicy.load(node.directory).with_changes(max_audit_epsilon=5.0).save(node.directory)  # the hospital's call
    monkeypatch.setattr(clients.analytics, "local_statistics", fail)
    assert coordinator.error(_ask(coordinator, node, _audit(epsilon=5.0), "m3")) is not None
    (charge,) = _analytics(node)  # nothing left the node, yet the ledger already holds the charge
    z = audit_query(weights_digest(WEIGHTS), "logreg", epsilon=5.0).noise_multiplier()
    assert charge.mechanism.noise_multiplier == pytest.approx(z) and charge.slot.startswith("query-")
    monkeypatch.undo()

    assert coordinator.error(_ask(coordinator, node, _audit(epsilon=5.0), "m3")) is None  # the same slot: a retry
    assert len(_analytics(node)) == 1
    error = coordinator.error(_ask(coordinator, node, _audit(epsilon=5.0), "m3-again"))  # fresh noise: over the budget
    assert error is not None and "budget for 'credit-risk-research' exceeded" in error
    assert f"of {BUDGET:g}" in error and "nothing charged" in error
    assert len(_analytics(node)) == 1


def test_the_nodes_policy_refuses_an_audit_it_does_not_allow(coordinator) -> None:
    node = coordinator.nodes[0]
    policy = NodePolicy.load(node.directory)
    assert policy.max_audit_epsilon == 1.0  # a new node's default: half its budget, at most 1
    error = coordinator.error(_ask(coordinator, node, _audit(epsilon=1.5), "m4"))
    assert error == "policy max_audit_epsilon: membership audit epsilon 1.5 is over the cap of 1", error
    policy.with_changes(max_audit_epsilon=0.0).save(node.directory)  # this hospital answers no audit at all
    error = coordinator.error(_ask(coordinator, node, _audit(epsilon=0.5), "m4"))
    assert error is not None and "answers no membership audit" in error and "\n" not in error
    count = {"name": "count-by-sex", "purpose": "credit-risk-research", "epsilon": 0.5, "measure": "count",
             "group-by": ["sex"]}
    assert coordinator.error(_ask(coordinator, node, count, "m4-count", None)) is None  # other queries still served
    policy.with_changes(purposes=["applicant-scoring"]).save(node.directory)
    error = coordinator.error(_ask(coordinator, node, _audit(epsilon=0.5), "m4"))
    assert error is not None and "purposes" in error
    assert [c.run_id for c in _analytics(node)] == ["m4-count"]


def test_the_answer_is_noised_at_its_declared_scale_and_a_retry_repeats_it(coordinator) -> None:
    node = coordinator.nodes[1]
    query = _audit(epsilon=1.0)
    first, again, second = (_decrypted(coordinator, node, _ask(coordinator, node, query, run))
                            for run in ("m5", "m5", "m5-fresh"))
    np.testing.assert_allclose(first, again, atol=1e-3)  # the same run on the same records: the same noise
    z = audit_query(weights_digest(WEIGHTS), "logreg", epsilon=1.0).noise_multiplier()
    difference = (first - second) / (np.sqrt(2.0) * z)  # two independent draws of N(0, z^2) per cell
    assert np.abs(difference).max() > 0.05 and 0.6 < difference.std() < 1.5
    assert len(_analytics(node)) == 2
