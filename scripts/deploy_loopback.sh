#!/usr/bin/env bash
# A real Flower deployment on one machine: one SuperLink and K SuperNodes on
# loopback (no TLS), each SuperNode a "hospital" with its own synthetic data
# folder and site folder, then `flwr run` against them. It shows the
# deployment path end to end and what a round costs when every message gets
# a fresh ClientApp process (see rounds.jsonl: process_age_seconds,
# import_seconds, base_load_seconds). Stops everything it started on exit.
#
#   K=3 ROUNDS=2 bash scripts/deploy_loopback.sh
set -euo pipefail
cd "$(dirname "$0")/.."
K=${K:-3}
ROUNDS=${ROUNDS:-2}
PORT=${PORT:-39391}
WORK=${WORK:-$(mktemp -d -t fedvlsm-deploy-XXXX)}
export FLWR_HOME=$WORK/flwr FEDVLSM_HOME=$WORK/fedvlsm
# SuperNodes do not install app dependencies; the project is installed here.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 HF_HUB_OFFLINE=1
mkdir -p "$FLWR_HOME" "$WORK/logs"

pids=()
cleanup() { for p in "${pids[@]}"; do pkill -TERM -P "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

fedvlsm data synth "$WORK/data" --sites "$K" --per-site 60 --seed 0 --image-size 96
flower-superlink --insecure --host 127.0.0.1 --port "$PORT" --database "$WORK/superlink.db" \
  --disable-runtime-dependency-installation >"$WORK/logs/superlink.log" 2>&1 &
pids+=($!)
# the SuperLink takes a few seconds to serve; flwr run gives up at once otherwise
python3 - "$PORT" <<'PY'
import sys, time, urllib.request
for _ in range(120):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=1)
        sys.exit(0)
    except Exception:
        time.sleep(0.5)
sys.exit("SuperLink did not come up within 60 s; see its log")
PY
for i in $(seq 0 $((K - 1))); do
  flower-supernode --insecure --superlink "127.0.0.1:$PORT" --port $((PORT + 10 + i)) \
    --node-config "data-path=\"$WORK/data/site-$i\" site-name=\"hospital-$i\"" \
    >"$WORK/logs/supernode-$i.log" 2>&1 &
  pids+=($!)
done
cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "loopback"

[superlink.loopback]
address = "127.0.0.1:$PORT"
insecure = true
EOF
echo "work folder: $WORK (logs in $WORK/logs)"
start=$(date +%s)
flwr run . loopback --stream --run-config "rounds=$ROUNDS min-sites=$K run-name='loopback' torch-threads=1"
echo "flwr run took $(( $(date +%s) - start )) s; records: $FEDVLSM_HOME/runs/loopback/rounds.jsonl"
