"""The claim on a run name: an exclusive flock on `<runs-dir>/.<run-name>.lock`.

A server process holds it for a run's whole life (`server.run_records.claim_run_name`);
the kernel drops it when that process dies, however it dies. So the lock
says two things nothing else can: whether another process is running that
name now (a second launch is refused), and whether a run whose store still
says `running` has a process behind it at all (a server killed with SIGKILL,
by the OOM killer or with its machine cannot record its end; the dashboard
shows such a run as `interrupted`, `held_by_a_process`).

Kept free of torch and of the run records so that the dashboard can ask.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import TextIO

# A reader's probe holds a shared lock for microseconds; a claim meeting one
# tries again for this long before it calls the name taken.
_CLAIM_PATIENCE_S = 1.0


def claim_path(runs_dir: Path, run_name: str) -> Path:
    return Path(runs_dir) / f".{run_name}.lock"


def try_claim(runs_dir: Path, run_name: str) -> tuple[TextIO | None, str]:
    """(open handle holding the claim, "") or (None, the holder's pid as it wrote it, maybe "")."""
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    fh = open(claim_path(runs_dir, run_name), "a+")  # noqa: SIM115 - held for the run's life
    deadline = time.monotonic() + _CLAIM_PATIENCE_S
    while True:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                fh.seek(0)
                holder = fh.read().strip()
                fh.close()
                return None, holder
            time.sleep(0.02)
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))  # for messages only: the lock, not this text, is the claim
    fh.flush()
    return fh, ""


def held_by_a_process(runs_dir: Path, run_name: str) -> bool | None:
    """Whether some process holds the claim on `run_name` now; None if the name never had one.

    A run written before claims existed has no lock file: nothing can be said.
    Meant for processes on the server's machine (flock over a network
    filesystem may not reach other machines' locks).
    """
    try:
        fh = open(claim_path(runs_dir, run_name))  # noqa: SIM115
    except FileNotFoundError:
        return None
    except OSError:
        return None  # unreadable: say nothing rather than guess
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        with contextlib.suppress(OSError):
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return False
