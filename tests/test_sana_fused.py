"""Fused Sana blocks (`runtime/sana_fused.py`): what they compute equals the unfused packed model (float32, the
reference backend: LayerNorm + modulate in the quantization kernels of q/k/v and of the feed-forward's inverted 1x1
convolution, the gated residuals in to_out's and the point convolution's epilogues), the fused kernels actually
run, and everything the fused path cannot reproduce runs diffusers' own forward: hooks, training, another
attention processor, a self-attention mask."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from test_mmdit_fused import another_processor_and_training, count_kernels, pair  # noqa: E402
from test_search_sana import call  # noqa: E402
from tiny_diffusers import tiny_sana  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime.sana_fused import FusedSanaTransformerBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def mixed(model):
    """Block layers at assorted formats: W16 (the float paths), branches (their own quantization calls), to_q at
    another activation spec than to_k/to_v (no shared call), the rest W4A8."""
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("transformer_blocks.0.attn1.to_k", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.ff.conv_point", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.attn1.to_out.0", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.1.ff.conv_point", LayerConfig(4, 16)) \
        .with_layer("transformer_blocks.1.attn1.to_q", LayerConfig(4, 4)) \
        .with_layer("transformer_blocks.1.ff.conv_inverted", LayerConfig(4, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("transformer_blocks.1.attn1.to_v", LayerConfig(8, 8, branch=BranchConfig("monarch", 2)))


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed", "inverted-W16", "sprint"])
def test_fused_equals_unfused(kind):
    """Float32, within 1e-5: uniform plans; a mixed one (W16 and weight-only layers, branches, unshared specs); the
    inverted 1x1 convolution left 16-bit (the float modulated rows, the packed point convolution after it);
    Sana-Sprint's block (q/k RMSNorm, which linear attention makes hard to see: it cancels a per-token scale on q)."""
    model = tiny_sana(sprint=kind == "sprint")
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, 4, 8) if kind in ("inverted-W16",
                                                                                              "sprint") else \
        QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    if kind == "inverted-W16":
        plan = plan.with_layer("transformer_blocks.0.ff.conv_inverted", LayerConfig(16, 16))
    unfused, fused = pair(model, plan)
    assert all(isinstance(b, FusedSanaTransformerBlock) for b in fused.transformer_blocks)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    extra = dict(guidance=torch.full((3,), 0.45)) if kind == "sprint" else {}
    for kw in (dict(call(n=3, seed=0), **extra), dict(call(n=3, text=9, hw=(4, 12), seed=1), **extra)):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.1


def test_the_fused_kernels_run():
    """Per block: one LayerNorm-fused quantization for q/k/v and one for the feed-forward's inverted convolution,
    two gated residuals (to_out's, the point convolution's)."""
    model = tiny_sana()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call(n=2)
    calls, _ = count_kernels(fused, kw)
    assert calls == {"ln": 2 * 2, "gelu": 0, "residual": 2 * 2, "codes_out": 0}
    calls, _ = count_kernels(unfused, kw)
    assert calls == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0

    model = tiny_sana()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call(n=2)
    with torch.no_grad():
        want = unfused(**kw).sample
    seen = []
    # (block 0 runs diffusers' forward, block 1 stays fused; the depthwise convolution and the SiLU, which the fused
    # path calls as modules, keep block 0 fused too)
    for part, fused_ln in (("norm1", 2), ("norm2", 2), ("attn1", 2), ("attn1.to_out.1", 2), ("attn1.to_k", 2),
                           ("attn1.to_out.0", 2), ("ff", 2), ("ff.conv_point", 2), ("ff.conv_inverted", 2),
                           ("ff.conv_depth", 4), ("ff.nonlinearity", 4)):
        h = fused.transformer_blocks[0].get_submodule(part).register_forward_pre_hook(lambda *a: seen.append(1))
        calls, got = count_kernels(fused, kw)
        h.remove()
        assert seen and calls["ln"] == fused_ln, part
        seen.clear()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    another_processor_and_training(fused, fused.transformer_blocks[0].attn1, SanaLinearAttnProcessor2_0, kw, want, 2)


def test_bf16_rms_qk_norm_and_a_cache_hook():
    """In bf16 the fused model agrees with the unfused one to bf16's rounding, with Sana 1.5's RMSNorm on q and k;
    diffusers' FirstBlockCache applies to the fused model (the fused class's registry entry: diffusers 0.42 has none
    for Sana's own block) and runs."""
    torch.manual_seed(0)
    model = diffusers.SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=8,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=16, qk_norm="rms_norm_across_heads").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    model = model.to(torch.bfloat16)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 8, 8), dtype=torch.bfloat16)
    assert all(isinstance(b, FusedSanaTransformerBlock) for b in fused.transformer_blocks)
    kw = {k: v.to(torch.bfloat16) if v.is_floating_point() and k != "timestep" else v for k, v in call(n=2).items()}
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == 4
    with torch.no_grad():
        want = unfused(**kw).sample.float()
    assert float((got.float() - want).norm() / want.norm()) < 2e-2
    from diffusers.hooks import apply_first_block_cache   # (Sana has no CacheMixin; the hook applies alike)
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    apply_first_block_cache(fused, diffusers.FirstBlockCacheConfig(threshold=0.5))
    _set_cache_context(fused, CacheContext("test"))   # (what a CacheMixin's cache_context does)
    with torch.no_grad():
        first = fused(**kw).sample.float()
        again = fused(**kw).sample.float()   # (the same input again)
    assert torch.isfinite(first).all() and float((again - first).norm() / first.norm()) < 2e-2


def test_a_self_attention_mask_runs_diffusers_forward():
    model = tiny_sana()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = dict(call(n=2), attention_mask=torch.ones(2, 64))
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == 0
    with torch.no_grad():
        torch.testing.assert_close(got, unfused(**kw).sample, rtol=1e-5, atol=1e-5)


def test_fp16_attention_output_clips_as_diffusers_clips_it():
    """In float16 Sana's linear-attention processor clips its output to fp16's range before the gated residual; the
    fused block too (the projection's residual then leaves its epilogue), packed or W16: an output pushed past
    65504 stays finite and the fused model agrees with the unfused one (without the clip it is inf and NaN)."""
    model = tiny_sana()
    with torch.no_grad():
        out = model.transformer_blocks[0].attn1.to_out[0]
        out.weight.mul_(60000 / float(out.weight.abs().max()))
        out.bias.fill_(6e4)   # past fp16's max once the output is added up
        model.transformer_blocks[0].scale_shift_table[2].fill_(1e-3)
    model = model.half()
    kw = {k: v.half() if v.is_floating_point() and k != "timestep" else v for k, v in call(n=2).items()}
    for plan in (QuantPlan.block_uniform(model, 8, 8),
                 QuantPlan.block_uniform(model, 8, 8).with_layer("transformer_blocks.0.attn1.to_out.0",
                                                                 LayerConfig(16, 16))):
        unfused, fused = pair(model, plan, dtype=torch.float16)
        with torch.no_grad():
            want, got = unfused(**kw).sample.float(), fused(**kw).sample.float()
        assert torch.isfinite(want).all() and torch.isfinite(got).all()
        # (saturated rows: a value rounded to either side of zero before the clip moves by the whole range; 4 %)
        assert float((got - want).norm() / want.norm()) < 0.1


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    """The same on the GPU's kernels (CUDA or Triton, whichever the dispatcher picks), bf16, layers in the fragment
    layout, the 1x1 convolutions among them (bound as for the DiT blocks: test_diffusers_fused.py's reasoning)."""
    import copy

    from treeq_engine.runtime import quantize

    model = tiny_sana()
    plan = QuantPlan.block_uniform(model, 4, 8)
    unfused = quantize(copy.deepcopy(model).cuda(), plan, dtype=torch.bfloat16, fuse=False).to(torch.bfloat16)
    fused = quantize(copy.deepcopy(model).cuda(), plan, dtype=torch.bfloat16).to(torch.bfloat16)
    assert all(isinstance(b, FusedSanaTransformerBlock) for b in fused.transformer_blocks)
    kw = {k: v.cuda().to(torch.bfloat16) if v.is_floating_point() and k != "timestep" else v.cuda()
          for k, v in call(n=2).items()}
    calls, b = count_kernels(fused, kw)
    assert calls == {"ln": 2 * 2, "gelu": 0, "residual": 2 * 2, "codes_out": 0}   # fused on the GPU too
    with torch.no_grad():
        a = unfused(**kw).sample.float()
    b = b.float()
    assert torch.isfinite(b).all()
    assert (b - a).norm() <= 0.08 * a.norm(), f"relative error {float((b - a).norm() / a.norm()):.3g}"
