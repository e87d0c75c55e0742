"""The Docker Compose layout (deploy/docker/compose.yaml) keeps the trust boundaries it documents.

No Docker needed: the file is parsed as Compose would interpolate it (defaults of `${VAR:-x}`,
`$$` escapes), each service's mounts are resolved to host files, and every flag given to a Flower
or MLflow command is looked up in the `--help` of the CLI installed next to this interpreter.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from functools import cache
from itertools import combinations
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "deploy" / "docker"
COMPOSE = DOCKER / "compose.yaml"
BIN = Path(sys.executable).parent
COORDINATOR = ("superlink", "mlflow", "submit")
SECRETS_DIR = "/run/secrets/"

# ---------------------------------------------------------------------------------- helpers


def _interpolate(value):
    """Compose's interpolation with no variables set: `${VAR:-default}` -> default, `$$` -> `$`."""
    if isinstance(value, dict):
        return {key: _interpolate(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate(item) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group(2) is not None:
            return match.group(2)
        raise AssertionError(f"variable without a default: {match.group(0)!r} in {value!r}")

    return re.sub(r"\$\$|\$\{(\w+)(?::-([^}]*))?\}|\$\w+|\$", substitute, value)


@cache
def compose() -> dict:
    return _interpolate(yaml.safe_load(COMPOSE.read_text()))


def services() -> dict[str, dict]:
    return compose()["services"]


def hospitals() -> dict[str, str]:
    """Service name -> the hospital name its credentials are issued to (hospital-1 -> hospital_01)."""
    return {name: f"hospital_{int(name.rsplit('-', 1)[1]):02d}"
            for name in services() if re.fullmatch(r"hospital-\d+", name)}


def node_services() -> dict[str, str]:
    """Node-service name -> its hospital (hospital-1-node -> hospital_01)."""
    return {name: f"hospital_{int(name.split('-')[1]):02d}"
            for name in services() if re.fullmatch(r"hospital-\d+-node", name)}


def hospital_services() -> dict[str, str]:
    """Every service of a hospital (its SuperNode and its node service) -> the hospital."""
    return {**hospitals(), **node_services()}


def mounts(service: str) -> list[dict]:
    """Everything a service mounts: kind, source (host path or named volume), target, read-only."""
    spec, found = services()[service], []
    for volume in spec.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            source, target, mode = parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"
            read_only = "ro" in mode.split(",")
        else:
            source, target, read_only = volume.get("source", ""), volume["target"], bool(volume.get("read_only"))
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        found.append({"kind": kind, "source": source, "target": target, "read_only": read_only})
    for secret in spec.get("secrets", []):
        name = secret if isinstance(secret, str) else secret["source"]
        target = name if isinstance(secret, str) else secret.get("target", name)
        target = target if target.startswith("/") else SECRETS_DIR + target
        found.append({"kind": "secret", "source": compose()["secrets"][name]["file"], "target": target,
                      "read_only": True})
    for config in spec.get("configs", []):
        name = config if isinstance(config, str) else config["source"]
        target = config.get("target", "/" + name) if isinstance(config, dict) else "/" + name
        found.append({"kind": "config", "source": f"config:{name}", "target": target, "read_only": True})
    return found


def argv(service: str) -> list[str]:
    spec = services()[service]
    return [*spec.get("entrypoint", []), *spec.get("command", [])]


def flags(tokens: list[str]) -> dict[str, str | None]:
    """`--name=value` / `--name value` / bare `--name` -> {name: value or None}."""
    found: dict[str, str | None] = {}
    for index, token in enumerate(tokens):
        if not token.startswith("--"):
            continue
        name, eq, value = token.partition("=")
        if not eq and index + 1 < len(tokens) and not tokens[index + 1].startswith("--"):
            value = tokens[index + 1]
        found[name] = value if (eq or value) else None
    return found


def strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    return []


def networks(service: str) -> set[str]:
    value = services()[service].get("networks", ["default"])
    return set(value if isinstance(value, list) else value.keys())


@pytest.fixture(scope="module")
def assert_flags_known(tmp_path_factory: pytest.TempPathFactory):
    """Check flags against `<command> --help` of the CLIs installed next to this interpreter
    (each help text fetched once; Flower's home directory kept in a temporary directory)."""
    env = {**os.environ, "FLWR_HOME": str(tmp_path_factory.mktemp("flwr-home")), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}

    @cache
    def help_text(command: tuple[str, ...]) -> str:
        result = subprocess.run([str(BIN / command[0]), *command[1:], "--help"], check=False,
                                capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
        assert result.returncode == 0, f"{' '.join(command)} --help failed:\n{result.stderr[-2000:]}"
        return result.stdout

    def check(command: tuple[str, ...], used: set[str]) -> None:
        text = help_text(command)
        unknown = sorted(f for f in used if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text))
        assert not unknown, f"`{' '.join(command)}` has no option(s) {unknown}"

    return check


def submit_script_commands() -> list[tuple[tuple[str, ...], set[str]]]:
    """(`flwr` subcommand, its flags) for every flwr call in the submit service's script."""
    script = "\n".join(strings(services()["submit"].get("entrypoint", [])))
    script = re.sub(r"\\\n\s*", " ", script)
    return [(("flwr", *match.group(1).split()), set(re.findall(r"(?<![\w-])--[a-z][\w-]*", match.group(2))))
            for match in re.finditer(r"\bflwr\s+(supernode\s+\w+|\w+)([^\n|;]*)", script)]


# ---------------------------------------------------------------------------------- layout


def test_services_and_shared_hospital_definition():
    assert {"superlink", "mlflow", "submit"} <= set(services())
    assert sorted(hospitals().values()) == ["hospital_00", "hospital_01", "hospital_02"]
    # Every hospital runs the same command and healthcheck (one YAML anchor): they differ only
    # in which files and network they get.
    commands = {tuple(argv(name)) for name in hospitals()}
    assert len(commands) == 1
    assert sorted(node_services().values()) == sorted(hospitals().values()), "one node service per hospital"
    assert len({tuple(argv(name)) for name in node_services()}) == 1
    assert services()["submit"].get("profiles"), "submit must not start with `docker compose up`"


def _socket_volume(service: str) -> str:
    (socket,) = [m["source"] for m in mounts(service) if m["target"] == "/run/fedrisk"]
    return socket


def test_hospitals_mount_only_their_own_files():
    owners: dict[str, str] = {}
    for service, hospital in hospital_services().items():
        others = [h for h in hospitals().values() if h != hospital]
        own_prefix = f"hospital-{int(hospital.rsplit('_', 1)[1])}-"
        for mount in mounts(service):
            source = mount["source"]
            for foreign in others:
                assert foreign not in source, f"{service} mounts {source}, which belongs to {foreign}"
            if mount["target"] != SECRETS_DIR + "ca.crt":  # the CA certificate is public and shared
                assert hospital in source or source.startswith(own_prefix), f"{service} mounts {source}, not its own"
            if mount["kind"] == "volume" and mount["target"] != "/run/fedrisk":
                assert owners.setdefault(source, service) == service, f"volume {source} shared"


def test_only_the_node_service_holds_the_node_directory_the_export_and_the_ckks_key():
    for service in node_services():
        by_target = {m["target"]: m for m in mounts(service)}
        assert by_target["/node"]["kind"] == "volume" and not by_target["/node"]["read_only"]
        assert by_target["/export"]["read_only"], f"{service}: the export must be read-only"
        assert SECRETS_DIR + "hospital.ckks" in by_target
        assert not {SECRETS_DIR + f for f in ("auth.key", "node.key")} & set(by_target), "TLS/auth keys are the SuperNode's"
        assert services()[service].get("network_mode") == "none", f"{service} must have no network"
    for service in hospitals():
        targets = {m["target"] for m in mounts(service)}
        assert not {"/node", "/export", SECRETS_DIR + "hospital.ckks"} & targets, f"{service} (SuperNode) holds node files"
        assert {SECRETS_DIR + f for f in ("auth.key", "node.crt", "node.key", "ca.crt")} <= targets


def test_a_supernode_shares_only_the_socket_with_its_node_service_and_runs_as_the_uid_it_answers():
    for service, hospital in hospitals().items():
        (node,) = [n for n, h in node_services().items() if h == hospital]
        assert _socket_volume(service) == _socket_volume(node)
        shared = {m["source"] for m in mounts(service) if m["kind"] != "secret"} & \
            {m["source"] for m in mounts(node) if m["kind"] != "secret"}
        assert shared == {_socket_volume(node)}
        relay_uid = str(services()[service]["user"]).split(":")[0]
        assert relay_uid != "0" and relay_uid != "10001", "the SuperNode must not run as root or the node's user"
        used = flags(argv(node))
        assert used["--relay-user"] == relay_uid
        assert used["--federation-socket"].startswith("/run/fedrisk/")
        from flwr.common.config import parse_config_args

        assert parse_config_args([flags(argv(service))["--node-config"]]) == {"node-service": used["--federation-socket"]}
        depends = services()[service].get("depends_on", {})
        assert depends.get(node, {}).get("condition") == "service_healthy"


def test_node_service_flags_exist(assert_flags_known):
    for service in node_services():
        command = argv(service)
        assert command[:3] == ["fedrisk", "node", "serve"]
        assert_flags_known(("fedrisk", "node", "serve"), set(flags(command)))


def test_coordinator_never_holds_hospital_secrets():
    hospital_volumes = {m["source"] for s in hospital_services() for m in mounts(s) if m["kind"] == "volume"}
    for service in COORDINATOR:
        for mount in mounts(service):
            source = mount["source"]
            for forbidden in ("hospital.ckks", "auth.key", "node.key", "/export"):
                assert forbidden not in source, f"{service} mounts {source}"
            assert source not in hospital_volumes, f"{service} mounts a hospital's node directory"
    superlink = {m["target"]: m for m in mounts("superlink")}
    assert superlink["/keys/server.ckks"]["read_only"] and superlink["/keys/federation.json"]["read_only"]
    assert "/keys" not in superlink, "mount server.ckks and federation.json, not the keys directory"


def test_hospitals_hold_no_coordinator_material_and_ca_key_is_nowhere():
    for service in hospital_services():
        for mount in mounts(service):
            for forbidden in ("server.ckks", "federation.json", "superlink.key", "superlink.crt", "superlink-"):
                assert forbidden not in mount["source"], f"{service} mounts {mount['source']}"
    for service in services():
        for mount in mounts(service):
            assert not mount["source"].endswith("ca.key"), f"{service} mounts the CA key"
            if mount["kind"] == "bind":
                assert mount["read_only"], f"{service}: host files are mounted read-only ({mount['source']})"


def test_networks_keep_hospitals_apart():
    link = networks("superlink")
    for a, b in combinations(hospitals(), 2):
        assert not networks(a) & networks(b), f"{a} and {b} share a network"
    for service in hospitals():
        assert networks(service) & link, f"{service} cannot reach the SuperLink"
        assert not networks(service) & networks("mlflow"), f"{service} can reach MLflow"
        assert not networks(service) & networks("submit")
    for port in services()["mlflow"].get("ports", []):
        assert str(port).startswith("127.0.0.1:"), f"MLflow published beyond loopback: {port}"
    for service in hospitals():
        assert not services()[service].get("ports"), f"{service} publishes a port"


# ---------------------------------------------------------------------------------- TLS and authentication


def test_superlink_requires_tls_and_supernode_auth():
    used = flags(argv("superlink"))
    assert argv("superlink")[0] == "flower-superlink"
    assert {"--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile", "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--database"} <= set(used)
    database = used["--database"]
    assert any(database.startswith(m["target"] + "/") and m["kind"] == "volume" and not m["read_only"]
               for m in mounts("superlink")), "the SuperLink database must live on a volume"


def test_hospitals_use_tls_and_their_auth_key():
    for service in hospitals():
        command = argv(service)
        used = flags(command)
        assert command[0] == "flower-supernode"
        assert used["--root-certificates"] == SECRETS_DIR + "ca.crt"
        assert used["--auth-supernode-private-key"] == SECRETS_DIR + "auth.key"
        assert {"--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile"} <= set(used), "Runtime API without TLS"
        assert used["--host"] == "127.0.0.1", "the Runtime API serves this container's ClientApps only"
        from flwr.common.config import parse_config_args

        node_config = parse_config_args([used["--node-config"]])
        assert set(node_config) == {"node-service"}, "a SuperNode names its node service, nothing of the node"


def test_no_insecure_connection_anywhere():
    for service in services():
        for text in strings(services()[service]):
            assert "--insecure" not in text, f"{service}: {text}"
    for config in compose().get("configs", {}).values():
        assert not re.search(r"insecure\s*=\s*true", config.get("content", "")), config


def test_every_secret_path_used_is_mounted():
    for service in services():
        targets = {m["target"] for m in mounts(service)}
        texts = strings(services()[service]) + [
            compose()["configs"][m["source"].removeprefix("config:")].get("content", "")
            for m in mounts(service) if m["kind"] == "config"]
        for text in texts:
            for path in re.findall(r"/run/secrets/[\w.*-]+", text):
                if "*" in path:
                    assert any(re.fullmatch(path.replace(".", r"\.").replace("*", ".*"), t) for t in targets), path
                else:
                    assert path in targets, f"{service} uses {path} but does not mount it"


# ---------------------------------------------------------------------------------- flags exist


@pytest.mark.parametrize("service", ["superlink", *sorted(hospitals())])
def test_flower_flags_exist(service, assert_flags_known):
    command = argv(service)
    assert_flags_known((command[0],), set(flags(command)))


def test_mlflow_flags_exist(assert_flags_known):
    command = argv("mlflow")
    assert command[:2] == ["mlflow", "server"]
    assert_flags_known(("mlflow", "server"), set(flags(command)))


def test_flwr_cli_flags_in_submit_script_exist(assert_flags_known):
    calls = submit_script_commands()
    assert {c[0] for c in calls} >= {("flwr", "supernode", "register"), ("flwr", "run"), ("flwr", "ls")}
    for command, used in calls:
        assert_flags_known(command, used)


# ---------------------------------------------------------------------------------- image


def test_image_is_cpu_only_non_root_and_context_excludes_secrets():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.MULTILINE)
    assert "--index-url https://download.pytorch.org/whl/cpu" in dockerfile
    assert dockerfile.index("download.pytorch.org") < dockerfile.index("pip install .")
    assert re.search(r"^USER (?!root\b)\S+", dockerfile, re.MULTILINE)
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in dockerfile
    assert "--allow-runtime-dependency-installation" not in dockerfile
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", "runs", ".git", "**/*.ckks", "**/*.key", "**/*.sqlite"} <= ignored
