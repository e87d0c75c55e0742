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


def test_a_hospital_reads_the_census_it_verified_and_never_goes_without_one(coordinator) -> None:
    """The census is left out for a hospital that verified it: the hospital reads N_hat from its own
    record. Left out for one that never verified it, the message is refused before any charge; a
    changed census (a hospital dropped, so the weights shift) is refused as a second sum."""
    run = "census-left-out"
    first, second, third = coordinator.nodes
    census = coordinator.census(run)
    refused = coordinator.error(coordinator.train(first, run, 1, [], {}))
    assert refused is not None and "sent no census" in refused and "has not verified one" in refused
    with first.ledger() as ledger:
        assert not [c for c in ledger.history(coordinator.config.purpose) if c.run_id == run]  # nothing charged
    round_1 = coordinator.round(run, 1, census, {})  # every hospital verifies the census here
    short = coordinator.contribution(coordinator.train(first, run, 2, [], {1: round_1}))
    changed = coordinator.error(coordinator.train(third, run, 2, census[:2], {1: round_1}))
    assert changed is not None and "already decrypted" in changed and "another set" in changed
    round_2 = [short, *(coordinator.contribution(coordinator.train(node, run, 2, census, {1: round_1}))
                        for node in (second, third))]
    coordinator.remember(round_2)
    assert _sha(coordinator, first, run, [], {2: round_2}) == _sha(coordinator, second, run, census,
                                                                   {1: round_1, 2: round_2})
