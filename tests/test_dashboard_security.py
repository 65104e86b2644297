"""The dashboard as a consortium's coordinator relies on it: untrusted text, headers, binding, links, FIFOs.

Site names (each site picks its own `--site-name`), failure reasons and config
values reach the pages; the runs folder may hold links nobody meant to serve.
Runs here are written with RunRecords (no federation): every test takes
well under a second.
"""

from __future__ import annotations

import io
import json
import os
import re
import threading
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from server.dashboard import start_in_background
from server.dashboard.app import SECURITY_HEADERS, create_app, is_loopback_name
from server.run_records import RunRecords

EVIL = '<img src=x onerror="window.pwned=1">'
STATIC = Path(__file__).resolve().parents[1] / "server" / "dashboard" / "static"


def evil_run(runs_dir: Path, name: str = "evil") -> RunRecords:
    """A run whose site names, phases, reasons, config keys and values are markup."""
    records = RunRecords.create(runs_dir, name, {"rounds": 3, EVIL: EVIL, "dp": EVIL})
    records.append_round({"round": 1, "dice": 0.5, "time": EVIL, "sites": {
        EVIL: {"num_examples": 3, "val_dice": 0.4, "val_examples": 2, "epsilon": 1.0},
        '"><svg onload="window.pwned=2">': {"num_examples": 2, "val_dice": 0.3, "val_examples": 2}},
        "failures": [{"site": EVIL, "phase": EVIL, "reason": EVIL}],
        "excluded": [f"train: node {EVIL}: {EVIL}"]})
    records.set_status("failed", EVIL)
    return records


@pytest.fixture
def runs(tmp_path):
    runs_dir = tmp_path / "runs"
    evil_run(runs_dir)
    done = RunRecords.create(runs_dir, "done", {"rounds": 1})
    done.append_round({"round": 1, "dice": 0.5, "sites": {"site-0": {"num_examples": 3}}})
    checkpoint = done.run_dir / "checkpoints" / "round-0001"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text("{}")
    (checkpoint / "global.safetensors").write_bytes(b"weights")
    return runs_dir


# --------------------------------------------------------------- injection
def test_every_response_carries_a_strict_csp_and_nosniff(runs, monkeypatch):
    # Before: no Content-Security-Policy, X-Content-Type-Options or frame policy on any response.
    import server.dashboard.app as dashboard_app

    with TestClient(create_app(runs), raise_server_exceptions=False) as c:
        responses = {path: c.get(path) for path in (
            "/", "/runs/evil", "/api/runs", "/api/runs/evil", "/static/run.js", "/static/chart.umd.min.js",
            "/runs/done/download/round-0001.zip", "/nope", "/api/nope", "/runs/nope")}
        responses["POST /api/runs"] = c.post("/api/runs")
        monkeypatch.setattr(dashboard_app, "list_runs", lambda runs_dir: 1 / 0)  # a failure nobody foresaw
        responses["500 /api/runs"] = c.get("/api/runs")
    with TestClient(create_app(runs, token="t")) as c:
        responses["401 /"] = c.get("/")
    for what, r in responses.items():
        for header, value in SECURITY_HEADERS.items():
            assert r.headers.get(header) == value, (what, r.status_code, header)
    csp = SECURITY_HEADERS["Content-Security-Policy"]
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp and "script-src 'self'" in csp
    assert responses["500 /api/runs"].status_code == 500
    assert responses["/api/runs/evil"].headers["content-type"] == "application/json"
    assert responses["/runs/done/download/round-0001.zip"].headers["content-type"] == "application/zip"


def test_pages_hold_no_inline_script_or_style(runs):
    # The CSP allows scripts and styles from /static only: an inline one would be blocked, so there is none.
    with TestClient(create_app(runs)) as c:
        for path in ("/", "/runs/evil", "/runs/nope"):
            page = c.get(path).text
            assert not re.search(r"<script(?![^>]*\bsrc=)", page), path
            assert "<style" not in page and " style=" not in page and not re.search(r"\son\w+=", page), path


def test_scripts_never_insert_text_as_html():
    # Site names, reasons and config values are set with textContent / text nodes only.
    for script in ("common.js", "run.js", "runs.js"):
        source = (STATIC / script).read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in source, (script, sink)


def test_markup_in_site_strings_comes_back_as_data(runs):
    with TestClient(create_app(runs)) as c:
        body = c.get("/api/runs/evil").json()
        assert body["run"]["reason"] == EVIL and body["run"]["config"][EVIL] == EVIL
        assert EVIL in [s["site"] for s in body["rounds"][0]["sites"]]
        assert body["rounds"][0]["failed"] == [{"site": EVIL, "phase": EVIL, "reason": EVIL}]
        error = c.get("/runs/%3Cscript%3Ealert(1)%3C%2Fscript%3E").text  # the path, shown on the error page
        assert "<script>alert(1)" not in error and "&lt;script&gt;" in error


# --------------------------------------------------------------- exposure
@pytest.mark.parametrize("host, ok", [
    ("127.0.0.1:8050", True), ("localhost:8050", True), ("localhost", True), ("127.5.6.7", True),
    ("[::1]:8050", True), ("LOCALHOST:1", True), ("attacker.example:8050", False), ("attacker.example", False),
    ("localhost.attacker.example", False), ("10.0.0.1:8050", False), ("", False), ("[::1", False)])
def test_loopback_names(host, ok):
    assert is_loopback_name(host) is ok


def _get(url: str, host: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_a_tokenless_dashboard_answers_only_requests_addressed_to_loopback(runs, monkeypatch):
    # Before: `curl -H 'Host: attacker.example:PORT' http://127.0.0.1:PORT/api/runs` answered 200 with every run:
    # a web page on attacker.example, re-resolved to 127.0.0.1 (DNS rebinding), could read the dashboard.
    monkeypatch.delenv("FEDVLSM_DASHBOARD_TOKEN", raising=False)
    url = start_in_background(runs, "127.0.0.1", 0, None)
    port = url.rstrip("/").rsplit(":", 1)[1]
    for host in (f"attacker.example:{port}", "attacker.example", f"192.168.1.10:{port}"):
        for path in ("api/runs", "", "runs/evil", "static/run.js"):
            status, text = _get(url + path, host)
            assert status == 421 and "evil" not in text and "serve it with --token" in text, (host, path)
    assert json.loads(_get(url + "api/runs", f"attacker.example:{port}")[1])["error"]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        status, text = _get(url + "api/runs", host)
        assert status == 200 and "evil" in text, host
    # With a token the rebound page has no token (its cookie is the dashboard host's): any Host is fine.
    monkeypatch.setenv("FEDVLSM_DASHBOARD_TOKEN", "tok")
    url = start_in_background(runs, "127.0.0.1", 0, None)
    assert _get(url + "api/runs", "attacker.example")[0] == 401
    assert _get(url + "api/runs?token=tok", "dashboard.hospital.example")[0] == 200


def test_it_binds_to_loopback_by_default():
    import inspect

    from common.cli import build_parser
    from server.dashboard import serve

    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(start_in_background).parameters["host"].default == "127.0.0.1"
    assert build_parser().parse_args(["dashboard"]).host == "127.0.0.1"


def test_a_linked_file_or_folder_in_a_checkpoint_is_not_zipped(runs, tmp_path):
    # Before: checkpoints/round-0001/notes.txt -> a file outside the runs folder was in the zip, content and all.
    secret = tmp_path / "secret.txt"
    secret.write_text("not the dashboard's to serve")
    checkpoint = runs / "done" / "checkpoints" / "round-0001"
    (checkpoint / "notes.txt").symlink_to(secret)
    (checkpoint / "up").symlink_to(tmp_path)
    with TestClient(create_app(runs)) as c:
        r = c.get("/runs/done/download/round-0001.zip")
    assert r.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    assert names == ["done-round-0001/global.safetensors", "done-round-0001/state.json"]
    assert b"not the dashboard's" not in r.content


def test_a_linked_download_folder_is_refused(runs, tmp_path):
    # Before: final -> a folder outside the run: the whole folder (and links in it) came back zipped.
    outside = tmp_path / "outside"
    (outside / "adapter").mkdir(parents=True)
    (outside / "secret.txt").write_text("not the dashboard's to serve")
    (runs / "done" / "checkpoints" / "round-0002").symlink_to(outside)
    with TestClient(create_app(runs)) as c:
        assert "round-0002" not in {d["name"] for d in c.get("/api/runs/done").json()["downloads"]}
        r = c.get("/runs/done/download/round-0002.zip")
        assert r.status_code == 403 and "symbolic link" in r.text and b"not the dashboard" not in r.content
        (runs / "done" / "final").symlink_to(outside)
        r = c.get("/runs/done/download/final.zip")
        assert r.status_code == 403 and "symbolic link" in r.text and b"not the dashboard" not in r.content
        r = c.get("/api/runs/done")
        assert r.status_code == 500 and "final: is a symbolic link" in r.json()["error"]


def test_a_linked_run_folder_is_an_error_row_and_nothing_is_written_where_it_points(runs, tmp_path):
    # Before: runs/linked -> a folder elsewhere with a config.json was listed as a run, and viewing the list
    # wrote run.sqlite into that folder (the import), outside the runs folder.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text('{"rounds": 1}')
    (runs / "linked").symlink_to(elsewhere)
    with TestClient(create_app(runs)) as c:
        rows = {row["name"]: row for row in c.get("/api/runs").json()["runs"]}
        assert rows["linked"]["status"] == "error" and "symbolic link" in rows["linked"]["error"]
        assert rows["done"]["status"] == "running"  # the others are unaffected
        r = c.get("/api/runs/linked")
        assert r.status_code == 500 and "symbolic link" in r.json()["error"]
        assert c.get("/runs/linked").status_code == 500
        assert c.get("/runs/linked/download/final.zip").status_code == 403
    assert sorted(p.name for p in elsewhere.iterdir()) == ["config.json"]


def test_a_linked_config_is_not_read(tmp_path):
    # Before: an older run folder whose config.json links to another JSON file showed that file as the config.
    runs_dir = tmp_path / "runs"
    (runs_dir / "old").mkdir(parents=True)
    private = tmp_path / "private.json"
    private.write_text('{"password": "hunter2"}')
    (runs_dir / "old" / "config.json").symlink_to(private)
    (runs_dir / "old" / "rounds.jsonl").write_text('{"round": 1, "dice": 0.5}\n')
    with TestClient(create_app(runs_dir)) as c:
        row = c.get("/api/runs").json()["runs"][0]
        assert row["status"] == "error" and "config.json: is a symbolic link" in row["error"]
        r = c.get("/api/runs/old")
        assert r.status_code == 500 and "hunter2" not in r.text
    assert not (runs_dir / "old" / "run.sqlite").exists()


@pytest.mark.parametrize("fifo", ["final/summary.json", "claim", "config.json"])
def test_a_fifo_in_a_run_folder_does_not_hang_the_dashboard(tmp_path, fifo):
    # Before: a FIFO as a finished run's final/summary.json, or as its claim (<runs>/.<name>.lock), blocked
    # the reader for ever, and with it (the handlers being async) every request; config.json was skipped
    # as missing (an `unknown` run with an empty config).
    runs_dir = tmp_path / "runs"
    odd = RunRecords.create(runs_dir, "odd", {"rounds": 1})
    odd.set_status("finished")
    path = runs_dir / ".odd.lock" if fifo == "claim" else odd.run_dir / fifo
    path.parent.mkdir(exist_ok=True)
    path.unlink(missing_ok=True)
    if fifo == "config.json":
        (odd.run_dir / "run.sqlite").unlink()  # an older run folder: imported from its files
        (odd.run_dir / "rounds.jsonl").write_text('{"round": 1}\n')
    os.mkfifo(path)
    RunRecords.create(runs_dir, "good", {"rounds": 1})
    result: dict = {}

    def fetch():
        with TestClient(create_app(runs_dir)) as c:
            result["rows"] = {row["name"]: row for row in c.get("/api/runs").json()["runs"]}
            result["run"] = c.get("/api/runs/odd")

    worker = threading.Thread(target=fetch, daemon=True)
    worker.start()
    worker.join(20)
    if worker.is_alive():  # let the stuck reader go, then fail
        open(path, "w").close()  # a writer on the FIFO lets the blocked open return
        pytest.fail(f"the dashboard hung on a FIFO as {fifo}")
    rows = result["rows"]
    assert rows["odd"]["status"] == "error" and "not a plain file" in rows["odd"]["error"], rows["odd"]
    assert rows["good"]["status"] == "running"
    assert result["run"].status_code == 500 and "not a plain file" in result["run"].json()["error"]


def test_only_get_is_answered(runs):
    with TestClient(create_app(runs)) as c:
        for method in ("post", "put", "delete", "patch"):
            for path in ("/api/runs", "/api/runs/done", "/runs/done", "/runs/done/download/round-0001.zip",
                         "/static/run.js"):
                r = c.request(method.upper(), path)
                assert r.status_code == 405, (method, path, r.status_code)
        assert c.head("/api/runs").status_code == 200


def test_a_run_name_with_a_newline_is_not_a_run(runs):
    # `re.match(r"...$")` let a final newline through.
    (runs / "done\n").mkdir()
    (runs / "done\n" / "config.json").write_text("{}")
    with TestClient(create_app(runs)) as c:
        assert "done\n" not in {row["name"] for row in c.get("/api/runs").json()["runs"]}
        assert c.get("/api/runs/done%0A").status_code == 404
