"""The local channel between a SuperNode's relay ClientApp and the hospital's node service.

In Flower's deployment engine every message a hospital answers runs code from the coordinator's
app bundle. fedrisk's bundle ships a relay (`clients.relay`) that does nothing but forward the
message over this channel to the hospital's own long-running node service (`fedrisk node serve
--federation-socket`), which alone can read the node directory. The channel is a Unix stream
socket; the service learns the caller's uid and pid from the kernel (SO_PEERCRED) and answers
only the uids the hospital allowed.

One request per connection, framed as length-prefixed parts (4-byte big-endian length each):

    request:  JSON header {"v", "message-type", "flwr-run-id", "run-config", "fab-hash"}
              then the message's RecordDict (Flower's protobuf serialisation)
    reply:    JSON header {"v", "ok", "error"}, then the reply RecordDict (empty when not ok)

Everything in a request is hostile input to the node service: sizes are capped before a byte
is buffered, the header must be a JSON object of known fields and types, and a RecordDict that
does not parse is refused. This module imports only the standard library, Flower and
`federation.messages`, so the relay process stays small (no torch, TenSEAL or pandas).
"""

from __future__ import annotations

import json
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord, RecordDict

from federation import messages as M

VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_CONTENT_BYTES = 1 << 30
"""A message's RecordDict is at most 1 GiB: a 1M-parameter model's relayed chain fits many times."""
_LENGTH = struct.Struct(">I")
_PEER = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ChannelError(ValueError):
    """A malformed, oversized or truncated frame on the node channel (one line, names the part)."""


@dataclass(frozen=True)
class NodeRequest:
    """One Flower message, as the relay hands it to the node service."""

    message_type: str
    flwr_run_id: int
    run_config: dict[str, bool | int | float | str] = field(default_factory=dict)
    content: RecordDict = field(default_factory=RecordDict)
    fab_hash: str = ""


@dataclass(frozen=True)
class Peer:
    """Who is at the other end of a Unix socket, as the kernel reports it."""

    pid: int
    uid: int
    gid: int


def refusal(text: str) -> RecordDict:
    """A node's one-line refusal, as every reply carries it (REPLY/ERROR)."""
    return RecordDict({M.REPLY: ConfigRecord({M.ERROR: text})})


def peer_of(conn: socket.socket) -> Peer:
    """The connecting process's pid, uid and gid (SO_PEERCRED: the kernel's word, not the peer's)."""
    pid, uid, gid = _PEER.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER.size))
    return Peer(pid, uid, gid)


def _recv_exact(conn: socket.socket, size: int, part: str, deadline: float | None = None) -> bytes:
    chunks, remaining = [], size
    while remaining:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelError(f"node channel: the {part} did not arrive in time ({size - remaining} of {size} bytes)")
            conn.settimeout(left)
        try:
            chunk = conn.recv(min(remaining, 1 << 20))
        except TimeoutError:
            raise ChannelError(f"node channel: the {part} did not arrive in time ({size - remaining} of {size} bytes)") from None
        if not chunk:
            raise ChannelError(f"node channel: the {part} ended after {size - remaining} of {size} bytes")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _send_part(conn: socket.socket, payload: bytes) -> None:
    conn.sendall(_LENGTH.pack(len(payload)))
    conn.sendall(payload)


def _recv_part(conn: socket.socket, part: str, limit: int, deadline: float | None = None) -> bytes:
    size = _LENGTH.unpack(_recv_exact(conn, _LENGTH.size, f"{part} length", deadline))[0]
    if size > limit:
        raise ChannelError(f"node channel: the {part} is {size} bytes, over the {limit}-byte limit")
    return _recv_exact(conn, size, part, deadline)


def _header(raw: bytes, part: str) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ChannelError(f"node channel: the {part} is not UTF-8 JSON") from None
    if not isinstance(header, dict) or header.get("v") != VERSION:
        raise ChannelError(f"node channel: the {part} is not a version-{VERSION} header")
    return header


def _content(raw: bytes) -> RecordDict:
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto

    try:
        proto = RecordDictProto()
        proto.ParseFromString(raw)
        return recorddict_from_proto(proto)
    except Exception as error:  # protobuf and Flower raise several types for a bad record
        raise ChannelError(f"node channel: the message content does not parse ({type(error).__name__})") from None


def _content_bytes(content: RecordDict) -> bytes:
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).SerializeToString()


_SCALARS = (bool, int, float, str)


def write_request(conn: socket.socket, request: NodeRequest) -> None:
    """Send one request (the relay's side)."""
    header = {"v": VERSION, "message-type": request.message_type, "flwr-run-id": int(request.flwr_run_id),
              "run-config": {str(k): v for k, v in request.run_config.items() if isinstance(v, _SCALARS)},
              "fab-hash": request.fab_hash}
    _send_part(conn, json.dumps(header).encode("utf-8"))
    _send_part(conn, _content_bytes(request.content))


def read_request(conn: socket.socket, max_content_bytes: int = MAX_CONTENT_BYTES,
                 deadline: float | None = None) -> NodeRequest:
    """Receive and check one request (the node service's side); ChannelError names what is wrong.
    `deadline` (time.monotonic) bounds the whole request, not each read."""
    header = _header(_recv_part(conn, "request header", MAX_HEADER_BYTES, deadline), "request header")
    message_type, run_id = header.get("message-type"), header.get("flwr-run-id")
    run_config, fab_hash = header.get("run-config", {}), header.get("fab-hash", "")
    if not isinstance(message_type, str) or not message_type:
        raise ChannelError("node channel: the request header names no message-type")
    if not isinstance(run_id, int) or isinstance(run_id, bool) or run_id < 0:
        raise ChannelError("node channel: the request header's flwr-run-id is not a non-negative integer")
    if not isinstance(run_config, dict) or not all(isinstance(v, _SCALARS) for v in run_config.values()):
        raise ChannelError("node channel: the request header's run-config is not a table of scalars")
    if not isinstance(fab_hash, str) or len(fab_hash) > 128:
        raise ChannelError("node channel: the request header's fab-hash is not a short string")
    content = _content(_recv_part(conn, "message content", max_content_bytes, deadline))
    return NodeRequest(message_type, run_id, run_config, content, fab_hash)


def write_reply(conn: socket.socket, content: RecordDict | None, error: str = "") -> None:
    """Send the reply to one request: a RecordDict, or a one-line error."""
    _send_part(conn, json.dumps({"v": VERSION, "ok": not error, "error": error}).encode("utf-8"))
    _send_part(conn, _content_bytes(content if content is not None and not error else RecordDict()))


def read_reply(conn: socket.socket) -> RecordDict:
    """Receive the reply (the relay's side); a refusal of the request itself raises ChannelError."""
    header = _header(_recv_part(conn, "reply header", MAX_HEADER_BYTES), "reply header")
    content = _content(_recv_part(conn, "reply content", MAX_CONTENT_BYTES))
    if not header.get("ok"):
        raise ChannelError(str(header.get("error") or "the node service refused the request"))
    return content


def ask(path: Path | str, request: NodeRequest, timeout: float | None = None) -> RecordDict:
    """One round trip to the node service at `path` (the relay's whole job)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(str(path))
        try:
            write_request(conn, request)
            conn.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the request was read (a uid not allowed, a full service): its reply says why
        return read_reply(conn)
