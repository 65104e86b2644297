"""A round's checkpoint and record are written while the next round runs (server/write_behind.py).

What must hold: the next round really goes out before the previous round's
writes end; a failed write fails the run with its own error and the records
stay consistent (a resume continues after the last round that has both);
the round's log line means it is recorded.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from common.data import synthesize
from common.federation_config import FederationConfig
from fed_harness import InProcessGrid
from server import server_app
from server.run_records import RunRecords
from server.run_store import RunStore
from server.write_behind import WriteBehind
from simulations.demo import DemoHooks


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("wb-data")
    synthesize(root, sites=2, per_site=9, seed=0, image_size=64)
    return root


def make_cfg(data, home, **kw) -> FederationConfig:
    return FederationConfig(**{"base": "arch:tiny", "adapter": "shallow-vlc", "data": str(data), "home": str(home),
                               "rounds": 3, "compare": False, "max_images": 3, "local_epochs": 1, "run_name": "wb",
                               **kw})


class CountingGrid(InProcessGrid):
    """Sets `train_sent[r]` when round r's train messages are handed to the sites."""

    def __init__(self, cfg, num_sites):
        super().__init__(cfg, num_sites)
        self.calls = 0
        self.train_sent = {r: threading.Event() for r in range(1, 10)}

    def send_and_receive(self, messages, *, timeout=None):
        self.calls += 1
        if self.calls % 2 == 1:  # train, evaluate, train, ...
            self.train_sent[(self.calls + 1) // 2].set()
        return super().send_and_receive(messages, timeout=timeout)


def test_the_next_round_goes_out_while_the_checkpoint_is_written(data, tmp_path, monkeypatch):
    cfg = make_cfg(data, tmp_path, rounds=2)
    grid = CountingGrid(cfg, 2)
    seen = {}
    save = RunRecords.save_checkpoint

    def slow_save(self, server_round, *args, **kwargs):
        if server_round == 1:
            # Wait for round 2's train messages. With writes on the round loop's
            # thread they could never come: the wait would time out.
            seen["round 2 sent during round 1's write"] = grid.train_sent[2].wait(timeout=15)
        return save(self, server_round, *args, **kwargs)

    monkeypatch.setattr(RunRecords, "save_checkpoint", slow_save)
    summary = server_app.run_federation(grid, cfg, DemoHooks())
    assert seen == {"round 2 sent during round 1's write": True}
    run_dir = tmp_path / "runs" / "wb"
    assert summary["rounds"] == 2
    assert [json.loads(line)["round"] for line in (run_dir / "rounds.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-0001", "round-0002"]
    assert RunStore.in_run_dir(run_dir).read()["run"]["status"] == "finished"


def test_a_failed_write_fails_the_run_and_a_resume_continues_after_the_last_whole_round(data, tmp_path,
                                                                                       monkeypatch):
    save = RunRecords.save_checkpoint

    def disk_full_in_round_2(self, server_round, *args, **kwargs):
        if server_round == 2:
            raise OSError(28, "No space left on device")
        return save(self, server_round, *args, **kwargs)

    monkeypatch.setattr(RunRecords, "save_checkpoint", disk_full_in_round_2)
    cfg = make_cfg(data, tmp_path, rounds=3)
    with pytest.raises(OSError, match="No space left"):
        server_app.run_federation(InProcessGrid(cfg, 2), cfg, DemoHooks())
    run_dir = tmp_path / "runs" / "wb"
    assert [json.loads(line)["round"] for line in (run_dir / "rounds.jsonl").read_text().splitlines()] == [1]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-0001"]
    run = RunStore.in_run_dir(run_dir).read()["run"]
    assert run["status"] == "failed" and "No space left" in run["reason"]
    assert not (run_dir / "final").exists()

    monkeypatch.setattr(RunRecords, "save_checkpoint", save)
    summary = server_app.run_federation(InProcessGrid(cfg, 2), make_cfg(data, tmp_path, rounds=3, resume=True),
                                        DemoHooks())
    assert summary["rounds"] == 3
    assert [json.loads(line)["round"] for line in (run_dir / "rounds.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_round_logged_as_done_is_recorded(data, tmp_path):
    cfg = make_cfg(data, tmp_path, rounds=2)
    rounds_file = tmp_path / "runs" / "wb" / "rounds.jsonl"
    checked = []

    class Check(logging.Handler):
        def emit(self, record):
            text = record.getMessage()
            if "[fedvlsm] round " in text and ": val Dice" in text:
                number = int(text.split("round ")[1].split("/")[0])
                recorded = [json.loads(line)["round"] for line in rounds_file.read_text().splitlines()]
                checked.append((number, number in recorded))

    handler = Check()
    logging.getLogger("flwr").addHandler(handler)
    try:
        server_app.run_federation(InProcessGrid(cfg, 2), cfg, DemoHooks())
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    assert checked == [(1, True), (2, True)]


def test_write_behind_runs_jobs_in_order_one_at_a_time_and_reports_failures():
    writer = WriteBehind()
    events = []

    def job(name, seconds):
        events.append(("start", name))
        time.sleep(seconds)
        events.append(("end", name))

    writer.submit(job, "a", 0.2)
    writer.submit(job, "b", 0.0)  # waits for "a" first
    writer.wait()
    assert events == [("start", "a"), ("end", "a"), ("start", "b"), ("end", "b")]

    writer.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        writer.submit(job, "c", 0.0)  # the failure of the job before surfaces here; "c" is not run
    assert ("start", "c") not in events
    writer.submit(lambda: 1 / 0)
    writer.close(quiet=True)  # while another error unwinds: logged, not raised
    with pytest.raises(RuntimeError):  # closed: nothing more runs
        writer.submit(job, "d", 0.0)
