"""`fedvlsm site start` notices when its SuperNode can no longer serve anything.

Flower's SuperNode starts one SuperExec (the process that starts the ClientApp
for every message) and never looks at it again: without it the SuperNode stays
connected and 'online' at the SuperLink but serves nothing, so every round
waits out its round-timeout for this site while the site's console shows
nothing wrong. The command, run as a hospital runs it (no SuperLink needed: the
SuperNode starts its SuperExec before connecting, and keeps retrying the
connection), must say so and exit 1 with nothing left running.
"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from client.launcher import _free_port, _is_superexec
from client.processes import stop_all

pytestmark = pytest.mark.slow


def _superexecs(root: psutil.Process) -> list[psutil.Process]:
    return [p for p in root.children(recursive=True) if _is_superexec(p)]


def test_site_start_exits_when_the_superexec_dies_under_a_live_supernode(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    cmd = [sys.executable, "-m", "common.cli", "site", "start", "--superlink", f"127.0.0.1:{_free_port()}",
           "--data", str(data), "--site-name", "h", "--site-dir", str(tmp_path / "site"), "--insecure"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    seen: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120  # the worker imports torch first (5-20 s on a loaded machine)
        while not (superexec := _superexecs(root)):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no SuperExec started"
            time.sleep(0.2)
        seen = root.children(recursive=True)
        supernode = superexec[0].parent()
        assert "client.supernode" in " ".join(supernode.cmdline())  # the patched SuperNode (client/supernode.py)
        # The launcher looks every 2 s: let it see the SuperExec running (one it never saw counts as gone
        # only after 60 s, which the timeout below also allows).
        time.sleep(5)
        superexec[0].kill()  # e.g. the kernel's OOM killer
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, alive = psutil.wait_procs(seen, timeout=5)
        stop_all(alive, timeout=5)
    assert proc.returncode == 1, out[-3000:]
    assert "the SuperNode's SuperExec (it starts the ClientApp process of every message) has exited" in out, out
    assert "stopping the SuperNode and the worker" in out
    assert alive == [], [" ".join(p.cmdline()[:4]) for p in alive]  # the launcher stopped its SuperNode and worker


def test_a_signal_while_a_dead_worker_is_restarted_is_a_clean_stop(tmp_path, monkeypatch):
    # SIGTERM while the launcher waited for the restarted worker ended in "ERROR: stopped" and exit 1
    # (a service manager records a failed unit), against the documented exit 0 on SIGTERM/SIGINT.
    from client.launcher import Site
    from common.cli import build_parser

    args = build_parser().parse_args(["site", "start", "--superlink", "127.0.0.1:9", "--data", str(tmp_path),
                                      "--site-dir", str(tmp_path / "site"), "--insecure"])
    site = Site(args)
    site.worker = subprocess.Popen([sys.executable, "-c", "raise SystemExit(9)"])  # the worker died
    site.worker.wait()

    def signalled_while_starting() -> None:
        site.stopping = True  # what the SIGTERM handler does
        raise RuntimeError("stopped")  # what start_worker raises when it sees it

    monkeypatch.setattr(site, "start_worker", signalled_while_starting)
    assert site.watch(poll=0.01) == 0
    assert site.restarts == 1
