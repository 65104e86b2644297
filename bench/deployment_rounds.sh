#!/usr/bin/env bash
# Round time of a real loopback deployment (SuperLink + K sites, TLS + site
# authentication, `fedvlsm site start` = warm worker + SuperNode) against a
# no-op Flower app on the same SuperLink and SuperNodes, in the same script:
#
#   overhead = round time - slowest site's training time (train handler)
#   target:  overhead - no-op round time <= 1 s
#
#   K=3 ROUNDS=5 bash bench/deployment_rounds.sh      [NO_WORKER=1: the old per-message processes]
# Writes bench/results/deployment-rounds-<K>-sites[-no-worker].json.
set -euo pipefail
cd "$(dirname "$0")/.."
K=${K:-3}; ROUNDS=${ROUNDS:-5}
WORK=${WORK:-$(mktemp -d -t fedvlsm-bench-XXXX)}
start=$(date +%s)
WORK=$WORK K=$K ROUNDS=$ROUNDS NOOP_BASELINE=1 RUN_NAME=bench \
  RUN_CONFIG="base='arch:tiny' compare=false ${RUN_CONFIG:-}" bash scripts/deploy_loopback.sh
suffix=""; [ "${NO_WORKER:-0}" = 1 ] && suffix="-no-worker"
python3 - "$WORK" "$K" "$(( $(date +%s) - start ))" "bench/results/deployment-rounds-$K-sites$suffix.json" <<'PY'
import json, statistics as st, sys, platform, os
work, k, wall, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
noop = json.load(open(f"{work}/noop_rounds.json"))["round_seconds"]
rounds = [json.loads(l) for l in open(f"{work}/fedvlsm/runs/bench/rounds.jsonl")]
rows = []
for r in rounds:
    train = max(s["handler_seconds"] for s in r["sites"].values() if "handler_seconds" in s)
    rows.append({"round": r["round"], "round_seconds": r["round_seconds"], "slowest_train_handler_seconds": train,
                 "overhead_seconds": r["round_seconds"] - train,
                 "base_loads": {n: s.get("base_loads") for n, s in r["sites"].items()},
                 "process_messages": {n: s.get("process_messages") for n, s in r["sites"].items()}})
later = rows[1:] or rows  # round 1 includes the first base load at each site
noop_later = noop[1:] or noop
res = {"sites": k, "rounds": len(rows), "no_worker": os.environ.get("NO_WORKER") == "1", "wall_seconds": wall,
       "noop_round_seconds": noop, "fedvlsm_rounds": rows,
       "median_overhead_seconds_after_round_1": st.median(r["overhead_seconds"] for r in later),
       "median_noop_round_seconds_after_round_1": st.median(noop_later),
       "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "machine": platform.platform()}
res["overhead_minus_noop_seconds"] = res["median_overhead_seconds_after_round_1"] - res["median_noop_round_seconds_after_round_1"]
res["overhead_over_noop_ratio"] = res["median_overhead_seconds_after_round_1"] / res["median_noop_round_seconds_after_round_1"]
os.makedirs(os.path.dirname(out), exist_ok=True)
json.dump(res, open(out, "w"), indent=1)
print(f"no-op app round times (s): {', '.join(f'{x:.1f}' for x in noop)}")
for r in rows:
    print(f"fedvlsm round {r['round']}: {r['round_seconds']:.1f}s, slowest train {r['slowest_train_handler_seconds']:.2f}s, "
          f"overhead {r['overhead_seconds']:.1f}s, base_loads {sorted(set(r['base_loads'].values()))}, "
          f"process_messages {sorted(r['process_messages'].values())}")
print(f"median after round 1: overhead {res['median_overhead_seconds_after_round_1']:.1f}s vs no-op "
      f"{res['median_noop_round_seconds_after_round_1']:.1f}s: difference {res['overhead_minus_noop_seconds']:+.1f}s, "
      f"ratio {res['overhead_over_noop_ratio']:.2f} (target: difference <= 1 s); written to {out}")
PY
