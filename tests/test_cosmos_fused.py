"""Fused Cosmos blocks (`runtime/cosmos_fused.py`): what they compute equals the unfused packed model (float32, the
reference backend: LayerNorm + modulate in the quantization kernel, the gated residuals in the epilogues, the
cross-attention as diffusers runs it), with a timestep per sample and per frame (one modulation group per frame);
the fused kernels actually run; and everything the fused path cannot reproduce runs diffusers' own forward: hooks,
training, another attention processor."""
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
from treeq_engine.runtime.cosmos_fused import FusedCosmosTransformerBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# per block: q/k/v and the feed-forward quantize with the LayerNorm; the gated residuals in to_out's and fc2's (the
# exact GELU runs between the linears, not in an epilogue)
PER_FORWARD = {"ln": 2 * 2, "gelu": 0, "residual": 2 * 2, "codes_out": 0}


def tiny_cosmos():
    """A Cosmos transformer of two blocks with a learnable extra positional embedding (random weights, perturbed off
    diffusers' zero initialisations)."""
    torch.manual_seed(0)
    return perturbed(diffusers.CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2, mlp_ratio=2,
        text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=False, extra_pos_embed_type="learnable").eval())


def call(n=2, frames=2, seed=0, dtype=torch.float32, per_frame=False):
    """The pipeline's call: latents (N, C, F, 16, 16), the prompt (the first sample's last four tokens masked), the
    timestep per sample, or per frame (video to world: the first frame, the condition, at 0)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, 12)
    mask[0, 8:] = 0
    timestep = torch.tensor([500.0, 20.0, 900.0][:n])
    if per_frame:
        timestep = timestep.view(n, 1, 1, 1, 1).expand(n, 1, frames, 1, 1).clone()
        timestep[:, :, 0] = 0
    return dict(hidden_states=torch.randn(n, 4, frames, 16, 16, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(n, 12, 16, generator=g).to(dtype), timestep=timestep.to(dtype),
                attention_mask=mask.to(dtype), fps=30)


def mixed(model):
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("transformer_blocks.0.attn1.to_k", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.ff.net.0.proj", LayerConfig(4, 16)) \
        .with_layer("transformer_blocks.0.ff.net.2", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.1.attn1.to_q", LayerConfig(4, 4)) \
        .with_layer("transformer_blocks.1.attn1.to_out.0", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.1.ff.net.0.proj", LayerConfig(4, 8, branch=BranchConfig("monarch", 2)))


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    model = tiny_cosmos()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert [type(b) for b in fused.transformer_blocks] == [FusedCosmosTransformerBlock] * 2
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(), call(n=3, frames=1, seed=1), call(per_frame=True)):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.1


def test_a_timestep_per_frame_is_a_modulation_group_per_frame(monkeypatch):
    """Video to world passes a timestep per frame, which diffusers expands to every token: the kernels take one
    modulation group per frame (row m: group m // (H·W)), not a table per token."""
    from treeq_engine.runtime import cosmos_fused

    model = tiny_cosmos()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    groups, original = [], cosmos_fused.per_token_modulation
    monkeypatch.setattr(cosmos_fused, "per_token_modulation", lambda chunk, g: groups.append(g) or original(chunk, g))
    for per_frame, want_groups in ((True, 2 * 3), (False, 2)):
        kw = call(frames=3, per_frame=per_frame)
        groups.clear()
        with torch.no_grad():
            torch.testing.assert_close(fused(**kw).sample, unfused(**kw).sample, rtol=1e-5, atol=1e-5)
        assert groups == [want_groups] * 2, per_frame


def test_the_fused_kernels_run_and_what_they_cannot_run_runs_diffusers_forward():
    from diffusers.models.transformers.transformer_cosmos import CosmosAttnProcessor2_0

    model = tiny_cosmos()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call(per_frame=True)
    assert count_kernels(fused, kw)[0] == PER_FORWARD
    assert count_kernels(unfused, kw)[0] == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}
    with torch.no_grad():
        want = unfused(**kw).sample
    hooked_parts_fall_back(fused, fused.transformer_blocks[0], ("norm1", "norm3.norm", "attn1", "attn1.to_v",
                                                                "attn1.to_out.0"), kw, want, PER_FORWARD["ln"] // 2)
    another_processor_and_training(fused, fused.transformer_blocks[1].attn1, CosmosAttnProcessor2_0, kw, want,
                                   PER_FORWARD["ln"] // 2)


def test_only_blocks_with_something_to_fuse_are_swapped_and_bf16():
    model = tiny_cosmos()
    weight_only = quantize(copy.deepcopy(model), QuantPlan.block_uniform(model, 4, 16), dtype=torch.float32)
    assert not any(isinstance(b, FusedCosmosTransformerBlock) for b in weight_only.transformer_blocks)
    half_agrees(tiny_cosmos().to(torch.bfloat16), call(dtype=torch.bfloat16))


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    """The same on the GPU's kernels (CUDA or Triton, whichever the dispatcher picks), bf16, per frame too."""
    gpu_fused_matches(tiny_cosmos(), call(dtype=torch.bfloat16, per_frame=True), PER_FORWARD)
