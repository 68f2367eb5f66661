#!/usr/bin/env bash
# Set up, build, compile-check the CUDA sources, run the static checks and the test suite. This is the README's test command
# and what .ci/run calls. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. "${TREEQ_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1
if command -v nvcc >/dev/null 2>&1; then
  python tools/check_cuda.py
elif [ "${TREEQ_CUDA:-auto}" = "1" ]; then
  echo "TREEQ_CUDA=1 but nvcc is not on PATH" >&2
  exit 1
fi
# static checks first (seconds; configured in pyproject.toml): pyflakes everywhere, types in the package
python -m ruff check --quiet treeq_engine tests benchmarks tools
python -m mypy --no-error-summary
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
