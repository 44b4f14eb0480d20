#!/usr/bin/env bash
# Prepares .whl/ for bench/gpu_check.sh on a GPU machine without internet (what this project's
# lent GPU machines are: Python 3.12, torch 2.11.0+cu130, no mmcv, no mmdet). Run it here, where
# the package registries answer, then carry .whl/ to the GPU machine:
#
#   bash bench/gpu_wheels.sh                    # defaults below; about 30 min on 2 cores when
#                                               # the mmcv-full wheel has to be built
#   AKD_GPU_TORCH=2.11.0 TORCH_CUDA_ARCH_LIST=9.0 bash bench/gpu_wheels.sh
#
# mmcv-full 1.7.2 is a source distribution: its CUDA ops are compiled against the GPU machine's
# torch, in a Python 3.12 environment of their own (build env below), with the CUDA toolkit found
# by torch (CUDA_HOME or /usr/local/cuda). The wheel is kept in the same cache scripts/install.sh
# uses, so a second run copies it. torch's CUDA headers include cusparse.h and friends, which a
# minimal toolkit may lack; pip's nvidia packages that torch pulls in have them, so their include
# folder is added to the compilers' paths.
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${PYTHON312:-$(command -v python3.12 || true)}
TORCH_VERSION=${AKD_GPU_TORCH:-2.11.0}
ARCHS=${TORCH_CUDA_ARCH_LIST:-9.0}
BUILD_ENV=${AKD_GPU_BUILD_ENV:-/tmp/akd-gpu-build}
CACHE="${AKD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/akd/wheels}"
OUT=.whl
[[ -n "$PY312" ]] && "$PY312" -V >/dev/null 2>&1 || { echo "error: no working python3.12 (set PYTHON312=...)" >&2; exit 1; }
mkdir -p "$OUT"

echo "[gpu wheels] pure-Python wheels for Python 3.12 (the GPU image has numpy, scipy, matplotlib, opencv, torch)"
"$PY312" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$OUT" \
    mmdet==2.28.2 addict==2.4.0 yapf==0.43.0 platformdirs terminaltables==3.1.10 pycocotools==2.0.11

if [[ ! -x "$BUILD_ENV/bin/python" ]]; then
  echo "[gpu wheels] build environment $BUILD_ENV: torch==$TORCH_VERSION (with pip's CUDA libraries)"
  "$PY312" -m venv "$BUILD_ENV"
  "$BUILD_ENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" wheel ninja "setuptools<70" numpy pillow \
      pyyaml addict packaging yapf opencv-python-headless
fi
PY="$BUILD_ENV/bin/python"
TAG=$("$PY" -c 'import sys, torch; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__.replace("+", "_")}-cuda{torch.version.cuda}")')
WHEEL_DIR="$CACHE/mmcv-full-1.7.2-$TAG"
if ! ls "$WHEEL_DIR"/mmcv_full-*.whl >/dev/null 2>&1; then
  SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  INCLUDE=$(ls -d "$SITE"/nvidia/cu*/include 2>/dev/null | head -1 || true)
  echo "[gpu wheels] building mmcv-full 1.7.2 with CUDA ops for $TAG, arch $ARCHS (extra headers: ${INCLUDE:-none})"
  rm -rf "$WHEEL_DIR.partial" && mkdir -p "$WHEEL_DIR.partial"
  env ${INCLUDE:+CPLUS_INCLUDE_PATH="$INCLUDE" C_INCLUDE_PATH="$INCLUDE" NVCC_APPEND_FLAGS="-I$INCLUDE"} \
      MMCV_WITH_OPS=1 FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCHS" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      "$PY" -m pip wheel --no-cache-dir --no-deps --no-build-isolation -w "$WHEEL_DIR.partial" mmcv-full==1.7.2
  rm -rf "$WHEEL_DIR" && mv "$WHEEL_DIR.partial" "$WHEEL_DIR"
fi
rm -f "$OUT"/mmcv_full-*.whl
cp "$WHEEL_DIR"/mmcv_full-*.whl "$OUT/"
echo "[gpu wheels] $OUT: $(ls "$OUT" | tr '\n' ' ')($(du -sh "$OUT" | cut -f1)); carry it: run(carry=[\".whl\"], ...)"
