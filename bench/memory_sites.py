"""Peak memory of a simulation with 2 vs 8 sites on the full-size architecture (CPU).

Each run is `fedvlsm simulate`'s in-process federation (simulations.simulate)
in a subprocess: `arch:clipseg-rd64-refined` (random weights), synthetic demo
sites, 1 round, 1 local epoch, `max-images` 1 per split, no comparison
phase, no final fine-tuning. A sampler thread in the parent sums the RSS of
the run's process tree (the driver and every Ray worker; psutil) every
0.5 s and keeps the peak. Ray runs floor(cores / cpus-per-site) ClientApp
actors; every site served by one actor shares that process's frozen base
(client/site.py's per-process cache), so memory follows the actor count, not
the site count.

    nice python bench/memory_sites.py                  # 2 and 8 sites, 2 Ray actors
    SITES=2,8 ACTORS=2 python bench/memory_sites.py    # or CPUS_PER_SITE=... to set it directly
Writes bench/results/cpu-<host>-memory_sites.json (or $OUT/...).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SITES = [int(s) for s in os.environ.get("SITES", "2,8").split(",")]
# Memory follows the number of Ray actors (one base each), so both runs get the same number: ACTORS
# (default 2) on any machine, i.e. cpus-per-site = CPUs / ACTORS, unless CPUS_PER_SITE is given. With
# cpus-per-site 1 on a machine with 8+ cores, 8 sites would run 8 actors and load 8 bases.
ACTORS = int(os.environ.get("ACTORS", "2"))
CPUS_PER_SITE = float(os.environ.get("CPUS_PER_SITE", str((os.cpu_count() or 1) / ACTORS)))
BASE = os.environ.get("BASE", "arch:clipseg-rd64-refined")


def child(sites: int, home: str) -> None:
    from common.federation_config import FederationConfig
    from simulations.simulate import simulate

    cfg = FederationConfig.from_run_config({
        **FederationConfig().to_run_config(), "base": BASE, "adapter": os.environ.get("ADAPTER", "shallow-vlc"), "rounds": 1,
        "local-epochs": 1, "demo-images": 6, "demo-image-size": 64, "max-images": 1, "batch-size": 1,
        "compare": False, "finetune-epochs": 0, "home": home, "run-name": "mem"})
    raise SystemExit(simulate(cfg, sites, CPUS_PER_SITE, 0.0))


def tree_rss(proc: psutil.Process) -> tuple[int, int]:
    total, count = 0, 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # exited meanwhile: nothing to count
            total += p.memory_info().rss
            count += 1
    return total, count


def measure(sites: int) -> dict:
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(sites), home], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ps = psutil.Process(proc.pid)
        peak = {"rss": 0, "procs": 0}
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                rss, n = tree_rss(ps)
                if rss > peak["rss"]:
                    peak.update(rss=rss, procs=n)
                time.sleep(0.5)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        out, _ = proc.communicate()
        done.set()
        t.join()
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(out[-4000:])
        raise SystemExit(f"{sites}-site run failed (exit {proc.returncode})")
    return {"sites": sites, "peak_rss_gb": peak["rss"] / 2**30, "processes_at_peak": peak["procs"],
            "seconds": seconds}


def main() -> None:
    actors = max(1, int((os.cpu_count() or 1) // CPUS_PER_SITE))
    rows = [measure(n) for n in SITES]
    base = rows[0]["peak_rss_gb"]
    print(f"{BASE}, {os.cpu_count()} CPUs, cpus-per-site {CPUS_PER_SITE}: up to {actors} Ray ClientApp actor(s)")
    print(f"{'sites':>5} {'peak RSS GB (tree)':>19} {'processes':>10} {'ratio':>6} {'wall s':>7}")
    for r in rows:
        r["ratio_to_first"] = r["peak_rss_gb"] / base
        print(f"{r['sites']:>5} {r['peak_rss_gb']:>19.2f} {r['processes_at_peak']:>10} {r['ratio_to_first']:>6.2f} "
              f"{r['seconds']:>7.0f}")
    res = {"machine": platform.node(), "cpus": os.cpu_count(), "base": BASE, "cpus_per_site": CPUS_PER_SITE,
           "ray_actors_max": actors, "runs": rows}
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"cpu-{platform.node() or 'host'}-memory_sites.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), sys.argv[3])
    else:
        main()
