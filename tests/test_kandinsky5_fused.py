"""Fused Kandinsky 5 blocks (`runtime/kandinsky5_fused.py`): what they compute equals the unfused packed model
(float32, the reference backend: LayerNorm + modulate in the quantization kernels, the feed-forward's gated residual
in its second linear's epilogue, the attentions the processor's own on the kernels' projections), the fused kernels
run, and what the fused path cannot reproduce runs diffusers' own forward: hooks, another processor, training."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
pytest.importorskip("diffusers.models.transformers.transformer_kandinsky", reason="diffusers before Kandinsky 5")

from test_mmdit_fused import another_processor_and_training, count_kernels, pair  # noqa: E402
from test_zimage_fused import exact, hooks_cost  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.kandinsky5_fused import (FusedKandinsky5TransformerDecoderBlock,  # noqa: E402
                                                   FusedKandinsky5TransformerEncoderBlock)

pytestmark = pytest.mark.usefixtures("one_thread")
# the text block: one LayerNorm-fused quantization for q/k/v and one for the feed-forward; each of the two visual
# blocks also one for the cross-attention's query; a gated residual in each feed-forward's second linear
PER_FORWARD = {"ln": 2 + 2 * 3, "gelu": 0, "residual": 1 + 2, "codes_out": 0}


def tiny():
    """One text block and two visual blocks (random weights, perturbed off diffusers' zero initialisations)."""
    torch.manual_seed(0)
    return perturbed(diffusers.Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=16, ff_dim=32, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 2, 2)).eval())


def call(n=2, frames=3, text=12, seed=0):
    """Channels-last latents (N, frames, 8, 8, C), the text, its pooled embedding, the timestep, the rotary
    positions."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(n, frames, 8, 8, 4, generator=g),
                encoder_hidden_states=torch.randn(n, text, 16, generator=g), timestep=torch.tensor([500.0, 20.0][:n]),
                pooled_projections=torch.randn(n, 8, generator=g),
                visual_rope_pos=(torch.arange(frames), torch.arange(4), torch.arange(4)),
                text_rope_pos=torch.arange(text))


def mixed(model):
    """Block layers at assorted formats: W16, branches (their own quantization calls), to_query at another
    activation spec than to_key/to_value, the rest W4A8."""
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("visual_transformer_blocks.0.self_attention.to_key", LayerConfig(16, 16)) \
        .with_layer("visual_transformer_blocks.0.feed_forward.out_layer", LayerConfig(16, 16)) \
        .with_layer("visual_transformer_blocks.1.self_attention.to_query", LayerConfig(4, 4)) \
        .with_layer("visual_transformer_blocks.1.cross_attention.to_query",
                    LayerConfig(4, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("text_transformer_blocks.0.feed_forward.in_layer",
                    LayerConfig(8, 8, branch=BranchConfig("monarch", 2)))


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    model = tiny()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert all(type(b) is FusedKandinsky5TransformerDecoderBlock for b in fused.visual_transformer_blocks)
    assert all(type(b) is FusedKandinsky5TransformerEncoderBlock for b in fused.text_transformer_blocks)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(), call(n=1, frames=2, text=7, seed=1)):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.15
    if kind != "mixed":
        assert count_kernels(fused, call())[0] == PER_FORWARD
        assert count_kernels(unfused, call())[0] == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    from diffusers.models.transformers.transformer_kandinsky import Kandinsky5AttnProcessor

    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample
    block = fused.visual_transformer_blocks[0]
    # a hook on a norm, the modulation, an attention or a projection the kernels run: that block runs diffusers'
    # forward (its three norm-fused quantizations gone); on the feed-forward: that part runs as diffusers computes it
    hooks_cost(fused, [(f"visual_transformer_blocks.0.{p}", fewer) for p, fewer in (
        ("self_attention_norm", 3), ("visual_modulation", 3), ("cross_attention", 3), ("self_attention.to_value", 3),
        ("cross_attention.to_query", 3), ("feed_forward", 1), ("feed_forward.activation", 1))],
        kw, want, PER_FORWARD["ln"], exact)
    # a hook on a projection the processor runs itself (the cross-attention's keys): the fused path keeps it
    seen = []
    h = block.cross_attention.to_key.register_forward_pre_hook(lambda *a: seen.append(1))
    calls, got = count_kernels(fused, kw)
    h.remove()
    assert seen and calls == PER_FORWARD
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    another_processor_and_training(fused, block.self_attention, Kandinsky5AttnProcessor, kw, want,
                                   PER_FORWARD["ln"] - 3)

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    with pytest.raises(ValueError, match="handles Kandinsky5TransformerDecoderBlock"):
        FusedKandinsky5TransformerDecoderBlock(quantized.text_transformer_blocks[0])


def _block_inputs(dtype, device="cpu"):
    g = torch.Generator().manual_seed(3)
    x, text, temb = (torch.randn(2, *s, generator=g) for s in ((48, 16), (12, 16), (16,)))
    return [t.to(device, dtype) for t in (x, text, temb)]


def test_bf16_blocks():
    """In bf16 (diffusers 0.42's own Kandinsky 5 model does not run in bf16: its time embedding feeds a float32
    sinusoid to a bf16 linear) each fused block agrees with the unfused one to bf16's rounding, in bf16."""
    model = tiny().to(torch.bfloat16)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 8, 8), dtype=torch.bfloat16)
    x, text, temb = _block_inputs(torch.bfloat16)
    with torch.no_grad():
        for got, want in ((fused.visual_transformer_blocks[0](x, text, temb, None, None),
                           unfused.visual_transformer_blocks[0](x, text, temb, None, None)),
                          (fused.text_transformer_blocks[0](text, temb, None),
                           unfused.text_transformer_blocks[0](text, temb, None))):
            assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
            assert float((got.float() - want.float()).norm() / want.float().norm()) < 2e-2


def test_the_block_registry_entry():
    """The fused visual block takes diffusers' entry for the original, its argument name (``visual_embed``)
    included: MagCache, which reads the rows by that name, runs on a fused model as on the float one; FirstBlockCache,
    which asks for ``hidden_states`` by that name in diffusers 0.42, fails on a partly fused model as it fails on the
    float one."""
    from diffusers.hooks import apply_first_block_cache
    from diffusers.hooks._helpers import TransformerBlockRegistry
    from diffusers.hooks.hooks import CacheContext, _set_cache_context
    from diffusers.models.transformers.transformer_kandinsky import Kandinsky5TransformerDecoderBlock

    model = tiny()
    plan = QuantPlan.block_uniform(model, 4, 8)
    for n in ("self_attention.to_query", "self_attention.to_key", "self_attention.to_value", "self_attention.out_layer",
              "cross_attention.to_query", "cross_attention.to_key", "cross_attention.to_value",
              "cross_attention.out_layer", "feed_forward.in_layer", "feed_forward.out_layer"):
        plan = plan.with_layer(f"visual_transformer_blocks.1.{n}", LayerConfig(4, 16))
    _, partly = pair(model, plan)
    assert [type(b).__name__ for b in partly.visual_transformer_blocks] == [
        "FusedKandinsky5TransformerDecoderBlock", "Kandinsky5TransformerDecoderBlock"]
    fused, original = (TransformerBlockRegistry.get(c) for c in (FusedKandinsky5TransformerDecoderBlock,
                                                                Kandinsky5TransformerDecoderBlock))
    for field in ("return_hidden_states_index", "return_encoder_hidden_states_index", "hidden_states_argument_name",
                  "encoder_hidden_states_argument_name"):
        assert getattr(fused, field) == getattr(original, field), field
    assert fused.hidden_states_argument_name == "visual_embed"
    for m in (partly, tiny()):
        apply_first_block_cache(m, diffusers.FirstBlockCacheConfig(threshold=0.5))
        _set_cache_context(m, CacheContext("test"))   # (what a CacheMixin's cache_context does)
        with torch.no_grad(), pytest.raises(ValueError, match="'hidden_states' not found"):
            m(**call())
    # MagCache asks for the rows by the entry's name: it runs on a fused model as on the float one
    from diffusers.hooks import apply_mag_cache

    _, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    for m in (fused, tiny()):
        apply_mag_cache(m, diffusers.MagCacheConfig(calibrate=True, num_inference_steps=2))
        _set_cache_context(m, CacheContext("test"))
        with torch.no_grad():
            assert torch.isfinite(m(**call()).sample).all()


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    """The blocks on the GPU's kernels (CUDA or Triton, whichever the dispatcher picks), bf16, a W4A8 plan: the
    fused kernels run, and each block agrees with the unfused one within 8 % (a dropped gate or residual moves the
    output by half its norm or more)."""
    model = tiny()
    plan = QuantPlan.block_uniform(model, 4, 8)
    unfused = quantize(copy.deepcopy(model).cuda(), plan, dtype=torch.bfloat16, fuse=False).to(torch.bfloat16)
    fused = quantize(copy.deepcopy(model).cuda(), plan, dtype=torch.bfloat16).to(torch.bfloat16)
    x, text, temb = _block_inputs(torch.bfloat16, "cuda")
    with torch.no_grad():
        for f, u, args in ((fused.visual_transformer_blocks[0], unfused.visual_transformer_blocks[0],
                            (x, text, temb, None, None)),
                           (fused.text_transformer_blocks[0], unfused.text_transformer_blocks[0], (text, temb, None))):
            got, want = f(*args).float(), u(*args).float()
            assert torch.isfinite(got).all()
            error = float((got - want).norm() / want.norm())
            assert error <= 0.08, f"relative error {error:.3g}"
