"""Fused CogVideoX blocks (`runtime/cogvideox_fused.py`): what they compute equals the unfused packed model (float32,
the reference backend: each stream's LayerNorm, its affine folded into the modulation, + modulate in the
quantization kernel, GELU and the gated residuals in the epilogues, the text first and the rotary embedding on the
video rows only), the fused kernels actually run, and everything the fused path cannot reproduce runs diffusers' own
forward: hooks, training, another attention processor, attention kwargs."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from test_mmdit_fused import (another_processor_and_training, count_kernels, gpu_fused_matches,  # noqa: E402
                             half_agrees, hooked_parts_fall_back, pair)
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.cogvideox_fused import FusedCogVideoXBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# per block and stream: q/k/v and the feed-forward quantize with the LayerNorm, GELU and codes in fc1's epilogue,
# the gated residuals in to_out's and fc2's
PER_FORWARD = {"ln": 2 * 4, "gelu": 2 * 2, "residual": 2 * 4, "codes_out": 2 * 2}
HEAD_DIM = 8


def tiny_cogvideox(affine=True):
    """A CogVideoX transformer of two blocks (random weights, perturbed off diffusers' zero initialisations, the
    LayerNorms' affine too)."""
    torch.manual_seed(0)
    return perturbed(diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=8, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=6, norm_elementwise_affine=affine,
        use_rotary_positional_embeddings=True).eval())


def call(n=2, frames=2, hw=(8, 8), text=6, seed=0, dtype=torch.float32, rotary=True):
    """The pipeline's call: latents (N, F, C, H, W), the prompt, the timestep, and the rotary table of the video
    tokens (random cos and sin: what the pipeline computes is a table of that shape)."""
    g = torch.Generator().manual_seed(seed)
    tokens = frames * (hw[0] // 2) * (hw[1] // 2)
    table = (torch.randn(tokens, HEAD_DIM, generator=g), torch.randn(tokens, HEAD_DIM, generator=g))
    return dict(hidden_states=torch.randn(n, frames, 4, *hw, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(n, text, 8, generator=g).to(dtype),
                timestep=torch.tensor([500, 20, 900][:n]), image_rotary_emb=table if rotary else None)


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
@pytest.mark.parametrize("affine", [True, False])
def test_fused_equals_unfused(kind, affine):
    model = tiny_cogvideox(affine)
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert [type(b) for b in fused.transformer_blocks] == [FusedCogVideoXBlock] * 2
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    if affine:   # (the affine the kernels fold in is not the identity)
        assert not torch.allclose(model.transformer_blocks[0].norm1.norm.weight, torch.ones(1))
    for kw in (call(), call(n=3, frames=1, hw=(8, 12), text=4, seed=1, rotary=False)):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.1


def test_the_fused_kernels_run():
    model = tiny_cogvideox()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    assert count_kernels(fused, call())[0] == PER_FORWARD
    assert count_kernels(unfused, call())[0] == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


def test_what_the_fused_path_cannot_run_runs_diffusers_forward(monkeypatch):
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

    model = tiny_cogvideox()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample
    # a hook on the first block's norms, its attention or a packed projection: that block runs diffusers' forward
    hooked_parts_fall_back(fused, fused.transformer_blocks[0], ("norm1", "norm2.norm", "attn1", "attn1.to_v",
                                                                "attn1.to_out.0"), kw, want, PER_FORWARD["ln"] // 2)
    another_processor_and_training(fused, fused.transformer_blocks[1].attn1, CogVideoXAttnProcessor2_0, kw, want,
                                   PER_FORWARD["ln"] // 2)
    fused.eval()
    fused.transformer_blocks[1].attn1.set_processor(CogVideoXAttnProcessor2_0())
    # the modules both streams share, hooked: called once on the joined rows, as diffusers calls them (the fused
    # path would call them once per stream), whether the kernels run them or not
    plan = QuantPlan.block_uniform(model, 4, 8).with_layer("transformer_blocks.0.attn1.to_out.0", LayerConfig(16, 16))
    unfused16, fused16 = pair(model, plan)
    with torch.no_grad():
        want16 = unfused16(**kw).sample
    for part in ("ff", "ff.net.0", "ff.net.0.proj", "ff.net.1", "attn1.to_out.0"):
        rows = []
        h = fused16.transformer_blocks[0].get_submodule(part).register_forward_pre_hook(
            lambda mod, args: rows.append(args[0].shape[1]))
        calls, got = count_kernels(fused16, kw)
        h.remove()
        assert rows == [6 + 32] and calls["ln"] == PER_FORWARD["ln"] // 2, part
        torch.testing.assert_close(got, want16, rtol=1e-5, atol=1e-5)
    fused.eval()
    block = fused.transformer_blocks[0]
    original = CogVideoXBlock.forward
    seen = []
    monkeypatch.setattr(CogVideoXBlock, "forward", lambda self, *a: seen.append(1) or original(self, *a))
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 8, 16, generator=g), torch.randn(2, 6, 16, generator=g), torch.randn(2, 8, generator=g))
    with torch.no_grad():   # attention kwargs (the processor ignores unknown ones, saying so): diffusers' forward
        got = block(*args, None, {"unknown": 1.0})
        assert seen == [1]
        want = block(*args, None, None)
    assert seen == [1]
    for g_, w in zip(got, want):
        torch.testing.assert_close(g_, w, rtol=1e-5, atol=1e-5)


def test_only_blocks_with_something_to_fuse_are_swapped():
    model = tiny_cogvideox()
    fused = quantize(copy.deepcopy(model), QuantPlan.block_uniform(model, 4, 16), dtype=torch.float32)
    assert not any(isinstance(b, FusedCogVideoXBlock) for b in fused.transformer_blocks)   # weight-only
    plan = QuantPlan.block_uniform(model, 4, 8)
    for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"):
        plan = plan.with_layer(f"transformer_blocks.1.{n}", LayerConfig(4, 16))
    fused = quantize(copy.deepcopy(model), plan, dtype=torch.float32)
    assert type(fused.transformer_blocks[1]).__name__ == "CogVideoXBlock"
    assert isinstance(fused.transformer_blocks[0], FusedCogVideoXBlock)


def test_bf16_and_the_block_registry():
    """In bf16 the fused model agrees with the unfused one to the dtype's rounding; diffusers' block-level hooks find
    the fused class in its registry (it returns (hidden_states, encoder_hidden_states))."""
    half_agrees(tiny_cogvideox().to(torch.bfloat16), call(dtype=torch.bfloat16))
    from diffusers.hooks._helpers import TransformerBlockRegistry

    meta = TransformerBlockRegistry.get(FusedCogVideoXBlock)
    assert (meta.return_hidden_states_index, meta.return_encoder_hidden_states_index) == (0, 1)


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    """The same on the GPU's kernels (CUDA or Triton, whichever the dispatcher picks), bf16."""
    gpu_fused_matches(tiny_cogvideox(), call(dtype=torch.bfloat16), PER_FORWARD)
