"""What a long run's page costs in the browser: opening it, and showing each new round.

Builds a run store of ROUNDS rounds x SITES sites (as bench/dashboard_poll.py),
serves it with `start_in_background`, opens the run's page in headless
Chromium (Debian's chromium + chromium-driver, via Selenium) and measures:

    open_seconds        from the page load to every round drawn
    shown_seconds       from a new round written to the store to the page showing it (the page polls every 2 s)
    redraw_ms           one redraw of the whole page in its main thread, layout included
                        (figures, charts, tables; what each new round costs the page)

    python bench/dashboard_page.py                      # 5000 rounds x 10 sites, 3 new rounds
    ROUNDS=300 SITES=3 NEW=2 python bench/dashboard_page.py
Writes bench/results/cpu-<host>-dashboard_page.json (or $OUT/...).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import dashboard_poll  # noqa: E402  (its ROUNDS and SITES come from the same environment)
from server.dashboard import start_in_background  # noqa: E402

NEW = int(os.environ.get("NEW", "3"))
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
REDRAW = """const t = [performance.now()];
renderFigures(held); document.body.offsetHeight; t.push(performance.now());
renderCharts(held); document.body.offsetHeight; t.push(performance.now());
renderTables(held); document.body.offsetHeight; t.push(performance.now());
return [t[1] - t[0], t[2] - t[1], t[3] - t[2]];"""


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1800"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def wait_rendered(driver, n: int, timeout: float = 120.0) -> float:
    t0 = time.perf_counter()
    while driver.execute_script("return document.body.dataset.rendered") != str(n):
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"the page did not show {n} rounds within {timeout} s")
        time.sleep(0.02)
    return time.perf_counter() - t0


def main() -> None:
    rounds, sites = dashboard_poll.ROUNDS, dashboard_poll.SITES
    with tempfile.TemporaryDirectory() as tmp:
        store = dashboard_poll.build(Path(tmp))
        url = start_in_background(Path(tmp), "127.0.0.1", 0, None)
        driver = browser()
        try:
            t0 = time.perf_counter()
            driver.get(url + "runs/long")
            wait_rendered(driver, rounds)
            res = {"rounds": rounds, "sites": sites, "machine": platform.node(), "open_seconds": time.perf_counter() - t0,
                   "shown_seconds": [], "redraw_ms": []}
            for k in range(1, NEW + 1):
                store.write_round(dashboard_poll.record(rounds + k))
                res["shown_seconds"].append(wait_rendered(driver, rounds + k))
                res["redraw_ms"].append(dict(zip(("figures", "charts", "tables"), driver.execute_script(REDRAW))))
        finally:
            driver.quit()
    totals = [sum(r.values()) for r in res["redraw_ms"]]
    res["redraw_ms_median"] = statistics.median(totals)
    print(f"dashboard page of a {rounds}-round run with {sites} sites (headless Chromium)")
    print(f"open: {res['open_seconds']:.2f} s to every round drawn")
    print("new round shown after (s): " + ", ".join(f"{s:.2f}" for s in res["shown_seconds"]) + " (polled every 2 s)")
    print("one redraw, layout included (ms, figures/charts/tables): "
          + "; ".join("/".join(f"{v:.0f}" for v in r.values()) for r in res["redraw_ms"])
          + f"; median total {res['redraw_ms_median']:.0f} ms")
    dashboard_poll.write_result("dashboard_page", res)


if __name__ == "__main__":
    main()
