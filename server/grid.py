"""Talking to hospitals over a Flower Grid: wait for them, exchange a step's messages, and ask
one of them at a time for a request any key holder can answer (reveal, release).

Used by training runs (`server.app`) and cohort queries (`server.analytics`) alike, in the
simulation engine and the deployment engine.
"""

from __future__ import annotations

import time

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from federation.errors import ProtocolError
from server.strategy import reply_record

REPLY_POLL_SECONDS = 0.1
"""How often the server asks for replies (as Flower's simulation grid does). Flower's deployment
grid sleeps 3 s between pulls in its own `send_and_receive`, adding 1.5 s on average to every
step of a run; a pull that finds nothing costs the SuperLink about a millisecond."""


def send_and_receive(grid: Grid, messages: list[Message], timeout: float,
                     in_flight: int | None = None) -> list[Message]:
    """Push `messages` and collect their replies until all have come or `timeout` passes.

    `in_flight` caps how many are pushed and not yet answered (None: all at once). Flower's
    simulation engine scans every stored message for every node ten times a second, so with
    hundreds of hospitals and all their messages stored at once its polling alone kept a core
    busy; its workers answer a few at a time anyway. Deployed hospitals answer in parallel:
    there, no cap."""
    queue = list(messages)
    cap = len(queue) if in_flight is None else max(1, in_flight)
    pending: set[str] = set()
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while True:
        if queue and len(pending) < cap:
            batch, queue = queue[:cap - len(pending)], queue[cap - len(pending):]
            pending |= {message_id for message_id in grid.push_messages(batch) if message_id}
        if not pending:
            if queue:  # nothing of that batch was stored (a node gone): push the next
                continue
            break
        arrived = list(grid.pull_messages(sorted(pending)))
        replies += arrived
        pending -= {reply.metadata.reply_to_message_id for reply in arrived}
        if (not pending and not queue) or time.monotonic() >= deadline:
            break
        if not arrived or not queue:
            time.sleep(min(REPLY_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
    return replies


def ask_one(grid: Grid, candidates: list[int], message_type: str, records: dict, timeout: float,
             what: str) -> Message:
    """Send one request to the first candidate hospital that answers it; the next one if a
    hospital fails or does not reply in time. Raises ProtocolError if none does."""
    reasons = []
    for node in candidates:
        message = Message(content=RecordDict(records), dst_node_id=node, message_type=message_type)
        replies = send_and_receive(grid, [message], timeout)
        if not replies:
            reasons.append(f"node-{node}: no reply within {timeout:g}s")
            continue
        record, reason = reply_record(replies[0])
        if reason is None:
            return replies[0]
        reasons.append(reason if record is not None else f"node-{node}: {reason}")
    raise ProtocolError(f"{what}: no hospital could answer ({'; '.join(reasons) or 'no hospital connected'})")


def wait_for_nodes(grid: Grid, want: int, need: int, timeout: float) -> list[int]:
    """Wait up to `timeout` for `want` hospital nodes; settle for `need` after that."""
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < want and time.monotonic() < deadline:
        time.sleep(0.5)
    if len(nodes) < need:
        raise ProtocolError(f"only {len(nodes)} of {want} hospital nodes connected within {timeout:.0f}s; "
                            f"{need} needed")
    return nodes


def exchange(grid: Grid, messages: list[Message], timeout: float,
             in_flight: int | None = None) -> tuple[list[Message], list[int]]:
    """Send (at most `in_flight` unanswered at a time) and wait up to `timeout`; return the
    replies and the nodes that did not reply (a message never pushed before the deadline
    counts as not replied)."""
    replies = send_and_receive(grid, messages, timeout, in_flight)
    replied = {reply.metadata.src_node_id for reply in replies}
    return replies, [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in replied]
