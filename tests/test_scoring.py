"""Consented scoring at a hospital node: the score is the released model on the patient's record,
rounded to 0.01, reasons are the categories of its largest occlusion contributions (no magnitudes),
and revocations and withdrawals apply at once; over HTTP in-process (TestClient) and through a real
`fedrisk node serve` process. The bank is played as an attacker trying to monitor an applicant: a
grant used past its uses, with another release, after its expiry, concurrently or too often is
refused, and every refusal is audited at the node."""

from __future__ import annotations

import base64
import json
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from fastapi.testclient import TestClient

from clients.node_state import NodeState
from clients.scoring import (
    DAMAGED_RELEASE,
    NO_CONSENT,
    REASON_CATEGORIES,
    WITHDRAWN_RELEASE,
    ConsentedScorer,
    ReasonCode,
    ScoringRefused,
)
from clients.scoring_service import hash_service_token, make_app
from engines.provisioning import provision_nodes
from experiments.synthetic import synthesize
from federation import features as fx
from cli.main import EXIT_USER_ERROR, main
from federation.he_codec import init_keys
from federation.model import initial_weights, load_model, predict_proba, weights_digest
from privacy.grants import (
    RATE_LIMITED,
    REVOKED,
    TOKEN_PREFIX,
    USED_UP,
    WRONG_RELEASE,
    GrantRefused,
    peek_payload,
    verify_signature,
)

BANK, RELEASE, OTHER_RELEASE = "bank-a", "r1", "r2"
SERVICE_TOKEN = "service-secret"
AUTH = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
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
    for release in (RELEASE, OTHER_RELEASE):
        assert main(["node", "release", "install", "--dir", str(state.directory), "--release-dir", str(release_dir),
                     "--release-id", release]) == 0
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


def _issue(capsys: pytest.CaptureFixture[str], fed: Federation, record_key: str, bank: str = BANK,
           release: str = RELEASE, *options: str) -> str:
    code, token, err = _cli(capsys, "node", "grant", "issue", "--dir", str(fed.state.directory),
                            "--record-key", record_key, "--bank", bank, "--release", release, *options)
    assert code == 0, err
    return token


def _app(fed: Federation, **kwargs: float) -> TestClient:
    """The node's scoring app in process (the real handlers), with its own scorer."""
    return TestClient(make_app(fed.state.directory, hash_service_token(SERVICE_TOKEN), **kwargs))


def _post(client: TestClient, token: str, release: str = RELEASE) -> httpx.Response:
    return client.post("/v1/score", json={"grant": token, "bank": BANK, "release": release}, headers=AUTH)


def _assert_node_refused(fed: Federation, kind: str, record_key: str) -> None:
    """The node's last audit entry is a grant refusal of `kind`, with no pseudonym in the log."""
    last = fed.state.audit().entries()[-1]
    assert (last.action, last.details["kind"]) == ("grant.refused", kind)
    assert fed.state.pseudonym_key().pseudonym(record_key).encode() not in fed.state.audit_path.read_bytes()


def _assert_category_reasons(reasons: list[dict]) -> None:
    """Each reason is a category and its fixed phrase: nothing a magnitude could hide in."""
    for reason in reasons:
        assert set(reason) == {"feature", "phrase"}
        assert reason["phrase"] == REASON_CATEGORIES[reason["feature"]][0]


def _assert_two_decimals(probability: float) -> None:
    assert probability == round(probability, 2) and 0.0 <= probability <= 1.0


def test_score_is_the_released_model_on_the_patients_record(fed: Federation,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    record_key = next(k for k in fed.export.loc[fed.export["consent_applicant_scoring"], fx.RECORD_KEY]
                      if sum(c > 0 for c in _expected(fed, k)[1].values()) >= 3)
    expected_p, contributions = _expected(fed, record_key)
    token = _issue(capsys, fed, record_key)
    assert record_key not in token

    score = ConsentedScorer(fed.state).score(token, BANK, RELEASE)

    _assert_two_decimals(score.probability)  # rounded at the node, to the nearest 0.01
    assert abs(score.probability - expected_p) <= 0.005 + 1e-6
    # the band is that of the rounded probability the bank sees, so the two never disagree
    assert score.band == ("low" if score.probability < 0.10 else "medium" if score.probability < 0.30 else "high")
    top = sorted(((c, g) for g, c in contributions.items() if c > 0), reverse=True)[:3]
    assert [r.feature for r in score.reasons] == [g for _, g in top]  # order only: no magnitudes
    assert [f.name for f in fields(ReasonCode)] == ["feature", "phrase"]
    _assert_category_reasons([{"feature": r.feature, "phrase": r.phrase} for r in score.reasons])
    assert all(r.feature not in WITHHELD_FOR_SCORING for r in score.reasons)
    conditions = [c.replace("_", " ") for c in fx.CHRONIC_CONDITIONS] + ["cancer", "diabetes", "heart", "kidney"]
    assert not any(word in r.phrase.lower() for r in score.reasons for word in conditions)  # never disclosed

    last = fed.state.audit().entries()[-1]
    assert last.action == "score.grant-use" and last.purpose == "applicant-scoring"
    assert set(last.details) == {"grant", "bank", "release", "uses-left"}
    assert (last.details["release"], last.details["uses-left"]) == (RELEASE, 0)
    pseudonym = fed.state.pseudonym_key().pseudonym(record_key)
    assert pseudonym.encode() not in fed.state.audit_path.read_bytes()


def test_no_grant_without_applicant_scoring_consent(fed: Federation, capsys: pytest.CaptureFixture[str]) -> None:
    record_key = str(fed.export.loc[~fed.export["consent_applicant_scoring"], fx.RECORD_KEY].iloc[0])
    code, out, err = _cli(capsys, "node", "grant", "issue", "--dir", str(fed.state.directory),
                          "--record-key", record_key, "--bank", BANK, "--release", RELEASE)
    assert code == EXIT_USER_ERROR and out == ""
    assert "consent for applicant-scoring does not hold" in err and "\n" not in err and record_key not in err


@pytest.mark.parametrize(("options", "words"), [
    (("--uses", "11"), "1 to 10 uses"), (("--uses", "0"), "1 to 10 uses"),
    (("--hours", "721"), "1 to 720 hours"), (("--days", "31"), "--days: a grant lasts 1 to 30 days"),
    (("--days", "365"), "1 to 30 days"), (("--release", "r9"), "release r9 is not installed")])
def test_grants_longer_or_wider_than_the_caps_are_not_issued(fed: Federation, capsys: pytest.CaptureFixture[str],
                                                              options: tuple[str, ...], words: str) -> None:
    before = len(fed.state.audit().entries())
    code, out, err = _cli(capsys, "node", "grant", "issue", "--dir", str(fed.state.directory), "--record-key",
                          _consenting(fed), "--bank", BANK, *(() if "--release" in options else ("--release", RELEASE)),
                          *options)
    assert code == EXIT_USER_ERROR and out == "" and words in err and "\n" not in err
    assert len(fed.state.audit().entries()) == before  # nothing issued


def test_consent_revocation_and_grant_revocation_apply_to_the_next_request(
        fed: Federation, capsys: pytest.CaptureFixture[str]) -> None:
    scorer = ConsentedScorer(fed.state, grant_interval_s=0)  # warm caches must not hide a revocation
    first, second = _consenting(fed, 1), _consenting(fed, 2)
    token, other = (_issue(capsys, fed, key, BANK, RELEASE, "--uses", "2") for key in (first, second))
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

    # what the operator can list afterwards: the grants by state, the withdrawal, the installed
    # release, and the audit trail of both revocations, never a record key or a full pseudonym
    node = str(fed.state.directory)
    code, out, _ = _cli(capsys, "node", "grant", "list", "--dir", node, "--state", "revoked")
    assert code == 0 and grant_id in out and f"bank {BANK}" in out and "uses 1/2" in out
    assert peek_payload(token).grant_id not in out  # still active, filtered out
    code, out, _ = _cli(capsys, "node", "revocations", "--dir", node, "--record-key", first)
    assert code == 0 and "1 consent withdrawal(s)" in out and "applicant-scoring" in out
    assert _cli(capsys, "node", "revocations", "--dir", node, "--record-key", second)[1].startswith(
        f"{fed.state.hospital}: 0 consent withdrawal(s)")
    code, out, _ = _cli(capsys, "node", "release", "list", "--dir", node)
    assert code == 0 and f"{RELEASE}" in out
    code, out, _ = _cli(capsys, "audit", "show", node, "--action", "consent.revoke", "--action", "grant.revoke",
                        "--csv", "-")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("seq,time_utc") and len(lines) >= 3
    assert {"consent.revoke", "grant.revoke"} <= {line.split(",")[3] for line in lines[1:]}
    for listing in (out, _cli(capsys, "node", "grant", "list", "--dir", node)[1]):
        assert first not in listing and second not in listing

    # a withdrawal entered for the wrong patient is undone, on record, and the record scores again at once
    restore = ("node", "restore", "--dir", node, "--record-key", first, "--purpose", "applicant-scoring",
               "--reason", "withdrawal entered for the wrong patient")
    assert _cli(capsys, *restore)[0] == 0
    assert scorer.score(token, BANK, RELEASE).release_id == RELEASE
    code, _, err = _cli(capsys, *restore)
    assert code == 2 and "nothing to undo" in err
    code, out, _ = _cli(capsys, "node", "revocations", "--dir", node, "--record-key", first)
    assert "0 consent withdrawal(s) in force; 2 event(s)" in out and "restored" in out and "withdrawn" in out
    code, out, _ = _cli(capsys, "audit", "show", node, "--action", "consent.restore")
    assert code == 0 and "wrong patient" in out and first not in out


def test_withdrawn_or_tampered_release_is_refused_at_once(fed: Federation, capsys: pytest.CaptureFixture[str],
                                                          tmp_path: Path) -> None:
    node, patient = str(fed.state.directory), _consenting(fed, 3)
    scorer = ConsentedScorer(fed.state, grant_interval_s=0)  # each grant is used twice here, back to back
    assert _cli(capsys, "node", "release", "install", "--dir", node, "--release-dir", str(fed.release_dir),
                "--release-id", "r5")[0] == 0
    token = _issue(capsys, fed, patient, BANK, "r5", "--uses", "2")
    scorer.score(token, BANK, "r5")

    assert _cli(capsys, "node", "release", "withdraw", "--dir", node, "--release-id", "r5")[0] == 0
    with pytest.raises(ScoringRefused, match="r5 is withdrawn") as refused:
        scorer.score(token, BANK, "r5")
    assert refused.value.kind == WITHDRAWN_RELEASE
    code, _, err = _cli(capsys, "node", "release", "install", "--dir", node, "--release-dir", str(fed.release_dir),
                        "--release-id", "r5")
    assert code == EXIT_USER_ERROR and "already installed" in err
    code, _, err = _cli(capsys, "node", "grant", "issue", "--dir", node, "--record-key", patient, "--bank", BANK,
                        "--release", "r5")
    assert code == EXIT_USER_ERROR and "no grant issued: release r5 is withdrawn" in err
    assert scorer.score(_issue(capsys, fed, patient), BANK, RELEASE).release_id == RELEASE

    tampered = _write_release(tmp_path / "tampered", fed.weights)
    np.savez(tampered / "model.npz", weights=fed.weights * 1.01, model="mlp", n_features=40)
    code, _, err = _cli(capsys, "node", "release", "install", "--dir", node, "--release-dir", str(tampered),
                        "--release-id", "r3")
    assert code == EXIT_USER_ERROR and "does not match its model.sha256" in err and "\n" not in err

    # Weights swapped on disk after installation: refused at the next request, not served.
    assert _cli(capsys, "node", "release", "install", "--dir", node, "--release-dir", str(fed.release_dir),
                "--release-id", "r4")[0] == 0
    token = _issue(capsys, fed, patient, BANK, "r4", "--uses", "2")
    scorer.score(token, BANK, "r4")
    np.savez(fed.state.directory / "releases" / "r4" / "model.npz", weights=fed.weights * 1.01, model="mlp",
             n_features=40)
    with pytest.raises(ScoringRefused, match="r4 fails its integrity check") as damaged:
        scorer.score(token, BANK, "r4")
    assert damaged.value.kind == DAMAGED_RELEASE


def test_http_service_in_process(fed: Federation, capsys: pytest.CaptureFixture[str]) -> None:
    record_key = _consenting(fed, 4)
    token = _issue(capsys, fed, record_key)
    client = _app(fed)
    auth = AUTH
    body = {"grant": token, "bank": BANK, "release": RELEASE}

    ok = client.post("/v1/score", json=body, headers=auth)
    assert ok.status_code == 200
    assert set(ok.json()) == {"probability", "band", "reasons", "release"}
    _assert_two_decimals(ok.json()["probability"])
    assert abs(ok.json()["probability"] - _expected(fed, record_key)[0]) <= 0.005 + 1e-6
    _assert_category_reasons(ok.json()["reasons"])

    refusals = [(body, {}, 401, "service token"), (body, {"Authorization": "Bearer wrong"}, 401, "service token"),
                ({**body, "bank": "bank-b"}, auth, 403, "another bank"), ({**body, "grant": "x"}, auth, 400, "malformed"),
                ({**body, "release": "nope"}, auth, 403, "covers release r1, not nope"),
                ({**body, "release": "../r1"}, auth, 422, "release"), ({"grant": token}, auth, 422, "bank"),
                (body, auth, 403, "used up")]
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
    assert set(schema["components"]["schemas"]["Reason"]["properties"]) == {"feature", "phrase"}
    assert "429" in responses


# --- the bank as an attacker: re-scoring an applicant to follow their health --------------------

def test_a_grant_used_past_its_uses_is_refused(fed: Federation, capsys: pytest.CaptureFixture[str]) -> None:
    record_key = _consenting(fed, 6)
    token = _issue(capsys, fed, record_key, BANK, RELEASE, "--uses", "3", "--hours", "2")
    assert peek_payload(token).uses == 3
    client = _app(fed, grant_interval_s=0)  # the node's rate limit off: only the count stands in the way
    answers = [_post(client, token) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 403]
    assert answers[-1].json() == {"detail": "grant refused: used up (it allowed 3 scores)"}
    _assert_node_refused(fed, USED_UP, record_key)
    assert _post(_app(fed, grant_interval_s=0), token).status_code == 403  # a fresh process knows it too
    uses = [e for e in fed.state.audit().entries() if e.action == "score.grant-use"][-3:]
    assert [e.details["uses-left"] for e in uses] == [2, 1, 0]


def test_a_grant_for_one_release_is_refused_with_another(fed: Federation, capsys: pytest.CaptureFixture[str]) -> None:
    record_key = _consenting(fed, 7)
    token = _issue(capsys, fed, record_key)  # for r1; r2 is installed and active too
    client = _app(fed)
    refused = _post(client, token, OTHER_RELEASE)
    assert refused.status_code == 403
    assert refused.json() == {"detail": "grant refused: the grant covers release r1, not r2"}
    _assert_node_refused(fed, WRONG_RELEASE, record_key)
    assert fed.state.audit().entries()[-1].details["release"] == OTHER_RELEASE
    assert _post(client, token).status_code == 200  # the refusal spent nothing


def _backdated(fed: Federation, token: str) -> str:
    """The same grant as if issued two days ago for one day: its record at the node is moved back
    and the token re-signed with the node's own key (time passing, without waiting for it)."""
    p = peek_payload(token)
    when = datetime.now(UTC) - timedelta(days=2)
    stamp = lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
    payload = {"grant": p.grant_id, "hospital": p.hospital, "bank": p.bank, "purpose": p.purpose,
               "release": p.release, "uses": p.uses, "issued": stamp(when), "expires": stamp(when + timedelta(days=1))}
    with sqlite3.connect(fed.state.directory / "grants.sqlite") as db:
        db.execute("UPDATE grants SET issued = ?, expires = ? WHERE grant_id = ?",
                   (payload["issued"], payload["expires"], p.grant_id))
    key = load_pem_private_key((fed.state.directory / "grant_signing.key").read_bytes(), password=None)
    body = base64.urlsafe_b64encode(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())
    signing_input = f"{TOKEN_PREFIX}.{body.rstrip(b'=').decode()}"
    return f"{signing_input}.{base64.urlsafe_b64encode(key.sign(signing_input.encode())).rstrip(b'=').decode()}"


def test_a_grant_past_its_expiry_is_refused(fed: Federation, capsys: pytest.CaptureFixture[str]) -> None:
    record_key = _consenting(fed, 8)
    token = _issue(capsys, fed, record_key, BANK, RELEASE, "--uses", "2")
    client = _app(fed)
    assert _post(client, token).status_code == 200
    expired = _backdated(fed, token)
    refused = _post(client, expired)
    assert refused.status_code == 403 and refused.json()["detail"].startswith("grant refused: expired on ")
    _assert_node_refused(fed, "expired", record_key)
    assert _post(client, token).status_code == 403  # the original token no longer matches the record: forged


@pytest.mark.parametrize(("uses", "interval", "winners"), [(1, 60.0, 1), (3, 0.0, 3)])
def test_concurrent_requests_with_one_grant_get_exactly_its_uses(fed: Federation, capsys: pytest.CaptureFixture[str],
                                                                 uses: int, interval: float, winners: int) -> None:
    """Racers released together by a barrier, each through its own app (as separate node workers
    would be): exactly `winners` scores come back, every other request is refused and audited."""
    racers = 8
    record_key = _consenting(fed, 9)
    token = _issue(capsys, fed, record_key, BANK, RELEASE, "--uses", str(uses))
    clients = [_app(fed, grant_interval_s=interval) for _ in range(racers)]
    warm = _issue(capsys, fed, record_key)
    assert _post(clients[0], warm).status_code == 200  # records and model loaded: the race is the grant's
    node_before = len(fed.state.audit().entries())
    barrier, lock, statuses = threading.Barrier(racers), threading.Lock(), []

    def race(client: TestClient) -> None:
        barrier.wait()
        status = _post(client, token).status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=race, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert sorted(statuses) == [200] * winners + [403] * (racers - winners)
    entries = fed.state.audit().entries()[node_before:]
    assert sum(e.action == "score.grant-use" for e in entries) == winners
    assert [e.details["kind"] for e in entries if e.action == "grant.refused"] == [USED_UP] * (racers - winners)


def test_the_per_grant_rate_limit_refuses_a_second_immediate_request(
        fed: Federation, capsys: pytest.CaptureFixture[str]) -> None:
    record_key = _consenting(fed, 10)
    token = _issue(capsys, fed, record_key, BANK, RELEASE, "--uses", "2")
    sibling = _issue(capsys, fed, record_key, BANK, RELEASE, "--uses", "2")
    client = _app(fed)  # the default: one score per grant per minute
    assert _post(client, token).status_code == 200
    limited = _post(_app(fed), token)  # another worker of the node: the limit is in grants.sqlite
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert "used less than 60 s ago" in limited.json()["detail"]
    _assert_node_refused(fed, RATE_LIMITED, record_key)
    assert _post(client, sibling).status_code == 200  # per grant: another grant is not held up


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_real_uvicorn_process(fed: Federation, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    token_file = tmp_path / "service.token"
    code, service_token, _ = _cli(capsys, "node", "service-token", "--token-file", str(token_file))
    assert code == 0 and hash_service_token(service_token) in token_file.read_text()
    record_key = _consenting(fed, 5)
    grant = _issue(capsys, fed, record_key, BANK, RELEASE, "--uses", "2")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "node", "serve", "--dir", str(fed.state.directory),
         "--port", str(port), "--token-file", str(token_file), "--grant-interval", "0"],
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
        auth = {"Authorization": f"Bearer {service_token}"}
        scored = [httpx.post(f"{base}/v1/score", json=body, headers=auth) for _ in range(3)]
        assert [s.status_code for s in scored] == [200, 200, 403], scored[-1].text  # --grant-interval 0, --uses 2
        assert abs(scored[0].json()["probability"] - _expected(fed, record_key)[0]) <= 0.005 + 1e-6
        assert scored[0].json() == scored[1].json() and scored[0].json()["release"] == RELEASE
        assert "used up" in scored[2].json()["detail"]
        assert httpx.post(f"{base}/v1/score", json=body).status_code == 401
    finally:
        server.terminate()
        server.wait(timeout=15)
