"""Routing a bank's score request to the hospital that issued the applicant's grant.

The service checks everything it can before any request leaves it:
1. the token parses (`privacy.grants.peek_payload`) and names a registered hospital;
2. its signature verifies with that hospital's registered grant key (`verify_signature`);
3. it was issued to the caller's own bank, for `applicant-scoring`, for the release asked for,
   and has not expired.

Only then is `{grant, bank, release}` forwarded over HTTP to the hospital's scoring endpoint,
with the bearer token the hospital issued to this service. Revocation, the patient's consent, the
grant's remaining uses and its per-grant rate limit are known only at the hospital, which checks
them (with everything above again), counts and audits the use of the grant itself; its 429 comes
back to the bank with its Retry-After. The answer is reduced to exactly `{probability, band,
reasons, release}` and must keep the node's contract: a probability rounded to 0.01 and reasons
that are a category and a phrase, no number.

Every refusal is a `ScoreRefused` with an HTTP status and a one-line reason; it never quotes the
token. The service audits by `grant_ref`, a digest of the grant id: the issuing hospital can
match it to its own records, while the service's log holds no usable grant.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from starlette.concurrency import run_in_threadpool

from federation.model import RISK_BANDS
from privacy.audit import Digest
from privacy.grants import (
    EXPIRED,
    MALFORMED,
    SCORING_PURPOSE,
    WRONG_BANK,
    WRONG_PURPOSE,
    grant_ref,
    WRONG_RELEASE,
    GrantError,
    GrantPayload,
    GrantRefused,
    peek_payload,
    verify_signature,
)
from server.signals.hospitals import HospitalDirectory, HospitalEndpoint, HospitalUnavailable

SCORE_PATH = "/v1/score"
RELEASES_PATH = "/v1/releases"  # the node's installed releases and their status
DEFAULT_HOSPITAL_TIMEOUT_S = 10.0
MAX_DETAIL_CHARS = 200
RELAYED_STATUSES = frozenset({400, 403, 404, 409, 410, 429})
"""A hospital's refusals the bank may see as they are (a 422 becomes 400: the request was
malformed in the hospital's eyes); anything else (401: this service's token; 5xx) is a 502."""
BANDS = tuple(name for name, _, _ in RISK_BANDS)
PROBABILITY_DECIMALS = 2
"""The node rounds probabilities to 0.01 (clients.scoring.PROBABILITY_DECIMALS); a finer one is
out of contract and never reaches a bank."""
DEFAULT_RETRY_AFTER_S = 60
"""Retry-After for a hospital's 429 that sent none (or an unreadable one): its default interval."""
MAX_RETRY_AFTER_S = 24 * 3600


class ScoreRefused(Exception):
    """A score request refused or failed; `status` is the HTTP status to answer with and
    `retry_after` the seconds for a Retry-After header (429 only)."""

    def __init__(self, status: int, reason: str, retry_after: int | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.retry_after = status, reason, retry_after


@dataclass(frozen=True)
class ScoreResult:
    """What the bank receives, and nothing else."""

    probability: float
    band: str
    reasons: list[dict[str, Any]]
    release: str


@dataclass
class ScoreContext:
    """What the audit entry of one score request says (filled in as checks pass)."""

    hospital: str | None = None
    grant_ref: str | None = None
    kind: str | None = None
    reason: str | None = None  # the one-line refusal the bank received

    def details(self) -> dict[str, Any]:
        return {k: v for k, v in (("hospital", self.hospital), ("grant-ref", Digest(self.grant_ref) if self.grant_ref else None),
                                  ("refusal", self.kind), ("reason", self.reason)) if v is not None}




NODE_STATE_TTL_S = 30.0
"""How long the service trusts what a node said about its installed releases before asking again
(a score refused because a node withdrew the release forgets it at once)."""
RELEASE_STATES = ("active", "withdrawn", "not-installed", "unreachable")
NODE_STATE_TIMEOUT_S = 5.0
"""How long a listing waits for one node's answer about its releases (nodes are asked at once)."""


class ScoreRouter:
    """Checks and forwards score requests; one shared HTTP client for connection reuse. Also knows,
    per registered hospital, the state of each release there (`release_states`), so a release a
    node withdrew is not shown to banks as usable while every score with it fails."""

    def __init__(self, hospitals: HospitalDirectory, client: httpx.AsyncClient) -> None:
        self.hospitals, self.client = hospitals, client
        self._node_states: dict[str, tuple[float, dict[str, str] | None]] = {}

    async def _installed(self, endpoint: HospitalEndpoint) -> dict[str, str] | None:
        """release -> status at the hospital (None: unreachable), cached NODE_STATE_TTL_S. A status
        the node sends that is not one it may send counts as unreachable."""
        cached = self._node_states.get(endpoint.hospital)
        if cached is not None and time.monotonic() - cached[0] < NODE_STATE_TTL_S:
            return cached[1]
        states: dict[str, str] | None = None
        try:
            token = await run_in_threadpool(endpoint.service_token)
            reply = await self.client.get(f"{endpoint.url}{RELEASES_PATH}", headers={"Authorization": f"Bearer {token}"},
                                          timeout=NODE_STATE_TIMEOUT_S)
            if reply.status_code == 200:
                states = {str(r["release"]): str(r["status"]) for r in reply.json()}
                if any(v not in ("active", "withdrawn") for v in states.values()):
                    states = None
        except (httpx.HTTPError, HospitalUnavailable, ValueError, KeyError, TypeError):
            states = None
        self._node_states[endpoint.hospital] = (time.monotonic(), states)
        return states

    def forget(self, hospital: str) -> None:
        """Ask `hospital` afresh next time (it just refused a score for its release's state)."""
        self._node_states.pop(hospital, None)

    async def node_states(self) -> dict[str, dict[str, str] | None]:
        """Every registered hospital's installed releases and their status (None: unreachable),
        asked of all hospitals at once."""
        endpoints = await run_in_threadpool(self.hospitals.list)
        answers = await asyncio.gather(*(self._installed(e) for e in endpoints))
        return {e.hospital: a for e, a in zip(endpoints, answers)}


    def check(self, token: str, bank: str, release: str, context: ScoreContext,
              now: datetime | None = None) -> tuple[GrantPayload, str, str]:
        """The verified payload, the hospital's URL and service token; or ScoreRefused."""
        try:
            claimed = peek_payload(token)
        except GrantRefused as refusal:
            context.kind = refusal.kind
            raise ScoreRefused(400, str(refusal)) from None
        endpoint = self.hospitals.get(claimed.hospital)
        if endpoint is None:  # the unverified name is not audited: anyone can write one
            context.kind = "unknown-hospital"
            raise ScoreRefused(403, "grant refused: it names a hospital this service does not route to")
        context.hospital = endpoint.hospital
        try:
            payload = verify_signature(token, endpoint.grant_key_pem)
        except GrantRefused as refusal:
            context.kind = refusal.kind
            raise ScoreRefused(400 if refusal.kind == MALFORMED else 403, str(refusal)) from None
        except GrantError:
            context.kind = "hospital-key"
            raise ScoreRefused(502, f"the grant key registered for {endpoint.hospital} is unusable") from None
        context.grant_ref = grant_ref(payload.grant_id)
        if payload.bank != bank:
            context.kind = WRONG_BANK
            raise ScoreRefused(403, "grant refused: the grant was issued to another bank")
        if payload.purpose != SCORING_PURPOSE:
            context.kind = WRONG_PURPOSE
            raise ScoreRefused(403, f"grant refused: it covers {payload.purpose!r}, not {SCORING_PURPOSE!r}")
        if payload.release != release:
            context.kind = WRONG_RELEASE
            raise ScoreRefused(403, f"grant refused: the grant covers release {payload.release}, not {release}")
        if (now or datetime.now(UTC)) >= payload.expires:
            context.kind = EXPIRED
            raise ScoreRefused(403, f"grant refused: expired on {payload.expires:%Y-%m-%dT%H:%M:%SZ}")
        try:
            return payload, endpoint.url, endpoint.service_token()
        except HospitalUnavailable as exc:
            context.kind = "hospital-token"
            raise ScoreRefused(502, str(exc)) from None

    async def score(self, token: str, bank: str, release: str, context: ScoreContext) -> ScoreResult:
        """Check the grant, ask the hospital, and return only the fields a bank may see."""
        payload, url, service_token = self.check(token, bank, release, context)
        try:
            reply = await self.client.post(f"{url}{SCORE_PATH}", json={"grant": token, "bank": bank, "release": release},
                                           headers={"Authorization": f"Bearer {service_token}"})
        except httpx.TimeoutException:
            context.kind = "hospital-timeout"
            raise ScoreRefused(504, f"{payload.hospital} did not answer in time") from None
        except httpx.HTTPError:
            context.kind = "hospital-unreachable"
            raise ScoreRefused(502, f"{payload.hospital}'s scoring endpoint is unreachable") from None
        if reply.status_code != 200:
            context.kind = f"hospital-{reply.status_code}"
            if reply.status_code in (404, 409):  # perhaps the release's state there changed
                self.forget(payload.hospital)
            if reply.status_code in RELAYED_STATUSES or reply.status_code == 422:
                status = 400 if reply.status_code == 422 else reply.status_code
                raise ScoreRefused(status, f"{payload.hospital}: {_detail(reply)}",
                                   _retry_after(reply) if status == 429 else None)
            raise ScoreRefused(502, f"{payload.hospital}'s scoring endpoint failed (HTTP {reply.status_code})")
        try:
            return _result(reply.json(), release)
        except (ValueError, KeyError, TypeError):
            context.kind = "hospital-reply"
            raise ScoreRefused(502, f"{payload.hospital}'s scoring endpoint sent a malformed answer") from None


def _detail(reply: httpx.Response) -> str:
    """The hospital's one-line reason (its `detail`), shortened; never echoes the request."""
    try:
        detail = reply.json().get("detail")
    except ValueError:
        detail = None
    text = detail if isinstance(detail, str) else f"refused (HTTP {reply.status_code})"
    return " ".join(text.split())[:MAX_DETAIL_CHARS]


def _retry_after(reply: httpx.Response) -> int:
    """The hospital's Retry-After in whole seconds (1 to MAX_RETRY_AFTER_S), or the default."""
    try:
        seconds = int(reply.headers.get("Retry-After", ""))
    except ValueError:
        return DEFAULT_RETRY_AFTER_S
    return min(max(seconds, 1), MAX_RETRY_AFTER_S)


def _result(body: Any, release: str) -> ScoreResult:
    """Keep exactly probability, band, reasons (feature and phrase, both text) and release;
    refuse an answer out of the node's contract (a probability finer than 0.01, a reason with
    anything but its category and phrase)."""
    probability = float(body["probability"])
    if (not (0.0 <= probability <= 1.0) or round(probability, PROBABILITY_DECIMALS) != probability
            or body["band"] not in BANDS or body["release"] != release):
        raise ValueError("score out of contract")
    reasons = []
    for reason in body["reasons"]:
        if set(reason) != {"feature", "phrase"} or not all(isinstance(v, str) for v in reason.values()):
            raise ValueError("reason out of contract")
        reasons.append({"feature": reason["feature"], "phrase": reason["phrase"]})
    return ScoreResult(probability, str(body["band"]), reasons, release)


def release_states(nodes: dict[str, dict[str, str] | None], release: str) -> dict[str, str]:
    """Each hospital's state of `release` (from `ScoreRouter.node_states`): active, withdrawn,
    not-installed or unreachable."""
    return {h: "unreachable" if installed is None else installed.get(release, "not-installed")
            for h, installed in nodes.items()}
