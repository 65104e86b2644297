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
    return [f"{p.pid} {' '.join(cmdline(p))[:100]}" for p in procs]


def wait_until_gone(find, seconds: float) -> list[psutil.Process]:
    deadline = time.monotonic() + seconds
    while (left := find()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()


def test_a_simulate_killed_with_sigkill_leaves_no_ray_process(tmp_path):
    """SIGKILL of the `fedvlsm simulate` process alone (as the OOM killer does), once Ray has started: within
    10 s nothing of its Ray is left (the raylet's two agents stayed 60 s, about 0.1 GB each)."""
    from server.ray_reaper import POLL_S

    log = tmp_path / "out.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([FEDVLSM, "simulate", "--run-config", "simulations/configs/quick.toml",
                                 "--run-config", "run-name='kill' rounds=100 compare=false demo-sites=2"],
                                cwd=REPO, env=env_for(tmp_path), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    sid = proc.pid
    agents = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
    try:
        deadline = time.monotonic() + 180
        while not all(any(a in p for p in described(session_of(sid))) for a in agents):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(2 * POLL_S)  # the watcher has seen them
        running = described(session_of(sid))
        assert any("raylet" in p for p in running), running
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        left = wait_until_gone(lambda: session_of(sid), 10)
        assert not left, f"left running 10 s after the driver's SIGKILL: {described(left)}"
        # The watcher ends with them.
        assert not wait_until_gone(lambda: watchers_of(sid), 5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sid, signal.SIGKILL)
        kill_all(session_of(sid) + watchers_of(sid))
        proc.wait(timeout=30)


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
