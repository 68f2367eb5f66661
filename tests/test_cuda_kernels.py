"""The CUDA kernels (wgmma on sm_90, mma.sync on sm_80+) against the oracle, on a GPU: exact integer
accumulation for every weight/activation bit-width pair, odd shapes, split-K, the fused epilogue within stated
tolerances, the fused gated residual bit for bit, poisoned outputs, the custom ops under CUDA graphs and
torch.compile.

CPU-only machines skip this module (``gpu`` marker). tools/sanitize_cuda.sh runs the ``sanitize`` subset under
compute-sanitizer."""
import itertools

import pytest
import torch

from cuda_expect import corr_exact, epilogue_expect, reference_linear, stage1_expect
from treeq_engine import core
from treeq_engine.branches import MonarchShape
from treeq_engine.format import QuantSpec
from treeq_engine.kernels import PackedWeight, QuantizedActivation, packed_linear, quantize_activation, reference
from treeq_engine.kernels import cuda_backend as cb

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cb.available(), reason="treeq_engine._C without CUDA, or no CUDA device")]

W_BITS, A_BITS = (2, 3, 4, 8), (3, 4, 8)


def _archs() -> list[int]:
    if not torch.cuda.is_available():
        return [80]
    return [90, 80] if torch.cuda.get_device_capability() == (9, 0) else [80]


ARCHS = _archs()


@pytest.fixture
def cgen():
    return torch.Generator().manual_seed(20261125)


def _act(m, k, bits, gen, *, symmetric=False, device="cuda") -> QuantizedActivation:
    """A quantized activation from the oracle (fresh random rows), moved to the device."""
    x = torch.randn(m, k, generator=gen) * 2 + 0.3
    a = reference.quantize_activation(x, QuantSpec.activation(bits, symmetric=symmetric))
    return QuantizedActivation(a.codes.to(device), a.scale.to(device), a.zero_point.to(device),
                               a.row_sum.to(device), bits)


def _weight(n, k, bits, gen, *, symmetric=False) -> PackedWeight:
    return PackedWeight.from_float(torch.randn(n, k, generator=gen) * 0.05, QuantSpec.weight(bits, symmetric)).to("cuda")


def _poisoned(m, n, dtype):
    if dtype == torch.int32:
        return torch.full((m, n), -123456789, dtype=dtype, device="cuda")
    return torch.full((m, n), float("nan"), dtype=dtype, device="cuda")


# ---- activation quantization ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,symmetric,clip", [(3, False, 1.0), (4, False, 0.9), (8, False, 1.0), (4, True, 1.0),
                                                 (8, True, 0.8)])
@pytest.mark.parametrize("m,k", [(1, 1), (37, 70), (300, 1152), (5, 4099)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_activation_bit_exact(bits, symmetric, clip, m, k, dtype, cgen):
    """Without LayerNorm every step is an exact IEEE operation: codes, scales, zero points and row sums equal the
    oracle's bit for bit (modulate included: separate multiply and add, as the oracle)."""
    x = (torch.randn(m, k, generator=cgen) * 3).to(dtype)
    g = 1 if m < 5 else 5 if m % 5 == 0 else m   # (m: one group per row, a per-token modulation)
    shift, scale = torch.randn(g, k, generator=cgen), torch.randn(g, k, generator=cgen) * 0.2
    spec = QuantSpec.activation(bits, symmetric=symmetric, clip_ratio=clip)
    want = reference.quantize_activation(x, spec, shift=shift, scale=scale)
    out = (torch.full((m, k), 77, dtype=torch.int8, device="cuda"), torch.full((m,), float("nan"), device="cuda"),
           torch.full((m,), -99, dtype=torch.int32, device="cuda"), torch.full((m,), -99, dtype=torch.int32,
                                                                               device="cuda"))
    cb.launch_quantize_activation(x.cuda(), spec, *out, shift=shift.cuda(), mod_scale=scale.cuda())
    torch.cuda.synchronize()
    codes, s, zp, rs = (t.cpu() for t in out)
    assert torch.equal(codes, want.codes)
    assert torch.equal(s, want.scale)
    assert torch.equal(zp, want.zero_point)
    assert torch.equal(rs, want.row_sum)


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("bits", A_BITS)
def test_quantize_activation_layernorm(bits, rms, cgen):
    """With LayerNorm (or RMSNorm) the mean/variance summation order differs from torch's: scales agree to float32
    rounding, and a code may differ by one only where the oracle's value sits within rounding of a .5 tie."""
    m, k, eps = 129, 1152, 1e-6
    x = torch.randn(m, k, generator=cgen) * 4 + 1
    shift, scale = torch.randn(3, k, generator=cgen), torch.randn(3, k, generator=cgen) * 0.2
    spec = QuantSpec.activation(bits)
    want = reference.quantize_activation(x, spec, ln_eps=eps, shift=shift, scale=scale, rms_norm=rms)
    got = cb.quantize_activation(x.cuda(), spec, ln_eps=eps, shift=shift.cuda(), scale=scale.cuda(), rms_norm=rms)
    torch.testing.assert_close(got.scale.cpu(), want.scale, rtol=1e-5, atol=0)
    v = reference.preprocess(x, ln_eps=eps, shift=shift, scale=scale, rms_norm=rms)
    # a zero point may differ only where qmin − lo/s sits on a tie; such rows are left out of the code check
    zp_diff = got.zero_point.cpu() != want.zero_point
    if zp_diff.any():
        t = (spec.qmin - v.amin(1).clamp(max=0) / want.scale)[zp_diff]
        assert ((t.frac().abs() - 0.5).abs() < 1e-3).all() and zp_diff.sum() <= 2
    diff = (got.codes.cpu().int() - want.codes.int())[~zp_diff]
    assert diff.abs().max() <= 1
    frac = (v / want.scale[:, None]).frac().abs()[~zp_diff]
    assert ((frac[diff != 0] - 0.5).abs() < 1e-3).all(), "a code differs away from a rounding tie"
    assert (diff != 0).float().mean() < 1e-3
    assert torch.equal(got.row_sum.cpu(), got.codes.cpu().sum(1, dtype=torch.int32))


def test_quantize_activation_nonfinite_rows(cgen):
    x = torch.randn(6, 40, generator=cgen)
    x[1, 3], x[4, 0] = float("nan"), float("inf")
    spec = QuantSpec.activation(4)
    want = reference.quantize_activation(x, spec)
    got = cb.quantize_activation(x.cuda(), spec)
    assert torch.equal(got.codes.cpu(), want.codes)
    torch.testing.assert_close(got.scale.cpu(), want.scale, rtol=0, atol=0, equal_nan=True)  # finite ones too
    assert torch.equal(got.zero_point.cpu(), want.zero_point) and torch.equal(got.row_sum.cpu(), want.row_sum)


@pytest.mark.parametrize("m,k,blocks,rank", [(33, 70, 4, 1), (300, 1152, 32, 1), (17, 130, 3, 5), (8, 64, 1, 32)])
def test_monarch_stage1(m, k, blocks, rank, cgen):
    x = torch.randn(m, k, generator=cgen)
    s = MonarchShape(n=k, k=k, blocks=blocks, rank=rank)
    w1 = torch.randn(s.w1_shape, generator=cgen) * 0.1
    shift, scale = torch.randn(1, k, generator=cgen), torch.randn(1, k, generator=cgen) * 0.1
    got = cb.quantize_activation(x.cuda(), QuantSpec.activation(8), ln_eps=1e-6, shift=shift.cuda(),
                                 scale=scale.cuda(), monarch_w1=w1.cuda())
    assert got.z.shape == (m, blocks, blocks * rank) and got.z.dtype == torch.bfloat16
    v = reference.preprocess(x, ln_eps=1e-6, shift=shift, scale=scale)
    want, tol = stage1_expect(v, w1)
    err = (got.z.cpu().double() - want).abs()
    assert (err <= tol).all(), f"max excess {(err - tol).max().item():.3g}"
    base = cb._Z_BASE[got.z]  # the padded buffer the GEMM reads: zero outside (M, b, b·r)
    assert base.shape[0] % 128 == 0 and base.shape[2] % 16 == 0
    pad = base.clone()
    pad[:m, :, :blocks * rank] = 0
    assert not pad.any()


# ---- packed GEMM: integer part -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("w_bits,a_bits", list(itertools.product(W_BITS, A_BITS)))
@pytest.mark.parametrize("m,n,k,splits", [(1, 1, 1, 0), (37, 45, 203, 0), (130, 300, 1000, 3), (257, 513, 129, 2)])
def test_packed_linear_integer_exact(arch, w_bits, a_bits, m, n, k, splits, cgen):
    """Every bit-width pair, odd shapes, with and without split-K: Σ_k (qa − za)(qw − zw) exactly."""
    act = _act(m, k, a_bits, cgen, symmetric=a_bits == 3)
    w = _weight(n, k, w_bits, cgen, symmetric=w_bits == 2)
    out = _poisoned(m, n, torch.int32)
    cb.packed_linear(act, w, out_dtype=torch.int32, arch=arch, splits=splits, out=out)
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), corr_exact(act, w))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("w_bits", W_BITS)
def test_packed_linear_dit_shape_exact(arch, w_bits, cgen):
    """A DiT-XL shape with more tiles than SMs (the persistent scheduler wraps) and extreme codes."""
    m, n, k = 2048, 4608, 1152
    act = _act(m, k, 8, cgen)
    act = QuantizedActivation(act.codes.clone(), act.scale, act.zero_point, act.row_sum, 8)
    act.codes[:7] = -128  # extreme rows; their row sums must follow
    act = QuantizedActivation(act.codes, act.scale, act.zero_point, act.codes.sum(1, dtype=torch.int32), 8)
    w = _weight(n, k, w_bits, cgen)
    out = _poisoned(m, n, torch.int32)  # not a recycled block holding the previous case's (correct) result
    cb.packed_linear(act, w, out_dtype=torch.int32, arch=arch, out=out)
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), corr_exact(act, w))


# ---- packed GEMM: fused epilogue ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("m,n,k", [(37, 300, 203), (260, 1152, 1152)])
def test_packed_linear_float_bit_exact_without_branch(arch, m, n, k, cgen):
    """(float(corr)·sa)·sw + bias is the oracle's float32 arithmetic in the oracle's order: equal bit for bit."""
    act = _act(m, k, 4, cgen)
    w = _weight(n, k, 4, cgen)
    bias = torch.randn(n, generator=cgen)
    out = _poisoned(m, n, torch.float32)
    cb.packed_linear(act, w, bias=bias.cuda(), out_dtype=torch.float32, arch=arch, out=out)
    want = reference_linear(act, w, bias=bias, out_dtype=torch.float32)
    assert torch.equal(out.cpu(), want)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("blocks,rank", [(1, 32), (4, 1), (32, 1), (3, 5)])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("splits", [0, 2])
def test_packed_linear_branch_bias_gelu(arch, blocks, rank, gelu, splits, cgen):
    m, n, k = 150, 300, 260
    s = MonarchShape(n=n, k=k, blocks=blocks, rank=rank)
    w1, w2 = torch.randn(s.w1_shape, generator=cgen) * 0.05, torch.randn(s.w2_shape, generator=cgen) * 0.05
    x = torch.randn(m, k, generator=cgen)
    act = cb.quantize_activation(x.cuda(), QuantSpec.activation(4), monarch_w1=w1.cuda())
    w = _weight(n, k, 3, cgen)
    bias = torch.randn(n, generator=cgen) * 0.1
    out = _poisoned(m, n, torch.float32)
    cb.packed_linear(act, w, bias=bias.cuda(), monarch_w2=w2.cuda(), gelu=gelu, out_dtype=torch.float32,
                     arch=arch, splits=splits, out=out)
    want, tol = epilogue_expect(act, w, bias=bias, w2=w2, gelu=gelu)
    err = (out.cpu().double() - want).abs()
    assert (err <= tol).all(), f"max excess {(err - tol).max().item():.3g}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_packed_linear_half_outputs(arch, out_dtype, cgen):
    m, n, k = 70, 260, 300
    act, w = _act(m, k, 8, cgen), _weight(n, k, 4, cgen)
    out = _poisoned(m, n, out_dtype)
    cb.packed_linear(act, w, out_dtype=out_dtype, out=out, arch=arch)
    want = reference_linear(act, w, out_dtype=torch.float32).to(out_dtype)
    assert torch.equal(out.cpu(), want)  # the float32 values are bit-exact, so their rounding is too


def test_packed_linear_out_spec(cgen):
    """Next-layer quantization: the bf16 output quantized per token (GEMM, then the row kernel): exact, since
    the bf16 rows are the oracle's float32 rows rounded and the row kernel is bit-exact without LayerNorm."""
    m, n, k = 90, 520, 384
    act, w = _act(m, k, 8, cgen), _weight(n, k, 4, cgen)
    bias = torch.randn(n, generator=cgen)
    got = cb.packed_linear(act, w, bias=bias.cuda(), out_spec=QuantSpec.activation(4))  # no GELU: tanhf differs
    y = reference_linear(act, w, bias=bias, out_dtype=torch.float32).to(torch.bfloat16)   # from torch's in the ulp
    want = reference.quantize_activation(y, QuantSpec.activation(4))
    assert torch.equal(got.codes.cpu(), want.codes) and torch.equal(got.scale.cpu(), want.scale)
    assert torch.equal(got.zero_point.cpu(), want.zero_point) and torch.equal(got.row_sum.cpu(), want.row_sum)


# ---- packed GEMM: fused gated residual --------------------------------------------------------------------------

# unit roundoff of each float output type: the bound of one rounding to it, relative to the value
_UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}
FLOAT_OUTS = [torch.bfloat16, torch.float16, torch.float32]
RESIDUAL_CASES = [  # (M, N, G), G None: ungated
    (3 * 37, 201, 3),  # odd N: no 16-byte rows in any dtype (element path); 37 tokens per gate row
    (3 * 37, 201, 1),
    (150, 520, 3),     # 16-byte rows (vector path), 3 channel tiles (the last ragged), 2 token tiles; gate rows
    (150, 520, None),  # of 50 tokens straddle the 128-token tile edge
]


def _residual_operands(m, n, groups, dtype, gen):
    res = (torch.randn(m, n, generator=gen) * 2).to(dtype).cuda()
    gate = None if groups is None else (torch.randn(groups, n, generator=gen) * 0.7).cuda()
    return res, gate


def _cpu(t):
    return None if t is None else t.cpu()


def _gated_residual_expect(y, tol, res, gate, dtype):
    """The oracle's gated residual from the expected float64 layer output ``y`` (± ``tol``, before the output
    rounding): (expected float64, tolerance). The kernel's y is rounded to ``dtype``, multiplied and added in
    float32, and the sum rounded to ``dtype``: one rounding of each kind on top of y's own error."""
    u = _UNIT_ROUNDOFF[dtype]
    g = torch.ones(1, y.shape[1], dtype=torch.float64) if gate is None else gate.cpu().double()
    g = g.repeat_interleave(y.shape[0] // g.shape[0], 0)
    want = res.cpu().double() + g * y
    tol = g.abs() * (tol + u * (y.abs() + tol)) + 2 * u * (want.abs() + (g * y).abs()) + 1e-7
    return want, tol


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("out_dtype", FLOAT_OUTS)
@pytest.mark.parametrize("m,n,groups", RESIDUAL_CASES)
@pytest.mark.parametrize("splits", [0, 3])
def test_packed_linear_gated_residual(arch, out_dtype, m, n, groups, splits, cgen):
    """With the whole epilogue (branch, bias, GELU) and split-K: the fused output is bit for bit
    ``reference.gated_residual`` of the kernel's own unfused output (the fusion adds exactly the oracle's two
    float32 operations to the stored values), within the epilogue's tolerance of the oracle, and the residual is
    only read."""
    k = 400  # 4 K tiles: splits=3 really splits
    s = MonarchShape(n=n, k=k, blocks=4, rank=2)
    w1, w2 = torch.randn(s.w1_shape, generator=cgen) * 0.05, torch.randn(s.w2_shape, generator=cgen) * 0.05
    x = torch.randn(m, k, generator=cgen)
    act = cb.quantize_activation(x.cuda(), QuantSpec.activation(4), monarch_w1=w1.cuda())
    w = _weight(n, k, 4, cgen)
    bias = torch.randn(n, generator=cgen) * 0.1
    res, gate = _residual_operands(m, n, groups, out_dtype, cgen)
    res_before = res.clone()
    kw = dict(bias=bias.cuda(), monarch_w2=w2.cuda(), gelu=True, out_dtype=out_dtype, arch=arch, splits=splits)
    y = _poisoned(m, n, out_dtype)
    cb.packed_linear(act, w, out=y, **kw)
    out = _poisoned(m, n, out_dtype)
    cb.packed_linear(act, w, residual=res, gate=gate, out=out, **kw)
    torch.cuda.synchronize()
    assert torch.equal(res, res_before)
    assert torch.equal(out.cpu(), reference.gated_residual(y.cpu(), res.cpu(), _cpu(gate)))  # NaN poison fails
    want, tol = _gated_residual_expect(*epilogue_expect(act, w, bias=bias, w2=w2, gelu=True), res, gate, out_dtype)
    err = (out.cpu().double() - want).abs()
    assert (err <= tol).all(), f"max excess {(err - tol).max().item():.3g}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("out_dtype", FLOAT_OUTS)
@pytest.mark.parametrize("groups", [None, 1, 3, 3 * 37])   # (111 = M: a gate row per token)
def test_packed_linear_gated_residual_oracle_bit_exact(arch, out_dtype, groups, cgen):
    """Without branch and GELU the layer output is the oracle's float32 bit for bit, so the fused residual is
    ``reference.packed_linear(..., residual=, gate=)`` bit for bit (N=300: element path for 2-byte outputs,
    vector path for float32)."""
    m, n, k = 3 * 37, 300, 203
    act, w = _act(m, k, 4, cgen), _weight(n, k, 4, cgen)
    bias = torch.randn(n, generator=cgen)
    res, gate = _residual_operands(m, n, groups, out_dtype, cgen)
    out = _poisoned(m, n, out_dtype)
    cb.packed_linear(act, w, bias=bias.cuda(), out_dtype=out_dtype, residual=res, gate=gate, arch=arch, out=out)
    want = reference_linear(act, w, bias=bias, out_dtype=out_dtype, residual=res, gate=gate)
    assert torch.equal(out.cpu(), want)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shifted", ["residual", "gate"])
def test_gated_residual_unaligned_operands(arch, out_dtype, shifted, cgen):
    """Rows of 16-byte multiples, but the residual or the gate starts off a 16-byte boundary (a contiguous view at
    an offset): the kernel must take its element path, with the same result."""
    m, n, k = 150, 520, 260
    act, w = _act(m, k, 8, cgen), _weight(n, k, 4, cgen)
    res, gate = _residual_operands(m, n, 3, out_dtype, cgen)
    y = cb.packed_linear(act, w, out_dtype=out_dtype, arch=arch)
    want = reference.gated_residual(y.cpu(), res.cpu(), gate.cpu())

    def shifted_copy(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        v = buf[1:].view(t.shape)
        v.copy_(t)
        assert v.is_contiguous() and v.data_ptr() % 16
        return v

    if shifted == "residual":
        res = shifted_copy(res)
    else:
        gate = shifted_copy(gate)
    got = cb.packed_linear(act, w, out_dtype=out_dtype, residual=res, gate=gate, arch=arch)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("arch", ARCHS)
def test_gated_residual_in_place(arch, cgen):
    """``out=residual``: each element is read, then written, by the same thread, so in place equals out of place;
    an output that overlaps the residual at an offset is refused."""
    m, n, k = 150, 520, 260
    act, w = _act(m, k, 8, cgen), _weight(n, k, 4, cgen)
    res, gate = _residual_operands(m, n, 3, torch.bfloat16, cgen)
    want = cb.packed_linear(act, w, residual=res, gate=gate, arch=arch, splits=2)
    buf = res.clone()
    got = cb.packed_linear(act, w, residual=buf, gate=gate, arch=arch, splits=2, out=buf)
    assert got is buf and torch.equal(buf, want)
    big = torch.zeros(m * n + n, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="partly overlaps out"):
        cb.packed_linear(act, w, residual=big[:m * n].view(m, n), out=big[n:].view(m, n), arch=arch)


def test_gated_residual_refusals(cgen):
    m, n, k = 12, 40, 64
    act, w = _act(m, k, 8, cgen), _weight(n, k, 4, cgen)
    res, gate = _residual_operands(m, n, 3, torch.bfloat16, cgen)
    with pytest.raises(ValueError, match="int32 output is the bare corrected accumulator"):
        cb.packed_linear(act, w, out_dtype=torch.int32, residual=res.int())
    with pytest.raises(ValueError, match="needs residual"):
        cb.packed_linear(act, w, gate=gate)
    with pytest.raises(ValueError, match="residual and out_spec"):
        cb.packed_linear(act, w, residual=res, out_spec=QuantSpec.activation(8))
    with pytest.raises(ValueError, match="residual must be a contiguous"):
        cb.packed_linear(act, w, residual=res.float())  # not the output's dtype
    with pytest.raises(ValueError, match="residual must be a contiguous"):
        cb.packed_linear(act, w, residual=res.t().contiguous().t())
    with pytest.raises(ValueError, match="gate must be a contiguous float32"):
        cb.packed_linear(act, w, residual=res, gate=torch.ones(5, n, device="cuda"))  # 5 does not divide 12
    with pytest.raises(ValueError, match="gate must be a contiguous float32"):
        cb.packed_linear(act, w, residual=res, gate=gate.half())
    with pytest.raises(ValueError, match="every operand must be on"):
        cb.packed_linear(act, w, residual=res.cpu())


def test_raw_binding_checks_residual_arguments(cgen, monkeypatch):
    """The C++ launcher guards the raw binding itself (gate without residual, gate_rows not dividing M, int32
    output, a shifted overlap), and a caller that predates the residual keywords still runs (defaults 0)."""
    m, n, k = 3 * 37, 200, 160
    act, w = _act(m, k, 8, cgen), _weight(n, k, 4, cgen)
    res, gate = _residual_operands(m, n, 3, torch.bfloat16, cgen)
    real, seen = core.load(), {}

    class Recorder:  # captures the binding's keywords, launches nothing
        def __getattr__(self, name):
            return getattr(real, name)

        def cuda_packed_linear(self, **kw):
            seen.update(kw)

    out = _poisoned(m, n, torch.bfloat16)
    with monkeypatch.context() as mp:
        mp.setattr(cb.core, "load", lambda: Recorder())
        cb.packed_linear(act, w, residual=res, gate=gate, out=out, splits=1)  # no workspace to outlive the call
    assert seen["gate_rows"] == 37 and seen["residual"] == res.data_ptr() and seen["gate"] == gate.data_ptr()
    real.cuda_packed_linear(**seen)
    y = cb.packed_linear(act, w)
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), reference.gated_residual(y.cpu(), res.cpu(), gate.cpu()))
    old = {key: v for key, v in seen.items() if key not in ("residual", "gate", "gate_rows")}
    out.fill_(float("nan"))
    real.cuda_packed_linear(**old)
    torch.cuda.synchronize()
    assert torch.equal(out, y)
    for change, match in (({"residual": 0}, "needs residual|no residual"), ({"gate_rows": 0}, "gate_rows"),
                          ({"gate_rows": 36}, "gate_rows"), ({"out_kind": 3}, "int32 output"),
                          ({"residual": seen["out"] + 2}, "partly overlaps out")):
        with pytest.raises(RuntimeError, match=match):
            real.cuda_packed_linear(**{**seen, **change})


@pytest.mark.parametrize("groups", [None, 2])
def test_gated_residual_through_dispatch_and_custom_op(groups, cgen):
    """``ops.packed_linear(residual=, gate=)`` runs the CUDA backend's fused store (equal to the backend call), and
    the custom op with the residual passes opcheck (schema: inputs not mutated; fake implementation)."""
    x, w, w1, w2, bias = _layer(cgen)
    res, gate = _residual_operands(x.shape[0], w.n, groups, torch.bfloat16, cgen)
    a = quantize_activation(x, QuantSpec.activation(8), ln_eps=1e-6, monarch_w1=w1)
    res_before = res.clone()
    got = packed_linear(a, w, bias=bias, monarch_w2=w2, gelu=True, residual=res, gate=gate)
    want = cb.packed_linear(a, w, bias=bias, monarch_w2=w2, gelu=True, residual=res, gate=gate)
    assert torch.equal(got, want) and torch.equal(res, res_before)
    ops = cb.cuda_layout.cuda_operands(w)
    torch.library.opcheck(torch.ops.treeq.cuda_packed_linear.default,
                          (a.codes, a.scale, a.zero_point, a.row_sum, ops.words, ops.row_chan, ops.scale, ops.uzp,
                           ops.ucs, bias, None, None, 4, w.n, w.k, True, 0, 0, 0, res, gate))


# ---- the ops through dispatch, custom ops, graphs, compile ------------------------------------------------------

def _layer(gen, m=64, n=192, k=160, blocks=4):
    s = MonarchShape(n=n, k=k, blocks=blocks, rank=1)
    x = torch.randn(m, k, generator=gen).cuda().to(torch.bfloat16)
    w = _weight(n, k, 4, gen)
    w1 = (torch.randn(s.w1_shape, generator=gen) * 0.05).cuda()
    w2 = (torch.randn(s.w2_shape, generator=gen) * 0.05).cuda()
    bias = torch.randn(n, generator=gen).cuda()
    return x, w, w1, w2, bias


def _forward(x, w, w1, w2, bias):
    a = quantize_activation(x, QuantSpec.activation(8), ln_eps=1e-6, monarch_w1=w1)
    return packed_linear(a, w, bias=bias, monarch_w2=w2, gelu=True)


def test_dispatch_picks_cuda_and_matches_reference(cgen):
    x, w, w1, w2, bias = _layer(cgen)
    a = quantize_activation(x, QuantSpec.activation(8), ln_eps=1e-6, monarch_w1=w1)
    assert a.z.dtype == torch.bfloat16 and a.codes.is_cuda  # the cuda backend ran
    y = packed_linear(a, w, bias=bias, monarch_w2=w2, gelu=True)
    want = reference_linear(a, w, bias=bias, monarch_w2=w2, gelu=True, out_dtype=torch.float32)
    torch.testing.assert_close(y.cpu().float(), want, rtol=2e-2, atol=2e-2)  # bf16 output and bf16 branch


def test_runtime_frag_layout_runs_the_kernels_with_one_copy(cgen):
    """A model quantized on the GPU keeps only the fragment layout of its kernel-run layers (layout "auto"): the
    same output bit for bit as layout v1 (the kernels read the same operands), and the v1 model's resident bytes
    after a forward (v1 + its cached fragment copy) drop by the v1 codes."""
    import torch.nn as nn

    from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan
    from treeq_engine.runtime import quantize, treeq_layers

    def net():
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(1152, 1024), nn.GELU(), nn.Linear(1024, 520)).cuda().bfloat16()

    plan = QuantPlan({"0": LayerConfig(4, 8), "2": LayerConfig(3, 4, branch=BranchConfig("monarch", 8, 1))})
    x = torch.randn(300, 1152, generator=cgen).cuda().bfloat16()
    with torch.no_grad():
        quantize(net(), plan, layout="v1")(x)   # first use: anything allocated once per process, outside the count
        base = torch.cuda.memory_allocated()
        v1 = quantize(net(), plan, layout="v1")
        want = v1(x)
        v1_bytes = torch.cuda.memory_allocated() - base - want.nbytes
        codes = sum(m.w_packed.nbytes for m in treeq_layers(v1).values())
        del v1
        base = torch.cuda.memory_allocated()   # (want still allocated: counted in base)
        frag = quantize(net(), plan)
        assert {m.layout for m in treeq_layers(frag).values()} == {"frag"}
        got = frag(x)
        frag_bytes = torch.cuda.memory_allocated() - base - got.nbytes
    assert torch.equal(got, want)
    # the fp model's weights are freed by quantize in both; what is left differs by the v1 codes (± a few KB of
    # per-channel vectors and allocator rounding)
    assert abs((v1_bytes - frag_bytes) - codes) < 0.05 * codes, (v1_bytes, frag_bytes, codes)


def test_bf16_branch_factors_equal_float32(cgen):
    """The runtime stores a 16-bit model's Monarch factors in bf16; the kernels round float32 factors to bf16
    themselves, so both storages give bit-identical results (and bf16 factors are used without a copy)."""
    x, w, _, _, bias = _layer(cgen)
    s = MonarchShape(n=192, k=160, blocks=4, rank=4)  # b·r = 16: no padding, so the kernel reads w2 itself
    w1 = (torch.randn(s.w1_shape, generator=cgen) * 0.05).cuda()
    w2 = (torch.randn(s.w2_shape, generator=cgen) * 0.05).cuda()
    y32 = _forward(x, w, w1, w2, bias)
    w1h, w2h = w1.bfloat16(), w2.bfloat16()
    assert cb._bf16(w1h) is w1h and cb._w2_padded(w2h, 16) is w2h
    assert torch.equal(_forward(x, w, w1h, w2h, bias), y32)


def test_custom_ops_opcheck(cgen):
    x, w, w1, w2, bias = _layer(cgen)
    spec = QuantSpec.activation(4)
    torch.library.opcheck(torch.ops.treeq.cuda_quantize_activation.default,
                          (x, spec.bits, False, 1.0, 1e-6, None, None, cb._bf16(w1), 1))
    a = cb.quantize_activation(x, spec)
    ops = cb.cuda_layout.cuda_operands(w)
    torch.library.opcheck(torch.ops.treeq.cuda_packed_linear.default,
                          (a.codes, a.scale, a.zero_point, a.row_sum, ops.words, ops.row_chan, ops.scale, ops.uzp,
                           ops.ucs, bias, None, None, 4, w.n, w.k, True, 0, 0, 0))


def test_cuda_graph_replay(cgen):
    x, w, w1, w2, bias = _layer(cgen)
    y0 = _forward(x, w, w1, w2, bias)  # warm the weight caches outside the capture
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g):
        y = _forward(x, w, w1, w2, bias)
    torch.cuda.current_stream().wait_stream(s)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, y0)


@pytest.mark.parametrize("arch", ARCHS)
def test_split_k_under_cuda_graph(arch, cgen):
    """Split-K captured in a graph (its workspace from the graph's pool, the counters' memset a graph node) and
    replayed several times: the counters the last split resets must be ready for the next replay."""
    m, n, k = 130, 300, 1000
    act, w = _act(m, k, 4, cgen), _weight(n, k, 3, cgen)
    want = corr_exact(act, w)
    cb.packed_linear(act, w, out_dtype=torch.int32, arch=arch, splits=3)   # warm the weight caches
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g):
        y = cb.packed_linear(act, w, out_dtype=torch.int32, arch=arch, splits=3)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        y.fill_(-123456789)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y.cpu(), want)


def test_torch_compile(cgen):
    x, w, w1, w2, bias = _layer(cgen)
    ops = cb.cuda_layout.cuda_operands(w)

    def f(x):
        codes, s, zp, rs, _ = torch.ops.treeq.cuda_quantize_activation(x, 8, False, 1.0, 1e-6, None, None, None, 0)
        return torch.ops.treeq.cuda_packed_linear(codes, s, zp, rs, ops.words, ops.row_chan, ops.scale, ops.uzp,
                                                  ops.ucs, bias, None, None, 4, w.n, w.k, True, 0, 0, 0)

    want = f(x)
    got = torch.compile(f, fullgraph=True)(x)
    assert torch.equal(got, want)


# ---- the representative set for compute-sanitizer (tools/sanitize_cuda.sh) -------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("splits", [1, 3])
def test_sanitize_representative(arch, splits, cgen):
    """Small but complete: ragged M/N/K, split-K fix-up, Monarch branch, bias, GELU, bf16 out, 3- and 4-bit."""
    m, n, k = 200, 270, 400
    s = MonarchShape(n=n, k=k, blocks=4, rank=2)
    w1, w2 = torch.randn(s.w1_shape, generator=cgen) * 0.05, torch.randn(s.w2_shape, generator=cgen) * 0.05
    x = torch.randn(m, k, generator=cgen).cuda()
    for w_bits in (3, 4):
        act = cb.quantize_activation(x, QuantSpec.activation(4), ln_eps=1e-6, monarch_w1=w1.cuda())
        w = _weight(n, k, w_bits, cgen)
        y = cb.packed_linear(act, w, bias=torch.randn(n, generator=cgen).cuda(), monarch_w2=w2.cuda(), gelu=True,
                             arch=arch, splits=splits)
        i32 = cb.packed_linear(act, w, out_dtype=torch.int32, arch=arch, splits=splits)
        torch.cuda.synchronize()
        assert torch.isfinite(y).all()
        assert torch.equal(i32.cpu(), corr_exact(act, w))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n", [270, 264])
def test_sanitize_gated_residual(arch, n, cgen):
    """The gated residual's loads under compute-sanitizer: N = 270 stores element by element (540-byte bf16
    rows), N = 264 with 16-byte vectors (residual and gate chunks too); gate groups of 50 tokens cross the
    128-token tile edge; split-K's last unit stores."""
    m, k = 200, 400
    act = cb.quantize_activation(torch.randn(m, k, generator=cgen).cuda(), QuantSpec.activation(8))
    w = _weight(n, k, 4, cgen)
    res = torch.randn(m, n, generator=cgen).bfloat16().cuda()
    gate = torch.randn(4, n, generator=cgen).cuda()
    for splits in (1, 3):
        y = cb.packed_linear(act, w, arch=arch, splits=splits)
        fused = cb.packed_linear(act, w, residual=res, gate=gate, arch=arch, splits=splits)
        torch.cuda.synchronize()
        assert torch.equal(fused.cpu(), reference.gated_residual(y.cpu(), res.cpu(), gate.cpu()))
