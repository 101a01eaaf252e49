#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment and builds the RoIAlign
# extension ahead of time. Idempotent: a second run with nothing changed takes a second.
#   MRCNN_VENV         where the environment lives (default: .venv in the repo)
#   MRCNN_WITH_CUDA    auto (default) | 1 | 0: build the CUDA kernels
#   CUDA_HOME          the CUDA toolkit; found automatically under /usr/local when unset
#   TORCH_CUDA_ARCH_LIST  GPU architectures to build for (see setup.py)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MRCNN_VENV:-.venv}
PY=${PYTHON:-python3}

if [ -z "${CUDA_HOME:-}" ]; then
  # /usr/local/bin/nvcc may be a wrapper script: torch would then look for the
  # CUDA libraries under /usr/local. Prefer a real toolkit directory.
  for d in /usr/local/cuda $(ls -d /usr/local/cuda-* 2>/dev/null | sort -rV); do
    if [ -x "$d/bin/nvcc" ]; then export CUDA_HOME="$d"; break; fi
  done
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.mrcnn-stamp"
want=$(cat constraints.txt pyproject.toml setup.py mrcnn/ops/csrc/* \
       <(echo "${CUDA_HOME:-} ${MRCNN_WITH_CUDA:-auto} ${TORCH_CUDA_ARCH_LIST:-}") | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import mrcnn._C" 2>/dev/null; then
  exit 0
fi

pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q -c constraints.txt --upgrade pip setuptools wheel ninja
pip install -q -c constraints.txt torch torchvision
echo "building mrcnn (CUDA_HOME=${CUDA_HOME:-none}, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default})" >&2
MAX_JOBS=${MAX_JOBS:-2} pip install -q -c constraints.txt --no-build-isolation -e ".[dev]"
"$VENV/bin/python" -c "import mrcnn._C" 
echo "$want" > "$stamp"
