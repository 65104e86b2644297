"""The Flower app for real: `flwr run` in a local simulation, and the app bundle (FAB).

Each test points FLWR_HOME and the local SuperLink's ports at its own
temporary values, so it neither sees nor disturbs another SuperLink, and
stops the SuperLink it started (and everything under it: SuperExec, the
simulation process, Ray) by process id, even when the run fails.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from client.processes import stop_all

REPO = Path(__file__).resolve().parents[1]
FLWR = shutil.which("flwr") or str(Path(sys.executable).parent / "flwr")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_superlink(port: int) -> None:
    """Terminate the SuperLink serving `port` and all its descendants."""
    mine = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if any("flower-superlink" in c for c in cmd) and str(port) in cmd:
            mine.append(p)
    for p in mine:
        stop_all(p.children(recursive=True) + [p], timeout=10)


@pytest.fixture
def flwr_env(tmp_path):
    port = free_port()
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(tmp_path / "flwr-home"),
        FEDVLSM_HOME=str(tmp_path / "fedvlsm-home"),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(port),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
        # Flower would otherwise `uv sync` the app's dependencies into a fresh
        # environment for every run (network access, minutes, and a broken Ray
        # import on this machine): the project is installed already.
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    try:
        yield env, tmp_path
    finally:
        stop_superlink(port)


@pytest.mark.slow
def test_flwr_run_with_flowers_default_two_supernodes_runs_the_demo(flwr_env):
    """`flwr run . --stream` as README shows it: Flower's default of 2 SuperNodes, 2 synthetic hospitals."""
    env, tmp = flwr_env
    home = tmp / "fedvlsm-home"
    run_config = (f"base='arch:tiny' rounds=2 demo-images=9 demo-image-size=64 run-name='e2e' "
                  f"home='{home}' lr=0.01")
    start = time.perf_counter()
    proc = subprocess.run(
        [FLWR, "run", str(REPO), "--stream", "--run-config", run_config],
        env=env, cwd=tmp, capture_output=True, text=True, timeout=420, check=False,
    )
    took = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    run_dir = home / "runs" / "e2e"
    # `flwr run --stream` exits 0 even when the ServerApp fails: judge by the records.
    assert (run_dir / "final" / "adapter" / "adapter_model.safetensors").is_file(), out[-4000:]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished", out[-4000:]
    print(f"flwr run (2 sites, 2 rounds, arch:tiny) took {took:.1f}s")

    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["status"] == "ok" and r["failures"] == [] and r["excluded"] == []
        assert sorted(r["sites"]) == ["site-0", "site-1"]
        assert r["payload_bytes_up"] > 0 and 0 <= r["dice"] <= 1
    # The sites synthesised one hospital per SuperNode.
    assert (home / "data" / "demo-s2-n9-px64-seed0" / "sites.json").is_file()
    # The frozen base was loaded once per process, never once per message.
    last = rounds[-1]["sites"]
    assert all(s["base_loads"] <= 1 for s in last.values()), last
    assert all(s["process_messages"] > 1 for s in last.values())
    for name in ("config.json", "checkpoints/round-0001/strategy.npz", "checkpoints/round-0002/adapter",
                 "final/summary.json"):
        assert (run_dir / name).exists(), name
    assert str(run_dir) in out  # the absolute run directory is printed


def test_app_bundle_stays_small_and_carries_no_weights():
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(REPO)
    assert len(fab) < 10 * 1024 * 1024
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert "server/server_app.py" in names and "client/client_app.py" in names
    assert not [n for n in names if n.endswith((".safetensors", ".bin", ".pt", ".npz", ".png"))]
