"""The hospital's scoring endpoint: consented applicant scores for the bank-facing signals service.

    POST /v1/score      {grant, bank, release} -> {probability, band, reasons, release}
                        (probability rounded to 0.01; reasons are categories and phrases only)
    GET  /v1/releases   the releases installed here and their status (service token)
    GET  /v1/health     liveness and which hospital this is
    GET  /v1/grant-key  the hospital's Ed25519 grant-verification key (PEM), public

Only the signals service calls `/v1/score`: it holds a random service token, sent as
`Authorization: Bearer <token>`; the node stores only its SHA-256 (a high-entropy random token
needs no slow hash) in a token file, compared in constant time. A refusal is a 4xx with
`{"detail": "<one line>"}` saying why (never a stack trace, pseudonym or record key):

    401 missing or wrong service token          400 malformed grant token
    403 grant forged, unknown, expired, revoked, used up, for another bank, purpose or release,
        or no consent
    404 unknown release, or the patient's record is gone     409 release withdrawn or damaged
    422 request body does not fit the schema    429 the grant was used too recently (Retry-After)
    503 the node's own export or state is unusable

Each grant allows a few scores (its `uses`), at most one per `grant_interval_s` (`fedrisk node
serve --grant-interval`, default 60 s): the node's own rate limit per grant, whatever service
or bank is asking. Counted in the node's grants.sqlite, so it holds across workers and restarts.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import secrets
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from clients import scoring
from clients.node_state import NodeState
from federation.errors import ConfigError
from privacy import grants
from privacy.grants import GrantRefused

SERVICE_TOKEN_PREFIX = "fr_node_"
SERVICE_TOKEN_BYTES = 32
"""256 bits of randomness: guessing is hopeless, so SHA-256 storage is enough."""
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8101
_HASH_LINE = re.compile(r"^sha256:([0-9a-f]{64})$")
_BEARER = HTTPBearer(auto_error=False, description="the signals service's token for this node")
ServiceCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]
"""The bearer credentials of a request, if any (FastAPI dependency; shown in the OpenAPI schema)."""

STATUS_BY_KIND: dict[str, int] = {
    grants.MALFORMED: 400, grants.FORGED: 403, grants.UNKNOWN: 403, grants.EXPIRED: 403, grants.REVOKED: 403,
    grants.WRONG_BANK: 403, grants.WRONG_PURPOSE: 403, grants.WRONG_RELEASE: 403, grants.USED_UP: 403,
    grants.RATE_LIMITED: 429, scoring.NO_CONSENT: 403,
    scoring.UNKNOWN_RELEASE: 404, scoring.NO_RECORD: 404,
    scoring.WITHDRAWN_RELEASE: 409, scoring.DAMAGED_RELEASE: 409, scoring.NODE_UNAVAILABLE: 503,
}
"""HTTP status of each refusal kind."""


# --- the service token ---------------------------------------------------------------------------

def new_service_token() -> str:
    """A fresh random service token (shown once, held only by the signals service)."""
    return SERVICE_TOKEN_PREFIX + secrets.token_urlsafe(SERVICE_TOKEN_BYTES)


def hash_service_token(token: str) -> str:
    """SHA-256 hex of a service token: what the node stores and compares."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def write_service_token_file(path: Path, token: str, *, overwrite: bool = False) -> None:
    """Store the token's hash at `path` as `sha256:<hex>` (mode 0600)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists; pass --force to replace the service token")
    tmp = path.with_name(f"{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(f"sha256:{hash_service_token(token)}\n")
    os.replace(tmp, path)


def read_service_token_file(path: Path) -> str:
    """The stored token hash; refuses a file that holds anything else (e.g. the token itself)."""
    try:
        match = _HASH_LINE.match(Path(path).read_text(encoding="ascii").strip())
    except FileNotFoundError:
        raise ConfigError(f"service token file not found: {path} (create it: fedrisk node service-token)") from None
    except (OSError, UnicodeDecodeError):
        raise ConfigError(f"cannot read service token file {path}") from None
    if match is None:
        raise ConfigError(f"{path} must hold one line 'sha256:<64 hex>' (create it: fedrisk node service-token)")
    return match.group(1)


# --- request and response models (the OpenAPI schema) --------------------------------------------

class ScoreRequest(BaseModel):
    """A consented score request, relayed by the signals service for a bank."""

    grant: str = Field(min_length=1, max_length=grants.MAX_TOKEN_CHARS, description="the applicant's grant token")
    bank: str = Field(pattern=grants.BANK_PATTERN.pattern, description="the requesting bank's id")
    release: str = Field(pattern=scoring.RELEASE_ID_PATTERN.pattern, description="installed release to score with")


class Reason(BaseModel):
    """One reason category that raised the score (occlusion against the public reference patient);
    no magnitude."""

    feature: Literal[tuple(scoring.REASON_CATEGORIES)] = Field(  # type: ignore[valid-type]
        description="reason category (a group of model inputs), e.g. late-payments")
    phrase: str = Field(description="the category's fixed words, which a loan officer can pass on")


class ScoreResponse(BaseModel):
    """A consented applicant score."""

    probability: float = Field(ge=0.0, le=1.0, description="probability of 90-day delinquency within 12 months, "
                                                            f"rounded to {scoring.PROBABILITY_DECIMALS} decimals")
    band: Literal["low", "medium", "high"] = Field(
        description=f"of the rounded probability: low < {scoring.LOW_BAND_UPPER} <= medium < "
                    f"{scoring.MEDIUM_BAND_UPPER} <= high")
    reasons: list[Reason] = Field(max_length=scoring.TOP_REASONS,
                                  description="categories that raised the score, the weightiest first")
    release: str


class Health(BaseModel):
    status: Literal["ok"]
    hospital: str


class GrantKey(BaseModel):
    hospital: str
    algorithm: Literal["Ed25519"]
    public_key_pem: str


class Problem(BaseModel):
    """Every refusal: one line."""

    detail: str


class InstalledReleaseView(BaseModel):
    """A release installed at this node and whether it may score (what the signals service shows banks)."""

    release: str
    status: str


class _Unauthorised(Exception):
    """Raised by the bearer check; turned into a 401."""


def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail}, headers=headers)


def make_app(node_dir: Path, service_token_hash: str, *,
             grant_interval_s: float = grants.DEFAULT_GRANT_INTERVAL_S) -> FastAPI:
    """The scoring app of the node at `node_dir`; `service_token_hash` is the SHA-256 hex of the
    only token `/v1/score` accepts; `grant_interval_s` the least seconds between two scores with
    one grant (0 disables the per-grant rate limit; uses stay capped)."""
    if not re.fullmatch(r"[0-9a-f]{64}", service_token_hash or ""):
        raise ConfigError("the service token hash must be 64 lowercase hex characters (SHA-256)")
    state = NodeState.load(Path(node_dir))
    try:
        scorer = scoring.ConsentedScorer(state, grant_interval_s=grant_interval_s)
    except grants.GrantError as exc:
        raise ConfigError(f"--grant-interval: {exc}") from None
    app = FastAPI(title=f"fedrisk scoring node {state.hospital}", version="1",
                  description="Consented applicant scores from one hospital node.")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and not isinstance(p, int)) or "body"
        return _problem(422, f"invalid request: {where}: {first.get('msg', 'does not fit the schema')}")

    def _service(credentials: ServiceCredentials) -> None:
        supplied = hash_service_token(credentials.credentials) if credentials else ""
        if not hmac.compare_digest(supplied, service_token_hash):
            raise _Unauthorised

    @app.exception_handler(_Unauthorised)
    async def _unauthorised(_: Request, __: _Unauthorised) -> JSONResponse:
        return _problem(401, "missing or invalid service token", {"WWW-Authenticate": "Bearer"})

    refusals = {status: {"model": Problem} for status in (400, 401, 403, 404, 409, 422, 429, 503)}

    @app.post("/v1/score", response_model=ScoreResponse, responses=refusals, dependencies=[Depends(_service)])
    def score(request: ScoreRequest) -> ScoreResponse | JSONResponse:
        """Score the applicant the grant authorises this bank to score, with an installed release."""
        try:
            result = scorer.score(request.grant, request.bank, request.release)
        except (GrantRefused, scoring.ScoringRefused) as refusal:
            wait = getattr(refusal, "retry_after", None)
            headers = {"Retry-After": str(max(1, math.ceil(wait)))} if wait is not None else None
            return _problem(STATUS_BY_KIND.get(refusal.kind, 403), str(refusal), headers)
        return ScoreResponse(probability=result.probability, band=result.band, release=result.release_id,
                             reasons=[Reason(feature=r.feature, phrase=r.phrase) for r in result.reasons])

    @app.get("/v1/releases", response_model=list[InstalledReleaseView], responses={401: {"model": Problem}},
             dependencies=[Depends(_service)])
    def releases() -> list[InstalledReleaseView]:
        """The releases installed here and their status (active or withdrawn), read now: what the
        signals service tells banks a release can still score with at this hospital."""
        return [InstalledReleaseView(release=r.release_id, status=r.status)
                for r in scoring.installed_releases(state.directory)]

    @app.get("/v1/health", response_model=Health)
    def health() -> Health:
        """Liveness: the node answers and which hospital it is."""
        return Health(status="ok", hospital=state.hospital)

    @app.get("/v1/grant-key", response_model=GrantKey)
    def grant_key() -> GrantKey:
        """The public key grant tokens from this hospital verify with."""
        return GrantKey(hospital=state.hospital, algorithm="Ed25519", public_key_pem=scorer.authority.public_key_pem())

    return app


def serve(node_dir: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token_file: Path | None = None,
          grant_interval_s: float = grants.DEFAULT_GRANT_INTERVAL_S, ssl_certfile: str | None = None,
          ssl_keyfile: str | None = None) -> None:
    """Run the node's scoring app with uvicorn until interrupted (`grant_interval_s`: see make_app),
    over TLS when given a certificate and its key (PEM)."""
    import torch
    import uvicorn

    if token_file is None:
        raise ConfigError("the scoring service needs --token-file (create it: fedrisk node service-token)")
    if bool(ssl_certfile) != bool(ssl_keyfile):
        raise ConfigError("give both --ssl-certfile and --ssl-keyfile to serve scoring over TLS")
    for flag, path in (("--ssl-certfile", ssl_certfile), ("--ssl-keyfile", ssl_keyfile)):
        if path and not Path(path).is_file():
            raise ConfigError(f"{flag} {path}: no such file")
    app = make_app(Path(node_dir), read_service_token_file(Path(token_file)), grant_interval_s=grant_interval_s)
    torch.set_num_threads(1)  # a score is one 31-row batch: extra intra-op threads only contend
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False, ssl_certfile=ssl_certfile,
                ssl_keyfile=ssl_keyfile)
