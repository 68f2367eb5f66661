#!/usr/bin/env bash
# Everything that needs a GPU, ordered by what matters most, run against a deadline so that one lent-device call
# (10 minutes at most; 15 minutes of device time per session, the machine's start included) returns the most
# important results first and always returns its logs. Run from the repository root with the machine's python3
# (torch with CUDA, pybind11, cmake, ninja):
#
#   bash tools/gpu_session.sh                  # every stage in priority order until DEADLINE_S (default 540 s)
#   bash tools/gpu_session.sh e2e budget       # named stages only
#
# With `.whl` in the call's carry (tools/fetch_wheels.sh: diffusers), the diffusers GPU tests run too.
#
# Stages, in priority order: build, test, cuda, e2e, triton, sanitize, peers, budget, search.
#   build     reuse a carried prebuilt treeq_engine._C (tools/prebuild_core.sh python3.12 90a, then name
#             treeq_engine/_C.cpython-312-x86_64-linux-gnu.so in the call's `carry`) or build from source (sm_90a)
#   test      the GPU tests (pytest -m gpu), spread over 4 processes when pytest-xdist is there (Triton JIT)
#   cuda      bench_cuda at M = 256, 2048, 8192 (the CUDA kernels against cuBLAS bf16, FP8, int8)
#   e2e       bench_e2e without the torch.compile peers: bf16 eager and the TreeQ plans, B = 1, 8, 32
#   triton    the Gluon main-loop probe; bench_gemm at M = 256, 2048, 8192 with heuristic configs (no autotune)
#   sanitize  compute-sanitizer memcheck and racecheck on the representative set
#   peers     the torch.compile peers of bench_e2e (compile mode 'default'), bench_gemm autotuned at every M
#   budget    latency_budget at batch 8, two budgets (half of bf16; halfway up the plans), a small search (K = 4)
#   search    bench_search (DiT-XL/2 search-time extrapolation, 8 samples) with two real levels
#   mmdit     (named only) bench_mmdit_e2e: FLUX.1-dev's width at 1024 px, 4 + 8 blocks, bf16 eager against TreeQ
#             W8A8 / W4A8, fused; then Wan2.1-1.3B whole at 33 frames of 832x480 (14 040 tokens) alike, and 12 of
#             Qwen-Image's 60 blocks at 1024 px, Sana-1600M whole at 1024 px, and 2 + 8 of FLUX.2-dev's 8 + 48
#             blocks at 1024 px (each model its own RESULTS.md section)
# Every benchmark writes its rows (JSON, RESULTS.md section) as it measures them, so a step cut off by its limit
# still returns what it measured.
#
# Every step runs under min(its own limit, time left before the deadline − 15 s); a step that would get under
# 20 s is skipped and recorded so. A step that passed is not rerun while the machine stays warm (state in
# out/gpu-state; FORCE=1 reruns). What comes back ($OUT, at most 8 files): summary.tsv (step, rc, seconds),
# logs.tar.gz (every log, JSON record and the junit XML), RESULTS.md (with the tables the benchmarks wrote),
# nvidia-smi.csv.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-out/gpu}"
STATE="${STATE:-out/gpu-state}"
DEADLINE_S="${DEADLINE_S:-540}"
LOGS="$STATE/logs"
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHON="$PY" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# pure-Python packages the image lacks (diffusers, for the diffusers GPU tests), carried as wheels in .whl/
# (tools/fetch_wheels.sh) and installed beside the image's environment
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
summary="$STATE/summary.tsv"
[ -f "$summary" ] || printf 'step\trc\tseconds\n' >"$summary"
t_start=$SECONDS

finish() {   # always: pack the logs and the records, copy what comes back
  cp "$summary" "$OUT/summary.tsv"
  cp benchmarks/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null
  tar czf "$OUT/logs.tar.gz" -C "$STATE" . 2>/dev/null
  echo
  column -t -s $'\t' "$summary"
}
trap finish EXIT

step() {   # step NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, time left), log to $LOGS/NAME.log
  local name=$1 limit=${STEP_LIMIT_S:-$2}
  shift 2
  if [ -f "$STATE/$name.done" ] && [ -z "${FORCE:-}" ]; then
    echo "== $name: passed earlier on this machine (FORCE=1 reruns)"
    return 0
  fi
  local left=$((DEADLINE_S - (SECONDS - t_start) - 15))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "== $name: skipped, ${left}s left before the deadline"
    printf '%s\tskipped\t0\n' "$name" >>"$summary"
    return 0
  fi
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" | tee -a "$summary"
  [ "$rc" -eq 0 ] && touch "$STATE/$name.done"
  return "$rc"
}

have_core=""
built() {   # treeq_engine._C imports here with its CUDA kernels, built from these csrc/ sources (checked once it has;
            # a carried prebuilt core from older sources would not know today's kernel arguments: rebuilt instead)
  [ -n "$have_core" ] && return 0
  "$PY" -c "import sys, treeq_engine as t; i = t.build_info(); s = i.get('core_stale'); s and print('== core:', s)
sys.exit(0 if i['cuda_built'] and not s else 1)" 2>/dev/null && have_core=1
}

build() {
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.mem,temperature.gpu,power.limit --format=csv \
    >"$OUT/nvidia-smi.csv" 2>&1
  if built; then
    echo "== build: treeq_engine._C imports with CUDA (prebuilt), no build needed"
  else
    export TREEQ_CUDA=1 TREEQ_CUDA_ARCHS="${TREEQ_CUDA_ARCHS:-90a}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}"
    step build 240 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
  fi
  step info 60 "$PY" -m treeq_engine info
}

xdist=()
"$PY" -c "import xdist" 2>/dev/null && xdist=(-n "${TEST_PROCS:-4}")
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test cuda e2e triton sanitize peers budget search)
for stage in "${stages[@]}"; do
  case "$stage" in
    build|test|cuda|e2e|triton|sanitize|peers|budget|search|mmdit) ;;
    *) echo "unknown stage $stage (build, test, cuda, e2e, triton, sanitize, peers, budget, search, mmdit)" >&2
       exit 2 ;;
  esac
done
for stage in "${stages[@]}"; do
  [ "$stage" != build ] && ! built && build   # a stage named alone still gets the core
  case "$stage" in
    build) build ;;
    test)
      # -v: one line per test, so a run cut off by its limit still says what passed and what failed;
      # the CUDA kernels first (collection order is roughly the order the workers take them)
      # faulthandler: a test still running after 60 s dumps its stack (a hung kernel shows where it hangs)
      step gpu_tests 200 "$PY" -m pytest -v --tb=short -rfE -m gpu -p no:cacheprovider -o faulthandler_timeout=60 \
        "${xdist[@]}" --junitxml="$LOGS/gpu_tests.xml" tests/test_cuda_kernels.py tests/test_triton_gpu.py \
        tests/test_core_cpp.py tests/test_graphs.py tests/test_nn_grouped.py tests/test_profile.py \
        tests/test_runtime_dit.py tests/test_diffusers_fused.py tests/test_search_diffusers.py \
        tests/test_graphed_diffusers.py tests/test_search_mmdit.py tests/test_wan_fused.py tests/test_mmdit_fused.py \
        tests/test_qwen_fused.py tests/test_sana_fused.py tests/test_flux2_fused.py tests/test_zimage_fused.py \
        tests/test_ltx_fused.py tests/test_chroma_fused.py tests/test_hunyuan_fused.py \
        tests/test_cogvideox_fused.py tests/test_hunyuan15_fused.py tests/test_ltx2_fused.py \
        tests/test_cosmos_fused.py tests/test_mochi_fused.py tests/test_lumina2_fused.py tests/test_flux3_fused.py \
        tests/test_ideogram4_fused.py tests/test_qwenimage21_fused.py tests/test_helios_fused.py \
        tests/test_wan_family_fused.py tests/test_flux_copies_fused.py tests/test_hunyuanimage_fused.py \
        tests/test_consisid_fused.py tests/test_cogview4_fused.py tests/test_kandinsky5_fused.py \
        tests/test_ovis_fused.py tests/test_anyflow_fused.py tests/test_auraflow_fused.py \
        tests/test_hunyuandit_fused.py tests/test_sana_video_fused.py tests/test_cogview3plus_fused.py \
        tests/test_allegro_fused.py tests/test_easyanimate_fused.py tests/test_glm_image_fused.py \
        tests/test_motif_video_fused.py tests/test_bria_fibo2_fused.py tests/test_joyimage_fused.py \
        tests/test_prx_fused.py tests/test_krea2_fused.py tests/test_omnigen_fused.py \
        tests/test_wananimate2_fused.py tests/test_minimaxh3_fused.py \
        tests/test_kandinsky6_fused.py tests/test_ernieimage_fused.py \
        tests/test_dreamlite_fused.py tests/test_cosmos3_fused.py \
        tests/test_nucleusmoe_fused.py tests/test_hidream_fused.py tests/test_sanawm_refiner_fused.py \
        tests/test_compile.py ;;
    cuda)
      step bench_cuda 120 "$PY" benchmarks/bench_cuda.py --m 256 2048 8192 --write --json "$LOGS/bench_cuda.json" ;;
    e2e)
      step bench_e2e 180 "$PY" benchmarks/bench_e2e.py --no-compile --reps 30 --json "$LOGS/bench_e2e.json" --resume ;;
    triton)
      step gluon_probe 45 "$PY" benchmarks/bench_gemm.py --probe --json "$LOGS/gluon_probe.json"
      TREEQ_TRITON_AUTOTUNE=0 step bench_gemm 120 "$PY" benchmarks/bench_gemm.py --m 256 2048 8192 \
        --json "$LOGS/bench_gemm.json" --resume ;;
    sanitize)
      step sanitize 150 bash tools/sanitize_cuda.sh memcheck racecheck ;;
    peers)
      step bench_e2e_compile 300 "$PY" benchmarks/bench_e2e.py --compile-mode default --reps 30 \
        --json "$LOGS/bench_e2e.json" --resume
      step bench_gemm_all 240 "$PY" benchmarks/bench_gemm.py --json "$LOGS/bench_gemm_autotuned.json" --resume ;;
    budget)
      step latency_budget 300 "$PY" benchmarks/latency_budget.py --fractions 0.5,mid --keep 4 --samples 4 --reps 30 \
        --out "$STATE/latency_budget" ;;
    search)
      step bench_search 150 "$PY" benchmarks/bench_search.py --compile --samples 8 --levels 2 ;;
    mmdit)   # (not in the default list: FLUX.1-dev-shaped, three 12 B-parameter builds; name it to run it)
      step bench_mmdit_e2e 300 "$PY" benchmarks/bench_mmdit_e2e.py --blocks 4,8 --reps 10 \
        --json "$LOGS/bench_mmdit_e2e.json"
      step bench_wan_e2e 240 "$PY" benchmarks/bench_mmdit_e2e.py --model Wan2.1-T2V-1.3B --video 33,480,832 \
        --reps 10 --json "$LOGS/bench_wan_e2e.json"
      step bench_qwen_e2e 240 "$PY" benchmarks/bench_mmdit_e2e.py --model Qwen-Image --blocks 12 --reps 10 \
        --json "$LOGS/bench_qwen_e2e.json"
      step bench_sana_e2e 180 "$PY" benchmarks/bench_mmdit_e2e.py --model "Sana 1600M 1024px" --reps 20 \
        --json "$LOGS/bench_sana_e2e.json"
      step bench_flux2_e2e 240 "$PY" benchmarks/bench_mmdit_e2e.py --model FLUX.2-dev --blocks 2,8 --reps 10 \
        --json "$LOGS/bench_flux2_e2e.json" ;;
  esac
done
