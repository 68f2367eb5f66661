"""Fused ConsisID blocks (`runtime/cogvideox_fused.py`): diffusers' ``ConsisIDBlock`` is CogVideoX's block without
the attention's keyword arguments. The fused model equals the unfused packed one (float32, the reference backend),
with the face conditioning (the local facial extractor and the perceiver cross-attentions between blocks) and
without; the fused kernels run, and what the fused path cannot reproduce runs diffusers' own forward."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
pytest.importorskip("diffusers.models.transformers.consisid_transformer_3d", reason="diffusers before ConsisID")

from test_mmdit_fused import (another_processor_and_training, count_kernels, gpu_fused_matches,  # noqa: E402
                              half_agrees, pair)
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import cogvideox_fused, quantize  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
HEAD_DIM = 24
# per block and stream (video, text): one LayerNorm-fused quantization for q/k/v and one for the feed-forward, GELU
# and the next layer's codes in the feed-forward's first epilogue, two gated residuals (as CogVideoX's)
PER_FORWARD = {"ln": 2 * 2 * 2, "gelu": 2 * 2, "residual": 2 * 2 * 2, "codes_out": 2 * 2}


def tiny(face=False):
    """Two blocks; ``face``: the identity conditioning (a two-stage local facial extractor, a perceiver
    cross-attention after every block)."""
    torch.manual_seed(0)
    extra = dict(is_train_face=True, LFE_id_dim=16, LFE_vit_dim=16, LFE_depth=2, LFE_dim_head=8, LFE_num_heads=2,
                 LFE_num_id_token=2, LFE_num_querie=4, LFE_output_dim=32, LFE_ff_mult=1, LFE_num_scale=2,
                 cross_attn_interval=1, cross_attn_dim_head=8, cross_attn_num_heads=2) if face else {}
    return perturbed(diffusers.ConsisIDTransformer3DModel(
        num_attention_heads=2, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=8, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=6, use_rotary_positional_embeddings=True, **extra).eval())


def call(n=2, seed=1, face=False, dtype=torch.float32):
    """Latents (N, 2 frames, C, 8, 8), the prompt, the timestep, a rotary table of the video tokens; ``face``: the
    face embedding and two scales of ViT features. (Seed 0 with the face puts an activation of block 1 on a code's
    rounding boundary: the fused LayerNorm and diffusers' round it apart, a 3e-3 difference.)"""
    g = torch.Generator().manual_seed(seed)
    tokens = 2 * 4 * 4
    kw = dict(hidden_states=torch.randn(n, 2, 4, 8, 8, generator=g).to(dtype),
              encoder_hidden_states=torch.randn(n, 6, 8, generator=g).to(dtype),
              timestep=torch.tensor([500, 20, 900][:n]),
              image_rotary_emb=(torch.randn(tokens, HEAD_DIM, generator=g), torch.randn(tokens, HEAD_DIM, generator=g)))
    if face:
        kw.update(id_cond=torch.randn(n, 16, generator=g).to(dtype),
                  id_vit_hidden=[torch.randn(n, 5, 16, generator=g).to(dtype) for _ in range(2)])
    return kw


@pytest.mark.parametrize("face", [False, True])
def test_fused_equals_unfused(face):
    model = tiny(face)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    assert [type(b).__name__ for b in fused.transformer_blocks] == ["FusedConsisIDBlock"] * 2
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for n in (2, 3):
        kw = call(n=n, face=face)
        calls, got = count_kernels(fused, kw)
        assert calls == PER_FORWARD
        with torch.no_grad():
            want, fp = unfused(**kw).sample, model(**kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.15
    if face:   # (the face conditioning matters)
        kw, plain = call(face=True), call(face=True)
        plain["id_cond"] = plain["id_cond"] * 0
        with torch.no_grad():
            got = fused(**kw).sample
            assert float((fused(**plain).sample - got).norm() / got.norm()) > 1e-3


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    """A hooked norm, another processor, training: diffusers' forward, the same output; CogVideoX's fused class does
    not take ConsisID's block."""
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample
    seen = []
    h = fused.transformer_blocks[0].norm1.register_forward_hook(lambda *a: seen.append(1))
    calls, got = count_kernels(fused, kw)
    h.remove()
    assert seen and calls["ln"] == PER_FORWARD["ln"] // 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    another_processor_and_training(fused, fused.transformer_blocks[0].attn1, CogVideoXAttnProcessor2_0, kw, want,
                                   PER_FORWARD["ln"] // 2)
    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    with pytest.raises(ValueError, match="FusedCogVideoXBlock handles .*CogVideoXBlock"):
        cogvideox_fused.FusedCogVideoXBlock(quantized.transformer_blocks[0])


def test_a_block_cache_on_a_partly_fused_model():
    """diffusers has no block registry entry for ConsisID's block: the fused class's goes to the original too, so
    FirstBlockCache takes a model with one block left unfused (weight-only), and its second, cached call of the same
    input returns the first's output. (Without the face: with it, diffusers' block cache gives another output on
    the second call even unquantized, the perceiver cross-attentions between the blocks skipped with them.)"""
    from diffusers.hooks import apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    model = tiny()
    plan = QuantPlan.block_uniform(model, 4, 8)
    for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"):
        plan = plan.with_layer(f"transformer_blocks.1.{n}", LayerConfig(4, 16))
    _, partly = pair(model, plan)
    assert [type(b).__name__ for b in partly.transformer_blocks] == ["FusedConsisIDBlock", "ConsisIDBlock"]
    apply_first_block_cache(partly, diffusers.FirstBlockCacheConfig(threshold=0.5))
    _set_cache_context(partly, CacheContext("test"))   # (what a CacheMixin's cache_context does)
    kw = call()
    with torch.no_grad():
        first, again = partly(**kw).sample, partly(**kw).sample
    torch.testing.assert_close(again, first, rtol=1e-5, atol=1e-5)


def test_bf16():
    half_agrees(tiny(face=True).to(torch.bfloat16), call(face=True, dtype=torch.bfloat16))


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    """The same on the GPU's kernels, bf16 (the model moves the face inputs to the latents' device itself)."""
    gpu_fused_matches(tiny(face=True), call(face=True, dtype=torch.bfloat16), PER_FORWARD)
