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
#   (CUDA ops when torch is a CUDA build and nvcc is present); pip caches the built wheel, so a second
#   environment on the same machine does not pay the ~17 minute build again;
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

say() { printf '\033[1;34m[akd install]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[akd install] error:\033[0m %s\n' "$*" >&2; exit 1; }

# The stamp records what was installed; it changes when this script or the package metadata does.
STAMP="$VENV/.akd-install-stamp"
stamp_value() { cat "$ROOT/scripts/install.sh" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1; }

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(stamp_value)" ]] \
   && "$VENV/bin/python" -c "import torch, torchvision, mmcv.ops, mmdet, akd_cli" >/dev/null 2>&1; then
  say "environment up to date: $VENV"
  exit 0
fi

command -v "$BASE_PYTHON" >/dev/null || die "no '$BASE_PYTHON' on PATH (set PYTHON=...)"
"$BASE_PYTHON" -c 'import sys; sys.exit(not ((3, 8) <= sys.version_info[:2] <= (3, 11)))' \
  || die "mmcv-full 1.7 / mmdet 2.x need Python 3.8-3.11; '$BASE_PYTHON' is $("$BASE_PYTHON" -V 2>&1)"

if [[ ! -x "$VENV/bin/python" ]]; then
  if "$BASE_PYTHON" -c "import torch" >/dev/null 2>&1; then
    say "keeping the base interpreter's torch $("$BASE_PYTHON" -c 'import torch; print(torch.__version__)'): venv sees system site-packages"
    "$BASE_PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$BASE_PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check)

# mmcv-full's setup.py imports pkg_resources, gone from setuptools>=70.
"${PIP[@]}" -q "setuptools<70" wheel ninja

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

if ! "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV_VERSION'" >/dev/null 2>&1; then
  BUILD_ENV=(MMCV_WITH_OPS=1 "MAX_JOBS=${MAX_JOBS:-$(nproc)}")
  if [[ -n "$TORCH_CUDA" ]] && command -v nvcc >/dev/null 2>&1; then
    say "building mmcv-full==$MMCV_VERSION with CUDA ops (torch CUDA $TORCH_CUDA); the first build takes a while"
    BUILD_ENV+=(FORCE_CUDA=1)
  else
    say "building mmcv-full==$MMCV_VERSION with CPU ops; the first build takes ~17 min on 2 cores (cached after)"
  fi
  env "${BUILD_ENV[@]}" "${PIP[@]}" --no-build-isolation "mmcv-full==$MMCV_VERSION"
fi

say "installing mmdet==$MMDET_VERSION, pycocotools, typer, rich and akd"
"${PIP[@]}" -q "mmdet==$MMDET_VERSION" -e "$ROOT[test]"

"$PY" - <<'EOF' || die "the installed stack does not import; see the error above"
import torch, torchvision, mmcv, mmdet
from mmcv.ops import nms, RoIAlign, DeformConv2d  # noqa: F401  (compiled ops present)
import akd_cli
print(f"torch {torch.__version__} (cuda {torch.version.cuda}), torchvision {torchvision.__version__}, "
      f"mmcv-full {mmcv.__version__}, mmdet {mmdet.__version__}, akd {akd_cli.__version__}")
EOF
stamp_value > "$STAMP"
say "done: activate with 'source ${VENV#"$ROOT"/}/bin/activate' or call $VENV/bin/akd"
