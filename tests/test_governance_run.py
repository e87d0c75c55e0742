"""Hospital governance in real runs: nothing identifying reaches the server, budgets are
enforced before any record is touched, consent withdrawals apply, audit logs hold."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from engines.analytics import answer_in_process
from engines.provisioning import provision_nodes
from engines.simulation import simulate
from federation.config import RunConfig
from federation.he_codec import HospitalKey, ServerContext
from federation.query import CohortQuery

ROOT = Path(__file__).resolve().parents[1]
PURPOSE = "credit-risk-research"
pytestmark = pytest.mark.slow


def _message_bytes(message) -> bytes:
    """Every value a reply carries, as bytes."""
    parts: list[bytes] = []
    if message.has_error():
        return str(message.error.reason).encode()
    content = message.content
    for record in content.config_records.values():
        for value in record.values():
            values = value if isinstance(value, list) else [value]
            parts += [v if isinstance(v, bytes) else str(v).encode() for v in values]
    for record in content.metric_records.values():
        parts += [str(v).encode() for v in record.values()]
    for record in content.array_records.values():
        parts += [array.numpy().tobytes() for array in record.values()]
    return b"\n".join(parts)


@pytest.fixture(scope="module")
def canary_run(federation_data, keys, tmp_path_factory):
    """A full federated training on exports seeded with unique canary identifiers."""
    root = tmp_path_factory.mktemp("canary")
    data = root / "data"
    data.mkdir()
    canaries: list[str] = []
    for k, path in enumerate(federation_data.files):
        frame = pd.read_parquet(path)
        for i in range(25):
            name, national, phone = f"Quillon Zarbrecht{k}x{i}", f"9{k}{i % 10}-4{i % 10}-73{k}{i:02d}", f"+1-555-0{k}{i:01d}-8{i:03d}"
            frame.loc[i, ["full_name", "national_id", "phone", "address"]] = [
                name, national, phone, f"{700 + i} Canarywood Lane, Zarbtown"]
            canaries += [name, national, phone, f"{700 + i} Canarywood Lane", str(frame.loc[i, "patient_id"])]
        frame.to_parquet(data / path.name)
    provision_nodes(data, keys.hospital_context, root / "nodes", purposes={PURPOSE: (10.0, 1e-5)})
    received: list[bytes] = []
    original = InMemoryGrid.pull_messages

    def recording(self, message_ids):
        replies = list(original(self, message_ids))
        received.extend(_message_bytes(m) for m in replies)
        return replies

    InMemoryGrid.pull_messages = recording
    try:
        config = RunConfig(nodes_dir=str(root / "nodes"), keys_dir=str(keys.server_context.parent),
                           run_dir=str(root / "server"), num_hospitals=3, rounds=2)
        result = simulate(config)
    finally:
        InMemoryGrid.pull_messages = original
    return root, canaries, received, result


def test_canaries_never_reach_the_server_side(canary_run, capfd) -> None:
    root, canaries, received, result = canary_run
    assert result.rounds[2]["hospitals"] == 3
    assert len(received) >= 3 * (1 + 2 * 2) + 2, "census, train, evaluate, reveal and release replies"
    server_files = [p for p in (root / "server").rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in server_files)
    assert any(p.name == "server_audit.sqlite" for p in server_files)
    haystacks = {str(p): p.read_bytes() for p in server_files}
    haystacks["messages received by the server"] = b"\n".join(received)
    out = capfd.readouterr()
    haystacks["process output"] = (out.out + out.err).encode()
    for canary in canaries:
        needle = canary.encode()
        leaks = [where for where, blob in haystacks.items() if needle in blob]
        assert not leaks, f"canary found in {leaks}"


def test_hospital_audit_logs_hold_no_identifiers_and_verify(canary_run) -> None:
    from privacy.audit import AuditLog

    root, canaries, _, _ = canary_run
    for audit_file in (root / "nodes").glob("*/audit.sqlite"):
        blob = audit_file.read_bytes()
        assert not any(c.encode() in blob for c in canaries)
        log = AuditLog(audit_file, role="auditor", identity="test")
        assert log.verify().ok
        actions = [e.action for e in log.entries()]
        assert actions[:4] == ["node.init", "node.enrol", "run.start", "data.load"]
        assert actions.count("round.train") == 2


def test_a_run_that_would_overspend_is_refused_before_any_record_is_touched(federation_data, keys, tmp_path) -> None:
    nodes = provision_nodes(federation_data.files[0].parent, keys.hospital_context, tmp_path / "nodes",
                            purposes={PURPOSE: (10.0, 1e-5)})
    poor = nodes[1]
    with poor.ledger() as ledger:
        ledger.set_budget(PURPOSE, 0.5, 1e-5)
        before = ledger.history(PURPOSE)
    config = RunConfig(nodes_dir=str(tmp_path / "nodes"), keys_dir=str(keys.server_context.parent),
                       run_dir=str(tmp_path / "run"), num_hospitals=3, rounds=2, target_epsilon=1.0)
    with pytest.raises(Exception, match="over its budget") as refused:
        simulate(config)
    assert poor.hospital in str(refused.value)
    with poor.ledger() as ledger:
        assert ledger.history(PURPOSE) == before
        assert ledger.spent(PURPOSE) == 0.0
    actions = [e.action for e in poor.audit().entries()]
    assert actions[-1] == "refusal"
    assert "data.load" not in actions, "the refusal came before any record was read"
    for other in (nodes[0], nodes[2]):
        with other.ledger() as ledger:
            assert ledger.history(PURPOSE) == [], "no hospital trained: the census failed first"


def test_training_and_analytics_share_one_ledger_that_matches_an_independent_accountant(
        federation_data, keys, tmp_path) -> None:
    import dp_accounting

    from privacy.accounting import ACCOUNTANT, prv_epsilon

    nodes = provision_nodes(federation_data.files[0].parent, keys.hospital_context, tmp_path / "nodes",
                            purposes={PURPOSE: (10.0, 1e-5)})
    simulate(RunConfig(nodes_dir=str(tmp_path / "nodes"), keys_dir=str(keys.server_context.parent),
                       run_dir=str(tmp_path / "run"), num_hospitals=3, rounds=2, target_epsilon=0.5,
                       sample_rate=0.02))
    query = CohortQuery.from_mapping({"name": "rate-by-sex", "purpose": PURPOSE, "epsilon": 0.5, "delta": 1e-5,
                                      "measure": "rate", "field": "delinquent_90d_12m", "group-by": ["sex"]})
    answer_in_process(nodes, HospitalKey.load(keys.hospital_context), ServerContext.load(keys.server_context.parent),
                      query, "cohort")
    with nodes[0].ledger() as ledger:
        history = ledger.history(PURPOSE)
        spent = ledger.spent(PURPOSE)
    assert [c.kind for c in history] == ["training", "evaluation", "training", "evaluation", "analytics"]
    accountant = dp_accounting.rdp.RdpAccountant()
    for charge in history:
        m = charge.mechanism
        gaussian = dp_accounting.GaussianDpEvent(m.noise_multiplier)
        accountant.compose(gaussian if m.sample_rate == 1.0 else dp_accounting.PoissonSampledDpEvent(
            m.sample_rate, gaussian), m.steps)
    assert spent <= accountant.get_epsilon(1e-5)  # Google's RDP: the looser bound
    prv = prv_epsilon([c.mechanism for c in history], 1e-5)  # Opacus's PRV: an independent tight one
    assert 0.98 * prv.estimate <= spent <= prv.upper
    assert all(c.accountant == ACCOUNTANT for c in history)
    assert 0.5 < spent < 0.5 + 0.5  # composition: less than the sum of the two runs' epsilons


def test_revoked_consent_is_excluded_from_the_next_load(federation_data, keys, tmp_path) -> None:
    nodes = provision_nodes(federation_data.files[0].parent, keys.hospital_context, tmp_path / "nodes",
                            purposes={PURPOSE: (10.0, 1e-5)}, count=1)
    state = nodes[0]
    before = state.load_records(PURPOSE)
    raw = pd.read_parquet(state.data_file)
    consenting = raw.loc[raw["consent_credit_risk_research"].astype(bool), "patient_id"].iloc[:3]
    for record_key in consenting:
        result = subprocess.run([sys.executable, "-m", "cli.main", "node", "revoke", "--dir", str(state.directory),
                                 "--record-key", str(record_key), "--purpose", PURPOSE],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
    after = state.load_records(PURPOSE)
    assert after.excluded["revoked"] == 3
    assert before.n_train + len(before.test_y) - (after.n_train + len(after.test_y)) == 3
    entries = [e for e in state.audit().entries() if e.action == "consent.revoke"]
    assert len(entries) == 3 and all(str(k) not in e.details_json for e in entries for k in consenting)


def test_audit_verify_names_a_tampered_entry(federation_data, keys, tmp_path) -> None:
    nodes = provision_nodes(federation_data.files[0].parent, keys.hospital_context, tmp_path / "nodes",
                            purposes={PURPOSE: (10.0, 1e-5)}, count=1)
    state = nodes[0]
    state.load_records(PURPOSE)
    cli = [sys.executable, "-m", "cli.main", "audit", "verify", str(state.directory)]
    clean = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert clean.returncode == 0 and "intact" in clean.stdout
    with sqlite3.connect(state.audit_path) as db:
        db.execute("UPDATE audit SET details = replace(details, 'used', 'usde') WHERE seq = 3")
    tampered = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert tampered.returncode == 1
    assert "entry 3" in tampered.stdout


def test_node_init_check_and_budget_from_the_cli(federation_data, keys, tmp_path) -> None:
    def fedrisk(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    node_dir = tmp_path / "node"
    data_file = federation_data.files[0]
    made = fedrisk("node", "init", "--dir", str(node_dir), "--hospital", "st-marys", "--data", str(data_file),
                   "--key", str(keys.hospital_context), "--budget", f"{PURPOSE}=3")
    assert made.returncode == 0, made.stderr
    assert (node_dir / "pseudonym.key").stat().st_mode & 0o077 == 0
    again = fedrisk("node", "init", "--dir", str(node_dir), "--hospital", "st-marys", "--data", str(data_file),
                    "--key", str(keys.hospital_context), "--budget", f"{PURPOSE}=3")
    assert again.returncode == 2 and "already" in again.stderr
    budget = fedrisk("node", "budget", "--dir", str(node_dir))
    assert budget.returncode == 0 and "spent epsilon 0.0000 of 3" in budget.stdout
    checked = fedrisk("node", "check", str(data_file))
    assert checked.returncode == 0 and "records, valid" in checked.stdout
    broken = tmp_path / "broken.parquet"
    pd.read_parquet(data_file).drop(columns=["hba1c"]).to_parquet(broken)
    listing = sorted(p.name for p in tmp_path.iterdir())
    refused = fedrisk("node", "check", str(broken))
    assert refused.returncode == 2 and "hba1c" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
