"""Fused HunyuanVideo 1.5 blocks (`runtime/hunyuan15_fused.py`): what they compute equals the unfused packed model
(float32, the reference backend: HunyuanVideo's fused double block with HunyuanVideo 1.5's mask, the prompt's
padding hidden both ways), the fused kernels actually run, and everything the fused path cannot reproduce runs
diffusers' own forward: hooks, training, another attention processor."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
if not hasattr(diffusers, "HunyuanVideo15Transformer3DModel"):
    pytest.skip("this diffusers has no HunyuanVideo 1.5", allow_module_level=True)

from test_hunyuan_fused import mask_is_read  # noqa: E402
from test_mmdit_fused import (another_processor_and_training, count_kernels, gpu_fused_matches,  # noqa: E402
                             half_agrees, hooked_parts_fall_back, pair)
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.hunyuan15_fused import FusedHunyuanVideo15TransformerBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# per block and stream: q/k/v and the feed-forward quantize with the LayerNorm, GELU and codes in fc1's epilogue,
# the gated residuals in to_out's / to_add_out's and fc2's
PER_FORWARD = {"ln": 2 * 4, "gelu": 2 * 2, "residual": 2 * 4, "codes_out": 2 * 2}


def tiny_hunyuan15():
    """A HunyuanVideo 1.5 transformer of two blocks and a one-block token refiner (random weights, perturbed off
    diffusers' zero initialisations)."""
    torch.manual_seed(0)
    return perturbed(diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v").eval())


def call(n=2, fhw=(1, 8, 8), text=6, seed=0, dtype=torch.float32, padded=True, image=False):
    """The pipeline's call: latents, the two prompts (the first sample's shorter by two tokens and one, masked), no
    image (zeros: text to video) or one, the timestep."""
    g = torch.Generator().manual_seed(seed)
    mask, mask_2 = torch.ones(n, text), torch.ones(n, 4)
    if padded:
        mask[0, text - 2:] = 0
        mask_2[0, 3:] = 0
    images = torch.randn(n, 3, 12, generator=g) if image else torch.zeros(n, 3, 12)
    return dict(hidden_states=torch.randn(n, 4, *fhw, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(n, text, 16, generator=g).to(dtype),
                encoder_hidden_states_2=torch.randn(n, 4, 8, generator=g).to(dtype),
                encoder_attention_mask=mask.to(dtype), encoder_attention_mask_2=mask_2.to(dtype),
                image_embeds=images.to(dtype), timestep=torch.tensor([500.0, 20.0, 900.0][:n]).to(dtype))


def mixed(model):
    """Block layers at assorted formats: W16 (the float paths), branches, to_q at another activation spec."""
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("transformer_blocks.0.attn.to_k", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.ff.net.2", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.1.attn.to_q", LayerConfig(4, 4)) \
        .with_layer("transformer_blocks.1.attn.to_add_out", LayerConfig(8, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("transformer_blocks.1.ff_context.net.0.proj", LayerConfig(4, 8, branch=BranchConfig("monarch", 2)))


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    model = tiny_hunyuan15()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert [type(b) for b in fused.transformer_blocks] == [FusedHunyuanVideo15TransformerBlock] * 2
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(), call(n=3, fhw=(2, 4, 6), text=7, seed=1, padded=False, image=True)):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.1
    mask_is_read(fused, unfused, call)


def test_the_fused_kernels_run_and_what_they_cannot_run_runs_diffusers_forward():
    from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

    model = tiny_hunyuan15()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    assert count_kernels(fused, kw)[0] == PER_FORWARD
    assert count_kernels(unfused, kw)[0] == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}
    with torch.no_grad():
        want = unfused(**kw).sample
    hooked_parts_fall_back(fused, fused.transformer_blocks[0], ("norm1", "norm2_context", "attn", "attn.add_k_proj",
                                                                "attn.to_out.0", "attn.to_add_out"), kw, want,
                           PER_FORWARD["ln"] // 2)
    another_processor_and_training(fused, fused.transformer_blocks[1].attn, HunyuanVideo15AttnProcessor2_0, kw, want,
                                   PER_FORWARD["ln"] // 2)


def test_only_blocks_with_something_to_fuse_are_swapped():
    model = tiny_hunyuan15()
    fused = quantize(copy.deepcopy(model), QuantPlan.block_uniform(model, 4, 16), dtype=torch.float32)
    assert not any(isinstance(b, FusedHunyuanVideo15TransformerBlock) for b in fused.transformer_blocks)


def test_the_mask_hides_the_padding_both_ways():
    """The processor's mask is the outer product of the prompt mask with itself: a padded text row sees nothing
    (its output is then what the attention gives a row with no key), not the image. Held on a block's text output,
    which the model's output never shows."""
    model = tiny_hunyuan15()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    g = torch.Generator().manual_seed(0)
    h, c = torch.randn(2, 16, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    temb = torch.randn(2, 16, generator=g)
    mask = torch.ones(2, 5)
    mask[0, 3:] = 0
    with torch.no_grad():
        want = unfused.transformer_blocks[0](h, c, temb, mask, None)
        got = fused.transformer_blocks[0](h, c, temb, mask, None)
    assert type(fused.transformer_blocks[0]) is FusedHunyuanVideo15TransformerBlock
    for w, o in zip(want, got):
        torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-5)


def test_bf16():
    half_agrees(tiny_hunyuan15().to(torch.bfloat16), call(dtype=torch.bfloat16))


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    """The same on the GPU's kernels (CUDA or Triton, whichever the dispatcher picks), bf16, the mask included."""
    gpu_fused_matches(tiny_hunyuan15(), call(dtype=torch.bfloat16), PER_FORWARD)
