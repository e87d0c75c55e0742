"""The chain left out: the coordinator sends a hospital only the rounds it has not verified, and a
hospital replays the others from its own decryption records. What a coordinator could try with
that, through the real handlers: leave out a round the hospital never verified (refused, before
anything is decrypted), or send another set of contributions for a round it did verify (refused:
a second, different sum of one step is never decrypted). An honest short message gives the same
model as the whole chain."""

from __future__ import annotations

from federation import messages as M


def _sha(coordinator, node, run, census, chain) -> str:
    reply = coordinator.send(node, M.RELEASE, coordinator.records(run, max(chain), census, chain))
    assert coordinator.error(reply) is None, coordinator.error(reply)
    return str(reply.content.config_records[M.REPLY][M.SHA256])


def test_a_hospital_replays_only_rounds_it_verified_and_refuses_a_changed_one(coordinator) -> None:
    run = "compacted"
    first, second, third = coordinator.nodes
    census = coordinator.census(run)
    round_1 = coordinator.round(run, 1, census, {})
    coordinator.contribution(coordinator.evaluate(first, run, 1, census, {1: round_1}))  # first verifies round 1

    # a round the hospital never verified, left out: refused before any decryption
    refused = coordinator.error(coordinator.train(second, run, 2, census, {}))
    assert refused is not None and "sent no contributions for round 1, which this node has not verified" in refused

    # another set of contributions for the round it verified: refused
    changed = coordinator.error(coordinator.train(first, run, 2, census, {1: round_1[:2]}))
    assert changed is not None and "already decrypted" in changed and "another set" in changed

    # honest and short: the first hospital trains round 2 from its own record of round 1
    round_2 = [coordinator.contribution(coordinator.train(first, run, 2, census, {})),
               *(coordinator.contribution(coordinator.train(node, run, 2, census, {1: round_1}))
                 for node in (second, third))]
    coordinator.remember(round_2)
    # the same model from a message holding only round 2 as from the whole chain
    assert _sha(coordinator, first, run, census, {2: round_2}) == _sha(coordinator, third, run, census,
                                                                      {1: round_1, 2: round_2})
