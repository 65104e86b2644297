#!/usr/bin/env bash
# Prepare, on the development machine, what bench/gpu.sh needs on a lent GPU machine that
# cannot reach the internet (the device tool's machines: /work/.library/device/README.md):
#   .whl/       monai's wheel (the device image has torch, transformers, safetensors, ... but
#               not monai; it is pure Python, so one wheel serves any CPython 3)
#   .devcarry/  the shared anchor script (../shared/bench/anchor_clipseg_gpu.py), which
#               does not travel with the repository
# Both folders are gitignored; the device call names them in `carry`. Then, on the device, one
# call with timeout_s 540 (gpu.sh ends within its 450 s budget plus a part's 10 s kill grace and
# the table; the machine's start-up counts against the session's 15 minutes too, so plan on one shot):
#   mkdir -p $OUT/g; BUDGET_S=450 OUT=$OUT/g timeout 520 bash bench/gpu.sh 2>&1 | tee $OUT/g/console.log
# Everything is written straight under $OUT, row by row: a call cut short still brings back what it
# measured. Then the JSON and table from $OUT/g into bench/results/ under the card's name.
#
#   bash bench/device_carry.sh        # from anywhere; needs pip's index (PyPI) and ../shared
set -euo pipefail
cd "$(dirname "$0")/.."
MONAI=$(python3 -c "import importlib.metadata as m; print(m.version('monai'))" 2>/dev/null || echo 1.6.1)
rm -rf .whl && mkdir -p .whl .devcarry
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "monai==$MONAI"
ANCHOR=""
for a in ../shared/bench/anchor_clipseg_gpu.py /work/shared/bench/anchor_clipseg_gpu.py; do
    [ -f "$a" ] && { ANCHOR=$a; break; }
done
if [ -z "$ANCHOR" ]; then
    echo "device_carry: the shared anchor script (../shared/bench/anchor_clipseg_gpu.py) is not here;" \
         "bench/gpu.sh will run without the reference style (no ratios)" >&2
else
    cp "$ANCHOR" .devcarry/
fi
ls -l .whl .devcarry
du -sh .whl .devcarry
