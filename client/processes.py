"""Stopping a group of processes: politely, then for sure.

Shared by `fedvlsm site start` (a SuperNode's SuperExec/ClientApp children
and the worker) and the tests that start real Flower processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import psutil


def stop_all(procs: Iterable[psutil.Process], timeout: float = 10.0) -> list[psutil.Process]:
    """SIGTERM every process, wait up to `timeout` s, SIGKILL the rest; returns those that had to be killed."""
    procs = list(procs)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    return alive
