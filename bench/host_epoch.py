"""Host time of a fast-path training epoch, on the CPU: what a host-bound GPU epoch pays besides kernels.

On an H200 the fast steps are host-bound (README, Benchmarks), so Python work
per item and per batch (keys, lookups, stacking) is paid in wall time there
too. Here, on `arch:tiny` with one thread, the model's own work is small and
that host work shows. Parts: ``shallow-cached`` (shallow-vlc epochs on cached
frozen activations, after the first) and ``dense`` (dense-vl fast epochs, the
pixels read through the site cache). Each epoch is timed; the table gives the
median of EPOCHS epochs after the first, and the share of one epoch spent in
``SegDataset.cache_key`` (cProfile, a separate epoch; the profiler inflates
small Python calls, so the time per key is also measured without it).

    python bench/host_epoch.py                   # writes bench/results/cpu-<host>-host_epoch.json
    ITEMS=460 EPOCHS=5 OUT=/tmp/x python bench/host_epoch.py
"""

from __future__ import annotations

import cProfile
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

ITEMS = int(os.environ.get("ITEMS", "460"))
EPOCHS = int(os.environ.get("EPOCHS", "5"))
OUT = Path(os.environ.get("OUT", ROOT / "bench" / "results"))


def measure(base, variant: str, ds) -> dict:
    from bench_fast import runner_for  # the same FastEpochs set-up as the GPU bench
    from common.config import TrainConfig

    cfg = TrainConfig(fast="on", batch_size=32, progress=False, weight_decay=0.0)
    _, r = runner_for(base, variant, ds, cfg, torch.device("cpu"))
    ds.set_epoch(0)
    r.run_epoch(lambda it: it)  # fills the caches
    times = []
    for epoch in range(1, EPOCHS + 1):
        ds.set_epoch(epoch)
        t = time.perf_counter()
        r.run_epoch(lambda it: it)
        times.append(time.perf_counter() - t)
    ds.set_epoch(EPOCHS + 1)
    prof = cProfile.Profile()
    prof.enable()
    r.run_epoch(lambda it: it)
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    total = max(v[3] for k, v in stats.items() if k[2] == "run_epoch")
    keys = sum(v[3] for k, v in stats.items() if k[2] == "cache_key" and k[0].endswith("dataset.py"))
    return {"epoch_s_median": statistics.median(times), "epoch_s": times, "items": len(ds),
            "cache_key_share_profiled": keys / total}


def main() -> None:
    from common.bases import load_base
    from common.data import SegDataset, load_items, synthesize

    torch.set_num_threads(1)
    base = load_base("arch:tiny")
    res = {"host": platform.node(), "torch": torch.__version__, "items_per_site": ITEMS, "epochs": EPOCHS}
    with tempfile.TemporaryDirectory() as tmp:
        site = synthesize(Path(tmp) / "d", sites=1, per_site=ITEMS, seed=0, image_size=64)[0]
        ds = SegDataset(load_items(site, "train"), base.image_size, train=True, seed=0)
        passes = []
        for _ in range(3):  # a fresh dataset's first pass, then two more (what an epoch asks again)
            t = time.perf_counter()
            for i in range(len(ds)):
                ds.cache_key(i)
            passes.append((time.perf_counter() - t) / len(ds) * 1e6)
        res["cache_key_us_per_call"] = passes
        print(f"SegDataset.cache_key: {passes[0]:.1f} us per call (first pass), {passes[-1]:.1f} us (third)")
        for part, variant in (("shallow-cached", "shallow-vlc"), ("dense", "dense-vl")):
            ds = SegDataset(load_items(site, "train"), base.image_size, train=True, seed=0,
                            cache_dir=Path(tmp) / "cache")
            res[part] = row = measure(base, variant, ds)
            print(f"{part:<15} {row['items']} items: median epoch {row['epoch_s_median'] * 1e3:7.1f} ms, "
                  f"cache_key {row['cache_key_share_profiled'] * 100:4.1f}% of a profiled epoch", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"cpu-{platform.node() or 'host'}-host_epoch.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
