"""Plain-Triton packed GEMM against the oracle (interpreted on CPU, compiled on a GPU).

The integer part is checked exactly through the zero-point-correction identity: with unit scales and no
branch/bias, the float32 output *is* ``Σ_k (qa − za)(qw − zw)`` (exact while |corr| < 2²⁴), for every
weight × activation bit-width pair at odd M, N and K, random zero points, and split-K. The float epilogue
(scales, Monarch stage 2, bias, GELU) is compared with the reference backend within a stated tolerance.
"""
import dataclasses

import pytest
import torch

from triton_testing import DEVICE, poisoned  # noqa: F401
from treeq_engine.branches import MonarchShape
from treeq_engine.format import QuantSpec, int_gemm, zero_point_correction
from treeq_engine.kernels import PackedWeight, QuantizedActivation, packed_linear, quantize_activation, reference
from treeq_engine.kernels.triton import gemm
from treeq_engine.kernels.triton.autotune import GemmConfig

# the Triton 3.6 interpreter converts 1-element arrays to loop bounds (NumPy deprecation, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

# float epilogue tolerance: fp32 everywhere under the interpreter; bf16 Monarch operands on a GPU
TOL = dict(rtol=1e-5, atol=1e-4) if DEVICE.type == "cpu" else dict(rtol=1e-2, atol=5e-2)


def _operands(gen, m, n, k, wb, ab, *, wsym=False, asym=False):
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)
    x = torch.randn(m, k, generator=gen) * 2
    pw = PackedWeight.from_float(w, QuantSpec.weight(wb, wsym))
    act = reference.quantize_activation(x, QuantSpec.activation(ab, asym))
    return x, pw, act


def _unit_scales(act: QuantizedActivation, pw: PackedWeight):
    return (dataclasses.replace(act, scale=torch.ones_like(act.scale)),
            dataclasses.replace(pw, scale=torch.ones_like(pw.scale)))


def _to(obj, device):
    if isinstance(obj, PackedWeight):
        return obj.to(device)
    return QuantizedActivation(*(t.to(device) if torch.is_tensor(t) else t for t in dataclasses.astuple(obj)))


@pytest.mark.parametrize("wb", [2, 3, 4, 8])
@pytest.mark.parametrize("ab", [3, 4, 8])
def test_integer_accumulation_exact(wb, ab, gen, poisoned):  # noqa: F811
    m, n, k = 37, 45, 101
    _, pw, act = _operands(gen, m, n, k, wb, ab, asym=ab == 4)
    act1, pw1 = _unit_scales(act, pw)
    y = packed_linear(_to(act1, DEVICE), _to(pw1, DEVICE), out_dtype=torch.float32, backend="triton").cpu()
    corr = zero_point_correction(int_gemm(act.codes, pw.codes()), k, act.zero_point, act.row_sum,
                                 pw.zero_point, pw.col_sum)
    assert corr.abs().max() < 2**24
    assert torch.equal(y, corr.float())


@pytest.mark.parametrize("cfg", [GemmConfig(16, 16, 32, split_k=3, group_m=2), GemmConfig(16, 32, 32, split_k=2,
                                                                                          group_m=1)])
def test_split_k_exact_and_self_cleaning(cfg, gen, poisoned):  # noqa: F811
    m, n, k = 21, 50, 130  # 5 K-steps over 3 splits: one split gets fewer, grouped order with a partial group
    _, pw, act = _operands(gen, m, n, k, 4, 8)
    act1, pw1 = _unit_scales(act, pw)
    corr = zero_point_correction(int_gemm(act.codes, pw.codes()), k, act.zero_point, act.row_sum,
                                 pw.zero_point, pw.col_sum).float()
    for _ in range(2):  # the second call proves the workspace and counters were left zeroed
        y = gemm.packed_gemm(act1.codes.to(DEVICE), act1.scale.to(DEVICE), act1.zero_point.to(DEVICE),
                             act1.row_sum.to(DEVICE), pw1.packed.to(DEVICE), 4, n, pw1.scale.to(DEVICE),
                             pw1.zero_point.to(DEVICE), pw1.col_sum.to(DEVICE), out_dtype=torch.float32, config=cfg)
        assert torch.equal(y.cpu(), corr)
    ws, cnt = gemm._WORKSPACE[DEVICE if DEVICE.type == "cpu" else torch.device("cuda", torch.cuda.current_device())]
    assert not ws.any() and not cnt.any()


@pytest.mark.parametrize("wb,ab,blocks,rank", [(4, 8, 4, 2), (3, 4, 5, 2), (2, 8, 16, 1), (8, 3, 1, 6),
                                               (4, 8, 2, 3), (4, 4, None, None)])
@pytest.mark.parametrize("gelu", [False, True])
def test_fused_epilogue_matches_reference(wb, ab, blocks, rank, gelu, gen, poisoned):  # noqa: F811
    """Scales, Monarch stage 2, bias and GELU. Square-free shapes with N not a multiple of b, so with the
    interpreter's 32-channel tiles the output blocks (Nb = 18, 14, 5, 70, 35 channels) straddle tile edges: tiles
    overlapping several blocks, a block spanning tiles, padding past N, low rank b = 1."""
    m, n, k = 19, 70, 83
    x, pw, _ = _operands(gen, m, n, k, wb, ab)
    w1 = w2 = None
    if blocks:
        s = MonarchShape(n, k, blocks, rank)
        w1, w2 = torch.randn(s.w1_shape, generator=gen) * 0.1, torch.randn(s.w2_shape, generator=gen) * 0.1
    bias = torch.randn(n, generator=gen)
    spec = QuantSpec.activation(ab)
    act = reference.quantize_activation(x, spec, monarch_w1=w1)
    ref = reference.packed_linear(act, pw, bias=bias, monarch_w2=w2, gelu=gelu, out_dtype=torch.float32)
    y = packed_linear(_to(act, DEVICE), _to(pw, DEVICE), bias=bias.to(DEVICE),
                      monarch_w2=None if w2 is None else w2.to(DEVICE), gelu=gelu, out_dtype=torch.float32,
                      backend="triton")
    torch.testing.assert_close(y.cpu(), ref, **TOL)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_out_dtypes(out_dtype, gen, poisoned):  # noqa: F811
    x, pw, act = _operands(gen, 11, 33, 64, 4, 8)
    ref = reference.packed_linear(act, pw, out_dtype=torch.float32)
    y = packed_linear(_to(act, DEVICE), _to(pw, DEVICE), out_dtype=out_dtype, backend="triton")
    assert y.dtype == out_dtype
    if DEVICE.type == "cpu":
        # no branch, no bias: the interpreter runs the epilogue in float32 in the oracle's order (corr·s_a·s_w,
        # each product rounded once), then one rounding to out_dtype, so the output is the oracle's bit for bit
        assert torch.equal(y, ref.to(out_dtype))
    else:
        # compiled, the float32 products may be reordered: a few float32 ulps, which can move the final
        # (monotone) rounding to out_dtype by one out_dtype ulp at a tie, and one ulp is ≤ eps·|ref| (atol for
        # float16 subnormals)
        torch.testing.assert_close(y.float().cpu(), ref.to(out_dtype).float(), rtol=torch.finfo(out_dtype).eps,
                                   atol=1e-6)


def test_output_quantized_for_next_layer(gen, poisoned):  # noqa: F811
    """fc1 → GELU → 4-bit codes for fc2: the GEMM's bf16 rows feed the row quantizer, as in the oracle, so the
    codes are those of quantizing the rows the GEMM alone writes (which test_out_dtypes holds to the oracle)."""
    x, pw, act = _operands(gen, 13, 40, 96, 4, 8)
    spec = QuantSpec.activation(4)
    nxt = packed_linear(_to(act, DEVICE), _to(pw, DEVICE), gelu=True, out_spec=spec, backend="triton")
    assert isinstance(nxt, QuantizedActivation) and nxt.bits == 4 and nxt.codes.shape == (13, 40)
    y = packed_linear(_to(act, DEVICE), _to(pw, DEVICE), gelu=True, backend="triton").float().cpu()
    torch.testing.assert_close(y, reference.packed_linear(act, pw, gelu=True, out_dtype=torch.float32),
                               rtol=1e-2, atol=1e-2)
    ref = reference.quantize_activation(y, spec)
    from triton_testing import assert_codes_match_up_to_ties

    assert_codes_match_up_to_ties(nxt.codes.cpu(), nxt.scale.cpu(), nxt.zero_point.cpu(), y, ref, spec, tol=1e-4)


def test_end_to_end_fused_ops(gen):
    """quantize_activation(LN, modulate, Monarch) → packed_linear(branch, bias, GELU), both on Triton, against
    the reference ops and the float composition."""
    m, n, k = 12, 40, 70
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) * 0.1
    bias = torch.randn(n, generator=gen)
    shift, scale = torch.randn(3, k, generator=gen), torch.randn(3, k, generator=gen) * 0.1
    s = MonarchShape(n, k, 4, 1)
    w1, w2 = torch.randn(s.w1_shape, generator=gen), torch.randn(s.w2_shape, generator=gen)
    pw = PackedWeight.from_float(w, QuantSpec.weight(4))
    spec = QuantSpec.activation(8)
    kw = dict(ln_eps=1e-6, shift=shift, scale=scale, monarch_w1=w1)
    ref = reference.packed_linear(reference.quantize_activation(x, spec, **kw), pw, bias=bias, monarch_w2=w2,
                                  gelu=True, out_dtype=torch.float32)
    act = quantize_activation(x.to(DEVICE), spec, backend="triton",
                              **{a: v.to(DEVICE) if torch.is_tensor(v) else v for a, v in kw.items()})
    y = packed_linear(act, pw.to(DEVICE), bias=bias.to(DEVICE), monarch_w2=w2.to(DEVICE), gelu=True,
                      out_dtype=torch.float32, backend="triton")
    # LayerNorm fused in another order may move a code across a tie: one code step of one row at most
    step = float(act.scale.max()) * float(pw.scale.max()) * 2 * k ** 0.5
    torch.testing.assert_close(y.cpu(), ref, rtol=TOL["rtol"], atol=max(TOL["atol"], step))


def test_errors(gen):
    _, pw, act = _operands(gen, 5, 16, 32, 4, 8)
    act, pw = _to(act, DEVICE), _to(pw, DEVICE)
    with pytest.raises(ValueError, match="no stage-1 output"):
        packed_linear(act, pw, monarch_w2=torch.zeros(4, 4, 4, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="bias must be"):
        packed_linear(act, pw, bias=torch.zeros(3, device=DEVICE), backend="triton")
    bad_z = dataclasses.replace(act, z=torch.zeros(5, 2, 2, device=DEVICE))
    with pytest.raises(ValueError, match="z must be"):
        packed_linear(bad_z, pw, monarch_w2=torch.zeros(4, 4, 4, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="out_dtype"):
        packed_linear(act, pw, out_dtype=torch.int32, backend="triton")
    with pytest.raises(ValueError, match="codes must be contiguous int8"):
        packed_linear(dataclasses.replace(act, codes=act.codes.to(torch.int32)), pw, backend="triton")
    with pytest.raises(ValueError, match="scale must be"):
        packed_linear(dataclasses.replace(act, scale=act.scale.double()), pw, backend="triton")


def test_bf16_branch_factors(gen, poisoned):  # noqa: F811
    """Monarch factors stored in bf16 (the runtime's storage for a 16-bit model) go to both kernels as they are
    (converted on load) and give what the oracle gives with the same rounded factors."""
    m, n, k = 17, 70, 83
    x, pw, _ = _operands(gen, m, n, k, 4, 8)
    s = MonarchShape(n, k, 5, 2)
    w1 = (torch.randn(s.w1_shape, generator=gen) * 0.1).bfloat16()
    w2 = (torch.randn(s.w2_shape, generator=gen) * 0.1).bfloat16()
    spec = QuantSpec.activation(8)
    act = quantize_activation(x.to(DEVICE), spec, monarch_w1=w1.to(DEVICE), backend="triton")
    ref_act = reference.quantize_activation(x, spec, monarch_w1=w1.float())
    tol = dict(rtol=1e-5, atol=1e-4) if DEVICE.type == "cpu" else dict(rtol=1e-2, atol=2e-2)  # bf16 z on GPU
    torch.testing.assert_close(act.z.float().cpu(), ref_act.z, **tol)
    y = packed_linear(act, pw.to(DEVICE), monarch_w2=w2.to(DEVICE), out_dtype=torch.float32, backend="triton")
    ref = reference.packed_linear(ref_act, pw, monarch_w2=w2.float(), out_dtype=torch.float32)
    torch.testing.assert_close(y.cpu(), ref, **TOL)
    from treeq_engine.kernels.triton import backend as tb

    w2d = w2.to(DEVICE)
    assert tb._branch_factor(w2d) is tb._branch_factor(w2d)  # converted once, not on every call
    w2d.mul_(2)
    assert torch.equal(tb._branch_factor(w2d), w2d.float())  # rebuilt after an in-place change


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("groups", [None, 1, 3, 3 * 13])   # (39 = M: a gate row per token)
@pytest.mark.parametrize("cfg", [None, GemmConfig(16, 16, 32, split_k=3, group_m=2)])
def test_gated_residual_exact(out_dtype, groups, cfg, gen, poisoned):  # noqa: F811
    """``residual + gate ⊙ y`` fused into the store is, bit for bit, the oracle's gated residual of what the same
    kernel writes without it (the rounding of y to the output type included), at ragged M and N, with the branch,
    bias and GELU upstream, and through split-K; the residual is only read."""
    m, n, k = 3 * 13, 70, 83
    x, pw, _ = _operands(gen, m, n, k, 4, 8)
    s = MonarchShape(n, k, 5, 2)
    w1, w2 = torch.randn(s.w1_shape, generator=gen) * 0.1, torch.randn(s.w2_shape, generator=gen) * 0.1
    bias = torch.randn(n, generator=gen)
    act = _to(reference.quantize_activation(x, QuantSpec.activation(8), monarch_w1=w1), DEVICE)
    res = (torch.randn(m, n, generator=gen) * 3).to(out_dtype).to(DEVICE)
    gate = None if groups is None else torch.randn(groups, n, generator=gen).to(DEVICE)
    res0 = res.clone()
    a = (act.codes, act.scale, act.zero_point, act.row_sum, pw.packed.to(DEVICE), 4, n, pw.scale.to(DEVICE),
         pw.zero_point.to(DEVICE), pw.col_sum.to(DEVICE))
    kw = dict(bias=bias.to(DEVICE), z=act.z, w2=w2.to(DEVICE), gelu=True, out_dtype=out_dtype, config=cfg)
    y = gemm.packed_gemm(*a, **kw)
    fused = gemm.packed_gemm(*a, **kw, residual=res, gate=gate)
    assert fused.dtype == out_dtype and torch.equal(res, res0)
    want = reference.gated_residual(y.cpu(), res.cpu(), None if gate is None else gate.cpu())
    assert torch.equal(fused.cpu(), want)
    # and the whole op against the oracle, through the dispatcher
    ref = reference.packed_linear(reference.quantize_activation(x, QuantSpec.activation(8), monarch_w1=w1), pw,
                                  bias=bias, monarch_w2=w2, gelu=True, out_dtype=out_dtype, residual=res.cpu(),
                                  gate=None if gate is None else gate.cpu())
    got = packed_linear(act, pw.to(DEVICE), bias=bias.to(DEVICE), monarch_w2=w2.to(DEVICE), gelu=True,
                        out_dtype=out_dtype, residual=res, gate=gate, backend="triton")
    tol = TOL if out_dtype == torch.float32 else dict(rtol=1e-2, atol=5e-2)
    torch.testing.assert_close(got.float().cpu(), ref.float(), **tol)


def test_gated_residual_errors(gen):
    _, pw, act = _operands(gen, 6, 16, 32, 4, 8)
    act, pw = _to(act, DEVICE), _to(pw, DEVICE)
    res = torch.zeros(6, 16, dtype=torch.bfloat16, device=DEVICE)
    gate = torch.zeros(2, 16, device=DEVICE)
    for kw, msg in ((dict(gate=gate), "needs residual"),
                    (dict(residual=res[:, :8]), r"residual must be \(M=6, N=16\)"),
                    (dict(residual=res.float()), "residual must be contiguous torch.bfloat16"),
                    (dict(residual=res, gate=gate[:, :8]), r"gate must be \(G, N=16\)"),
                    (dict(residual=res, gate=torch.zeros(4, 16, device=DEVICE)), "not a multiple of G=4"),
                    (dict(residual=res, gate=gate.bfloat16()), "gate must be contiguous float32"),
                    (dict(residual=res, out_spec=QuantSpec.activation(8)), "residual and out_spec"),
                    (dict(residual=res.to(torch.int32), out_dtype=torch.int32), "out_dtype must be a float")):
        with pytest.raises(ValueError, match=msg):
            packed_linear(act, pw, backend="triton", **kw)
    with pytest.raises(ValueError, match="residual must be contiguous"):
        packed_linear(act, pw, residual=torch.zeros(16, 6, dtype=torch.bfloat16, device=DEVICE).t(),
                      backend="triton")
    a = (act.codes, act.scale, act.zero_point, act.row_sum, pw.packed, 4, 16, pw.scale, pw.zero_point, pw.col_sum)
    with pytest.raises(ValueError, match=r"residual must be \(M=6, N=16\)"):   # the launcher itself checks too
        gemm.packed_gemm(*a, residual=res[:3])
    with pytest.raises(ValueError, match="needs residual"):
        gemm.packed_gemm(*a, gate=gate)
