"""The hospital node as a Flower ClientApp.

Every message is hostile input. Each handler first finds the node's own directory (from the
SuperNode's config, never from the message), then admits the message under the node's policy
(`clients.policy`) before anything else happens, then turns it into a call on `HospitalNode`.
A refusal is one line back to the server and an audit entry at the node; it names files,
fields and policy settings, never a record's value.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.analytics import HospitalAnalytics
from clients.decryption import Expected
from clients.node import EVALUATION_LENGTH, HospitalNode
from clients.node_state import NodeState
from clients.policy import NodePolicy, PolicyRefusal
from federation import messages as M
from federation.config import RunConfig
from federation.contributions import REVEALABLE_STEPS, SignedContribution, from_record, from_relay_record, to_record
from federation.errors import ConfigError, FedriskError, ProtocolError
from federation.query import CohortQuery, QueryError
from privacy.accounting import HospitalSpend

_ROUND_NAME = re.compile(r"^round-(\d{3})$")
_QUERY_MESSAGES = (M.QUERY_CHECK, M.QUERY_ANSWER)


def _config(message: Message) -> ConfigRecord:
    record = message.content.config_records.get(M.CONFIG)
    if record is None:
        raise ProtocolError("the server's message carries no config record")
    return record


def _partition_dir(context: Context, config: RunConfig) -> Path:
    """Simulation only (no `node-dir` in the SuperNode's config): the partition's directory under
    the run's `nodes-dir`."""
    nodes = NodeState.discover(Path(config.nodes_dir))
    index = int(context.node_config.get("partition-id", 0))
    if index >= len(nodes):
        raise ConfigError(f"{config.nodes_dir} holds {len(nodes)} fedrisk node(s); node {index} has none")
    return nodes[index].directory


def _run_config(message: Message, context: Context, preset: RunConfig | None) -> RunConfig:
    """The run config: the simulation's own, or the coordinator's (from the message or Flower's
    run config) — hostile input, validated here and then held to the node's policy."""
    if preset is not None:
        return preset
    raw = _config(message).get(M.RUN_CONFIG)
    try:
        values = json.loads(str(raw)) if raw else dict(context.run_config)
    except ValueError:
        raise ConfigError("the server's run config is not valid JSON") from None
    if not isinstance(values, dict):
        raise ConfigError("the server's run config is not a table of settings")
    return RunConfig.from_user_config(values)


def node_for(context: Context, message: Message, preset: RunConfig | None) -> HospitalNode:
    """The hospital this ClientApp serves, with the message admitted under its policy. The node
    directory is the SuperNode's own `node-dir` (deployment: set by the hospital, never by the
    coordinator) or, in simulation, the partition's directory under the run's `nodes-dir`."""
    if "node-dir" in context.node_config:
        state = NodeState.load(Path(str(context.node_config["node-dir"])))
    else:
        state = NodeState.load(_partition_dir(context, _run_config(message, context, preset)))
    try:
        config = _run_config(message, context, preset)
        key_file = Path(str(context.node_config["key-file"])) if "key-file" in context.node_config else None
        node = HospitalNode(config, state, key_file, NodePolicy.load(state.directory))
        cfg = _config(message)
        node.check_federation(str(cfg.get(M.KEY_ID, "")), str(cfg.get(M.PARAMS_ID, "")))
        if message.metadata.message_type not in _QUERY_MESSAGES:
            node.admit(str(cfg.get(M.FEDERATION, "")))
        return node
    except FedriskError as error:
        if not getattr(error, "audited", False):
            state.audit().refusal(error)
        raise


def _reply(message: Message, **records: ConfigRecord | MetricRecord | ArrayRecord) -> Message:
    return Message(content=RecordDict(records), reply_to=message)


def _guarded(handler: Callable[[HospitalNode, Message, Context], Message], preset: RunConfig | None
             ) -> Callable[[Message, Context], Message]:
    def run(message: Message, context: Context) -> Message:
        try:
            node = node_for(context, message, preset)
            return handler(node, message, context)
        except FedriskError as exc:
            return _reply(message, **{M.REPLY: ConfigRecord({M.ERROR: str(exc)})})
    return run


def _run_id(message: Message) -> str:
    """The fedrisk run the message belongs to (it outlives a restarted coordinator's Flower run)."""
    run_id = _config(message).get(M.RUN_ID)
    return str(run_id) if run_id else f"flwr-{message.metadata.run_id}"


def _round(message: Message) -> int:
    try:
        return int(_config(message)[M.ROUND])
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("the server's message names no round") from None


def _census(message: Message) -> list[SignedContribution]:
    return from_record(message.content.config_records.get(M.CENSUS_RECORD), "census")


def _chain(message: Message) -> dict[int, list[SignedContribution]]:
    """Every completed round's signed updates the message carries, by round."""
    chain = {}
    for name, record in message.content.config_records.items():
        match = _ROUND_NAME.match(name)
        if match:
            chain[int(match.group(1))] = from_record(record, name)
    return chain


def _relayed(message: Message) -> list[tuple[str, bytes]]:
    return from_relay_record(message.content.config_records.get(M.ANCHORS))


def _contribution_reply(message: Message, node: HospitalNode, contribution: SignedContribution,
                        spend: HospitalSpend | None = None, metrics: dict[str, float] | None = None) -> Message:
    """A signed contribution, with the run's privacy spend at this hospital (train, evaluate) or
    a cohort answer's accounting values (`metrics`)."""
    reply = {M.HOSPITAL: node.name, **({M.SPEND: spend.to_wire()} if spend is not None else {})}
    records: dict = {M.REPLY: ConfigRecord(reply), M.CONTRIBUTION: ConfigRecord(to_record([contribution]))}
    if metrics is not None:
        records[M.METRICS] = MetricRecord(metrics)
    return _reply(message, **records)


def _census_handler(node: HospitalNode, message: Message, context: Context) -> Message:
    head = node.check_rollback(_relayed(message))
    return _contribution_reply(message, node, node.census(_run_id(message), head, message.metadata.message_type))


def _train(node: HospitalNode, message: Message, context: Context) -> Message:
    head = node.check_rollback(_relayed(message))
    outcome = node.train(_round(message), _census(message), _chain(message), _run_id(message), head,
                         message.metadata.message_type)
    return _contribution_reply(message, node, outcome.contribution, outcome.spend)


def _evaluate(node: HospitalNode, message: Message, context: Context) -> Message:
    head = node.check_rollback(_relayed(message))
    outcome = node.evaluate(_round(message), _chain(message), _run_id(message), head, message.metadata.message_type)
    return _contribution_reply(message, node, outcome.contribution, outcome.spend)


def _reveal_expected(message: Message) -> Expected:
    """What a reveal request may be of: a round's DP evaluation, or a cohort query's answers
    (whose length the node derives from the query itself, never from the server's word)."""
    config = _config(message)
    step, kind = str(config.get(M.STEP, "")), str(config.get(M.KIND, ""))
    if step not in REVEALABLE_STEPS:
        raise ProtocolError(f"refusing to reveal a {step or 'unnamed'} aggregate: only DP evaluations and "
                            "cohort answers are ever revealed")
    if step == "evaluate":
        if kind != "evaluation":
            raise ProtocolError(f"refusing to reveal an evaluation of kind {kind!r}")
        return Expected(_run_id(message), _round(message), step, kind, EVALUATION_LENGTH)
    query, run_id = _query(message)
    if kind != f"answer:{query.digest()}":
        raise ProtocolError("the reveal request names another query than the one it carries")
    return Expected(run_id, 0, step, kind, query.layout().length)


def _reveal(node: HospitalNode, message: Message, context: Context) -> Message:
    node.check_rollback(_relayed(message))
    expected = _reveal_expected(message)
    contributions = from_record(message.content.config_records.get(M.REVEAL_RECORD), "reveal")
    return _reply(message, **{M.REPLY: ConfigRecord({M.VALUES: node.reveal(contributions, expected),
                                                     M.HOSPITAL: node.name})})


def _query(message: Message) -> tuple[CohortQuery, str]:
    """The cohort query a message carries, validated here (never trusting the server's reading),
    and the query run it belongs to."""
    config = _config(message)
    try:
        data = json.loads(str(config[M.QUERY]))
    except (KeyError, ValueError):
        raise QueryError("the server's message carries no readable query") from None
    return CohortQuery.from_mapping(data, source="query from the server"), str(config.get(M.QUERY_RUN, ""))


def _admit_query(node: HospitalNode, message: Message, query: CohortQuery) -> None:
    purposes, delta = node._ledger_terms(query.purpose)
    try:
        node.policy.check_query(purpose=query.purpose, epsilon=query.epsilon, delta=query.delta,
                                federation=str(_config(message).get(M.FEDERATION, "")), key_id=node.key.key_id,
                                ledger_purposes=purposes, ledger_delta=delta)
    except PolicyRefusal as error:
        node._refuse(error)


def _query_check(node: HospitalNode, message: Message, context: Context) -> Message:
    query, run_id = _query(message)
    _admit_query(node, message, query)
    multiplier = HospitalAnalytics(node.state, node.key).check(query, run_id)
    return _reply(message, **{M.REPLY: ConfigRecord({M.HOSPITAL: node.name, M.NOISE_MULTIPLIER: multiplier})})


def _query_answer(node: HospitalNode, message: Message, context: Context) -> Message:
    query, run_id = _query(message)
    _admit_query(node, message, query)
    head = node.check_rollback(_relayed(message))
    model = message.content.array_records.get(M.QUERY_MODEL)
    try:
        weights = model[M.WEIGHTS].numpy() if model is not None else None
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("the server's query model record carries no weights") from None
    answer = HospitalAnalytics(node.state, node.key).answer(query, run_id, len(node.manifest.hospitals), weights,
                                                            node.policy)
    contribution = node.seal(answer.vector, run=run_id, server_round=0, step="answer",
                             kind=f"answer:{query.digest()}", head=head,
                             message_type=message.metadata.message_type)
    return _contribution_reply(message, node, contribution, metrics={
        M.QUERY_EPSILON: answer.epsilon, M.NOISE_MULTIPLIER: answer.noise_multiplier})


def _release(node: HospitalNode, message: Message, context: Context) -> Message:
    node.check_rollback(_relayed(message))
    weights, digest = node.release(_chain(message), _run_id(message))
    return _reply(message, **{
        M.REPLY: ConfigRecord({M.SHA256: digest, M.HOSPITAL: node.name}),
        M.RELEASED_MODEL: ArrayRecord({M.WEIGHTS: Array(np.asarray(weights, dtype=np.float32))})})


def make_client_app(preset: RunConfig | None = None) -> ClientApp:
    """A ClientApp for hospital nodes. `preset` fixes the run config (simulation, where the data
    scientist plays every party); without it the config comes from the coordinator, and only
    what the node's own policy admits is done."""
    client_app = ClientApp()
    client_app.query("census")(_guarded(_census_handler, preset))
    client_app.train()(_guarded(_train, preset))
    client_app.evaluate()(_guarded(_evaluate, preset))
    client_app.query("reveal")(_guarded(_reveal, preset))
    client_app.query("release")(_guarded(_release, preset))
    client_app.query("check")(_guarded(_query_check, preset))
    client_app.query("answer")(_guarded(_query_answer, preset))
    return client_app


app = make_client_app()
