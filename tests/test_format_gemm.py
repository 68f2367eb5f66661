import itertools

import pytest
import torch

from treeq_engine.format import (ACT_BITS, MAX_K, WEIGHT_BITS, QuantSpec, dequantize, epilogue, int_gemm,
                                 quantize, quantized_linear, zero_point_correction)

SHAPES = [(1, 1, 1), (3, 5, 7), (26, 37, 13), (17, 64, 129), (64, 33, 300)]


def _int_gemm_loop(qa, qw):
    """Slow, independent int64 accumulation."""
    return (qa.to(torch.int64)[:, None, :] * qw.to(torch.int64)[None, :, :]).sum(-1)


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int_gemm_exact(m, n, k, gen):
    qa = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    qw = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    acc = int_gemm(qa, qw)
    assert acc.dtype == torch.int32 and acc.shape == (m, n)
    assert torch.equal(acc.to(torch.int64), _int_gemm_loop(qa, qw))


@pytest.mark.parametrize("m,n,k", [(3, 4, 2049), (5, 3, 4099), (3, 3, MAX_K)])
def test_int_gemm_exact_past_float32(m, n, k, gen):
    """Sums beyond float32's exact integers (2**24), up to K = MAX_K: extreme codes (−128 and 127, the int8 ends)
    in constant rows give K·128², −K·128·127 and K·127² (odd at odd K, so float32 could not even hold the result
    past 2**24), the other rows random signs of the ends and full-range random codes; against int64 accumulation."""
    ends = torch.tensor([-128, 127], dtype=torch.int8)
    qa = ends[torch.randint(0, 2, (m, k), generator=gen)]
    qw = ends[torch.randint(0, 2, (n, k), generator=gen)]
    qa[0], qw[0] = -128, -128        # K·2**14, the largest accumulator (int32 at MAX_K: 541,081,600)
    qa[1], qw[1] = 127, 127          # K·127² and, across rows 0/1, −K·128·127
    qa[-1] = torch.randint(-128, 128, (k,), generator=gen, dtype=torch.int8)
    qw[-1] = torch.randint(-128, 128, (k,), generator=gen, dtype=torch.int8)
    want = _int_gemm_loop(qa, qw)
    assert int(want.abs().max()) > 2**24 and int(want[1, 1]) == k * 127 * 127
    acc = int_gemm(qa, qw)
    assert acc.dtype == torch.int32 and torch.equal(acc.to(torch.int64), want)


def test_zero_point_correction_at_max_k():
    """The corrected accumulator's extremes ±K·255² (codes 127 against zero point −128, or −128 against 127) fit
    int32 at K = MAX_K, the bound MAX_K is defined by; against the int64 sum of (q − z)(q' − z')."""
    k = MAX_K
    qa = torch.tensor([[127] * k, [-128] * k], dtype=torch.int8)
    za = torch.tensor([-128, 127], dtype=torch.int32)
    qw = torch.tensor([[127] * k, [-128] * k, [5, -7] * (k // 2) + [3]], dtype=torch.int8)
    zw = torch.tensor([-128, 127, -3], dtype=torch.int32)
    ra, cw = qa.to(torch.int64).sum(1).to(torch.int32), qw.to(torch.int64).sum(1).to(torch.int32)
    corr = zero_point_correction(int_gemm(qa, qw), k, za, ra, zw, cw)
    want = (qa.to(torch.int64) - za[:, None]) @ (qw.to(torch.int64) - zw[:, None]).T
    assert int(want[0, 0]) == k * 255 * 255 == int(want[1, 1]) and int(want[0, 1]) == -k * 255 * 255
    assert corr.dtype == torch.int32 and torch.equal(corr.to(torch.int64), want)


@pytest.mark.parametrize("wb,ab", list(itertools.product(WEIGHT_BITS, ACT_BITS)))
@pytest.mark.parametrize("w_sym,a_sym", [(False, False), (True, False), (False, True), (True, True)])
def test_epilogue_identity(wb, ab, w_sym, a_sym, gen):
    """int32 accumulation + zero-point corrections + scales == dequantize-then-matmul in float64."""
    m, n, k = 23, 19, 77
    x = torch.randn(m, k, generator=gen) * 2 + 0.3
    w = torch.randn(n, k, generator=gen) * 0.1
    bias = torch.randn(n, generator=gen)
    aq = quantize(x, QuantSpec.activation(ab, a_sym))
    wq = quantize(w, QuantSpec.weight(wb, w_sym))
    acc = int_gemm(aq.codes, wq.codes)
    corr = zero_point_correction(acc, k, aq.zero_point, aq.row_sums(), wq.zero_point, wq.row_sums())
    a64, w64 = aq.codes.to(torch.int64), wq.codes.to(torch.int64)
    exact = (a64 - aq.zero_point[:, None]) @ (w64 - wq.zero_point[:, None]).T
    assert torch.equal(corr.to(torch.int64), exact)
    y = epilogue(acc, k, aq, wq, bias)
    ref = dequantize(aq, torch.float64) @ dequantize(wq, torch.float64).T + bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    torch.testing.assert_close(quantized_linear(x, wq, aq.spec, bias).double(), ref, rtol=1e-5,
                               atol=1e-5 * float(ref.abs().max()))


def test_quantized_linear_leading_dims(gen):
    x = torch.randn(2, 3, 16, generator=gen)
    wq = quantize(torch.randn(8, 16, generator=gen), QuantSpec.weight(4))
    y = quantized_linear(x, wq, QuantSpec.activation(8))
    assert y.shape == (2, 3, 8)
    torch.testing.assert_close(y[1], quantized_linear(x[1], wq, QuantSpec.activation(8)))


def test_w8a8_close_to_float(gen):
    x = torch.randn(32, 128, generator=gen)
    w = torch.randn(64, 128, generator=gen) / 11
    y = quantized_linear(x, quantize(w, QuantSpec.weight(8)), QuantSpec.activation(8))
    ref = x @ w.T
    assert float((y - ref).norm() / ref.norm()) < 0.01


def test_errors(gen):
    qa = torch.zeros(3, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="K mismatch"):
        int_gemm(qa, torch.zeros(4, 9, dtype=torch.int8))
    with pytest.raises(TypeError, match="int8"):
        int_gemm(qa.float(), torch.zeros(4, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="exceeds MAX_K"):
        int_gemm(torch.zeros(1, MAX_K + 1, dtype=torch.int8), torch.zeros(1, MAX_K + 1, dtype=torch.int8))
    wq = quantize(torch.randn(4, 8, generator=gen), QuantSpec.weight(4))
    with pytest.raises(ValueError, match="expects K=8"):
        quantized_linear(torch.randn(2, 9), wq, QuantSpec.activation(8))
    with pytest.raises(ValueError, match="bias must have shape"):
        quantized_linear(torch.randn(2, 8), wq, QuantSpec.activation(8), torch.zeros(5))
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantized_linear(torch.tensor([[float("nan")] * 8]), wq, QuantSpec.activation(8))
