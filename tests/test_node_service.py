"""The hospital's node service: its federation socket, played against as a hostile relay or a
stranger on the machine would, and `fedrisk node serve` as a hospital starts it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, RecordDict

from clients.node_state import NodeState
from clients.service import ChannelServer, NodeService
from engines.provisioning import provision_nodes
from experiments.synthetic import synthesize
from federation import messages as M
from federation.config import RunConfig
from federation.he_codec import ServerContext, init_keys
from federation.node_channel import ChannelError, NodeRequest, ask
from privacy.audit import RELAY_REFUSED, RELAY_REQUEST

ROOT = Path(__file__).resolve().parents[1]
PURPOSE = "credit-risk-research"
KEYS: dict[str, Path] = {}  # the federation's server-side key directory, set by the `node` fixture


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> NodeState:
    root = tmp_path_factory.mktemp("node-service")
    report = synthesize(2, 3000, root / "data", seed=5)
    keys = init_keys(root / "keys")
    nodes = provision_nodes(report.files[0].parent, keys.hospital_context, root / "nodes",
                            purposes={PURPOSE: (5.0, 1e-5)})
    KEYS["dir"] = keys.server_context.parent
    return nodes[0]


@pytest.fixture()
def short_dir():
    path = Path(tempfile.mkdtemp(prefix="fr-ns-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _census(node: NodeState) -> NodeRequest:
    he = ServerContext.load(KEYS["dir"])
    config = RunConfig(keys_dir=str(KEYS["dir"]), num_hospitals=2, rounds=1, model="logreg")
    values = {M.KEY_ID: he.key_id, M.PARAMS_ID: he.params_id, M.RUN_ID: "service-test", M.FEDERATION: he.key_id,
              M.ROUND: 0, M.RUN_CONFIG: json.dumps(config.to_user_config())}
    return NodeRequest(M.CENSUS, 1, {}, RecordDict({M.CONFIG: ConfigRecord(values)}))


def _server(node: NodeState, path: Path, uids: frozenset[int]) -> ChannelServer:
    server = ChannelServer(NodeService(node.directory), path, uids)
    server.start()
    return server


def _actions(node: NodeState) -> list[str]:
    return [e.action for e in node.audit().entries()]


def test_an_allowed_relay_gets_its_census_answered_and_the_request_is_audited(node: NodeState, short_dir: Path) -> None:
    server = _server(node, short_dir / "n.sock", frozenset({os.getuid()}))
    try:
        reply = ask(server.path, _census(node), timeout=120)
    finally:
        server.close()
    assert M.ERROR not in reply.config_records[M.REPLY], reply.config_records[M.REPLY]
    assert M.CONTRIBUTION in reply.config_records
    entry = next(e for e in reversed(node.audit().entries()) if e.action == RELAY_REQUEST)
    details = entry.details
    assert (details["peer-uid"], details["peer-pid"], details["message-type"]) == (os.getuid(), os.getpid(), M.CENSUS)
    assert not server.path.exists()  # closing removes the socket


def test_a_caller_of_another_uid_is_refused_before_its_request_is_read(node: NodeState, short_dir: Path) -> None:
    before = len(node.audit().entries())
    server = _server(node, short_dir / "n.sock", frozenset({os.getuid() + 4242}))
    try:
        for _ in range(20):  # a stranger hammering the socket
            with pytest.raises(ChannelError, match=f"uid {os.getuid()} may not use this node service"):
                ask(server.path, _census(node), timeout=120)
    finally:
        server.close()
    added = node.audit().entries()[before:]
    assert [e.action for e in added] == [RELAY_REFUSED]  # nothing handled, and one entry, not twenty
    assert added[0].details["reason"] == "uid not allowed"


def test_garbage_on_the_socket_is_refused_audited_and_the_service_keeps_answering(node: NodeState,
                                                                                  short_dir: Path) -> None:
    server = _server(node, short_dir / "n.sock", frozenset({os.getuid()}))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(str(server.path))
            conn.sendall(b"\x00\x00\x00\x05hello")
            conn.shutdown(socket.SHUT_WR)
            answer = b"".join(iter(lambda: conn.recv(4096), b""))
        assert b"not UTF-8 JSON" in answer
        assert _actions(node)[-1] == RELAY_REFUSED
        unknown = NodeRequest("query.dump-records", 1, {}, _census(node).content)
        reply = ask(server.path, unknown, timeout=120)
        assert "answers no 'query.dump-records' messages" in reply.config_records[M.REPLY][M.ERROR]
        assert M.ERROR not in ask(server.path, _census(node), timeout=120).config_records[M.REPLY]
    finally:
        server.close()


def test_a_message_no_check_foresaw_gets_a_generic_audited_refusal(node: NodeState, short_dir: Path) -> None:
    """A query nested 5,000 deep breaks the JSON parser (RecursionError): the relay gets one line
    naming no detail, the node's log records the refusal, and the service keeps answering."""
    server = _server(node, short_dir / "n.sock", frozenset({os.getuid()}))
    census = _census(node)
    config = dict(census.content.config_records[M.CONFIG])
    hostile = NodeRequest(M.QUERY_CHECK, 1, {}, RecordDict({M.CONFIG: ConfigRecord(
        {**config, M.QUERY: "[" * 5000 + "]" * 5000, M.QUERY_RUN: "q1"})}))
    try:
        error = ask(server.path, hostile, timeout=120).config_records[M.REPLY][M.ERROR]
        assert M.ERROR not in ask(server.path, census, timeout=120).config_records[M.REPLY]
    finally:
        server.close()
    assert "could not handle this 'query.check' message (RecursionError); nothing was released" in error, error
    assert "\n" not in error


def _fedrisk(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize(("extra", "named"), [
    ([], "needs --federation-socket"),
    (["--federation-socket", "{d}/n.sock"], "needs --relay-user"),
    (["--federation-socket", "{d}/n.sock", "--relay-user", "no-such-user-fedrisk"], "--relay-user 'no-such-user-fedrisk'"),
    (["--federation-socket", "{d}/" + "x" * 120 + ".sock", "--relay-user", "0"], "longer than a Unix socket allows"),
    (["--federation-socket", "{d}/missing/n.sock", "--relay-user", "0"], "its directory does not exist"),
])
def test_node_serve_refuses_bad_settings_in_one_line_and_binds_nothing(node: NodeState, short_dir: Path,
                                                                       extra: list[str], named: str) -> None:
    result = _fedrisk("node", "serve", "--dir", str(node.directory), *[a.format(d=short_dir) for a in extra])
    assert result.returncode == 2, result.stderr
    assert named in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert list(short_dir.iterdir()) == []


def test_node_serve_answers_on_its_socket_and_stops_cleanly_on_sigterm(node: NodeState, short_dir: Path) -> None:
    path = short_dir / "n.sock"
    log = short_dir / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "cli", "node", "serve", "--dir", str(node.directory),
                                    "--federation-socket", str(path), "--relay-user", str(os.getuid())],
                                   cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while f"federation socket ready: {path}" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert "warning: --relay-user includes this service's own user" in log.read_text()
        reply = ask(path, _census(node), timeout=120)
        assert M.CONTRIBUTION in reply.config_records, reply.config_records[M.REPLY]
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    assert code == 0, log.read_text()
    assert not path.exists()
