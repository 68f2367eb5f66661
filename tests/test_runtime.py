"""Packed inference modules and artifacts, against the fake-quant simulation (which uses the same oracle)."""
import json

import pytest
import torch
import torch.nn as nn

from treeq_engine.branches import MonarchBranch, monarch
from treeq_engine.nn import QuantLinear, convert, quantizable_linears
from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan
from treeq_engine.runtime import TreeQLinear, artifact, memory_report, quantize, treeq_layers


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 64), nn.GELU(), nn.Linear(64, 40), nn.GELU(), nn.Linear(40, 8, bias=False))


def _plan(net):
    names = quantizable_linears(net)
    return QuantPlan({names[0]: LayerConfig(4, 8), names[1]: LayerConfig(3, 4, branch=BranchConfig("monarch", 4, 1)),
                      names[2]: LayerConfig(8, 8)}, model="toy")


@pytest.mark.parametrize("cfg", [LayerConfig(2, 8), LayerConfig(3, 3), LayerConfig(4, 4, w_symmetric=True),
                                 LayerConfig(8, 8), LayerConfig(4, 16),
                                 LayerConfig(4, 16, branch=BranchConfig("monarch", 4, 1)),
                                 LayerConfig(3, 16, branch=BranchConfig("lowrank", 1, 2)),
                                 LayerConfig(4, 8, branch=BranchConfig("monarch", 4, 1))])
def test_treeq_linear_equals_fake_quant(cfg, gen):
    """The packed layer equals the fake-quant layer; with a branch, the fake-quant layer *plus its branch* (the
    quantized path then carries ``W − B``). The W·A16 cases run TreeQLinear's weight-only path (dequantize and
    multiply), whose branch add no other test reaches."""
    lin = nn.Linear(70, 33)
    x = torch.randn(3, 5, 70, generator=gen)
    q = QuantLinear(lin, cfg)
    factors = None
    if cfg.branch is not None:
        # random factors, not the projection of W: the branch output (~0.1) is far above the tolerance
        q.branch = MonarchBranch.from_config(cfg.branch, 33, 70)
        with torch.no_grad():
            q.branch.w1.copy_(0.3 * torch.randn(q.branch.w1.shape, generator=gen))
            q.branch.w2.copy_(0.3 * torch.randn(q.branch.w2.shape, generator=gen))
        factors = (q.branch.w1.detach(), q.branch.w2.detach())
    # float32 keeps the Monarch factors in float32 (bf16 storage is tested in test_branch_factors_stored_in_bf16_…)
    t = TreeQLinear.from_weights(q.weight_qtensor(), cfg, lin.bias, factors, dtype=torch.float32)
    with torch.no_grad():
        want = q(x)
        got = t(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        if factors is not None:   # the branch matters at this tolerance: dropping its add could not pass
            assert q.branch(x).abs().amax() > 100 * 1e-4


def test_quantize_model_and_branch(gen):
    net = _net()
    plan = _plan(net)
    x = torch.randn(6, 40, generator=gen)
    sim = convert(_net(), plan)  # the fake-quant model with the same branches (closed-form init)
    for name, cfg in plan.layers.items():
        if cfg.branch is not None:
            q = sim.get_submodule(name)

            class Br(nn.Module):
                def __init__(self, w1, w2, n):
                    super().__init__()
                    self.w1, self.w2, self.n = nn.Parameter(w1), nn.Parameter(w2), n

                def forward(self, x):
                    return monarch.forward(x, self.w1, self.w2, self.n)

                def dense(self):
                    return monarch.to_dense(self.w1, self.w2, self.n, self.w1.shape[0] * self.w1.shape[2])

            q.branch = Br(*monarch.project(q.weight.detach(), 4, 1), q.out_features)
    with torch.no_grad():
        ref = sim(x)
    quantize(net, plan, dtype=torch.float32)
    assert len(treeq_layers(net)) == 3
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref, rtol=1e-4, atol=1e-4)
    rep = memory_report(net)
    assert 0 < rep["ratio"] < 1


def test_branch_factors_stored_in_bf16_for_a_16_bit_model(gen):
    """A bf16 model keeps its Monarch factors in bf16 (what the kernels multiply and the bit budget counts), so
    the branch costs 2 bytes per factor entry; a float32 model keeps float32 (exact to the simulation)."""
    x = torch.randn(6, 40, generator=gen)
    f32 = quantize(_net(), _plan(_net()), dtype=torch.float32)
    b16 = quantize(_net(), _plan(_net()), dtype=torch.bfloat16)
    name = quantizable_linears(_net())[1]
    l32, l16 = f32.get_submodule(name), b16.get_submodule(name)
    assert l32.monarch_w1.dtype == torch.float32 and l16.monarch_w1.dtype == torch.bfloat16
    assert l16.monarch_w2.dtype == torch.bfloat16
    branch = l16.monarch_w1.numel() + l16.monarch_w2.numel()
    assert l32.weight_bytes() - l16.weight_bytes() == 2 * branch
    torch.testing.assert_close(l16.monarch_w1.float(), l32.monarch_w1, rtol=2 ** -8, atol=0)
    with torch.no_grad():  # the bf16 model within bf16 rounding of the float32 one
        torch.testing.assert_close(b16(x.bfloat16()).float(), f32(x), rtol=0.05, atol=0.05)


def test_quantize_and_run_under_inference_mode(gen):
    """A model quantized and run entirely under ``torch.inference_mode`` (inference tensors have no version
    counter, which the operand caches key on) gives what it gives outside."""
    x = torch.randn(6, 40, generator=gen)
    want = quantize(_net(), _plan(_net()), dtype=torch.float32)(x)
    with torch.inference_mode():
        net = quantize(_net(), _plan(_net()), dtype=torch.float32)
        torch.testing.assert_close(net(x), want)
        torch.testing.assert_close(net(x), want)  # the second call reads the caches


def test_artifact_roundtrip_and_errors(tmp_path, gen):
    net = _net()
    plan = _plan(net)
    fp = artifact.fingerprint(net, plan)
    quantize(net, plan, dtype=torch.float32)
    x = torch.randn(4, 40, generator=gen)
    with torch.no_grad():
        ref = net(x)
    out = artifact.save(net, plan, tmp_path / "art", fp_fingerprint=fp, model_config={"arch": "toy"})
    loaded = artifact.load(out, _net(seed=1), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref)

    # wrong model
    other = nn.Sequential(nn.Linear(40, 64), nn.GELU(), nn.Linear(64, 41), nn.GELU(), nn.Linear(41, 8, bias=False))
    with pytest.raises(artifact.ArtifactError, match="another model"):
        artifact.load(out, other)
    # layout version mismatch
    man = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**man, "layout_version": 2}))
    with pytest.raises(artifact.ArtifactError, match="layout v2"):
        artifact.load(out, _net())
    # an artifact of version 1 (Monarch factors in the earlier arrangement) is refused, not misread
    (out / "manifest.json").write_text(json.dumps({**man, "version": 1}))
    with pytest.raises(artifact.ArtifactError, match="artifact version 1; this build reads 2 — re-quantize"):
        artifact.load(out, _net())
    (out / "manifest.json").write_text(json.dumps(man))
    # corruption
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(artifact.ArtifactError, match="corrupt"):
        artifact.load(out, _net())
    with pytest.raises(artifact.ArtifactError, match="no manifest"):
        artifact.load(tmp_path, _net())


def test_bad_input(gen):
    t = TreeQLinear.from_weights(QuantLinear(nn.Linear(16, 8), LayerConfig(4, 8)).weight_qtensor(), LayerConfig(4, 8))
    with pytest.raises(ValueError, match="input has 15 features"):
        t(torch.randn(2, 15))
    with pytest.raises(ValueError, match="stays nn.Linear"):
        TreeQLinear(16, 8, LayerConfig(16, 8), bias=True)


def test_casting_a_quantized_model_keeps_its_storage(gen):
    """``model.to(bf16)`` after quantize changes the compute dtype, not the packed storage (float32 scales and
    bias, codes); the Monarch factors follow the 16-bit storage rule; the model still runs and agrees."""
    x = torch.randn(6, 40, generator=gen)
    net = quantize(_net(), _plan(_net()), dtype=torch.float32)
    want = net(x)
    net.to(torch.bfloat16)
    lin = net.get_submodule(quantizable_linears(_net())[1])
    assert lin.w_scale.dtype == torch.float32 and lin.bias.dtype == torch.float32
    assert lin.monarch_w1.dtype == torch.bfloat16 and lin.out_dtype == torch.bfloat16
    torch.testing.assert_close(net(x.bfloat16()).float(), want, rtol=0.05, atol=0.05)
    net.float()
    assert lin.monarch_w1.dtype == torch.float32 and lin.w_scale.dtype == torch.float32
    # a cast without a device keeps the layer where it is (meta stands in for CUDA: model.cuda() then .to(bf16))
    meta = TreeQLinear(40, 8, LayerConfig(4, 8), bias=True, monarch=(4, 1), dtype=torch.float32, device="meta")
    meta.to(torch.bfloat16)
    assert all(b.device.type == "meta" for b in meta.buffers()) and meta.out_dtype == torch.bfloat16
    assert meta.monarch_w1.dtype == torch.bfloat16 and meta.w_scale.dtype == torch.float32


def test_double_keeps_float32_factors(gen):
    """A float64 cast does not narrow float32 Monarch factors to bf16 (``.double().float()`` was lossy)."""
    net = quantize(_net(), _plan(_net()), dtype=torch.float32)
    lin = net.get_submodule(quantizable_linears(_net())[1])
    w1 = lin.monarch_w1.clone()
    net.double().float()
    assert lin.monarch_w1.dtype == torch.float32 and torch.equal(lin.monarch_w1, w1)


def test_a_refused_plan_leaves_the_model_as_it_was():
    """Every layer is checked before the first swap: a plan refused at its second layer used to leave the first
    packed, and a corrected plan then failed on it."""
    m = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    with pytest.raises(ValueError, match="16-bit weights with quantized activations"):
        quantize(m, QuantPlan({"0": LayerConfig(4, 8), "1": LayerConfig(16, 8)}))
    assert not treeq_layers(m)
    quantize(m, QuantPlan({"0": LayerConfig(4, 8), "1": LayerConfig(8, 8)}))
    assert len(treeq_layers(m)) == 2


def test_the_plan_decides_the_branch():
    """A converted layer's own branch is packed only when it is the plan's: a plan without a branch packs none
    (it had packed the module's, giving an artifact that would not load), another shape gets the plan's own
    projection; a layer whose config names no branch but which holds one is refused."""
    with_branch = LayerConfig(4, 8, branch=BranchConfig("monarch", 4, 1))
    def converted():
        m = convert(nn.Sequential(nn.Linear(16, 32)), QuantPlan({"0": with_branch}))
        m[0].branch = MonarchBranch.from_config(with_branch.branch, 32, 16)
        nn.init.normal_(m[0].branch.w1)
        return m

    m = quantize(converted(), QuantPlan({"0": LayerConfig(4, 8)}), dtype=torch.float32)
    assert m[0].monarch_w1 is None
    fresh = quantize(nn.Sequential(nn.Linear(16, 32)), QuantPlan({"0": LayerConfig(4, 8)}), dtype=torch.float32)
    assert set(m[0].state_dict()) == set(fresh[0].state_dict())   # so its artifact loads into a fresh model
    other = LayerConfig(4, 8, branch=BranchConfig("monarch", 2, 1))
    m = quantize(converted(), QuantPlan({"0": other}), dtype=torch.float32)
    assert tuple(m[0].monarch_w1.shape) == tuple(monarch.MonarchShape(32, 16, 2, 1).w1_shape)
    bad = converted()
    bad[0].set_config(LayerConfig(4, 8))
    with pytest.raises(ValueError, match="its branch does not have the shape its config W4A8 names"):
        quantize(bad, QuantPlan({"0": LayerConfig(4, 8)}))
    assert not treeq_layers(bad)


def test_packed_layer_answers_what_code_for_nn_linear_reads(gen):
    """diffusers models read a linear's ``weight`` (Z-Image: ``mlp[0].weight.dtype``) and a submodule's first
    parameter's dtype (Wan: ``next(iter(self.time_embedder.parameters())).dtype``). A packed layer answers both in
    the dtype it computes in, which ``.to(dtype)`` and ``.float()`` change, and keeps the answer out of the artifact."""
    lin = nn.Linear(40, 24)
    q = QuantLinear(lin, LayerConfig(4, 8))
    t = TreeQLinear.from_weights(q.weight_qtensor(), LayerConfig(4, 8), lin.bias)
    emb = nn.Sequential(t, nn.SiLU())   # a time embedder whose every linear is packed
    assert next(iter(emb.parameters())).dtype == torch.bfloat16 and t.out_dtype == torch.bfloat16
    assert t.weight.dtype == torch.bfloat16 and t.weight.shape == (24, 40)
    qt = q.weight_qtensor()
    want = (qt.codes.float() - qt.zero_point.float()[:, None]) * qt.scale.float()[:, None]
    torch.testing.assert_close(t.float().weight, want, rtol=0, atol=0)   # exactly the dequantized codes
    assert next(iter(emb.parameters())).dtype == torch.float32 and t.out_dtype == torch.float32
    emb.half()
    assert t.out_dtype == torch.float16 and t.weight.dtype == torch.float16 and t.w_scale.dtype == torch.float32
    emb.to("cpu")   # a device move keeps the dtype
    assert t.out_dtype == torch.float16
    sd = t.state_dict()
    assert "dtype_anchor" not in sd
    fresh = TreeQLinear(40, 24, LayerConfig(4, 8), bias=True)
    fresh.load_state_dict(sd)   # strict: the anchor is neither missing nor unexpected
    assert torch.equal(fresh.weight, want.bfloat16())
    # a skeleton on meta loaded with assign=True gets its anchor where its tensors landed
    meta = TreeQLinear(40, 24, LayerConfig(4, 8), bias=True, device="meta")
    meta.load_state_dict(sd, assign=True)
    assert meta.dtype_anchor.device.type == "cpu" and meta.dtype_anchor.dtype == torch.bfloat16
    torch.testing.assert_close(meta(torch.ones(2, 40)).float(), fresh(torch.ones(2, 40)).float())


def test_packed_layers_report_the_dtype_of_the_layers_they_replace(gen):
    """``quantize``'s ``dtype`` is what the layers are built for (bf16 Monarch factors by default); the dtype each
    reports (its parameter, ``weight``, ``out_dtype``) is the replaced layer's: a float32 model stays float32 to
    code that asks (pipelines cast their inputs to ``transformer.dtype``)."""
    net = quantize(_net(), _plan(_net()))   # default build: bf16
    lin = net.get_submodule(quantizable_linears(_net())[1])
    assert lin.monarch_w1.dtype == torch.bfloat16
    assert {p.dtype for p in net.parameters()} == {torch.float32} and lin.weight.dtype == torch.float32
    half = quantize(_net().to(torch.float16), _plan(_net()))
    assert {p.dtype for p in half.parameters()} == {torch.float16}


def test_w16_layer_keeps_the_model_precision(gen):
    """A layer the plan keeps at W16 stays an nn.Linear in the model's own dtype (a float32 model runs)."""
    net = _net()
    names = quantizable_linears(net)
    plan = QuantPlan({names[0]: LayerConfig(4, 8), names[1]: LayerConfig(16, 16), names[2]: LayerConfig(8, 8)},
                     model="toy")
    quantize(net, plan)  # dtype defaults to bf16 for the packed layers' outputs
    assert net.get_submodule(names[1]).weight.dtype == torch.float32
    net(torch.randn(3, 40, generator=gen))
