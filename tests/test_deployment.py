"""fedrisk on Flower's deployment engine: a real SuperLink and three real SuperNodes, separate
processes on loopback, TLS on every connection and SuperNode authentication.

The tests start every process themselves and stop all of them (SuperExec, ServerApp and
ClientApp processes included) at the end of the module. They run in file order: the last one
injects faults, killing and restarting processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clients.node_state import NodeState
from engines.analytics import answer_in_process
from engines.deployment import CONNECTION, PLAIN_CONNECTION, LocalDeployment
from engines.provisioning import provision_nodes
from engines.simulation import simulate
from experiments.synthetic import synthesize
from engines.credentials import init_credentials, new_node_key, renew_credentials
from federation import messages as M
from federation.config import RunConfig
from federation.contributions import SIGNING_KEY_FILE
from federation.he_codec import HospitalKey, ServerContext, flooding_std, init_keys
from federation.query import CELL_CAPACITY
from federation.query import CohortQuery
from privacy.accounting import epsilon_for
from privacy.audit import REFUSAL, RELAY_REQUEST, REPLY_REJECTED, ROUND_TRAIN, RUN_RESUME, AuditLog
from privacy.ledger import BudgetLedger
from server.checkpoint import CHECKPOINT_FILE

pytestmark = pytest.mark.slow
PURPOSE = "credit-risk-research"
ROUND_TIMEOUT = 30.0  # the fault drill's: a normal step takes 5-15 s here; a straggler is one that takes longer
PATIENT_TIMEOUT = 180.0  # runs that test results, not stragglers, wait out a loaded machine
FAULTY = "hospital_01"  # its SuperNode is started with a fault for the drill: a corrupted round-3 reply


class Federation:
    """Everything the module's tests share: data, keys, credentials, node directories and
    the running deployment."""

    def __init__(self, root: Path) -> None:
        self.root = root
        report = synthesize(3, 4500, root / "data", seed=11)
        self.hospitals = [path.stem for path in report.files]
        self.keys = init_keys(root / "keys")
        init_credentials(root / "creds", self.hospitals, ["127.0.0.1", "localhost"])
        # the deployment runs on rotated TLS keys and certificates (`fedrisk certs renew`), auth keys kept
        self.credentials = renew_credentials(root / "creds", days=29)  # within the CA's 30 days
        provision_nodes(root / "data", self.keys.hospital_context, root / "nodes",
                        purposes={PURPOSE: (10.0, 1e-5)})
        # The simulation gets an identical copy of every node (same pseudonym keys, same data).
        shutil.copytree(root / "nodes", root / "sim-nodes")
        self.deployment = LocalDeployment(root / "work", self.credentials)

    def node_dir(self, hospital: str) -> Path:
        return self.root / "nodes" / hospital

    def start(self) -> None:
        d = self.deployment
        d.start_superlink()
        for hospital in self.hospitals:
            d.register(hospital)
        for hospital in self.hospitals:
            env = {"FEDRISK_INJECT_FAULTS": f"{FAULTY}:train@3:truncated"} if hospital == FAULTY else None
            d.start_supernode(hospital, self.node_dir(hospital), env=env)
        d.wait_online(self.hospitals)

    def run_config(self, run_dir: Path, **changes: object) -> dict[str, object]:
        return {"keys-dir": str(self.keys.server_context.parent), "run-dir": str(run_dir), "nodes-dir": "",
                "num-hospitals": 3, "round-timeout": ROUND_TIMEOUT, **changes}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    federation = Federation(tmp_path_factory.mktemp("deployment"))
    try:
        federation.start()
        yield federation
    finally:
        federation.deployment.stop()


def test_a_clientapp_process_starts_without_the_heavy_libraries_it_may_not_need() -> None:
    """The deployment engine starts a fresh ClientApp process for every message a hospital
    answers. Census, reveal, release and query-check messages need no torch, scikit-learn,
    SciPy or pandera; importing them would add seconds to every one of those messages."""
    probe = "import sys, clients.app; print(' '.join(m for m in ('torch', 'sklearn', 'scipy', 'pandera', 'opacus') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert loaded == []


def test_an_unenrolled_supernode_cannot_join(federation: Federation) -> None:
    d = federation.deployment
    rogue_key, _ = new_node_key(federation.root / "rogue", "rogue")
    before = d.nodes()
    rogue = d.start_supernode("hospital_00", federation.node_dir("hospital_00"), auth_key=rogue_key,
                              max_retries=0, name="rogue-supernode")
    assert rogue.wait(timeout=90) != 0
    assert "Failed to activate SuperNode" in d.log("rogue-supernode").read_text()
    assert d.nodes() == before  # nothing joined, nothing was added


def test_a_plaintext_client_cannot_connect(federation: Federation) -> None:
    d = federation.deployment
    plain = d.start_supernode("hospital_00", federation.node_dir("hospital_00"), insecure=True, max_retries=0,
                              name="plain-supernode")
    assert plain.wait(timeout=90) != 0
    result = d.cli("supernode", "list", PLAIN_CONNECTION)
    assert result.returncode != 0
    assert "unavailable" in (result.stdout + result.stderr)
    assert d.cli("supernode", "list", CONNECTION).returncode == 0  # the TLS connection still works


def test_a_run_is_refused_when_the_server_is_handed_a_secret_key(federation: Federation, tmp_path: Path) -> None:
    leaky = tmp_path / "leaky-keys"
    shutil.copytree(federation.keys.server_context.parent, leaky)
    shutil.copy(federation.keys.hospital_context, leaky / "server.ckks")
    d = federation.deployment
    status = d.wait_run(d.submit(federation.run_config(tmp_path / "run", rounds=1, **{"keys-dir": str(leaky)})),
                        timeout=180)
    assert status.finished and not status.completed
    assert "holds a CKKS secret key" in status.details
    assert not (tmp_path / "run" / "release").exists()


def test_a_hostile_app_bundle_cannot_read_the_node_and_the_node_service_refuses_and_audits_it(
        federation: Federation, tmp_path: Path) -> None:
    """The coordinator ships its own ClientApp. Running as the SuperNode's user it cannot open the
    export, the keys or the ledger, and the node service refuses what it asks for over the
    channel; every request is in the node's audit log with the caller's uid and the bundle."""
    d = federation.deployment
    if d.relay_uid == os.geteuid():
        pytest.skip(f"this machine cannot run the SuperNode as another user: {d.separation}")
    app = tmp_path / "rogue-app"
    shutil.copytree(Path(__file__).parent / "rogue_app", app)
    (app / "federation").mkdir()
    for module in ("__init__.py", "messages.py", "node_channel.py"):  # the public channel protocol
        shutil.copy(Path(__file__).resolve().parents[1] / "federation" / module, app / "federation" / module)
    he = ServerContext.load(federation.keys.server_context.parent)
    honest = RunConfig(keys_dir=str(federation.keys.server_context.parent), num_hospitals=3, rounds=1)
    base = {M.KEY_ID: he.key_id, M.PARAMS_ID: he.params_id, M.FEDERATION: he.key_id, M.RUN_ID: "rogue",
            M.ROUND: 0, M.RUN_CONFIG: json.dumps(honest.to_user_config())}
    targets = {}
    for hospital in federation.hospitals:
        state = NodeState.load(federation.node_dir(hospital))
        targets[str(d.node_ids[hospital])] = {
            "export": str(state.data_file), "ckks": str(state.directory / "hospital.ckks"),
            "pseudonym": str(state.directory / "pseudonym.key"), "signing": str(state.directory / SIGNING_KEY_FILE),
            "ledger": str(state.directory / "ledger.sqlite"), "node-dir": str(state.directory)}
    charges_before = {h: _charges(federation.node_dir(h)) for h in federation.hospitals}
    audit_before = {h: len(NodeState.load(federation.node_dir(h)).audit().entries()) for h in federation.hospitals}
    out = tmp_path / "stolen.json"
    spec = tmp_path / "plan.json"  # Flower's --run-config cannot carry JSON: the plan goes in a file
    spec.write_text(json.dumps({"targets": targets, "base": base}))
    status = d.wait_run(d.submit({"out": str(out), "spec": str(spec)}, app_dir=app), timeout=600)
    assert status.completed, (status, d.log("superlink").read_text()[-3000:])
    found = json.loads(out.read_text())
    assert sorted(found) == sorted(targets)
    for hospital in federation.hospitals:
        got = found[str(d.node_ids[hospital])]
        assert got["uid"] == str(d.relay_uid)
        assert {got[k] for k in ("export", "ckks", "pseudonym", "signing", "ledger", "node-dir")} == {"PermissionError"}
        assert "refusing to reveal a train aggregate" in got["reveal-update"]
        assert "dp" in got["dp-off"] and got["dp-off"] != "answered"
        assert "answers no 'query.dump-records' messages" in got["dump"]
        assert _charges(federation.node_dir(hospital)) == charges_before[hospital]  # nothing was spent
        added = NodeState.load(federation.node_dir(hospital)).audit().entries()[audit_before[hospital]:]
        relayed = [e for e in added if e.action == RELAY_REQUEST]
        assert [e.details["message-type"] for e in relayed] == ["query.reveal", "query.census", "query.dump-records"]
        # the uid is the kernel's word; the bundle name is the relay's own claim, and this one claims none
        assert all(e.details["peer-uid"] == d.relay_uid and e.details["fab-hash"] == "" for e in relayed)
        assert [e.action for e in added].count(REFUSAL) == 3


def _charges(node_dir: Path) -> int:
    with BudgetLedger(node_dir / "ledger.sqlite") as ledger:
        return len(ledger.all_charges())


def test_deployment_trains_the_same_model_as_the_simulation(federation: Federation, tmp_path: Path) -> None:
    d = federation.deployment
    status = d.wait_run(d.submit(federation.run_config(tmp_path / "deployed", rounds=2, **{"run-id": "same-model",
                                                                              "round-timeout": PATIENT_TIMEOUT})),
                        timeout=600)
    assert status.completed, (status, d.log("superlink").read_text()[-3000:])
    deployed = np.load(tmp_path / "deployed" / "release" / "model.npz")["weights"]

    simulated = simulate(RunConfig(nodes_dir=str(federation.root / "sim-nodes"),
                                   keys_dir=str(federation.keys.server_context.parent),
                                   run_dir=str(tmp_path / "simulated"), num_hospitals=3, rounds=2,
                                   run_id="same-model"))
    assert np.max(np.abs(deployed - simulated.weights)) < 1e-5
    report = json.loads((tmp_path / "deployed" / "release" / "privacy_report.json").read_text())
    for hospital, spend in report["hospitals"].items():
        assert spend["epsilon"] == pytest.approx(simulated.privacy["hospitals"][hospital]["epsilon"])
        assert spend["steps"] == simulated.privacy["hospitals"][hospital]["steps"]


def test_a_cohort_query_gives_the_same_answer_on_both_engines(federation: Federation, tmp_path: Path) -> None:
    query = tmp_path / "query.yaml"
    query.write_text("name: delinquency-by-insurance\npurpose: credit-risk-research\nepsilon: 0.5\n"
                     "measure: rate\nfield: delinquent_90d_12m\ngroup-by: [insurance_type]\n")
    d = federation.deployment
    status = d.wait_run(d.submit(federation.run_config(tmp_path / "deployed", query=str(query),
                                                       **{"run-id": "same-query", "round-timeout": PATIENT_TIMEOUT})), timeout=600)
    assert status.completed, (status, d.log("superlink").read_text()[-3000:])
    deployed = pd.read_csv(tmp_path / "deployed" / "queries" / "same-query.csv")

    # The simulation engine runs the same ClientApp and ServerApp code (tests/test_analytics.py);
    # here the identical node copies answer in-process: same secrets, records and run id, so each
    # hospital draws the same DP noise (only the decryption's flooding, a couple of records, differs).
    states = [NodeState.load(federation.root / "sim-nodes" / h) for h in federation.hospitals]
    local = answer_in_process(states, HospitalKey.load(federation.keys.hospital_context),
                              ServerContext.load(federation.keys.server_context.parent),
                              CohortQuery.load(query), "same-query")
    assert list(deployed["insurance_type"]) == list(local["insurance_type"])
    assert (((deployed["rate"] - local["rate"]).abs() < 0.5 * deployed["se"]) | deployed["suppressed"]).all()
    flooding_records = flooding_std(3) * CELL_CAPACITY  # one decryption's flooding, in records
    assert ((deployed["records"] - local["records"]).abs() < 6 * np.sqrt(2) * flooding_records).all()
    for hospital in federation.hospitals:
        with BudgetLedger(federation.node_dir(hospital) / "ledger.sqlite") as ledger:
            charges = [c for c in ledger.history(PURPOSE) if c.run_id == "same-query"]
        assert [c.kind for c in charges] == ["analytics"]


def _checkpoint_round(run_dir: Path) -> int:
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        return 0
    try:
        with np.load(path) as data:
            return int(json.loads(data["meta"].tobytes())["completed_round"])
    except (OSError, ValueError, KeyError):
        return 0


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _trainings(node_dir: Path, run_id: str, server_round: int) -> int:
    """How many times the hospital started training `server_round` of the run (audit log)."""
    return sum(1 for e in AuditLog(node_dir / "audit.sqlite", role="test", identity="test").entries()
               if e.action == ROUND_TRAIN and e.details.get("run") == run_id and e.details.get("round") == server_round)


def test_faults_stragglers_dropouts_bad_ciphertexts_and_a_coordinator_crash(federation: Federation,
                                                                            tmp_path: Path) -> None:
    """Four rounds, at least two hospitals each:
    round 2: hospital_02 stalls (SIGSTOP) past the round timeout -> left out, rejoins in round 3;
    round 3: hospital_01 sends a truncated ciphertext -> rejected, the round goes on;
    round 4: the coordinator (SuperLink, SuperExec, ServerApp) is SIGKILLed mid-round, restarted
             and the run resubmitted -> resumes at round 4 from the checkpoint; then hospital_02's
             SuperNode is SIGKILLed mid-round -> round 4 completes with the other two."""
    d, run_dir, run_id = federation.deployment, tmp_path / "drill", "fault-drill"
    config = federation.run_config(run_dir, rounds=4, **{"min-replies": 2, "run-id": run_id})
    first = d.submit(config)

    _wait_for(lambda: _checkpoint_round(run_dir) >= 1, 300, "round 1")
    d.signal("supernode-hospital_02", signal.SIGSTOP)
    time.sleep(ROUND_TIMEOUT + 5)
    d.signal("supernode-hospital_02", signal.SIGCONT)

    _wait_for(lambda: _checkpoint_round(run_dir) >= 3, 400, "round 3")
    _wait_for(lambda: _trainings(federation.node_dir("hospital_00"), run_id, 4) >= 1, 120, "round 4 training")
    d.signal("superlink", signal.SIGKILL)
    assert d.status(first).status == "unknown"  # the coordinator is gone
    d.start_superlink()
    d.wait_online(federation.hospitals, timeout=180)
    second = d.submit(config)
    _wait_for(lambda: _trainings(federation.node_dir("hospital_02"), run_id, 4) >= 2, 300, "resumed round 4")
    d.signal("supernode-hospital_02", signal.SIGKILL)
    status = d.wait_run(second, timeout=400)
    if not status.completed and "could not be found" in status.details:
        # Flower 1.42: a SuperNode killed while uploading its reply can leave the SuperLink a dangling
        # object, and the ServerApp's pull of that round then fails; the operator resubmits, and the
        # run resumes from its checkpoint without the dead hospital
        status = d.wait_run(d.submit(config), timeout=400)
    assert status.completed, (status, d.log("superlink").read_text()[-3000:])

    summary = json.loads((run_dir / "release" / "run_summary.json").read_text())
    contributors = {int(r): names for r, names in summary["contributors"].items()}
    assert {r: contributors[r] for r in (1, 2, 3)} == {1: ["hospital_00", "hospital_01", "hospital_02"],
                                                       2: ["hospital_00", "hospital_01"], 3: ["hospital_00", "hospital_02"]}
    rejected = {(r["round"], r["step"], r["hospital"]): r["reason"] for r in summary["rejections"]}
    assert "no reply within round-timeout" in rejected[(2, "training", "hospital_02")]
    assert "not a CKKS ciphertext" in rejected[(3, "training", "hospital_01")]
    # the kill lands mid-round; on a busy machine hospital_02 may have sent its round-4 update just before
    # it (the round then has all three), otherwise the round completes with the other two
    if contributors[4] == ["hospital_00", "hospital_01"]:
        assert "no reply within round-timeout" in rejected[(4, "training", "hospital_02")]
    else:
        assert contributors[4] == ["hospital_00", "hospital_01", "hospital_02"]
    assert sorted(map(int, summary["rounds"])) == [1, 2, 3, 4]
    assert not (run_dir / CHECKPOINT_FILE).exists()

    server_log = AuditLog(run_dir / "server_audit.sqlite", role="test", identity="test")
    assert server_log.verify().ok
    actions = [e.action for e in server_log.entries()]
    assert actions.count(RUN_RESUME) == 1 and actions.count(REPLY_REJECTED) >= 3
    assert actions.count(ROUND_TRAIN) == 4  # no round lost or repeated

    # Round 4 trained twice at hospital_00 (before and after the crash), charged once.
    assert _trainings(federation.node_dir("hospital_00"), run_id, 4) == 2
    report = json.loads((run_dir / "release" / "privacy_report.json").read_text())
    for hospital in federation.hospitals:
        with BudgetLedger(federation.node_dir(hospital) / "ledger.sqlite") as ledger:
            charges = [c for c in ledger.history(PURPOSE) if c.run_id == run_id and c.kind == "training"]
        rounds = sorted(int(c.slot.removeprefix("round-")) for c in charges)
        assert rounds == sorted(set(rounds)), f"{hospital} was charged twice for a round: {rounds}"
        steps = sum(c.mechanism.steps for c in charges)
        if hospital in report["hospitals"]:
            spend = report["hospitals"][hospital]
            assert spend["epsilon"] == pytest.approx(epsilon_for(
                sample_rate=spend["sample_rate"], noise_multiplier=spend["noise_multiplier"],
                steps=spend["steps"], delta=spend["delta"]))
            assert spend["steps"] <= steps

    # The released model is the replay of the four aggregates (each a weighted mean of its round).
    weights = np.load(run_dir / "release" / "model.npz")["weights"]
    assert np.all(np.isfinite(weights)) and summary["chain_bytes"] > 0
