"""Dashboard JSON API on a real run store written by a real (short) federation; states; token; serving."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest
from starlette.testclient import TestClient

from common.data import synthesize
from dashboard_support import simulate
from server.dashboard import DashboardError, start_in_background
from server.dashboard.app import create_app
from server.run_records import RunRecords
from server.run_store import RunStore


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs/ with: `done` (2 real rounds, finished), `legacy` (rounds.jsonl only), `failed`, `empty`, `corrupt`."""
    data = tmp_path_factory.mktemp("dash-data")
    synthesize(data, sites=3, per_site=9, seed=0, image_size=64)
    home = tmp_path_factory.mktemp("dash-home")
    done = simulate(data, home, "done", rounds=2)
    runs_dir = home / "runs"
    legacy = runs_dir / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((done / "config.json").read_text())
    (legacy / "rounds.jsonl").write_text((done / "rounds.jsonl").read_text())
    failed = RunRecords.create(runs_dir, "failed", {"rounds": 3})
    failed.set_status("failed", "round 1: no site replied with a usable update")
    RunRecords.create(runs_dir, "empty", {"rounds": 3})
    (runs_dir / "corrupt").mkdir()
    (runs_dir / "corrupt" / "config.json").write_text("{}")
    (runs_dir / "corrupt" / "run.sqlite").write_bytes(b"this is not a database" * 100)
    return runs_dir


@pytest.fixture(scope="module")
def client(runs):
    with TestClient(create_app(runs)) as c:
        yield c


def test_runs_list(client, runs):
    body = client.get("/api/runs").json()
    rows = {r["name"]: r for r in body["runs"]}
    assert set(rows) == {"done", "legacy", "failed", "empty", "corrupt"}
    records = RunRecords(runs / "done").read_rounds()
    assert rows["done"]["status"] == "finished" and rows["done"]["rounds_done"] == 2
    assert rows["done"]["last_dice"] == records[-1]["dice"] and rows["done"]["started_at"]
    assert rows["failed"]["status"] == "failed" and rows["failed"]["rounds_done"] == 0
    assert rows["empty"]["status"] == "running" and rows["empty"]["last_dice"] is None
    assert rows["corrupt"]["status"] == "error" and "unreadable" in rows["corrupt"]["error"]
    assert rows["legacy"]["status"] == "unknown" and rows["legacy"]["rounds_done"] == 2


def test_run_detail_equals_the_store_and_the_records(client, runs):
    body = client.get("/api/runs/done").json()
    store = RunStore.in_run_dir(runs / "done").read()
    assert body["run"] == store["run"] and body["rounds"] == store["rounds"]
    assert body["run"]["config"] == json.loads((runs / "done" / "config.json").read_text())
    records = RunRecords(runs / "done").read_rounds()
    assert [r["round"] for r in body["rounds"]] == [1, 2]
    for api, rec in zip(body["rounds"], records):
        assert api["status"] == "ok"
        for key in ("dice", "dice_personal", "train_loss", "payload_bytes_up", "payload_bytes_down", "round_seconds"):
            assert api[key] == rec[key], key
        assert [s["site"] for s in api["sites"]] == sorted(rec["sites"]) == ["site-0", "site-1", "site-2"]
        for s in api["sites"]:
            row = rec["sites"][s["site"]]
            assert s["trained"] and s["evaluated"]
            for key in ("val_dice", "val_dice_personal", "num_examples", "payload_bytes_up", "payload_bytes_down"):
                assert s[key] == row[key], key
        assert api["failed"] == [] and api["excluded"] == []
        # full-model FedAvg: 3 train replies up; 3 train + 3 evaluate messages down
        assert api["full_model_bytes_up"] == 3 * body["run"]["full_model_bytes"]
        assert api["full_model_bytes_down"] == 6 * body["run"]["full_model_bytes"]
    assert body["run"]["full_model_bytes"] == body["run"]["meta"]["base_parameters"] * 2  # fp16 on the wire
    assert {d["name"] for d in body["downloads"]} == {"final", "round-0001", "round-0002"}


def test_legacy_run_is_imported_on_first_view(client, runs):
    assert (runs / "legacy" / "run.sqlite").is_file()  # the list above imported it
    legacy, done = client.get("/api/runs/legacy").json(), client.get("/api/runs/done").json()
    assert legacy["run"]["source"] == "rounds.jsonl"
    assert [r["dice"] for r in legacy["rounds"]] == [r["dice"] for r in done["rounds"]]
    assert legacy["run"]["full_model_bytes"] is None  # not recorded in rounds.jsonl: the page says n/a


def test_clear_states_and_errors(client):
    assert client.get("/api/runs/failed").json()["run"]["reason"].startswith("round 1")
    assert client.get("/api/runs/empty").json()["rounds"] == []
    r = client.get("/api/runs/corrupt")
    assert r.status_code == 500 and "unreadable" in r.json()["error"] and "Traceback" not in r.text
    r = client.get("/runs/corrupt")
    assert r.status_code == 500 and "unreadable" in r.text and "Traceback" not in r.text
    for path in ("/api/runs/nope", "/api/runs/..", "/runs/nope"):
        assert client.get(path).status_code == 404
    assert client.get("/runs/done/download/..%2Fconfig.zip").status_code == 404
    assert client.post("/api/runs").status_code == 405


def test_a_malformed_older_run_is_one_error_row_and_its_own_page_says_why(tmp_path):
    runs_dir = tmp_path / "runs"
    RunRecords.create(runs_dir, "good", {"rounds": 2}).append_round({"round": 1, "dice": 0.5})
    bad = {"old-noround": (b'{"rounds": 3}', b'{"dice": 0.5}\n'),  # older-style folders: no run.sqlite
           "old-list": (b'{"rounds": 3}', b"[1, 2]\n"),
           "old-roundstr": (b'{"rounds": 3}', b'{"round": "two"}\n'),
           "old-latin1": (b'{"note": "caf\xe9"}', b'{"round": 1}\n')}
    for name, (config, rounds) in bad.items():
        (runs_dir / name).mkdir()
        (runs_dir / name / "config.json").write_bytes(config)
        (runs_dir / name / "rounds.jsonl").write_bytes(rounds)
    with TestClient(create_app(runs_dir)) as c:
        r = c.get("/api/runs")
        assert r.status_code == 200, r.text
        rows = {row["name"]: row for row in r.json()["runs"]}
        assert rows["good"]["status"] == "running" and rows["good"]["last_dice"] == 0.5
        assert {name for name, row in rows.items() if row["status"] == "error"} == set(bad)
        assert "rounds.jsonl line 1: a round record needs a 'round' key" in rows["old-noround"]["error"]
        assert "config.json line 1: not UTF-8" in rows["old-latin1"]["error"]
        r = c.get("/api/runs/old-roundstr")
        assert r.status_code == 500 and r.json()["error"].startswith("run 'old-roundstr' cannot be read: ")
        assert "'round' must be an integer" in r.json()["error"]
        r = c.get("/runs/old-list")
        assert r.status_code == 500 and "cannot be shown" in r.text and "must be a JSON object" in r.text


def test_any_failure_of_one_run_stays_that_runs_own(tmp_path, monkeypatch):
    import server.dashboard.app as dashboard_app

    runs_dir = tmp_path / "runs"
    for name in ("good", "odd"):
        RunRecords.create(runs_dir, name, {"rounds": 2})
    real = dashboard_app.ensure_store

    def ensure_store(path):  # a failure nobody foresaw, in one run only
        if path.name == "odd":
            raise KeyError("surprise")
        return real(path)

    monkeypatch.setattr(dashboard_app, "ensure_store", ensure_store)
    with TestClient(create_app(runs_dir)) as c:
        rows = {row["name"]: row for row in c.get("/api/runs").json()["runs"]}
        assert rows["good"]["status"] == "running"
        assert rows["odd"]["status"] == "error" and rows["odd"]["error"] == "KeyError: 'surprise'"
        r = c.get("/api/runs/odd")
        assert r.status_code == 500 and r.json()["error"] == "run 'odd' cannot be read: KeyError: 'surprise'"


def test_anything_but_get_is_405_and_json_on_the_api(client):
    for method, path in (("post", "/api/runs"), ("delete", "/api/runs/done"), ("put", "/api/runs/nope")):
        r = getattr(client, method)(path)
        assert r.status_code == 405 and r.headers["content-type"] == "application/json", (path, r.text)
        assert "read-only" in r.json()["error"] and "GET" in r.headers["allow"]
    r = client.post("/runs/done")
    assert r.status_code == 405 and "read-only" in r.text


def test_pages_and_static_assets_are_served_locally(client):
    for path in ("/", "/runs/done", "/runs/failed", "/runs/empty"):
        r = client.get(path)
        assert r.status_code == 200
        assert "http://" not in r.text and "https://" not in r.text  # nothing fetched from elsewhere
    chart = client.get("/static/chart.umd.min.js")
    assert chart.status_code == 200 and "Chart.js v4" in chart.text[:200]
    assert "MIT" in client.get("/static/chart.js-LICENSE.md").text


def test_download_final_adapter(client):
    import io
    import zipfile

    r = client.get("/runs/done/download/final.zip")
    assert r.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    assert "done-final/adapter/adapter_model.safetensors" in names and "done-final/summary.json" in names


def test_token_is_required_on_every_route(runs):
    with TestClient(create_app(runs, token="s3cret")) as c:
        for path in ("/", "/runs/done", "/api/runs", "/api/runs/done", "/static/chart.umd.min.js",
                     "/runs/done/download/final.zip", "/nope"):
            assert c.get(path).status_code == 401, path
        assert c.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/?token=s3cret").status_code == 200  # sets the cookie the page's scripts then use
        assert c.get("/api/runs/done").status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_start_in_background_serves_and_reports_a_taken_port(runs, monkeypatch):
    monkeypatch.delenv("FEDVLSM_DASHBOARD_TOKEN", raising=False)
    url = start_in_background(runs, "127.0.0.1", 0, None)
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url + "api/runs", timeout=10) as r:
        assert "done" in {x["name"] for x in json.load(r)["runs"]}
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    with pytest.raises(DashboardError, match="pick another port"):
        start_in_background(runs, "127.0.0.1", port, None)
    with pytest.raises(DashboardError, match="without an access token"):
        start_in_background(runs, "0.0.0.0", _free_port(), None)
    monkeypatch.setenv("FEDVLSM_DASHBOARD_TOKEN", "tok")
    url = start_in_background(runs, "127.0.0.1", 0, None)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url + "api/runs", timeout=10)
    assert err.value.code == 401
