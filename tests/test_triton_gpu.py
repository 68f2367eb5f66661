"""Both Triton GEMMs at full DiT-XL/2 size against the oracle, on a GPU (skipped without one).

Integer parts exactly (unit scales turn the float32 output into ``float32(corr)`` of the zero-point-corrected
accumulator, compared bit for bit with the oracle's); the float epilogue within the stated tolerance (bf16
Monarch operands: relative 1e-2 of the output scale; at full size, the elementwise bound of ``_expect_epilogue``).
Launcher outputs start as NaN (``_poison_outputs``), so an element a kernel skips cannot pass by reusing a correct
result that the caching allocator hands back from the previous case.
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

triton = pytest.importorskip("triton")

from treeq_engine.branches import MonarchShape, monarch  # noqa: E402
from treeq_engine.format import QuantSpec, int_gemm, zero_point_correction  # noqa: E402
from treeq_engine.kernels import PackedWeight, packed_linear, quantize_activation, reference  # noqa: E402
from treeq_engine.kernels.triton import gemm, gluon_gemm  # noqa: E402

DIT_SHAPES = [(1152, 3456), (1152, 1152), (1152, 4608), (4608, 1152), (1152, 6912)]


@pytest.fixture(autouse=True)
def _heuristic_configs(monkeypatch, request):
    """Correctness does not need the autotuner's timing runs (dozens of compiles and benchmarks, most of this
    file's GPU time); the tests marked ``autotune`` keep it, so the tuned path runs too."""
    if "autotune" not in request.keywords:
        monkeypatch.setenv("TREEQ_TRITON_AUTOTUNE", "0")


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _operands(m, n, k, wb, ab, branch, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.05
    pw = PackedWeight.from_float(w, QuantSpec.weight(wb))
    w1 = w2 = None
    if branch:
        s = MonarchShape.matching_lowrank(n, k)  # b = 32, r = 1: the default GMB size
        w1, w2 = torch.randn(s.w1_shape, generator=g) * 0.05, torch.randn(s.w2_shape, generator=g) * 0.05
    bias = torch.randn(n, generator=g)
    return x, pw, w1, w2, bias


def _poison_outputs(monkeypatch):
    """Every Triton launcher's float output starts as NaN (``runtime.empty`` is their one allocator)."""
    from treeq_engine.kernels.triton import runtime

    def poisoned(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if dtype.is_floating_point else t

    monkeypatch.setattr(runtime, "empty", poisoned)


def _expect_epilogue(act, pw, bias, w2, gelu):
    """The oracle's float32 output (CPU ``act``, ``pw``) and an elementwise bound on a compiled kernel's distance
    from it. Before GELU: the float32 epilogue (scales, bias, the branch's float32 accumulation; the compiler may
    contract a multiply and an add into an FMA) is off by a few float32 ulps of values ≤ ~10, bounded by
    1e-5·(|y| + 1); the kernels multiply the branch in bf16 (z and w2 each rounded by ≤ 2⁻⁸ relative, so each
    product by ≤ 2⁻⁷), bounded by twice that: 2⁻⁶·Σ|w2||z|. GELU's slope is ≤ 1.13, and the kernels' exp-based
    tanh adds a few 1e-7 relative: 1e-5·(|gelu| + 1)."""
    lin = reference.packed_linear(act, pw, bias=bias, monarch_w2=w2, out_dtype=torch.float32)
    ref = F.gelu(lin, approximate="tanh") if gelu else lin   # reference.packed_linear(..., gelu=True), bit for bit
    tol = 1e-5 * (lin.abs() + 1)
    if w2 is not None:
        tol = tol + 2.0 ** -6 * monarch.stage2(act.z.abs(), w2.float().abs(), pw.n)
    if gelu:
        tol = 1.2 * tol + 1e-5 * (ref.abs() + 1)
    return ref, tol


def _assert_within(y, ref, tol):
    err = (y.float() - ref).abs()
    assert not bool(y.isnan().any()), "an output element was never written (still the NaN poison)"
    assert bool((err <= tol).all()), f"max excess {float((err - tol).max()):.3g} (max error {float(err.max()):.3g})"


def _exact_corr(act, pw, k):
    return zero_point_correction(int_gemm(act.codes, pw.codes()), k, act.zero_point, act.row_sum, pw.zero_point,
                                 pw.col_sum).float()


IMPLS = ["plain", pytest.param("gluon", marks=pytest.mark.skipif(not _sm90(), reason="Gluon kernel needs sm_90"))]


def _gemm(impl, act, pw, **kw):
    fn = gemm.packed_gemm if impl == "plain" else gluon_gemm.packed_gemm
    return fn(act.codes, act.scale, act.zero_point, act.row_sum, pw.packed, pw.bits, pw.n, pw.scale, pw.zero_point,
              pw.col_sum, **kw)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("wb,ab", [(8, 8), (4, 8), (4, 4), (2, 8), (3, 4)])
@pytest.mark.parametrize("m,n,k", [(2053, 3456, 1152), (200, 1152, 4608)])  # the second runs split-K
def test_integer_part_exact_full_size(impl, wb, ab, m, n, k, monkeypatch):
    if impl == "gluon" and wb not in gluon_gemm.GLUON_BITS:
        pytest.skip(f"{wb}-bit weights run on the plain kernel")
    _poison_outputs(monkeypatch)
    x, pw, _, _, _ = _operands(m, n, k, wb, ab, False)
    act = reference.quantize_activation(x, QuantSpec.activation(ab))
    ref = _exact_corr(act, pw, k)
    act1 = dataclasses.replace(act, scale=torch.ones_like(act.scale))
    pw1 = dataclasses.replace(pw, scale=torch.ones_like(pw.scale))
    dev = torch.device("cuda")
    a_d = type(act1)(*(t.to(dev) if torch.is_tensor(t) else t for t in dataclasses.astuple(act1)))
    y = _gemm(impl, a_d, pw1.to(dev), out_dtype=torch.float32)
    assert torch.equal(y.cpu(), ref)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k,n", DIT_SHAPES)
@pytest.mark.parametrize("m,branch", [(256, True), (2048, True), (256, False)])
def test_fused_epilogue_full_size(impl, k, n, m, branch, monkeypatch):
    """Scales, Monarch stage 2 (b = 32), bias and GELU, elementwise within ``_expect_epilogue``'s bound: without
    the branch a few float32 ulps; with it, the bf16 rounding of the branch's operands (a branch off by a
    fraction of itself no longer hides under 1e-2 of the largest output)."""
    _poison_outputs(monkeypatch)
    x, pw, w1, w2, bias = _operands(m, n, k, 4, 8, branch)
    spec = QuantSpec.activation(8)
    act = reference.quantize_activation(x, spec, monarch_w1=w1)
    ref = reference.packed_linear(act, pw, bias=bias, monarch_w2=w2, gelu=True, out_dtype=torch.float32)
    dev = torch.device("cuda")
    a_d = type(act)(*(t.to(dev) if torch.is_tensor(t) else t for t in dataclasses.astuple(act)))
    kw = dict(z=a_d.z, w2=w2.to(dev)) if branch else {}
    y = _gemm(impl, a_d, pw.to(dev), bias=bias.to(dev), gelu=True, out_dtype=torch.float32, **kw)
    scale = float(ref.abs().max())
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-2, atol=1e-2 * scale)
    want, tol = _expect_epilogue(act, pw, bias, w2, True)
    assert torch.equal(want, ref)
    _assert_within(y.cpu(), want, tol)


def test_dispatch_and_act_quant_full_size():
    """The public ops with the Triton backend (the CUDA core, when built, outranks it in automatic dispatch):
    the act-quant kernel with LayerNorm, modulate and stage 1, then Gluon on sm_90 (plain elsewhere)."""
    m, n, k = 1024, 4608, 1152
    x, pw, w1, w2, bias = _operands(m, n, k, 4, 4, True, seed=1)
    g = torch.Generator().manual_seed(2)
    shift, scale = torch.randn(16, k, generator=g), torch.randn(16, k, generator=g) * 0.1
    spec = QuantSpec.activation(4)
    dev = torch.device("cuda")
    act = quantize_activation(x.to(dev, torch.bfloat16), spec, ln_eps=1e-6, shift=shift.to(dev),
                              scale=scale.to(dev), monarch_w1=w1.to(dev), backend="triton")
    ref_act = reference.quantize_activation(x.to(torch.bfloat16), spec, ln_eps=1e-6, shift=shift, scale=scale,
                                            monarch_w1=w1)
    assert (act.codes.cpu().int() - ref_act.codes.int()).abs().max() <= 1
    assert (act.codes.cpu() != ref_act.codes).float().mean() < 1e-4  # only rounding ties may move
    torch.testing.assert_close(act.z.float().cpu(), ref_act.z, rtol=2e-2, atol=2e-2)
    y = packed_linear(act, pw.to(dev), bias=bias.to(dev), monarch_w2=w2.to(dev), out_dtype=torch.float32,
                      backend="triton")
    ref = reference.packed_linear(ref_act, pw, bias=bias, monarch_w2=w2, out_dtype=torch.float32)
    torch.testing.assert_close(y.cpu(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


@pytest.mark.autotune
@pytest.mark.parametrize("impl", IMPLS)
def test_cuda_graph_replay_matches_eager(impl):
    """Split-K workspaces and cached fragment weights survive capture: replays equal the eager result."""
    m, n, k = 256, 1152, 1152
    x, pw, _, _, bias = _operands(m, n, k, 4, 8, False)
    dev = torch.device("cuda")
    act = quantize_activation(x.to(dev), QuantSpec.activation(8))
    pwd = pw.to(dev)
    kw = dict(bias=bias.to(dev), out_dtype=torch.bfloat16)
    eager = _gemm(impl, act, pwd, **kw)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            _gemm(impl, act, pwd, **kw)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _gemm(impl, act, pwd, **kw)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


def test_gluon_probe_is_the_raw_accumulator():
    if not _sm90():
        pytest.skip("Gluon kernel needs sm_90")
    m, n, k = 1024, 1152, 1152
    x, pw, _, _, _ = _operands(m, n, k, 4, 8, False)
    act = reference.quantize_activation(x, QuantSpec.activation(8))
    dev = torch.device("cuda")
    a_d = type(act)(*(t.to(dev) if torch.is_tensor(t) else t for t in dataclasses.astuple(act)))
    y = _gemm("gluon", a_d, pw.to(dev), epilogue=False)
    # The probe stores bf16(acc) whatever out_dtype says (gluon_gemm.packed_gemm allocates bf16 when
    # epilogue=False), so a float64 comparison is not available: the exact accumulator (float64, exact) rounded
    # once to bf16 must match bit for bit. With these random codes |acc| reaches ~3e5, where one bf16 ulp is
    # 2048, so this alone would hide an accumulator off by less than half an ulp; the sparse case below cannot.
    u = pw.codes().double() + 8
    ref = (act.codes.double() @ u.T).to(torch.bfloat16)
    assert torch.equal(y.cpu(), ref)
    # Sparse codes: 16 entries of ±1 per row, so |acc| ≤ 16·15 = 240 < 2⁸ and every accumulator value is an
    # integer bf16 holds exactly: bf16 equality is integer equality (one lost K-step or product shows).
    g = torch.Generator().manual_seed(21)
    pos = torch.rand(m, k, generator=g).argsort(dim=1)[:, :16]
    signs = (torch.randint(0, 2, (m, 16), generator=g) * 2 - 1).to(torch.int8)
    sparse = torch.zeros(m, k, dtype=torch.int8).scatter_(1, pos, signs)
    ys = _gemm("gluon", dataclasses.replace(a_d, codes=sparse.to(dev)), pw.to(dev), epilogue=False)
    exact = sparse.double() @ u.T
    assert float(exact.abs().max()) <= 240
    assert torch.equal(ys.cpu().double(), exact)


def _to_cuda(act):
    dev = torch.device("cuda")
    return type(act)(*(t.to(dev) if torch.is_tensor(t) else t for t in dataclasses.astuple(act)))


@pytest.mark.skipif(not _sm90(), reason="Gluon kernel needs sm_90")
@pytest.mark.parametrize("m,n,k,wb,split", [(200, 1000, 1040, 4, None), (77, 136, 144, 2, None),
                                            (300, 520, 1168, 8, None), (130, 1000, 1040, 4, 3)])
def test_gluon_ragged_k_and_n_exact(m, n, k, wb, split):
    """The Gluon edges the DiT shapes never reach: a partial last K-step (TMA zero fill, padded fragments), a
    partial channel tile, tiny N; with and without split-K. Integer part exact."""
    x, pw, _, _, _ = _operands(m, n, k, wb, 8, False, seed=3)
    act = reference.quantize_activation(x, QuantSpec.activation(8))
    ref = _exact_corr(act, pw, k)
    act1 = dataclasses.replace(act, scale=torch.ones_like(act.scale))
    pw1 = dataclasses.replace(pw, scale=torch.ones_like(pw.scale))
    kw = dict(out_dtype=torch.float32) if split is None else dict(out_dtype=torch.float32, split=split)
    y = _gemm("gluon", _to_cuda(act1), pw1.to(torch.device("cuda")), **kw)
    assert torch.equal(y.cpu(), ref)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("wb", [2, 8])
def test_fused_epilogue_bf16_factors(impl, wb, monkeypatch):
    """Monarch factors stored in bf16 (a bf16 runtime model's), 2- and 8-bit weights with the branch."""
    _poison_outputs(monkeypatch)
    m, n, k = 512, 1152, 1152
    x, pw, w1, w2, bias = _operands(m, n, k, wb, 8, True, seed=4)
    w1, w2 = w1.bfloat16(), w2.bfloat16()
    act = reference.quantize_activation(x, QuantSpec.activation(8), monarch_w1=w1.float())
    ref = reference.packed_linear(act, pw, bias=bias, monarch_w2=w2.float(), gelu=True, out_dtype=torch.float32)
    a_d = _to_cuda(act)
    dev = torch.device("cuda")
    y = _gemm(impl, a_d, pw.to(dev), bias=bias.to(dev), z=a_d.z, w2=w2.to(dev), gelu=True, out_dtype=torch.float32)
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))


@pytest.mark.parametrize("impl", IMPLS)
def test_graph_survives_splitk_workspace_growth(impl):
    """A graph captured with a split-K GEMM keeps adding into its workspace after a bigger split-K call has
    grown the device's workspace: the outgrown one stays allocated, so replays still equal eager."""
    from treeq_engine.kernels.triton.autotune import GemmConfig

    dev = torch.device("cuda")
    for key in [key for key in gemm._WORKSPACE if key.type == "cuda"]:  # start from a small workspace
        gemm._RETIRED.append(gemm._WORKSPACE.pop(key))

    def run(act, pwd):
        if impl == "gluon":
            return _gemm(impl, act, pwd, split=3)
        return _gemm(impl, act, pwd, config=GemmConfig(64, 64, 64, split_k=3))

    x, pw, _, _, _ = _operands(64, 1152, 1152, 4, 8, False, seed=5)
    small = [quantize_activation(x.to(dev), QuantSpec.activation(8))]
    pw = pw.to(dev)
    eager = run(small[0], pw)
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run(small[0], pw)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        out = run(small[0], pw)
    before = next(v for key, v in gemm._WORKSPACE.items() if key.type == "cuda")[0].numel()
    xb, pwb, _, _, _ = _operands(512, 1152, 1152, 4, 8, False, seed=7)
    run(quantize_activation(xb.to(dev), QuantSpec.activation(8)), pwb.to(dev))  # grows the workspace
    after = next(v for key, v in gemm._WORKSPACE.items() if key.type == "cuda")[0].numel()
    assert after > before
    junk = torch.full((after,), 7, dtype=torch.int32, device=dev)  # reuse freed memory, if any was freed
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
    del junk


# Gated residual fused into the store: (M, N, K, weight bits, Monarch branch, GELU, split-K, out dtype, gate rows G).
# Bias everywhere. The first two are a DiT-XL/2 block's attention projection (4 samples of 256 tokens) and fc2
# (8 samples); then the branch + GELU with float32 out; ragged edges (partial token / channel tiles, a partial last
# K-step, gate groups of 25, 26, 100, 11 tokens that straddle the 128-token tiles); split-K forced (the Gluon
# kernel's ``split``, the plain kernel's GemmConfig) with and without the branch.
GATED_CASES = {
    "proj-m1024-bf16": (1024, 1152, 1152, 4, False, False, None, torch.bfloat16, 4),
    "fc2-m2048-bf16": (2048, 1152, 4608, 4, False, False, None, torch.bfloat16, 8),
    "fc1-branch-gelu-f32": (512, 4608, 1152, 4, True, True, None, torch.float32, 2),
    "ragged-branch-gelu-bf16": (200, 1000, 1040, 4, True, True, None, torch.bfloat16, 8),
    "ragged-splitk-gelu-f32": (130, 1000, 1040, 4, False, True, 3, torch.float32, 5),
    "splitk-branch-bf16": (256, 1152, 4608, 4, True, False, 3, torch.bfloat16, 2),
    "w8-ragged-f16": (300, 520, 1168, 8, False, False, None, torch.float16, 3),
    "w2-tiny-gelu-bf16": (77, 136, 144, 2, False, True, None, torch.bfloat16, 7),
}


def _gemm_split(impl, act, pw, split, **kw):
    if split is None:
        return _gemm(impl, act, pw, **kw)
    if impl == "gluon":
        return _gemm(impl, act, pw, split=split, **kw)
    from treeq_engine.kernels.triton.autotune import GemmConfig

    return _gemm(impl, act, pw, config=GemmConfig(64, 64, 64, split_k=split), **kw)


def _mismatch(got, want) -> str:
    """Where two outputs differ, and by how many units in the last place (same-sign floats: the distance of
    their bit patterns)."""
    bad = got != want
    if not bad.any():
        return "equal"
    ib = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[got.dtype]
    ulps = (got.view(ib).int() - want.view(ib).int()).abs()[bad]
    i = bad.nonzero()[0].tolist()
    return (f"{int(bad.sum())} of {bad.numel()} differ, max {int(ulps.max())} ulp; first at {i}: "
            f"{float(got[tuple(i)])} vs {float(want[tuple(i)])}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(GATED_CASES))
def test_gated_residual_is_exact(impl, case, monkeypatch):
    """``packed_gemm(..., residual, gate)`` equals, bit for bit, the oracle's gated residual applied to the same
    kernel's unfused output: ``out_dtype(float(residual) + gate·float(y))``, product and sum each rounded to
    float32 (both kernels use ``mul.rn``/``add.rn``, which nothing contracts into an FMA). Without gate, with one
    gate row (G = 1), one per sample (G > 1) and one per token (G = M). The residual is only read; outputs start
    as NaN, so an element the fused store skips shows."""
    _poison_outputs(monkeypatch)
    m, n, k, wb, branch, gelu, split, out_dtype, groups = GATED_CASES[case]
    if impl == "gluon" and wb not in gluon_gemm.GLUON_BITS:
        pytest.skip(f"{wb}-bit weights run on the plain kernel")
    x, pw, w1, w2, bias = _operands(m, n, k, wb, 8, branch, seed=11)
    act = reference.quantize_activation(x, QuantSpec.activation(8), monarch_w1=w1)
    a_d = _to_cuda(act)
    dev = torch.device("cuda")
    pwd = pw.to(dev)
    kw = dict(bias=bias.to(dev), gelu=gelu, out_dtype=out_dtype)
    if branch:
        kw.update(z=a_d.z, w2=w2.to(dev))
    y = _gemm_split(impl, a_d, pwd, split, **kw).cpu()  # the unfused layer's output
    assert y.dtype == out_dtype and bool(torch.isfinite(y.float()).all())
    # ... itself against the oracle (no integer-only part here: scales and bias everywhere), within the
    # epilogue's bound plus the one rounding to out_dtype (≤ half an ulp ≤ eps/2·|y|; eps for margin)
    want_y, tol = _expect_epilogue(act, pw, bias, w2, gelu)
    if out_dtype != torch.float32:
        tol = tol + torch.finfo(out_dtype).eps * want_y.abs()
    _assert_within(y, want_y, tol)
    g = torch.Generator().manual_seed(12)
    # residual of the output's magnitude, so that the sums round in every position
    residual = (torch.randn(m, n, generator=g) * y.float().abs().mean()).to(out_dtype)
    res_d = residual.to(dev)
    for gate in (None, torch.randn(1, n, generator=g), torch.randn(groups, n, generator=g),
                 torch.randn(m, n, generator=g)):   # (G = M: a gate row per token, per-token modulations)
        gate_d = None if gate is None else gate.to(dev)
        out = _gemm_split(impl, a_d, pwd, split, residual=res_d, gate=gate_d, **kw)
        assert out.dtype == out_dtype and out.shape == (m, n) and out.data_ptr() != res_d.data_ptr()
        assert torch.equal(res_d.cpu(), residual), "the residual was written to"
        want = reference.gated_residual(y, residual, gate)
        got = out.cpu()
        label = "no gate" if gate is None else f"G={gate.shape[0]}"
        assert torch.equal(got, want), f"{label}: {_mismatch(got, want)}"


def test_gated_residual_through_dispatch():
    """``packed_linear(..., residual, gate, backend="triton")`` reaches the kernel (Gluon on sm_90, plain
    elsewhere) with both operands: it equals the oracle's gated residual of the same call's unfused output."""
    m, n, k = 512, 1152, 1152
    x, pw, _, _, bias = _operands(m, n, k, 4, 8, False, seed=13)
    dev = torch.device("cuda")
    act = quantize_activation(x.to(dev), QuantSpec.activation(8))
    pwd = pw.to(dev)
    g = torch.Generator().manual_seed(14)
    residual = torch.randn(m, n, generator=g).to(dev, torch.bfloat16)
    gate = torch.randn(2, n, generator=g).to(dev)
    kw = dict(bias=bias.to(dev), out_dtype=torch.bfloat16, backend="triton")
    y = packed_linear(act, pwd, **kw)
    out = packed_linear(act, pwd, residual=residual, gate=gate, **kw)
    want = reference.gated_residual(y.cpu(), residual.cpu(), gate.cpu())
    assert torch.equal(out.cpu(), want), _mismatch(out.cpu(), want)
