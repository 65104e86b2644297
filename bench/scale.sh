#!/usr/bin/env bash
# Scale benchmark (not a test): wall time and peak memory (sum of RSS over the
# whole process tree, sampled every 0.5 s with psutil: bench/measure_tree.py) of
#
#  1. a 50-site simulation, 3 rounds, arch:tiny, IID partition of 3 synthetic
#     hospitals x 120 images (84/18/18 per hospital: every one of the 50 sites
#     gets >= 1 item in each split) -> bench/results/scale-simulation-50-sites.json
#  2. a 10-SuperNode loopback deployment (SuperLink + 10 x `fedvlsm site start`,
#     TLS + site auth), 2 rounds, arch:tiny -> bench/results/scale-deployment-10-sites.json
#
#   bash bench/scale.sh              # both
#   ONLY=simulation bash bench/scale.sh   /   ONLY=deployment bash bench/scale.sh
#   SIM_SITES=50 SIM_ROUNDS=3 DEP_SITES=10 DEP_ROUNDS=2 (defaults)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
SIM_SITES=${SIM_SITES:-50}; SIM_ROUNDS=${SIM_ROUNDS:-3}
DEP_SITES=${DEP_SITES:-10}; DEP_ROUNDS=${DEP_ROUNDS:-2}
WORK=${WORK:-$(mktemp -d -t fedvlsm-scale-XXXX)}
ONLY=${ONLY:-}
echo "work folder: $WORK"

if [ -z "$ONLY" ] || [ "$ONLY" = simulation ]; then
  FEDVLSM_HOME=$WORK/sim python3 bench/measure_tree.py "bench/results/scale-simulation-$SIM_SITES-sites.json" \
    --label "fedvlsm simulate, $SIM_SITES sites x $SIM_ROUNDS rounds, arch:tiny, iid" -- \
    fedvlsm simulate --num-sites "$SIM_SITES" --run-config \
    "base='arch:tiny' rounds=$SIM_ROUNDS partition='iid' demo-sites=3 demo-images=120 demo-image-size=64 local-epochs=1 compare=false run-name='scale-$SIM_SITES' home='$WORK/sim'"
  python3 - "$WORK/sim/runs/scale-$SIM_SITES/rounds.jsonl" "bench/results/scale-simulation-$SIM_SITES-sites.json" <<'PY'
import json, sys
rounds = [json.loads(l) for l in open(sys.argv[1])]
res = json.load(open(sys.argv[2]))
res["rounds"] = [{"round": r["round"], "status": r["status"], "round_seconds": round(r["round_seconds"], 2),
                  "sites_trained": sum("num_examples" in s for s in r["sites"].values()),
                  "sites_evaluated": sum("val_dice" in s for s in r["sites"].values()),
                  "failures": len(r["failures"]), "dice": r["dice"]} for r in rounds]
json.dump(res, open(sys.argv[2], "w"), indent=1)
for r in res["rounds"]:
    print(f"  round {r['round']}: {r['status']}, {r['round_seconds']}s, trained {r['sites_trained']}, "
          f"evaluated {r['sites_evaluated']}, failures {r['failures']}, val Dice {r['dice']:.4f}")
PY
fi

if [ -z "$ONLY" ] || [ "$ONLY" = deployment ]; then
  python3 bench/measure_tree.py "bench/results/scale-deployment-$DEP_SITES-sites.json" \
    --label "loopback deployment, SuperLink + $DEP_SITES sites (fedvlsm site start, TLS + auth), $DEP_ROUNDS rounds, arch:tiny" -- \
    env WORK="$WORK/dep" K="$DEP_SITES" ROUNDS="$DEP_ROUNDS" RUN_NAME=scale \
    RUN_CONFIG="base='arch:tiny' compare=false local-epochs=1" bash scripts/deploy_loopback.sh
  python3 - "$WORK/dep/fedvlsm/runs/scale/rounds.jsonl" "bench/results/scale-deployment-$DEP_SITES-sites.json" <<'PY'
import json, sys
rounds = [json.loads(l) for l in open(sys.argv[1])]
res = json.load(open(sys.argv[2]))
res["rounds"] = [{"round": r["round"], "status": r["status"], "round_seconds": round(r["round_seconds"], 2),
                  "sites_trained": sum("num_examples" in s for s in r["sites"].values()),
                  "failures": len(r["failures"]), "dice": r["dice"]} for r in rounds]
json.dump(res, open(sys.argv[2], "w"), indent=1)
for r in res["rounds"]:
    print(f"  round {r['round']}: {r['status']}, {r['round_seconds']}s, trained {r['sites_trained']}, "
          f"failures {r['failures']}, val Dice {r['dice']:.4f}")
PY
fi
