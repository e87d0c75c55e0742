"""Request and response bodies of the signals API (pydantic), so `/openapi.json` says exactly
what each endpoint accepts and returns. Request bodies refuse unknown fields (422); responses are
serialised through their models, so an answer never carries more than its model lists (a score
is exactly probability, band, reasons and release, whatever the hospital sent).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from privacy.grants import MAX_TOKEN_CHARS

RELEASE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # as the hospital node accepts (r<version>)
MAX_REASON_CHARS = 500
MAX_TABLE_CHARS = 5_000_000
MAX_AUDIT_LIMIT = 1000
DEFAULT_AUDIT_LIMIT = 100

Cell = str | float | bool | None


class Strict(BaseModel):
    """Request bodies: unknown fields are refused (422), not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    """Every refusal: one line saying why (never echoing a token or key)."""

    detail: str


class Health(BaseModel):
    status: str = Field(description="'ok' while the service answers")


class PrincipalView(BaseModel):
    """The caller, as the service knows it."""

    key_id: str = Field(description="public handle of the API key (a prefix of its hash)")
    label: str
    role: str
    bank: str | None = Field(description="bank id of a bank analyst")
    hospital: str | None = Field(description="hospital of a hospital operator")


# --- scores -------------------------------------------------------------------------------------

class ScoreRequest(Strict):
    grant: str = Field(min_length=1, max_length=MAX_TOKEN_CHARS,
                       description="the applicant's grant token, fedrisk-grant.v1.<payload>.<signature>")
    release: str = Field(pattern=RELEASE_ID_PATTERN, description="id of an active release to score with")


class ReasonCode(BaseModel):
    """A reason category, no magnitude: only the order of the reasons says which weighed more."""

    feature: str = Field(description="reason category that raised the score, e.g. late-payments")
    phrase: str = Field(description="the category's fixed words, which a loan officer can pass on")


class ScoreResponse(BaseModel):
    """Exactly what a bank learns about a consenting applicant."""

    probability: float = Field(ge=0.0, le=1.0, description="probability of 90-day delinquency, rounded to 0.01")
    band: str = Field(description="of the rounded probability: low (< 0.10), medium (< 0.30) or high")
    reasons: list[ReasonCode] = Field(description="up to 3 reason categories that raised the score, weightiest first")
    release: str


# --- cohorts ------------------------------------------------------------------------------------

class CohortApproval(Strict):
    """A query result as `server.analytics.write_result` wrote it: the JSON and the CSV text."""

    result: dict[str, object] = Field(description="the <run-id>.json: query, run-id, privacy")
    table_csv: str = Field(min_length=1, max_length=MAX_TABLE_CHARS, description="the <run-id>.csv text")
    note: str = Field(default="", max_length=MAX_REASON_CHARS, description="why it may be released")


class CohortSummary(BaseModel):
    cohort_id: str
    name: str
    purpose: str
    measure: str
    field: str | None
    group_by: list[str]
    epsilon: float
    delta: float
    hospitals: int
    rows: int
    suppressed_rows: int
    approved_by: str
    approved_at: str


class CohortDetail(CohortSummary):
    query: dict[str, object] = Field(description="the validated cohort query (federation/query.py format)")
    privacy: dict[str, object] = Field(description="the privacy statement of the DP answer")
    columns: list[str]
    table: list[dict[str, Cell]] = Field(description="rows; suppressed rows carry no values")
    note: str


# --- audit --------------------------------------------------------------------------------------

class AuditRecord(BaseModel):
    """One request as the service audited it."""

    seq: int
    ts: str
    action: str
    principal: str | None
    key_id: str | None
    role: str | None
    bank: str | None
    method: str | None
    endpoint: str | None = Field(description="route template, e.g. /v1/releases/{release_id}")
    status: int | None
    hospital: str | None
    release: str | None
    grant_ref: str | None = Field(description="SHA-256 prefix of the grant id (never the grant itself)")
    refusal: str | None = Field(description="refusal kind of a score request (forged, expired, ...)")
    reason: str | None = Field(description="the one-line refusal the caller received")
    hash: str
    prev_hash: str


class RoutedRequest(BaseModel):
    """A score request routed to the operator's hospital."""

    seq: int
    ts: str
    bank: str | None
    release: str | None
    status: int | None
    grant_ref: str | None
    refusal: str | None
    reason: str | None


class ChainVerification(BaseModel):
    ok: bool
    entries: int
    problems: list[str]


class AuditReport(BaseModel):
    verification: ChainVerification
    entries: list[AuditRecord] = Field(description="newest first")


class WithdrawRequest(Strict):
    reason: str = Field(min_length=3, max_length=MAX_REASON_CHARS, description="why serving must stop")
