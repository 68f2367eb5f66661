"""Fused HunyuanVideo blocks (`runtime/hunyuan_fused.py`): what they compute equals the unfused packed model (float32,
the reference backend: LayerNorm + modulate in the quantization kernel, GELU and the gated residuals in the
epilogues, the image tokens first and the rotary embedding on them only, the prompt's padding masked), the fused
kernels actually run, and everything the fused path cannot reproduce runs diffusers' own forward: hooks, training,
another attention processor."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from test_mmdit_fused import (another_processor_and_training, count_kernels,  # noqa: E402
                             flux_style_parts_fall_back, fused_kernels_run, gpu_fused_matches, half_agrees, pair)
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.hunyuan_fused import (FusedHunyuanVideoSingleTransformerBlock,  # noqa: E402
                                                FusedHunyuanVideoTransformerBlock)

pytestmark = pytest.mark.usefixtures("one_thread")
# one double block (per stream: q/k/v and the feed-forward), two single blocks
PER_FORWARD = {"ln": 1 * 4 + 2 * 1, "gelu": 1 * 2 + 2 * 1, "residual": 1 * 4 + 2 * 1, "codes_out": 1 * 2}


def tiny_hunyuan():
    """A HunyuanVideo transformer: one double-stream and two single-stream blocks, a one-block token refiner (random
    weights, perturbed off diffusers' zero initialisations)."""
    torch.manual_seed(0)
    return perturbed(diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)).eval())


def call(n=2, fhw=(2, 4, 6), text=6, seed=0, dtype=torch.float32, padded=True):
    """The pipeline's call: latents, a prompt (the first sample's two tokens shorter, masked), CLIP's pooled
    projection, the timestep and the embedded guidance."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, text)
    if padded:
        mask[0, text - 2:] = 0
    return dict(hidden_states=torch.randn(n, 4, *fhw, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(n, text, 16, generator=g).to(dtype),
                pooled_projections=torch.randn(n, 8, generator=g).to(dtype), encoder_attention_mask=mask.to(dtype),
                timestep=torch.tensor([500.0, 20.0] * n)[:n], guidance=torch.full((n,), 6000.0).to(dtype))


def mixed(model):
    """Block layers at assorted formats: W16 (the float paths), branches (their own quantization calls), to_q at
    another activation spec than to_k/to_v, the rest W4A8."""
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("transformer_blocks.0.attn.to_k", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.ff.net.2", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.attn.to_add_out", LayerConfig(16, 16)) \
        .with_layer("single_transformer_blocks.1.attn.to_q", LayerConfig(4, 4)) \
        .with_layer("transformer_blocks.0.ff_context.net.0.proj",
                    LayerConfig(4, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("single_transformer_blocks.0.proj_mlp", LayerConfig(16, 16)) \
        .with_layer("single_transformer_blocks.1.proj_out", LayerConfig(8, 8, branch=BranchConfig("monarch", 2)))


def blocks(model):
    return list(model.transformer_blocks) + list(model.single_transformer_blocks)


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    model = tiny_hunyuan()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert [type(b) for b in blocks(fused)] == [FusedHunyuanVideoTransformerBlock] + \
        [FusedHunyuanVideoSingleTransformerBlock] * 2
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(), call(n=3, fhw=(1, 6, 4), text=7, seed=1, padded=False)):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.1
    mask_is_read(fused, unfused, call)


def mask_is_read(fused, unfused, call):
    """Hiding more of the first prompt (``call()``'s encoder_attention_mask) changes its sample, fused as unfused:
    the mask is read."""
    kw = call()
    kw["encoder_attention_mask"][0, :3] = 0
    with torch.no_grad():
        masked, want = fused(**kw).sample, unfused(**kw).sample
        torch.testing.assert_close(masked, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(masked[0], fused(**call()).sample[0])


def test_the_fused_kernels_run():
    """Per double block and stream: one LayerNorm-fused quantization for q/k/v and one for the feed-forward, GELU and
    the next layer's codes in each feed-forward's first epilogue, two gated residuals per stream; per single block one
    quantization for proj_mlp + q/k/v, GELU in proj_mlp's epilogue, the gated residual in proj_out's."""
    fused_kernels_run(tiny_hunyuan(), call(), PER_FORWARD)


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    model = tiny_hunyuan()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample
    # a hook on a double block's norm, its attention or a packed projection: that block runs diffusers' forward
    flux_style_parts_fall_back(fused, kw, want, PER_FORWARD["ln"])
    other = type("OtherProcessor", (HunyuanVideoAttnProcessor2_0,), {})   # (the double block's attention too)
    fused.transformer_blocks[0].attn.set_processor(other())
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == PER_FORWARD["ln"] - 4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    fused.transformer_blocks[0].attn.set_processor(HunyuanVideoAttnProcessor2_0())
    another_processor_and_training(fused, fused.single_transformer_blocks[0].attn, HunyuanVideoAttnProcessor2_0, kw,
                                   want, PER_FORWARD["ln"] - 1)


def test_framepack_blocks_fuse_too():
    """HunyuanVideo FramePack builds its blocks from the same classes: they fuse, and agree with the unfused model
    with its history latents, at one sample (no mask: the text cut to its length) and two (the mask)."""
    torch.manual_seed(0)
    model = perturbed(diffusers.HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), has_image_proj=True, image_proj_dim=8,
        has_clean_x_embedder=True).eval())
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    assert [type(b) for b in blocks(fused)] == [FusedHunyuanVideoTransformerBlock] + \
        [FusedHunyuanVideoSingleTransformerBlock] * 2
    for n in (1, 2):
        g = torch.Generator().manual_seed(n)
        mask = torch.ones(n, 6)
        mask[0, 4:] = 0

        def r(*shape):
            return torch.randn(*shape, generator=g)

        kw = dict(hidden_states=r(n, 4, 2, 8, 8), timestep=torch.tensor([500.0, 20.0][:n]),
                  encoder_hidden_states=r(n, 6, 16), encoder_attention_mask=mask, pooled_projections=r(n, 8),
                  image_embeds=r(n, 3, 8), indices_latents=torch.arange(2), latents_clean=r(n, 4, 1, 8, 8),
                  indices_latents_clean=torch.tensor([3]), latents_history_2x=r(n, 4, 2, 8, 8),
                  indices_latents_history_2x=torch.tensor([4, 5]), latents_history_4x=r(n, 4, 4, 8, 8),
                  indices_latents_history_4x=torch.arange(6, 10), guidance=torch.full((n,), 6000.0))
        calls, got = count_kernels(fused, kw)
        with torch.no_grad():
            want = unfused(**kw).sample
        assert calls["ln"] == PER_FORWARD["ln"]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_only_blocks_with_something_to_fuse_are_swapped():
    model = tiny_hunyuan()
    fused = quantize(copy.deepcopy(model), QuantPlan.block_uniform(model, 4, 16), dtype=torch.float32)
    assert not any(type(b).__name__.startswith("Fused") for b in blocks(fused))   # weight-only: nothing to fuse
    plan = QuantPlan.block_uniform(model, 4, 8)
    for n in ("proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v", "proj_out"):
        plan = plan.with_layer(f"single_transformer_blocks.1.{n}", LayerConfig(4, 16))
    fused = quantize(copy.deepcopy(model), plan, dtype=torch.float32)
    assert type(fused.single_transformer_blocks[1]).__name__ == "HunyuanVideoSingleTransformerBlock"
    assert isinstance(fused.single_transformer_blocks[0], FusedHunyuanVideoSingleTransformerBlock)


def test_bf16_and_the_block_registry():
    """In bf16 the fused model agrees with the unfused one to the dtype's rounding; diffusers' block-level hooks find
    the fused classes in its registry (both return (hidden_states, encoder_hidden_states))."""
    half_agrees(tiny_hunyuan().to(torch.bfloat16), call(dtype=torch.bfloat16))
    from diffusers.hooks._helpers import TransformerBlockRegistry

    for cls in (FusedHunyuanVideoTransformerBlock, FusedHunyuanVideoSingleTransformerBlock):
        meta = TransformerBlockRegistry.get(cls)
        assert (meta.return_hidden_states_index, meta.return_encoder_hidden_states_index) == (0, 1)


def test_float16_overflows_as_diffusers_blocks_do():
    """HunyuanVideo's blocks do not clip float16 outputs to its range (Flux's do): the fused ones neither, so an
    overflow shows as it would unfused."""
    model = tiny_hunyuan().half()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 8, 8), dtype=torch.float16)
    g = torch.Generator().manual_seed(0)
    h = ((torch.rand(2, 24, 20, generator=g) * 2 - 1) * 63000).half()
    c = ((torch.rand(2, 6, 20, generator=g) * 2 - 1) * 63000).half()
    temb = (torch.randn(2, 20, generator=g) * 200).half()
    mask = torch.ones(2, 1, 1, 30, dtype=torch.bool)
    for name in ("transformer_blocks", "single_transformer_blocks"):
        assert type(getattr(fused, name)[0]).__name__.startswith("Fused")
        with torch.no_grad():
            want = getattr(unfused, name)[0](h, c, temb, mask, None)
            got = getattr(fused, name)[0](h, c, temb, mask, None)
        assert any(bool(torch.isinf(w).any()) for w in want), name   # (the inputs overflow float16 there)
        for w, o in zip(want, got):
            assert torch.equal(torch.isinf(w), torch.isinf(o)), name


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    """The same on the GPU's kernels (CUDA or Triton, whichever the dispatcher picks), bf16, the mask included."""
    gpu_fused_matches(tiny_hunyuan(), call(dtype=torch.bfloat16), PER_FORWARD)
