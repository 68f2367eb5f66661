"""Fused AuraFlow blocks (`runtime/auraflow_fused.py`): what they compute equals the unfused packed model (float32,
the reference backend: each stream's float32 LayerNorm + modulate in the quantization kernel, the attention's gated
sum in to_out's epilogue, the LayerNorm of that sum in the feed-forward's quantization, the block's residual in
out_projection's epilogue), the fused kernels run, and what the fused path cannot reproduce runs diffusers' own
forward: hooks on the norms or the attention, another processor, training, attention kwargs, a broadcast temb."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from test_mmdit_fused import count_kernels, gpu_fused_matches, half_agrees, pair  # noqa: E402
from test_zimage_fused import another_processor_then_training, exact, hooks_cost  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.auraflow_fused import (FusedAuraFlowJointTransformerBlock,  # noqa: E402
                                                 FusedAuraFlowSingleTransformerBlock)

pytestmark = pytest.mark.usefixtures("one_thread")
# two joint blocks (image and text streams) and two single blocks, each stream: one LayerNorm-fused quantization for
# q/k/v and one for linear_1/linear_2, the attention's and the feed-forward's gated residuals
PER_FORWARD = {"ln": 2 * 2 * 2 + 2 * 2, "gelu": 0, "residual": 2 * 2 * 2 + 2 * 2, "codes_out": 0}


def tiny():
    torch.manual_seed(0)
    return perturbed(diffusers.AuraFlowTransformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=2, num_single_dit_layers=2,
        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=16,
        out_channels=4, pos_embed_max_size=64).eval())


def call(n=2, hw=(8, 12), text=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(n, 4, *hw, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(n, text, 16, generator=g).to(dtype),
                timestep=torch.tensor([0.5, 0.02, 0.9][:n]))


def mixed(model):
    """Block layers at assorted formats: W16 (the float paths), branches (their own quantization calls), to_q at
    another activation spec than to_k/to_v, the rest W4A8."""
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("joint_transformer_blocks.0.attn.to_k", LayerConfig(16, 16)) \
        .with_layer("joint_transformer_blocks.0.ff_context.out_projection", LayerConfig(16, 16)) \
        .with_layer("joint_transformer_blocks.1.attn.add_q_proj", LayerConfig(4, 4)) \
        .with_layer("joint_transformer_blocks.1.attn.to_out.0", LayerConfig(8, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("single_transformer_blocks.0.ff.linear_2", LayerConfig(4, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("single_transformer_blocks.1.ff.linear_1", LayerConfig(16, 16)) \
        .with_layer("single_transformer_blocks.1.attn.to_out.0", LayerConfig(16, 16))


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    model = tiny()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert all(type(b) is FusedAuraFlowJointTransformerBlock for b in fused.joint_transformer_blocks)
    assert all(type(b) is FusedAuraFlowSingleTransformerBlock for b in fused.single_transformer_blocks)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(), call(n=3, hw=(12, 8), text=5, seed=1)):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        exact(got, want)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.15
    if kind == "W4A8":
        assert count_kernels(fused, call())[0] == PER_FORWARD
        assert count_kernels(unfused, call())[0] == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


def test_both_streams_of_a_joint_block():
    """The model drops the last joint block's text output into the single blocks: a block's two outputs compared
    directly, and a single block's."""
    model = tiny()
    unfused, fused = pair(model, mixed(model))
    g = torch.Generator().manual_seed(5)
    h, c = torch.randn(2, 24, 32, generator=g), torch.randn(2, 6, 32, generator=g)
    temb = torch.randn(2, 32, generator=g)
    with torch.no_grad():
        for i in (0, 1):
            got = fused.joint_transformer_blocks[i](h, c, temb)
            want = unfused.joint_transformer_blocks[i](h, c, temb)
            assert len(got) == 2
            for a, b in zip(got, want, strict=True):
                exact(a, b)
            exact(fused.single_transformer_blocks[i](h, temb), unfused.single_transformer_blocks[i](h, temb))


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    from diffusers.models.attention_processor import AuraFlowAttnProcessor2_0

    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample
    full = PER_FORWARD["ln"]
    # (a hook on a norm or the attention: the block runs diffusers' forward; on a feed-forward or a packed linear of
    # it: that feed-forward runs as the module, one quantization less)
    hooks_cost(fused, [("joint_transformer_blocks.0." + p, 4) for p in (
        "norm1", "norm1.norm", "norm1_context", "norm1_context.norm", "norm2", "norm2_context", "attn",
        "attn.to_k", "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out")]
        + [("single_transformer_blocks.1." + p, 2) for p in ("norm1", "norm2", "attn", "attn.to_q")]
        + [("joint_transformer_blocks.1." + p, 1) for p in ("ff", "ff_context.linear_2", "ff.out_projection")]
        + [("single_transformer_blocks.0.ff.linear_1", 1)], kw, want, full, exact)
    # attention kwargs, a temb broadcast over the batch: diffusers' forward
    block = fused.joint_transformer_blocks[0]
    h, c, temb = torch.randn(2, 24, 32), torch.randn(2, 6, 32), torch.randn(1, 32)
    calls = []
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr("treeq_engine.runtime.auraflow_fused._stream_attention", lambda *a: calls.append(1))
        out = block(h, c, temb)
        assert [t.shape for t in out] == [c.shape, h.shape]
        assert fused.single_transformer_blocks[0](h, temb).shape == h.shape
        # (diffusers' Attention logs that it drops what its processor does not take)
        assert block(h, c, torch.randn(2, 32), attention_kwargs={"unknown": 1})[1].shape == h.shape
    assert not calls
    another_processor_then_training(fused, fused.single_transformer_blocks[0].attn, AuraFlowAttnProcessor2_0, kw,
                                    want, full, 2)

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    quantized.joint_transformer_blocks[0].norm2_context = torch.nn.LayerNorm(32)   # (affine: not the structure)
    with pytest.raises(ValueError, match="FusedAuraFlowJointTransformerBlock handles AuraFlowJointTransformerBlock"):
        FusedAuraFlowJointTransformerBlock(quantized.joint_transformer_blocks[0])
    with pytest.raises(ValueError, match="FusedAuraFlowSingleTransformerBlock handles"):
        FusedAuraFlowSingleTransformerBlock(quantized.joint_transformer_blocks[1])


def test_broadcast_batches_and_promoted_dtypes_run_diffusers_forward():
    """A text or temb batch of 1 for latents of 2 (diffusers broadcasts them), a float32 temb for bf16 rows (diffusers
    promotes the block's rows and returns float32): diffusers' forward, its output and dtype; the adaLN linears run
    once per call, as unfused."""
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    kw["encoder_hidden_states"] = kw["encoder_hidden_states"][:1]
    with torch.no_grad():
        exact(fused(**kw).sample, unfused(**kw).sample)
    g = torch.Generator().manual_seed(7)
    h, c = torch.randn(2, 24, 32, generator=g), torch.randn(2, 6, 32, generator=g)
    temb = torch.randn(1, 32, generator=g)
    for m in (fused, unfused):
        seen = []
        for blocks in (m.joint_transformer_blocks, m.single_transformer_blocks):
            blocks[0].norm1.linear.register_forward_pre_hook(lambda *a: seen.append(1))
        with torch.no_grad():
            out = m.joint_transformer_blocks[0](h, c, temb), m.single_transformer_blocks[0](h, temb)
        assert len(seen) == 2
        if m is fused:
            got = out
    for a, b in zip((*got[0], got[1]), (*out[0], out[1]), strict=True):
        exact(a, b)

    model = tiny().to(torch.bfloat16)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 8, 8), dtype=torch.bfloat16)
    h, c, temb = h.bfloat16(), c.bfloat16(), temb.expand(2, 32)
    with torch.no_grad():
        for args in ((h, c, temb), (h, c.float(), temb.bfloat16())):
            got, want = fused.joint_transformer_blocks[0](*args), unfused.joint_transformer_blocks[0](*args)
            assert [t.dtype for t in got] == [t.dtype for t in want]
            for a, b in zip(got, want, strict=True):
                exact(a, b)
        seen = []
        for m in (fused, unfused):
            m.single_transformer_blocks[0].norm1.linear.register_forward_pre_hook(lambda *a: seen.append(1))
        got, want = fused.single_transformer_blocks[0](h, temb), unfused.single_transformer_blocks[0](h, temb)
    assert got.dtype == want.dtype == torch.float32 and len(seen) == 2   # (the adaLN linear once in each)
    exact(got, want)


def test_the_joint_attention_with_another_processor():
    """The joint block's attention given another processor (a subclass, or diffusers' fused-projection one on
    projections fused by hand): diffusers' forward; packed projections with the fused flag: an error."""
    from diffusers.models.attention_processor import AuraFlowAttnProcessor2_0

    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample
    attn = fused.joint_transformer_blocks[1].attn
    attn.fused_projections = True
    with pytest.raises(RuntimeError, match="fused_projections is set on an attention with packed projections"):
        with torch.no_grad():
            fused(**kw)
    attn.fused_projections = False
    another_processor_then_training(fused, attn, AuraFlowAttnProcessor2_0, kw, want, PER_FORWARD["ln"], 4)


def test_bf16():
    half_agrees(tiny().to(torch.bfloat16), call(dtype=torch.bfloat16))


def test_a_block_cache_on_a_partly_fused_model():
    """diffusers has no block registry entry for AuraFlow's blocks: the fused classes' go to the originals too, so
    FirstBlockCache takes a model with a block left unfused (weight-only); its second, cached call of the same input
    returns the first's output, the single block after the first skipped."""
    from diffusers.hooks import apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    model = tiny()
    plan = QuantPlan.block_uniform(model, 4, 8)
    for n in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.linear_1", "ff.linear_2",
              "ff.out_projection"):
        plan = plan.with_layer(f"single_transformer_blocks.1.{n}", LayerConfig(4, 16))
    _, partly = pair(model, plan)
    assert [type(b).__name__ for b in partly.single_transformer_blocks] == ["FusedAuraFlowSingleTransformerBlock",
                                                                            "AuraFlowSingleTransformerBlock"]
    apply_first_block_cache(partly, diffusers.FirstBlockCacheConfig(threshold=0.5))
    _set_cache_context(partly, CacheContext("test"))   # (what a CacheMixin's cache_context does)
    kw = call()
    ran = []
    partly.single_transformer_blocks[1].ff.linear_1.register_forward_pre_hook(lambda *a: ran.append(1))
    with torch.no_grad():
        first = partly(**kw).sample
        assert ran
        ran.clear()
        calls, again = count_kernels(partly, kw)
    torch.testing.assert_close(again, first, rtol=1e-5, atol=1e-5)
    # (diffusers' block caches look for blocks under "transformer_blocks" and "single_transformer_blocks": the
    # joint blocks always run, the first single block is the cache's head, the second was skipped)
    assert not ran and calls["ln"] == 2 * 2 * 2 + 2


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    gpu_fused_matches(tiny(), call(dtype=torch.bfloat16), PER_FORWARD)
