"""The signals service against its own /openapi.json, fuzzed by schemathesis: for every operation
and for a key of each role, generated requests never get a 5xx, and every response (status,
content type, headers, body) conforms to the published schema.

The service is a real `fedrisk serve` process on loopback, over a registry holding one release
(with its DP evaluation) and one approved cohort table, so the read paths return real bodies.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup

from experiments import signals_local as local
from federation.query import load_query
from server.signals.auth import ROLE_BANK, ROLE_DATA_SCIENTIST, ROLES, KeyStore
from server.signals.trail import RequestTrail

REPO = Path(__file__).resolve().parents[1]
EXAMPLES_PER_OPERATION = 8
NEGATIVE_EXAMPLES = 3
QUERY = REPO / "experiments" / "queries" / "delinquency_by_age_insurance.yaml"
CONFIG = schemathesis.Config.from_dict({"checks": {"positive_data_acceptance": {"expected-statuses": [
    # A schema-valid request may still be refused on its meaning, which no schema can state: a grant
    # string that is not a signed grant, a table that does not match its query (400), a release
    # that was withdrawn (410). Everything else a valid request can get is schemathesis' default.
    "2xx", "400", "401", "403", "404", "409", "410", "429"]}}})


@dataclass(frozen=True)
class Live:
    """The running service and one API key per role."""

    base_url: str
    keys: dict[str, str]
    db: Path


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, signals_federation) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("signals-schema")
    hospital = local.build_hospital(root / "hospital", signals_federation)
    local.create_release(root / "registry", hospital, signals_federation.runs[0])
    db = root / "service" / "signals.sqlite"
    store = KeyStore(db)
    keys = {role: store.add(role, f"fuzz-{role}", bank="bank-a" if role == ROLE_BANK else None,
                            hospital="hospital_00" if role == "hospital-operator" else None)[1] for role in ROLES}
    service = local.start_signals_service(db, root / "registry", root / "logs")
    try:
        query = load_query(str(QUERY))
        from server.analytics import QueryResult, estimate, write_result

        layout = query.layout()
        table = estimate(query, [200.0, 30.0] * ((layout.length - 1) // 2), query.noise_multiplier(), 1)
        files = write_result(QueryResult(query, "fuzz-table", table, ["hospital_00"], query.noise_multiplier(),
                                         query.epsilon), root / "fuzz-table.csv")
        approved = httpx.post(f"{service.base_url}/v1/cohorts", headers={"X-API-Key": keys[ROLE_DATA_SCIENTIST]},
                              json={"result": json.loads(files[1].read_text()), "table_csv": files[0].read_text()})
        assert approved.status_code == 201, approved.text
        yield Live(service.base_url, keys, db)
    finally:
        service.stop()


def _fuzz(operation: schemathesis.APIOperation, mode: GenerationMode, keys: dict[str, str], examples: int) -> None:
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        for key in keys.values():  # every role: allowed ones get answers, the others 403, all as documented
            case.call_and_validate(headers={"X-API-Key": key})

    run()


def test_no_server_errors_and_responses_match_the_schema(live: Live) -> None:
    schema = schemathesis.openapi.from_url(f"{live.base_url}/openapi.json", config=CONFIG)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14  # every endpoint of the service is in the schema
    failures = []
    for operation in operations:
        for mode, examples in ((GenerationMode.POSITIVE, EXAMPLES_PER_OPERATION), (GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES)):
            try:
                _fuzz(operation, mode, live.keys, examples)
            except Unsatisfiable:  # no parameter to break (e.g. /v1/health): nothing negative to send
                continue
            except (AssertionError, FailureGroup) as failure:  # collect every operation's failures
                failures.append(f"{operation.label} ({mode.value}): {failure}")
    assert not failures, "\n\n".join(failures)


def test_the_fuzzing_left_an_intact_audit_chain(live: Live) -> None:
    """Runs after the fuzzing (file order): thousands of odd requests, each audited, chain intact."""
    trail = RequestTrail(live.db.with_name("signals_audit.sqlite"))
    result = trail.verify()
    assert result.ok, result.problems
    assert result.entries > 100
    assert not any(key.encode() in trail.log.path.read_bytes() for key in live.keys.values())
