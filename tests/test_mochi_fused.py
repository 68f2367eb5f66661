"""Fused Mochi blocks (`runtime/mochi_fused.py`): what they compute equals the unfused packed model (float32, the
reference backend: RMSNorm + modulate in the quantization kernel, per stream; the attention, SwiGLU and the
post-normed gated residuals as diffusers computes them), the last block's text stream (``context_pre_only``) too; the
fused kernels actually run; and everything the fused path cannot reproduce runs diffusers' own forward (or, for a
feed-forward, diffusers' computation of it): hooks, training, another attention processor."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from test_mmdit_fused import count_kernels, gpu_fused_matches, half_agrees, hooked_parts_fall_back, pair  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.mochi_fused import FusedMochiTransformerBlock  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),   # (Mochi's rotary embedding asks CPU autocast for float32)
              pytest.mark.filterwarnings("ignore:In CPU autocast")]
# per block: one RMSNorm-fused quantization per stream for its three projections, one per feed-forward; the last
# block's text stream has projections and no feed-forward. Nothing in an epilogue: the post-norms need whole rows.
PER_BLOCK = 4
PER_FORWARD = {"ln": 2 * PER_BLOCK + 3, "rms": 2 * PER_BLOCK + 3, "gelu": 0, "residual": 0, "codes_out": 0}


def tiny_mochi():
    """A Mochi transformer of three blocks (the last one ``context_pre_only``) with a text width (24) other than the
    video's (16), random weights perturbed off diffusers' zero initialisations, and the blocks' RMSNorms at epsilons
    of their own (the video's 1e-2, the text's 3e-2: an epsilon the kernel takes from the wrong norm shows)."""
    from diffusers.models.normalization import RMSNorm

    torch.manual_seed(0)
    model = perturbed(diffusers.MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=3, pooled_projection_dim=24,
        in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4,
        activation_fn="swiglu", max_sequence_length=16).eval())
    for name, m in model.transformer_blocks.named_modules():
        if isinstance(m, RMSNorm):
            m.eps = 3e-2 if "context" in name else 1e-2
    return model


def call(n=2, frames=2, seed=0, dtype=torch.float32):
    """The pipeline's call: latents (N, 4, F, 8, 8), a 16-token prompt (the first sample's last six tokens masked,
    the others' tokens 3 and 4: diffusers' attention drops them), a timestep per sample."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, 16, dtype=torch.bool)
    mask[0, 10:] = False
    mask[1:, 3:5] = False   # (a hole: diffusers packs the kept tokens first, the fused path must too)
    return dict(hidden_states=torch.randn(n, 4, frames, 8, 8, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(n, 16, 16, generator=g).to(dtype),
                timestep=torch.tensor([500.0, 20.0, 900.0][:n]), encoder_attention_mask=mask)


def mixed(model):
    """Block layers at assorted formats: W16 (the float paths), a branch (its own quantization call), to_q at
    another activation spec than to_k/to_v (no shared call), the rest W4A8."""
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("transformer_blocks.0.attn1.to_k", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.ff_context.net.0.proj", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.1.attn1.to_q", LayerConfig(4, 4)) \
        .with_layer("transformer_blocks.1.attn1.add_v_proj", LayerConfig(8, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("transformer_blocks.2.ff.net.0.proj", LayerConfig(4, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("transformer_blocks.2.attn1.add_q_proj", LayerConfig(16, 16))


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    model = tiny_mochi()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert [type(b) for b in fused.transformer_blocks] == [FusedMochiTransformerBlock] * 3
    assert fused.transformer_blocks[2].context_pre_only
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(), call(n=3, frames=1, seed=1)):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.2


def test_the_fused_kernels_run_and_what_they_cannot_run_runs_diffusers_forward():
    from diffusers.models.attention_processor import MochiAttnProcessor2_0

    model = tiny_mochi()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    assert count_kernels(fused, kw, rms=True)[0] == PER_FORWARD
    assert count_kernels(unfused, kw, rms=True)[0] == {k: 0 for k in PER_FORWARD}
    with torch.no_grad():
        want = unfused(**kw).sample
    # a hook on a norm the kernel computes, on the attention or on a projection the kernels run: diffusers' forward
    hooked_parts_fall_back(fused, fused.transformer_blocks[0], ("norm1", "norm1.norm", "norm3", "norm3.norm",
                                                                "norm1_context", "norm1_context.norm", "norm3_context",
                                                                "norm3_context.norm", "attn1", "attn1.add_k_proj"),
                           kw, want, PER_FORWARD["ln"] - PER_BLOCK)
    hooked_parts_fall_back(fused, fused.transformer_blocks[2], ("norm1_context", "norm1_context.norm.norm",
                                                                "attn1.to_v"), kw, want, PER_FORWARD["ln"] - 3)
    # another processor (a subclass computes what it likes; MochiAttention has no set_processor), then training
    fused.transformer_blocks[1].attn1.processor = type("OtherProcessor", (MochiAttnProcessor2_0,), {})()
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == PER_FORWARD["ln"] - PER_BLOCK
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    fused.train()
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_hooked_feed_forward_runs_as_a_module():
    """A hook on a feed-forward or a part the kernel would run: that feed-forward runs as diffusers computes it (one
    fused quantization fewer), the rest of the block stays fused; hooks on what the fused path calls as modules (the
    post-norms, the output projections and their Dropout, SwiGLU's SiLU, ff.net[2], the per-head norms) see their
    calls."""
    model = tiny_mochi()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample
    block, seen = fused.transformer_blocks[0], []
    for part, fewer in (("ff", 1), ("ff.net.0", 1), ("ff.net.1", 1), ("ff_context.net.0.proj", 1), ("norm2", 0),
                        ("norm4_context", 0), ("attn1.to_out.0", 0), ("attn1.to_out.1", 0), ("attn1.to_add_out", 0),
                        ("ff.net.0.activation", 0), ("ff.net.2", 0), ("attn1.norm_added_q", 0)):
        h = block.get_submodule(part).register_forward_hook(lambda *a: seen.append(1))
        calls, got = count_kernels(fused, kw)
        h.remove()
        assert seen and calls["ln"] == PER_FORWARD["ln"] - fewer, part
        seen.clear()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_padding_is_dropped_as_diffusers_drops_it():
    """The prompt's masked tokens take no part: what they hold does not move the video output, fused or not."""
    model = tiny_mochi()
    _, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    other = dict(kw, encoder_hidden_states=kw["encoder_hidden_states"].clone())
    other["encoder_hidden_states"][0, 10:] = 50.0
    with torch.no_grad():
        a, b = fused(**kw).sample, fused(**other).sample
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    other["encoder_hidden_states"][0, 9] = 50.0   # (an unmasked token does move it)
    with torch.no_grad():
        assert not torch.equal(fused(**other).sample[0], a[0])


def test_a_timestep_batch_the_fused_path_does_not_take_runs_diffusers_forward():
    """diffusers broadcasts a timestep embedding of batch 1 over the block's batch: the fused block runs diffusers'
    forward there (and its adaLN linear once)."""
    model = tiny_mochi()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    g = torch.Generator().manual_seed(3)
    h, e = torch.randn(2, 12, 16, generator=g), torch.randn(2, 5, 24, generator=g)
    temb = torch.randn(1, 16, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    block, seen = fused.transformer_blocks[0], []
    hook = block.norm1.linear.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        want = unfused.transformer_blocks[0](h, e, temb, mask)
        got = block(h, e, temb, mask)
    hook.remove()
    assert seen == [1]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_only_blocks_with_something_to_fuse_are_swapped_bf16_and_the_block_registry():
    from diffusers.hooks._helpers import TransformerBlockRegistry

    model = tiny_mochi()
    weight_only = quantize(copy.deepcopy(model), QuantPlan.block_uniform(model, 4, 16), dtype=torch.float32)
    assert not any(isinstance(b, FusedMochiTransformerBlock) for b in weight_only.transformer_blocks)
    fused = half_agrees(tiny_mochi().to(torch.bfloat16), call(dtype=torch.bfloat16))
    assert count_kernels(fused, call(dtype=torch.bfloat16), rms=True)[0] == PER_FORWARD
    # the mixed plan's float layers read diffusers' rows, in bf16
    unfused, fused = pair(tiny_mochi().to(torch.bfloat16), mixed(model), dtype=torch.bfloat16)
    with torch.no_grad():
        a, b = (m(**call(dtype=torch.bfloat16)).sample.float() for m in (unfused, fused))
    assert torch.isfinite(b).all() and float((b - a).norm() / a.norm()) < 2e-2
    meta = TransformerBlockRegistry.get(FusedMochiTransformerBlock)
    assert (meta.return_hidden_states_index, meta.return_encoder_hidden_states_index) == (0, 1)


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    """The same on the GPU's kernels (CUDA or Triton, whichever the dispatcher picks), bf16."""
    gpu_fused_matches(tiny_mochi(), call(dtype=torch.bfloat16), {k: v for k, v in PER_FORWARD.items() if k != "rms"})
