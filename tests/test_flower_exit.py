"""A run that Flower ends (`flwr stop`) is recorded `stopped`, whichever thread runs the ServerApp.

Flower's SIGINT handler (`flwr_exit`, in the main thread) first runs the exit handlers
registered to run before its force-exit timer, then ends the process (SystemExit in the
main thread, `os._exit` 5 s later). Here that first step is `trigger_exit_handlers`, and
the rest is a SystemExit raised in the ServerApp's thread, which in `flwr-simulation`
(ServerApp on a thread of its own) stands for the `os._exit` that ends it unwarned.
"""

from __future__ import annotations

import json
import threading

import pytest
from flwr.supercore.exit.exit_handler import trigger_exit_handlers

from common.data import synthesize
from common.federation_config import FederationConfig
from fed_harness import InProcessGrid
from server.flower_exit import STOPPED_BY_FLOWER
from server.run_store import RunStore
from server.server_app import run_federation
from simulations.demo import DemoHooks


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed-data")
    synthesize(root, sites=2, per_site=9, seed=0, image_size=64)
    return root


def make_cfg(data, home, name, rounds) -> FederationConfig:
    return FederationConfig(base="arch:tiny", adapter="shallow-vlc", data=str(data), home=str(home), rounds=rounds,
                            compare=False, lr=0.01, run_name=name)


class FlowerEndsTheRun(InProcessGrid):
    """Once a round is recorded, the next exchange is where Flower's exit comes (`on_exit`)."""

    def __init__(self, cfg: FederationConfig, on_exit) -> None:
        super().__init__(cfg, 2)
        self.rounds_file = cfg.runs_dir / cfg.run_name / "rounds.jsonl"
        self.on_exit = on_exit

    def send_and_receive(self, messages, *, timeout=None):
        if self.rounds_file.is_file():
            self.on_exit()
            raise SystemExit(0)  # what flwr_exit raises (SIGINT: exit code 0), or the thread's os._exit
        return super().send_and_receive(messages, timeout=timeout)


def status(run_dir) -> tuple[str, str]:
    s = json.loads((run_dir / "status.json").read_text())
    row = RunStore.in_run_dir(run_dir).summary()
    assert (row["status"], row["reason"]) == (s["status"], s["reason"])  # the dashboard says the same
    return s["status"], s["reason"]


def test_flwr_stop_of_a_simulated_run_is_recorded_before_flower_ends_the_process(data, tmp_path):
    """flwr-simulation: Flower's exit runs in the main thread while the ServerApp thread is mid-round."""
    cfg = make_cfg(data, tmp_path, "sim", rounds=50)
    run_dir = cfg.runs_dir / "sim"
    at_exit, go_on = threading.Event(), threading.Event()

    def park():  # the ServerApp thread waits for a reply while Flower's handler runs elsewhere
        at_exit.set()
        go_on.wait(60)

    grid = FlowerEndsTheRun(cfg, park)
    ended: list[BaseException] = []

    def serverapp_thread():
        try:
            run_federation(grid, cfg, DemoHooks())
        except BaseException as err:  # noqa: BLE001
            ended.append(err)

    thread = threading.Thread(target=serverapp_thread, daemon=True)
    thread.start()
    try:
        assert at_exit.wait(60), "the run never recorded a round"
        assert status(run_dir) == ("running", "")
        trigger_exit_handlers(run_before_force_exit=True)  # Flower's handler, in the main thread
        # Recorded now: the ServerApp thread gets no further (os._exit follows in Flower).
        assert status(run_dir) == ("stopped", STOPPED_BY_FLOWER)
    finally:
        go_on.set()
        thread.join(60)
    assert not thread.is_alive() and isinstance(ended[0], SystemExit)
    assert status(run_dir) == ("stopped", STOPPED_BY_FLOWER)  # the thread's own end did not overwrite it


def test_flwr_stop_of_a_deployed_run_says_flower_stopped_it(data, tmp_path):
    """flwr-serverapp: Flower's handler interrupts the ServerApp's own (main) thread, then SystemExit."""
    cfg = make_cfg(data, tmp_path, "dep", rounds=50)
    grid = FlowerEndsTheRun(cfg, lambda: trigger_exit_handlers(run_before_force_exit=True))
    with pytest.raises(SystemExit):
        run_federation(grid, cfg, DemoHooks())
    assert status(cfg.runs_dir / "dep") == ("stopped", STOPPED_BY_FLOWER)


def test_flowers_exit_after_a_run_ended_changes_nothing(data, tmp_path):
    """flwr_exit also runs when a ServerApp returns (and after it raised): the run's own status stays."""
    cfg = make_cfg(data, tmp_path, "done", rounds=1)
    thread = threading.Thread(target=lambda: run_federation(InProcessGrid(cfg, 2), cfg, DemoHooks()))
    thread.start()
    thread.join(120)
    assert not thread.is_alive()
    trigger_exit_handlers(run_before_force_exit=True)
    assert status(cfg.runs_dir / "done") == ("finished", "")
