import math

import pytest
import torch

from treeq_engine.format import (ACT_BITS, WEIGHT_BITS, QuantSpec, dequantize, fake_quantize,
                                 fake_quantize_with_qparams, quantize, quantize_with_qparams)

SPECS = ([QuantSpec.weight(b, sym) for b in WEIGHT_BITS for sym in (False, True)]
         + [QuantSpec.activation(b, sym) for b in ACT_BITS for sym in (False, True)])


def _data(spec, gen, shape=(19, 77)):
    x = torch.randn(*shape, generator=gen) * torch.rand(shape[0], 1, generator=gen) * 3
    if spec.role.value == "activation":
        x[3] = torch.relu(x[3])  # an all-non-negative token (GELU-like), the case asymmetry serves
    return x


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_codes_in_grid_and_error_within_half_step(spec, gen):
    x = _data(spec, gen)
    qt = quantize(x, spec)
    assert qt.codes.dtype == torch.int8 and qt.codes.shape == x.shape
    assert qt.scale.shape == (x.shape[0],) and qt.scale.dtype == torch.float32
    assert qt.zero_point.dtype == torch.int32
    assert int(qt.codes.min()) >= spec.qmin and int(qt.codes.max()) <= spec.qmax
    err = (dequantize(qt) - x).abs()
    # With clip_ratio == 1 nothing is clipped: every value is within half a step of its reconstruction.
    assert bool((err <= qt.scale[:, None] * (0.5 + 1e-5)).all())


@pytest.mark.parametrize("spec", [s for s in SPECS if not s.symmetric], ids=str)
def test_zero_exact_for_asymmetric(spec, gen):
    x = _data(spec, gen)
    x[:, 5] = 0.0
    assert bool((dequantize(quantize(x, spec))[:, 5] == 0).all())


def test_symmetric_scale_and_asymmetric_range(gen):
    x = torch.randn(4, 64, generator=gen)
    qt = quantize(x, QuantSpec.weight(4, symmetric=True))
    assert torch.equal(qt.zero_point, torch.zeros(4, dtype=torch.int32))
    torch.testing.assert_close(qt.scale, x.abs().amax(1) / 7)
    qa = quantize(x, QuantSpec.weight(4))
    lo, hi = x.amin(1).clamp(max=0), x.amax(1).clamp(min=0)
    torch.testing.assert_close(qa.scale, (hi - lo) / 15)
    # extremes map to the ends of the grid
    assert bool((qa.codes.amin(1) == -8).all()) and bool((qa.codes.amax(1) == 7).all())


def test_rounding_is_half_to_even_at_exact_ties():
    """Exact ties at known power-of-two scales, with codes derived by hand (round half to even; floor(u + ½) or
    half away from zero would give the other neighbour at every tie below).

    Symmetric A8 row: max|x| = 31.75 so scale = 31.75 / 127 = 0.25 exactly; x / 0.25 is exact:
        x      31.75  0.125  0.375  0.625  -0.125  -0.375  -0.625  31.625  -31.625  0.0
        x/s    127    0.5    1.5    2.5    -0.5    -1.5    -2.5    126.5   -126.5   0
        code   127    0      2      2      0       -2      -2      126     -126     0
    Asymmetric W4 row: lo = -6.5, hi = 8.5, so scale = 15 / 15 = 1.0 and the zero point is itself a tie:
        zp = round(qmin − lo/s) = round(−8 + 6.5) = round(−1.5) = −2          (floor(u + ½) gives −1)
        x      8.5  -6.5  0.5  1.5  2.5  -0.5  -1.5  -2.5  3.5  0.0
        round  8    -6    0    2    2    0     -2    -2    4    0
        code   6    -8    -2   0    0    -2    -4    -4    2    -2        (code = round(x/s) + zp)
    """
    x = torch.tensor([[31.75, 0.125, 0.375, 0.625, -0.125, -0.375, -0.625, 31.625, -31.625, 0.0]])
    qt = quantize(x, QuantSpec.activation(8, symmetric=True))
    assert qt.scale.tolist() == [0.25] and qt.zero_point.tolist() == [0]
    assert qt.codes.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126, -126, 0]]
    assert torch.equal(dequantize(qt), 0.25 * qt.codes.float())

    w = torch.tensor([[8.5, -6.5, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 0.0]])
    qw = quantize(w, QuantSpec.weight(4))
    assert qw.scale.tolist() == [1.0] and qw.zero_point.tolist() == [-2]
    assert qw.codes.tolist() == [[6, -8, -2, 0, 0, -2, -4, -4, 2, -2]]
    # and fake-quantization reconstructs s·(q − zp): the ties went to the even neighbour
    assert fake_quantize(w, QuantSpec.weight(4)).tolist() == [[8.0, -6.0, 0.0, 2.0, 2.0, 0.0, -2.0, -2.0, 4.0, 0.0]]


def test_clip_ratio_clips(gen):
    x = torch.randn(8, 100, generator=gen)
    full = quantize(x, QuantSpec.activation(4))
    clipped = quantize(x, QuantSpec.activation(4, clip_ratio=0.5))
    assert bool((clipped.scale < full.scale).all())
    xr = dequantize(clipped)
    assert float(xr.abs().max()) <= float(x.abs().max()) * 0.5 + float(clipped.scale.max())


def test_all_zero_row_and_constant_rows():
    x = torch.zeros(3, 10)
    x[1] = 2.5
    for spec in (QuantSpec.activation(4), QuantSpec.activation(4, symmetric=True)):
        qt = quantize(x, spec)
        assert qt.scale[0] == 1.0
        torch.testing.assert_close(dequantize(qt), x)


@pytest.mark.parametrize("spec", [QuantSpec.activation(8), QuantSpec.activation(8, symmetric=True),
                                  QuantSpec.weight(8)], ids=str)
def test_range_too_small_for_a_scale(spec):
    """A row whose range is nonzero but so small that range / (qmax − qmin) underflows to 0 gets scale 1, as an
    all-zero row does (it was scale 0 and zero point −2³¹: codes from 0/0, parameters the oracle then refused)."""
    x = torch.tensor([[1e-44, 0.0, 5e-45, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, -2.0, 0.5, 0.0]])
    qt = quantize(x, spec)
    assert qt.scale[0] == 1.0 and qt.scale[1] == 1.0 and qt.scale[2] != 1.0
    assert spec.qmin <= int(qt.zero_point.min()) and int(qt.zero_point.max()) <= spec.qmax
    assert torch.equal(qt.codes[0], qt.codes[1])   # as the zero row: every value rounds to 0
    again = quantize_with_qparams(x, spec, qt.scale, qt.zero_point)   # its own parameters are accepted
    assert torch.equal(again.codes, qt.codes)


def test_range_beyond_float32_is_an_error():
    """Finite values whose range hi − lo overflows float32 would give scale inf and NaN outputs: an error for
    weights and for activations where non-finite values are one; "propagate" gives NaN rows, as the kernels do."""
    x = torch.tensor([[3e38, -3e38, 1.0], [1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match=r"range beyond float32 .* in 1 of 2 rows \(first at row 0\)"):
        quantize(x, QuantSpec.weight(4))
    with pytest.raises(ValueError, match="range beyond float32"):
        quantize(x, QuantSpec.activation(8))
    out = dequantize(quantize(x, QuantSpec.activation(8), nonfinite="propagate"))
    assert bool(out[0].isnan().all()) and bool(out[1].isfinite().all())
    sym = quantize(x, QuantSpec.weight(4, symmetric=True))   # max|x| does not overflow
    assert bool(torch.isfinite(sym.scale).all())


def test_zero_rows():
    """An empty batch (zero rows) goes through every quantizer: K is the tensor's, not inferred from no data."""
    s = QuantSpec.activation(8)
    assert quantize(torch.zeros(0, 8), s).dequantize().shape == (0, 8)
    assert fake_quantize(torch.zeros(2, 0, 8), s).shape == (2, 0, 8)
    assert fake_quantize(torch.zeros(0, 8, requires_grad=True), s).shape == (0, 8)
    sc, zp = torch.ones(0), torch.zeros(0, dtype=torch.int32)
    assert quantize_with_qparams(torch.zeros(0, 8), s, sc, zp).codes.shape == (0, 8)
    assert fake_quantize_with_qparams(torch.zeros(0, 8), s, sc, zp).shape == (0, 8)
    assert fake_quantize_with_qparams(torch.zeros(0, 8), s, sc.requires_grad_(), zp).shape == (0, 8)
    assert quantize(torch.zeros(0, 8), QuantSpec.weight(4)).dequantize().shape == (0, 8)


def test_leading_dims_and_dtypes(gen):
    x = torch.randn(2, 5, 33, generator=gen)
    spec = QuantSpec.activation(8)
    qt = quantize(x, spec)
    assert qt.codes.shape == x.shape and qt.scale.shape == (10,)
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        y = fake_quantize(x.to(dt), spec)
        assert y.dtype == dt and y.shape == x.shape


def test_ste_gradient(gen):
    x = (torch.randn(6, 40, generator=gen) * 2).requires_grad_()
    spec = QuantSpec.activation(4, clip_ratio=0.6)
    y = fake_quantize(x, spec)
    g = torch.randn(y.shape, generator=gen)
    y.backward(g)
    qt = quantize(x.detach(), spec)
    u = x.detach() / qt.scale[:, None] + qt.zero_point[:, None]
    inside = (u >= spec.qmin - 0.5) & (u <= spec.qmax + 0.5)
    assert 0 < int(inside.sum()) < inside.numel()  # the clip ratio made some values fall outside
    torch.testing.assert_close(x.grad, g * inside)
    torch.testing.assert_close(y.detach(), dequantize(qt))


def test_keep_bf16_is_identity(gen):
    x = torch.randn(4, 8, generator=gen)
    assert fake_quantize(x, QuantSpec.activation(16)) is x
    with pytest.raises(ValueError, match="keeps bf16"):
        quantize(x, QuantSpec.weight(16))


def test_nonfinite_activations(gen):
    x = torch.randn(5, 16, generator=gen)
    x[2, 3] = float("nan")
    x[4, 0] = float("inf")
    spec = QuantSpec.activation(8)
    with pytest.raises(ValueError, match=r"NaN/Inf in 2 of 5 rows \(first at row 2\)"):
        quantize(x, spec)
    qt = quantize(x, spec, nonfinite="propagate")
    assert math.isnan(float(qt.scale[2])) and math.isnan(float(qt.scale[4]))
    out = dequantize(qt)
    assert bool(out[[2, 4]].isnan().all()) and bool(out[[0, 1, 3]].isfinite().all())
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize(x, QuantSpec.weight(4), nonfinite="propagate")  # weights never propagate
    with pytest.raises(ValueError, match="nonfinite must be"):
        quantize(x, spec, nonfinite="ignore")


def test_bad_input_errors(gen):
    with pytest.raises(TypeError, match="floating"):
        quantize(torch.ones(3, 4, dtype=torch.int32), QuantSpec.weight(4))
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.ones(2, 3, 4), QuantSpec.weight(4))
    with pytest.raises(ValueError, match="non-empty"):
        quantize(torch.ones(3, 0), QuantSpec.activation(4))
    with pytest.raises(TypeError, match="QuantSpec"):
        quantize(torch.ones(3, 4), 4)
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize([[1.0]], QuantSpec.weight(4))
