"""The branch module, its closed-form init, the frozen QuantLinear state and consistency with the kernel ops."""
import pytest
import torch
import torch.nn as nn

from treeq_engine.branches import (MonarchBranch, branch_params, default_branch, init_branch, layer_weight_bits,
                                   monarch, plan_weight_bits)
from treeq_engine.calib.lora import LoRA
from treeq_engine.format import QuantSpec, fake_quantize, quantize, row_qparams
from treeq_engine.kernels import PackedWeight, packed_linear, quantize_activation
from treeq_engine.nn import QuantLinear
from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan


@pytest.mark.parametrize("cfg", [BranchConfig("monarch", 5, 2), BranchConfig("lowrank", 1, 3),
                                 BranchConfig("monarch", 4, 1)], ids=str)
def test_module_stages_dense_and_projection(cfg, gen):
    n, k = 45, 70
    br = MonarchBranch.from_config(cfg, n, k)
    assert torch.count_nonzero(br.dense()) == 0  # a fresh branch is zero
    with torch.no_grad():
        br.w1.normal_(generator=gen)
        br.w2.normal_(generator=gen)
    x = torch.randn(3, 7, k, generator=gen)
    y = br(x)
    torch.testing.assert_close(y, x @ br.dense().T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(br.stage2(br.stage1(x)), monarch.forward(x, br.w1, br.w2, n))
    assert br.params == branch_params(cfg, n, k) == br.w1.numel() + br.w2.numel()
    assert br.config == cfg
    # the closed-form projection of an exact branch matrix recovers it
    back = MonarchBranch.projected(br.dense().detach(), cfg)
    torch.testing.assert_close(back.dense(), br.dense().detach(), rtol=1e-4, atol=1e-4)
    # gradients reach both factors
    br(x).square().sum().backward()
    assert br.w1.grad is not None and br.w2.grad is not None and br.w2.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="expected K=70"):
        br(torch.randn(2, 69))


def test_lowrank_projection_is_truncated_svd(gen):
    w = torch.randn(30, 40, generator=gen)
    br = MonarchBranch.projected(w, BranchConfig("lowrank", 1, 4))
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(br.dense(), (u[:, :4] * s[:4]) @ vh[:4], rtol=1e-4, atol=1e-4)


def test_equal_parameters_and_budget():
    assert branch_params(BranchConfig("monarch", 32, 1), 1152, 1152) == branch_params(
        BranchConfig("lowrank", 1, 32), 1152, 1152) == 73728
    assert default_branch(3456, 1152) == BranchConfig("monarch", 32, 1)
    assert default_branch(20, 12, lowrank=32) == BranchConfig("monarch", 12, 1)
    assert default_branch(3456, 1152, kind="lowrank") == BranchConfig("lowrank", 1, 32)
    shapes = {"a": (64, 32), "b": (32, 64)}
    plan = QuantPlan({"a": LayerConfig(4, 4, branch=BranchConfig("lowrank", 1, 2)), "b": LayerConfig(3, 3)})
    assert plan_weight_bits(plan, shapes, count_branch=False) == 3.5
    extra = 16 * 2 * (64 + 32) / (2 * 64 * 32)
    assert plan_weight_bits(plan, shapes, count_branch=True) == pytest.approx(3.5 + extra)
    assert layer_weight_bits(plan.layers["b"], 32, 64) == 32 * 64 * 3
    with pytest.raises(KeyError, match="no \\(N, K\\) shape"):
        plan_weight_bits(plan, {"a": (64, 32)})


def test_init_variants(gen):
    spec = QuantSpec.weight(3)
    # a weight with a strong low-rank part: "weight" init removes it, the residual then has a smaller range
    w = torch.randn(48, 40, generator=gen) * 0.02 + torch.randn(48, 1, generator=gen) @ torch.randn(1, 40, generator=gen)
    cfg = BranchConfig("lowrank", 1, 1)
    br, base = init_branch(w, cfg, "weight")
    torch.testing.assert_close(base + br.dense().detach(), w, rtol=1e-5, atol=1e-5)
    assert float(base.abs().max()) < 0.2 * float(w.abs().max())
    err_plain = (fake_quantize(w, spec) - w).norm()
    err_weight = (fake_quantize(base, spec) + br.dense().detach() - w).norm()
    assert err_weight < 0.3 * err_plain
    # "residual": base is W, the branch fits W − Q(W) in its structure (better than nothing, never worse)
    q = lambda m: fake_quantize(m, spec)  # noqa: E731
    br_r, base_r = init_branch(w, BranchConfig("monarch", 4, 1), "residual", q)
    assert torch.equal(base_r, w)
    err_r = (q(w) + br_r.dense().detach() - w).norm()
    assert err_r < err_plain
    with pytest.raises(ValueError, match="needs the layer's weight quantizer"):
        init_branch(w, cfg, "residual")
    with pytest.raises(ValueError, match="init mode must be one of"):
        init_branch(w, cfg, "svd")


def _layer(gen, n=45, k=70, cfg=LayerConfig(4, 4), bias=True):
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.1)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=gen))
    return QuantLinear(lin, cfg, name="blk.fc")


@pytest.mark.parametrize("wa", [(4, 4), (3, 3), (2, 8)])
@pytest.mark.parametrize("bcfg", [BranchConfig("monarch", 5, 2), BranchConfig("lowrank", 1, 6), None], ids=str)
def test_quantlinear_matches_kernel_ops(wa, bcfg, gen):
    """The simulation equals quantize_activation(x, monarch_w1) → packed_linear(..., monarch_w2) (reference
    backend), frozen with calibrated (not data-rule) per-channel parameters."""
    cfg = LayerConfig(*wa)
    q = _layer(gen, cfg=cfg)
    if bcfg is not None:
        q.branch, base = init_branch(q.weight, bcfg, "weight")
    else:
        base = q.weight.detach()
    clip = 0.7 + 0.3 * torch.rand(q.out_features, generator=gen)
    scale, zp = row_qparams(base.float(), cfg.weight_spec(), clip=clip)
    q.freeze_weight(base, scale, zp)
    x = torch.randn(13, q.in_features, generator=gen)
    with torch.no_grad():
        y_sim = q(x)
    w1 = None if bcfg is None else q.branch.w1.detach()
    w2 = None if bcfg is None else q.branch.w2.detach()
    act = quantize_activation(x, cfg.act_spec(), monarch_w1=w1, backend="reference")
    pw = PackedWeight.from_quantized(q.weight_qtensor())
    y_ker = packed_linear(act, pw, bias=q.bias.detach(), monarch_w2=w2, out_dtype=torch.float32, backend="reference")
    torch.testing.assert_close(y_ker, y_sim, rtol=1e-4, atol=1e-4)
    if bcfg is not None:  # the stage split: z from the unquantized x, as the module computes it
        torch.testing.assert_close(act.z, q.branch.stage1(x), rtol=1e-5, atol=1e-5)


def test_unfrozen_branch_layer_matches_kernel_ops(gen):
    cfg = LayerConfig(4, 8, branch=BranchConfig("monarch", 5, 1))
    q = _layer(gen, cfg=cfg)
    q.branch, _ = init_branch(q.weight, cfg.branch, "weight")
    x = torch.randn(9, q.in_features, generator=gen)
    with torch.no_grad():
        y_sim = q(x)
        pw = PackedWeight.from_float(q.residual_weight().float(), cfg.weight_spec())
    act = quantize_activation(x, cfg.act_spec(), monarch_w1=q.branch.w1.detach())
    y_ker = packed_linear(act, pw, bias=q.bias.detach(), monarch_w2=q.branch.w2.detach(), out_dtype=torch.float32)
    torch.testing.assert_close(y_ker, y_sim, rtol=1e-4, atol=1e-4)


def test_frozen_state(gen):
    q = _layer(gen, cfg=LayerConfig(4, 8))
    x = torch.randn(6, q.in_features, generator=gen)
    with torch.no_grad():
        before = q(x)
    q.freeze_weight()  # data-rule params on W: same output as the unfrozen layer
    assert q.is_frozen and "frozen" in repr(q)
    with torch.no_grad():
        torch.testing.assert_close(q(x), before)
        # no dequantized copy is kept beside the codes (PTQ and PEFT memory: 3 bytes per bf16 weight, not 5)
        assert q._w_cache is None
        w_old = q.weight.clone()
        q.weight.add_(1.0)  # the frozen path no longer follows W
        torch.testing.assert_close(q(x), before)
        q.weight.copy_(w_old)
    # a zero LoRA changes nothing; a trained one is merged into the codes
    q.lora = LoRA(q.out_features, q.in_features, 4)
    with torch.no_grad():
        torch.testing.assert_close(q(x), before)
        assert torch.equal(q.weight_qtensor().codes, q.w_codes)
        q.lora.b.normal_(generator=gen)
        merged = q.weight_qtensor()
        assert not torch.equal(merged.codes, q.w_codes)
        torch.testing.assert_close(q.quantized_weight(), merged.dequantize())
    # gradients: w_scale (when asked) and the LoRA factors
    q.w_scale.requires_grad_(True)
    q(x).square().sum().backward()
    assert q.w_scale.grad is not None and q.lora.a.grad is not None and q.lora.b.grad is not None
    assert q.weight.grad is None
    # errors
    with pytest.raises(ValueError, match="frozen at weight:int4-asym; unfreeze_weight"):
        q.set_config(LayerConfig(3, 8))
    q.set_config(LayerConfig(4, 4))  # activation bits may change
    with pytest.raises(ValueError, match="λ=0.5 needs a float weight"):
        q.set_noise_scale(0.5)
    with pytest.raises(ValueError, match=r"frozen codes must be torch.int8 \(45, 70\)"):
        q.load_frozen(q.w_codes[:3], q.w_scale.detach(), q.w_zero_point)
    with pytest.raises(ValueError, match=r"codes outside \[-8, 7\]"):
        q.load_frozen(torch.full_like(q.w_codes, 9), q.w_scale.detach(), q.w_zero_point)
    q.unfreeze_weight()
    assert not q.is_frozen and q.lora is None
    # unfrozen again: the data rule on W
    assert torch.equal(q.weight_qtensor().codes, quantize(q.weight.detach(), QuantSpec.weight(4)).codes)
    fp = _layer(gen, cfg=LayerConfig(16, 16))
    with pytest.raises(ValueError, match="only a quantized weight can be frozen"):
        fp.freeze_weight()


def test_lora_errors():
    with pytest.raises(ValueError, match="exceeds min"):
        LoRA(4, 8, 5)
    with pytest.raises(ValueError, match="positive ints"):
        LoRA(4, 0, 1)
    assert torch.count_nonzero(LoRA(6, 9, 2).delta()) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train", ["branch", "scale", "lora", "lora+scale"])
def test_frozen_layer_training_keeps_codes_not_a_weight_copy(dtype, train):
    """Training a frozen layer (PEFT: its branch, its weight scales, a LoRA merged into its codes), autograd keeps
    the int8 codes and the small trainable tensors for the backward, not a dequantized weight or the weight-sized
    intermediates of its graph (1 byte per weight instead of several floats until the step's backward); outputs
    are bit-identical and gradients equal to those of the plain graph (the weight built differentiably, then
    F.linear)."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(3)
    lin = nn.Linear(48, 40).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 48, generator=gen) / 7)
    cfg = LayerConfig(4, 8, branch=BranchConfig("monarch", 4, 1))
    q = QuantLinear(lin, cfg)
    q.branch = MonarchBranch.from_config(cfg.branch, 40, 48)
    with torch.no_grad():
        q.branch.w1.normal_(0, 0.1, generator=gen)
        q.branch.w2.normal_(0, 0.1, generator=gen)
    q.freeze_weight()
    q.weight.requires_grad_(False)
    q.bias.requires_grad_(False)
    q.w_scale.requires_grad_("scale" in train)
    if "lora" in train:
        q.lora = LoRA(40, 48, 4)
        with torch.no_grad():
            q.lora.b.normal_(0, 0.02, generator=gen)   # (B starts at zero: make the update matter)
    trained = [p for p in q.parameters() if p.requires_grad]
    x = torch.randn(5, 7, 48, generator=gen).to(dtype)

    def run(plain):
        xi = x.clone().requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
            y = (F.linear(q.quantize_input(xi), q.quantized_weight(), q.bias) + q.branch(xi)) if plain else q(xi)
        y.float().square().sum().backward()
        grads = [xi.grad] + [p.grad.clone() for p in trained]
        q.zero_grad()
        big = [t for t in saved if t.is_floating_point() and t.numel() == 40 * 48]
        return y.detach(), grads, big

    y0, g0, big0 = run(False)   # the codes path
    y1, g1, big1 = run(True)    # the plain graph: keeps the dequantized weight (and, with a LoRA, more)
    assert not big0 and big1
    assert torch.equal(y0, y1)
    assert len(g0) == 1 + len(trained) >= 3
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if dtype != torch.float32:
        return
    # under autocast (the backward outside it, as a training loop runs it) the matmuls, a LoRA's B·A included, run
    # in bf16: the backward rebuilds the weight the same way, so the gradients are the plain graph's
    def under_autocast(plain):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = (F.linear(q.quantize_input(xi), q.quantized_weight(), q.bias) + q.branch(xi)) if plain else q(xi)
        y.float().square().sum().backward()
        grads = [xi.grad] + [p.grad.clone() for p in trained]
        q.zero_grad()
        return y.detach(), grads

    (ya, ga), (yb, gb) = under_autocast(False), under_autocast(True)
    assert torch.equal(ya, yb) and ga[0].dtype == torch.float32
    for a, b in zip(ga, gb):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # second order (a gradient penalty on the input): differentiable through the rebuilt weight
    def penalty(plain):
        xi = x.clone().requires_grad_(True)
        y = (F.linear(q.quantize_input(xi), q.quantized_weight(), q.bias) + q.branch(xi)) if plain else q(xi)
        (gx,) = torch.autograd.grad(y.square().sum(), xi, create_graph=True)
        gx.square().sum().backward()
        grads = [p.grad.clone() for p in trained]
        q.zero_grad()
        return grads

    for a, b in zip(penalty(False), penalty(True)):   # (second-order sums cancel: a tolerance on the scale)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4 * float(b.abs().max()))
