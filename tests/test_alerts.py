"""Alerts as a hospital's security officer relies on them: each rule fires on a staged event and
not on ordinary traffic, reaches a real webhook and a real syslog socket, and `fedrisk alerts test`
proves the wiring. The receivers are real loopback servers; the events go through AuditLog.append,
as every fedrisk party writes them."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from clients.policy import PolicyRefusal
from privacy.alerts import AlertConfig, AlertMonitor, drain_deliveries, recorded_alerts
from privacy.audit import AuditEntry, AuditLog


class Receivers:
    """A webhook (HTTP on loopback) and a syslog socket (UDP on loopback), recording what arrives."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        self.datagrams: list[str] = []
        arrived = self

        class Hook(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                arrived.posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.http = HTTPServer(("127.0.0.1", 0), Hook)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.settimeout(0.2)
        self._stop = threading.Event()
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        threading.Thread(target=self._listen, daemon=True).start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                self.datagrams.append(self.udp.recv(65536).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    @property
    def webhook(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}/alerts"

    @property
    def syslog(self) -> str:
        return f"127.0.0.1:{self.udp.getsockname()[1]}"

    def rules_fired(self) -> list[str]:
        drain_deliveries()
        return [post["rule"] for post in self.posts]

    def close(self) -> None:
        self._stop.set()
        self.http.shutdown()
        self.udp.close()


@pytest.fixture()
def receivers() -> Iterator[Receivers]:
    sinks = Receivers()
    yield sinks
    sinks.close()


def _watched(tmp_path: Path, receivers: Receivers, budget: dict | None = None) -> AuditLog:
    AlertConfig(syslog={"address": receivers.syslog}, webhook={"url": receivers.webhook}).write(
        tmp_path / "alerts.json")
    return AuditLog(tmp_path / "audit.sqlite", role="hospital-node", identity="hospital_00",
                    budget=(lambda: budget) if budget is not None else None)


def test_a_refusal_burst_fires_once_and_reaches_webhook_and_syslog(tmp_path: Path, receivers: Receivers) -> None:
    log = _watched(tmp_path, receivers)
    for _ in range(19):
        log.append("score.refused", details={"kind": "used-up"})
    assert receivers.rules_fired() == []
    log.append("grant.refused", details={"kind": "expired"})
    for _ in range(10):  # the burst goes on: still one alert within its window
        log.append("score.refused", details={"kind": "used-up"})
    assert receivers.rules_fired() == ["refusal-burst"]
    assert receivers.posts[0]["severity"] == "warning" and receivers.posts[0]["source"] == "hospital-node:hospital_00"
    assert any("refusal-burst" in line for line in receivers.datagrams)
    (alert, delivered), = recorded_alerts(tmp_path)
    assert alert.rule == "refusal-burst" and json.loads(delivered) == {"syslog": "ok", "webhook": "ok"}


def test_forged_grants_policy_refusals_and_a_rollback_each_fire(tmp_path: Path, receivers: Receivers) -> None:
    log = _watched(tmp_path, receivers)
    for _ in range(3):
        log.append("grant.refused", details={"kind": "forged", "reason": "forged token"})
    log.refusal(PolicyRefusal("rounds 50 is over the cap of 20", field="max_rounds"))
    log.append("anchor.behind", details={"anchored": 12, "here": 9})
    assert receivers.rules_fired() == ["forged-grants", "policy-refusal", "anchor-behind"]
    assert [p["severity"] for p in receivers.posts] == ["high", "high", "critical"]
    assert "max_rounds" not in receivers.posts[1]["summary"] or "cap of 20" in receivers.posts[1]["summary"]


def test_budget_thresholds_fire_once_each(tmp_path: Path, receivers: Receivers) -> None:
    spend = {"credit-risk-research": (0.5, 1.0)}
    log = _watched(tmp_path, receivers, spend)
    log.append("round.train", purpose="credit-risk-research", epsilon=0.1)
    spend["credit-risk-research"] = (0.85, 1.0)
    log.append("round.train", purpose="credit-risk-research", epsilon=0.1)
    spend["credit-risk-research"] = (0.9, 1.0)
    log.append("round.train", purpose="credit-risk-research", epsilon=0.05)
    spend["credit-risk-research"] = (0.97, 1.0)
    log.append("round.train", purpose="credit-risk-research", epsilon=0.07)
    assert receivers.rules_fired() == ["budget", "budget"]
    assert [p["severity"] for p in receivers.posts] == ["warning", "critical"]
    assert "85%" in receivers.posts[0]["summary"]


def _request(ts: datetime, bank: str, status: int = 200, seq: int = 1) -> AuditEntry:
    details = json.dumps({"bank": bank, "endpoint": "/v1/scores", "method": "POST", "status": status,
                          "role": "bank-analyst"}, sort_keys=True)
    return AuditEntry(seq, "0" * 64, "signals-service", "signals", "signals.request", ts.isoformat(), None, None,
                      details, "")


def test_a_bank_far_above_its_usual_volume_fires_and_ordinary_traffic_does_not(tmp_path: Path) -> None:
    """A week of ordinary traffic (two banks, ~10 scores an hour, some refusals) raises nothing; one
    bank's hour of 80 scores does, the other bank's steady hour does not."""
    start = datetime(2026, 11, 20, tzinfo=timezone.utc)
    history = [_request(start + timedelta(minutes=6 * i + offset), bank, status=403 if i % 97 == 0 else 200)
               for i in range(7 * 24 * 10) for offset, bank in ((0, "bank-a"), (3, "bank-b"))]
    config = AlertConfig()
    monitor = AlertMonitor(tmp_path, "signals-service:signals", config, history=history)
    soak = [_request(start + timedelta(days=7, minutes=6 * i), "bank-b") for i in range(10)]
    assert [a for e in soak for a in monitor.observe(e)] == []
    burst_start = start + timedelta(days=7, hours=2)
    fired = [a for i in range(80) for a in monitor.observe(_request(burst_start + timedelta(seconds=40 * i), "bank-a"))]
    assert [a.rule for a in fired][:1] == ["bank-volume"] and "bank bank-a" in fired[0].summary
    assert all("bank-b" not in a.summary for a in fired)
    assert [a.rule for a, _ in recorded_alerts(tmp_path)] == ["bank-volume"]  # once within its window


def test_alerts_test_proves_the_wiring_and_fails_on_a_dead_sink(tmp_path: Path, receivers: Receivers,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    assert main(["alerts", "init", "--dir", str(tmp_path), "--webhook", receivers.webhook, "--syslog",
                 receivers.syslog]) == 0
    capsys.readouterr()
    assert main(["alerts", "test", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == ["syslog: ok", "webhook: ok"]
    assert receivers.posts[-1]["rule"] == "test" and any("fedrisk alert test" in d for d in receivers.datagrams)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there now
    assert main(["alerts", "init", "--dir", str(tmp_path), "--webhook", f"http://127.0.0.1:{port}/x", "--force"]) == 0
    capsys.readouterr()
    assert main(["alerts", "test", "--dir", str(tmp_path)]) == 1
    assert "webhook: failed" in capsys.readouterr().out


def test_a_webhook_over_plain_http_off_loopback_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    assert main(["alerts", "init", "--dir", str(tmp_path), "--webhook", "http://alerts.example/hook"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only on loopback" in err and not (tmp_path / "alerts.json").exists()


def test_a_tampered_log_raises_a_critical_alert(tmp_path: Path, receivers: Receivers) -> None:
    from cli.main import main

    log = _watched(tmp_path, receivers)
    for n in range(3):
        log.append("data.load", purpose="credit-risk-research", details={"records": 100 + n})
    with sqlite3.connect(tmp_path / "audit.sqlite") as db:
        db.execute("UPDATE audit SET details = '{\"records\":1}' WHERE seq = 2")
    assert main(["audit", "verify", str(tmp_path / "audit.sqlite")]) == 1
    assert receivers.rules_fired() == ["audit-verify"] and receivers.posts[0]["severity"] == "critical"


def test_without_alerts_json_nothing_is_watched_or_written(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.sqlite", role="hospital-node", identity="h")
    for _ in range(30):
        log.append("refusal", details={"reason": "x"})
    assert not (tmp_path / "alerts.sqlite").exists()
