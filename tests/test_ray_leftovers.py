"""Nothing of Ray's outlives the process that ran the simulation, however that process ends.

Ray kills its head processes with their driver (prctl PR_SET_PDEATHSIG), but the raylet's
agents (`ray::DashboardAgent`, `ray::RuntimeEnvAgent`) waited 60 s to report the raylet's
death to a dead GCS: a `fedvlsm simulate` killed with SIGKILL (the OOM killer, a crash),
and `flwr-simulation` ended by Flower 5 s after `flwr stop`, left them running for a minute
each time. server/ray_reaper.py's watcher ends them with the driver.

Processes are told apart by session: each driver here starts a session of its own, which
Ray's processes inherit (the watcher runs in a session of its own and is found by its
command line). Only those are looked at and killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from test_fed_simulate import FEDVLSM, REPO, env_for


def session_of(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def watchers_of(pid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if any(c.endswith("ray_reaper.py") for c in cmd) and str(pid) in cmd:
            out.append(p)
    return out


def cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:  # ended meanwhile
        return []


def described(procs: list[psutil.Process]) -> list[str]:
    return [f"{p.pid} {' '.join(cmdline(p))[:400]}" for p in procs]


def wait_until_gone(find, seconds: float) -> list[psutil.Process]:
    deadline = time.monotonic() + seconds
    while (left := find()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()


class SessionLog:
    """What ran in a driver's session, in order of first sight: the failure messages show how far Ray got."""

    def __init__(self, sid: int):
        self.sid, self.t0, self.lines, self._known = sid, time.monotonic(), [], set()

    def look(self) -> list[str]:
        now = described(session_of(self.sid))
        for d in now:
            if d not in self._known:
                self._known.add(d)
                self.lines.append(f"{time.monotonic() - self.t0:6.1f}s {d[:160]}")
        return now

    def __str__(self) -> str:
        return "\n".join(self.lines[-40:])


def kill_simulate_when(tmp_path, ready, poll_s: float, then_wait_for=(), then_wait_s: float = 0.0,
                       settle_s: float = 0.0) -> tuple[list[str], list[psutil.Process], str]:
    """Start `fedvlsm simulate` (in a session of its own, with more rounds than it can run here), SIGKILL it
    once `ready(processes of its session, its output so far)` holds (then, for at most `then_wait_s` more, until all of
    `then_wait_for` run, then `settle_s`). Returns what of its session is left 10 s after, the watchers
    left 5 s later, and the timeline of what had run (for the message)."""
    log = tmp_path / "out.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([FEDVLSM, "simulate", "--run-config", "simulations/configs/quick.toml",
                                 "--run-config", "run-name='kill' rounds=100000 compare=false demo-sites=2"],
                                cwd=REPO, env=env_for(tmp_path), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    sid = proc.pid
    seen = SessionLog(sid)
    try:
        deadline = time.monotonic() + 180
        while not ready(seen.look(), log.read_text()):
            assert proc.poll() is None, f"{log.read_text()[-3000:]}\n{seen}"
            assert time.monotonic() < deadline, f"not ready in 180 s:\n{seen}\n{log.read_text()[-2000:]}"
            time.sleep(poll_s)
        deadline = time.monotonic() + then_wait_s
        while time.monotonic() < deadline and not all(any(w in p for p in seen.look()) for w in then_wait_for):
            time.sleep(0.1)
        time.sleep(settle_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        left = described(wait_until_gone(lambda: session_of(sid), 10))
        return left, wait_until_gone(lambda: watchers_of(sid), 5), str(seen)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sid, signal.SIGKILL)
        kill_all(session_of(sid) + watchers_of(sid))
        proc.wait(timeout=30)


def test_a_simulate_killed_with_sigkill_leaves_no_ray_process(tmp_path):
    """SIGKILL of the `fedvlsm simulate` process alone (as the OOM killer does) while its clients run: within
    10 s nothing of its Ray is left (the raylet's two agents stayed 60 s, about 0.1 GB each)."""
    from server.ray_reaper import POLL_S

    # Then up to 60 s more for the agents (they were up within 3 s of the raylet here), and two of the
    # watcher's looks: this is the case of processes it has seen.
    agents = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
    # Ready: the raylet runs and a round is done (by the run's output, not by Ray's process titles: CI's
    # run of the earlier version never showed the agents' titles before its run ended).
    left, watchers, seen = kill_simulate_when(
        tmp_path, lambda procs, out: any("raylet" in p for p in procs) and "round 1/" in out,
        poll_s=0.1, then_wait_for=agents, then_wait_s=60, settle_s=2 * POLL_S)
    assert not left, f"left running 10 s after the driver's SIGKILL: {left}\nseen:\n{seen}"
    assert not watchers  # the watcher ends with them


def test_a_simulate_killed_as_ray_starts_a_worker_leaves_no_ray_process(tmp_path):
    """SIGKILL the moment the raylet starts a worker, before the watcher's next look: the worker, still
    importing, hung from init for more than 10 s; the watcher's last sweep finds it by its raylet."""
    # (Within half a second the worker names itself `ray::IDLE`: the kill follows the sight at once.)
    worker_scripts = ("workers/default_worker.py", "workers/setup_worker.py")
    left, watchers, seen = kill_simulate_when(
        tmp_path, lambda procs, _: any(w in p for p in procs for w in worker_scripts), poll_s=0.02)
    assert not left, f"left running 10 s after the driver's SIGKILL: {left}\nseen:\n{seen}"
    assert not watchers


DRIVER = """
import subprocess, sys, time
from server import ray_reaper
ray_reaper.ensure_started()
ray_reaper.ensure_started()  # once per process
# A Ray-like child (named as Ray names its agents and workers), a grandchild under it, and an unrelated child.
ray_like = subprocess.Popen(["ray::FakeAgent", "300"], executable="sleep")
grandchild = subprocess.Popen([sys.executable, "-c", "import subprocess, time; "
                               "subprocess.Popen(['ray::IDLE', '300'], executable='sleep'); time.sleep(300)"])
other = subprocess.Popen(["sleep", "301"])
print(ray_like.pid, grandchild.pid, other.pid, flush=True)
time.sleep(300)
"""


def test_the_watcher_kills_the_drivers_ray_processes_only_and_once_it_is_gone():
    """No Ray here: a driver process with one watcher, Ray-named children and an unrelated one, then SIGKILLed."""
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    sid = driver.pid
    try:
        ray_like, python_child, other = (int(x) for x in driver.stdout.readline().split())
        assert len(watchers_of(driver.pid)) == 1
        time.sleep(2.5)  # the watcher notes the driver's Ray processes every second
        assert psutil.pid_exists(ray_like)
        driver.kill()
        driver.wait(timeout=10)
        gone = wait_until_gone(lambda: [p for p in session_of(sid) if cmdline(p)[:1] and cmdline(p)[0].startswith("ray::")], 5)
        assert not gone, described(gone)
        assert psutil.Process(other).is_running()  # not Ray's: left alone
        assert psutil.Process(python_child).is_running()  # neither is its parent, a plain python
        assert not wait_until_gone(lambda: watchers_of(sid), 5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sid, signal.SIGKILL)
        kill_all(session_of(sid) + watchers_of(sid))
        driver.wait(timeout=10)


@pytest.mark.parametrize("cmdline, ray", [
    (["ray::DashboardAgent"], True), (["ray::ClientAppActor"], True), (["ray-dashboard-ReportHead-0 (x)"], True),
    (["/x/ray/core/src/ray/raylet/raylet", "--a"], True), (["/usr/bin/python3", "-u", "/x/ray/_private/log_monitor.py"], True),
    (["/usr/bin/python3", "train.py", "/x/ray/data"], False), (["sleep", "300"], False), ([], False),
])
def test_what_counts_as_a_ray_process(cmdline, ray):
    from server.ray_reaper import is_ray_process

    assert is_ray_process(cmdline, "/x/ray") is ray


@pytest.mark.parametrize("text, found", [
    ("--session-dir=/tmp/ray/session_2026-12-07_11-39-23_410391_8187 --x", True),
    ("/tmp/ray/session_2026-12-07_11-39-23_410391_8187/logs/worker-1-8423.out", True),
    ("/tmp/ray/session_2026-12-07_11-39-23_410391_8187", True),
    ("/tmp/ray/session_2026-12-07_11-39-23_410391_81870/logs/raylet.out", False),  # another driver's pid
    ("/tmp/ray/session_2026-12-07_11-39-23_410391_18187/logs/raylet.out", False),
    ("/tmp/ray/session_latest/logs/raylet.out", False),
])
def test_the_session_folder_named_for_the_driver(text, found):
    from server.ray_reaper import session_pattern

    assert bool(session_pattern(8187).search(text)) is found
