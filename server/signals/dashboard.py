"""The dashboard: one HTML page at `/`, and the caller's panels rendered on the server.

The page holds no data. It asks for an API key, keeps it in this tab's sessionStorage, and
fetches `/dashboard/panels` with it (header X-API-Key); the server renders the caller's panels
(HTML with inline SVG charts from `charts.py`) for their role, and the page inserts them. So
everything a role may not see is never sent, and the page works with no external asset (the
machine may have no network): styles and the small script are inline, allowed by a per-response
nonce in a strict Content-Security-Policy.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Sequence
from html import escape
from typing import TYPE_CHECKING, Any

from server.signals import charts
from server.signals.auth import (
    ROLE_AUDITOR,
    ROLE_BANK,
    ROLE_DATA_SCIENTIST,
    ROLE_HOSPITAL,
    Principal,
)
from server.signals.trail import entry_view

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
figcaption{margin-top:2px}.ok{color:#1b7a35}.bad{color:#a33}
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
  if (!reply.ok) { line(`Not scored (${reply.status}): ${body.detail || "refused"}`, "bad"); return; }
  $("grant").value = "";
  const score = line(`Probability ${body.probability.toFixed(2)}, band ${body.band} (release ${body.release}).`, "ok");
  score.id = "score-value";
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
<header><h1>fedrisk signals</h1><div>Released credit-risk models with their privacy certificates,
approved DP cohort statistics, and your audit trail.</div></header><main>
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


# --- panels -----------------------------------------------------------------------------------

def panels(caller: Principal, catalogue: ReleaseCatalogue, cohorts: CohortStore, trail: RequestTrail) -> str:
    """Everything `caller`'s role may see, as HTML sections."""
    who = escape(caller.bank or caller.hospital or "")
    intro = (f'<section id="who"><h2>Signed in as {escape(caller.label)}</h2><p>Role <b id="role">'
             f"{escape(caller.role)}</b>{f' for <b>{who}</b>' if who else ''}. {_ROLE_HELP[caller.role]}</p></section>")
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
            ["when", "bank", "release", "status", "refusal", "grant ref"],
            [[r["ts"], r["bank"], r["release"], r["status"], r["refusal"], r["grant_ref"]] for r in rows]),
            "Each request a bank made with a grant your hospital issued. The grant ref is the first 16 hex "
            "characters of SHA-256(grant id): match it against your node's grants."))
    if caller.role == ROLE_AUDITOR:
        result = trail.verify()
        status = (f'<p class="ok" id="chain">Chain intact: {result.entries} entries.</p>' if result.ok else
                  '<p class="bad" id="chain">Chain broken:</p><ul>'
                  + "".join(f"<li>{escape(p)}</li>" for p in result.problems) + "</ul>")
        parts.append(_section("service-audit", "Service audit log", status + _audit_table(
            trail.entries(limit=AUDITOR_ROWS), with_principal=True)))
    parts.append(_section("my-audit", "Your audit trail", _audit_table(
        trail.entries(key_id=caller.key_id, limit=OWN_TRAIL_ROWS), with_principal=False),
        "Your latest requests to this service, newest first, as its audit log recorded them."))
    return "".join(parts)


_ROLE_HELP = {
    ROLE_BANK: "You see active releases, approved cohort tables and your own requests; scores come from "
               "POST /v1/scores with an applicant's grant, which names one release and allows one score "
               "(or a few, spaced out by the hospital) before it expires (24 hours by default); scores are "
               "rounded to 0.01 and reasons are categories without magnitudes.",
    ROLE_DATA_SCIENTIST: "You see every release (withdrawn too) and approved cohort tables; you approve tables "
                         "and withdraw releases through the API.",
    ROLE_AUDITOR: "You see everything readable and the whole service audit log with its chain checked.",
    ROLE_HOSPITAL: "You see the score requests routed to your hospital.",
}


BAND_MEANING = {
    "low": "below 10%: of 100 applicants scored low, about 5 fell 90 days behind on a medical bill within a year",
    "medium": "10% to 30%: about 1 in 5 such applicants did",
    "high": "30% and above: about 1 in 2 or more did",
}
SCORE_USE = ("A score is the probability, from the release's calibrated model, that this applicant falls 90 "
             "days behind on a medical bill within 12 months. Use it as one input to a decision a person "
             "reviews, never as its sole basis; never to infer the applicant's health; and only for the "
             "applicant whose grant you hold. The reasons are the categories that raised the score most.")


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
            f'<p class="muted">{escape(SCORE_USE)}</p><ul class="muted">'
            + "".join(f"<li><b>{escape(b)}</b>: {escape(m)}</li>" for b, m in BAND_MEANING.items()) + "</ul>")
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
    body = "".join("<tr>" + "".join(f"<td>{escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body or '<tr><td>none yet</td></tr>'}</tbody></table>"


def _audit_table(entries: Iterable[Any], *, with_principal: bool) -> str:
    views = [entry_view(e) for e in entries]
    header = ["#", "when", *(["principal", "role"] if with_principal else []), "request", "status", "detail"]
    rows = [[v["seq"], v["ts"], *([v["principal"], v["role"]] if with_principal else []),
             f"{v['method'] or ''} {v['endpoint'] or ''}", v["status"],
             " ".join(f"{k} {v[k]}" for k in ("release", "hospital", "refusal") if v[k])] for v in views]
    return _table(header, rows)


def _releases(releases: list[ReleaseView]) -> str:
    if not releases:
        return _section("releases", "Releases", "<p>No release is available yet.</p>")
    aucs = [(r.release_id, r.card.federated_auc) for r in releases if r.card.federated_auc is not None]
    overview = (_figure(charts.bar_chart(aucs, "Federated AUC by release", low=0.5, high=1.0),
                        "Federated AUC of each release (0.5 is chance, 1 is perfect ranking)") if aucs else "")
    return _section("releases", "Releases", overview + "".join(_release(r) for r in releases),
                    "Each release is a DP-trained model; its privacy certificate states the guarantee per patient.")


def _audit_text(audit: dict | None) -> str:
    """The certificate's membership audit in one sentence (or why there is none)."""
    if not audit:
        return "none: certificate issued before releases were audited"
    if audit.get("audited"):
        return str(audit.get("statement", ""))
    return f"{audit.get('statement', '')} (reason: {audit.get('reason', '')})"


def _release(release: ReleaseView) -> str:
    cert, card = release.certificate, release.card
    ident = escape(release.release_id)
    head = (f'<article class="release" data-release="{ident}"><h3>Release {ident} '
            f'<span class="badge {escape(release.status)}">{escape(release.status)}</span></h3>'
            f'<p>({escape(card.model_kind)}, {card.n_features} inputs) for <b>{escape(cert.purpose)}</b>, data up to '
            f"{escape(cert.data_cutoff)}: <b>epsilon {cert.epsilon_max:.3g}, delta {cert.delta:g}</b> per patient, "
            f"{cert.hospitals} hospitals. Federated AUC {_fmt(card.federated_auc)}, Brier {_fmt(card.federated_brier)}."
            "</p>")
    if release.withdrawn_reason:
        head += f'<p class="bad">Withdrawn: {escape(release.withdrawn_reason)}. It is no longer served to banks.</p>'
    per_hospital = _table(["hospital", "run epsilon", "DP-SGD epsilon", "ledger epsilon (purpose, cumulative)",
                           "delta", "mechanism", "noise multiplier", "sample rate", "steps", "clip norm"],
                          [[name, h.run_epsilon, h.epsilon, h.ledger_epsilon, h.delta, h.mechanism, h.noise_multiplier,
                            h.sample_rate, h.steps, h.clip_norm] for name, h in cert.per_hospital.items()])
    certificate = (f'<details class="certificate"><summary>Privacy certificate</summary>'
                   f"<p>{escape(cert.guarantee)}</p>" + _table(["field", "value"], [
                       ["model SHA-256", cert.model_sha256], ["training run", cert.mlflow_run_id],
                       ["issued", cert.issued], ["records", cert.records], ["records basis", cert.records_basis],
                       ["accountant", cert.accountant], ["privacy audit", _audit_text(cert.privacy_audit)],
                       ["HE parameters", ", ".join(f"{k} {v}" for k, v in cert.he_parameters.items())]])
                   + per_hospital + "</details>")
    return head + '<div class="charts">' + _card_charts(card) + "</div>" + certificate + _card_text(card) + "</article>"


def _card_charts(card: Any) -> str:
    calibration, fairness = card.calibration, card.fairness
    if not isinstance(calibration, dict):
        return f'<p class="muted">Calibration and fairness: {escape(str(calibration))}.</p>'
    points = [charts.CalibrationPoint(row["mean_predicted"], row["observed_rate"], row.get("n") or 0.0)
              for row in calibration.get("overall", []) if row.get("observed_rate") is not None]
    out = [_figure(charts.calibration_chart(points, f"Calibration of release {card.release_id} (DP evaluation)"),
                   "Calibration: observed delinquency rate against predicted probability, per score bin (DP "
                   "evaluation; bigger dots hold more records). On the dashed diagonal the score means what it says.")]
    if isinstance(fairness, dict):
        rows = []
        for field, groups in fairness.get("groups", {}).items():
            for group, summary in groups.items():
                ci = summary.get("auc_ci95") or [None, None]
                rows.append(charts.Interval(f"{field} {group}", summary.get("auc"), ci[0], ci[1]))
        if rows:
            out.append(_figure(charts.interval_chart(rows, f"AUC by group (release {card.release_id})"),
                               "AUC by age band and sex: dot the estimate, bar its 95% interval (DP noise only)."))
    return "".join(out)


def _card_text(card: Any) -> str:
    items = "".join(f"<li>{escape(s)}</li>" for s in card.out_of_scope_uses)
    limits = "".join(f"<li>{escape(s)}</li>" for s in card.limitations)
    return (f'<details class="model-card"><summary>Model card</summary><p><b>Intended use.</b> '
            f"{escape(card.intended_use)}</p><p><b>Not for:</b></p><ul>{items}</ul>"
            f"<p><b>Limitations.</b></p><ul>{limits}</ul></details>")


def _cohorts(cohorts: list[ApprovedCohort]) -> str:
    if not cohorts:
        return _section("cohorts", "Approved cohort tables", "<p>No cohort table is approved yet.</p>")
    return _section("cohorts", "Approved cohort tables", "".join(_cohort(c) for c in cohorts),
                    "DP statistics a data scientist approved for release; each point is the estimate and the bar "
                    "its 95% interval (DP noise only). Suppressed cells had too few records to publish.")


def _cohort(cohort: ApprovedCohort) -> str:
    s = cohort.summary()
    value = next((c for c in _VALUE_COLUMNS if c in cohort.columns), None)
    labels = [c for c in cohort.columns if c not in (*_VALUE_COLUMNS, "se", "ci95_low", "ci95_high", "records",
                                                     "suppressed")]
    rows = [charts.Interval(" ".join(_fmt(r.get(c)) for c in labels) or "all", r.get(value) if value else None,
                            r.get("ci95_low"), r.get("ci95_high")) for r in cohort.rows[:TABLE_PREVIEW_ROWS]]
    what = s["measure"] + (f" of {s['field']}" if s["field"] else "")
    by = f" by {', '.join(s['group_by'])}" if s["group_by"] else ""
    head = (f'<article class="cohort" data-cohort="{escape(cohort.cohort_id)}"><h3>{escape(s["name"])}</h3>'
            f"<p>{escape(what + by)}; epsilon {s['epsilon']:g}, delta {s['delta']:g} per patient; "
            f"{s['hospitals']} hospitals; approved by {escape(cohort.approved_by)} on {escape(cohort.approved_at)}.</p>")
    more = f" (first {TABLE_PREVIEW_ROWS} of {len(cohort.rows)} rows)" if len(cohort.rows) > TABLE_PREVIEW_ROWS else ""
    chart = _figure(charts.interval_chart(rows, f"{s['name']}: estimates with 95% intervals{more}"),
                    f"{what}{by}: dot the estimate, bar its 95% interval{more}.")
    table = _table(cohort.columns, [[r.get(c) for c in cohort.columns] for r in cohort.rows[:TABLE_PREVIEW_ROWS]])
    return head + chart + f"<details><summary>Table{escape(more)}</summary>{table}</details></article>"
