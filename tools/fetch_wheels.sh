#!/usr/bin/env bash
# Wheels of the pure-Python packages the GPU machine's image lacks, for its Python 3.12, into .whl/ (ignored by
# git): diffusers, which the diffusers GPU tests need (tests/test_diffusers_fused.py, test_search_diffusers.py,
# test_graphed_diffusers.py; they skip without it). Its other requirements (huggingface-hub >= 1.32, safetensors
# >= 0.8, Pillow, regex, requests, filelock, numpy) are in that image. Name `.whl` in the device call's `carry`;
# tools/gpu_session.sh installs what it finds there into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d .whl "diffusers==0.42.1"
ls -la .whl
