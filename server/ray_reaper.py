"""Ray's processes end with the process that started them, however that process ends.

Flower's simulation runtime starts Ray inside the process that runs it: `fedvlsm simulate`,
or `flwr-simulation` (started by the local SuperLink's SuperExec under `flwr run`). Ray
ties its head processes (gcs_server, raylet, the dashboard and log monitors) to that
process with prctl(PR_SET_PDEATHSIG, SIGKILL), so they die with it. The raylet's own
children do not: its two agents (`ray::DashboardAgent`, `ray::RuntimeEnvAgent`, about
0.2 GB together, Ray 2.55) notice the raylet's death at once, then report it to the GCS,
which is dead too, and wait for that report's hard-coded 60 s timeout
(`ray._private.process_watcher.report_raylet_error_logs`); only a raylet ended by SIGTERM
(`ray.shutdown()`) spares them the wait. So every run that ended without `ray.shutdown()`
(a SIGKILL, the OOM killer, a crash, and Flower's `os._exit` 5 s after `flwr stop`, which
comes before its own `ray.shutdown()`) left them on the machine for a minute.

The raylet's workers do not either: one the raylet had started within the last second or so
(still importing, not yet connected) sat orphaned for more than 10 s after a SIGKILL.

`ensure_started()` starts one small watcher per process (this file, run as a script, with
only the standard library and psutil): it holds the read end of a pipe whose write end
only that process holds, and notes that process's Ray descendants (pid and start time)
every second. When the pipe closes (the process is gone, however it went) or the process
is gone, it kills those still there and what they started (SIGKILL, as Ray's own
fate-sharing does), then sweeps for the ones it had not seen yet: by then they hang from
init, so they are recognised as this process's Ray by what Ray gives them (`_strays`).
After a run that shut Ray down it finds nothing to do. It runs in a session of its own and
ignores SIGINT and SIGHUP, so the Ctrl-C or hang-up that ends the process does not end it first.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

POLL_S = 1.0  # how often the watcher notes the driver's Ray processes (the end's sweep finds those started since)
STRAY_SWEEP_GAP_S = 0.5  # between the end's two sweeps for Ray processes never seen

_lock = threading.Lock()
_watcher: subprocess.Popen | None = None  # this process's watcher, once started
_pipe_w: int | None = None  # the pipe's write end: held open by this process alone until it ends


def ensure_started() -> subprocess.Popen | None:
    """Start this process's watcher unless it runs already; None where there is nothing to watch with.

    Call it before Ray starts; starting it later is harmless (its first look finds what runs already).
    """
    global _watcher, _pipe_w
    if os.name != "posix":
        return None
    with _lock:
        if _watcher is not None and _watcher.poll() is None:
            return _watcher
        import importlib.util

        spec = importlib.util.find_spec("ray")  # where Ray's own programs live, without importing Ray
        if spec is None or not spec.submodule_search_locations:
            return None
        ray_dir = list(spec.submodule_search_locations)[0]
        r, w = os.pipe()  # both ends close-on-exec: no other program (Ray's included) inherits them
        try:
            _watcher = subprocess.Popen(
                # -P: the script's folder (server/) is not put on sys.path; only the standard library and psutil
                [sys.executable, "-P", str(Path(__file__).resolve()), str(os.getpid()), ray_dir],
                stdin=r, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, close_fds=True,
            )
        except OSError:
            os.close(w)
            return None
        finally:
            os.close(r)
        if _pipe_w is not None:  # a watcher that had died: its pipe is of no use
            with contextlib.suppress(OSError):
                os.close(_pipe_w)
        _pipe_w = w
        return _watcher


# ----------------------------------------------------------------------------- the watcher

def is_ray_process(cmdline: list[str], ray_dir: str) -> bool:
    """A process of Ray's: a worker or agent (`ray::...`, `ray-dashboard-...`: setproctitle's names), or a
    program or Python script inside Ray's package (gcs_server, raylet, the dashboard, the monitors)."""
    if not cmdline:
        return False
    program = cmdline[0]
    if program.startswith(("ray::", "ray-")):
        return True
    script = next((arg for arg in cmdline[1:] if not arg.startswith("-")), "")
    prefix = ray_dir.rstrip(os.sep) + os.sep
    return program.startswith(prefix) or script.startswith(prefix)


def _ray_descendants(driver, ray_dir: str, me: int) -> tuple[dict[int, float], set[int]]:
    """The driver's Ray descendants (pid: start time), and which of them are raylets."""
    import psutil

    found: dict[int, float] = {}
    raylets: set[int] = set()
    for p in driver.children(recursive=True):
        if p.pid == me:
            continue
        with contextlib.suppress(psutil.Error):
            cmd = p.cmdline()
            if is_ray_process(cmd, ray_dir):
                found[p.pid] = p.create_time()
                if os.path.basename(cmd[0]) == "raylet":
                    raylets.add(p.pid)
    return found, raylets


def session_pattern(driver_pid: int) -> re.Pattern[str]:
    """A path inside the folder of the Ray session that `driver_pid` started.

    Ray names it `session_<date>_<time>_<microseconds>_<pid of the process that called ray.init>`.
    """
    return re.compile(rf"/session_\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_{driver_pid}(?=/|\s|$)")


def _open_paths(pid: int) -> str:
    """What the process's file descriptors point at, one per line ('' where /proc cannot tell)."""
    links = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return "\n".join(links)


def _raylet_of(pid: int) -> int | None:
    """The raylet a worker or agent serves: Ray sets RAY_RAYLET_PID in their environment."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            found = re.search(rb"(?:^|\0)RAY_RAYLET_PID=(\d+)(?:\0|$)", f.read())
    except OSError:
        return None
    return int(found.group(1)) if found else None


def _strays(driver_pid: int, driver_started: float, raylets: set[int], ray_dir: str, me: int) -> list:
    """The driver's Ray processes that were never seen descending from it (started within the last poll).

    Only Ray's processes (`is_ray_process`) started after the driver are looked at, and one is taken only
    when Ray marks it as the driver's: it serves one of the driver's raylets, or its command line or an
    open file (a worker's log, an agent's) lies in the driver's session folder. A pid reused by another
    Ray's driver or raylet within the moment since the driver ended is not guarded against.
    """
    import psutil

    in_session = session_pattern(driver_pid)
    found = []
    for p in psutil.process_iter(["cmdline", "create_time"]):
        if p.pid == me or (p.info["create_time"] or 0.0) < driver_started:
            continue
        cmd = p.info["cmdline"] or []
        if not is_ray_process(cmd, ray_dir):
            continue
        if (_raylet_of(p.pid) in raylets or in_session.search(" ".join(cmd))
                or in_session.search(_open_paths(p.pid))):
            found.append(p)
    return found


def _end(seen: dict[int, float], driver_pid: int, driver_started: float, raylets: set[int], ray_dir: str,
         me: int) -> None:
    """Kill the processes in `seen` that are still the same processes, what they started since, and the
    driver's Ray processes that were not seen yet.

    SIGKILL, as Ray's own fate-sharing does: the driver is gone, nothing of theirs is of use.
    """
    import psutil

    procs = []
    for pid, started in seen.items():
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if p.create_time() == started:  # not a newer process that reuses the pid
                procs.append(p)
    for p in list(procs):
        with contextlib.suppress(psutil.Error):
            procs.extend(c for c in p.children(recursive=True) if c not in procs)
    _kill(procs)
    for sweep in range(2):  # twice: a worker caught mid-exec has no command line to read for a moment
        if sweep:
            time.sleep(STRAY_SWEEP_GAP_S)
        new = [p for p in _strays(driver_pid, driver_started, raylets, ray_dir, me) if p not in procs]
        _kill(new)
        procs.extend(new)


def _kill(procs: list) -> None:
    """SIGKILL without waiting: it cannot be refused, and their parent (or init) reaps them."""
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()


def watch(driver_pid: int, ray_dir: str) -> None:
    import psutil

    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        driver = psutil.Process(driver_pid)
        driver_started = driver.create_time()
    except psutil.Error:
        return
    me = os.getpid()
    seen: dict[int, float] = {}
    raylets: set[int] = set()  # the driver's raylets, ever: their workers and agents name them
    while True:
        readable, _, _ = select.select([sys.stdin.fileno()], [], [], POLL_S)
        # Readable: end of file (the driver is gone: only it held the write end) or, never, data.
        gone = bool(readable)
        if not gone:
            try:
                gone = not driver.is_running() or driver.status() == psutil.STATUS_ZOMBIE  # is_running: not a reused pid
            except psutil.Error:
                gone = True
        if gone:
            _end(seen, driver_pid, driver_started, raylets, ray_dir, me)
            return
        with contextlib.suppress(psutil.Error):
            found, found_raylets = _ray_descendants(driver, ray_dir, me)
            seen.update(found)
            raylets.update(found_raylets)
            # Forget the ones that have ended (a long run's exited workers).
            seen = {pid: t for pid, t in seen.items() if psutil.pid_exists(pid)}


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
