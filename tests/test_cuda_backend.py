"""The cuda backend on a machine without a GPU: it registers, declines CPU tensors, its custom ops have working
fake implementations, and the expected-value helpers the GPU tests rely on agree with the reference backend."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from cuda_expect import corr_exact, epilogue_expect, reference_linear, stage1_expect
from treeq_engine.branches import MonarchShape, monarch
from treeq_engine.format import QuantSpec
from treeq_engine.kernels import PackedWeight, backends, packed_linear, quantize_activation, reference
from treeq_engine.kernels import cuda_backend as cb


def test_registered_first():
    assert backends()[0] == "cuda" and "reference" in backends()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_declines_cpu_tensors(gen):
    x = torch.randn(4, 32, generator=gen)
    a = quantize_activation(x, QuantSpec.activation(8))  # falls through to the reference
    assert a.codes.device.type == "cpu"
    assert not cb.can_run("quantize_activation", (x, QuantSpec.activation(8)), {})
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        quantize_activation(x, QuantSpec.activation(8), backend="cuda")
    pw = PackedWeight.from_float(torch.randn(8, 32, generator=gen), QuantSpec.weight(4))
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        packed_linear(a, pw, backend="cuda")


def test_raw_launcher_refuses_what_the_kernel_would_misread(gen):
    """``launch_quantize_activation`` (what the custom op and the tests call) checks its operands before they
    reach C++: fp32 factors would be read as bf16 pairs, a wrong rank as a wrong row stride."""
    x = torch.randn(8, 64, generator=gen)
    outs = (torch.empty(8, 64, dtype=torch.int8), torch.empty(8), torch.empty(8, dtype=torch.int32),
            torch.empty(8, dtype=torch.int32))
    spec = QuantSpec.activation(8)
    z = torch.empty(128, 4, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="w1 must be a contiguous bf16"):
        cb.launch_quantize_activation(x, spec, *outs, z, w1=torch.zeros(4, 4, 16), rank=1)
    with pytest.raises(ValueError, match="w1 must be a contiguous bf16"):
        cb.launch_quantize_activation(x, spec, *outs, z, w1=torch.zeros(4, 8, 16, dtype=torch.bfloat16), rank=1)
    with pytest.raises(ValueError, match="both shift and scale"):
        cb.launch_quantize_activation(x, spec, *outs, shift=torch.zeros(2, 64))
    with pytest.raises(ValueError, match="G dividing M"):
        cb.launch_quantize_activation(x, spec, *outs, shift=torch.zeros(0, 64), mod_scale=torch.zeros(0, 64))
    with pytest.raises(ValueError, match="contiguous 2-D"):
        cb.launch_quantize_activation(x.t(), spec, *outs)


def test_raw_gemm_launcher_refuses_what_the_kernel_would_misread(gen):
    """``launch_packed_linear`` (behind the public custom op) checks every operand before the raw pointers reach
    the kernel: the wrong K for the weight, short per-token vectors, mismatched fragment operands, the wrong
    output, a half-given branch, operands on a non-CUDA device."""
    from treeq_engine.kernels import cuda_layout

    pw = PackedWeight.from_float(torch.randn(40, 64, generator=gen), QuantSpec.weight(4))
    w = cuda_layout.build_operands(pw, torch.device("cpu"))
    codes = torch.zeros(8, 64, dtype=torch.int8)
    vec = (torch.ones(8), torch.zeros(8, dtype=torch.int32), torch.zeros(8, dtype=torch.int32))
    out = torch.empty(8, 40, dtype=torch.bfloat16)
    call = lambda **kw: cb.launch_packed_linear(kw.pop("out", out), kw.pop("codes", codes), *kw.pop("vec", vec),  # noqa: E731
                                                kw.pop("w", w), k=kw.pop("k", 64), **kw)
    with pytest.raises(ValueError, match="must hold K=128"):
        call(k=128)
    with pytest.raises(ValueError, match="a_scale must be contiguous torch.float32 with ≥ 8"):
        call(vec=(torch.ones(7),) + vec[1:])
    import dataclasses

    with pytest.raises(ValueError, match="fragment-layout words must be"):
        call(w=dataclasses.replace(w, words=w.words[:-16]))
    with pytest.raises(ValueError, match=r"out must be a contiguous \(8, 40\)"):
        call(out=torch.empty(8, 41, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="both z and w2"):
        call(z=torch.zeros(128, 4, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="needs residual"):
        call(gate=torch.ones(2, 40))
    with pytest.raises(ValueError, match="residual must be a contiguous"):
        call(residual=torch.zeros(8, 40))   # float32 against a bf16 out
    with pytest.raises(ValueError, match="gate must be a contiguous float32"):
        call(residual=torch.zeros(8, 40, dtype=torch.bfloat16), gate=torch.ones(3, 40))
    big = torch.empty(360, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="partly overlaps out"):
        call(out=big[:320].view(8, 40), residual=big[40:].view(8, 40))
    with pytest.raises(ValueError, match="not a CUDA device"):
        call()
    with pytest.raises(ValueError, match="not a CUDA device"):
        call(residual=torch.zeros(8, 40, dtype=torch.bfloat16), gate=torch.ones(2, 40))


def test_param_cache_sees_data_reassignment_and_inference_tensors():
    """The bf16/padded copies are rebuilt when a tensor's data is swapped under it (``.data =``, what
    ``Module.to`` does to parameters, keeps id and version) and work on inference tensors (no version)."""
    t = torch.ones(4)
    assert torch.equal(cb._cached(t, ("x2",), lambda u: u * 2), torch.full((4,), 2.0))
    t.data = torch.full((4,), 5.0)
    assert torch.equal(cb._cached(t, ("x2",), lambda u: u * 2), torch.full((4,), 10.0))
    with torch.inference_mode():
        u = torch.ones(4)
    assert torch.equal(cb._cached(u, ("x2",), lambda v: v * 2), torch.full((4,), 2.0))


def test_fake_implementations():
    with FakeTensorMode():
        x = torch.empty(300, 70, dtype=torch.bfloat16)
        w1 = torch.empty(4, 12, 18, dtype=torch.bfloat16)
        codes, s, zp, rs, z = torch.ops.treeq.cuda_quantize_activation(x, 4, False, 1.0, 1e-6, None, None, w1, 3)
        assert (codes.shape, codes.dtype) == ((300, 70), torch.int8)
        assert s.dtype == torch.float32 and zp.dtype == rs.dtype == torch.int32
        assert (z.shape, z.dtype) == ((384, 4, 16), torch.bfloat16)  # rows to the token tile, b·r to 16
        *_, z0 = torch.ops.treeq.cuda_quantize_activation(x, 8, True, 1.0, None, None, None, None, 0)
        assert z0.shape == (0,)
        i32 = torch.int32
        y = torch.ops.treeq.cuda_packed_linear(
            codes, s, zp, rs, torch.empty(8, dtype=i32), torch.empty(256, dtype=i32), torch.empty(50),
            torch.empty(50, dtype=i32), torch.empty(50, dtype=i32), None, None, None, 4, 50, 70, True, 1, 0, 0)
        assert (y.shape, y.dtype) == ((300, 50), torch.float16)
        y = torch.ops.treeq.cuda_packed_linear(
            codes, s, zp, rs, torch.empty(8, dtype=i32), torch.empty(256, dtype=i32), torch.empty(50),
            torch.empty(50, dtype=i32), torch.empty(50, dtype=i32), None, None, None, 4, 50, 70, False, 0, 0, 0,
            torch.empty(300, 50, dtype=torch.bfloat16), torch.empty(3, 50))
        assert (y.shape, y.dtype) == ((300, 50), torch.bfloat16)


# ---- the GPU tests' expected-value helpers, checked here ---------------------------------------------------------

def test_expect_helpers_match_reference(gen):
    m, n, k = 23, 40, 70
    s = MonarchShape(n=n, k=k, blocks=4, rank=2)
    w1, w2 = torch.randn(s.w1_shape, generator=gen) * 0.1, torch.randn(s.w2_shape, generator=gen) * 0.1
    x = torch.randn(m, k, generator=gen)
    act = reference.quantize_activation(x, QuantSpec.activation(4), monarch_w1=w1)
    w = PackedWeight.from_float(torch.randn(n, k, generator=gen) * 0.1, QuantSpec.weight(3))
    bias = torch.randn(n, generator=gen)
    # integer part: the reference's own
    want = reference_linear(act, w, out_dtype=torch.float32)
    y_main = corr_exact(act, w).float() * act.scale[:, None] * w.scale[None, :]
    assert torch.equal(want, y_main)
    # without branch and GELU the expectation is the reference exactly (float32)
    y, tol = epilogue_expect(act, w, bias=bias)
    assert torch.equal(y.float(), reference_linear(act, w, bias=bias, out_dtype=torch.float32))
    assert (tol > 0).all()
    # with the bf16 branch: within bf16 rounding of the float32 reference, and within tol of its own definition
    y, tol = epilogue_expect(act, w, bias=bias, w2=w2, gelu=True)
    ref = reference_linear(act, w, bias=bias, monarch_w2=w2, gelu=True, out_dtype=torch.float32).double()
    mag = monarch.stage2(act.z.abs(), w2.abs(), n).double()
    assert ((y - ref).abs() <= 4 * 2.0 ** -8 * mag + 1e-5).all()
    # stage 1
    v = reference.preprocess(x)
    z, ztol = stage1_expect(v, w1)
    assert ((z - act.z.double()).abs() <= ztol + 1e-6).all()
