"""The dashboard: one HTML page at `/`, and the caller's panels rendered on the server.

The page holds no data. It asks for an API key, keeps it in this tab's sessionStorage, and
fetches `/dashboard/panels` with it (header X-API-Key); the server renders the caller's panels
(HTML with inline SVG charts from `charts.py`) for their role, and the page inserts them. So
everything a role may not see is never sent, and the page works with no external asset (the
machine may have no network): styles and the small script are inline, allowed by a per-response
nonce in a strict Content-Security-Policy.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from html import escape
from typing import TYPE_CHECKING, Any

from federation.config import model_layers
from federation.errors import ConfigError
from federation.model import RISK_BANDS
from server.releases.certificates import NOT_EVALUATED
from server.signals import charts
from server.signals.auth import (
    ROLE_AUDITOR,
    ROLE_BANK,
    ROLE_DATA_SCIENTIST,
    ROLE_HOSPITAL,
    Principal,
)
from server.signals.trail import SCORES_ENDPOINT, entry_view

if TYPE_CHECKING:
    from server.signals.catalogue import ReleaseCatalogue, ReleaseView
    from server.signals.cohorts import ApprovedCohort, CohortStore
    from server.signals.trail import RequestTrail

OWN_TRAIL_ROWS = 50
AUDITOR_ROWS = 200
TABLE_PREVIEW_ROWS = 60
_VALUE_COLUMNS = ("count", "sum", "mean", "rate", "quantile")

_CSS = """
body{font-family:system-ui,sans-serif;margin:0;color:#1d2630;background:#f6f7f9}
header{background:#17324d;color:#fff;padding:12px 24px}header h1{margin:0;font-size:1.3em}
main{padding:16px 24px;max-width:1100px}section{background:#fff;border:1px solid #d9dee4;border-radius:6px;
padding:12px 16px;margin:12px 0}h2{font-size:1.1em;margin:4px 0 8px}h3{font-size:1em;margin:12px 0 4px}
table{border-collapse:collapse;font-size:.85em;margin:6px 0}td,th{border-bottom:1px solid #e4e8ec;padding:3px 8px;
text-align:left}.muted{color:#5b6773;font-size:.9em}.badge{padding:1px 7px;border-radius:9px;font-size:.8em}
.active{background:#d8f3dc}.withdrawn{background:#fde2e1}.charts{display:flex;flex-wrap:wrap;gap:16px}
.chart .axis{stroke:#333}.chart .reference{stroke:#999;stroke-dasharray:4 3}.chart .mark{fill:#1f6fb2;
fill-opacity:.8}.chart .interval{fill:#9cc3e6}.chart text{font-size:10px;fill:#333}.chart .suppressed{fill:#a33}
#error{color:#a33}.hidden{display:none}label{font-weight:600}input{width:26em;padding:4px}
details{margin:6px 0}summary{cursor:pointer;font-weight:600}figure{margin:0;max-width:480px}
figcaption{margin-top:2px}.ok{color:#1b7a35}.bad{color:#a33}h4{font-size:.95em;margin:10px 0 4px}
table.facts th{font-weight:600;vertical-align:top;white-space:nowrap}.withheld{color:#a33;font-style:italic}
details.technical{font-size:.9em}details.technical summary{font-weight:400;color:#5b6773}
"""

_SCRIPT = """
const KEY = "fedrisk.apiKey";
const $ = (id) => document.getElementById(id);
function show(signedIn) {
  $("sign-in").classList.toggle("hidden", signedIn);
  $("signed-in").classList.toggle("hidden", !signedIn);
}
async function load() {
  const key = sessionStorage.getItem(KEY);
  if (!key) { show(false); return; }
  $("error").textContent = "";
  const reply = await fetch("/dashboard/panels", {headers: {"X-API-Key": key}});
  if (reply.status === 401) {
    sessionStorage.removeItem(KEY); show(false);
    $("error").textContent = "That key was not accepted (unknown or revoked). Check it and try again.";
    return;
  }
  if (!reply.ok) {
    const wait = reply.headers.get("Retry-After");
    $("error").textContent = reply.status === 429 ? `Too many requests; try again in ${wait} s.`
      : `The service answered ${reply.status}.`;
    return;
  }
  $("panels").innerHTML = await reply.text();
  show(true);
}
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  $("api-key").value = "";
  if (key) { sessionStorage.setItem(KEY, key); load(); }
});
$("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(KEY); $("panels").innerHTML = ""; show(false);
});
document.addEventListener("submit", async (event) => {
  if (event.target.id !== "score-form") return;
  event.preventDefault();
  const out = $("score-result");
  const grant = $("grant").value.trim();
  out.textContent = "Scoring...";
  const reply = await fetch("/v1/scores", {method: "POST",
    headers: {"X-API-Key": sessionStorage.getItem(KEY) || "", "Content-Type": "application/json"},
    body: JSON.stringify({grant: grant, release: $("release").value})});
  const body = await reply.json().catch(() => ({}));
  out.replaceChildren();
  const line = (text, cls) => { const p = document.createElement("p"); p.textContent = text;
    if (cls) p.className = cls; out.appendChild(p); return p; };
  const plainTimes = (text) => String(text).replace(
    /(\\d{4}-\\d{2}-\\d{2})T(\\d{2}:\\d{2})(:\\d{2}(\\.\\d+)?)?(Z|\\+00:00)/g, "$1 $2 UTC");
  if (!reply.ok) { line(`Not scored (${reply.status}): ${plainTimes(body.detail || "refused")}`, "bad"); return; }
  $("grant").value = "";
  const score = line(`Probability ${body.probability.toFixed(2)}, band ${body.band} (release ${body.release}).`, "ok");
  score.id = "score-value";
  const range = [...document.querySelectorAll("[data-band-range]")].find((li) => li.dataset.bandRange === body.band);
  line(`Of 100 applicants with this score, about ${Math.round(body.probability * 100)} would be expected to have `
    + `the outcome the model predicts.${range ? ` Band ${range.textContent}.` : ""} It is one input to your `
    + "decision, never its sole basis.");
  const list = document.createElement("ul");
  for (const r of body.reasons) { const li = document.createElement("li"); li.textContent = r.phrase; list.appendChild(li); }
  out.appendChild(list);
});
load();
"""


def content_security_policy(nonce: str) -> str:
    """Only this page's own inline style and script run; fetches go to this origin only."""
    return (f"default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; connect-src 'self'; "
            "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def page() -> tuple[str, str]:
    """The dashboard page and the nonce its Content-Security-Policy must name."""
    nonce = secrets.token_urlsafe(16)
    html = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<title>fedrisk signals</title>
<style nonce="{nonce}">{_CSS}</style></head><body>
<header><h1>fedrisk signals</h1><div>Credit-risk models trained on hospital records, with their privacy
certificates; approved statistics of the hospitals' patients; and your audit trail. The models and statistics
were computed with differential privacy: random noise that protects each patient's records.</div></header><main>
<section id="sign-in"><h2>Sign in</h2>
<form id="key-form"><label for="api-key">API key</label><br>
<input id="api-key" name="api-key" type="password" autocomplete="off" placeholder="fr_..." required>
<button id="sign-in-button" type="submit">Show my dashboard</button></form>
<p class="muted">Your administrator gives you a key (made with <code>fedrisk serve keys add</code>). It is kept
only in this browser tab and sent to this service alone; closing the tab forgets it.</p></section>
<p id="error" role="alert"></p>
<div id="signed-in" class="hidden"><button id="sign-out" type="button">Sign out</button>
<div id="panels"></div></div>
</main><script nonce="{nonce}">{_SCRIPT}</script></body></html>"""
    return html, nonce


def api_reference(openapi: dict[str, Any]) -> tuple[str, str]:
    """`/docs`: every operation of the OpenAPI document with the roles that may call it, as a
    self-contained page (the usual Swagger UI loads its code from a CDN; this machine may have
    no network). The machine-readable schema stays at /openapi.json."""
    nonce = secrets.token_urlsafe(16)
    rows = []
    for path, methods in openapi.get("paths", {}).items():
        for method, op in methods.items():
            roles = ", ".join(op.get("x-roles", [])) or "public"
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            ref = body.get("$ref", "").rsplit("/", 1)[-1]
            rows.append([method.upper(), path, roles, op.get("summary", ""), (op.get("description") or "").strip(),
                         ref or "-", " ".join(sorted(op.get("responses", {})))])
    table = _table(["method", "path", "roles", "summary", "what it does", "body", "statuses"], rows)
    html = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">'
            f'<title>fedrisk signals API</title><style nonce="{nonce}">{_CSS}</style></head><body>'
            f"<header><h1>fedrisk signals API {escape(str(openapi.get('info', {}).get('version', '')))}</h1>"
            f"<div>{escape(str(openapi.get('info', {}).get('description', '')))}</div></header><main><section>"
            f"<p>Send your key in the <code>X-API-Key</code> header. Every request is audited. The full schema "
            f'(request and response bodies) is <a href="/openapi.json">/openapi.json</a>; the dashboard is '
            f'<a href="/">/</a>.</p>{table}</section></main></body></html>')
    return html, nonce


# --- plain words: written once here, reused wherever the number they explain is shown ----------

EPSILON_MEANING = (
    "ε (epsilon) measures how much any one patient's records could change what this model or table "
    "reveals: with or without that patient, any result is at most e^ε times as likely (for ε = 1, about "
    "2.7 times). Smaller is stronger: ε of 1 or less is strong protection, up to about 10 is moderate, above "
    "10 is weak. δ (delta) is the small chance that the guarantee does not hold.")
"""What epsilon and delta mean, for a reader who is not a privacy specialist (`_epsilon_note`)."""

AUC_MEANING = (
    "AUC is the probability that the model gives a higher score to a randomly chosen person who had the "
    "outcome (for example, fell behind on a bill) than to a randomly chosen person who did not: 0.5 is "
    "chance, 1 is perfect ranking. The Brier score is the average squared gap between the predicted "
    "probability and what happened: 0 is perfect, lower is better.")
"""What AUC and the Brier score mean; shown once, at the top of the releases."""

BAND_MEANING = (
    "A risk band is a range of the score, and the score is the model's calibrated probability that the "
    "applicant has the outcome the model predicts (see \"What it predicts\"). The observed rate is how often "
    "that outcome happened among the held-out patients the model scored in that band, measured with "
    "privacy noise added.")
"""What a risk band is; the band edges themselves come from `federation.model.RISK_BANDS`."""

SCORE_USE_INTRO = (
    "A score is a probability for a group of similar applicants, not a diagnosis and not a finding about "
    "this one person: of 100 applicants scored 0.20, about 20 would be expected to have the outcome.")
SCORE_USE_RULES = (
    "Use it as one input to a credit decision that a person reviews, only for an applicant who consented "
    "(the grant you hold is their consent), and only for the release's stated intended use (on its model card).",
    "It must not be the sole basis of an adverse decision, such as refusing credit.",
    "It must not be used, nor its reasons, to infer the applicant's medical condition.",
    "It must not be shared beyond that purpose.",
)
"""How a score may and may not be used (`_score_use`), on the score form and on every release."""

TECHNICAL_SUMMARY = "Technical details"
TECHNICAL_NOTE = "The exact values as recorded, with their field names, for auditors."

_FIELD_WORDS = {
    "delinquent_90d_12m": "90-day medical-bill delinquency within 12 months",
    "age": "age band", "sex": "sex", "insurance_type": "insurance type", "area_type": "area type",
    "employment_status": "employment status", "risk_score": "model score",
    "membership_score": "the model's probability of the true outcome", "split": "training or held-out records",
}
"""Plain names of the fields a cohort query may measure or group by (others: underscores become spaces)."""

_MEASURE_WORDS = {
    "count": ("Number of patients", "Count"), "sum": ("Total {field}", "Total"),
    "mean": ("Average {field}", "Average"), "rate": ("Share of patients with {field}", "Rate"),
    "histogram": ("Distribution of {field}", "Count"), "quantiles": ("Percentiles of {field}", "Value"),
}
"""A cohort measure as a heading ("Share of patients with ...") and as a table column ("Rate")."""

_ROLE_WORDS = {ROLE_BANK: "a bank analyst", ROLE_DATA_SCIENTIST: "a data scientist", ROLE_AUDITOR: "an auditor",
               ROLE_HOSPITAL: "a hospital operator"}

_REQUEST_WORDS = {
    ("GET", "/dashboard/panels"): "opened the dashboard",
    ("GET", "/v1/me"): "checked their sign-in",
    ("GET", "/v1/releases"): "listed the releases",
    ("GET", "/v1/releases/{release_id}"): "read a release",
    ("GET", "/v1/releases/{release_id}/certificate"): "read a privacy certificate",
    ("GET", "/v1/releases/{release_id}/model-card"): "read a model card",
    ("POST", "/v1/releases/{release_id}/withdraw"): "withdrew a release",
    ("GET", "/v1/cohorts"): "listed the cohort tables",
    ("GET", "/v1/cohorts/{cohort_id}"): "read a cohort table",
    ("POST", "/v1/cohorts"): "approved a cohort table",
    ("POST", "/v1/scores"): "asked for a score",
    ("GET", "/v1/audit/mine"): "read their own audit trail",
    ("GET", "/v1/hospital/requests"): "read the requests routed to their hospital",
    ("GET", "/v1/audit"): "read the service audit log",
}
"""What each audited request did, in words (the method and route stay beside it)."""

_STATUS_WORDS = {
    200: "done", 201: "created", 400: "refused: malformed request", 401: "refused: no valid API key",
    403: "refused: not allowed", 404: "not found", 409: "refused: conflicts with the current state",
    410: "refused: withdrawn", 422: "refused: invalid request", 429: "refused: too many requests",
    502: "failed: a hospital did not answer properly", 504: "failed: a hospital did not answer in time",
}
"""An HTTP status as the outcome of a request (the number stays beside it for auditors)."""


class _Html(str):
    """Markup built in this module with every outside value escaped: table and row helpers pass it
    through as it is. Anything else they are given is text, and is escaped."""


def _text(value: Any) -> str:
    """`value` as escaped text (markup built here passes through)."""
    return value if isinstance(value, _Html) else escape(_fmt(value))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any, spec: str = ".3g") -> str:
    """A number formatted for reading, or the value as text if it is not one (a stored certificate
    is read back without type checks: a malformed one must not break the page)."""
    return format(value, spec) if _is_number(value) else _fmt(value)


def _percent(value: Any, decimals: int = 0) -> str:
    return f"{value * 100:.{decimals}f}%" if _is_number(value) else _fmt(value)


def _delta_words(delta: Any) -> str:
    """δ as a decimal and as odds: 1e-05 -> "0.00001 (1 in 100,000)"."""
    if not _is_number(delta) or not 0.0 < delta < 1.0:
        return _fmt(delta)
    try:
        decimal = format(Decimal(repr(float(delta))).normalize(), "f")
    except InvalidOperation:
        decimal = f"{delta:g}"
    return f"{decimal} (1 in {1.0 / delta:,.0f})"


def _words(slug: Any) -> str:
    """An identifier such as a purpose slug or field name, as words: "credit-risk-research" ->
    "credit risk research"; known fields get their plain name."""
    text = str(slug if slug is not None else "")
    return _FIELD_WORDS.get(text) or text.replace("_", " ").replace("-", " ").strip()


def _value_words(value: Any) -> str:
    """A group's value as words: "self_pay" -> "self pay"; "0-9" stays "0-9"."""
    return _fmt(value).replace("_", " ")


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def plain_time(value: Any) -> str:
    """A stored ISO timestamp as a reader wants it: "2026-12-03 11:30 UTC" (minute precision, UTC
    stated); a date stays a date, and anything unreadable is shown as it is. fedrisk writes every
    timestamp in UTC, so one without an offset is read as UTC."""
    text = str(value if value is not None else "").strip()
    if len(text) == 10:  # an ISO date (a data cut-off)
        return text
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return text or "-"
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


_ISO_MOMENT = re.compile(r"\b\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2})?")


def plain_times_in(text: str) -> str:
    """A sentence with every ISO timestamp in it read as `plain_time` ("expired on 2026-12-01
    11:46 UTC"): refusal reasons quote them as the hospital wrote them."""
    return _ISO_MOMENT.sub(lambda moment: plain_time(moment.group(0)), text)


def _time(value: Any) -> _Html:
    """A timestamp for reading, with the exact stored value kept in the `<time>` element."""
    raw = str(value if value is not None else "")
    return _Html(f'<time datetime="{escape(raw)}">{escape(plain_time(value))}</time>')


def _epsilon_note() -> str:
    """The one explanation of ε and δ, placed beside every privacy guarantee shown."""
    return f'<p class="muted epsilon-note">{escape(EPSILON_MEANING)}</p>'


def _guarantee(epsilon: Any, delta: Any, who: str = "per patient") -> _Html:
    return _Html(f"<b>ε = {escape(_number(epsilon))}</b> {escape(who)}, with δ = {escape(_delta_words(delta))}")


def _score_use() -> str:
    """The "How to use a score" note (`SCORE_USE_INTRO`, `SCORE_USE_RULES`)."""
    rules = "".join(f"<li>{escape(rule)}</li>" for rule in SCORE_USE_RULES)
    return (f'<div class="score-use"><h4>How to use a score</h4><p>{escape(SCORE_USE_INTRO)}</p>'
            f"<ul>{rules}</ul></div>")


def band_range(low: float, high: float) -> str:
    """A band's range of the score in words: "below 10%", "10% to under 30%", "30% or more"."""
    if low <= 0.0:
        return f"below {high * 100:g}%"
    if high >= 1.0:
        return f"{low * 100:g}% or more"
    return f"{low * 100:g}% to under {high * 100:g}%"


def _band_ranges() -> str:
    """The risk bands' ranges, read from `RISK_BANDS` (the page's script shows the scored band's)."""
    items = "".join(f'<li data-band-range="{escape(name)}"><b>{escape(name)}</b>: a score '
                    f"{escape(band_range(low, high))}</li>" for name, low, high in RISK_BANDS)
    return f'<ul class="band-ranges muted">{items}</ul>'


def _technical(rows: Iterable[tuple[str, Any]], note: str = TECHNICAL_NOTE, extra: str = "") -> str:
    """A folded "Technical details" block: each recorded field by its own name, with its exact value
    (`extra`: more markup built here, such as a table with its recorded column names)."""
    body = "".join(f"<tr><td><code>{escape(key)}</code></td><td>{escape(_exact(value))}</td></tr>"
                   for key, value in rows)
    return (f'<details class="technical"><summary>{TECHNICAL_SUMMARY}</summary><p class="muted">{escape(note)}</p>'
            f"<table><thead><tr><th>field</th><th>value</th></tr></thead><tbody>{body}</tbody></table>{extra}"
            "</details>")


def _exact(value: Any) -> str:
    """A recorded value exactly: floats at full precision, lists and mappings as JSON."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True, default=str)
    return "null" if value is None else str(value)


def _flatten(data: Any, prefix: str = "", skip: frozenset[str] = frozenset()) -> list[tuple[str, Any]]:
    """Nested mappings as (dotted field name, value) rows; `skip` names fields (dotted) left out."""
    if not isinstance(data, dict):
        return [(prefix, data)]
    rows: list[tuple[str, Any]] = []
    for key in sorted(data, key=str):
        name = f"{prefix}.{key}" if prefix else str(key)
        if name in skip:
            continue
        value = data[key]
        rows += _flatten(value, name, skip) if isinstance(value, dict) and value else [(name, value)]
    return rows


def _facts(rows: Iterable[tuple[str, Any]]) -> str:
    """Labelled rows in plain words: the first reading of a release or a table."""
    body = "".join(f'<tr><th scope="row">{escape(label)}</th><td>{_text(value)}</td></tr>' for label, value in rows)
    return f'<table class="facts"><tbody>{body}</tbody></table>'


# --- panels -----------------------------------------------------------------------------------

def panels(caller: Principal, catalogue: ReleaseCatalogue, cohorts: CohortStore, trail: RequestTrail) -> str:
    """Everything `caller`'s role may see, as HTML sections."""
    who = escape(caller.bank or caller.hospital or "")
    intro = (f'<section id="who"><h2>Signed in as {escape(caller.label)}</h2><p>You are '
             f"{escape(_ROLE_WORDS.get(caller.role, caller.role))} (role <b id=\"role\">{escape(caller.role)}</b>)"
             f"{f' for <b>{who}</b>' if who else ''}. {escape(_ROLE_HELP[caller.role])}</p></section>")
    parts = [intro]
    if caller.role in (ROLE_BANK, ROLE_DATA_SCIENTIST, ROLE_AUDITOR):
        releases = catalogue.list(for_bank=caller.role == ROLE_BANK)
        if caller.role == ROLE_BANK:
            parts.append(_score_form(releases))
        parts.append(_releases(releases))
        parts.append(_cohorts(cohorts.list()))
    if caller.role == ROLE_HOSPITAL:
        rows = [entry_view(e) for e in trail.entries(hospital=caller.hospital, limit=AUDITOR_ROWS)]
        parts.append(_section("routed", f"Score requests routed to {caller.hospital}", _table(
            ["When", "Bank", "Release", "Outcome", "Reason", "Grant reference"],
            [[_time(r["ts"]), r["bank"], r["release"], _outcome(r["status"], r["endpoint"]),
              plain_times_in(r["reason"] or _words(r["refusal"] or "")), r["grant_ref"]] for r in rows]),
            "Each request a bank made with a grant your hospital issued. The grant reference is a short "
            "fingerprint of the grant id (the first 16 hex characters of its SHA-256): match it against your "
            "node's grants."))
    if caller.role == ROLE_AUDITOR:
        result = trail.verify()
        status = (f'<p class="ok" id="chain">The log is intact: all {result.entries} entries are unchanged and in '
                  "order (their hash chain checks).</p>" if result.ok else
                  '<p class="bad" id="chain">The log has been altered (its hash chain does not check):</p><ul>'
                  + "".join(f"<li>{escape(p)}</li>" for p in result.problems) + "</ul>")
        parts.append(_section("service-audit", "Service audit log", status + _audit_table(
            trail.entries(limit=AUDITOR_ROWS), with_principal=True)))
    parts.append(_section("my-audit", "Your audit trail", _audit_table(
        trail.entries(key_id=caller.key_id, limit=OWN_TRAIL_ROWS), with_principal=False),
        "Your latest requests to this service, newest first, as its audit log recorded them."))
    return "".join(parts)


_ROLE_HELP = {
    ROLE_BANK: "You see the active releases (the models you can score with), approved cohort tables and your "
               "own requests. To score an applicant, paste the grant their hospital gave them into the form "
               "below (your systems can send it to POST /v1/scores): a grant names one release and allows one "
               "score (or a few, spaced out by the hospital) before it expires, 24 hours after it is issued "
               "unless the hospital chose otherwise. Scores are rounded to 0.01 and reasons are categories "
               "without amounts.",
    ROLE_DATA_SCIENTIST: "You see every release (withdrawn ones too) and approved cohort tables; you approve tables "
                         "and withdraw releases through the API.",
    ROLE_AUDITOR: "You see everything readable, and the whole service audit log with a check that it is unaltered.",
    ROLE_HOSPITAL: "You see the score requests routed to your hospital.",
}


def _score_form(releases: list[ReleaseView]) -> str:
    """The bank's form: one grant, one release, POST /v1/scores from the page (the key never leaves
    the tab's sessionStorage); the answer is shown with what its band means and how it may be used."""
    options = "".join(f'<option value="{escape(r.release_id)}">{escape(r.release_id)}</option>' for r in releases)
    if not options:
        return _section("score", "Score an applicant", "<p>No active release to score with.</p>")
    body = ('<form id="score-form"><label for="grant">The applicant\'s grant</label><br>'
            '<textarea id="grant" name="grant" rows="3" cols="60" autocomplete="off" required></textarea><br>'
            f'<label for="release">Release</label> <select id="release" name="release">{options}</select> '
            '<button type="submit" id="score-submit">Score</button></form>'
            '<div id="score-result" aria-live="polite"></div>'
            f"<p class=\"muted\">Risk bands: ranges of the score, the model's calibrated probability. Each release "
            f"below shows how often the outcome happened in each band.</p>{_band_ranges()}{_score_use()}")
    return _section("score", "Score an applicant", body,
                    "The hospital that issued the grant scores it; a grant allows one score (or a few) and expires.")


def _section(ident: str, title: str, body: str, note: str = "") -> str:
    hint = f'<p class="muted">{escape(note)}</p>' if note else ""
    return f'<section id="{ident}"><h2>{escape(title)}</h2>{hint}{body}</section>'


def _figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption class=\"muted\">{escape(caption)}</figcaption></figure>"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    body = "".join("<tr>" + "".join(f"<td>{_text(v)}</td>" for v in row) + "</tr>" for row in rows)
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body or '<tr><td>none yet</td></tr>'}</tbody></table>"


def _outcome(status: Any, endpoint: Any = None) -> str:
    """An audited HTTP status in words, with the number: "done (200)", "refused: too many requests (429)"."""
    if not isinstance(status, int):
        return "-"
    words = "scored" if status == 200 and endpoint == SCORES_ENDPOINT else _STATUS_WORDS.get(
        status, "failed" if status >= 500 else "refused" if status >= 400 else "done")
    return f"{words} ({status})"


def _request(method: Any, endpoint: Any) -> str:
    route = f"{method or ''} {endpoint or ''}".strip()
    words = _REQUEST_WORDS.get((str(method or ""), str(endpoint or "")))
    return f"{words} ({route})" if words else route


def _audit_table(entries: Iterable[Any], *, with_principal: bool) -> str:
    views = [entry_view(e) for e in entries]
    header = ["#", "When", *(["Who", "Role"] if with_principal else []), "Request", "Outcome", "Details"]
    rows = [[v["seq"], _time(v["ts"]), *([v["principal"], v["role"]] if with_principal else []),
             _request(v["method"], v["endpoint"]), _outcome(v["status"], v["endpoint"]), _audit_detail(v)]
            for v in views]
    return _table(header, rows)


def _audit_detail(view: dict[str, Any]) -> str:
    """The release and hospital a request concerned, and why it was refused, in one line."""
    parts = [f"release {view['release']}" if view["release"] else "",
             f"at {view['hospital']}" if view["hospital"] else "",
             f"reason: {plain_times_in(view['reason'] or _words(view['refusal']))}"
             if view["reason"] or view["refusal"] else ""]
    return ", ".join(p for p in parts if p)


# --- releases ----------------------------------------------------------------------------------

def _releases(releases: list[ReleaseView]) -> str:
    if not releases:
        return _section("releases", "Releases", "<p>No release is available yet.</p>")
    meaning = f'<p class="muted" id="auc-meaning">{escape(AUC_MEANING)}</p>'
    return _section("releases", "Releases", _auc_overview(releases) + meaning + "".join(_release(r) for r in releases),
                    "Each release is a credit-risk model trained on hospital records under differential privacy: "
                    "its privacy certificate states how well each patient's records are protected.")


def _auc_overview(releases: list[ReleaseView]) -> str:
    """AUC of every release: a bar chart when it compares releases, a sentence when there is one
    (a one-bar chart compares nothing)."""
    aucs = [(r.release_id, float(r.card.federated_auc)) for r in releases if _is_number(r.card.federated_auc)]
    caption = ("AUC of each release, measured across the hospitals' held-out records with privacy noise added "
               "(the dashed line at 0.5 is chance).")
    if len(aucs) >= charts.MIN_BARS:
        return ('<div id="auc-overview">' + _figure(charts.bar_chart(aucs, "AUC by release", low=0.0, high=1.0,
                                                                     reference=0.5), caption) + "</div>")
    if aucs:
        (release_id, auc), = aucs
        one = "one release" if len(releases) == 1 else (f"the only release with one; the other "
                                                        f"{len(releases) - 1} have none")
        return (f'<p id="auc-overview"><b>AUC {auc:.2f}</b> for release {escape(release_id)} ({escape(one)})'
                f"{escape(_below_chance(auc))}. A chart appears once there are releases to compare.</p>")
    return ('<p id="auc-overview">No release has an AUC: the privacy noise in their evaluations left it '
            "undefined.</p>")


def _below_chance(auc: float) -> str:
    return "; below 0.5: worse than chance" if auc < 0.5 else ""


def _model_words(kind: Any) -> str:
    """The architecture in words: "mlp" -> "neural network (hidden layers of 64 and 32 units)"."""
    try:
        family, hidden = model_layers(str(kind))
    except ConfigError:
        return str(kind)
    if family == "logreg" or not hidden:
        return "logistic regression"
    if len(hidden) == 1:
        return f"neural network (one hidden layer of {hidden[0]} units)"
    return f"neural network (hidden layers of {', '.join(map(str, hidden[:-1]))} and {hidden[-1]} units)"


def _label_words(card: Any) -> str:
    """What the model predicts, from the model card's own sentence on its label."""
    for line in card.limitations:
        if isinstance(line, str) and line.startswith(LABEL_LINE_START):
            return _capital(line[len(LABEL_LINE_START):])
    return "not stated on the model card"


LABEL_LINE_START = "The label is "
_EVALUATION_NOTE = "DP evaluation: "  # how a card's limitation on the evaluation's method begins
CARD_GLOSSARY = (
    "Terms the model card uses: DP is differential privacy, the random noise added to protect each patient's "
    "records; DP-SGD is model training with that noise; a 95% interval shows how far that noise may have moved "
    "a figure; a calibration offset is the observed rate minus the predicted probability.")
"""The model card's own words are quoted as they are; this explains the terms they use."""
"""How a model card's limitations state the model's label (`server.releases.certificates.build_model_card`)."""


def _release(release: ReleaseView) -> str:
    cert, card = release.certificate, release.card
    ident = escape(release.release_id)
    head = (f'<article class="release" data-release="{ident}"><h3>Release {ident} '
            f'<span class="badge {escape(release.status)}">{escape(release.status)}</span></h3>')
    if release.withdrawn_reason:
        head += f'<p class="bad">Withdrawn: {escape(release.withdrawn_reason)}. It is no longer served to banks.</p>'
    auc = card.federated_auc
    facts = _facts([
        ("What it predicts", _label_words(card)),
        ("Intended use", card.intended_use),
        ("Model", f"{_model_words(card.model_kind)}, reading {_fmt(card.n_features)} inputs"),
        ("Trained on", f"records of {_fmt(cert.hospitals)} hospitals' patients who consented to "
                       f"{_words(cert.purpose)}, with data up to {plain_time(cert.data_cutoff)}"),
        ("Privacy guarantee", _Html(_guarantee(cert.epsilon_max, cert.delta) + _epsilon_note())),
        ("How well it ranks applicants (AUC)",
         f"{auc:.2f}{_below_chance(auc)}" if _is_number(auc) else
         "not available: the privacy noise in its evaluation left it undefined"),
        ("Accuracy of its probabilities (Brier score)",
         f"{_number(card.federated_brier, '.3f')} (lower is better)" if _is_number(card.federated_brier)
         else "not available"),
        ("Calibration check", _Html(_calibration_check(cert, card))),
        ("Released", _time(cert.issued)),
    ])
    body = (facts + _bands(card, cert) + _score_use() + '<div class="charts">' + _card_charts(card)
            + "</div>" + _certificate(cert) + _card_text(card))
    return head + body + "</article>"


def _calibration_check(cert: Any, card: Any) -> str:
    """Whether the release passed its calibration check, in words (an override says who let it through)."""
    override = cert.calibration_override
    if isinstance(override, dict):
        found = len(override.get("problems") or [])
        return (f'<span class="bad">Not passed</span>: its probabilities may not match the observed rates. It was '
                f"released anyway by {escape(str(override.get('by', 'an approver')))}, who gave the reason: "
                f"{escape(str(override.get('reason', '')))}. (What the check found"
                f"{f' ({found} point' + 's' * (found != 1) + ')' if found else ''} is in the privacy certificate's "
                "technical details.)")
    if card.bands is None:
        return "not checked: released before calibration was checked"
    return "passed: on held-out records, the observed rates matched the predicted probabilities"


def _bands(card: Any, cert: Any) -> str:
    """What each risk band means for this release: its range of the score (`RISK_BANDS`) and the
    observed rate in the band from the release's DP evaluation, if its card has one."""
    observed = {b.get("band"): b for b in card.bands or [] if isinstance(b, dict)}
    rows = []
    for name, low, high in RISK_BANDS:
        rows.append([_Html(f"<b>{escape(name)}</b>"), f"a score {band_range(low, high)}",
                     _observed(observed.get(name), card.bands is not None)])
    warning = ('<p class="bad">This release did not pass its calibration check (see "Calibration check" above): '
               "read its bands with care.</p>" if cert.calibration_override else "")
    return (f'<div class="bands"><h4>What the risk bands mean</h4><p>{escape(BAND_MEANING)}</p>{warning}'
            + _table(["Band", "Range of the score", "Observed in the evaluation"], rows) + "</div>")


def _observed(band: dict[str, Any] | None, measured: bool) -> str:
    if not measured:
        return "not measured for this release"
    if band is None:
        return "not in this release's evaluation"
    records, rate = band.get("records"), band.get("observed_rate")
    about = f"about {records:,.0f} held-out records after noise" if _is_number(records) else "records unknown"
    if not _is_number(rate):
        return f"no records in this band ({about})"
    if band.get("held_to_range") is False:
        return f"too few records to say ({about})"
    return f"{_percent(rate)} had the outcome ({about})"


def _audit_words(audit: dict | None) -> str:
    """The certificate's privacy audit (a membership-inference attack) in plain words."""
    if not isinstance(audit, dict):
        return "not tested: the certificate was issued before releases were tested with an attack"
    if not audit.get("audited"):
        return (f"not tested with an attack for this release; {audit.get('by') or 'the approver'} gave the reason: "
                f"{audit.get('reason') or 'none'}")
    auc, bound, accounted = audit.get("auc"), audit.get("epsilon_lower_bound"), audit.get("accounted_epsilon")
    if not (_is_number(bound) and _is_number(accounted)):
        return str(audit.get("statement", ""))
    reached = f"reached an AUC of {auc:.2f} (0.5 means it could not tell at all)" if _is_number(auc) else \
        "could not be scored under the noise"
    return (f"An attack that tries to tell whether a patient's records were used in training {reached}. The "
            f"privacy loss it demonstrates, at least ε = {bound:.2f}, is within the guaranteed ε = {accounted:.2f} "
            "(a test with one attack, not a guarantee).")


def _encryption_words(he: dict[str, Any]) -> str:
    """The encryption the hospitals' updates were summed under, in words, from the certificate's
    recorded parameters (their raw names stay in the technical details)."""
    if not isinstance(he, dict) or not he:
        return "not recorded"
    scheme = str(he.get("scheme") or "homomorphic encryption")
    degree, security = he.get("poly_modulus_degree"), he.get("security_bits")
    size = ""
    if isinstance(degree, int) and not isinstance(degree, bool) and degree > 1:
        slots = degree // 2 if scheme.upper() == "CKKS" else degree
        size = f", {slots:,} slots per encrypted message"
    strength = f", {security}-bit security" if isinstance(security, int) and not isinstance(security, bool) else ""
    library = f" ({he['library']})" if he.get("library") else ""
    return (f"{scheme}{size}{strength}{library}. The hospitals' model updates were added up while encrypted, so "
            "the coordinating server never saw any one hospital's update.")


def _several_hospitals(cert: Any) -> str:
    if _is_number(cert.epsilon_all_hospitals):
        return (f"The guarantee assumes each patient is treated at only one of the hospitals. A patient with "
                f"records at all {_fmt(cert.hospitals)} hospitals is protected at ε = "
                f"{cert.epsilon_all_hospitals:.3g} instead (the ε spent at each of their hospitals, combined).")
    return "The guarantee assumes each patient is treated at only one of the hospitals."


def _cumulative(cert: Any) -> str:
    """A patient's cumulative ε for the release's purpose (the certificate's `patient_epsilon`), in words."""
    return (f"at most ε = {cert.patient_epsilon:.3g} for {_words(cert.purpose)}, counting every model and table "
            "computed from a patient's records for that purpose up to and including this release (this release "
            "alone is the guarantee above); later ones add to it, up to each hospital's budget.")


def _certificate(cert: Any) -> str:
    """The privacy certificate: plain labelled rows first, each hospital's privacy spend, then every
    recorded field exactly (folded)."""
    facts = _facts([
        ("Privacy guarantee", _guarantee(cert.epsilon_max, cert.delta, "per patient, for this release")),
        ("Patients at several hospitals", _several_hospitals(cert)),
        *([("Each patient's total so far", _cumulative(cert))] if _is_number(getattr(cert, "patient_epsilon", None))
          else []),
        ("Model fingerprint (SHA-256)", _Html(f"<code>{escape(str(cert.model_sha256))}</code>")),
        ("Records in the evaluation",
         f"about {cert.records:,} held-out patients' records (a count with privacy noise added; not the training "
         "set)" if _is_number(cert.records) else "not recorded"),
        ("Tested with an attack", _audit_words(cert.privacy_audit)),
        ("Encryption used for aggregation", _encryption_words(cert.he_parameters)),
        ("Issued", _time(cert.issued)),
    ])
    rows = []
    for name, h in cert.per_hospital.items():
        evaluation = h.evaluation.epsilon if h.evaluation is not None else None
        rows.append([name, _number(h.run_epsilon), _number(h.epsilon), _number(evaluation), _number(h.ledger_epsilon)])
    spend = _table(["Hospital", "ε spent on this release", "training alone", "evaluation alone",
                    "hospital's total ε for this purpose so far"], rows)
    return (f'<details class="certificate"><summary>Privacy certificate</summary>{facts}{_epsilon_note()}'
            f"<h4>Privacy spent at each hospital</h4>{spend}<p class=\"muted\">Each hospital keeps a budget of ε per "
            "purpose; its total includes every model and table computed from its records for that purpose. ε values "
            "do not simply add up: each total is computed by combining them, and is at most their sum.</p>"
            f"{_technical(_flatten(cert.to_dict()))}</details>")


def _card_charts(card: Any) -> str:
    calibration, fairness = card.calibration, card.fairness
    if not isinstance(calibration, dict):
        words = ("not measured for this release (it predates the privacy-protected evaluation)"
                 if calibration == NOT_EVALUATED else str(calibration))
        return f'<p class="muted">Calibration and fairness by group: {escape(words)}.</p>'
    points = [charts.CalibrationPoint(row["mean_predicted"], row["observed_rate"], row.get("n") or 0.0)
              for row in calibration.get("overall", []) if _is_number(row.get("observed_rate"))]
    out = []
    if points:
        out.append(_figure(charts.calibration_chart(points, f"Calibration of release {card.release_id}"),
                           "Calibration: how often the outcome happened (observed rate) against the predicted "
                           "probability, per range of the score, on held-out records with privacy noise added "
                           "(bigger dots hold more records). On the dashed diagonal the score means what it says."))
    else:
        out.append('<p class="muted">Calibration: not measurable, the privacy noise left every observed rate '
                   "undefined.</p>")
    if isinstance(fairness, dict):
        rows = []
        for field, groups in fairness.get("groups", {}).items():
            for group, summary in groups.items():
                ci = summary.get("auc_ci95") or [None, None]
                rows.append(charts.Interval(f"{_words(field)} {group}", summary.get("auc"), ci[0], ci[1]))
        shown = [r for r in rows if _is_number(r.value)]
        if len(shown) >= charts.MIN_BARS:
            out.append(_figure(charts.interval_chart(rows, f"AUC by group (release {card.release_id})",
                                                     hidden_text="not measurable (too few records)"),
                               "AUC by age band and sex: the dot is the estimate, the bar its 95% interval "
                               "(from the privacy noise only)."))
        elif rows:
            measured = (f"measured for {shown[0].label} only (AUC {shown[0].value:.2f}); the other groups have"
                        if shown else "not measurable: the groups have")
            out.append(f'<p class="muted">AUC by age band and sex: {escape(measured)} too few records for the '
                       "privacy noise, so there is nothing to compare.</p>")
    return "".join(out)


def _card_text(card: Any) -> str:
    """The model card: intended use, what it predicts, what it is not for, its limitations and inputs."""
    items = "".join(f"<li>{escape(s)}</li>" for s in card.out_of_scope_uses)
    technical = [s for s in card.limitations if s == card.federated_basis or str(s).startswith(_EVALUATION_NOTE)]
    limits = "".join(f"<li>{escape(s)}</li>" for s in card.limitations
                     if s not in technical and not str(s).startswith(LABEL_LINE_START))
    inputs = ", ".join(f"{escape(str(g.get('group', '')))} ({len(g.get('inputs') or [])})"
                       for g in card.features if isinstance(g, dict))
    skip = frozenset({"intended_use", "out_of_scope_uses", "limitations", "fairness_notes", "features",
                      "calibration.overall", "calibration.groups", "fairness.groups"})
    return (f'<details class="model-card"><summary>Model card</summary><p><b>Intended use.</b> '
            f"{escape(card.intended_use)}</p><p><b>What it predicts.</b> {escape(_label_words(card))}</p>"
            f"<p><b>Not for:</b></p><ul>{items}</ul><p><b>Limitations, as the model card states them.</b></p>"
            f'<ul>{limits}</ul><p class="muted">{escape(CARD_GLOSSARY)}</p>{_epsilon_note()}'
            f"<p><b>Inputs, by what they describe:</b> {inputs or 'not listed'}.</p>"
            + _technical(_flatten(card.to_dict(), skip=skip) + [(f"limitations[{card.limitations.index(s)}]", s)
                                                                for s in technical],
                         TECHNICAL_NOTE + " Per-group calibration and fairness tables: GET "
                         f"/v1/releases/{card.release_id}/model-card.") + "</details>")


# --- cohort tables -----------------------------------------------------------------------------

def _cohorts(cohorts: list[ApprovedCohort]) -> str:
    if not cohorts:
        return _section("cohorts", "Approved cohort tables", "<p>No cohort table is approved yet.</p>")
    return _section("cohorts", "Approved cohort tables", "".join(_cohort(c) for c in cohorts),
                    "Statistics of the hospitals' patients, computed with privacy noise added and approved for "
                    "release by a data scientist. Each figure carries that noise: the 95% interval shows how far "
                    "it may have moved the figure.")


def hidden_label(threshold: Any) -> str:
    """What a table shows in place of a cell it withholds."""
    return (f"hidden: fewer than {threshold:g} records after noise" if _is_number(threshold)
            else "hidden: too few records after noise")


def _hidden_legend(threshold: Any) -> str:
    """Why some cells are empty: the query's threshold (`suppress-below`) in words."""
    if _is_number(threshold) and threshold > 0:
        return (f"Cells with fewer than {threshold:g} records (counted after noise was added) are hidden, so that no "
                "small group of patients can be singled out.")
    return "This table hides no cell: its query set no minimum number of records."


def _cohort(cohort: ApprovedCohort) -> str:
    s = cohort.summary()
    threshold = cohort.query.get("suppress-below")
    value = next((c for c in _VALUE_COLUMNS if c in cohort.columns), None)
    labels = [c for c in cohort.columns if c not in (*_VALUE_COLUMNS, "se", "ci95_low", "ci95_high", "records",
                                                     "suppressed")]
    shown = cohort.rows[:TABLE_PREVIEW_ROWS]
    rows = [charts.Interval(" ".join(_value_words(r.get(c)) for c in labels) or "all",
                            None if r.get("suppressed") else r.get(value) if value else None,
                            r.get("ci95_low"), r.get("ci95_high")) for r in shown]
    heading, column = _MEASURE_WORDS.get(s["measure"], (s["measure"], s["measure"]))
    what = heading.format(field=_words(s["field"])) + (
        f" by {' and '.join(_words(g) for g in s['group_by'])}" if s["group_by"] else "")
    more = f" (first {TABLE_PREVIEW_ROWS} of {len(cohort.rows)} rows)" if len(cohort.rows) > TABLE_PREVIEW_ROWS else ""
    legend = _hidden_legend(threshold)
    facts = _facts([
        ("What it shows", what),
        ("Patients' consent", f"only records of patients who consented to {_words(s['purpose'])}"),
        ("Privacy guarantee", _Html(_guarantee(s["epsilon"], s["delta"]) + _epsilon_note())),
        ("Hospitals", s["hospitals"]),
        ("Hidden cells", f"{s['suppressed_rows']} of {s['rows']}. {legend}"),
        ("Approved", _Html(f"by {escape(cohort.approved_by)}, {_time(cohort.approved_at)}"
                           + (f": {escape(cohort.note)}" if cohort.note else ""))),
    ])
    head = (f'<article class="cohort" data-cohort="{escape(cohort.cohort_id)}">'
            f'<h3>{escape(_capital(_words(s["name"])))}</h3>{facts}')
    if sum(_is_number(r.value) for r in rows) >= charts.MIN_BARS:
        chart = _figure(charts.interval_chart(rows, f"{what}: estimates with 95% intervals{more}",
                                              hidden_text=f"too few to show (under {threshold:g} records)"
                                              if _is_number(threshold) else charts.HIDDEN_TEXT),
                        f"{what}: the dot is the estimate, the bar its 95% interval{more}. {legend}")
    else:
        chart = '<p class="muted">Too few cells to chart: see the table.</p>'
    table = _table([*(_capital(_words(c)) if c not in _BIN_WORDS else _BIN_WORDS[c] for c in labels), column,
                    "95% interval", "Records (after noise)"],
                   [_cohort_row(r, labels, value, s["measure"], threshold) for r in shown])
    raw = [(f"query.{k}", v) for k, v in _flatten(cohort.query)] + [(f"privacy.{k}", v) for k, v in
                                                                    _flatten(cohort.privacy)]
    raw_table = _table(cohort.columns, [[_Html(escape(_exact(r.get(c)))) for c in cohort.columns] for r in shown])
    return (head + chart + f"<details><summary>Table{escape(more)}</summary>{table}"
            f'<p class="muted legend">{escape(legend)}</p></details>'
            + _technical(raw, TECHNICAL_NOTE + " The table follows with its recorded columns.", raw_table)
            + "</article>")


_BIN_WORDS = {"bin_low": "From", "bin_high": "To", "level": "Percentile"}


def _cohort_row(row: dict[str, Any], labels: list[str], value: str | None, measure: str, threshold: Any) -> list[Any]:
    """One cell of a cohort table in words: a hidden cell says why it is hidden."""
    groups = [_value_words(row.get(c)) if c not in _BIN_WORDS else _fmt(row.get(c)) for c in labels]
    if row.get("suppressed"):
        return [*groups, _Html(f'<span class="withheld">{escape(hidden_label(threshold))}</span>'), "-", "-"]
    shown = (lambda v: _percent(v, 1)) if measure == "rate" else (
        lambda v: _number(v, ",.0f")) if measure in ("count", "histogram") else _fmt
    low, high = row.get("ci95_low"), row.get("ci95_high")
    interval = f"{shown(low)} to {shown(high)}" if _is_number(low) and _is_number(high) else "-"
    records = row.get("records")
    return [*groups, shown(row.get(value)) if value else "-", interval,
            f"about {records:,.0f}" if _is_number(records) else "-"]
