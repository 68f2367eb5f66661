"""pytest-benchmark entries for the CUDA kernels (GPU only; not part of the test suite):
    python -m pytest benchmarks/test_bench_cuda.py --benchmark-only
The full table with peers and floors comes from benchmarks/bench_cuda.py."""
import pytest
import torch

from treeq_engine.branches import MonarchShape
from treeq_engine.format import QuantSpec
from treeq_engine.kernels import PackedWeight
from treeq_engine.kernels import cuda_backend as cb

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cb.available(), reason="needs the CUDA core and a GPU")]

M, K, N = 2048, 1152, 4608  # DiT-XL/2 fc1 at batch 8


def _timed(benchmark, fn):
    fn()
    torch.cuda.synchronize()

    def run():
        fn()
        torch.cuda.synchronize()

    benchmark(run)


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(0)
    s = MonarchShape.matching_lowrank(N, K)
    return dict(x=torch.randn(M, K, generator=g).cuda().to(torch.bfloat16),
                w=PackedWeight.from_float(torch.randn(N, K, generator=g) * 0.02, QuantSpec.weight(4)).to("cuda"),
                w1=(torch.randn(s.w1_shape, generator=g) * 0.02).cuda(),
                w2=(torch.randn(s.w2_shape, generator=g) * 0.02).cuda(), bias=torch.randn(N, generator=g).cuda())


def test_bf16_linear(benchmark, layer):
    wb = layer["w"].codes().to(torch.bfloat16)
    _timed(benchmark, lambda: torch.nn.functional.linear(layer["x"], wb))


@pytest.mark.parametrize("a_bits", [8, 4])
def test_w4_quant_gemm(benchmark, layer, a_bits):
    spec = QuantSpec.activation(a_bits)
    _timed(benchmark, lambda: cb.packed_linear(cb.quantize_activation(layer["x"], spec), layer["w"],
                                               bias=layer["bias"]))


def test_w4a8_quant_gemm_gmb(benchmark, layer):
    spec = QuantSpec.activation(8)
    _timed(benchmark, lambda: cb.packed_linear(cb.quantize_activation(layer["x"], spec, monarch_w1=layer["w1"]),
                                               layer["w"], bias=layer["bias"], monarch_w2=layer["w2"]))
