#!/usr/bin/env bash
# Build treeq_engine._C for another Python (by default the GPU machine's: CPython 3.12, sm_90a) on this machine,
# so that a lent GPU's minutes go to tests and timings rather than to nvcc. The module is torch-free and links the
# static CUDA runtime, so a build made here imports there; tools/gpu_session.sh uses it when it imports with CUDA
# and builds from source otherwise. The result is an ignored file (*.so): name it in the device call's `carry`.
#
#   bash tools/prebuild_core.sh [PYTHON [ARCHS]]      e.g. bash tools/prebuild_core.sh python3.12 "90a"
#
# Needs: that Python's headers, cmake, nvcc, and pybind11's CMake files (taken from this project's environment).
set -euo pipefail
cd "$(dirname "$0")/.."
target_py="${1:-python3.12}"
archs="${2:-90a}"
host_py="${HOST_PYTHON:-$(command -v python3)}"
[ -x .venv/bin/python ] && host_py="${HOST_PYTHON:-.venv/bin/python}"
target_py="$(command -v "$target_py")" || { echo "no interpreter $1 on PATH" >&2; exit 2; }
tag="$("$target_py" -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')"
pybind_dir="$("$host_py" -c 'import pybind11; print(pybind11.get_cmake_dir())')"
build_dir="build/prebuilt-$tag-${archs//;/_}"
gen=(); command -v ninja >/dev/null && [ ! -f "$build_dir/CMakeCache.txt" ] && gen=(-G Ninja)
cmake -S . -B "$build_dir" "${gen[@]}" -DPython_EXECUTABLE="$target_py" -Dpybind11_DIR="$pybind_dir" \
  -DTREEQ_CUDA=ON -DTREEQ_CUDA_ARCHS="$archs" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/treeq_engine" >/dev/null
cmake --build "$build_dir" --parallel "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
ls -la treeq_engine/_C.cpython-"${tag#py}"*.so
