"""Fused HunyuanImage 2.1 blocks (`runtime/hunyuan_fused.py`): diffusers' copies of HunyuanVideo's double- and
single-stream blocks (the double block's rotary argument renamed ``image_rotary_emb``; its processor computes
HunyuanVideo's). The fused model equals the unfused packed one (float32, the reference backend: the image tokens
first, the rotary embedding on them only, the prompt's padding masked), the fused kernels run, and what the fused path
cannot reproduce runs diffusers' own forward."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
pytest.importorskip("diffusers.models.transformers.transformer_hunyuanimage", reason="diffusers before HunyuanImage")

from test_hunyuan_fused import PER_FORWARD, blocks, mask_is_read, mixed  # noqa: E402
from test_mmdit_fused import (another_processor_and_training, count_kernels, flux_style_parts_fall_back,  # noqa: E402
                              gpu_fused_matches, half_agrees, pair)
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import QuantPlan  # noqa: E402
from treeq_engine.runtime import hunyuan_fused, quantize  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**config):
    """One double-stream and two single-stream blocks, a one-block token refiner (as test_hunyuan_fused's)."""
    torch.manual_seed(0)
    config = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                  num_single_layers=2, num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=16,
                  rope_axes_dim=(4, 4)) | config
    return perturbed(diffusers.HunyuanImageTransformer2DModel(**config).eval())


def call(n=2, hw=(4, 6), text=6, seed=0, dtype=torch.float32, padded=True):
    """Latents, a prompt (the first sample's two tokens shorter, masked), the timestep (in the latents' dtype, as the
    pipeline passes it)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, text)
    if padded:
        mask[0, text - 2:] = 0
    return dict(hidden_states=torch.randn(n, 4, *hw, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(n, text, 16, generator=g).to(dtype),
                encoder_attention_mask=mask.to(dtype), timestep=torch.tensor([500.0, 20.0] * n)[:n].to(dtype))


@pytest.mark.parametrize("kind", ["W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    model = tiny()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, 4, 8)
    unfused, fused = pair(model, plan)
    assert [type(b).__name__ for b in blocks(fused)] == ["FusedHunyuanImageTransformerBlock"] + \
        ["FusedHunyuanImageSingleTransformerBlock"] * 2
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(), call(n=3, hw=(6, 4), text=7, seed=1, padded=False)):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.15
    mask_is_read(fused, unfused, call)
    if kind == "W4A8":
        assert count_kernels(fused, call())[0] == PER_FORWARD
        assert count_kernels(unfused, call())[0] == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


def _masks(n=3):
    first, second = torch.ones(n, 6), torch.ones(n, 5)
    first[0, 4:], first[2, 2:], second[1, 3:], second[2, 1:] = 0, 0, 0, 0
    return first, second


VARIANTS = {   # name: (the model's configuration, what the call adds or changes)
    "a second text encoder (byT5), padded otherwise than the first": (
        dict(text_embed_2_dim=12), lambda g: dict(encoder_hidden_states_2=torch.randn(3, 5, 12, generator=g),
                                                  encoder_attention_mask_2=_masks()[1])),
    "guidance distilled, meanflow": (dict(guidance_embeds=True, use_meanflow=True),
                                     lambda g: dict(timestep_r=torch.tensor([250.0, 10.0, 450.0]),
                                                    guidance=torch.full((3,), 3500.0))),
    "2x2 patches of a 4x8 latent": (dict(patch_size=(2, 2)), lambda g: dict(hidden_states=torch.randn(3, 4, 4, 8,
                                                                                                     generator=g))),
    "the refiner's video-like latents": (
        dict(patch_size=(1, 1, 1), rope_axes_dim=(4, 2, 2), guidance_embeds=True),
        lambda g: dict(hidden_states=torch.randn(3, 4, 2, 4, 6, generator=g), guidance=torch.full((3,), 3500.0))),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_model_s_variants(variant):
    """HunyuanImage 2.1's other inputs and configurations: fused equals unfused, every block fused."""
    config, extra = VARIANTS[variant]
    model = tiny(**config)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(3, 4, 4, 6, generator=g), timestep=torch.tensor([500.0, 20.0, 900.0]),
              encoder_hidden_states=torch.randn(3, 6, 16, generator=g), encoder_attention_mask=_masks()[0])
    kw |= extra(g)
    calls, got = count_kernels(fused, kw)
    assert calls == PER_FORWARD
    with torch.no_grad():
        torch.testing.assert_close(got, unfused(**kw).sample, rtol=1e-5, atol=1e-5)


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    """Hooks on a block's parts, another processor (the double block's and a single block's), training: diffusers'
    forward, the same output. HunyuanVideo's fused classes do not take HunyuanImage's blocks."""
    from diffusers.models.transformers.transformer_hunyuanimage import HunyuanImageAttnProcessor

    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample
    flux_style_parts_fall_back(fused, kw, want, PER_FORWARD["ln"])
    other = type("OtherProcessor", (HunyuanImageAttnProcessor,), {})
    fused.transformer_blocks[0].attn.set_processor(other())
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == PER_FORWARD["ln"] - 4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    fused.transformer_blocks[0].attn.set_processor(HunyuanImageAttnProcessor())
    another_processor_and_training(fused, fused.single_transformer_blocks[0].attn, HunyuanImageAttnProcessor, kw,
                                   want, PER_FORWARD["ln"] - 1)

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    for cls, block in ((hunyuan_fused.FusedHunyuanVideoTransformerBlock, quantized.transformer_blocks[0]),
                       (hunyuan_fused.FusedHunyuanVideoSingleTransformerBlock, quantized.single_transformer_blocks[0])):
        with pytest.raises(ValueError, match=f"{cls.__name__} handles .*transformer_hunyuan_video.HunyuanVideo"):
            cls(block)


def test_bf16():
    half_agrees(tiny().to(torch.bfloat16), call(dtype=torch.bfloat16))


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    gpu_fused_matches(tiny().to(torch.bfloat16), call(dtype=torch.bfloat16), PER_FORWARD)
