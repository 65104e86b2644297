#!/usr/bin/env bash
# The whole GPU performance check in one command, on one H100/H200, <= 8 minutes:
#   the shared anchor (reference style) and our plain vs fast paths in the same call,
#   so ratios compare; a table on stdout; JSON (with the card's name) in $OUT and
#   bench/results/.
#
#   bash bench/gpu.sh                  # on the device machine, from the repo root
#   TINY=1 bash bench/gpu.sh           # CPU dry run of every Python part (numbers mean nothing)
#
# Expects (as bench/gpu_check.sh): monai's wheel in .whl/ (installed to /tmp/site if
# monai is missing) and the anchor at .devcarry/anchor_clipseg_gpu.py or
# ../shared/bench/anchor_clipseg_gpu.py. Order: anchor, then PARTS (default: cuda-graph = the
# whole step captured with torch.cuda.graph (dense step and epoch, shallow cached epochs; first:
# never yet run on a card), eager, cli = the documented train/eval commands on the card, profile, the compiled dense step with
# CUDA graphs, the same with the decoder left eager, shallow epochs with CUDA graphs,
# real = fit on the demo base plain vs fast, compile-default);
# each part has its own timeout, so one slow compile cannot sink the rest, and every
# timeout is cut to what is left of BUDGET_S (default 450 s) for all parts together,
# so the whole script ends within 8 minutes (a part that no longer fits is skipped).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)  # before the install: the 8 minutes are the whole call's
if ! python3 -c "import monai" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# A rerun on a warm machine must not report an earlier run's files as its own.
rm -f "$OUT"/fast-*.json "$OUT"/fast-*.log "$OUT"/anchor.json "$OUT"/anchor.log "$OUT"/table.txt \
      "$OUT"/gpu-*-fast.json "$OUT"/cli.log "$OUT"/gpu.txt
BUDGET_S=${BUDGET_S:-450}
# A part's timeout: its own limit, or what is left of the budget (minus 10 s for the table), if less.
part_limit() { local left=$(( BUDGET_S - ($(date +%s) - START) - 10 )); echo $(( left < $1 ? left : $1 )); }
if [ -z "${TINY:-}" ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

ANCHOR=""
for a in .devcarry/anchor_clipseg_gpu.py ../shared/bench/anchor_clipseg_gpu.py /work/shared/bench/anchor_clipseg_gpu.py; do
    [ -f "$a" ] && { ANCHOR=$a; break; }
done
if [ -z "${TINY:-}" ]; then  # the card's time is scarce: stop now rather than run without what the ratios need
    [ -n "$ANCHOR" ] || [ -n "${SKIP_ANCHOR:-}" ] || { echo "gpu.sh: no anchor script (.devcarry/: run bench/device_carry.sh and carry it)"; exit 1; }
    python3 -c "import monai" || { echo "gpu.sh: monai cannot be imported (.whl/: run bench/device_carry.sh and carry it)"; exit 1; }
    python3 -c "import torch; assert torch.cuda.is_available()" || { echo "gpu.sh: no CUDA device"; exit 1; }
fi
if [ -n "$ANCHOR" ] && [ -z "${SKIP_ANCHOR:-}" ]; then
    echo "== anchor ($ANCHOR)"
    OUT=$OUT COMPILE=0 timeout -k 10 "$(part_limit 150)" python3 "$ANCHOR" 2>&1 | grep --line-buffered -v '^{' \
        | tee "$OUT/anchor.log"
else
    echo "== anchor not found or skipped: ratios will be missing"
fi
ours() {  # one bench_fast.py part in its own process, cut to its limit or what is left of the budget
    local part=$1 limit
    limit=$(part_limit "$2")
    if [ "$limit" -lt 30 ]; then echo "== ours: $part skipped (the ${BUDGET_S}s budget is spent)"; return; fi
    echo "== ours: $part (timeout ${limit}s)"
    local t0=$(date +%s)
    OUT=$OUT PART=$part timeout -k 10 "$limit" python3 bench/bench_fast.py 2>&1 \
        | grep --line-buffered -v "^\s*warnings.warn" \
        | tee "$OUT/fast-$part.log" | tail -30
    echo "== ours: $part took $(( $(date +%s) - t0 )) s"
}
cli_check() {  # the documented site commands, verbatim, on the card (the fast path is on by default on CUDA)
    local limit D
    limit=$(part_limit 150)  # four fresh processes (imports, the demo base) and 2x10 epochs: 60 s cut the eval off once
    if [ "$limit" -lt 20 ]; then echo "== cli skipped (the ${BUDGET_S}s budget is spent)"; return; fi
    echo "== fedvlsm train / eval on the card"
    D=$(mktemp -d)
    if [ -n "${TINY:-}" ]; then CLI_DEVICE=${CLI_DEVICE:-cpu}; CLI_COMPILE=${CLI_COMPILE:-off}; fi
    timeout -k 10 "$limit" bash -c "python3 -m common.cli data synth $D/data --sites 1 --per-site 60 --seed 3 >/dev/null &&
        python3 -m common.cli train $D/data/site-0 --base demo --adapter dense-vl --out $D/adapter --epochs 10 \
            --device ${CLI_DEVICE:-cuda} --quiet && python3 -m common.cli eval $D/data/site-0 --adapter-dir $D/adapter \
            --device ${CLI_DEVICE:-cuda} &&
        python3 -m common.cli train $D/data/site-0 --base demo --adapter dense-vl --out $D/adapter-graph --epochs 10 \
            --device ${CLI_DEVICE:-cuda} --compile ${CLI_COMPILE:-cuda-graph} --quiet" 2>&1 | tee "$OUT/cli.log"
    echo "cli exit code ${PIPESTATUS[0]} (124: cut by the timeout)" | tee -a "$OUT/cli.log"
}
# PARTS picks and orders the parts (each with its own cap in seconds); the default is all of them.
for part in ${PARTS:-cuda-graph eager cli profile compile-reduce-overhead compile-reduce-overhead-eager-decoder shallow-compiled real compile-default}; do
    case $part in
        cli) cli_check ;;
        eager) ours eager 180 ;;
        real) ours real 100 ;;
        cuda-graph) ours cuda-graph 120 ;;
        profile) ours profile 60 ;;
        *) ours "$part" 150 ;;
    esac
done
echo "== table"
OUT=$OUT python3 bench/bench_fast.py --table | tee "$OUT/table.txt"
if [ -z "${TINY:-}" ]; then
    mkdir -p bench/results && cp "$OUT"/gpu-*-fast.json "$OUT"/table.txt bench/results/ 2>/dev/null
    NAME=$(ls "$OUT"/gpu-*-fast.json 2>/dev/null | head -1 | xargs -r basename | sed 's/-fast.json//')
    [ -n "$NAME" ] && cp "$OUT/table.txt" "bench/results/$NAME-table.txt" && cp "$OUT/anchor.json" "bench/results/$NAME-anchor.json" 2>/dev/null
fi
echo "bench/gpu.sh took $(( $(date +%s) - START )) s"
