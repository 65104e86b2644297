"""The dashboard over runs folders as they are found: odd paths, no write access, a run written while read.

Runs here are written with RunRecords (no federation): each test takes about a second.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from server.dashboard import app as dashboard_app
from server.dashboard.app import create_app
from server.run_records import RunRecords


def a_run(runs_dir: Path, name: str = "r", rounds: int = 2, finished: bool = True) -> RunRecords:
    records = RunRecords.create(runs_dir, name, {"rounds": rounds})
    for k in range(1, rounds + 1):
        records.append_round({"round": k, "dice": k / 10, "sites": {"site-0": {"num_examples": 3, "val_dice": 0.5,
                                                                                "val_examples": 2}}})
    if finished:
        records.set_status("finished")
    return records


@pytest.mark.parametrize("odd", ["a#b", "a?b", "a%41b", "a b"])
def test_a_runs_folder_whose_path_has_uri_characters(tmp_path, odd):
    # Before: the store was opened as the URI `file:<path>?mode=...`: a '#' or '?' in the path cut it short
    # (RunRecords.create wrote a database at `<tmp>/a` and then failed: FileNotFoundError), '%41' was read
    # as 'A' (cannot open the run store), so neither the server nor the dashboard could use such a folder.
    runs_dir = tmp_path / odd / "runs"
    a_run(runs_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == [odd]  # nothing written beside it
    with TestClient(create_app(runs_dir)) as c:
        (row,) = c.get("/api/runs").json()["runs"]
        assert row["status"] == "finished" and row["rounds_done"] == 2, row
        assert [r["dice"] for r in c.get("/api/runs/r").json()["rounds"]] == [0.1, 0.2]
    legacy = runs_dir / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text('{"rounds": 1}')
    (legacy / "rounds.jsonl").write_text('{"round": 1, "dice": 0.5}\n')
    with TestClient(create_app(runs_dir)) as c:
        assert c.get("/api/runs/legacy").json()["rounds"][0]["dice"] == 0.5


def _without_write_access(path: Path, fn):
    """fn() run by a process that can read `path` but not write in it; its JSON-able result, or its error text."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)  # nobody: reads what others may read, writes nothing of ours
            else:
                for folder in [path, *path.iterdir()]:
                    if folder.is_dir():
                        folder.chmod(0o555)
            try:
                out = {"ok": fn()}
            except Exception as err:  # noqa: BLE001 - the test says what it was
                out = {"error": f"{type(err).__name__}: {err}"}
            os.write(write, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 1 << 16):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    if os.geteuid() != 0:
        for folder in [path, *path.iterdir()]:
            if folder.is_dir():
                folder.chmod(0o755)
    return json.loads(b"".join(chunks) or b'{"error": "the child said nothing"}')


@pytest.fixture
def readable_tmp(tmp_path):
    """A folder others may read: pytest's own are 0700, closed to `nobody`."""
    if os.geteuid() != 0:
        return tmp_path
    folder = Path(tempfile.mkdtemp(prefix="fedvlsm-dashboard-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_reader_without_write_access_to_the_runs_folder(readable_tmp):
    # The coordinator runs the dashboard as a user who may read the server's runs, not write them.
    # Before: every run of a server that had ended was an error row, "not a fedvlsm run store (attempt to
    # write a readonly database)": SQLite's WAL wants to create run.sqlite-shm beside the store.
    runs_dir = readable_tmp / "runs"
    a_run(runs_dir, "done")
    live = a_run(runs_dir, "live", finished=False)
    legacy = runs_dir / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text('{"rounds": 1}')
    (legacy / "rounds.jsonl").write_text('{"round": 1, "dice": 0.5}\n')

    def view():
        rows = {row["name"]: row for row in dashboard_app.list_runs(runs_dir)["runs"]}
        return rows, dashboard_app.read_run(runs_dir, "done")["rounds"]

    out = _without_write_access(runs_dir, view)
    assert "ok" in out, out
    rows, rounds = out["ok"]
    assert rows["done"]["status"] == "finished" and rows["done"]["rounds_done"] == 2, rows["done"]
    assert [r["dice"] for r in rounds] == [0.1, 0.2]
    assert rows["live"]["status"] == "running" and rows["live"]["rounds_done"] == 2, rows["live"]
    # An older run folder needs its run.sqlite made once: the reason says so.
    assert rows["legacy"]["status"] == "error" and "write access" in rows["legacy"]["error"], rows["legacy"]
    assert not (runs_dir / "done" / "run.sqlite-shm").exists()
    live.append_round({"round": 3, "dice": 0.3})  # the server writes on, unhindered
    assert _without_write_access(runs_dir, lambda: dashboard_app.read_run(runs_dir, "live")["rounds"][-1]["dice"]) \
        == {"ok": 0.3}


def test_a_run_written_while_it_is_read(tmp_path):
    # Every answer is one consistent snapshot: rounds in order, each with all its sites.
    runs_dir = tmp_path / "runs"
    records = RunRecords.create(runs_dir, "live", {"rounds": 60})
    seen, problems = [], []

    def write():
        for k in range(1, 61):
            records.append_round({"round": k, "dice": k / 100, "sites": {
                f"site-{i}": {"num_examples": 3, "val_dice": 0.5, "val_examples": 2} for i in range(4)}})
        records.set_status("finished")

    writer = threading.Thread(target=write)
    with TestClient(create_app(runs_dir)) as c:
        writer.start()
        while writer.is_alive() or not seen or seen[-1] != 60:
            for path in ("/api/runs", "/api/runs/live"):
                r = c.get(path)
                if r.status_code != 200:
                    problems.append((path, r.status_code, r.text))
                    continue
                if path == "/api/runs/live":
                    rounds = r.json()["rounds"]
                    seen.append(len(rounds))
                    if [x["round"] for x in rounds] != list(range(1, len(rounds) + 1)) or any(
                            len(x["sites"]) != 4 for x in rounds):
                        problems.append(("torn", [x["round"] for x in rounds]))
    writer.join()
    assert problems == [] and seen == sorted(seen) and seen[-1] == 60


def test_a_store_read_as_it_stands_is_refused_when_written_meanwhile(tmp_path, monkeypatch):
    # Without write access to the folder the store is read without locks: a write during the read
    # (the server's next round) must be an error to retry, never a mixed snapshot.
    from server import run_store
    from server.run_store import RunStore, RunStoreError

    records = a_run(tmp_path / "runs", finished=False)
    store = RunStore.in_run_dir(records.run_dir)
    monkeypatch.setattr(run_store.os, "access", lambda path, mode: False)  # as if: no write access
    assert store.summary()["rounds_done"] == 2  # read as it stands
    with pytest.raises(RunStoreError, match="written while it was read"), store._connect(write=False) as con:
        con.execute("SELECT COUNT(*) FROM rounds").fetchone()
        records.append_round({"round": 3, "dice": 0.3})
    assert store.summary()["rounds_done"] == 3
