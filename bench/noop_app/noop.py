"""A Flower app that does nothing but bounce messages: the deployment engine's own per-message cost.

Its ServerApp sends `rounds` empty query messages, one after the other, to every node and
records each round trip's wall time; its ClientApp answers at once, importing nothing but
Flower. `bench/deployment.py` runs it on the same SuperLink and SuperNodes as fedrisk, so the
floor it measures is what any ClientApp pays per message there, fedrisk's relay included.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


@client.query("bounce")
def bounce(message: Message, context: Context) -> Message:
    return Message(content=RecordDict({"reply": ConfigRecord({"ok": 1})}), reply_to=message)


@server.main()
def main(grid: Grid, context: Context) -> None:
    wanted, rounds = int(context.run_config["nodes"]), int(context.run_config["rounds"])
    deadline = time.monotonic() + 300
    while len(list(grid.get_node_ids())) < wanted and time.monotonic() < deadline:
        time.sleep(0.5)
    nodes = sorted(grid.get_node_ids())
    seconds = []
    for _ in range(rounds):
        began = time.perf_counter()
        messages = [Message(content=RecordDict({"q": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="query.bounce")
                    for n in nodes]
        pending, replies = set(grid.push_messages(messages)), []
        while pending and time.perf_counter() - began < 300:  # polled every 0.1 s, as fedrisk's server does
            arrived = list(grid.pull_messages(sorted(pending)))
            replies += arrived
            pending -= {r.metadata.reply_to_message_id for r in arrived}
            time.sleep(0.1 if pending else 0)
        if len(replies) != len(nodes) or any(r.has_error() for r in replies):
            raise RuntimeError(f"bounce: {len(replies)} of {len(nodes)} replies")
        seconds.append(time.perf_counter() - began)
    Path(str(context.run_config["out"])).write_text(json.dumps({"round_trip_seconds": seconds}))
