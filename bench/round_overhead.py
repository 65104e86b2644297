"""Round overhead of `fedvlsm simulate` against a no-op Flower app, measured in one run.

Two parts, each in its own subprocess (one Ray session each), run one after
the other by the parent, which prints a table and writes JSON
(`bench/results/cpu-<host>-round_overhead.json`, or $OUT when set):

- ``noop``: a ServerApp that sends every node a train message carrying the
  same arrays (names, shapes, wire dtype) as our adapter, gets them back,
  then an evaluate message with them, and a ClientApp that answers at once:
  the price of Flower + Ray for one of our rounds with no work in it. It runs
  with Flower's `send_and_receive` (0.1 s pull interval) and pulling every
  0.02 s as fedvlsm's server does in simulation (server/messaging.py); each
  NOOP_RUNS times (default 2), in separate simulations: its rounds are 3 or
  4 of Flower's 0.1 s ticks by a phase that one simulation mostly keeps, so
  one draw can move the ratio by a third. Steady rounds of all runs pooled.
- ``fedvlsm``: the project's own simulation (`simulations.simulate.simulate`)
  on `arch:tiny`, synthetic demo sites; rounds.jsonl has each round's wall
  time and each site's `train_seconds`.

Overhead of a round = round wall time - the slowest site's training time
(the issue's definition). With fewer Ray actors than sites, sites train one
after the other inside an actor, so a second figure subtracts the training
time on the critical path instead (sum of train_seconds / actors); both are
reported. Round 1 pays the actors' start-up (for fedvlsm also torch,
transformers and the base loaded in each actor) and is reported apart, with
what it costs beyond the no-op's round 1; the 1.5x target is checked on the
steady rounds. Ray's own start-up (``ray.init`` to a ready cluster, in a
session of its own) is timed separately too. The fedvlsm run must train and
evaluate every site in every round (a failed site answers fast), and the
no-op runs bracket it (half before, half after).

    nice python bench/round_overhead.py                 # 10 sites, 8 rounds
    SITES=10 ROUNDS=8 CPUS_PER_SITE=1 NOOP_RUNS=2 python bench/round_overhead.py
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITES = int(os.environ.get("SITES", "10"))
ROUNDS = int(os.environ.get("ROUNDS", "8"))  # round times vary by ~0.1 s with Flower's 0.1 s ticks
CPUS_PER_SITE = float(os.environ.get("CPUS_PER_SITE", "1"))
# The no-op's rounds are 3 or 4 of Flower's 0.1 s ticks by the phase of its 0.1 s pull against the
# simulation's 0.1 s dispatch, and one simulation mostly keeps one phase: run it more than once.
NOOP_RUNS = int(os.environ.get("NOOP_RUNS", "2"))
ADAPTER = os.environ.get("ADAPTER", "shallow-vlc")


def run_config(home: str) -> dict:
    from common.federation_config import FederationConfig

    return {**FederationConfig().to_run_config(), "base": "arch:tiny", "adapter": ADAPTER, "rounds": ROUNDS,
            "local-epochs": 1, "demo-images": 12, "demo-image-size": 64, "max-images": 4,
            "compare": False, "finetune-epochs": 0, "home": home, "run-name": "overhead"}


def payload() -> dict:
    """The wire arrays of one train message of the fedvlsm part (same names, shapes, dtype)."""
    from common.bases import load_base
    from common.federation_config import FederationConfig
    from common.payload import split_personal, to_wire

    cfg = FederationConfig.from_run_config(run_config(tempfile.gettempdir()))
    model = cfg.initial_model(load_base(cfg.base))
    shared, _ = split_personal(model.adapter_state(), cfg.personal)
    return to_wire(shared, cfg.payload_dtype)


def part_noop_poll(out: Path) -> None:
    """The no-op app again, pulling replies every 0.02 s like fedvlsm's server in simulation."""
    part_noop(out, poll=0.02)


def part_noop(out: Path, poll: float = 0.0) -> None:
    import numpy as np
    from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from simulations.simulate import quiet_logs

    sys.path.insert(0, str(ROOT / "bench" / "noop_app"))
    from noop.apps import exchange  # poll 0: Flower's send_and_receive; else push, pull every `poll` s

    quiet_logs()
    wire = payload()
    arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in wire.items()})
    client = ClientApp()

    @client.train()
    def _train(msg: Message, context: Context) -> Message:
        # Fresh arrays of the received names, shapes and dtypes, as a site's update is; not the
        # received record echoed back (Flower addresses objects by content hash: an echo could
        # skip the reply's serialisation, see bench/noop_app/noop/apps.py).
        rng = np.random.default_rng()
        fresh = {k: Array(np.full(a.shape, rng.standard_normal(), dtype=a.dtype))
                 for k, a in msg.content["arrays"].items()}
        return Message(RecordDict({"arrays": ArrayRecord(fresh), "metrics": MetricRecord({"n": 1.0})}), reply_to=msg)

    @client.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"dice": 0.0})}), reply_to=msg)

    server = ServerApp()
    rounds: list[float] = []
    marks: dict[str, float] = {}

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        marks["main"] = time.perf_counter()
        nodes = []
        while len(nodes) < SITES:
            nodes = list(grid.get_node_ids())
            time.sleep(0.05)
        for _ in range(ROUNDS):
            t = time.perf_counter()
            for kind in ("train", "evaluate"):
                msgs = [Message(RecordDict({"arrays": arrays}), dst_node_id=n, message_type=kind) for n in nodes]
                replies = exchange(grid, msgs, poll)  # the deployment bench's no-op app's exchange
                assert len(replies) == len(nodes) and all(not r.has_error() for r in replies), "no-op round failed"
            rounds.append(time.perf_counter() - t)

    start = time.perf_counter()
    run_simulation(server_app=server, client_app=client, num_supernodes=SITES,
                   backend_config={"client_resources": {"num_cpus": CPUS_PER_SITE, "num_gpus": 0.0},
                                   "init_args": {"logging_level": 40, "log_to_driver": True}})
    total = time.perf_counter() - start
    out.write_text(json.dumps({"round_seconds": rounds, "total_seconds": total,
                               "payload_bytes": int(sum(np.asarray(v).nbytes for v in wire.values())),
                               "tensors": len(wire), "main_after_seconds": marks.get("main", start) - start}))


def part_fedvlsm(out: Path) -> None:
    from common.federation_config import FederationConfig
    from simulations.simulate import simulate

    with tempfile.TemporaryDirectory() as home:
        cfg = FederationConfig.from_run_config(run_config(home))
        # Synthesise the demo sites first: data preparation is a one-off, not round overhead.
        from simulations.demo_data import prepare_data

        prepare_data(cfg, SITES)
        start = time.perf_counter()
        rc = simulate(cfg, SITES, CPUS_PER_SITE, 0.0)
        total = time.perf_counter() - start
        rounds = [json.loads(line) for line in (cfg.runs_dir / cfg.run_name / "rounds.jsonl").read_text().splitlines()]
    out.write_text(json.dumps({"rc": rc, "total_seconds": total, "rounds": [
        {"round_seconds": r["round_seconds"], "train_phase_seconds": r["train_seconds"],
         # a failed site answers fast and would make a round look cheap: main() checks these
         "sites_trained": sum(s.get("train_seconds") is not None for s in r["sites"].values()),
         "sites_evaluated": sum(s.get("val_dice") is not None for s in r["sites"].values()),
         "failures": len(r.get("failures") or []), "excluded": len(r.get("excluded") or []),
         "status": r.get("status"),
         "site_train_seconds": [s.get("train_seconds") for s in r["sites"].values()],
         "site_handler_seconds": [s.get("handler_seconds") for s in r["sites"].values()],
         "base_loads": [s.get("base_loads") for s in r["sites"].values()],
         "payload_bytes_up": r["payload_bytes_up"]} for r in rounds]}))


def part_ray(out: Path) -> None:
    import ray

    t = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=40)
    ray.get(ray.remote(lambda: 1).remote())
    ready = time.perf_counter() - t
    t = time.perf_counter()
    ray.shutdown()
    out.write_text(json.dumps({"init_to_first_task_seconds": ready, "shutdown_seconds": time.perf_counter() - t}))


def child(name: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.run([sys.executable, __file__, "--part", name, str(out)], env=env, cwd=ROOT,
                              capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"part {name} failed (exit {proc.returncode})")
        return json.loads(out.read_text())


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def main() -> None:
    actors = max(1, int((os.cpu_count() or 1) // CPUS_PER_SITE))
    actors = min(actors, SITES)
    ray = child("ray")
    noops, noop_polls = [], []
    ours = None
    # The no-op runs bracket ours (half before, half after): a drift in the machine's speed over the
    # bench does not fall on one side only.
    for i in range(NOOP_RUNS):
        if i == NOOP_RUNS // 2:
            ours = child("fedvlsm")
        noops.append(child("noop"))
        noop_polls.append(child("noop_poll"))
    if ours is None:  # no no-op runs asked for
        ours = child("fedvlsm")
    noop, noop_poll = noops[0], noop_polls[0]  # the per-round table shows the first of each
    bad = [i + 1 for i, r in enumerate(ours["rounds"])
           if (r["sites_trained"], r["sites_evaluated"], r["failures"], r["excluded"]) != (SITES, SITES, 0, 0)]
    if ours["rc"] != 0 or bad or len(ours["rounds"]) != ROUNDS:
        raise SystemExit(f"the fedvlsm run did not train and evaluate every site in every round (exit {ours['rc']}, "
                         f"{len(ours['rounds'])} rounds, incomplete: {bad}): its round times would mislead")
    rows = []
    for i, r in enumerate(ours["rounds"]):
        train = [t for t in r["site_train_seconds"] if t is not None]
        rows.append({"round": i + 1, "round_seconds": r["round_seconds"], "slowest_train": max(train),
                     "sites_trained": r["sites_trained"], "sites_evaluated": r["sites_evaluated"],
                     "sum_train": sum(train), "overhead": r["round_seconds"] - max(train),
                     "overhead_critical_path": r["round_seconds"] - sum(train) / actors})
    steady = rows[1:] or rows

    def steady_of(runs: list[dict]) -> list[float]:  # every run's rounds after its first, pooled
        return [t for run in runs for t in (run["round_seconds"][1:] or run["round_seconds"])]

    res = {
        "machine": platform.node(), "cpus": os.cpu_count(), "sites": SITES, "rounds": ROUNDS,
        "cpus_per_site": CPUS_PER_SITE, "ray_actors": actors, "adapter": ADAPTER, "base": "arch:tiny",
        "payload_bytes": noop["payload_bytes"], "tensors": noop["tensors"],
        "ray_startup": ray,
        # round_seconds/total_seconds: the first simulation; steady_mean: all runs' steady rounds pooled
        "noop": {"round_seconds": noop["round_seconds"], "steady_mean": mean(steady_of(noops)),
                 "total_seconds": noop["total_seconds"],
                 "runs_steady_mean": [mean(steady_of([r])) for r in noops],
                 "runs_round_seconds": [r["round_seconds"] for r in noops]},
        "noop_poll_002": {"round_seconds": noop_poll["round_seconds"], "steady_mean": mean(steady_of(noop_polls)),
                          "total_seconds": noop_poll["total_seconds"],
                          "runs_steady_mean": [mean(steady_of([r])) for r in noop_polls],
                          "runs_round_seconds": [r["round_seconds"] for r in noop_polls]},
        "fedvlsm": {"rounds": rows, "total_seconds": ours["total_seconds"],
                    "steady_overhead_mean": mean([r["overhead"] for r in steady]),
                    "steady_overhead_critical_mean": mean([r["overhead_critical_path"] for r in steady]),
                    "steady_round_mean": mean([r["round_seconds"] for r in steady]),
                    "every_round_all_sites": True},
        # Round 1 is out of the steady figures: it pays the actors' start-up, for fedvlsm also torch,
        # transformers and the base loaded in each actor. What that costs beyond the no-op's round 1:
        "first_round": {"fedvlsm_seconds": rows[0]["round_seconds"], "fedvlsm_overhead": rows[0]["overhead"],
                        "noop_seconds": mean([r["round_seconds"][0] for r in noops]),
                        "extra_over_noop_seconds": rows[0]["round_seconds"]
                        - mean([r["round_seconds"][0] for r in noops])},
    }
    res["ratio_overhead_to_noop"] = res["fedvlsm"]["steady_overhead_mean"] / res["noop"]["steady_mean"]
    res["ratio_critical_overhead_to_noop"] = res["fedvlsm"]["steady_overhead_critical_mean"] / res["noop"]["steady_mean"]
    res["ratio_overhead_to_noop_poll_002"] = (res["fedvlsm"]["steady_overhead_mean"]
                                              / res["noop_poll_002"]["steady_mean"])
    print(f"{SITES} sites, {actors} Ray actor(s) (cpus-per-site {CPUS_PER_SITE}, {os.cpu_count()} CPUs), "
          f"payload {res['payload_bytes']:,} B in {res['tensors']} tensors, {ROUNDS} rounds")
    print(f"Ray start-up (init to first task): {ray['init_to_first_task_seconds']:.2f} s; round 1 (actors' "
          f"start-up; for fedvlsm also its imports and the base in each actor): fedvlsm "
          f"{res['first_round']['fedvlsm_seconds']:.2f} s, no-op {res['first_round']['noop_seconds']:.2f} s "
          f"(+{res['first_round']['extra_over_noop_seconds']:.2f} s)")
    print(f"{'round':>5} {'fedvlsm round s':>16} {'slowest train s':>16} {'overhead s':>11} "
          f"{'ovh (crit. path) s':>19} {'no-op round s':>14} {'no-op, 0.02 s poll':>19}")
    print("no-op steady round means per simulation: "
          + ", ".join(f"{x:.3f}" for x in res["noop"]["runs_steady_mean"]) + " s (Flower's send_and_receive); "
          + ", ".join(f"{x:.3f}" for x in res["noop_poll_002"]["runs_steady_mean"]) + " s (0.02 s poll); "
          "the table shows the first of each")
    for r, n, p in zip(rows, noop["round_seconds"], noop_poll["round_seconds"]):
        print(f"{r['round']:>5} {r['round_seconds']:>16.3f} {r['slowest_train']:>16.3f} {r['overhead']:>11.3f} "
              f"{r['overhead_critical_path']:>19.3f} {n:>14.3f} {p:>19.3f}")
    print(f"steady rounds (2..): overhead {res['fedvlsm']['steady_overhead_mean']:.3f} s "
          f"({res['ratio_overhead_to_noop']:.2f}x the no-op round {res['noop']['steady_mean']:.3f} s with Flower's "
          f"send_and_receive; {res['ratio_overhead_to_noop_poll_002']:.2f}x the no-op round "
          f"{res['noop_poll_002']['steady_mean']:.3f} s with fedvlsm's 0.02 s poll); critical-path overhead "
          f"{res['fedvlsm']['steady_overhead_critical_mean']:.3f} s ({res['ratio_critical_overhead_to_noop']:.2f}x)")
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"cpu-{platform.node() or 'host'}-round_overhead.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--part":
        {"noop": part_noop, "noop_poll": part_noop_poll, "fedvlsm": part_fedvlsm, "ray": part_ray}[sys.argv[2]](Path(sys.argv[3]))
    else:
        main()
