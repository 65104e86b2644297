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
