"""What the kernel entry points refuse, and the empty batch: found by a bad-input review. The Triton kernels read
raw memory, so a strided or misplaced operand must be an error, not garbage; the reference must refuse what the
kernels refuse, and agree with them on zero rows."""
import dataclasses

import pytest
import torch

from treeq_engine.format import QuantSpec
from treeq_engine.kernels import PackedWeight, packed_linear, quantize_activation


@pytest.fixture
def operands(gen):
    x = torch.randn(6, 40, generator=gen)
    pw = PackedWeight.from_float(torch.randn(24, 40, generator=gen), QuantSpec.weight(4))
    return x, pw, quantize_activation(x, QuantSpec.activation(8))


def test_weight_vectors_must_be_contiguous_and_beside_the_codes(operands):
    _, pw, _ = operands
    with pytest.raises(ValueError, match="codes must be contiguous"):
        dataclasses.replace(pw, packed=pw.packed.t().contiguous().t())
    for field in ("scale", "zero_point", "col_sum"):
        t = getattr(pw, field)
        strided = torch.stack([t, t], 1)[:, 0]   # same values, stride 2
        with pytest.raises(ValueError, match=f"{field} must be contiguous"):
            dataclasses.replace(pw, **{field: strided})
        with pytest.raises(ValueError, match=f"{field} is on meta, its codes on cpu"):
            dataclasses.replace(pw, **{field: t.to("meta")})


def test_activation_vectors_checked(operands):
    _, pw, act = operands
    with pytest.raises(ValueError, match=r"activation scale must be torch.float32 \(6,\)"):
        packed_linear(dataclasses.replace(act, scale=act.scale[:3]), pw)
    with pytest.raises(ValueError, match="activation row_sum must be torch.int32"):
        packed_linear(dataclasses.replace(act, row_sum=act.row_sum.long()), pw)
    strided = dataclasses.replace(act, scale=torch.stack([act.scale, act.scale], 1)[:, 0])
    want = packed_linear(act, pw, out_dtype=torch.float32)
    assert torch.equal(packed_linear(strided, pw, out_dtype=torch.float32), want)   # the reference reads values
    with pytest.raises(ValueError, match="activation scale must be contiguous"):
        packed_linear(strided, pw, backend="triton")   # the kernel reads memory


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool])
def test_out_dtype_must_be_float(operands, dtype):
    _, pw, act = operands
    with pytest.raises(ValueError, match="out_dtype must be a float type"):
        packed_linear(act, pw, out_dtype=dtype)


def test_activation_arguments(operands):
    x, _, _ = operands
    a8 = QuantSpec.activation(8)
    for eps in (-1.0, 0.0, float("nan"), float("inf"), True, "1e-6"):
        with pytest.raises(ValueError, match="ln_eps must be a positive finite number"):
            quantize_activation(x, a8, ln_eps=eps)
    with pytest.raises(ValueError, match="rms_norm needs ln_eps"):
        quantize_activation(x, a8, rms_norm=True)
    with pytest.raises(TypeError, match="rms_norm must be a bool"):
        quantize_activation(x, a8, ln_eps=1e-6, rms_norm="yes")
    good = torch.zeros(2, 40)
    with pytest.raises(TypeError, match="shift must be a torch.Tensor"):
        quantize_activation(x, a8, shift=[0.0] * 40, scale=good)
    with pytest.raises(ValueError, match="not a multiple of G=0"):
        quantize_activation(x, a8, shift=torch.zeros(0, 40), scale=torch.zeros(0, 40))
    with pytest.raises(ValueError, match="must be a float"):
        quantize_activation(x, a8, shift=good.long(), scale=good)
    with pytest.raises(ValueError, match="modulate needs both"):
        quantize_activation(x, a8, shift=good)
    with pytest.raises(ValueError, match="must have one shape"):
        quantize_activation(x, a8, shift=good, scale=torch.zeros(3, 40))
    with pytest.raises(ValueError, match="b·r a multiple of b"):
        quantize_activation(x, a8, monarch_w1=torch.zeros(4, 6, 10))
    with pytest.raises(ValueError, match="K = 0"):
        quantize_activation(torch.zeros(3, 0), a8)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_batch(operands, backend):
    """Zero tokens (an empty batch) give zero rows on every backend, not a reshape error."""
    x, pw, _ = operands
    act = quantize_activation(x[:0], QuantSpec.activation(4), ln_eps=1e-6, backend=backend)
    assert act.codes.shape == (0, 40) and act.scale.shape == act.row_sum.shape == (0,)
    y = packed_linear(act, pw, bias=torch.zeros(24), backend=backend)
    assert y.shape == (0, 24) and y.dtype == torch.bfloat16
    nxt = packed_linear(act, pw, out_spec=QuantSpec.activation(8), backend=backend)
    assert nxt.codes.shape == (0, 24)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gemm_operands_checked_alike(operands, backend, gen):
    """What one backend refuses every backend refuses (a review found the Triton GEMM wrapping its int32
    accumulator past MAX_K and the reference broadcasting a stage-1 z of the wrong token count)."""
    from treeq_engine.branches import MonarchShape
    from treeq_engine.format import MAX_K

    x, pw, _ = operands
    shp = MonarchShape(24, 40, 4, 1)
    w1, w2 = torch.randn(shp.w1_shape, generator=gen), torch.randn(shp.w2_shape, generator=gen)
    act = quantize_activation(x, QuantSpec.activation(8), monarch_w1=w1)
    with pytest.raises(ValueError, match=r"z must be \(M, b, b·r\) = \(6, 4, 4\)"):
        packed_linear(dataclasses.replace(act, z=act.z[:1]), pw, monarch_w2=w2, backend=backend)
    with pytest.raises(ValueError, match="carries no stage-1 output z"):
        packed_linear(dataclasses.replace(act, z=None), pw, monarch_w2=w2, backend=backend)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor or None, got list"):
        packed_linear(act, pw, bias=[0.0] * 24, backend=backend)
    with pytest.raises(TypeError, match="monarch_w2 must be a torch.Tensor or None"):
        packed_linear(act, pw, monarch_w2=[1], backend=backend)
    k = MAX_K + 1
    big_w = PackedWeight.from_float(torch.rand(1, k, generator=gen), QuantSpec.weight(8))
    big_a = quantize_activation(torch.rand(1, k, generator=gen), QuantSpec.activation(8), backend="reference")
    with pytest.raises(ValueError, match="K=33026 exceeds MAX_K=33025"):
        packed_linear(big_a, big_w, out_dtype=torch.float32, backend=backend)


def test_layer_past_max_k_refused_where_it_would_run_the_kernels():
    from treeq_engine.plan import LayerConfig
    from treeq_engine.runtime.linear import TreeQLinear

    with pytest.raises(ValueError, match="big: K=33026 exceeds MAX_K=33025.*weight-only config"):
        TreeQLinear(33026, 4, LayerConfig(4, 8), bias=False, name="big")
    TreeQLinear(33026, 4, LayerConfig(4, 16), bias=False, name="big")   # weight-only: no integer accumulation


def test_cuda_backend_says_what_it_needs(operands):
    _, pw, act = operands
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the CPU inputs' message is what is tested")
    with pytest.raises(RuntimeError, match="`treeq info` says what this machine has"):
        packed_linear(act, pw, backend="cuda")


def test_runtime_refuses_what_it_would_not_compute(gen):
    """W16 with quantized activations (or a branch) is simulated by nn.convert but has no packed layer: quantize
    refuses it instead of leaving a plain Linear that silently skips the activation quantization."""
    from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan
    from treeq_engine.runtime import TreeQLinear, quantize

    for cfg in (LayerConfig(16, 3), LayerConfig(16, 16, branch=BranchConfig("monarch", 4, 1))):
        net = torch.nn.Sequential(torch.nn.Linear(32, 16))
        with pytest.raises(ValueError, match="0: W16.* no packed layer runs"):
            quantize(net, QuantPlan({"0": cfg}), dtype=torch.float32)
    net = torch.nn.Sequential(torch.nn.Linear(32, 16))
    quantize(net, QuantPlan({"0": LayerConfig(16, 16)}), dtype=torch.float32)   # W16A16: a plain Linear, allowed
    assert type(net[0]) is torch.nn.Linear
    quantize(net, QuantPlan({"0": LayerConfig(4, 8)}), dtype=torch.float32)
    layer = net[0]
    assert isinstance(layer, TreeQLinear)
    with pytest.raises(TypeError, match="input must be a float tensor, got torch.int64"):
        layer(torch.ones(2, 32, dtype=torch.long))
    assert layer(torch.randn(0, 32, generator=gen)).shape == (0, 16)   # an empty batch
    a16 = torch.nn.Sequential(torch.nn.Linear(32, 16))
    quantize(a16, QuantPlan({"0": LayerConfig(4, 16)}), dtype=torch.float32)
    with pytest.raises(TypeError, match="input must be a float tensor"):
        a16[0](torch.ones(2, 32, dtype=torch.int32))


def test_core_refuses_what_would_index_outside_its_arrays():
    """The compiled core's CPU entry points (a memory-safety review): a row_chan that is not a permutation of the
    channels (it indexes the codes), sizes whose word counts would wrap, K past MAX_K (signed int32 overflow)."""
    import numpy as np

    from treeq_engine import core
    from treeq_engine.format import pack
    from treeq_engine.kernels import cuda_layout as fl

    c = core.load()
    n, k, b = 260, 128, 4
    words = torch.zeros(fl.total_words(n, k, b), dtype=torch.int32)
    with pytest.raises(ValueError, match=r"row_chan\[260\] = 260: every channel of \[0, N=260\)"):
        fl.unrepack(words, fl.tile_rows(512), b, n, k)   # right length, channels past N
    rc = fl.tile_rows(n).clone()
    rc[1] = 0   # channel 0 twice, channel 1 never
    with pytest.raises(ValueError, match="must appear exactly once"):
        fl.unrepack(words, rc, b, n, k)
    rc = fl.tile_rows(n).clone()
    rc[5] = -1
    with pytest.raises(ValueError, match="leaves channels .* unnamed"):
        fl.unrepack(words, rc, b, n, k)
    bad = fl.tile_rows(2).numpy().copy()
    bad[0] = 5000
    with pytest.raises(ValueError, match=r"row_chan\[0\] = 5000"):
        c.frag_repack(np.zeros((2, 4), np.int32), 4, 2, 32, bad)
    with pytest.raises(ValueError, match="must fit int32"):
        c.frag_registers(np.zeros(0, np.int32), 2, 1, 2**53 * 128)
    with pytest.raises(ValueError, match="exceeds MAX_K=33025"):
        c.cpu_packed_gemm(np.full((1, 33026), -128, np.int8), np.full((1, 33026), -128, np.int8), 8, 33026)
    with pytest.raises(ValueError, match="must be a 1-D int32 CPU tensor"):
        fl.unrepack(words.long(), fl.tile_rows(n), b, n, k)
    with pytest.raises(ValueError, match="positive int"):
        fl.tile_rows(True)
    w = torch.randint(-8, 8, (n, k), dtype=torch.int8)   # and the round trip still holds
    words, rc = fl.repack(pack(w, b), b, n, k)
    assert torch.equal(fl.unrepack(words, rc, b, n, k), w)


def test_fragment_weight_needs_the_layouts_channel_map():
    from treeq_engine.kernels import cuda_layout as fl

    n, k, b = 40, 64, 4
    pw = PackedWeight.from_float(torch.randn(n, k), QuantSpec.weight(b))
    words, rc = fl.repack(pw.packed, b, n, k)
    fl.frag_weight(words, rc, pw.scale, pw.zero_point, pw.col_sum, b, n, k).check()   # a copy of the map: fine
    swapped = rc.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    with pytest.raises(ValueError, match="row_chan is not the layout's channel map"):
        fl.frag_weight(words, swapped, pw.scale, pw.zero_point, pw.col_sum, b, n, k).check()
