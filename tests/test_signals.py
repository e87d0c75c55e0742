"""The signals service as a bank, a hospital operator, a data scientist and an auditor use it:
each role sees only its share, grants are checked before anything reaches a hospital and every
refusal is audited at the service and at the node, withdrawn releases stop at once, rate limits
answer 429, cohort tables reach banks only once approved, and keys are stored as hashes. A bank
trying to monitor an applicant by re-scoring them gets rounded scores and category reasons, and
is refused once the grant's uses are spent, with another release, or too soon (429).

Real components throughout: a provisioned synthetic hospital node running `fedrisk node serve`,
a release registered from an MLflow run, and `fedrisk serve`, each its own process on loopback.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from experiments import signals_local as local
from cli.main import EXIT_USER_ERROR, main
from federation.query import load_query
from privacy.grants import TOKEN_PREFIX, GrantAuthority, peek_payload
from server.analytics import QueryResult, estimate, write_result
from server.releases import ReleaseRegistry
from server.signals.app import ServiceSettings, make_app, route_roles
from server.signals.auth import ROLES, KeyStore, Principal
from server.signals.scores import ScoreContext, _result, grant_ref
from server.signals.trail import RequestTrail, entry_view

REPO = Path(__file__).resolve().parents[1]
BANK_A, BANK_B = "bank-a", "bank-b"
QUERY = REPO / "experiments" / "queries" / "delinquency_by_age_insurance.yaml"
BANK_ONLY_DENIED = {("POST", "/v1/cohorts"), ("POST", "/v1/releases/{release_id}/withdraw"),
                    ("GET", "/v1/hospital/requests"), ("GET", "/v1/audit")}


@dataclass
class Deployment:
    hospital: local.LocalHospital
    node: local.Service
    service: local.Service
    db: Path
    registry: Path
    keys: dict[str, str]  # label -> API key
    withdrawable: tuple[str, str]  # releases the withdrawal test withdraws (through the API; directly)

    def call(self, method: str, path: str, who: str | None, **kwargs: object) -> httpx.Response:
        headers = {"X-API-Key": self.keys[who]} if who else {}
        return httpx.request(method, f"{self.service.base_url}{path}", headers=headers, timeout=30, **kwargs)

    def score(self, who: str, grant: str, release: str = "r1") -> httpx.Response:
        return self.call("POST", "/v1/scores", who, json={"grant": grant, "release": release})

    def last_service_entry(self, who: str) -> dict:
        return self.call("GET", "/v1/audit/mine?limit=1", who).json()[0]

    def node_direct(self, grant: str, bank: str) -> httpx.Response:
        """What the node answers when asked directly (as only this service can: it holds the token)."""
        token = self.hospital.service_token_file.read_text().strip()
        return httpx.post(f"{self.node.base_url}/v1/score", json={"grant": grant, "bank": bank, "release": "r1"},
                          headers={"Authorization": f"Bearer {token}"}, timeout=30)


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory, signals_federation) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("signals")
    hospital = local.build_hospital(root / "hospital", signals_federation)
    first, *others = signals_federation.runs
    assert local.create_release(root / "registry", hospital, first) == "r1"
    withdrawable = tuple(local.create_release(root / "registry", hospital, run) for run in others)
    db = root / "service" / "signals.sqlite"
    store = KeyStore(db)
    keys = {label: store.add(role, label, bank=bank, hospital=site)[1] for label, role, bank, site in (
        ("bank-a-analyst", "bank-analyst", BANK_A, None), ("bank-b-analyst", "bank-analyst", BANK_B, None),
        ("operator-00", "hospital-operator", None, "hospital_00"),
        ("operator-99", "hospital-operator", None, "hospital_99"),
        ("dana", "data-scientist", None, None), ("audrey", "auditor", None, None))}
    node = local.start_node_service(hospital, root / "logs", wait=False)
    service = local.start_signals_service(db, root / "registry", root / "logs", wait=False)
    try:
        node.wait_ready()
        service.wait_ready()
        local.register_hospital(db, hospital, node)
        yield Deployment(hospital, node, service, db, root / "registry", keys, withdrawable)
    finally:
        service.stop()
        node.stop()


def _label_of_role(role: str) -> str:
    return {"bank-analyst": "bank-a-analyst", "hospital-operator": "operator-00", "data-scientist": "dana",
            "auditor": "audrey"}[role]


def _routes(tmp_path: Path) -> list[APIRoute]:
    app = make_app(ServiceSettings(db=tmp_path / "s.sqlite", registry_dir=tmp_path / "registry"))
    return [r for r in app.routes if isinstance(r, APIRoute) and route_roles(r)]


def test_every_route_refuses_every_role_it_does_not_list(dep: Deployment, tmp_path: Path) -> None:
    routes = _routes(tmp_path)
    assert len(routes) >= 14
    bank_denied = set()
    for route in routes:
        allowed = set(route_roles(route))
        assert allowed <= set(ROLES)
        path = route.path.replace("{release_id}", "r1").replace("{cohort_id}", "no-such-table")
        for method in route.methods:
            assert dep.call(method, path, None).status_code == 401, (method, route.path)
            for role in ROLES:
                # an empty body: a listed role gets past the role check (422 or an answer), others get 403
                response = dep.call(method, path, _label_of_role(role), json={} if method == "POST" else None)
                if role in allowed:
                    assert response.status_code not in (401, 403), (role, method, route.path, response.text)
                else:
                    assert response.status_code == 403, (role, method, route.path, response.text)
                    assert response.json() == {"detail": f"a {role} key may not call this endpoint"}
                    if role == "bank-analyst":
                        bank_denied.add((method, route.path))
    assert bank_denied == BANK_ONLY_DENIED  # every hospital-side and data-scientist endpoint, nothing else


def test_a_consented_score_comes_back_as_the_hospital_computed_it_and_nothing_more(dep: Deployment) -> None:
    grant = dep.hospital.issue(dep.hospital.consenting()[0], BANK_A)
    scored = dep.score("bank-a-analyst", grant)
    assert scored.status_code == 200, scored.text
    assert set(scored.json()) == {"probability", "band", "reasons", "release"}
    probability = scored.json()["probability"]
    assert probability == round(probability, 2)  # rounded at the node, passed on as it is
    assert scored.json()["band"] == ("low" if probability < 0.10 else "medium" if probability < 0.30 else "high")
    # reasons are categories with their fixed phrases: no magnitude, nothing numeric to follow over time
    assert all(set(r) == {"feature", "phrase"} and all(isinstance(v, str) for v in r.values())
               for r in scored.json()["reasons"])
    assert len({r["feature"] for r in scored.json()["reasons"]}) == len(scored.json()["reasons"])
    twin = dep.hospital.issue(dep.hospital.consenting()[0], BANK_A)  # the grant above is spent
    assert scored.json() == dep.node_direct(twin, BANK_A).json()  # exactly what the node computed

    grant_id = peek_payload(grant).grant_id
    entry = dep.last_service_entry("bank-a-analyst")
    assert (entry["endpoint"], entry["status"], entry["hospital"], entry["release"]) == ("/v1/scores", 200,
                                                                                         "hospital_00", "r1")
    assert entry["grant_ref"] == hashlib.sha256(grant_id.encode()).hexdigest()[:16]
    audit_bytes = dep.db.with_name("signals_audit.sqlite").read_bytes()
    assert grant.encode() not in audit_bytes and grant_id.encode() not in audit_bytes
    node_entries = [e for e in dep.hospital.state.audit().entries() if e.action == "score.grant-use"]
    assert node_entries and node_entries[-1].details["bank"] == BANK_A


def _sign(node_dir: Path, payload: dict[str, str]) -> str:
    """A token in the documented format, signed with the node's own grant key."""
    key = load_pem_private_key((node_dir / "grant_signing.key").read_bytes(), password=None)
    body = base64.urlsafe_b64encode(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())
    signing_input = f"{TOKEN_PREFIX}.{body.rstrip(b'=').decode()}"
    signature = base64.urlsafe_b64encode(key.sign(signing_input.encode())).rstrip(b"=").decode()
    return f"{signing_input}.{signature}"


def _expired(dep: Deployment) -> str:
    """A genuine grant whose expiry has passed (its record at the node says so too)."""
    grant = dep.hospital.issue(dep.hospital.consenting()[1], BANK_A, hours=1)
    p = peek_payload(grant)
    when = datetime.now(UTC) - timedelta(days=2)
    stamp = lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ")
    payload = {"grant": p.grant_id, "hospital": p.hospital, "bank": p.bank, "purpose": p.purpose,
               "release": p.release, "uses": p.uses, "issued": stamp(when), "expires": stamp(when + timedelta(hours=1))}
    with sqlite3.connect(dep.hospital.state.directory / "grants.sqlite") as db:
        db.execute("UPDATE grants SET issued = ?, expires = ? WHERE grant_id = ?",
                   (payload["issued"], payload["expires"], p.grant_id))
    return _sign(dep.hospital.state.directory, payload)


def _revoked(dep: Deployment) -> str:
    grant = dep.hospital.issue(dep.hospital.consenting()[2], BANK_A)
    assert main(["node", "grant", "revoke", "--dir", str(dep.hospital.state.directory),
                 "--grant", peek_payload(grant).grant_id]) == 0
    return grant


def _forged(dep: Deployment, tmp_path: Path, hospital: str = "hospital_00") -> str:
    """Signed by a key that is not the hospital's, in the hospital's name."""
    (tmp_path / hospital).mkdir()
    return GrantAuthority(tmp_path / hospital, hospital).issue("0" * 31 + "1", BANK_A, "r1")


def _tampered(dep: Deployment) -> str:
    """A genuine token with its payload changed (bank-b for bank-a) and the signature kept."""
    head, body, signature = dep.hospital.issue(dep.hospital.consenting()[3], BANK_A).rsplit(".", 2)
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["bank"] = BANK_B
    forged = base64.urlsafe_b64encode(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())
    return f"{head}.{forged.rstrip(b'=').decode()}.{signature}"


@pytest.mark.parametrize(("case", "caller", "status", "words", "kind", "node_kind"), [
    ("forged", "bank-a-analyst", 403, "forged token", "forged", "forged"),
    ("tampered", "bank-b-analyst", 403, "forged token", "forged", "forged"),
    ("expired", "bank-a-analyst", 403, "expired on", "expired", "expired"),
    ("revoked", "bank-a-analyst", 403, "revoked on", "hospital-403", "revoked"),
    ("wrong-bank", "bank-b-analyst", 403, "issued to another bank", "wrong-bank", "wrong-bank"),
    ("wrong-release", "bank-a-analyst", 403, "covers release r2, not r1", "wrong-release", "wrong-release"),
    ("unknown-hospital", "bank-a-analyst", 403, "does not route to", "unknown-hospital", None),
    ("malformed", "bank-a-analyst", 400, "malformed token", "malformed", "malformed"),
])
def test_bad_grants_are_refused_clearly_and_audited_at_both_ends(
        dep: Deployment, tmp_path: Path, case: str, caller: str, status: int, words: str, kind: str,
        node_kind: str | None) -> None:
    grant = {"forged": lambda: _forged(dep, tmp_path), "tampered": lambda: _tampered(dep),
             "expired": lambda: _expired(dep), "revoked": lambda: _revoked(dep),
             "wrong-bank": lambda: dep.hospital.issue(dep.hospital.consenting()[4], BANK_A),
             "wrong-release": lambda: dep.hospital.issue(dep.hospital.consenting()[4], BANK_A, "r2"),
             "unknown-hospital": lambda: _forged(dep, tmp_path, "hospital_99"),
             "malformed": lambda: "fedrisk-grant.v1.not-a-payload"}[case]()
    bank = BANK_B if caller == "bank-b-analyst" else BANK_A
    node_before = len(dep.hospital.state.audit().entries())

    refused = dep.score(caller, grant)
    assert refused.status_code == status, refused.text
    detail = refused.json()["detail"]
    assert words in detail and "\n" not in detail and grant not in detail
    assert set(refused.json()) == {"detail"}

    entry = dep.last_service_entry(caller)
    assert (entry["endpoint"], entry["status"], entry["refusal"]) == ("/v1/scores", status, kind)
    assert entry["reason"] == detail
    if case == "revoked":  # only the node knows: the service forwarded, the node refused and audited it
        node_entry = dep.hospital.state.audit().entries()[-1]
        assert (node_entry.action, node_entry.details["kind"]) == ("grant.refused", "revoked")
        return
    # refused before forwarding: the node saw nothing ...
    assert len(dep.hospital.state.audit().entries()) == node_before
    if node_kind is None:
        return
    # ... and, asked directly, it refuses the same grant for the same reason and audits it
    direct = dep.node_direct(grant, bank)
    assert direct.status_code in (400, 403) and set(direct.json()) == {"detail"}
    node_entry = dep.hospital.state.audit().entries()[-1]
    assert (node_entry.action, node_entry.details["kind"]) == ("grant.refused", node_kind)


def test_a_release_withdrawn_at_its_node_is_shown_as_not_scorable_there(dep: Deployment) -> None:
    """The hospital withdraws a release at its node (`fedrisk node release withdraw`), not at the
    registry: the service's listing follows the node instead of promising scores that all fail."""
    from clients.scoring import withdraw_release

    _, other = dep.withdrawable
    listed = {r["release_id"]: r for r in dep.call("GET", "/v1/releases", "bank-a-analyst").json()}
    assert listed["r1"]["at_hospitals"] == {"hospital_00": "active"} and listed["r1"]["scorable"] is True
    assert listed[other]["at_hospitals"] == {"hospital_00": "active"}
    grant = dep.hospital.issue(dep.hospital.consenting()[6], BANK_A, release=other)  # issued before the withdrawal
    withdraw_release(dep.hospital.state.directory, other)
    refused = dep.score("bank-a-analyst", grant, other)
    assert refused.status_code == 409 and "withdrawn" in refused.json()["detail"]
    listed = {r["release_id"]: r for r in dep.call("GET", "/v1/releases", "bank-a-analyst").json()}
    assert listed[other]["at_hospitals"] == {"hospital_00": "withdrawn"} and listed[other]["scorable"] is False
    assert listed[other]["status"] == "active"  # the registry's own state is unchanged
    detail = dep.call("GET", f"/v1/releases/{other}", "bank-a-analyst").json()
    assert detail["scorable"] is False and detail["at_hospitals"] == {"hospital_00": "withdrawn"}
    assert listed["r1"]["scorable"] is True


def test_withdrawn_release_is_gone_for_banks_at_once(dep: Deployment) -> None:
    release, other = dep.withdrawable
    grant = dep.hospital.issue(dep.hospital.consenting()[5], BANK_A)
    listed = [r["release_id"] for r in dep.call("GET", "/v1/releases", "bank-a-analyst").json()]
    assert release in listed and "r1" in listed
    assert dep.call("GET", f"/v1/releases/{release}/certificate", "bank-a-analyst").status_code == 200

    withdrawn = dep.call("POST", f"/v1/releases/{release}/withdraw", "dana", json={"reason": "superseded by r1"})
    assert withdrawn.status_code == 200 and withdrawn.json()["status"] == "withdrawn"

    assert release not in [r["release_id"] for r in dep.call("GET", "/v1/releases", "bank-a-analyst").json()]
    for suffix in ("", "/certificate", "/model-card"):
        assert dep.call("GET", f"/v1/releases/{release}{suffix}", "bank-a-analyst").status_code == 410
    refused = dep.score("bank-a-analyst", grant, release)
    assert refused.status_code == 410 and "withdrawn" in refused.json()["detail"]
    assert f'data-release="{release}"' not in dep.call("GET", "/dashboard/panels", "bank-a-analyst").text
    assert f'data-release="{release}"' in dep.call("GET", "/dashboard/panels", "dana").text
    seen = {r["release_id"]: r for r in dep.call("GET", "/v1/releases", "audrey").json()}
    assert seen[release]["status"] == "withdrawn" and seen[release]["withdrawn_reason"] == "superseded by r1"
    assert dep.call("POST", f"/v1/releases/{release}/withdraw", "dana", json={"reason": "again"}).status_code == 409
    assert dep.score("bank-a-analyst", grant).status_code == 200  # r1 still serves

    # withdrawn by another process (as `fedrisk release withdraw` does): the very next request knows
    assert dep.call("GET", f"/v1/releases/{other}", "bank-a-analyst").status_code == 200
    ReleaseRegistry("", dep.registry).withdraw(other, "dana", "found a data error")
    assert dep.call("GET", f"/v1/releases/{other}", "bank-a-analyst").status_code == 410
    assert dep.score("bank-a-analyst", grant, other).status_code == 410


def _result_files(tmp_path: Path, run_id: str = "approved-table") -> tuple[dict, str]:
    query = load_query(str(QUERY))
    cells = (query.layout().length - 1) // 2
    sums = [v for i in range(cells) for v in ((5.0, -1.0) if i == 0 else (200.0, -60.0))]  # cell 0: too few to publish
    table = estimate(query, sums, query.noise_multiplier(), 3)
    csv, meta = write_result(QueryResult(query, run_id, table, ["h0", "h1", "h2"],
                                         query.noise_multiplier(), query.epsilon), tmp_path / f"{run_id}.csv")
    return json.loads(meta.read_text()), csv.read_text()


def test_cohort_tables_reach_banks_only_once_approved_and_only_as_their_query_made_them(
        dep: Deployment, tmp_path: Path) -> None:
    result, csv = _result_files(tmp_path)
    assert dep.call("GET", "/v1/cohorts/approved-table", "bank-a-analyst").status_code == 404
    lines = csv.splitlines()
    tampered = {
        "extra column": "\n".join([lines[0] + ",zip3"] + [line + ",021" for line in lines[1:]]),
        "relabelled cell": csv.replace("0-9,private", "0-9,blue-cross", 1),
        "missing row": "\n".join(lines[:-1]),
    }
    for what, text in tampered.items():
        refused = dep.call("POST", "/v1/cohorts", "dana", json={"result": result, "table_csv": text})
        assert refused.status_code == 400, (what, refused.text)
    bad_query = {**result, "query": {**result["query"], "group-by": [{"national_id": ["1"]}]}}
    assert dep.call("POST", "/v1/cohorts", "dana", json={"result": bad_query, "table_csv": csv}).status_code == 400

    approved = dep.call("POST", "/v1/cohorts", "dana", json={"result": result, "table_csv": csv, "note": "reviewed"})
    assert approved.status_code == 201, approved.text
    assert dep.call("POST", "/v1/cohorts", "dana", json={"result": result, "table_csv": csv}).status_code == 409
    cohort = dep.call("GET", "/v1/cohorts/approved-table", "bank-a-analyst").json()
    assert cohort["approved_by"] == "dana" and cohort["epsilon"] == result["privacy"]["epsilon"]
    first = cohort["table"][0]
    assert first["suppressed"] is True and first["rate"] is None and first["ci95_low"] is None
    assert all(row["rate"] is not None for row in cohort["table"][1:])
    assert "approved-table" in [c["cohort_id"] for c in dep.call("GET", "/v1/cohorts", "bank-b-analyst").json()]


def test_operators_see_their_hospitals_requests_and_auditors_the_verified_log(dep: Deployment) -> None:
    dep.score("bank-a-analyst", dep.hospital.issue(dep.hospital.consenting()[6], BANK_A))
    routed = dep.call("GET", "/v1/hospital/requests", "operator-00").json()
    assert routed and {"seq", "ts", "bank", "release", "status", "grant_ref", "refusal", "reason"} == set(routed[0])
    assert routed[0]["status"] == 200 and routed[0]["bank"] == BANK_A
    assert dep.call("GET", "/v1/hospital/requests", "operator-99").json() == []
    report = dep.call("GET", "/v1/audit?limit=1000", "audrey").json()
    assert report["verification"] == {"ok": True, "entries": report["verification"]["entries"], "problems": []}
    assert {e["principal"] for e in report["entries"]} >= {"bank-a-analyst", "dana", "anonymous"}
    mine = dep.call("GET", "/v1/audit/mine?limit=1000", "bank-b-analyst").json()
    assert mine and {e["principal"] for e in mine} == {"bank-b-analyst"}


def test_tampering_with_the_service_audit_log_is_reported(dep: Deployment, tmp_path: Path) -> None:
    settings = ServiceSettings(db=tmp_path / "signals.sqlite", registry_dir=dep.registry)
    key = KeyStore(settings.db).add("auditor", "audrey")[1]
    with TestClient(make_app(settings)) as client:
        for _ in range(3):
            client.get("/v1/me", headers={"X-API-Key": key})
        with sqlite3.connect(settings.audit_path) as db:
            db.execute("UPDATE audit SET details = replace(details, '\"status\":200', '\"status\":404') WHERE seq = 2")
        report = client.get("/v1/audit", headers={"X-API-Key": key}).json()
    assert not report["verification"]["ok"]
    assert any(p.startswith("entry 2: edited") for p in report["verification"]["problems"])


def test_rate_limit_answers_429_with_retry_after_per_principal(dep: Deployment, tmp_path: Path) -> None:
    settings = ServiceSettings(db=tmp_path / "signals.sqlite", registry_dir=dep.registry,
                               rate_per_second=2.0, burst=3)
    store = KeyStore(settings.db)
    first, second = store.add("auditor", "first")[1], store.add("auditor", "second")[1]
    with TestClient(make_app(settings)) as client:
        answers = [client.get("/v1/me", headers={"X-API-Key": first}) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert int(answers[-1].headers["Retry-After"]) >= 1
        assert client.get("/v1/me", headers={"X-API-Key": second}).status_code == 200  # buckets are per principal
        time.sleep(1.1)  # two tokens back: one for this call, one for reading the log
        assert client.get("/v1/me", headers={"X-API-Key": first}).status_code == 200
        log = client.get("/v1/audit/mine", headers={"X-API-Key": first}).json()
    assert [e["status"] for e in log] == [200, 429, 200, 200, 200]  # newest first
    assert log[1]["endpoint"] == "/v1/me"


def test_keys_are_printed_once_and_stored_as_hashes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "signals.sqlite"
    assert main(["serve", "keys", "add", "--db", str(db), "--role", "bank-analyst", "--label", "acme",
                 "--bank", BANK_A]) == 0
    key, note = capsys.readouterr().out.splitlines()
    assert key.startswith("fr_") and len(key) == 35 and "cannot be shown again" in note
    assert key.encode() not in db.read_bytes() and hashlib.sha256(key.encode()).hexdigest().encode() in db.read_bytes()
    principal = KeyStore(db).authenticate(key)
    assert principal is not None and (principal.role, principal.bank) == ("bank-analyst", BANK_A)
    assert KeyStore(db).authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None

    assert main(["serve", "keys", "revoke", "--db", str(db), principal.key_id]) == 0
    assert KeyStore(db).authenticate(key) is None
    for argv, words in ((["keys", "add", "--role", "banker", "--label", "x"], "role must be one of"),
                        (["keys", "add", "--role", "bank-analyst", "--label", "x"], "--bank is required"),
                        (["keys", "add", "--role", "auditor", "--label", "555-123-4567"], "label must be")):
        capsys.readouterr()
        assert main(["serve", *argv, "--db", str(db)]) == EXIT_USER_ERROR
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err


def test_registering_a_hospital_refuses_the_wrong_files(dep: Deployment, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "signals.sqlite"
    hospital = dep.hospital
    base = ["serve", "hospitals", "add", "--db", str(db), "--hospital", "hospital_00", "--url", dep.node.base_url]
    cases = ((["--grant-key", str(hospital.grant_key_file), "--token-file", str(hospital.node_token_file)],
              "holds the token's hash"),
             (["--grant-key", str(hospital.service_token_file), "--token-file", str(hospital.service_token_file)],
              "is not a PEM public key"),
             (["--grant-key", str(hospital.grant_key_file), "--token-file", str(tmp_path / "absent")],
              "unreadable"))
    for extra, words in cases:
        capsys.readouterr()
        assert main([*base, *extra]) == EXIT_USER_ERROR
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err
    assert main([*base, "--grant-key", str(hospital.grant_key_file), "--token-file",
                 str(hospital.service_token_file)]) == 0
    # what the node's own endpoint returns, saved as it came (JSON), is accepted as it is
    import httpx

    reply = tmp_path / "grant-key.json"
    reply.write_text(httpx.get(f"{dep.node.base_url}/v1/grant-key", timeout=60).text)
    assert main([*base, "--grant-key", str(reply), "--token-file", str(hospital.service_token_file)]) == 0
    reply.write_text('{"hospital": "hospital_00"}')
    capsys.readouterr()
    assert main([*base, "--grant-key", str(reply), "--token-file", str(hospital.service_token_file)]) == EXIT_USER_ERROR
    assert "not a hospital's /v1/grant-key reply" in capsys.readouterr().err


def test_a_score_refusal_is_audited_in_full_when_its_references_are_all_digits(tmp_path: Path) -> None:
    """Key ids and grant references are hash prefixes; about one grant reference in 1,900 is all
    digits, which the audit's identifier filter reads as a card number. The entry must still say
    which grant was refused and why (a lucky draw once dropped the refusal kind in CI)."""
    grant_id = next(g for i in range(10**6) if grant_ref(g := f"{i:032x}").isdigit())
    trail = RequestTrail(tmp_path / "signals_audit.sqlite")
    principal = Principal("012345678901", "bank-a-analyst", "bank-analyst", bank=BANK_A)
    context = ScoreContext(hospital="hospital_00", grant_ref=grant_ref(grant_id), kind="hospital-403",
                           reason="hospital_00: grant refused: revoked on 2026-11-22T06:43:12Z")
    trail.record(principal, "POST", "/v1/scores", 403, {"release": "r1", **context.details()})
    view = entry_view(trail.entries(key_id=principal.key_id, limit=1)[0])
    assert (view["key_id"], view["grant_ref"], view["refusal"], view["reason"]) == (
        principal.key_id, context.grant_ref, "hospital-403", context.reason)
    assert view["grant_ref"].isdigit() and trail.verify().ok


# --- the bank as an attacker: re-scoring an applicant to follow their health --------------------

def test_a_grant_used_past_its_uses_is_refused_by_the_node_and_audited_there(dep: Deployment) -> None:
    grant = dep.hospital.issue(dep.hospital.consenting()[7], BANK_A)  # the default: one score
    assert dep.score("bank-a-analyst", grant).status_code == 200
    again = dep.score("bank-a-analyst", grant)
    assert again.status_code == 403
    assert again.json() == {"detail": "hospital_00: grant refused: used up (it allowed 1 score)"}
    entry = dep.last_service_entry("bank-a-analyst")
    assert (entry["status"], entry["refusal"], entry["reason"]) == (403, "hospital-403", again.json()["detail"])
    node_entry = dep.hospital.state.audit().entries()[-1]
    assert (node_entry.action, node_entry.details["kind"]) == ("grant.refused", "used-up")


def test_concurrent_requests_with_a_one_use_grant_give_exactly_one_score(dep: Deployment) -> None:
    racers = 6
    grant = dep.hospital.issue(dep.hospital.consenting()[8], BANK_A)
    assert dep.score("bank-a-analyst", dep.hospital.issue(dep.hospital.consenting()[8], BANK_A)).status_code == 200
    barrier, lock, answers = threading.Barrier(racers), threading.Lock(), []

    def race() -> None:
        barrier.wait()
        answer = dep.score("bank-a-analyst", grant)
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert sorted(a.status_code for a in answers) == [200] + [403] * (racers - 1)
    assert all("used up" in a.json()["detail"] for a in answers if a.status_code == 403)
    grant_id = peek_payload(grant).grant_id
    with sqlite3.connect(dep.hospital.state.directory / "grants.sqlite") as db:
        assert db.execute("SELECT uses_spent FROM grants WHERE grant_id = ?", (grant_id,)).fetchone() == (1,)


def test_the_nodes_per_grant_rate_limit_answers_429_with_retry_after_at_the_service(dep: Deployment) -> None:
    grant = dep.hospital.issue(dep.hospital.consenting()[9], BANK_A, uses=2)
    assert dep.score("bank-a-analyst", grant).status_code == 200
    limited = dep.score("bank-a-analyst", grant)  # the bank's key has plenty of its own rate left
    assert limited.status_code == 429, limited.text
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert "used less than 60 s ago" in limited.json()["detail"]
    entry = dep.last_service_entry("bank-a-analyst")
    assert (entry["status"], entry["refusal"]) == (429, "hospital-429")
    node_entry = dep.hospital.state.audit().entries()[-1]
    assert (node_entry.action, node_entry.details["kind"]) == ("grant.refused", "rate-limited")
    with sqlite3.connect(dep.hospital.state.directory / "grants.sqlite") as db:  # the refusal spent nothing
        assert db.execute("SELECT uses_spent FROM grants WHERE grant_id = ?",
                          (peek_payload(grant).grant_id,)).fetchone() == (1,)


def test_the_service_passes_on_no_node_answer_finer_than_the_contract() -> None:
    """A node running older code (exact probabilities, signed contributions) is not relayed: the
    bank would get a 502, never the magnitudes."""
    good = {"probability": 0.12, "band": "medium", "release": "r1",
            "reasons": [{"feature": "late-payments", "phrase": "Late payments on medical bills"}]}
    assert _result(good, "r1").reasons == good["reasons"] and _result(good, "r1").probability == 0.12
    for bad in ({**good, "probability": 0.1234},
                {**good, "reasons": [{**good["reasons"][0], "contribution": 0.05}]},
                {**good, "reasons": [{"feature": "late-payments", "phrase": 0.05}]}):
        with pytest.raises(ValueError):
            _result(bad, "r1")


def test_a_bank_scores_a_batch_each_row_with_its_own_grant(dep: Deployment, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`fedrisk bank score`: CSV in, CSV out, one request per row; a refused row carries its reason
    and the batch goes on; the output never holds a grant."""
    import csv

    consenting = dep.hospital.consenting()
    good = [dep.hospital.issue(consenting[i], BANK_A) for i in (3, 4)]
    foreign = dep.hospital.issue(consenting[5], BANK_B)  # another bank's grant
    batch = tmp_path / "applicants.csv"
    with open(batch, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["reference", "grant"])
        writer.writerows([["app-1", good[0]], ["app-2", foreign], ["app-3", good[1]], ["app-4", good[0]]])
    key_file = tmp_path / "bank-a.key"
    key_file.write_text(dep.keys["bank-a-analyst"] + "\n")
    out = tmp_path / "scores.csv"
    argv = ["bank", "score", "--service", dep.service.base_url, "--key-file", str(key_file),
            "--input", str(batch), "--output", str(out), "--release", "r1"]
    assert main(argv) == 0
    assert "2 scored, 2 refused" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out, newline="")))
    assert [r["reference"] for r in rows] == ["app-1", "app-2", "app-3", "app-4"]
    assert [r["status"] for r in rows] == ["scored", "refused", "scored", "refused"]  # app-4: a spent one-use grant
    assert rows[0]["band"] in ("low", "medium", "high") and 0.0 <= float(rows[0]["probability"]) <= 1.0
    assert rows[1]["http_status"] == "403" and rows[1]["error"]
    text = out.read_text()
    assert all(g not in text for g in (*good, foreign))  # grants are credentials: never written out
    assert main(argv) == EXIT_USER_ERROR and "exists" in capsys.readouterr().err  # never overwrites
    (tmp_path / "wrong.key").write_text("fr_" + "x" * 32)
    cut = tmp_path / "cut.csv"
    assert main([*argv[:4], "--key-file", str(tmp_path / "wrong.key"), "--input", str(batch), "--output", str(cut),
                 "--release", "r1"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "stopped after 0 of 4 rows" in err and "API key (401)" in err and not cut.exists()
    assert (tmp_path / "cut.csv.partial").read_text().startswith("row,reference")  # kept: rows done stay done
    assert main(["bank", "score", "--service", "http://signals.example", "--key-file", str(key_file),
                 "--input", str(batch), "--output", str(tmp_path / "plain.csv")]) == EXIT_USER_ERROR
    assert "would travel unencrypted" in capsys.readouterr().err
    batch.write_text("reference,token\napp-1,x\n")
    assert main([*argv[:-4], "--input", str(batch), "--output", str(tmp_path / "new.csv")]) == EXIT_USER_ERROR
    assert "needs a 'grant' column" in capsys.readouterr().err and not (tmp_path / "new.csv").exists()


def test_a_score_travels_to_a_hospital_over_tls(tmp_path: Path, signals_federation) -> None:
    """`fedrisk node serve --ssl-certfile/--ssl-keyfile` and `fedrisk serve --hospital-ca`: the
    service reaches the node's scoring endpoint over HTTPS, checking its certificate; a client
    that does not trust the CA, or speaks plain HTTP, gets nothing from the node."""
    from engines.credentials import init_credentials

    creds = init_credentials(tmp_path / "certs", ["hospital_00"], ["127.0.0.1"], days=2)
    hospital = local.build_hospital(tmp_path / "hospital", signals_federation)
    assert local.create_release(tmp_path / "registry", hospital, signals_federation.runs[0]) == "r1"
    db = tmp_path / "service" / "signals.sqlite"
    key = KeyStore(db).add("bank-analyst", "bank-a-analyst", bank=BANK_A)[1]
    node = local.start_node_service(hospital, tmp_path / "logs", wait=False,
                                    tls=(creds.superlink_certificate, creds.superlink_key, creds.ca_certificate))
    service = local.start_signals_service(db, tmp_path / "registry", tmp_path / "logs", wait=False,
                                          hospital_ca=creds.ca_certificate)
    try:
        node.wait_ready()
        service.wait_ready()
        assert node.base_url.startswith("https://")
        local.register_hospital(db, hospital, node)
        grant = hospital.issue(hospital.consenting()[0], BANK_A)
        scored = httpx.post(f"{service.base_url}/v1/scores", headers={"X-API-Key": key},
                            json={"grant": grant, "release": "r1"}, timeout=60)
        assert scored.status_code == 200, scored.text
        with pytest.raises(httpx.ConnectError):  # the test CA is nobody else's trust anchor
            httpx.get(f"{node.base_url}/v1/health", timeout=30)
        with pytest.raises(httpx.TransportError):
            httpx.get(node.base_url.replace("https://", "http://") + "/v1/health", timeout=30)
    finally:
        service.stop()
        node.stop()


# --- the dashboard as its readers read it ----------------------------------------------------------

def _article(html: str, kind: str, ident: str) -> str:
    found = re.search(rf'<article class="{kind}" data-{kind}="{re.escape(ident)}">.*?</article>', html, flags=re.S)
    assert found, (kind, ident)
    return found.group(0)


def test_the_dashboard_pages_speak_plain_words_and_explain_their_numbers(dep: Deployment, tmp_path: Path) -> None:
    """The pages the service serves, as a bank analyst, an auditor and a hospital operator read them:
    no raw field or HE parameter names and no raw timestamps in the first reading (the exact values
    stay under "Technical details"); ε explained beside each guarantee; each risk band's range and
    observed rate; how a score may be used; hidden cohort cells saying why; no one-bar chart."""
    from federation.model import RISK_BANDS
    from server.signals import dashboard
    from tests.test_dashboard_wording import RAW_NAMES, primary

    result, csv = _result_files(tmp_path, "wording-table")
    assert dep.call("POST", "/v1/cohorts", "dana", json={"result": result, "table_csv": csv}).status_code == 201
    html = dep.call("GET", "/dashboard/panels", "bank-a-analyst").text
    text = primary(html)
    for name in RAW_NAMES:
        assert name not in text, name
    assert "(max_k" not in text and "poly_modulus_degree" in html  # folded away, not lost
    assert not re.search(r"\d{2}:\d{2}:\d{2}", text) and not re.search(r"\d{4}-\d{2}-\d{2}T\d{2}", text)
    assert re.search(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC", text)

    detail = dep.call("GET", "/v1/releases/r1", "bank-a-analyst").json()
    certificate, card = detail["certificate"], detail["model_card"]
    release = primary(_article(html, "release", "r1"))
    assert f"Privacy guarantee ε = {certificate['epsilon_max']:.3g} per patient" in release
    assert dashboard.EPSILON_MEANING in release
    assert "Encryption used for aggregation CKKS, 2,048 slots per encrypted message, 128-bit security" in release
    assert f"Released {dashboard.plain_time(certificate['issued'])}" in release
    assert f"Intended use {card['intended_use']}" in release
    assert dashboard.BAND_MEANING in release
    for name, low, high in RISK_BANDS:
        assert f"{name} a score {dashboard.band_range(low, high)}" in release
    for band in card["bands"]:
        if band["held_to_range"] and band["observed_rate"] is not None:
            assert f"{band['observed_rate'] * 100:.0f}% had the outcome" in release
    assert "must not be the sole basis of an adverse decision" in release and "not a diagnosis" in release

    cohort = primary(_article(html, "cohort", "wording-table"))
    assert "suppressed" not in cohort.lower()
    assert "hidden: fewer than 20 records after noise" in cohort and "so that no small group" in cohort
    assert dashboard.EPSILON_MEANING in cohort and "Share of patients with 90-day medical-bill delinquency" in cohort

    assert text.count(dashboard.AUC_MEANING) == 1
    for who, page in (("bank-a-analyst", html), ("audrey", audit_html := dep.call("GET", "/dashboard/panels",
                                                                                   "audrey").text)):
        with_auc = [r for r in dep.call("GET", "/v1/releases", who).json() if r["federated_auc"] is not None]
        assert ('data-chart="bars"' in page) == (len(with_auc) >= 2), who  # a chart only to compare releases
        if len(with_auc) == 1:
            assert f"AUC {with_auc[0]['federated_auc']:.2f} for release {with_auc[0]['release_id']}" in primary(page)
    audit = primary(audit_html)
    assert "The log is intact" in audit and "opened the dashboard (GET /dashboard/panels)" in audit
    assert not re.search(r"\d{2}:\d{2}:\d{2}", audit)
    assert dep.score("bank-a-analyst", dep.hospital.issue(dep.hospital.consenting()[10], BANK_A)).status_code == 200
    routed = primary(dep.call("GET", "/dashboard/panels", "operator-00").text)
    assert "scored (200)" in routed
    assert not re.search(r"\d{2}:\d{2}:\d{2}", routed)
