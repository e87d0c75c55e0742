"""Cohort answers against a malicious coordinator: no free oracle on the exact counts, no raw
errors, and the node's caps on delta and on a query run's composed epsilon."""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from federation import messages as M
from federation.query import CohortQuery

from .conftest import charges

COUNT = {"name": "count-by-sex", "purpose": "credit-risk-research", "epsilon": 0.5, "measure": "count",
         "group-by": ["sex"]}


def _answer(coordinator, node, query: dict, run: str, **extra) -> object:
    parsed = CohortQuery.from_mapping(query, source="test")
    config = coordinator.base(run, 0, None, **{M.QUERY: parsed.to_json(), M.QUERY_RUN: run, **extra})
    return coordinator.send(node, M.QUERY_ANSWER, {M.CONFIG: ConfigRecord(config), **extra.pop("records", {})})


def test_the_coordinators_hospital_count_is_no_oracle_on_exact_cell_counts(coordinator) -> None:
    node = coordinator.nodes[0]
    replies = [_answer(coordinator, node, COUNT, "q1", **{M.HOSPITALS: h}) for h in (1, 1111, 1112, 2 ** 22, 0, -5)]
    assert [coordinator.error(r) for r in replies] == [None] * 6  # nothing data-dependent to bisect on
    assert len([c for c in charges(node) if c.kind == "analytics"]) == 1
    key = __import__("federation.he_codec", fromlist=["HospitalKey"]).HospitalKey.load(node.key_file)
    vectors = {tuple(np.round(key._decrypt_exact(key.parse(coordinator.contribution(r).ciphertexts, 5), 5), 9))
               for r in replies}
    assert len(vectors) == 1  # the same answer whatever the coordinator claims


def test_a_query_model_without_weights_gets_a_one_line_refusal(coordinator) -> None:
    node = coordinator.nodes[0]
    parsed = CohortQuery.from_mapping(COUNT, source="test")
    config = coordinator.base("q2", 0, None, **{M.QUERY: parsed.to_json(), M.QUERY_RUN: "q2"})
    reply = coordinator.send(node, M.QUERY_ANSWER, {M.CONFIG: ConfigRecord(config),
                                                    M.QUERY_MODEL: ArrayRecord({"other": Array(np.zeros(3))})})
    error = coordinator.error(reply)
    assert error is not None and "no weights" in error and "\n" not in error


def test_a_query_run_cannot_compose_past_the_nodes_per_run_cap(coordinator) -> None:
    node = coordinator.nodes[1]
    from clients.policy import NodePolicy

    NodePolicy.load(node.directory).with_changes(max_epsilon_per_run=1.0).save(node.directory)
    answered = []
    for field in ("sex", "area_type", "insurance_type"):
        query = {**COUNT, "name": f"count-by-{field.replace('_', '-')}", "epsilon": 0.9, "group-by": [field]}
        answered.append(coordinator.error(_answer(coordinator, node, query, "qF")))
    assert answered[0] is None
    assert all(e is not None and "max_epsilon_per_run" in e for e in answered[1:]), answered
    assert len([c for c in charges(node) if c.kind == "analytics"]) == 1
    assert json.loads((node.directory / "policy.json").read_text())["max_epsilon_per_run"] == 1.0
