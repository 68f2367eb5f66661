#!/usr/bin/env bash
# Everything that needs a GPU, in stages that each fit one lent-device call (10 minutes; 30 minutes in all), run
# from the repository root with the machine's own python3 (torch with CUDA, pybind11, cmake, ninja). Logs, JSON
# records and a copy of benchmarks/RESULTS.md go to $OUT (default out/gpu); a summary table is printed last.
#
#   bash tools/gpu_session.sh build test          # call 1: build the core for sm_90a, the GPU tests
#   bash tools/gpu_session.sh sanitize kernels    # call 2: compute-sanitizer; Gluon probe, bench_cuda, bench_gemm
#   bash tools/gpu_session.sh e2e                 # call 3: bench_e2e, latency_budget
#   bash tools/gpu_session.sh search              # call 4, if device time is left: bench_search
#
# Stages: build, test, sanitize, kernels, e2e, search. Every step runs under its own time limit (the second
# argument of `step` below; STEP_LIMIT_S overrides them all) so that one hung step cannot take the rest of the
# call with it; the defaults keep each suggested call under ~9.5 minutes. The build stays in build/ between
# calls while the machine is warm; a later stage rebuilds only when the module has no CUDA objects.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHON="$PY"
summary="$OUT/summary.tsv"
[ -f "$summary" ] || printf 'step\trc\tseconds\n' >"$summary"

step() {   # step NAME LIMIT_S CMD...: run CMD with a time limit, log to $OUT/NAME.log, record rc and seconds
  local name=$1 limit=${STEP_LIMIT_S:-$2}
  shift 2
  echo "== $name: $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" | tee -a "$summary"
  return "$rc"
}

built() { "$PY" -c "import sys, treeq_engine as t; sys.exit(0 if t.build_info()['cuda_built'] else 1)" 2>/dev/null; }

build() {
  export TREEQ_CUDA=1 TREEQ_CUDA_ARCHS="${TREEQ_CUDA_ARCHS:-90a}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}"
  step build 300 "$PY" -m pip install -q --no-build-isolation --no-deps -e . &&
    step info 60 "$PY" -m treeq_engine info
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv >"$OUT/nvidia-smi.csv" 2>&1
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test)
for stage in "${stages[@]}"; do
  case "$stage" in
    build) build ;;
    test)
      built || build
      step gpu_tests 270 "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" tests/ ;;
    sanitize)
      built || build
      step sanitize 200 bash tools/sanitize_cuda.sh ;;
    kernels)
      built || build
      step gluon_probe 60 "$PY" benchmarks/bench_gemm.py --probe --json "$OUT/gluon_probe.json"
      step bench_cuda 150 "$PY" benchmarks/bench_cuda.py --write
      step bench_gemm 150 "$PY" benchmarks/bench_gemm.py --json "$OUT/bench_gemm.json" --resume ;;
    e2e)
      built || build
      step bench_e2e 240 "$PY" benchmarks/bench_e2e.py --json "$OUT/bench_e2e.json"
      step latency_budget 300 "$PY" benchmarks/latency_budget.py --out "$OUT/latency_budget" ;;
    search)
      step bench_search 120 "$PY" benchmarks/bench_search.py --compile --levels 2 ;;
    *) echo "unknown stage $stage (build, test, sanitize, kernels, e2e, search)" >&2; exit 2 ;;
  esac
done
cp benchmarks/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null
echo
column -t -s $'\t' "$summary"
