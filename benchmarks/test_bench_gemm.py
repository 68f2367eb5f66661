"""pytest-benchmark entries for the GEMM (GPU only): ``python -m pytest benchmarks/test_bench_gemm.py``.

The full table with peers and CUDA-graph timing is ``benchmarks/bench_gemm.py``; these entries time a few
representative points with pytest-benchmark's own statistics (synchronizing after each call)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # bench_gemm, by file name
if not torch.cuda.is_available():
    pytest.skip("GEMM benchmarks need a CUDA device", allow_module_level=True)

from bench_gemm import build_cases  # noqa: E402

POINTS = [(2048, 1152, 4608), (8192, 1152, 4608), (256, 1152, 4608), (2048, 4608, 1152)]
IMPLS = ["bf16", "fp8+q", "plain W8A8", "plain W4A8", "gluon W4A8", "gluon W4A4", "gluon W4A8 probe"]


@pytest.mark.parametrize("m,k,n", POINTS)
@pytest.mark.parametrize("impl", IMPLS)
def test_gemm(benchmark, impl, m, k, n):
    cases = build_cases(m, k, n)
    if impl not in cases:
        pytest.skip(f"{impl} is not available on this device")
    fn = cases[impl][0]
    fn()
    torch.cuda.synchronize()

    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.extra_info.update(m=m, k=k, n=n, ops=2 * m * n * k)
    benchmark(run)
