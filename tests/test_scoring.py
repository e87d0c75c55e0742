"""Consented scoring at a hospital node: the score is the released model on the patient's record,
reasons are its largest occlusion contributions, and revocations and withdrawals apply at once;
over HTTP in-process (TestClient) and through a real `fedrisk node serve` process."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from clients.node_state import NodeState
from clients.scoring import (
    REASON_CATEGORIES,
    DAMAGED_RELEASE,
    NO_CONSENT,
    WITHDRAWN_RELEASE,
    ConsentedScorer,
    ScoringRefused,
)
from clients.scoring_service import hash_service_token, make_app
from experiments.provision import provision_nodes
from experiments.synthetic import synthesize
from federation import features as fx
from federation.cli import EXIT_USER_ERROR, main
from federation.he_codec import init_keys
from federation.model import initial_weights, load_model, predict_proba, weights_digest
from privacy.grants import REVOKED, GrantRefused, peek_payload, verify_signature

BANK, RELEASE = "bank-a", "r1"
PURPOSES = {"credit-risk-research": (10.0, 1e-5), "applicant-scoring": (10.0, 1e-5)}
WITHHELD_FOR_SCORING = ("depression", "substance_use")  # psych-social: released for research only
AGE_BAND = 10  # the shipped schema generalises age to 10-year bands
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Federation:
    state: NodeState
    export: pd.DataFrame
    release_dir: Path
    weights: np.ndarray


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.strip(), err.strip()


def _write_release(directory: Path, weights: np.ndarray) -> Path:
    """A release in the format of a training run's `<run>/release/` (server/tracking.py)."""
    directory.mkdir(parents=True)
    np.savez(directory / "model.npz", weights=weights.astype(np.float32), model="mlp", n_features=40)
    (directory / "model.sha256").write_text(weights_digest(weights) + "\n")
    return directory


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    root = tmp_path_factory.mktemp("scoring")
    report = synthesize(3, 3000, root / "data", seed=5)
    keys = init_keys(root / "keys")
    state = provision_nodes(root / "data", keys.hospital_context, root / "nodes", purposes=PURPOSES)[0]
    start = initial_weights("mlp", 3, 40)
    weights = (start + np.random.default_rng(3).normal(0.0, 0.3, start.size)).astype(np.float32)
    release_dir = _write_release(root / "run" / "release", weights)
    assert main(["node", "release", "install", "--dir", str(state.directory), "--release-dir", str(release_dir),
                 "--release-id", RELEASE]) == 0
    return Federation(state, pd.read_parquet(report.files[0]), release_dir, weights)


def _expected(fed: Federation, record_key: str) -> tuple[float, dict[str, float]]:
    """Independently of clients.scoring: the patient's row from the export, generalised and with
    the withheld columns at the reference as the schema says, through the released model; and
    the occlusion contribution of every feature group."""
    row = fed.export.loc[fed.export[fx.RECORD_KEY] == record_key].copy()
    row["age"] = (row["age"] // AGE_BAND) * AGE_BAND
    for column in WITHHELD_FOR_SCORING:
        row[column] = False
    x = fx.encode_features(row)
    model = load_model("mlp", fed.weights)
    groups = {category: [fx.FEATURE_NAMES.index(name) for name in names]
              for category, (_, names) in REASON_CATEGORIES.items()}
    p = float(predict_proba(model, x)[0])
    contributions = {}
    for group, columns in groups.items():
        occluded = x.copy()
        occluded[0, columns] = 0.0
        contributions[group] = p - float(predict_proba(model, occluded)[0])
    return p, contributions


def _consenting(fed: Federation, skip: int = 0) -> str:
    return str(fed.export.loc[fed.export["consent_applicant_scoring"], fx.RECORD_KEY].iloc[skip])


def _issue(capsys: pytest.CaptureFixture[str], fed: Federation, record_key: str, bank: str = BANK) -> str:
    code, token, _ = _cli(capsys, "node", "grant", "issue", "--dir", str(fed.state.directory),
                          "--record-key", record_key, "--bank", bank)
    assert code == 0
    return token


def test_score_is_the_released_model_on_the_patients_record(fed: Federation,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    record_key = next(k for k in fed.export.loc[fed.export["consent_applicant_scoring"], fx.RECORD_KEY]
                      if sum(c > 0 for c in _expected(fed, k)[1].values()) >= 3)
    expected_p, contributions = _expected(fed, record_key)
    token = _issue(capsys, fed, record_key)
    assert record_key not in token

    score = ConsentedScorer(fed.state).score(token, BANK, RELEASE)

    assert score.probability == pytest.approx(expected_p, abs=1e-6)
    assert score.band == ("low" if expected_p < 0.10 else "medium" if expected_p < 0.30 else "high")
    top = sorted(((c, g) for g, c in contributions.items() if c > 0), reverse=True)[:3]
    assert [r.feature for r in score.reasons] == [g for _, g in top]
    assert [r.contribution for r in score.reasons] == pytest.approx([c for c, _ in top], abs=1e-6)
    assert all(r.phrase and r.feature not in WITHHELD_FOR_SCORING for r in score.reasons)
    conditions = [c.replace("_", " ") for c in fx.CHRONIC_CONDITIONS] + ["cancer", "diabetes", "heart", "kidney"]
    assert not any(word in r.phrase.lower() for r in score.reasons for word in conditions)  # never disclosed

    last = fed.state.audit().entries()[-1]
    assert last.action == "score.grant-use" and last.purpose == "applicant-scoring"
    assert set(last.details) == {"grant", "bank", "release"} and last.details["release"] == RELEASE
    pseudonym = fed.state.pseudonym_key().pseudonym(record_key)
    assert pseudonym.encode() not in fed.state.audit_path.read_bytes()


def test_no_grant_without_applicant_scoring_consent(fed: Federation, capsys: pytest.CaptureFixture[str]) -> None:
    record_key = str(fed.export.loc[~fed.export["consent_applicant_scoring"], fx.RECORD_KEY].iloc[0])
    code, out, err = _cli(capsys, "node", "grant", "issue", "--dir", str(fed.state.directory),
                          "--record-key", record_key, "--bank", BANK)
    assert code == EXIT_USER_ERROR and out == ""
    assert "consent for applicant-scoring does not hold" in err and "\n" not in err and record_key not in err


def test_consent_revocation_and_grant_revocation_apply_to_the_next_request(
        fed: Federation, capsys: pytest.CaptureFixture[str]) -> None:
    scorer = ConsentedScorer(fed.state)  # warm caches must not hide a revocation
    first, second = _consenting(fed, 1), _consenting(fed, 2)
    token, other = _issue(capsys, fed, first), _issue(capsys, fed, second)
    scorer.score(token, BANK, RELEASE)
    scorer.score(other, BANK, RELEASE)

    assert _cli(capsys, "node", "revoke", "--dir", str(fed.state.directory), "--record-key", first,
                "--purpose", "applicant-scoring")[0] == 0
    with pytest.raises(ScoringRefused, match="withdrew consent") as refused:
        scorer.score(token, BANK, RELEASE)
    assert refused.value.kind == NO_CONSENT
    last = fed.state.audit().entries()[-1]
    assert last.action == "score.refused" and last.details["kind"] == NO_CONSENT

    grant_id = peek_payload(other).grant_id
    assert _cli(capsys, "node", "grant", "revoke", "--dir", str(fed.state.directory), "--grant", grant_id)[0] == 0
    with pytest.raises(GrantRefused) as refused_grant:
        scorer.score(other, BANK, RELEASE)
    assert refused_grant.value.kind == REVOKED
    assert fed.state.audit().entries()[-1].details["kind"] == REVOKED


def test_withdrawn_or_tampered_release_is_refused_at_once(fed: Federation, capsys: pytest.CaptureFixture[str],
                                                          tmp_path: Path) -> None:
    node = str(fed.state.directory)
    scorer = ConsentedScorer(fed.state)
    token = _issue(capsys, fed, _consenting(fed, 3))
    assert _cli(capsys, "node", "release", "install", "--dir", node, "--release-dir", str(fed.release_dir),
                "--release-id", "r2")[0] == 0
    scorer.score(token, BANK, "r2")

    assert _cli(capsys, "node", "release", "withdraw", "--dir", node, "--release-id", "r2")[0] == 0
    with pytest.raises(ScoringRefused, match="r2 is withdrawn") as refused:
        scorer.score(token, BANK, "r2")
    assert refused.value.kind == WITHDRAWN_RELEASE
    code, _, err = _cli(capsys, "node", "release", "install", "--dir", node, "--release-dir", str(fed.release_dir),
                        "--release-id", "r2")
    assert code == EXIT_USER_ERROR and "already installed" in err
    assert scorer.score(token, BANK, RELEASE).release_id == RELEASE

    tampered = _write_release(tmp_path / "tampered", fed.weights)
    np.savez(tampered / "model.npz", weights=fed.weights * 1.01, model="mlp", n_features=40)
    code, _, err = _cli(capsys, "node", "release", "install", "--dir", node, "--release-dir", str(tampered),
                        "--release-id", "r3")
    assert code == EXIT_USER_ERROR and "does not match its model.sha256" in err and "\n" not in err

    # Weights swapped on disk after installation: refused at the next request, not served.
    assert _cli(capsys, "node", "release", "install", "--dir", node, "--release-dir", str(fed.release_dir),
                "--release-id", "r4")[0] == 0
    scorer.score(token, BANK, "r4")
    np.savez(fed.state.directory / "releases" / "r4" / "model.npz", weights=fed.weights * 1.01, model="mlp",
             n_features=40)
    with pytest.raises(ScoringRefused, match="r4 fails its integrity check") as damaged:
        scorer.score(token, BANK, "r4")
    assert damaged.value.kind == DAMAGED_RELEASE


def test_http_service_in_process(fed: Federation, capsys: pytest.CaptureFixture[str]) -> None:
    record_key = _consenting(fed, 4)
    token = _issue(capsys, fed, record_key)
    client = TestClient(make_app(fed.state.directory, hash_service_token("service-secret")))
    auth = {"Authorization": "Bearer service-secret"}
    body = {"grant": token, "bank": BANK, "release": RELEASE}

    ok = client.post("/v1/score", json=body, headers=auth)
    assert ok.status_code == 200
    assert ok.json()["probability"] == pytest.approx(_expected(fed, record_key)[0], abs=1e-6)
    assert set(ok.json()) == {"probability", "band", "reasons", "release"}

    refusals = [(body, {}, 401, "service token"), (body, {"Authorization": "Bearer wrong"}, 401, "service token"),
                ({**body, "bank": "bank-b"}, auth, 403, "another bank"), ({**body, "grant": "x"}, auth, 400, "malformed"),
                ({**body, "release": "nope"}, auth, 404, "not installed"), ({"grant": token}, auth, 422, "bank")]
    for request, headers, status, words in refusals:
        response = client.post("/v1/score", json=request, headers=headers)
        assert response.status_code == status, response.text
        assert words in response.json()["detail"] and "\n" not in response.json()["detail"]
        assert "Traceback" not in response.text and record_key not in response.text

    assert client.get("/v1/health").json() == {"status": "ok", "hospital": fed.state.hospital}
    pem = client.get("/v1/grant-key").json()["public_key_pem"]
    assert verify_signature(token, pem).hospital == fed.state.hospital
    schema = client.get("/openapi.json").json()
    responses = schema["paths"]["/v1/score"]["post"]["responses"]
    assert responses["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ScoreResponse")
    assert schema["components"]["schemas"]["ScoreResponse"]["properties"]["band"]["enum"] == ["low", "medium", "high"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_real_uvicorn_process(fed: Federation, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    token_file = tmp_path / "service.token"
    code, service_token, _ = _cli(capsys, "node", "service-token", "--token-file", str(token_file))
    assert code == 0 and hash_service_token(service_token) in token_file.read_text()
    record_key = _consenting(fed, 5)
    grant = _issue(capsys, fed, record_key)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "federation.cli", "node", "serve", "--dir", str(fed.state.directory),
         "--port", str(port), "--token-file", str(token_file)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            try:
                if httpx.get(f"{base}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "scoring service did not start"
            time.sleep(0.2)
        body = {"grant": grant, "bank": BANK, "release": RELEASE}
        scored = httpx.post(f"{base}/v1/score", json=body, headers={"Authorization": f"Bearer {service_token}"})
        assert scored.status_code == 200, scored.text
        assert scored.json()["probability"] == pytest.approx(_expected(fed, record_key)[0], abs=1e-6)
        assert scored.json()["release"] == RELEASE
        assert httpx.post(f"{base}/v1/score", json=body).status_code == 401
    finally:
        server.terminate()
        server.wait(timeout=15)
