"""The dashboard in a real browser: headless Chromium (Debian's chromium + chromium-driver) via Selenium.

Loads the page of a finished run written by a real (short) federation, checks
that the charts rendered and that the Dice and byte figures shown equal the
run store's, then adds a round to the store and waits for the open page to
show it without a reload (asking only for the rounds after those it holds),
then a skipped round, which keeps the last Dice and epsilon shown, then a
rewind and rewrite (a resume), which the page notices and shows. Site names, reasons and config values made of markup are shown
as text and run nothing; no page needs anything its Content-Security-Policy
blocks. Where CI is set, a missing Chromium fails the test.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sqlite3
import time

import pytest

from common.data import synthesize
from dashboard_support import simulate
from server.dashboard import start_in_background
from server.run_records import RunRecords
from server.run_store import RunStore
from test_dashboard_security import EVIL, evil_run

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _need_browser():
    missing = [p for p in (CHROMIUM, DRIVER) if not shutil.which(p)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        message = f"browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver; pip install selenium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    # Every page records what its Content-Security-Policy blocked: the dashboard's own scripts and
    # styles (Chart.js included) must need nothing the policy forbids.
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": (
        "window.cspViolations = []; document.addEventListener('securitypolicyviolation', "
        "(e) => window.cspViolations.push(e.violatedDirective + ' ' + e.blockedURI));")})
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    _need_browser()
    data = tmp_path_factory.mktemp("browser-data")
    synthesize(data, sites=3, per_site=9, seed=0, image_size=64)
    home = tmp_path_factory.mktemp("browser-home")
    run_dir = simulate(data, home, "browser", rounds=2)
    url = start_in_background(home / "runs", "127.0.0.1", 0, token="browser-token")
    return url, run_dir


def wait_for(driver, script, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {script}")


def text(driver, css):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css).text.strip()


def test_run_page_shows_the_store_and_updates_live(browser, served):
    url, run_dir = served
    browser.get(f"{url}runs/browser?token=browser-token")
    wait_for(browser, "return document.body.dataset.rendered === '2'")
    store = RunStore.in_run_dir(run_dir).read()
    rounds = store["rounds"]

    # Charts: Chart.js objects with the store's data, and ink on the canvases.
    for chart_id, n_sets in (("chart-dice", 2), ("chart-loss", 2), ("chart-sites", 3), ("chart-payload", 3),
                             ("chart-cumulative", 2)):
        datasets = browser.execute_script(
            "const c = Chart.getChart(arguments[0]); return c ? c.data.datasets.map(d => d.data) : null;", chart_id)
        assert datasets is not None and len(datasets) == n_sets, chart_id
        assert all(len(d) == 2 for d in datasets), chart_id
        inked = browser.execute_script("""
            const c = document.getElementById(arguments[0]); const px = c.getContext('2d')
              .getImageData(0, 0, c.width, c.height).data;
            let n = 0; for (let i = 3; i < px.length; i += 4) if (px[i] > 0) n++; return n;""", chart_id)
        assert inked > 1000, (chart_id, inked)
    dice = browser.execute_script("return Chart.getChart('chart-dice').data.datasets[0].data")
    assert dice == [r["dice"] for r in rounds]
    assert "off" in browser.execute_script("return document.getElementById('chart-epsilon').parentElement.className")

    # Figures on the page equal the store's.
    assert text(browser, "#fig-dice") == f"{rounds[-1]['dice']:.4f}"
    assert text(browser, "#fig-dice-personal") == f"{rounds[-1]['dice_personal']:.4f}"
    assert text(browser, "#fig-bytes-up") == f"{sum(r['payload_bytes_up'] for r in rounds):,} B"
    assert text(browser, "#fig-bytes-down") == f"{sum(r['payload_bytes_down'] for r in rounds):,} B"
    full = sum(r["full_model_bytes_up"] + r["full_model_bytes_down"] for r in rounds)
    assert text(browser, "#fig-full-model").startswith(f"{full:,} B")
    assert text(browser, "#fig-rounds") == "2 / 2" and text(browser, "#run-status") == "finished"
    assert browser.execute_script("return document.getElementById('timeline-note').hidden") is True  # all shown
    for r in rounds:
        row = f"#timeline tr[data-round='{r['round']}']"
        assert text(browser, row + " td.dice") == f"{r['dice']:.4f}"
        assert text(browser, row + " td.bytes-up") == f"{r['payload_bytes_up']:,} B"
        assert text(browser, row + " td.bytes-down") == f"{r['payload_bytes_down']:,} B"

    # A round added to the store shows up on the open page, no reload.
    records = RunRecords(run_dir)
    third = copy.deepcopy(records.read_rounds()[-1])
    third.update(round=3, dice=0.4321, dice_personal=0.5432, epsilon_max=1.25,
                 failures=[{"site": "site-2", "phase": "train", "reason": "out of memory"}])
    browser.execute_script("window.notReloaded = true")
    records.append_round(third)
    wait_for(browser, "return document.body.dataset.rendered === '3'", timeout=15)
    assert browser.execute_script("return window.notReloaded === true")
    assert text(browser, "#fig-dice") == "0.4321"
    assert text(browser, "#timeline tr[data-round='3'] td.dice") == "0.4321"
    assert "site-2 (train): out of memory" in text(browser, "#timeline tr[data-round='3']")
    assert len(browser.execute_script("return Chart.getChart('chart-dice').data.datasets[0].data")) == 3

    # A skipped last round (no Dice, no epsilon: e.g. every site out of its privacy budget) blanks neither figure.
    records.append_round({"round": 4, "status": "skipped", "dice": None, "dice_personal": None, "sites": {},
                          "failures": [{"site": "site-0", "phase": "train", "reason": "privacy budget: spent"}]})
    wait_for(browser, "return document.body.dataset.rendered === '4'", timeout=15)
    assert text(browser, "#fig-dice") == "0.4321" and text(browser, "#fig-dice-personal") == "0.5432"
    assert text(browser, "#fig-epsilon") == "1.25"

    # A later round that sampled other sites records a smaller maximum: the epsilon spent stays the largest.
    fifth = copy.deepcopy(third)
    fifth.update(round=5, dice=0.5, epsilon_max=0.75, failures=[])
    records.append_round(fifth)
    wait_for(browser, "return document.body.dataset.rendered === '5'", timeout=15)
    assert text(browser, "#fig-dice") == "0.5000" and text(browser, "#fig-epsilon") == "1.25"
    # The page asked only for the rounds after those it held (a 5,000-round run is not re-sent every 2 s).
    assert browser.execute_script("return document.body.dataset.polled") == "since 4"

    # A resume rewinds the store and writes rounds again: the page drops what it held and shows them.
    records.rewind_to(3)
    again = copy.deepcopy(third)
    again.update(round=4, dice=0.6543, time="2099-01-01T00:00:00+00:00", failures=[])
    records.append_round(again)
    # 4 rounds, not 5: the page's next poll after the rewind (since=5) got the whole run back.
    wait_for(browser, "return document.body.dataset.rendered === '4' && "
                      "document.getElementById('fig-dice').textContent === '0.6543'", timeout=15)
    assert text(browser, "#fig-dice") == "0.6543"
    assert text(browser, "#timeline tr[data-round='4'] td.dice") == "0.6543"
    assert browser.execute_script("return window.notReloaded === true")
    assert browser.execute_script("return window.cspViolations") == []


def test_runs_list_and_error_page(browser, served):
    url, _ = served
    browser.get(f"{url}?token=browser-token")
    wait_for(browser, "return document.querySelector(\"#runs tr[data-run='browser']\") !== null")
    assert text(browser, "#runs tr[data-run='browser'] td.dice")  # a Dice figure, not empty
    browser.get(f"{url}runs/missing")
    assert "no run named 'missing'" in text(browser, "#page-error")


@pytest.fixture(scope="module")
def tokenless(tmp_path_factory):
    """A dashboard without a token (loopback only) over runs written with RunRecords: `evil`, `quiet`."""
    _need_browser()
    runs_dir = tmp_path_factory.mktemp("browser-tokenless") / "runs"
    evil_run(runs_dir)
    quiet = RunRecords.create(runs_dir, "quiet", {"rounds": 2, "lr": 0.001})
    quiet.append_round({"round": 1, "dice": 0.5, "sites": {"site-0": {"num_examples": 3}}})
    return start_in_background(runs_dir, "127.0.0.1", 0, None), runs_dir


def test_markup_from_sites_and_configs_is_shown_as_text_and_runs_nothing(browser, tokenless):
    url, _ = tokenless
    browser.get(f"{url}runs/evil")
    wait_for(browser, "return document.body.dataset.rendered === '1'")
    time.sleep(0.5)  # an injected <img src=x> would have errored by now
    assert browser.execute_script("return window.pwned") is None
    assert browser.execute_script("return document.querySelectorAll('img, svg, main script').length") == 0
    assert EVIL in text(browser, "#sites tbody")  # the site's name, as typed
    assert f"failed: {EVIL} ({EVIL}): {EVIL}" in text(browser, "#timeline tbody")
    assert text(browser, "#status-reason") == f"failed: {EVIL}"
    assert EVIL in text(browser, "#config")
    browser.get(url)
    wait_for(browser, "return document.querySelector(\"#runs tr[data-run='evil']\") !== null")
    assert browser.execute_script("return window.pwned") is None
    assert browser.execute_script("return window.cspViolations") == []


def test_a_change_within_the_same_second_is_shown(browser, tokenless):
    # Before: the page redrew only when status, reason, `updated_at` (to the second) or a count changed;
    # a config or meta written within the second of the last write stayed unseen until the next round.
    url, runs_dir = tokenless
    browser.get(f"{url}runs/quiet")
    wait_for(browser, "return document.body.dataset.rendered === '1'")
    assert text(browser, "#fig-rounds") == "1 / 2"
    with sqlite3.connect(runs_dir / "quiet" / "run.sqlite") as con:  # updated_at kept: the same second
        con.execute("UPDATE run SET config_json = ?", (json.dumps({"rounds": 5, "lr": 0.002}),))
    wait_for(browser, "return document.getElementById('fig-rounds').textContent === '1 / 5'", timeout=10)
    assert "0.002" in text(browser, "#config")


def test_a_long_run_lists_its_latest_rounds_and_draws_every_one(browser, tokenless):
    # Before: every new round rebuilt a row per round and a Chart per chart; at 5,000 rounds x 10 sites a
    # round took about 4 s of the page's main thread to show (10 s to open the page); now 0.4 s (2.6 s).
    from selenium.webdriver.common.by import By

    url, runs_dir = tokenless
    store = RunRecords.create(runs_dir, "long", {"rounds": 300}).store
    for n in range(1, 251):
        store.write_round({"round": n, "dice": n / 1000, "sites": {"site-0": {"num_examples": 3, "val_dice": 0.5}}})
    browser.get(f"{url}runs/long")
    wait_for(browser, "return document.body.dataset.rendered === '250'")
    rows = browser.execute_script("return [...document.querySelectorAll('#timeline tbody tr')].map(r => r.dataset.round)")
    assert rows == [str(n) for n in range(250, 50, -1)]  # the latest 200, newest first
    assert text(browser, "#timeline-shown") == "The latest 200 of 250 rounds."
    dice = browser.execute_script("return Chart.getChart('chart-dice').data.datasets[0]")
    assert dice["data"] == [n / 1000 for n in range(1, 251)] and dice["pointRadius"] == 0  # every round, no dots
    chart = browser.execute_script("return Chart.getChart('chart-dice').id")

    browser.find_element(By.ID, "timeline-all").click()
    wait_for(browser, "return document.querySelectorAll('#timeline tbody tr').length === 250")
    assert text(browser, "#timeline-shown") == "All 250 rounds."
    store.write_round({"round": 251, "dice": 0.9, "sites": {"site-0": {"num_examples": 3, "val_dice": 0.5}}})
    wait_for(browser, "return document.body.dataset.rendered === '251'", timeout=15)
    assert browser.execute_script("return document.querySelectorAll('#timeline tbody tr').length") == 251
    assert browser.execute_script("return Chart.getChart('chart-dice').data.datasets[0].data.length") == 251
    assert browser.execute_script("return Chart.getChart('chart-dice').id") == chart  # redrawn in place
    browser.find_element(By.ID, "timeline-all").click()
    wait_for(browser, "return document.querySelectorAll('#timeline tbody tr').length === 200")
    assert browser.execute_script("return window.cspViolations") == []
