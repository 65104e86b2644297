"""A run whose server process died without recording its end is shown `interrupted`, not `running` for ever.

The server is a real process that claims the run name and registers the run
the way the ServerApp does (open_run: claim, then records), then is killed
with SIGKILL, which no handler can see.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from starlette.testclient import TestClient

from server.dashboard.app import create_app
from server.run_claim import held_by_a_process
from server.run_records import RunRecords, RunRecordsError, claim_run_name
from server.run_store import DB_FILE

SERVER = textwrap.dedent("""
    import sys, time
    from server.run_records import RunRecords, claim_run_name
    runs_dir, name = sys.argv[1], sys.argv[2]
    claim = claim_run_name(runs_dir, name)
    RunRecords.create(runs_dir, name, {"rounds": 3})
    print("ready", flush=True)
    time.sleep(600)
""")


@pytest.fixture()
def server(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(tmp_path), "live"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _status(client: TestClient, name: str) -> tuple[str, str, str]:
    row = {r["name"]: r for r in client.get("/api/runs").json()["runs"]}[name]
    run = client.get(f"/api/runs/{name}").json()["run"]
    assert (row["status"], row["reason"]) == (run["status"], run["reason"])  # the list and the page agree
    return run["status"], run["reason"], run["ended_at"]


def test_a_killed_server_s_run_is_shown_interrupted(tmp_path, server):
    with TestClient(create_app(tmp_path)) as client:
        assert held_by_a_process(tmp_path, "live") is True
        assert _status(client, "live")[0] == "running"
        # asking did not take the name from its process: a second launch is still refused
        with pytest.raises(RunRecordsError, match="being run by another server process"):
            claim_run_name(tmp_path, "live")
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        status, reason, ended = _status(client, "live")
        assert status == "interrupted" and "resume" in reason and ended is None
        # only shown: the store still holds what the server left (a resume finds it so)
        with sqlite3.connect(tmp_path / "live" / DB_FILE) as con:
            assert con.execute("SELECT status FROM run").fetchone()[0] == "running"
        assert held_by_a_process(tmp_path, "live") is False


def test_a_run_with_no_claim_file_or_a_recorded_end_is_shown_as_stored(tmp_path):
    # written before claims existed: nothing can be said about its process
    RunRecords.create(tmp_path, "old", {"rounds": 3})
    # ended normally: its status was written before the claim was let go
    claim = claim_run_name(tmp_path, "done")
    done = RunRecords.create(tmp_path, "done", {"rounds": 3})
    done.set_status("finished")
    claim.close()
    with TestClient(create_app(tmp_path)) as client:
        assert held_by_a_process(tmp_path, "old") is None
        assert _status(client, "old")[0] == "running"
        assert _status(client, "done")[0] == "finished"


def test_a_claim_waits_out_a_reader_s_probe(tmp_path):
    """A dashboard's probe holds a shared lock for an instant; a launch meeting it still gets the name."""
    claim_run_name(tmp_path, "r").close()
    probe = open(tmp_path / ".r.lock")  # noqa: SIM115
    fcntl.flock(probe.fileno(), fcntl.LOCK_SH)
    threading.Timer(0.2, probe.close).start()  # a probe far longer than a real one
    started = time.monotonic()
    claim = claim_run_name(tmp_path, "r")
    try:
        assert time.monotonic() - started >= 0.15  # it waited for the probe to end ...
        assert held_by_a_process(tmp_path, "r") is True  # ... and now holds the name
        assert (tmp_path / ".r.lock").read_text() == str(os.getpid())
    finally:
        claim.close()
