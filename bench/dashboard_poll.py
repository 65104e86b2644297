"""What one dashboard poll of a long run costs: the whole run vs only the rounds after those held.

A run page polls `/api/runs/<name>` every 2 s. Before, every poll re-read and
re-sent the whole run; now the page sends `?since=<last round>&base=<rounds_key>`
and gets only the later rounds (none while the run waits for its next round).
This builds a run store of ROUNDS rounds x SITES sites (as a server writes
it), serves it with the dashboard's app (Starlette's test
client: no network, so the figures are the server's own work plus JSON), and
times REPEAT polls of each kind:

    whole        GET /api/runs/<name>                       (what every poll cost before)
    since-last   GET /api/runs/<name>?since=N&base=K        (a poll with nothing new: most polls)
    since-last-1 the same with one round new                (the poll after a round ends)

    python bench/dashboard_poll.py                      # 5000 rounds x 10 sites
    ROUNDS=200 SITES=3 REPEAT=3 python bench/dashboard_poll.py
Writes bench/results/cpu-<host>-dashboard_poll.json (or $OUT/...).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from starlette.testclient import TestClient  # noqa: E402

from server.dashboard.app import create_app  # noqa: E402
from server.run_store import RunStore  # noqa: E402

ROUNDS = int(os.environ.get("ROUNDS", "5000"))
SITES = int(os.environ.get("SITES", "10"))
REPEAT = int(os.environ.get("REPEAT", "5"))
OUT = Path(os.environ.get("OUT", ROOT / "bench" / "results"))


def record(n: int) -> dict:
    """A round as the ServerApp records it: per-site train and evaluate figures, sizes, privacy."""
    return {"round": n, "status": "ok", "dice": 0.5 + n * 1e-5, "dice_personal": 0.6, "train_loss": 0.3,
            "payload_bytes_up": 1_000_000 * SITES, "payload_bytes_down": 2_000_000 * SITES, "train_seconds": 4.2,
            "round_seconds": 5.1, "time": f"2026-12-07T10:{n // 3600 % 60:02d}:{n % 60:02d}+00:00",
            "epsilon_max": 1.0 + n * 1e-4, "delta": 1e-5,
            "sites": {f"hospital-{i:02d}": {"num_examples": 120, "train_loss": 0.3, "train_seconds": 4.0,
                                            "payload_bytes_up": 1_000_000, "payload_bytes_down": 2_000_000,
                                            "val_dice": 0.5, "val_dice_personal": 0.6, "val_loss": 0.4,
                                            "val_examples": 30, "epsilon": 1.0, "delta": 1e-5, "dp_steps": 40,
                                            "node_id": str(10**18 + i)} for i in range(SITES)}}


def build(runs: Path) -> RunStore:
    """The run `long` under `runs`: its store only, as the ServerApp registers it and writes its rounds
    (RunRecords would also rewrite rounds.jsonl each round, quadratic here, and import torch)."""
    (runs / "long").mkdir(parents=True)
    store = RunStore.in_run_dir(runs / "long")
    store.register_run("long", {"rounds": ROUNDS + 1, "dp": "sample"}, {"base_parameters": 150_000_000})
    for n in range(1, ROUNDS + 1):
        store.write_round(record(n))
    return store


def write_result(bench: str, res: dict) -> None:
    """`res` as $OUT/cpu-<host>-<bench>.json (default OUT: bench/results), said on stdout."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"cpu-{platform.node() or 'host'}-{bench}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {path}")


def timed(client: TestClient, url: str) -> dict:
    times, size = [], 0
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        r = client.get(url)
        times.append(time.perf_counter() - t0)
        assert r.status_code == 200, r.text[:300]
        size = len(r.content)
    return {"url": url.split("?")[1] if "?" in url else "", "bytes": size, "seconds_median": statistics.median(times),
            "seconds": times}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = build(Path(tmp))
        built = time.perf_counter() - t0
        client = TestClient(create_app(Path(tmp)))
        whole = client.get("/api/runs/long").json()
        key, last = whole["rounds_key"], whole["rounds"][-1]["round"]
        res = {"rounds": ROUNDS, "sites": SITES, "repeat": REPEAT, "build_seconds": built,
               "machine": platform.node(), "python": sys.version.split()[0],
               "whole": timed(client, "/api/runs/long"),
               "since-last": timed(client, f"/api/runs/long?since={last}&base={key}")}
        store.write_round(record(ROUNDS + 1))
        one_new = timed(client, f"/api/runs/long?since={last}&base={key}")
        got = client.get(f"/api/runs/long?since={last}&base={key}").json()
        assert got["since"] == last and [r["round"] for r in got["rounds"]] == [ROUNDS + 1], "not an incremental read"
        res["since-last-1"] = one_new
    print(f"dashboard poll of a {ROUNDS}-round run with {SITES} sites ({REPEAT} polls each; median)")
    print(f"{'poll':<14}{'bytes':>14}{'server ms':>12}")
    for part in ("whole", "since-last", "since-last-1"):
        row = res[part]
        print(f"{part:<14}{row['bytes']:>14,}{row['seconds_median'] * 1e3:>12.1f}")
    print(f"whole / since-last: {res['whole']['bytes'] / res['since-last']['bytes']:.0f}x the bytes, "
          f"{res['whole']['seconds_median'] / res['since-last']['seconds_median']:.1f}x the time")
    write_result("dashboard_poll", res)


if __name__ == "__main__":
    main()
