#!/usr/bin/env bash
# The whole GPU check of the fused Avatar passes (issue 15) in one call, on a CUDA machine without
# internet: correctness first (the compiled passes against the loop, values and gradients, and
# memory flat in the number of Avatars), then the goals' figures side by side in the same process
# per benchmark (loop and compiled against the same plain loss and the same base-loss step).
#
#   bash bench/gpu_check.sh [OUT_DIR]          # default: $OUT, else bench/gpu-out
#
# The core needs torch alone (with Triton, which CUDA builds of torch ship): no install. The
# training step needs mmcv-full with CUDA ops and mmdet: where they do not import, the script
# installs them offline with scripts/install.sh from wheels in $AKD_WHEELS (default: wheels/, e.g.
# a carried folder holding mmcv_full-*.whl built for that torch and mmdet's wheel and its pure
# Python dependencies), else reports the training step as skipped.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/gpu-out}}
PY=${PYTHON:-python3}
WHEELS=${AKD_WHEELS:-wheels}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)  date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT_DIR/machine.txt" 2>&1
cat "$OUT_DIR/machine.txt"

echo "== correctness: tests/test_fused.py (CPU inductor) and the CUDA twins"
$PY -m pytest -q -p no:cacheprovider tests/test_fused.py tests/test_cuda.py \
    -k "not akd_train and not akd_refuses and (fused or compiled or counter or seeds or float16 or refused or loop)" \
    > "$OUT_DIR/tests.txt" 2>&1
echo "tests exit $?: $(tail -1 "$OUT_DIR/tests.txt")"

echo "== core: CWD, MSE, MasKD with 0, 1 and 8 Avatars, loop and compiled"
for factor in paper release; do
  $PY bench/core_losses.py --device cuda --repeats 20 --uncertainty "$factor" --bases cwd,mse,maskd \
      --avatars 0,1,8 --avatar-kernels loop,compiled --json "$OUT_DIR/core_$factor.json" \
      > "$OUT_DIR/core_$factor.md" 2> "$OUT_DIR/core_$factor.err"
  echo "core ($factor factor), exit $?:"; cat "$OUT_DIR/core_$factor.md"
done

echo "== training step: fcos-r101-r50, 1333x800, batch 2"
if ! $PY -c "import mmcv.ops, mmdet" 2>/dev/null && [ -d "$WHEELS" ]; then
  PIP_NO_INDEX=1 PIP_FIND_LINKS="$WHEELS" AKD_WHEEL_CACHE="$WHEELS" PYTHON="$PY" \
      bash scripts/install.sh > "$OUT_DIR/install.txt" 2>&1 || echo "install failed: see install.txt"
fi
if $PY -c "import mmcv.ops, mmdet" 2>/dev/null || [ -x .venv/bin/python ]; then
  TRAIN_PY=$PY
  $PY -c "import mmcv.ops, mmdet" 2>/dev/null || TRAIN_PY=.venv/bin/python
  $TRAIN_PY bench/train_step.py --preset fcos-r101-r50 --size 1333x800 --batch 2 --device cuda --repeats 20 \
      --avatar-kernels loop,compiled --json "$OUT_DIR/train_step.json" > "$OUT_DIR/train_step.md" 2> "$OUT_DIR/train_step.err"
  echo "train step, exit $?:"; cat "$OUT_DIR/train_step.md"
else
  echo "skipped: mmcv-full (CUDA ops) and mmdet are not installed and no wheels in $WHEELS" | tee "$OUT_DIR/train_step.md"
fi
