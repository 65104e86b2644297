"""The CPU bench scripts the README quotes run as documented and write what it cites (small sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    """`python bench/<script>.py` as documented, with `env` set and its JSON written under tmp_path: it must
    exit 0 and write exactly one `cpu-<host>-<script>.json`; returns the process and that JSON."""
    proc = subprocess.run([sys.executable, f"bench/{script}.py"], cwd=ROOT, env={**os.environ, **env,
                          "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = tmp_path.glob(f"cpu-*-{script}.json")
    return proc, json.loads(path.read_text())


def test_host_epoch_bench_runs_and_writes_its_json(tmp_path):
    proc, res = run_bench("host_epoch", tmp_path, ITEMS="40", EPOCHS="2")
    for part in ("shallow-cached", "dense"):
        row = res[part]
        assert len(row["epoch_s"]) == 2 and row["epoch_s_median"] > 0 and row["items"] > 0
        assert 0 <= row["cache_key_share_profiled"] < 1
    first, *_, last = res["cache_key_us_per_call"]
    assert last < first  # remembered keys are cheaper than computed ones
    assert "SegDataset.cache_key" in proc.stdout and "median epoch" in proc.stdout


def test_host_step_bench_runs_and_writes_its_json(tmp_path):
    """`python bench/host_step.py` at its smallest (arch:tiny for the count too): counts and host times."""
    proc, res = run_bench("host_step", tmp_path, BASE="arch:tiny", BLOCKS="2", STEPS="2")
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
    # The README's `python bench/round_overhead.py`, smallest sizes: 2 sites, 2 rounds, each no-op once
    # (every simulation starts Ray: a second no-op pair cost the suite about 35 s).
    env = {**os.environ, "SITES": "2", "ROUNDS": "2", "NOOP_RUNS": "1", "OUT": str(tmp_path),
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
        assert len(runs) == 1 and all(len(run) == 2 for run in runs) and runs[0] == res[noop]["round_seconds"]
        pooled = [run[1] for run in runs]  # the steady rounds (2..) of every simulation
        assert abs(res[noop]["steady_mean"] - sum(pooled) / len(pooled)) < 1e-12
    assert res["ratio_overhead_to_noop"] == res["fedvlsm"]["steady_overhead_mean"] / res["noop"]["steady_mean"]
    assert "no-op steady round means per simulation" in proc.stdout and "steady rounds (2..): overhead" in proc.stdout
    assert res["fedvlsm"]["every_round_all_sites"] is True
    assert all((r["sites_trained"], r["sites_evaluated"]) == (2, 2) for r in res["fedvlsm"]["rounds"])
    first = res["first_round"]  # round 1 (start-up) reported beside the no-op's, not dropped unseen
    assert first["fedvlsm_seconds"] == rounds[0]["round_seconds"]
    assert abs(first["extra_over_noop_seconds"] - (first["fedvlsm_seconds"] - first["noop_seconds"])) < 1e-12


def test_gpu_table_divides_each_row_by_its_own_reference(tmp_path):
    """`bench_fast.py --table` (the last step of bench/gpu.sh, which runs once on a lent card): training
    rows by the anchor's reference-style step; inference rows by inference in the reference style, not
    by a training step (a forward is about a third of a step: that ratio passed 2x whatever inference
    did); both dense epochs (loader, resident) against the step; the anchor read from its log when it
    was cut before writing anchor.json."""
    meta = {"device": "Test Card", "torch": "x", "batch": 32, "image_size": 352, "base": "arch:x"}
    (tmp_path / "fast-eager.json").write_text(json.dumps({
        **meta, "dense-vl_fast": {"img_per_s": 600.0}, "dense-vl_fast_epoch_loader": {"img_per_s": 480.0},
        "dense-vl_fast_epoch_resident": {"img_per_s": 570.0}, "inference_fast": {"img_per_s": 1000.0},
        "inference_reference-style": {"img_per_s": 800.0}}))
    (tmp_path / "anchor.log").write_text(
        "ref_fp16_eager_all12 {'s_per_step': 0.1, 'img_per_s': 300.0, 'tflops': 60.0}\n"
        "some other line\nshallow_cached {'img_per_s': 3000.0}\n")
    proc = subprocess.run([sys.executable, "bench/bench_fast.py", "--table"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / "gpu-Test-Card-fast.json").read_text())
    assert out["anchor"]["from_log"] and out["anchor"]["shallow_cached_step"]["img_per_s"] == 3000.0
    assert out["ours"]["dense-vl_fast"]["x_ref"] == 2.0
    assert out["ours"]["inference_fast"]["x_ref_inference"] == 1.25
    assert "x_ref" not in out["ours"]["inference_fast"]
    assert out["epoch_vs_step_loader"] == 0.8 and out["epoch_vs_step_resident"] == 0.95
    assert "fast epoch, loader / fast step: 0.80" in proc.stdout


def test_dashboard_poll_bench_runs_and_writes_its_json(tmp_path):
    """`python bench/dashboard_poll.py` at a small size: a poll since the last round is far smaller than the whole run."""
    proc, res = run_bench("dashboard_poll", tmp_path, ROUNDS="30", SITES="2", REPEAT="1")
    assert res["rounds"] == 30 and res["sites"] == 2
    assert res["since-last"]["bytes"] * 20 < res["whole"]["bytes"]
    assert res["since-last"]["bytes"] < res["since-last-1"]["bytes"] < res["whole"]["bytes"]
    assert "whole / since-last" in proc.stdout


def test_dashboard_page_bench_runs_and_writes_its_json(tmp_path):
    """`python bench/dashboard_page.py` at a small size, in headless Chromium (as the browser tests)."""
    from test_dashboard_browser import _need_browser

    _need_browser()
    proc, res = run_bench("dashboard_page", tmp_path, ROUNDS="30", SITES="2", NEW="1")
    assert res["rounds"] == 30 and res["sites"] == 2 and len(res["shown_seconds"]) == len(res["redraw_ms"]) == 1
    assert 0 < res["open_seconds"] and 0 < res["shown_seconds"][0] < 30  # the page polls every 2 s
    assert set(res["redraw_ms"][0]) == {"figures", "charts", "tables"} and res["redraw_ms_median"] > 0
    assert "new round shown after" in proc.stdout
