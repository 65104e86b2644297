"""Run a command; report its wall time and the peak of the summed RSS of its whole process tree.

    python bench/measure_tree.py OUT.json [--label L] [--interval 0.5] -- CMD ARGS...

Every `interval` seconds the command's process and all its descendants
(psutil, recursive) are listed and their resident set sizes summed; the
peak of that sum, the process count at the peak and the largest process
count are written to OUT.json with the wall time and the exit code. RSS
counts shared pages (the same library mapped by two processes) once per
process, so the sum is an upper bound on the physical memory the tree used.
A process that lives shorter than the interval can be missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import psutil


def tree_rss(root: psutil.Process) -> tuple[int, int, dict[str, int]]:
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0, {}
    total, n, by_name = 0, 0, {}
    for p in procs:
        try:
            rss = p.memory_info().rss
            name = p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += rss
        n += 1
        by_name[name] = by_name.get(name, 0) + rss
    return total, n, by_name


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--label", default="")
    p.add_argument("--interval", type=float, default=0.5)
    argv = sys.argv[1:]
    if "--" not in argv:
        p.error("give the command after --")
    split = argv.index("--")
    a = p.parse_args(argv[:split])
    cmd = argv[split + 1:]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    root = psutil.Process(proc.pid)
    peak, peak_n, peak_by_name, max_n, samples = 0, 0, {}, 0, 0
    while proc.poll() is None:
        total, n, by_name = tree_rss(root)
        samples += 1
        max_n = max(max_n, n)
        if total > peak:
            peak, peak_n, peak_by_name = total, n, by_name
        time.sleep(a.interval)
    wall = time.perf_counter() - start
    res = {"label": a.label, "command": cmd, "exit_code": proc.returncode, "wall_seconds": round(wall, 1),
           "peak_tree_rss_bytes": peak, "peak_tree_rss_gib": round(peak / 2**30, 3),
           "processes_at_peak": peak_n, "max_processes": max_n,
           "peak_rss_by_process_name_mib": {k: round(v / 2**20, 1) for k, v in
                                            sorted(peak_by_name.items(), key=lambda kv: -kv[1])},
           "samples": samples, "interval_seconds": a.interval,
           "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg(),
           "memory_total_gib": round(psutil.virtual_memory().total / 2**30, 1), "machine": platform.platform()}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"[measure] {a.label or ' '.join(cmd)[:80]}: exit {proc.returncode}, wall {wall:.1f}s, "
          f"peak tree RSS {peak / 2**30:.2f} GiB over {peak_n} processes (max {max_n}); written to {a.out}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
