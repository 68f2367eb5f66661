"""Triton activation quantization against the oracle (interpreted on CPU, compiled on a GPU).

Without LayerNorm the kernel reproduces the oracle's float32 operations one for one (true division, round half
to even, separate multiply and add), so codes, scales, zero points and row sums are compared *exactly*.
"""
import pytest
import torch
import torch.nn.functional as F

from triton_testing import DEVICE, assert_codes_match_up_to_ties, poisoned  # noqa: F401
from treeq_engine.branches import MonarchShape, monarch
from treeq_engine.format import QuantSpec, quantize
from treeq_engine.kernels import quantize_activation, reference

# the Triton 3.6 interpreter converts 1-element arrays to loop bounds (NumPy deprecation, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _exact(act, ref):
    assert act.codes.dtype == torch.int8 and act.codes.shape == ref.codes.shape
    assert torch.equal(act.codes.cpu(), ref.codes), f"{int((act.codes.cpu() != ref.codes).sum())} codes differ"
    assert torch.equal(act.scale.cpu(), ref.scale)
    assert torch.equal(act.zero_point.cpu(), ref.zero_point)
    assert torch.equal(act.row_sum.cpu(), ref.row_sum)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric,clip", [(False, 1.0), (True, 1.0), (False, 0.83), (True, 0.7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codes_exact(bits, symmetric, clip, dtype, gen, poisoned):  # noqa: F811
    m, k = 37, 203
    x = (torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 4).to(dtype)
    x[3] = 0.0  # an all-zero row: scale 1, zero point at the code of 0
    x[5] = x[5].abs()  # one-signed rows: the range is clamped to include 0
    x[6] = -x[6].abs()
    x[7, :9] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -127.5])  # exact ties at scale 1
    x[7, 9:] = 0.0
    spec = QuantSpec.activation(bits, symmetric, clip)
    act = quantize_activation(x.to(DEVICE), spec, backend="triton")
    _exact(act, reference.quantize_activation(x, spec))
    assert act.z is None


@pytest.mark.parametrize("g", [3, 30], ids=["per-sample", "per-token"])   # (30: one group per row, G = M)
def test_modulate_exact(g, gen, poisoned):  # noqa: F811
    m, k = 30, 77
    x = torch.randn(m, k, generator=gen, dtype=torch.bfloat16)
    shift, scale = torch.randn(g, k, generator=gen), torch.randn(g, k, generator=gen) * 0.3
    spec = QuantSpec.activation(4)
    act = quantize_activation(x.to(DEVICE), spec, shift=shift.to(DEVICE), scale=scale.to(DEVICE), backend="triton")
    _exact(act, reference.quantize_activation(x, spec, shift=shift, scale=scale))


@pytest.mark.parametrize("bits,symmetric", [(8, False), (3, True), (4, False)])
def test_layernorm_modulate_monarch(bits, symmetric, gen, poisoned):  # noqa: F811
    """LayerNorm fused: x̂ and the scale match to float rounding, codes up to rounding ties; z (Monarch stage 1
    of the unquantized rows, non-square, K not a multiple of b) to float tolerance."""
    m, k, g = 33, 150, 3
    x = (torch.randn(m, k, generator=gen) * 3 + 1).to(torch.bfloat16)
    shift, scale = torch.randn(g, k, generator=gen), torch.randn(g, k, generator=gen) * 0.2
    w1 = torch.randn(MonarchShape(40, k, 4, 3).w1_shape, generator=gen)
    spec = QuantSpec.activation(bits, symmetric, 0.9)
    kw = dict(ln_eps=1e-6, shift=shift, scale=scale, monarch_w1=w1)
    act = quantize_activation(x.to(DEVICE), spec, backend="triton", **{a: (v.to(DEVICE) if torch.is_tensor(v) else v)
                                                                       for a, v in kw.items()})
    ref = reference.quantize_activation(x, spec, **kw)
    xhat = reference.preprocess(x, ln_eps=1e-6, shift=shift, scale=scale)
    assert_codes_match_up_to_ties(act.codes.cpu(), act.scale.cpu(), act.zero_point.cpu(), xhat, ref, spec)
    assert torch.equal(act.row_sum.cpu(), act.codes.cpu().sum(1, dtype=torch.int32))
    assert act.z.shape == ref.z.shape == (m, 4, 12)
    tol = dict(rtol=1e-5, atol=1e-4) if DEVICE.type == "cpu" else dict(rtol=1e-2, atol=2e-2)  # bf16 z on GPU
    torch.testing.assert_close(act.z.float().cpu(), ref.z, **tol)


@pytest.mark.parametrize("bits,symmetric,branch", [(8, False, False), (4, True, True), (3, False, True)])
def test_rmsnorm_modulate(bits, symmetric, branch, gen, poisoned):  # noqa: F811
    """RMSNorm (no mean subtraction: rows offset far from zero tell it from LayerNorm) + modulate, with and without
    the branch: x̂ and the scale to float rounding, codes up to rounding ties, z to float tolerance."""
    m, k, g = 26, 133, 2
    x = (torch.randn(m, k, generator=gen) * 2 + 3).to(torch.bfloat16)
    shift, scale = torch.randn(g, k, generator=gen), torch.randn(g, k, generator=gen) * 0.2
    w1 = torch.randn(MonarchShape(24, k, 4, 2).w1_shape, generator=gen) if branch else None
    spec = QuantSpec.activation(bits, symmetric, 0.95)
    kw = dict(ln_eps=1e-6, shift=shift, scale=scale, monarch_w1=w1, rms_norm=True)
    act = quantize_activation(x.to(DEVICE), spec, backend="triton",
                              **{a: (v.to(DEVICE) if torch.is_tensor(v) else v) for a, v in kw.items()})
    ref = reference.quantize_activation(x, spec, **kw)
    xhat = reference.preprocess(x, ln_eps=1e-6, shift=shift, scale=scale, rms_norm=True)
    rms = F.rms_norm(x.float(), (k,), eps=1e-6)   # (torch's own, not the oracle's formula)
    torch.testing.assert_close(xhat, rms * (1 + scale.repeat_interleave(m // g, 0))
                               + shift.repeat_interleave(m // g, 0), rtol=1e-6, atol=1e-6)
    assert_codes_match_up_to_ties(act.codes.cpu(), act.scale.cpu(), act.zero_point.cpu(), xhat, ref, spec)
    assert torch.equal(act.row_sum.cpu(), act.codes.cpu().sum(1, dtype=torch.int32))
    ln = reference.quantize_activation(x, spec, ln_eps=1e-6, shift=shift, scale=scale)
    assert not torch.equal(ln.codes, ref.codes)   # (the test tells the two norms apart)
    if branch:
        tol = dict(rtol=1e-5, atol=1e-4) if DEVICE.type == "cpu" else dict(rtol=1e-2, atol=2e-2)  # bf16 z on GPU
        torch.testing.assert_close(act.z.float().cpu(), ref.z, **tol)
    else:
        assert act.z is None


def test_rmsnorm_rows_against_functional(gen):
    """The fused RMSNorm without modulate is F.rms_norm: dequantized rows agree to quantization."""
    x = torch.randn(16, 96, generator=gen) * 5 + 3
    act = quantize_activation(x.to(DEVICE), QuantSpec.activation(8), ln_eps=1e-5, rms_norm=True, backend="triton")
    err = (act.dequantize().cpu() - F.rms_norm(x, (96,), eps=1e-5)).abs().max()
    assert float(err) <= float(act.scale.max()) * 0.5 + 1e-6


def test_lowrank_stage1(gen, poisoned):  # noqa: F811
    """b = 1 is the low-rank branch: z = L1·x."""
    m, k = 21, 64
    x = torch.randn(m, k, generator=gen)
    w1 = torch.randn(1, 5, k, generator=gen)
    act = quantize_activation(x.to(DEVICE), QuantSpec.activation(8), monarch_w1=w1.to(DEVICE), backend="triton")
    tol = dict(rtol=1e-5, atol=1e-4) if DEVICE.type == "cpu" else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(act.z.float().cpu(), (x @ w1[0].T).reshape(m, 1, 5), **tol)
    _exact(act, reference.quantize_activation(x, QuantSpec.activation(8), monarch_w1=w1))


@pytest.mark.parametrize("k,blocks,rank", [(300, 1, 5), (300, 2, 3), (1030, 1, 40)])
def test_stage1_in_chunks(k, blocks, rank, gen, poisoned):  # noqa: F811
    """Few input blocks make each block long (one block: all of K); stage 1 then walks it in chunks
    (``stage1_chunk``) and must equal the single product, with the LayerNorm and modulate in front."""
    from treeq_engine.kernels.triton.act_quant import stage1_chunk

    s = MonarchShape(n=48, k=k, blocks=blocks, rank=rank)
    assert stage1_chunk(s.w1_shape[2], s.w1_shape[1]) < s.w1_shape[2]  # really more than one chunk
    m = 21
    x = torch.randn(m, k, generator=gen)
    shift, scale = torch.randn(3, k, generator=gen), torch.randn(3, k, generator=gen) * 0.1
    w1 = torch.randn(s.w1_shape, generator=gen) * 0.1
    kw = dict(ln_eps=1e-6, shift=shift, scale=scale, monarch_w1=w1)
    spec = QuantSpec.activation(4)
    act = quantize_activation(x.to(DEVICE), spec, backend="triton",
                              **{n: t.to(DEVICE) if torch.is_tensor(t) else t for n, t in kw.items()})
    ref = reference.quantize_activation(x, spec, **kw)
    tol = dict(rtol=1e-5, atol=1e-4) if DEVICE.type == "cpu" else dict(rtol=1e-2, atol=2e-2)  # bf16 z on GPU
    torch.testing.assert_close(act.z.float().cpu(), ref.z, **tol)
    # LayerNorm fused: scales to float32 rounding; codes and zero points equal, or ±1 where the oracle sits on a tie
    xhat = reference.preprocess(x, ln_eps=1e-6, shift=shift, scale=scale)
    assert_codes_match_up_to_ties(act.codes.cpu(), act.scale.cpu(), act.zero_point.cpu(), xhat, ref, spec)
    assert torch.equal(act.row_sum.cpu(), act.codes.cpu().sum(1, dtype=torch.int32))


def test_layernorm_single_feature(gen, poisoned):  # noqa: F811
    """K = 1 (compiled Triton passes it as a constant): LayerNorm of one value is 0, and the row quantizes."""
    x = torch.randn(5, 1, generator=gen)
    act = quantize_activation(x.to(DEVICE), QuantSpec.activation(8), ln_eps=1e-6, backend="triton")
    ref = reference.quantize_activation(x, QuantSpec.activation(8), ln_eps=1e-6)
    assert torch.equal(act.codes.cpu(), ref.codes) and torch.equal(act.zero_point.cpu(), ref.zero_point)


@pytest.mark.parametrize("symmetric", [False, True])
def test_range_too_small_for_a_scale(symmetric, poisoned):  # noqa: F811
    """A nonzero range whose scale underflows to 0 gets scale 1 in the kernel as in the oracle (the kernel had
    divided by 0 and disagreed with the oracle's codes and row sums)."""
    x = torch.tensor([[1e-44, 0.0, 5e-45, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, -2.0, 0.5, 0.0]])
    spec = QuantSpec.activation(8, symmetric=symmetric)
    act = quantize_activation(x.to(DEVICE), spec, backend="triton")
    ref = reference.quantize_activation(x, spec)
    assert float(act.scale[0]) == 1.0
    for name in ("codes", "scale", "zero_point", "row_sum"):
        assert torch.equal(getattr(act, name).cpu(), getattr(ref, name)), name


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the NaN rows
def test_nonfinite_rows_propagate(gen, poisoned):  # noqa: F811
    x = torch.randn(9, 40, generator=gen)
    x[2, 7] = float("nan")
    x[4, 0] = float("inf")
    x[5, 39] = -float("inf")
    spec = QuantSpec.activation(4)
    act = quantize_activation(x.to(DEVICE), spec, backend="triton")
    ref = quantize(x, spec, nonfinite="propagate")
    bad = torch.tensor([2, 4, 5])
    assert torch.isnan(act.scale.cpu()[bad]).all() and (act.zero_point.cpu()[bad] == 0).all()
    assert (act.codes.cpu()[bad] == 0).all() and (act.row_sum.cpu()[bad] == 0).all()
    assert torch.equal(act.codes.cpu(), ref.codes)
    torch.testing.assert_close(act.scale.cpu(), ref.scale, equal_nan=True, rtol=0, atol=0)


def test_layernorm_rows_against_functional(gen):
    """The fused LayerNorm (two-pass mean/variance) is F.layer_norm: dequantized rows agree to quantization."""
    x = torch.randn(16, 96, generator=gen) * 5 + 3
    spec = QuantSpec.activation(8)
    act = quantize_activation(x.to(DEVICE), spec, ln_eps=1e-5, backend="triton")
    xn = F.layer_norm(x, (96,), eps=1e-5)
    err = (act.dequantize().cpu() - xn).abs().max()
    assert float(err) <= float(act.scale.max()) * 0.5 + 1e-6


def test_monarch_stage1_helper_matches_forward(gen):
    """z from the kernel drives the oracle's stage 2 to the full Monarch product."""
    m, n, k = 10, 24, 48
    s = MonarchShape(n, k, 4, 2)
    w1, w2 = torch.randn(s.w1_shape, generator=gen), torch.randn(s.w2_shape, generator=gen)
    x = torch.randn(m, k, generator=gen)
    act = quantize_activation(x.to(DEVICE), QuantSpec.activation(8), monarch_w1=w1.to(DEVICE), backend="triton")
    tol = dict(rtol=1e-5, atol=1e-4) if DEVICE.type == "cpu" else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(monarch.stage2(act.z.float().cpu(), w2, n), monarch.forward(x, w1, w2, n), **tol)


def test_errors(gen):
    x = torch.randn(6, 32, generator=gen).to(DEVICE)
    with pytest.raises(ValueError, match="multiple of G"):
        quantize_activation(x, QuantSpec.activation(8), shift=torch.zeros(4, 32, device=DEVICE),
                            scale=torch.zeros(4, 32, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="both shift and scale"):
        quantize_activation(x, QuantSpec.activation(8), shift=torch.zeros(2, 32, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="rms_norm needs ln_eps"):
        quantize_activation(x, QuantSpec.activation(8), rms_norm=True, backend="triton")
    with pytest.raises(TypeError, match="rms_norm must be a bool"):
        quantize_activation(x, QuantSpec.activation(8), ln_eps=1e-6, rms_norm=1, backend="triton")
    with pytest.raises(TypeError, match="bfloat16, float16 or float32"):
        quantize_activation(x.to(torch.int32), QuantSpec.activation(8), backend="triton")
    with pytest.raises(ValueError, match="must cover K"):
        quantize_activation(x, QuantSpec.activation(8), monarch_w1=torch.zeros(2, 2, 8, device=DEVICE),
                            backend="triton")
