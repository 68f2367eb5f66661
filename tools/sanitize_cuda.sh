#!/usr/bin/env bash
# compute-sanitizer over a representative set of the CUDA kernels (run on a GPU machine, after building the core
# with CUDA): memcheck (out-of-bounds and misaligned accesses), racecheck (shared-memory hazards), synccheck
# (barrier misuse) and initcheck (reads of uninitialised global memory). The set is the `sanitize` tests of
# tests/test_cuda_kernels.py plus one quantize/stage-1 case: ragged M, N and K, split-K with its fix-up, the Monarch
# branch, bias and GELU, the gated residual (element and 16-byte paths), 3- and 4-bit weights, on both the wgmma
# (sm_90) and the mma.sync kernels.
#   usage: bash tools/sanitize_cuda.sh [tool ...]      (default: memcheck racecheck synccheck initcheck)
set -uo pipefail
cd "$(dirname "$0")/.."
sanitizer="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}"
if [ ! -x "$sanitizer" ]; then
  echo "compute-sanitizer not found (set COMPUTE_SANITIZER)" >&2
  exit 2
fi
tests=(tests/test_cuda_kernels.py -k "sanitize or (test_monarch_stage1 and 300)")
# Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees an access past a tensor's
# end (inside a cached block it would land in memory the allocator owns and pass unnoticed).
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
tools=("$@")
[ ${#tools[@]} -eq 0 ] && tools=(memcheck racecheck synccheck initcheck)
status=0
for tool in "${tools[@]}"; do
  echo "== compute-sanitizer --tool $tool"
  # --target-processes all: pytest may fork; torch's own kernels are checked too (they should be clean)
  if ! "$sanitizer" --tool "$tool" --error-exitcode 99 --target-processes all \
      "${PYTHON:-python}" -m pytest -q -p no:cacheprovider "${tests[@]}"; then
    echo "!! $tool reported errors" >&2
    status=1
  fi
done
exit $status
