"""`fedvlsm simulate` as a user runs it: the README's commands, verbatim, in subprocesses.

- exit codes: 0 finished, 2 a refused configuration (one line, no traceback);
- a run started from a preset TOML, killed mid-run (SIGKILL of the whole
  process tree: a real crash), continued with the README's resume command,
  ends with the same final adapter as an uninterrupted run;
- nothing is left running afterwards (no SuperLink, no Ray);
- SIGTERM mid-run ends the run `stopped` (status.json and the run store) and the command at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[1]
FEDVLSM = shutil.which("fedvlsm") or str(Path(sys.executable).parent / "fedvlsm")


def readme_commands(prefix: str) -> list[str]:
    """Every line of README.md's shell blocks that starts with `prefix`."""
    text = (REPO / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += [line.strip() for line in block.splitlines() if line.strip().startswith(prefix)]
    return lines


def env_for(home: Path) -> dict[str, str]:
    return {**os.environ, "FEDVLSM_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run(cmd: str, home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    argv = shlex.split(cmd)
    assert argv[0] == "fedvlsm"
    return subprocess.run([FEDVLSM, *argv[1:]], cwd=REPO, env=env_for(home), capture_output=True, text=True,
                          timeout=timeout, check=False)


def ray_processes_of(home: Path, session: int | None = None) -> list[psutil.Process]:
    """Processes of a run under `home`: by their environment, and (a run started in a session of its own)
    by session: Ray renames its agents (`ray::DashboardAgent`, ...), which can hide their environment."""
    out = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            env = p.info["environ"] or {}
            in_session = session is not None and os.getsid(p.pid) == session
        except (psutil.AccessDenied, psutil.NoSuchProcess, ProcessLookupError, PermissionError):
            continue
        if env.get("FEDVLSM_HOME") == str(home) or in_session:
            out.append(p)
    return out


START = "fedvlsm simulate --run-config simulations/configs/quick.toml --run-config \"run-name='quick'\""
RESUME = "fedvlsm simulate --run-config \"run-name='quick' resume=true\""


def test_readme_documents_the_commands_tested_here():
    commands = readme_commands("fedvlsm simulate")
    assert START in commands and RESUME in commands, commands


def test_a_configuration_error_is_one_line_and_exit_2(tmp_path):
    out = run("fedvlsm simulate --run-config \"adaptr='dense-vl'\"", tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        out.stderr.strip()] and "did you mean 'adapter'" in out.stderr and "Traceback" not in out.stderr
    out = run("fedvlsm simulate --run-config \"resume=true run-name='nothing-here'\"", tmp_path)
    assert out.returncode == 2 and "no run 'nothing-here' to resume" in out.stderr, out.stderr


@pytest.mark.slow
def test_readme_resume_after_a_crash_gives_the_uninterrupted_result(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    # Something else listens on the ports of Flower's managed local SuperLink
    # (as another user's SuperLink would): the hermetic simulation never talks
    # to it, so it neither hangs nor runs elsewhere.
    squatters = []
    for port in (39091, 39093):
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen(1)
            squatters.append(sock)
        except OSError:  # already taken, by a real SuperLink: the point stands
            sock.close()
    try:
        out = run(START, straight)
    finally:
        for sock in squatters:
            sock.close()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "\x1b[" not in out.stderr  # no ANSI colours into a pipe
    assert "Manually terminating" not in out.stderr
    # The same command again: the run exists. Refused (exit 2, one line); it said "run 'quick' finished
    # after ...: RunRecordsError" (the old run's status) and exited 1.
    again = run(START, straight)
    assert again.returncode == 2, again.stderr[-3000:]
    assert "already holds rounds of a run named 'quick'" in again.stderr and "finished after" not in again.stderr
    assert json.loads((straight / "runs/quick/status.json").read_text())["status"] == "finished"

    # The same command, killed (SIGKILL, whole process tree) as soon as round 1 is recorded.
    argv = shlex.split(START)
    proc = subprocess.Popen([FEDVLSM, *argv[1:]], cwd=REPO, env=env_for(crashed),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    rounds_file = crashed / "runs" / "quick" / "rounds.jsonl"
    deadline = time.monotonic() + 240
    while not (rounds_file.is_file() and rounds_file.read_text().strip()):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    tree = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):  # dead already
            p.kill()
    proc.wait(timeout=30)
    assert not (crashed / "runs" / "quick" / "final").exists(), "killed too late: the run had finished"
    config_before = json.loads((crashed / "runs" / "quick" / "config.json").read_text())

    out = run(RESUME, crashed)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    saved = json.loads((crashed / "runs" / "quick" / "config.json").read_text())
    # The saved config governed the resume (no pyproject defaults crept in).
    assert saved == config_before
    assert (saved["base"], saved["adapter"], saved["local-epochs"], saved["lr"]) == ("arch:tiny", "dense-vl", 1, 0.01)
    a = load_file(str(straight / "runs/quick/final/adapter/adapter_model.safetensors"))
    b = load_file(str(crashed / "runs/quick/final/adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    print(f"resumed vs uninterrupted: max |diff| = {worst:.3g}")
    assert worst <= 1e-6
    rounds = [json.loads(x) for x in (crashed / "runs/quick/rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    # Each site's timeline (server/messaging.py, client/client_app.py): pushed, handled, pulled, in that order.
    for r in rounds:
        for s in r["sites"].values():
            for tl in (s["timeline"], s["val_timeline"]):
                assert tl["t-sent"] <= tl["t-handler-start"] <= tl["t-handler-end"] <= tl["t-received"], tl
    assert json.loads((crashed / "runs/quick/status.json").read_text())["status"] == "finished"
    # Nothing left running from either run.
    time.sleep(1.0)
    left = ray_processes_of(straight) + ray_processes_of(crashed)
    assert not left, [p.info["cmdline"] for p in left]


def test_sigterm_stops_the_run_and_says_so_everywhere(tmp_path):
    """SIGTERM mid-run (as `kill`, or a scheduler, sends it): the run ends `stopped`, in status.json and
    the run store alike, with the signal as its reason; the command exits 1 at once, leaving nothing running."""
    from server.run_store import RunStore

    run_config = "run-name='int' rounds=100 compare=false demo-sites=2"
    log = tmp_path / "out.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([FEDVLSM, "simulate", "--run-config", "simulations/configs/quick.toml",
                                 "--run-config", run_config], cwd=REPO, env=env_for(tmp_path), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "round 1/100" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        # the check below sees Ray's renamed agents (matching by environment alone missed them)
        names = [" ".join(p.info["cmdline"] or []) for p in ray_processes_of(tmp_path, session=proc.pid)]
        assert any(n.startswith("ray::DashboardAgent") for n in names), names
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 1, log.read_text()[-3000:]
        # Nothing left (an actor may take a moment to see its driver gone), seen before the clean-up
        # below could hide it.
        deadline = time.monotonic() + 15
        while (left := ray_processes_of(tmp_path, session=proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, [p.info["cmdline"] for p in left]
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone already, as it should be
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    text = log.read_text()
    assert "fedvlsm simulate: run 'int' stopped after" in text and "interrupted (SIGTERM)" in text, text[-3000:]
    run_dir = tmp_path / "runs" / "int"
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["status"], status["reason"]) == ("stopped", "interrupted (SIGTERM)")
    row = RunStore.in_run_dir(run_dir).summary()
    assert (row["status"], row["reason"]) == ("stopped", "interrupted (SIGTERM)") and row["ended_at"]
