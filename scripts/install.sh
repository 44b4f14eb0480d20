#!/usr/bin/env bash
# Installs akd and its stack into a virtual environment (default: .venv in the checkout).
#
#   scripts/install.sh            # idempotent: a second run only checks and returns
#   AKD_VENV=/path/to/env  PYTHON=python3.10  scripts/install.sh
#
# What it does, and why (see ../shared/STACK.md for the observations behind each step):
# - a torch the base interpreter already has (a user's CUDA build) is kept: the venv then sees the
#   base site-packages; otherwise torch==2.13.0 is installed;
# - torchvision must import because mmcv-full 1.x imports it at module level;
# - mmcv-full 1.7.2 only exists as a source distribution and is compiled against the installed torch
#   (CUDA ops when torch is a CUDA build and a matching nvcc is present); the built wheel is kept in
#   ~/.cache/akd/wheels under a name that says which torch and ops it was built for, so a second
#   environment on the same machine does not pay the ~17 minute build again;
# - beside a CPU torch, triton (the test of the GPU's kernels in Triton's interpreter needs it);
# - mmdet 2.28.2, pycocotools, typer, rich, then akd itself in editable mode.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AKD_VENV:-$ROOT/.venv}"
BASE_PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${AKD_TORCH_VERSION:-2.13.0}"
MMCV_VERSION="1.7.2"
MMDET_VERSION="2.28.2"
# torchvision whose wheel imports against a CPU-only torch 2.x (its compiled ops do not load, and
# mmcv/mmdet bring their own); the registry's torchvision builds for torch>=2.x need libtorch_cuda.
CPU_TORCHVISION_FALLBACK="0.16.2"
# Triton for a CPU torch, whose wheel lacks it (a CUDA torch brings its own): tests/test_triton_interpret.py
# runs the GPU's compiled kernels in Triton's interpreter. 3.8.0 and 3.9.0 both work with torch 2.13.0.
TRITON_VERSION="${AKD_TRITON_VERSION:-3.8.0}"

# Colour only on a terminal (and never with NO_COLOR): a redirected log gets plain text.
if [ -t 1 ] && [ -z "${NO_COLOR:-}" ]; then BLUE='\033[1;34m'; OFF='\033[0m'; else BLUE=''; OFF=''; fi
if [ -t 2 ] && [ -z "${NO_COLOR:-}" ]; then RED='\033[1;31m'; EOFF='\033[0m'; else RED=''; EOFF=''; fi
say() { printf "${BLUE}[akd install]${OFF} %s\n" "$*"; }
die() { printf "${RED}[akd install] error:${EOFF} %s\n" "$*" >&2; exit 1; }

# The stamp records what was installed; it changes when this script or the package metadata does.
STAMP="$VENV/.akd-install-stamp"
stamp_value() { cat "$ROOT/scripts/install.sh" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1; }

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(stamp_value)" ]] \
   && "$VENV/bin/python" -c "import torch, torchvision, mmcv.ops, mmdet, akd_cli" >/dev/null 2>&1; then
  say "environment up to date: $VENV"
  exit 0
fi

command -v "$BASE_PYTHON" >/dev/null || die "no '$BASE_PYTHON' on PATH (set PYTHON=...)"
"$BASE_PYTHON" -c 'import sys; sys.exit(not ((3, 8) <= sys.version_info[:2] <= (3, 12)))' \
  || die "mmcv-full 1.7 / mmdet 2.x need Python 3.8-3.12; '$BASE_PYTHON' is $("$BASE_PYTHON" -V 2>&1)"

if [[ ! -x "$VENV/bin/python" ]]; then
  if "$BASE_PYTHON" -c "import torch" >/dev/null 2>&1; then
    say "keeping the base interpreter's torch $("$BASE_PYTHON" -c 'import torch; print(torch.__version__)'): venv sees system site-packages"
    "$BASE_PYTHON" -m venv --system-site-packages "$VENV"
    # --system-site-packages means the interpreter's own: when the base is itself a virtual
    # environment (where the user's torch lives), its site-packages are added by a .pth file.
    BASE_SITE="$("$BASE_PYTHON" -c 'import site, sys; sys.prefix != sys.base_prefix and print("\n".join(site.getsitepackages()))')"
    if [[ -n "$BASE_SITE" ]]; then
      echo "$BASE_SITE" > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/akd-base-environment.pth"
    fi
    "$VENV/bin/python" -c "import torch" >/dev/null 2>&1 \
      || die "the new environment $VENV does not see the torch of '$BASE_PYTHON'; remove it and set AKD_VENV or PYTHON"
  else
    "$BASE_PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check)

"${PIP[@]}" -q wheel ninja

if "$PY" -c "import torch" >/dev/null 2>&1; then
  say "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed: keeping it"
else
  say "installing torch==$TORCH_VERSION"
  "${PIP[@]}" "torch==$TORCH_VERSION"
fi
TORCH_CUDA="$("$PY" -c 'import torch; print(torch.version.cuda or "")')"

if ! "$PY" -c "import torchvision" >/dev/null 2>&1; then
  TORCH_MINOR="$("$PY" -c 'import torch; print(torch.__version__.split(".")[1])')"
  if [[ -n "$TORCH_CUDA" ]]; then
    # torchvision 0.(minor+15) is the release paired with torch 2.(minor).
    say "installing torchvision 0.$((TORCH_MINOR + 15)).* to match the CUDA torch"
    "${PIP[@]}" --no-deps "torchvision==0.$((TORCH_MINOR + 15)).*"
    "${PIP[@]}" numpy pillow requests
  else
    say "CPU torch: installing torchvision==$CPU_TORCHVISION_FALLBACK --no-deps (work-around: no CPU build of the paired release)"
    "${PIP[@]}" --no-deps "torchvision==$CPU_TORCHVISION_FALLBACK"
    "${PIP[@]}" numpy pillow requests
  fi
  "$PY" -c "import torchvision" 2>/dev/null || die "torchvision does not import; install one matching your torch and rerun"
fi

if [[ -z "$TORCH_CUDA" ]] && ! "$PY" -c "import triton" >/dev/null 2>&1; then
  # Optional: without it that one test is skipped (and says so), nothing else changes.
  say "CPU torch: installing triton==$TRITON_VERSION for the tests that interpret the GPU's kernels"
  "${PIP[@]}" -q --no-deps "triton==$TRITON_VERSION" \
    || say "triton==$TRITON_VERSION did not install: tests/test_triton_interpret.py will be skipped"
fi

if ! "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV_VERSION'" >/dev/null 2>&1; then
  BUILD_ENV=(MMCV_WITH_OPS=1 "MAX_JOBS=${MAX_JOBS:-$(nproc)}")
  OPS=cpu
  if [[ -n "$TORCH_CUDA" ]]; then
    # The same lookup torch's extension builder does (CUDA_HOME, then nvcc on PATH, then /usr/local/cuda).
    CUDA_TOOLKIT="$("$PY" -c 'from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or "")' 2>/dev/null)"
    if [[ -n "$CUDA_TOOLKIT" && -x "$CUDA_TOOLKIT/bin/nvcc" ]]; then
      NVCC_CUDA="$("$CUDA_TOOLKIT/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')"
      [[ "${NVCC_CUDA%%.*}" == "${TORCH_CUDA%%.*}" ]] \
        || die "nvcc in $CUDA_TOOLKIT is CUDA $NVCC_CUDA but torch was built with CUDA $TORCH_CUDA: point CUDA_HOME at a CUDA ${TORCH_CUDA%%.*}.x toolkit"
      OPS="cuda$TORCH_CUDA"
      BUILD_ENV+=(FORCE_CUDA=1 "CUDA_HOME=$CUDA_TOOLKIT")
    elif "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null \
         && [[ "${AKD_MMCV_CPU_OPS:-0}" != 1 ]]; then
      die "torch is a CUDA $TORCH_CUDA build and sees a GPU, but there is no CUDA toolkit (nvcc) to compile mmcv-full's CUDA ops: install CUDA ${TORCH_CUDA%%.*}.x and set CUDA_HOME, or set AKD_MMCV_CPU_OPS=1 for CPU-only ops (GPU training then fails in NMS/RoIAlign)"
    fi
  fi
  # Without a GPU in sight mmcv's setup.py builds CPU ops; with one it insists on CUDA.
  [[ "$OPS" == cpu ]] && BUILD_ENV+=(CUDA_VISIBLE_DEVICES=)

  # pip's own wheel cache keys a source build by its URL alone, so it would hand a wheel compiled
  # against one torch (or without CUDA ops) to an environment with another; this cache is keyed
  # by what the binary depends on.
  PY_TAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
  TORCH_TAG="$("$PY" -c 'import torch; print(torch.__version__.replace("+", "_"))')"
  WHEEL_CACHE="${AKD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/akd/wheels}/mmcv-full-$MMCV_VERSION-$PY_TAG-torch$TORCH_TAG-$OPS"
  if ! ls "$WHEEL_CACHE"/mmcv_full-*.whl >/dev/null 2>&1; then
    if [[ "$OPS" == cpu ]]; then
      say "building mmcv-full==$MMCV_VERSION with CPU ops; the first build takes ~17 min on 2 cores (cached after)"
    else
      say "building mmcv-full==$MMCV_VERSION with CUDA ops (nvcc $NVCC_CUDA in $CUDA_TOOLKIT); the first build takes a while"
    fi
    # mmcv-full's setup.py imports pkg_resources, which setuptools>=70 no longer has; torch 2.13
    # requires setuptools>=77 and pulls it in with itself, so the old one goes in just for the
    # build (pip warns about torch's pin meanwhile) and a current one is put back after it.
    "${PIP[@]}" -q "setuptools<70"
    rm -rf "$WHEEL_CACHE.partial" && mkdir -p "$WHEEL_CACHE.partial"
    env "${BUILD_ENV[@]}" "$PY" -m pip wheel --disable-pip-version-check --no-cache-dir --no-deps \
      --no-build-isolation -w "$WHEEL_CACHE.partial" "mmcv-full==$MMCV_VERSION"
    rm -rf "$WHEEL_CACHE" && mv "$WHEEL_CACHE.partial" "$WHEEL_CACHE"
    "${PIP[@]}" -q --upgrade "setuptools>=77"
  else
    say "mmcv-full==$MMCV_VERSION ($OPS ops, torch $TORCH_TAG) from $WHEEL_CACHE"
  fi
  "${PIP[@]}" "$WHEEL_CACHE"/mmcv_full-*.whl
fi

say "installing mmdet==$MMDET_VERSION, pycocotools, typer, rich and akd"
"${PIP[@]}" -q "mmdet==$MMDET_VERSION" -e "$ROOT[test]"

"$PY" - <<'EOF' || die "the installed stack does not import; see the error above"
import torch, torchvision, mmcv, mmdet
from mmcv.ops import nms, RoIAlign, DeformConv2d, get_compiling_cuda_version  # noqa: F401
import akd_cli
print(f"torch {torch.__version__} (cuda {torch.version.cuda}), torchvision {torchvision.__version__}, "
      f"mmcv-full {mmcv.__version__} (ops cuda: {get_compiling_cuda_version()}), mmdet {mmdet.__version__}, "
      f"akd {akd_cli.__version__}")
EOF
stamp_value > "$STAMP"
say "done: activate with 'source ${VENV#"$ROOT"/}/bin/activate' or call $VENV/bin/akd"
