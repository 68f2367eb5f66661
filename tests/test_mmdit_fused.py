"""Fused Flux blocks (`runtime/mmdit_fused.py`): what they compute equals the unfused packed model (float32, the
reference backend: LayerNorm + modulate in the quantization kernel, GELU and the gated residuals in the
epilogues), the fused kernels actually run, and everything the fused path cannot reproduce runs diffusers' own
forward: IP-Adapter kwargs, hooks, training, another attention processor."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from test_search_mmdit import call, tiny_sd3  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.mmdit_fused import (FusedFluxSingleTransformerBlock, FusedFluxTransformerBlock,  # noqa: E402
                                              FusedJointTransformerBlock, _flux_attention_ok)
from treeq_engine.runtime.linear import TreeQLinear  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def flux(guidance=True):
    torch.manual_seed(0)
    return perturbed(diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4), guidance_embeds=guidance).eval())


def mixed(model):
    """Block layers at assorted formats: W16 (the float path), a branch (its own quantization call), to_q at
    another activation spec than to_k/to_v (no shared call), the rest W4A8."""
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("transformer_blocks.0.attn.to_k", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.ff.net.2", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.1.attn.to_q", LayerConfig(4, 4)) \
        .with_layer("transformer_blocks.1.ff_context.net.0.proj",
                    LayerConfig(4, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("single_transformer_blocks.0.proj_mlp", LayerConfig(16, 16)) \
        .with_layer("single_transformer_blocks.1.attn.to_v", LayerConfig(8, 8, branch=BranchConfig("monarch", 2)))


def pair(model, plan, dtype=torch.float32):
    unfused, fused = copy.deepcopy(model), copy.deepcopy(model)
    quantize(unfused, plan, dtype=dtype, fuse=False)
    quantize(fused, plan, dtype=dtype)
    return unfused, fused


def _flat(sample):
    """A model's ``sample``: a tensor, or (Z-Image's, Cosmos 3's) a list of them, as one tensor."""
    return torch.cat([t.flatten() for t in sample]) if isinstance(sample, (list, tuple)) else sample


def half_agrees(model, kw, dtype=torch.bfloat16, per_forward=None):
    """``model`` (already in ``dtype``) at W8A8, fused and unfused, on the call ``kw``: the fused output is in
    ``dtype``, finite, and within 2 % of the unfused one (the dtype's rounding); with ``per_forward``, the fused
    model makes those kernel calls (``count_kernels``: a 16-bit call left to diffusers' forward would drop them).
    Returns the fused model."""
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 8, 8), dtype=dtype)
    if per_forward is not None:
        assert count_kernels(fused, kw)[0] == per_forward
    with torch.no_grad():
        want, got = _flat(unfused(**kw).sample).float(), _flat(fused(**kw).sample)
    assert got.dtype == dtype
    got = got.float()
    assert torch.isfinite(got).all() and float((got - want).norm() / want.norm()) < 2e-2
    return fused


def unswapped_weight_only_and_bf16(build, call, fused_class, per_forward):
    """A weight-only plan (W4A16) leaves ``build()``'s blocks as they are (nothing to fuse); at W8A8 in bf16 the fused
    model agrees with the unfused one (``half_agrees``) and makes ``per_forward``'s fused kernel calls."""
    model = build()
    weight_only = quantize(copy.deepcopy(model), QuantPlan.block_uniform(model, 4, 16), dtype=torch.float32)
    assert not any(isinstance(m, fused_class) for m in weight_only.modules())
    fused = half_agrees(build().to(torch.bfloat16), call(dtype=torch.bfloat16))
    assert count_kernels(fused, call(dtype=torch.bfloat16))[0] == per_forward


def on_gpu(kw):
    """A call's arguments on the GPU: float tensors in bf16 but the timestep (as given), tuples and lists
    element-wise."""
    def move(k, v):
        if isinstance(v, (tuple, list)):
            return type(v)(move(k, x) for x in v)
        if not isinstance(v, torch.Tensor):
            return v
        return v.cuda().to(torch.bfloat16) if v.is_floating_point() and k != "timestep" else v.cuda()
    return {k: move(k, v) for k, v in kw.items()}


def gpu_fused_matches(model, kw, per_forward):
    """On the GPU's kernels (CUDA or Triton, whichever the dispatcher picks), bf16, a W4A8 plan: the fused model
    makes ``per_forward``'s fused kernel calls on ``kw`` and agrees with the unfused one within 8 % (a dropped gate
    or residual moves the output by half its norm or more)."""
    plan = QuantPlan.block_uniform(model, 4, 8)
    unfused = quantize(copy.deepcopy(model).cuda(), plan, dtype=torch.bfloat16, fuse=False).to(torch.bfloat16)
    fused = quantize(copy.deepcopy(model).cuda(), plan, dtype=torch.bfloat16).to(torch.bfloat16)
    kw = on_gpu(kw)
    calls, b = count_kernels(fused, kw)
    assert calls == per_forward   # fused on the GPU too
    with torch.no_grad():
        a = unfused(**kw).sample.float()
    b = b.float()
    assert torch.isfinite(b).all()
    assert (b - a).norm() <= 0.08 * a.norm(), f"relative error {float((b - a).norm() / a.norm()):.3g}"


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
@pytest.mark.parametrize("guidance", [True, False])
def test_fused_equals_unfused(kind, guidance):
    model = flux(guidance)
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert isinstance(fused.transformer_blocks[1], FusedFluxTransformerBlock)
    assert isinstance(fused.single_transformer_blocks[0], FusedFluxSingleTransformerBlock)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for seed, hw in ((0, (8, 8)), (1, (8, 12))):
        kw = call(model, n=2, seed=seed, hw=hw)
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.1


def count_kernels(model, kw, rms=False):
    """The fused kernel calls of one forward: norm-fused quantizations ("ln"; with ``rms`` also how many of them in
    the RMSNorm mode), GELU and next-layer codes in an epilogue, gated residuals; and the output."""
    calls = {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0, **({"rms": 0} if rms else {})}
    orig_q, orig_l = TreeQLinear.quantize_input, TreeQLinear.linear

    def quantize_input(self, x2, **k):
        calls["ln"] += k.get("ln_eps") is not None
        if rms:
            calls["rms"] += bool(k.get("rms_norm"))
        return orig_q(self, x2, **k)

    def linear(self, act, **k):
        calls["gelu"] += bool(k.get("gelu"))
        calls["residual"] += k.get("residual") is not None
        calls["codes_out"] += k.get("out_spec") is not None
        return orig_l(self, act, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TreeQLinear, "quantize_input", quantize_input)
        mp.setattr(TreeQLinear, "linear", linear)
        with torch.no_grad():
            out = model(**kw).sample
    return calls, out


def hooked_parts_fall_back(fused, block, parts, kw, want, fused_ln):
    """A pre-hook on each of ``block``'s ``parts`` in turn (a norm, the attention, a projection the kernels run): the
    block runs diffusers' forward, ``fused_ln`` norm-fused quantizations left in the model's; the output stays
    ``want``."""
    seen = []
    for part in parts:
        h = block.get_submodule(part).register_forward_pre_hook(lambda *a: seen.append(1))
        calls, got = count_kernels(fused, kw)
        h.remove()
        assert seen and calls["ln"] == fused_ln, part
        seen.clear()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def flux_style_parts_fall_back(fused, kw, want, fused_ln):
    """``hooked_parts_fall_back`` on a FLUX.1-style model's first double block (its norms, the attention, a text
    projection, both output projections: 4 norm-fused quantizations fewer than ``fused_ln``) and second single block
    (1 fewer): Chroma's and HunyuanVideo's."""
    hooked_parts_fall_back(fused, fused.transformer_blocks[0], ("norm1", "norm2_context", "attn", "attn.add_k_proj",
                                                                "attn.to_out.0", "attn.to_add_out"), kw, want,
                           fused_ln - 4)
    hooked_parts_fall_back(fused, fused.single_transformer_blocks[1], ("norm", "attn", "attn.to_v", "proj_mlp",
                                                                       "proj_out", "act_mlp"), kw, want, fused_ln - 1)


def fused_kernels_run(model, kw, per_forward):
    """A W4A8 plan's fused model makes ``per_forward``'s fused kernel calls in one forward on ``kw``; the unfused
    one none."""
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    assert count_kernels(fused, kw)[0] == per_forward
    assert count_kernels(unfused, kw)[0] == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


def another_processor_and_training(fused, attn, processor, kw, want, fused_ln):
    """``attn`` given a subclass of its ``processor`` class (a subclass computes what it likes: not the fused
    path's) runs diffusers' forward in its block, ``fused_ln`` norm-fused quantizations left; in training mode every
    block does (none left); the output stays ``want``."""
    other = type("OtherProcessor", (processor,), {})
    attn.set_processor(other())
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == fused_ln
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    fused.train()
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_fused_kernels_run():
    """Per double block: one LayerNorm-fused quantization per stream for q/k/v and one per feed-forward, GELU and
    the next layer's codes in each feed-forward's first epilogue, four gated residuals; per single block one
    quantization for proj_mlp + q/k/v, GELU in proj_mlp's epilogue, the gated residual in proj_out's."""
    model = flux()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call(model, n=2)
    calls, _ = count_kernels(fused, kw)
    assert calls == {"ln": 2 * 4 + 2 * 1, "gelu": 2 * 2 + 2 * 1, "residual": 2 * 4 + 2 * 1, "codes_out": 2 * 2}
    calls, _ = count_kernels(unfused, kw)
    assert calls == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    model = flux()
    plan = QuantPlan.block_uniform(model, 4, 8)
    unfused, fused = pair(model, plan)
    kw = call(model, n=2)
    with torch.no_grad():
        want = unfused(**kw).sample
    # a hook on a norm: the whole block runs as modules (the hook sees its call)
    seen = []
    h = fused.transformer_blocks[0].norm1.register_forward_hook(lambda *a: seen.append(1))
    calls, got = count_kernels(fused, kw)
    h.remove()
    assert seen and calls["ln"] == 2 * 4 - 4 + 2   # block 0 unfused, block 1 and the single blocks fused
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a hook on a feed-forward: that feed-forward runs as a module, the rest stays fused
    seen.clear()
    h = fused.transformer_blocks[1].ff.register_forward_hook(lambda *a: seen.append(1))
    calls, got = count_kernels(fused, kw)
    h.remove()
    assert seen and calls["ln"] == 2 * 4 - 1 + 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a hook on a packed projection the kernels would run: that block runs diffusers' forward
    h = fused.single_transformer_blocks[1].attn.to_q.register_forward_pre_hook(lambda *a: seen.append(2))
    calls, got = count_kernels(fused, kw)
    h.remove()
    assert 2 in seen and calls["ln"] == 2 * 4 + 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    class OtherProcessor(FluxAttnProcessor):   # a subclass computes what it likes: not the fused path's
        pass

    fused.transformer_blocks[0].attn.set_processor(OtherProcessor())
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == 2 * 4 - 4 + 2   # block 0 runs diffusers' forward
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    fused.train()
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_and_a_cache_hook():
    """In bf16 the fused model agrees with the unfused one to bf16's rounding; diffusers' FirstBlockCache finds the
    fused classes in its block registry."""
    model = flux()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 8, 8), dtype=torch.bfloat16)
    unfused, fused = unfused.to(torch.bfloat16), fused.to(torch.bfloat16)
    kw = {k: v.to(torch.bfloat16) if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v
          for k, v in call(model, n=2).items()}
    with torch.no_grad():
        want, got = unfused(**kw).sample.float(), fused(**kw).sample.float()
    assert float((got - want).norm() / want.norm()) < 2e-2
    fused.enable_cache(diffusers.FirstBlockCacheConfig(threshold=0.05))
    with torch.no_grad(), fused.cache_context("test"):
        first = fused(**kw).sample.float()
    assert torch.isfinite(first).all()


def test_fp16_residuals_clip_as_diffusers_clips_them():
    """In float16, Flux clips the double blocks' text stream and the single blocks' output to fp16's range; the
    fused blocks do too. Gates opened to 6e4 push some residual values past 65504 in the final adds of both kinds of
    block (not before a LayerNorm, where diffusers itself would turn inf into NaN): the values saturate at the
    limit, and the fused model agrees with the unfused one (without either clip its output is NaN)."""
    model = flux().to(torch.float16)
    d = model.config.num_attention_heads * model.config.attention_head_dim
    with torch.no_grad():
        for b in model.transformer_blocks:   # the text stream's MLP gate (the 6th chunk of its modulation)
            b.norm1_context.linear.bias[5 * d:].add_(6e4)
            b.ff_context.net[2].weight.mul_(2.0)
        for b in model.single_transformer_blocks:   # the single block's gate (its 3rd chunk)
            b.norm.linear.bias[2 * d:].add_(6e4)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 8, 8), dtype=torch.float16)
    kw = {k: v.to(torch.float16) if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v
          for k, v in call(model, n=2).items()}
    saturated = []
    for b in (fused.transformer_blocks[0], fused.single_transformer_blocks[1]):
        b.register_forward_hook(lambda mod, args, out: saturated.append(int((out[0].abs() == 65504).sum())))
    with torch.no_grad():
        want, got = unfused(**kw).sample.float(), fused(**kw).sample.float()
    assert all(n > 0 for n in saturated) and len(saturated) == 2
    assert torch.isfinite(got).all()
    assert float((got - want).norm() / want.norm()) < 5e-2   # (fp16 rounding, W8A8: 1e-2 without saturation)


def sd3_mixed(model):
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("transformer_blocks.0.attn.add_k_proj", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.ff_context.net.2", LayerConfig(4, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("transformer_blocks.1.attn.to_q", LayerConfig(4, 4)) \
        .with_layer("transformer_blocks.1.ff.net.0.proj", LayerConfig(16, 16))


@pytest.mark.parametrize("dual", [False, True])
@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_sd3_fused_equals_unfused(dual, kind):
    """SD3 (its last block context_pre_only) and SD3.5-style blocks (a second attention, RMSNorm on q and k)."""
    model = perturbed(tiny_sd3(dual))
    plan = sd3_mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert all(isinstance(b, FusedJointTransformerBlock) for b in fused.transformer_blocks)
    assert fused.transformer_blocks[1].context_pre_only
    for seed, hw in ((0, (8, 8)), (1, (8, 12))):
        kw = call(model, n=2, seed=seed, hw=hw)
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.1


def test_sd3_fused_kernels_and_fallbacks():
    """Block 0: image q/k/v, text q/k/v, (attn2 q/k/v), both feed-forwards LayerNorm-fused; block 1
    (context_pre_only): image and text q/k/v and the image feed-forward. A chunked feed-forward, a hooked norm and
    IP-Adapter-style kwargs run diffusers' forward."""
    for dual in (False, True):
        model = perturbed(tiny_sd3(dual))
        unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
        kw = call(model, n=2)
        calls, _ = count_kernels(fused, kw)
        assert calls["ln"] == 4 + dual + 3 and calls["gelu"] == 2 + 1 and calls["residual"] == 4 + dual + 2
    with torch.no_grad():
        want = unfused(**kw).sample
    h = fused.transformer_blocks[0].norm1_context.register_forward_pre_hook(lambda *a: None)
    calls, got = count_kernels(fused, kw)
    h.remove()
    assert calls["ln"] == 3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    fused.transformer_blocks[1].set_chunk_feed_forward(2, 1)
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == 4 + 1   # block 0 (with attn2) fused, block 1 diffusers'
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def block_inputs(model, b=2, text=5, image=16, tb=None):
    """Random inputs of one Flux block: image and text tokens, temb (batch ``tb``, default b), the rotary table."""
    g = torch.Generator().manual_seed(3)
    d = model.config.num_attention_heads * model.config.attention_head_dim
    ids = torch.zeros(text + image, 3)
    ids[text:, 1] = torch.arange(image).float()
    with torch.no_grad():
        rope = model.pos_embed(ids)
    return dict(hidden_states=torch.randn(b, image, d, generator=g), encoder_hidden_states=torch.randn(b, text, d,
                generator=g), temb=torch.randn(tb or b, d, generator=g), image_rotary_emb=rope)


def test_block_level_fallbacks():
    """Each case runs diffusers' forward (no LayerNorm-fused quantization) and gives the unfused block's output:
    attention kwargs, a conditioning batch broadcast over the samples, hooks on proj_out or act_mlp, fused
    projections."""
    model = flux()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    cases = [("double", {"joint_attention_kwargs": {"unused": 1}}, None), ("single", {"joint_attention_kwargs":
             {"unused": 1}}, None), ("single", {}, "batch"), ("single", {}, "proj_out"), ("single", {}, "act_mlp"),
             ("double", {}, "fused_projections")]
    for kind, extra, what in cases:
        blocks = ("transformer_blocks" if kind == "double" else "single_transformer_blocks")
        fb, ub = getattr(fused, blocks)[0], getattr(unfused, blocks)[0]
        kw = block_inputs(model, tb=1 if what == "batch" else None)
        handle = None
        if what in ("proj_out", "act_mlp"):
            handle = getattr(fb, what).register_forward_hook(lambda *a: None)
        if what == "fused_projections":
            fb.attn.fused_projections = True   # (as fuse_qkv_projections leaves it: to_qkv would run)
            ub.attn.fused_projections = False
        calls = {"ln": 0}
        orig = TreeQLinear.quantize_input

        def counting(self, x2, **k):
            calls["ln"] += k.get("ln_eps") is not None
            return orig(self, x2, **k)

        with pytest.MonkeyPatch.context() as mp, torch.no_grad():
            mp.setattr(TreeQLinear, "quantize_input", counting)
            if what == "fused_projections":   # to_qkv would be a dense copy of the packed layers: refused
                with pytest.raises(RuntimeError, match="leave the projections unfused"):
                    _flux_attention_ok(fb.attn, joint=True)
                fb.attn.fused_projections = False
                continue
            got = fb(**kw, **extra)
            want = ub(**kw, **extra)
        if handle is not None:
            handle.remove()
        assert calls["ln"] == 0, (kind, what, extra)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_feed_forward_of_another_shape_is_not_fused():
    model = perturbed(tiny_sd3())
    model.transformer_blocks[0].ff.net.append(torch.nn.Identity())   # diffusers runs it; the fused path would not
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    assert type(fused.transformer_blocks[0]).__name__ == "JointTransformerBlock"
    assert isinstance(fused.transformer_blocks[1], FusedJointTransformerBlock)
    kw = call(model, n=2)
    with torch.no_grad():
        torch.testing.assert_close(fused(**kw).sample, unfused(**kw).sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,dtype", [("flux", torch.float16), ("sd3", torch.bfloat16), ("sd3", torch.float16)])
def test_half_precision_and_a_cache(name, dtype):
    """In fp16/bf16 fused and unfused agree to the dtype's rounding. (FirstBlockCache on SD3 fails in diffusers
    itself: its last block returns no text tokens to take a residual of.)"""
    model = flux() if name == "flux" else perturbed(tiny_sd3(dual=True))
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 8, 8), dtype=dtype)
    unfused, fused = unfused.to(dtype), fused.to(dtype)
    kw = {k: v.to(dtype) if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v
          for k, v in call(model, n=2).items()}
    with torch.no_grad():
        want, got = unfused(**kw).sample.float(), fused(**kw).sample.float()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert float((got - want).norm() / want.norm()) < 2e-2


def test_smoothing_refuses_fused_projections():
    from treeq_engine.calib import smooth

    model = flux()
    model.fuse_qkv_projections()
    with pytest.raises(ValueError, match="fused projections"):
        smooth.site_of(model, "transformer_blocks.0.attn.to_q")


def test_an_older_diffusers_leaves_mmdit_blocks_unfused(monkeypatch):
    """diffusers before 0.35 lacks what the fused MMDiT forward calls: quantize packs and warns, and the blocks run
    unfused (DiT and PixArt fusion does not depend on it)."""
    import builtins
    import sys

    real_import = builtins.__import__

    def failing(name, globals=None, locals=None, fromlist=(), level=0):
        if level and name == "mmdit_fused" or name.endswith("runtime.mmdit_fused"):
            raise ImportError("cannot import name 'dispatch_attention_fn' (stand-in for diffusers 0.34)")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.delitem(sys.modules, "treeq_engine.runtime.mmdit_fused", raising=False)
    monkeypatch.setattr(builtins, "__import__", failing)
    model = flux()
    with pytest.warns(UserWarning, match="SD3/Flux blocks stay unfused.*>= 0.35"):
        quantize(model, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32)
    assert type(model.transformer_blocks[0]).__name__ == "FluxTransformerBlock"


def test_info_names_what_an_older_diffusers_fuses(monkeypatch):
    import importlib.metadata

    from treeq_engine import info

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.34.0")
    assert "SD3, Flux, Wan, Qwen-Image need diffusers >= 0.35" in info._diffusers_support()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_fused_equals_unfused_on_gpu(kind):
    """The same on the GPU's kernels (CUDA or Triton, whichever the dispatcher picks), bf16, layers in the fragment
    layout: the LayerNorm + modulate kernels per stream, the shared q/k/v codes, GELU and fc2's codes in fc1's
    epilogue, the gated residuals in the stores (bound as for the DiT blocks: test_diffusers_fused.py's reasoning;
    a dropped gate or residual moves the output by half its norm or more)."""
    model = flux() if kind == "flux" else perturbed(tiny_sd3())
    plan = QuantPlan.block_uniform(model, 4, 8)
    unfused = quantize(copy.deepcopy(model).cuda(), plan, dtype=torch.bfloat16, fuse=False).to(torch.bfloat16)
    fused = quantize(copy.deepcopy(model).cuda(), plan, dtype=torch.bfloat16).to(torch.bfloat16)
    assert any(type(m).__name__.startswith("Fused") for m in fused.modules())
    kw = {k: v.cuda().to(torch.bfloat16) if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v.cuda()
          for k, v in call(model, n=2).items()}
    with torch.no_grad():
        a, b = unfused(**kw).sample.float(), fused(**kw).sample.float()
    assert torch.isfinite(b).all()
    assert (b - a).norm() <= 0.08 * a.norm(), f"relative error {float((b - a).norm() / a.norm()):.3g}"
