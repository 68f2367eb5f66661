#!/usr/bin/env bash
# Set up, build and run the main job: `treeq demo` (quantize the digits DiT and compare), or, where the
# demo is not available, the format/build self-check.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. "${TREEQ_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1
if treeq demo --help >/dev/null 2>&1; then
  exec treeq demo "$@"
fi
exec treeq selfcheck
