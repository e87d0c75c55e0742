"""The hospital node as a Flower ClientApp.

Each handler turns a message into a call on `HospitalNode` and its result into a reply. A
user-caused failure (bad file, wrong key, privacy refusal) becomes a reply carrying one line of
explanation, which names files and columns but never a record's value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from clients import faults
from clients.analytics import HospitalAnalytics
from clients.node import HospitalNode
from clients.node_state import NodeState
from federation import messages as M
from federation.config import RunConfig
from federation.errors import ConfigError, FedriskError
from federation.query import CohortQuery, QueryError


def _chain(message: Message) -> list[bytes]:
    state = message.content.array_records.get(M.STATE)
    if state is None:
        return []
    return [array.numpy().tobytes() for array in state.values()]


def _config(message: Message) -> ConfigRecord:
    return message.content.config_records[M.CONFIG]


def node_for(context: Context, message: Message, preset: RunConfig | None) -> HospitalNode:
    """The hospital this ClientApp serves. Its node directory (data, schema, ledger, audit log,
    key) comes from the SuperNode's own config (deployment: `node-dir`, optionally `key-file`)
    or, in simulation, is the partition's directory under the run's `nodes-dir`."""
    if preset is not None:
        config = preset
    else:
        raw = _config(message).get(M.RUN_CONFIG)
        config = RunConfig.from_user_config(json.loads(str(raw))) if raw else RunConfig.from_user_config(context.run_config)
    node_config = context.node_config
    if "node-dir" in node_config:
        directory = Path(str(node_config["node-dir"]))
    else:
        nodes = sorted(p for p in Path(config.nodes_dir).glob("*") if (p / "node.json").is_file())
        index = int(node_config.get("partition-id", 0))
        if index >= len(nodes):
            raise ConfigError(f"{config.nodes_dir} holds {len(nodes)} fedrisk node(s); node {index} has none")
        directory = nodes[index]
    key_file = Path(str(node_config["key-file"])) if "key-file" in node_config else None
    node = HospitalNode(config, NodeState.load(directory), key_file)
    cfg = _config(message)
    node.check_federation(str(cfg[M.KEY_ID]), str(cfg[M.PARAMS_ID]))
    return node


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


def _census_total(message: Message) -> list[bytes]:
    return list(message.content.config_records[M.CENSUS_RECORD][M.CENSUS_TOTAL])


def _ciphertext_reply(node: HospitalNode, message: Message, ciphertexts: list[bytes], length: int) -> ConfigRecord:
    """A reply carrying ciphertexts and the key and parameters they were made under (with a
    fault swapped in when this node's operator injected one for this message)."""
    key_id = node.key.key_id
    kind = faults.fault_for(node.name, message.metadata.message_type, int(_config(message)[M.ROUND]))
    if kind is not None:
        plaintext = node.key.decrypt(ciphertexts, length)
        ciphertexts, named_key = faults.corrupt(kind, ciphertexts, plaintext)
        key_id = named_key or key_id
    return ConfigRecord({M.CIPHERTEXTS: ciphertexts, M.HOSPITAL: node.name, M.KEY_ID: key_id,
                         M.PARAMS_ID: node.key.params_id})


def _census(node: HospitalNode, message: Message, context: Context) -> Message:
    node.begin_run(_run_id(message))
    return _reply(message, **{M.REPLY: _ciphertext_reply(node, message, node.census(), M.CENSUS_LENGTH)})


def _train(node: HospitalNode, message: Message, context: Context) -> Message:
    server_round = int(_config(message)[M.ROUND])
    outcome = node.train(server_round, _census_total(message), _chain(message), run_id=_run_id(message))
    spend = outcome.spend
    metrics = MetricRecord({
        M.EPSILON: spend.epsilon, M.STEPS: spend.steps, M.NOISE_MULTIPLIER: spend.noise_multiplier,
        M.SAMPLE_RATE: spend.sample_rate, M.TRAIN_SECONDS: outcome.train_seconds,
        M.HE_SECONDS: outcome.he_seconds})
    return _reply(message, **{
        M.REPLY: _ciphertext_reply(node, message, outcome.ciphertexts, node.length + 2),
        M.METRICS: metrics})


def _evaluate(node: HospitalNode, message: Message, context: Context) -> Message:
    ciphertexts = node.evaluate(_census_total(message), _chain(message))
    return _reply(message, **{M.REPLY: _ciphertext_reply(node, message, ciphertexts, M.EVAL_LENGTH)})


def _reveal(node: HospitalNode, message: Message, context: Context) -> Message:
    aggregate = list(message.content.config_records[M.AGGREGATE_RECORD][M.AGGREGATE])
    length = int(_config(message).get(M.VECTOR_LENGTH, M.EVAL_LENGTH))
    return _reply(message, **{M.REPLY: ConfigRecord({M.VALUES: node.reveal(aggregate, length)})})


def _query(message: Message) -> tuple[CohortQuery, str]:
    """The cohort query a message carries, validated here (never trusting the server's reading),
    and the query run it belongs to."""
    config = _config(message)
    try:
        data = json.loads(str(config[M.QUERY]))
    except (KeyError, ValueError):
        raise QueryError("the server's message carries no readable query") from None
    return CohortQuery.from_mapping(data, source="query from the server"), str(config[M.QUERY_RUN])


def _query_check(node: HospitalNode, message: Message, context: Context) -> Message:
    query, run_id = _query(message)
    multiplier = HospitalAnalytics(node.state, node.key).check(query, run_id)
    return _reply(message, **{M.REPLY: ConfigRecord({M.HOSPITAL: node.name, M.NOISE_MULTIPLIER: multiplier})})


def _query_answer(node: HospitalNode, message: Message, context: Context) -> Message:
    query, run_id = _query(message)
    model = message.content.array_records.get(M.QUERY_MODEL)
    weights = model[M.WEIGHTS].numpy() if model is not None else None
    answer = HospitalAnalytics(node.state, node.key).answer(query, run_id, int(_config(message)[M.HOSPITALS]), weights)
    return _reply(message, **{
        M.REPLY: _ciphertext_reply(node, message, answer.ciphertexts, query.layout().length),
        M.METRICS: MetricRecord({M.QUERY_EPSILON: answer.epsilon, M.NOISE_MULTIPLIER: answer.noise_multiplier})})


def _release(node: HospitalNode, message: Message, context: Context) -> Message:
    weights, digest = node.release(_chain(message), run_id=_run_id(message))
    return _reply(message, **{
        M.REPLY: ConfigRecord({M.SHA256: digest, M.HOSPITAL: node.name}),
        M.RELEASED_MODEL: ArrayRecord({M.WEIGHTS: Array(np.asarray(weights, dtype=np.float32))})})


def make_client_app(preset: RunConfig | None = None) -> ClientApp:
    """A ClientApp for hospital nodes. `preset` fixes the run config (simulation); without it
    the config comes from the message or Flower's run config (`flwr run`)."""
    client_app = ClientApp()
    client_app.query("census")(_guarded(_census, preset))
    client_app.train()(_guarded(_train, preset))
    client_app.evaluate()(_guarded(_evaluate, preset))
    client_app.query("reveal")(_guarded(_reveal, preset))
    client_app.query("release")(_guarded(_release, preset))
    client_app.query("check")(_guarded(_query_check, preset))
    client_app.query("answer")(_guarded(_query_answer, preset))
    return client_app


app = make_client_app()
