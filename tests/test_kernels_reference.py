"""The reference kernel ops equal the direct float composition (dequantize, matmul, branch, bias, GELU)."""
import pytest
import torch
import torch.nn.functional as F

from treeq_engine.branches import MonarchShape, monarch
from treeq_engine.format import QuantSpec, dequantize, quantize
from treeq_engine.kernels import PackedWeight, packed_linear, quantize_activation


@pytest.mark.parametrize("wb,ab", [(2, 8), (3, 3), (4, 4), (8, 8)])
def test_fused_ops_equal_composition(wb, ab, gen):
    m, n, k = 12, 40, 70
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) * 0.1
    bias = torch.randn(n, generator=gen)
    shift, scale = torch.randn(3, k, generator=gen), torch.randn(3, k, generator=gen) * 0.1
    s = MonarchShape(n, k, 4, 1)
    w1, w2 = torch.randn(s.w1_shape, generator=gen), torch.randn(s.w2_shape, generator=gen)
    aspec, wspec = QuantSpec.activation(ab), QuantSpec.weight(wb)
    pw = PackedWeight.from_float(w, wspec)
    act = quantize_activation(x, aspec, ln_eps=1e-6, shift=shift, scale=scale, monarch_w1=w1)
    y = packed_linear(act, pw, bias=bias, monarch_w2=w2, gelu=True, out_dtype=torch.float32)

    xm = F.layer_norm(x, (k,), eps=1e-6) * (1 + scale.repeat_interleave(4, 0)) + shift.repeat_interleave(4, 0)
    xq = dequantize(quantize(xm, aspec))
    wq = dequantize(quantize(w, wspec))
    ref = F.gelu(xq @ wq.T + monarch.forward(xm, w1, w2, n) + bias, approximate="tanh")
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(act.row_sum, act.codes.sum(1, dtype=torch.int32))


def test_output_quantization_and_errors(gen):
    x = torch.randn(6, 32, generator=gen)
    pw = PackedWeight.from_float(torch.randn(16, 32, generator=gen), QuantSpec.weight(4))
    act = quantize_activation(x, QuantSpec.activation(8))
    nxt = packed_linear(act, pw, out_spec=QuantSpec.activation(4))
    assert nxt.codes.shape == (6, 16) and nxt.bits == 4
    two_calls = quantize_activation(packed_linear(act, pw), QuantSpec.activation(4))  # bf16 rows, then the row op
    assert torch.equal(nxt.codes, two_calls.codes) and torch.equal(nxt.scale, two_calls.scale)
    with pytest.raises(ValueError, match="monarch_w2 is on meta"):
        packed_linear(act, pw, monarch_w2=torch.zeros(4, 4, 4, device="meta"))
    with pytest.raises(ValueError, match="monarch_w1 is on meta"):
        quantize_activation(x, QuantSpec.activation(8), monarch_w1=torch.zeros(4, 4, 8, device="meta"))
    with pytest.raises(ValueError, match="out_dtype must be"):
        packed_linear(act, pw, out_spec=QuantSpec.activation(4), out_dtype=torch.int32)
    with pytest.raises(ValueError, match="out_spec must be a quantized activation spec"):
        packed_linear(act, pw, out_spec=QuantSpec.weight(4))
    with pytest.raises(ValueError, match="K mismatch"):
        packed_linear(quantize_activation(torch.randn(6, 31), QuantSpec.activation(8)), pw)
    with pytest.raises(ValueError, match="2-D"):
        quantize_activation(torch.randn(2, 3, 32), QuantSpec.activation(8))
    with pytest.raises(ValueError, match="needs a quantized activation spec"):
        quantize_activation(x, QuantSpec.weight(4))
    with pytest.raises(ValueError, match="no stage-1 output"):
        packed_linear(act, pw, monarch_w2=torch.zeros(4, 4, 4))
    with pytest.raises(ValueError, match="unknown backend"):
        packed_linear(act, pw, backend="nope")
    with pytest.raises(ValueError, match="layout v2"):
        PackedWeight(pw.packed, 4, 16, 32, pw.scale, pw.zero_point, pw.col_sum, layout_version=2)


def test_gated_residual_semantics(gen):
    """``residual + gate ⊙ y``: gate row ``m // (M / G)`` per token (one per sample), ``y`` rounded to the output
    type first, then one float32 product, one float32 sum and one rounding, by hand on four tokens."""
    x = torch.randn(4, 64, generator=gen)
    pw = PackedWeight.from_float(torch.randn(3, 64, generator=gen), QuantSpec.weight(4))
    act = quantize_activation(x, QuantSpec.activation(8))
    y = packed_linear(act, pw, out_dtype=torch.bfloat16)
    res = torch.randn(4, 3, generator=gen).bfloat16()
    gate = torch.tensor([[0.5, -1.0, 3.0], [2.0, 0.25, -0.125]])
    out = packed_linear(act, pw, out_dtype=torch.bfloat16, residual=res, gate=gate)
    for m in range(4):
        for n in range(3):
            prod = torch.tensor(float(gate[m // 2, n]), dtype=torch.float32) * y[m, n].float()
            assert out[m, n] == (res[m, n].float() + prod).bfloat16()
    plain = packed_linear(act, pw, out_dtype=torch.bfloat16, residual=res)
    assert torch.equal(plain, (res.float() + y.float()).bfloat16())
    assert not torch.equal(out, y)
