"""A coordinator's hostile app bundle (tests/test_deployment.py ships it with `flwr run`).

Its ClientApp runs inside a hospital's SuperNode, as a relay would, and tries to take what the
hospital holds: it opens the export and the key files directly, and it asks the hospital's node
service, over the real channel, for a training update's plaintext, for a run with DP off and for
a message type that dumps records. Its ServerApp reads its plan from `spec` (a JSON file: the paths to try per node id and the
federation's config values) and writes what each node let it have to `out`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from federation.node_channel import NodeRequest, ask  # the protocol is public: a copy ships in the bundle

client = ClientApp()
server = ServerApp()


def _read(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            return f"read {len(handle.read())} bytes"
    except OSError as error:
        return type(error).__name__


def _listing(path: str) -> str:
    try:
        return f"listed {len(os.listdir(path))} entries"
    except OSError as error:
        return type(error).__name__


@client.query("steal")
def steal(message: Message, context: Context) -> Message:
    config = message.content.config_records["config"]
    targets = json.loads(str(config["targets"]))
    base = json.loads(str(config["base"]))
    found = {name: _read(path) for name, path in targets.items() if name != "node-dir"}
    found["node-dir"] = _listing(targets["node-dir"])
    found["uid"] = str(os.getuid())
    socket_path = str(context.node_config["node-service"])
    no_dp = {**base, "run-config": json.dumps({**json.loads(base["run-config"]), "dp": False})}
    asks = {
        "reveal-update": NodeRequest("query.reveal", 1, {}, RecordDict({"config": ConfigRecord(
            {**base, "step": "train", "kind": "update"})})),
        "dp-off": NodeRequest("query.census", 1, {}, RecordDict({"config": ConfigRecord(no_dp)})),
        "dump": NodeRequest("query.dump-records", 1, {}, RecordDict({"config": ConfigRecord(base)})),
    }
    for name, request in asks.items():
        reply = ask(socket_path, request, timeout=300)
        found[name] = str(reply.config_records["reply"].get("error", "answered"))
    return Message(content=RecordDict({"found": ConfigRecord(found)}), reply_to=message)


@server.main()
def main(grid: Grid, context: Context) -> None:
    spec = json.loads(Path(str(context.run_config["spec"])).read_text())  # the attacker's plan: paths, config
    targets, base = spec["targets"], spec["base"]
    deadline = time.monotonic() + 300
    while len(list(grid.get_node_ids())) < len(targets) and time.monotonic() < deadline:
        time.sleep(1)
    messages = [Message(content=RecordDict({"config": ConfigRecord({
        "targets": json.dumps(targets[str(node)]), "base": json.dumps(base)})}),
        dst_node_id=node, message_type="query.steal") for node in grid.get_node_ids() if str(node) in targets]
    found = {}
    for reply in grid.send_and_receive(messages, timeout=600):
        node = str(reply.metadata.src_node_id)
        found[node] = dict(reply.content.config_records["found"]) if reply.has_content() else str(reply.error)
    Path(str(context.run_config["out"])).write_text(json.dumps(found))
