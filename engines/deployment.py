"""fedrisk on Flower's deployment engine, on one machine: a SuperLink and one SuperNode per
hospital, each a separate process on loopback, TLS on every connection, and SuperNode
authentication (only registered keys may join).

This is the harness the deployment tests, the deployment benchmark and `fedrisk deploy local`
use. On real machines every party runs the same commands on its own host
(docs/deployment/README.md); nothing here is specific to loopback except the addresses.

Each party gets its own FLWR_HOME, as it would on its own machine; every process started here
carries that path in its environment, which is how `stop` finds the processes Flower starts on
its own (SuperExec, ServerApp, ClientApps).

Each hospital runs two processes, as on a real node (docs/deployment/README.md):
- its **node service** (`fedrisk node serve --federation-socket`), as the user that owns the
  node directory (here, whoever runs the harness). It alone reads the export and keys;
- its **SuperNode**, whose ClientApp processes run the coordinator's app bundle. Run by root,
  the harness starts it as the unprivileged `RELAY_USER` (`nobody`), which cannot read the node
  directory: the bundle reaches the node only through the service's socket, which answers only
  that uid. The SuperNode's home, its TLS files and the sockets live in a short-lived directory
  outside the work tree that `RELAY_USER` can reach. Run by anyone else, or where `RELAY_USER`
  cannot read the installation, the SuperNode runs as the same user and `separation` says why.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from engines.credentials import CredentialPaths
from federation.errors import ProtocolError

ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "fedrisk-tls"
STATUS_POLL_SECONDS = 5.0
PLAIN_CONNECTION = "fedrisk-plain"
RELAY_USER = "nobody"
SERVICE_START_SECONDS = 120.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _toml_string(value: object) -> str:
    return json.dumps(str(value))


def run_config_arg(values: dict[str, object]) -> str:
    """Flower's `--run-config` form: `k1=v1 k2="text"` (TOML values)."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            parts.append(f"{key}={value!r}")
        else:
            parts.append(f"{key}={_toml_string(value)}")
    return " ".join(parts)


@dataclass
class RunStatus:
    """A Flower run as `flwr ls` reports it."""

    run_id: int
    status: str
    details: str

    @property
    def finished(self) -> bool:
        """Whether the run has ended, one way or another."""
        return self.status.startswith("finished")

    @property
    def completed(self) -> bool:
        """Whether the run ended without error."""
        return self.status == "finished:completed"


@dataclass
class LocalDeployment:
    """Processes of one local federation. Use as a context manager: everything it started is
    stopped on exit, SuperNodes first (a SuperNode stopped after its SuperLink stays
    "online" in the SuperLink's database and is refused re-activation for a minute)."""

    work: Path
    credentials: CredentialPaths
    app_dir: Path = ROOT
    bin_dir: Path = field(default_factory=lambda: Path(sys.executable).parent)
    link_port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    node_ids: dict[str, int] = field(default_factory=dict)
    sockets: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.work = Path(self.work).resolve()
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        (self.work / "state").mkdir(parents=True, exist_ok=True)
        self.shared = Path(tempfile.mkdtemp(prefix="fedrisk-deploy-"))  # short: Unix socket paths are
        self.shared.chmod(0o711)
        self.homes = self.shared / "flwr-home"
        self.homes.mkdir(mode=0o711)
        self.relay_bin, self.relay_env = self.bin_dir, {}
        self.relay_uid, self.separation = self._relay_user()
        sockets = self.shared / "sock"
        sockets.mkdir(mode=0o700)
        if self.relay_uid != os.geteuid():  # only the SuperNodes' group may reach the sockets
            os.chown(sockets, os.geteuid(), pwd.getpwuid(self.relay_uid).pw_gid)
            sockets.chmod(0o710)
        cli_home = self.homes / "cli"
        cli_home.mkdir(parents=True, exist_ok=True)
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.link_port}"\n'
            f"root-certificates = {_toml_string(self.credentials.ca_certificate)}\n\n"
            f'[superlink.{PLAIN_CONNECTION}]\naddress = "127.0.0.1:{self.link_port}"\ninsecure = true\n')

    def _relay_user(self) -> tuple[int, str]:
        """The uid SuperNodes run as, and a line saying whether that separates them from the nodes."""
        if os.geteuid() != 0:
            return os.getuid(), f"not separated: the harness runs as uid {os.getuid()}, not root"
        try:
            uid = pwd.getpwnam(RELAY_USER).pw_uid
        except KeyError:
            return 0, f"not separated: no {RELAY_USER} user on this machine"
        failures = []
        for bin_dir, extra in self._relay_runtimes():
            env = {**self.env("relay-probe", extra), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
            probe = subprocess.run([*self._as_relay(uid), str(bin_dir / "python"), "-c", _RELAY_PROBE],
                                   cwd=self.shared, env=env, capture_output=True, text=True, timeout=120)
            if probe.returncode == 0:
                self.relay_bin, self.relay_env = bin_dir, extra
                return uid, f"separated: SuperNodes run as {RELAY_USER} (uid {uid}) from {bin_dir}"
            failures.append(f"{bin_dir}: {probe.stderr.strip()[-160:]}")
        return 0, f"not separated: {RELAY_USER} cannot run Flower here ({'; '.join(failures)})"

    def _relay_runtimes(self) -> Iterator[tuple[Path, dict[str, str]]]:
        """Where the SuperNode's user may find a Python that runs Flower: this installation's own,
        or, when that interpreter lies where the user cannot reach (a pyenv under /root), the
        system's Python of the same version reading this installation's packages, with Flower's
        commands rewritten to use it. The second is built only if the first is refused."""
        yield self.bin_dir, {}
        system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
        packages = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
        if system.exists() and packages:
            runtime = self.shared / "relay-runtime" / "bin"
            runtime.mkdir(parents=True, exist_ok=True)
            (runtime / "python").symlink_to(system)
            for command in ("flower-supernode", "flower-superexec", "flwr-clientapp"):
                body = (self.bin_dir / command).read_text().split("\n", 1)[1]
                (runtime / command).write_text(f"#!{runtime / 'python'}\n{body}")
                (runtime / command).chmod(0o755)
            runtime.parent.chmod(0o755)
            yield runtime, {"PYTHONPATH": os.pathsep.join(packages)}

    @staticmethod
    def _as_relay(uid: int) -> list[str]:
        if uid == os.geteuid():
            return []
        return ["setpriv", f"--reuid={uid}", f"--regid={pwd.getpwuid(uid).pw_gid}", "--clear-groups", "--"]

    # --- processes ---------------------------------------------------------------------------
    def env(self, party: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Environment of one party's processes: its own FLWR_HOME, no telemetry, no update
        check, and no runtime dependency installation (which would fetch a CUDA torch)."""
        home = self.homes / party
        home.mkdir(parents=True, exist_ok=True)
        return {**os.environ, "FLWR_HOME": str(home), "PATH": f"{self.bin_dir}{os.pathsep}{os.environ['PATH']}",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2", **(extra or {})}

    def log(self, name: str) -> Path:
        """Where a process's output goes."""
        return self.work / "logs" / f"{name}.log"

    def _spawn(self, name: str, argv: list[str], party: str, extra_env: dict[str, str] | None = None,
               cwd: Path | None = None, minimal_env: bool = False) -> subprocess.Popen:
        env = self.env(party, extra_env)
        if minimal_env:  # a SuperNode runs the coordinator's code: it gets none of the harness's environment
            env = {k: v for k, v in env.items() if k in _SUPERNODE_ENV or k.startswith("FLWR_") or k in (extra_env or {})}
        handle = open(self.log(name), "ab")
        try:
            process = subprocess.Popen(argv, cwd=cwd or self.work, env=env, stdout=handle,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            handle.close()
        self.processes[name] = process
        return process

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the `flwr` CLI as the federation's operator."""
        return subprocess.run([str(self.bin_dir / "flwr"), *args], cwd=self.work, env=self.env("cli"),
                              capture_output=True, text=True, timeout=timeout)

    def start_superlink(self, timeout: float = 90) -> None:
        """Start (or restart, on the same database) the coordinator's SuperLink: TLS with the
        test CA's server certificate, SuperNode authentication on."""
        c = self.credentials
        self._spawn("superlink", [
            str(self.bin_dir / "flower-superlink"),
            "--ssl-ca-certfile", str(c.ca_certificate), "--ssl-certfile", str(c.superlink_certificate),
            "--ssl-keyfile", str(c.superlink_key), "--enable-supernode-auth",
            "--database", str(self.work / "state" / "superlink.db"),
            "--host", "127.0.0.1", "--port", str(self.link_port),
            "--disable-runtime-dependency-installation"], "superlink")
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.processes["superlink"].poll() is not None:
                raise ProtocolError(f"SuperLink exited with {self.processes['superlink'].returncode}; "
                                    f"see {self.log('superlink')}")
            if time.monotonic() > deadline:
                raise ProtocolError(f"SuperLink did not answer within {timeout:.0f}s; see {self.log('superlink')}")
            time.sleep(1)

    def _answers(self) -> bool:
        """Whether the SuperLink answers the operator's CLI. (`flwr ... --format json` exits 0
        even when it cannot connect, saying so in its JSON: read that, not the exit code.)"""
        result = self.cli("supernode", "list", CONNECTION, "--format", "json", timeout=60)
        try:
            return result.returncode == 0 and json.loads(result.stdout).get("success", True) is not False
        except ValueError:
            return False

    def register(self, hospital: str, public_key: Path | None = None) -> int:
        """Enroll a hospital's SuperNode key with the SuperLink; returns its node id."""
        key = public_key or self.credentials.hospitals[hospital].auth_public_key
        result = self.cli("supernode", "register", str(key), CONNECTION, "--name", hospital)
        words = (result.stdout + result.stderr).split()
        if result.returncode != 0 or "registered" not in words:
            raise ProtocolError(f"registering {hospital} failed: {(result.stdout + result.stderr).strip()[-300:]}")
        node_id = int(words[words.index("registered") - 1])
        self.node_ids[hospital] = node_id
        return node_id

    def start_node_service(self, hospital: str, node_dir: Path, env: dict[str, str] | None = None,
                           timeout: float = SERVICE_START_SECONDS) -> Path:
        """Start the hospital's node service (once) and wait until its socket answers; returns the socket."""
        name = f"node-service-{hospital}"
        running = self.processes.get(name)
        if running is not None and running.poll() is None:
            return self.sockets[hospital]
        path = self.shared / "sock" / f"{hospital}.sock"
        process = self._spawn(name, [str(self.bin_dir / "fedrisk"), "node", "serve", "--dir", str(Path(node_dir).resolve()),
                                     "--federation-socket", str(path), "--relay-user", str(self.relay_uid)],
                              name, env)
        deadline = time.monotonic() + timeout
        while f"federation socket ready: {path}" not in self.log(name).read_text(errors="replace"):
            if process.poll() is not None:
                raise ProtocolError(f"{hospital}'s node service exited ({process.returncode}): "
                                    f"{self.log(name).read_text()[-500:]}")
            if time.monotonic() > deadline:
                raise ProtocolError(f"{hospital}'s node service did not open {path} within {timeout:.0f}s")
            time.sleep(0.2)
        self.sockets[hospital] = path
        return path

    def _supernode_file(self, home: Path, source: Path) -> Path:
        """A copy of one of the SuperNode's own credential files that its user can read."""
        target = home / "tls" / source.name
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(source, target)
        target.chmod(0o600)
        return target

    def start_supernode(self, hospital: str, node_dir: Path, *, auth_key: Path | None = None,
                        insecure: bool = False, max_retries: int | None = None, name: str | None = None,
                        env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a hospital's node service (if not running) and its SuperNode: TLS to the SuperLink
        (trusting only the federation's CA), its registered auth key, TLS on its own Runtime API,
        and, as its only node config, the node service's socket. `env` goes to both processes
        (the hospital's own operator settings, such as injected faults)."""
        socket_path = self.start_node_service(hospital, node_dir, env)
        c = self.credentials
        mine = c.hospitals[hospital]
        name = name or f"supernode-{hospital}"
        home = self.homes / name
        # A fresh home on every start: a bundle that ran here before may have left symlinks, which
        # root must never follow when it copies, modes or chowns the credentials below.
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(mode=0o700, parents=True)
        own = lambda source: self._supernode_file(home, Path(source))  # noqa: E731
        argv = [*self._as_relay(self.relay_uid), str(self.relay_bin / "flower-supernode"),
                "--superlink", f"127.0.0.1:{self.link_port}"]
        if insecure:
            argv += ["--insecure"]
        else:
            argv += ["--root-certificates", str(own(c.ca_certificate)),
                     "--auth-supernode-private-key", str(own(auth_key or mine.auth_private_key)),
                     "--ssl-certfile", str(own(mine.node_certificate)), "--ssl-keyfile", str(own(mine.node_key)),
                     "--ssl-ca-certfile", str(own(c.ca_certificate))]
        argv += ["--host", "127.0.0.1", "--port", str(free_port()),
                 "--node-config", f"node-service={_toml_string(socket_path)}"]
        if max_retries is not None:
            argv += ["--max-retries", str(max_retries)]
        if self.relay_uid != os.geteuid():
            for path in (home, *home.rglob("*")):
                os.chown(path, self.relay_uid, pwd.getpwuid(self.relay_uid).pw_gid, follow_symlinks=False)
        runtime = {**self.relay_env, "PATH": f"{self.relay_bin}{os.pathsep}{os.environ['PATH']}"}
        return self._spawn(name, argv, name, {**(env or {}), **runtime}, cwd=home, minimal_env=True)

    def nodes(self) -> dict[int, str]:
        """Node id -> status ("registered", "online", "offline") as the SuperLink reports them."""
        result = self.cli("supernode", "list", CONNECTION, "--format", "json")
        if result.returncode != 0:
            return {}
        try:
            listed = json.loads(result.stdout).get("nodes", [])  # a failed call says so in its JSON
        except ValueError:
            return {}
        return {int(n["node-id"]): n["status"] for n in listed}

    def wait_online(self, hospitals: list[str], timeout: float = 120) -> None:
        """Wait until these hospitals' SuperNodes are online."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.nodes()
            if all(status.get(self.node_ids[h]) == "online" for h in hospitals):
                return
            if time.monotonic() > deadline:
                raise ProtocolError(f"SuperNodes not online after {timeout:.0f}s: {status}")
            time.sleep(1)

    # --- runs ------------------------------------------------------------------------------------
    def submit(self, run_config: dict[str, object], app_dir: Path | None = None) -> int:
        """`flwr run <app> <connection>` with these run-config overrides (the fedrisk app unless
        another bundle's directory is given); returns Flower's run id."""
        result = self.cli("run", str(app_dir or self.app_dir), CONNECTION, "--run-config", run_config_arg(run_config),
                          "--format", "json", timeout=300)
        try:
            payload = json.loads(result.stdout[result.stdout.index("{"):])
            return int(payload["run-id"])
        except (ValueError, KeyError, TypeError):
            raise ProtocolError(f"flwr run failed: {(result.stdout + result.stderr).strip()[-500:]}") from None

    def status(self, run_id: int) -> RunStatus:
        """The run's status as the SuperLink reports it."""
        result = self.cli("ls", CONNECTION, "--format", "json")
        if result.returncode == 0 and "{" in result.stdout:
            for run in json.loads(result.stdout[result.stdout.index("{"):]).get("runs", []):
                if int(run["run-id"]) == run_id:
                    return RunStatus(run_id, run["status"], str(run.get("status-details", "")))
        return RunStatus(run_id, "unknown", (result.stdout + result.stderr).strip()[-300:])

    def wait_run(self, run_id: int, timeout: float) -> RunStatus:
        """Wait for the run to finish (or `timeout`); returns its last status. Each status check
        is a `flwr` CLI process costing a second of CPU, which the run itself needs on a small
        machine: hence one check every STATUS_POLL_SECONDS."""
        deadline = time.monotonic() + timeout
        while not (status := self.status(run_id)).finished and time.monotonic() < deadline:
            time.sleep(min(STATUS_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        return status

    # --- faults ----------------------------------------------------------------------------------
    def _tree(self, name: str) -> list[int]:
        """The process and every process Flower started for the same party (same FLWR_HOME)."""
        return processes_with(f"FLWR_HOME={self.homes / name}", exact=True)

    def signal(self, name: str, signum: signal.Signals) -> None:
        """Send a signal to a party's processes: SIGSTOP/SIGCONT to stall and resume one,
        SIGKILL to crash it."""
        send_signals(self._tree(name), signum)
        process = self.processes.get(name)
        if signum == signal.SIGKILL and process is not None:
            process.wait(timeout=30)

    def stop(self) -> None:
        """Stop every process this deployment started, SuperNodes before the SuperLink."""
        order = sorted(self.processes, key=lambda name: name == "superlink")
        for name in order:
            send_signals(self._tree(name), signal.SIGCONT, signal.SIGTERM)  # a stalled process must wake to stop
            try:
                self.processes[name].wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 20
        while processes_with(f"FLWR_HOME={self.homes}") and time.monotonic() < deadline:
            time.sleep(0.5)
        send_signals(processes_with(f"FLWR_HOME={self.homes}"), signal.SIGKILL)
        self.processes.clear()
        shutil.rmtree(self.shared, ignore_errors=True)

    def __enter__(self) -> "LocalDeployment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_SUPERNODE_ENV = frozenset({"PATH", "PYTHONPATH", "LANG", "LC_ALL", "TZ", "FEDRISK_INJECT_FAULTS"})
"""The only variables (beside Flower's own) a SuperNode inherits from the harness."""

_RELAY_PROBE = ("import subprocess, flwr.clientapp; "
                "subprocess.run(['flwr-clientapp', '--help'], check=True, capture_output=True)")
"""Run as the SuperNode's user: can it import Flower, and start Flower's commands as the SuperNode will?"""


def send_signals(pids: list[int], *signums: signal.Signals) -> None:
    """Send each signal to each process, skipping those that have already exited."""
    for pid in pids:
        for signum in signums:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                break


def processes_with(marker: str, exact: bool = False) -> list[int]:
    """PIDs of processes whose environment holds `marker` (a FLWR_HOME prefix, or exactly it)."""
    found = []
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if any(var == needle if exact else var.startswith(needle) for var in environ.split(b"\0")):
            found.append(int(entry.name))
    return found
