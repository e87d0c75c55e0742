"""The dashboard in a real browser: headless Debian chromium driven by Selenium against
`fedrisk serve` (uvicorn on a free loopback port). A bank analyst opens the page, enters a key,
finds a release and its privacy certificate, and sees charts drawn as inline SVG whose marks
carry the model card's numbers. The page must work with no network and a strict CSP.

Needs /usr/bin/chromium and /usr/bin/chromedriver (Debian: apt-get install chromium chromium-driver).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from experiments import signals_local as local
from federation.query import load_query
from server.analytics import QueryResult, estimate, write_result
from server.signals.auth import KeyStore

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,2000")
WAIT_S = 20
REPO = Path(__file__).resolve().parents[1]
QUERY = REPO / "experiments" / "queries" / "delinquency_by_age_insurance.yaml"

pytestmark = pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                                reason="needs Debian's chromium and chromium-driver")


@dataclass(frozen=True)
class Site:
    base_url: str
    bank_key: str
    operator_key: str
    hospital: local.LocalHospital


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, signals_federation) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("dashboard")
    hospital = local.build_hospital(root / "hospital", signals_federation)
    local.create_release(root / "registry", hospital, signals_federation.runs[0])
    db = root / "service" / "signals.sqlite"
    store = KeyStore(db)
    bank_key = store.add("bank-analyst", "acme-risk-team", bank="bank-a")[1]
    scientist_key = store.add("data-scientist", "dana")[1]
    operator_key = store.add("hospital-operator", "hank", hospital="hospital_00")[1]
    node = local.start_node_service(hospital, root / "logs", wait=False)
    service = local.start_signals_service(db, root / "registry", root / "logs", wait=False)
    try:
        node.wait_ready()
        service.wait_ready()
        local.register_hospital(db, hospital, node)
        query = load_query(str(QUERY))
        cells = (query.layout().length - 1) // 2
        table = estimate(query, [v for _ in range(cells) for v in (300.0, -90.0)], query.noise_multiplier(), 3)
        csv, meta = write_result(QueryResult(query, "delinquency-2026q3", table, ["h0", "h1", "h2"],
                                             query.noise_multiplier(), query.epsilon), root / "t.csv")
        approved = httpx.post(f"{service.base_url}/v1/cohorts", headers={"X-API-Key": scientist_key},
                              json={"result": json.loads(meta.read_text()), "table_csv": csv.read_text()})
        assert approved.status_code == 201, approved.text
        yield Site(service.base_url, bank_key, operator_key, hospital)
    finally:
        service.stop()
        node.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROME_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _sign_in(driver: WebDriver, site: Site, key: str) -> None:

    driver.get(f"{site.base_url}/")
    driver.execute_script("sessionStorage.clear()")  # a fresh tab: nobody signed in
    driver.get(f"{site.base_url}/")
    field = driver.find_element(By.ID, "api-key")
    assert field.is_displayed() and field.get_attribute("type") == "password"
    field.send_keys(key)
    driver.find_element(By.ID, "sign-in-button").click()


def test_a_bank_analyst_finds_a_release_its_certificate_and_its_charts(browser: WebDriver, site: Site) -> None:

    _sign_in(browser, site, site.bank_key)
    wait = WebDriverWait(browser, WAIT_S)
    release = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, 'article.release[data-release="r1"]')))
    assert "Release r1" in release.text and "Privacy guarantee" in release.text and "ε =" in release.text
    assert "ε (epsilon) measures how much any one patient's records" in release.text  # explained where shown
    assert browser.find_element(By.ID, "role").text == "bank-analyst"
    assert not browser.find_element(By.ID, "sign-in").is_displayed()

    certificate = release.find_element(By.CSS_SELECTOR, "details.certificate")
    assert not certificate.find_element(By.TAG_NAME, "table").is_displayed()  # folded until asked for
    certificate.find_element(By.TAG_NAME, "summary").click()
    wait.until(lambda _: certificate.find_element(By.TAG_NAME, "table").is_displayed())
    card = httpx.get(f"{site.base_url}/v1/releases/r1", headers={"X-API-Key": site.bank_key}).json()
    assert card["certificate"]["model_sha256"] in certificate.text
    assert "hospital_00" in certificate.text and "Privacy certificate" in certificate.text
    assert "Encryption used for aggregation" in certificate.text and "poly_modulus_degree" not in certificate.text
    technical = certificate.find_element(By.CSS_SELECTOR, "details.technical")
    technical.find_element(By.TAG_NAME, "summary").click()  # the exact parameters, for an auditor who asks
    wait.until(lambda _: "poly_modulus_degree" in technical.text)

    marks = release.find_elements(By.CSS_SELECTOR, 'svg[data-chart="calibration"] circle.mark')
    rows = [r for r in card["model_card"]["calibration"]["overall"] if r["observed_rate"] is not None]
    assert len(marks) == len(rows) > 0
    drawn = sorted((float(m.get_attribute("data-predicted")), float(m.get_attribute("data-observed"))) for m in marks)
    expected = sorted((r["mean_predicted"], r["observed_rate"]) for r in rows)
    assert [v for point in drawn for v in point] == pytest.approx([v for point in expected for v in point], rel=1e-3)
    assert all(m.size["width"] > 0 for m in marks)  # laid out, not just present in the DOM
    assert browser.find_elements(By.CSS_SELECTOR, 'svg[data-chart="bars"]') == []  # one release: no one-bar chart
    overview = browser.find_element(By.ID, "auc-overview").text
    if card["federated_auc"] is None:  # the DP evaluation left it undefined: nothing is drawn, nothing guessed
        assert "No release has an AUC" in overview
    else:
        assert f"AUC {card['federated_auc']:.2f} for release r1 (one release)" in overview
    assert "0.5 is chance" in browser.find_element(By.ID, "auc-meaning").text

    cohort = browser.find_element(By.CSS_SELECTOR, 'article.cohort[data-cohort="delinquency-2026q3"]')
    points = cohort.find_elements(By.CSS_SELECTOR, "svg circle.mark")
    assert points and all(float(p.get_attribute("data-low")) <= float(p.get_attribute("data-value"))
                          <= float(p.get_attribute("data-high")) for p in points)

    assert "Service audit log" not in browser.page_source and "routed to" not in browser.page_source
    browser.refresh()  # the first visit is in the audit log now: the caller's own trail shows it
    trail = wait.until(ec.visibility_of_element_located((By.ID, "my-audit")))
    assert "GET /dashboard/panels" in trail.text and "200" in trail.text
    assert browser.execute_script("return sessionStorage.getItem('fedrisk.apiKey')") == site.bank_key
    assert browser.execute_script("return localStorage.length") == 0 and not browser.get_cookies()
    problems = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not problems, problems  # no CSP violation, no failed request (the page fetches nothing external)

    browser.get(f"{site.base_url}/docs")  # the API reference works offline too
    reference = browser.find_element(By.TAG_NAME, "table").text
    assert "/v1/scores" in reference and "bank-analyst" in reference and "/v1/audit" in reference


def test_the_key_lasts_for_the_tab_and_a_bad_key_is_explained(browser: WebDriver, site: Site) -> None:

    wait = WebDriverWait(browser, WAIT_S)
    _sign_in(browser, site, site.operator_key)
    wait.until(ec.visibility_of_element_located((By.ID, "routed")))
    assert not browser.find_elements(By.CSS_SELECTOR, "article.release")  # operators see no releases
    browser.refresh()  # the key is still in this tab's sessionStorage: signed in again without asking
    wait.until(ec.visibility_of_element_located((By.ID, "routed")))

    browser.find_element(By.ID, "sign-out").click()
    assert browser.find_element(By.ID, "sign-in").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('fedrisk.apiKey')") is None

    _sign_in(browser, site, "fr_" + "x" * 32)
    wait.until(ec.text_to_be_present_in_element((By.ID, "error"), "not accepted"))
    assert browser.find_element(By.ID, "sign-in").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('fedrisk.apiKey')") is None


def test_a_bank_analyst_scores_a_grant_through_the_form(browser: WebDriver, site: Site) -> None:
    """The dashboard's form: paste the applicant's grant, pick the release, get the hospital's score
    with what its band means; a spent grant is refused with the hospital's reason."""
    wait = WebDriverWait(browser, WAIT_S)
    browser.get_log("browser")  # what earlier tests left in the log (a refused key) is theirs
    _sign_in(browser, site, site.bank_key)
    form = wait.until(ec.visibility_of_element_located((By.ID, "score-form")))
    grant = site.hospital.issue(site.hospital.consenting()[0], "bank-a")
    form.find_element(By.ID, "grant").send_keys(grant)
    form.find_element(By.ID, "score-submit").click()
    value = wait.until(ec.visibility_of_element_located((By.ID, "score-value")))
    assert value.text.startswith("Probability ") and "release r1" in value.text
    probability = float(value.text.split()[1].rstrip(","))
    from federation.model import RISK_BANDS

    band = next(name for name, low, high in RISK_BANDS if low <= probability < high or probability == high == 1.0)
    assert f"band {band}" in value.text
    assert browser.find_element(By.ID, "grant").get_attribute("value") == ""  # not left on screen
    explained = browser.find_element(By.ID, "score-result").text
    assert "Of 100 applicants with this score" in explained and f"Band {band}: a score" in explained
    assert "must not be the sole basis of an adverse decision" in browser.find_element(By.ID, "score").text
    browser.find_element(By.ID, "grant").send_keys(grant)  # the one-use grant again
    browser.find_element(By.ID, "score-submit").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "score-result"), "Not scored (403)"))
    problems = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "/v1/scores" not in e["message"]]
    assert not problems, problems  # no CSP violation (the refused POST itself is logged as a failed request)


def test_the_example_bank_client_scores_grants_and_reports_refusals(site: Site, tmp_path: Path) -> None:
    """docs/examples/bank_client.py, run as a bank would run it against the live service: one score,
    and the same one-use grant refused with the hospital's reason, never a traceback."""
    import subprocess
    import sys

    grant = site.hospital.issue(site.hospital.consenting()[1], "bank-a")
    grants = tmp_path / "grants.txt"
    grants.write_text(f"{grant}\n{grant}\n")
    result = subprocess.run([sys.executable, str(REPO / "docs" / "examples" / "bank_client.py"), "--service",
                             site.base_url, "--grant-file", str(grants)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "FEDRISK_API_KEY": site.bank_key})
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["promises"]["release"] == "r1" and lines[0]["promises"]["epsilon"] > 0
    first, second = lines[1], lines[2]
    assert first["ok"] and 0.0 <= first["probability"] <= 1.0 and first["band"] in {"low", "medium", "high"}
    assert not second["ok"] and second["status"] == 403 and second["reason"]
    bad = subprocess.run([sys.executable, str(REPO / "docs" / "examples" / "bank_client.py"), "--service",
                          site.base_url, "--grant-file", str(grants)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "FEDRISK_API_KEY": "not-a-key"})
    assert bad.returncode == 1 and "HTTP 401" in bad.stderr and "Traceback" not in bad.stderr
