"""Rebuild docs/dashboard-runs.png and docs/dashboard-run.png from real runs (headless Chromium).

Runs a 6-round federation on the demo base and a 2-round one on arch:tiny
(the real ServerApp round loop and ClientApp handlers, in-process, see
tests/dashboard_support.py), registers a failed run, serves the dashboard and
takes the screenshots. Needs /usr/bin/chromium, /usr/bin/chromedriver and
selenium. About 30 s on 2 CPU cores.

    python scripts/dashboard_screenshots.py [WORK_DIR]
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from common.data import synthesize
    from dashboard_support import simulate
    from server.dashboard import start_in_background
    from server.run_records import RunRecords

    work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/fedvlsm-dashboard-shots")
    shutil.rmtree(work, ignore_errors=True)
    synthesize(work / "data", sites=3, per_site=16, seed=0, image_size=64)
    simulate(work / "data", work / "home", "demo-fedavg-shallow-vlc", rounds=6, base="demo",
             personal=("adapters.cond",))
    simulate(work / "data", work / "home", "tiny-fedprox", rounds=2, strategy="fedprox", prox_mu=0.1)
    failed = RunRecords.create(work / "home" / "runs", "failed-run", {"rounds": 10})
    failed.set_status("failed", "run config 'min-sites': 1 of 3 site(s) connected after 600s")
    url = start_in_background(work / "home" / "runs", "127.0.0.1", 0, None)

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,900", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(url)
        time.sleep(3)
        driver.save_screenshot(str(ROOT / "docs" / "dashboard-runs.png"))
        driver.get(url + "runs/demo-fedavg-shallow-vlc")
        time.sleep(3)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1400, height + 20)
        time.sleep(2)
        driver.save_screenshot(str(ROOT / "docs" / "dashboard-run.png"))
    finally:
        driver.quit()
    print("wrote docs/dashboard-runs.png, docs/dashboard-run.png")


if __name__ == "__main__":
    main()
