#!/usr/bin/env bash
# One GPU session's whole check, run on a lent device machine from the repo root:
# the shared anchor beside our own train-step benchmark (same machine, same call,
# so ratios compare), then a short real training run on the GPU (autocast path).
# Expects monai's wheel in .whl/ and the anchor script in .devcarry/ (both carried).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
[ -n "${SKIP_ANCHOR:-}" ] || COMPILE=0 timeout 200 python3 .devcarry/anchor_clipseg_gpu.py 2>&1 | grep -v '^{' | tee "$OUT/anchor.log"
timeout 200 python3 bench/bench_train_step.py 2>&1 | grep -v '^{' | tee "$OUT/bench.log"
python3 -m common.cli data synth /tmp/d --sites 1 --per-site 60 --seed 3 >/dev/null
timeout 120 python3 -m common.cli train /tmp/d/site-0 --base demo --adapter dense-vl --out /tmp/o --epochs 10 \
    --device cuda --quiet 2>&1 | tee "$OUT/train_gpu.log"
python3 -m common.cli eval /tmp/d/site-0 --adapter-dir /tmp/o --device cuda 2>&1 | tee -a "$OUT/train_gpu.log"
