"""The CPU bench scripts the README quotes run as documented and write what it cites (small sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_host_epoch_bench_runs_and_writes_its_json(tmp_path):
    env = {**os.environ, "ITEMS": "40", "EPOCHS": "2", "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "bench/host_epoch.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = tmp_path.glob("cpu-*-host_epoch.json")
    res = json.loads(path.read_text())
    for part in ("shallow-cached", "dense"):
        row = res[part]
        assert len(row["epoch_s"]) == 2 and row["epoch_s_median"] > 0 and row["items"] > 0
        assert 0 <= row["cache_key_share_profiled"] < 1
    first, *_, last = res["cache_key_us_per_call"]
    assert last < first  # remembered keys are cheaper than computed ones
    assert "SegDataset.cache_key" in proc.stdout and "median epoch" in proc.stdout


def test_host_step_bench_runs_and_writes_its_json(tmp_path):
    """`python bench/host_step.py` at its smallest (arch:tiny for the count too): counts and host times."""
    env = {**os.environ, "BASE": "arch:tiny", "BLOCKS": "2", "STEPS": "2", "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "bench/host_step.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = tmp_path.glob("cpu-*-host_step.json")
    res = json.loads(path.read_text())
    assert res["base"] == "arch:tiny"
    for part in ("dense-vl", "shallow-vlc-cached"):
        stock, fused = res[part]["counts"]["stock"], res[part]["counts"]["fused"]
        for counts in (stock, fused):
            fb = counts["forward_backward"]
            assert fb["ops"] == counts["forward_loss"]["ops"] + counts["backward"]["ops"] > fb["compute_ops"] > 0
            assert sum(counts["forward_loss"]["by_op"].values()) == counts["forward_loss"]["ops"]
        assert fused["forward_backward"]["ops"] < stock["forward_backward"]["ops"]
        for mode in ("stock", "fused"):
            row = res[part]["host_time_arch_tiny"][mode]
            assert len(row["blocks_s"]) == 2 and row["median_s"] > 0
    # the cached step runs no tower: far fewer operators than the dense one
    assert res["shallow-vlc-cached"]["counts"]["fused"]["forward_loss"]["ops"] < \
        res["dense-vl"]["counts"]["fused"]["forward_loss"]["ops"] / 2
    assert "dispatched operators" in proc.stdout and "forward_backward" in proc.stdout


def test_round_overhead_bench_runs_and_writes_its_json(tmp_path):
    # The README's `python bench/round_overhead.py`, smallest sizes: 2 sites, 2 rounds, each no-op twice.
    env = {**os.environ, "SITES": "2", "ROUNDS": "2", "NOOP_RUNS": "2", "OUT": str(tmp_path),
           "FEDVLSM_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "bench/round_overhead.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (path,) = tmp_path.glob("cpu-*-round_overhead.json")
    res = json.loads(path.read_text())
    assert res["sites"] == 2 and res["rounds"] == 2 and res["tensors"] > 0 and res["payload_bytes"] > 0
    rounds = res["fedvlsm"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert 0 < r["slowest_train"] <= r["sum_train"] < r["round_seconds"]
        assert r["overhead"] == r["round_seconds"] - r["slowest_train"]
    for noop in ("noop", "noop_poll_002"):
        runs = res[noop]["runs_round_seconds"]
        assert len(runs) == 2 and all(len(run) == 2 for run in runs) and runs[0] == res[noop]["round_seconds"]
        pooled = [run[1] for run in runs]  # the steady rounds (2..) of both simulations
        assert abs(res[noop]["steady_mean"] - sum(pooled) / len(pooled)) < 1e-12
    assert res["ratio_overhead_to_noop"] == res["fedvlsm"]["steady_overhead_mean"] / res["noop"]["steady_mean"]
    assert "no-op steady round means per simulation" in proc.stdout and "steady rounds (2..): overhead" in proc.stdout
