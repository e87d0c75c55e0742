"""The honest path through the real handlers: census, rounds, DP evaluation, reveal, release."""

from __future__ import annotations

import numpy as np

from clients.node import HospitalNode
from federation import messages as M
from federation import round_evaluation
from federation.he_codec import flooding_std


def test_an_honest_coordinator_gets_a_dp_evaluation_and_the_same_model_from_every_hospital(coordinator) -> None:
    run = "honest-1"
    census = coordinator.census(run)
    chain = {1: coordinator.round(run, 1, census, {})}
    evaluations = [coordinator.contribution(coordinator.evaluate(node, run, 1, census, chain)) for node in coordinator.nodes]
    values = coordinator.values(coordinator.reveal(coordinator.nodes[0], run, 1, evaluations))
    again = coordinator.values(coordinator.reveal(coordinator.nodes[1], run, 1, evaluations))
    assert np.array_equal(values, again)  # one aggregate, one flooded answer, at every hospital
    z = round_evaluation.evaluation_noise_multiplier(coordinator.config.evaluation_budget, coordinator.config.delta,
                                                     coordinator.config.rounds)
    metrics = round_evaluation.metrics_from_noised(values[:-1] / M.EVAL_UNIT, noise_multiplier=z, hospitals=3)
    held_out = sum(len(HospitalNode(coordinator.config, node).data.test_y) for node in coordinator.nodes)
    assert abs(metrics["records"] - held_out) < 6 * z * np.sqrt(3 * round_evaluation.LENGTH)
    models = [coordinator.send(node, M.RELEASE, coordinator.records(run, 1, census, chain))
              for node in coordinator.nodes]
    assert [coordinator.error(m) for m in models] == [None] * 3
    weights = [m.content.array_records[M.RELEASED_MODEL][M.WEIGHTS].numpy() for m in models]
    assert all(np.array_equal(weights[0], w) for w in weights)
    assert flooding_std(3) < 1e-5
