"""The relay-to-node-service channel's framing, played as a hostile relay would write it."""

from __future__ import annotations

import json
import socket
import struct
import threading

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from federation.node_channel import (MAX_HEADER_BYTES, ChannelError, NodeRequest, peer_of, read_reply, read_request,
                                     write_reply, write_request)


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def _header(**fields: object) -> bytes:
    return _frame(json.dumps({"v": 1, "message-type": "train", "flwr-run-id": 3, **fields}).encode())


def test_a_request_and_its_reply_cross_the_channel_unchanged() -> None:
    content = RecordDict({"config": ConfigRecord({"round": 2, "run-id": "r", "blob": b"\x00\xff" * 40}),
                          "m": MetricRecord({"x": 0.25}),
                          "w": ArrayRecord({"weights": Array(np.arange(6, dtype=np.float32))})})
    relay, service = _pair()
    with relay, service:
        write_request(relay, NodeRequest("train", 7, {"rounds": 3, "model": "mlp"}, content, "ab" * 32))
        relay.shutdown(socket.SHUT_WR)
        got = read_request(service)
        assert (got.message_type, got.flwr_run_id, got.run_config, got.fab_hash) == (
            "train", 7, {"rounds": 3, "model": "mlp"}, "ab" * 32)
        assert got.content.config_records["config"]["blob"] == b"\x00\xff" * 40
        assert got.content.metric_records["m"]["x"] == 0.25
        assert np.array_equal(got.content.array_records["w"]["weights"].numpy(), np.arange(6, dtype=np.float32))
        write_reply(service, RecordDict({"reply": ConfigRecord({"hospital": "h"})}))
        assert read_reply(relay).config_records["reply"]["hospital"] == "h"


def test_the_kernel_names_the_caller() -> None:
    import os

    a, b = _pair()
    with a, b:
        peer = peer_of(b)
        assert (peer.pid, peer.uid) == (os.getpid(), os.getuid())


@pytest.mark.parametrize(("frames", "named"), [
    (struct.pack(">I", MAX_HEADER_BYTES + 1), "request header is"),
    (_header() + struct.pack(">I", (1 << 30) + 1), "message content is"),
    (_frame(b"\xff\xfe not json"), "not UTF-8 JSON"),
    (_frame(json.dumps({"v": 9}).encode()), "version-1"),
    (_frame(json.dumps([1, 2]).encode()), "version-1"),
    (_header(**{"message-type": ""}), "message-type"),
    (_header(**{"flwr-run-id": -1}), "flwr-run-id"),
    (_header(**{"flwr-run-id": True}), "flwr-run-id"),
    (_header(**{"run-config": {"nested": {"a": 1}}}), "run-config"),
    (_header(**{"fab-hash": "x" * 500}), "fab-hash"),
    (_header() + _frame(b"\x0a\xff\xff\xff\x0f"), "does not parse"),
    (_header() + struct.pack(">I", 100) + b"short", "ended after 5 of 100"),
    (b"\x00\x00", "ended after 2 of 4"),
])
def test_a_malformed_request_is_refused_naming_its_part(frames: bytes, named: str) -> None:
    relay, service = _pair()
    with relay, service:
        relay.sendall(frames)
        relay.shutdown(socket.SHUT_WR)
        with pytest.raises(ChannelError, match=named) as caught:
            read_request(service)
        assert "\n" not in str(caught.value)


def test_an_oversized_claim_is_refused_before_its_bytes_are_read() -> None:
    """A relay claiming a 1 GiB + 1 content gets refused at once, though it sends nothing more."""
    relay, service = _pair()
    with relay, service:
        relay.sendall(_header() + struct.pack(">I", (1 << 30) + 1))
        outcome: list[BaseException] = []
        reader = threading.Thread(target=lambda: outcome.append(pytest.raises(ChannelError, read_request, service)))
        reader.start()
        reader.join(timeout=60)
        assert not reader.is_alive() and outcome
