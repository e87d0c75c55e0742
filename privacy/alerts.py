"""Alerts: rules over an audit stream, evaluated as each entry is written, delivered to syslog and
a webhook with a severity.

A party watches its own log: a hospital node its `audit.sqlite`, the signals service its request
log, the coordinator its run log. Watching is switched on by an `alerts.json` beside the log
(`fedrisk alerts init`); the hospital's file is the hospital's, like its policy. Every alert that
fires is also kept in `alerts.sqlite` beside the log (`fedrisk alerts list`), delivered or not.

Rules (thresholds in the `rules` section of alerts.json; defaults in `DEFAULT_RULES`):

* `refusal-burst` (warning): at least `count` refusals of any kind (refusal, grant.refused,
  score.refused, relay.refused, reply.rejected, 401/403 answers of the service) within `window_s`.
* `forged-grants` (high): at least `count` grants refused as forged within `window_s`.
* `policy-refusal` (high): the node's policy refused a request from the coordinator.
* `bank-volume` (warning): a bank's score requests within `window_s` above `factor` times its
  mean over the preceding `baseline_s` (and at least `min_requests`).
* `budget` (warning, critical at the last threshold): a purpose's spent share of its budget
  reached a threshold; once per purpose and threshold.
* `anchor-behind` (critical): the node found its ledger or withdrawals behind a head anchored
  elsewhere (a rollback, or a restored backup).
* `audit-verify` (critical): `fedrisk audit verify` found the chain broken.

An alert names the rule, a severity, a one-line summary and counts; never an identifier: it is
built only from audit entries, which passed the log's identifier filter when written. Delivery never blocks or fails the audited
operation: it runs on a background thread and a failure is recorded beside the alert.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from contextlib import closing
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from federation import stores
from federation.errors import ConfigError

CONFIG_FILE, STATE_FILE = "alerts.json", "alerts.sqlite"
SEVERITIES = ("info", "warning", "high", "critical")
SYSLOG_PRIORITY = {"info": logging.INFO, "warning": logging.WARNING, "high": logging.ERROR, "critical": logging.CRITICAL}
DEFAULT_RULES: dict[str, dict[str, Any]] = {
    "refusal-burst": {"count": 20, "window_s": 300},
    "forged-grants": {"count": 3, "window_s": 300},
    "policy-refusal": {},
    "bank-volume": {"factor": 5.0, "min_requests": 50, "window_s": 3600, "baseline_s": 7 * 86400},
    "budget": {"thresholds": [0.8, 0.95]},
    "anchor-behind": {},
    "audit-verify": {},
}
REFUSAL_ACTIONS = frozenset({"refusal", "grant.refused", "score.refused", "relay.refused", "reply.rejected"})
DELIVERY_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Alert:
    """One alert: which rule, how bad, what happened in a line, counts (no identifiers), where, when."""

    rule: str
    severity: str
    summary: str
    source: str
    at: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class AlertConfig:
    """alerts.json: where alerts go and the rules' thresholds.

    syslog: None, or {"address": "/dev/log" | "host:port", "facility": "auth"}; webhook: None, or
    {"url": "https://...", "timeout_s": 5}; rules: per-rule overrides of `DEFAULT_RULES`
    (`{"bank-volume": {"factor": 8}}`; `false` switches a rule off); min_severity: the least
    severity delivered (every alert is recorded)."""

    syslog: dict[str, Any] | None = None
    webhook: dict[str, Any] | None = None
    rules: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    min_severity: str = "warning"

    @classmethod
    def load(cls, path: Path) -> "AlertConfig":
        """Read and check alerts.json; one-line ConfigError naming the file and the field."""
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no alert configuration (write one with `fedrisk alerts init`)") from None
        except (OSError, ValueError):
            raise ConfigError(f"{path}: not valid JSON") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: must be a JSON object")
        unknown = set(raw) - {"syslog", "webhook", "rules", "min_severity"}
        if unknown:
            raise ConfigError(f"{path}: unknown field {sorted(unknown)[0]!r} (fields: syslog, webhook, rules, "
                              "min_severity)")
        webhook = raw.get("webhook")
        if webhook is not None:
            from federation.urls import unprotected_url

            url = webhook.get("url") if isinstance(webhook, dict) else None
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ConfigError(f"{path}: webhook.url must be an http(s) URL")
            if unprotected_url(url):
                raise ConfigError(f"{path}: webhook.url {url}: {unprotected_url(url)}")
        syslog = raw.get("syslog")
        if syslog is not None and not (isinstance(syslog, dict) and isinstance(syslog.get("address", "/dev/log"), str)):
            raise ConfigError(f"{path}: syslog must be an object with an 'address' (/dev/log or host:port)")
        rules = raw.get("rules", {})
        if not isinstance(rules, dict) or any(name not in DEFAULT_RULES for name in rules):
            bad = next((n for n in rules if n not in DEFAULT_RULES), "rules") if isinstance(rules, dict) else "rules"
            raise ConfigError(f"{path}: rules.{bad}: unknown rule (rules: {', '.join(DEFAULT_RULES)})")
        for name, settings in rules.items():
            if settings is False:
                continue
            if not isinstance(settings, dict) or any(k not in DEFAULT_RULES[name] for k in settings):
                raise ConfigError(f"{path}: rules.{name}: settings are {sorted(DEFAULT_RULES[name]) or 'none'}")
        severity = raw.get("min_severity", "warning")
        if severity not in SEVERITIES:
            raise ConfigError(f"{path}: min_severity must be one of {', '.join(SEVERITIES)}")
        return cls(syslog, webhook, {k: (None if v is False else v) for k, v in rules.items()}, severity)

    def rule(self, name: str) -> dict[str, Any] | None:
        """A rule's settings, defaults filled in; None when switched off."""
        if name in self.rules and self.rules[name] is None:
            return None
        return {**DEFAULT_RULES[name], **(self.rules.get(name) or {})}

    def write(self, path: Path) -> None:
        body = {"syslog": self.syslog, "webhook": self.webhook, "rules": self.rules, "min_severity": self.min_severity}
        Path(path).write_text(json.dumps({k: v for k, v in body.items() if v is not None}, indent=2) + "\n")


def _parse_ts(ts: str) -> datetime:
    return datetime.fromisoformat(ts)


class _Window:
    """Timestamps within the last `seconds`, per key."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.times: dict[str, deque[datetime]] = defaultdict(deque)

    def add(self, key: str, when: datetime) -> int:
        times = self.times[key]
        times.append(when)
        while times and (when - times[0]).total_seconds() > self.seconds:
            times.popleft()
        return len(times)


class AlertMonitor:
    """The rules of one audit log, fed each entry as it is written (`observe`).

    directory: where alerts.json is read and alerts.sqlite kept; source: who watches (e.g.
    "hospital-node:hospital_00"); budget: for a node, a callable returning {purpose: (spent,
    total)} (its ledger), None elsewhere; history: entries already in the log, to seed the
    windows (the last day of them), so a burst spanning two processes is still one burst."""

    def __init__(self, directory: Path, source: str, config: AlertConfig, *,
                 budget: Callable[[], Mapping[str, tuple[float, float]]] | None = None,
                 history: list[Any] | None = None) -> None:
        self.directory, self.source, self.config, self.budget = Path(directory), source, config, budget
        self.state = self.directory / STATE_FILE
        self._windows: dict[str, _Window] = {}
        self._bank_baseline: dict[str, deque[datetime]] = defaultdict(deque)
        self._seeding = True
        for entry in history or []:
            self._evaluate(entry)
        self._seeding = False
        with closing(stores.connect(self.state, timeout=30.0)) as db, db:
            db.execute("CREATE TABLE IF NOT EXISTS alerts (id INTEGER PRIMARY KEY, rule TEXT NOT NULL, "
                       "key TEXT NOT NULL, severity TEXT NOT NULL, at TEXT NOT NULL, alert TEXT NOT NULL, "
                       "delivered TEXT NOT NULL DEFAULT '')")

    @classmethod
    def beside(cls, log_path: Path, source: str, **kwargs: Any) -> "AlertMonitor | None":
        """The monitor of the audit log at `log_path`, if an alerts.json is beside it."""
        config_path = Path(log_path).parent / CONFIG_FILE
        if not config_path.is_file():
            return None
        return cls(Path(log_path).parent, source, AlertConfig.load(config_path), **kwargs)

    # --- rules -----------------------------------------------------------------------------
    def observe(self, entry: Any) -> list[Alert]:
        """Evaluate every rule on a newly written audit entry; fire (record and deliver) what trips."""
        return [self.fire(alert, key) for alert, key in self._evaluate(entry)]

    def _window(self, name: str, seconds: float) -> _Window:
        if name not in self._windows:
            self._windows[name] = _Window(seconds)
        return self._windows[name]

    def _evaluate(self, entry: Any) -> list[tuple[Alert, str]]:
        when = _parse_ts(entry.ts)
        try:
            details = json.loads(entry.details_json)
        except ValueError:
            details = {}
        found: list[tuple[Alert, str]] = []

        def alert(rule: str, severity: str, summary: str, key: str = "", **counts: Any) -> None:
            found.append((Alert(rule, severity, summary, self.source, entry.ts, counts), key))

        refused = entry.action in REFUSAL_ACTIONS or (
            entry.action == "signals.request" and details.get("status") in (401, 403))
        burst = self.config.rule("refusal-burst")
        if burst is not None and refused:
            count = self._window("refusal-burst", burst["window_s"]).add("", when)
            if count >= burst["count"]:
                alert("refusal-burst", "warning", f"{count} refusals within {burst['window_s']:g} s", count=count)
        forged = self.config.rule("forged-grants")
        if forged is not None and (details.get("kind") == "forged" or details.get("refusal") == "forged"):
            count = self._window("forged-grants", forged["window_s"]).add("", when)
            if count >= forged["count"]:
                alert("forged-grants", "high", f"{count} forged grant tokens within {forged['window_s']:g} s",
                      count=count)
        if self.config.rule("policy-refusal") is not None and entry.action == "refusal" and details.get("kind") == "PolicyRefusal":
            alert("policy-refusal", "high", "the node's policy refused a request from the coordinator: "
                  + str(details.get("reason", ""))[:200], key=entry.ts)
        volume = self.config.rule("bank-volume")
        bank = details.get("bank")
        if volume is not None and entry.action == "signals.request" and details.get("endpoint") == "/v1/scores" and bank:
            recent = self._window("bank-volume", volume["window_s"]).add(str(bank), when)
            baseline = self._bank_baseline[str(bank)]
            baseline.append(when)
            while baseline and (when - baseline[0]).total_seconds() > volume["baseline_s"] + volume["window_s"]:
                baseline.popleft()
            earlier = sum(1 for t in baseline if (when - t).total_seconds() > volume["window_s"])
            periods = max(1.0, volume["baseline_s"] / volume["window_s"])
            usual = earlier / periods
            if recent >= volume["min_requests"] and recent > volume["factor"] * max(usual, 1.0):
                alert("bank-volume", "warning", f"bank {bank}: {recent} score requests within "
                      f"{volume['window_s']:g} s, usual {usual:.1f}", key=str(bank), requests=recent,
                      usual=round(usual, 2))
        if self.config.rule("anchor-behind") is not None and entry.action == "anchor.behind":
            alert("anchor-behind", "critical", "this node's ledger or withdrawals are behind a head anchored elsewhere "
                  "(rolled back or restored from a backup)", key=entry.ts)
        budget = self.config.rule("budget")
        if budget is not None and self.budget is not None and entry.epsilon and entry.purpose and not self._seeding:
            spent, total = self.budget().get(entry.purpose, (0.0, 0.0))
            thresholds = sorted(float(t) for t in budget["thresholds"])
            reached = [t for t in thresholds if total > 0 and spent / total >= t]
            if reached:
                top = reached[-1]
                alert("budget", "critical" if top == thresholds[-1] else "warning",
                      f"purpose {entry.purpose}: {spent / total:.0%} of its budget spent (epsilon {spent:.3g} of "
                      f"{total:.3g})", key=f"{entry.purpose}:{top:g}", share=round(spent / total, 4))
        return [] if self._seeding else found

    # --- firing ----------------------------------------------------------------------------
    def fire(self, alert: Alert, key: str = "") -> Alert:
        """Record `alert` (once per rule and key within the rule's window, or ever for a budget
        threshold) and deliver it. Returns it."""
        cooldown = (self.config.rule(alert.rule) or {}).get("window_s")
        with closing(stores.connect(self.state, timeout=30.0)) as db, db:
            last = db.execute("SELECT at FROM alerts WHERE rule = ? AND key = ? ORDER BY id DESC LIMIT 1",
                              (alert.rule, key)).fetchone()
            if last:
                if cooldown is None:
                    return alert  # a rule without a window fires once per key (a budget threshold, an event)
                if _parse_ts(alert.at) - _parse_ts(last[0]) < timedelta(seconds=cooldown):
                    return alert
            cursor = db.execute("INSERT INTO alerts (rule, key, severity, at, alert) VALUES (?, ?, ?, ?, ?)",
                                (alert.rule, key, alert.severity, alert.at, alert.to_json()))
            row_id = cursor.lastrowid
        if SEVERITIES.index(alert.severity) >= SEVERITIES.index(self.config.min_severity):
            _DELIVERY.submit(self, alert, row_id)
        return alert

    def deliver(self, alert: Alert) -> dict[str, str]:
        """Send `alert` to every configured sink now; {sink: "ok" or the failure}."""
        outcome: dict[str, str] = {}
        if self.config.syslog is not None:
            outcome["syslog"] = _to_syslog(self.config.syslog, alert)
        if self.config.webhook is not None:
            outcome["webhook"] = _to_webhook(self.config.webhook, alert)
        return outcome


def recorded_alerts(directory: Path) -> list[tuple[Alert, str]]:
    """The alerts kept in `directory`'s alerts.sqlite (none if it has none); reads only."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return []
    with closing(stores.connect(path, read_only=True, timeout=30.0)) as db:
        rows = db.execute("SELECT alert, delivered FROM alerts ORDER BY id").fetchall()
    return [(Alert(**json.loads(text)), delivered) for text, delivered in rows]


def _to_syslog(settings: Mapping[str, Any], alert: Alert) -> str:
    address: Any = settings.get("address", "/dev/log")
    if ":" in address and not address.startswith("/"):
        host, port = address.rsplit(":", 1)
        address = (host, int(port))
    try:
        handler = logging.handlers.SysLogHandler(
            address=address, facility=logging.handlers.SysLogHandler.facility_names.get(
                str(settings.get("facility", "auth")), logging.handlers.SysLogHandler.LOG_AUTH))
    except OSError as exc:
        return f"failed: {type(exc).__name__}: {exc}"
    try:
        record = logging.LogRecord("fedrisk.alerts", SYSLOG_PRIORITY[alert.severity], __file__, 0,
                                   "fedrisk alert %s", (alert.to_json(),), None)
        handler.handle(record)
        return "ok"
    except OSError as exc:
        return f"failed: {type(exc).__name__}"
    finally:
        handler.close()


def _to_webhook(settings: Mapping[str, Any], alert: Alert) -> str:
    import httpx

    try:
        reply = httpx.post(str(settings["url"]), content=alert.to_json(), timeout=float(settings.get("timeout_s",
                                                                                                        DELIVERY_TIMEOUT_S)),
                           headers={"Content-Type": "application/json", "User-Agent": "fedrisk-alerts"})
    except httpx.HTTPError as exc:
        return f"failed: {type(exc).__name__}"
    return "ok" if 200 <= reply.status_code < 300 else f"failed: HTTP {reply.status_code}"


class _Delivery:
    """One background thread per process delivering alerts; drained at exit (a CLI process that
    fires an alert and ends still delivers it)."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[AlertMonitor, Alert, int] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._waiters: list[threading.Event] = []

    def submit(self, monitor: AlertMonitor, alert: Alert, row_id: int | None) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fedrisk-alerts", daemon=True)
                self._thread.start()
                atexit.register(self.drain)
        self._queue.put((monitor, alert, int(row_id or 0)))

    def drain(self, timeout_s: float = 2 * DELIVERY_TIMEOUT_S) -> None:
        """Wait until every submitted alert was delivered (or `timeout_s` passed)."""
        if self._thread is None:
            return
        done = threading.Event()
        self._waiters.append(done)
        self._queue.put(None)
        done.wait(timeout_s)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                while self._waiters:
                    self._waiters.pop().set()
                continue
            monitor, alert, row_id = item
            try:
                outcome = monitor.deliver(alert)
            except Exception as exc:  # delivery must never take the watched service down
                outcome = {"delivery": f"failed: {type(exc).__name__}"}
            try:
                with closing(stores.connect(monitor.state, timeout=30.0)) as db, db:
                    db.execute("UPDATE alerts SET delivered = ? WHERE id = ?",
                               (json.dumps(outcome, sort_keys=True), row_id))
            except stores.Error:
                pass


_DELIVERY = _Delivery()


def drain_deliveries(timeout_s: float = 2 * DELIVERY_TIMEOUT_S) -> None:
    """Wait for this process's alert deliveries (tests and `fedrisk alerts test`)."""
    _DELIVERY.drain(timeout_s)


def now_utc() -> str:
    """An alert's timestamp: the audit log's form (UTC ISO, microseconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")
