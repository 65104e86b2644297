"""/api/runs/<name>?since=N&base=K: a run's page polls only the rounds after those it holds.

Before, every 2 s poll re-read and re-sent the whole run (every round's site
rows: 18 MB at 5,000 rounds x 10 sites). Now a poll with the last round held
and the `rounds_key` it came with gets only the later rounds, unless the
rounds held changed (a resume rewound and rewrote them, a new run took the
name): then the whole run again, `since` null. What a page merges must equal
what a full read returns, whatever happened in between.
"""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from server.dashboard.app import create_app
from server.run_records import RunRecords


def _round(n: int, dice: float, sites: int = 3, failed: bool = False) -> dict:
    record = {"round": n, "status": "ok", "dice": dice, "dice_personal": dice + 0.01, "train_loss": 1.0 / n,
              "payload_bytes_up": 1000 * sites, "payload_bytes_down": 2000 * sites, "time": f"2026-12-07T10:00:{n:02d}+00:00",
              "sites": {f"site-{i}": {"num_examples": 10 + i, "val_dice": dice, "val_examples": 5,
                                      "payload_bytes_up": 1000} for i in range(sites)}}
    if failed:
        record["failures"] = [{"site": "site-9", "phase": "train", "reason": "out of memory"}]
    return record


class Page:
    """What run.js does: hold the run, poll with since/base, merge."""

    def __init__(self, client: TestClient, name: str) -> None:
        self.client, self.url, self.held = client, f"/api/runs/{name}", None
        self.last_since: object = "never polled"

    def poll(self) -> dict:
        url = self.url
        if self.held and self.held["rounds"]:
            url += f"?since={self.held['rounds'][-1]['round']}&base={self.held['rounds_key']}"
        r = self.client.get(url)
        assert r.status_code == 200, r.text
        body = r.json()
        self.last_since = body["since"]
        if body["since"] is not None:
            assert self.held is not None
            body = {**body, "since": None,  # the merged run is a whole one
                    "rounds": [x for x in self.held["rounds"] if x["round"] <= body["since"]] + body["rounds"]}
        self.held = body
        return body


@pytest.fixture()
def setup(tmp_path):
    runs = tmp_path / "runs"
    records = RunRecords.create(runs, "live", {"rounds": 10})
    client = TestClient(create_app(runs))
    return records, client


def full(client: TestClient) -> dict:
    body = client.get("/api/runs/live").json()
    assert body["since"] is None
    return body


def test_a_poll_gets_only_the_new_rounds_and_merges_to_the_full_run(setup):
    records, client = setup
    page = Page(client, "live")
    assert page.poll()["rounds"] == [] and page.last_since is None
    for n in (1, 2, 3):
        records.append_round(_round(n, 0.1 * n, failed=n == 2))
    assert len(page.poll()["rounds"]) == 3 and page.last_since is None  # held nothing: the whole run

    records.append_round(_round(4, 0.4))
    r = client.get(f"/api/runs/live?since=3&base={page.held['rounds_key']}").json()
    assert r["since"] == 3 and [x["round"] for x in r["rounds"]] == [4]
    assert [s["site"] for s in r["rounds"][0]["sites"]] == ["site-0", "site-1", "site-2"]
    merged = page.poll()
    assert page.last_since == 3
    assert merged == full(client)  # rounds, site rows, events, derived figures, run row: all equal

    # Nothing new: no rounds, the same key; the run row (status) still comes with every poll.
    records.set_status("finished")
    r = client.get(f"/api/runs/live?since=4&base={page.held['rounds_key']}").json()
    assert r["since"] == 4 and r["rounds"] == [] and r["rounds_key"] == page.held["rounds_key"]
    assert page.poll()["run"]["status"] == "finished" and page.held == full(client)


def test_rewritten_rounds_send_the_whole_run_again(setup):
    records, client = setup
    page = Page(client, "live")
    for n in (1, 2, 3, 4):
        records.append_round(_round(n, 0.1 * n))
    page.poll()

    # A resume: rounds after 2 forgotten and round 3 written again with other figures.
    records.rewind_to(2)
    records.append_round(_round(3, 0.9))
    assert page.poll() == full(client) and page.last_since is None
    assert [x["round"] for x in page.held["rounds"]] == [1, 2, 3] and page.held["rounds"][-1]["dice"] == 0.9

    # Round 3 rewritten with the same round figures but other site rows is noticed too.
    held_key = page.held["rounds_key"]
    records.rewind_to(2)
    records.append_round(_round(3, 0.9, sites=2) | {"payload_bytes_up": 3000, "payload_bytes_down": 6000})
    r = client.get(f"/api/runs/live?since=3&base={held_key}").json()
    assert r["since"] is None and len(r["rounds"][-1]["sites"]) == 2

    # A new run under the same name (its rounds 1..3 as before, another start): the whole run.
    page.poll()
    records.store.register_run("live", {"rounds": 10}, started_at="2026-12-08T00:00:00+00:00")
    for n in (1, 2, 3):
        records.append_round(_round(n, 0.1 * n) if n < 3 else _round(3, 0.9, sites=2)
                             | {"payload_bytes_up": 3000, "payload_bytes_down": 6000})
    assert page.poll() == full(client) and page.last_since is None
    assert page.held["run"]["started_at"] == "2026-12-08T00:00:00+00:00"


def test_a_changed_full_model_size_resends_the_derived_figures(setup):
    # Each round's full-model bytes derive from the run's full-model size, set once the server built its model.
    records, client = setup
    page = Page(client, "live")
    records.append_round(_round(1, 0.5))
    page.poll()
    assert page.held["rounds"][0]["full_model_bytes_up"] is None
    records.set_meta({"base_parameters": 1000})
    assert page.poll() == full(client) and page.last_since is None
    assert page.held["rounds"][0]["full_model_bytes_up"] == 3 * 4000  # 3 trained sites x 1000 fp32 parameters


@pytest.mark.parametrize("query, why", [
    ("since=3", "go together"),
    ("base=" + "0" * 32, "go together"),
    ("since=abc&base=" + "0" * 32, "'since' must be a round number"),
    ("since=99999999999999999999&base=" + "0" * 32, "'since' must be a round number"),
    ("since=3&base=xyz", "'base' must be a rounds_key"),
    ("since=3&base=" + "A" * 32, "'base' must be a rounds_key"),
])
def test_a_malformed_poll_is_400_naming_the_parameter(setup, query, why):
    _, client = setup
    r = client.get(f"/api/runs/live?{query}")
    assert r.status_code == 400 and why in r.json()["error"]


def test_an_unknown_base_gets_the_whole_run(setup):
    records, client = setup
    records.append_round(_round(1, 0.5))
    r = client.get("/api/runs/live?since=1&base=" + "0" * 32).json()
    assert r["since"] is None and [x["round"] for x in r["rounds"]] == [1]
    assert r == full(client)


def test_a_slow_read_does_not_hold_up_other_requests(tmp_path, monkeypatch):
    # The routes were coroutines that read the disk: one slow read (a large run, a busy disk) stalled the
    # event loop, so every other request, the runs list included, waited for it.
    import threading
    import time
    import urllib.request

    import server.dashboard.app as app
    from server.dashboard import start_in_background

    runs = tmp_path / "runs"
    RunRecords.create(runs, "live", {"rounds": 10}).append_round(_round(1, 0.5))
    released = threading.Event()
    real = app.read_run

    def slow_read(*args, **kwargs):
        released.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(app, "read_run", slow_read)
    url = start_in_background(runs, "127.0.0.1", 0, None)
    slow = threading.Thread(target=lambda: urllib.request.urlopen(url + "api/runs/live", timeout=20).read())
    slow.start()
    time.sleep(0.3)  # the slow request is in its read
    t0 = time.monotonic()
    with urllib.request.urlopen(url + "api/runs", timeout=20) as r:
        listed = r.read()
    waited = time.monotonic() - t0
    released.set()
    slow.join(20)
    assert b'"live"' in listed and waited < 5, waited  # before: 10 s, the slow read's whole wait
