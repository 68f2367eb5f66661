#!/usr/bin/env bash
# Create (or reuse) the virtual environment, install the pinned CPU stack and build treeq_engine._C.
#   TREEQ_VENV   venv path (default .venv)        PYTHON   interpreter for a new venv (default python3)
#   TREEQ_CUDA   auto|0|1: build the CUDA sources when nvcc is found / never / always
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TREEQ_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip, quiet unless it fails (then its whole log, minus this machine's noise about absent local indexes)
pipq() {
  local log rc=0
  log=$(mktemp)
  python -m pip "$@" >"$log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then grep -v "^WARNING: Location" "$log" >&2; fi
  rm -f "$log"
  return "$rc"
}
pipq install -q -r requirements-dev.txt
python -c "import torch, triton, numpy" # fail here, loudly, if the stack did not install
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
pipq install -q --no-build-isolation --no-deps -e .
python -c "import treeq_engine._C" # the build must have produced the core
