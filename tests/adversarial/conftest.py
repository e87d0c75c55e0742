"""A malicious coordinator, played against real hospital nodes through the real relay and node service.

`Coordinator` builds Flower messages exactly as a coordinator's ServerApp would (or as an
attacker would, with whatever it likes in them) and delivers them to `clients.app.app`, the
ClientApp a SuperNode runs, whose node config names the hospital's node-service socket, as in a
deployment: the relay forwards each message over the real Unix-socket channel to the
hospital's running `ChannelServer`. Nothing is mocked: the nodes' ledgers, audit logs, policies,
keys and decryption records are the real ones on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from clients.app import NODE_SERVICE, app as client_app
from clients.node_state import NodeState
from clients.service import ChannelServer, NodeService
from engines.provisioning import provision_nodes
from experiments.synthetic import synthesize
from federation import messages as M
from federation.config import RunConfig
from federation.contributions import SignedContribution, from_record, relay_record, signed_headers, to_record
from federation.he_codec import ServerContext, init_keys
from federation.model import num_parameters

BUDGET = 6.0


@dataclass
class Coordinator:
    """Sends messages to hospital nodes through the real ClientApp and keeps what it receives."""

    keys_dir: Path
    nodes: list[NodeState]
    config: RunConfig
    sockets: dict[Path, Path] = field(default_factory=dict)
    anchors: list[tuple[str, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.he = ServerContext.load(self.keys_dir)

    @property
    def update_length(self) -> int:
        return num_parameters(self.config.model, self.config.input_size) + 2

    def base(self, run_id: str, server_round: int, config: dict[str, Any] | None = None, **extra: Any) -> dict:
        values = dict(self.config.to_user_config() if config is None else config)
        return {M.KEY_ID: self.he.key_id, M.PARAMS_ID: self.he.params_id, M.RUN_ID: run_id,
                M.FEDERATION: self.he.key_id, M.ROUND: server_round, M.RUN_CONFIG: json.dumps(values), **extra}

    def send(self, node: NodeState, message_type: str, records: dict[str, Any]) -> Message:
        """Deliver one message to `node`'s ClientApp and return its reply."""
        metadata = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=1,
                            reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0,
                            message_type=message_type)
        message = Message(content=RecordDict(records), metadata=metadata)
        context = Context(run_id=1, node_id=1, node_config={NODE_SERVICE: str(self.sockets[node.directory])},
                          state=RecordDict(), run_config={})
        return client_app(message, context)

    @staticmethod
    def error(reply: Message) -> str | None:
        record = reply.content.config_records.get(M.REPLY)
        return None if record is None or M.ERROR not in record else str(record[M.ERROR])

    @staticmethod
    def contribution(reply: Message) -> SignedContribution:
        error = Coordinator.error(reply)
        assert error is None, error
        (item,) = from_record(reply.content.config_records[M.CONTRIBUTION], "reply")
        return item

    def records(self, run_id: str, server_round: int, census: list[SignedContribution],
                chain: dict[int, list[SignedContribution]], config: dict | None = None) -> dict[str, Any]:
        records: dict[str, Any] = {M.CONFIG: ConfigRecord(self.base(run_id, server_round, config)),
                                   M.CENSUS_RECORD: ConfigRecord(to_record(census)),
                                   M.ANCHORS: ConfigRecord(relay_record(self.anchors))}
        for past, items in chain.items():
            records[M.ROUND_RECORD.format(past)] = ConfigRecord(to_record(items))
        return records

    def remember(self, items: list[SignedContribution]) -> None:
        from federation.contributions import newest_by_hospital

        self.anchors = newest_by_hospital([*self.anchors, *signed_headers(items)])

    def census(self, run_id: str, config: dict | None = None) -> list[SignedContribution]:
        items = [self.contribution(self.send(node, M.CENSUS, {
            M.CONFIG: ConfigRecord(self.base(run_id, 0, config)),
            M.ANCHORS: ConfigRecord(relay_record(self.anchors))})) for node in self.nodes]
        self.remember(items)
        return items

    def train(self, node: NodeState, run_id: str, server_round: int, census: list[SignedContribution],
              chain: dict[int, list[SignedContribution]], config: dict | None = None) -> Message:
        return self.send(node, M.TRAIN, self.records(run_id, server_round, census, chain, config))

    def round(self, run_id: str, server_round: int, census: list[SignedContribution],
              chain: dict[int, list[SignedContribution]]) -> list[SignedContribution]:
        items = [self.contribution(self.train(node, run_id, server_round, census, chain)) for node in self.nodes]
        self.remember(items)
        return items

    def evaluate(self, node: NodeState, run_id: str, server_round: int, census: list[SignedContribution],
                 chain: dict[int, list[SignedContribution]]) -> Message:
        return self.send(node, M.EVALUATE, self.records(run_id, server_round, census, chain))

    def reveal(self, node: NodeState, run_id: str, server_round: int, contributions: list[SignedContribution],
               step: str = "evaluate", kind: str = "evaluation", **extra: Any) -> Message:
        return self.send(node, M.REVEAL, {
            M.CONFIG: ConfigRecord(self.base(run_id, server_round, None, **{M.STEP: step, M.KIND: kind, **extra})),
            M.REVEAL_RECORD: ConfigRecord(to_record(contributions))})

    def values(self, reply: Message) -> np.ndarray:
        error = self.error(reply)
        assert error is None, error
        return np.array([float(v) for v in reply.content.config_records[M.REPLY][M.VALUES]])


def charges(node: NodeState) -> list:
    """Every charge in a node's ledger."""
    with node.ledger() as ledger:
        return ledger.all_charges()


def audit_actions(node: NodeState) -> list[str]:
    """The actions of a node's audit log, in order."""
    return [entry.action for entry in node.audit().entries()]


@pytest.fixture(scope="session")
def adversarial_source(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three small synthetic hospitals and one federation key, made once."""
    root = tmp_path_factory.mktemp("adversarial")
    report = synthesize(3, 4_500, root / "data", seed=11)
    keys = init_keys(root / "keys")
    return {"data": report.files[0].parent, "keys": keys.hospital_context.parent}


@pytest.fixture()
def coordinator(adversarial_source: dict[str, Path], tmp_path: Path) -> Iterator[Coordinator]:
    """Fresh, enrolled node directories for each test, and a coordinator to attack them with."""
    keys = tmp_path / "keys"
    shutil.copytree(adversarial_source["keys"], keys)
    config = RunConfig(keys_dir=str(keys), num_hospitals=3, rounds=2, model="logreg", sample_rate=0.05,
                       learning_rate=0.05, target_epsilon=1.0, delta=1e-5)
    nodes = provision_nodes(adversarial_source["data"], keys / "hospital.ckks", tmp_path / "nodes",
                            purposes={config.purpose: (BUDGET, config.delta)})
    run_dir = Path(tempfile.mkdtemp(prefix="fr-sock-"))  # AF_UNIX paths must stay short
    servers = [ChannelServer(NodeService(node.directory), run_dir / f"{i}.sock", frozenset({os.getuid()}))
               for i, node in enumerate(nodes)]
    for server in servers:
        server.start()
    yield Coordinator(keys, nodes, config, sockets={n.directory: srv.path for n, srv in zip(nodes, servers)})
    for server in servers:
        server.close()
    shutil.rmtree(run_dir, ignore_errors=True)
