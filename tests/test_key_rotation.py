"""Key rotation keeps the federation working, as the hospitals' operators carry it out on sealed
nodes (secrets encrypted at rest): a node's new contribution signing key is refused by the other
hospitals until the federation re-enrols it, then the federation trains with all three again; the
federation's new CKKS key, installed at every node, and a hospital's new pseudonym key train end to
end, while the old key's server context and a checkpoint made under the old key are refused before
any round."""

from __future__ import annotations

from pathlib import Path

import pytest

from clients.keys import retired_ckks_keys
from clients.node import HospitalNode
from clients.node_state import NodeState
from engines.provisioning import provision_nodes
from engines.simulation import simulate
from federation import sealing
from federation.config import RunConfig
from federation.errors import ConfigError, KeyMaterialError
from server.checkpoint import Checkpoint

PURPOSE = "credit-risk-research"
pytestmark = pytest.mark.slow


def _cli(*argv: str) -> int:
    from cli.main import main

    return main(list(argv))


def _dropped(state: NodeState) -> list[dict]:
    return [e.details for e in state.audit().entries() if e.action == "decryption.dropped"]


def _config(nodes_dir: Path, keys_dir: Path, run_dir: Path) -> RunConfig:
    return RunConfig(nodes_dir=str(nodes_dir), keys_dir=str(keys_dir), run_dir=str(run_dir), num_hospitals=3,
                     rounds=1, target_epsilon=1.0)


def test_signing_and_ckks_key_rotations_keep_a_sealed_federation_training(federation_data, tmp_path, monkeypatch,
                                                                          capsys) -> None:
    at_rest = tmp_path / "operator" / "at-rest.key"
    at_rest.parent.mkdir()
    assert _cli("node", "seal-key", "--out", str(at_rest)) == 0
    monkeypatch.setenv(sealing.KEY_FILE_ENV, str(at_rest))
    assert _cli("keys", "init", "--out", str(tmp_path / "keys-v1")) == 0
    nodes_dir = tmp_path / "nodes"
    nodes = provision_nodes(federation_data.files[0].parent, tmp_path / "keys-v1" / "hospital.ckks", nodes_dir,
                            purposes={PURPOSE: (50.0, 1e-5)})
    assert all(n.sealed and sealing.is_sealed(n.key_file.read_bytes()) for n in nodes)

    # 1. hospital_01 rotates its contribution signing key; the others still hold its old public key
    capsys.readouterr()
    assert _cli("node", "rotate", "signing-key", "--dir", str(nodes[1].directory), "--reason", "scheduled") == 0
    assert '"signing_key"' in capsys.readouterr().out
    assert sealing.is_sealed((nodes[1].directory / "signing.key").read_bytes())
    simulate(_config(nodes_dir, tmp_path / "keys-v1", tmp_path / "run-before-enrol"))
    dropped = _dropped(nodes[0])
    assert dropped and {d["hospital"] for d in dropped} == {"hospital_01"}
    assert all("does not verify" in d["reason"] for d in dropped)

    # 2. re-enrolled, every hospital's contribution counts again
    assert _cli("node", "enrol", *(str(n.directory) for n in nodes)) == 0
    result = simulate(_config(nodes_dir, tmp_path / "keys-v1", tmp_path / "run-enrolled"))
    assert len(_dropped(nodes[0])) == len(dropped)
    assert sorted(result.contributors[1]) == ["hospital_00", "hospital_01", "hospital_02"]

    # a run under the old key has a checkpoint: its census was made under keys-v1
    assert _cli("keys", "init", "--out", str(tmp_path / "keys-v2")) == 0
    stale = _config(nodes_dir, tmp_path / "keys-v2", tmp_path / "run-stale")
    census = [HospitalNode(stale, state).census("stale", "") for state in nodes]
    Path(stale.run_dir).mkdir()
    Checkpoint(run_id="stale", fingerprint=stale.fingerprint(), completed_round=1, census=census,
               chain={1: census}).save(Path(stale.run_dir))

    # 3. the federation's CKKS key is rotated: every hospital installs keys-v2, the old one is destroyed
    old_id = nodes[0].hospital_key().key_id
    for node in nodes:
        assert _cli("node", "rotate", "ckks", "--dir", str(node.directory), "--key-file",
                    str(tmp_path / "keys-v2" / "hospital.ckks"), "--reason", "annual rotation") == 0
        assert retired_ckks_keys(node) == [old_id]
        assert sealing.is_sealed(node.key_file.read_bytes())
    assert _cli("node", "rotate", "ckks", "--dir", str(nodes[0].directory), "--key-file",
                str(tmp_path / "keys-v2" / "hospital.ckks"), "--reason", "again") == 2
    assert "already has" in capsys.readouterr().err
    with pytest.raises(KeyMaterialError, match="not the federation's key"):
        simulate(_config(nodes_dir, tmp_path / "keys-v1", tmp_path / "run-old-key"))
    with pytest.raises(ConfigError, match="retired for the federation's key"):
        simulate(stale)
    assert not (tmp_path / "run-old-key").exists()

    # 4. hospital_02 re-keys its pseudonyms: nothing outside the node changes, the federation trains on
    pseudonym = nodes[2].pseudonym_key().pseudonym("patient-1")
    assert _cli("node", "rotate", "pseudonym", "--dir", str(nodes[2].directory), "--reason", "scheduled") == 0
    assert nodes[2].pseudonym_key().pseudonym("patient-1") != pseudonym
    result = simulate(_config(nodes_dir, tmp_path / "keys-v2", tmp_path / "run-new-key"))
    assert sorted(result.contributors[1]) == ["hospital_00", "hospital_01", "hospital_02"]
    assert len(_dropped(nodes[0])) == len(dropped)
    assert all(NodeState.load(n.directory).manifest().federation != old_id for n in nodes)
    actions = [e.details.get("key") for e in nodes[1].audit().entries() if e.action == "node.key-rotate"]
    assert actions == ["contribution-signing", "ckks"]
    assert [e.details.get("key") for e in nodes[2].audit().entries() if e.action == "node.key-rotate"] == [
        "ckks", "pseudonym"]
    assert all(n.audit().verify().ok for n in nodes)
