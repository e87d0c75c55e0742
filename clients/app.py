"""The hospital's ClientApp: in deployment a relay to the hospital's node service.

In Flower's deployment engine this module is code the coordinator ships (its app bundle), run
by the hospital's SuperNode for every message. It is therefore trusted with nothing: it imports
only Flower and the channel codec (no torch, TenSEAL or pandas, so each per-message process
starts fast), and it forwards each message to the node service whose socket the hospital named
in its SuperNode's config (`--node-config 'node-service="/run/fedrisk/node.sock"'`). The SuperNode
runs as a user that cannot read the node directory, so whatever a bundle ships in place of this
relay can at most ask the node service, which answers only what the hospital's policy allows.

In the simulation engine (no `node-service`, a `partition-id`) the data scientist plays every
party: the same `clients.service.NodeService` answers in process, from the partition's node
directory under the run's `nodes-dir`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from federation.node_channel import ChannelError, NodeRequest, ask, refusal

if TYPE_CHECKING:
    from clients.service import NodeService
    from federation.config import RunConfig

NODE_SERVICE = "node-service"
"""The SuperNode config key naming the node service's socket (set by the hospital)."""
SIMULATION_PARTITION = "partition-id"
"""Set by Flower's simulation engine only: the node's index among the run's nodes."""
RELAY_TIMEOUT_S = 3600.0
"""How long the relay waits for one answer (a large model's DP-SGD round can take minutes)."""


def _bundle() -> str:
    """The app bundle this code was installed from, as Flower names its install directory
    (`<publisher>.<app>.<version>.<hash prefix>`): what the relay reports, for the node's audit
    log. It is the relay's own word; the node service's guarantees do not rest on it."""
    name = Path(__file__).resolve().parents[1].name
    return name if name.count(".") >= 3 else ""


def _request(message: Message, context: Context) -> NodeRequest:
    return NodeRequest(message_type=message.metadata.message_type, flwr_run_id=int(message.metadata.run_id),
                       run_config=dict(context.run_config), content=message.content, fab_hash=_bundle()[:128])


def relay(message: Message, context: Context) -> RecordDict:
    """Forward one message to the hospital's node service and return its answer."""
    path = Path(str(context.node_config[NODE_SERVICE]))
    try:
        return ask(path, _request(message, context), timeout=RELAY_TIMEOUT_S)
    except ChannelError as error:
        return refusal(str(error))
    except OSError as error:
        return refusal(f"the hospital's node service at {path} is unreachable ({error.strerror or error})")


_LISTED: dict[tuple[str, int], list[Path]] = {}
"""(nodes dir, its mtime) -> its node directories in name order: listed once per worker process
(Flower's simulation engine ships the app with every message, so an instance's caches last one
message; listing 500 node directories per message was a tenth of a worker's time)."""
_LISTED_LOCK = threading.Lock()


def _node_directories(nodes_dir: str) -> list[Path]:
    from clients.node_state import NodeState

    key = (nodes_dir, Path(nodes_dir).stat().st_mtime_ns if Path(nodes_dir).is_dir() else 0)
    with _LISTED_LOCK:
        if key not in _LISTED:
            _LISTED[key] = [state.directory for state in NodeState.discover(Path(nodes_dir))]
        return _LISTED[key]


class _InProcess:
    """Simulation: one NodeService per partition, made on first use (in one process; the node
    directories are listed once per process)."""

    def __init__(self, preset: RunConfig | None) -> None:
        self.preset = preset
        self.services: dict[tuple[str, int], NodeService] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"preset": self.preset}  # the simulation engine ships the app to its workers: no lock, no services

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["preset"])  # type: ignore[misc]

    def __call__(self, message: Message, context: Context) -> RecordDict:
        from clients.service import NodeService, _run_config
        from federation.errors import ConfigError, FedriskError

        request = _request(message, context)
        try:
            config = _run_config(request, self.preset)
            index = int(context.node_config[SIMULATION_PARTITION])
            partition = (config.nodes_dir, index)
            with self._lock:
                if partition not in self.services:
                    nodes = _node_directories(config.nodes_dir)
                    if index >= len(nodes):
                        raise ConfigError(f"{config.nodes_dir} holds {len(nodes)} fedrisk node(s); node {index} has none")
                    self.services[partition] = NodeService(nodes[index], preset=self.preset)
        except FedriskError as error:
            return refusal(str(error))
        return self.services[partition].handle(request)


def make_client_app(preset: RunConfig | None = None) -> ClientApp:
    """The ClientApp: a relay where the SuperNode names a node service, the in-process node
    service in simulation. `preset` fixes the run config (simulation only)."""
    in_process = _InProcess(preset)

    def answer(message: Message, context: Context) -> Message:
        handler: Callable[[Message, Context], RecordDict]
        if NODE_SERVICE in context.node_config:
            handler = relay
        elif SIMULATION_PARTITION in context.node_config:
            handler = in_process
        else:
            return Message(content=refusal(f"this SuperNode names no {NODE_SERVICE} socket in its node config"),
                           reply_to=message)
        return Message(content=handler(message, context), reply_to=message)

    client_app = ClientApp()
    for register in (client_app.query("census"), client_app.train(), client_app.evaluate(),
                     client_app.query("reveal"), client_app.query("release"), client_app.query("check"),
                     client_app.query("answer")):
        register(answer)
    return client_app


app = make_client_app()
