#!/usr/bin/env bash
# A real Flower deployment on one machine, set up the way a consortium would:
# TLS with a development CA, SuperNode authentication with each site's
# registered EC key, one SuperLink and K hospitals on loopback, each started
# with `fedvlsm site start` (a warm site worker + its SuperNode) on its own
# synthetic data folder, then `flwr run` against them. Stops everything it
# started on exit (by process id).
#
#   K=3 ROUNDS=2 bash scripts/deploy_loopback.sh
#   INSECURE=1 K=3 bash scripts/deploy_loopback.sh   # no TLS, no site auth: local trials only
#   NO_WORKER=1 ...  # plain flower-supernode, a fresh ClientApp process (and imports) per message
#   NOOP_BASELINE=1 ...  # first run bench/noop_app (Flower's own round cost) on the same federation
#   NOOP_BASELINE=after ...  # ...or run it after the fedvlsm run
#
# Extra run config: RUN_CONFIG="base='arch:tiny' local-epochs=1" (appended).
# Extra `fedvlsm site start` options: SITE_ARGS="--dp-require" (each site).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
K=${K:-3}
ROUNDS=${ROUNDS:-2}
PORT=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
WORK=${WORK:-$(mktemp -d -t fedvlsm-deploy-XXXX)}
INSECURE=${INSECURE:-0}
NO_WORKER=${NO_WORKER:-0}
RUN_NAME=${RUN_NAME:-loopback}
export FLWR_HOME=$WORK/flwr FEDVLSM_HOME=$WORK/fedvlsm
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
# SuperNodes do not install app dependencies; the project is installed here.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 HF_HUB_OFFLINE=1
mkdir -p "$FLWR_HOME" "$WORK/logs"

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 1 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.5; done
    pkill -KILL -P "$p" 2>/dev/null || true; kill -KILL "$p" 2>/dev/null || true
  done
}
trap cleanup EXIT

fedvlsm data synth "$WORK/data" --sites "$K" --per-site 60 --seed 0 --image-size 96 >/dev/null
sites=(); for i in $(seq 0 $((K - 1))); do sites+=(--site "hospital-$i"); done

if [ "$INSECURE" = 1 ]; then
  echo "*** INSECURE mode: no TLS, no site authentication. For local trials on one machine only. ***"
  link_tls=(--insecure); scheme=http
else
  fedvlsm deploy certs "$WORK/certs" --server-name 127.0.0.1 "${sites[@]}" >"$WORK/logs/certs.txt"
  link_tls=(--ssl-ca-certfile "$WORK/certs/ca.crt" --ssl-certfile "$WORK/certs/server.pem"
            --ssl-keyfile "$WORK/certs/server.key" --enable-supernode-auth)
  scheme=https
fi
flower-superlink "${link_tls[@]}" --host 127.0.0.1 --port "$PORT" --database "$WORK/superlink.db" \
  --disable-runtime-dependency-installation >"$WORK/logs/superlink.log" 2>&1 &
pids+=($!)
# the SuperLink takes a few seconds to serve; flwr gives up at once otherwise
python3 - "$scheme" "$PORT" "$WORK/certs/ca.crt" <<'PY'
import ssl, sys, time, urllib.request
scheme, port, ca = sys.argv[1:]
ctx = ssl.create_default_context(cafile=ca) if scheme == "https" else None
for _ in range(240):
    try:
        urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", timeout=1, context=ctx)
        sys.exit(0)
    except Exception:
        time.sleep(0.5)
sys.exit("SuperLink did not come up within 120 s; see its log")
PY

if [ "$INSECURE" = 1 ]; then
  printf '[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:%s"\ninsecure = true\n' \
    "$PORT" >"$FLWR_HOME/config.toml"
else
  printf '[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:%s"\nroot-certificates = "%s"\n' \
    "$PORT" "$WORK/certs/ca.crt" >"$FLWR_HOME/config.toml"
  # The coordinator registers each site's public key; only registered sites may connect.
  for i in $(seq 0 $((K - 1))); do
    flwr supernode register "$WORK/certs/sites/hospital-$i.pub" loopback >>"$WORK/logs/register.log" 2>&1
  done
fi

for i in $(seq 0 $((K - 1))); do
  site_dir=$WORK/sites/hospital-$i
  if [ "$NO_WORKER" = 1 ]; then
    mkdir -p "$site_dir"
    tls=(--insecure); [ "$INSECURE" = 1 ] || tls=(--root-certificates "$WORK/certs/ca.crt"
      --auth-supernode-private-key "$WORK/certs/sites/hospital-$i.key")
    flower-supernode "${tls[@]}" --superlink "127.0.0.1:$PORT" --port "$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')" \
      --node-config "data-path=\"$WORK/data/site-$i\" site-name=\"hospital-$i\" site-dir=\"$site_dir\"" \
      >"$WORK/logs/supernode-$i.log" 2>&1 &
  else
    tls=(--insecure); [ "$INSECURE" = 1 ] || tls=(--root-certificates "$WORK/certs/ca.crt"
      --auth-key "$WORK/certs/sites/hospital-$i.key")
    fedvlsm site start --superlink "127.0.0.1:$PORT" --data "$WORK/data/site-$i" --site-name "hospital-$i" \
      --site-dir "$site_dir" "${tls[@]}" ${SITE_ARGS:-} >"$WORK/logs/site-$i.log" 2>&1 &
  fi
  pids+=($!)
done
echo "work folder: $WORK (logs in $WORK/logs, site logs in $WORK/sites/*/logs)"
noop_run() {  # noop_run NAME "RUN CONFIG" "what it is": one no-op run, round times in $WORK/noop_rounds<NAME>.json
  flwr run "$REPO/bench/noop_app" loopback --stream \
    --run-config "rounds=$ROUNDS min-sites=$K $2 out='$WORK/noop_rounds$1.json'" >"$WORK/logs/noop-run$1.log" 2>&1
  echo "no-op app ($3): $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["round_seconds"])' "$WORK/noop_rounds$1.json")"
}
noop_baseline() {
  # Flower's own cost of a round on these very SuperNodes: the no-op app, same message pattern and payload,
  # once with Flower's send_and_receive (3 s reply poll), once polling every 0.25 s like fedvlsm's
  # ServerApp, once more with round r+1's train messages pushed with round r's evaluate messages, as
  # fedvlsm's pipeline-rounds (the default) does.
  noop_run "" "" "Flower's send_and_receive"
  noop_run -poll "reply-poll=0.25" "0.25 s reply poll"
  noop_run -pipeline "reply-poll=0.25 pipeline=true" "0.25 s reply poll, pipelined"
}
if [ "${NOOP_BASELINE:-0}" = 1 ]; then noop_baseline; fi
start=$(date +%s)
flwr run "$REPO" loopback --stream \
  --run-config "rounds=$ROUNDS min-sites=$K run-name='$RUN_NAME' torch-threads=1 site-wait-timeout=300 ${RUN_CONFIG:-}"
echo "flwr run took $(( $(date +%s) - start )) s; records: $FEDVLSM_HOME/runs/$RUN_NAME/rounds.jsonl"
# After fedvlsm instead of before: Flower's idle SuperNodes poll every 3 s, so each run inherits the phases
# the one before left behind; swapping the order shows what that alone does to a comparison.
if [ "${NOOP_BASELINE:-0}" = after ]; then noop_baseline; fi
