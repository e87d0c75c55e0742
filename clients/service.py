"""The hospital's node service: the one process that answers the federation's messages.

It alone holds the node directory (export, keys, ledger, audit log, policy) and does everything
sensitive. In Flower's deployment engine the coordinator's ClientApp is only a relay
(`clients.app`) that forwards each message over a Unix socket (`federation.node_channel`) to
this service, started by the hospital with `fedrisk node serve --federation-socket`; in the
simulation engine the same `NodeService` answers in process.

Every request is hostile input. The service first admits it under the node's policy
(`clients.policy`), then turns it into a call on `HospitalNode`. A refusal is one line back to
the server and an audit entry at the node; it names files, fields and policy settings, never a
record's value. Over the socket, each request is also audited with the caller's uid and pid
(from the kernel) and the app bundle hash the relay claims.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from clients.analytics import HospitalAnalytics
from clients.decryption import Expected
from clients.node import EVALUATION_LENGTH, HospitalNode
from clients.node_state import NodeState
from clients.policy import NodePolicy, PolicyRefusal
from federation import messages as M
from federation.config import RUN_ID_PATTERN, RunConfig
from federation.contributions import REVEALABLE_STEPS, SignedContribution, from_record, from_relay_record, to_record
from federation.errors import ConfigError, FedriskError, ProtocolError
from federation.node_channel import ChannelError, NodeRequest, Peer, peer_of, read_request, refusal, write_reply
from federation.query import MEMBERSHIP_SCORE, CohortQuery, QueryError
from privacy.accounting import HospitalSpend
from privacy.audit import RELAY_REFUSED, RELAY_REQUEST

_ROUND_NAME = re.compile(r"^round-(\d{3})$")
_QUERY_MESSAGES = (M.QUERY_CHECK, M.QUERY_ANSWER)


def _config(request: NodeRequest) -> ConfigRecord:
    record = request.content.config_records.get(M.CONFIG)
    if record is None:
        raise ProtocolError("the server's message carries no config record")
    return record


def _reply(**records: ConfigRecord | MetricRecord | ArrayRecord) -> RecordDict:
    return RecordDict(records)


def _run_id(request: NodeRequest) -> str:
    """The fedrisk run the message belongs to (it outlives a restarted coordinator's Flower run)."""
    run_id = _config(request).get(M.RUN_ID)
    return str(run_id) if run_id else f"flwr-{request.flwr_run_id}"


def _round(request: NodeRequest) -> int:
    try:
        return int(_config(request)[M.ROUND])
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("the server's message names no round") from None


def _census(request: NodeRequest) -> list[SignedContribution]:
    return from_record(request.content.config_records.get(M.CENSUS_RECORD), "census")


def _chain(request: NodeRequest) -> dict[int, list[SignedContribution]]:
    """Every completed round's signed updates the message carries, by round."""
    chain = {}
    for name, record in request.content.config_records.items():
        match = _ROUND_NAME.match(name)
        if match:
            chain[int(match.group(1))] = from_record(record, name)
    return chain


def _relayed(request: NodeRequest) -> list[tuple[str, bytes]]:
    return from_relay_record(request.content.config_records.get(M.ANCHORS))


def _contribution_reply(node: HospitalNode, contribution: SignedContribution,
                        spend: HospitalSpend | None = None, metrics: dict[str, float] | None = None) -> RecordDict:
    """A signed contribution, with the run's privacy spend at this hospital (train, evaluate) or
    a cohort answer's accounting values (`metrics`)."""
    reply = {M.HOSPITAL: node.name, **({M.SPEND: spend.to_wire()} if spend is not None else {})}
    records: dict = {M.REPLY: ConfigRecord(reply), M.CONTRIBUTION: ConfigRecord(to_record([contribution]))}
    if metrics is not None:
        records[M.METRICS] = MetricRecord(metrics)
    return _reply(**records)


def _census_handler(node: HospitalNode, request: NodeRequest) -> RecordDict:
    head = node.check_rollback(_relayed(request))
    return _contribution_reply(node, node.census(_run_id(request), head, request.message_type))


def _train(node: HospitalNode, request: NodeRequest) -> RecordDict:
    head = node.check_rollback(_relayed(request))
    outcome = node.train(_round(request), _census(request), _chain(request), _run_id(request), head,
                         request.message_type)
    return _contribution_reply(node, outcome.contribution, outcome.spend)


def _evaluate(node: HospitalNode, request: NodeRequest) -> RecordDict:
    head = node.check_rollback(_relayed(request))
    outcome = node.evaluate(_round(request), _chain(request), _run_id(request), head, request.message_type)
    return _contribution_reply(node, outcome.contribution, outcome.spend)


def _reveal_expected(request: NodeRequest) -> Expected:
    """What a reveal request may be of: a round's DP evaluation, or a cohort query's answers
    (whose length the node derives from the query itself, never from the server's word)."""
    config = _config(request)
    step, kind = str(config.get(M.STEP, "")), str(config.get(M.KIND, ""))
    if step not in REVEALABLE_STEPS:
        raise ProtocolError(f"refusing to reveal a {step or 'unnamed'} aggregate: only DP evaluations and "
                            "cohort answers are ever revealed")
    if step == "evaluate":
        if kind != "evaluation":
            raise ProtocolError(f"refusing to reveal an evaluation of kind {kind!r}")
        return Expected(_run_id(request), _round(request), step, kind, EVALUATION_LENGTH)
    query, run_id = _query(request)
    if kind != f"answer:{query.digest()}":
        raise ProtocolError("the reveal request names another query than the one it carries")
    return Expected(run_id, 0, step, kind, query.layout().length)


def _reveal(node: HospitalNode, request: NodeRequest) -> RecordDict:
    node.check_rollback(_relayed(request))
    expected = _reveal_expected(request)
    contributions = from_record(request.content.config_records.get(M.REVEAL_RECORD), "reveal")
    return _reply(**{M.REPLY: ConfigRecord({M.VALUES: node.reveal(contributions, expected),
                                                     M.HOSPITAL: node.name})})


def _query(request: NodeRequest) -> tuple[CohortQuery, str]:
    """The cohort query a message carries, validated here (never trusting the server's reading),
    and the query run it belongs to."""
    config = _config(request)
    try:
        data = json.loads(str(config[M.QUERY]))
    except (KeyError, ValueError):
        raise QueryError("the server's message carries no readable query") from None
    return CohortQuery.from_mapping(data, source="query from the server"), str(config.get(M.QUERY_RUN, ""))


def _admit_query(node: HospitalNode, request: NodeRequest, query: CohortQuery) -> None:
    purposes, delta = node._ledger_terms(query.purpose)
    try:
        node.policy.check_query(purpose=query.purpose, epsilon=query.epsilon, delta=query.delta,
                                federation=str(_config(request).get(M.FEDERATION, "")), key_id=node.key.key_id,
                                ledger_purposes=purposes, ledger_delta=delta,
                                membership=query.field == MEMBERSHIP_SCORE)
    except PolicyRefusal as error:
        node._refuse(error)


def _query_check(node: HospitalNode, request: NodeRequest) -> RecordDict:
    query, run_id = _query(request)
    _admit_query(node, request, query)
    multiplier = HospitalAnalytics(node.state, node.key).check(query, run_id)
    return _reply(**{M.REPLY: ConfigRecord({M.HOSPITAL: node.name, M.NOISE_MULTIPLIER: multiplier})})


def _query_answer(node: HospitalNode, request: NodeRequest) -> RecordDict:
    query, run_id = _query(request)
    _admit_query(node, request, query)
    head = node.check_rollback(_relayed(request))
    model = request.content.array_records.get(M.QUERY_MODEL)
    try:
        weights = model[M.WEIGHTS].numpy() if model is not None else None
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("the server's query model record carries no weights") from None
    answer = HospitalAnalytics(node.state, node.key).answer(query, run_id, len(node.manifest.hospitals), weights,
                                                            node.policy)
    contribution = node.seal(answer.vector, run=run_id, server_round=0, step="answer",
                             kind=f"answer:{query.digest()}", head=head,
                             message_type=request.message_type)
    return _contribution_reply(node, contribution, metrics={
        M.QUERY_EPSILON: answer.epsilon, M.NOISE_MULTIPLIER: answer.noise_multiplier})


def _release(node: HospitalNode, request: NodeRequest) -> RecordDict:
    node.check_rollback(_relayed(request))
    weights, digest = node.release(_chain(request), _run_id(request))
    return _reply(**{
        M.REPLY: ConfigRecord({M.SHA256: digest, M.HOSPITAL: node.name}),
        M.RELEASED_MODEL: ArrayRecord({M.WEIGHTS: Array(np.asarray(weights, dtype=np.float32))})})


Handler = Callable[[HospitalNode, NodeRequest], RecordDict]
HANDLERS: dict[str, Handler] = {
    M.CENSUS: _census_handler, M.TRAIN: _train, M.EVALUATE: _evaluate, M.REVEAL: _reveal,
    M.RELEASE: _release, M.QUERY_CHECK: _query_check, M.QUERY_ANSWER: _query_answer}
"""Every message type a hospital answers; anything else is refused."""


def _run_config(request: NodeRequest, preset: RunConfig | None) -> RunConfig:
    """The run config: the simulation's own, or the coordinator's (from the message or Flower's
    run config) — hostile input, validated here and then held to the node's policy."""
    if preset is not None:
        return preset
    raw = _config(request).get(M.RUN_CONFIG)
    try:
        values = json.loads(str(raw)) if raw else dict(request.run_config)
    except ValueError:
        raise ConfigError("the server's run config is not valid JSON") from None
    if not isinstance(values, dict):
        raise ConfigError("the server's run config is not a table of settings")
    return RunConfig.from_user_config(values)


def _check_run_ids(request: NodeRequest) -> None:
    """The run ids a message names, held to the one pattern before they reach a ledger or log."""
    config = request.content.config_records.get(M.CONFIG)
    for key in (M.RUN_ID, M.QUERY_RUN):
        value = config.get(key) if config is not None else None
        if value and not RUN_ID_PATTERN.fullmatch(str(value)):
            raise ProtocolError(f"the server's {key} is not a run id (letters, digits, '.', '_', '-'; at most 64)")


class NodeService:
    """One hospital's answers to the federation, from its own node directory.

    `preset` fixes the run config (simulation, where the data scientist plays every party);
    without it the config comes from the coordinator, and only what the node's policy admits
    is done. The node directory and key file are the hospital's, never the message's."""

    def __init__(self, node_dir: Path, key_file: Path | None = None, preset: RunConfig | None = None) -> None:
        self.node_dir, self.key_file, self.preset = Path(node_dir), key_file, preset
        self.state = NodeState.load(self.node_dir)  # checks the directory now: a bad one fails at start

    def node(self, request: NodeRequest) -> HospitalNode:
        """The hospital node for one request, with the request admitted under its policy."""
        state = NodeState.load(self.node_dir)  # re-read per message: consent, policy and data may change
        try:
            config = _run_config(request, self.preset)
            node = HospitalNode(config, state, self.key_file, NodePolicy.load(state.directory))
            cfg = _config(request)
            node.check_federation(str(cfg.get(M.KEY_ID, "")), str(cfg.get(M.PARAMS_ID, "")))
            if request.message_type not in _QUERY_MESSAGES:
                node.admit(str(cfg.get(M.FEDERATION, "")))
            return node
        except FedriskError as error:
            if not getattr(error, "audited", False):
                state.audit().refusal(error)
                error.audited = True  # type: ignore[attr-defined]
            raise

    def handle(self, request: NodeRequest) -> RecordDict:
        """The reply to one message: its result, or a one-line refusal in REPLY/ERROR."""
        try:
            handler = HANDLERS.get(request.message_type)
            if handler is None:
                raise ProtocolError(f"the node answers no {request.message_type[:64]!r} messages")
            _check_run_ids(request)
            return handler(self.node(request), request)
        except FedriskError as exc:
            if not getattr(exc, "audited", False):  # every refusal leaves an entry, wherever it was raised
                NodeState.load(self.node_dir).audit().refusal(exc)
            return refusal(str(exc))
        except Exception as exc:  # a bug or hostile input no check foresaw: audited, and no detail leaves
            error = ProtocolError(f"the node could not handle this {request.message_type[:64]!r} message "
                                  f"({type(exc).__name__}); nothing was released")
            NodeState.load(self.node_dir).audit().refusal(error)
            return refusal(str(error))


MAX_CONCURRENT_REQUESTS = 4
"""Requests read and answered at once (a SuperNode runs one ClientApp at a time); more wait, unread."""
SLOT_WAIT_SECONDS = 600.0
"""How long a request waits for a slot before it is refused."""
REFUSED_AUDIT_SECONDS = 60.0
"""A caller of a uid not allowed is audited once per this many seconds (with a count), not per try."""
REQUEST_READ_SECONDS = 300.0
"""How long a caller may take to send its request (or read the reply)."""


class ChannelServer:
    """The node service's federation socket: one thread per connection, one request each.

    Only callers whose uid is in `allowed_uids` (the SuperNode's user) are answered; the socket
    file is made connectable by anyone (0666) inside a directory the hospital controls, because
    the kernel's peer credentials, not file modes, decide. Each request is audited with that
    uid and pid and the bundle hash the relay claims, on arrival, before it is handled (so the
handler's own entries, a refusal among them, follow it)."""

    def __init__(self, service: NodeService, path: Path, allowed_uids: frozenset[int]) -> None:
        self.service, self.path, self.allowed_uids = service, Path(path), allowed_uids
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT_REQUESTS)
        self._refused: dict[int, tuple[float, int]] = {}  # uid -> (last audited, refused since)
        if self.path.exists() or self.path.is_symlink():
            if not self.path.is_socket():
                raise ConfigError(f"--federation-socket {self.path} exists and is not a socket; refusing to replace it")
            self.path.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.bind(str(self.path))
        os.chmod(self.path, 0o666)
        self._socket.listen(64)

    def serve_forever(self) -> None:
        """Accept connections until `close`."""
        while not self._stop.is_set():
            try:
                conn, _ = self._socket.accept()
            except OSError:
                if self._stop.is_set():
                    return
                raise
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def start(self) -> threading.Thread:
        """Serve in a background thread (beside the scoring endpoint)."""
        thread = threading.Thread(target=self.serve_forever, name="federation-socket", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Stop accepting and remove the socket file."""
        self._stop.set()
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._socket.close()
        self.path.unlink(missing_ok=True)

    def _audit(self, action: str, peer: Peer, details: dict) -> None:
        who = {"peer-uid": peer.uid, "peer-pid": peer.pid}
        with self._lock:
            log = self.service.state.audit()
            try:
                log.append(action, details={**who, **details})
            except ValueError:  # a hostile detail the identifier filter refuses: keep the event, not the text
                log.append(action, details={**who, "withheld": "a detail refused by the identifier filter"})

    def _stranger(self, conn: socket.socket, peer: Peer) -> None:
        """Refuse a caller of a uid not allowed, before it takes a slot; audit it at most once a minute."""
        now = time.monotonic()
        with self._lock:
            last, count = self._refused.get(peer.uid, (-REFUSED_AUDIT_SECONDS, 0))
            audit = now - last >= REFUSED_AUDIT_SECONDS
            self._refused[peer.uid] = (now, 0) if audit else (last, count + 1)
        if audit:
            self._audit(RELAY_REFUSED, peer, {"reason": "uid not allowed", "refused-since-last-entry": count})
        try:
            write_reply(conn, None, f"uid {peer.uid} may not use this node service")
        except OSError:
            pass

    def _answer(self, conn: socket.socket) -> None:
        try:
            peer = peer_of(conn)
        except OSError:
            conn.close()
            return
        if peer.uid not in self.allowed_uids:
            self._stranger(conn, peer)
            conn.close()
            return
        if not self._slots.acquire(timeout=SLOT_WAIT_SECONDS):  # requests wait their turn unread: memory stays bounded
            try:
                write_reply(conn, None, f"the node service was busy with {MAX_CONCURRENT_REQUESTS} requests for "
                                        f"{SLOT_WAIT_SECONDS:.0f} s; retry")
            except OSError:
                pass
            conn.close()
            return
        try:
            self._exchange(conn, peer)
        except OSError:
            pass  # the caller hung up: nothing more to say to it (what it asked is audited)
        finally:
            self._slots.release()
            conn.close()

    def _exchange(self, conn: socket.socket, peer: Peer) -> None:
        try:  # a relay that stalls mid-request cannot hold a slot past the deadline
            request = read_request(conn, deadline=time.monotonic() + REQUEST_READ_SECONDS)
        except ChannelError as error:
            self._audit(RELAY_REFUSED, peer, {"reason": str(error)[:200]})
            write_reply(conn, None, str(error))
            return
        self._audit(RELAY_REQUEST, peer, {"message-type": request.message_type[:64], "fab-hash": request.fab_hash})
        reply = self.service.handle(request)
        conn.settimeout(REQUEST_READ_SECONDS)
        write_reply(conn, reply)


MAX_SOCKET_PATH_BYTES = 107  # sun_path holds 108 bytes, NUL included


def resolve_uids(users: list[str]) -> frozenset[int]:
    """`--relay-user` values (user names or numeric uids) as uids; ConfigError names a bad one."""
    import pwd

    uids = set()
    for user in users:
        if user.isdigit():
            uids.add(int(user))
            continue
        try:
            uids.add(pwd.getpwnam(user).pw_uid)
        except KeyError:
            raise ConfigError(f"--relay-user {user!r}: no such user on this machine") from None
    return frozenset(uids)


def open_channel(node_dir: Path, socket_path: Path, relay_users: list[str], key_file: Path | None = None
                 ) -> ChannelServer:
    """Check everything (node directory, users, socket path), then bind the federation socket.

    Nothing is bound or created when a setting is wrong: the error names the option."""
    if not relay_users:
        raise ConfigError("--federation-socket needs --relay-user: the SuperNode's user, the only one it answers")
    uids = resolve_uids(relay_users)
    if len(str(Path(socket_path).resolve()).encode()) > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(f"--federation-socket {socket_path}: the path is longer than a Unix socket allows "
                          f"({MAX_SOCKET_PATH_BYTES} bytes); choose a shorter one, e.g. /run/fedrisk/<hospital>.sock")
    if not Path(socket_path).resolve().parent.is_dir():
        raise ConfigError(f"--federation-socket {socket_path}: its directory does not exist")
    service = NodeService(Path(node_dir), key_file)
    importlib.import_module("torch")  # warm for the first round (`fedrisk node serve` has set its thread count)

    return ChannelServer(service, Path(socket_path).resolve(), uids)
