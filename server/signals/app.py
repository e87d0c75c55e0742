"""The bank-facing signals service: `make_app(settings)` builds the FastAPI application.

Every route declares the roles that may call it (`x-roles` in /openapi.json, enforced by one
dependency): a caller whose role is not listed gets 403, whatever the route. A middleware in
front of all routes authenticates the API key, applies the caller's rate limit (429 with
Retry-After) and audits the request once it is answered: principal, role, method, route
template and status, plus what a score request touched (never a token, grant or key).

Run it with `fedrisk serve` (uvicorn on localhost by default).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response, Security
from fastapi import Path as PathParam
from fastapi.dependencies.utils import get_flat_dependant
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from starlette.concurrency import run_in_threadpool
from starlette.routing import Match

from federation.errors import FedriskError
from server.signals import dashboard
from server.signals.auth import (
    DEFAULT_BURST,
    DEFAULT_RATE_PER_SECOND,
    ROLE_AUDITOR,
    ROLE_BANK,
    ROLE_DATA_SCIENTIST,
    ROLE_HOSPITAL,
    ROLES,
    KeyStore,
    Principal,
    RateLimiter,
)
from server.releases import STATUS_ACTIVE
from server.signals.catalogue import ReleaseCatalogue, ReleaseGone, ReleaseNotFound
from server.signals.cohorts import (
    COHORT_ID_PATTERN,
    CohortConflict,
    CohortStore,
)
from server.signals.hospitals import HospitalDirectory
from server.signals.models import (
    DEFAULT_AUDIT_LIMIT,
    MAX_AUDIT_LIMIT,
    RELEASE_ID_PATTERN,
    AuditRecord,
    AuditReport,
    CohortApproval,
    CohortDetail,
    CohortSummary,
    ErrorDetail,
    Health,
    PrincipalView,
    RoutedRequest,
    ScoreRequest,
    ScoreResponse,
    WithdrawRequest,
)
from server.signals.release_models import (
    Certificate,
    ModelCardView,
    ReleaseDetail,
    ReleaseSummary,
)
from server.signals.scores import (
    DEFAULT_HOSPITAL_TIMEOUT_S,
    MAX_DETAIL_CHARS,
    ScoreContext,
    ScoreRefused,
    ScoreRouter,
    release_states,
)
from server.signals.trail import UNMATCHED, RequestTrail, entry_view

API_KEY_HEADER = "X-API-Key"
SIGNALS_DB = "signals.sqlite"
SIGNALS_AUDIT = "signals_audit.sqlite"
READERS = (ROLE_BANK, ROLE_DATA_SCIENTIST, ROLE_AUDITOR)
SECURITY_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                    "X-Frame-Options": "DENY"}
"""On every response: nothing cached (answers are per key), no MIME sniffing, no referrer, no framing."""
EVERYONE = ROLES
_api_key = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                        description="an API key made with `fedrisk serve keys add` (fr_...)")


@dataclass(frozen=True)
class ServiceSettings:
    """Where the service keeps its state and how it limits callers.

    db: `signals.sqlite` (principals, hospitals, approved cohorts); audit: the request audit log
    (default `signals_audit.sqlite` beside db); registry_dir, tracking_uri and registry_uri:
    the release registry (`server.releases.ReleaseRegistry`; the CLI gives its workspace's store); rate_per_second and burst: each caller's
    token bucket; hospital_timeout_s: how long a hospital may take to score; hospital_ca: a PEM bundle
    of the CAs whose certificates hospitals' HTTPS scoring endpoints may present (empty: the
    system's trust store).
    """

    db: Path
    registry_dir: Path
    tracking_uri: str = ""
    registry_uri: str = ""
    audit: Path | None = None
    rate_per_second: float = DEFAULT_RATE_PER_SECOND
    burst: int = DEFAULT_BURST
    hospital_timeout_s: float = DEFAULT_HOSPITAL_TIMEOUT_S
    hospital_ca: str = ""

    @property
    def audit_path(self) -> Path:
        return self.audit or Path(self.db).with_name(SIGNALS_AUDIT)


def _errors(*statuses: int, html: bool = False) -> dict[int | str, dict[str, Any]]:
    """Documented refusals, all `ErrorDetail` JSON. On an HTML route FastAPI would document them
    as text/html, so there the JSON content is spelled out (ErrorDetail is in the components
    because the JSON routes use it as a model)."""
    if html:
        content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorDetail"}}}
        return {status: {"description": "refused", "content": content} for status in statuses}
    return {status: {"model": ErrorDetail} for status in statuses}


def allow(*roles: str, errors: tuple[int, ...] = (), html: bool = False) -> dict[str, Any]:
    """Route options admitting only `roles`: the enforcing dependency, the `x-roles` the OpenAPI
    document publishes, the API key security scheme, and the refusals it may answer with
    (400 for an unknown query parameter, 401, 403, 429, and `errors`; `html`: the route itself
    answers HTML)."""
    async def require(request: Request, _key: Annotated[str | None, Security(_api_key)] = None) -> None:
        principal: Principal | None = request.state.principal
        if principal is None:
            raise HTTPException(401, f"an API key is required: send it in the {API_KEY_HEADER} header",
                                headers={"WWW-Authenticate": "ApiKey"})
        if principal.role not in roles:
            raise HTTPException(403, f"a {principal.role} key may not call this endpoint")
        unknown = sorted(set(request.query_params) - _query_names(request.scope["route"]))
        if unknown:  # a misspelt parameter must not silently fall back to its default
            raise HTTPException(400, f"unknown query parameter {unknown[0][:40]!r}")

    return {"dependencies": [Depends(require)], "openapi_extra": {"x-roles": list(roles)},
            "responses": _errors(400, 401, 403, 429, *errors, html=html)}


def _query_names(route: APIRoute) -> frozenset[str]:
    """The query parameters a route declares."""
    return frozenset(p.alias for p in get_flat_dependant(route.dependant).query_params)


def route_roles(route: APIRoute) -> list[str]:
    """The roles a route admits (empty for public routes)."""
    return list((route.openapi_extra or {}).get("x-roles", []))


def _endpoint(app: FastAPI, request: Request) -> str:
    """The route template a request was (or would have been) routed to; never the raw path,
    which is caller-chosen text."""
    route = request.scope.get("route")
    if isinstance(route, APIRoute):
        return route.path
    for candidate in app.router.routes:  # refused before routing (401, 429): find it the same way
        if candidate.matches(request.scope)[0] == Match.FULL:
            return str(getattr(candidate, "path", UNMATCHED))
    return UNMATCHED


def _principal(request: Request) -> Principal:
    return request.state.principal


Caller = Annotated[Principal, Depends(_principal)]
Limit = Annotated[int, Query(ge=1, le=MAX_AUDIT_LIMIT, description="newest entries to return")]
ReleaseId = Annotated[str, PathParam(pattern=RELEASE_ID_PATTERN, description="a release id, e.g. r3")]
CohortId = Annotated[str, PathParam(pattern=COHORT_ID_PATTERN, description="a cohort table's run id")]


def _with_node_states(summary: ReleaseSummary, nodes: dict[str, dict[str, str] | None]) -> ReleaseSummary:
    """`summary` with each registered hospital's state of the release (`ScoreRouter.node_states`;
    withdrawn at the registry: no hospital may score with it, whatever a node says)."""
    states = release_states(nodes, summary.release_id)
    scorable = summary.status == STATUS_ACTIVE and any(v == "active" for v in states.values())
    return summary.model_copy(update={"at_hospitals": states, "scorable": scorable})


def make_app(settings: ServiceSettings) -> FastAPI:
    """The service over the state `settings` names (created on first use). A process given an
    at-rest key refuses a state directory that is not sealed (`federation.sealing.check_keyed`)."""
    from federation.sealing import check_keyed

    check_keyed(Path(settings.db).parent, f"fedrisk serve seal --db {settings.db}")
    keys = KeyStore(Path(settings.db))
    hospitals = HospitalDirectory(Path(settings.db))
    cohorts = CohortStore(Path(settings.db))
    trail = RequestTrail(settings.audit_path)
    limiter = RateLimiter(settings.rate_per_second, settings.burst)
    catalogue = ReleaseCatalogue(Path(settings.registry_dir), settings.tracking_uri, settings.registry_uri)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(lambda: catalogue.registry)  # open MLflow now, not on the first request
        verify: Any = True
        if settings.hospital_ca:
            import ssl

            verify = ssl.create_default_context(cafile=settings.hospital_ca)
        async with httpx.AsyncClient(timeout=settings.hospital_timeout_s, verify=verify) as client:
            app.state.router = ScoreRouter(hospitals, client)
            yield

    app = FastAPI(title="fedrisk signals service", version="1.0.0", lifespan=lifespan, docs_url=None,
                  redoc_url=None, description=(
        "Released DP credit-risk models with their privacy certificates, approved DP cohort "
        "tables, and consented applicant scores. Every request is audited."))

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable) -> Response:
        key = request.headers.get(API_KEY_HEADER)
        principal = await run_in_threadpool(keys.authenticate, key) if key else None
        request.state.principal, request.state.audit = principal, {}
        client = f"key:{principal.key_id}" if principal else f"addr:{request.client.host if request.client else '?'}"
        wait = limiter.take(client)
        if wait > 0:
            response: Response = JSONResponse({"detail": "rate limit exceeded; retry later"}, status_code=429,
                                              headers={"Retry-After": str(max(1, math.ceil(wait)))})
        elif key and principal is None:
            response = JSONResponse({"detail": "unknown or revoked API key"}, status_code=401,
                                    headers={"WWW-Authenticate": "ApiKey"})
        else:
            try:
                response = await call_next(request)
            except Exception:
                await _audit(request, 500)
                raise
        await _audit(request, response.status_code)
        for header, value in SECURITY_HEADERS.items():
            response.headers.setdefault(header, value)
        return response

    async def _audit(request: Request, status: int) -> None:
        endpoint = _endpoint(app, request)
        await run_in_threadpool(trail.record, request.state.principal, request.method, endpoint, status,
                                request.state.audit)

    # --- public ---------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html, nonce = dashboard.page()
        return HTMLResponse(html, headers={"Content-Security-Policy": dashboard.content_security_policy(nonce)})

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> HTMLResponse:
        html, nonce = dashboard.api_reference(app.openapi())
        return HTMLResponse(html, headers={"Content-Security-Policy": dashboard.content_security_policy(nonce)})

    @app.get("/v1/health", response_model=Health, tags=["service"])
    async def health() -> Health:
        """Liveness (no key needed)."""
        return Health(status="ok")

    @app.get("/v1/me", response_model=PrincipalView, tags=["service"], **allow(*EVERYONE))
    async def me(caller: Caller) -> PrincipalView:
        """Who the key belongs to: label, role, and the bank or hospital it is bound to."""
        return PrincipalView(key_id=caller.key_id, label=caller.label, role=caller.role,
                             bank=caller.bank, hospital=caller.hospital)

    @app.get("/dashboard/panels", response_class=HTMLResponse, tags=["dashboard"], **allow(*EVERYONE, html=True))
    async def panels(caller: Caller) -> HTMLResponse:
        """The caller's dashboard, as an HTML fragment with inline SVG charts."""
        html = await run_in_threadpool(dashboard.panels, caller, catalogue, cohorts, trail)
        return HTMLResponse(html)

    # --- releases -------------------------------------------------------------------------------
    def _release(request: Request, caller: Principal, release_id: str) -> Any:
        request.state.audit["release"] = release_id
        try:
            return catalogue.get(release_id, for_bank=caller.role == ROLE_BANK)
        except ReleaseNotFound:
            raise HTTPException(404, f"no release {release_id}") from None
        except ReleaseGone:
            raise HTTPException(410, f"release {release_id} was withdrawn and is no longer served") from None

    @app.get("/v1/releases", response_model=list[ReleaseSummary], tags=["releases"], **allow(*READERS))
    async def list_releases(request: Request, caller: Caller) -> list[ReleaseSummary]:
        """Active releases (a bank never sees a withdrawn one); other readers see every status. Each
        says where it can score now: its state at every registered hospital, as the node reports it."""
        views = await run_in_threadpool(catalogue.list, for_bank=caller.role == ROLE_BANK)
        nodes = await request.app.state.router.node_states() if views else {}
        return [_with_node_states(v.summary(), nodes) for v in views]

    @app.get("/v1/releases/{release_id}", response_model=ReleaseDetail, tags=["releases"], **allow(*READERS, errors=(404, 410)))
    async def get_release(release_id: ReleaseId, request: Request, caller: Caller) -> ReleaseDetail:
        """A release with its privacy certificate and model card (410 for a bank once withdrawn), and
        its state at every registered hospital."""
        view = await run_in_threadpool(_release, request, caller, release_id)
        summary = _with_node_states(view.summary(), await request.app.state.router.node_states())
        return view.detail().model_copy(update={"at_hospitals": summary.at_hospitals, "scorable": summary.scorable})

    @app.get("/v1/releases/{release_id}/certificate", response_model=Certificate, tags=["releases"],
             **allow(*READERS, errors=(404, 410)))
    def get_certificate(release_id: ReleaseId, request: Request, caller: Caller) -> Certificate:
        """The release's privacy certificate: epsilon and delta per patient, per hospital's DP-SGD spend."""
        return _release(request, caller, release_id).certificate

    @app.get("/v1/releases/{release_id}/model-card", response_model=ModelCardView, tags=["releases"],
             **allow(*READERS, errors=(404, 410)))
    def get_model_card(release_id: ReleaseId, request: Request, caller: Caller) -> ModelCardView:
        """The release's model card: intended use, federated AUC and Brier, DP calibration and fairness."""
        return _release(request, caller, release_id).card

    @app.post("/v1/releases/{release_id}/withdraw", response_model=ReleaseSummary, tags=["releases"],
              **allow(ROLE_DATA_SCIENTIST, errors=(404, 409)))
    def withdraw_release(release_id: ReleaseId, body: WithdrawRequest, request: Request, caller: Caller) -> ReleaseSummary:
        """Stop serving a release at once (scores with it are refused from the next request)."""
        request.state.audit["release"] = release_id
        try:
            return catalogue.withdraw(release_id, by=caller.label, reason=body.reason).summary()
        except ReleaseNotFound:
            raise HTTPException(404, f"no release {release_id}") from None
        except ReleaseGone:
            raise HTTPException(409, f"release {release_id} is already withdrawn") from None

    # --- cohorts --------------------------------------------------------------------------------
    @app.get("/v1/cohorts", response_model=list[CohortSummary], tags=["cohorts"], **allow(*READERS))
    def list_cohorts() -> list[CohortSummary]:
        """Approved DP cohort tables (nothing unapproved is ever listed)."""
        return [CohortSummary(**c.summary()) for c in cohorts.list()]

    @app.get("/v1/cohorts/{cohort_id}", response_model=CohortDetail, tags=["cohorts"], **allow(*READERS, errors=(404,)))
    def get_cohort(cohort_id: CohortId) -> CohortDetail:
        """One approved table: its query, privacy statement and rows (suppressed rows carry no values)."""
        cohort = cohorts.get(cohort_id)
        if cohort is None:
            raise HTTPException(404, f"no approved cohort table {cohort_id}")
        return CohortDetail(**cohort.summary(), query=cohort.query, privacy=cohort.privacy, columns=cohort.columns,
                            table=cohort.rows, note=cohort.note)

    @app.post("/v1/cohorts", response_model=CohortSummary, status_code=201, tags=["cohorts"], **allow(ROLE_DATA_SCIENTIST, errors=(409,)))
    def approve_cohort(body: CohortApproval, caller: Caller) -> CohortSummary:
        """Approve a DP query result for release to banks (checked against its query first)."""
        try:
            cohort = cohorts.approve(dict(body.result), body.table_csv, caller.label, body.note)
        except CohortConflict as exc:
            raise HTTPException(409, str(exc)) from None
        except FedriskError as exc:  # CohortRefused, or a QueryError: the result's query is invalid
            raise HTTPException(400, " ".join(str(exc).split())[:MAX_DETAIL_CHARS]) from None
        return CohortSummary(**cohort.summary())

    # --- scores ---------------------------------------------------------------------------------
    @app.post("/v1/scores", response_model=ScoreResponse, tags=["scores"], **allow(ROLE_BANK, errors=(404, 409, 410, 502, 504)))
    async def score(body: ScoreRequest, request: Request, caller: Caller) -> Any:
        """Score a consenting applicant with the release their grant names: the grant is checked here,
        then at the issuing hospital, which counts its few uses (403 once spent) and limits each
        grant's rate (429 with Retry-After). The probability comes rounded to 0.01; reasons are
        categories, weightiest first, with no magnitudes."""
        context = ScoreContext()
        request.state.audit["release"] = body.release
        try:
            try:
                await run_in_threadpool(catalogue.get, body.release, for_bank=True)
            except ReleaseNotFound:
                context.kind = "unknown-release"
                raise ScoreRefused(404, f"no release {body.release}") from None
            except ReleaseGone:
                context.kind = "withdrawn-release"
                raise ScoreRefused(410, f"release {body.release} was withdrawn; scores with it are refused") from None
            result = await request.app.state.router.score(body.grant, caller.bank or "", body.release, context)
        except ScoreRefused as refusal:
            context.reason = refusal.reason
            headers = {"Retry-After": str(refusal.retry_after)} if refusal.retry_after is not None else None
            return JSONResponse({"detail": refusal.reason}, status_code=refusal.status, headers=headers)
        finally:
            request.state.audit.update(context.details())
        return ScoreResponse(probability=result.probability, band=result.band, reasons=result.reasons,
                             release=result.release)

    # --- audit ----------------------------------------------------------------------------------
    @app.get("/v1/audit/mine", response_model=list[AuditRecord], tags=["audit"], **allow(*EVERYONE))
    def my_audit(caller: Caller, limit: Limit = DEFAULT_AUDIT_LIMIT) -> list[AuditRecord]:
        """The caller's own requests, newest first."""
        return [AuditRecord(**entry_view(e)) for e in trail.entries(key_id=caller.key_id, limit=limit)]

    @app.get("/v1/hospital/requests", response_model=list[RoutedRequest], tags=["audit"], **allow(ROLE_HOSPITAL))
    def hospital_requests(caller: Caller, limit: Limit = DEFAULT_AUDIT_LIMIT) -> list[RoutedRequest]:
        """Score requests routed to the operator's hospital, newest first."""
        views = [entry_view(e) for e in trail.entries(hospital=caller.hospital, limit=limit)]
        return [RoutedRequest(**{k: v[k] for k in RoutedRequest.model_fields}) for v in views]

    @app.get("/v1/audit", response_model=AuditReport, tags=["audit"], **allow(ROLE_AUDITOR))
    def full_audit(limit: Limit = DEFAULT_AUDIT_LIMIT) -> AuditReport:
        """The whole service audit log (newest entries), with the chain verified end to end."""
        result = trail.verify()
        return AuditReport(verification={"ok": result.ok, "entries": result.entries, "problems": result.problems},
                           entries=[AuditRecord(**entry_view(e)) for e in trail.entries(limit=limit)])

    return app
