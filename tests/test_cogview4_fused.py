"""Fused CogView4 blocks (`runtime/cogview4_fused.py`): what they compute equals the unfused packed model (float32,
the reference backend: each stream's LayerNorm + modulate in the quantization kernel, GELU and the gated residuals
in the epilogues, the attention the processor's, its text mask included), the fused kernels run, and what the fused
path cannot reproduce runs diffusers' own forward: hooks on the norms or on anything the two streams share, another
processor, training, attention kwargs, a rotary table per sample."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from test_mmdit_fused import (another_processor_and_training, count_kernels, gpu_fused_matches,  # noqa: E402
                              half_agrees, pair)
from test_zimage_fused import exact, hooks_cost  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.cogview4_fused import FusedCogView4TransformerBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# per block and stream (image, text): one LayerNorm-fused quantization for q/k/v and one for the feed-forward, GELU
# and the next layer's codes in the feed-forward's first epilogue, two gated residuals
PER_FORWARD = {"ln": 2 * 2 * 2, "gelu": 2 * 2, "residual": 2 * 2 * 2, "codes_out": 2 * 2}


def tiny():
    """Two blocks (random weights, perturbed off diffusers' zero initialisations)."""
    torch.manual_seed(0)
    return perturbed(diffusers.CogView4Transformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2, out_channels=4,
        text_embed_dim=8, time_embed_dim=8, condition_dim=4).eval())


def call(n=2, hw=(8, 12), text=6, seed=0, dtype=torch.float32, padded=False):
    """The pipeline's call: latents, the prompt (``padded``: the first sample's last two tokens marked padding in
    the mask), the timestep, the size conditions."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(hidden_states=torch.randn(n, 4, *hw, generator=g).to(dtype),
              encoder_hidden_states=torch.randn(n, text, 8, generator=g).to(dtype),
              timestep=torch.tensor([500, 20, 900][:n]), original_size=torch.tensor([[64, 64]] * n),
              target_size=torch.tensor([[64, 96]] * n), crop_coords=torch.zeros(n, 2, dtype=torch.long))
    if padded:
        mask = torch.ones(n, text)
        mask[0, -2:] = 0
        kw["attention_mask"] = mask
    return kw


def mixed(model):
    """Block layers at assorted formats: W16 (the float paths), branches (their own quantization calls), to_q at
    another activation spec than to_k/to_v, the rest W4A8."""
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("transformer_blocks.0.attn1.to_k", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.ff.net.2", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.1.attn1.to_q", LayerConfig(4, 4)) \
        .with_layer("transformer_blocks.1.attn1.to_out.0", LayerConfig(8, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("transformer_blocks.1.ff.net.0.proj", LayerConfig(4, 8, branch=BranchConfig("monarch", 2)))


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    model = tiny()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert all(type(b) is FusedCogView4TransformerBlock for b in fused.transformer_blocks)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(), call(n=3, hw=(12, 8), text=5, seed=1, padded=True)):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.15
    if kind == "W4A8":
        assert count_kernels(fused, call())[0] == PER_FORWARD
        assert count_kernels(unfused, call())[0] == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


def test_the_text_mask_is_read():
    """The processor's mask (a 0/1 float matrix added to the scores) changes the output, fused as unfused."""
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call(padded=True)
    with torch.no_grad():
        got = fused(**kw).sample
        torch.testing.assert_close(got, unfused(**kw).sample, rtol=1e-5, atol=1e-5)
        assert float((got - fused(**call()).sample).norm() / got.norm()) > 1e-4


def test_both_streams_of_a_block():
    """The model drops the last block's text output: a block's two outputs compared directly, with a mask."""
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    g = torch.Generator().manual_seed(5)
    h, c, temb = torch.randn(2, 24, 16, generator=g), torch.randn(2, 6, 16, generator=g), torch.randn(2, 8, generator=g)
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    with torch.no_grad():
        got = fused.transformer_blocks[1](h, c, temb, None, mask)
        want = unfused.transformer_blocks[1](h, c, temb, None, mask)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    from diffusers.models.transformers.transformer_cogview4 import CogView4AttnProcessor

    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call(padded=True)
    with torch.no_grad():
        want = unfused(**kw).sample
    block = fused.transformer_blocks[0]
    # (a hook anywhere the two streams share: that block runs diffusers' forward, half the quantizations gone)
    # (a hook on a norm, the attention or a projection, which the processor runs on the joined rows: that block runs
    # diffusers' forward, half the quantizations gone; on the feed-forward, which diffusers too runs per stream, or a
    # packed part of it: each stream's runs as the module; on the adaLN linear, run as the module: none)
    hooks_cost(fused, [(f"transformer_blocks.0.{p}", PER_FORWARD["ln"] // 2) for p in (
        "norm1", "norm1.norm", "norm1.norm_context", "norm2_context", "attn1", "attn1.to_k", "attn1.to_out.0")]
        + [(f"transformer_blocks.0.{p}", 2) for p in ("ff", "ff.net.0", "ff.net.2")]
        + [("transformer_blocks.0.norm1.linear", 0)], kw, want, PER_FORWARD["ln"], exact)
    # attention kwargs, a rotary table per sample (a list), a mask of another text length: diffusers' forward
    h, c = torch.randn(2, 24, 16), torch.randn(2, 6, 16)
    temb = torch.randn(2, 8)
    calls = []
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr("treeq_engine.runtime.cogview4_fused._attention", lambda *a: calls.append(1))
        assert block(h, c, temb, attention_kwargs={"unknown": 1})[0].shape == h.shape   # (diffusers logs it ignores)
        for kwargs in ({"image_rotary_emb": [None, None]}, {"attention_mask": torch.ones(2, 5)}):
            with pytest.raises((RuntimeError, TypeError, AttributeError)):   # (diffusers' own processor refuses it)
                block(h, c, temb, **kwargs)
    assert not calls
    another_processor_and_training(fused, block.attn1, CogView4AttnProcessor, kw, want, PER_FORWARD["ln"] // 2)

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    quantized.transformer_blocks[0].norm2 = torch.nn.LayerNorm(16)   # (an affine LayerNorm: not the structure)
    with pytest.raises(ValueError, match="FusedCogView4TransformerBlock handles CogView4TransformerBlock"):
        FusedCogView4TransformerBlock(quantized.transformer_blocks[0])


def test_bf16():
    model = tiny().to(torch.bfloat16)
    half_agrees(model, call(dtype=torch.bfloat16, padded=True))


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    gpu_fused_matches(tiny(), call(dtype=torch.bfloat16, padded=True), PER_FORWARD)
