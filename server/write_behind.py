"""A round's checkpoint and records written on a background thread while the next round runs.

Between two rounds the server writes the round's checkpoint (adapter,
strategy state, run state) and appends its record (run store and
rounds.jsonl): several files, each fsynced and renamed into place
(common/atomic.py), 12-45 ms per round on this project's 2-core VM, all of it
time in which no site could be sent its next message. Here the writes of
round r run on one background thread while round r+1 is sent out; at most
one round's writes are in flight.

What stays as it was:
- order: a round's checkpoint is complete before its record is appended,
  and round r's writes end before round r+1's begin (one thread, and each
  `submit` waits for the previous job), so a resume finds what it found
  before (the last round with both);
- failures: a write that fails (disk full, permissions) fails the run with
  its own error, at the next `submit` or at `wait`, i.e. one round later at
  most; the run loop waits for the writes before the final adapter, the
  summary, or an error's status are written;
- what is written: the job gets its own copies of the arrays (the caller
  goes on with the next round).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from logging import WARNING
from typing import Any

from flwr.supercore import log


class WriteBehind:
    """One background writer; `submit` runs a job after the previous one has ended (and raises its error)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedvlsm-records")
        self._pending: Future | None = None

    def submit(self, job: Callable[..., Any], *args: Any) -> None:
        self.wait()
        self._pending = self._pool.submit(job, *args)

    def wait(self, quiet: bool = False) -> None:
        """Block until the job in flight (if any) has ended; raise its error unless `quiet` (then log it)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except Exception as err:
            if not quiet:
                raise
            log(WARNING, "[fedvlsm] writing a round's checkpoint or record failed as well: %s: %s",
                type(err).__name__, err)

    def close(self, quiet: bool = False) -> None:
        try:
            self.wait(quiet)
        finally:
            self._pool.shutdown(wait=True)
