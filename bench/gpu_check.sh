#!/usr/bin/env bash
# The whole GPU check of the fused Avatar passes (issue 15) in one call, on a CUDA machine without
# internet: correctness first (the compiled passes against the loop on CUDA, values and gradients,
# and memory flat in the number of Avatars), then the goals' figures side by side in the same process
# per benchmark (loop and compiled against the same plain loss and the same base-loss step).
#
#   bash bench/gpu_check.sh [OUT_DIR]          # default: $OUT, else bench/gpu-out
#   PARTS="train core" FACTORS="release paper" bash bench/gpu_check.sh     # these parts, in this order
#   (parts: tests, train, host, core, profile, graphs, goals; default "tests train host core goals")
#   CORE_AVATARS=0,8 PARTS="core goals" bash bench/gpu_check.sh            # the core goals' rows alone
#   CORE_KERNELS=compiled,compiled+combo CORE_AVATARS=0,1,8 PARTS=core ...  # with inductor's combo kernels too
#                                                   # (a configuration that fails is a row with its error)
#   CORE_KERNELS=compiled:stacked,compiled:unrolled CORE_AVATARS=0,8 PARTS=core ...  # the passes' two layouts of
#                                                   # the Avatars (akd_cli.core.fused.LAYOUT; "compiled" alone:
#                                                   # each base loss's own, PASS_LAYOUTS) side by side; the tests
#                                                   # part then also checks each base's other layout against the loop
#   TRAIN_KERNELS=loop,compiled:stacked,compiled:unrolled PARTS=train ...  # the step with both layouts
#   TRAIN_AVATARS=1,8 ...                          # the step's AKD rows: these Avatar counts (default 1,4,8); the
#                                                   # step also times a control (the base loss built twice: since
#                                                   # b8c492e, one more configuration) and pairs changes by round
#   CORE_ROOT=.old/a0632e4,.old/e8f4a9c CORE_BASES=cwd PARTS=core ...  # then the same core rows of other commits' akd_cli, in
#                                                   # the same call (made here: mkdir -p .old/a0632e4 && git archive
#                                                   # a0632e4 akd_cli | tar -x -C .old/a0632e4; .old/ is ignored:
#                                                   # carry it); written to core_<factor>_<folder name>.json
#   TESTS_K="other_layout or dropout_masks" PARTS=tests ...              # these CUDA tests (pytest -k) instead
#   PARTS=graphs GRAPHS="mse/release/8 maskd/release/8" bash bench/gpu_check.sh   # Triton launches per compiled graph
#   PARTS=graphs GRAPHS_BYTES=1 GRAPHS="mse/release/0 mse/release/8" ...   # their memory traffic and its floor instead
#   PARTS=profile PROFILE_BASE=maskd PROFILE_FACTOR=release PROFILES="1:loop 8:compiled 8:compiled:unrolled" bash bench/gpu_check.sh
#
# On an H100 (2026-11-27, commit a0632e4) the parts took: tests 225 s (22 tests, most of it
# compilation), train 201 s, core 110 s and more per factor (cut off there), host 43 s (then failing).
# On 2026-11-27 at e8f4a9c: train with TRAIN_KERNELS=compiled,compiled:unrolled TRAIN_AVATARS=1,8 286 s,
# tests (16 selected with TESTS_K) 236 s, core (release, CORE_AVATARS=0,8, both layouts) 202 s.
# The default parts do not fit one 540 s budget: a second call on the still-warm machine (it waits
# 30 s) with PARTS="core host goals" takes the rest, and goals.py can judge the two calls' files
# put in one folder.
#
# The core needs torch alone (with Triton, which CUDA builds of torch ship): no install. The
# training step needs mmcv-full with CUDA ops and mmdet: where they do not import, the wheels in
# $AKD_WHEELS (default: .whl/, a carried folder holding mmcv_full-*.whl built for that torch, mmdet's
# wheel and the pure-Python ones they need that the machine lacks: bench/gpu_wheels.sh makes it) are
# unpacked into a private
# folder on PYTHONPATH, with no resolver and no network; else the step is reported as skipped.
#
# Files (at most seven, so that a device tool returning eight brings all back): log.txt (machine,
# each part's exit and tables), tests.txt, core_<factor>.json, train_step.json, profile.txt,
# errors.txt (every part's stderr); the host part writes its table into log.txt. Each part has a time limit so that the later ones still run,
# and the whole call a budget (BUDGET, seconds, default 540: under a device call's 600): a part gets at most what is left of it,
# and one that cannot start with 30 s left is reported as skipped, so a call ends on its own with its log complete.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/gpu-out}}
PY=${PYTHON:-python3}
WHEELS=${AKD_WHEELS:-.whl}
PARTS=${PARTS:-tests train host core goals}
FACTORS=${FACTORS:-paper release}
PROFILES=${PROFILES:-0:loop 8:loop 8:compiled 8:compiled:64}   # Avatars:kernel[:hash bits or layout]
PROFILE_BASE=${PROFILE_BASE:-cwd} PROFILE_FACTOR=${PROFILE_FACTOR:-paper}   # the profiled base loss and factor
END=$(( $(date +%s) + ${BUDGET:-540} ))
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/log.txt"
ERR="$OUT_DIR/errors.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
say() { echo "$*" | tee -a "$LOG"; }
part_start() { START=$(date +%s); say "== $1  ($(date -u +%H:%M:%S))"; echo "== $1" >> "$ERR"; }
part_end() { say "-- exit $1 after $(( $(date +%s) - START )) s"; }
# limit WANTED: the part's time limit, cut to what is left of the call's budget (10 s kept for the log)
# (at least 1: `timeout 0` would mean no limit at all)
limit() { local left=$(( END - $(date +%s) - 10 )); left=$(( $1 < left ? $1 : left )); echo $(( left > 1 ? left : 1 )); }
has_time() { [ $(( END - $(date +%s) )) -ge 30 ] || { say "== $1: skipped, $(( END - $(date +%s) )) s left of BUDGET"; return 1; }; }

{
  echo "commit: ${AKD_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')}  date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  echo "$(nproc) cores; $($PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1)"
} | tee "$LOG"
: > "$ERR"

if ! $PY -c "import mmcv.ops, mmdet" 2>/dev/null && ls "$WHEELS"/mmcv_full-*.whl >/dev/null 2>&1; then
  SITE=$(mktemp -d /tmp/akd-site.XXXX)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl >> "$ERR" 2>&1 \
    && export PYTHONPATH="$PYTHONPATH:$SITE"
fi
if $PY -c "import mmcv.ops, mmdet" 2>> "$ERR"; then MM=1; say "mmcv-full and mmdet: $($PY -c 'import mmcv, mmdet; from mmcv.ops import get_compiling_cuda_version as v; print(mmcv.__version__, "ops cuda", v(), mmdet.__version__)' 2>&1)"; else MM=0; say "mmcv-full and mmdet: not importable"; fi

part_tests() {
  part_start "correctness: the compiled Avatar passes on CUDA (tests/test_cuda.py)"
  timeout "$(limit "${TESTS_LIMIT:-240}")" $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py \
      -k "${TESTS_K:-avatar_passes or base_losses_on_the_gpu or synchronises_once or dropout_masks or non_finite_features_on_the_gpu or own_drop_rate$([ $MM = 1 ] && echo ' or mmcv_ops or cuda_nms or focal_loss')$(
        case "${CORE_KERNELS:-}${TRAIN_KERNELS:-}${PROFILES}" in *:stacked*|*:unrolled*) echo ' or other_layout' ;; esac)}" \
      > "$OUT_DIR/tests.txt" 2>&1
  rc=$?; say "$(tail -1 "$OUT_DIR/tests.txt")"; part_end $rc
}

# core_run FACTOR JSON KERNELS [--root TREE]: the core rows of one factor, from this checkout's akd_cli or TREE's
core_run() {
  local factor=$1 json=$2 kernels=$3; shift 3
  timeout "$(limit "${CORE_LIMIT:-200}")" $PY bench/core_losses.py --device cuda --repeats 20 --uncertainty "$factor" \
      --bases "${CORE_BASES:-cwd,mse,maskd}" --avatars "${CORE_AVATARS:-0,1,8}" --avatar-kernels "$kernels" \
      --json "$json" "$@" 2>> "$ERR" | tee -a "$LOG"
  part_end "${PIPESTATUS[0]}"
}

part_core() {
  for factor in $FACTORS; do
    has_time "core ($factor factor)" || continue
    part_start "core ($factor factor): CWD, MSE, MasKD with ${CORE_AVATARS:-0,1,8} Avatars, ${CORE_KERNELS:-loop,compiled}"
    core_run "$factor" "$OUT_DIR/core_$factor.json" "${CORE_KERNELS:-loop,compiled}"
    roots=${CORE_ROOT:-}
    # an older checkout has no combo kernels (compiled+combo): its rows are the others
    old_kernels=$(tr , '\n' <<< "${CORE_KERNELS:-loop,compiled}" | grep -v '+combo' | paste -sd, -)
    for root in ${roots//,/ }; do
      [[ -n "$old_kernels" ]] || break
      has_time "core ($factor factor) of $root" || continue
      part_start "core ($factor factor) of the checkout in $root, kernels $old_kernels"
      core_run "$factor" "$OUT_DIR/core_${factor}_$(basename "$root").json" "$old_kernels" --root "$root"
    done
  done
}

part_host() {
  part_start "host work per loss call: tiny five-level maps (bench/host_calls.py)"
  timeout "$(limit "${HOST_LIMIT:-240}")" $PY bench/host_calls.py --device cuda --repeats 100 2>> "$ERR" | tee -a "$LOG"
  part_end "${PIPESTATUS[0]}"
}

part_graphs() {
  part_start "kernel launches per compiled graph of one loss call (bench/graph_loops.py): ${GRAPHS:-mse/release/8 cwd/paper/8}"
  # GRAPHS_BYTES=1: each call's memory traffic and its floor instead (graph_loops.py --bytes)
  timeout "$(limit "${GRAPHS_LIMIT:-240}")" $PY bench/graph_loops.py --device cuda ${GRAPHS_BYTES:+--bytes} \
      ${GRAPHS:-mse/release/8 cwd/paper/8} 2>> "$ERR" | tee -a "$LOG"
  part_end "${PIPESTATUS[0]}"
}

part_profile() {
  part_start "profile: $PROFILE_BASE, $PROFILE_FACTOR factor (Avatars:kernel[:hash bits] = $PROFILES)"
  for run in $PROFILES; do
    IFS=: read -r avatars kernel bits <<< "$run"
    case $bits in 32|64|'') ;; *) kernel="$kernel:$bits"; bits= ;; esac   # a layout, not a width
    timeout "$(limit "${PROFILE_LIMIT:-90}")" $PY bench/profile_core.py --base "$PROFILE_BASE" --uncertainty "$PROFILE_FACTOR" \
        --avatars "$avatars" --avatar-kernel "$kernel" --hash-bits "${bits:-32}" >> "$OUT_DIR/profile.txt" 2>> "$ERR"
  done
  part_end $?
}

part_train() {
  part_start "training step: fcos-r101-r50, 1333x800, batch 2, ${TRAIN_KERNELS:-loop,compiled}"
  if [ $MM = 1 ]; then
    timeout "$(limit "${TRAIN_LIMIT:-300}")" $PY bench/train_step.py --preset fcos-r101-r50 --size 1333x800 --batch 2 --device cuda \
        --repeats 20 --avatar-kernels "${TRAIN_KERNELS:-loop,compiled}" --avatars "${TRAIN_AVATARS:-1,4,8}" --json "$OUT_DIR/train_step.json" 2>> "$ERR" | tee -a "$LOG"
    part_end "${PIPESTATUS[0]}"
  else
    say "skipped: mmcv-full (CUDA ops) and mmdet do not import, and no mmcv_full wheel in $WHEELS"
  fi
}

part_goals() {
  part_start "issue 15's goals, judged from this call's figures (bench/goals.py)"
  $PY bench/goals.py "$OUT_DIR" 2>> "$ERR" | tee -a "$LOG"
  part_end "${PIPESTATUS[0]}"
}

for part in $PARTS; do
  case $part in
    goals) part_goals ;;
    tests|core|profile|train|host|graphs) has_time "$part" && "part_$part" ;;
    *) say "unknown part $part (tests, core, profile, train, host, graphs, goals)" ;;
  esac
done
