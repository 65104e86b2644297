"""A run that Flower ends (`flwr stop`, a signal) is recorded `stopped`, also in simulation.

How Flower 1.42 ends a run's server process: `flwr stop` ends the run at the SuperLink;
the process learns it at its next Runtime API call (HTTP 401) or heartbeat and sends
itself SIGINT. Flower's handler (`flwr.supercore.exit.flwr_exit`, in the main thread)
runs the registered exit handlers, starts a timer that ends the process with `os._exit`
5 s later, and raises SystemExit in the main thread.

- `flwr-serverapp` (deployment) runs the ServerApp in its main thread: the SystemExit
  goes through run_federation, which records `stopped`.
- `flwr-simulation` runs the ServerApp on a thread of its own: the SystemExit is raised
  in the simulation runtime's main thread, the ServerApp's thread is never told, and
  `os._exit` ends it in the middle of a round. Its run stayed `running` for ever.

So run_federation registers an exit handler too. Flower runs it before it starts that
timer, and it records the stop whichever thread the ServerApp runs on.

That `os._exit` also comes before the simulation runtime's `ray.shutdown()`, which left
two of Ray's processes running for a minute after every `flwr stop`: in `flwr-simulation`
the run also starts server/ray_reaper.py's watcher, which ends them when the process ends.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.supercore.exit import add_exit_handler

from server import ray_reaper

if TYPE_CHECKING:
    from server.run_records import RunRecords

STOPPED_BY_FLOWER = "stopped by Flower: flwr stop, or a signal to the server process"


def in_flower_simulation_process() -> bool:
    """This process is `flwr-simulation`, Flower's simulation runtime under `flwr run` (it starts Ray here)."""
    return Path(sys.argv[0]).name == "flwr-simulation"


class FlowerExit:
    """Writes the run's final status once: the run when it ends, or Flower's exit if that comes first."""

    def __init__(self, records: RunRecords) -> None:
        self.records = records
        self.fired = False  # Flower is ending this process
        self._run_thread = threading.get_ident()
        self._ended = False
        self._lock = threading.Lock()
        # Flower has no way to remove a handler: one that finds the run ended does nothing
        # (flwr_exit also runs when a ServerApp returns).
        add_exit_handler(self._on_flower_exit, run_before_force_exit=True)
        if in_flower_simulation_process():
            ray_reaper.ensure_started()  # Ray runs in this process too (started by the runtime's main thread)

    def _on_flower_exit(self) -> None:
        if self._ended:
            return
        self.fired = True
        if threading.get_ident() == self._run_thread:
            # Flower's signal handler interrupted the run itself (deployment). The SystemExit
            # it raises next reaches run_federation, which records the stop. Writing here
            # could break into a write of the records (or wait for `_lock`) that it interrupted.
            return
        with self._lock:
            if not self._ended and self.records.changed:
                self._ended = True
                self.records.set_status("stopped", STOPPED_BY_FLOWER)

    def stopped(self) -> None:
        """The run was interrupted (SystemExit, KeyboardInterrupt): by Flower, or by a signal of the user's."""
        self.end("stopped", STOPPED_BY_FLOWER if self.fired else "the server process was interrupted")

    def end(self, status: str, reason: str = "") -> None:
        """Record how the run ended, unless Flower's exit has recorded it `stopped` already."""
        with self._lock:
            if not self._ended:
                self._ended = True
                self.records.set_status(status, reason)
